//! The CUDA custom ops (`vigil::nn::kernels::cuda`) against candle's reference ops: their CPU
//! forward everywhere, their CUDA kernels where a GPU is present (built with `--features cuda`;
//! elsewhere those tests print that they are skipped), and the Lite0 backbone on the GPU, which
//! uses them, against the CPU. Tolerance 1e-4, as the CPU kernels'.
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vigil::nn::backbone::EfficientNetLite0;
use vigil::nn::depthwise::{depthwise_conv2d, SamePad};
use vigil::nn::kernels::{cuda, Activation};
use vigil::rng::Rng;

const TOLERANCE: f32 = 1e-4;

fn random(rng: &mut Rng, dims: &[usize], device: &Device) -> Tensor {
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, dims, device).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

fn activate(t: Tensor, activation: Activation) -> Tensor {
    let (lo, hi) = activation.bounds();
    match activation {
        Activation::Identity => t,
        _ => t.clamp(lo, hi).unwrap(),
    }
}

/// (batch, channels, height, width, kernel, stride, padding) of the shapes checked: the four
/// tiled kernels (3/5, stride 1/2) on maps smaller and larger than a tile, TF "same" and
/// symmetric padding, and the generic kernel (7×7, 3×3 at stride 3, 1×1).
fn depthwise_cases() -> Vec<(usize, usize, usize, usize, usize, usize, SamePad)> {
    let mut cases = Vec::new();
    for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2), (7, 1), (3, 3), (1, 1)] {
        for (b, c, h, w) in [(2, 5, 9, 13), (1, 8, 40, 37), (3, 2, 4, 70)] {
            cases.push((b, c, h, w, k, s, SamePad::new(h, w, k, s)));
        }
    }
    let sym = SamePad {
        top: 1,
        bottom: 1,
        left: 1,
        right: 1,
    };
    cases.push((1, 3, 12, 12, 3, 2, sym));
    cases
}

fn reference_depthwise(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    stride: usize,
    pad: SamePad,
    activation: Activation,
) -> Tensor {
    let c = bias.dim(0).unwrap();
    let y = depthwise_conv2d(x, w, stride, pad).unwrap();
    activate(
        y.broadcast_add(&bias.reshape((1, c, 1, 1)).unwrap())
            .unwrap(),
        activation,
    )
}

/// Every depthwise case and the bias epilogue on `device` against candle's ops on the CPU.
fn check_ops(device: &Device) {
    let mut rng = Rng::new(20);
    for (b, c, h, w, k, s, pad) in depthwise_cases() {
        for activation in [Activation::Relu6, Activation::Identity] {
            let x = random(&mut rng, &[b, c, h, w], &Device::Cpu);
            let weight = random(&mut rng, &[c, 1, k, k], &Device::Cpu);
            let bias = random(&mut rng, &[c], &Device::Cpu);
            let reference = reference_depthwise(&x, &weight, &bias, s, pad, activation);
            let on = |t: &Tensor| t.to_device(device).unwrap();
            let got = cuda::depthwise(&on(&x), &on(&weight), &on(&bias), s, pad, activation)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let d = max_diff(&got, &reference);
            assert!(
                d < TOLERANCE,
                "depthwise {b}x{c}x{h}x{w} k{k} s{s} {pad:?} {activation:?}: {d}"
            );
        }
    }
    for (b, c, p) in [(1, 16, 4096), (3, 7, 33), (2, 1, 1)] {
        let x = random(&mut rng, &[b, c, p], &Device::Cpu);
        let bias = random(&mut rng, &[c, 1], &Device::Cpu);
        let residual = random(&mut rng, &[b, c, p], &Device::Cpu);
        for activation in [Activation::Relu6, Activation::Relu, Activation::Identity] {
            let plain = activate(x.broadcast_add(&bias).unwrap(), activation);
            let on = |t: &Tensor| t.to_device(device).unwrap();
            let got = cuda::bias_activation(&on(&x), &on(&bias), activation, None).unwrap();
            assert!(max_diff(&got.to_device(&Device::Cpu).unwrap(), &plain) < TOLERANCE);
            let got = cuda::bias_activation(&on(&x), &on(&bias), activation, Some(&on(&residual)))
                .unwrap();
            let with_skip = (plain.clone() + &residual).unwrap();
            assert!(max_diff(&got.to_device(&Device::Cpu).unwrap(), &with_skip) < TOLERANCE);
        }
    }
}

