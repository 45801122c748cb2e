//! OCR-GAN hyper-parameters. Defaults are the paper's (Liang et al., IEEE TIP 2023) where it gives
//! one; the rest follow its baseline Skip-GANomaly and are marked. Where the authors' released code
//! (zhangzjn/OCR-GAN) departs from the paper, a key switches to the code's choice
//! (`configs/ocr-gan-authors.toml` sets them all).
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};
use crate::methods::config_check::{at_least, finite_in};

/// Which forgeries the discriminator learns to call positive beside the reconstructions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Forgeries {
    None,
    Cutout,
    Cutpaste,
    /// One cutout image and one CutPaste image per training image.
    #[default]
    Both,
    /// The authors' code: one image per training image carrying a CutPaste patch and then a
    /// single black `cutout_px`-sided square (its `Cutout(1, 20)` after `CutPaste()`).
    Combined,
}

impl Forgeries {
    /// The kinds of synthetic anomaly (as the training loop's yardstick names them) the
    /// discriminator learns to call positive.
    pub fn kinds(self) -> Vec<&'static str> {
        match self {
            Forgeries::None => vec![],
            Forgeries::Cutout => vec!["cutout"],
            Forgeries::Cutpaste => vec!["cut-paste"],
            Forgeries::Both | Forgeries::Combined => vec!["cutout", "cut-paste"],
        }
    }
}

/// How the band encoders are mixed after every encoder stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelSelectionMode {
    /// The paper's channel selection (eqs. 4–8), trained with the generators.
    #[default]
    Learned,
    /// Every band's features scaled by 1/N: CS's attention fixed at its uniform value. (The
    /// released code builds its CS modules inside `forward()`, so their weights are drawn afresh
    /// at every call and never trained; 1/N is that attention's expectation, without the noise.)
    Uniform,
    /// No mixing: N independent U-Nets.
    Off,
}

impl<'de> Deserialize<'de> for ChannelSelectionMode {
    /// `"learned"`, `"uniform"` or `"off"`; `true` and `false` (configs and model files written
    /// before the modes existed) mean learned and off.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Flag(bool),
            Name(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Flag(true) => Ok(Self::Learned),
            Written::Flag(false) => Ok(Self::Off),
            Written::Name(name) => match name.as_str() {
                "learned" => Ok(Self::Learned),
                "uniform" => Ok(Self::Uniform),
                "off" => Ok(Self::Off),
                other => Err(serde::de::Error::custom(format!(
                    "`{other}` is not one of learned, uniform, off (or true, false)"
                ))),
            },
        }
    }
}

/// How the discriminator's BatchNorm layers normalise during training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiscriminatorNorm {
    /// Each forward pass (real, reconstructed, forged images) by its own batch's statistics, as
    /// Skip-GANomaly's training mode does.
    #[default]
    PerBatch,
    /// The authors' code: running statistics from the second epoch on (its test after the first
    /// epoch puts the discriminator in eval mode and only the generator is put back into training
    /// mode), so they stay as the first epoch left them.
    Frozen,
    /// Real, reconstructed and forged images in one batch: every image normalised with the same
    /// statistics, which the running ones then average.
    Joint,
}

/// How the frequency bands are computed and coded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BandCoding {
    /// The paper's Laplacian split in floating point on the image in −1..1: the bands sum to the
    /// image, which is what the generators reconstruct and the discriminator sees.
    #[default]
    Exact,
    /// The authors' code: OpenCV's `pyrDown`/`pyrUp` on 8-bit images (rounded at each step), the
    /// high band by saturating subtraction (negative detail is lost), each band mapped to −1..1
    /// on its own; the "real" image is the sum of the coded bands (in −2..0 for two bands), while
    /// forgeries stay plain images in −1..1.
    Opencv,
}

/// How the content term of the image score pools the reconstruction error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContentPooling {
    /// Mean |I − Î| over the image (the paper's L_con).
    #[default]
    Mean,
    /// Mean (I − Î)² over the image (the authors' code).
    Mse,
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
    /// Channel selection between the band encoders (paper: learned; needs at least 2 bands
    /// unless off).
    pub channel_selection: ChannelSelectionMode,
    /// How the bands are computed and coded (paper: exact).
    pub band_coding: BandCoding,
    /// Feature channels of each generator's first stage (paper: 64; its 4-channel variant scored
    /// best). Stage `s` has `width · min(2^s, 8)` channels, as in Skip-GANomaly's U-Net.
    pub width: usize,
    /// Encoder stages of each U-Net, each halving height and width (Skip-GANomaly goes down to
    /// 1×1: 8 stages at 256²). The input sides must divide by `2^levels`.
    pub levels: usize,
    /// First-stage channels of the DCGAN discriminator (Skip-GANomaly: 64).
    pub disc_width: usize,
    /// Discriminator stages, each halving the size; its last stage's features are the latent space
    /// unless `latent_dim` is set.
    pub disc_levels: usize,
    /// Stage `s` of the discriminator has `disc_width · min(2^s, 8)` channels (DCGAN, pix2pix);
    /// `false`: `disc_width · 2^s`, the authors' code (2048 channels at its 4×4 stage).
    pub disc_width_capped: bool,
    /// 0: the latent space is the last stage's feature maps (the paper's "last convolutional
    /// layer"). Otherwise a valid convolution over the whole last map (the code's 4×4 at 256²)
    /// projects them to this many values, the latent space, which the classifier judges (the
    /// code: 100).
    pub latent_dim: usize,
    /// The discriminator also minimises `λ_lat·L_lat` (the authors' code adds the generator's
    /// latent loss to the discriminator's).
    pub disc_latent_loss: bool,
    pub disc_norm: DiscriminatorNorm,
    /// Hidden size `d` of the channel-selection FC is `max(C / cs_reduction, cs_min_hidden)`
    /// (not in the paper; SKNet's r = 16, L = 32, which CS follows).
    pub cs_reduction: usize,
    pub cs_min_hidden: usize,
    pub forgeries: Forgeries,
    /// Side in pixels of `forgeries = "combined"`'s black square (the code: 20, at 256²).
    pub cutout_px: usize,
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
    /// Adam (paper: lr 0.002, β = (0.5, 0.999), weight decay 1e-4), for generators and
    /// discriminator. The authors' code: lr 2e-4, no weight decay.
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
            channel_selection: ChannelSelectionMode::Learned,
            band_coding: BandCoding::Exact,
            width: 64,
            levels: 8,
            disc_width: 64,
            disc_levels: 5,
            disc_width_capped: true,
            latent_dim: 0,
            disc_latent_loss: false,
            disc_norm: DiscriminatorNorm::PerBatch,
            cs_reduction: 16,
            cs_min_hidden: 32,
            forgeries: Forgeries::Both,
            cutout_px: 20,
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
        if self.channel_selection != ChannelSelectionMode::Off && self.bands < 2 {
            return Err(Error::config(
                "channel_selection",
                "selects between bands: needs bands ≥ 2 (or \"off\")",
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
        if !self.disc_width_capped && self.disc_levels > 12 {
            return Err(Error::config(
                "disc_levels",
                format!(
                    "{} uncapped stages would double the width past 2^11",
                    self.disc_levels
                ),
            ));
        }
        if self.latent_dim > 4096 {
            return Err(Error::config(
                "latent_dim",
                format!("{} is above 4096", self.latent_dim),
            ));
        }
        at_least("cutout_px", self.cutout_px, 1)?;
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
