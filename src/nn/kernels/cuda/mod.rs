//! Candle custom ops with CUDA kernels (`kernels.cu`) for the layers that candle's ops make
//! launch-bound on the GPU: the depthwise convolution with its bias and activation (candle's path
//! takes k² shifted multiply-adds, 25 full-tensor kernels for a 5 × 5 layer, plus the padding,
//! phase split, bias and clamp), and the bias/activation/residual epilogue of a 1 × 1 convolution
//! done as a matrix product (one kernel instead of two or three). Each is one launch on the
//! tensors' stream, with no host synchronisation.
//!
//! The ops compute the same on the CPU (`cpu_fwd`, plain loops: the reference their CUDA kernels
//! are tested against, and what runs if they are applied to CPU tensors); the CUDA side is built
//! with `--features cuda`, its kernels compiled to PTX by nvcc in `build.rs`. They build no
//! gradient: callers use them only where no input tracks one ([`usable`]), and keep candle's
//! differentiable ops for training.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::Activation;
use crate::error::{Error, Result};
use crate::nn::cpu_op_input;
use crate::nn::depthwise::SamePad;

/// Whether the custom ops replace candle's ops where they can: on unless `VIGIL_CUDA_OPS=candle`
/// (for comparisons; `cargo bench --bench cuda_methods` switches it with [`set_enabled`]).
static ENABLED: LazyLock<AtomicBool> =
    LazyLock::new(|| AtomicBool::new(std::env::var("VIGIL_CUDA_OPS").as_deref() != Ok("candle")));

/// Turns the custom ops on or off for the whole process (for comparisons with candle's ops).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the custom ops may replace candle's ops for these inputs: they are enabled, on a CUDA
/// device (on the CPU the fast kernels serve), and no input tracks a gradient.
pub fn usable(inputs: &[&Tensor]) -> bool {
    cfg!(feature = "cuda")
        && ENABLED.load(Ordering::Relaxed)
        && inputs.iter().all(|t| t.device().is_cuda() && !t.track_op())
}

/// Depthwise convolution of `x` `[B, C, H, W]` with `weight` `[C, 1, k, k]`, plus `bias` `[C]`,
/// then `activation`; zero padding `pad` (TF "same" in the backbone), any stride.
pub fn depthwise(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    pad: SamePad,
    activation: Activation,
) -> Result<Tensor> {
    let (_, channels, height, width) = x.dims4()?;
    let (w_channels, one, kernel, kernel_w) = weight.dims4()?;
    if w_channels != channels || one != 1 || kernel != kernel_w || kernel == 0 || stride == 0 {
        return Err(Error::invalid(
            "depthwise op",
            format!(
                "weight {:?} and stride {stride} do not fit input {:?}",
                weight.dims(),
                x.dims()
            ),
        ));
    }
    if bias.elem_count() != channels {
        return Err(Error::invalid(
            "depthwise op bias",
            format!("{} values for {channels} channels", bias.elem_count()),
        ));
    }
    let padded_h = height + pad.top + pad.bottom;
    let padded_w = width + pad.left + pad.right;
    if padded_h < kernel || padded_w < kernel {
        return Err(Error::invalid(
            "depthwise op input",
            format!(
                "{height}x{width} padded by {pad:?} is smaller than the {kernel}x{kernel} kernel"
            ),
        ));
    }
    let op = DepthwiseOp {
        kernel,
        stride,
        pad_top: pad.top,
        pad_left: pad.left,
        out_h: (padded_h - kernel) / stride + 1,
        out_w: (padded_w - kernel) / stride + 1,
        activation,
    };
    Ok(x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.flatten_all()?.contiguous()?,
        &op,
    )?)
}

/// `activation(x + bias[channel])`, plus `residual` when given: `x` `[B, C, …]`, `bias` `[C]` (any
/// shape of `C` values), `residual` shaped as `x`.
pub fn bias_activation(
    x: &Tensor,
    bias: &Tensor,
    activation: Activation,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let channels = x.dim(1)?;
    if bias.elem_count() != channels {
        return Err(Error::invalid(
            "bias op",
            format!("{} values for {channels} channels", bias.elem_count()),
        ));
    }
    let op = BiasAct {
        channels,
        activation,
    };
    let (x, bias) = (x.contiguous()?, bias.flatten_all()?.contiguous()?);
    Ok(match residual {
        Some(residual) => {
            if residual.dims() != x.dims() {
                return Err(Error::invalid(
                    "bias op residual",
                    format!(
                        "shape {:?} is not the input's {:?}",
                        residual.dims(),
                        x.dims()
                    ),
                ));
            }
            x.apply_op3_no_bwd(&bias, &residual.contiguous()?, &op)?
        }
        None => x.apply_op2_no_bwd(&bias, &op)?,
    })
}

