//! `vigil bench`: inference time of a model file per stage, at several batch sizes.
use std::fmt;
use std::path::Path;
use std::time::Duration;

use candle_core::Tensor;

use crate::commands::open_model;
use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::rng::Rng;

const WARMUP: usize = 3;

#[derive(Clone, Debug)]
pub struct BenchReport {
    pub model: String,
    pub method: String,
    pub input: String,
    pub device: String,
    pub threads: usize,
    pub rows: Vec<BenchRow>,
}

#[derive(Clone, Debug)]
pub struct BenchRow {
    pub batch: usize,
    pub iterations: usize,
    /// Median milliseconds per image of each stage, and of the whole inference last.
    pub stages: Vec<(&'static str, f64)>,
}

impl BenchRow {
    pub fn total_ms_per_image(&self) -> f64 {
        self.stages
            .iter()
            .find(|s| s.0 == "total")
            .map_or(0.0, |s| s.1)
    }
}

fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

/// Times `iterations` inferences of random images at each batch size, after a warm-up.
pub fn run(
    model: &Path,
    batches: &[usize],
    iterations: usize,
    device: DeviceChoice,
) -> Result<BenchReport> {
    if iterations == 0 || batches.contains(&0) {
        return Err(Error::invalid(
            "bench",
            "iterations and batch sizes must be at least 1",
        ));
    }
    let device = device.open()?;
    let (meta, method) = open_model(model, &device)?;
    let mut rng = Rng::new(0);
    let mut rows = Vec::new();
    for &batch in batches {
        let n = batch * meta.input.channels * meta.input.height * meta.input.width;
        let data: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
        let images = Tensor::from_vec(
            data,
            (
                batch,
                meta.input.channels,
                meta.input.height,
                meta.input.width,
            ),
            &device,
        )?;
        for _ in 0..WARMUP {
            method.infer_timed(&images)?;
        }
        let mut per_stage: Vec<(&'static str, Vec<Duration>)> = Vec::new();
        for _ in 0..iterations {
            let (_, mut stages) = method.infer_timed(&images)?;
            if !stages.iter().any(|s| s.0 == "total") {
                let total: Duration = stages.iter().map(|s| s.1).sum();
                stages.push(("total", total));
            }
            for (name, d) in stages {
                match per_stage.iter_mut().find(|s| s.0 == name) {
                    Some(s) => s.1.push(d),
                    None => per_stage.push((name, vec![d])),
                }
            }
        }
        let stages = per_stage
            .into_iter()
            .map(|(name, mut d)| (name, median_ms(&mut d) / batch as f64))
            .collect();
        rows.push(BenchRow {
            batch,
            iterations,
            stages,
        });
    }
    Ok(BenchReport {
        model: model.display().to_string(),
        method: meta.method.clone(),
        input: format!(
            "{}x{}x{}",
            meta.input.channels, meta.input.height, meta.input.width
        ),
        device: format!("{device:?}"),
        threads: candle_core::utils::get_num_threads(),
        rows,
    })
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} ({}), input {}, {} , {} threads; median ms per image",
            self.model, self.method, self.input, self.device, self.threads
        )?;
        for row in &self.rows {
            let stages: Vec<String> = row
                .stages
                .iter()
                .map(|(n, ms)| format!("{n} {ms:.2}"))
                .collect();
            writeln!(
                f,
                "batch {:>2}: {} | {:.1} images/s ({} iterations)",
                row.batch,
                stages.join(", "),
                1e3 / row.total_ms_per_image(),
                row.iterations
            )?;
        }
        Ok(())
    }
}
