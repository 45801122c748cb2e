//! FCDD's building blocks: the pixel losses, the Gaussian upsampling, the augmentation and
//! preprocessing, the trainable Lite0 trunk and the FCDD network.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use vigil::data::image::{Image, Mask};
use vigil::data::synth::{product, SynthConfig};
use vigil::methods::fcdd::augment::{
    augment_train, color_jitter, gaussian_noise, lcn_range, local_contrast_normalization,
    normalize, normalize_into, preprocess, preprocess_tensor, random_crop_resize,
};
use vigil::methods::fcdd::loss::{fcdd_loss, hsc_loss, pseudo_huber, push, PUSH_EPSILON};
use vigil::methods::fcdd::net::{FcddNet, FcddNetParams, CUT_BLOCK};
use vigil::methods::fcdd::upsample::{gaussian_kernel_1d, GaussianUpsampler};
use vigil::methods::fcdd::PixelLoss;
use vigil::nn::backbone::{load_tensors, CellGrid, EfficientNetLite0};
use vigil::nn::init::snapshot;
use vigil::rng::Rng;

mod common;
use common::max_abs_diff;

fn cpu() -> Device {
    Device::Cpu
}

fn tensor(values: &[f32], dims: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), dims, &cpu()).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The push function in f64, at the argument the loss evaluates (a + ε).
fn p(a: f64) -> f64 {
    let x = a + PUSH_EPSILON;
    -(1.0 - (-x).exp()).ln()
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
        "{what}: {got}, expected {want}"
    );
}

// ---------------------------------------------------------------------------------------------
// Losses.

#[test]
fn pseudo_huber_and_push_values() {
    let x = tensor(&[0.0, 1.0, -3.0], &[3]);
    let h = values(&pseudo_huber(&x).unwrap());
    close(h[0] as f64, 0.0, "h(0)");
    close(h[1] as f64, 2f64.sqrt() - 1.0, "h(1)");
    close(h[2] as f64, 10f64.sqrt() - 1.0, "h(-3)");
    let a = tensor(&[0.0, 1e-30, 0.01, 1.0, 5.0], &[5]);
    let got = values(&push(&a).unwrap());
    for (&g, a) in got.iter().zip([0.0, 1e-30, 0.01, 1.0, 5.0]) {
        close(g as f64, p(a), &format!("p({a})"));
    }
    // p(0) = -ln(1 - e^-ε) ≈ -ln ε: large and finite.
    assert!((13.0..14.5).contains(&got[0]), "p(0) = {}", got[0]);
}

#[test]
fn hsc_loss_weights_anomalous_pixels_by_the_normal_to_anomalous_ratio() {
    // One 2x2 image, one anomalous pixel of four: |J0|/|J1| = 3.
    //   normal: 0.5 + 2 + 0 = 2.5;   anomalous: 3 · p(1)
    //   loss = (2.5 + 3 p(1)) / 4
    let a = tensor(&[0.5, 1.0, 2.0, 0.0], &[1, 2, 2]);
    let y = tensor(&[0.0, 1.0, 0.0, 0.0], &[1, 2, 2]);
    let want = (2.5 + 3.0 * p(1.0)) / 4.0;
    close(scalar(&hsc_loss(&a, &y).unwrap()), want, "1x2x2");

    // Two images, |J1| = 4 and |J0| = 4 over the batch (weight 1), though the images differ.
    //   normal: 2 + 3 + 4 (image 0) + 1 (image 1) = 10
    //   anomalous: p(1) + p(0.5) + p(0.5) + p(2)
    let a = tensor(&[1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 1.0, 2.0], &[2, 2, 2]);
    let y = tensor(&[1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0], &[2, 2, 2]);
    let want = (10.0 + p(1.0) + 2.0 * p(0.5) + p(2.0)) / 8.0;
    close(scalar(&hsc_loss(&a, &y).unwrap()), want, "2x2x2");
    close(
        scalar(&PixelLoss::Hsc.loss(&a, &y).unwrap()),
        want,
        "PixelLoss::Hsc",
    );

    // No anomalous pixel: the mean score, and no division by zero.
    let y = Tensor::zeros((2, 2, 2), DType::F32, &cpu()).unwrap();
    close(scalar(&hsc_loss(&a, &y).unwrap()), 14.0 / 8.0, "no anomaly");
}

