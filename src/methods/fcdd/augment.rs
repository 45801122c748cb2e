//! FCDD's training augmentation and its preprocessing, as the HSC paper lists them: a random crop
//! (half the time), colour jitter, additive Gaussian noise, then local contrast normalisation and
//! min-max normalisation, the last two also at inference.
//!
//! [`augment_train`] does the random part on images in 0..=1; [`preprocess`] (or
//! [`preprocess_tensor`] on batches) the deterministic part, after it and at inference.
use candle_core::Tensor;

use crate::data::image::{Image, Mask};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Share of each side a random crop keeps: FCDD crops 224 of its 240-pixel images.
pub const CROP_FRACTION: f64 = 224.0 / 240.0;

/// The two colour-jitter strengths FCDD picks from with equal chance (every parameter alike).
pub const JITTER_STRENGTHS: [f32; 2] = [0.04, 0.0005];

/// The additive noise's standard deviation relative to the image's.
pub const NOISE_RELATIVE_STD: f32 = 0.1;

/// LCN leaves an image whose mean absolute deviation is below this at zero (a flat image has no
/// contrast to normalise).
const FLAT: f32 = 1e-12;

/// One training sample's random augmentation, FCDD's order: with 50% a crop of
/// [`CROP_FRACTION`] of each side at a random position resized back to the full size (FCDD: resize
/// 240 → 224, or crop 224 of 240; here images already arrive at the model's size), colour jitter
/// of strength 0.04 or 0.0005 (50% each), and Gaussian noise. Returns values in 0..=1 with the mask
/// moved along (an all-normal mask when `mask` is `None`; a mask of another size is first resized
/// to the image's, nearest). Apply [`preprocess`] afterwards.
pub fn augment_train(image: &Image, mask: Option<&Mask>, rng: &mut Rng) -> (Image, Mask) {
    let (h, w) = (image.height, image.width);
    let mask = match mask {
        Some(m) if (m.height, m.width) == (h, w) => m.clone(),
        Some(m) => m.resize(h, w),
        None => Mask::zeros(h, w),
    };
    let (cropped, mask) = if rng.bool(0.5) {
        random_crop_resize(image, &mask, rng)
    } else {
        (image.clone(), mask)
    };
    let strength = JITTER_STRENGTHS[usize::from(rng.bool(0.5))];
    let jittered = color_jitter(&cropped, strength, rng);
    (gaussian_noise(&jittered, rng), mask)
}

/// A window of [`CROP_FRACTION`] of each side (so proportional for non-square images) at a
/// uniformly random position, resized back to the image's size: bilinear for the image (pixel
/// centres aligned, as `align_corners = false`), nearest for the mask, so a mask pixel is
/// anomalous exactly when the source pixel nearest to it is.
pub fn random_crop_resize(image: &Image, mask: &Mask, rng: &mut Rng) -> (Image, Mask) {
    let (h, w) = (image.height, image.width);
    let side = |n: usize| ((n as f64 * CROP_FRACTION).round() as usize).clamp(1, n.max(1));
    let (ch, cw) = (side(h), side(w));
    let top = rng.range_usize(0, h - ch + 1);
    let left = rng.range_usize(0, w - cw + 1);
    // Source coordinate of destination pixel i (centres aligned), inside the window.
    let source = |i: usize, dst: usize, len: usize, start: usize| -> f64 {
        let s = (i as f64 + 0.5) * len as f64 / dst as f64 - 0.5;
        start as f64 + s.clamp(0.0, (len - 1) as f64)
    };
    let xs: Vec<f64> = (0..w).map(|x| source(x, w, cw, left)).collect();
    let ys: Vec<f64> = (0..h).map(|y| source(y, h, ch, top)).collect();
    let mut out = Image::zeros(image.channels, h, w);
    for c in 0..image.channels {
        let src = image.plane(c);
        let dst = out.plane_mut(c);
        for (y, &sy) in ys.iter().enumerate() {
            let (y0, fy) = (sy.floor() as usize, sy - sy.floor());
            let y1 = (y0 + 1).min(h - 1);
            for (x, &sx) in xs.iter().enumerate() {
                let (x0, fx) = (sx.floor() as usize, sx - sx.floor());
                let x1 = (x0 + 1).min(w - 1);
                let at = |yy: usize, xx: usize| src[yy * w + xx] as f64;
                let top_row = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                let bottom_row = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                dst[y * w + x] = (top_row * (1.0 - fy) + bottom_row * fy) as f32;
            }
        }
    }
    let mut out_mask = Mask::zeros(h, w);
    // The nearest source pixel of a destination pixel: the one whose centre is nearest.
    let nearest = |s: f64| (s + 0.5).floor() as usize;
    for (y, &sy) in ys.iter().enumerate() {
        for (x, &sx) in xs.iter().enumerate() {
            out_mask.data[y * w + x] = mask.data[nearest(sy) * w + nearest(sx)];
        }
    }
    (out, out_mask)
}

