//! The detection methods. Each lives in its own folder (model, loss, anomaly map) and implements
//! [`Method`], which is all the training loop, the evaluator, the model file and the station use.
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::data::{Image, InputSpec, Mask};
use crate::error::{Error, Result};
use crate::model_file::ModelMeta;
use crate::nn::train_state::TrainState;
use crate::rng::Rng;

pub mod anomaly_map;
pub(crate) mod config_check;
mod fast_snapshot;
pub mod fcdd;
pub mod memory_bank;
pub mod ndp_net;
pub mod nf_bmr;
pub mod ocr_gan;

/// What a detector says about a batch of images.
#[derive(Debug)]
pub struct Inference {
    /// `[B, H, W]` anomaly maps at the model's input size; higher = more anomalous.
    pub maps: Tensor,
    /// `[B]` image anomaly scores.
    pub scores: Tensor,
}

/// What a training phase consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseInput {
    /// The frozen front's output ([`Method::encode_frozen`]) of the unaltered training images,
    /// computed once and cached by the training loop (NF-BMR).
    Features,
    /// The images themselves, which the method augments and into which it synthesises anomalies
    /// (OCR-GAN, FCDD).
    Images,
}

/// How the epoch a phase keeps is chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// The last epoch.
    Last,
    /// The epoch that best separates synthetic anomalies of the defect-free validation images from
    /// those images (for training that oscillates, such as a GAN's). `trained_on` names the kinds
    /// of synthetic anomaly (as `kind` spells them in configs) the phase itself learns from; they
    /// are left out of the yardstick, so a method is never selected by what it was taught.
    Separation { trained_on: Vec<&'static str> },
}

/// How a training phase changes the method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learning {
    /// Optimiser steps on the losses of [`Method::step_losses`], epoch after epoch.
    Steps,
    /// No optimiser: one pass over the training images in which [`Method::observe`] sees every
    /// batch, then [`Method::conclude`] fits the method from what it saw (a memory bank, feature
    /// statistics). The phase's `epochs`, `min_steps` and `batch` do not apply.
    Fitted,
}

/// What [`Method::conclude`] gets at the end of a fitted phase's pass.
pub struct FitContext<'a> {
    /// Index into [`Method::phases`].
    pub phase: usize,
    /// The defect-free validation images, kept out of training.
    pub validation: &'a [Image],
    /// Images per batch when the fit scores images.
    pub batch_size: usize,
    /// For the fit's own progress (hidden when the training shows none).
    pub bar: &'a indicatif::ProgressBar,
}

/// One stage of a method's training, trained in order (NF-BMR: the flow, then the mapping nets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseSpec {
    pub name: &'static str,
    pub input: PhaseInput,
    /// Passes over the training images.
    pub epochs: usize,
    /// The least number of optimiser steps: a small training set gets more epochs, so that a
    /// product of 50 images trains as long as one of 700 (epochs are rounded up to whole passes).
    pub min_steps: usize,
    /// The images each optimiser step averages over, when more than the training's batch size:
    /// the gradients of consecutive batches are accumulated (FCDD's 128 on a small machine).
    pub batch: Option<usize>,
    pub selection: Selection,
}

impl PhaseSpec {
    /// Batches whose gradients make one optimiser step, with `batch_size` images per batch.
    pub fn accumulation(&self, batch_size: usize) -> usize {
        self.batch
            .map_or(1, |b| b.div_ceil(batch_size.max(1)).max(1))
    }

    /// The epochs this phase runs with `steps_per_epoch` optimiser steps per pass.
    pub fn epochs_for(&self, steps_per_epoch: usize) -> usize {
        self.epochs
            .max(self.min_steps.div_ceil(steps_per_epoch.max(1)))
    }
}

/// A defective training image and its mask (`--defect`/`--masks`, or `--few-shot`).
#[derive(Clone, Debug)]
pub struct Defective {
    pub image: Image,
    pub mask: Mask,
}

/// What a method trains on: defect-free images, and defective ones for methods that learn from
/// them.
#[derive(Clone, Debug, Default)]
pub struct TrainSet {
    pub good: Vec<Image>,
    pub defects: Vec<Defective>,
}

/// One step's input.
pub struct TrainBatch<'a> {
    /// Index into [`Method::phases`].
    pub phase: usize,
    /// 0-based epoch of the phase.
    pub epoch: usize,
    /// The batch's defect-free images (label: good, mask: empty), in the epoch's seeded order.
    pub good: Vec<&'a Image>,
    /// `[B, ...]` cached frozen features of `good`, for [`PhaseInput::Features`] phases.
    pub features: Option<Tensor>,
    /// Every defective training image with its mask; the method decides how to mix them in.
    pub defects: &'a [Defective],
}

