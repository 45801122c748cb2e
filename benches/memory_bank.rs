//! The memory bank's own benchmark: what the nearest-neighbour search costs per bank size and
//! dimension (one 256² image is 1,024 queries at stride 8), against the Lite0 features it serves,
//! and what the coreset selection costs per number of training positions. The measurements behind
//! the default bank size and projection (docs/RESULTS.md, issue 17).
//!
//! `cargo bench --bench memory_bank -- <weights.safetensors> [size 256] [iterations 20]
//! [positions 100000]`, with `RAYON_NUM_THREADS` setting the threads. Banks and positions are
//! random (the search costs the same whatever the values; the selection is timed on clustered
//! points, as features are).
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use vigil::bench::{fma_peak_gflops, BenchArgs};
use vigil::methods::memory_bank::coreset::greedy_k_centre;
use vigil::methods::memory_bank::search::PackedBank;
use vigil::nn::backbone::{load_tensors, Lite0Features};
use vigil::nn::kernels::Kernels;
use vigil::nn::FeatureExtractor;
use vigil::rng::Rng;

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

fn time(iterations: usize, mut f: impl FnMut() -> vigil::Result<()>) -> vigil::Result<f64> {
    f()?;
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        f()?;
        samples.push(start.elapsed());
    }
    Ok(median(samples))
}

fn gaussian(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

fn main() -> vigil::Result<()> {
    vigil::runtime::tune_allocator();
    let args = BenchArgs::from_env();
    let weights = args
        .get(0)
        .ok_or_else(|| vigil::Error::invalid("arguments", "the weights file is missing"))?;
    let (size, iterations, positions) = (
        args.number(1, 256),
        args.number(2, 20),
        args.number(3, 100_000),
    );
    let threads = rayon::current_num_threads();
    println!(
        "threads {threads}, measured fp32 peak {:.1} GFLOP/s",
        fma_peak_gflops(Kernels::detect().isa(), threads, 1.0)
    );
    let device = Device::Cpu;
    let images = Tensor::rand(0f32, 1.0, (1, 1, size, size), &device)?;
    for taps in [vec![4, 10, 14], vec![4, 7, 10], vec![4]] {
        let tensors = load_tensors(weights.as_ref(), *taps.iter().max().unwrap_or(&0), &device)?;
        let net = Lite0Features::new(&tensors, taps.clone(), &device)?;
        let ms = time(iterations, || net.extract(&images).map(|_| ()))?;
        println!(
            "Lite0 features, taps {taps:?} ({} channels), {size}x{size}, batch 1: {ms:.2} ms",
            net.out_channels()
        );
    }

    let kernels = Kernels::detect();
    let mut rng = Rng::new(0);
    let queries_n = (size / 8) * (size / 8);
    println!("search of {queries_n} queries (one {size}x{size} image at stride 8):");
    for dims in [64, 128, 344] {
        let queries = gaussian(queries_n * dims, &mut rng);
        let mut out = vec![0.0; queries_n];
        for entries in [1024, 4096, 8192, 16384, 32768, 65536] {
            let bank = PackedBank::new(&gaussian(entries * dims, &mut rng), dims)?;
            let ms = time(iterations, || bank.nearest_sq(kernels, &queries, &mut out))?;
            let gflops = 2.0 * (queries_n * entries * dims) as f64 / ms / 1e6;
            println!(
                "  {dims:>3} dims, {entries:>5} entries ({:>5.1} MiB): {ms:>7.2} ms, {gflops:.0} GFLOP/s",
                (entries * dims * 4) as f64 / (1 << 20) as f64
            );
        }
    }

    println!("greedy k-centre selection of {positions} clustered positions:");
    for dims in [32, 64, 128] {
        let centres = gaussian(256 * dims, &mut rng);
        let points: Vec<f32> = (0..positions)
            .flat_map(|i| {
                let c = &centres[(i % 256) * dims..(i % 256 + 1) * dims];
                c.iter().map(|v| 3.0 * v + rng.normal()).collect::<Vec<_>>()
            })
            .collect();
        for ratio in [0.01, 0.1] {
            let k = (ratio * positions as f64).ceil() as usize;
            let start = Instant::now();
            let coreset = greedy_k_centre(&points, dims, k, 0, None)?;
            println!(
                "  {dims:>3} dims, {k:>5} centres ({ratio}): {:.2} s, radius {:.3}",
                start.elapsed().as_secs_f64(),
                coreset.radius
            );
        }
    }
    Ok(())
}
