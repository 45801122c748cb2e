//! NDP-Net (Luo, Yao, Yu: "Normal Reference Attention and Defective Feature Perception Network for
//! Surface Defect Detection"): an encoder trained to perceive artificial defects pixel by pixel, a
//! reference-based attention module (RBAM) that repairs the features of the three deepest encoder
//! stages from those of a fixed defect-free reference image, a decoder that reconstructs the
//! defect-free background from them, and a multi-scale defect segmentation module (MSDSM) that
//! compares the input's and the reconstruction's features. Trained from scratch in two phases:
//!
//! 1. `reconstruct` — encoder and decoder on pairs `(I_o, I_ad)`, `I_ad = I_o·(1 − M) + I_n·M`
//!    with DRAEM's Perlin masks `M`: `w_rec·MSE(I_o, Î_o) + w_per·perceptual + w_def·L_def`.
//! 2. `repair` — the encoder frozen (weights and BatchNorm statistics), RBAM's fusion convolutions,
//!    the decoder and MSDSM on `I_ad` (defect-free with probability 1 − `anomaly_probability`):
//!    `w_rec2·MSE(I_o, Î_ad) + w_per2·perceptual + w_rep·L_rep + w_seg·focal`.
//!
//! Inference is phase 2's forward pass; the map is `0.2·AM1 + 0.2·up(AM2) + 0.6·up(AM3)`, mean and
//! median filtered ([`map`]); the score its maximum inside the border margin.
//!
//! No public code of NDP-Net exists. Where the paper is unclear vigil follows DRAEM (Zavrtanik et
//! al., ICCV 2021, its public code), and says so where it does:
//! - the networks' layers (DRAEM's conv-BN-ReLU pairs, max-pools, upsampling then conv; [`model`]);
//!   the decoder's skip connections carry the repaired features of stages 3 and 4 only, so no
//!   unrepaired detail bypasses RBAM; each DSM is two conv-BN-ReLU and a 1×1 logit;
//! - the artificial defects: DRAEM's Perlin masks and augmentation of the texture source;
//!   textures are procedural, other training images, or a folder (`--anomaly-source`) instead of
//!   ImageNet; opacity 1 as the paper's eq. 1;
//! - half of phase 2's samples stay defect-free (DRAEM), the focal loss is DRAEM's (γ = 2) on one
//!   sigmoid logit, masks are area-resized to each scale;
//! - the perceptual loss compares the frozen ImageNet Lite0's first five blocks (no VGG-16 here);
//! - the reference is by default the training image whose pooled Lite0 statistics (per-channel
//!   mean and standard deviation after block 4) are closest to the mean of all; `--reference`
//!   names another. It is stored in the model file.
pub mod config;
mod fast;
pub mod loss;
pub mod map;
pub mod model;
pub mod rbam;

pub use config::{NdpNetConfig, Segmentation, Textures};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use self::config::STAGES;
use self::fast::{FastNdpNet, FastRbam, FastReference};
use self::map::{MapParams, Plane};
use self::model::{Decoder, Dsm, Encoder, Ffm};
use self::rbam::ReferencePatches;
use super::config_check;
use super::fast_snapshot::FastSnapshot;
use crate::data::anomaly::{draem_augment, load_texture, perlin_blend_texture, procedural_texture};
use crate::data::dataset::list_images;
use crate::data::image::load_image;
use crate::data::{batch_tensor, Image, InputSpec, Mask};
use crate::error::{Error, Result};
use crate::methods::{
    Inference, Method, MethodEntry, PhaseInput, PhaseSpec, Selection, Setup, StepLosses,
    TrainBatch, TrainSet,
};
use crate::nn::backbone::{load_tensors, EfficientNetLite0};
use crate::nn::init::{detached, seeded_var_builder};
use crate::nn::kernels::maps::Maps;
use crate::nn::kernels::Kernels;
use crate::nn::norm::Builders;
use crate::nn::optim::{Adam, AdamParams};
use crate::nn::train_state::TrainState;
use crate::rng::Rng;

/// Raised whenever older NDP-Net model files would load or score differently.
pub const VERSION: u32 = 1;

