//! Packed single-precision GEMM with a fused epilogue (bias, activation, residual), the engine of
//! every 1×1 and dense convolution on CPU.
//!
//! GotoBLAS blocking: the weights (B, `[K, N]`) are packed once at load time into panels of
//! [`NR`] columns; the activations (A, `[M, K]`) are packed per call into panels of [`MR`] rows,
//! `KC` columns at a time, straight from their source, which is either a plain row-major matrix
//! (1×1 convolution on channels-last data) or an implicit im2col of a channels-last image (dense
//! k×k convolution, zero padding included). A 6×16 micro-kernel (12 AVX2 or 24 NEON
//! accumulators) or its portable twin multiplies a packed A panel with a packed B panel; with
//! AVX-512 a 6×32 tile takes two B panels at once.
use std::cell::RefCell;

use super::{Activation, Isa};

/// Rows of the micro-kernel's output tile.
pub const MR: usize = 6;
/// Columns of the micro-kernel's output tile.
pub const NR: usize = 16;
/// Depth of a packed A block: `MC × KC` floats stay in L2, a `KC × NR` B panel in L1.
const KC: usize = 256;
const MC: usize = 96;

/// Weights `[K, N]` packed into `ceil(N / NR)` panels of `K × NR` (zero-padded columns), with a
/// bias padded the same way.
#[derive(Clone, Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    panels: Vec<f32>,
    bias: Vec<f32>,
}

impl PackedB {
    /// `at(k, n)` gives element `[k, n]` of the logical `[K, N]` weight matrix.
    pub fn new(k: usize, n: usize, at: impl Fn(usize, usize) -> f32, bias: &[f32]) -> Self {
        let n_panels = n.div_ceil(NR);
        let mut panels = vec![0.0; n_panels * k * NR];
        for p in 0..n_panels {
            for kk in 0..k {
                for j in 0..NR.min(n - p * NR) {
                    panels[(p * k + kk) * NR + j] = at(kk, p * NR + j);
                }
            }
        }
        let mut padded = vec![0.0; n_panels * NR];
        padded[..n].copy_from_slice(&bias[..n]);
        Self {
            k,
            n,
            panels,
            bias: padded,
        }
    }

    /// From a row-major `[N, K]` matrix (a PyTorch `[out, in, kh, kw]` weight flattened, when
    /// the k index runs over `(in, kh, kw)`; see [`PackedB::new`] for other orders).
    pub fn from_out_in(weight: &[f32], n: usize, k: usize, bias: &[f32]) -> Self {
        Self::new(k, n, |kk, nn| weight[nn * k + kk], bias)
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }
}

/// Geometry of a dense convolution on channels-last data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub in_c: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl ConvGeom {
    /// Rows of the implicit im2col matrix (output pixels).
    pub fn rows(&self) -> usize {
        self.batch * self.out_h * self.out_w
    }

    /// Its depth, ordered `(ky, kx, c)`.
    pub fn depth(&self) -> usize {
        self.kernel_h * self.kernel_w * self.in_c
    }
}

