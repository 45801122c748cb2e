//! FCDD's Gaussian upsampling of the low-resolution anomaly map to the input size.
//!
//! FCDD upsamples with a transposed convolution whose fixed kernel is an unnormalised Gaussian
//! (peak 1) the size of the receptive field, each feature cell stamped at its receptive centre.
//! That is linear and separable, so here it is two matrix products, `out = Gy · A · Gxᵀ`, with
//! `Gy[y, i] = g(y - c_i)` for the cell centres `c_i` and `g` the 1-D kernel, truncated to its
//! window: differentiable, built once per input size, and as fast as the matmuls.
use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::backbone::{CellGrid, EfficientNetLite0};

/// FCDD's σ at its 224×224 input size.
pub const FCDD_SIGMA_224: f64 = 12.0;

/// FCDD's 1-D kernel (`gkern`'s factor): `k` samples of `exp(-d² / 2σ²)` at `d = n - (k - 1)/2`,
/// peak 1 for odd `k`. For even `k` FCDD samples `k - 1` points, duplicates the centre (two samples
/// of 1) and halves the whole kernel, so its 2-D peak is 1/4; reproduced as such.
pub fn gaussian_kernel_1d(k: usize, sigma: f64) -> Vec<f32> {
    let sample = |len: usize| -> Vec<f64> {
        let centre = (len as f64 - 1.0) / 2.0;
        (0..len)
            .map(|n| (-0.5 * ((n as f64 - centre) / sigma).powi(2)).exp())
            .collect()
    };
    if k == 0 {
        return Vec::new();
    }
    if k % 2 == 1 {
        return sample(k).into_iter().map(|v| v as f32).collect();
    }
    let mut base = sample(k - 1);
    let middle = (k - 1) / 2;
    base.insert(middle, base[middle]);
    base.into_iter().map(|v| (v / 2.0) as f32).collect()
}

/// The `out × cells` matrix of one axis: cell `i` stamps the kernel with its index `pad` (the
/// centre for odd `k`; the first of the two centre samples for even `k`, FCDD's choice) at input
/// pixel `c_i`, so `G[y, i] = kernel[y - c_i + pad]` inside the kernel's window, 0 elsewhere.
fn axis_matrix(grid: CellGrid, out: usize, kernel: &[f32]) -> Vec<f32> {
    let pad = (kernel.len() as isize - 1) / 2;
    let mut m = vec![0.0f32; out * grid.cells];
    for i in 0..grid.cells {
        let centre = (grid.offset + grid.jump * i) as isize;
        for y in 0..out {
            let t = y as isize - centre + pad;
            if (0..kernel.len() as isize).contains(&t) {
                m[y * grid.cells + i] = kernel[t as usize];
            }
        }
    }
    m
}

/// The indices where row `r` of a row-major `[rows, cols]` matrix is non-zero: one contiguous
/// run, as the kernel's window is.
fn nonzero_runs(m: &[f32], rows: usize, cols: usize) -> Vec<Range<usize>> {
    (0..rows)
        .map(|r| {
            let row = &m[r * cols..(r + 1) * cols];
            let first = row.iter().position(|&v| v != 0.0).unwrap_or(cols);
            let end = row.iter().rposition(|&v| v != 0.0).map_or(first, |i| i + 1);
            first..end
        })
        .collect()
}

/// Upsamples `[B, h, w]` maps to `[B, H, W]` with FCDD's Gaussian stamps.
#[derive(Clone, Debug)]
pub struct GaussianUpsampler {
    /// `Gy`, `[H, h]`.
    rows: Tensor,
    /// `Gxᵀ`, `[w, W]`.
    cols_t: Tensor,
    cells: (usize, usize),
    out: (usize, usize),
    /// The same matrices on the host with their non-zero runs, for [`Self::upsample_cpu`]: each
    /// output pixel depends only on the cells inside the kernel's window.
    rows_host: Vec<f32>,
    row_cells: Vec<Range<usize>>,
    cols_t_host: Vec<f32>,
    col_pixels: Vec<Range<usize>>,
}

