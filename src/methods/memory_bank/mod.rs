//! A memory-bank detector (PatchCore, Roth et al. 2022, on vigil's Lite0 features): no training,
//! the defect-free parts' patch features are the model.
//!
//! Two phases fitted without optimiser steps ([`Learning::Fitted`]):
//! - **bank**: every training image's patch features (Lite0 taps brought to the finest tap's
//!   stride, each position averaged over its neighbourhood, projected and centred:
//!   [`features`]); at the end of the pass a greedy k-centre coreset of them ([`coreset`]) becomes
//!   the bank, and each training image's mean feature the image-level bank;
//! - **scale**: the mean and standard deviation of both scores on the defect-free validation
//!   images, which standardise them for the fusion.
//!
//! Inference: each position's distance to its nearest bank entry ([`search`]: one GEMM against the
//! bank, tiled; or, with `index_lists`, approximately through an inverted file, [`index`]) is the
//! anomaly map; the image score is its maximum inside the border margin, plus,
//! with `fusion`, the image's distance to its nearest training image, each standardised.
pub mod config;
pub mod coreset;
pub mod features;
pub mod index;
pub mod search;

pub use config::MemoryBankConfig;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};

use self::features::{neighbourhood_mean, neighbourhood_mean_candle, random_projection, Projector};
use self::index::InvertedBank;
use self::search::{nearest_sq_candle, PackedBank};
use super::config_check;
use crate::data::{batch_tensor, Image, InputSpec};
use crate::error::{Error, Result};
use crate::methods::anomaly_map::MapResizer;
use crate::methods::{
    pretrained_backbone, stored_backbone, FitContext, Inference, Learning, Method, MethodEntry,
    PhaseInput, PhaseSpec, Selection, Setup, StepLosses, TrainBatch,
};
use crate::model_file::stored;
use crate::nn::backbone::Lite0Features;
use crate::nn::kernels::{ASource, Activation, Epilogue, Kernels, PackedB};
use crate::nn::train_state::TrainState;
use crate::nn::FeatureExtractor;
use crate::rng::Rng;

/// Raised whenever older memory-bank model files would load or score differently.
pub const VERSION: u32 = 1;

pub const ENTRY: MethodEntry = MethodEntry {
    name: "memory-bank",
    summary: "frozen Lite0 patch features, a greedy-coreset memory bank, nearest-neighbour \
              distance (PatchCore), fused with an image-level neighbour; no training, fitted \
              in one pass",
    version: VERSION,
    learns_from_defects: false,
    uses_backbone: true,
    default_config: || config_check::to_json("memory-bank", &MemoryBankConfig::default()),
    tiny_config: || {
        serde_json::json!({
            "taps": [2, 4], "projection": 16, "selection_dims": 8, "bank_ratio": 0.25,
            "score_margin": 0, "score_window": 3
        })
    },
    create: |setup: &Setup, backbone: &Path| {
        let cfg = parse(setup)?;
        let last = cfg.taps.iter().copied().max().unwrap_or(0);
        let mut frozen = pretrained_backbone(backbone, last, setup.device)?;
        if cfg.projection > 0 {
            let channels = channels_of(&cfg.taps)?;
            let mut rng = Rng::new(setup.seed).fork(PROJECTION_STREAM);
            let matrix = random_projection(channels, cfg.projection, &mut rng);
            frozen.insert(
                PROJECTION.to_string(),
                Tensor::from_vec(matrix, (channels, cfg.projection), setup.device)?,
            );
        }
        Ok(Box::new(MemoryBank::new(cfg, setup, frozen, None)?))
    },
    load: |setup: &Setup, tensors: &HashMap<String, Tensor>| {
        let cfg = parse(setup)?;
        let frozen = tensors
            .iter()
            .filter(|(k, _)| k.starts_with(super::BACKBONE_PREFIX) || *k == PROJECTION)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Box::new(MemoryBank::new(
            cfg,
            setup,
            frozen,
            Some(tensors),
        )?))
    },
};

/// Entries and bytes of the patch bank among a memory-bank model file's tensors (none for other
/// methods' files).
pub fn bank_size(tensors: &HashMap<String, Tensor>) -> Option<(usize, usize)> {
    let bank = tensors.get(BANK)?;
    let (entries, dims) = bank.dims2().ok()?;
    Some((entries, entries * dims * bank.dtype().size_in_bytes()))
}

