//! FCDD (Liznerski et al. 2021, "Explainable Deep One-Class Classification") with the per-pixel
//! loss of "Adapting the Hypersphere Loss Function from Anomaly Detection to Anomaly
//! Segmentation" (the HSC paper): a fine-tuned pretrained trunk and a 1×1 convolution score each
//! cell of a low-resolution map, which Gaussian stamps upsample to the input size; training pushes
//! the scores of synthetic anomalies (confetti noise, [`crate::data::anomaly::ConfettiParams`]) up
//! and the others down.
//!
//! The building blocks: [`net`] (the network), [`loss`] (eq. 4 and eq. 5), [`upsample`] (the
//! Gaussian upsampling), [`augment`] (FCDD's augmentation and preprocessing).
pub mod augment;
pub mod loss;
pub mod net;
pub mod upsample;

pub use loss::PixelLoss;
pub use net::{FcddNet, FcddNetParams};
pub use upsample::GaussianUpsampler;
pub mod config;

pub use config::{FcddConfig, ScorePooling};

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use self::augment::{
    augment_train, lane_max, lane_sum, lcn_range, normalize_into, preprocess, preprocess_tensor,
};
use self::net::CUT_BLOCK;
use super::config_check;
use super::fast_snapshot::FastSnapshot;
use crate::data::anomaly::{AnomalyGenerator, AnomalySynth};
use crate::data::{batch_tensor, Image, InputSpec, Mask};
use crate::error::Result;
use crate::methods::{
    pretrained_backbone, stored_backbone, Defective, Inference, Method, MethodEntry, PhaseInput,
    PhaseSpec, Selection, Setup, StepLosses, TrainBatch, TrainSet, BACKBONE_PREFIX,
};
use crate::model_file::stored_scalar;
use crate::nn::kernels::lite0::FastLite0;
use crate::nn::optim::{Sgd, SgdParams};
use crate::nn::train_state::TrainState;
use crate::nn::with_cpu_f32;
use crate::rng::Rng;

/// Raised whenever older FCDD model files would load or score differently.
pub const VERSION: u32 = 1;

pub const ENTRY: MethodEntry = MethodEntry {
    name: "fcdd",
    summary: "Lite0 cut at stride 8 and fine-tuned, a 1x1 head, Gaussian-upsampled pseudo-Huber \
              map; learns from confetti noise or real defects (HSC pixel loss)",
    version: VERSION,
    learns_from_defects: true,
    uses_backbone: true,
    default_config: || config_check::to_json("fcdd", &FcddConfig::default()),
    tiny_config: || {
        serde_json::json!({
            "epochs": 2, "passes_per_epoch": 1, "batch": 8, "score_margin": 0
        })
    },
    create: |setup: &Setup, backbone: &Path| {
        let cfg = parse(setup)?;
        let pretrained = pretrained_backbone(backbone, CUT_BLOCK, setup.device)?;
        Ok(Box::new(Fcdd::new(cfg, setup, &pretrained, None)?))
    },
    load: |setup: &Setup, tensors: &HashMap<String, Tensor>| {
        let cfg = parse(setup)?;
        Ok(Box::new(Fcdd::new(cfg, setup, tensors, Some(tensors))?))
    },
};

fn parse(setup: &Setup) -> Result<FcddConfig> {
    let cfg: FcddConfig = config_check::parse("fcdd", setup.config.clone())?;
    cfg.validate()?;
    Ok(cfg)
}

const NET_GROUP: &str = "net";
/// FCDD's min-max constants: the range of the LCN'd training images.
const NORM_MIN: &str = "norm.min";
const NORM_MAX: &str = "norm.max";

pub struct Fcdd {
    cfg: FcddConfig,
    input: InputSpec,
    /// The frozen part of the pretrained trunk (stem and blocks before `trainable_from`), as the
    /// model file stores it.
    frozen: HashMap<String, Tensor>,
    /// The fine-tuned blocks and the head with their SGD optimiser (group "net").
    state: TrainState,
    /// On the variables (records the graph), and on detached views of them for inference.
    train: FcddNet,
    eval: FcddNet,
    /// The trunk on the fast CPU kernels, a snapshot rebuilt after the weights change.
    fast: FastSnapshot<FastLite0>,
    confetti: AnomalySynth,
    /// LCN range of the training images (min, max).
    range: (f32, f32),
    device: Device,
}

/// Whether a backbone tensor belongs to the frozen part: the stem or a block before `first`.
fn is_frozen(name: &str, first: usize) -> bool {
    let bare = name.strip_prefix(BACKBONE_PREFIX).unwrap_or(name);
    match bare.strip_prefix("_blocks.") {
        Some(rest) => rest
            .split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i < first),
        None => true,
    }
}

