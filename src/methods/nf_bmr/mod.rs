//! NF-BMR (Zhang et al., CMC 2024): a normalising flow builds a Gaussian target domain from frozen
//! backbone features (the source domain), then two mapping nets learn to map normal features
//! between the two domains; where they fail, the image is anomalous.
//!
//! Training has two phases: "flow" fits the Real-NVP flow by maximum likelihood; "map" fits the
//! mapping nets by MSE in both directions while the backbone and the flow stay fixed. With
//! `mapping = none` (the paper's "NF alone" ablation) only the flow is trained and the map is its
//! per-position NLL.
//!
//! Backbone features are standardised per channel before the flow, with the mean and standard
//! deviation of every feature seen in the flow phase (accumulated over its steps; they are then
//! fixed). This puts every channel on the flow's N(0, 1) scale and weighs the source-domain MSE
//! evenly across channels. They are stored as `norm.mean` / `norm.std`.
pub mod config;
mod fast;
pub mod loss;
pub mod model;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

pub use config::{Mapping, NfBmrConfig};

use self::fast::FastHead;
use self::model::MappingNets;
use super::config_check;
use super::fast_snapshot::FastSnapshot;
use crate::data::InputSpec;
use crate::error::{Error, Result};
use crate::methods::anomaly_map::MapResizer;
use crate::methods::{
    pretrained_backbone, stored_backbone, Inference, Method, MethodEntry, PhaseInput, PhaseSpec,
    Selection, Setup, StepLosses, TrainBatch,
};
use crate::model_file::stored;
use crate::nn::backbone::Lite0Features;
use crate::nn::flow::{nll_loss, nll_per_position, FlowSpec, RealNvp};
use crate::nn::init::{detached, seeded_var_builder};
use crate::nn::kernels::Kernels;
use crate::nn::optim::{Adam, AdamParams};
use crate::nn::train_state::TrainState;
use crate::nn::FeatureExtractor;
use crate::rng::Rng;

/// Raised whenever older NF-BMR model files would load or score differently.
pub const VERSION: u32 = 1;

pub const ENTRY: MethodEntry = MethodEntry {
    name: "nf-bmr",
    summary: "frozen Lite0 features -> Real-NVP flow -> bidirectional residual mapping nets; \
              the mapping errors are the anomaly map",
    version: VERSION,
    learns_from_defects: false,
    uses_backbone: true,
    default_config: || config_check::to_json("nf-bmr", &NfBmrConfig::default()),
    tiny_config: || {
        serde_json::json!({
            "taps": [4], "flow_blocks": 2, "flow_hidden": 16, "flow_kernel": 1,
            "bmr_width": 16, "bmr_blocks": 1, "flow_epochs": 1, "map_epochs": 1,
            "flow_min_steps": 0, "map_min_steps": 0
        })
    },
    create: create_entry,
    load: load_entry,
};

fn create_entry(setup: &Setup, backbone: &Path) -> Result<Box<dyn super::Method>> {
    let cfg: NfBmrConfig = config_check::parse("nf-bmr", setup.config.clone())?;
    cfg.validate()?;
    let last = cfg.taps.iter().copied().max().unwrap_or(0);
    let frozen = pretrained_backbone(backbone, last, setup.device)?;
    let (_, bare) = stored_backbone(&frozen);
    let extractor = Lite0Features::new(&bare, cfg.taps.clone(), setup.device)?;
    Ok(Box::new(NfBmr::new(
        cfg,
        setup.input,
        Box::new(extractor),
        frozen,
        setup.seed,
        setup.device,
    )?))
}

fn load_entry(setup: &Setup, tensors: &HashMap<String, Tensor>) -> Result<Box<dyn super::Method>> {
    let cfg: NfBmrConfig = config_check::parse("nf-bmr", setup.config.clone())?;
    cfg.validate()?;
    let (frozen, bare) = stored_backbone(tensors);
    let extractor = Lite0Features::new(&bare, cfg.taps.clone(), setup.device)?;
    Ok(Box::new(NfBmr::from_tensors(
        cfg,
        setup.input,
        Box::new(extractor),
        frozen,
        tensors,
        setup.device,
    )?))
}

