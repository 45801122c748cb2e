//! Adam with PyTorch's coupled (L2) weight decay and SGD with (Nesterov) momentum, each with a
//! state that can be saved and restored, so a stopped training resumes with the same moments and
//! step count (candle's optimisers keep their state private, and its `AdamW` decays decoupled).
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Added to the gradient as `weight_decay · θ` (PyTorch `Adam(weight_decay=…)`).
    pub weight_decay: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

pub struct Adam {
    params: AdamParams,
    slots: Vec<Slot>,
    step: u64,
}

/// The variables of `vars`, sorted by name (a stable order for optimiser state and tests).
pub fn sorted_vars(vars: &VarMap) -> Result<Vec<(String, Var)>> {
    let vars = vars
        .data()
        .lock()
        .map_err(|_| Error::invalid("variable map", "lock poisoned"))?;
    let mut named: Vec<(String, Var)> = vars.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(named)
}

/// An optimiser whose state can be saved and restored by name.
pub trait Optimizer: Send {
    /// One update of every variable that received a gradient.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// The state (moments, step count), each name starting with `prefix`.
    fn state(&self, prefix: &str) -> Result<HashMap<String, Tensor>>;
    /// Restores what [`Optimizer::state`] saved; every entry must be present with its shape.
    fn load_state(&mut self, prefix: &str, state: &HashMap<String, Tensor>) -> Result<()>;
    fn learning_rate(&self) -> f64;
    /// For schedules (FCDD's decay per epoch).
    fn set_learning_rate(&mut self, lr: f64);
}

/// The stored optimiser tensor `key`, checked against the shape of `like` and moved to its device.
fn stored_like(state: &HashMap<String, Tensor>, key: String, like: &Tensor) -> Result<Tensor> {
    let t = state
        .get(&key)
        .ok_or_else(|| Error::invalid(format!("optimiser state `{key}`"), "missing"))?;
    if t.dims() != like.dims() {
        return Err(Error::invalid(
            format!("optimiser state `{key}`"),
            format!("shape {:?}, expected {:?}", t.dims(), like.dims()),
        ));
    }
    Ok(t.to_device(like.device())?.to_dtype(like.dtype())?)
}

/// f64 holds every step count a training can reach exactly; safetensors has no u64 scalar candle
/// can read back on every backend.
fn step_tensor(step: u64, device: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::new(&[step as f64], device)?)
}

fn stored_step(state: &HashMap<String, Tensor>, prefix: &str) -> Result<u64> {
    let key = format!("{prefix}step");
    let step = state
        .get(&key)
        .ok_or_else(|| Error::invalid(format!("optimiser state `{key}`"), "missing"))?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(step.first().copied().unwrap_or(0.0) as u64)
}

fn first_device(vars: &[&Var]) -> candle_core::Device {
    vars.first()
        .map(|v| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu)
}

