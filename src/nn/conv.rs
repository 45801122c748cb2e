//! Trainable strided convolutions for generators and discriminators, written as a gather (im2col,
//! one `index_select`) and a matrix product, because candle's CPU conv2d backward goes through a
//! naive `conv_transpose2d` (see [`crate::nn::residual::MatmulConv`] for the same-padded case).
//!
//! [`UpConv`] is an exact `ConvTranspose2d(kernel 4, stride 2, padding 1)`: each of the four output
//! phases of a stride-2 transposed convolution is a 2×2 convolution of the input, so the layer
//! assembles those kernels into one 3×3 convolution with four times the output channels (a fixed
//! gather of its PyTorch-layout weight, so gradients flow to that weight) and interleaves the
//! phases ("pixel shuffle"). Candle's own `conv_transpose2d` has no fast CPU backward.
use std::sync::Mutex;

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

/// The gather indices of one input size, cached: a layer sees one size in training and inference.
#[derive(Default)]
struct GatherCache(Mutex<Option<(usize, usize, Tensor)>>);

impl GatherCache {
    fn get(
        &self,
        shape: (usize, usize),
        make: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut cache = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("convolution index cache poisoned".into()))?;
        if let Some((h, w, ids)) = cache.as_ref() {
            if (*h, *w) == shape {
                return Ok(ids.clone());
            }
        }
        let ids = make()?;
        *cache = Some((shape.0, shape.1, ids.clone()));
        Ok(ids)
    }
}

/// Geometry of a convolution: square kernel, stride and zero padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeometry {
    /// For each tap (outer) and output position (inner), the flat input index it reads, or `h·w`
    /// (an appended zero) in the padding.
    fn indices(&self, h: usize, w: usize) -> candle_core::Result<(usize, usize, Vec<u32>)> {
        let (k, s, p) = (self.kernel, self.stride, self.padding as isize);
        let (Some(ho), Some(wo)) = (
            out_len(h, k, s, self.padding),
            out_len(w, k, s, self.padding),
        ) else {
            candle_core::bail!("a {k}x{k} kernel does not fit a {h}x{w} input")
        };
        let zero = (h * w) as u32;
        let mut ids = Vec::with_capacity(k * k * ho * wo);
        for ky in 0..k {
            for kx in 0..k {
                for oy in 0..ho {
                    let y = (oy * s + ky) as isize - p;
                    for ox in 0..wo {
                        let x = (ox * s + kx) as isize - p;
                        let inside = (0..h as isize).contains(&y) && (0..w as isize).contains(&x);
                        ids.push(if inside {
                            (y as usize * w + x as usize) as u32
                        } else {
                            zero
                        });
                    }
                }
            }
        }
        Ok((ho, wo, ids))
    }
}

/// `[B, C, N]` → `[B, C, N + 1]` with a zero last element, the target of padding taps.
fn append_zero(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, _) = x.dims3()?;
    Tensor::cat(&[x, &Tensor::zeros((b, c, 1), x.dtype(), x.device())?], 2)
}

/// The columns `[B, C·k², Ho·Wo]` of `x` for `geometry`: a CPU custom op, or on other devices a
/// candle `index_select` (standard ops on CUDA).
fn columns(x: &Tensor, geometry: ConvGeometry, cache: &GatherCache) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if x.device().is_cpu() {
        let (Some(_), Some(_)) = (
            out_len(h, geometry.kernel, geometry.stride, geometry.padding),
            out_len(w, geometry.kernel, geometry.stride, geometry.padding),
        ) else {
            candle_core::bail!(
                "a {0}x{0} kernel does not fit a {h}x{w} input",
                geometry.kernel
            )
        };
        return x.contiguous()?.apply_op1(Im2Col {
            kernel: geometry.kernel,
            stride: geometry.stride,
            padding: geometry.padding,
            height: h,
            width: w,
        });
    }
    let taps = geometry.kernel * geometry.kernel;
    let (ho, wo, ids) = geometry.indices(h, w)?;
    let index = cache.get((h, w), || Tensor::from_vec(ids, taps * ho * wo, x.device()))?;
    append_zero(&x.reshape((b, c, h * w))?)?
        .index_select(&index, 2)?
        .reshape((b, c * taps, ho * wo))
}