pub const ENTRY: MethodEntry = MethodEntry {
    name: "ndp-net",
    summary: "encoder with pixel-level defect perception, reference-based attention repair, \
              decoder, multi-scale segmentation head; two phases on Perlin-masked artificial defects",
    version: VERSION,
    learns_from_defects: false,
    // Lite0 serves the training only (perceptual loss, choice of the reference): the model file
    // holds none of it.
    uses_backbone: false,
    default_config: || config_check::to_json("ndp-net", &NdpNetConfig::default()),
    tiny_config: || {
        serde_json::json!({
            "width": 2, "patch_sizes": [1, 2], "ffm_channels": 4, "ffm_kernel": 3,
            "phase1_epochs": 1, "phase2_epochs": 1, "anomaly_probability": 0.75
        })
    },
    create: |setup: &Setup, backbone: &Path| {
        let cfg = parse(setup)?;
        Ok(Box::new(NdpNet::new(cfg, setup, Some(backbone), None)?))
    },
    load: |setup: &Setup, tensors: &HashMap<String, Tensor>| {
        let cfg = parse(setup)?;
        Ok(Box::new(NdpNet::new(cfg, setup, None, Some(tensors))?))
    },
};

fn parse(setup: &Setup) -> Result<NdpNetConfig> {
    let cfg: NdpNetConfig = config_check::parse("ndp-net", setup.config.clone())?;
    cfg.validate()?;
    Ok(cfg)
}

/// Phase 1 steps the encoder and the decoder; phase 2 the decoder, RBAM's FFMs and MSDSM. The
/// decoder's variables belong to both groups (each phase has its own Adam moments for them).
pub const PHASE1_GROUP: &str = "phase1";
pub const PHASE2_GROUP: &str = "phase2";
/// The reference image `[C, H, W]` in the model file and the training state.
const REFERENCE: &str = "reference.image";

/// The networks on one set of tensors (the variables, or detached views of them).
struct Nets {
    encoder: Encoder,
    /// RBAM's fusion modules of stages 3, 4, 5; empty without RBAM.
    ffm: Vec<Ffm>,
    decoder: Decoder,
    /// DSM1..3; empty when the map is the reconstruction difference.
    dsm: Vec<Dsm>,
}