#[test]
fn fcdd_loss_pushes_each_image_mean_and_skips_nominal_images() {
    // Image 0: normal mean (2 + 3 + 4) / 4 = 2.25, push of the anomalous mean 1/4.
    // Image 1 has no anomalous pixel: its mean (0.5 + 0.5 + 1 + 2) / 4 = 1 and no push term.
    let a = tensor(&[1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 1.0, 2.0], &[2, 2, 2]);
    let y = tensor(&[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], &[2, 2, 2]);
    let want = (2.25 + p(0.25) + 1.0) / 2.0;
    close(scalar(&fcdd_loss(&a, &y).unwrap()), want, "eq. 4");
    close(
        scalar(&PixelLoss::Fcdd.loss(&a, &y).unwrap()),
        want,
        "PixelLoss::Fcdd",
    );
    // eq. 5 on the same batch differs: |J0|/|J1| = 7, p per pixel.
    let hsc = (2.0 + 3.0 + 4.0 + 4.0 + 7.0 * p(1.0)) / 8.0;
    close(scalar(&hsc_loss(&a, &y).unwrap()), hsc, "eq. 5");

    assert_eq!(
        serde_json::from_str::<PixelLoss>("\"hsc\"").unwrap(),
        PixelLoss::Hsc
    );
    assert_eq!(
        serde_json::from_str::<PixelLoss>("\"fcdd\"").unwrap(),
        PixelLoss::Fcdd
    );
    assert_eq!(serde_json::to_string(&PixelLoss::Fcdd).unwrap(), "\"fcdd\"");
    assert!(serde_json::from_str::<PixelLoss>("\"Hsc\"").is_err());
    assert!(hsc_loss(&a, &a.narrow(0, 0, 1).unwrap()).is_err());
}

#[test]
fn loss_gradients_are_finite_at_zero_and_tiny_scores() {
    for start in [0.0f32, 1e-30] {
        let a = Var::from_tensor(&tensor(&[start; 8], &[2, 2, 2])).unwrap();
        let y = tensor(&[1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0], &[2, 2, 2]);
        for kind in [PixelLoss::Hsc, PixelLoss::Fcdd] {
            let loss = kind.loss(a.as_tensor(), &y).unwrap();
            assert!(scalar(&loss).is_finite(), "{kind:?} at {start}");
            let grads = loss.backward().unwrap();
            let g = values(grads.get(a.as_tensor()).unwrap());
            assert!(
                g.iter().all(|v| v.is_finite()),
                "{kind:?} at {start}: {g:?}"
            );
            // Normal pixels pull down (positive gradient), anomalous ones push up, hard.
            assert!(g[1] > 0.0 && g[0] < -1e3, "{kind:?} at {start}: {g:?}");
        }
        // eq. 5: a normal pixel's gradient is 1/(n·m).
        let grads = hsc_loss(a.as_tensor(), &y).unwrap().backward().unwrap();
        let g = values(grads.get(a.as_tensor()).unwrap());
        close(g[1] as f64, 1.0 / 8.0, "normal pixel gradient");
    }
}

// ---------------------------------------------------------------------------------------------
// Upsampling.

#[test]
fn gaussian_kernel_is_fcdds_gkern() {
    let g = gaussian_kernel_1d(5, 1.5);
    for (n, v) in g.iter().enumerate() {
        let d = n as f64 - 2.0;
        close(*v as f64, (-d * d / (2.0 * 2.25)).exp(), "odd kernel");
    }
    assert_eq!(g[2], 1.0);
    // Even: k - 1 samples, the centre duplicated, all halved.
    let g = gaussian_kernel_1d(4, 1.0);
    let e = (-0.5f64).exp();
    for (got, want) in g.iter().zip([e / 2.0, 0.5, 0.5, e / 2.0]) {
        close(*got as f64, want, "even kernel");
    }
}

