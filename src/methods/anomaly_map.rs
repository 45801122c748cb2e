//! From per-position scores to an anomaly map at the input size (every method's heatmaps).
//!
//! Bilinear upsampling (half-pixel centres, PyTorch's `align_corners=false`) followed by Gaussian
//! smoothing (replicated borders, radius `round(4σ)`) is linear and separable, so each axis folds
//! into one `[out, in]` matrix built once: the map is `rows · scores · colsᵀ`, two small matmuls
//! per batch instead of a full-resolution upsample and two large convolutions.
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

pub struct MapResizer {
    feature_size: (usize, usize),
    /// `[H, h]`.
    rows: Tensor,
    /// `[w, W]` (transposed, ready for the right-hand product).
    cols_t: Tensor,
}

/// Row-major `[n_out, n_in]` bilinear upsampling matrix.
fn bilinear(n_in: usize, n_out: usize) -> Vec<f64> {
    let mut m = vec![0.0; n_out * n_in];
    let scale = n_in as f64 / n_out as f64;
    for i in 0..n_out {
        let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let lo = (src.floor() as usize).min(n_in - 1);
        let hi = (lo + 1).min(n_in - 1);
        let frac = src - lo as f64;
        m[i * n_in + lo] += 1.0 - frac;
        m[i * n_in + hi] += frac;
    }
    m
}

/// `G · m` for a Gaussian `G` over the rows of the row-major `[n, cols]` matrix `m`.
fn smooth_rows(m: &[f64], n: usize, cols: usize, sigma: f32) -> Vec<f64> {
    let radius = (4.0 * sigma).round() as isize;
    if radius == 0 {
        return m.to_vec();
    }
    let weights: Vec<f64> = (-radius..=radius)
        .map(|k| (-0.5 * (k as f64 / sigma as f64).powi(2)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut out = vec![0.0; n * cols];
    for i in 0..n {
        for (k, w) in (-radius..=radius).zip(&weights) {
            let src = (i as isize + k).clamp(0, n as isize - 1) as usize;
            for c in 0..cols {
                out[i * cols + c] += w / total * m[src * cols + c];
            }
        }
    }
    out
}

fn axis_operator(n_in: usize, n_out: usize, sigma: f32) -> Vec<f32> {
    smooth_rows(&bilinear(n_in, n_out), n_out, n_in, sigma)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

impl MapResizer {
    /// Maps `[B, h, w]` feature-grid scores to `[B, H, W]`, smoothed with `sigma` pixels.
    pub fn new(
        feature_size: (usize, usize),
        input_size: (usize, usize),
        sigma: f32,
        device: &Device,
    ) -> Result<Self> {
        let ((h, w), (big_h, big_w)) = (feature_size, input_size);
        if h == 0 || w == 0 || big_h == 0 || big_w == 0 {
            return Err(Error::invalid(
                "anomaly map size",
                format!("cannot resize a {h}x{w} grid to {big_h}x{big_w}"),
            ));
        }
        let rows = Tensor::from_vec(axis_operator(h, big_h, sigma), (big_h, h), device)?;
        let cols = Tensor::from_vec(axis_operator(w, big_w, sigma), (big_w, w), device)?;
        Ok(MapResizer {
            feature_size,
            rows,
            cols_t: cols.t()?.contiguous()?,
        })
    }

    pub fn resize(&self, scores: &Tensor) -> Result<Tensor> {
        let (b, h, w) = scores.dims3()?;
        if (h, w) != self.feature_size {
            return Err(Error::invalid(
                "anomaly scores",
                format!(
                    "a {h}x{w} grid, expected {}x{}",
                    self.feature_size.0, self.feature_size.1
                ),
            ));
        }
        let big_w = self.cols_t.dim(1)?;
        let widened = scores
            .reshape((b * h, w))?
            .matmul(&self.cols_t)?
            .reshape((b, h, big_w))?;
        Ok(self.rows.broadcast_matmul(&widened)?)
    }
}

/// Per image, the mean of the highest `fraction` of a `[B, H, W]` map's values (at least one
/// value): between the maximum, which one noisy pixel decides, and the mean, in which a small
/// defect vanishes. Selected on the host (linear time): candle's sort does not fit a whole map in
/// one CUDA block.
pub fn top_mean(maps: &Tensor, fraction: f64) -> Result<Tensor> {
    let (b, h, w) = maps.dims3()?;
    let n = h * w;
    if n == 0 {
        return Err(Error::invalid("anomaly map", "empty: no value to pool"));
    }
    let k = ((fraction * n as f64).ceil() as usize).clamp(1, n);
    let mut values = maps.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let scores: Vec<f32> = values
        .chunks_mut(n)
        .map(|map| {
            map.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            map[..k].iter().sum::<f32>() / k as f32
        })
        .collect();
    Ok(Tensor::from_vec(scores, b, maps.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_mean_averages_the_highest_share_of_each_map() -> Result<()> {
        // Two 2x5 maps holding 1..=10 in scrambled order, and 10..=1 scaled by 2.
        let first = [3f32, 10., 1., 7., 9., 2., 8., 4., 6., 5.];
        let second: Vec<f32> = (1..=10).rev().map(|v| 2.0 * v as f32).collect();
        let data: Vec<f32> = first.iter().copied().chain(second).collect();
        let maps = Tensor::from_vec(data, (2, 2, 5), &Device::Cpu)?;
        // 20% of 10 values: the top two.
        assert_eq!(top_mean(&maps, 0.2)?.to_vec1::<f32>()?, [9.5, 19.0]);
        // 25% of 10 rounds up to three values.
        assert_eq!(top_mean(&maps, 0.25)?.to_vec1::<f32>()?, [9.0, 18.0]);
        // A share below one value keeps the maximum; the whole share is the mean.
        assert_eq!(top_mean(&maps, 1e-6)?.to_vec1::<f32>()?, [10.0, 20.0]);
        assert_eq!(top_mean(&maps, 1.0)?.to_vec1::<f32>()?, [5.5, 11.0]);
        Ok(())
    }
}