/// The depthwise convolution of [`depthwise`], its geometry resolved.
struct DepthwiseOp {
    kernel: usize,
    stride: usize,
    pad_top: usize,
    pad_left: usize,
    out_h: usize,
    out_w: usize,
    activation: Activation,
}

/// The epilogue of [`bias_activation`].
struct BiasAct {
    channels: usize,
    activation: Activation,
}

/// The values of a contiguous f32 CPU input.
impl DepthwiseOp {
    /// `[B, C, OH, OW]` from the input's shape.
    fn out_shape(&self, input: &Layout) -> candle_core::Result<Shape> {
        let (b, c, _, _) = input.shape().dims4()?;
        Ok(Shape::from((b, c, self.out_h, self.out_w)))
    }
}

impl CustomOp3 for DepthwiseOp {
    fn name(&self) -> &'static str {
        "vigil-depthwise"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_op_input(s1, l1, "depthwise input")?;
        let w = cpu_op_input(s2, l2, "depthwise weight")?;
        let bias = cpu_op_input(s3, l3, "depthwise bias")?;
        let (_, channels, height, width) = l1.shape().dims4()?;
        let (k, s) = (self.kernel, self.stride);
        let (oh, ow) = (self.out_h, self.out_w);
        let mut out = vec![0f32; x.len() / (height * width) * oh * ow];
        for (plane, (src, dst)) in x
            .chunks_exact(height * width)
            .zip(out.chunks_exact_mut(oh * ow))
            .enumerate()
        {
            let c = plane % channels;
            let taps = &w[c * k * k..(c + 1) * k * k];
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias[c];
                    for ky in 0..k {
                        let Some(iy) = (oy * s + ky).checked_sub(self.pad_top) else {
                            continue;
                        };
                        if iy >= height {
                            continue;
                        }
                        for kx in 0..k {
                            let Some(ix) = (ox * s + kx).checked_sub(self.pad_left) else {
                                continue;
                            };
                            if ix < width {
                                acc = src[iy * width + ix].mul_add(taps[ky * k + kx], acc);
                            }
                        }
                    }
                    dst[oy * ow + ox] = self.activation.apply(acc);
                }
            }
        }
        Ok((CpuStorage::F32(out), self.out_shape(l1)?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        gpu::depthwise(self, (s1, l1), (s2, l2), (s3, l3))
    }
}

