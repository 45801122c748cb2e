//! Packed single-precision GEMM with a fused epilogue (bias, activation, residual), the engine of
//! every 1×1 and dense convolution on CPU.
//!
//! GotoBLAS blocking: the weights (B, `[K, N]`) are packed once at load time into panels of
//! [`NR`] columns; the activations (A, `[M, K]`) are packed per call into panels of [`MR`] rows,
//! `KC` columns at a time, straight from their source, which is either a plain row-major matrix
//! (1×1 convolution on channels-last data) or an implicit im2col of a channels-last image (dense
//! k×k convolution, zero padding included). A 6×16 micro-kernel (12 AVX2 accumulators) or its
//! portable twin multiplies a packed A panel with a packed B panel.
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

    fn panel(&self, p: usize) -> &[f32] {
        &self.panels[p * self.k * NR..(p + 1) * self.k * NR]
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
    /// Packs rows `row0..row0 + rows` (at most MR), depths `k0..k0 + kc` into `dst` as `[kc][MR]`,
    /// zero-filling missing rows.
    fn pack_panel(&self, row0: usize, rows: usize, k0: usize, kc: usize, dst: &mut [f32]) {
        if rows < MR {
            dst[..kc * MR].fill(0.0);
        }
        match *self {
            ASource::Matrix { data, lda } => {
                for r in 0..rows {
                    let src = &data[(row0 + r) * lda + k0..(row0 + r) * lda + k0 + kc];
                    for (kk, &v) in src.iter().enumerate() {
                        dst[kk * MR + r] = v;
                    }
                }
            }
            ASource::Im2col { image, geom } => {
                let c = geom.in_c;
                for r in 0..rows {
                    let m = row0 + r;
                    let ox = m % geom.out_w;
                    let oy = (m / geom.out_w) % geom.out_h;
                    let b = m / (geom.out_w * geom.out_h);
                    let mut k = k0;
                    while k < k0 + kc {
                        let tap = k / c;
                        let ci = k % c;
                        let run = (c - ci).min(k0 + kc - k);
                        let iy = (oy * geom.stride + tap / geom.kernel_w) as isize
                            - geom.pad_top as isize;
                        let ix = (ox * geom.stride + tap % geom.kernel_w) as isize
                            - geom.pad_left as isize;
                        let inside = (0..geom.height as isize).contains(&iy)
                            && (0..geom.width as isize).contains(&ix);
                        let base = (k - k0) * MR + r;
                        if inside {
                            let at = ((b * geom.height + iy as usize) * geom.width + ix as usize)
                                * c
                                + ci;
                            for (j, &v) in image[at..at + run].iter().enumerate() {
                                dst[base + j * MR] = v;
                            }
                        } else {
                            for j in 0..run {
                                dst[base + j * MR] = 0.0;
                            }
                        }
                        k += run;
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
    PACK_A.with(|cell| {
        let mut pack = cell.borrow_mut();
        if pack.len() < MC * KC {
            pack.resize(MC * KC, 0.0);
        }
        let mut k0 = 0;
        while k0 < k.max(1) {
            let kc = KC.min(k - k0);
            let first = k0 == 0;
            let last = k0 + kc >= k;
            let mut m0 = rows.start;
            while m0 < rows.end {
                let mc = MC.min(rows.end - m0);
                let panels_m = mc.div_ceil(MR);
                for pm in 0..panels_m {
                    let r0 = m0 + pm * MR;
                    let rows_here = MR.min(rows.end - r0);
                    a.pack_panel(
                        r0,
                        rows_here,
                        k0,
                        kc,
                        &mut pack[pm * kc * MR..(pm + 1) * kc * MR],
                    );
                }
                for pn in 0..n_panels {
                    let bpanel = &b.panel(pn)[k0 * NR..(k0 + kc) * NR];
                    let cols = NR.min(n - pn * NR);
                    for pm in 0..panels_m {
                        let r0 = m0 + pm * MR;
                        let rows_here = MR.min(rows.end - r0);
                        let mut tile = [0f32; MR * NR];
                        micro_kernel(isa, kc, &pack[pm * kc * MR..], bpanel, &mut tile);
                        let offset = (r0 - rows.start) * n + pn * NR;
                        let tile_out = Tile {
                            rows: rows_here,
                            cols,
                            ldc: n,
                            first,
                            last,
                            bias: &b.bias[pn * NR..pn * NR + NR],
                        };
                        let residual = epilogue
                            .residual
                            .map(|res| &res[r0 * n + pn * NR..]);
                        store_tile(
                            isa,
                            &tile,
                            &tile_out,
                            epilogue.activation,
                            residual,
                            &mut out[offset..],
                        );
                    }
                }
                m0 += mc;
            }
            k0 += kc;
            if k == 0 {
                break;
            }
        }
    });
}

struct Tile<'a> {
    rows: usize,
    cols: usize,
    ldc: usize,
    first: bool,
    last: bool,
    bias: &'a [f32],
}

fn micro_kernel(isa: Isa, kc: usize, a: &[f32], b: &[f32], tile: &mut [f32; MR * NR]) {
    assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2Fma` is only constructed after run-time detection of AVX2 and FMA;
        // the asserts above keep every read inside `a` and `b`.
        Isa::Avx2Fma => unsafe { x86::micro_kernel(kc, a.as_ptr(), b.as_ptr(), tile) },
        Isa::Portable => portable_micro_kernel(kc, a, b, tile),
    }
}

fn portable_micro_kernel(kc: usize, a: &[f32], b: &[f32], tile: &mut [f32; MR * NR]) {
    let mut acc = [[0f32; NR]; MR];
    for (av, bv) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kc) {
        for (row, &ai) in acc.iter_mut().zip(av) {
            for (c, &bj) in row.iter_mut().zip(bv) {
                *c = ai.mul_add(bj, *c);
            }
        }
    }
    for (dst, row) in tile.chunks_exact_mut(NR).zip(&acc) {
        dst.copy_from_slice(row);
    }
}

fn store_tile(
    isa: Isa,
    tile: &[f32; MR * NR],
    t: &Tile,
    activation: Activation,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 was detected (see `micro_kernel`); the function only uses safe indexing.
        Isa::Avx2Fma => unsafe { x86::store_tile(tile, t, activation, residual, out) },
        Isa::Portable => store_tile_generic(tile, t, activation, residual, out),
    }
}

#[inline(always)]
fn store_tile_generic(
    tile: &[f32; MR * NR],
    t: &Tile,
    activation: Activation,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    for r in 0..t.rows {
        let dst = &mut out[r * t.ldc..r * t.ldc + t.cols];
        let src = &tile[r * NR..r * NR + t.cols];
        if !t.first {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        } else {
            dst.copy_from_slice(src);
        }
        if t.last {
            for (d, &bias) in dst.iter_mut().zip(t.bias) {
                *d = activation.apply(*d + bias);
            }
            if let Some(res) = residual {
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

    use super::{store_tile_generic, Activation, Tile, MR, NR};

    /// # Safety
    /// Needs AVX2 and FMA; `a` must hold `kc × MR` and `b` `kc × NR` floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn micro_kernel(
        kc: usize,
        mut a: *const f32,
        mut b: *const f32,
        tile: &mut [f32; MR * NR],
    ) {
        let mut c = [[_mm256_setzero_ps(); 2]; MR];
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for (r, acc) in c.iter_mut().enumerate() {
                let ar = _mm256_broadcast_ss(&*a.add(r));
                acc[0] = _mm256_fmadd_ps(ar, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(ar, b1, acc[1]);
            }
            a = a.add(MR);
            b = b.add(NR);
        }
        for (r, acc) in c.iter().enumerate() {
            _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR), acc[0]);
            _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR + 8), acc[1]);
        }
    }

    /// The generic epilogue, compiled with AVX2 so that its loops vectorise.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn store_tile(
        tile: &[f32; MR * NR],
        t: &Tile,
        activation: Activation,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) {
        store_tile_generic(tile, t, activation, residual, out)
    }
}
