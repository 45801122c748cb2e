//! Neural building blocks shared by the methods.
use candle_core::Tensor;

use crate::error::Result;

pub mod backbone;
pub mod conv;
pub mod depthwise;
pub mod flow;
pub mod fused_conv;
pub mod fused_norm;
pub mod im2col;
pub mod init;
pub mod kernels;
pub mod norm;
pub mod optim;
pub mod residual;
pub mod train_state;

/// A frozen feature extractor: images in, one feature map out.
pub trait FeatureExtractor: Send + Sync {
    /// `images`: `[B, C, H, W]` with values in 0..=1 (C = 1 is replicated for RGB networks).
    /// Returns `[B, out_channels, H / stride, W / stride]` (rounded up).
    fn extract(&self, images: &Tensor) -> Result<Tensor>;
    /// [`FeatureExtractor::extract`] on candle's ops only, where `extract` runs on the fast CPU
    /// kernels (the reference they are tested against).
    fn extract_reference(&self, images: &Tensor) -> Result<Tensor> {
        self.extract(images)
    }
    fn out_channels(&self) -> usize;
    fn stride(&self) -> usize;
}
