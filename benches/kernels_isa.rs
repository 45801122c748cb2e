//! The fast CPU kernels under every vector instruction set this CPU runs (AVX-512, AVX2), on
//! EfficientNet-Lite0's shapes at 256²: each 1×1 convolution (GEMM) and depthwise convolution,
//! one thread, the instruction sets alternating round by round so that they see the same machine.
//!
//! `cargo bench --bench kernels_isa -- [rounds 40]`: prints the median GFLOP/s of each shape per
//! instruction set, its share of the measured one-thread peak of the first set, and the time ratio
//! of each to the first (the one `Kernels::detect` picks).
use std::cell::RefCell;
use std::time::Instant;

use vigil::bench::{fma_peak_gflops, BenchArgs};
use vigil::nn::depthwise::SamePad;
use vigil::nn::kernels::{ASource, Activation, DepthwiseGeom, Epilogue, Isa, Kernels, PackedB};

/// Median seconds per call of `run` for each kernel set, alternating rounds.
fn alternate(sets: &[Kernels], rounds: usize, calls: usize, run: impl Fn(Kernels)) -> Vec<f64> {
    let mut samples = vec![Vec::with_capacity(rounds); sets.len()];
    for _ in 0..rounds {
        for (k, times) in sets.iter().zip(&mut samples) {
            let start = Instant::now();
            for _ in 0..calls {
                run(*k);
            }
            times.push(start.elapsed().as_secs_f64() / calls as f64);
        }
    }
    samples
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

/// One line: GFLOP/s of each set, its share of the first set's one-thread peak, and its time
/// against the first set's.
fn report(what: &str, flops: f64, seconds: &[f64], peak: f64) {
    let cells: Vec<String> = seconds
        .iter()
        .map(|s| {
            let gflops = flops / s / 1e9;
            format!(
                "{gflops:6.1} GFLOP/s {:3.0}% ({:.2}x)",
                100.0 * gflops / peak,
                s / seconds[0]
            )
        })
        .collect();
    println!("{what:<28} {}", cells.join("  "));
}

fn main() -> vigil::Result<()> {
    let args = BenchArgs::from_env();
    let rounds = args.number(0, 40).max(1);
    // The portable kernels only where nothing else runs: on x86 their `mul_add` is a libm call
    // (~1 GFLOP/s), and their long rounds in between made the next AVX-512 round slower (the
    // 512-bit units warming up again), which misstated the comparison.
    let all = Kernels::available();
    let sets: Vec<Kernels> = all
        .iter()
        .filter(|k| k.isa() != Isa::Portable || all.len() == 1)
        .map(|k| k.serial())
        .collect();
    let names: Vec<String> = sets.iter().map(|k| format!("{:?}", k.isa())).collect();
    println!(
        "one thread, median of {rounds} alternating rounds: {}",
        names.join(" | ")
    );
    let peaks: Vec<f64> = sets
        .iter()
        .map(|k| fma_peak_gflops(k.isa(), 1, 0.5))
        .collect();
    let shown: Vec<String> = peaks.iter().map(|p| format!("{p:.1}")).collect();
    println!(
        "measured one-thread fp32 peak GFLOP/s: {}",
        shown.join(" | ")
    );
    // Percentages are of the first set's peak: the fastest the CPU does with these kernels.
    let peak = peaks[0];
    // (pixels, in, out) of Lite0's expansions and projections at 256² (blocks 0-10), the stem's
    // im2col depth as a plain GEMM.
    let gemms = [
        (16384, 27, 32),
        (16384, 32, 16),
        (16384, 16, 96),
        (4096, 96, 24),
        (4096, 24, 144),
        (4096, 144, 24),
        (1024, 144, 40),
        (1024, 40, 240),
        (1024, 240, 40),
        (256, 240, 80),
        (256, 80, 480),
        (256, 480, 80),
        (256, 480, 112),
        (256, 112, 672),
        (256, 672, 112),
    ];
    for (m, k, n) in gemms {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let packed = PackedB::from_out_in(&w, n, k, &vec![0.1; n]);
        let out = RefCell::new(vec![0.0; m * n]);
        let epilogue = Epilogue {
            activation: Activation::Relu6,
            residual: None,
        };
        let flops = 2.0 * (m * k * n) as f64;
        let calls = (4e7 / flops).ceil() as usize;
        let seconds = alternate(&sets, rounds, calls, |kernels| {
            let mut out = out.borrow_mut();
            let source = ASource::Matrix { data: &a, lda: k };
            if let Err(e) = kernels.gemm(source, &packed, epilogue, &mut out) {
                panic!("gemm {m}x{k}x{n}: {e}");
            }
        });
        report(&format!("gemm {m}x{k}x{n}"), flops, &seconds, peak);
    }
    // (map side, channels, kernel, stride) of Lite0's depthwise convolutions at 256².
    let depthwise = [
        (128, 32, 3, 1),
        (128, 96, 3, 2),
        (64, 144, 3, 1),
        (64, 144, 5, 2),
        (32, 240, 5, 1),
        (32, 240, 3, 2),
        (16, 480, 3, 1),
        (16, 480, 5, 1),
        (16, 672, 5, 1),
    ];
    for (side, c, kernel, stride) in depthwise {
        let pad = SamePad::new(side, side, kernel, stride);
        let out_side = side.div_ceil(stride);
        let geom = DepthwiseGeom {
            batch: 1,
            height: side,
            width: side,
            channels: c,
            kernel,
            stride,
            pad_top: pad.top,
            pad_left: pad.left,
            out_h: out_side,
            out_w: out_side,
        };
        let input: Vec<f32> = (0..side * side * c)
            .map(|i| (i % 13) as f32 * 0.1)
            .collect();
        let weights: Vec<f32> = (0..kernel * kernel * c)
            .map(|i| (i % 7) as f32 * 0.1)
            .collect();
        let bias = vec![0.1; c];
        let out = RefCell::new(vec![0.0; out_side * out_side * c]);
        let flops = 2.0 * (out_side * out_side * c * kernel * kernel) as f64;
        let calls = (2e7 / flops).ceil() as usize;
        let seconds = alternate(&sets, rounds, calls, |kernels| {
            let mut out = out.borrow_mut();
            if let Err(e) =
                kernels.depthwise(&geom, &input, &weights, &bias, Activation::Relu6, &mut out)
            {
                panic!("depthwise {side}² x {c} k{kernel} s{stride}: {e}");
            }
        });
        report(
            &format!("depthwise {side}x{side}x{c} k{kernel} s{stride}"),
            flops,
            &seconds,
            peak,
        );
    }
    Ok(())
}
