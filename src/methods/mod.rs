//! The detection methods. Each lives in its own folder (model, loss, anomaly map) and implements
//! [`Method`], which is all the training loop, the evaluator, the model file and the station use.
use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::Result;

pub mod nf_bmr;

/// What a detector says about a batch of images.
#[derive(Debug)]
pub struct Inference {
    /// `[B, H, W]` anomaly maps at the model's input size; higher = more anomalous.
    pub maps: Tensor,
    /// `[B]` image anomaly scores.
    pub scores: Tensor,
}

/// One stage of a method's training, trained in order (NF-BMR: the flow, then the mapping nets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseSpec {
    pub name: &'static str,
    pub epochs: usize,
}

/// Losses of one training step, by name, for progress bars and logs.
pub type StepLosses = Vec<(&'static str, f32)>;

/// A trainable detector.
pub trait Method: Send {
    /// The method's name as the CLI and the model file spell it.
    fn name(&self) -> &'static str;

    /// The frozen, deterministic front of the network (a pretrained backbone, or the identity).
    /// The training loop computes it once per unaltered training image and caches it, so
    /// `train_step` receives its output.
    fn encode_frozen(&self, images: &Tensor) -> Result<Tensor>;

    fn phases(&self) -> Vec<PhaseSpec>;

    /// One optimisation step of phase `phase` (an index into `phases()`) on encoded inputs.
    fn train_step(&mut self, phase: usize, encoded: &Tensor) -> Result<StepLosses>;

    /// Anomaly maps and scores for `[B, C, H, W]` images in 0..=1 at the model's input size.
    fn infer(&self, images: &Tensor) -> Result<Inference>;

    /// Every tensor the model file must hold to rebuild this detector, frozen ones included.
    fn tensors(&self) -> Result<HashMap<String, Tensor>>;

    /// The method's hyper-parameters as stored in the model file.
    fn config_json(&self) -> serde_json::Value;
}