/// Where A's rows come from.
#[derive(Clone, Copy)]
pub enum ASource<'a> {
    /// Row-major `[M, K]` with rows `lda` apart.
    Matrix { data: &'a [f32], lda: usize },
    /// The im2col matrix of a channels-last `[B, H, W, C]` image, never materialised.
    Im2col { image: &'a [f32], geom: ConvGeom },
}

impl ASource<'_> {
    /// Packs rows `row0..row0 + rows` (at most MR), depths `k0..k0 + kc` into `dst` as `[MR][kc]`
    /// (each row contiguous, so that every run of the source is one copy), zero-filling missing
    /// rows.
    fn pack_panel(&self, row0: usize, rows: usize, k0: usize, kc: usize, dst: &mut [f32]) {
        dst[rows * kc..MR * kc].fill(0.0);
        match *self {
            ASource::Matrix { data, lda } => {
                for (r, row) in dst.chunks_exact_mut(kc).take(rows).enumerate() {
                    let at = (row0 + r) * lda + k0;
                    row.copy_from_slice(&data[at..at + kc]);
                }
            }
            ASource::Im2col { image, geom } => {
                let (c, kw) = (geom.in_c, geom.kernel_w);
                // Divisions only once per panel: they would cost more than the copying.
                let (tap0, ci0) = (k0 / c, k0 % c);
                let (ky0, kx0) = (tap0 / kw, tap0 % kw);
                let per_image = geom.out_h * geom.out_w;
                let (mut b, mut oy, mut ox) = (
                    row0 / per_image,
                    (row0 / geom.out_w) % geom.out_h,
                    row0 % geom.out_w,
                );
                for row in dst.chunks_exact_mut(kc).take(rows) {
                    let x0 = (ox * geom.stride) as isize - geom.pad_left as isize;
                    // Taps of a kernel row from `ix >= 0` up to (excluding) `kx_end` lie inside
                    // the image, so their channels are one contiguous run.
                    let kx_end = (geom.width as isize - x0).clamp(0, kw as isize) as usize;
                    let (mut ky, mut kx, mut ci, mut k) = (ky0, kx0, ci0, 0);
                    while k < kc {
                        let iy = (oy * geom.stride + ky) as isize - geom.pad_top as isize;
                        let ix = x0 + kx as isize;
                        let (run, source, next_kx) = if !(0..geom.height as isize).contains(&iy) {
                            ((kw - kx) * c - ci, None, kw)
                        } else if ix < 0 || kx >= kx_end {
                            (c - ci, None, kx + 1)
                        } else {
                            let at = ((b * geom.height + iy as usize) * geom.width + ix as usize)
                                * c
                                + ci;
                            ((kx_end - kx) * c - ci, Some(at), kx_end)
                        };
                        let run = run.min(kc - k);
                        let part = &mut row[k..k + run];
                        match source {
                            Some(at) => part.copy_from_slice(&image[at..at + run]),
                            None => part.fill(0.0),
                        }
                        k += run;
                        (kx, ci) = (next_kx, 0);
                        if kx == kw {
                            (ky, kx) = (ky + 1, 0);
                        }
                    }
                    ox += 1;
                    if ox == geom.out_w {
                        (ox, oy) = (0, oy + 1);
                        if oy == geom.out_h {
                            (oy, b) = (0, b + 1);
                        }
                    }
                }
            }
        }
    }
}

/// What happens to each output element after the product, on the last K block.
#[derive(Clone, Copy)]
pub struct Epilogue<'a> {
    pub activation: Activation,
    /// Added after the activation (an identity skip), same layout as the output.
    pub residual: Option<&'a [f32]>,
}

