//! The detection methods. Each lives in its own folder (model, loss, anomaly map) and implements
//! [`Method`], which is all the training loop, the evaluator, the model file and the station use.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::data::InputSpec;
use crate::error::{Error, Result};
use crate::model_file::ModelMeta;
use crate::nn::backbone::Lite0Features;
use crate::rng::Rng;

pub mod anomaly_map;
mod fast_snapshot;
pub mod fcdd;
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

/// One stage of a method's training, trained in order (NF-BMR: the flow, then the mapping nets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseSpec {
    pub name: &'static str,
    pub epochs: usize,
    /// Keep the epoch that best separates synthetic anomalies of the validation images from the
    /// validation images themselves, instead of the last one (for training that oscillates, such
    /// as a GAN's). Uses no test image.
    pub select_best: bool,
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
    /// `rng` (seeded per epoch by the training loop, so a resumed training draws the same) is for
    /// the step's own randomness, such as synthetic anomalies.
    fn train_step(&mut self, phase: usize, encoded: &Tensor, rng: &mut Rng) -> Result<StepLosses>;

    /// Everything a stopped training needs to resume exactly: parameters, running statistics,
    /// optimiser moments. Copies, so later steps do not change them.
    fn training_state(&self) -> Result<HashMap<String, Tensor>> {
        Err(Error::invalid(
            "checkpoint",
            format!("{} cannot save its training state yet", self.name()),
        ))
    }

    /// Restores what [`Method::training_state`] returned.
    fn restore_training_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let _ = state;
        Err(Error::invalid(
            "checkpoint",
            format!("{} cannot restore a training state yet", self.name()),
        ))
    }

    /// Called once after training with the scores `infer` now gives the defect-free validation
    /// images, for methods whose score is scaled by them (OCR-GAN's min-max). Default: unscaled.
    fn fit_score_scale(&mut self, validation_scores: &[f32]) -> Result<()> {
        let _ = validation_scores;
        Ok(())
    }

    /// Anomaly maps and scores for `[B, C, H, W]` images in 0..=1 at the model's input size.
    fn infer(&self, images: &Tensor) -> Result<Inference>;

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
    fn config_json(&self) -> serde_json::Value;
}

/// Names `--method` accepts.
pub const METHODS: &[&str] = &["nf-bmr", "ocr-gan"];

/// Prefix of the frozen backbone's tensors inside a model file.
const BACKBONE_PREFIX: &str = "backbone.";

fn parse_config<T: serde::de::DeserializeOwned>(
    method: &str,
    config: serde_json::Value,
) -> Result<T> {
    serde_json::from_value(config)
        .map_err(|e| Error::config(format!("{method} config"), e.to_string()))
}

/// A fresh, trainable detector. `backbone` is the pretrained weights file for methods that use one.
pub fn create(
    name: &str,
    config: serde_json::Value,
    input: InputSpec,
    backbone: &Path,
    device: &Device,
) -> Result<Box<dyn Method>> {
    match name {
        "nf-bmr" => {
            let cfg: nf_bmr::NfBmrConfig = parse_config(name, config)?;
            cfg.validate()?;
            let last = cfg.taps.iter().copied().max().unwrap_or(0);
            let weights = crate::nn::backbone::load_tensors(backbone, last, device)?;
            let extractor = Lite0Features::new(&weights, cfg.taps.clone(), device)?;
            let frozen = weights
                .into_iter()
                .map(|(k, v)| (format!("{BACKBONE_PREFIX}{k}"), v))
                .collect();
            Ok(Box::new(nf_bmr::NfBmr::new(
                cfg,
                input,
                Box::new(extractor),
                frozen,
                device,
            )?))
        }
        "ocr-gan" => {
            let cfg: ocr_gan::OcrGanConfig = parse_config(name, config)?;
            Ok(Box::new(ocr_gan::OcrGan::new(cfg, input, None, device)?))
        }
        other => Err(unknown_method(other)),
    }
}

/// Rebuilds the detector stored in a model file.
pub fn from_model_file(
    meta: &ModelMeta,
    tensors: HashMap<String, Tensor>,
    path: &Path,
    device: &Device,
) -> Result<Box<dyn Method>> {
    let in_file = |e: Error| Error::ModelFile {
        path: path.into(),
        reason: e.to_string(),
    };
    match meta.method.as_str() {
        "nf-bmr" => {
            let cfg: nf_bmr::NfBmrConfig =
                parse_config("nf-bmr", meta.config.clone()).map_err(in_file)?;
            cfg.validate().map_err(in_file)?;
            let frozen: HashMap<String, Tensor> = tensors
                .iter()
                .filter(|(k, _)| k.starts_with(BACKBONE_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let unprefixed: HashMap<String, Tensor> = frozen
                .iter()
                .map(|(k, v)| (k[BACKBONE_PREFIX.len()..].to_string(), v.clone()))
                .collect();
            let extractor =
                Lite0Features::new(&unprefixed, cfg.taps.clone(), device).map_err(in_file)?;
            let method = nf_bmr::NfBmr::from_tensors(
                cfg,
                meta.input,
                Box::new(extractor),
                frozen,
                &tensors,
                device,
            )
            .map_err(in_file)?;
            Ok(Box::new(method))
        }
        "ocr-gan" => {
            let cfg: ocr_gan::OcrGanConfig =
                parse_config("ocr-gan", meta.config.clone()).map_err(in_file)?;
            let method =
                ocr_gan::OcrGan::new(cfg, meta.input, Some(&tensors), device).map_err(in_file)?;
            Ok(Box::new(method))
        }
        other => Err(Error::ModelFile {
            path: path.into(),
            reason: unknown_method(other).to_string(),
        }),
    }
}

fn unknown_method(name: &str) -> Error {
    Error::invalid(
        "method",
        format!("`{name}` is not one of {}", METHODS.join(", ")),
    )
}
