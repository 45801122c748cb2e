//! BatchNorm2d for trained networks, from plain tensor ops (candle's fused norms have no gradient,
//! see DEVELOPERS.md). Batch statistics in training, running statistics in inference, as PyTorch.
//!
//! The affine weight and bias come from the parameter builder (the optimiser sees them); the
//! running mean and variance from a separate buffer builder, updated in place with `Var::set`, so
//! an inference network built on detached views of the same storage sees every update.
use candle_core::{Tensor, Var, D};
use candle_nn::{Init, VarBuilder};

use crate::error::Result;
use crate::nn::fused_norm::BatchNormOp;

const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

/// A network's parameter builder and its buffer builder (the BatchNorm statistics) under the same
/// prefix.
#[derive(Clone)]
pub struct Builders<'a> {
    pub params: VarBuilder<'a>,
    pub buffers: VarBuilder<'a>,
}

impl<'a> Builders<'a> {
    pub fn pp(&self, name: impl ToString) -> Builders<'a> {
        let name = name.to_string();
        Builders {
            params: self.params.pp(&name),
            buffers: self.buffers.pp(&name),
        }
    }

    /// The BatchNorm under `norm`.
    pub fn norm(&self, channels: usize) -> Result<BatchNorm2d> {
        BatchNorm2d::new(self.params.pp("norm"), self.buffers.pp("norm"), channels)
    }
}

pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    channels: usize,
}

impl BatchNorm2d {
    /// `params`: `weight` ~ N(1, 0.02) (DCGAN) and `bias` = 0; `buffers`: `running_mean` = 0 and
    /// `running_var` = 1, under the same prefix.
    pub fn new(params: VarBuilder, buffers: VarBuilder, channels: usize) -> Result<Self> {
        Ok(BatchNorm2d {
            weight: params.get_with_hints(
                channels,
                "weight",
                Init::Randn {
                    mean: 1.0,
                    stdev: 0.02,
                },
            )?,
            bias: params.get_with_hints(channels, "bias", Init::Const(0.0))?,
            running_mean: buffers.get_with_hints(channels, "running_mean", Init::Const(0.0))?,
            running_var: buffers.get_with_hints(channels, "running_var", Init::Const(1.0))?,
            channels,
        })
    }

    /// The inference transform `y = scale·x + shift` per channel (running statistics), for
    /// folding into the convolution before it.
    pub fn folded(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let values = crate::nn::init::f32_values;
        let (weight, bias) = (values(&self.weight)?, values(&self.bias)?);
        let (mean, var) = (values(&self.running_mean)?, values(&self.running_var)?);
        let scale: Vec<f32> = weight
            .iter()
            .zip(&var)
            .map(|(w, v)| w / (v + EPS as f32).sqrt())
            .collect();
        let shift = bias
            .iter()
            .zip(&mean)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        Ok((scale, shift))
    }

    fn shaped(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.reshape((1, self.channels, 1, 1))
    }

    /// `train`: normalise with the batch's statistics and fold them into the running ones.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (mean, var) = if train {
            let (b, c, h, w) = x.dims4()?;
            let flat = x.transpose(0, 1)?.reshape((c, b * h * w))?;
            let mean = flat.mean_keepdim(D::Minus1)?;
            let var = flat.broadcast_sub(&mean)?.sqr()?.mean_keepdim(D::Minus1)?;
            self.update_running(&mean, &var, b * h * w)?;
            (self.shaped(&mean)?, self.shaped(&var)?)
        } else {
            (
                self.shaped(&self.running_mean)?,
                self.shaped(&self.running_var)?,
            )
        };
        let normalised = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + EPS)?.sqrt()?)?;
        normalised
            .broadcast_mul(&self.shaped(&self.weight)?)?
            .broadcast_add(&self.shaped(&self.bias)?)
    }

    /// [`BatchNorm2d::forward_t`], then a ReLU when `relu`: one custom op with its own backward
    /// on the CPU ([`crate::nn::fused_norm`], for networks with many BatchNorms), the tensor ops of
    /// `forward_t` elsewhere. Same results and running statistics.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        train: bool,
        relu: bool,
    ) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
            let y = self.forward_t(x, train)?;
            return if relu { y.relu() } else { Ok(y) };
        }
        let fixed = if train {
            None
        } else {
            let mean = self.running_mean.to_vec1::<f32>()?;
            let inv_std = self
                .running_var
                .to_vec1::<f32>()?
                .iter()
                .map(|v| 1.0 / (v + EPS as f32).sqrt())
                .collect();
            Some((mean, inv_std))
        };
        let (y, stats) = BatchNormOp::new(EPS, relu, fixed).apply(x, &self.weight, &self.bias)?;
        if let (true, Some(stats)) = (train, stats) {
            let (b, _, h, w) = x.dims4()?;
            let device = x.device();
            self.update_running(
                &Tensor::new(stats.mean.as_slice(), device)?,
                &Tensor::new(stats.var.as_slice(), device)?,
                b * h * w,
            )?;
        }
        Ok(y)
    }

    /// PyTorch's update: the running variance uses the unbiased batch variance.
    fn update_running(&self, mean: &Tensor, var: &Tensor, count: usize) -> candle_core::Result<()> {
        if !(self.running_mean.is_variable() && self.running_var.is_variable()) {
            // Buffers loaded from a model file are plain tensors: such a network only infers.
            return Ok(());
        }
        let rm = Var::from_tensor(&self.running_mean)?;
        let rv = Var::from_tensor(&self.running_var)?;
        let unbiased = count as f64 / (count.max(2) - 1) as f64;
        let mean = mean.detach().flatten_all()?;
        let var = (var.detach().flatten_all()? * unbiased)?;
        rm.set(&((rm.as_tensor() * (1.0 - MOMENTUM))? + (mean * MOMENTUM)?)?)?;
        rv.set(&((rv.as_tensor() * (1.0 - MOMENTUM))? + (var * MOMENTUM)?)?)?;
        Ok(())
    }
}