/// FCDD's way: a transposed convolution with the 2-D kernel at the cells' stride, then the window
/// that puts cell i's kernel centre on pixel `offset + jump·i`.
fn transposed_reference(
    maps: &Tensor,
    grids: (CellGrid, CellGrid),
    out: (usize, usize),
    k: usize,
    sigma: f64,
) -> Tensor {
    let g = gaussian_kernel_1d(k, sigma);
    let outer: Vec<f32> = g
        .iter()
        .flat_map(|a| g.iter().map(move |b| a * b))
        .collect();
    let kernel = tensor(&outer, &[1, 1, k, k]);
    let full = maps
        .unsqueeze(1)
        .unwrap()
        .conv_transpose2d(&kernel, 0, 0, grids.0.jump, 1)
        .unwrap();
    let pad = (k - 1) / 2;
    full.narrow(2, pad - grids.0.offset, out.0)
        .unwrap()
        .narrow(3, pad - grids.1.offset, out.1)
        .unwrap()
        .squeeze(1)
        .unwrap()
}

#[test]
fn upsampling_equals_the_transposed_convolution() {
    let mut rng = Rng::new(4);
    let random = |rng: &mut Rng, dims: &[usize]| {
        let n = dims.iter().product();
        tensor(&(0..n).map(|_| rng.f32()).collect::<Vec<_>>(), dims)
    };
    // A toy geometry, odd and even kernels.
    for k in [7, 6] {
        let rows = CellGrid {
            cells: 5,
            offset: 1,
            jump: 2,
        };
        let cols = CellGrid {
            cells: 4,
            offset: 2,
            jump: 2,
        };
        let up = GaussianUpsampler::new(rows, cols, (10, 8), k, 2.0, &cpu()).unwrap();
        let maps = random(&mut rng, &[2, 5, 4]);
        let ours = up.forward(&maps).unwrap();
        let reference = transposed_reference(&maps, (rows, cols), (10, 8), k, 2.0);
        let diff = max_abs_diff(&ours, &reference);
        assert!(diff < 1e-5, "k {k}: max diff {diff}");
        assert_host_upsampling_matches(&up, &maps, (10, 8));
    }
    // Lite0 after block 4 at 64x96: 67-pixel kernel, σ = 12 · 64/224, cells at 7 + 8i.
    let up = GaussianUpsampler::lite0(64, 96, 4, 12.0, &cpu()).unwrap();
    assert_eq!(up.cells(), (8, 12));
    let maps = random(&mut rng, &[1, 8, 12]);
    let grids = (
        EfficientNetLite0::cell_grid(64, 4).unwrap(),
        EfficientNetLite0::cell_grid(96, 4).unwrap(),
    );
    let reference = transposed_reference(&maps, grids, (64, 96), 67, 12.0 * 64.0 / 224.0);
    let diff = max_abs_diff(&up.forward(&maps).unwrap(), &reference);
    assert!(diff < 1e-4, "lite0: max diff {diff}");
    assert_host_upsampling_matches(&up, &maps, (64, 96));
    assert!(up.forward(&random(&mut rng, &[1, 8, 11])).is_err());
    let mut scratch = Vec::new();
    assert!(up
        .upsample_cpu(&[0.0; 8 * 11], &mut scratch, &mut [0.0; 64 * 96])
        .is_err());
    assert!(up
        .upsample_cpu(&[0.0; 8 * 12], &mut scratch, &mut [0.0; 64 * 95])
        .is_err());
}

/// The host path (the fast inference's) gives the tensor path's maps, image by image, with one
/// scratch buffer reused across images.
fn assert_host_upsampling_matches(up: &GaussianUpsampler, maps: &Tensor, out: (usize, usize)) {
    let want = values(&up.forward(maps).unwrap());
    let low = values(maps);
    let (batch, h, w) = maps.dims3().unwrap();
    let mut got = vec![f32::NAN; batch * out.0 * out.1];
    let mut scratch = Vec::new();
    for (low, map) in low.chunks(h * w).zip(got.chunks_mut(out.0 * out.1)) {
        up.upsample_cpu(low, &mut scratch, map).unwrap();
    }
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "host vs tensor upsampling: {diff}");
}