const FLOW_PHASE: usize = 0;
const MAP_PHASE: usize = 1;
const NORM_MEAN: &str = "norm.mean";
const NORM_STD: &str = "norm.std";
const FLOW_GROUP: &str = "flow";
const MAP_GROUP: &str = "map";
/// The feature statistics' running sums, kept in training checkpoints only.
const STATS_SUMS: &str = "norm.sum";
const STATS_SUMS_SQ: &str = "norm.sum_sq";
const STATS_COUNT: &str = "norm.count";
/// Added to each channel's variance, so that a channel that never fired in training does not
/// divide by zero (its standardised value stays finite, and large when it fires).
const VARIANCE_FLOOR: f64 = 1e-4;

/// The flow and the mapping nets, built on one set of parameter tensors.
struct Nets {
    flow: RealNvp,
    mapping: Option<MappingNets>,
}

impl Nets {
    fn new(
        flow_vb: VarBuilder,
        map_vb: VarBuilder,
        cfg: &NfBmrConfig,
        channels: usize,
    ) -> Result<Self> {
        let spec = FlowSpec {
            channels,
            blocks: cfg.flow_blocks,
            hidden: cfg.flow_hidden,
            kernel: cfg.flow_kernel,
            clamp: cfg.flow_clamp,
        };
        Ok(Nets {
            flow: RealNvp::new(flow_vb.pp("flow"), &spec)?,
            mapping: MappingNets::new(
                map_vb,
                cfg.mapping,
                channels,
                cfg.bmr_width,
                cfg.bmr_blocks,
            )?,
        })
    }
}

/// Per-channel feature statistics, accumulated over the flow phase.
struct FeatureStats {
    count: f64,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    /// `[1, C, 1, 1]`, ready to broadcast.
    mean: Tensor,
    std: Tensor,
}

impl FeatureStats {
    fn identity(channels: usize, device: &Device) -> Result<Self> {
        Ok(FeatureStats {
            count: 0.0,
            sum: vec![0.0; channels],
            sum_sq: vec![0.0; channels],
            mean: Tensor::zeros((1, channels, 1, 1), DType::F32, device)?,
            std: Tensor::ones((1, channels, 1, 1), DType::F32, device)?,
        })
    }

    fn loaded(mean: &Tensor, std: &Tensor, channels: usize, device: &Device) -> Result<Self> {
        let shape = (1, channels, 1, 1);
        Ok(FeatureStats {
            mean: mean
                .to_device(device)?
                .to_dtype(DType::F32)?
                .reshape(shape)?,
            std: std
                .to_device(device)?
                .to_dtype(DType::F32)?
                .reshape(shape)?,
            ..FeatureStats::identity(channels, device)?
        })
    }

    fn accumulate(&mut self, features: &Tensor) -> Result<()> {
        let (b, c, h, w) = features.dims4()?;
        let sums = features
            .sum((0, 2, 3))?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let sums_sq = features
            .sqr()?
            .sum((0, 2, 3))?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        self.count += (b * h * w) as f64;
        let mut means = Vec::with_capacity(c);
        let mut stds = Vec::with_capacity(c);
        for ch in 0..c {
            self.sum[ch] += sums[ch];
            self.sum_sq[ch] += sums_sq[ch];
            let mean = self.sum[ch] / self.count;
            let var = (self.sum_sq[ch] / self.count - mean * mean).max(0.0);
            means.push(mean as f32);
            stds.push((var + VARIANCE_FLOOR).sqrt() as f32);
        }
        let device = features.device();
        self.mean = Tensor::from_vec(means, (1, c, 1, 1), device)?;
        self.std = Tensor::from_vec(stds, (1, c, 1, 1), device)?;
        Ok(())
    }