fn parse(setup: &Setup) -> Result<MemoryBankConfig> {
    let cfg: MemoryBankConfig = config_check::parse("memory-bank", setup.config.clone())?;
    cfg.validate()?;
    Ok(cfg)
}

fn channels_of(taps: &[usize]) -> Result<usize> {
    taps.iter()
        .map(|&t| crate::nn::backbone::EfficientNetLite0::block_channels(t))
        .sum()
}

const BANK_PHASE: usize = 0;
const SCALE_PHASE: usize = 1;
/// The random projection `[channels, dims]` (fixed at creation, from the seed).
const PROJECTION: &str = "projection";
/// The fitted state: the coreset `[M, D]`, every training image's mean feature `[N, D]`, the
/// centre the features are searched around `[D]`, and each score's validation mean and standard
/// deviation `[2]`.
const BANK: &str = "bank.patches";
const IMAGES: &str = "bank.images";
const CENTRE: &str = "bank.centre";
const SCALE_PATCH: &str = "scale.patch";
const SCALE_IMAGE: &str = "scale.image";
/// The fewest validation images the fusion standardises on: with two or three, the fused
/// validation scores can all but coincide (each score's z-values are ±1 and may cancel), and so
/// would the statistics a calibration is checked against.
pub const MIN_FUSION_VALIDATION: usize = 5;
/// Rng streams of the seed: the projection, the selection's projection, its first centre.
const PROJECTION_STREAM: u64 = 0x9e0;
const SELECTION_STREAM: u64 = 0x5e1;

/// The bank and what the search needs of it.
struct Fitted {
    projector: Projector,
    bank: Tensor,
    bank_sq: Tensor,
    images: Tensor,
    images_sq: Tensor,
    /// Both banks packed for the fast kernels (CPU).
    fast: Option<(PatchSearch, PackedBank)>,
}

/// How the fast path searches the patch bank.
enum PatchSearch {
    Exact(PackedBank),
    Inverted(Box<InvertedBank>),
}

impl PatchSearch {
    fn nearest_sq(&self, kernels: Kernels, queries: &[f32], out: &mut [f32]) -> Result<()> {
        match self {
            PatchSearch::Exact(bank) => bank.nearest_sq(kernels, queries, out),
            PatchSearch::Inverted(bank) => bank.nearest_sq(kernels, queries, out),
        }
    }
}

impl Fitted {
    /// `cfg` gives the index (`index_lists`, `index_probes`) the fast path searches with.
    fn new(
        cfg: &MemoryBankConfig,
        channels: usize,
        projection: Option<&Tensor>,
        centre: Vec<f32>,
        bank: Tensor,
        images: Tensor,
        device: &Device,
    ) -> Result<Fitted> {
        let projector = Projector::new(channels, projection, centre, device)?;
        let dims = projector.dims();
        for (name, t) in [(BANK, &bank), (IMAGES, &images)] {
            let (rows, cols) = t.dims2()?;
            if rows == 0 || cols != dims {
                return Err(Error::invalid(
                    format!("memory bank tensor `{name}`"),
                    format!("shape {:?}, expected [at least 1, {dims}]", t.dims()),
                ));
            }
        }
        let bank = bank.to_device(device)?.to_dtype(DType::F32)?;
        let images = images.to_device(device)?.to_dtype(DType::F32)?;
        let fast = if device.is_cpu() {
            let values = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
            let entries = values(&bank)?;
            let patches = if cfg.index_lists > 0 {
                PatchSearch::Inverted(Box::new(InvertedBank::new(
                    Kernels::detect(),
                    &entries,
                    dims,
                    cfg.index_lists,
                    cfg.index_probes,
                )?))
            } else {
                PatchSearch::Exact(PackedBank::new(&entries, dims)?)
            };
            Some((patches, PackedBank::new(&values(&images)?, dims)?))
        } else {
            None
        };
        Ok(Fitted {
            projector,
            bank_sq: bank.sqr()?.sum(1)?,
            images_sq: images.sqr()?.sum(1)?,
            bank,
            images,
            fast,
        })
    }
}