#[test]
fn upsampling_gradient_is_the_adjoint() {
    let mut rng = Rng::new(9);
    let up = GaussianUpsampler::lite0(40, 56, 4, 12.0, &cpu()).unwrap();
    let (h, w) = up.cells();
    let n = h * w;
    let a = Var::from_tensor(&tensor(
        &(0..2 * n).map(|_| rng.f32()).collect::<Vec<_>>(),
        &[2, h, w],
    ))
    .unwrap();
    let weights = tensor(
        &(0..2 * 40 * 56).map(|_| rng.normal()).collect::<Vec<_>>(),
        &[2, 40, 56],
    );
    let loss = (up.forward(a.as_tensor()).unwrap() * &weights)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = values(grads.get(a.as_tensor()).unwrap());
    // Linear: d loss / d a_bij = <weights_b, up(one-hot ij)>.
    for (b, i, j) in [(0, 0, 0), (1, 2, 3), (0, h - 1, w - 1)] {
        let mut one_hot = vec![0f32; 2 * n];
        one_hot[b * n + i * w + j] = 1.0;
        let stamp = up.forward(&tensor(&one_hot, &[2, h, w])).unwrap();
        let want = scalar(&(stamp * &weights).unwrap().sum_all().unwrap());
        close(
            g[b * n + i * w + j] as f64,
            want,
            &format!("gradient ({b}, {i}, {j})"),
        );
    }
}

#[test]
fn lite0_receptive_field_and_cell_centres() {
    assert_eq!(EfficientNetLite0::receptive_field(4).unwrap(), 67);
    assert_eq!(EfficientNetLite0::receptive_field(0).unwrap(), 7);
    let grid = |n| EfficientNetLite0::cell_grid(n, 4).unwrap();
    assert_eq!(
        grid(224),
        CellGrid {
            cells: 28,
            offset: 7,
            jump: 8
        }
    );
    // Odd sizes pad symmetrically at every strided layer: no shift.
    assert_eq!(
        grid(225),
        CellGrid {
            cells: 29,
            offset: 0,
            jump: 8
        }
    );
    // 100: even at the stem (+1) and after it (50: +2), odd at block 3's input (25).
    assert_eq!(grid(100).offset, 3);
    assert!(EfficientNetLite0::receptive_field(16).is_err());
}

// ---------------------------------------------------------------------------------------------
// Augmentation and preprocessing.

fn textured(channels: usize, height: usize, width: usize, seed: u64) -> Image {
    let cfg = SynthConfig {
        height,
        width,
        channels,
        ..Default::default()
    };
    product(&cfg, &mut Rng::new(seed), None).0
}

#[test]
fn lcn_has_zero_mean_and_unit_mean_absolute_value() {
    for image in [textured(3, 40, 56, 1), textured(1, 33, 47, 2)] {
        let lcn = local_contrast_normalization(&image);
        let n = lcn.data.len() as f64;
        let mean = lcn.data.iter().map(|&v| v as f64).sum::<f64>() / n;
        let mad = lcn.data.iter().map(|&v| (v as f64).abs()).sum::<f64>() / n;
        assert!(mean.abs() < 1e-5, "mean {mean}");
        assert!((mad - 1.0).abs() < 1e-5, "mean |x| {mad}");
    }
    let flat = Image {
        data: vec![0.3; 3 * 8 * 8],
        ..Image::zeros(3, 8, 8)
    };
    assert!(local_contrast_normalization(&flat)
        .data
        .iter()
        .all(|&v| v == 0.0));
}

