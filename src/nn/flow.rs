//! A Real-NVP normalising flow over feature maps (Dinh et al., 2017), as NF-BMR's target domain.
//!
//! Each block is an affine coupling on a channel split: one half passes unchanged and conditions a
//! shallow convolutional net (conv, ReLU, conv) whose output splits into a log-scale `s` and a
//! translation `t` for the other half, `y = x · exp(s) + t`. Successive blocks swap the halves, so
//! after two blocks every channel has been transformed. The log-scale is soft-clamped,
//! `s = α · tanh(s_raw / α)`, so one block can scale by at most `exp(±α)` (as FrEIA and CS-Flow do).
//!
//! Because `y` depends on the transformed half only element-wise, the Jacobian of the whole map is
//! triangular and its log-determinant is the sum of `s`; summed over channels at each position it
//! is that position's log-det contribution, returned as a `[B, H, W]` map.
use std::ops::Range;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::residual::MatmulConv;

use crate::error::{Error, Result};
use crate::nn::kernels::heads::{FastCoupling, FastFlow};

/// Shape of a [`RealNvp`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlowSpec {
    /// Feature channels (at least 2, so that there is a split).
    pub channels: usize,
    pub blocks: usize,
    /// Hidden channels of each coupling's subnet.
    pub hidden: usize,
    /// Odd kernel size of the subnet's two convolutions (1 = per position, 3 = with context).
    pub kernel: usize,
    /// Soft clamp α of the log-scale.
    pub clamp: f32,
}

/// One affine coupling block.
pub struct AffineCoupling {
    conditioner: Range<usize>,
    transformed: Range<usize>,
    hidden: MatmulConv,
    out: MatmulConv,
    clamp: f64,
}

/// A stack of affine couplings with alternating halves.
pub struct RealNvp {
    blocks: Vec<AffineCoupling>,
    channels: usize,
}

impl AffineCoupling {
    /// `swap` chooses which half conditions: the first `channels / 2` when false, the rest when true.
    pub fn new(vb: VarBuilder, spec: &FlowSpec, swap: bool) -> Result<Self> {
        let half = spec.channels / 2;
        let (conditioner, transformed) = if swap {
            (half..spec.channels, 0..half)
        } else {
            (0..half, half..spec.channels)
        };
        let hidden = MatmulConv::new(
            vb.pp("hidden"),
            conditioner.len(),
            spec.hidden,
            spec.kernel,
            1.0,
        )?;
        // A small output init starts each block near the identity (stable early likelihoods) while
        // still passing gradient to the hidden layer, unlike a zero init.
        let out = MatmulConv::new(
            vb.pp("out"),
            spec.hidden,
            2 * transformed.len(),
            spec.kernel,
            0.1,
        )?;
        Ok(AffineCoupling {
            conditioner,
            transformed,
            hidden,
            out,
            clamp: spec.clamp as f64,
        })
    }

    /// The clamped log-scale and the translation for the transformed half, given the conditioner.
    fn scale_shift(&self, conditioner: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.hidden.forward(conditioner)?.relu()?;
        let st = self.out.forward(&h)?;
        let n = self.transformed.len();
        let raw_scale = st.narrow(1, 0, n)?;
        let shift = st.narrow(1, n, n)?;
        let log_scale = ((raw_scale / self.clamp)?.tanh()? * self.clamp)?;
        Ok((log_scale, shift))
    }

    fn halves(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            x.narrow(1, self.conditioner.start, self.conditioner.len())?,
            x.narrow(1, self.transformed.start, self.transformed.len())?,
        ))
    }

    /// Puts the halves back in channel order.
    fn join(&self, conditioner: &Tensor, transformed: &Tensor) -> Result<Tensor> {
        Ok(if self.conditioner.start == 0 {
            Tensor::cat(&[conditioner, transformed], 1)?
        } else {
            Tensor::cat(&[transformed, conditioner], 1)?
        })
    }

    /// `(y, log-det per position [B, H, W])`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (cond, trans) = self.halves(x)?;
        let (log_scale, shift) = self.scale_shift(&cond)?;
        let y = (trans * log_scale.exp()?)?.add(&shift)?;
        Ok((self.join(&cond, &y)?, log_scale.sum(1)?))
    }

    pub fn inverse(&self, y: &Tensor) -> Result<Tensor> {
        let (cond, trans) = self.halves(y)?;
        let (log_scale, shift) = self.scale_shift(&cond)?;
        let x = (trans.sub(&shift)? * log_scale.neg()?.exp()?)?;
        self.join(&cond, &x)
    }
}

impl RealNvp {
    /// Parameters live under `vb` as `{block}.hidden.*` and `{block}.out.*`.
    pub fn new(vb: VarBuilder, spec: &FlowSpec) -> Result<Self> {
        if spec.channels < 2 {
            return Err(Error::invalid(
                "flow channels",
                format!("{} channels cannot be split into two halves", spec.channels),
            ));
        }
        if spec.kernel.is_multiple_of(2) {
            return Err(Error::invalid(
                "flow kernel",
                format!("{} is even; a same-padded kernel must be odd", spec.kernel),
            ));
        }
        let blocks = (0..spec.blocks)
            .map(|i| AffineCoupling::new(vb.pp(i), spec, i % 2 == 1))
            .collect::<Result<Vec<_>>>()?;
        Ok(RealNvp {
            blocks,
            channels: spec.channels,
        })
    }

    /// `x`: `[B, C, H, W]` → `(z, log|det ∂z/∂x| per position [B, H, W])`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.channels {
            return Err(Error::invalid(
                "flow input",
                format!("{c} channels, the flow was built for {}", self.channels),
            ));
        }
        let mut z = x.clone();
        let mut log_det = Tensor::zeros((b, h, w), x.dtype(), x.device())?;
        for block in &self.blocks {
            let (next, block_log_det) = block.forward(&z)?;
            z = next;
            log_det = log_det.add(&block_log_det)?;
        }
        Ok((z, log_det))
    }

    /// A snapshot of the current weights for the fast CPU kernels (inference only).
    pub fn fast(&self) -> Result<FastFlow> {
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(FastCoupling {
                    conditioner: b.conditioner.clone(),
                    transformed: b.transformed.clone(),
                    hidden: b.hidden.fast()?,
                    out: b.out.fast()?,
                    clamp: b.clamp as f32,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FastFlow {
            blocks,
            channels: self.channels,
        })
    }

    /// The exact inverse of [`RealNvp::forward`]'s `z`.
    pub fn inverse(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = z.clone();
        for block in self.blocks.iter().rev() {
            x = block.inverse(&x)?;
        }
        Ok(x)
    }
}

/// Negative log-likelihood per position under N(0, I), without the constant `C/2 · ln 2π`:
/// `0.5 · ‖z‖² − log-det`, `[B, H, W]`.
pub fn nll_per_position(z: &Tensor, log_det: &Tensor) -> Result<Tensor> {
    Ok(((z.sqr()?.sum(1)? * 0.5)? - log_det)?)
}

/// The flow's training loss: the mean NLL per position divided by the channel count (bits-per-dim
/// style), so learning rates do not depend on the feature width.
pub fn nll_loss(z: &Tensor, log_det: &Tensor) -> Result<Tensor> {
    let channels = z.dim(1)? as f64;
    Ok((nll_per_position(z, log_det)?.mean_all()? / channels)?)
}