/// Each score's mean and standard deviation on the validation images (identity until fitted).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Scale {
    patch: (f32, f32),
    image: (f32, f32),
}

impl Default for Scale {
    fn default() -> Self {
        Scale {
            patch: (0.0, 1.0),
            image: (0.0, 1.0),
        }
    }
}

/// What the bank phase's pass has seen: every position's vector and every image's mean, before
/// centring.
#[derive(Default)]
struct Seen {
    patches: Vec<f32>,
    images: Vec<f32>,
}

/// Buffers of the fast path, reused from part to part.
#[derive(Default)]
struct Scratch {
    transposed: Vec<f32>,
    averaged: Vec<f32>,
    vectors: Vec<f32>,
    nearest: Vec<f32>,
    means: Vec<f32>,
    image_nearest: Vec<f32>,
}

/// Both scores of a batch before they are combined.
struct Raw {
    /// `[B, h, w]` distance of each position to its nearest bank entry.
    per_position: Tensor,
    /// Per image: the maximum of `per_position` inside the margin, and the image-level distance.
    patch: Vec<f32>,
    image: Vec<f32>,
}

pub struct MemoryBank {
    cfg: MemoryBankConfig,
    input: InputSpec,
    extractor: Lite0Features,
    /// The backbone's tensors and the projection, as the model file stores them.
    frozen: HashMap<String, Tensor>,
    channels: usize,
    /// Cells of the feature map.
    grid: (usize, usize),
    /// No trainable parameter: the method is fitted, not trained.
    state: TrainState,
    seed: u64,
    /// The projection without a centre, for the bank phase's pass.
    pass_projector: Projector,
    seen: Seen,
    fitted: Option<Fitted>,
    scale: Scale,
    resizer: MapResizer,
    kernels: Kernels,
    scratch: Mutex<Scratch>,
    device: Device,
}

impl MemoryBank {
    /// `frozen`: the backbone's tensors (prefixed) and the projection; `stored`: a fitted model's
    /// tensors, or none for a fresh detector.
    fn new(
        cfg: MemoryBankConfig,
        setup: &Setup,
        frozen: HashMap<String, Tensor>,
        stored_tensors: Option<&HashMap<String, Tensor>>,
    ) -> Result<Self> {
        let device = setup.device;
        let input = setup.input;
        let (_, bare) = stored_backbone(&frozen);
        let extractor = Lite0Features::new(&bare, cfg.taps.clone(), device)?;
        let channels = extractor.out_channels();
        let stride = extractor.stride();
        let grid = (input.height.div_ceil(stride), input.width.div_ceil(stride));
        let projection = match (cfg.projection, frozen.get(PROJECTION)) {
            (0, None) => None,
            (dims, Some(m)) if dims > 0 => {
                stored(&frozen, PROJECTION, &[channels, dims])?;
                Some(m.clone())
            }
            (dims, _) => {
                return Err(Error::invalid(
                    format!("model tensor `{PROJECTION}`"),
                    format!("does not match the config's projection of {dims} dimensions"),
                ))
            }
        };
        let dims = projection.as_ref().map_or(Ok(channels), |m| m.dim(1))?;
        let mut bank = MemoryBank {
            pass_projector: Projector::new(channels, projection.as_ref(), vec![0.0; dims], device)?,
            resizer: MapResizer::new(
                grid,
                (input.height, input.width),
                cfg.smoothing_sigma,
                device,
            )?,
            cfg,
            input,
            extractor,
            frozen,
            channels,
            grid,
            state: TrainState::new(),
            seed: setup.seed,
            seen: Seen::default(),
            fitted: None,
            scale: Scale::default(),
            kernels: Kernels::detect(),
            scratch: Mutex::new(Scratch::default()),
            device: device.clone(),
        };
        if let Some(tensors) = stored_tensors {
            bank.restore_extra_state(tensors)?;
            if bank.fitted.is_none() {
                return Err(Error::invalid(
                    format!("model tensor `{BANK}`"),
                    "missing: the memory bank was never fitted",
                ));
            }
        }
        Ok(bank)
    }

    pub fn config(&self) -> &MemoryBankConfig {
        &self.cfg
    }