impl Nets {
    fn new(
        [enc, dec, head]: [VarBuilder; 3],
        buffers: VarBuilder,
        cfg: &NdpNetConfig,
        channels: usize,
    ) -> Result<Self> {
        fn b<'a>(params: &VarBuilder<'a>, buffers: &VarBuilder<'a>, name: &str) -> Builders<'a> {
            Builders {
                params: params.pp(name),
                buffers: buffers.pp(name),
            }
        }
        let ffm = if cfg.rbam {
            (2..STAGES)
                .map(|s| {
                    Ffm::new(
                        &b(&head, &buffers, &format!("ffm{s}")),
                        cfg,
                        cfg.stage_channels(s),
                    )
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let dsm = match cfg.segmentation {
            Segmentation::Msdsm => (0..3)
                .map(|s| {
                    Dsm::new(
                        &b(&head, &buffers, &format!("dsm{s}")),
                        cfg.stage_channels(s),
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            Segmentation::Difference => Vec::new(),
        };
        Ok(Nets {
            encoder: Encoder::new(&b(&enc, &buffers, "encoder"), cfg, channels)?,
            ffm,
            decoder: Decoder::new(&b(&dec, &buffers, "decoder"), cfg, channels)?,
            dsm,
        })
    }

    /// RBAM on the deep features (stages 3, 4, 5), or the features as they are without it.
    fn repair(
        &self,
        features: &[Tensor],
        reference: &[Vec<ReferencePatches>],
        scale: f64,
        train: bool,
    ) -> Result<Vec<Tensor>> {
        if self.ffm.is_empty() {
            return Ok(features[2..].to_vec());
        }
        features[2..]
            .iter()
            .zip(&self.ffm)
            .zip(reference)
            .map(|((f, ffm), patches)| {
                let repaired = patches
                    .iter()
                    .map(|p| p.repair(f, scale))
                    .collect::<Result<Vec<_>>>()?;
                ffm.forward(f, &repaired, train)
            })
            .collect()
    }
}

/// What stays fixed while the encoder does (all of phase 2, and inference): the reference's
/// patches per RBAM stage and patch size, and the encoder on the fast kernels (CPU).
struct Frozen {
    reference: Vec<Vec<ReferencePatches>>,
    encoder: Option<fast::FastEncoder>,
}

/// Training-only parts of a fresh detector: the frozen pretrained Lite0 (perceptual loss, the
/// reference's choice) and the listed anomaly source.
struct Trainer {
    lite0: EfficientNetLite0,
    textures: Vec<PathBuf>,
}

pub struct NdpNet {
    cfg: NdpNetConfig,
    input: InputSpec,
    state: TrainState,
    train: Nets,
    /// The same storage through detached views: no backward graph into the weights.
    eval: Nets,
    /// `None` for a detector loaded from a model file (it infers only).
    trainer: Option<Trainer>,
    reference: Option<Image>,
    frozen: FastSnapshot<Frozen>,
    fast: FastSnapshot<FastNdpNet>,
    /// Set by a phase-1 step or a restore: the next `weights_changed` drops `frozen` too.
    encoder_moved: bool,
    device: Device,
}

impl NdpNet {
    /// `backbone`: the pretrained weights file (a fresh, trainable detector); `stored`: a model
    /// file's tensors.
    fn new(
        cfg: NdpNetConfig,
        setup: &Setup,
        backbone: Option<&Path>,
        stored: Option<&HashMap<String, Tensor>>,
    ) -> Result<Self> {
        let (input, device) = (setup.input, setup.device);
        let factor = cfg.size_factor();
        if !(input.height.is_multiple_of(factor) && input.width.is_multiple_of(factor)) {
            return Err(Error::invalid(
                "input size",
                format!(
                    "{}x{}: NDP-Net pools 4 times and cuts the deepest stage into patches of {}, \
                     so both sides must divide by {factor}; pass --height/--width",
                    input.height,
                    input.width,
                    factor / config::DEEPEST_STRIDE
                ),
            ));
        }
        let maps = [VarMap::new(), VarMap::new(), VarMap::new()];
        let buffers = VarMap::new();
        let seeded = |vars: &VarMap| seeded_var_builder(vars, setup.seed, DType::F32, device);
        let train = Nets::new(
            [seeded(&maps[0]), seeded(&maps[1]), seeded(&maps[2])],
            seeded(&buffers),
            &cfg,
            input.channels,
        )?;
        let union = |parts: &[&VarMap]| -> Result<VarMap> {
            let all = VarMap::new();
            {
                let mut data = all
                    .data()
                    .lock()
                    .map_err(|_| Error::invalid("variable map", "lock poisoned"))?;
                for part in parts {
                    let part = part
                        .data()
                        .lock()
                        .map_err(|_| Error::invalid("variable map", "lock poisoned"))?;
                    data.extend(part.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
            Ok(all)
        };
        let phase1 = union(&[&maps[0], &maps[1]])?;
        let phase2 = union(&[&maps[1], &maps[2]])?;
        let adam = AdamParams {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        };
        let state = TrainState::new()
            .with_group(PHASE1_GROUP, phase1.clone(), Adam::new(&phase1, adam)?)
            .with_group(PHASE2_GROUP, phase2.clone(), Adam::new(&phase2, adam)?)
            .with_buffers(buffers.clone());
        let mut reference = None;
        if let Some(stored) = stored {
            state.load(stored)?;
            reference = Some(stored_reference(stored, &input)?);
        }
        let view = |vars: &VarMap| -> Result<VarBuilder<'static>> {
            Ok(VarBuilder::from_tensors(
                detached(vars)?,
                DType::F32,
                device,
            ))
        };
        let eval = Nets::new(
            [view(&maps[0])?, view(&maps[1])?, view(&maps[2])?],
            view(&buffers)?,
            &cfg,
            input.channels,
        )?;
        let trainer = match backbone {
            Some(path) => {
                let vb = VarBuilder::from_tensors(
                    load_tensors(
                        path,
                        *loss::PERCEPTUAL_TAPS.iter().max().unwrap_or(&0),
                        device,
                    )?,
                    DType::F32,
                    device,
                );
                let textures = match &cfg.anomaly_source {
                    Some(dir) => {
                        let listed = list_images(dir)?;
                        if listed.is_empty() {
                            return Err(Error::invalid(
                                format!("anomaly source {}", dir.display()),
                                "holds no images",
                            ));
                        }
                        listed
                    }
                    None => Vec::new(),
                };
                Some(Trainer {
                    lite0: EfficientNetLite0::new(vb, loss::PERCEPTUAL_TAPS[4], false)?,
                    textures,
                })
            }
            None => None,
        };
        Ok(NdpNet {
            cfg,
            input,
            state,
            train,
            eval,
            trainer,
            reference,
            frozen: FastSnapshot::default(),
            fast: FastSnapshot::default(),
            encoder_moved: false,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &NdpNetConfig {
        &self.cfg
    }

    fn trainer(&self) -> Result<&Trainer> {
        self.trainer.as_ref().ok_or_else(|| {
            Error::invalid(
                "NDP-Net training",
                "a detector loaded from a model file infers only: train a fresh one",
            )
        })
    }

    fn reference_or_err(&self) -> Result<&Image> {
        self.reference.as_ref().ok_or_else(|| {
            Error::invalid(
                "NDP-Net reference",
                "no reference image: RBAM needs one (chosen when training starts)",
            )
        })
    }

    /// Sets the reference image (what training chose, or a test's own).
    pub fn set_reference(&mut self, image: Image) -> Result<()> {
        if (image.channels, image.height, image.width)
            != (self.input.channels, self.input.height, self.input.width)
        {
            return Err(Error::invalid(
                "NDP-Net reference",
                format!(
                    "{}x{}x{}, the model takes {}x{}x{}",
                    image.channels,
                    image.height,
                    image.width,
                    self.input.channels,
                    self.input.height,
                    self.input.width
                ),
            ));
        }
        self.reference = Some(image);
        self.frozen.drop_snapshot();
        self.fast.drop_snapshot();
        Ok(())
    }

    /// The training image whose pooled pretrained statistics (per-channel mean and standard
    /// deviation of Lite0's block-4 map) lie closest to the mean of all images': the index in
    /// `images`.
    pub fn medoid(&self, images: &[Image]) -> Result<usize> {
        let lite0 = &self.trainer()?.lite0;
        let mut stats: Vec<Vec<f32>> = Vec::with_capacity(images.len());
        for chunk in images.chunks(16) {
            let refs: Vec<&Image> = chunk.iter().collect();
            let x = batch_tensor(&refs, &self.device)?;
            let f = lite0
                .forward_taps(&x, &[loss::PERCEPTUAL_TAPS[4]])?
                .remove(0)
                .flatten_from(2)?;
            let mean = f.mean_keepdim(2)?;
            let std = f.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?.sqrt()?;
            stats.extend(Tensor::cat(&[mean, std], 1)?.squeeze(2)?.to_vec2::<f32>()?);
        }
        let n = stats.len().max(1) as f32;
        let dims = stats.first().map_or(0, Vec::len);
        let centre: Vec<f32> = (0..dims)
            .map(|d| stats.iter().map(|s| s[d]).sum::<f32>() / n)
            .collect();
        let distance =
            |s: &Vec<f32>| -> f32 { s.iter().zip(&centre).map(|(a, b)| (a - b) * (a - b)).sum() };
        stats
            .iter()
            .enumerate()
            .min_by(|a, b| distance(a.1).total_cmp(&distance(b.1)))
            .map(|(i, _)| i)
            .ok_or_else(|| Error::invalid("training images", "none to choose a reference from"))
    }

    fn frozen(&self) -> Result<Arc<Frozen>> {
        self.frozen.get_or_build(|| {
            let reference = if self.cfg.rbam {
                let image = self.reference_or_err()?;
                let x = batch_tensor(&[image], &self.device)?;
                let features = self.eval.encoder.forward(&x, false, STAGES)?;
                features[2..]
                    .iter()
                    .map(|f| {
                        self.cfg
                            .patch_sizes
                            .iter()
                            .map(|&k| ReferencePatches::new(f, k))
                            .collect::<Result<Vec<_>>>()
                    })
                    .collect::<Result<Vec<_>>>()?
            } else {
                Vec::new()
            };
            let encoder = if self.device.is_cpu() {
                Some(self.eval.encoder.fast()?)
            } else {
                None
            };
            Ok(Frozen { reference, encoder })
        })
    }

    /// The encoder's features of `x` with its running statistics and no graph: on the fast
    /// kernels where there are some.
    fn frozen_features(&self, frozen: &Frozen, x: &Tensor, upto: usize) -> Result<Vec<Tensor>> {
        match &frozen.encoder {
            Some(encoder) => encoder
                .forward(Kernels::detect(), Maps::from_nchw(x)?, upto)?
                .iter()
                .map(|m| m.to_nchw(&self.device))
                .collect(),
            None => Ok(self
                .eval
                .encoder
                .forward(x, false, upto)?
                .into_iter()
                .map(|t| t.detach())
                .collect()),
        }
    }

    /// The whole network on the fast CPU kernels, for the current weights.
    fn fast_net(&self) -> Result<Arc<FastNdpNet>> {
        self.fast.get_or_build(|| {
            let kernels = Kernels::detect();
            let encoder = self.eval.encoder.fast()?;
            let rbam = if self.cfg.rbam {
                let image = self.reference_or_err()?;
                let x = Maps::from_nchw(&batch_tensor(&[image], &self.device)?)?;
                let features = encoder.forward(kernels, x, STAGES)?;
                let stages = features[2..]
                    .iter()
                    .zip(&self.eval.ffm)
                    .map(|(f, ffm)| {
                        Ok(FastRbam {
                            ffm: ffm.fast()?,
                            references: self
                                .cfg
                                .patch_sizes
                                .iter()
                                .map(|&k| FastReference::new(f, k))
                                .collect::<Result<Vec<_>>>()?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(stages)
            } else {
                None
            };
            let dsm = match self.cfg.segmentation {
                Segmentation::Msdsm => Some(
                    self.eval
                        .dsm
                        .iter()
                        .map(Dsm::fast)
                        .collect::<Result<Vec<_>>>()?,
                ),
                Segmentation::Difference => None,
            };
            Ok(FastNdpNet {
                encoder,
                rbam,
                decoder: self.eval.decoder.fast()?,
                dsm,
                attention_scale: self.cfg.attention_scale as f32,
                kernels,
            })
        })
    }

    /// An artificial defect of `batch[index]` (DRAEM): a Perlin-masked blend of a texture from the
    /// anomaly source folder, a procedural texture or another image of the batch, each altered by
    /// DRAEM's augmentation.
    fn synthesize(&self, batch: &[&Image], index: usize, rng: &mut Rng) -> Result<(Image, Mask)> {
        let good = batch[index];
        let (c, h, w) = (good.channels, good.height, good.width);
        let textures = &self.trainer()?.textures;
        let source = if !textures.is_empty() {
            load_texture(&textures[rng.range_usize(0, textures.len())], c, h, w)?
        } else {
            let training = match self.cfg.textures {
                Textures::Procedural => false,
                Textures::Training => true,
                Textures::Both => rng.bool(0.5),
            };
            if training {
                // Another part of the batch (the part itself when it is alone).
                let other = if batch.len() > 1 {
                    (index + rng.range_usize(1, batch.len())) % batch.len()
                } else {
                    index
                };
                batch[other].clone()
            } else {
                procedural_texture(c, h, w, rng)
            }
        };
        perlin_blend_texture(good, &draem_augment(&source, rng), &self.cfg.perlin, rng)
    }

    /// The batch's clean images, their artificial defects (each with probability `p`) and the
    /// masks, as `[B, C, H, W]`, `[B, C, H, W]`, `[B, 1, H, W]`.
    fn pairs(&self, good: &[&Image], p: f64, rng: &mut Rng) -> Result<(Tensor, Tensor, Tensor)> {
        let (h, w) = (self.input.height, self.input.width);
        let mut defective = Vec::with_capacity(good.len());
        let mut masks = Vec::with_capacity(good.len() * h * w);
        for index in 0..good.len() {
            let (image, mask) = if p >= 1.0 || rng.bool(p as f32) {
                self.synthesize(good, index, rng)?
            } else {
                (good[index].clone(), Mask::zeros(h, w))
            };
            masks.extend(mask.data.iter().map(|&m| f32::from(m)));
            defective.push(image);
        }
        let clean = batch_tensor(good, &self.device)?;
        let refs: Vec<&Image> = defective.iter().collect();
        let defective = batch_tensor(&refs, &self.device)?;
        let masks = Tensor::from_vec(masks, (good.len(), 1, h, w), &self.device)?;
        Ok((clean, defective, masks))
    }

    /// Phase 1: encoder and decoder on `(I_o, I_ad)` (eq. 14).
    fn phase1_losses(&self, good: &[&Image], rng: &mut Rng) -> Result<StepLosses> {
        let cfg = &self.cfg;
        let lite0 = &self.trainer()?.lite0;
        let (clean, defective, masks) = self.pairs(good, 1.0, rng)?;
        let b = good.len();
        let paired = cfg.w_def > 0.0;
        // One pass over both halves: BatchNorm sees the batch of pairs once.
        let input = if paired {
            Tensor::cat(&[&clean, &defective], 0)?
        } else {
            clean.clone()
        };
        let features = self.train.encoder.forward(&input, true, STAGES)?;
        let clean_features = features
            .iter()
            .map(|f| f.narrow(0, 0, b))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let recon = self.train.decoder.forward(
            [&clean_features[2], &clean_features[3], &clean_features[4]],
            true,
        )?;
        let rec = loss::mse(&recon, &clean)?;
        let mut total = (&rec * cfg.w_rec)?;
        let mut logged = vec![("rec", rec)];
        if cfg.w_per > 0.0 {
            let per = loss::perceptual(lite0, &recon, &clean)?;
            total = (total + (&per * cfg.w_per)?)?;
            logged.push(("per", per));
        }
        if paired {
            let defective_features = features
                .iter()
                .map(|f| f.narrow(0, b, b))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let def = loss::defect_perception(&clean_features, &defective_features, &masks)?;
            total = (total + (&def * cfg.w_def)?)?;
            logged.push(("def", def));
        }
        Ok(StepLosses {
            objectives: vec![(PHASE1_GROUP, total)],
            logged,
        })
    }

    /// Phase 2: RBAM's FFMs, the decoder and MSDSM with the encoder frozen (eq. 17).
    fn phase2_losses(&self, good: &[&Image], rng: &mut Rng) -> Result<StepLosses> {
        let cfg = &self.cfg;
        let lite0 = &self.trainer()?.lite0;
        let frozen = self.frozen()?;
        let (clean, defective, masks) = self.pairs(good, cfg.anomaly_probability, rng)?;
        let features = self.frozen_features(&frozen, &defective, STAGES)?;
        let deep = self
            .train
            .repair(&features, &frozen.reference, cfg.attention_scale, true)?;
        let recon = self
            .train
            .decoder
            .forward([&deep[0], &deep[1], &deep[2]], true)?;
        let rec = loss::mse(&recon, &clean)?;
        let mut total = (&rec * cfg.w_rec2)?;
        let mut logged = vec![("rec", rec)];
        if cfg.w_per2 > 0.0 {
            let per = loss::perceptual(lite0, &recon, &clean)?;
            total = (total + (&per * cfg.w_per2)?)?;
            logged.push(("per", per));
        }
        if cfg.rbam {
            let target = self.frozen_features(&frozen, &clean, STAGES)?;
            let rep = loss::feature_repair(&deep, &target[2..])?;
            total = (total + (&rep * cfg.w_rep)?)?;
            logged.push(("rep", rep));
        }
        if !self.train.dsm.is_empty() {
            // The reconstruction re-enters the frozen encoder; gradients reach it, not the encoder.
            let again = self.eval.encoder.forward(&recon, false, 3)?;
            let mut seg: Option<Tensor> = None;
            for (s, dsm) in self.train.dsm.iter().enumerate() {
                let logits = dsm.forward(&features[s], &again[s], true)?;
                let target = loss::resize_mask(&masks, 1 << s)?;
                let term = loss::focal(&logits, &target, cfg.focal_gamma)?;
                seg = Some(match seg {
                    Some(t) => (t + term)?,
                    None => term,
                });
            }
            let seg = (seg.expect("three DSMs") / 3.0)?;
            total = (total + (&seg * cfg.w_seg)?)?;
            logged.push(("seg", seg));
        }
        Ok(StepLosses {
            objectives: vec![(PHASE2_GROUP, total)],
            logged,
        })
    }

    fn map_params(&self) -> MapParams {
        let w = self.cfg.map_weights;
        MapParams {
            weights: [w[0] as f32, w[1] as f32, w[2] as f32],
            mean_filter: self.cfg.mean_filter,
            median_filter: self.cfg.median_filter,
            margin: self.cfg.score_margin,
        }
    }

    /// The inference pass, on the fast CPU kernels where `fast` and on the CPU; `lap` is called
    /// after each stage (encoder, RBAM, decoder, MSDSM, map).
    fn forward(
        &self,
        images: &Tensor,
        fast: bool,
        lap: &mut dyn FnMut(&'static str) -> Result<()>,
    ) -> Result<Inference> {
        self.input.check_batch(images)?;
        let (b, c, h, w) = images.dims4()?;
        let (recon, scales): (Vec<f32>, Option<[Plane; 3]>) = if fast && images.device().is_cpu() {
            let out = self.fast_net()?.forward(images, lap)?;
            let scales = out.probabilities.map(|p| {
                p.map(|m| Plane {
                    values: m.data,
                    height: m.height,
                    width: m.width,
                })
            });
            let recon = crate::nn::init::f32_values(&out.recon.to_nchw(&self.device)?)?;
            (recon, scales)
        } else {
            let frozen = self.frozen()?;
            let features = self.eval.encoder.forward(images, false, STAGES)?;
            lap("encoder")?;
            let deep = self.eval.repair(
                &features,
                &frozen.reference,
                self.cfg.attention_scale,
                false,
            )?;
            lap("RBAM")?;
            let recon = self
                .eval
                .decoder
                .forward([&deep[0], &deep[1], &deep[2]], false)?;
            lap("decoder")?;
            let scales = if self.eval.dsm.is_empty() {
                None
            } else {
                let again = self.eval.encoder.forward(&recon, false, 3)?;
                let mut planes = Vec::with_capacity(3);
                for (s, dsm) in self.eval.dsm.iter().enumerate() {
                    let p = model::probabilities(&dsm.forward(&features[s], &again[s], false)?)?;
                    let (_, ph, pw) = p.dims3()?;
                    planes.push(Plane {
                        values: crate::nn::init::f32_values(&p)?,
                        height: ph,
                        width: pw,
                    });
                }
                let [a, b, c]: [Plane; 3] = planes
                    .try_into()
                    .map_err(|_| Error::invalid("MSDSM", "three scales expected"))?;
                Some([a, b, c])
            };
            (crate::nn::init::f32_values(&recon)?, scales)
        };
        let mut maps = match &scales {
            Some(scales) => map::combine(scales, self.map_params().weights, b, (h, w)),
            None => {
                let x = crate::nn::init::f32_values(images)?;
                map::difference(&x, &recon, (b, c, h, w))
            }
        };
        lap("MSDSM")?;
        let scores = map::finish(&mut maps, (h, w), &self.map_params());
        lap("map")?;
        Ok(Inference {
            maps: Tensor::from_vec(maps, (b, h, w), &self.device)?,
            scores: Tensor::from_vec(scores, b, &self.device)?,
        })
    }
}

/// The stored reference image, checked against the model's input.
fn stored_reference(stored: &HashMap<String, Tensor>, input: &InputSpec) -> Result<Image> {
    let t = stored
        .get(REFERENCE)
        .ok_or_else(|| Error::invalid(format!("model tensor `{REFERENCE}`"), "missing"))?;
    let dims = [input.channels, input.height, input.width];
    if t.dims() != dims {
        return Err(Error::invalid(
            format!("model tensor `{REFERENCE}`"),
            format!("shape {:?}, expected {dims:?}", t.dims()),
        ));
    }
    Ok(Image {
        channels: input.channels,
        height: input.height,
        width: input.width,
        data: crate::nn::init::f32_values(t)?,
    })
}

impl Method for NdpNet {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn phases(&self) -> Vec<PhaseSpec> {
        vec![
            PhaseSpec {
                name: "reconstruct",
                input: PhaseInput::Images,
                epochs: self.cfg.phase1_epochs,
                min_steps: self.cfg.phase1_min_steps,
                batch: None,
                selection: Selection::Last,
            },
            PhaseSpec {
                name: "repair",
                input: PhaseInput::Images,
                epochs: self.cfg.phase2_epochs,
                min_steps: self.cfg.phase2_min_steps,
                batch: None,
                selection: Selection::Last,
            },
        ]
    }

    /// Chooses the reference: the named image, or the training images' medoid.
    fn prepare(&mut self, set: &TrainSet) -> Result<()> {
        let image = match &self.cfg.reference {
            Some(path) => load_image(path, &self.input)?,
            None => set.good[self.medoid(&set.good)?].clone(),
        };
        self.set_reference(image)
    }

    fn step_losses(&mut self, batch: &TrainBatch, rng: &mut Rng) -> Result<StepLosses> {
        match batch.phase {
            0 => {
                // Training-mode BatchNorm moves the running statistics at once.
                self.encoder_moved = true;
                self.frozen.drop_snapshot();
                self.fast.drop_snapshot();
                self.phase1_losses(&batch.good, rng)
            }
            1 => {
                self.fast.drop_snapshot();
                self.phase2_losses(&batch.good, rng)
            }
            other => Err(Error::invalid(
                "training phase",
                format!("{other}; NDP-Net has two"),
            )),
        }
    }

    fn train_state(&self) -> &TrainState {
        &self.state
    }

    fn train_state_mut(&mut self) -> &mut TrainState {
        &mut self.state
    }

    fn weights_changed(&mut self) {
        self.fast.drop_snapshot();
        if std::mem::take(&mut self.encoder_moved) {
            self.frozen.drop_snapshot();
        }
    }

    fn extra_state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        if let Some(image) = &self.reference {
            out.insert(
                REFERENCE.to_string(),
                Tensor::from_vec(
                    image.data.clone(),
                    (image.channels, image.height, image.width),
                    &self.device,
                )?,
            );
        }
        Ok(out)
    }

    fn restore_extra_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.encoder_moved = true;
        if state.contains_key(REFERENCE) {
            self.set_reference(stored_reference(state, &self.input)?)?;
        }
        Ok(())
    }

    fn infer(&self, images: &Tensor) -> Result<Inference> {
        self.forward(images, true, &mut |_| Ok(()))
    }

    fn infer_reference(&self, images: &Tensor) -> Result<Inference> {
        self.forward(images, false, &mut |_| Ok(()))
    }

    fn infer_timed(&self, images: &Tensor) -> Result<(Inference, Vec<(&'static str, Duration)>)> {
        super::time_stages(images.device(), |lap| self.forward(images, true, lap))
    }

    fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut all = self.state.tensors()?;
        let reference = self.extra_state()?;
        if reference.is_empty() {
            return Err(Error::invalid(
                "NDP-Net model",
                "no reference image to store: train it first",
            ));
        }
        all.extend(reference);
        Ok(all)
    }

    fn config_json(&self) -> Result<serde_json::Value> {
        config_check::to_json(ENTRY.name, &self.cfg)
    }

    fn backbone_blocks(&self) -> Option<(Vec<usize>, Option<usize>)> {
        // The pretrained weights that trained it (perceptual loss), recorded for provenance.
        self.trainer
            .as_ref()
            .map(|_| (loss::PERCEPTUAL_TAPS.to_vec(), None))
    }

    fn reference_image(&self) -> Option<Image> {
        self.reference.clone()
    }
}
