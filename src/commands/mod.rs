//! The CLI's commands as library functions: `main.rs` only parses arguments and calls these.
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;

use crate::calibration::{Calibration, ModelRef};
use crate::data::dataset::{self, DataSource, Dataset, LoadReport, SplitOptions};
use crate::data::{image, Image, InputSpec};
use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::eval::{self, heatmap_range, score_images};
use crate::methods::{self, Method};
use crate::model_file::{
    self, BackboneInfo, HeldImage, ModelMeta, Preprocessing, ScoreStats, TrainingInfo,
};
use crate::train::each_epoch::{EachEpochSummary, TestEachEpoch};
use crate::train::{self, progress_bar, EpochObserver, TrainOptions};

pub mod select;
pub mod station;
pub mod teach;

/// Where the backbone weights are installed by `models/get-weights.sh`.
pub const DEFAULT_BACKBONE: &str = "models/efficientnet-lite0.safetensors";

/// Options shared by commands that read images and run a model.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub device: DeviceChoice,
    pub batch_size: usize,
    pub skip_bad: bool,
    pub progress: bool,
}

impl RunOptions {
    /// On the CPU, without progress bars, refusing unreadable images: the demo's and the tests'.
    pub fn quiet_cpu(batch_size: usize) -> RunOptions {
        RunOptions {
            device: DeviceChoice::Cpu,
            batch_size,
            skip_bad: false,
            progress: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrainArgs {
    pub method: String,
    pub data: DataSource,
    pub out: PathBuf,
    /// A TOML file with the method's hyper-parameters; missing keys keep their defaults.
    pub config: Option<PathBuf>,
    /// `key=value` overrides applied after `config` (value parsed as JSON, else a string).
    pub set: Vec<String>,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub validation_fraction: f32,
    pub seed: u64,
    pub backbone: PathBuf,
    /// Written after every epoch; default `<out>.ckpt`.
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint when it exists.
    pub resume: bool,
    /// Train on K defective test images per defect type (MVTec layout), left out of every
    /// evaluation of the model.
    pub few_shot: Option<usize>,
    /// Use only this many defect-free training images.
    pub train_limit: Option<usize>,
    /// Stop after this many epochs, keeping the checkpoint for `--resume`.
    pub stop_after_epochs: Option<usize>,
    pub run: RunOptions,
}

impl TrainArgs {
    /// Training `method` on `data` into `out` with every other option at the command line's
    /// default: the method's default config, the data's input size, a 10% validation share, seed
    /// 0, the checkpoint beside `out`, no resume, unsupervised, every training image, to the end.
    pub fn new(
        method: &str,
        data: DataSource,
        out: PathBuf,
        backbone: PathBuf,
        run: RunOptions,
    ) -> TrainArgs {
        TrainArgs {
            method: method.to_string(),
            data,
            out,
            config: None,
            set: Vec::new(),
            height: None,
            width: None,
            validation_fraction: 0.1,
            seed: 0,
            backbone,
            checkpoint: None,
            resume: false,
            few_shot: None,
            train_limit: None,
            stop_after_epochs: None,
            run,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// `None` when the training paused before its end (`stop_after_epochs`).
    pub model: Option<PathBuf>,
    pub defect_images: usize,
    pub train_images: usize,
    pub validation: ScoreStats,
    pub seconds: f64,
    pub skipped: usize,
    /// The research diagnostic's summary (`train_testing_each_epoch`): uses test labels.
    pub test_each_epoch: Option<EachEpochSummary>,
    /// Losses, validation separation and kept epoch of every phase.
    pub report: train::TrainReport,
}

fn load(
    samples: &[dataset::Sample],
    spec: &InputSpec,
    run: &RunOptions,
    what: &str,
) -> Result<LoadReport> {
    let bar = progress_bar(samples.len() as u64, what, run.progress);
    let report = dataset::load_samples(samples, spec, run.skip_bad, Some(&bar))?;
    bar.finish_and_clear();
    for (path, why) in &report.skipped {
        log::warn!("skipped {}: {why}", path.display());
    }
    Ok(report)
}

fn source_name(source: &DataSource) -> PathBuf {
    match source {
        DataSource::Mvtec { root } => root.clone(),
        DataSource::Plain { good, .. } => good.clone(),
    }
}

/// Picks the input size from the training images when not given: short side 256, the long side
/// following the data's median aspect ratio (rounded to a multiple of 32, at most 1024), or a
/// square when the aspect ratios disagree by more than 10%.
pub fn default_input(
    samples: &[dataset::Sample],
    height: Option<usize>,
    width: Option<usize>,
) -> Result<InputSpec> {
    let probed: Vec<(usize, usize, usize)> = samples
        .iter()
        .take(64)
        .map(|s| image::probe(&s.path))
        .collect::<Result<_>>()?;
    let channels = if probed.iter().any(|p| p.0 == 3) {
        3
    } else {
        1
    };
    let (height, width) = match (height, width) {
        (Some(h), Some(w)) => (h, w),
        _ => {
            let mut aspects: Vec<f64> = probed.iter().map(|p| p.1 as f64 / p.2 as f64).collect();
            aspects.sort_by(f64::total_cmp);
            let median = aspects[aspects.len() / 2];
            let consistent = aspects.iter().all(|a| (a / median - 1.0).abs() <= 0.1);
            let aspect = if consistent { median } else { 1.0 };
            let long =
                |ratio: f64| (((256.0 * ratio) / 32.0).round() as usize * 32).clamp(256, 1024);
            let (h, w) = if aspect >= 1.0 {
                (long(aspect), 256)
            } else {
                (256, long(1.0 / aspect))
            };
            (height.unwrap_or(h), width.unwrap_or(w))
        }
    };
    if height == 0 || width == 0 {
        return Err(Error::invalid("input size", format!("{height}x{width}")));
    }
    Ok(InputSpec {
        height,
        width,
        channels,
    })
}

/// Reads a method config: TOML file, then `key=value` overrides.
pub fn method_config(config: Option<&Path>, set: &[String]) -> Result<serde_json::Value> {
    let mut value = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let table: toml::Table = toml::from_str(&text)
                .map_err(|e| Error::config(path.display().to_string(), e.to_string()))?;
            serde_json::to_value(table)
                .map_err(|e| Error::config(path.display().to_string(), e.to_string()))?
        }
        None => serde_json::Value::Object(Default::default()),
    };
    for item in set {
        let (key, raw) = item
            .split_once('=')
            .ok_or_else(|| Error::config(item.clone(), "expected key=value"))?;
        let parsed = serde_json::from_str(raw)
            .unwrap_or_else(|_| serde_json::Value::String(raw.to_string()));
        value
            .as_object_mut()
            .expect("config is a table")
            .insert(key.trim().to_string(), parsed);
    }
    Ok(value)
}

/// The `key=value` setting of a path option that only some methods take (`--anomaly-source`,
/// `--reference`): an error naming the option when `method`'s config has no such key.
pub fn path_setting(method: &str, key: &str, path: &Path) -> Result<String> {
    let defaults = (methods::entry(method)?.default_config)()?;
    if defaults.get(key).is_none() {
        return Err(Error::config(
            format!("--{}", key.replace('_', "-")),
            format!("{method} takes no {key}"),
        ));
    }
    let value = serde_json::to_string(path)
        .map_err(|e| Error::config(key, format!("{}: {e}", path.display())))?;
    Ok(format!("{key}={value}"))
}

/// The data set folder a sample's path is named relative to in a model file.
fn data_root(source: &DataSource) -> &Path {
    match source {
        DataSource::Mvtec { root } => root,
        DataSource::Plain { defect, good, .. } => defect.as_deref().unwrap_or(good),
    }
}

/// The record of a defective training image: its path relative to the data root and its digest.
fn held_image(sample: &dataset::Sample, root: &Path) -> Result<HeldImage> {
    let bytes = std::fs::read(&sample.path).map_err(|e| Error::io(&sample.path, e))?;
    let relative = sample.path.strip_prefix(root).unwrap_or(&sample.path);
    Ok(HeldImage {
        path: relative.display().to_string(),
        sha256: crate::digest::sha256_hex(&bytes),
    })
}

pub fn train(args: &TrainArgs) -> Result<TrainSummary> {
    train_observed(args, None)
}

/// [`train`] with the research diagnostic of `vigil train --eval-each-epoch DATA`: the test split
/// of `test_data` (MVTec layout) is scored after every epoch and tabulated beside the model
/// ([`train::each_epoch`]). It uses test labels, and never selects or calibrates the model.
pub fn train_testing_each_epoch(args: &TrainArgs, test_data: &Path) -> Result<TrainSummary> {
    if args.resume || args.stop_after_epochs.is_some() {
        return Err(Error::config(
            "eval-each-epoch",
            "tabulates every epoch of one uninterrupted run: drop --resume / --stop-after-epochs",
        ));
    }
    train_observed(args, Some(test_data))
}

/// The test split of `root` at `input`, less the images the model trains on, for the diagnostic.
fn test_each_epoch(
    root: &Path,
    input: &InputSpec,
    held: &[HeldImage],
    args: &TrainArgs,
    device: &Device,
) -> Result<TestEachEpoch> {
    let data = Dataset::open(
        &DataSource::Mvtec { root: root.into() },
        &SplitOptions {
            validation_fraction: 0.0,
            seed: 0,
            ..Default::default()
        },
    )?;
    let test = load(
        &without_held(data.test, held)?,
        input,
        &args.run,
        "load test",
    )?;
    TestEachEpoch::new(test.loaded, root, &args.out, args.run.batch_size, device)
}

fn train_observed(args: &TrainArgs, test_data: Option<&Path>) -> Result<TrainSummary> {
    let start = Instant::now();
    let device = args.run.device.open()?;
    let split = SplitOptions {
        validation_fraction: args.validation_fraction,
        seed: args.seed,
        train_limit: args.train_limit,
    };
    let mut data = Dataset::open(&args.data, &split)?;
    match (&args.data, args.few_shot) {
        (DataSource::Mvtec { .. }, Some(k)) => data.take_few_shot(k, args.seed)?,
        (DataSource::Plain { defect: Some(_), .. }, None) => data.train_on_defects()?,
        (DataSource::Plain { .. }, Some(_)) => {
            return Err(Error::config(
                "few-shot",
                "takes test images of an MVTec-layout data set; with plain folders pass --defect and --masks",
            ))
        }
        _ => {}
    }
    let input = default_input(&data.train, args.height, args.width)?;
    log::info!(
        "training {} on {} images ({} for validation, {} defective) at {}x{}x{}",
        args.method,
        data.train.len(),
        data.validation.len(),
        data.train_defects.len(),
        input.channels,
        input.height,
        input.width
    );
    let setup = methods::Setup {
        config: method_config(args.config.as_deref(), &args.set)?,
        input,
        seed: args.seed,
        device: &device,
    };
    let entry = methods::entry(&args.method)?;
    methods::check_defects_allowed(
        entry.name,
        entry.learns_from_defects,
        data.train_defects.len(),
    )?;
    let mut method = (entry.create)(&setup, &args.backbone)?;
    let train_set = load(&data.train, &input, &args.run, "load")?;
    let val_set = load(&data.validation, &input, &args.run, "load val")?;
    // A defective image is only useful with its mask: an unreadable one is an error, not a skip.
    let defect_set = load(
        &data.train_defects,
        &input,
        &RunOptions {
            skip_bad: false,
            ..args.run.clone()
        },
        "load defects",
    )?;
    let used: Vec<dataset::Sample> = data
        .train
        .iter()
        .filter(|s| !train_set.skipped.iter().any(|(p, _)| p == &s.path))
        .chain(&data.train_defects)
        .cloned()
        .collect();
    let data_fingerprint = dataset::fingerprint(&used)?;
    let root = data_root(&args.data);
    let defects_record = data
        .train_defects
        .iter()
        .map(|s| held_image(s, root))
        .collect::<Result<Vec<_>>>()?;
    let set = methods::TrainSet {
        good: train_set.loaded.into_iter().map(|l| l.image).collect(),
        defects: defect_set
            .loaded
            .into_iter()
            .map(|l| methods::Defective {
                mask: l.mask.expect("checked by Dataset::check_defect_masks"),
                image: l.image,
            })
            .collect(),
    };
    let train_images = set.good.len();
    let val_images: Vec<Image> = val_set.loaded.iter().map(|l| l.image.clone()).collect();
    let opts = TrainOptions {
        batch_size: args.run.batch_size,
        seed: args.seed,
        progress: args.run.progress,
        checkpoint: Some(
            args.checkpoint
                .clone()
                .unwrap_or_else(|| args.out.with_extension("ckpt")),
        ),
        resume: args.resume,
        data_fingerprint: data_fingerprint.clone(),
        stop_after_epochs: args.stop_after_epochs,
    };
    let mut diagnostic = test_data
        .map(|root| test_each_epoch(root, &input, &defects_record, args, &device))
        .transpose()?;
    let observer: &mut dyn EpochObserver = match diagnostic.as_mut() {
        Some(d) => d,
        None => &mut (),
    };
    let report = train::fit_observed(method.as_mut(), &set, &val_images, &opts, &device, observer)?;
    drop(set);
    let summary = |model: Option<PathBuf>, validation: ScoreStats| TrainSummary {
        model,
        defect_images: defects_record.len(),
        train_images,
        validation,
        seconds: start.elapsed().as_secs_f64(),
        skipped: train_set.skipped.len() + val_set.skipped.len(),
        test_each_epoch: None,
        report: report.clone(),
    };
    if report.paused {
        return Ok(summary(None, ScoreStats::default()));
    }
    if !val_images.is_empty() {
        let refs: Vec<&Image> = val_images.iter().collect();
        let scored = score_images(method.as_ref(), &refs, args.run.batch_size, &device, false)?;
        method.fit_score_scale(&scored.scores)?;
    }
    let validation = validation_stats(method.as_ref(), &val_set, &args.run, &device)?;
    let backbone = match method.backbone_blocks() {
        Some((blocks, trained_from)) => Some(BackboneInfo {
            architecture: "efficientnet-lite0".into(),
            weights_sha256: model_file::file_sha256(&args.backbone)?,
            blocks,
            trained_from,
        }),
        None => None,
    };
    let meta = ModelMeta {
        format: model_file::FORMAT.into(),
        format_version: model_file::FORMAT_VERSION,
        method: method.name().into(),
        method_version: entry.version,
        config: method.config_json()?,
        backbone,
        input,
        preprocessing: Preprocessing::default(),
        validation: validation.clone(),
        training: TrainingInfo {
            data_fingerprint,
            train_images,
            defects: defects_record.clone(),
            validation_images: val_set.loaded.len(),
            seed: args.seed,
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            vigil_version: env!("CARGO_PKG_VERSION").into(),
            device: format!("{device:?}"),
            seconds: report.seconds,
        },
    };
    model_file::save(&args.out, &meta, &method.tensors()?)?;
    let mut done = summary(Some(args.out.clone()), validation);
    done.test_each_epoch = diagnostic.map(|d| d.finish(&report)).transpose()?;
    if let Some(d) = &done.test_each_epoch {
        done.seconds -= d.seconds;
    }
    Ok(done)
}

/// One registered method as `vigil methods` lists it.
pub fn methods() -> Vec<&'static methods::MethodEntry> {
    methods::REGISTRY.iter().collect()
}

fn validation_stats(
    method: &dyn Method,
    val: &LoadReport,
    run: &RunOptions,
    device: &Device,
) -> Result<ScoreStats> {
    if val.loaded.is_empty() {
        log::warn!("no validation images: the model file carries no score statistics");
        return Ok(ScoreStats::default());
    }
    let images: Vec<&Image> = val.loaded.iter().map(|l| &l.image).collect();
    let mut scored = score_images(method, &images, run.batch_size, device, run.progress)?;
    Ok(ScoreStats::from_values(&scored.scores, &mut scored.maps))
}

/// Loads a model file and rebuilds its detector.
pub fn open_model(path: &Path, device: &Device) -> Result<(ModelMeta, Box<dyn Method>)> {
    let (meta, tensors) = model_file::load(path, device)?;
    let method = methods::from_model_file(&meta, tensors, path, device)?;
    Ok((meta, method))
}

#[derive(Clone, Debug)]
pub struct EvalArgs {
    pub model: PathBuf,
    pub data: DataSource,
    pub out: PathBuf,
    pub run: RunOptions,
}

pub fn eval(args: &EvalArgs) -> Result<eval::EvalReport> {
    let device = args.run.device.open()?;
    let (meta, method) = open_model(&args.model, &device)?;
    let data = Dataset::open(
        &args.data,
        &SplitOptions {
            validation_fraction: 0.0,
            seed: 0,
            ..Default::default()
        },
    )?;
    let test = without_trained_defects(data.test, &meta)?;
    if test.is_empty() {
        return Err(Error::Dataset {
            path: source_name(&args.data),
            reason: "no test images".into(),
        });
    }
    let test = load(&test, &meta.input, &args.run, "load test")?;
    eval::evaluate(
        method.as_ref(),
        &meta,
        &test.loaded,
        &test.skipped,
        (&args.model, &source_name(&args.data)),
        &args.out,
        args.run.batch_size,
        &device,
        args.run.progress,
    )
}

/// `samples` less the defective images the model trained on (recognised by their bytes, wherever
/// the set lives): an evaluation or calibration never sees them.
pub fn without_trained_defects(
    samples: Vec<dataset::Sample>,
    meta: &ModelMeta,
) -> Result<Vec<dataset::Sample>> {
    without_held(samples, &meta.training.defects)
}

/// `samples` less the `held` defective training images (recognised by their bytes).
fn without_held(samples: Vec<dataset::Sample>, held: &[HeldImage]) -> Result<Vec<dataset::Sample>> {
    if held.is_empty() {
        return Ok(samples);
    }
    let trained: std::collections::HashSet<&str> = held.iter().map(|h| h.sha256.as_str()).collect();
    let mut kept = Vec::with_capacity(samples.len());
    for sample in samples {
        let bytes = std::fs::read(&sample.path).map_err(|e| Error::io(&sample.path, e))?;
        if trained.contains(crate::digest::sha256_hex(&bytes).as_str()) {
            log::info!(
                "left out {}: the model trained on it",
                sample.path.display()
            );
        } else {
            kept.push(sample);
        }
    }
    Ok(kept)
}

#[derive(Clone, Debug)]
pub struct CalibrateArgs {
    pub model: PathBuf,
    pub good: PathBuf,
    pub defect: Option<PathBuf>,
    pub target_frr: f64,
    /// Defaults to `calibration/<model stem>.toml`.
    pub out: Option<PathBuf>,
    pub run: RunOptions,
}

pub fn calibrate(args: &CalibrateArgs) -> Result<(PathBuf, Calibration)> {
    let device = args.run.device.open()?;
    let (meta, method) = open_model(&args.model, &device)?;
    let source = DataSource::Plain {
        good: args.good.clone(),
        defect: args.defect.clone(),
        masks: None,
    };
    let data = Dataset::open(
        &source,
        &SplitOptions {
            validation_fraction: 0.0,
            seed: 0,
            ..Default::default()
        },
    )?;
    let samples = without_trained_defects(data.test, &meta)?;
    let loaded = load(&samples, &meta.input, &args.run, "load")?;
    let images: Vec<&Image> = loaded.loaded.iter().map(|l| &l.image).collect();
    let scored = score_images(
        method.as_ref(),
        &images,
        args.run.batch_size,
        &device,
        args.run.progress,
    )?;
    let (mut good, mut defect) = (Vec::new(), Vec::new());
    for (l, &s) in loaded.loaded.iter().zip(&scored.scores) {
        if l.sample.is_defective() {
            defect.push(s)
        } else {
            good.push(s)
        }
    }
    let model = ModelRef {
        file: args.model.display().to_string(),
        sha256: model_file::file_sha256(&args.model)?,
        method: meta.method.clone(),
    };
    let cal = Calibration::from_scores(&good, &defect, args.target_frr, model)?;
    let out = args.out.clone().unwrap_or_else(|| {
        let stem = args
            .model
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned());
        Path::new("calibration").join(format!("{stem}.toml"))
    });
    // The station would refuse an implausible threshold at start; refuse to write it instead.
    if crate::calibration::plausible_range(&meta.validation).is_none() {
        log::warn!(
            "{} carries no validation statistics: the threshold's plausibility is not checked",
            args.model.display()
        );
    }
    cal.check_plausible(&meta.validation, &out)?;
    cal.save(&out)?;
    Ok((out, cal))
}

#[derive(Clone, Debug)]
pub struct ScoreArgs {
    pub model: PathBuf,
    pub calibration: Option<PathBuf>,
    pub images: Vec<PathBuf>,
    pub heatmap: Option<PathBuf>,
    pub run: RunOptions,
}

/// One scored image as `vigil score` prints it.
#[derive(Clone, Debug)]
pub struct ScoreLine {
    pub path: PathBuf,
    pub result: std::result::Result<ScoreVerdict, String>,
}

#[derive(Clone, Debug)]
pub struct ScoreVerdict {
    pub score: f32,
    /// On the calibration's 0..1 scale, when a calibration was given.
    pub normalized: Option<f32>,
    pub reject: Option<bool>,
}

pub fn score(args: &ScoreArgs) -> Result<Vec<ScoreLine>> {
    let device = args.run.device.open()?;
    let (meta, method) = open_model(&args.model, &device)?;
    let calibration = match &args.calibration {
        Some(path) => {
            let cal = Calibration::load(path)?;
            cal.check_model(&model_file::file_sha256(&args.model)?, path)?;
            Some(cal)
        }
        None => None,
    };
    if let Some(dir) = &args.heatmap {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut lines = Vec::with_capacity(args.images.len());
    for path in &args.images {
        let result = image::load_image(path, &meta.input).and_then(|img| {
            let scored = score_images(method.as_ref(), &[&img], 1, &device, false)?;
            if let Some(dir) = &args.heatmap {
                let stem = path
                    .file_stem()
                    .map_or("image".into(), |s| s.to_string_lossy().into_owned());
                crate::report::heatmap_overlay(
                    &img,
                    scored.map(0),
                    heatmap_range(&meta),
                    None,
                    &dir.join(format!("{stem}-heatmap.png")),
                )?;
            }
            let score = scored.scores[0];
            Ok(ScoreVerdict {
                score,
                normalized: calibration.as_ref().map(|c| c.normalized(score)),
                reject: calibration.as_ref().map(|c| c.is_reject(score)),
            })
        });
        // One unreadable image must not cost the verdicts of the others.
        lines.push(ScoreLine {
            path: path.clone(),
            result: result.map_err(|e| e.to_string()),
        });
    }
    Ok(lines)
}