    /// Entries of the patch bank (0 before the bank phase).
    pub fn bank_len(&self) -> usize {
        self.fitted.as_ref().map_or(0, |f| f.bank.dims()[0])
    }

    /// The dimensions the bank is searched in.
    pub fn dims(&self) -> usize {
        self.pass_projector.dims()
    }

    fn fitted(&self) -> Result<&Fitted> {
        self.fitted.as_ref().ok_or_else(|| {
            Error::invalid("memory bank", "not fitted yet: the bank phase has not run")
        })
    }

    /// The search vectors `[B·h·w, D]` of backbone features `[B, C, h, w]` on the fast kernels,
    /// into `scratch.vectors`.
    fn vectors_fast(
        &self,
        projector: &Projector,
        features: &Tensor,
        s: &mut Scratch,
    ) -> Result<()> {
        let dims: [usize; 4] = features.dims4()?.into();
        let values = features.flatten_all()?.to_vec1::<f32>()?;
        neighbourhood_mean(
            &values,
            dims,
            self.cfg.neighbourhood,
            &mut s.transposed,
            &mut s.averaged,
        );
        projector.apply(self.kernels, &s.averaged, &mut s.vectors)
    }

    fn vectors_candle(&self, projector: &Projector, features: &Tensor) -> Result<Tensor> {
        projector.apply_candle(&neighbourhood_mean_candle(
            features,
            self.cfg.neighbourhood,
        )?)
    }