thread_local! {
    static PACK_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// An A panel for the micro-kernel: element `(r, k)` at `ptr + r·rs + (k / run)·run_stride +
/// k % run`: runs of `run` contiguous values (a packed panel or a matrix row is one run; an
/// interior im2col row is one run per kernel row, read in place from the image).
#[derive(Clone, Copy)]
struct APanel {
    ptr: *const f32,
    rs: usize,
    run: usize,
    run_stride: usize,
}

impl APanel {
    /// A panel of rows `rs` apart, each `kc` contiguous values.
    fn contiguous(ptr: *const f32, rs: usize, kc: usize) -> Self {
        APanel {
            ptr,
            rs,
            run: kc,
            run_stride: 0,
        }
    }

    /// The `MR` im2col rows from row `r0` read in place from the image, where they lie in one
    /// output row and every tap inside the image (no padding to fill), for the whole depth.
    fn in_image(image: &[f32], g: &ConvGeom, r0: usize) -> Option<Self> {
        let per_image = g.out_h * g.out_w;
        let (b, oy, ox) = (r0 / per_image, (r0 / g.out_w) % g.out_h, r0 % g.out_w);
        let iy = (oy * g.stride).checked_sub(g.pad_top)?;
        let ix = (ox * g.stride).checked_sub(g.pad_left)?;
        let inside = ox + MR <= g.out_w
            && iy + g.kernel_h <= g.height
            && ix + (MR - 1) * g.stride + g.kernel_w <= g.width;
        inside.then(|| APanel {
            ptr: image[((b * g.height + iy) * g.width + ix) * g.in_c..].as_ptr(),
            rs: g.stride * g.in_c,
            run: g.kernel_w * g.in_c,
            run_stride: g.width * g.in_c,
        })
    }
}

/// `out[m, n] = epilogue(Σ_k A[m, k] · B[k, n] + bias[n])` for rows `rows` of A, writing
/// `out` (row-major, `ldc = B.n()`, the slice starting at row `rows.start`).
pub(super) fn gemm_rows(
    isa: Isa,
    a: ASource,
    b: &PackedB,
    rows: std::ops::Range<usize>,
    epilogue: Epilogue,
    out: &mut [f32],
) {
    let (k, n) = (b.k, b.n);
    let n_panels = n.div_ceil(NR);
    #[cfg(target_arch = "x86_64")]
    let pairs = isa == Isa::Avx512;
    #[cfg(not(target_arch = "x86_64"))]
    let pairs = false;
    assert!(out.len() >= (rows.end - rows.start) * n);
    if let Some(res) = epilogue.residual {
        assert!(res.len() >= rows.end * n);
    }
    PACK_A.with(|cell| {
        let mut pack = cell.borrow_mut();
        if pack.len() < MC * KC {
            pack.resize(MC * KC, 0.0);
        }
        // Rows outermost: an `MC × N` block of the output stays in cache over all K blocks
        // (the weights, read once per row block, are the smaller stream for these shapes).
        let mut m0 = rows.start;
        while m0 < rows.end {
            let mc = MC.min(rows.end - m0);
            let panels_m = mc.div_ceil(MR);
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                let (first, last) = (k0 == 0, k0 + kc >= k);
                // A plain matrix is read in place (full panels); other panels are packed.
                // (So is an im2col panel inside the image, when one block holds the whole depth.)
                let mut a_panels = [APanel::contiguous(std::ptr::null(), 0, 0); MC / MR];
                for (pm, panel) in a_panels.iter_mut().enumerate().take(panels_m) {
                    let r0 = m0 + pm * MR;
                    let rows_here = MR.min(rows.end - r0);
                    let in_place = match a {
                        _ if rows_here < MR => None,
                        ASource::Matrix { data, lda } => {
                            Some(APanel::contiguous(data[r0 * lda + k0..].as_ptr(), lda, kc))
                        }
                        ASource::Im2col { image, geom } if kc == k => {
                            APanel::in_image(image, &geom, r0)
                        }
                        ASource::Im2col { .. } => None,
                    };
                    *panel = in_place.unwrap_or_else(|| {
                        let dst = &mut pack[pm * kc * MR..(pm + 1) * kc * MR];
                        a.pack_panel(r0, rows_here, k0, kc, dst);
                        APanel::contiguous(dst.as_ptr(), kc, kc)
                    });
                }
                let mut pn = 0;
                while pn < n_panels {
                    // The AVX-512 tile covers two B panels at once, unless the second has at
                    // most 8 columns (the AVX2 kernel then takes them with no wasted lanes).
                    let panels = if pairs && n - pn * NR > NR + NR / 2 {
                        2
                    } else {
                        1
                    };
                    let b_panels = BPanels {
                        data: &b.panels[(pn * k + k0) * NR..],
                        next: k * NR,
                        count: panels,
                    };
                    let cols = (panels * NR).min(n - pn * NR);
                    for (pm, panel) in a_panels.iter().enumerate().take(panels_m) {
                        let r0 = m0 + pm * MR;
                        let tile = Tile {
                            rows: MR.min(rows.end - r0),
                            cols,
                            ldc: n,
                            first,
                            last,
                            bias: &b.bias[pn * NR..(pn + panels) * NR],
                            activation: epilogue.activation,
                            residual: epilogue.residual.map(|res| &res[r0 * n + pn * NR..]),
                        };
                        let offset = (r0 - rows.start) * n + pn * NR;
                        micro_kernel(isa, kc, *panel, b_panels, &tile, &mut out[offset..]);
                    }
                    pn += panels;
                }
                k0 += kc;
            }
            m0 += mc;
        }
    });
}

