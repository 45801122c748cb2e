//! Depthwise k×k convolution on channels-last data with the bias and activation fused.
//!
//! Each output pixel accumulates, eight channels at a time, the taps whose input falls inside the
//! image (so padding costs nothing); the weights are stored `[k·k, C]` so that a tap's weights for
//! a run of channels are contiguous like the pixels they multiply.
use super::{Activation, Isa};

/// Output pixels the vector kernel computes together.
#[cfg(target_arch = "x86_64")]
const GROUP: usize = 4;

/// Geometry of a depthwise convolution; padding before each axis (TF "same" puts the odd pixel
/// after, which needs no bookkeeping here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepthwiseGeom {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_h: usize,
    pub out_w: usize,
}

/// The largest kernel the depthwise convolution supports.
pub const MAX_KERNEL: usize = 7;

/// Where the input rows of a depthwise convolution are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowSource {
    /// The whole `[B, H, W, C]` input.
    Plane,
    /// A ring of `slots` rows of one image (`[slots, W, C]`): input row `iy` is in slot
    /// `iy % slots`, so that a producer can compute rows just before they are needed.
    Ring { slots: usize },
}

/// Output rows `(b, oy)` in `rows` of the convolution, written to `out` (which starts at the first
/// of those rows). `weights` is `[k·k, C]`, `bias` `[C]`. With a ring source, `rows` must be
/// rows of the first image whose input rows are all in the ring.
#[allow(clippy::too_many_arguments)]
pub(super) fn depthwise_rows(
    isa: Isa,
    g: &DepthwiseGeom,
    input: &[f32],
    source: RowSource,
    weights: &[f32],
    bias: &[f32],
    activation: Activation,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let c = g.channels;
    let plane_len = g.height * g.width * c;
    match source {
        RowSource::Plane => assert!(input.len() >= g.batch * plane_len),
        RowSource::Ring { slots } => {
            assert!(slots >= g.kernel.min(g.height) && input.len() >= slots * g.width * c);
            assert!(rows.end <= g.out_h);
        }
    }
    assert!(g.kernel <= MAX_KERNEL);
    assert!(weights.len() >= g.kernel * g.kernel * c && bias.len() >= c);
    assert!(out.len() >= (rows.end - rows.start) * g.out_w * c);
    #[cfg(target_arch = "x86_64")]
    let grouped = x86::grouped(isa, g);
    for row in rows.clone() {
        let (b, oy) = (row / g.out_h, row % g.out_h);
        let y0 = (oy * g.stride) as isize - g.pad_top as isize;
        let ky0 = (-y0).max(0) as usize;
        let ky1 = ((g.height as isize - y0).min(g.kernel as isize)).max(0) as usize;
        let (plane, ring_slots) = match source {
            RowSource::Plane => (&input[b * plane_len..(b + 1) * plane_len], None),
            RowSource::Ring { slots } => (input, Some(slots)),
        };
        // First pixel of the input row under each kernel row inside the image.
        let mut row_at = [0usize; MAX_KERNEL];
        for (ky, at) in row_at.iter_mut().enumerate().take(ky1).skip(ky0) {
            let iy = (y0 + ky as isize) as usize;
            *at = ring_slots.map_or(iy, |slots| iy % slots) * g.width;
        }
        let mut ox = 0;
        while ox < g.out_w {
            let x0 = (ox * g.stride) as isize - g.pad_left as isize;
            let at = ((row - rows.start) * g.out_w + ox) * c;
            #[cfg(target_arch = "x86_64")]
            if let Some((group, _)) = grouped
                .as_ref()
                .filter(|(_, interior)| ox >= interior.start && ox + GROUP <= interior.end)
            {
                let window = Window {
                    kernel: g.kernel,
                    row_at,
                    x0,
                    ky: ky0..ky1,
                    kx: 0..g.kernel,
                };
                let dst = &mut out[at..at + GROUP * c];
                // SAFETY: `group` is only chosen after AVX2 was detected; all GROUP pixels are
                // interior, so every tap lies inside `plane`, and `dst` holds GROUP pixels.
                unsafe { group(plane, weights, bias, &window, activation, dst) };
                ox += GROUP;
                continue;
            }
            let kx0 = (-x0).max(0) as usize;
            let kx1 = ((g.width as isize - x0).min(g.kernel as isize)).max(0) as usize;
            let window = Window {
                kernel: g.kernel,
                row_at,
                x0,
                ky: ky0..ky1,
                kx: kx0..kx1,
            };
            let dst = &mut out[at..at + c];
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::Avx2Fma` exists only after run-time detection; the window keeps
                // every tap inside `plane` (asserted lengths above).
                Isa::Avx2Fma => unsafe {
                    x86::pixel(plane, weights, bias, &window, activation, dst)
                },
                Isa::Portable => pixel_portable(plane, weights, bias, &window, activation, dst),
            }
            ox += 1;
        }
    }
}

/// The taps of one output pixel that fall inside the image.
struct Window {
    kernel: usize,
    /// First pixel of the input row under each kernel row in `ky`.
    row_at: [usize; MAX_KERNEL],
    x0: isize,
    ky: std::ops::Range<usize>,
    kx: std::ops::Range<usize>,
}

impl Window {
    /// Index of the first channel of the input pixel under tap `(ky, kx)`, in units of pixels.
    fn pixel(&self, ky: usize, kx: usize) -> usize {
        self.row_at[ky] + (self.x0 + kx as isize) as usize
    }
}

fn pixel_portable(
    plane: &[f32],
    weights: &[f32],
    bias: &[f32],
    w: &Window,
    activation: Activation,
    dst: &mut [f32],
) {
    let c = dst.len();
    dst.copy_from_slice(&bias[..c]);
    for ky in w.ky.clone() {
        for kx in w.kx.clone() {
            let src = &plane[w.pixel(ky, kx) * c..][..c];
            let tap = &weights[(ky * w.kernel + kx) * c..][..c];
            for ((d, &x), &k) in dst.iter_mut().zip(src).zip(tap) {
                *d = x.mul_add(k, *d);
            }
        }
    }
    for d in dst.iter_mut() {
        *d = activation.apply(*d);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use std::ops::Range;

    use super::{Activation, DepthwiseGeom, Isa, Window, GROUP};

    /// [`group`] for one kernel and stride.
    pub(super) type Group = unsafe fn(&[f32], &[f32], &[f32], &Window, Activation, &mut [f32]);

    /// The [`group`] kernel for `g` and the output columns whose every horizontal tap is inside
    /// the image (the pixels it may take, GROUP at a time), or `None` where the per-pixel path
    /// serves: no AVX2, channels not a multiple of 8, another kernel or stride, or no interior.
    pub(super) fn grouped(isa: Isa, g: &DepthwiseGeom) -> Option<(Group, Range<usize>)> {
        let group: Group = match (g.kernel, g.stride) {
            (3, 1) => group::<3, 1>,
            (3, 2) => group::<3, 2>,
            (5, 1) => group::<5, 1>,
            (5, 2) => group::<5, 2>,
            _ => return None,
        };
        let lo = g.pad_left.div_ceil(g.stride).min(g.out_w);
        let hi = if g.width + g.pad_left >= g.kernel {
            ((g.width + g.pad_left - g.kernel) / g.stride + 1).min(g.out_w)
        } else {
            0
        };
        (isa != Isa::Portable && g.channels.is_multiple_of(8) && hi > lo).then_some((group, lo..hi))
    }

    /// GROUP horizontally adjacent interior pixels (the window of the first, every tap in
    /// range), eight channels at a time, for a kernel `K` and stride `S` known at compile time:
    /// the input vectors of a kernel row are loaded once and reused by every tap and pixel that
    /// reads them (a 5-wide row of 4 pixels: 8 input loads instead of 20), so the loop is bound
    /// by multiply-adds, not loads.
    ///
    /// # Safety
    /// Needs AVX2 and FMA; every tap of the GROUP pixels must lie inside `plane`, `C =
    /// dst.len() / GROUP` a multiple of 8, `weights`/`bias` hold `K·K·C` and `C` floats, and
    /// `w.kernel == K`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn group<const K: usize, const S: usize>(
        plane: &[f32],
        weights: &[f32],
        bias: &[f32],
        w: &Window,
        activation: Activation,
        dst: &mut [f32],
    ) {
        // Input pixels one kernel row of the group reads.
        let span = (GROUP - 1) * S + K;
        let c = dst.len() / GROUP;
        let (lo, hi) = activation.bounds();
        let (lo, hi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        for ch in (0..c).step_by(8) {
            let b = _mm256_loadu_ps(bias.as_ptr().add(ch));
            let mut acc = [b; GROUP];
            for ky in w.ky.clone() {
                let row = plane.as_ptr().add(w.pixel(ky, 0) * c + ch);
                let taps = weights.as_ptr().add(ky * K * c + ch);
                let mut x = [_mm256_setzero_ps(); (GROUP - 1) * 2 + 5];
                for (i, v) in x.iter_mut().enumerate().take(span) {
                    *v = _mm256_loadu_ps(row.add(i * c));
                }
                for kx in 0..K {
                    let k = _mm256_loadu_ps(taps.add(kx * c));
                    for (p, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(x[p * S + kx], k, *a);
                    }
                }
            }
            for (p, a) in acc.iter().enumerate() {
                let y = _mm256_min_ps(_mm256_max_ps(*a, lo), hi);
                _mm256_storeu_ps(dst.as_mut_ptr().add(p * c + ch), y);
            }
        }
    }

    /// # Safety
    /// Needs AVX2 and FMA; the window's taps must lie inside `plane`, and `weights`/`bias` must
    /// hold `k·k·C` and `C` floats for `C = dst.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pixel(
        plane: &[f32],
        weights: &[f32],
        bias: &[f32],
        w: &Window,
        activation: Activation,
        dst: &mut [f32],
    ) {
        let c = dst.len();
        let vectors = c / 8 * 8;
        let (lo, hi) = activation.bounds();
        let (lo, hi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        let mut ch = 0;
        // Four vectors (32 channels) at a time share the tap loop overhead.
        while ch + 32 <= vectors {
            vectors_at::<4>(plane, weights, bias, w, (lo, hi), dst, ch);
            ch += 32;
        }
        while ch < vectors {
            vectors_at::<1>(plane, weights, bias, w, (lo, hi), dst, ch);
            ch += 8;
        }
        if ch < c {
            // The last channels (fewer than 8): the portable loop on a narrowed view.
            pixel_tail(plane, weights, bias, w, activation, dst, ch);
        }
    }

    /// `N` vectors (8·N channels) of one pixel from channel `ch`: bias, every tap, clamp.
    ///
    /// # Safety
    /// As [`pixel`], with `ch + 8·N ≤ dst.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn vectors_at<const N: usize>(
        plane: &[f32],
        weights: &[f32],
        bias: &[f32],
        w: &Window,
        (lo, hi): (__m256, __m256),
        dst: &mut [f32],
        ch: usize,
    ) {
        let c = dst.len();
        let mut acc = [_mm256_setzero_ps(); N];
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(bias.as_ptr().add(ch + 8 * v));
        }
        for ky in w.ky.clone() {
            for kx in w.kx.clone() {
                let src = plane.as_ptr().add(w.pixel(ky, kx) * c + ch);
                let tap = weights.as_ptr().add((ky * w.kernel + kx) * c + ch);
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(
                        _mm256_loadu_ps(src.add(8 * v)),
                        _mm256_loadu_ps(tap.add(8 * v)),
                        *a,
                    );
                }
            }
        }
        for (v, a) in acc.iter().enumerate() {
            let y = _mm256_min_ps(_mm256_max_ps(*a, lo), hi);
            _mm256_storeu_ps(dst.as_mut_ptr().add(ch + 8 * v), y);
        }
    }

    fn pixel_tail(
        plane: &[f32],
        weights: &[f32],
        bias: &[f32],
        w: &Window,
        activation: Activation,
        dst: &mut [f32],
        from: usize,
    ) {
        let c = dst.len();
        for ch in from..c {
            let mut acc = bias[ch];
            for ky in w.ky.clone() {
                for kx in w.kx.clone() {
                    acc = plane[w.pixel(ky, kx) * c + ch]
                        .mul_add(weights[(ky * w.kernel + kx) * c + ch], acc);
                }
            }
            dst[ch] = activation.apply(acc);
        }
    }
}
