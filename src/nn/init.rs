//! Deterministic parameter initialisation: a `VarBuilder` backend that creates each missing
//! variable from [`crate::rng::Rng`] seeded by the model seed and the variable's name, so the same
//! config gives the same initial weights on every machine (candle's own init draws from `rand`'s
//! thread RNG), independently of the order in which layers are built. Also the helpers that move
//! a variable map's values in and out (inference views, snapshots, loading).
use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::error::{Error, Result};
use crate::rng::Rng;

struct SeededVarMap {
    vars: VarMap,
    seed: u64,
}

/// FNV-1a, a stable hash of a variable's name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn sample(init: Init, shape: &Shape, rng: &mut Rng) -> Vec<f32> {
    let n = shape.elem_count();
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| (mean + stdev * rng.normal() as f64) as f32)
            .collect(),
        Init::Uniform { lo, up } => (0..n)
            .map(|_| rng.range_f32(lo as f32, up as f32))
            .collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Normal => {
                    (0..n).map(|_| (std * rng.normal() as f64) as f32).collect()
                }
                candle_nn::init::NormalOrUniform::Uniform => {
                    let bound = (3f64.sqrt() * std) as f32;
                    (0..n).map(|_| rng.range_f32(-bound, bound)).collect()
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut vars = self
            .vars
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("shape mismatch on {name}: {shape:?} <> {:?}", var.shape())
            }
            return Ok(var.as_tensor().clone());
        }
        let mut rng = Rng::new(self.seed ^ name_hash(name));
        let values = sample(init, &shape, &mut rng);
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("`{name}`: a seeded variable map needs a shape to create a variable")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars
            .data()
            .lock()
            .is_ok_and(|vars| vars.contains_key(name))
    }
}

/// A builder that adds its variables, seeded, to `vars`.
/// A tensor's values, row-major, as f32 (for snapshots of weights on the fast CPU kernels).
pub fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

pub fn seeded_var_builder(
    vars: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVarMap {
            vars: vars.clone(),
            seed,
        }),
        dtype,
        device.clone(),
    )
}

/// Views of every variable's storage that record no gradient: a network built on them infers
/// without a backward graph, and sees every optimiser update (`Var::set` writes in place).
pub fn detached(vars: &VarMap) -> Result<HashMap<String, Tensor>> {
    let vars = vars
        .data()
        .lock()
        .map_err(|_| Error::invalid("variable map", "lock poisoned"))?;
    Ok(vars
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect())
}

/// Copies of every variable, by name (a snapshot later updates do not touch).
pub fn snapshot(vars: &VarMap, into: &mut HashMap<String, Tensor>) -> Result<()> {
    for (name, tensor) in detached(vars)? {
        into.insert(name, tensor.copy()?);
    }
    Ok(())
}

/// Sets every variable of `vars` from `stored` (same names), checking shapes; names the culprit.
pub fn load_vars(vars: &VarMap, stored: &HashMap<String, Tensor>) -> Result<()> {
    let vars = vars
        .data()
        .lock()
        .map_err(|_| Error::invalid("variable map", "lock poisoned"))?;
    for (name, var) in vars.iter() {
        let tensor = stored
            .get(name)
            .ok_or_else(|| Error::invalid(format!("model tensor `{name}`"), "missing"))?;
        if tensor.dims() != var.dims() {
            return Err(Error::invalid(
                format!("model tensor `{name}`"),
                format!("shape {:?}, expected {:?}", tensor.dims(), var.dims()),
            ));
        }
        var.set(&tensor.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
