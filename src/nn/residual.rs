//! The bottleneck residual block of NF-BMR's mapping nets: `x + ReLU(1×1(ReLU(3×3(ReLU(1×1 x)))))`,
//! and [`MatmulConv`], the trainable same-padded convolution the flow and the mapping nets use.
//!
//! The paper puts a ReLU after each of the three convolutions, the last one included, so the block
//! adds a non-negative correction to its input. The inner width is a quarter of the outer one (the
//! ResNet bottleneck ratio; the paper does not give it).
use std::sync::Mutex;

use candle_core::{Device, Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::error::{Error, Result};
use crate::nn::kernels::heads::{FastConv, FastResidual};
use crate::nn::kernels::PackedB;

/// A same-padded, stride-1 convolution written as a gather and a matrix product, because candle's
/// CPU conv2d backward goes through a naive `conv_transpose2d`, and shifted slices (`narrow`) have
/// a slow backward too (measured on 2 busy cores, a 16→12-channel 3×3 conv on 8×16×16, forward and
/// backward: ~90 ms with slices, ~16 ms with this gather).
///
/// With at most as many input as output channels it gathers the k² shifted inputs (im2col, one
/// `index_select`) and multiplies once; otherwise it multiplies first, giving k² partial outputs,
/// and gathers and sums their shifts, so the intermediate has `k² · min(in, out)` channels. Zero
/// padding is a zero appended to each flattened plane, which out-of-image taps index. The weight
/// is stored in the layout its product needs, `[out, in·k²]` (PyTorch's `[out, in, k, k]`
/// flattened) or `[out·k², in]`, so training and inference use it without a copy; bias `[out]`.
pub struct MatmulConv {
    weight: Tensor,
    bias: Tensor,
    out_c: usize,
    kernel: usize,
    taps_on_output: bool,
    /// Gather indices for the last input size seen, `(height, width, indices)`.
    gather: Mutex<Option<(usize, usize, Tensor)>>,
}

impl MatmulConv {
    /// He-normal weights (fan-in, ReLU gain) scaled by `gain` (1 for hidden layers; less for a
    /// layer that should start near zero); zero bias.
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        gain: f64,
    ) -> Result<Self> {
        if kernel.is_multiple_of(2) {
            return Err(Error::invalid(
                "convolution kernel",
                format!("{kernel} is even; a same-padded kernel must be odd"),
            ));
        }
        let taps = kernel * kernel;
        let taps_on_output = kernel > 1 && in_c > out_c;
        let shape = if taps_on_output {
            (out_c * taps, in_c)
        } else {
            (out_c, in_c * taps)
        };
        let fan_in = (in_c * taps) as f64;
        let weight = vb.get_with_hints(
            shape,
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: gain * (2.0 / fan_in).sqrt(),
            },
        )?;
        let bias = vb.get_with_hints(out_c, "bias", Init::Const(0.0))?;
        Ok(MatmulConv {
            weight,
            bias: bias.reshape((out_c, 1))?,
            out_c,
            kernel,
            taps_on_output,
            gather: Mutex::new(None),
        })
    }

    /// Flat source index of every (position, tap) pair of an `h × w` plane, `h·w` (the appended
    /// zero) where the tap falls outside. Ordered taps-outer for gathering inputs, positions-outer
    /// (with a `t·h·w` plane offset) for gathering partial outputs.
    fn indices(&self, h: usize, w: usize, device: &Device) -> candle_core::Result<Tensor> {
        let mut cache = self
            .gather
            .lock()
            .map_err(|_| candle_core::Error::Msg("convolution index cache poisoned".into()))?;
        if let Some((ch, cw, ids)) = cache.as_ref() {
            if (*ch, *cw) == (h, w) {
                return Ok(ids.clone());
            }
        }
        let (k, n) = (self.kernel, h * w);
        let p = (k / 2) as isize;
        let taps = k * k;
        let source = |pos: usize, t: usize| -> Option<usize> {
            let y = (pos / w) as isize + (t / k) as isize - p;
            let x = (pos % w) as isize + (t % k) as isize - p;
            ((0..h as isize).contains(&y) && (0..w as isize).contains(&x))
                .then(|| y as usize * w + x as usize)
        };
        let ids: Vec<u32> = if self.taps_on_output {
            (0..n)
                .flat_map(|pos| (0..taps).map(move |t| (pos, t)))
                .map(|(pos, t)| source(pos, t).map_or(taps * n, |s| t * n + s) as u32)
                .collect()
        } else {
            (0..taps)
                .flat_map(|t| (0..n).map(move |pos| (pos, t)))
                .map(|(pos, t)| source(pos, t).unwrap_or(n) as u32)
                .collect()
        };
        let ids = Tensor::from_vec(ids, taps * n, device)?;
        *cache = Some((h, w, ids.clone()));
        Ok(ids)
    }
}

