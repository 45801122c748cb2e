//! Inference on CUDA with vigil's custom kernels against candle's ops (`nn::kernels::cuda`): the
//! depthwise layers of Lite0 one by one, then every registered method at the input size given
//! (default config, seeded weights written to a model file's tensors and loaded back as the
//! station does; the cost does not depend on the values), per stage, at batch 1 and 8. The two
//! sides alternate round by round in one process.
//!
//! `cargo bench --features cuda --bench cuda_methods -- <weights.safetensors> [size 256]
//! [rounds 5] [iterations 20]` (run by `scripts/gpu-check.sh`). Without a GPU it says so and
//! stops. Prints, last, NF-BMR against issue 20's targets: ≥ 1000 images/s at batch 8, ≤ 2 ms at
//! batch 1.
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use vigil::bench::BenchArgs;
use vigil::data::InputSpec;
use vigil::methods::{Method, Setup, REGISTRY};
use vigil::nn::depthwise::{depthwise_conv2d, SamePad};
use vigil::nn::kernels::{cuda, Activation};

const SIDES: [(&str, bool); 2] = [("candle ops", false), ("custom kernels", true)];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ms per call of `f` (after a synchronisation) for each side, the sides alternating.
fn alternate(
    device: &Device,
    rounds: usize,
    iterations: usize,
    mut f: impl FnMut() -> vigil::Result<()>,
) -> vigil::Result<[f64; 2]> {
    let mut samples = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (side, (_, on)) in SIDES.iter().enumerate() {
            cuda::set_enabled(*on);
            f()?;
            device.synchronize()?;
            let start = Instant::now();
            for _ in 0..iterations {
                f()?;
            }
            device.synchronize()?;
            samples[side].push(start.elapsed().as_secs_f64() * 1e3 / iterations as f64);
        }
    }
    cuda::set_enabled(true);
    let [a, b] = samples;
    Ok([median(a), median(b)])
}

fn main() -> vigil::Result<()> {
    let args = BenchArgs::from_env();
    let weights = args
        .get(0)
        .ok_or_else(|| vigil::Error::invalid("arguments", "the weights file is missing"))?;
    let (size, rounds, iterations) = (args.number(1, 256), args.number(2, 5), args.number(3, 20));
    let device = match Device::new_cuda(0) {
        Ok(device) => device,
        Err(e) => {
            println!("no CUDA device ({e}): nothing to measure");
            return Ok(());
        }
    };
    println!("{size}x{size}, median of {rounds} alternating rounds of {iterations} calls; ms");
    depthwise_layers(&device, size, rounds, iterations)?;
    let mut nf_bmr = None;
    for entry in REGISTRY {
        let rows = method(
            entry.name,
            weights.as_ref(),
            &device,
            size,
            rounds,
            iterations,
        )?;
        if entry.name == "nf-bmr" {
            nf_bmr = Some(rows);
        }
    }
    if let Some(rows) = nf_bmr {
        let per_image = |batch: usize| {
            rows.iter()
                .find(|(b, stage, _)| *b == batch && *stage == "total")
                .map(|r| r.2[1] / batch as f64)
        };
        if let (Some(one), Some(eight)) = (per_image(1), per_image(8)) {
            println!(
                "NF-BMR {size}x{size} with the custom kernels: batch 1 {one:.2} ms (target <= 2 ms: \
                 {}), batch 8 {:.0} images/s (target >= 1000: {})",
                if one <= 2.0 { "met" } else { "NOT met" },
                1e3 / eight,
                if 1e3 / eight >= 1000.0 { "met" } else { "NOT met" }
            );
        }
    }
    Ok(())
}

