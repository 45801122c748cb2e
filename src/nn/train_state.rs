//! The trainable state every method keeps the same way: groups of variables, each with its own
//! optimiser, plus buffers that are saved but never optimised (BatchNorm running statistics).
//!
//! One place owns what NF-BMR and OCR-GAN used to write twice: stepping a group, the tensors a
//! model file holds, and the training state a checkpoint holds (parameters, buffers, optimiser
//! moments under `optim.<group>.`), saved and restored by name.
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use super::optim::{sorted_vars, Optimizer};
use crate::error::{Error, Result};
use crate::nn::init::{load_vars, snapshot};

struct Group {
    name: &'static str,
    vars: VarMap,
    optimizer: Box<dyn Optimizer>,
}

#[derive(Default)]
pub struct TrainState {
    groups: Vec<Group>,
    buffers: Vec<VarMap>,
    /// Gradients summed over batches, per group, with the number of batches.
    pending: Vec<(&'static str, GradStore, usize)>,
}

fn optimizer_prefix(group: &str) -> String {
    format!("optim.{group}.")
}

impl TrainState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a group of variables stepped by `optimizer` (built on the same `vars`).
    pub fn with_group(
        mut self,
        name: &'static str,
        vars: VarMap,
        optimizer: impl Optimizer + 'static,
    ) -> Self {
        self.groups.push(Group {
            name,
            vars,
            optimizer: Box::new(optimizer),
        });
        self
    }

    /// Adds variables that are saved and restored but never optimised.
    pub fn with_buffers(mut self, vars: VarMap) -> Self {
        self.buffers.push(vars);
        self
    }

    fn group(&self, name: &str) -> Result<&Group> {
        self.groups
            .iter()
            .find(|g| g.name == name)
            .ok_or_else(|| self.unknown(name))
    }

    fn unknown(&self, name: &str) -> Error {
        let names: Vec<&str> = self.groups.iter().map(|g| g.name).collect();
        Error::invalid(
            "parameter group",
            format!("`{name}` is not one of {}", names.join(", ")),
        )
    }

