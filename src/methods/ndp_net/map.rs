//! The final anomaly map and the image score (section III-D): the three scales' maps combined as
//! `λ1·AM1 + λ2·g(AM2) + λ3·g(AM3)` with `g` bilinear upsampling to the input size, smoothed by a
//! mean and a median filter, and the map's maximum inside the border margin as the score.
//!
//! Plain loops on the host, shared by the fast and the reference path (the median filter is no
//! candle op): what differs between the two paths is only the networks before.
use rayon::prelude::*;

/// One scale's `[B, h, w]` maps, row-major, image after image.
pub struct Plane {
    pub values: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

/// How the final map is made and scored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapParams {
    pub weights: [f32; 3],
    pub mean_filter: usize,
    pub median_filter: usize,
    pub margin: usize,
}

/// `λ1·AM1 + λ2·g(AM2) + λ3·g(AM3)` at `height`×`width` for `batch` images.
pub fn combine(
    scales: &[Plane; 3],
    weights: [f32; 3],
    batch: usize,
    (height, width): (usize, usize),
) -> Vec<f32> {
    let n = height * width;
    let mut out = vec![0.0f32; batch * n];
    for (plane, &weight) in scales.iter().zip(&weights) {
        if weight == 0.0 {
            continue;
        }
        let m = plane.height * plane.width;
        for (b, dst) in out.chunks_exact_mut(n).enumerate() {
            let src = &plane.values[b * m..(b + 1) * m];
            add_bilinear(
                src,
                (plane.height, plane.width),
                dst,
                (height, width),
                weight,
            );
        }
    }
    out
}

/// Source coordinate and weight of destination index `i` (PyTorch's `align_corners = False`).
fn bilinear_axis(i: usize, dst: usize, src: usize) -> (usize, usize, f32) {
    let x = ((i as f32 + 0.5) * src as f32 / dst as f32 - 0.5).max(0.0);
    let x0 = (x.floor() as usize).min(src - 1);
    let x1 = (x0 + 1).min(src - 1);
    (x0, x1, x - x0 as f32)
}

/// `dst += weight · bilinear(src)`.
fn add_bilinear(
    src: &[f32],
    (sh, sw): (usize, usize),
    dst: &mut [f32],
    (dh, dw): (usize, usize),
    weight: f32,
) {
    let columns: Vec<(usize, usize, f32)> = (0..dw).map(|x| bilinear_axis(x, dw, sw)).collect();
    for y in 0..dh {
        let (y0, y1, fy) = bilinear_axis(y, dh, sh);
        let (top, bottom) = (&src[y0 * sw..(y0 + 1) * sw], &src[y1 * sw..(y1 + 1) * sw]);
        for (d, &(x0, x1, fx)) in dst[y * dw..(y + 1) * dw].iter_mut().zip(&columns) {
            let t = top[x0] + (top[x1] - top[x0]) * fx;
            let b = bottom[x0] + (bottom[x1] - bottom[x0]) * fx;
            *d += weight * (t + (b - t) * fy);
        }
    }
}

/// `mean_c |x − recon|` per pixel of `[B, C, H, W]` values: the plain reconstruction difference.
pub fn difference(
    x: &[f32],
    recon: &[f32],
    (b, c, h, w): (usize, usize, usize, usize),
) -> Vec<f32> {
    let n = h * w;
    let mut out = vec![0.0f32; b * n];
    for (i, dst) in out.chunks_exact_mut(n).enumerate() {
        for ch in 0..c {
            let at = (i * c + ch) * n;
            for ((d, a), r) in dst.iter_mut().zip(&x[at..at + n]).zip(&recon[at..at + n]) {
                *d += (a - r).abs() / c as f32;
            }
        }
    }
    out
}

/// The mean of each pixel's `size`×`size` window, the window clipped to the image (no padding
/// value darkens the border). Separable: rows, then columns.
pub fn mean_filter(plane: &[f32], (h, w): (usize, usize), size: usize) -> Vec<f32> {
    if size <= 1 {
        return plane.to_vec();
    }
    let r = size / 2;
    let mut rows = vec![0.0f32; h * w];
    for y in 0..h {
        let src = &plane[y * w..(y + 1) * w];
        for x in 0..w {
            let (a, b) = (x.saturating_sub(r), (x + r + 1).min(w));
            rows[y * w + x] = src[a..b].iter().sum::<f32>() / (b - a) as f32;
        }
    }
    let mut out = vec![0.0f32; h * w];
    for y in 0..h {
        let (a, b) = (y.saturating_sub(r), (y + r + 1).min(h));
        for x in 0..w {
            out[y * w + x] = (a..b).map(|yy| rows[yy * w + x]).sum::<f32>() / (b - a) as f32;
        }
    }
    out
}

