//! Depthwise k×k convolution on channels-last data with the bias and activation fused.
//!
//! Each output pixel accumulates, eight channels at a time (sixteen with AVX-512), the taps whose
//! input falls inside the image (so padding costs nothing); the weights are stored `[k·k, C]` so
//! that a tap's weights for a run of channels are contiguous like the pixels they multiply.
//! Interior pixels go in groups that share the input vectors of each kernel row.
use super::{Activation, Isa};

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
    let groups = x86::groups(isa, g);
    #[cfg(target_arch = "aarch64")]
    let groups = neon::groups(isa, g);
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
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            if let Some(group) = groups
                .iter()
                .flatten()
                .find(|group| ox >= group.interior.start && ox + group.pixels <= group.interior.end)
            {
                let window = Window {
                    kernel: g.kernel,
                    row_at,
                    x0,
                    ky: ky0..ky1,
                    kx: 0..g.kernel,
                };
                let dst = &mut out[at..at + group.pixels * c];
                // SAFETY: a group kernel is only chosen after its instruction set was detected
                // and for channels it handles; all its pixels are interior, so every tap lies
                // inside `plane`, and `dst` holds them.
                unsafe { (group.kernel)(plane, weights, bias, &window, activation, dst) };
                ox += group.pixels;
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
                // SAFETY: `Isa::Avx2Fma` and `Isa::Avx512` exist only after run-time detection of
                // AVX2 and FMA; the window keeps every tap inside `plane` (asserted lengths above).
                Isa::Avx2Fma | Isa::Avx512 => unsafe {
                    x86::pixel(plane, weights, bias, &window, activation, dst)
                },
                // NEON's edge pixels: LLVM vectorises the portable loop with NEON (`fmla`).
                #[cfg(target_arch = "aarch64")]
                Isa::Neon => pixel_portable(plane, weights, bias, &window, activation, dst),
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

/// The group kernels' common parts (x86-64 and aarch64).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod grouped {
    use std::ops::Range;

    use super::{Activation, DepthwiseGeom, Window};
    use crate::nn::kernels::simd::F32Vector;

    /// A kernel for several horizontally adjacent interior pixels of one kernel and stride.
    pub(super) type GroupFn = unsafe fn(&[f32], &[f32], &[f32], &Window, Activation, &mut [f32]);

    /// A group kernel, how many pixels it takes, and the output columns whose every horizontal
    /// tap is inside the image (the pixels it may take).
    pub(super) struct Group {
        pub kernel: GroupFn,
        pub pixels: usize,
        pub interior: Range<usize>,
    }

    /// The output columns of `g` whose every horizontal tap is inside the image.
    pub(super) fn interior(g: &DepthwiseGeom) -> Range<usize> {
        let lo = g.pad_left.div_ceil(g.stride).min(g.out_w);
        let hi = if g.width + g.pad_left >= g.kernel {
            ((g.width + g.pad_left - g.kernel) / g.stride + 1).min(g.out_w)
        } else {
            0
        };
        lo..hi
    }

    /// `P` horizontally adjacent interior pixels (the window of the first, every tap in range),
    /// one vector of channels at a time, for a kernel `K` and stride `S` known at compile time:
    /// the input vectors of a kernel row are loaded once and reused by every tap and pixel that
    /// reads them (a 5-wide row of 4 pixels: 8 input loads instead of 20).
    ///
    /// # Safety
    /// `V`'s instruction set; every tap of the pixels must lie inside `plane`, `C = dst.len() / P`
    /// a multiple of `V::LANES`, `weights`/`bias` hold `K·K·C` and `C` floats, `w.kernel == K` and
    /// `(P - 1)·S + K ≤ X`.
    #[inline(always)]
    pub(super) unsafe fn group<
        V: F32Vector,
        const K: usize,
        const S: usize,
        const P: usize,
        const X: usize,
    >(
        plane: &[f32],
        weights: &[f32],
        bias: &[f32],
        w: &Window,
        activation: Activation,
        dst: &mut [f32],
    ) {
        // Input pixels one kernel row of the group reads.
        let span = (P - 1) * S + K;
        let c = dst.len() / P;
        let (lo, hi) = activation.bounds();
        let (lo, hi) = (V::splat(lo), V::splat(hi));
        for ch in (0..c).step_by(V::LANES) {
            let mut acc = [V::load(bias.as_ptr().add(ch)); P];
            for ky in w.ky.clone() {
                let row = plane.as_ptr().add(w.pixel(ky, 0) * c + ch);
                let taps = weights.as_ptr().add(ky * K * c + ch);
                let mut x = [V::splat(0.0); X];
                for (i, v) in x.iter_mut().enumerate().take(span) {
                    *v = V::load(row.add(i * c));
                }
                for kx in 0..K {
                    let k = V::load(taps.add(kx * c));
                    for (p, a) in acc.iter_mut().enumerate() {
                        *a = x[p * S + kx].mul_add(k, *a);
                    }
                }
            }
            for (p, a) in acc.iter().enumerate() {
                a.clamp(lo, hi).store(dst.as_mut_ptr().add(p * c + ch));
            }
        }
    }

    /// The most input pixels a kernel row of `pixels` pixels reads (stride 2, 5 wide): the
    /// length of a group's row of input vectors.
    pub(super) const fn span(pixels: usize) -> usize {
        (pixels - 1) * 2 + 5
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::grouped::{group, interior, span, Group, GroupFn};
    use super::{Activation, DepthwiseGeom, Isa, Window};

    /// The group kernels for `g`, widest first: AVX-512 (8 pixels, 16 channels a vector) when
    /// the channels are a multiple of 16, then AVX2 (4 pixels, 8 channels) when they are a
    /// multiple of 8, for the pixels of a row the wider one leaves. None where the per-pixel path
    /// serves: the portable kernels, another kernel or stride, or no interior.
    pub(super) fn groups(isa: Isa, g: &DepthwiseGeom) -> [Option<Group>; 2] {
        let interior = interior(g);
        if isa == Isa::Portable || interior.is_empty() {
            return [None, None];
        }
        let group = |kernel: Option<GroupFn>, pixels: usize| {
            kernel.map(|kernel| Group {
                kernel,
                pixels,
                interior: interior.clone(),
            })
        };
        let wide = (isa == Isa::Avx512 && g.channels.is_multiple_of(16))
            .then(|| wide_kernel(g.kernel, g.stride))
            .flatten();
        let narrow = g
            .channels
            .is_multiple_of(8)
            .then(|| narrow_kernel(g.kernel, g.stride))
            .flatten();
        [group(wide, WIDE), group(narrow, NARROW)]
    }

    fn narrow_kernel(kernel: usize, stride: usize) -> Option<GroupFn> {
        Some(match (kernel, stride) {
            (3, 1) => narrow::<3, 1>,
            (3, 2) => narrow::<3, 2>,
            (5, 1) => narrow::<5, 1>,
            (5, 2) => narrow::<5, 2>,
            _ => return None,
        })
    }

    fn wide_kernel(kernel: usize, stride: usize) -> Option<GroupFn> {
        Some(match (kernel, stride) {
            (3, 1) => wide::<3, 1>,
            (3, 2) => wide::<3, 2>,
            (5, 1) => wide::<5, 1>,
            (5, 2) => wide::<5, 2>,
            _ => return None,
        })
    }

    /// Pixels of the AVX2 group kernel.
    const NARROW: usize = 4;
    /// Pixels of the AVX-512 group kernel.
    const WIDE: usize = 8;

    /// The AVX2 group: NARROW pixels, eight channels at a time.
    ///
    /// # Safety
    /// Needs AVX2 and FMA; as [`group`] with `C = dst.len() / NARROW` a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn narrow<const K: usize, const S: usize>(
        plane: &[f32],
        weights: &[f32],
        bias: &[f32],
        w: &Window,
        activation: Activation,
        dst: &mut [f32],
    ) {
        group::<__m256, K, S, NARROW, { span(NARROW) }>(plane, weights, bias, w, activation, dst)
    }

    /// The AVX-512 group: WIDE pixels, sixteen channels at a time. Its 32 registers hold eight
    /// accumulators besides a whole kernel row's input vectors, enough independent multiply-add
    /// chains to cover their latency (the AVX2 group's four leave half the multiply-add
    /// throughput unused).
    ///
    /// # Safety
    /// Needs AVX-512F; as [`group`] with `C = dst.len() / WIDE` a multiple of 16.
    #[target_feature(enable = "avx512f")]
    unsafe fn wide<const K: usize, const S: usize>(
        plane: &[f32],
        weights: &[f32],
        bias: &[f32],
        w: &Window,
        activation: Activation,
        dst: &mut [f32],
    ) {
        group::<__m512, K, S, WIDE, { span(WIDE) }>(plane, weights, bias, w, activation, dst)
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

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::float32x4_t;

    use super::grouped::{group, interior, span, Group, GroupFn};
    use super::{Activation, DepthwiseGeom, Isa, Window};

    /// Pixels of the NEON group kernel: 8 accumulators and a kernel row's 19 input vectors fit
    /// NEON's 32 registers, as they fit AVX-512's.
    const PIXELS: usize = 8;

    /// The NEON group kernel for `g`, where the channels are a multiple of 4 (else, and for the
    /// portable kernels, none: the per-pixel path serves).
    pub(super) fn groups(isa: Isa, g: &DepthwiseGeom) -> [Option<Group>; 1] {
        let interior = interior(g);
        if isa != Isa::Neon || interior.is_empty() || !g.channels.is_multiple_of(4) {
            return [None];
        }
        let kernel: GroupFn = match (g.kernel, g.stride) {
            (3, 1) => wide::<3, 1>,
            (3, 2) => wide::<3, 2>,
            (5, 1) => wide::<5, 1>,
            (5, 2) => wide::<5, 2>,
            _ => return [None],
        };
        [Some(Group {
            kernel,
            pixels: PIXELS,
            interior,
        })]
    }

    /// # Safety
    /// NEON (the aarch64 baseline); as [`group`] with `C = dst.len() / PIXELS` a multiple of 4.
    #[target_feature(enable = "neon")]
    unsafe fn wide<const K: usize, const S: usize>(
        plane: &[f32],
        weights: &[f32],
        bias: &[f32],
        w: &Window,
        activation: Activation,
        dst: &mut [f32],
    ) {
        group::<float32x4_t, K, S, PIXELS, { span(PIXELS) }>(
            plane, weights, bias, w, activation, dst,
        )
    }
}