    /// The running sums, for a checkpoint (f64, as accumulated).
    fn accumulators(&self) -> Result<HashMap<String, Tensor>> {
        let device = self.mean.device();
        Ok(HashMap::from([
            (
                STATS_SUMS.to_string(),
                Tensor::new(self.sum.as_slice(), device)?,
            ),
            (
                STATS_SUMS_SQ.to_string(),
                Tensor::new(self.sum_sq.as_slice(), device)?,
            ),
            (STATS_COUNT.to_string(), Tensor::new(&[self.count], device)?),
        ]))
    }

    /// The statistics and their running sums as a checkpoint holds them.
    fn restored(state: &HashMap<String, Tensor>, channels: usize, device: &Device) -> Result<Self> {
        let read = |name: &str, len: usize| -> Result<Vec<f64>> {
            Ok(stored(state, name, &[len])?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?)
        };
        let mut stats = FeatureStats::loaded(
            stored(state, NORM_MEAN, &[channels])?,
            stored(state, NORM_STD, &[channels])?,
            channels,
            device,
        )?;
        stats.sum = read(STATS_SUMS, channels)?;
        stats.sum_sq = read(STATS_SUMS_SQ, channels)?;
        stats.count = read(STATS_COUNT, 1)?[0];
        Ok(stats)
    }

    fn standardize(&self, features: &Tensor) -> Result<Tensor> {
        Ok(features
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?)
    }
}

pub struct NfBmr {
    cfg: NfBmrConfig,
    input: InputSpec,
    extractor: Box<dyn FeatureExtractor>,
    frozen: HashMap<String, Tensor>,
    channels: usize,
    /// The flow's and the mapping nets' parameters and Adam optimisers, groups "flow" and "map".
    state: TrainState,
    /// Built on the `Var`s: records the graph for backward.
    train: Nets,
    /// Built on detached views of the same storage (optimiser steps update it in place): inference
    /// records no graph and keeps no intermediate alive.
    eval: Nets,
    stats: FeatureStats,
    resizer: MapResizer,
    /// The inference head on the fast CPU kernels, built on first use from the current weights
    /// and dropped by every training step (CPU only).
    fast: FastSnapshot<FastHead>,
}

fn adam(vars: &VarMap, lr: f64) -> Result<Adam> {
    Adam::new(
        vars,
        AdamParams {
            lr,
            ..Default::default()
        },
    )
}

impl NfBmr {
    /// Fresh, trainable, initialised from `seed`. `frozen` are the extractor's tensors to embed
    /// in the model file (keys as given).
    pub fn new(
        cfg: NfBmrConfig,
        input: InputSpec,
        extractor: Box<dyn FeatureExtractor>,
        frozen: HashMap<String, Tensor>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        Self::build(cfg, input, extractor, frozen, Err(seed), device)
    }

    /// Rebuild from tensors read back from a model file (same keys as `Method::tensors` returned).
    pub fn from_tensors(
        cfg: NfBmrConfig,
        input: InputSpec,
        extractor: Box<dyn FeatureExtractor>,
        frozen: HashMap<String, Tensor>,
        trained: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        Self::build(cfg, input, extractor, frozen, Ok(trained), device)
    }