/// One output tile and what to do with it.
struct Tile<'a> {
    rows: usize,
    cols: usize,
    ldc: usize,
    /// First K block: overwrite instead of accumulating.
    first: bool,
    /// Last K block: apply bias, activation and residual.
    last: bool,
    bias: &'a [f32],
    activation: Activation,
    residual: Option<&'a [f32]>,
}

/// `count` consecutive packed B panels from the current K block on: panel `i` starts at
/// `data[i * next..]`.
#[derive(Clone, Copy)]
struct BPanels<'a> {
    data: &'a [f32],
    next: usize,
    count: usize,
}

/// Multiplies an A panel (`kc` deep; valid for `tile.rows` rows, readable for `MR`) by one packed
/// B panel, or two with AVX-512, into `out` (row stride `tile.ldc`).
fn micro_kernel(isa: Isa, kc: usize, a: APanel, b: BPanels, tile: &Tile, out: &mut [f32]) {
    assert!(b.count >= 1 && b.data.len() >= (b.count - 1) * b.next + kc * NR);
    assert!(a.run > 0 && kc.is_multiple_of(a.run));
    assert!(tile.bias.len() >= b.count * NR && tile.cols <= b.count * NR);
    assert!(out.len() >= (tile.rows - 1) * tile.ldc + tile.cols);
    if let Some(res) = tile.residual {
        assert!(res.len() >= (tile.rows - 1) * tile.ldc + tile.cols);
    }
    match isa {
        // SAFETY (both x86 arms): `Isa::Avx512` and `Isa::Avx2Fma` are only constructed after
        // run-time detection of their features (AVX-512F besides AVX2 and FMA); A panels point
        // into live slices holding `MR` rows of `kc` values (checked by the caller's slicing, or
        // by `APanel::in_image`'s bounds on the image), the asserts above bound every other
        // access.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if b.count == 2 => unsafe {
            x86::pair_tile(kc, a, b.data.as_ptr(), b.next, tile, out)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 => unsafe {
            x86::micro_kernel(kc, a, b.data.as_ptr(), tile, out)
        },
        // SAFETY: NEON is the aarch64 baseline; the panel and the asserts above bound every
        // access as for the x86 kernels.
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::micro_kernel(kc, a, b.data.as_ptr(), tile, out) },
        Isa::Portable => {
            let b = &b.data[..kc * NR];
            let mut acc = [0f32; MR * NR];
            // Run by run, as the x86 kernels: no division per depth step.
            for run in 0..kc / a.run {
                for j in 0..a.run {
                    let bv = &b[(run * a.run + j) * NR..][..NR];
                    let at = run * a.run_stride + j;
                    for r in 0..MR {
                        // SAFETY: as above, the panel holds `MR` rows of `kc` values.
                        let ar = unsafe { *a.ptr.add(r * a.rs + at) };
                        for (c, &bj) in acc[r * NR..r * NR + NR].iter_mut().zip(bv) {
                            *c = ar.mul_add(bj, *c);
                        }
                    }
                }
            }
            merge_tile(&acc, tile, out);
        }
    }
}

