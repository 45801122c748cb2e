//! FCDD hyper-parameters. Defaults are the HSC paper's (its MVTec-AD setting on FCDD's public
//! code) where it gives one; the backbone is EfficientNet-Lite0 instead of VGG-11 (no VGG weights
//! exist here), and vigil's own choices are marked.
use serde::{Deserialize, Serialize};

use super::loss::PixelLoss;
use super::net::CUT_BLOCK;
use crate::data::anomaly::{AnomalyGenerator, ConfettiParams};
use crate::error::{Error, Result};
use crate::methods::config_check::{at_least, finite_in};

/// How the station's image score pools the anomaly map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScorePooling {
    /// The map's maximum inside the border margin (vigil: a small defect is not diluted).
    #[default]
    Max,
    /// The map's mean (FCDD's image-level score).
    Mean,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FcddConfig {
    /// The first block fine-tuned; the stem and the blocks before stay frozen. 3 starts the
    /// stride-8 stage, as the paper freezes VGG-11 up to its third max-pool. The network is cut
    /// after block 4 ([`super::net::CUT_BLOCK`]: the end of that stage, 40 channels), as the paper
    /// cuts VGG-11 before its fourth max-pool.
    pub trainable_from: usize,
    /// `hsc`: the paper's eq. 5; `fcdd`: FCDD's eq. 4 (the baseline).
    pub loss: PixelLoss,
    /// FCDD epochs (paper: 50), each `passes_per_epoch` passes over the training images (10).
    pub epochs: usize,
    pub passes_per_epoch: usize,
    /// The least optimiser steps (a small product trains more passes; not in the paper).
    pub min_steps: usize,
    /// Images per optimiser step (paper: 128); gradients of smaller batches are accumulated.
    pub batch: usize,
    /// SGD (paper: lr 1e-3, Nesterov momentum 0.9, weight decay 1e-4); the learning rate falls by
    /// `lr_decay` (1.5%) per FCDD epoch.
    pub lr: f64,
    pub lr_decay: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Chance that a training image is replaced by an anomalous one (paper: 0.5).
    pub anomaly_probability: f64,
    /// The synthetic anomalies of the unsupervised setting: FCDD's confetti noise.
    pub confetti: ConfettiParams,
    /// σ of the Gaussian upsampling kernel at a shorter input side of 224 px (FCDD: 12 for
    /// MVTec-AD); scaled with the shorter side.
    pub sigma: f64,
    pub score: ScorePooling,
    /// Feature cells at each border left out of the maximum score (vigil; the map keeps them):
    /// zero padding makes border cells the least reliable, as NF-BMR's runs showed.
    pub score_margin: usize,
}

impl Default for FcddConfig {
    fn default() -> Self {
        FcddConfig {
            trainable_from: super::net::DEFAULT_FIRST_TRAINABLE,
            loss: PixelLoss::Hsc,
            epochs: 50,
            passes_per_epoch: 10,
            min_steps: 0,
            batch: 128,
            lr: 1e-3,
            lr_decay: 0.015,
            momentum: 0.9,
            weight_decay: 1e-4,
            anomaly_probability: 0.5,
            confetti: ConfettiParams::default(),
            sigma: 12.0,
            score: ScorePooling::Max,
            score_margin: 2,
        }
    }
}

impl FcddConfig {
    pub fn validate(&self) -> Result<()> {
        if self.trainable_from > CUT_BLOCK {
            return Err(Error::config(
                "trainable_from",
                format!(
                    "{} is past the cut after block {CUT_BLOCK}",
                    self.trainable_from
                ),
            ));
        }
        at_least("epochs", self.epochs, 1)?;
        at_least("passes_per_epoch", self.passes_per_epoch, 1)?;
        at_least("batch", self.batch, 1)?;
        finite_in("lr", self.lr, 1e-12, 10.0)?;
        finite_in("lr_decay", self.lr_decay, 0.0, 0.999)?;
        finite_in("momentum", self.momentum, 0.0, 0.999)?;
        finite_in("weight_decay", self.weight_decay, 0.0, 1.0)?;
        finite_in("anomaly_probability", self.anomaly_probability, 0.0, 1.0)?;
        finite_in("sigma", self.sigma, 0.1, 1000.0)?;
        AnomalyGenerator::Confetti(self.confetti.clone()).validate("confetti")
    }

    /// The learning rate in pass `pass` (0-based): decayed once per FCDD epoch.
    pub fn learning_rate(&self, pass: usize) -> f64 {
        self.lr * (1.0 - self.lr_decay).powi((pass / self.passes_per_epoch) as i32)
    }
}
