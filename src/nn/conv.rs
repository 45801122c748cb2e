//! Trainable strided convolutions for generators and discriminators. On CPU they are a gather
//! (im2col) and a matrix product, because candle's CPU conv2d backward goes through a naive
//! `conv_transpose2d` (see [`crate::nn::residual::MatmulConv`] for the same-padded case); on other
//! devices they are candle's own conv2d and conv_transpose2d.
//!
//! [`UpConv`] is an exact `ConvTranspose2d(kernel 4, stride 2, padding 1)`: each of the four output
//! phases of a stride-2 transposed convolution is a 2×2 convolution of the input, so the layer
//! assembles those kernels into one 3×3 convolution with four times the output channels (a fixed
//! gather of its PyTorch-layout weight, so gradients flow to that weight) and interleaves the
//! phases ("pixel shuffle") on CPU, where candle's own `conv_transpose2d` has no fast backward.
use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::error::{Error, Result};
use crate::nn::im2col::Im2Col;

/// DCGAN's initialisation, which Skip-GANomaly and OCR-GAN use for every convolution.
pub const DCGAN_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Output size of a convolution along one axis, or `None` when the kernel does not fit.
fn out_len(n: usize, kernel: usize, stride: usize, pad: usize) -> Option<usize> {
    (n + 2 * pad)
        .checked_sub(kernel)
        .map(|span| span / stride + 1)
}

/// Geometry of a convolution: square kernel, stride and zero padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

/// im2col (a CPU custom op) and one matrix product, with a weight in PyTorch's flattened layout
/// `[out, in·k·k]`.
fn gather_conv(x: &Tensor, weight: &Tensor, geometry: ConvGeometry) -> candle_core::Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let (Some(ho), Some(wo)) = (
        out_len(h, geometry.kernel, geometry.stride, geometry.padding),
        out_len(w, geometry.kernel, geometry.stride, geometry.padding),
    ) else {
        candle_core::bail!(
            "a {0}x{0} kernel does not fit a {h}x{w} input",
            geometry.kernel
        )
    };
    let cols = x.contiguous()?.apply_op1(Im2Col {
        kernel: geometry.kernel,
        stride: geometry.stride,
        padding: geometry.padding,
        height: h,
        width: w,
    })?;
    weight
        .broadcast_matmul(&cols)?
        .reshape((b, weight.dim(0)?, ho, wo))
}

/// Candle's own conv2d with the flattened weight. On CUDA it is the faster op, and its backward
/// keeps only the input: the columns of [`gather_conv`], 9–16 times the input, would stay in the
/// autograd graph for every layer (OCR-GAN's paper setting ran out of 80 GB that way).
fn native_conv(x: &Tensor, weight: &Tensor, geometry: ConvGeometry) -> candle_core::Result<Tensor> {
    let (out, flat) = weight.dims2()?;
    let k2 = geometry.kernel * geometry.kernel;
    let kernel = weight.reshape((out, flat / k2, geometry.kernel, geometry.kernel))?;
    x.conv2d(&kernel, geometry.padding, geometry.stride, 1, 1)
}

/// [`gather_conv`] on CPU, [`native_conv`] elsewhere (standard candle ops on CUDA).
fn conv(x: &Tensor, weight: &Tensor, geometry: ConvGeometry) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() {
        gather_conv(x, weight, geometry)
    } else {
        native_conv(x, weight, geometry)
    }
}

/// A strided convolution (no bias: every use is followed by a normalisation, or it is the
/// discriminator's first layer, which DCGAN leaves without one too).
pub struct Conv {
    weight: Tensor,
    geometry: ConvGeometry,
}

impl Conv {
    pub fn new(vb: VarBuilder, in_c: usize, out_c: usize, geometry: ConvGeometry) -> Result<Self> {
        Self::with_init(vb, in_c, out_c, geometry, DCGAN_INIT)
    }

    /// [`Conv::new`] with another initialisation of the weight `[out, in·k²]`.
    pub fn with_init(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        geometry: ConvGeometry,
        init: Init,
    ) -> Result<Self> {
        if geometry.kernel == 0 || geometry.stride == 0 {
            return Err(Error::invalid(
                "convolution",
                format!("{geometry:?} needs a kernel and a stride of at least 1"),
            ));
        }
        let k2 = geometry.kernel * geometry.kernel;
        let weight = vb.get_with_hints((out_c, in_c * k2), "weight", init)?;
        Ok(Conv { weight, geometry })
    }

    /// `[out, in·k·k]`, PyTorch's order.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn geometry(&self) -> ConvGeometry {
        self.geometry
    }
}

