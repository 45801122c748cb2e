//! The fast kernels as candle custom ops, for inference on candle tensors (CPU, f32): what the
//! candle-built networks (OCR-GAN's generators and discriminator) run when no gradient is wanted.
//! The engines of Lite0 and the NF-BMR head call the kernels on their own reused buffers instead,
//! since a custom op allocates its output on every call.
//!
//! The ops record no backward, so [`dense_conv2d`] uses them only when neither operand tracks a
//! gradient: there is none to lose (the brief's trap of ops that silently drop gradients).
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::{
    nchw_to_nhwc, nhwc_to_nchw, pack_conv_weight, Activation, ConvGeom, Epilogue, Kernels,
};

/// A dense convolution of `[B, C, H, W]` by a weight in PyTorch's flattened layout
/// `[out, C·k·k]`, square kernel, stride and zero padding, no bias.
#[derive(Clone, Copy, Debug)]
pub struct DenseConv2d {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub kernels: Kernels,
}

fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("fast conv2d {what}: f32 only, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fast conv2d {what}: not contiguous"),
    }
}

impl CustomOp2 for DenseConv2d {
    fn name(&self) -> &'static str {
        "fast-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = x_layout.shape().dims4()?;
        let (out_c, depth) = w_layout.shape().dims2()?;
        let k = self.kernel;
        if depth != c * k * k || k == 0 || self.stride == 0 {
            candle_core::bail!(
                "fast conv2d: weight [{out_c}, {depth}] is not [out, {c}·{k}·{k}] (stride {})",
                self.stride
            )
        }
        let span = |n: usize| {
            (n + 2 * self.padding)
                .checked_sub(k)
                .map(|s| s / self.stride + 1)
        };
        let (Some(oh), Some(ow)) = (span(h), span(w)) else {
            candle_core::bail!("fast conv2d: a {k}x{k} kernel does not fit a {h}x{w} input")
        };
        let x = f32_slice(x, x_layout, "input")?;
        let weight = f32_slice(weight, w_layout, "weight")?;
        let packed = pack_conv_weight(weight, out_c, c, k, k, &vec![0.0; out_c]);
        let mut image = vec![0.0; x.len()];
        nchw_to_nhwc(x, [b, c, h, w], &mut image, |v| v);
        let geom = ConvGeom {
            batch: b,
            height: h,
            width: w,
            in_c: c,
            kernel_h: k,
            kernel_w: k,
            stride: self.stride,
            pad_top: self.padding,
            pad_left: self.padding,
            out_h: oh,
            out_w: ow,
        };
        let mut out = vec![0.0; b * oh * ow * out_c];
        let identity = Epilogue {
            activation: Activation::Identity,
            residual: None,
        };
        self.kernels
            .conv2d(&image, geom, &packed, identity, &mut out)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut result = vec![0.0; out.len()];
        nhwc_to_nchw(&out, [b, out_c, oh, ow], &mut result);
        Ok((CpuStorage::F32(result), Shape::from((b, out_c, oh, ow))))
    }
}

/// `x` (`[B, C, H, W]`) convolved with `weight` (`[out, C·k·k]`) on the fast kernels when that is
/// safe and possible: on the CPU, in f32, with neither operand tracking a gradient. `None`
/// otherwise, for the caller's differentiable path.
pub fn dense_conv2d(
    x: &Tensor,
    weight: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Option<Tensor>> {
    let usable = x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && weight.dtype() == candle_core::DType::F32
        && !x.track_op()
        && !weight.track_op();
    if !usable {
        return Ok(None);
    }
    let op = DenseConv2d {
        kernel,
        stride,
        padding,
        kernels: Kernels::detect(),
    };
    Ok(Some(
        x.contiguous()?
            .apply_op2_no_bwd(&weight.contiguous()?, &op)?,
    ))
}