#[test]
fn custom_ops_match_candle_on_the_cpu() {
    check_ops(&Device::Cpu);
}

#[test]
fn custom_ops_reject_bad_shapes() {
    let cpu = Device::Cpu;
    let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &cpu).unwrap();
    let pad = SamePad::new(8, 8, 3, 1);
    let w3 = Tensor::zeros((3, 1, 3, 3), DType::F32, &cpu).unwrap();
    let w4 = Tensor::zeros((4, 1, 3, 3), DType::F32, &cpu).unwrap();
    let b4 = Tensor::zeros(4, DType::F32, &cpu).unwrap();
    let b3 = Tensor::zeros(3, DType::F32, &cpu).unwrap();
    assert!(cuda::depthwise(&x, &w3, &b4, 1, pad, Activation::Relu6).is_err());
    assert!(cuda::depthwise(&x, &w4, &b3, 1, pad, Activation::Relu6).is_err());
    assert!(cuda::depthwise(&x, &w4, &b4, 0, pad, Activation::Relu6).is_err());
    let y = Tensor::zeros((1, 4, 64), DType::F32, &cpu).unwrap();
    let r = Tensor::zeros((1, 4, 63), DType::F32, &cpu).unwrap();
    assert!(cuda::bias_activation(&y, &b3, Activation::Relu, None).is_err());
    assert!(cuda::bias_activation(&y, &b4, Activation::Relu, Some(&r)).is_err());
    // CPU tensors keep the fast kernels or candle's ops.
    assert!(!cuda::usable(&[&x]));
}

/// The GPU, or `None` (and a line saying the test is skipped) where there is none.
fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            println!("{test}: skipped, no CUDA device ({e})");
            None
        }
    }
}

#[test]
fn custom_ops_on_cuda_match_the_cpu_reference() {
    let Some(device) = gpu("custom_ops_on_cuda_match_the_cpu_reference") else {
        return;
    };
    check_ops(&device);
}

/// Lite0 on the GPU (the custom depthwise and bias ops in every block) against the CPU's candle
/// path, with the pretrained weights.
#[test]
fn lite0_on_cuda_matches_the_cpu() {
    let Some(device) = gpu("lite0_on_cuda_matches_the_cpu") else {
        return;
    };
    // Relative to the package root, where cargo runs the tests and scripts/gpu-check.sh runs this
    // binary built on another machine.
    let path = Path::new("models/efficientnet-lite0.safetensors");
    let net = |device: &Device| {
        let tensors = vigil::nn::backbone::load_tensors(path, 10, device).unwrap();
        EfficientNetLite0::new(
            VarBuilder::from_tensors(tensors, DType::F32, device),
            10,
            false,
        )
        .unwrap()
    };
    let (cpu_net, gpu_net) = (net(&Device::Cpu), net(&device));
    let mut rng = Rng::new(21);
    for (b, c, h, w) in [(2, 3, 37, 50), (1, 1, 64, 48), (8, 3, 256, 256)] {
        let x: Vec<f32> = (0..b * c * h * w).map(|_| rng.f32()).collect();
        let x = Tensor::from_vec(x, (b, c, h, w), &Device::Cpu).unwrap();
        let reference = cpu_net.forward_taps_candle(&x, &[2, 4, 10]).unwrap();
        let maps = gpu_net
            .forward_taps(&x.to_device(&device).unwrap(), &[2, 4, 10])
            .unwrap();
        for (map, reference) in maps.iter().zip(&reference) {
            let d = max_diff(&map.to_device(&Device::Cpu).unwrap(), reference);
            assert!(d < TOLERANCE, "{b}x{c}x{h}x{w}: {d}");
        }
    }
}
