//! `vigil teach`: a new product at the line in one command. Captures good parts from the station's
//! own source and trigger, keeps a seeded share of them for calibration, builds the detector on
//! the rest (the memory bank by default: a pass over the images and a coreset, no training),
//! calibrates it to the station's target false-reject rate, and installs model and calibration at
//! the paths of the station file, each written atomically; a running station swaps them in
//! between two parts (see `station::reload`).
//!
//! Everything the teach made stays in its folder (the parts, the model, the calibration, and the
//! pair it replaced), so a product can be taught again, audited, or put back.
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{calibrate, train, CalibrateArgs, RunOptions, TrainArgs};
use crate::atomic::write_atomic;
use crate::calibration::Calibration;
use crate::data::dataset::DataSource;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::station::config::StationConfig;
use crate::train::progress_bar;

/// The fewest parts a teach takes: enough for a calibration share and the validation images.
pub const MIN_PARTS: usize = 20;
/// The target false-reject rate when the station has no calibration yet to take it from.
pub const DEFAULT_TARGET_FRR: f64 = 0.005;

#[derive(Clone, Debug)]
pub struct TeachArgs {
    /// The station file: its source and trigger give the parts, its `model` and `calibration`
    /// paths receive the result.
    pub config: PathBuf,
    /// Parts to capture, all of them defect-free.
    pub count: usize,
    /// Share of the parts kept out of training to calibrate on.
    pub calibration_share: f64,
    /// Default: the station's current calibration's target, else [`DEFAULT_TARGET_FRR`].
    pub target_frr: Option<f64>,
    pub method: String,
    /// TOML file of method hyper-parameters, and `key=value` overrides.
    pub method_config: Option<PathBuf>,
    pub set: Vec<String>,
    /// Model input size; default: the station's current model's (so that it can be swapped in
    /// without a restart), else from the captured parts.
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// The teach folder; default `teach-<UTC time>` beside the station's model file.
    pub out: Option<PathBuf>,
    pub backbone: PathBuf,
    pub seed: u64,
    pub run: RunOptions,
}

#[derive(Clone, Debug)]
pub struct TeachSummary {
    pub folder: PathBuf,
    pub captured: usize,
    pub train_images: usize,
    pub validation_images: usize,
    pub calibration_images: usize,
    /// Entries and bytes of the memory bank (memory-bank models).
    pub bank: Option<(usize, usize)>,
    pub calibration: Calibration,
    /// Where the pair was installed (the station file's paths).
    pub model: PathBuf,
    pub calibration_path: PathBuf,
    /// Capture, build and calibration, in seconds.
    pub seconds: (f64, f64, f64),
}

/// The input size of the station's current model, if it has a readable one.
fn current_input(cfg: &StationConfig) -> Option<crate::data::InputSpec> {
    crate::model_file::read_meta(&cfg.model)
        .ok()
        .map(|meta| meta.input)
}

/// Entries and bytes of a memory-bank model's bank.
fn bank_size(model: &Path) -> Result<Option<(usize, usize)>> {
    let (_, tensors) = crate::model_file::load(model, &candle_core::Device::Cpu)?;
    Ok(crate::methods::memory_bank::bank_size(&tensors))
}