/// The losses of one step: each objective is backpropagated and steps its parameter group of
/// [`Method::train_state`], in order; `logged` values only go to progress bars and the report.
pub struct StepLosses {
    pub objectives: Vec<(&'static str, Tensor)>,
    pub logged: Vec<(&'static str, Tensor)>,
}

/// A trainable detector.
pub trait Method: Send {
    /// The method's name as the CLI and the model file spell it.
    fn name(&self) -> &'static str;

    fn phases(&self) -> Vec<PhaseSpec>;

    /// The frozen, deterministic front of the network, for [`PhaseInput::Features`] phases: the
    /// training loop computes it once per unaltered training image and caches it.
    fn encode_frozen(&self, images: &Tensor) -> Result<Tensor> {
        let _ = images;
        Err(Error::invalid(
            "training phase",
            format!("{} has no frozen front to cache", self.name()),
        ))
    }

    /// Whether the method learns from defective training images; others refuse them.
    fn learns_from_defects(&self) -> bool {
        false
    }

    /// The kinds of synthetic anomaly (as configs spell them) the detector learns to call
    /// anomalous, which a label-free yardstick must leave out (`vigil select`). Default: the kinds
    /// its phases' epoch selection leaves out.
    fn synthetic_kinds(&self) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        for phase in self.phases() {
            if let Selection::Separation { trained_on } = phase.selection {
                for k in trained_on {
                    if !kinds.contains(&k) {
                        kinds.push(k);
                    }
                }
            }
        }
        kinds
    }

    /// Called once with the whole training set before the first step (also before a checkpoint
    /// is restored), for statistics of the training images (FCDD's normalisation constants).
    fn prepare(&mut self, set: &TrainSet) -> Result<()> {
        let _ = set;
        Ok(())
    }

    /// The losses of one optimisation step. `rng` (seeded per epoch by the training loop, so a
    /// resumed training draws the same) is for the step's own randomness, such as synthetic
    /// anomalies.
    fn step_losses(&mut self, batch: &TrainBatch, rng: &mut Rng) -> Result<StepLosses>;

    /// How phase `phase` learns.
    fn learning(&self, phase: usize) -> Learning {
        let _ = phase;
        Learning::Steps
    }

    /// One batch of a [`Learning::Fitted`] phase's pass (what [`Method::step_losses`] is to a
    /// phase of steps); `rng` as there.
    fn observe(&mut self, batch: &TrainBatch, rng: &mut Rng) -> Result<()> {
        let _ = (batch, rng);
        Err(Error::invalid(
            "training phase",
            format!("{} has no phase fitted without steps", self.name()),
        ))
    }

    /// The end of a [`Learning::Fitted`] phase's pass: fits the method from what
    /// [`Method::observe`] saw. Returns the values to log (as a step's logged losses).
    fn conclude(&mut self, fit: &FitContext, rng: &mut Rng) -> Result<Vec<(&'static str, f32)>> {
        let _ = (fit, rng);
        Err(Error::invalid(
            "training phase",
            format!("{} has no phase fitted without steps", self.name()),
        ))
    }

    /// The trainable parameters, their optimisers and buffers.
    fn train_state(&self) -> &TrainState;
    fn train_state_mut(&mut self) -> &mut TrainState;

    /// The weights changed (a step, a restore): drop whatever was built from them.
    fn weights_changed(&mut self) {}

    /// Training state beyond [`Method::train_state`] (NF-BMR's feature statistics).
    fn extra_state(&self) -> Result<HashMap<String, Tensor>> {
        Ok(HashMap::new())
    }

    fn restore_extra_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let _ = state;
        Ok(())
    }

    /// Everything a stopped training needs to resume exactly: parameters, buffers, optimiser
    /// moments and extra state. Copies, so later steps do not change them.
    fn training_state(&self) -> Result<HashMap<String, Tensor>> {
        let mut state = self.train_state().state()?;
        state.extend(self.extra_state()?);
        Ok(state)
    }

