//! Neural building blocks shared by the methods.
use candle_core::{DType, Storage, Tensor};

use crate::error::{Error, Result};

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

/// The f32 values a custom op's CPU input holds, borrowed; `what` names the input in the error.
pub(crate) fn cpu_op_input<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    use candle_core::backend::BackendStorage;
    let candle_core::CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what} must be f32, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Calls `f` with the values of a CPU tensor as one row-major f32 slice: borrowed from the
/// tensor's storage when it is contiguous f32 already (the per-part path makes no copy).
pub fn with_cpu_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::invalid(
            "tensor",
            format!("on {:?}; the fast kernels take CPU tensors", x.device()),
        ));
    };
    let start = layout.start_offset();
    f(&cpu.as_slice::<f32>()?[start..start + x.elem_count()])
}