impl Fcdd {
    /// `backbone`: the pretrained tensors (prefixed as a model file stores them); `stored`: a
    /// trained model's tensors, or none for a fresh detector.
    fn new(
        cfg: FcddConfig,
        setup: &Setup,
        backbone: &HashMap<String, Tensor>,
        stored: Option<&HashMap<String, Tensor>>,
    ) -> Result<Self> {
        let input = setup.input;
        let device = setup.device;
        let (prefixed, bare) = stored_backbone(backbone);
        let frozen: HashMap<String, Tensor> = prefixed
            .into_iter()
            .filter(|(k, _)| is_frozen(k, cfg.trainable_from))
            .collect();
        let vars = VarMap::new();
        let params = FcddNetParams {
            height: input.height,
            width: input.width,
            first_trainable: cfg.trainable_from,
            sigma_224: cfg.sigma,
            seed: setup.seed,
        };
        let train = FcddNet::new(&bare, &vars, stored, &params, device)?;
        let eval = train.detached();
        let sgd = Sgd::new(
            &vars,
            SgdParams {
                lr: cfg.lr,
                momentum: cfg.momentum,
                nesterov: true,
                weight_decay: cfg.weight_decay,
            },
        )?;
        let range = match stored {
            Some(t) => (stored_scalar(t, NORM_MIN)?, stored_scalar(t, NORM_MAX)?),
            None => (0.0, 1.0),
        };
        Ok(Fcdd {
            confetti: AnomalySynth::single(AnomalyGenerator::Confetti(cfg.confetti.clone()))?,
            state: TrainState::new().with_group(NET_GROUP, vars, sgd),
            cfg,
            input,
            frozen,
            train,
            eval,
            fast: FastSnapshot::default(),
            range,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &FcddConfig {
        &self.cfg
    }

    /// One training sample: with `anomaly_probability` replaced by an anomalous image (a real
    /// defect when the training set has any, confetti noise otherwise; never both), then FCDD's
    /// augmentation and preprocessing.
    fn sample(&self, good: &Image, defects: &[Defective], rng: &mut Rng) -> Result<(Image, Mask)> {
        let (image, mask) = if rng.bool(self.cfg.anomaly_probability as f32) {
            if defects.is_empty() {
                self.confetti.apply(good, rng)?
            } else {
                let d = &defects[rng.range_usize(0, defects.len())];
                (d.image.clone(), d.mask.clone())
            }
        } else {
            (good.clone(), Mask::zeros(good.height, good.width))
        };
        let (image, mask) = augment_train(&image, Some(&mask), rng);
        Ok((preprocess(&image, self.range.0, self.range.1), mask))
    }

    /// The part of `[B, H, W]` maps the maximum score looks at: all but `score_margin` feature
    /// cells at each border, or everything when too small to leave any inside.
    fn score(&self, maps: &Tensor) -> Result<Tensor> {
        match self.cfg.score {
            ScorePooling::Mean => Ok(maps.flatten_from(1)?.mean(1)?),
            ScorePooling::Max => {
                let (_, h, w) = maps.dims3()?;
                let m = self.cfg.score_margin * 8;
                let inner = if 2 * m >= h || 2 * m >= w {
                    maps.clone()
                } else {
                    maps.narrow(1, m, h - 2 * m)?.narrow(2, m, w - 2 * m)?
                };
                Ok(inner.flatten_from(1)?.max(1)?)
            }
        }
    }

    fn fast_engine(&self) -> Result<Arc<FastLite0>> {
        self.fast.get_or_build(|| self.eval.fast_engine())
    }

    /// The inference pass, on the fast CPU trunk where `fast` and on the CPU; `lap` is called after
    /// each stage.
    fn forward(
        &self,
        images: &Tensor,
        fast: bool,
        mut lap: impl FnMut(&'static str) -> Result<()>,
    ) -> Result<Inference> {
        self.input.check_batch(images)?;
        if fast && images.device().is_cpu() {
            return self.forward_fast(images, lap);
        }
        let x = preprocess_tensor(images, self.range.0, self.range.1)?;
        lap("preprocess")?;
        let maps = self.eval.upsample(&self.eval.forward_candle(&x)?)?;
        lap("backbone")?;
        let scores = self.score(&maps)?;
        lap("head and map")?;
        Ok(Inference { maps, scores })
    }

    /// [`Fcdd::forward`] on the fast CPU kernels: the batch normalised straight from the input
    /// tensor into one buffer, the trunk, then head, map and score in plain loops (what
    /// [`Fcdd::score`] does on tensors).
    fn forward_fast(
        &self,
        images: &Tensor,
        mut lap: impl FnMut(&'static str) -> Result<()>,
    ) -> Result<Inference> {
        let dims: [usize; 4] = images.dims4()?.into();
        let [batch, _, height, width] = dims;
        let plane = dims[1] * height * width;
        let mut values = vec![0.0f32; batch * plane];
        with_cpu_f32(images, |src| {
            for (src, dst) in src.chunks_exact(plane).zip(values.chunks_exact_mut(plane)) {
                normalize_into(src, dst, self.range.0, self.range.1);
            }
            Ok(())
        })?;
        lap("preprocess")?;
        let features = self
            .eval
            .features_from_values(&*self.fast_engine()?, &values, dims)?;
        lap("backbone")?;
        let mut maps = vec![0.0f32; batch * height * width];
        self.eval.maps_from_features(&features, &mut maps)?;
        let scores: Vec<f32> = maps
            .chunks_exact(height * width)
            .map(|map| self.score_values(map, height, width))
            .collect();
        let device = images.device();
        let out = Inference {
            maps: Tensor::from_vec(maps, (batch, height, width), device)?,
            scores: Tensor::from_vec(scores, batch, device)?,
        };
        lap("head and map")?;
        Ok(out)
    }

    /// [`Fcdd::score`] of one row-major `height`×`width` map.
    fn score_values(&self, map: &[f32], height: usize, width: usize) -> f32 {
        match self.cfg.score {
            ScorePooling::Mean => (lane_sum(map, f64::from) / map.len().max(1) as f64) as f32,
            ScorePooling::Max => {
                let m = self.cfg.score_margin * 8;
                let (rows, cols) = if 2 * m >= height || 2 * m >= width {
                    (0..height, 0..width)
                } else {
                    (m..height - m, m..width - m)
                };
                rows.map(|y| lane_max(&map[y * width..(y + 1) * width][cols.clone()]))
                    .fold(f32::NEG_INFINITY, f32::max)
            }
        }
    }
}

impl Method for Fcdd {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn phases(&self) -> Vec<PhaseSpec> {
        vec![PhaseSpec {
            name: "fcdd",
            input: PhaseInput::Images,
            epochs: self.cfg.epochs * self.cfg.passes_per_epoch,
            min_steps: self.cfg.min_steps,
            batch: Some(self.cfg.batch),
            selection: Selection::Last,
        }]
    }

    fn learns_from_defects(&self) -> bool {
        true
    }

    /// Confetti noise, whenever it had no real defects to learn from (a loaded model does not
    /// say, so always).
    fn synthetic_kinds(&self) -> Vec<&'static str> {
        vec!["confetti"]
    }

    /// FCDD's min-max constants from the defect-free training images.
    fn prepare(&mut self, set: &TrainSet) -> Result<()> {
        self.range = lcn_range(&set.good)?;
        Ok(())
    }

    fn step_losses(&mut self, batch: &TrainBatch, rng: &mut Rng) -> Result<StepLosses> {
        let lr = self.cfg.learning_rate(batch.epoch);
        self.state.optimizer_mut(NET_GROUP)?.set_learning_rate(lr);
        let mut images = Vec::with_capacity(batch.good.len());
        let mut masks = Vec::with_capacity(batch.good.len() * self.input.height * self.input.width);
        for good in &batch.good {
            let (image, mask) = self.sample(good, batch.defects, rng)?;
            masks.extend(mask.data.iter().map(|&m| f32::from(m)));
            images.push(image);
        }
        let device = self.device.clone();
        let refs: Vec<&Image> = images.iter().collect();
        let x = batch_tensor(&refs, &device)?;
        let y = Tensor::from_vec(
            masks,
            (images.len(), self.input.height, self.input.width),
            &device,
        )?;
        let loss = self.cfg.loss.loss(&self.train.upsampled(&x)?, &y)?;
        Ok(StepLosses {
            logged: vec![("loss", loss.clone())],
            objectives: vec![(NET_GROUP, loss)],
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

    fn extra_state(&self) -> Result<HashMap<String, Tensor>> {
        let device = self.device.clone();
        Ok(HashMap::from([
            (NORM_MIN.to_string(), Tensor::new(&[self.range.0], &device)?),
            (NORM_MAX.to_string(), Tensor::new(&[self.range.1], &device)?),
        ]))
    }

    fn restore_extra_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.range = (
            stored_scalar(state, NORM_MIN)?,
            stored_scalar(state, NORM_MAX)?,
        );
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
        let mut all = self.state.tensors()?;
        all.extend(self.extra_state()?);
        all.extend(self.frozen.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(all)
    }

    fn config_json(&self) -> Result<serde_json::Value> {
        config_check::to_json(ENTRY.name, &self.cfg)
    }

    fn backbone_blocks(&self) -> Option<(Vec<usize>, Option<usize>)> {
        Some((vec![CUT_BLOCK], Some(self.cfg.trainable_from)))
    }
}