/// The median of each pixel's `size`×`size` window, the window clipped to the image (the upper
/// median where the clipped window holds an even count). Rows are split over the threads.
pub fn median_filter(plane: &[f32], (h, w): (usize, usize), size: usize) -> Vec<f32> {
    if size <= 1 {
        return plane.to_vec();
    }
    let r = size / 2;
    let mut out = vec![0.0f32; h * w];
    out.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
        let mut window = Vec::with_capacity(size * size);
        let (ya, yb) = (y.saturating_sub(r), (y + r + 1).min(h));
        for (x, v) in row.iter_mut().enumerate() {
            let (xa, xb) = (x.saturating_sub(r), (x + r + 1).min(w));
            window.clear();
            for yy in ya..yb {
                window.extend_from_slice(&plane[yy * w + xa..yy * w + xb]);
            }
            let mid = window.len() / 2;
            *v = *window.select_nth_unstable_by(mid, f32::total_cmp).1;
        }
    });
    out
}

/// The maximum inside `margin` pixels of each border, or of the whole map when the margin leaves
/// nothing inside.
pub fn score(plane: &[f32], (h, w): (usize, usize), margin: usize) -> f32 {
    let m = if 2 * margin < h && 2 * margin < w {
        margin
    } else {
        0
    };
    (m..h - m)
        .flat_map(|y| plane[y * w + m..y * w + w - m].iter().copied())
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Smooths each of the `[B, h, w]` maps in place (mean filter, then median filter) and returns
/// their scores.
pub fn finish(maps: &mut [f32], (h, w): (usize, usize), params: &MapParams) -> Vec<f32> {
    maps.chunks_exact_mut(h * w)
        .map(|map| {
            let smoothed = median_filter(
                &mean_filter(map, (h, w), params.mean_filter),
                (h, w),
                params.median_filter,
            );
            map.copy_from_slice(&smoothed);
            score(map, (h, w), params.margin)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_upsampling_matches_pytorch_on_a_ramp() {
        // F.interpolate([[0, 1]], size=4, mode="bilinear", align_corners=False) = 0, .25, .75, 1.
        let src = [0.0, 1.0];
        let mut dst = vec![0.0; 4];
        add_bilinear(&src, (1, 2), &mut dst, (1, 4), 1.0);
        assert_eq!(dst, vec![0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn the_median_removes_an_isolated_peak_the_mean_only_spreads() {
        let (h, w) = (7, 7);
        let mut plane = vec![0.0f32; h * w];
        plane[3 * w + 3] = 25.0;
        let mean = mean_filter(&plane, (h, w), 5);
        assert!((mean[3 * w + 3] - 1.0).abs() < 1e-6);
        // Near the border the window is clipped (4x4 at (1, 1)), and the mean is over what is left.
        assert!(
            (mean[w + 1] - 25.0 / 16.0).abs() < 1e-6,
            "inside the clipped window"
        );
        // A corner's clipped window is 3x3 and does not reach the peak.
        assert_eq!(mean[0], 0.0);
        let median = median_filter(&plane, (h, w), 5);
        assert!(median.iter().all(|&v| v == 0.0));
        // A 3x3 block survives a 3x3 median at its centre.
        let mut block = vec![0.0f32; h * w];
        for y in 2..5 {
            for x in 2..5 {
                block[y * w + x] = 1.0;
            }
        }
        assert_eq!(median_filter(&block, (h, w), 3)[3 * w + 3], 1.0);
    }

    #[test]
    fn the_score_ignores_the_border_margin_unless_nothing_is_left() {
        let (h, w) = (8, 8);
        let mut plane = vec![0.0f32; h * w];
        plane[0] = 9.0;
        plane[4 * w + 4] = 2.0;
        assert_eq!(score(&plane, (h, w), 0), 9.0);
        assert_eq!(score(&plane, (h, w), 2), 2.0);
        assert_eq!(score(&plane, (h, w), 4), 9.0);
    }
}