/// ITU-R 601 luma, as torchvision's `rgb_to_grayscale`.
fn luma(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = max - min;
    let hue = if delta == 0.0 {
        0.0
    } else if max == r {
        ((g - b) / delta).rem_euclid(6.0) / 6.0
    } else if max == g {
        ((b - r) / delta + 2.0) / 6.0
    } else {
        ((r - g) / delta + 4.0) / 6.0
    };
    let saturation = if max == 0.0 { 0.0 } else { delta / max };
    (hue, saturation, max)
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h.rem_euclid(1.0) * 6.0;
    let sector = (h6.floor() as usize).min(5);
    let f = h6 - sector as f32;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match sector {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// torchvision's `ColorJitter(p, p, p, p)`: brightness, contrast and saturation factors uniform
/// in [max(0, 1 - p), 1 + p] and a hue shift uniform in [-p, p] (of a full turn), applied in a
/// random order, each clamped to 0..=1. Brightness scales values; contrast blends with the mean
/// grey level; saturation blends with each pixel's grey (luma); hue rotates it in HSV.
/// Saturation and hue need colour, so grey (or other non-RGB) images get brightness and contrast
/// only (their grey is the value itself).
pub fn color_jitter(image: &Image, strength: f32, rng: &mut Rng) -> Image {
    let p = strength.max(0.0);
    let factor = |rng: &mut Rng| rng.range_f32((1.0 - p).max(0.0), 1.0 + p);
    let brightness = factor(rng);
    let contrast = factor(rng);
    let saturation = factor(rng);
    let hue = rng.range_f32(-p, p);
    let mut order = [0usize, 1, 2, 3];
    rng.shuffle(&mut order);
    let rgb = image.channels == 3;
    let n = image.height * image.width;
    let mut out = image.clone();
    let grey_of = |img: &Image, i: usize| -> f32 {
        if rgb {
            luma(img.data[i], img.data[n + i], img.data[2 * n + i])
        } else {
            img.data[i]
        }
    };
    for op in order {
        match op {
            0 => out
                .data
                .iter_mut()
                .for_each(|v| *v = (*v * brightness).clamp(0.0, 1.0)),
            1 => {
                let mean = if rgb {
                    (0..n).map(|i| grey_of(&out, i)).sum::<f32>() / n as f32
                } else {
                    out.data.iter().sum::<f32>() / out.data.len().max(1) as f32
                };
                out.data
                    .iter_mut()
                    .for_each(|v| *v = (contrast * *v + (1.0 - contrast) * mean).clamp(0.0, 1.0));
            }
            2 if rgb => {
                for i in 0..n {
                    let grey = grey_of(&out, i);
                    for c in 0..3 {
                        let v = &mut out.data[c * n + i];
                        *v = (saturation * *v + (1.0 - saturation) * grey).clamp(0.0, 1.0);
                    }
                }
            }
            3 if rgb && hue != 0.0 => {
                for i in 0..n {
                    let (h, s, v) = rgb_to_hsv(out.data[i], out.data[n + i], out.data[2 * n + i]);
                    let (r, g, b) = hsv_to_rgb(h + hue, s, v);
                    out.data[i] = r.clamp(0.0, 1.0);
                    out.data[n + i] = g.clamp(0.0, 1.0);
                    out.data[2 * n + i] = b.clamp(0.0, 1.0);
                }
            }
            _ => {}
        }
    }
    out
}

/// The mean and standard deviation over all of an image's values (all channels confounded).
fn mean_std(values: &[f32]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

/// Gaussian noise N(0, (0.1·std)²), std over all the image's values, added to each pixel (all its
/// channels) with probability 0.5, as the HSC paper describes it, then clamped to 0..=1. (FCDD's
/// code draws the 50% once per image instead.)
pub fn gaussian_noise(image: &Image, rng: &mut Rng) -> Image {
    let (_, std) = mean_std(&image.data);
    let sigma = NOISE_RELATIVE_STD * std as f32;
    let n = image.height * image.width;
    let mut out = image.clone();
    for i in 0..n {
        if rng.bool(0.5) {
            for c in 0..image.channels {
                let v = &mut out.data[c * n + i];
                *v = (*v + sigma * rng.normal()).clamp(0.0, 1.0);
            }
        }
    }
    out
}

/// FCDD's `local_contrast_normalization(x, 'l1')`: subtract the mean over all pixels and
/// channels, divide by the mean absolute value of the result. A flat image becomes all zeros.
pub fn local_contrast_normalization(image: &Image) -> Image {
    let mut out = image.clone();
    normalize_in_place(&mut out.data, 0.0, 1.0);
    out
}

/// LCN then min-max with `(min, max)` of one image's values (all channels), in place.
pub fn normalize_in_place(values: &mut [f32], min: f32, max: f32) {
    let (mean, gain, offset) = lcn_affine(values, min, max);
    values
        .iter_mut()
        .for_each(|v| *v = ((*v as f64 - mean) * gain + offset) as f32);
}

/// [`normalize_in_place`] of `src` written to `dst` (the same length): the inference path's
/// preprocessing straight from the input tensor, without a separate copy.
pub fn normalize_into(src: &[f32], dst: &mut [f32], min: f32, max: f32) {
    let (mean, gain, offset) = lcn_affine(src, min, max);
    dst.iter_mut()
        .zip(src)
        .for_each(|(d, &v)| *d = ((v as f64 - mean) * gain + offset) as f32);
}

/// `(mean, gain, offset)` such that LCN then min-max maps `v` to `(v - mean)·gain + offset`.
fn lcn_affine(values: &[f32], min: f32, max: f32) -> (f64, f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = lane_sum(values, |v| v as f64) / n;
    let scale = lane_sum(values, |v| (v as f64 - mean).abs()) / n;
    let lcn = if scale < FLAT as f64 {
        0.0
    } else {
        1.0 / scale
    };
    let inv = 1.0 / (max - min).max(f32::EPSILON) as f64;
    (mean, lcn * inv, -(min as f64) * inv)
}

/// `Σ f(v)` in f64 over 8 independent accumulators: a plain `sum()` of floats is one serial chain
/// of dependent adds (the compiler may not reorder them); eight chains let it vectorise.
pub(crate) fn lane_sum(values: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f64>() + rest
}

/// The maximum of `values` (−∞ for none) over 16 independent lanes, for the same reason as
/// [`lane_sum`].
pub(crate) fn lane_max(values: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.max(v);
        }
    }
    acc.iter().fold(rest, |m, &v| m.max(v))
}

/// The (min, max) of the LCN'd values of `images`: FCDD's min-max constants, computed on the
/// training images of a class (FCDD keeps them per channel; here all channels share one pair,
/// as LCN itself confounds them).
pub fn lcn_range<'a>(images: impl IntoIterator<Item = &'a Image>) -> Result<(f32, f32)> {
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    for image in images {
        for &v in &local_contrast_normalization(image).data {
            min = min.min(v);
            max = max.max(v);
        }
    }
    if !(min.is_finite() && max.is_finite() && max > min) {
        return Err(Error::invalid(
            "LCN range",
            format!("[{min}, {max}] (need images that are not all flat)"),
        ));
    }
    Ok((min, max))
}