impl BiasAct {
    fn cpu(
        &self,
        x: &[f32],
        bias: &[f32],
        residual: Option<&[f32]>,
        shape: &Shape,
    ) -> (CpuStorage, Shape) {
        let plane = x.len() / (shape.dims()[0] * self.channels).max(1);
        let mut out: Vec<f32> = x
            .chunks_exact(plane.max(1))
            .enumerate()
            .flat_map(|(i, values)| {
                let b = bias[i % self.channels];
                values.iter().map(move |&v| self.activation.apply(v + b))
            })
            .collect();
        if let Some(residual) = residual {
            for (o, &r) in out.iter_mut().zip(residual) {
                *o += r;
            }
        }
        (CpuStorage::F32(out), shape.clone())
    }
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "vigil-bias-activation"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_op_input(s1, l1, "bias op input")?;
        let bias = cpu_op_input(s2, l2, "bias op bias")?;
        Ok(self.cpu(x, bias, None, l1.shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        gpu::bias_act(self, (s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for BiasAct {
    fn name(&self) -> &'static str {
        "vigil-bias-activation-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_op_input(s1, l1, "bias op input")?;
        let bias = cpu_op_input(s2, l2, "bias op bias")?;
        let residual = cpu_op_input(s3, l3, "bias op residual")?;
        Ok(self.cpu(x, bias, Some(residual), l1.shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        gpu::bias_act(self, (s1, l1), (s2, l2), Some((s3, l3)))
    }
}

/// The launches (with `--features cuda`).
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{CudaStorage, Layout, Shape};

    use super::{BiasAct, DepthwiseOp};

    /// The kernels' PTX, compiled by `build.rs`.
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/vigil_kernels.ptx"));
    const MODULE: &str = "vigil_kernels";
    /// Threads per block of the element-wise kernels.
    const THREADS: u32 = 256;
    /// Must match `TILE_W` and `TILE_H` in kernels.cu.
    const TILE: (u32, u32) = (32, 8);

    type Input<'a> = (&'a CudaStorage, &'a Layout);

    /// The contiguous f32 values of an input, as a view from its offset.
    fn view<'a>(
        (storage, layout): Input<'a>,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, f32>> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: not contiguous")))?;
        Ok(storage.as_cuda_slice::<f32>()?.slice(start..end))
    }

    fn grid_for(total: usize) -> LaunchConfig {
        // A grid-stride loop: enough blocks to fill any GPU, no more.
        let blocks = total.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn int(v: usize) -> candle_core::Result<i32> {
        i32::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("{v} does not fit a CUDA int")))
    }

    fn wrap(out: CudaSlice<f32>, dev: &CudaDevice, shape: Shape) -> (CudaStorage, Shape) {
        (CudaStorage::wrap_cuda_slice(out, dev.clone()), shape)
    }

    pub(super) fn depthwise(
        op: &DepthwiseOp,
        x: Input,
        w: Input,
        bias: Input,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = x.0.device().clone();
        let (batch, channels, height, width) = x.1.shape().dims4()?;
        let (xs, ws, bs) = (
            view(x, "depthwise input")?,
            view(w, "depthwise weight")?,
            view(bias, "depthwise bias")?,
        );
        let shape = op.out_shape(x.1)?;
        let total = shape.elem_count();
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<f32>(total)? };
        let (lo, hi) = op.activation.bounds();
        let dims = [
            int(channels)?,
            int(height)?,
            int(width)?,
            int(op.out_h)?,
            int(op.out_w)?,
        ];
        let (pad_top, pad_left) = (int(op.pad_top)?, int(op.pad_left)?);
        let tiled = match (op.kernel, op.stride) {
            (3, 1) => Some("depthwise_k3_s1"),
            (3, 2) => Some("depthwise_k3_s2"),
            (5, 1) => Some("depthwise_k5_s1"),
            (5, 2) => Some("depthwise_k5_s2"),
            _ => None,
        };
        let planes = u32::try_from(batch * channels)
            .ok()
            .filter(|&p| p <= 65_535)
            .ok_or_else(|| candle_core::Error::Msg(format!("{batch}x{channels} planes")))?;
        match tiled {
            Some(name) => {
                let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(&xs).arg(&ws).arg(&bs).arg(&out);
                for d in &dims {
                    b.arg(d);
                }
                b.arg(&pad_top).arg(&pad_left).arg(&lo).arg(&hi);
                let cfg = LaunchConfig {
                    grid_dim: (
                        (op.out_w as u32).div_ceil(TILE.0),
                        (op.out_h as u32).div_ceil(TILE.1),
                        planes,
                    ),
                    block_dim: (TILE.0, TILE.1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the arguments match the kernel's signature in kernels.cu; the views
                // hold the values the shapes above describe.
                unsafe { b.launch(cfg) }.w()?;
            }
            None => {
                let func = dev.get_or_load_custom_func("depthwise_any", MODULE, PTX)?;
                let (kernel, stride) = (int(op.kernel)?, int(op.stride)?);
                let total_i = total as i64;
                let mut b = func.builder();
                b.arg(&xs).arg(&ws).arg(&bs).arg(&out);
                for d in &dims {
                    b.arg(d);
                }
                b.arg(&kernel).arg(&stride).arg(&pad_top).arg(&pad_left);
                b.arg(&total_i).arg(&lo).arg(&hi);
                // SAFETY: as above.
                unsafe { b.launch(grid_for(total)) }.w()?;
            }
        }
        Ok(wrap(out, &dev, shape))
    }

    pub(super) fn bias_act(
        op: &BiasAct,
        x: Input,
        bias: Input,
        residual: Option<Input>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = x.0.device().clone();
        let shape = x.1.shape().clone();
        let total = shape.elem_count();
        let plane = (total / (shape.dims()[0] * op.channels).max(1)) as i64;
        let (xs, bs) = (view(x, "bias op input")?, view(bias, "bias op bias")?);
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<f32>(total)? };
        let (lo, hi) = op.activation.bounds();
        let (channels, total_i) = (int(op.channels)?, total as i64);
        let name = if residual.is_some() {
            "bias_act_residual"
        } else {
            "bias_act"
        };
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let rs = residual.map(|r| view(r, "bias op residual")).transpose()?;
        let mut b = func.builder();
        b.arg(&xs).arg(&bs);
        if let Some(rs) = &rs {
            b.arg(rs);
        }
        b.arg(&out)
            .arg(&channels)
            .arg(&plane)
            .arg(&total_i)
            .arg(&lo)
            .arg(&hi);
        // SAFETY: the arguments match the kernel's signature in kernels.cu.
        unsafe { b.launch(grid_for(total)) }.w()?;
        Ok(wrap(out, &dev, shape))
    }
}
