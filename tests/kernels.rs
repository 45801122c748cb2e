//! The fast CPU kernels against candle's reference ops, on random inputs of every supported shape,
//! for every instruction set this CPU runs (AVX-512, AVX2 and the portable fallback, as present).
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vigil::nn::backbone::EfficientNetLite0;
use vigil::nn::depthwise::SamePad;
use vigil::nn::kernels::{
    nchw_to_nhwc, nhwc_to_nchw, pack_conv_weight, pack_depthwise_weight, ASource, Activation,
    ConvGeom, DepthwiseGeom, Epilogue, Kernels, PackedB,
};
use vigil::rng::Rng;

const TOLERANCE: f32 = 1e-4;

fn values(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

fn tensor(v: &[f32], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The largest absolute difference; infinite where either side is NaN (outputs start as NaN, so
/// that one a kernel never writes fails the comparison instead of vanishing in `f32::max`).
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f32::max)
}

fn activate(t: Tensor, activation: Activation) -> Tensor {
    match activation {
        Activation::Identity => t,
        Activation::Relu => t.relu().unwrap(),
        Activation::Relu6 => t.clamp(0f32, 6f32).unwrap(),
    }
}

/// NHWC `[B, H, W, C]` values → candle NCHW tensor.
fn nchw_tensor(nhwc: &[f32], [b, c, h, w]: [usize; 4]) -> Tensor {
    let mut out = vec![0.0; nhwc.len()];
    nhwc_to_nchw(nhwc, [b, c, h, w], &mut out);
    tensor(&out, &[b, c, h, w])
}

fn nhwc_values(t: &Tensor) -> Vec<f32> {
    let dims: [usize; 4] = t.dims().try_into().unwrap();
    let src = flat(t);
    let mut out = vec![0.0; src.len()];
    nchw_to_nhwc(&src, dims, &mut out, |v| v);
    out
}

#[test]
fn gemm_matches_matmul_with_bias_activation_and_residual() {
    let mut rng = Rng::new(1);
    // Shapes around the tile sizes (6×16), the K block (256) and Lite0's 1×1 convolutions.
    let shapes = [
        (1, 1, 1),
        (5, 3, 7),
        (6, 16, 16),
        (13, 27, 33),
        (64, 96, 24),
        (100, 300, 40),
        (37, 600, 17),
        (257, 144, 48),
    ];
    for kernels in Kernels::available() {
        for &(m, k, n) in &shapes {
            for activation in [Activation::Identity, Activation::Relu, Activation::Relu6] {
                for with_residual in [false, true] {
                    let scale = 3.0 / (k as f32).sqrt();
                    let a = values(&mut rng, m * k, 1.0);
                    let w = values(&mut rng, n * k, scale);
                    let bias = values(&mut rng, n, 1.0);
                    let res = values(&mut rng, m * n, 1.0);
                    let packed = PackedB::from_out_in(&w, n, k, &bias);
                    let mut out = vec![f32::NAN; m * n];
                    let epilogue = Epilogue {
                        activation,
                        residual: with_residual.then_some(res.as_slice()),
                    };
                    let source = ASource::Matrix { data: &a, lda: k };
                    kernels.gemm(source, &packed, epilogue, &mut out).unwrap();
                    let reference = tensor(&a, &[m, k])
                        .matmul(&tensor(&w, &[n, k]).t().unwrap())
                        .unwrap()
                        .broadcast_add(&tensor(&bias, &[n]))
                        .unwrap();
                    let mut reference = activate(reference, activation);
                    if with_residual {
                        reference = (reference + tensor(&res, &[m, n])).unwrap();
                    }
                    let d = max_diff(&out, &flat(&reference));
                    assert!(
                        d < TOLERANCE,
                        "{kernels:?} {m}x{k}x{n} {activation:?} residual {with_residual}: {d}"
                    );
                }
            }
        }
    }
}

#[test]
fn gemm_reads_strided_rows_and_rejects_bad_sizes() {
    let mut rng = Rng::new(2);
    let (m, k, n, lda) = (9, 10, 20, 13);
    let a = values(&mut rng, m * lda, 1.0);
    let w = values(&mut rng, n * k, 0.3);
    let packed = PackedB::from_out_in(&w, n, k, &vec![0.0; n]);
    let plain = Epilogue {
        activation: Activation::Identity,
        residual: None,
    };
    for kernels in Kernels::available() {
        let mut out = vec![0.0; m * n];
        kernels
            .gemm(ASource::Matrix { data: &a, lda }, &packed, plain, &mut out)
            .unwrap();
        let dense: Vec<f32> = a.chunks(lda).flat_map(|r| r[..k].to_vec()).collect();
        let reference = tensor(&dense, &[m, k])
            .matmul(&tensor(&w, &[n, k]).t().unwrap())
            .unwrap();
        assert!(max_diff(&out, &flat(&reference)) < TOLERANCE);
        let short = ASource::Matrix {
            data: &a[..lda * (m - 1)],
            lda,
        };
        assert!(kernels.gemm(short, &packed, plain, &mut out).is_err());
        assert!(kernels
            .gemm(
                ASource::Matrix { data: &a, lda },
                &packed,
                plain,
                &mut out[1..]
            )
            .is_err());
    }
}

#[test]
fn dense_conv_matches_candle_conv2d() {
    let mut rng = Rng::new(3);
    // (batch, in, out, h, w, kernel, stride, pad): the stem (3×3/2, TF same), the heads (3×3/1),
    // a generator-style 4×4/2, 5×5, 1×1 and deep inputs that cross the K block.
    let cases = [
        (1, 3, 32, 17, 16, 3, 2, SamePad::new(17, 16, 3, 2)),
        (2, 1, 8, 9, 11, 3, 2, SamePad::new(9, 11, 3, 2)),
        (2, 20, 36, 8, 7, 3, 1, SamePad::new(8, 7, 3, 1)),
        (1, 64, 40, 6, 6, 3, 1, SamePad::new(6, 6, 3, 1)),
        (3, 5, 7, 10, 10, 4, 2, sym(1)),
        (1, 6, 9, 9, 8, 5, 1, sym(2)),
        (2, 12, 10, 5, 6, 1, 1, sym(0)),
        (1, 4, 3, 7, 7, 3, 3, sym(0)),
    ];
    for kernels in Kernels::available() {
        for &(b, cin, cout, h, w, k, stride, pad) in &cases {
            for activation in [Activation::Identity, Activation::Relu6] {
                let x = values(&mut rng, b * h * w * cin, 1.0);
                let weight = values(
                    &mut rng,
                    cout * cin * k * k,
                    1.5 / ((cin * k * k) as f32).sqrt(),
                );
                let bias = values(&mut rng, cout, 1.0);
                let x_nchw = nchw_tensor(&x, [b, cin, h, w]);
                let reference = x_nchw
                    .pad_with_zeros(2, pad.top, pad.bottom)
                    .unwrap()
                    .pad_with_zeros(3, pad.left, pad.right)
                    .unwrap()
                    .conv2d(&tensor(&weight, &[cout, cin, k, k]), 0, stride, 1, 1)
                    .unwrap()
                    .broadcast_add(&tensor(&bias, &[1, cout, 1, 1]))
                    .unwrap();
                let reference = activate(reference, activation);
                let (_, _, oh, ow) = reference.dims4().unwrap();
                let geom = ConvGeom {
                    batch: b,
                    height: h,
                    width: w,
                    in_c: cin,
                    kernel_h: k,
                    kernel_w: k,
                    stride,
                    pad_top: pad.top,
                    pad_left: pad.left,
                    out_h: oh,
                    out_w: ow,
                };
                let packed = pack_conv_weight(&weight, cout, cin, k, k, &bias);
                let mut out = vec![f32::NAN; b * oh * ow * cout];
                let epilogue = Epilogue {
                    activation,
                    residual: None,
                };
                kernels
                    .conv2d(&x, geom, &packed, epilogue, &mut out)
                    .unwrap();
                let d = max_diff(&out, &nhwc_values(&reference));
                assert!(
                    d < TOLERANCE,
                    "{kernels:?} case {b}x{cin}x{h}x{w} k{k} s{stride}: {d}"
                );
            }
        }
    }
}

fn sym(p: usize) -> SamePad {
    SamePad {
        top: p,
        bottom: p,
        left: p,
        right: p,
    }
}

#[test]
fn depthwise_matches_grouped_conv2d() {
    let mut rng = Rng::new(4);
    // Channel counts below, at and past the 8- and 32-wide vector loops, and multiples of 16 on
    // rows wide enough for the 8-pixel AVX-512 groups next to the 4-pixel AVX2 ones.
    let mut cases = Vec::new();
    for kernel in [3, 5] {
        for stride in [1, 2] {
            for &(b, c, h, w) in &[
                (1, 5, 9, 8),
                (2, 8, 7, 10),
                (1, 40, 12, 11),
                (2, 37, 6, 5),
                (1, 48, 9, 37),
                (2, 32, 6, 26),
            ] {
                cases.push((b, c, h, w, kernel, stride));
            }
        }
    }
    for kernels in Kernels::available() {
        for &(b, c, h, w, kernel, stride) in &cases {
            let pad = SamePad::new(h, w, kernel, stride);
            let x = values(&mut rng, b * h * w * c, 1.0);
            let weight = values(&mut rng, c * kernel * kernel, 0.4);
            let bias = values(&mut rng, c, 1.0);
            let reference = nchw_tensor(&x, [b, c, h, w])
                .pad_with_zeros(2, pad.top, pad.bottom)
                .unwrap()
                .pad_with_zeros(3, pad.left, pad.right)
                .unwrap()
                .conv2d(&tensor(&weight, &[c, 1, kernel, kernel]), 0, stride, 1, c)
                .unwrap()
                .broadcast_add(&tensor(&bias, &[1, c, 1, 1]))
                .unwrap();
            let reference = activate(reference, Activation::Relu6);
            let (_, _, oh, ow) = reference.dims4().unwrap();
            let geom = DepthwiseGeom {
                batch: b,
                height: h,
                width: w,
                channels: c,
                kernel,
                stride,
                pad_top: pad.top,
                pad_left: pad.left,
                out_h: oh,
                out_w: ow,
            };
            let packed = pack_depthwise_weight(&weight, c, kernel);
            let mut out = vec![f32::NAN; b * oh * ow * c];
            kernels
                .depthwise(&geom, &x, &packed, &bias, Activation::Relu6, &mut out)
                .unwrap();
            let d = max_diff(&out, &nhwc_values(&reference));
            assert!(
                d < TOLERANCE,
                "{kernels:?} {b}x{c}x{h}x{w} k{kernel} s{stride}: {d}"
            );
            assert!(kernels
                .depthwise(&geom, &x[1..], &packed, &bias, Activation::Relu6, &mut out)
                .is_err());
            if b == 1 {
                ring_rows_match(kernels, &geom, &x, &packed, &bias, &out);
            }
        }
    }
}

/// The same convolution with its input rows fed through a ring two output rows at a time, as the
/// fused Lite0 blocks do: each ring slot holds the input row it should, stale rows elsewhere.
fn ring_rows_match(
    kernels: Kernels,
    geom: &DepthwiseGeom,
    x: &[f32],
    packed: &[f32],
    bias: &[f32],
    expected: &[f32],
) {
    let (step, row_len) = (2, geom.width * geom.channels);
    let slots = (step - 1) * geom.stride + geom.kernel;
    let mut ring = vec![f32::NAN; slots * row_len];
    let out_row = geom.out_w * geom.channels;
    let mut oy = 0;
    while oy < geom.out_h {
        let end = (oy + step).min(geom.out_h);
        let first = (oy * geom.stride).saturating_sub(geom.pad_top);
        let last = ((end - 1) * geom.stride + geom.kernel)
            .saturating_sub(geom.pad_top)
            .min(geom.height);
        for iy in first..last {
            let slot = iy % slots;
            ring[slot * row_len..(slot + 1) * row_len]
                .copy_from_slice(&x[iy * row_len..(iy + 1) * row_len]);
        }
        let mut out = vec![f32::NAN; (end - oy) * out_row];
        kernels
            .depthwise_ring_rows(
                geom,
                &ring,
                slots,
                oy..end,
                packed,
                bias,
                Activation::Relu6,
                &mut out,
            )
            .unwrap();
        let d = max_diff(&out, &expected[oy * out_row..end * out_row]);
        assert!(
            d < TOLERANCE,
            "{kernels:?} ring rows {oy}..{end} of {geom:?}: {d}"
        );
        oy = end;
    }
    // A ring too small for two rows' windows is refused.
    if geom.height > geom.kernel {
        let small = geom.kernel * row_len;
        let mut out = vec![0.0; 2 * out_row];
        assert!(kernels
            .depthwise_ring_rows(
                geom,
                &ring[..small],
                geom.kernel,
                0..2,
                packed,
                bias,
                Activation::Relu6,
                &mut out,
            )
            .is_err());
    }
}

/// The whole Lite0 feature path on the fast kernels against candle's ops, with the pretrained
/// weights (present after `models/get-weights.sh`; the test suite script fetches them).
#[test]
fn fast_lite0_matches_the_candle_backbone() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet-lite0.safetensors");
    assert!(
        path.exists(),
        "{} is missing: run models/get-weights.sh",
        path.display()
    );
    let tensors = vigil::nn::backbone::load_tensors(&path, 10, &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let net = EfficientNetLite0::new(vb, 10, false).unwrap();
    let mut rng = Rng::new(5);
    for (b, c, h, w) in [(2, 3, 37, 50), (1, 1, 64, 48)] {
        let x: Vec<f32> = (0..b * c * h * w).map(|_| rng.f32()).collect();
        let x = tensor(&x, &[b, c, h, w]);
        let reference = net.forward_taps_candle(&x, &[2, 4, 10]).unwrap();
        for kernels in Kernels::available() {
            let fast = net.fast_engine(kernels).unwrap();
            let maps = fast
                .forward_taps(&flat(&x), [b, c, h, w], &[2, 4, 10])
                .unwrap();
            for (map, reference) in maps.iter().zip(&reference) {
                assert_eq!(map.dims.as_slice(), reference.dims());
                let d = max_diff(&map.data, &flat(reference));
                assert!(d < TOLERANCE, "{kernels:?} {b}x{c}x{h}x{w}: {d}");
            }
        }
        // The public entry point takes the fast path on CPU.
        let via_net = net.forward_taps(&x, &[10]).unwrap();
        assert!(max_diff(&flat(&via_net[0]), &flat(&reference[2])) < TOLERANCE);
    }
}
