//! OCR-GAN hyper-parameters. Defaults are the paper's (Liang et al., IEEE TIP 2023) where it gives
//! one; the rest follow its baseline Skip-GANomaly and are marked.
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::methods::config_check::{at_least, finite_in};

/// Which forgeries the discriminator learns to call positive beside the reconstructions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Forgeries {
    None,
    Cutout,
    Cutpaste,
    #[default]
    Both,
}

/// How the content term of the image score pools the reconstruction error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContentPooling {
    /// Mean |I − Î| over the image (the paper's L_con).
    #[default]
    Mean,
    /// Maximum of the smoothed heatmap: a small defect is not diluted by the image area.
    Max,
    /// Mean of the highest `top_fraction` of the smoothed heatmap: as undiluted as the maximum,
    /// but not decided by one noisy pixel.
    Top,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OcrGanConfig {
    /// Frequency bands N (paper: 2). 1 means no frequency decoupling: one generator on the image.
    pub bands: usize,
    /// Channel selection between the band encoders (paper: on; needs at least 2 bands).
    pub channel_selection: bool,
    /// Feature channels of each generator's first stage (paper: 64; its 4-channel variant scored
    /// best). Stage `s` has `width · min(2^s, 8)` channels, as in Skip-GANomaly's U-Net.
    pub width: usize,
    /// Encoder stages of each U-Net, each halving height and width (Skip-GANomaly goes down to
    /// 1×1: 8 stages at 256²). The input sides must divide by `2^levels`.
    pub levels: usize,
    /// First-stage channels of the DCGAN discriminator (Skip-GANomaly: 64).
    pub disc_width: usize,
    /// Discriminator stages, each halving the size; its last stage's features are the latent space.
    pub disc_levels: usize,
    /// Hidden size `d` of the channel-selection FC is `max(C / cs_reduction, cs_min_hidden)`
    /// (not in the paper; SKNet's r = 16, L = 32, which CS follows).
    pub cs_reduction: usize,
    pub cs_min_hidden: usize,
    pub forgeries: Forgeries,
    /// Loss weights (paper: 50, 1, 1).
    pub lambda_con: f64,
    pub lambda_adv: f64,
    pub lambda_lat: f64,
    /// Anomaly score `λ·L_con + (1 − λ)·L_lat` (paper: 0.9).
    pub score_lambda: f64,
    /// Pooling of L_con in the score (paper: mean).
    pub content_pooling: ContentPooling,
    /// Share of the heatmap's pixels that `content_pooling = "top"` averages (not in the paper).
    pub top_fraction: f64,
    /// Adam (paper: lr 0.002, β = (0.5, 0.999), weight decay 1e-4), for generators and discriminator.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    /// Training epochs (not in the paper; Skip-GANomaly trains 15).
    pub epochs: usize,
    /// Gaussian smoothing of the `|I − Î|` heatmap, in pixels.
    pub smoothing_sigma: f32,
    /// The least optimiser steps (a small product trains more epochs; not in the paper).
    pub min_steps: usize,
}

impl Default for OcrGanConfig {
    fn default() -> Self {
        OcrGanConfig {
            bands: 2,
            channel_selection: true,
            width: 64,
            levels: 8,
            disc_width: 64,
            disc_levels: 5,
            cs_reduction: 16,
            cs_min_hidden: 32,
            forgeries: Forgeries::Both,
            lambda_con: 50.0,
            lambda_adv: 1.0,
            lambda_lat: 1.0,
            score_lambda: 0.9,
            content_pooling: ContentPooling::Mean,
            top_fraction: 0.005,
            lr: 0.002,
            beta1: 0.5,
            beta2: 0.999,
            weight_decay: 1e-4,
            epochs: 15,
            smoothing_sigma: 4.0,
            min_steps: 0,
        }
    }
}

impl OcrGanConfig {
    pub fn validate(&self) -> Result<()> {
        at_least("bands", self.bands, 1)?;
        if self.bands > 6 {
            return Err(Error::config("bands", format!("{} is above 6", self.bands)));
        }
        if self.channel_selection && self.bands < 2 {
            return Err(Error::config(
                "channel_selection",
                "selects between bands: needs bands ≥ 2",
            ));
        }
        at_least("width", self.width, 1)?;
        at_least("levels", self.levels, 2)?;
        if self.levels > 9 {
            return Err(Error::config(
                "levels",
                format!("{} is above 9", self.levels),
            ));
        }
        at_least("disc_width", self.disc_width, 1)?;
        at_least("disc_levels", self.disc_levels, 1)?;
        at_least("cs_reduction", self.cs_reduction, 1)?;
        at_least("cs_min_hidden", self.cs_min_hidden, 1)?;
        at_least("epochs", self.epochs, 1)?;
        for (field, value) in [
            ("lambda_con", self.lambda_con),
            ("lambda_adv", self.lambda_adv),
            ("lambda_lat", self.lambda_lat),
            ("weight_decay", self.weight_decay),
        ] {
            finite_in(field, value, 0.0, 1e6)?;
        }
        finite_in("score_lambda", self.score_lambda, 0.0, 1.0)?;
        if !(self.top_fraction > 0.0 && self.top_fraction <= 1.0) {
            return Err(Error::config(
                "top_fraction",
                format!("{} is outside (0, 1]", self.top_fraction),
            ));
        }
        finite_in("lr", self.lr, 1e-12, 10.0)?;
        finite_in("beta1", self.beta1, 0.0, 0.999_999)?;
        finite_in("beta2", self.beta2, 0.0, 0.999_999)?;
        finite_in("smoothing_sigma", self.smoothing_sigma as f64, 0.0, 100.0)?;
        Ok(())
    }

    /// The factor the input sides must divide by: the U-Nets, the discriminator and the
    /// frequency pyramid all halve them.
    pub fn size_factor(&self) -> usize {
        1 << self.levels.max(self.disc_levels).max(self.bands - 1)
    }
}