/// `(x - min) / (max - min)`, not clamped: test images may leave the training range, and their
/// excess is information.
pub fn normalize(image: &Image, min: f32, max: f32) -> Image {
    let inv = 1.0 / (max - min).max(f32::EPSILON);
    let mut out = image.clone();
    out.data.iter_mut().for_each(|v| *v = (*v - min) * inv);
    out
}

/// The inference-time preprocessing: LCN, then min-max with the training range (`lcn_range`).
pub fn preprocess(image: &Image, min: f32, max: f32) -> Image {
    normalize(&local_contrast_normalization(image), min, max)
}

/// [`preprocess`] on a batch `[B, C, H, W]` with candle's ops (each image normalised on its own).
pub fn preprocess_tensor(images: &Tensor, min: f32, max: f32) -> Result<Tensor> {
    let dims = images.dims4().map_err(|_| {
        Error::invalid(
            "images",
            format!("shape {:?} is not [B, C, H, W]", images.dims()),
        )
    })?;
    let flat = images.flatten_from(1)?;
    let centred = flat.broadcast_sub(&flat.mean_keepdim(1)?)?;
    let scale = centred.abs()?.mean_keepdim(1)?;
    // A flat image: scale 0, centred values 0; dividing by 1 keeps them 0.
    let flat_image = scale.lt(FLAT)?;
    let scale = flat_image.where_cond(&scale.ones_like()?, &scale)?;
    let lcn = centred.broadcast_div(&scale)?;
    let inv = 1.0 / (max - min).max(f32::EPSILON) as f64;
    Ok(lcn.affine(inv, -(min as f64) * inv)?.reshape(dims)?)
}
