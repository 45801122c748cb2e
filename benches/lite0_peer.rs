//! Lite0 features on the fast CPU kernels, timed for the peer benchmark (`scripts/peer-bench.sh`).
//!
//! `cargo bench --bench lite0_peer -- <weights.safetensors> <tap> <size> <batch> <iterations>
//! [input.bin output.bin]`: prints `median_ms_per_image <value>`; with the two paths it reads a
//! `[batch, 3, size, size]` little-endian f32 input and writes the features the same way, so the
//! script can compare them with ONNX Runtime's.
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vigil::bench::BenchArgs;
use vigil::nn::backbone::{load_tensors, EfficientNetLite0};

fn main() -> vigil::Result<()> {
    vigil::runtime::tune_allocator();
    let args = BenchArgs::from_env();
    let usage = || vigil::Error::invalid("arguments", "weights tap size batch iterations [in out]");
    let number = |i: usize| -> vigil::Result<usize> {
        args.get(i).and_then(|a| a.parse().ok()).ok_or_else(usage)
    };
    let weights = args.get(0).ok_or_else(usage)?;
    let (tap, size, batch, iterations) = (number(1)?, number(2)?, number(3)?, number(4)?);
    let device = Device::Cpu;
    let tensors = load_tensors(weights.as_ref(), tap, &device)?;
    let net = EfficientNetLite0::new(
        VarBuilder::from_tensors(tensors, DType::F32, &device),
        tap,
        false,
    )?;
    let n = batch * 3 * size * size;
    let input: Vec<f32> = match args.get(5) {
        Some(path) => std::fs::read(path)
            .map_err(|e| vigil::Error::io(path, e))?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        None => (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect(),
    };
    let images = Tensor::from_vec(input, (batch, 3, size, size), &device)?;
    let features = net.forward_taps(&images, &[tap])?;
    if let Some(path) = args.get(6) {
        let values = features[0].flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(path, bytes).map_err(|e| vigil::Error::io(path, e))?;
    }
    for _ in 0..3 {
        net.forward_taps(&images, &[tap])?;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        net.forward_taps(&images, &[tap])?;
        samples.push(start.elapsed().as_secs_f64() * 1e3 / batch as f64);
    }
    samples.sort_by(f64::total_cmp);
    println!("median_ms_per_image {:.3}", samples[samples.len() / 2]);
    Ok(())
}