    /// `weights`: the trained tensors to load, or the seed of a fresh initialisation.
    fn build(
        cfg: NfBmrConfig,
        input: InputSpec,
        extractor: Box<dyn FeatureExtractor>,
        frozen: HashMap<String, Tensor>,
        weights: std::result::Result<&HashMap<String, Tensor>, u64>,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let channels = extractor.out_channels();
        let stride = extractor.stride();
        if input.height == 0 || input.width == 0 || stride == 0 {
            return Err(Error::invalid(
                "input",
                format!(
                    "{}x{} images with a stride-{stride} extractor",
                    input.height, input.width
                ),
            ));
        }
        let flow_vars = VarMap::new();
        let map_vars = VarMap::new();
        // Loaded weights replace the initial values, so any seed will do there.
        let seed = weights.err().unwrap_or(0);
        let train = Nets::new(
            seeded_var_builder(&flow_vars, seed, DType::F32, device),
            seeded_var_builder(&map_vars, seed, DType::F32, device),
            &cfg,
            channels,
        )?;
        let state = TrainState::new()
            .with_group(
                FLOW_GROUP,
                flow_vars.clone(),
                adam(&flow_vars, cfg.flow_lr)?,
            )
            .with_group(MAP_GROUP, map_vars.clone(), adam(&map_vars, cfg.map_lr)?);
        let stats = match weights {
            Err(_) => FeatureStats::identity(channels, device)?,
            Ok(trained) => {
                state.load(trained)?;
                FeatureStats::loaded(
                    stored(trained, NORM_MEAN, &[channels])?,
                    stored(trained, NORM_STD, &[channels])?,
                    channels,
                    device,
                )?
            }
        };
        let eval = Nets::new(
            VarBuilder::from_tensors(detached(&flow_vars)?, DType::F32, device),
            VarBuilder::from_tensors(detached(&map_vars)?, DType::F32, device),
            &cfg,
            channels,
        )?;
        let model = NfBmr {
            state,
            resizer: MapResizer::new(
                (input.height.div_ceil(stride), input.width.div_ceil(stride)),
                (input.height, input.width),
                cfg.smoothing_sigma,
                device,
            )?,
            fast: FastSnapshot::default(),
            cfg,
            input,
            extractor,
            frozen,
            channels,
            train,
            eval,
            stats,
        };
        let own = model.own_tensors()?;
        if let Some(clash) = model.frozen.keys().find(|k| own.contains_key(*k)) {
            return Err(Error::invalid(
                format!("frozen tensor `{clash}`"),
                "has the name of one of NF-BMR's own tensors",
            ));
        }
        Ok(model)
    }

    pub fn config(&self) -> &NfBmrConfig {
        &self.cfg
    }

    /// One optimisation step of `phase` on cached backbone features `[B, C, h, w]` (what the
    /// training loop does with each batch); returns the logged loss.
    pub fn train_on_features(
        &mut self,
        phase: usize,
        features: &Tensor,
    ) -> Result<Vec<(&'static str, f32)>> {
        let batch = TrainBatch {
            phase,
            epoch: 0,
            good: Vec::new(),
            features: Some(features.clone()),
            defects: &[],
        };
        super::step(self, &batch, &mut Rng::new(0))
    }

    /// Per-channel standardisation with the training statistics.
    pub fn standardize(&self, features: &Tensor) -> Result<Tensor> {
        self.stats.standardize(features)
    }

    /// The trainable parameters of `phase`, by name (sorted).
    pub fn trainable_vars(&self, phase: usize) -> Result<Vec<(String, Var)>> {
        match phase {
            FLOW_PHASE => self.state.group_vars(FLOW_GROUP),
            MAP_PHASE if self.train.mapping.is_some() => self.state.group_vars(MAP_GROUP),
            _ => Err(self.bad_phase(phase)),
        }
    }

    /// The flow and mapping nets on the trainable `Var`s (their outputs record a backward graph).
    pub fn trainable_flow(&self) -> &RealNvp {
        &self.train.flow
    }

    pub fn trainable_mapping(&self) -> Option<&MappingNets> {
        self.train.mapping.as_ref()
    }

    /// The part of `[B, H, W]` maps the image score looks at: all but `score_margin` feature
    /// cells at each border, or everything when the map is too small to leave any inside.
    fn score_region(&self, maps: &Tensor) -> Result<Tensor> {
        let (_, h, w) = maps.dims3()?;
        let m = self.cfg.score_margin * self.extractor.stride();
        if 2 * m >= h || 2 * m >= w {
            return Ok(maps.clone());
        }
        Ok(maps.narrow(1, m, h - 2 * m)?.narrow(2, m, w - 2 * m)?)
    }

