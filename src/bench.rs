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

/// The positional arguments of a benchmark binary (`cargo bench --bench NAME -- ARGS`): the
/// program name and the `--bench` flag cargo adds are left out.
pub struct BenchArgs(Vec<String>);

impl BenchArgs {
    pub fn from_env() -> BenchArgs {
        BenchArgs(
            std::env::args()
                .skip(1)
                .filter(|a| !a.starts_with("--"))
                .collect(),
        )
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        self.0.get(i).map(String::as_str)
    }

    /// Argument `i` as a number; `default` when it is absent or not a number.
    pub fn number(&self, i: usize, default: usize) -> usize {
        self.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
    }
}

/// Measured fp32 peak of this CPU in GFLOP/s on `threads` threads: independent FMA chains
/// (enough to cover the FMA latency), 16-wide with AVX-512 or 8-wide with AVX2+FMA where the CPU
/// has them (the widest, as the kernels use it; a CPU with two 512-bit FMA units doubles its peak
/// there), for about `seconds`.
pub fn fma_peak_gflops(threads: usize, seconds: f64) -> f64 {
    let threads = threads.max(1);
    // Calibrate the iteration count on one thread, then run all threads at once.
    let mut iterations = 1 << 20;
    loop {
        let start = std::time::Instant::now();
        std::hint::black_box(fma_loop(iterations));
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed > seconds / 4.0 {
            iterations = (iterations as f64 * seconds / elapsed) as u64;
            break;
        }
        iterations *= 2;
    }
    let start = std::time::Instant::now();
    let flops: f64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| fma_loop(iterations)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map(|(_, f)| f).unwrap_or(0.0))
            .sum()
    });
    flops / start.elapsed().as_secs_f64() / 1e9
}

/// `iterations` rounds of 10 independent FMA chains; returns a checksum and the FLOPs done.
fn fma_loop(iterations: u64) -> (f32, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m256, __m512};
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was just detected.
            let sum = unsafe { fma_loop_avx512(iterations) };
            return (sum, iterations as f64 * 10.0 * 16.0 * 2.0);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA were just detected.
            let sum = unsafe { fma_loop_avx2(iterations) };
            return (sum, iterations as f64 * 10.0 * 8.0 * 2.0);
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn fma_loop_avx512(iterations: u64) -> f32 {
            fma_chains::<__m512>(iterations)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fma_loop_avx2(iterations: u64) -> f32 {
            fma_chains::<__m256>(iterations)
        }
    }
    let mut acc = [1f32; 10];
    for _ in 0..iterations {
        for a in &mut acc {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    (acc.iter().sum(), iterations as f64 * 10.0 * 2.0)
}

/// # Safety
/// Needs `V`'s instruction set (inlined into the wrappers that enable it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn fma_chains<V: crate::nn::kernels::simd::F32Vector>(iterations: u64) -> f32 {
    let (mul, add) = (V::splat(0.999_999), V::splat(1e-7));
    let mut acc = [V::splat(1.0); 10];
    for _ in 0..iterations {
        for a in &mut acc {
            *a = a.mul_add(mul, add);
        }
    }
    acc.iter().map(|a| a.sum()).sum()
}

/// Resident set size of this process in bytes (Linux; `None` elsewhere).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as u64)
}

/// This process's resident memory in KiB (0 where /proc is not there): the memory checks of the
/// station benchmarks.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
