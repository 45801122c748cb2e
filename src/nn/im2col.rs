//! im2col as a differentiable CPU custom op: `[B, C, H, W]` → `[B, C·k², Ho·Wo]`, whose backward
//! is col2im (each column value added back to the input pixel it was read from).
//!
//! Training convolutions gather their columns this way instead of `index_select`: candle's
//! generic index kernels and their scatter-add backward took about a third of an OCR-GAN training
//! step on 2 cores (measured with `perf`, benches/ocr_gan.rs). Plain loops over contiguous rows,
//! one (image, channel) plane per task, are memory-bound and split over the threads.
use crate::nn::cpu_op_input;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Kernel, stride and zero padding of the gather, and the input plane it was built for.
#[derive(Clone, Copy, Debug)]
pub struct Im2Col {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub height: usize,
    pub width: usize,
}

impl Im2Col {
    pub fn out_size(&self) -> (usize, usize) {
        let span = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (span(self.height), span(self.width))
    }

    /// The source index of tap `k` (0..kernel) for output coordinate `o` on an axis of `n`.
    fn source(&self, o: usize, k: usize, n: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.padding)
            .filter(|&i| i < n)
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        if (h, w) != (self.height, self.width) {
            candle_core::bail!(
                "im2col built for {}x{}, got {h}x{w}",
                self.height,
                self.width
            )
        }
        let src = cpu_op_input(storage, layout, "im2col input")?;
        let (ho, wo) = self.out_size();
        let k = self.kernel;
        let block = k * k * ho * wo;
        let mut out = vec![0f32; b * c * block];
        out.par_chunks_mut(block)
            .zip(src.par_chunks(h * w))
            .for_each(|(dst, plane)| {
                for ky in 0..k {
                    for kx in 0..k {
                        let rows = &mut dst[(ky * k + kx) * ho * wo..][..ho * wo];
                        for oy in 0..ho {
                            let Some(y) = self.source(oy, ky, h) else {
                                continue;
                            };
                            let src_row = &plane[y * w..(y + 1) * w];
                            let dst_row = &mut rows[oy * wo..(oy + 1) * wo];
                            for (ox, d) in dst_row.iter_mut().enumerate() {
                                if let Some(x) = self.source(ox, kx, w) {
                                    *d = src_row[x];
                                }
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c * k * k, ho * wo))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im(*self))?))
    }
}

/// The adjoint of [`Im2Col`]: `[B, C·k², Ho·Wo]` → `[B, C, H, W]`, summing overlapping taps.
pub(crate) struct Col2Im(pub(crate) Im2Col);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let (b, ck, _) = layout.shape().dims3()?;
        let k = g.kernel;
        let c = ck / (k * k);
        let (h, w) = (g.height, g.width);
        let (ho, wo) = g.out_size();
        let src = cpu_op_input(storage, layout, "im2col input")?;
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w)
            .zip(src.par_chunks(k * k * ho * wo))
            .for_each(|(plane, cols)| {
                for ky in 0..k {
                    for kx in 0..k {
                        let rows = &cols[(ky * k + kx) * ho * wo..][..ho * wo];
                        for oy in 0..ho {
                            let Some(y) = g.source(oy, ky, h) else {
                                continue;
                            };
                            let dst_row = &mut plane[y * w..(y + 1) * w];
                            for (ox, v) in rows[oy * wo..(oy + 1) * wo].iter().enumerate() {
                                if let Some(x) = g.source(ox, kx, w) {
                                    dst_row[x] += v;
                                }
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }
}