impl MatmulConv {
    /// A snapshot of the current weights for the fast CPU kernels (inference only).
    pub fn fast(&self) -> Result<FastConv> {
        let weight: Vec<f32> = self.weight.flatten_all()?.to_vec1()?;
        let bias: Vec<f32> = self.bias.flatten_all()?.to_vec1()?;
        let taps = self.kernel * self.kernel;
        let in_c = weight.len() / (self.out_c * taps);
        // Depth `(tap, in)` as the implicit im2col reads it; tap `t = ky·k + kx`.
        let packed = if self.taps_on_output {
            PackedB::new(
                taps * in_c,
                self.out_c,
                |k, o| weight[(o * taps + k / in_c) * in_c + k % in_c],
                &bias,
            )
        } else {
            PackedB::new(
                taps * in_c,
                self.out_c,
                |k, o| weight[o * in_c * taps + (k % in_c) * taps + k / in_c],
                &bias,
            )
        };
        Ok(FastConv::new(packed, self.kernel, in_c))
    }
}

/// `[B, C, N]` → `[B, C, N + 1]` with a zero last element, the target of out-of-image taps.
fn append_zero(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, _) = x.dims3()?;
    Tensor::cat(&[x, &Tensor::zeros((b, c, 1), x.dtype(), x.device())?], 2)
}

impl Module for MatmulConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (n, taps) = (h * w, self.kernel * self.kernel);
        let x = x.reshape((b, c, n))?;
        let y = if self.kernel == 1 {
            self.weight.broadcast_matmul(&x)?
        } else if !self.taps_on_output {
            let cols = append_zero(&x)?
                .index_select(&self.indices(h, w, x.device())?, 2)?
                .reshape((b, c * taps, n))?;
            self.weight.broadcast_matmul(&cols)?
        } else {
            let partial = self
                .weight
                .broadcast_matmul(&x)?
                .reshape((b, self.out_c, taps * n))?;
            append_zero(&partial)?
                .index_select(&self.indices(h, w, x.device())?, 2)?
                .reshape((b, self.out_c, n, taps))?
                .sum(3)?
        };
        y.broadcast_add(&self.bias)?.reshape((b, self.out_c, h, w))
    }
}

pub struct ResidualBlock {
    reduce: MatmulConv,
    spatial: MatmulConv,
    expand: MatmulConv,
}

impl ResidualBlock {
    /// Parameters under `vb` as `reduce.*`, `spatial.*`, `expand.*`.
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let inner = (channels / 4).max(1);
        Ok(ResidualBlock {
            reduce: MatmulConv::new(vb.pp("reduce"), channels, inner, 1, 1.0)?,
            spatial: MatmulConv::new(vb.pp("spatial"), inner, inner, 3, 1.0)?,
            expand: MatmulConv::new(vb.pp("expand"), inner, channels, 1, 1.0)?,
        })
    }
}

impl ResidualBlock {
    /// A snapshot of the current weights for the fast CPU kernels (inference only).
    pub fn fast(&self) -> Result<FastResidual> {
        Ok(FastResidual {
            reduce: self.reduce.fast()?,
            spatial: self.spatial.fast()?,
            expand: self.expand.fast()?,
        })
    }
}

impl Module for ResidualBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.reduce.forward(x)?.relu()?;
        let h = self.spatial.forward(&h)?.relu()?;
        let h = self.expand.forward(&h)?.relu()?;
        x + h
    }
}
