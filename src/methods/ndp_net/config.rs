//! NDP-Net hyper-parameters. Defaults are the paper's (Luo, Yao, Yu: "Normal Reference Attention
//! and Defective Feature Perception Network for Surface Defect Detection") where it gives one;
//! where it is silent they follow DRAEM (Zavrtanik et al., ICCV 2021, its public code), the
//! method it builds its artificial defects on, and vigil's own choices are marked.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::anomaly::{AnomalyGenerator, PerlinBlendParams};
use crate::error::{Error, Result};
use crate::methods::config_check::{at_least, finite_in};

/// How the anomaly map is made from the input and its reconstruction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Segmentation {
    /// The paper's multi-scale defect segmentation module (MSDSM).
    #[default]
    Msdsm,
    /// The plain reconstruction difference `mean_c |I − Î|` (the paper's "pixel gap" ablation):
    /// no segmentation networks are built or trained.
    Difference,
}

/// Where the artificial defects' textures `I_n` come from when no `anomaly_source` folder is given
/// (the paper draws them from ImageNet, which vigil does not have).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Textures {
    /// Procedural textures: Perlin-mixed colours, stripes, checkerboards.
    Procedural,
    /// Another image of the batch (the part itself when alone), altered by DRAEM's augmentation.
    Training,
    /// Either, with equal chance.
    #[default]
    Both,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NdpNetConfig {
    /// Channels of the first encoder stage; the five stages have `width · (1, 2, 4, 8, 8)` (not in
    /// the paper: DRAEM's encoder, whose discriminative network starts at 64).
    pub width: usize,
    /// The RBFRM patch sizes K (paper: 2 and 4). The FFM fuses the input features with one
    /// repaired map per size.
    pub patch_sizes: Vec<usize>,
    /// The softmax over reference patches is `softmax(scale · cosine)` (paper, eq. 4: 1; the
    /// contextual attention it builds on uses 10).
    pub attention_scale: f64,
    /// FFM: the compression convolution's output channels (paper: 64) and the kernel size m of it
    /// and of the attention convolutions (paper: 5, larger than the largest K).
    pub ffm_channels: usize,
    pub ffm_kernel: usize,
    /// Ablation: without RBAM the decoder takes the encoder's features as they are.
    pub rbam: bool,
    pub segmentation: Segmentation,
    /// Phase 1 loss weights (paper: 100, 1, 1). `w_def = 0` is the ablation without the defect
    /// perception loss.
    pub w_rec: f64,
    pub w_per: f64,
    pub w_def: f64,
    /// Phase 2 loss weights (paper: 100, 1, 1, 1).
    pub w_rec2: f64,
    pub w_per2: f64,
    pub w_rep: f64,
    pub w_seg: f64,
    /// Focal loss γ of the segmentation loss (DRAEM: 2; the paper cites Lin et al.).
    pub focal_gamma: f64,
    /// The final map `λ1·AM1 + λ2·up(AM2) + λ3·up(AM3)` (paper: 0.2, 0.2, 0.6).
    pub map_weights: [f64; 3],
    /// Sizes of the mean and the median filter smoothing the final map (paper: 5 and 5; 1 = none).
    pub mean_filter: usize,
    pub median_filter: usize,
    /// Pixels at each border left out of the image score, the maximum of the map (vigil; the paper
    /// takes the whole map's maximum): zero padding makes the border the least reliable.
    pub score_margin: usize,
    /// Adam (paper: lr 1e-4, weight decay 1e-5; β are PyTorch's defaults).
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Epochs of the two phases (paper: 400 and 200).
    pub phase1_epochs: usize,
    pub phase2_epochs: usize,
    /// The least optimiser steps of each phase (a small product trains more epochs; not in the
    /// paper).
    pub phase1_min_steps: usize,
    pub phase2_min_steps: usize,
    /// The Perlin mask and the blend of the artificial defects (DRAEM's: noise of 2^0..2^5 cells
    /// thresholded at 0.5). The paper's eq. 1 pastes the texture at full opacity, so the default
    /// opacity is 1 (DRAEM draws it from 0.2..1).
    pub perlin: PerlinBlendParams,
    /// The chance that a phase-2 sample carries an artificial defect (DRAEM: 0.5; the others train
    /// the segmentation on defect-free parts). Phase 1 always synthesises one: its defect
    /// perception loss needs a pair.
    pub anomaly_probability: f64,
    /// Textures for the artificial defects when `anomaly_source` is not given.
    pub textures: Textures,
    /// A folder of images whose pictures are pasted as defects (`vigil train --anomaly-source`;
    /// e.g. the DTD texture set DRAEM uses), after DRAEM's augmentation.
    pub anomaly_source: Option<PathBuf>,
    /// The defect-free reference image (`vigil train --reference`); by default the training image
    /// whose pretrained features are closest to the mean of all. The chosen image is stored in the
    /// model file: the station never reads this path.
    pub reference: Option<PathBuf>,
}

