//! Depthwise convolution from shifted multiply-adds of tensor slices.
//!
//! Candle's grouped `conv2d` with `groups = C` is about 8x slower on CPU than this; built only from
//! differentiable tensor ops (pad, reshape, permute, narrow, mul, add), it also trains.
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// Zero padding around an image, in pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SamePad {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl SamePad {
    /// TensorFlow "same" padding for a `kernel`×`kernel` window at `stride`: the output is
    /// `ceil(n / stride)` on each axis, and an odd padding pixel goes to the bottom/right.
    pub fn new(height: usize, width: usize, kernel: usize, stride: usize) -> Self {
        let (top, bottom) = same_padding(height, kernel, stride);
        let (left, right) = same_padding(width, kernel, stride);
        Self {
            top,
            bottom,
            left,
            right,
        }
    }
}

fn same_padding(n: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let stride = stride.max(1);
    let total = (n.div_ceil(stride).saturating_sub(1) * stride + kernel).saturating_sub(n);
    (total / 2, total - total / 2)
}

/// Depthwise 2-D convolution of `x` `[B, C, H, W]` with `w` `[C, 1, k, k]` (no bias).
///
/// Strided windows are handled by splitting the padded input into `stride²` phase planes, so that
/// every tap reads one contiguous run per channel: the output is computed on a grid as wide as a
/// phase plane and the surplus columns are cut off at the end.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: SamePad) -> Result<Tensor> {
    let (batch, channels, height, width) = x.dims4().map_err(|_| {
        Error::invalid(
            "depthwise input",
            format!("shape {:?} is not [B, C, H, W]", x.dims()),
        )
    })?;
    let (w_channels, w_one, kernel, kernel_w) = w.dims4().map_err(|_| {
        Error::invalid(
            "depthwise weight",
            format!("shape {:?} is not [C, 1, k, k]", w.dims()),
        )
    })?;
    if w_channels != channels || w_one != 1 || kernel != kernel_w || kernel == 0 {
        return Err(Error::invalid(
            "depthwise weight",
            format!(
                "shape {:?} does not fit {channels} input channels (expected [{channels}, 1, k, k])",
                w.dims()
            ),
        ));
    }
    if stride == 0 {
        return Err(Error::invalid("depthwise stride", "must be at least 1"));
    }
    let padded_h = height + pad.top + pad.bottom;
    let padded_w = width + pad.left + pad.right;
    if padded_h < kernel || padded_w < kernel {
        return Err(Error::invalid(
            "depthwise input",
            format!(
                "{height}x{width} padded by {pad:?} is smaller than the {kernel}x{kernel} kernel"
            ),
        ));
    }
    let out_h = (padded_h - kernel) / stride + 1;
    let out_w = (padded_w - kernel) / stride + 1;
    let reach = (kernel - 1) / stride;
    // Phase planes of `rows`×`cols`; one spare row keeps the last tap's flat run inside the plane.
    let rows = out_h + reach + usize::from(reach > 0);
    let cols = out_w + reach;

    let x = fit_axis(x, 2, pad.top, rows * stride)?;
    let x = fit_axis(&x, 3, pad.left, cols * stride)?;
    let planes = if stride == 1 {
        x.reshape((batch, channels, 1, rows * cols))?
    } else {
        x.reshape((batch, channels, rows, stride, cols, stride))?
            .permute((0, 1, 3, 5, 2, 4))?
            .contiguous()?
            .reshape((batch, channels, stride * stride, rows * cols))?
    };
    let taps = w.reshape((1, channels, 1, kernel * kernel))?;

    let run = out_h * cols;
    let mut acc: Option<Tensor> = None;
    for i in 0..kernel {
        for j in 0..kernel {
            let phase = (i % stride) * stride + j % stride;
            let start = (i / stride) * cols + j / stride;
            let shifted = planes.narrow(2, phase, 1)?.narrow(3, start, run)?;
            let term = shifted.broadcast_mul(&taps.narrow(3, i * kernel + j, 1)?)?;
            acc = Some(match acc {
                None => term,
                Some(acc) => (acc + term)?,
            });
        }
    }
    let acc = acc.ok_or_else(|| Error::invalid("depthwise weight", "kernel has no taps"))?;
    Ok(acc
        .reshape((batch, channels, out_h, cols))?
        .narrow(3, 0, out_w)?)
}

/// Places `before` zeros ahead of axis `dim` and pads or crops its end to length `target`.
fn fit_axis(x: &Tensor, dim: usize, before: usize, target: usize) -> Result<Tensor> {
    let len = x.dim(dim)?;
    let kept = len.min(target.saturating_sub(before));
    let x = if kept < len {
        x.narrow(dim, 0, kept)?
    } else {
        x.clone()
    };
    Ok(x.pad_with_zeros(dim, before.min(target), target - before.min(target) - kept)?)
}

/// A depthwise convolution layer with TF "same" padding and no bias (as in EfficientNet).
#[derive(Clone, Debug)]
pub struct DepthwiseConv {
    weight: Tensor,
    kernel: usize,
    stride: usize,
}

impl DepthwiseConv {
    /// Reads `weight` `[channels, 1, kernel, kernel]` from `vb`.
    pub fn new(vb: VarBuilder, channels: usize, kernel: usize, stride: usize) -> Result<Self> {
        if stride == 0 || kernel == 0 {
            return Err(Error::invalid(
                "depthwise layer",
                format!("kernel {kernel} and stride {stride} must be at least 1"),
            ));
        }
        let weight = vb.get((channels, 1, kernel, kernel), "weight")?;
        Ok(Self {
            weight,
            kernel,
            stride,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for DepthwiseConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        let pad = SamePad::new(height, width, self.kernel, self.stride);
        depthwise_conv2d(x, &self.weight, self.stride, pad).map_err(candle_core::Error::wrap)
    }
}
