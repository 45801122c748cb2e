//! Inference of the trainable heads (the normalising flow, the mapping nets) on the fast kernels,
//! channels-last. Built from a snapshot of the weights (`MatmulConv::fast`, `RealNvp::fast`):
//! the candle modules stay the trained, differentiable originals.
use std::ops::Range;

use super::{ASource, Activation, ConvGeom, Epilogue, Kernels, PackedB};
use crate::error::Result;

/// A same-padded, stride-1 k×k convolution (odd k) with bias, on `[B, H, W, C]` data.
pub struct FastConv {
    packed: PackedB,
    kernel: usize,
    in_c: usize,
}

/// Batch, height and width of a channels-last feature map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
}

impl Grid {
    pub fn positions(&self) -> usize {
        self.batch * self.height * self.width
    }
}

/// Grows `buffer` to `len` once, then hands out its first `len` values.
pub fn slot(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

impl FastConv {
    /// `packed` ordered `(ky, kx, in)` by `out` (see [`super::pack_conv_weight`]).
    pub fn new(packed: PackedB, kernel: usize, in_c: usize) -> Self {
        Self {
            packed,
            kernel,
            in_c,
        }
    }

    pub fn out_c(&self) -> usize {
        self.packed.n()
    }

    pub fn in_c(&self) -> usize {
        self.in_c
    }

    /// Multiply-adds per position.
    pub fn macs(&self) -> usize {
        self.packed.k() * self.packed.n()
    }

    pub fn forward(
        &self,
        k: Kernels,
        input: &[f32],
        grid: Grid,
        activation: Activation,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<()> {
        let epilogue = Epilogue {
            activation,
            residual,
        };
        if self.kernel == 1 {
            let a = ASource::Matrix {
                data: input,
                lda: self.in_c,
            };
            return k.gemm(a, &self.packed, epilogue, out);
        }
        let geom = ConvGeom {
            batch: grid.batch,
            height: grid.height,
            width: grid.width,
            in_c: self.in_c,
            kernel_h: self.kernel,
            kernel_w: self.kernel,
            stride: 1,
            pad_top: self.kernel / 2,
            pad_left: self.kernel / 2,
            out_h: grid.height,
            out_w: grid.width,
        };
        k.conv2d(input, geom, &self.packed, epilogue, out)
    }
}

/// Scratch buffers of the heads, reused across calls.
#[derive(Default)]
pub struct HeadScratch {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

/// `x + ReLU(1×1(ReLU(3×3(ReLU(1×1 x)))))`, as [`crate::nn::residual::ResidualBlock`].
pub struct FastResidual {
    pub reduce: FastConv,
    pub spatial: FastConv,
    pub expand: FastConv,
}

impl FastResidual {
    pub fn macs(&self) -> usize {
        self.reduce.macs() + self.spatial.macs() + self.expand.macs()
    }

    pub fn forward(
        &self,
        k: Kernels,
        x: &[f32],
        grid: Grid,
        scratch: &mut HeadScratch,
        out: &mut [f32],
    ) -> Result<()> {
        let n = grid.positions();
        let inner = self.reduce.out_c();
        let h1 = slot(&mut scratch.a, n * inner);
        self.reduce
            .forward(k, x, grid, Activation::Relu, None, h1)?;
        let h2 = slot(&mut scratch.b, n * inner);
        self.spatial
            .forward(k, h1, grid, Activation::Relu, None, h2)?;
        self.expand
            .forward(k, h2, grid, Activation::Relu, Some(x), out)
    }
}

/// One affine coupling of [`crate::nn::flow::RealNvp`].
pub struct FastCoupling {
    pub conditioner: Range<usize>,
    pub transformed: Range<usize>,
    pub hidden: FastConv,
    pub out: FastConv,
    pub clamp: f32,
}

/// [`crate::nn::flow::RealNvp`]'s forward pass.
pub struct FastFlow {
    pub blocks: Vec<FastCoupling>,
    pub channels: usize,
}

impl FastFlow {
    pub fn macs(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.hidden.macs() + b.out.macs())
            .sum()
    }

    /// Transforms `z` (`[B, H, W, C]`) in place into the latent and writes the log-determinant per
    /// position into `log_det`.
    pub fn forward(
        &self,
        k: Kernels,
        z: &mut [f32],
        grid: Grid,
        log_det: &mut [f32],
        scratch: &mut HeadScratch,
    ) -> Result<()> {
        let (n, c) = (grid.positions(), self.channels);
        log_det.fill(0.0);
        for block in &self.blocks {
            let half = block.conditioner.len();
            let cond = slot(&mut scratch.a, n * half);
            for (dst, pixel) in cond.chunks_exact_mut(half).zip(z.chunks_exact(c)) {
                dst.copy_from_slice(&pixel[block.conditioner.clone()]);
            }
            let hidden = slot(&mut scratch.b, n * block.hidden.out_c());
            block
                .hidden
                .forward(k, cond, grid, Activation::Relu, None, hidden)?;
            let st = slot(&mut scratch.c, n * block.out.out_c());
            block
                .out
                .forward(k, hidden, grid, Activation::Identity, None, st)?;
            let t = block.transformed.len();
            let clamp = block.clamp;
            for ((pixel, st), ld) in z
                .chunks_exact_mut(c)
                .zip(st.chunks_exact(2 * t))
                .zip(log_det.iter_mut())
            {
                let (raw_scale, shift) = st.split_at(t);
                for ((x, &s), &shift) in pixel[block.transformed.clone()]
                    .iter_mut()
                    .zip(raw_scale)
                    .zip(shift)
                {
                    let s = (s / clamp).tanh() * clamp;
                    *x = *x * s.exp() + shift;
                    *ld += s;
                }
            }
        }
        Ok(())
    }
}