/// Lite0's depthwise layers at `size` (stride-16 features: blocks 0-10), batch 1 and 8: candle's
/// shifted multiply-adds, bias and clamp against the one custom kernel.
fn depthwise_layers(
    device: &Device,
    size: usize,
    rounds: usize,
    iterations: usize,
) -> vigil::Result<()> {
    println!(
        "\nLite0 depthwise layer (bias, ReLU6)   batch | candle ops | custom kernel | speed-up"
    );
    // (channels, kernel, stride) of blocks 0-10 and the input side as a fraction of the image's.
    let layers = [
        (32, 3, 1, 2),
        (96, 3, 2, 2),
        (144, 3, 1, 4),
        (144, 5, 2, 4),
        (240, 5, 1, 8),
        (240, 3, 2, 8),
        (480, 3, 1, 16),
        (480, 5, 1, 16),
        (672, 5, 1, 16),
    ];
    for (channels, kernel, stride, down) in layers {
        let side = size.div_ceil(down);
        for batch in [1, 8] {
            let x = Tensor::rand(0f32, 1.0, (batch, channels, side, side), device)?;
            let w = Tensor::rand(-1f32, 1.0, (channels, 1, kernel, kernel), device)?;
            let bias = Tensor::rand(-1f32, 1.0, channels, device)?;
            let pad = SamePad::new(side, side, kernel, stride);
            let b4 = bias.reshape((1, channels, 1, 1))?;
            let [candle, custom] = alternate(device, rounds, iterations, || {
                if cuda::usable(&[&x]) {
                    cuda::depthwise(&x, &w, &bias, stride, pad, Activation::Relu6)?;
                } else {
                    depthwise_conv2d(&x, &w, stride, pad)?
                        .broadcast_add(&b4)?
                        .clamp(0f32, 6f32)?;
                }
                Ok(())
            })?;
            println!(
                "{side:>3}x{side:<3} x {channels:>3}, {kernel}x{kernel} stride {stride}       {batch:>5} | \
                 {candle:10.3} | {custom:13.3} | {:7.1}x",
                candle / custom
            );
        }
    }
    Ok(())
}

/// Times `name`'s inference per stage on both sides; returns `(batch, stage, [candle, custom])`
/// in ms per call.
fn method(
    name: &str,
    weights: &Path,
    device: &Device,
    size: usize,
    rounds: usize,
    iterations: usize,
) -> vigil::Result<Vec<(usize, &'static str, [f64; 2])>> {
    let entry = vigil::methods::entry(name)?;
    let setup = Setup {
        config: (entry.default_config)()?,
        input: InputSpec {
            height: size,
            width: size,
            channels: 3,
        },
        seed: 0,
        device,
    };
    // As a model file holds it: the station's detector is loaded, not trained, in the process.
    let fresh = (entry.create)(&setup, weights)?;
    let model: Box<dyn Method> = (entry.load)(&setup, &fresh.tensors()?)?;
    drop(fresh);
    println!("\n{name}, default config: stage   batch | candle ops | custom kernels | speed-up");
    let mut rows = Vec::new();
    for batch in [1, 8] {
        let images = Tensor::rand(0f32, 1.0, (batch, 3, size, size), device)?;
        let mut per_stage: Vec<(&'static str, [Vec<f64>; 2])> = Vec::new();
        for _ in 0..rounds {
            for (side, (_, on)) in SIDES.iter().enumerate() {
                cuda::set_enabled(*on);
                model.infer_timed(&images)?;
                let mut sums: Vec<(&'static str, Duration)> = Vec::new();
                for _ in 0..iterations {
                    let (_, mut stages) = model.infer_timed(&images)?;
                    if !stages.iter().any(|s| s.0 == "total") {
                        let total: Duration = stages.iter().map(|s| s.1).sum();
                        stages.push(("total", total));
                    }
                    for (stage, d) in stages {
                        match sums.iter_mut().find(|s| s.0 == stage) {
                            Some(s) => s.1 += d,
                            None => sums.push((stage, d)),
                        }
                    }
                }
                for (stage, d) in sums {
                    let ms = d.as_secs_f64() * 1e3 / iterations as f64;
                    match per_stage.iter_mut().find(|s| s.0 == stage) {
                        Some(s) => s.1[side].push(ms),
                        None => {
                            let mut both = [Vec::new(), Vec::new()];
                            both[side].push(ms);
                            per_stage.push((stage, both));
                        }
                    }
                }
            }
        }
        cuda::set_enabled(true);
        for (stage, [candle, custom]) in per_stage {
            let (candle, custom) = (median(candle), median(custom));
            println!(
                "{stage:<28} {batch:>5} | {candle:10.3} | {custom:14.3} | {:7.2}x",
                candle / custom
            );
            rows.push((batch, stage, [candle, custom]));
        }
    }
    Ok(rows)
}