impl Default for NdpNetConfig {
    fn default() -> Self {
        NdpNetConfig {
            width: 64,
            patch_sizes: vec![2, 4],
            attention_scale: 1.0,
            ffm_channels: 64,
            ffm_kernel: 5,
            rbam: true,
            segmentation: Segmentation::Msdsm,
            w_rec: 100.0,
            w_per: 1.0,
            w_def: 1.0,
            w_rec2: 100.0,
            w_per2: 1.0,
            w_rep: 1.0,
            w_seg: 1.0,
            focal_gamma: 2.0,
            map_weights: [0.2, 0.2, 0.6],
            mean_filter: 5,
            median_filter: 5,
            score_margin: 4,
            lr: 1e-4,
            weight_decay: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            phase1_epochs: 400,
            phase2_epochs: 200,
            phase1_min_steps: 0,
            phase2_min_steps: 0,
            perlin: PerlinBlendParams {
                opacity: [1.0, 1.0],
                ..Default::default()
            },
            anomaly_probability: 0.5,
            textures: Textures::Both,
            anomaly_source: None,
            reference: None,
        }
    }
}

/// Encoder stages; RBAM sits on the last three, MSDSM reads the first three.
pub const STAGES: usize = 5;
/// The encoder's output stride at its deepest stage (four 2×2 max-pools).
pub const DEEPEST_STRIDE: usize = 16;

impl NdpNetConfig {
    pub fn validate(&self) -> Result<()> {
        at_least("width", self.width, 1)?;
        if self.width > 512 {
            return Err(Error::config(
                "width",
                format!("{} is above 512", self.width),
            ));
        }
        if self.rbam {
            if self.patch_sizes.is_empty() {
                return Err(Error::config(
                    "patch_sizes",
                    "RBAM needs at least one patch size (or rbam = false)",
                ));
            }
            for &k in &self.patch_sizes {
                if k == 0 || k > 16 {
                    return Err(Error::config(
                        "patch_sizes",
                        format!("{k} is outside 1..=16"),
                    ));
                }
            }
            at_least("ffm_channels", self.ffm_channels, 1)?;
            if self.ffm_kernel.is_multiple_of(2) || self.ffm_kernel > 15 {
                return Err(Error::config(
                    "ffm_kernel",
                    format!("{} (must be odd and at most 15)", self.ffm_kernel),
                ));
            }
        }
        finite_in("attention_scale", self.attention_scale, 1e-3, 1e3)?;
        for (field, value) in [
            ("w_rec", self.w_rec),
            ("w_per", self.w_per),
            ("w_def", self.w_def),
            ("w_rec2", self.w_rec2),
            ("w_per2", self.w_per2),
            ("w_rep", self.w_rep),
            ("w_seg", self.w_seg),
            ("weight_decay", self.weight_decay),
        ] {
            finite_in(field, value, 0.0, 1e6)?;
        }
        if self.w_rec + self.w_per + self.w_def <= 0.0 {
            return Err(Error::config(
                "w_rec",
                "phase 1 needs a loss: w_rec, w_per and w_def are all 0",
            ));
        }
        finite_in("focal_gamma", self.focal_gamma, 0.0, 10.0)?;
        for (i, w) in self.map_weights.iter().enumerate() {
            finite_in(&format!("map_weights[{i}]"), *w, 0.0, 1e3)?;
        }
        if self.map_weights.iter().sum::<f64>() <= 0.0 {
            return Err(Error::config("map_weights", "all three are 0"));
        }
        for (field, size) in [
            ("mean_filter", self.mean_filter),
            ("median_filter", self.median_filter),
        ] {
            if size.is_multiple_of(2) || size > 31 {
                return Err(Error::config(
                    field,
                    format!("{size} (must be odd and at most 31; 1 = no filter)"),
                ));
            }
        }
        finite_in("lr", self.lr, 1e-12, 10.0)?;
        finite_in("beta1", self.beta1, 0.0, 0.999_999)?;
        finite_in("beta2", self.beta2, 0.0, 0.999_999)?;
        at_least("phase1_epochs", self.phase1_epochs, 1)?;
        at_least("phase2_epochs", self.phase2_epochs, 1)?;
        AnomalyGenerator::PerlinBlend(self.perlin.clone()).validate("perlin")?;
        if self.perlin.texture_dir.is_some() {
            return Err(Error::config(
                "perlin.texture_dir",
                "NDP-Net takes its texture folder as anomaly_source (--anomaly-source)",
            ));
        }
        finite_in("anomaly_probability", self.anomaly_probability, 0.0, 1.0)?;
        Ok(())
    }

    /// What the input sides must divide by: the four max-pools, and the largest patch at the
    /// deepest stage.
    pub fn size_factor(&self) -> usize {
        let largest = if self.rbam {
            self.patch_sizes.iter().copied().max().unwrap_or(1)
        } else {
            1
        };
        DEEPEST_STRIDE * largest
    }

    /// Channels of encoder stage `s` (0-based).
    pub fn stage_channels(&self, s: usize) -> usize {
        self.width * [1, 2, 4, 8, 8][s.min(STAGES - 1)]
    }
}
