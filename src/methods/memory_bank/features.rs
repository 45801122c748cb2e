//! From backbone feature maps to the vectors the bank holds and searches: each position averaged
//! over its neighbourhood, projected (optionally) and centred on the training mean.
//!
//! The centring changes no distance; it keeps `‖q‖² + ‖b‖² − 2 q·b` from cancelling away the
//! small distances that matter (features of ReLU6 maps are far from the origin).
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::kernels::{ASource, Activation, Epilogue, Kernels, PackedB};
use crate::rng::Rng;

/// A seeded Gaussian random projection `[channels, dims]` with entries of variance `1 / dims`, so
/// that squared distances keep their expected value.
pub fn random_projection(channels: usize, dims: usize, rng: &mut Rng) -> Vec<f32> {
    let scale = (dims as f32).recip().sqrt();
    (0..channels * dims).map(|_| rng.normal() * scale).collect()
}

/// `[B, C, h, w]` maps (row-major) → channels-last `[B·h·w, C]`, each position the mean of its
/// `n × n` neighbourhood's cells that lie inside the map. `scratch` holds the transposed maps.
pub fn neighbourhood_mean(
    maps: &[f32],
    dims: [usize; 4],
    n: usize,
    scratch: &mut Vec<f32>,
    out: &mut Vec<f32>,
) {
    let [batch, c, h, w] = dims;
    let len = batch * c * h * w;
    out.clear();
    out.resize(len, 0.0);
    if n <= 1 {
        crate::nn::kernels::nchw_to_nhwc(maps, dims, out, |v| v);
        return;
    }
    scratch.clear();
    scratch.resize(len, 0.0);
    crate::nn::kernels::nchw_to_nhwc(maps, dims, scratch, |v| v);
    let r = n / 2;
    for b in 0..batch {
        let image = &scratch[b * h * w * c..(b + 1) * h * w * c];
        for y in 0..h {
            let (y0, y1) = (y.saturating_sub(r), (y + r).min(h - 1));
            for x in 0..w {
                let (x0, x1) = (x.saturating_sub(r), (x + r).min(w - 1));
                let at = ((b * h + y) * w + x) * c;
                let dst = &mut out[at..at + c];
                for yy in y0..=y1 {
                    let row = &image[(yy * w + x0) * c..(yy * w + x1 + 1) * c];
                    for cell in row.chunks_exact(c) {
                        for (d, &v) in dst.iter_mut().zip(cell) {
                            *d += v;
                        }
                    }
                }
                let scale = ((y1 - y0 + 1) * (x1 - x0 + 1)) as f32;
                dst.iter_mut().for_each(|d| *d /= scale);
            }
        }
    }
}

/// [`neighbourhood_mean`] on candle's ops: `[B, C, h, w]` → `[B·h·w, C]`.
pub fn neighbourhood_mean_candle(maps: &Tensor, n: usize) -> Result<Tensor> {
    let (batch, c, h, w) = maps.dims4()?;
    let averaged = if n <= 1 {
        maps.clone()
    } else {
        let r = n / 2;
        let padded = maps.pad_with_zeros(2, r, r)?.pad_with_zeros(3, r, r)?;
        let mut sum = padded.narrow(2, 0, h)?.narrow(3, 0, w)?;
        for dy in 0..n {
            for dx in 0..n {
                if dy + dx > 0 {
                    sum = (sum + padded.narrow(2, dy, h)?.narrow(3, dx, w)?)?;
                }
            }
        }
        let counts: Vec<f32> = (0..h * w)
            .map(|i| {
                let (y, x) = (i / w, i % w);
                let rows = (y + r).min(h - 1) - y.saturating_sub(r) + 1;
                let cols = (x + r).min(w - 1) - x.saturating_sub(r) + 1;
                (rows * cols) as f32
            })
            .collect();
        let counts = Tensor::from_vec(counts, (1, 1, h, w), maps.device())?;
        sum.broadcast_div(&counts)?
    };
    Ok(averaged
        .permute((0, 2, 3, 1))?
        .reshape((batch * h * w, c))?
        .contiguous()?)
}

/// The map from averaged features `[P, C]` to search vectors `[P, D]`: `x·W − centre`, where `W`
/// is the random projection (or none, `D = C`).
pub struct Projector {
    channels: usize,
    dims: usize,
    /// `[C, D]`, and packed for the fast kernels with `−centre` as bias.
    matrix: Option<(Tensor, PackedB)>,
    centre: Vec<f32>,
    centre_tensor: Tensor,
}

impl Projector {
    /// `matrix`: `[channels, dims]` or none; `centre`: `[dims]`.
    pub fn new(
        channels: usize,
        matrix: Option<&Tensor>,
        centre: Vec<f32>,
        device: &Device,
    ) -> Result<Projector> {
        let dims = match matrix {
            Some(m) => {
                let (rows, dims) = m.dims2()?;
                if rows != channels {
                    return Err(Error::invalid(
                        "memory bank projection",
                        format!("{rows} rows for {channels} feature channels"),
                    ));
                }
                dims
            }
            None => channels,
        };
        if centre.len() != dims {
            return Err(Error::invalid(
                "memory bank centre",
                format!("{} values for {dims} dimensions", centre.len()),
            ));
        }
        let matrix = match matrix {
            Some(m) => {
                let values = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let bias: Vec<f32> = centre.iter().map(|c| -c).collect();
                let packed = PackedB::new(channels, dims, |k, j| values[k * dims + j], &bias);
                Some((m.to_device(device)?.to_dtype(DType::F32)?, packed))
            }
            None => None,
        };
        Ok(Projector {
            channels,
            dims,
            matrix,
            centre_tensor: Tensor::from_slice(&centre, dims, device)?,
            centre,
        })
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    pub fn centre(&self) -> &[f32] {
        &self.centre
    }

    /// `features` `[P, C]` → `out` `[P, D]` on the fast kernels.
    pub fn apply(&self, kernels: Kernels, features: &[f32], out: &mut Vec<f32>) -> Result<()> {
        let positions = features.len() / self.channels.max(1);
        out.clear();
        match &self.matrix {
            Some((_, packed)) => {
                out.resize(positions * self.dims, 0.0);
                kernels.gemm(
                    ASource::Matrix {
                        data: features,
                        lda: self.channels,
                    },
                    packed,
                    Epilogue {
                        activation: Activation::Identity,
                        residual: None,
                    },
                    out,
                )?;
            }
            None => {
                out.extend_from_slice(features);
                for row in out.chunks_exact_mut(self.dims) {
                    for (v, c) in row.iter_mut().zip(&self.centre) {
                        *v -= c;
                    }
                }
            }
        }
        Ok(())
    }

    /// [`Projector::apply`] on candle's ops.
    pub fn apply_candle(&self, features: &Tensor) -> Result<Tensor> {
        let projected = match &self.matrix {
            Some((m, _)) => features.matmul(m)?,
            None => features.clone(),
        };
        Ok(projected.broadcast_sub(&self.centre_tensor.unsqueeze(0)?)?)
    }
}
