//! BatchNorm2d (and an optional ReLU after it) as one CPU custom op with its own backward.
//!
//! Written from plain tensor ops ([`super::norm::BatchNorm2d::forward_t`]) a training-mode
//! BatchNorm is five broadcast operations forward, and backward each broadcast operand's gradient
//! is a reduction over the batch, height and width axes, which candle's CPU backend strides
//! through slowly: in NDP-Net's training step (many BatchNorms on small channel counts) these
//! reductions and the gradient sums took about a third of the time (measured with `perf`). This
//! op makes one pass for the statistics and one for the output, and two for the backward.
use std::sync::{Arc, Mutex};

use crate::nn::cpu_op_input;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The statistics a training-mode forward used: per channel mean, 1/√(var + eps) and the biased
/// variance.
#[derive(Clone, Debug, Default)]
pub struct BatchStats {
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
    pub var: Vec<f32>,
}

/// `relu?(γ·(x − μ)·s + β)` over `[B, C, H, W]`, with `(μ, s)` from the batch (training) or given
/// (the running statistics).
pub struct BatchNormOp {
    pub eps: f64,
    pub relu: bool,
    /// `(mean, 1/√(var + eps))` per channel for inference; `None` normalises with the batch's.
    pub fixed: Option<(Vec<f32>, Vec<f32>)>,
    /// What the forward normalised with (for the backward and the running statistics), shared
    /// with the caller that applied the op.
    saved: Arc<Mutex<Option<BatchStats>>>,
}

impl BatchNormOp {
    pub fn new(eps: f64, relu: bool, fixed: Option<(Vec<f32>, Vec<f32>)>) -> Self {
        BatchNormOp {
            eps,
            relu,
            fixed,
            saved: Arc::default(),
        }
    }

    fn stats(&self) -> Option<BatchStats> {
        self.saved.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies the op to `x` `[B, C, H, W]` with `weight` and `bias` `[C]`, recording the
    /// backward; returns the output and the statistics it normalised with.
    pub fn apply(
        self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<BatchStats>)> {
        let saved = Arc::clone(&self.saved);
        let y = x.contiguous()?.apply_op3(weight, bias, self)?;
        let stats = saved.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok((y, stats))
    }
}

/// Per channel `(Σ x, Σ x²)` over the batch's planes, in f64.
fn channel_sums(x: &[f32], (b, c, n): (usize, usize, usize)) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut s, mut q) = (0f64, 0f64);
            for bi in 0..b {
                for &v in &x[(bi * c + ch) * n..(bi * c + ch + 1) * n] {
                    s += v as f64;
                    q += (v as f64) * (v as f64);
                }
            }
            (s, q)
        })
        .collect()
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "batch-norm"
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
        let x = cpu_op_input(s1, l1, "batch norm input")?;
        let weight = cpu_op_input(s2, l2, "batch norm weight")?;
        let bias = cpu_op_input(s3, l3, "batch norm bias")?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let n = h * w;
        if weight.len() != c || bias.len() != c {
            candle_core::bail!(
                "batch norm: {c} channels, {} weights, {} biases",
                weight.len(),
                bias.len()
            )
        }
        let stats = match &self.fixed {
            Some((mean, inv_std)) => BatchStats {
                mean: mean.clone(),
                inv_std: inv_std.clone(),
                var: Vec::new(),
            },
            None => {
                let count = (b * n).max(1) as f64;
                let sums = channel_sums(x, (b, c, n));
                let mean: Vec<f64> = sums.iter().map(|(s, _)| s / count).collect();
                let var: Vec<f64> = sums
                    .iter()
                    .zip(&mean)
                    .map(|((_, q), m)| (q / count - m * m).max(0.0))
                    .collect();
                BatchStats {
                    mean: mean.iter().map(|&m| m as f32).collect(),
                    inv_std: var
                        .iter()
                        .map(|v| (1.0 / (v + self.eps).sqrt()) as f32)
                        .collect(),
                    var: var.iter().map(|&v| v as f32).collect(),
                }
            }
        };
        let mut out = vec![0f32; x.len()];
        let relu = self.relu;
        out.par_chunks_mut(n.max(1))
            .zip(x.par_chunks(n.max(1)))
            .enumerate()
            .for_each(|(plane, (dst, src))| {
                let ch = plane % c;
                let scale = weight[ch] * stats.inv_std[ch];
                let shift = bias[ch] - stats.mean[ch] * scale;
                for (d, &v) in dst.iter_mut().zip(src) {
                    let y = v * scale + shift;
                    *d = if relu { y.max(0.0) } else { y };
                }
            });
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self
            .stats()
            .ok_or_else(|| candle_core::Error::Msg("batch norm: backward before forward".into()))?;
        let c = weight.dim(0)?;
        let backward = Backward {
            stats,
            weight: weight.flatten_all()?.to_vec1::<f32>()?,
            relu: self.relu,
            train: self.fixed.is_none(),
        };
        let packed =
            x.contiguous()?
                .apply_op3_no_bwd(&grad.contiguous()?, &res.contiguous()?, &backward)?;
        let n = x.elem_count();
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(packed.narrow(0, n, c)?),
            Some(packed.narrow(0, n + c, c)?),
        ))
    }
}

