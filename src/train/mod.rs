//! The training loop every method shares: cache the frozen front once where a phase trains on it,
//! then run the method's phases epoch by epoch over seeded shuffles (at least each phase's
//! `min_steps` steps), backpropagating each objective into its parameter group, with progress,
//! divergence checks, checkpoints and the per-phase choice of the epoch to keep.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::data::anomaly::{
    AnomalyGenerator, AnomalySynth, CutPasteParams, CutPasteVariant, WeightedGenerator,
};
use crate::data::{batch_tensor, Image};
use crate::error::{Error, Result};
use crate::eval::score_images;
use crate::methods::{
    self, Apply, FitContext, Learning, Method, PhaseInput, Selection, TrainBatch, TrainSet,
};
use crate::metrics::auroc;
use crate::rng::Rng;

pub mod checkpoint;
pub mod each_epoch;

/// Sees the method after every epoch of every phase, before a phase's kept epoch is restored
/// (`vigil train --eval-each-epoch`). It only reads: what the training keeps is the same with or
/// without it, and its time is left out of the training's.
pub trait EpochObserver {
    /// `epoch` is 1-based within the phase `phase`.
    fn epoch_done(&mut self, method: &dyn Method, phase: &str, epoch: usize) -> Result<()>;
}

impl EpochObserver for () {
    fn epoch_done(&mut self, _: &dyn Method, _: &str, _: usize) -> Result<()> {
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub batch_size: usize,
    pub seed: u64,
    /// Draw progress bars (they hide themselves when stderr is not a terminal).
    pub progress: bool,
    /// Written (atomically) after every epoch when the method can save its training state.
    pub checkpoint: Option<PathBuf>,
    /// Continue from `checkpoint` when it exists.
    pub resume: bool,
    /// Identifies the training images; a checkpoint made on other images is refused.
    pub data_fingerprint: String,
    /// Stop after this many epochs of this run (all phases counted), keeping the checkpoint for a
    /// later `resume`: training in sessions, on a line that must stop at the end of a shift.
    pub stop_after_epochs: Option<usize>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            batch_size: 8,
            seed: 0,
            progress: true,
            checkpoint: None,
            resume: false,
            data_fingerprint: String::new(),
            stop_after_epochs: None,
        }
    }
}