impl Conv {
    /// The same convolution; on the CPU as one custom op ([`crate::nn::fused_conv`]) whose
    /// gathered columns never enter the autograd graph (faster training of deep convolutional
    /// stacks), elsewhere as [`Module::forward`].
    pub fn forward_fused(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() {
            return self.forward(x);
        }
        let (_, _, h, w) = x.dims4()?;
        let g = self.geometry;
        if out_len(h, g.kernel, g.stride, g.padding).is_none()
            || out_len(w, g.kernel, g.stride, g.padding).is_none()
        {
            candle_core::bail!("a {0}x{0} kernel does not fit a {h}x{w} input", g.kernel)
        }
        let op = crate::nn::fused_conv::ConvOp {
            gather: Im2Col {
                kernel: g.kernel,
                stride: g.stride,
                padding: g.padding,
                height: h,
                width: w,
            },
        };
        x.contiguous()?.apply_op2(&self.weight, op)
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        conv(x, &self.weight, self.geometry)
    }
}

/// Which kernel row of a 4-tap, stride-2, padding-1 transposed convolution feeds output phase
/// `phase` (0 or 1) from the input offset `offset` (-1, 0, +1) relative to the output's source
/// row: output `2m + a` receives input `i` through kernel row `2m + a + 1 - 2i`.
fn transposed_tap(phase: usize, offset: isize) -> Option<usize> {
    match (phase, offset) {
        (0, -1) => Some(3),
        (0, 0) => Some(1),
        (1, 0) => Some(2),
        (1, 1) => Some(0),
        _ => None,
    }
}

/// `ConvTranspose2d(in, out, kernel 4, stride 2, padding 1)`: doubles height and width.
pub struct UpConv {
    /// PyTorch layout `[in, out, 4, 4]`.
    weight: Tensor,
    bias: Option<Tensor>,
    /// Rows of the assembled `[4·out, in·9]` kernel, as indices into `weight`.
    assemble: Tensor,
    out_c: usize,
}