#[test]
fn crop_keeps_the_mask_on_the_image() {
    // Channel 0 holds the column, channel 1 the row: after the crop each pixel says where it came
    // from, and its mask value must be the mask at that source (nearest).
    let (h, w) = (45, 70);
    let mut image = Image::zeros(3, h, w);
    for y in 0..h {
        for x in 0..w {
            image.data[y * w + x] = x as f32 / (w - 1) as f32;
            image.data[h * w + y * w + x] = y as f32 / (h - 1) as f32;
        }
    }
    let mut mask = Mask::zeros(h, w);
    let mut rng = Rng::new(3);
    for m in mask.data.iter_mut() {
        *m = u8::from(rng.bool(0.3));
    }
    let mut origins = Vec::new();
    for seed in 0..20 {
        let (out, out_mask) = random_crop_resize(&image, &mask, &mut Rng::new(seed));
        assert_eq!(
            (out.height, out.width, out_mask.height, out_mask.width),
            (h, w, h, w)
        );
        // The source coordinates, and the pixels nearest to them (both at a tie: a centre
        // exactly between two source pixels, which f32 cannot tell apart from either side).
        let source = |i: usize| {
            let sx = out.data[i] * (w - 1) as f32;
            let sy = out.data[h * w + i] * (h - 1) as f32;
            (sy.round() as usize, sx.round() as usize)
        };
        let nearest = |s: f32| -> Vec<usize> {
            let frac = s - s.floor();
            if (frac - 0.5).abs() < 1e-3 {
                vec![s.floor() as usize, s.ceil() as usize]
            } else {
                vec![s.round() as usize]
            }
        };
        for i in 0..h * w {
            let sx = out.data[i] * (w - 1) as f32;
            let sy = out.data[h * w + i] * (h - 1) as f32;
            let mut candidates = Vec::new();
            for y in nearest(sy) {
                for x in nearest(sx) {
                    candidates.push(mask.data[y * w + x]);
                }
            }
            assert!(
                candidates.contains(&out_mask.data[i]),
                "seed {seed}, pixel {i}: {} not in {candidates:?}",
                out_mask.data[i]
            );
        }
        // The window is 224/240 of each side: 42 rows and 65 columns of the source.
        let (top, left) = source(0);
        let (bottom, right) = source(h * w - 1);
        assert_eq!(
            (bottom - top + 1, right - left + 1),
            (42, 65),
            "seed {seed}"
        );
        origins.push((top, left));
    }
    origins.sort();
    origins.dedup();
    assert!(origins.len() > 5, "crop positions barely vary: {origins:?}");
}

