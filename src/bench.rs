//! `vigil bench`: inference time of a model file per stage, at several batch sizes.
use std::fmt;
use std::path::Path;
use std::time::Duration;

use candle_core::Tensor;

use crate::commands::open_model;
use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::nn::kernels::Isa;
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

/// Measured fp32 peak of this CPU in GFLOP/s on `threads` threads, with the vector instruction
/// set of the kernels `isa` (pass `Kernels::detect().isa()` for the kernels' own: on Zen 4
/// AVX-512 runs at the AVX2 rate, on Zen 5 at twice it, and this measures which): each thread
/// runs [`fma_chains`] independent multiply-add chains of that width for about `seconds`.
/// `cargo bench --bench fma_peak` compares it with a hand-written assembly loop.
pub fn fma_peak_gflops(isa: Isa, threads: usize, seconds: f64) -> f64 {
    let threads = threads.max(1);
    // Calibrate the iteration count on one thread, then run all threads at once.
    let mut iterations = 1 << 16;
    loop {
        let start = std::time::Instant::now();
        std::hint::black_box(fma_loop(isa, iterations));
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
            .map(|_| s.spawn(|| fma_loop(isa, iterations)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map(|(_, f)| f).unwrap_or(0.0))
            .sum()
    });
    flops / start.elapsed().as_secs_f64() / 1e9
}

/// `(lanes, chains)` of the peak loop for `isa`: f32 lanes of one register, and independent
/// chains per thread. A core keeps `latency × pipes` multiply-adds in flight (4 × 2 = 8 on Zen 4,
/// Zen 5 and Intel's cores, 4 × 4 = 16 on a Neoverse V2's NEON), so fewer chains measure the
/// latency, not the peak (issue 20: the earlier 10-chain loop reported 256 GFLOP/s on a Zen 5
/// where a 12-chain AVX-512 loop measured ~460). The counts fill the register file but for the
/// two constants, with room to spare on every core named: 12 of AVX2's 16 registers, 24 of
/// AVX-512's or NEON's 32.
pub fn fma_chains(isa: Isa) -> (usize, usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => (16, WIDE_CHAINS),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => (8, NARROW_CHAINS),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => (4, WIDE_CHAINS),
        Isa::Portable => (1, NARROW_CHAINS),
    }
}

/// Chains for an instruction set with 16 vector registers.
const NARROW_CHAINS: usize = 12;
/// Chains for one with 32.
const WIDE_CHAINS: usize = 24;

/// `iterations` rounds of the chains of `isa`; returns a checksum and the FLOPs done.
fn fma_loop(isa: Isa, iterations: u64) -> (f32, f64) {
    let (lanes, chains) = fma_chains(isa);
    let flops = iterations as f64 * (chains * lanes * 2) as f64;
    let sum = match isa {
        // SAFETY (all arms): the kernels' instruction sets exist only after run-time detection
        // of their features; NEON is part of the aarch64 baseline.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { peak_x86::avx512(iterations) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { peak_x86::avx2(iterations) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { peak_neon(iterations) },
        Isa::Portable => {
            // Scalar, a multiply and an add (x86-64's baseline has no FMA).
            let mut acc = [1f32; NARROW_CHAINS];
            for _ in 0..iterations {
                for a in &mut acc {
                    *a = *a * 0.999_999 + 1e-7;
                }
            }
            acc.iter().sum()
        }
    };
    (sum, flops)
}

#[cfg(target_arch = "x86_64")]
mod peak_x86 {
    use std::arch::x86_64::{__m256, __m512};

    use super::{chains, NARROW_CHAINS, WIDE_CHAINS};

    /// # Safety
    /// Needs AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(iterations: u64) -> f32 {
        chains::<__m512, WIDE_CHAINS>(iterations)
    }

    /// # Safety
    /// Needs AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(iterations: u64) -> f32 {
        chains::<__m256, NARROW_CHAINS>(iterations)
    }
}

/// NEON's twin of the x86 loops.
///
/// # Safety
/// Needs NEON (the aarch64 baseline).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn peak_neon(iterations: u64) -> f32 {
    chains::<std::arch::aarch64::float32x4_t, WIDE_CHAINS>(iterations)
}

/// `N` accumulators, each `a = a · m + c` per iteration (fully unrolled; the accumulators
/// stay in registers, which `cargo bench --bench fma_peak` checks against assembly).
///
/// # Safety
/// Needs `V`'s instruction set (inlined into the wrappers that enable it).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
unsafe fn chains<V: crate::nn::kernels::simd::F32Vector, const N: usize>(iterations: u64) -> f32 {
    let (mul, add) = (V::splat(0.999_999), V::splat(1e-7));
    let mut acc = [V::splat(1.0); N];
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