impl GaussianUpsampler {
    /// Feature cells on `rows` and `cols` (their receptive centres, in input pixels), an output
    /// of `out` = (H, W), a `kernel`-pixel window and Gaussian `sigma` in pixels.
    pub fn new(
        rows: CellGrid,
        cols: CellGrid,
        out: (usize, usize),
        kernel: usize,
        sigma: f64,
        device: &Device,
    ) -> Result<Self> {
        if kernel == 0 || !(sigma.is_finite() && sigma > 0.0) {
            return Err(Error::invalid(
                "gaussian upsampling",
                format!("kernel {kernel} and sigma {sigma} (need a kernel of 1 pixel or more and a positive sigma)"),
            ));
        }
        if rows.cells == 0 || cols.cells == 0 || out.0 == 0 || out.1 == 0 {
            return Err(Error::invalid(
                "gaussian upsampling",
                format!(
                    "{}x{} cells to {}x{} pixels",
                    rows.cells, cols.cells, out.0, out.1
                ),
            ));
        }
        let kernel = gaussian_kernel_1d(kernel, sigma);
        let gy = axis_matrix(rows, out.0, &kernel);
        let gx = axis_matrix(cols, out.1, &kernel);
        let cols_t = Tensor::from_vec(gx, (out.1, cols.cells), device)?
            .t()?
            .contiguous()?;
        let cols_t_host = cols_t.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self {
            rows: Tensor::from_vec(gy.clone(), (out.0, rows.cells), device)?,
            cols_t,
            cells: (rows.cells, cols.cells),
            out,
            row_cells: nonzero_runs(&gy, out.0, rows.cells),
            rows_host: gy,
            col_pixels: nonzero_runs(&cols_t_host, cols.cells, out.1),
            cols_t_host,
        })
    }

    /// FCDD's upsampling of the map after Lite0's block `last_block` for `height`×`width` inputs:
    /// the kernel is the block's receptive field (67 px after block 4), the cells sit at their
    /// receptive centres under TensorFlow "same" padding ([`EfficientNetLite0::cell_grid`]), and
    /// σ is `sigma_224` (FCDD: 12 at 224×224) times the shorter input side over 224, so that the
    /// blur covers the same share of the image at every input size.
    pub fn lite0(
        height: usize,
        width: usize,
        last_block: usize,
        sigma_224: f64,
        device: &Device,
    ) -> Result<Self> {
        let kernel = EfficientNetLite0::receptive_field(last_block)?;
        let sigma = sigma_224 * height.min(width) as f64 / 224.0;
        Self::new(
            EfficientNetLite0::cell_grid(height, last_block)?,
            EfficientNetLite0::cell_grid(width, last_block)?,
            (height, width),
            kernel,
            sigma,
            device,
        )
    }

    /// The low-resolution size (h, w) this upsampler takes.
    pub fn cells(&self) -> (usize, usize) {
        self.cells
    }

    /// [`Self::forward`] of one map, `low` `[h, w]` into `out` `[H, W]` (row-major), on the host:
    /// the same product, restricted to the kernel's window. `scratch` holds the `[h, W]`
    /// intermediate (resized as needed, so a caller can keep it between parts).
    pub fn upsample_cpu(&self, low: &[f32], scratch: &mut Vec<f32>, out: &mut [f32]) -> Result<()> {
        let ((h, w), (height, width)) = (self.cells, self.out);
        if low.len() != h * w || out.len() != height * width {
            return Err(Error::invalid(
                "low-resolution maps",
                format!(
                    "{} cells into {} pixels, the upsampler takes {h}x{w} into {height}x{width}",
                    low.len(),
                    out.len()
                ),
            ));
        }
        // A · Gxᵀ: each cell adds its column kernel to the pixels of its window.
        scratch.clear();
        scratch.resize(h * width, 0.0);
        for (i, row) in scratch.chunks_exact_mut(width).enumerate() {
            for (j, pixels) in self.col_pixels.iter().enumerate() {
                let a = low[i * w + j];
                let kernel = &self.cols_t_host[j * width..(j + 1) * width];
                row[pixels.clone()]
                    .iter_mut()
                    .zip(&kernel[pixels.clone()])
                    .for_each(|(o, &g)| *o += a * g);
            }
        }
        // Gy · (A · Gxᵀ): each output row sums the intermediate rows of its window.
        for (y, row) in out.chunks_exact_mut(width).enumerate() {
            row.fill(0.0);
            for i in self.row_cells[y].clone() {
                let g = self.rows_host[y * h + i];
                row.iter_mut()
                    .zip(&scratch[i * width..(i + 1) * width])
                    .for_each(|(o, &t)| *o += g * t);
            }
        }
        Ok(())
    }

    /// `[B, h, w]` → `[B, H, W]`, differentiable.
    pub fn forward(&self, maps: &Tensor) -> Result<Tensor> {
        let (batch, h, w) = maps.dims3().map_err(|_| {
            Error::invalid(
                "low-resolution maps",
                format!("shape {:?} is not [B, h, w]", maps.dims()),
            )
        })?;
        if (h, w) != self.cells {
            return Err(Error::invalid(
                "low-resolution maps",
                format!(
                    "{h}x{w} cells, the upsampler takes {}x{}",
                    self.cells.0, self.cells.1
                ),
            ));
        }
        let maps = maps.to_dtype(self.rows.dtype())?;
        let rows = self.rows.broadcast_left(batch)?;
        let cols_t = self.cols_t.broadcast_left(batch)?;
        Ok(rows.matmul(&maps.contiguous()?)?.matmul(&cols_t)?)
    }
}