    /// The inference pass, on the fast CPU kernels where `fast` and available; `lap` is called
    /// after each stage (backbone, flow, map, anomaly map).
    fn forward(
        &self,
        images: &Tensor,
        fast: bool,
        mut lap: impl FnMut(&'static str) -> Result<()>,
    ) -> Result<Inference> {
        self.input.check_batch(images)?;
        let features = if fast {
            self.extractor.extract(images)?
        } else {
            self.extractor.extract_reference(images)?
        };
        lap("backbone")?;
        self.check_features(&features)?;
        let head = if fast {
            self.fast_head(&features)?
        } else {
            None
        };
        let per_position = match head {
            Some(head) => {
                let per_position = head.per_position(&features)?;
                lap("flow and mapping")?;
                per_position
            }
            None => self.per_position_candle(&features, &mut lap)?,
        };
        let maps = self.resizer.resize(&per_position)?;
        let scores = self.score_region(&maps)?.flatten_from(1)?.max(1)?;
        lap("anomaly map")?;
        Ok(Inference { maps, scores })
    }

    /// The per-position scores `[B, h, w]` of standardised features on candle's ops (the reference
    /// of the fast head, and the path on CUDA).
    fn per_position_candle(
        &self,
        features: &Tensor,
        mut lap: impl FnMut(&'static str) -> Result<()>,
    ) -> Result<Tensor> {
        let source = self.standardize(features)?;
        let (target, log_det) = self.eval.flow.forward(&source)?;
        lap("flow")?;
        let per_position = match &self.eval.mapping {
            None => nll_per_position(&target, &log_det)?,
            Some(mapping) => loss::mapping_score(mapping, &source, &target)?,
        };
        lap("mapping")?;
        Ok(per_position)
    }

    /// The fast CPU head for these features, built from the current weights when missing; `None`
    /// off the CPU.
    fn fast_head(&self, features: &Tensor) -> Result<Option<Arc<FastHead>>> {
        if !features.device().is_cpu() {
            return Ok(None);
        }
        let head = self.fast.get_or_build(|| {
            FastHead::new(
                Kernels::detect(),
                &self.stats.mean,
                &self.stats.std,
                self.eval.flow.fast()?,
                self.eval.mapping.as_ref().map(|m| m.fast()).transpose()?,
            )
        })?;
        Ok(Some(head))
    }

    /// Per-position anomaly scores `[B, h, w]` of backbone features on candle's ops, bypassing the
    /// fast CPU head (for comparisons with it).
    pub fn per_position_reference(&self, features: &Tensor) -> Result<Tensor> {
        self.check_features(features)?;
        self.per_position_candle(features, |_| Ok(()))
    }

    /// The same on the fast CPU head (features on the CPU).
    pub fn per_position_fast(&self, features: &Tensor) -> Result<Tensor> {
        self.check_features(features)?;
        let head = self
            .fast_head(features)?
            .ok_or_else(|| Error::invalid("features", "the fast head runs on the CPU only"))?;
        head.per_position(features)
    }

    /// Multiply-adds per feature position of the flow and the mapping nets (CPU).
    pub fn head_macs_per_position(&self, features: &Tensor) -> Result<Option<usize>> {
        Ok(self.fast_head(features)?.map(|h| h.macs_per_position()))
    }

    fn bad_phase(&self, phase: usize) -> Error {
        Error::invalid(
            "training phase",
            format!("{phase}; NF-BMR has {} phases", self.phases().len()),
        )
    }

    fn check_features(&self, features: &Tensor) -> Result<()> {
        let (_, c, _, _) = features.dims4()?;
        if c != self.channels {
            return Err(Error::invalid(
                "encoded features",
                format!("{c} channels, the extractor gives {}", self.channels),
            ));
        }
        Ok(())
    }

    /// The loss that step `phase` minimises, on the current parameters and statistics.
    pub fn phase_loss(&self, phase: usize, encoded: &Tensor) -> Result<Tensor> {
        self.check_features(encoded)?;
        let source = self.standardize(encoded)?;
        match (phase, &self.train.mapping) {
            (FLOW_PHASE, _) => {
                let (z, log_det) = self.train.flow.forward(&source)?;
                nll_loss(&z, &log_det)
            }
            (MAP_PHASE, Some(mapping)) => {
                // The detached flow: its parameters get no gradient in this phase.
                let (target, _) = self.eval.flow.forward(&source)?;
                loss::mapping_loss(mapping, &source, &target)
            }
            _ => Err(self.bad_phase(phase)),
        }
    }

    /// NF-BMR's own tensors (parameters and statistics), copied.
    fn own_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = self.state.tensors()?;
        out.insert(
            NORM_MEAN.to_string(),
            self.stats.mean.flatten_all()?.copy()?,
        );
        out.insert(NORM_STD.to_string(), self.stats.std.flatten_all()?.copy()?);
        Ok(out)
    }
}

impl Method for NfBmr {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn encode_frozen(&self, images: &Tensor) -> Result<Tensor> {
        self.extractor.extract(images)
    }