    /// The image score's region of a `[h, w]` grid of one image: all but `score_margin` cells at
    /// each border, or everything when too small to leave any inside.
    fn margin(&self) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let (h, w) = self.grid;
        let m = self.cfg.score_margin;
        if 2 * m >= h || 2 * m >= w {
            (0..h, 0..w)
        } else {
            (m..h - m, m..w - m)
        }
    }

    /// Each image's patch score from its `[h, w]` distances (one image after another): the
    /// maximum inside the margin of the distances averaged over `score_window` cells.
    fn patch_scores(&self, per_position: &[f32]) -> Vec<f32> {
        let (h, w) = self.grid;
        let (rows, cols) = self.margin();
        let r = self.cfg.score_window / 2;
        per_position
            .chunks_exact(h * w)
            .map(|map| {
                let mut best = f32::NEG_INFINITY;
                for y in rows.clone() {
                    let ys = y.saturating_sub(r)..(y + r + 1).min(h);
                    for x in cols.clone() {
                        let xs = x.saturating_sub(r)..(x + r + 1).min(w);
                        let sum: f32 = ys
                            .clone()
                            .flat_map(|yy| &map[yy * w + xs.start..yy * w + xs.end])
                            .sum();
                        best = best.max(sum / (ys.len() * xs.len()) as f32);
                    }
                }
                best
            })
            .collect()
    }

    /// Both scores of a batch, on the fast kernels where `fast` and on the CPU.
    fn raw(
        &self,
        images: &Tensor,
        fast: bool,
        lap: &mut dyn FnMut(&'static str) -> Result<()>,
    ) -> Result<Raw> {
        self.input.check_batch(images)?;
        let fitted = self.fitted()?;
        let batch = images.dim(0)?;
        let (h, w) = self.grid;
        let positions = h * w;
        let fast_banks = fitted
            .fast
            .as_ref()
            .filter(|_| fast && images.device().is_cpu());
        let features = if fast {
            self.extractor.extract(images)?
        } else {
            self.extractor.extract_reference(images)?
        };
        lap("features")?;
        let (per_position, patch, image) = match fast_banks {
            Some((bank, image_bank)) => {
                let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
                let s = &mut *guard;
                self.vectors_fast(&fitted.projector, &features, s)?;
                s.nearest.resize(batch * positions, 0.0);
                bank.nearest_sq(self.kernels, &s.vectors, &mut s.nearest)?;
                let dims = image_bank.dims();
                image_means(&s.vectors, batch, dims, &mut s.means);
                s.image_nearest.resize(batch, 0.0);
                image_bank.nearest_sq(self.kernels, &s.means, &mut s.image_nearest)?;
                lap("search")?;
                let per_position: Vec<f32> = s.nearest.iter().map(|d| d.sqrt()).collect();
                let patch = self.patch_scores(&per_position);
                let image = s.image_nearest.iter().map(|d| d.sqrt()).collect();
                let per_position = Tensor::from_vec(per_position, (batch, h, w), images.device())?;
                (per_position, patch, image)
            }
            None => {
                let vectors = self.vectors_candle(&fitted.projector, &features)?;
                let per_position = nearest_sq_candle(&vectors, &fitted.bank, &fitted.bank_sq)?
                    .sqrt()?
                    .reshape((batch, h, w))?;
                let means = vectors.reshape((batch, positions, ()))?.mean(1)?;
                let image = nearest_sq_candle(&means, &fitted.images, &fitted.images_sq)?
                    .sqrt()?
                    .to_vec1::<f32>()?;
                lap("search")?;
                let patch = self.patch_scores(&per_position.flatten_all()?.to_vec1::<f32>()?);
                (per_position, patch, image)
            }
        };
        Ok(Raw {
            per_position,
            patch,
            image,
        })
    }

    fn forward(
        &self,
        images: &Tensor,
        fast: bool,
        lap: &mut dyn FnMut(&'static str) -> Result<()>,
    ) -> Result<Inference> {
        let raw = self.raw(images, fast, lap)?;
        let maps = self.resizer.resize(&raw.per_position)?;
        let s = self.scale;
        let scores: Vec<f32> = raw
            .patch
            .iter()
            .zip(&raw.image)
            .map(|(&p, &i)| {
                if self.cfg.fusion {
                    (p - s.patch.0) / s.patch.1 + (i - s.image.0) / s.image.1
                } else {
                    p
                }
            })
            .collect();
        let scores = Tensor::from_vec(scores, images.dim(0)?, images.device())?;
        lap("map and score")?;
        Ok(Inference { maps, scores })
    }

    /// The bank phase's work on one batch: its vectors and image means, before centring.
    fn see(&mut self, images: &[&Image]) -> Result<()> {
        let x = batch_tensor(images, &self.device)?;
        self.input.check_batch(&x)?;
        let dims = self.dims();
        let positions = self.grid.0 * self.grid.1;
        let features = self.extractor.extract(&x)?;
        let vectors = if self.device.is_cpu() {
            let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
            self.vectors_fast(&self.pass_projector, &features, &mut guard)?;
            std::mem::take(&mut guard.vectors)
        } else {
            self.vectors_candle(&self.pass_projector, &features)?
                .flatten_all()?
                .to_vec1::<f32>()?
        };
        let mut means = Vec::new();
        image_means(&vectors, images.len(), dims, &mut means);
        debug_assert_eq!(vectors.len(), images.len() * positions * dims);
        self.seen.patches.extend_from_slice(&vectors);
        self.seen.images.extend_from_slice(&means);
        Ok(())
    }

    /// The end of the bank phase: centre what was seen, select the coreset, build the banks.
    fn fit_bank(&mut self, fit: &FitContext) -> Result<Vec<(&'static str, f32)>> {
        let dims = self.dims();
        let Seen {
            mut patches,
            mut images,
        } = std::mem::take(&mut self.seen);
        let candidates = patches.len() / dims;
        if candidates == 0 {
            return Err(Error::invalid("memory bank", "no training image was seen"));
        }
        let mut sums = vec![0f64; dims];
        for row in patches.chunks_exact(dims) {
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += f64::from(v);
            }
        }
        let centre: Vec<f32> = sums
            .iter()
            .map(|s| (s / candidates as f64) as f32)
            .collect();
        for row in patches
            .chunks_exact_mut(dims)
            .chain(images.chunks_exact_mut(dims))
        {
            for (v, c) in row.iter_mut().zip(&centre) {
                *v -= c;
            }
        }
        let by_ratio = (self.cfg.bank_ratio * candidates as f64).ceil() as usize;
        let by_bytes = (self.cfg.bank_max_bytes / (4 * dims as u64)) as usize;
        let k = by_ratio.min(by_bytes).clamp(1, candidates);
        if by_bytes < by_ratio {
            log::info!(
                "memory bank: {k} entries instead of {by_ratio} ({} of {candidates}) to stay within \
                 bank_max_bytes {}",
                self.cfg.bank_ratio,
                self.cfg.bank_max_bytes
            );
        }
        let mut rng = Rng::new(self.seed).fork(SELECTION_STREAM);
        let sketch_dims = match self.cfg.selection_dims {
            s if s > 0 && s < dims => s,
            _ => dims,
        };
        let sketch = if sketch_dims < dims {
            let matrix = random_projection(dims, sketch_dims, &mut rng);
            let packed = PackedB::new(
                dims,
                sketch_dims,
                |k, j| matrix[k * sketch_dims + j],
                &vec![0.0; sketch_dims],
            );
            let mut out = vec![0.0; candidates * sketch_dims];
            self.kernels.gemm(
                ASource::Matrix {
                    data: &patches,
                    lda: dims,
                },
                &packed,
                Epilogue {
                    activation: Activation::Identity,
                    residual: None,
                },
                &mut out,
            )?;
            Some(out)
        } else {
            None
        };
        let first = rng.range_usize(0, candidates);
        let started = std::time::Instant::now();
        fit.bar.set_length(k as u64);
        fit.bar
            .set_message(format!("coreset of {candidates} positions"));
        let coreset = coreset::greedy_k_centre(
            sketch.as_deref().unwrap_or(&patches),
            sketch_dims,
            k,
            first,
            Some(fit.bar),
        )?;
        drop(sketch);
        let mut bank = Vec::with_capacity(coreset.indices.len() * dims);
        for &i in &coreset.indices {
            bank.extend_from_slice(&patches[i * dims..(i + 1) * dims]);
        }
        drop(patches);
        let entries = coreset.indices.len();
        let n_images = images.len() / dims;
        self.fitted = Some(Fitted::new(
            &self.cfg,
            self.channels,
            self.frozen.get(PROJECTION),
            centre,
            Tensor::from_vec(bank, (entries, dims), &self.device)?,
            Tensor::from_vec(images, (n_images, dims), &self.device)?,
            &self.device,
        )?);
        log::info!(
            "memory bank: {entries} entries of {dims} dimensions ({:.1} MiB) from {candidates} \
             positions of {n_images} images in {:.1} s; covering radius {:.4} in the selection's \
             {sketch_dims} dimensions",
            (entries * dims * 4) as f64 / (1 << 20) as f64,
            started.elapsed().as_secs_f64(),
            coreset.radius
        );
        Ok(vec![
            ("entries", entries as f32),
            ("covering radius", coreset.radius),
        ])
    }

    /// The end of the scale phase: both scores' statistics on the validation images.
    fn fit_scale(&mut self, fit: &FitContext) -> Result<Vec<(&'static str, f32)>> {
        self.scale = Scale::default();
        if !self.cfg.fusion {
            return Ok(Vec::new());
        }
        if fit.validation.len() < MIN_FUSION_VALIDATION {
            return Err(Error::invalid(
                "memory bank fusion",
                format!(
                    "standardises both scores on the defect-free validation images, and there \
                     are {}: give at least {MIN_FUSION_VALIDATION} (--validation-fraction), or set \
                     fusion = false",
                    fit.validation.len()
                ),
            ));
        }
        fit.bar.set_length(fit.validation.len() as u64);
        fit.bar.set_message("validation scores");
        let (mut patch, mut image) = (Vec::new(), Vec::new());
        for chunk in fit.validation.chunks(fit.batch_size.max(1)) {
            let refs: Vec<&Image> = chunk.iter().collect();
            let raw = self.raw(&batch_tensor(&refs, &self.device)?, true, &mut |_| Ok(()))?;
            patch.extend(raw.patch);
            image.extend(raw.image);
            fit.bar.inc(chunk.len() as u64);
        }
        let (patch, image) = (mean_std(&patch), mean_std(&image));
        for (name, (_, std)) in [("patch", patch), ("image", image)] {
            if !(std > 0.0 && std.is_finite()) {
                return Err(Error::invalid(
                    "memory bank fusion",
                    format!(
                        "the {name} scores of the validation images do not vary (std {std}): \
                         set fusion = false"
                    ),
                ));
            }
        }
        self.scale = Scale { patch, image };
        Ok(vec![
            ("patch mean", patch.0),
            ("patch std", patch.1),
            ("image mean", image.0),
            ("image std", image.1),
        ])
    }
}

