//! NF-BMR whole inference (Lite0 backbone, flow, BMR, anomaly map, score) on the CPU: ms per
//! image, GFLOP/s against the measured fp32 peak, and resident memory over many calls.
//!
//! `cargo bench --bench nf_bmr_infer -- <weights.safetensors> [size 256] [iterations 20]
//! [memory_calls 10000] [memory_size 128]` with `RAYON_NUM_THREADS` setting the threads. The
//! model is untrained (seeded weights): its cost does not depend on the values.
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use vigil::bench::{fma_chains, fma_peak_gflops, resident_bytes, BenchArgs};
use vigil::data::InputSpec;
use vigil::methods::nf_bmr::{NfBmr, NfBmrConfig};
use vigil::methods::Method;
use vigil::nn::backbone::{load_tensors, EfficientNetLite0, Lite0Features};
use vigil::nn::kernels::Kernels;

fn model(weights: &str, size: usize) -> vigil::Result<NfBmr> {
    let cfg = NfBmrConfig::default();
    let device = Device::Cpu;
    let last = *cfg.taps.iter().max().unwrap_or(&0);
    let tensors = load_tensors(weights.as_ref(), last, &device)?;
    let extractor = Lite0Features::new(&tensors, cfg.taps.clone(), &device)?;
    let input = InputSpec {
        height: size,
        width: size,
        channels: 3,
    };
    NfBmr::new(cfg, input, Box::new(extractor), HashMap::new(), 0, &device)
}

fn images(batch: usize, size: usize) -> vigil::Result<Tensor> {
    Ok(Tensor::rand(
        0f32,
        1.0,
        (batch, 3, size, size),
        &Device::Cpu,
    )?)
}

fn main() -> vigil::Result<()> {
    vigil::runtime::tune_allocator();
    let args = BenchArgs::from_env();
    let weights = args
        .get(0)
        .ok_or_else(|| vigil::Error::invalid("arguments", "the weights file is missing"))?;
    let (size, iterations, memory_calls, memory_size) = (
        args.number(1, 256),
        args.number(2, 20),
        args.number(3, 10_000),
        args.number(4, 128),
    );
    let threads = rayon::current_num_threads();
    let isa = Kernels::detect().isa();
    let peak = fma_peak_gflops(isa, threads, 1.0);
    let (lanes, chains) = fma_chains(isa);
    println!(
        "threads {threads}, measured fp32 peak {peak:.1} GFLOP/s ({} FMA, {lanes} lanes x {chains} \
         chains a thread)",
        isa.name()
    );

    let nf = model(weights, size)?;
    let cfg = NfBmrConfig::default();
    let tap = cfg.taps[0];
    let stride = EfficientNetLite0::block_stride(tap)?;
    let (fh, fw) = (size.div_ceil(stride), size.div_ceil(stride));
    let probe = nf.encode_frozen(&images(1, size)?)?;
    let head = nf.head_macs_per_position(&probe)?.unwrap_or(0) * fh * fw;
    let backbone = EfficientNetLite0::macs(size, size, tap)?;
    // The anomaly map: `[h, w] · [w, W]`, then `[H, h] · [h, W]`.
    let map = fh * fw * size + size * fh * size;
    let gflop = 2.0 * (backbone + head + map) as f64 / 1e9;
    println!(
        "{size}x{size}: {gflop:.3} GFLOP per image (backbone {:.3}, flow+BMR {:.3}, map {:.4})",
        2.0 * backbone as f64 / 1e9,
        2.0 * head as f64 / 1e9,
        2.0 * map as f64 / 1e9
    );
    for batch in [1, 8] {
        let x = images(batch, size)?;
        for _ in 0..2 {
            nf.infer(&x)?;
        }
        let mut samples = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let start = Instant::now();
            nf.infer(&x)?;
            samples.push(start.elapsed().as_secs_f64() * 1e3 / batch as f64);
        }
        samples.sort_by(f64::total_cmp);
        let ms = samples[samples.len() / 2];
        let gflops = gflop / (ms / 1e3);
        println!(
            "batch {batch}: {ms:.2} ms per image, {gflops:.1} GFLOP/s = {:.0}% of peak",
            100.0 * gflops / peak
        );
    }

    if memory_calls > 0 {
        let small = model(weights, memory_size)?;
        let x = images(1, memory_size)?;
        let mut after_100 = 0;
        for call in 1..=memory_calls.max(100) {
            small.infer(&x)?;
            if call == 100 {
                after_100 = resident_bytes().unwrap_or(0);
            }
        }
        let after_all = resident_bytes().unwrap_or(0);
        println!(
            "memory at {memory_size}x{memory_size}, batch 1: RSS after 100 calls {:.1} MiB, after {} calls {:.1} MiB",
            after_100 as f64 / (1 << 20) as f64,
            memory_calls.max(100),
            after_all as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
