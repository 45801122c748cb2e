//! NF-BMR hyper-parameters. Defaults follow the paper (Zhang et al., CMC 2024) where it gives a
//! value; the values lost in its text extraction or tied to its EfficientNet-b5 are marked.
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::methods::config_check::{at_least, lite0_taps, positive_finite};

/// What maps between the source (backbone) and target (flow) domains; the paper's ablation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// The flow alone: the map is the per-position NLL `0.5‖z‖² − log-det`.
    None,
    /// B-PFM: five 1×1 convolutions in each direction.
    OneByOne,
    /// The bidirectional mapping residual network (the method).
    #[default]
    Bmr,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NfBmrConfig {
    /// Backbone blocks the extractor taps (EfficientNet-Lite0 blocks 0..=15). The paper taps one
    /// deep layer of EfficientNet-b5; block 4 (40 channels, stride 8) keeps small defects visible.
    pub taps: Vec<usize>,
    /// Affine coupling blocks (paper: 4).
    pub flow_blocks: usize,
    /// Hidden channels of each coupling's subnet (paper: 1024).
    pub flow_hidden: usize,
    /// Kernel of the coupling subnets' convolutions (not in the paper; 3 as in Real-NVP/CS-Flow).
    pub flow_kernel: usize,
    /// Soft clamp α of the coupling log-scales, `α·tanh(s/α)` (not in the paper; FrEIA's 2).
    pub flow_clamp: f32,
    pub mapping: Mapping,
    /// Residual blocks on each side of the shared middle block (paper: n = 2).
    pub bmr_blocks: usize,
    /// Channels inside the mapping nets (not in the paper).
    pub bmr_width: usize,
    /// Epochs of the flow phase and of the mapping phase (lost in the paper's text).
    pub flow_epochs: usize,
    pub map_epochs: usize,
    /// The least optimiser steps of each phase: a small product trains more epochs. The defaults
    /// are the steps KolektorSDD's 250 training images get from the CPU config (3 and 4 epochs
    /// of 32 batches); a product of 60 images trained 3 + 4 epochs (a quarter of them) scored
    /// image AUROC 0.85 where 20 + 30 epochs scored 0.99 (issue 16).
    pub flow_min_steps: usize,
    pub map_min_steps: usize,
    /// Adam learning rates (lost in the paper's text; 2e-4 as DifferNet/CS-Flow, 1e-3 for the
    /// mapping nets, which train on a plain MSE).
    pub flow_lr: f64,
    pub map_lr: f64,
    /// Gaussian smoothing of the anomaly map at input resolution, in pixels (0 = none).
    pub smoothing_sigma: f32,
    /// Feature cells at each border left out of the image score (the anomaly map keeps them).
    /// Not in the paper: zero padding in the backbone and the mapping nets makes border features
    /// the least predictable, and on both real sets the highest-scored defect-free parts peaked
    /// there (KolektorSDD image AUROC 0.74 → 0.90 with 2 cells; docs/RESULTS.md).
    pub score_margin: usize,
}

impl Default for NfBmrConfig {
    fn default() -> Self {
        NfBmrConfig {
            taps: vec![4],
            flow_blocks: 4,
            flow_hidden: 1024,
            flow_kernel: 3,
            flow_clamp: 2.0,
            mapping: Mapping::Bmr,
            bmr_blocks: 2,
            bmr_width: 256,
            flow_epochs: 100,
            map_epochs: 100,
            flow_min_steps: 96,
            map_min_steps: 128,
            flow_lr: 2e-4,
            map_lr: 1e-3,
            smoothing_sigma: 4.0,
            score_margin: 2,
        }
    }
}

impl NfBmrConfig {
    pub fn validate(&self) -> Result<()> {
        lite0_taps("taps", &self.taps)?;
        at_least("flow_blocks", self.flow_blocks, 1)?;
        at_least("flow_hidden", self.flow_hidden, 1)?;
        if self.flow_kernel.is_multiple_of(2) {
            return Err(Error::config(
                "flow_kernel",
                format!("{} must be odd (same padding)", self.flow_kernel),
            ));
        }
        positive_finite("flow_clamp", self.flow_clamp as f64)?;
        at_least("bmr_width", self.bmr_width, 1)?;
        at_least("flow_epochs", self.flow_epochs, 1)?;
        if self.mapping != Mapping::None {
            at_least("map_epochs", self.map_epochs, 1)?;
        }
        positive_finite("flow_lr", self.flow_lr)?;
        positive_finite("map_lr", self.map_lr)?;
        if !(self.smoothing_sigma.is_finite() && self.smoothing_sigma >= 0.0) {
            return Err(Error::config(
                "smoothing_sigma",
                format!("{} must be a finite number ≥ 0", self.smoothing_sigma),
            ));
        }
        Ok(())
    }
}