pub fn teach(args: &TeachArgs) -> Result<TeachSummary> {
    let cfg = StationConfig::load(&args.config)?;
    if args.count < MIN_PARTS {
        return Err(Error::invalid(
            "count",
            format!("{} parts; a teach takes at least {MIN_PARTS}", args.count),
        ));
    }
    if !(args.calibration_share > 0.0 && args.calibration_share < 0.9) {
        return Err(Error::invalid(
            "calibration share",
            format!("{} is not in (0, 0.9)", args.calibration_share),
        ));
    }
    let target_frr = match args.target_frr {
        Some(t) => t,
        None => Calibration::load(&cfg.calibration)
            .map(|c| c.target_frr)
            .unwrap_or(DEFAULT_TARGET_FRR),
    };
    let folder = match &args.out {
        Some(dir) => dir.clone(),
        None => {
            let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
            cfg.model
                .parent()
                .unwrap_or(Path::new("."))
                .join(format!("teach-{stamp}"))
        }
    };
    let (train_dir, cal_dir) = (folder.join("train/good"), folder.join("calibration"));
    for dir in [&train_dir, &cal_dir] {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }

    // Which parts calibrate is drawn before the capture: a share spread over the whole run, not
    // its end (a line drifts as it warms up).
    let calibration_parts = ((args.count as f64 * args.calibration_share).round() as usize)
        .clamp(1, args.count - MIN_PARTS / 2);
    let mut order: Vec<usize> = (0..args.count).collect();
    Rng::new(args.seed).fork(0x7eac).shuffle(&mut order);
    let mut calibrates = vec![false; args.count];
    for &i in &order[..calibration_parts] {
        calibrates[i] = true;
    }
    let started = Instant::now();
    let bar = progress_bar(args.count as u64, "capture", args.run.progress);
    let captured = super::station::capture_parts(&cfg, args.count, &bar, |i| {
        Ok(if calibrates[i] {
            cal_dir.join(format!("{i:05}"))
        } else {
            train_dir.join(format!("{i:05}"))
        })
    })?;
    bar.finish_and_clear();
    if captured.len() < args.count {
        return Err(Error::invalid(
            "source",
            format!(
                "ended after {} of {} parts (they are in {})",
                captured.len(),
                args.count,
                folder.display()
            ),
        ));
    }
    let capture_seconds = started.elapsed().as_secs_f64();
    log::info!(
        "captured {} parts in {capture_seconds:.1} s into {}",
        captured.len(),
        folder.display()
    );

    let started = Instant::now();
    let (height, width) = match (args.height, args.width, current_input(&cfg)) {
        (None, None, Some(spec)) => (Some(spec.height), Some(spec.width)),
        (h, w, _) => (h, w),
    };
    let train_count = args.count - calibration_parts;
    // Enough validation images for the memory bank to standardise its scores on.
    let fewest = crate::methods::memory_bank::MIN_FUSION_VALIDATION as f32 + 0.5;
    let validation_fraction = (fewest / train_count as f32).max(0.1);
    let model = folder.join("model.safetensors");
    let checkpoint = folder.join("model.ckpt");
    let good_parts = DataSource::Plain {
        good: train_dir,
        defect: None,
        masks: None,
    };
    let trained = train(&TrainArgs {
        config: args.method_config.clone(),
        set: args.set.clone(),
        height,
        width,
        validation_fraction,
        seed: args.seed,
        checkpoint: Some(checkpoint.clone()),
        ..TrainArgs::new(
            &args.method,
            good_parts,
            model.clone(),
            args.backbone.clone(),
            args.run.clone(),
        )
    })?;
    // The model is the record; its checkpoint only served a resume.
    let _ = std::fs::remove_file(&checkpoint);
    let build_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let calibration_file = folder.join("calibration.toml");
    let (_, mut calibration) = calibrate(&CalibrateArgs {
        model: model.clone(),
        good: cal_dir,
        defect: None,
        target_frr,
        out: Some(calibration_file.clone()),
        run: args.run.clone(),
    })?;
    let calibrate_seconds = started.elapsed().as_secs_f64();

    install(&cfg, &folder, &model, &mut calibration)?;
    Ok(TeachSummary {
        folder,
        captured: captured.len(),
        train_images: trained.train_images,
        validation_images: trained.validation.count,
        calibration_images: calibration.counts.good,
        bank: bank_size(&model)?,
        calibration,
        model: cfg.model.clone(),
        calibration_path: cfg.calibration.clone(),
        seconds: (capture_seconds, build_seconds, calibrate_seconds),
    })
}

/// Puts the new pair at the station's paths, the model first (a running station takes the pair
/// once both are there and agree); the pair it replaces is kept in the teach folder.
fn install(
    cfg: &StationConfig,
    folder: &Path,
    model: &Path,
    calibration: &mut Calibration,
) -> Result<()> {
    for (current, kept) in [
        (&cfg.model, "previous-model.safetensors"),
        (&cfg.calibration, "previous-calibration.toml"),
    ] {
        if current.is_file() {
            let to = folder.join(kept);
            std::fs::copy(current, &to).map_err(|e| Error::io(&to, e))?;
        }
    }
    let bytes = std::fs::read(model).map_err(|e| Error::io(model, e))?;
    if let Some(dir) = cfg.model.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    write_atomic(&cfg.model, &bytes)?;
    // The calibration names the file the station reads; the digest ties it to the same bytes.
    calibration.model.file = cfg.model.display().to_string();
    if let Some(dir) = cfg
        .calibration
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    calibration.save(&cfg.calibration)?;
    log::info!(
        "installed {} and {}",
        cfg.model.display(),
        cfg.calibration.display()
    );
    Ok(())
}