/// Each image's mean vector: `vectors` `[batch · P, dims]` → `out` `[batch, dims]`.
fn image_means(vectors: &[f32], batch: usize, dims: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(batch * dims, 0.0);
    let positions = vectors.len() / (batch * dims).max(1);
    for (image, mean) in vectors
        .chunks_exact(positions * dims)
        .zip(out.chunks_exact_mut(dims))
    {
        for row in image.chunks_exact(dims) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        mean.iter_mut().for_each(|m| *m /= positions as f32);
    }
}

/// Mean and (population) standard deviation.
fn mean_std(values: &[f32]) -> (f32, f32) {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean as f32, var.sqrt() as f32)
}

fn pair(t: &HashMap<String, Tensor>, name: &str) -> Result<(f32, f32)> {
    let v = stored(t, name, &[2])?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    if !(v[0].is_finite() && v[1].is_finite() && v[1] > 0.0) {
        return Err(Error::invalid(
            format!("model tensor `{name}`"),
            format!("{v:?} is not a mean and a positive standard deviation"),
        ));
    }
    Ok((v[0], v[1]))
}

impl Method for MemoryBank {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn phases(&self) -> Vec<PhaseSpec> {
        ["bank", "scale"]
            .into_iter()
            .map(|name| PhaseSpec {
                name,
                input: PhaseInput::Images,
                epochs: 1,
                min_steps: 0,
                batch: None,
                selection: Selection::Last,
            })
            .collect()
    }

