//! In-memory images and masks as the rest of vigil sees them.
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The size and channel count a model takes; images of any size are resized to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    pub height: usize,
    pub width: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
}

/// A CHW image with values in 0..=1.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// A binary mask, row-major, 1 = defect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

impl Image {
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Image {
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
        }
    }

    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }

    pub fn plane_mut(&mut self, c: usize) -> &mut [f32] {
        let n = self.height * self.width;
        &mut self.data[c * n..(c + 1) * n]
    }
}

impl Mask {
    pub fn zeros(height: usize, width: usize) -> Self {
        Mask {
            height,
            width,
            data: vec![0; height * width],
        }
    }

    pub fn any(&self) -> bool {
        self.data.iter().any(|&v| v != 0)
    }
}

/// Stacks same-sized images into a `[B, C, H, W]` tensor.
pub fn batch_tensor(images: &[&Image], device: &Device) -> Result<Tensor> {
    let first = images
        .first()
        .ok_or_else(|| crate::error::Error::invalid("batch", "no images"))?;
    let (c, h, w) = (first.channels, first.height, first.width);
    let mut data = Vec::with_capacity(images.len() * c * h * w);
    for img in images {
        if (img.channels, img.height, img.width) != (c, h, w) {
            return Err(crate::error::Error::invalid(
                "batch",
                format!(
                    "image of {}x{}x{} in a batch of {c}x{h}x{w}",
                    img.channels, img.height, img.width
                ),
            ));
        }
        data.extend_from_slice(&img.data);
    }
    Ok(Tensor::from_vec(data, (images.len(), c, h, w), device)?)
}