#[test]
fn faint_jitter_changes_little_and_strong_jitter_more() {
    let image = textured(3, 40, 56, 5);
    let change = |a: &Image, b: &Image| {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    let mut strong = 0.0f32;
    for seed in 0..10 {
        let faint = color_jitter(&image, 0.0005, &mut Rng::new(seed));
        assert!(
            change(&image, &faint) < 0.005,
            "seed {seed}: {}",
            change(&image, &faint)
        );
        strong = strong.max(change(
            &image,
            &color_jitter(&image, 0.04, &mut Rng::new(seed)),
        ));
    }
    assert!(strong > 0.01, "strong jitter changed at most {strong}");
    let grey = textured(1, 30, 30, 6);
    let faint = color_jitter(&grey, 0.0005, &mut Rng::new(1));
    assert!(change(&grey, &faint) < 0.005);
    assert!(faint.data.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn noise_hits_half_the_pixels_at_a_tenth_of_the_spread() {
    // Mid-grey ± a small texture, so that clamping never cuts the noise.
    let base = textured(3, 64, 64, 7);
    let image = Image {
        data: base.data.iter().map(|v| 0.4 + 0.2 * v).collect(),
        ..base
    };
    let n = 64 * 64;
    let mean = image.data.iter().sum::<f32>() / image.data.len() as f32;
    let std = (image.data.iter().map(|v| (v - mean).powi(2)).sum::<f32>()
        / image.data.len() as f32)
        .sqrt();
    let noisy = gaussian_noise(&image, &mut Rng::new(2));
    let changed: Vec<usize> = (0..n)
        .filter(|&i| (0..3).any(|c| noisy.data[c * n + i] != image.data[c * n + i]))
        .collect();
    let share = changed.len() as f32 / n as f32;
    assert!(
        (0.45..0.55).contains(&share),
        "share of noisy pixels {share}"
    );
    let deltas: Vec<f32> = changed
        .iter()
        .flat_map(|&i| (0..3).map(move |c| c * n + i))
        .map(|k| noisy.data[k] - image.data[k])
        .collect();
    let spread = (deltas.iter().map(|d| d * d).sum::<f32>() / deltas.len() as f32).sqrt() / std;
    assert!(
        (0.09..0.11).contains(&spread),
        "noise std / image std {spread}"
    );
}

#[test]
fn augmentation_is_deterministic_per_seed_and_varies_across_seeds() {
    let image = textured(3, 40, 48, 8);
    let mut mask = Mask::zeros(40, 48);
    mask.data[20 * 48..21 * 48].fill(1);
    let first = augment_train(&image, Some(&mask), &mut Rng::new(1));
    assert_eq!(first, augment_train(&image, Some(&mask), &mut Rng::new(1)));
    let masks: Vec<Mask> = (0..12)
        .map(|seed| augment_train(&image, Some(&mask), &mut Rng::new(seed)).1)
        .collect();
    assert!(masks.contains(&mask), "never kept the geometry");
    assert!(masks.iter().any(|m| *m != mask), "never cropped");
    let (out, none) = augment_train(&image, None, &mut Rng::new(2));
    assert!(!none.any());
    assert_ne!(out, image);
    assert!(out.data.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn preprocessing_on_tensors_matches_images() {
    let images = [textured(3, 24, 32, 9), textured(3, 24, 32, 10)];
    let (min, max) = lcn_range(images.iter()).unwrap();
    assert!(min < 0.0 && max > 0.0);
    for image in &images {
        let pre = preprocess(image, min, max);
        assert!(pre.data.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(
            pre,
            normalize(&local_contrast_normalization(image), min, max)
        );
    }
    let flat = Image {
        data: vec![0.5; 3 * 24 * 32],
        ..Image::zeros(3, 24, 32)
    };
    let batch = [&images[0], &images[1], &flat];
    let t = vigil::data::image::batch_tensor(&batch, &cpu()).unwrap();
    let got = values(&preprocess_tensor(&t, min, max).unwrap());
    let want: Vec<f32> = batch
        .iter()
        .flat_map(|image| preprocess(image, min, max).data)
        .collect();
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "tensor vs image preprocessing: {diff}");
    // The inference path's copy-and-normalise (one affine map) gives the training path's values.
    for image in batch {
        let mut into = vec![f32::NAN; image.data.len()];
        normalize_into(&image.data, &mut into, min, max);
        let diff = into
            .iter()
            .zip(&preprocess(image, min, max).data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-6, "normalize_into vs preprocess: {diff}");
    }
    assert!(lcn_range([&flat]).is_err());
}

// ---------------------------------------------------------------------------------------------
// The trainable trunk and the FCDD network (need models/efficientnet-lite0.safetensors).

fn pretrained() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet-lite0.safetensors");
    assert!(
        path.exists(),
        "{} is missing: run models/get-weights.sh first",
        path.display()
    );
    load_tensors(&path, CUT_BLOCK, &cpu()).unwrap()
}

fn image_batch(batch: usize, height: usize, width: usize, seed: u64) -> Tensor {
    let images: Vec<Image> = (0..batch)
        .map(|i| textured(3, height, width, seed + i as u64))
        .collect();
    let refs: Vec<&Image> = images.iter().collect();
    vigil::data::image::batch_tensor(&refs, &cpu()).unwrap()
}

fn range(t: &Tensor) -> f64 {
    let v = values(t);
    let max = v.iter().copied().fold(f32::MIN, f32::max);
    let min = v.iter().copied().fold(f32::MAX, f32::min);
    (max - min) as f64
}

#[test]
fn receptive_centres_match_the_real_network() {
    // The input gradient of one feature cell spans exactly its receptive field around its centre.
    let weights = pretrained();
    let net = EfficientNetLite0::new(
        VarBuilder::from_tensors(weights, DType::F32, &cpu()),
        CUT_BLOCK,
        false,
    )
    .unwrap();
    let (height, width) = (160, 161);
    let x = Var::from_tensor(&image_batch(1, height, width, 30)).unwrap();
    let features = net
        .forward_taps_candle(x.as_tensor(), &[CUT_BLOCK])
        .unwrap();
    let (row, col) = (10, 10);
    let cell = features[0]
        .narrow(2, row, 1)
        .unwrap()
        .narrow(3, col, 1)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = cell.backward().unwrap();
    let g = grads
        .get(x.as_tensor())
        .unwrap()
        .abs()
        .unwrap()
        .sum(1)
        .unwrap();
    let g = g.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    let rows: Vec<usize> = (0..height)
        .filter(|&y| g[y].iter().any(|&v| v > 0.0))
        .collect();
    let cols: Vec<usize> = (0..width)
        .filter(|&x| (0..height).any(|y| g[y][x] > 0.0))
        .collect();
    let (gr, gc) = (
        EfficientNetLite0::cell_grid(height, CUT_BLOCK).unwrap(),
        EfficientNetLite0::cell_grid(width, CUT_BLOCK).unwrap(),
    );
    let (cy, cx) = (gr.offset + gr.jump * row, gc.offset + gc.jump * col);
    assert_eq!((cy, cx), (87, 80), "centres for even 160 and odd 161");
    assert_eq!((rows[0], rows[rows.len() - 1]), (cy - 33, cy + 33), "rows");
    assert_eq!(
        (cols[0], cols[cols.len() - 1]),
        (cx - 33, cx + 33),
        "columns"
    );
}

#[test]
fn fast_and_candle_paths_agree() {
    let vars = VarMap::new();
    let net = FcddNet::new(
        &pretrained(),
        &vars,
        None,
        &FcddNetParams::new(64, 96),
        &cpu(),
    )
    .unwrap();
    let view = net.detached();
    let x = image_batch(2, 64, 96, 40);
    let reference = view.upsampled(&x).unwrap();
    assert_eq!(reference.dims(), &[2, 64, 96]);
    let fast = view
        .upsampled_fast(&view.fast_engine().unwrap(), &x)
        .unwrap();
    let diff = max_abs_diff(&fast, &reference) / range(&reference);
    assert!(diff < 1e-3, "fast vs candle: max diff {diff} of the range");
    // Training runs the frozen front on the fast kernels and the rest on candle's ops.
    let all_candle = view.upsample(&view.forward_candle(&x).unwrap()).unwrap();
    let diff = max_abs_diff(&reference, &all_candle) / range(&all_candle);
    assert!(
        diff < 1e-3,
        "fast frozen front vs candle: max diff {diff} of the range"
    );
    assert!(net.upsampled(&image_batch(1, 64, 95, 0)).is_err());
}

/// One plain SGD step on every variable.
fn sgd_step(vars: &VarMap, grads: &candle_core::backprop::GradStore, lr: f64) {
    for var in vars.all_vars() {
        let g = grads.get(var.as_tensor()).unwrap();
        var.set(&(var.as_tensor() - (g * lr).unwrap()).unwrap())
            .unwrap();
    }
}

#[test]
fn training_reaches_every_variable_and_no_frozen_weight() {
    let pretrained = pretrained();
    let vars = VarMap::new();
    let params = FcddNetParams::new(64, 96);
    let net = FcddNet::new(&pretrained, &vars, None, &params, &cpu()).unwrap();
    let view = net.detached();
    // Blocks 3 and 4: expand, depthwise and project, weight and bias each; the head's two.
    let names: Vec<String> = {
        let mut names: Vec<String> = vars.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        names
    };
    assert_eq!(names.len(), 14, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("blocks.3.")
        || n.starts_with("blocks.4.")
        || n.starts_with("head.")));

    let x = image_batch(2, 64, 96, 50);
    let mut y = vec![0f32; 2 * 64 * 96];
    for row in 20..36 {
        y[row * 96 + 30..row * 96 + 50].fill(1.0);
    }
    let y = tensor(&y, &[2, 64, 96]);

    let frozen_before = net.trunk().forward_taps_candle(&x, &[2]).unwrap();
    let cut_before = net.trunk().forward_taps_candle(&x, &[CUT_BLOCK]).unwrap();
    let view_before = view.upsampled(&x).unwrap();

    let loss = PixelLoss::Hsc
        .loss(&net.upsampled(&x).unwrap(), &y)
        .unwrap();
    assert!(scalar(&loss).is_finite());
    let grads = loss.backward().unwrap();
    for name in &names {
        let var = vars.data().lock().unwrap()[name].clone();
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let largest = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            largest > 0.0 && largest.is_finite(),
            "{name}: gradient {largest}"
        );
    }
    sgd_step(&vars, &grads, 0.01);

    // The frozen blocks are bit-identical; the trained ones and the view moved.
    let frozen_after = net.trunk().forward_taps_candle(&x, &[2]).unwrap();
    assert_eq!(max_abs_diff(&frozen_before[0], &frozen_after[0]), 0.0);
    let frozen_net = EfficientNetLite0::new(
        VarBuilder::from_tensors(pretrained.clone(), DType::F32, &cpu()),
        2,
        false,
    )
    .unwrap();
    let pretrained_tap = frozen_net.forward_taps_candle(&x, &[2]).unwrap();
    assert_eq!(max_abs_diff(&pretrained_tap[0], &frozen_after[0]), 0.0);
    let cut_after = net.trunk().forward_taps_candle(&x, &[CUT_BLOCK]).unwrap();
    assert!(max_abs_diff(&cut_before[0], &cut_after[0]) > 0.0);
    let view_after = view.upsampled(&x).unwrap();
    assert!(
        max_abs_diff(&view_before, &view_after) > 0.0,
        "the view missed the update"
    );
    assert!(max_abs_diff(&view_after, &net.upsampled(&x).unwrap()) < 1e-6);

    // The fast engine is built from the current values.
    let fast = view
        .upsampled_fast(&view.fast_engine().unwrap(), &x)
        .unwrap();
    let diff = max_abs_diff(&fast, &view_after) / range(&view_after);
    assert!(
        diff < 1e-3,
        "fast path after the update: {diff} of the range"
    );

    // A network rebuilt from the stored variables, without the trained blocks' pretrained
    // tensors, computes the same maps.
    let mut stored = HashMap::new();
    snapshot(&vars, &mut stored).unwrap();
    let frozen_only: HashMap<String, Tensor> = pretrained
        .into_iter()
        .filter(|(k, _)| !k.starts_with("_blocks.3.") && !k.starts_with("_blocks.4."))
        .collect();
    let rebuilt_vars = VarMap::new();
    let rebuilt = FcddNet::new(&frozen_only, &rebuilt_vars, Some(&stored), &params, &cpu())
        .unwrap()
        .detached();
    assert_eq!(
        max_abs_diff(&rebuilt.upsampled(&x).unwrap(), &view_after),
        0.0
    );
    // ... and without `stored` those tensors are needed.
    assert!(FcddNet::new(&frozen_only, &VarMap::new(), None, &params, &cpu()).is_err());
}

#[test]
fn trainable_trunk_rejects_bad_cuts_and_keeps_existing_variables() {
    let pretrained = pretrained();
    let vb = || VarBuilder::from_tensors(pretrained.clone(), DType::F32, &cpu());
    assert!(EfficientNetLite0::new_trainable(vb(), 4, 5, &VarMap::new(), None).is_err());
    // Everything trainable from block 0; a second network on the same map shares its variables.
    let vars = VarMap::new();
    let a = EfficientNetLite0::new_trainable(vb(), 4, 0, &vars, None).unwrap();
    let count = vars.all_vars().len();
    assert_eq!(count, 2 * (2 + 3 * 4));
    let b = EfficientNetLite0::new_trainable(vb(), 4, 0, &vars, None).unwrap();
    assert_eq!(vars.all_vars().len(), count);
    let x = image_batch(1, 32, 40, 60);
    let frozen = EfficientNetLite0::new(vb(), 4, false).unwrap();
    let reference = frozen.forward_taps_candle(&x, &[4]).unwrap();
    for net in [&a, &b] {
        let out = net.forward_taps(&x, &[4]).unwrap();
        assert!(max_abs_diff(&out[0], &reference[0]) < 1e-6);
    }
}
