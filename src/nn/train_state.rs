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
}