    pub fn group_names(&self) -> Vec<&'static str> {
        self.groups.iter().map(|g| g.name).collect()
    }

    /// One optimiser step of group `name` with `grads`.
    pub fn step(&mut self, name: &str, grads: &GradStore) -> Result<()> {
        let unknown = self.unknown(name);
        let group = self
            .groups
            .iter_mut()
            .find(|g| g.name == name)
            .ok_or(unknown)?;
        group.optimizer.step(grads)
    }

    /// Adds `grads` of group `name`'s variables to the pending sum (gradient accumulation: an
    /// optimiser step over a larger batch than fits in one pass).
    pub fn accumulate(&mut self, name: &str, grads: &GradStore) -> Result<()> {
        let group = self.group(name)?;
        let name = group.name;
        let vars = sorted_vars(&group.vars)?;
        let slot = match self.pending.iter().position(|(n, _, _)| *n == name) {
            Some(i) => i,
            None => {
                let device = vars
                    .first()
                    .map(|(_, v)| v.device().clone())
                    .unwrap_or(candle_core::Device::Cpu);
                // candle has no public empty store: one of a throw-away scalar serves.
                let empty = Tensor::zeros((), candle_core::DType::F32, &device)?.backward()?;
                self.pending.push((name, empty, 0));
                self.pending.len() - 1
            }
        };
        let (_, sum, count) = &mut self.pending[slot];
        for (_, var) in vars {
            if let Some(grad) = grads.get(var.as_tensor()) {
                let grad = grad.detach();
                let total = match sum.get(var.as_tensor()) {
                    Some(previous) => (previous + grad)?,
                    None => grad,
                };
                sum.insert(var.as_tensor(), total);
            }
        }
        *count += 1;
        Ok(())
    }

    /// Steps every group with pending gradients, averaged over their batches, and clears them.
    pub fn step_accumulated(&mut self) -> Result<()> {
        for (name, mut sum, count) in std::mem::take(&mut self.pending) {
            let vars = self.group_vars(name)?;
            for (_, var) in vars {
                if let Some(total) = sum.get(var.as_tensor()) {
                    let mean = (total / count as f64)?;
                    sum.insert(var.as_tensor(), mean);
                }
            }
            self.step(name, &sum)?;
        }
        Ok(())
    }

    pub fn optimizer_mut(&mut self, name: &str) -> Result<&mut dyn Optimizer> {
        let unknown = self.unknown(name);
        Ok(self
            .groups
            .iter_mut()
            .find(|g| g.name == name)
            .ok_or(unknown)?
            .optimizer
            .as_mut())
    }

    /// The variables of group `name`, sorted by name.
    pub fn group_vars(&self, name: &str) -> Result<Vec<(String, Var)>> {
        sorted_vars(&self.group(name)?.vars)
    }

    /// Names of the buffers (saved, not optimised).
    pub fn buffer_names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for vars in &self.buffers {
            names.extend(sorted_vars(vars)?.into_iter().map(|(n, _)| n));
        }
        Ok(names)
    }

    /// Copies of every variable and buffer: what a model file holds of this state.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for vars in self.groups.iter().map(|g| &g.vars).chain(&self.buffers) {
            snapshot(vars, &mut out)?;
        }
        Ok(out)
    }

    /// Sets every variable and buffer from a model file's tensors (same names).
    pub fn load(&self, stored: &HashMap<String, Tensor>) -> Result<()> {
        for vars in self.groups.iter().map(|g| &g.vars).chain(&self.buffers) {
            load_vars(vars, stored)?;
        }
        Ok(())
    }

    /// [`TrainState::tensors`] plus every optimiser's state: what a checkpoint holds.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = self.tensors()?;
        for group in &self.groups {
            out.extend(group.optimizer.state(&optimizer_prefix(group.name))?);
        }
        Ok(out)
    }

    /// Restores what [`TrainState::state`] returned.
    pub fn restore(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.load(state)?;
        for group in &mut self.groups {
            group
                .optimizer
                .load_state(&optimizer_prefix(group.name), state)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::optim::{Adam, AdamParams};
    use candle_core::{DType, Device};

    #[test]
    fn a_restored_state_steps_exactly_like_the_original() -> Result<()> {
        let dev = Device::Cpu;
        let build = || -> Result<(TrainState, Tensor)> {
            let vars = VarMap::new();
            let w = vars.get((2,), "w", candle_nn::Init::Const(0.5), DType::F32, &dev)?;
            let opt = Adam::new(&vars, AdamParams::default())?;
            Ok((TrainState::new().with_group("g", vars, opt), w))
        };
        let (mut a, wa) = build()?;
        for _ in 0..3 {
            a.step("g", &wa.sqr()?.sum_all()?.backward()?)?;
        }
        let (mut b, wb) = build()?;
        b.restore(&a.state()?)?;
        a.step("g", &wa.sqr()?.sum_all()?.backward()?)?;
        b.step("g", &wb.sqr()?.sum_all()?.backward()?)?;
        assert_eq!(wa.to_vec1::<f32>()?, wb.to_vec1::<f32>()?);
        assert!(a.step("nope", &wa.sqr()?.sum_all()?.backward()?).is_err());
        Ok(())
    }

    /// Two accumulated batches step like one batch of their mean loss.
    #[test]
    fn accumulated_gradients_step_like_the_mean_loss() -> Result<()> {
        let dev = Device::Cpu;
        let build = || -> Result<(TrainState, Tensor)> {
            let vars = VarMap::new();
            let w = vars.get((2,), "w", candle_nn::Init::Const(0.5), DType::F32, &dev)?;
            let opt = crate::nn::optim::Sgd::new(
                &vars,
                crate::nn::optim::SgdParams {
                    lr: 0.1,
                    momentum: 0.9,
                    nesterov: true,
                    weight_decay: 1e-4,
                },
            )?;
            Ok((TrainState::new().with_group("g", vars, opt), w))
        };
        let x1 = Tensor::new(&[1f32, -2.0], &dev)?;
        let x2 = Tensor::new(&[3f32, 0.5], &dev)?;
        let loss = |w: &Tensor, x: &Tensor| (w * x)?.sqr()?.sum_all();
        let (mut a, wa) = build()?;
        a.accumulate("g", &loss(&wa, &x1)?.backward()?)?;
        a.accumulate("g", &loss(&wa, &x2)?.backward()?)?;
        a.step_accumulated()?;
        let (mut b, wb) = build()?;
        let mean = ((loss(&wb, &x1)? + loss(&wb, &x2)?)? / 2.0)?;
        b.step("g", &mean.backward()?)?;
        let (va, vb) = (wa.to_vec1::<f32>()?, wb.to_vec1::<f32>()?);
        assert!(
            va.iter().zip(&vb).all(|(p, q)| (p - q).abs() < 1e-6),
            "{va:?} {vb:?}"
        );
        Ok(())
    }
}