impl UpConv {
    pub fn new(vb: VarBuilder, in_c: usize, out_c: usize, bias: bool) -> Result<Self> {
        let weight = vb.get_with_hints((in_c, out_c, 4, 4), "weight", DCGAN_INIT)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_c, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        let zero = (in_c * out_c * 16) as u32;
        let mut ids = Vec::with_capacity(4 * out_c * in_c * 9);
        for co in 0..out_c {
            for a in 0..2 {
                for bx in 0..2 {
                    for ci in 0..in_c {
                        for dy in -1isize..=1 {
                            for dx in -1isize..=1 {
                                ids.push(match (transposed_tap(a, dy), transposed_tap(bx, dx)) {
                                    (Some(ky), Some(kx)) => {
                                        ((ci * out_c + co) * 16 + ky * 4 + kx) as u32
                                    }
                                    _ => zero,
                                });
                            }
                        }
                    }
                }
            }
        }
        let n = ids.len();
        Ok(UpConv {
            weight,
            bias,
            assemble: Tensor::from_vec(ids, n, vb.device())?,
            out_c,
        })
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn out_c(&self) -> usize {
        self.out_c
    }

    /// The four output phases' kernels as one 3×3 convolution weight `[4·out, in·9]`, rows
    /// ordered `(out, phase row, phase column)`, columns PyTorch's `(in, ky, kx)`.
    pub fn phase_kernel(&self) -> candle_core::Result<Tensor> {
        let flat = self.weight.flatten_all()?;
        let padded = Tensor::cat(&[&flat, &flat.narrow(0, 0, 1)?.zeros_like()?], 0)?;
        let in_c = self.weight.dim(0)?;
        padded
            .index_select(&self.assemble, 0)?
            .reshape((4 * self.out_c, in_c * 9))
    }

    /// The four output phases as one 3×3 convolution on CPU, interleaved.
    fn phase_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let geometry = ConvGeometry {
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        gather_conv(x, &self.phase_kernel()?, geometry)?
            .reshape((b, self.out_c, 2, 2, h, w))?
            .permute((0, 1, 4, 2, 5, 3))?
            .reshape((b, self.out_c, 2 * h, 2 * w))
    }
}

impl Module for UpConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = if x.device().is_cpu() {
            self.phase_forward(x)?
        } else {
            x.conv_transpose2d(&self.weight, 1, 0, 2, 1)?
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, self.out_c, 1, 1))?),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn strided_conv_matches_candle_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w, k, s, p) in [(8, 12, 4, 2, 1), (7, 9, 3, 1, 1), (6, 6, 3, 2, 0)] {
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
            let geometry = ConvGeometry {
                kernel: k,
                stride: s,
                padding: p,
            };
            let conv = Conv::new(vb, 3, 5, geometry)?;
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev)?;
            let ours = conv.forward(&x)?;
            let theirs = x.conv2d(&conv.weight.reshape((5, 3, k, k))?, p, s, 1, 1)?;
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_diff(&ours, &theirs) < 1e-5);
        }
        Ok(())
    }

    /// The CPU path and candle's conv2d (the CUDA path) give the same output and the same
    /// gradients for input and weight.
    #[test]
    fn gather_conv_matches_native_conv_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w, k, s, p) in [
            (8, 12, 4, 2, 1),
            (7, 9, 3, 1, 1),
            (6, 6, 3, 2, 0),
            (5, 4, 1, 1, 0),
        ] {
            let geometry = ConvGeometry {
                kernel: k,
                stride: s,
                padding: p,
            };
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev)?)?;
            let weight = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3 * k * k), &dev)?)?;
            let ours = gather_conv(&x, &weight, geometry)?;
            let theirs = native_conv(&x, &weight, geometry)?;
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_diff(&ours, &theirs) < 1e-4);
            let target = Tensor::randn(0f32, 1.0, ours.dims(), &dev)?;
            let g_ours = (ours * &target)?.sum_all()?.backward()?;
            let g_theirs = (theirs * &target)?.sum_all()?.backward()?;
            for var in [&x, &weight] {
                let (a, b) = (g_ours.get(var).unwrap(), g_theirs.get(var).unwrap());
                assert!(max_diff(a, b) < 1e-4, "{geometry:?}: {}", max_diff(a, b));
            }
        }
        Ok(())
    }

    /// The CPU phase path and candle's conv_transpose2d (the CUDA path) agree, gradients included.
    #[test]
    fn up_conv_matches_candle_conv_transpose2d() -> Result<()> {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
        let up = UpConv::new(vb, 3, 4, true)?;
        // A non-zero bias, so that its broadcast is checked too.
        let data = vars.data().lock().unwrap();
        let bias: &Var = data.get("bias").unwrap();
        bias.set(&Tensor::new(&[0.1f32, -0.2, 0.3, 0.4], &dev)?)?;
        drop(data);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 6), &dev)?)?;
        let ours = up.forward(&x)?;
        let theirs = x
            .conv_transpose2d(&up.weight, 1, 0, 2, 1)?
            .broadcast_add(&up.bias.as_ref().unwrap().reshape((1, 4, 1, 1))?)?;
        assert_eq!(ours.dims(), &[2, 4, 10, 12]);
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let target = Tensor::randn(0f32, 1.0, ours.dims(), &dev)?;
        let g_ours = (ours * &target)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &target)?.sum_all()?.backward()?;
        for t in [x.as_tensor(), &up.weight] {
            assert!(max_diff(g_ours.get(t).unwrap(), g_theirs.get(t).unwrap()) < 1e-4);
        }
        Ok(())
    }

    /// The fused CPU op gives the gathered convolution's output and gradients.
    #[test]
    fn the_fused_conv_matches_the_gathered_conv_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w, k, s, p) in [
            (8, 12, 3, 1, 1),
            (7, 9, 5, 1, 2),
            (6, 6, 4, 2, 1),
            (5, 4, 1, 1, 0),
        ] {
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
            let geometry = ConvGeometry {
                kernel: k,
                stride: s,
                padding: p,
            };
            let conv = Conv::new(vb, 3, 4, geometry)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev)?)?;
            let ours = conv.forward_fused(&x)?;
            let theirs = conv.forward(&x)?;
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_diff(&ours, &theirs) < 1e-5);
            let target = Tensor::randn(0f32, 1.0, ours.dims(), &dev)?;
            let g_ours = (ours * &target)?.sum_all()?.backward()?;
            let g_theirs = (theirs * &target)?.sum_all()?.backward()?;
            for t in [x.as_tensor(), conv.weight()] {
                let (a, b) = (g_ours.get(t).unwrap(), g_theirs.get(t).unwrap());
                assert!(max_diff(a, b) < 1e-4, "{geometry:?}: {}", max_diff(a, b));
            }
        }
        Ok(())
    }

    #[test]
    fn up_conv_weight_receives_gradient_on_every_tap() -> Result<()> {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
        let up = UpConv::new(vb, 2, 3, false)?;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 4, 4), &dev)?;
        let grads = up.forward(&x)?.sqr()?.sum_all()?.backward()?;
        let g = grads.get(&up.weight).expect("gradient for the weight");
        let zeros = g
            .abs()?
            .flatten_all()?
            .eq(0f32)?
            .to_dtype(DType::F32)?
            .sum_all()?;
        assert_eq!(zeros.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