/// Mean losses per epoch, per phase.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainReport {
    pub phases: Vec<PhaseReport>,
    pub seconds: f64,
    /// `(phase, epochs already done)` when this run resumed a checkpoint.
    pub resumed_at: Option<(String, usize)>,
    /// Stopped by [`TrainOptions::stop_after_epochs`] before the end: the method is not trained.
    pub paused: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PhaseReport {
    pub name: String,
    pub epochs: Vec<EpochReport>,
    /// The epoch (1-based) whose parameters were kept, for phases that select one.
    pub kept_epoch: Option<usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochReport {
    /// The mean of each named loss over the epoch.
    pub losses: Vec<(String, f32)>,
    /// Image AUROC of synthetic anomalies against the validation images, for phases that select
    /// an epoch.
    pub validation_separation: Option<f32>,
}

pub fn progress_bar(len: u64, prefix: &str, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {bar:30} {pos}/{len} {per_sec} eta {eta} {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// Runs the frozen front of `method` over all images, `batch_size` at a time.
pub fn encode_all(
    method: &dyn Method,
    images: &[Image],
    batch_size: usize,
    device: &Device,
    progress: bool,
) -> Result<Tensor> {
    let bar = progress_bar(images.len() as u64, "encode", progress);
    let mut parts = Vec::with_capacity(images.len().div_ceil(batch_size));
    for chunk in images.chunks(batch_size) {
        let refs: Vec<&Image> = chunk.iter().collect();
        parts.push(
            method
                .encode_frozen(&batch_tensor(&refs, device)?)?
                .detach(),
        );
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(Tensor::cat(&parts, 0)?)
}

/// The best epoch of a phase so far: its 1-based number, separation and training state.
struct Best {
    epoch: usize,
    separation: f32,
    state: HashMap<String, Tensor>,
}

/// The `kind` a config gives a generator.
fn kind(generator: &AnomalyGenerator) -> &'static str {
    match generator {
        AnomalyGenerator::Cutout(_) => "cutout",
        AnomalyGenerator::CutPaste(_) => "cut-paste",
        AnomalyGenerator::Confetti(_) => "confetti",
        AnomalyGenerator::PerlinBlend(_) => "perlin-blend",
    }
}

/// The synthetic anomalies of the label-free yardstick (CutPaste scar, cutout, Perlin-masked
/// blend, confetti noise), less the kinds in `excluded` (those a detector trains on).
fn yardstick(excluded: &[&str]) -> Vec<AnomalyGenerator> {
    [
        AnomalyGenerator::CutPaste(CutPasteParams {
            variant: CutPasteVariant::Scar,
            ..Default::default()
        }),
        AnomalyGenerator::Cutout(Default::default()),
        AnomalyGenerator::PerlinBlend(Default::default()),
        AnomalyGenerator::Confetti(Default::default()),
    ]
    .into_iter()
    .filter(|g| !excluded.contains(&kind(g)))
    .collect()
}

/// The kinds (as configs spell them) [`forge_validation`] draws from when `excluded` are left out.
pub fn yardstick_kinds(excluded: &[&str]) -> Vec<&'static str> {
    yardstick(excluded).iter().map(kind).collect()
}

/// `draws` synthetic anomalies (of the [`yardstick_kinds`]) of every validation image, drawn from
/// `seed`: the label-free yardstick for choosing an epoch (one draw) and for `vigil select`
/// (several). Image-major: anomaly `d` of image `i` is at `i · draws + d`.
pub fn forge_validation(
    validation: &[Image],
    seed: u64,
    excluded: &[&str],
    draws: usize,
) -> Result<Vec<Image>> {
    let generators: Vec<WeightedGenerator> = yardstick(excluded)
        .into_iter()
        .map(|generator| WeightedGenerator {
            weight: 1.0,
            generator,
        })
        .collect();
    if generators.is_empty() {
        return Err(Error::invalid(
            "synthetic-anomaly yardstick",
            format!(
                "the detector trains on every kind of synthetic anomaly ({}) that could judge it",
                excluded.join(", ")
            ),
        ));
    }
    let synth = AnomalySynth::new(&generators)?;
    let mut rng = Rng::new(seed).fork(0x5e1ec7);
    let mut forged = Vec::with_capacity(validation.len() * draws);
    for image in validation {
        for _ in 0..draws {
            forged.push(synth.apply(image, &mut rng)?.0);
        }
    }
    Ok(forged)
}

/// Image AUROC of the synthetic anomalies against the defect-free validation images: how well
/// the detector separates them now. No test image is involved.
pub fn validation_separation(
    method: &dyn Method,
    validation: &[Image],
    forged: &[Image],
    batch_size: usize,
    device: &Device,
) -> Result<f32> {
    let refs: Vec<&Image> = validation.iter().chain(forged).collect();
    let scores = score_images(method, &refs, batch_size, device, false)?.scores;
    let labels: Vec<bool> = (0..refs.len()).map(|i| i >= validation.len()).collect();
    match auroc(&scores, &labels) {
        Some(a) if a.is_finite() => Ok(a as f32),
        _ => Err(Error::invalid(
            "training",
            format!("{} gives non-finite validation scores", method.name()),
        )),
    }
}

/// Trains `method` on `set` through all its phases. `validation` (defect-free, kept out of
/// training) and synthetic anomalies of it choose the epoch of phases that select one.
pub fn fit(
    method: &mut dyn Method,
    set: &TrainSet,
    validation: &[Image],
    opts: &TrainOptions,
    device: &Device,
) -> Result<TrainReport> {
    fit_observed(method, set, validation, opts, device, &mut ())
}

/// [`fit`], with `observer` called after every epoch.
pub fn fit_observed(
    method: &mut dyn Method,
    set: &TrainSet,
    validation: &[Image],
    opts: &TrainOptions,
    device: &Device,
    observer: &mut dyn EpochObserver,
) -> Result<TrainReport> {
    let images = &set.good;
    if images.is_empty() {
        return Err(Error::invalid("training images", "none to train on"));
    }
    if opts.batch_size == 0 {
        return Err(Error::config("batch_size", "must be at least 1"));
    }
    methods::check_defects_allowed(
        method.name(),
        method.learns_from_defects(),
        set.defects.len(),
    )?;
    if opts.stop_after_epochs.is_some() && opts.checkpoint.is_none() {
        return Err(Error::invalid(
            "stop after epochs",
            "needs a checkpoint to resume from",
        ));
    }
    let start = Instant::now();
    let mut observed_seconds = 0.0;
    method.prepare(set)?;
    let identity = checkpoint::Identity::of(method, opts)?;
    let mut report = TrainReport::default();
    let (mut first_phase, mut first_epoch, mut best) = (0, 0, None);
    if let Some(path) = opts
        .checkpoint
        .as_ref()
        .filter(|p| opts.resume && p.exists())
    {
        let saved = checkpoint::load(path, &identity, device)?;
        method.restore_training_state(&saved.state)?;
        (first_phase, first_epoch) = (saved.phase, saved.epochs_done);
        best = saved.best.map(|(epoch, separation, state)| Best {
            epoch,
            separation,
            state,
        });
        report = saved.report;
        report.resumed_at = Some((
            method
                .phases()
                .get(first_phase)
                .map_or("done".into(), |p| p.name.to_string()),
            first_epoch,
        ));
        log::info!(
            "resuming {} from {} after epoch {first_epoch} of phase {}",
            method.name(),
            path.display(),
            first_phase + 1
        );
    }
    let phases = method.phases();
    let encoded = if phases[first_phase.min(phases.len())..]
        .iter()
        .any(|p| p.input == PhaseInput::Features)
    {
        Some(encode_all(
            method,
            images,
            opts.batch_size,
            device,
            opts.progress,
        )?)
    } else {
        None
    };
    let mut epochs_this_run = 0;
    for (phase, spec) in phases.iter().enumerate().skip(first_phase) {
        let forged = match &spec.selection {
            Selection::Separation { trained_on } if !validation.is_empty() => {
                Some(forge_validation(validation, opts.seed, trained_on, 1)?)
            }
            Selection::Separation { .. } => {
                log::warn!(
                    "no validation images: phase `{}` keeps its last epoch",
                    spec.name
                );
                None
            }
            Selection::Last => None,
        };
        let batches_per_epoch = images.len().div_ceil(opts.batch_size);
        let accumulation = spec.accumulation(opts.batch_size);
        // A fitted phase is one pass, whatever its spec says about epochs and steps.
        let fitted = method.learning(phase) == Learning::Fitted;
        let epochs = if fitted {
            1
        } else {
            spec.epochs_for(batches_per_epoch.div_ceil(accumulation))
        };
        if epochs > spec.epochs && !fitted {
            log::info!(
                "{} {}: {epochs} epochs instead of {} to reach {} steps on {} images",
                method.name(),
                spec.name,
                spec.epochs,
                spec.min_steps,
                images.len()
            );
        }
        let bar = progress_bar(
            (epochs * batches_per_epoch) as u64,
            spec.name,
            opts.progress,
        );
        if report.phases.len() <= phase {
            report.phases.push(PhaseReport {
                name: spec.name.to_string(),
                epochs: Vec::new(),
                kept_epoch: None,
            });
        }
        let resume_epoch = if phase == first_phase { first_epoch } else { 0 };
        if phase != first_phase {
            best = None;
        }
        bar.set_position((resume_epoch * batches_per_epoch) as u64);
        for epoch in resume_epoch..epochs {
            // Seeded per (phase, epoch), so a resumed training draws exactly what it would have.
            let mut rng = Rng::new(opts.seed).fork(((phase as u64) << 32) | epoch as u64);
            let mut order: Vec<u32> = (0..images.len() as u32).collect();
            rng.shuffle(&mut order);
            let mut sums: Vec<(&'static str, f32)> = Vec::new();
            for (index, chunk) in order.chunks(opts.batch_size).enumerate() {
                let features = match (&encoded, spec.input) {
                    (Some(encoded), PhaseInput::Features) => {
                        Some(encoded.index_select(&Tensor::new(chunk, device)?, 0)?)
                    }
                    _ => None,
                };
                let batch = TrainBatch {
                    phase,
                    epoch,
                    good: chunk.iter().map(|&i| &images[i as usize]).collect(),
                    features,
                    defects: &set.defects,
                };
                let losses = if fitted {
                    method.observe(&batch, &mut rng)?;
                    Vec::new()
                } else if accumulation == 1 {
                    methods::step(method, &batch, &mut rng)?
                } else {
                    // The epoch's last, partial group of batches steps too.
                    let losses = methods::step_with(method, &batch, &mut rng, Apply::Accumulate)?;
                    if (index + 1) % accumulation == 0 || index + 1 == batches_per_epoch {
                        method.train_state_mut().step_accumulated()?;
                        method.weights_changed();
                    }
                    losses
                };
                if sums.is_empty() {
                    sums = losses.iter().map(|&(n, _)| (n, 0.0)).collect();
                }
                for ((_, sum), (_, v)) in sums.iter_mut().zip(&losses) {
                    *sum += v * chunk.len() as f32;
                }
                bar.set_message(format_losses(epoch + 1, &losses));
                bar.inc(1);
            }
            let means: Vec<(&'static str, f32)> = if fitted {
                let fit = FitContext {
                    phase,
                    validation,
                    batch_size: opts.batch_size,
                    bar: &bar,
                };
                let logged = method.conclude(&fit, &mut rng)?;
                method.weights_changed();
                logged
            } else {
                sums.into_iter()
                    .map(|(n, s)| (n, s / images.len() as f32))
                    .collect()
            };
            let separation = if let Some(forged) = &forged {
                let separation =
                    validation_separation(method, validation, forged, opts.batch_size, device)?;
                // Ties go to the later epoch, which has trained longer.
                if best
                    .as_ref()
                    .is_none_or(|b: &Best| separation >= b.separation)
                {
                    best = Some(Best {
                        epoch: epoch + 1,
                        separation,
                        state: method.training_state()?,
                    });
                }
                Some(separation)
            } else {
                None
            };
            log::info!(
                "{} {} {}{}",
                method.name(),
                spec.name,
                format_losses(epoch + 1, &means),
                separation.map_or(String::new(), |s| format!(", validation separation {s:.4}"))
            );
            report.phases[phase].epochs.push(EpochReport {
                losses: means.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
                validation_separation: separation,
            });
            let observing = Instant::now();
            observer.epoch_done(method, spec.name, epoch + 1)?;
            observed_seconds += observing.elapsed().as_secs_f64();
            if let Some(path) = &opts.checkpoint {
                let saved = checkpoint::Saved {
                    phase,
                    epochs_done: epoch + 1,
                    best: best
                        .as_ref()
                        .map(|b| (b.epoch, b.separation, b.state.clone())),
                    report: report.clone(),
                    // An epoch that just became the best already copied its state.
                    state: match &best {
                        Some(b) if b.epoch == epoch + 1 => b.state.clone(),
                        _ => method.training_state()?,
                    },
                };
                checkpoint::save(path, &identity, &saved)?;
            }
            epochs_this_run += 1;
            let last = phase + 1 == phases.len() && epoch + 1 == epochs;
            if !last && opts.stop_after_epochs == Some(epochs_this_run) {
                bar.finish_and_clear();
                log::info!(
                    "{} paused after epoch {} of phase `{}`",
                    method.name(),
                    epoch + 1,
                    spec.name
                );
                report.paused = true;
                report.seconds = start.elapsed().as_secs_f64() - observed_seconds;
                return Ok(report);
            }
        }
        bar.finish_and_clear();
        if let Some(b) = best.take() {
            log::info!(
                "{} {}: keeping epoch {} (validation separation {:.4})",
                method.name(),
                spec.name,
                b.epoch,
                b.separation
            );
            method.restore_training_state(&b.state)?;
            report.phases[phase].kept_epoch = Some(b.epoch);
        }
    }
    report.seconds = start.elapsed().as_secs_f64() - observed_seconds;
    Ok(report)
}

fn format_losses(epoch: usize, losses: &[(&'static str, f32)]) -> String {
    let parts: Vec<String> = losses.iter().map(|(n, v)| format!("{n} {v:.4}")).collect();
    format!("epoch {epoch}: {}", parts.join(", "))
}