/// Merges a computed `[MR, NR]` accumulator tile into `out` (the general, partial-tile path).
#[inline(always)]
fn merge_tile(acc: &[f32; MR * NR], t: &Tile, out: &mut [f32]) {
    for r in 0..t.rows {
        let dst = &mut out[r * t.ldc..r * t.ldc + t.cols];
        let src = &acc[r * NR..r * NR + t.cols];
        if t.first {
            dst.copy_from_slice(src);
        } else {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        }
        if t.last {
            for (d, &bias) in dst.iter_mut().zip(t.bias) {
                *d = t.activation.apply(*d + bias);
            }
            if let Some(res) = t.residual {
                for (d, &x) in dst.iter_mut().zip(&res[r * t.ldc..r * t.ldc + t.cols]) {
                    *d += x;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{APanel, Tile, MR, NR};

    /// # Safety
    /// Needs AVX2 and FMA; `a` must address `MR` rows of `kc` values, `b` hold `kc × NR` floats,
    /// and `out`/`tile.residual` cover the tile (checked by the caller).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn micro_kernel(
        kc: usize,
        a: APanel,
        b: *const f32,
        t: &Tile,
        out: &mut [f32],
    ) {
        // A panel of at most 8 valid columns (the last one of N = 24, 40, ...) multiplies one
        // vector per row instead of two, half of them wasted.
        if t.cols <= NR / 2 {
            tile::<1>(kc, a, b, t, out)
        } else {
            tile::<2>(kc, a, b, t, out)
        }
    }

    /// The `MR × 32` product of an A panel and two B panels (`b`, `b + next`) with AVX-512: twelve
    /// accumulators of 16 floats, half the broadcasts and instructions per multiply-add of
    /// [`micro_kernel`]'s, and the epilogue in registers (the last columns through a mask).
    ///
    /// # Safety
    /// Needs AVX-512F; `a` must address `MR` rows of `kc` values, `b` and `b + next` hold
    /// `kc × NR` floats each, `16 < t.cols ≤ 32`, and `out`/`t.residual` cover the tile.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pair_tile(
        kc: usize,
        a: APanel,
        b: *const f32,
        next: usize,
        t: &Tile,
        out: &mut [f32],
    ) {
        let mut c = [[_mm512_setzero_ps(); 2]; MR];
        let (mut b0, mut b1) = (b, b.add(next));
        for run in 0..kc / a.run {
            let mut ap = a.ptr.add(run * a.run_stride);
            for _ in 0..a.run {
                let (v0, v1) = (_mm512_loadu_ps(b0), _mm512_loadu_ps(b1));
                for (r, acc) in c.iter_mut().enumerate() {
                    let ar = _mm512_set1_ps(*ap.add(r * a.rs));
                    acc[0] = _mm512_fmadd_ps(ar, v0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(ar, v1, acc[1]);
                }
                ap = ap.add(1);
                b0 = b0.add(NR);
                b1 = b1.add(NR);
            }
        }
        let (lo, hi) = t.activation.bounds();
        let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
        let bias = [
            _mm512_loadu_ps(t.bias.as_ptr()),
            _mm512_loadu_ps(t.bias.as_ptr().add(NR)),
        ];
        // The second panel's valid columns.
        let mask: __mmask16 = ((1u32 << (t.cols - NR)) - 1) as u16;
        for (r, acc) in c.iter().enumerate().take(t.rows) {
            let dst = out.as_mut_ptr().add(r * t.ldc);
            let (mut v0, mut v1) = (acc[0], acc[1]);
            if !t.first {
                v0 = _mm512_add_ps(v0, _mm512_loadu_ps(dst));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(mask, dst.add(NR)));
            }
            if t.last {
                v0 = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v0, bias[0]), lo), hi);
                v1 = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v1, bias[1]), lo), hi);
                if let Some(res) = t.residual {
                    let res = res.as_ptr().add(r * t.ldc);
                    v0 = _mm512_add_ps(v0, _mm512_loadu_ps(res));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(mask, res.add(NR)));
                }
            }
            _mm512_storeu_ps(dst, v0);
            _mm512_mask_storeu_ps(dst.add(NR), mask, v1);
        }
    }

    /// The `MR × 8·V` product and the whole epilogue in registers; partial tiles store only
    /// their rows, and their last columns through a mask.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const V: usize>(
        kc: usize,
        a: APanel,
        mut b: *const f32,
        t: &Tile,
        out: &mut [f32],
    ) {
        let mut c = [[_mm256_setzero_ps(); V]; MR];
        for run in 0..kc / a.run {
            let mut ap = a.ptr.add(run * a.run_stride);
            for _ in 0..a.run {
                let mut bv = [_mm256_setzero_ps(); V];
                for (h, v) in bv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(b.add(8 * h));
                }
                for (r, acc) in c.iter_mut().enumerate() {
                    let ar = _mm256_broadcast_ss(&*ap.add(r * a.rs));
                    for (acc, &bh) in acc.iter_mut().zip(&bv) {
                        *acc = _mm256_fmadd_ps(ar, bh, *acc);
                    }
                }
                ap = ap.add(1);
                b = b.add(NR);
            }
        }
        let (lo, hi) = t.activation.bounds();
        let (lo, hi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        let mut bias = [_mm256_setzero_ps(); V];
        let mut masks = [_mm256_set1_epi32(-1); V];
        for h in 0..V {
            bias[h] = _mm256_loadu_ps(t.bias.as_ptr().add(8 * h));
            let valid = t.cols.saturating_sub(8 * h).min(8) as i32;
            masks[h] = _mm256_cmpgt_epi32(
                _mm256_set1_epi32(valid),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
        }
        let full = [t.cols >= 8, t.cols >= 16];
        let load = |p: *const f32, h: usize| {
            if full[h] {
                _mm256_loadu_ps(p)
            } else {
                _mm256_maskload_ps(p, masks[h])
            }
        };
        for (r, acc) in c.iter().enumerate().take(t.rows) {
            let dst = out.as_mut_ptr().add(r * t.ldc);
            for (h, &v) in acc.iter().enumerate() {
                let mut v = v;
                if !t.first {
                    v = _mm256_add_ps(v, load(dst.add(8 * h), h));
                }
                if t.last {
                    v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, bias[h]), lo), hi);
                    if let Some(res) = t.residual {
                        v = _mm256_add_ps(v, load(res.as_ptr().add(r * t.ldc + 8 * h), h));
                    }
                }
                if full[h] {
                    _mm256_storeu_ps(dst.add(8 * h), v);
                } else {
                    _mm256_maskstore_ps(dst.add(8 * h), masks[h], v);
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{merge_tile, APanel, Tile, MR, NR};

    /// The `MR × NR` product in 24 NEON accumulators (four 4-lane vectors a row): each depth step
    /// loads one B row (4 vectors) and multiplies it by the `MR` A values, each an `fmla` by a
    /// scalar; the epilogue through [`merge_tile`].
    ///
    /// # Safety
    /// NEON (the aarch64 baseline); `a` must address `MR` rows of `kc` values, `b` hold
    /// `kc × NR` floats, and `out`/`t.residual` cover the tile (checked by the caller).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn micro_kernel(
        kc: usize,
        a: APanel,
        mut b: *const f32,
        t: &Tile,
        out: &mut [f32],
    ) {
        let mut c = [[vdupq_n_f32(0.0); NR / 4]; MR];
        for run in 0..kc / a.run {
            let mut ap = a.ptr.add(run * a.run_stride);
            for _ in 0..a.run {
                let bv = [
                    vld1q_f32(b),
                    vld1q_f32(b.add(4)),
                    vld1q_f32(b.add(8)),
                    vld1q_f32(b.add(12)),
                ];
                for (r, acc) in c.iter_mut().enumerate() {
                    let ar = *ap.add(r * a.rs);
                    for (acc, &bh) in acc.iter_mut().zip(&bv) {
                        *acc = vfmaq_n_f32(*acc, bh, ar);
                    }
                }
                ap = ap.add(1);
                b = b.add(NR);
            }
        }
        let mut tile = [0f32; MR * NR];
        for (r, acc) in c.iter().enumerate() {
            for (h, &v) in acc.iter().enumerate() {
                vst1q_f32(tile.as_mut_ptr().add(r * NR + 4 * h), v);
            }
        }
        merge_tile(&tile, t, out);
    }
}