/// im2col + matmul with a weight in PyTorch's flattened layout `[out, in·k·k]`.
fn gather_conv(
    x: &Tensor,
    weight: &Tensor,
    geometry: ConvGeometry,
    cache: &GatherCache,
) -> candle_core::Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let ho = out_len(h, geometry.kernel, geometry.stride, geometry.padding).unwrap_or(0);
    let wo = out_len(w, geometry.kernel, geometry.stride, geometry.padding).unwrap_or(0);
    let cols = columns(x, geometry, cache)?;
    let out = weight.dim(0)?;
    weight.broadcast_matmul(&cols)?.reshape((b, out, ho, wo))
}

/// A strided convolution (no bias: every use is followed by a normalisation, or it is the
/// discriminator's first layer, which DCGAN leaves without one too).
pub struct Conv {
    weight: Tensor,
    geometry: ConvGeometry,
    cache: GatherCache,
}

impl Conv {
    pub fn new(vb: VarBuilder, in_c: usize, out_c: usize, geometry: ConvGeometry) -> Result<Self> {
        if geometry.kernel == 0 || geometry.stride == 0 {
            return Err(Error::invalid(
                "convolution",
                format!("{geometry:?} needs a kernel and a stride of at least 1"),
            ));
        }
        let k2 = geometry.kernel * geometry.kernel;
        let weight = vb.get_with_hints((out_c, in_c * k2), "weight", DCGAN_INIT)?;
        Ok(Conv {
            weight,
            geometry,
            cache: GatherCache::default(),
        })
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        gather_conv(x, &self.weight, self.geometry, &self.cache)
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
    cache: GatherCache,
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
            cache: GatherCache::default(),
        })
    }

    fn kernel(&self) -> candle_core::Result<Tensor> {
        let flat = self.weight.flatten_all()?;
        let padded = Tensor::cat(&[&flat, &flat.narrow(0, 0, 1)?.zeros_like()?], 0)?;
        let in_c = self.weight.dim(0)?;
        padded
            .index_select(&self.assemble, 0)?
            .reshape((4 * self.out_c, in_c * 9))
    }
}

impl Module for UpConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let geometry = ConvGeometry {
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        let phases = gather_conv(x, &self.kernel()?, geometry, &self.cache)?;
        let y = phases
            .reshape((b, self.out_c, 2, 2, h, w))?
            .permute((0, 1, 4, 2, 5, 3))?
            .reshape((b, self.out_c, 2 * h, 2 * w))?;
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

    /// The CPU custom op and the `index_select` path (used on CUDA) give the same columns and the
    /// same input gradient.
    #[test]
    fn im2col_op_matches_the_index_gather_forward_and_backward() -> Result<()> {
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
            let var = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev)?)?;
            let x = var.as_tensor();
            let op = columns(x, geometry, &GatherCache::default())?;
            let (ho, wo, ids) = geometry.indices(h, w)?;
            let index = Tensor::from_vec(ids, k * k * ho * wo, &dev)?;
            let reference = append_zero(&x.reshape((2, 3, h * w))?)?
                .index_select(&index, 2)?
                .reshape((2, 3 * k * k, ho * wo))?;
            assert_eq!(op.dims(), reference.dims());
            assert!(max_diff(&op, &reference) < 1e-7);
            let weights = Tensor::randn(0f32, 1.0, op.dims(), &dev)?;
            let g_op = (op * &weights)?.sum_all()?.backward()?;
            let g_ref = (reference * &weights)?.sum_all()?.backward()?;
            assert!(max_diff(g_op.get(x).unwrap(), g_ref.get(x).unwrap()) < 1e-5);
        }
        Ok(())
    }

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
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 6), &dev)?;
        let ours = up.forward(&x)?;
        let theirs = x
            .conv_transpose2d(&up.weight, 1, 0, 2, 1)?
            .broadcast_add(&up.bias.as_ref().unwrap().reshape((1, 4, 1, 1))?)?;
        assert_eq!(ours.dims(), &[2, 4, 10, 12]);
        assert!(max_diff(&ours, &theirs) < 1e-5);
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