/// The backward of [`BatchNormOp`] on `(x, dy, y)`: `[dx (flattened), dγ, dβ]` in one vector.
struct Backward {
    stats: BatchStats,
    weight: Vec<f32>,
    relu: bool,
    train: bool,
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "batch-norm-backward"
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
        let x = cpu_op_input(s1, l1, "batch norm input")?;
        let dy = cpu_op_input(s2, l2, "batch norm gradient")?;
        let y = cpu_op_input(s3, l3, "batch norm output")?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let n = h * w;
        let BatchStats { mean, inv_std, .. } = &self.stats;
        // The gradient reaching the normalisation: ReLU passes it where the output is positive.
        let g = |i: usize| if self.relu && y[i] <= 0.0 { 0.0 } else { dy[i] };
        // Per channel Σ g and Σ g·x̂.
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mut sg, mut sgx) = (0f64, 0f64);
                for bi in 0..b {
                    let at = (bi * c + ch) * n;
                    for (i, &xi) in x.iter().enumerate().skip(at).take(n) {
                        let gi = g(i) as f64;
                        sg += gi;
                        sgx += gi * ((xi - mean[ch]) * inv_std[ch]) as f64;
                    }
                }
                (sg, sgx)
            })
            .collect();
        let count = (b * n).max(1) as f32;
        let mut out = vec![0f32; x.len() + 2 * c];
        let (dx, rest) = out.split_at_mut(x.len());
        dx.par_chunks_mut(n.max(1))
            .enumerate()
            .for_each(|(plane, dst)| {
                let ch = plane % c;
                let at = plane * n;
                let k = self.weight[ch] * inv_std[ch];
                let (sg, sgx) = (sums[ch].0 as f32 / count, sums[ch].1 as f32 / count);
                for (j, d) in dst.iter_mut().enumerate() {
                    let i = at + j;
                    *d = if self.train {
                        let xhat = (x[i] - mean[ch]) * inv_std[ch];
                        k * (g(i) - sg - xhat * sgx)
                    } else {
                        k * g(i)
                    };
                }
            });
        for (ch, (sg, sgx)) in sums.iter().enumerate() {
            rest[ch] = *sgx as f32;
            rest[c + ch] = *sg as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    use crate::nn::norm::BatchNorm2d;

    fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The fused op gives `forward_t` (+ ReLU)'s output, gradients for the input, weight and bias,
    /// and running statistics, in training and in inference mode.
    #[test]
    fn the_fused_op_matches_the_tensor_ops_forward_backward_and_statistics() {
        let dev = Device::Cpu;
        for (train, relu) in [(true, true), (true, false), (false, true), (false, false)] {
            let build = || {
                let (params, buffers) = (VarMap::new(), VarMap::new());
                let norm = BatchNorm2d::new(
                    VarBuilder::from_varmap(&params, DType::F32, &dev),
                    VarBuilder::from_varmap(&buffers, DType::F32, &dev),
                    3,
                )
                .unwrap();
                let data = buffers.data().lock().unwrap();
                data["running_mean"]
                    .set(&candle_core::Tensor::new(&[0.3f32, -0.2, 0.1], &dev).unwrap())
                    .unwrap();
                data["running_var"]
                    .set(&candle_core::Tensor::new(&[2.0f32, 0.5, 1.5], &dev).unwrap())
                    .unwrap();
                drop(data);
                let data = params.data().lock().unwrap();
                data["weight"]
                    .set(&candle_core::Tensor::new(&[1.2f32, 0.7, -0.9], &dev).unwrap())
                    .unwrap();
                data["bias"]
                    .set(&candle_core::Tensor::new(&[0.1f32, 0.4, -0.3], &dev).unwrap())
                    .unwrap();
                drop(data);
                (norm, params, buffers)
            };
            let (a, pa, ba) = build();
            let (b, pb, bb) = build();
            let x = Var::from_tensor(
                &candle_core::Tensor::randn(0.5f32, 2.0, (2, 3, 4, 5), &dev).unwrap(),
            )
            .unwrap();
            let plain = a.forward_t(&x, train).unwrap();
            let plain = if relu { plain.relu().unwrap() } else { plain };
            let fused = b.forward_fused(&x, train, relu).unwrap();
            assert!(max_diff(&plain, &fused) < 1e-5, "{train} {relu}: forward");
            let target = candle_core::Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
            let ga = (plain * &target)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (fused * &target)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(
                max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-4,
                "{train} {relu}: dx"
            );
            for name in ["weight", "bias"] {
                let (va, vb) = (
                    &pa.data().lock().unwrap()[name],
                    &pb.data().lock().unwrap()[name],
                );
                let (da, db) = (
                    ga.get(va.as_tensor()).unwrap(),
                    gb.get(vb.as_tensor()).unwrap(),
                );
                assert!(max_diff(da, db) < 1e-4, "{train} {relu}: d{name}");
            }
            for name in ["running_mean", "running_var"] {
                let (va, vb) = (
                    &ba.data().lock().unwrap()[name],
                    &bb.data().lock().unwrap()[name],
                );
                assert!(
                    max_diff(va.as_tensor(), vb.as_tensor()) < 1e-6,
                    "{train} {relu}: {name}"
                );
            }
        }
    }
}