    /// Restores what [`Method::training_state`] returned.
    fn restore_training_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.train_state_mut().restore(state)?;
        self.restore_extra_state(state)?;
        self.weights_changed();
        Ok(())
    }

    /// Called once after training with the scores `infer` now gives the defect-free validation
    /// images, for methods whose score is scaled by them (OCR-GAN's min-max). Default: unscaled.
    fn fit_score_scale(&mut self, validation_scores: &[f32]) -> Result<()> {
        let _ = validation_scores;
        Ok(())
    }

    /// Anomaly maps and scores for `[B, C, H, W]` images in 0..=1 at the model's input size: on
    /// the fast CPU kernels where the method has them.
    fn infer(&self, images: &Tensor) -> Result<Inference>;

    /// [`Method::infer`] on candle's ops only (the reference the fast path is tested against, and
    /// the path on CUDA).
    fn infer_reference(&self, images: &Tensor) -> Result<Inference>;

    /// `infer`, with the wall time of each of its stages (for `vigil bench`). Stages are timed
    /// after a device synchronisation so CUDA times are real.
    fn infer_timed(&self, images: &Tensor) -> Result<(Inference, Vec<(&'static str, Duration)>)> {
        let start = Instant::now();
        let out = self.infer(images)?;
        images.device().synchronize()?;
        Ok((out, vec![("total", start.elapsed())]))
    }

    /// Every tensor the model file must hold to rebuild this detector, frozen ones included.
    fn tensors(&self) -> Result<HashMap<String, Tensor>>;

    /// The method's hyper-parameters as stored in the model file.
    fn config_json(&self) -> Result<serde_json::Value>;

    /// The pretrained backbone's blocks this method uses, if any (the weights' digest is added by
    /// the caller, which knows the file).
    fn backbone_blocks(&self) -> Option<(Vec<usize>, Option<usize>)> {
        None
    }

    /// The defect-free reference image the detector compares with, for methods that keep one
    /// (NDP-Net): the evaluation report shows it.
    fn reference_image(&self) -> Option<Image> {
        None
    }
}

/// Runs `forward` with a lap callback that records each stage's wall time, after a device
/// synchronisation so CUDA times are real: [`Method::infer_timed`] for methods with stages.
pub(crate) fn time_stages(
    device: &Device,
    forward: impl FnOnce(&mut dyn FnMut(&'static str) -> Result<()>) -> Result<Inference>,
) -> Result<(Inference, Vec<(&'static str, Duration)>)> {
    let mut stages = Vec::with_capacity(4);
    let mut last = Instant::now();
    let out = forward(&mut |stage| {
        device.synchronize()?;
        let now = Instant::now();
        stages.push((stage, now - last));
        last = now;
        Ok(())
    })?;
    Ok((out, stages))
}

/// How one step's gradients reach the parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    /// The optimiser steps on them at once.
    Step,
    /// They are added to the pending sum; [`TrainState::step_accumulated`] steps later.
    Accumulate,
}

/// One optimisation step: the method's losses, each objective backpropagated into its parameter
/// group (in order), then the values it logs.
pub fn step(
    method: &mut dyn Method,
    batch: &TrainBatch,
    rng: &mut Rng,
) -> Result<Vec<(&'static str, f32)>> {
    step_with(method, batch, rng, Apply::Step)
}

/// [`step`], with the gradients applied as `apply` says.
pub fn step_with(
    method: &mut dyn Method,
    batch: &TrainBatch,
    rng: &mut Rng,
    apply: Apply,
) -> Result<Vec<(&'static str, f32)>> {
    let losses = method.step_losses(batch, rng)?;
    for (group, loss) in &losses.objectives {
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::invalid(
                "training",
                format!(
                    "{} diverged in epoch {} of phase {}: the loss of `{group}` is {value}; \
                     lower the learning rate",
                    method.name(),
                    batch.epoch + 1,
                    batch.phase + 1
                ),
            ));
        }
    }
    let logged = losses
        .logged
        .iter()
        .map(|(name, t)| Ok((*name, t.to_scalar::<f32>()?)))
        .collect::<Result<Vec<_>>>()?;
    for (group, loss) in losses.objectives {
        let grads = loss.backward()?;
        match apply {
            Apply::Step => method.train_state_mut().step(group, &grads)?,
            Apply::Accumulate => method.train_state_mut().accumulate(group, &grads)?,
        }
    }
    if apply == Apply::Step {
        method.weights_changed();
    }
    Ok(logged)
}

/// What building a detector needs besides its weights.
pub struct Setup<'a> {
    /// The method's hyper-parameters (missing keys keep their defaults).
    pub config: serde_json::Value,
    pub input: InputSpec,
    /// Seeds the parameter initialisation (the training loop seeds everything else from it).
    pub seed: u64,
    pub device: &'a Device,
}

