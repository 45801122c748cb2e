//! The training loop every method shares: cache the frozen front once, then run the method's
//! phases epoch by epoch over seeded shuffles, with progress and divergence checks.
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::{batch_tensor, Image};
use crate::error::{Error, Result};
use crate::methods::Method;
use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub batch_size: usize,
    pub seed: u64,
    /// Draw progress bars (they hide themselves when stderr is not a terminal).
    pub progress: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            batch_size: 8,
            seed: 0,
            progress: true,
        }
    }
}

/// Mean losses per epoch, per phase.
#[derive(Clone, Debug, Default)]
pub struct TrainReport {
    pub phases: Vec<PhaseReport>,
    pub seconds: f64,
}

#[derive(Clone, Debug)]
pub struct PhaseReport {
    pub name: &'static str,
    /// For each epoch, the mean of each named loss.
    pub epochs: Vec<Vec<(&'static str, f32)>>,
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

/// Trains `method` on defect-free `images` through all its phases.
pub fn fit(
    method: &mut dyn Method,
    images: &[Image],
    opts: &TrainOptions,
    device: &Device,
) -> Result<TrainReport> {
    if images.is_empty() {
        return Err(Error::invalid("training images", "none to train on"));
    }
    if opts.batch_size == 0 {
        return Err(Error::config("batch_size", "must be at least 1"));
    }
    let start = Instant::now();
    let encoded = encode_all(method, images, opts.batch_size, device, opts.progress)?;
    let mut rng = Rng::new(opts.seed);
    let mut report = TrainReport::default();
    for (phase, spec) in method.phases().into_iter().enumerate() {
        let steps_per_epoch = images.len().div_ceil(opts.batch_size);
        let bar = progress_bar(
            (spec.epochs * steps_per_epoch) as u64,
            spec.name,
            opts.progress,
        );
        let mut epochs = Vec::with_capacity(spec.epochs);
        for epoch in 0..spec.epochs {
            let mut order: Vec<u32> = (0..images.len() as u32).collect();
            rng.shuffle(&mut order);
            let mut sums: Vec<(&'static str, f32)> = Vec::new();
            for chunk in order.chunks(opts.batch_size) {
                let idx = Tensor::new(chunk, device)?;
                let batch = encoded.index_select(&idx, 0)?;
                let losses = method.train_step(phase, &batch)?;
                if let Some((name, value)) = losses.iter().find(|(_, v)| !v.is_finite()) {
                    return Err(Error::invalid(
                        "training",
                        format!(
                            "{} diverged in phase `{}` epoch {}: loss `{name}` is {value}; \
                             lower the learning rate",
                            method.name(),
                            spec.name,
                            epoch + 1
                        ),
                    ));
                }
                if sums.is_empty() {
                    sums = losses.iter().map(|&(n, _)| (n, 0.0)).collect();
                }
                for ((_, sum), (_, v)) in sums.iter_mut().zip(&losses) {
                    *sum += v * chunk.len() as f32;
                }
                bar.set_message(format_losses(epoch + 1, &losses));
                bar.inc(1);
            }
            let means: Vec<(&'static str, f32)> = sums
                .into_iter()
                .map(|(n, s)| (n, s / images.len() as f32))
                .collect();
            log::info!(
                "{} {} {}",
                method.name(),
                spec.name,
                format_losses(epoch + 1, &means)
            );
            epochs.push(means);
        }
        bar.finish_and_clear();
        report.phases.push(PhaseReport {
            name: spec.name,
            epochs,
        });
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

fn format_losses(epoch: usize, losses: &[(&'static str, f32)]) -> String {
    let parts: Vec<String> = losses.iter().map(|(n, v)| format!("{n} {v:.4}")).collect();
    format!("epoch {epoch}: {}", parts.join(", "))
}
