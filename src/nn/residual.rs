//! The bottleneck residual block of NF-BMR's mapping nets: `x + ReLU(1×1(ReLU(3×3(ReLU(1×1 x)))))`.
//!
//! The paper puts a ReLU after each of the three convolutions, the last one included, so the block
//! adds a non-negative correction to its input. The inner width is a quarter of the outer one (the
//! ResNet bottleneck ratio; the paper does not give it).
use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Init, VarBuilder};

use crate::error::Result;

pub struct ResidualBlock {
    reduce: Conv2d,
    spatial: Conv2d,
    expand: Conv2d,
}

/// A same-padded convolution with zero bias and He-normal weights (fan-in, ReLU gain) scaled by
/// `gain` (1 for hidden layers; less for a layer that should start near zero).
pub fn he_conv(
    vb: VarBuilder,
    in_c: usize,
    out_c: usize,
    kernel: usize,
    gain: f64,
) -> Result<Conv2d> {
    let fan_in = (in_c * kernel * kernel) as f64;
    let weight = vb.get_with_hints(
        (out_c, in_c, kernel, kernel),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: gain * (2.0 / fan_in).sqrt(),
        },
    )?;
    let bias = vb.get_with_hints(out_c, "bias", Init::Const(0.0))?;
    let cfg = Conv2dConfig {
        padding: kernel / 2,
        ..Default::default()
    };
    Ok(Conv2d::new(weight, Some(bias), cfg))
}

impl ResidualBlock {
    /// Parameters under `vb` as `reduce.*`, `spatial.*`, `expand.*`.
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let inner = (channels / 4).max(1);
        Ok(ResidualBlock {
            reduce: he_conv(vb.pp("reduce"), channels, inner, 1, 1.0)?,
            spatial: he_conv(vb.pp("spatial"), inner, inner, 3, 1.0)?,
            expand: he_conv(vb.pp("expand"), inner, channels, 1, 1.0)?,
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