/// Tensors by name, as a model file holds them.
pub type Tensors = HashMap<String, Tensor>;

/// One registered method: adding a method is one folder and one line in [`REGISTRY`].
pub struct MethodEntry {
    /// As `--method` and the model file spell it.
    pub name: &'static str,
    /// One line for `vigil methods`.
    pub summary: &'static str,
    /// Raised whenever a change makes the method's older model files load or score differently;
    /// a model file of another version is refused.
    pub version: u32,
    pub learns_from_defects: bool,
    pub uses_backbone: bool,
    /// The config type's defaults, as JSON.
    pub default_config: fn() -> Result<serde_json::Value>,
    /// A config small enough to train in seconds, with at least 2 epochs in all: the generic
    /// all-methods tests (tests/methods.rs) use it, so a new method cannot skip them.
    pub tiny_config: fn() -> serde_json::Value,
    /// A fresh, trainable detector; the path is the pretrained backbone weights file.
    pub create: fn(&Setup, &Path) -> Result<Box<dyn Method>>,
    /// The detector a model file's tensors hold (frozen backbone included).
    pub load: fn(&Setup, &Tensors) -> Result<Box<dyn Method>>,
}

/// Every method vigil implements.
pub const REGISTRY: &[MethodEntry] = &[
    nf_bmr::ENTRY,
    ocr_gan::ENTRY,
    fcdd::ENTRY,
    memory_bank::ENTRY,
    ndp_net::ENTRY,
];

/// The registered method `name`.
pub fn entry(name: &str) -> Result<&'static MethodEntry> {
    REGISTRY.iter().find(|m| m.name == name).ok_or_else(|| {
        let names: Vec<&str> = REGISTRY.iter().map(|m| m.name).collect();
        Error::invalid(
            "method",
            format!("`{name}` is not one of {}", names.join(", ")),
        )
    })
}

/// A fresh, trainable detector. `backbone` is the pretrained weights file for methods that use one.
pub fn create(name: &str, setup: &Setup, backbone: &Path) -> Result<Box<dyn Method>> {
    (entry(name)?.create)(setup, backbone)
}

/// Rebuilds the detector stored in a model file.
pub fn from_model_file(
    meta: &ModelMeta,
    tensors: HashMap<String, Tensor>,
    path: &Path,
    device: &Device,
) -> Result<Box<dyn Method>> {
    let in_file = |reason: String| Error::ModelFile {
        path: path.into(),
        reason,
    };
    let entry = entry(&meta.method).map_err(|e| in_file(e.to_string()))?;
    if meta.method_version != entry.version {
        return Err(in_file(format!(
            "made by {} version {}; this vigil's {} is version {}: retrain the model",
            meta.method, meta.method_version, meta.method, entry.version
        )));
    }
    let setup = Setup {
        config: meta.config.clone(),
        input: meta.input,
        seed: meta.training.seed,
        device,
    };
    (entry.load)(&setup, &tensors).map_err(|e| in_file(e.to_string()))
}

/// Refuses defective training images for a method that cannot learn from them.
pub fn check_defects_allowed(
    method: &str,
    learns_from_defects: bool,
    defects: usize,
) -> Result<()> {
    if defects > 0 && !learns_from_defects {
        return Err(Error::invalid(
            "defective training images",
            format!("{method} learns from defect-free images only: drop --defect / --few-shot"),
        ));
    }
    Ok(())
}

/// Prefix of the pretrained backbone's tensors inside a model file.
pub(crate) const BACKBONE_PREFIX: &str = "backbone.";

/// The pretrained backbone's tensors up to `last_block` from its weights file, named as a model
/// file stores them (with [`BACKBONE_PREFIX`]).
pub(crate) fn pretrained_backbone(
    path: &Path,
    last_block: usize,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    Ok(crate::nn::backbone::load_tensors(path, last_block, device)?
        .into_iter()
        .map(|(k, v)| (format!("{BACKBONE_PREFIX}{k}"), v))
        .collect())
}

/// The backbone tensors of a model file's, with and without their prefix.
pub(crate) fn stored_backbone(
    tensors: &HashMap<String, Tensor>,
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let prefixed: HashMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| k.starts_with(BACKBONE_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bare = prefixed
        .iter()
        .map(|(k, v)| (k[BACKBONE_PREFIX.len()..].to_string(), v.clone()))
        .collect();
    (prefixed, bare)
}
