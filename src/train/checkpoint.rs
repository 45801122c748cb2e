//! Training checkpoints: after every epoch, the method's whole training state (parameters,
//! running statistics, optimiser moments), the best epoch's state so far and the report, in one
//! safetensors file written atomically. A resumed training refuses a checkpoint made by another
//! method, config, seed, batch size or set of training images.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{TrainOptions, TrainReport};
use crate::error::{Error, Result};
use crate::methods::Method;
use crate::model_file::{read_tensors, write_tensors};

const METADATA_KEY: &str = "vigil-checkpoint";
/// 2: the report records whether the training paused.
const FORMAT_VERSION: u32 = 2;
const BEST_PREFIX: &str = "best.";

/// What must match for a checkpoint to continue this training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub method: String,
    pub config: serde_json::Value,
    pub seed: u64,
    pub batch_size: usize,
    pub data_fingerprint: String,
}

impl Identity {
    pub fn of(method: &dyn Method, opts: &TrainOptions) -> Result<Identity> {
        Ok(Identity {
            method: method.name().to_string(),
            config: method.config_json()?,
            seed: opts.seed,
            batch_size: opts.batch_size,
            data_fingerprint: opts.data_fingerprint.clone(),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format_version: u32,
    identity: Identity,
    phase: usize,
    epochs_done: usize,
    best: Option<(usize, f32)>,
    report: TrainReport,
}

/// One checkpoint's content.
pub struct Saved {
    /// The phase being trained and how many of its epochs are done.
    pub phase: usize,
    pub epochs_done: usize,
    /// `(epoch, validation separation, training state)` of the phase's best epoch so far.
    pub best: Option<(usize, f32, HashMap<String, Tensor>)>,
    pub report: TrainReport,
    pub state: HashMap<String, Tensor>,
}

pub fn save(path: &Path, identity: &Identity, saved: &Saved) -> Result<()> {
    let meta = Meta {
        format_version: FORMAT_VERSION,
        identity: identity.clone(),
        phase: saved.phase,
        epochs_done: saved.epochs_done,
        best: saved.best.as_ref().map(|(e, s, _)| (*e, *s)),
        report: saved.report.clone(),
    };
    let json = serde_json::to_string(&meta).map_err(|e| Error::ModelFile {
        path: path.into(),
        reason: format!("cannot encode checkpoint metadata: {e}"),
    })?;
    let mut tensors = saved.state.clone();
    if let Some((_, _, best)) = &saved.best {
        tensors.extend(
            best.iter()
                .map(|(k, v)| (format!("{BEST_PREFIX}{k}"), v.clone())),
        );
    }
    write_tensors(path, METADATA_KEY, json, &tensors)
}

/// Reads a checkpoint and checks that it continues the training `identity` describes.
pub fn load(path: &Path, identity: &Identity, device: &Device) -> Result<Saved> {
    let bad = |reason: String| Error::ModelFile {
        path: path.into(),
        reason,
    };
    let (json, tensors) = read_tensors(path, METADATA_KEY, device)?;
    let meta: Meta =
        serde_json::from_str(&json).map_err(|e| bad(format!("checkpoint metadata: {e}")))?;
    if meta.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "checkpoint format {}, this vigil reads {FORMAT_VERSION}",
            meta.format_version
        )));
    }
    let theirs = &meta.identity;
    let mismatch = [
        ("method", theirs.method != identity.method),
        ("config", theirs.config != identity.config),
        ("seed", theirs.seed != identity.seed),
        ("batch size", theirs.batch_size != identity.batch_size),
        (
            "training images",
            theirs.data_fingerprint != identity.data_fingerprint,
        ),
    ]
    .into_iter()
    .find(|(_, differs)| *differs);
    if let Some((what, _)) = mismatch {
        return Err(bad(format!(
            "made with another {what}: delete it (or pass another --checkpoint) to start afresh"
        )));
    }
    let (mut state, mut best_state) = (HashMap::new(), HashMap::new());
    for (name, tensor) in tensors {
        match name.strip_prefix(BEST_PREFIX) {
            Some(inner) => best_state.insert(inner.to_string(), tensor),
            None => state.insert(name, tensor),
        };
    }
    Ok(Saved {
        phase: meta.phase,
        epochs_done: meta.epochs_done,
        best: meta.best.map(|(e, s)| (e, s, best_state)),
        report: meta.report,
        state,
    })
}