    fn phases(&self) -> Vec<PhaseSpec> {
        let mut phases = vec![PhaseSpec {
            name: FLOW_GROUP,
            input: PhaseInput::Features,
            epochs: self.cfg.flow_epochs,
            min_steps: self.cfg.flow_min_steps,
            batch: None,
            selection: Selection::Last,
        }];
        if self.cfg.mapping != Mapping::None {
            phases.push(PhaseSpec {
                name: MAP_GROUP,
                input: PhaseInput::Features,
                epochs: self.cfg.map_epochs,
                min_steps: self.cfg.map_min_steps,
                batch: None,
                selection: Selection::Last,
            });
        }
        phases
    }

    fn step_losses(&mut self, batch: &TrainBatch, _: &mut Rng) -> Result<StepLosses> {
        let encoded = batch
            .features
            .as_ref()
            .ok_or_else(|| Error::invalid("training batch", "NF-BMR trains on cached features"))?;
        // The fast head is a snapshot of weights and statistics this step changes.
        self.fast.drop_snapshot();
        if batch.phase == FLOW_PHASE {
            self.check_features(encoded)?;
            self.stats.accumulate(encoded)?;
        }
        let loss = self.phase_loss(batch.phase, encoded)?;
        let (group, logged) = if batch.phase == FLOW_PHASE {
            (FLOW_GROUP, "nll")
        } else {
            (MAP_GROUP, "mse")
        };
        Ok(StepLosses {
            logged: vec![(logged, loss.clone())],
            objectives: vec![(group, loss)],
        })
    }

    fn train_state(&self) -> &TrainState {
        &self.state
    }

    fn train_state_mut(&mut self) -> &mut TrainState {
        &mut self.state
    }

    fn weights_changed(&mut self) {
        self.fast.drop_snapshot();
    }

    /// The feature statistics and their running sums.
    fn extra_state(&self) -> Result<HashMap<String, Tensor>> {
        let mut state = self.stats.accumulators()?;
        state.insert(
            NORM_MEAN.to_string(),
            self.stats.mean.flatten_all()?.copy()?,
        );
        state.insert(NORM_STD.to_string(), self.stats.std.flatten_all()?.copy()?);
        Ok(state)
    }

    fn restore_extra_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.stats = FeatureStats::restored(state, self.channels, self.stats.mean.device())?;
        Ok(())
    }

    fn infer(&self, images: &Tensor) -> Result<Inference> {
        self.forward(images, true, |_| Ok(()))
    }

    fn infer_reference(&self, images: &Tensor) -> Result<Inference> {
        self.forward(images, false, |_| Ok(()))
    }

    fn infer_timed(&self, images: &Tensor) -> Result<(Inference, Vec<(&'static str, Duration)>)> {
        super::time_stages(images.device(), |lap| self.forward(images, true, lap))
    }

    fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut all = self.own_tensors()?;
        all.extend(self.frozen.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(all)
    }

    fn config_json(&self) -> Result<serde_json::Value> {
        config_check::to_json(ENTRY.name, &self.cfg)
    }

    fn backbone_blocks(&self) -> Option<(Vec<usize>, Option<usize>)> {
        Some((self.cfg.taps.clone(), None))
    }
}
