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
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

pub use config::{Mapping, NfBmrConfig};

use self::fast::FastHead;
use self::model::MappingNets;
use super::fast_snapshot::FastSnapshot;
use crate::data::InputSpec;
use crate::error::{Error, Result};
use crate::methods::anomaly_map::MapResizer;
use crate::methods::{Inference, Method, PhaseSpec, StepLosses};
use crate::nn::flow::{nll_loss, nll_per_position, FlowSpec, RealNvp};
use crate::nn::init::{detached, load_vars, seeded_var_builder};
use crate::nn::kernels::Kernels;
use crate::nn::FeatureExtractor;
use crate::rng::Rng;
use crate::train::optim::{sorted_vars, Adam, AdamParams};

const FLOW_PHASE: usize = 0;
const MAP_PHASE: usize = 1;
const NORM_MEAN: &str = "norm.mean";
const NORM_STD: &str = "norm.std";
const FLOW_OPT: &str = "optim.flow.";
const MAP_OPT: &str = "optim.map.";
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
    flow_vars: VarMap,
    map_vars: VarMap,
    /// Built on the `Var`s: records the graph for backward.
    train: Nets,
    /// Built on detached views of the same storage (optimiser steps update it in place): inference
    /// records no graph and keeps no intermediate alive.
    eval: Nets,
    flow_opt: Adam,
    map_opt: Adam,
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

/// The stored tensor `name` from a model file, checked against the expected shape.
fn stored<'a>(
    trained: &'a HashMap<String, Tensor>,
    name: &str,
    dims: &[usize],
) -> Result<&'a Tensor> {
    let tensor = trained
        .get(name)
        .ok_or_else(|| Error::invalid(format!("model tensor `{name}`"), "missing"))?;
    if tensor.dims() != dims {
        return Err(Error::invalid(
            format!("model tensor `{name}`"),
            format!("shape {:?}, expected {dims:?}", tensor.dims()),
        ));
    }
    Ok(tensor)
}

impl NfBmr {
    /// Fresh, trainable. `frozen` are the extractor's tensors to embed in the model file (keys as given).
    pub fn new(
        cfg: NfBmrConfig,
        input: InputSpec,
        extractor: Box<dyn FeatureExtractor>,
        frozen: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        Self::build(cfg, input, extractor, frozen, None, device)
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
        Self::build(cfg, input, extractor, frozen, Some(trained), device)
    }

    fn build(
        cfg: NfBmrConfig,
        input: InputSpec,
        extractor: Box<dyn FeatureExtractor>,
        frozen: HashMap<String, Tensor>,
        trained: Option<&HashMap<String, Tensor>>,
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
        let train = Nets::new(
            seeded_var_builder(&flow_vars, cfg.seed, DType::F32, device),
            seeded_var_builder(&map_vars, cfg.seed, DType::F32, device),
            &cfg,
            channels,
        )?;
        let stats = match trained {
            None => FeatureStats::identity(channels, device)?,
            Some(trained) => {
                load_vars(&flow_vars, trained)?;
                load_vars(&map_vars, trained)?;
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
            flow_opt: adam(&flow_vars, cfg.flow_lr)?,
            map_opt: adam(&map_vars, cfg.map_lr)?,
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
            flow_vars,
            map_vars,
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

    /// Per-channel standardisation with the training statistics.
    pub fn standardize(&self, features: &Tensor) -> Result<Tensor> {
        self.stats.standardize(features)
    }

    /// The trainable parameters of `phase`, by name (sorted).
    pub fn trainable_vars(&self, phase: usize) -> Result<Vec<(String, Var)>> {
        match phase {
            FLOW_PHASE => sorted_vars(&self.flow_vars),
            MAP_PHASE if self.train.mapping.is_some() => sorted_vars(&self.map_vars),
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

    /// The inference pass; `lap` is called after each stage (backbone, flow, map, anomaly map).
    fn forward(
        &self,
        images: &Tensor,
        mut lap: impl FnMut(&'static str) -> Result<()>,
    ) -> Result<Inference> {
        self.input.check_batch(images)?;
        let features = self.extractor.extract(images)?;
        lap("backbone")?;
        self.check_features(&features)?;
        let per_position = match self.fast_head(&features)? {
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
        let mut out = HashMap::new();
        for (name, var) in sorted_vars(&self.flow_vars)?
            .into_iter()
            .chain(sorted_vars(&self.map_vars)?)
        {
            out.insert(name, var.as_tensor().detach().copy()?);
        }
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
        "nf-bmr"
    }

    fn encode_frozen(&self, images: &Tensor) -> Result<Tensor> {
        self.extractor.extract(images)
    }

    fn phases(&self) -> Vec<PhaseSpec> {
        let mut phases = vec![PhaseSpec {
            name: "flow",
            epochs: self.cfg.flow_epochs,
            select_best: false,
        }];
        if self.cfg.mapping != Mapping::None {
            phases.push(PhaseSpec {
                name: "map",
                epochs: self.cfg.map_epochs,
                select_best: false,
            });
        }
        phases
    }

    fn train_step(&mut self, phase: usize, encoded: &Tensor, _: &mut Rng) -> Result<StepLosses> {
        // The fast head is a snapshot of weights and statistics this step changes.
        self.fast.drop_snapshot();
        if phase == FLOW_PHASE {
            self.check_features(encoded)?;
            self.stats.accumulate(encoded)?;
        }
        let loss = self.phase_loss(phase, encoded)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::invalid(
                "training loss",
                format!(
                    "{value} in phase {}; lower the learning rate",
                    self.phases()[phase].name
                ),
            ));
        }
        if phase == FLOW_PHASE {
            self.flow_opt.step(&loss.backward()?)?;
            Ok(vec![("nll", value)])
        } else {
            self.map_opt.step(&loss.backward()?)?;
            Ok(vec![("mse", value)])
        }
    }

    fn infer(&self, images: &Tensor) -> Result<Inference> {
        self.forward(images, |_| Ok(()))
    }

    fn infer_timed(&self, images: &Tensor) -> Result<(Inference, Vec<(&'static str, Duration)>)> {
        let mut stages = Vec::with_capacity(4);
        let mut last = Instant::now();
        let out = self.forward(images, |stage| {
            images.device().synchronize()?;
            let now = Instant::now();
            stages.push((stage, now - last));
            last = now;
            Ok(())
        })?;
        Ok((out, stages))
    }

    fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut all = self.own_tensors()?;
        all.extend(self.frozen.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(all)
    }

    fn training_state(&self) -> Result<HashMap<String, Tensor>> {
        let mut state = self.own_tensors()?;
        state.extend(self.stats.accumulators()?);
        state.extend(self.flow_opt.state(FLOW_OPT)?);
        state.extend(self.map_opt.state(MAP_OPT)?);
        Ok(state)
    }

    fn restore_training_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.fast.drop_snapshot();
        load_vars(&self.flow_vars, state)?;
        load_vars(&self.map_vars, state)?;
        self.stats = FeatureStats::restored(state, self.channels, self.stats.mean.device())?;
        self.flow_opt.load_state(FLOW_OPT, state)?;
        self.map_opt.load_state(MAP_OPT, state)
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).unwrap_or_default()
    }
}