    fn learning(&self, _phase: usize) -> Learning {
        Learning::Fitted
    }

    fn step_losses(&mut self, _: &TrainBatch, _: &mut Rng) -> Result<StepLosses> {
        Err(Error::invalid(
            "training phase",
            "the memory bank is fitted without optimiser steps",
        ))
    }

    fn observe(&mut self, batch: &TrainBatch, _: &mut Rng) -> Result<()> {
        match batch.phase {
            BANK_PHASE => self.see(&batch.good),
            // The scale phase reads the validation images only.
            _ => Ok(()),
        }
    }

    fn conclude(&mut self, fit: &FitContext, _: &mut Rng) -> Result<Vec<(&'static str, f32)>> {
        match fit.phase {
            BANK_PHASE => self.fit_bank(fit),
            SCALE_PHASE => self.fit_scale(fit),
            other => Err(Error::invalid(
                "training phase",
                format!("{other}; the memory bank has 2 phases"),
            )),
        }
    }

    fn train_state(&self) -> &TrainState {
        &self.state
    }

    fn train_state_mut(&mut self) -> &mut TrainState {
        &mut self.state
    }

    /// The fitted bank, centre and score statistics (none before the bank phase).
    fn extra_state(&self) -> Result<HashMap<String, Tensor>> {
        let Some(f) = &self.fitted else {
            return Ok(HashMap::new());
        };
        let pair = |(a, b): (f32, f32)| Tensor::new(&[a, b], &self.device);
        Ok(HashMap::from([
            (BANK.to_string(), f.bank.copy()?),
            (IMAGES.to_string(), f.images.copy()?),
            (
                CENTRE.to_string(),
                Tensor::from_slice(f.projector.centre(), self.dims(), &self.device)?,
            ),
            (SCALE_PATCH.to_string(), pair(self.scale.patch)?),
            (SCALE_IMAGE.to_string(), pair(self.scale.image)?),
        ]))
    }

    fn restore_extra_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        if !state.contains_key(BANK) {
            self.fitted = None;
            self.scale = Scale::default();
            return Ok(());
        }
        let dims = self.dims();
        let centre = stored(state, CENTRE, &[dims])?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        self.fitted = Some(Fitted::new(
            &self.cfg,
            self.channels,
            self.frozen.get(PROJECTION),
            centre,
            state[BANK].clone(),
            state
                .get(IMAGES)
                .ok_or_else(|| Error::invalid(format!("model tensor `{IMAGES}`"), "missing"))?
                .clone(),
            &self.device,
        )?);
        self.scale = Scale {
            patch: pair(state, SCALE_PATCH)?,
            image: pair(state, SCALE_IMAGE)?,
        };
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
        let mut all = self.extra_state()?;
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
