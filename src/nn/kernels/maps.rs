//! Feature maps of a batch in the fast kernels' layout, channels-last, for the networks that run
//! their layers on the kernels one by one (OCR-GAN, NDP-Net).
use candle_core::{Device, Tensor};

use super::{nchw_to_nhwc, nhwc_to_nchw};
use crate::error::Result;
use crate::nn::init::f32_values;

/// Feature maps of a batch, channels-last `[B, H, W, C]`.
#[derive(Clone, Debug)]
pub struct Maps {
    pub data: Vec<f32>,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

impl Maps {
    pub fn zeros(batch: usize, height: usize, width: usize, channels: usize) -> Self {
        Maps {
            data: vec![0.0; batch * height * width * channels],
            batch,
            height,
            width,
            channels,
        }
    }

    /// From a `[B, C, H, W]` tensor.
    pub fn from_nchw(t: &Tensor) -> Result<Self> {
        let (batch, channels, height, width) = t.dims4()?;
        let mut maps = Maps::zeros(batch, height, width, channels);
        nchw_to_nhwc(
            &f32_values(t)?,
            [batch, channels, height, width],
            &mut maps.data,
            |v| v,
        );
        Ok(maps)
    }

    /// As a `[B, C, H, W]` tensor.
    pub fn to_nchw(&self, device: &Device) -> Result<Tensor> {
        let dims = [self.batch, self.channels, self.height, self.width];
        let mut values = vec![0.0; self.data.len()];
        nhwc_to_nchw(&self.data, dims, &mut values);
        Ok(Tensor::from_vec(values, dims.to_vec(), device)?)
    }

    /// Positions per image.
    pub fn pixels(&self) -> usize {
        self.height * self.width
    }
}