impl Adam {
    pub fn new(vars: &VarMap, params: AdamParams) -> Result<Self> {
        let slots = sorted_vars(vars)?
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    name,
                    m: zeros.clone(),
                    v: zeros,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Adam {
            params,
            slots,
            step: 0,
        })
    }

    pub fn steps(&self) -> u64 {
        self.step
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bias1 = 1.0 - p.beta1.powi(t);
        let bias2 = 1.0 - p.beta2.powi(t);
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            // Detached: a gradient can carry the backward graph of its step (candle records ops
            // on variables), and moments built from it would chain every step's graph together.
            let theta = slot.var.as_tensor().detach();
            let grad = grad.detach();
            let grad = if p.weight_decay > 0.0 {
                (grad + (&theta * p.weight_decay)?)?
            } else {
                grad
            };
            slot.m = ((&slot.m * p.beta1)? + (&grad * (1.0 - p.beta1))?)?;
            slot.v = ((&slot.v * p.beta2)? + (grad.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&slot.m / bias1)?;
            let v_hat = (&slot.v / bias2)?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            slot.var.set(&(theta - (update * p.lr)?)?)?;
        }
        Ok(())
    }

    /// Moments and step count, named `{prefix}{var}.m`, `{prefix}{var}.v`, `{prefix}step`.
    fn state(&self, prefix: &str) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(2 * self.slots.len() + 1);
        for slot in &self.slots {
            out.insert(format!("{prefix}{}.m", slot.name), slot.m.copy()?);
            out.insert(format!("{prefix}{}.v", slot.name), slot.v.copy()?);
        }
        let vars: Vec<&Var> = self.slots.iter().map(|s| &s.var).collect();
        out.insert(
            format!("{prefix}step"),
            step_tensor(self.step, &first_device(&vars))?,
        );
        Ok(out)
    }

    fn load_state(&mut self, prefix: &str, state: &HashMap<String, Tensor>) -> Result<()> {
        for slot in &mut self.slots {
            slot.m = stored_like(state, format!("{prefix}{}.m", slot.name), &slot.m)?;
            slot.v = stored_like(state, format!("{prefix}{}.v", slot.name), &slot.v)?;
        }
        self.step = stored_step(state, prefix)?;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdParams {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    /// Added to the gradient as `weight_decay · θ` (PyTorch `SGD(weight_decay=…)`).
    pub weight_decay: f64,
}

/// SGD with momentum as PyTorch computes it: `b ← μ·b + g` (`b = g` on the first step), then the
/// update is `b`, or `g + μ·b` with Nesterov.
pub struct Sgd {
    params: SgdParams,
    slots: Vec<(String, Var, Option<Tensor>)>,
    step: u64,
}

impl Sgd {
    pub fn new(vars: &VarMap, params: SgdParams) -> Result<Self> {
        Ok(Sgd {
            params,
            slots: sorted_vars(vars)?
                .into_iter()
                .map(|(name, var)| (name, var, None))
                .collect(),
            step: 0,
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let p = self.params;
        for (_, var, buffer) in &mut self.slots {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let theta = var.as_tensor().detach();
            let mut grad = grad.detach();
            if p.weight_decay > 0.0 {
                grad = (grad + (&theta * p.weight_decay)?)?;
            }
            let update = if p.momentum > 0.0 {
                let b = match buffer.take() {
                    Some(b) => ((b * p.momentum)? + &grad)?,
                    None => grad.clone(),
                };
                let update = if p.nesterov {
                    (&grad + (&b * p.momentum)?)?
                } else {
                    b.clone()
                };
                *buffer = Some(b);
                update
            } else {
                grad
            };
            var.set(&(theta - (update * p.lr)?)?)?;
        }
        Ok(())
    }

    /// Momentum buffers `{prefix}{var}.b` (zeros before a variable's first gradient, with
    /// `{prefix}{var}.started` 0) and `{prefix}step`.
    fn state(&self, prefix: &str) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(2 * self.slots.len() + 1);
        for (name, var, buffer) in &self.slots {
            let (b, started) = match buffer {
                Some(b) => (b.copy()?, 1.0),
                None => (var.as_tensor().zeros_like()?, 0.0),
            };
            out.insert(format!("{prefix}{name}.b"), b);
            out.insert(
                format!("{prefix}{name}.started"),
                Tensor::new(&[started as f32], var.device())?,
            );
        }
        let vars: Vec<&Var> = self.slots.iter().map(|s| &s.1).collect();
        out.insert(
            format!("{prefix}step"),
            step_tensor(self.step, &first_device(&vars))?,
        );
        Ok(out)
    }

    fn load_state(&mut self, prefix: &str, state: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var, buffer) in &mut self.slots {
            let b = stored_like(state, format!("{prefix}{name}.b"), var.as_tensor())?;
            let flag = Tensor::new(&[0f32], var.device())?;
            let started =
                stored_like(state, format!("{prefix}{name}.started"), &flag)?.to_vec1::<f32>()?[0];
            *buffer = (started > 0.5).then_some(b);
        }
        self.step = stored_step(state, prefix)?;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One step by hand: with β1 = 0.9, β2 = 0.999 the first bias-corrected update is lr·sign(g)
    /// (up to eps), and weight decay adds `wd·θ` to the gradient first.
    #[test]
    fn first_step_matches_the_formula() -> Result<()> {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let w = vars.get((2,), "w", candle_nn::Init::Const(1.0), DType::F32, &dev)?;
        let mut opt = Adam::new(
            &vars,
            AdamParams {
                lr: 0.1,
                weight_decay: 0.5,
                ..Default::default()
            },
        )?;
        // d/dw of sum(w · [-2, 3]) = [-2, 3]; plus 0.5·w = [-1.5, 3.5]: signs -, +.
        let loss = (w.clone() * Tensor::new(&[-2f32, 3.0], &dev)?)?.sum_all()?;
        opt.step(&loss.backward()?)?;
        let got = w.to_vec1::<f32>()?;
        assert!(
            (got[0] - 1.1).abs() < 1e-5 && (got[1] - 0.9).abs() < 1e-5,
            "{got:?}"
        );
        assert_eq!(opt.steps(), 1);
        Ok(())
    }

    /// A gradient that depends on the variable (here 2·w) carries a backward graph; the moments
    /// must hold values only, or every step would chain onto the last and memory would grow.
    #[test]
    fn moments_keep_no_backward_graph() -> Result<()> {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let w = vars.get((4,), "w", candle_nn::Init::Const(0.5), DType::F32, &dev)?;
        let mut opt = Adam::new(&vars, AdamParams::default())?;
        for _ in 0..2 {
            opt.step(&w.sqr()?.sum_all()?.backward()?)?;
        }
        for slot in &opt.slots {
            assert!(!slot.m.track_op() && !slot.v.track_op());
        }
        Ok(())
    }

    /// Two Nesterov steps by hand (PyTorch's formula): g = 2 (from sum(2·w)), wd 0.5 at w = 1
    /// gives g' = 2.5; b1 = 2.5, update 2.5 + 0.9·2.5 = 4.75, w = 1 − 0.1·4.75 = 0.525; then
    /// g' = 2 + 0.2625 = 2.2625, b2 = 0.9·2.5 + 2.2625 = 4.5125, update 2.2625 + 0.9·4.5125.
    #[test]
    fn nesterov_sgd_matches_the_formula() -> Result<()> {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let w = vars.get((1,), "w", candle_nn::Init::Const(1.0), DType::F32, &dev)?;
        let params = SgdParams {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.5,
        };
        let mut opt = Sgd::new(&vars, params)?;
        let loss = |w: &Tensor| (w * 2.0).and_then(|t| t.sum_all());
        opt.step(&loss(&w)?.backward()?)?;
        assert!((w.to_vec1::<f32>()?[0] - 0.525).abs() < 1e-6);
        // A restored copy continues exactly like the original.
        let mut copy = Sgd::new(&vars, params)?;
        copy.load_state("s.", &opt.state("s.")?)?;
        copy.step(&loss(&w)?.backward()?)?;
        let expected = 0.525 - 0.1 * (2.2625 + 0.9 * 4.5125);
        assert!((w.to_vec1::<f32>()?[0] - expected as f32).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn state_round_trips() -> Result<()> {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let w = vars.get((3,), "w", candle_nn::Init::Const(0.5), DType::F32, &dev)?;
        let mut a = Adam::new(&vars, AdamParams::default())?;
        for _ in 0..3 {
            a.step(&w.sqr()?.sum_all()?.backward()?)?;
        }
        let mut b = Adam::new(&vars, AdamParams::default())?;
        b.load_state("opt.", &a.state("opt.")?)?;
        assert_eq!(b.steps(), 3);
        assert_eq!(
            b.state("x.")?["x.w.v"].to_vec1::<f32>()?,
            a.state("x.")?["x.w.v"].to_vec1::<f32>()?
        );
        let mut missing = a.state("opt.")?;
        missing.remove("opt.w.m");
        assert!(b.load_state("opt.", &missing).is_err());
        Ok(())
    }
}
