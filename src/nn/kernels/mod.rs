//! Fast CPU inference kernels on channels-last (`[B, H, W, C]`) `f32` data: a packed GEMM with a
//! fused bias/activation/residual epilogue (1×1 convolutions and, through an implicit im2col, dense
//! k×k convolutions of any stride and padding), and a depthwise convolution with fused bias and
//! activation. AVX-512 and AVX2+FMA micro-kernels are chosen at run time on x86-64, NEON ones on
//! aarch64; the portable versions build and run everywhere. Work is split over the threads by output rows: rayon's,
//! or within one image's pass a [`team`] that keeps them spinning between operations.
//!
//! These serve frozen weights and inference only: they build no autograd graph. Training keeps
//! candle's differentiable ops; on CUDA, [`cuda`]'s custom ops replace the launch-bound ones.
pub mod cuda;
pub mod depthwise;
pub mod gemm;
pub mod heads;
pub mod lite0;
pub mod maps;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod simd;
mod team;

use std::ops::Range;

pub use depthwise::{DepthwiseGeom, RowSource};
pub use gemm::{ASource, ConvGeom, Epilogue, PackedB};

use crate::error::{Error, Result};
use team::{Disjoint, Team};

/// Instruction set of the micro-kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 with AVX-512F besides AVX2 and FMA, detected at run time: the depthwise groups
    /// and the GEMM's two-panel tile use its 32 registers; the rest runs the AVX2 kernels.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// x86-64 with AVX2 and FMA, detected at run time.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// aarch64's NEON (part of its baseline, so always there): the GEMM's 6×16 tile and the
    /// depthwise groups in 4-lane registers; the rest runs the portable code, which the compiler
    /// vectorises with NEON too.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// Plain Rust the compiler vectorises for the target (SSE2, NEON, ...).
    Portable,
}

impl Isa {
    /// The name `VIGIL_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => "avx2",
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => "neon",
            Isa::Portable => "portable",
        }
    }
}

/// Element-wise activation fused into a kernel's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    Relu6,
}

impl Activation {
    /// The clamp interval this activation is.
    pub fn bounds(self) -> (f32, f32) {
        match self {
            Activation::Identity => (f32::NEG_INFINITY, f32::INFINITY),
            Activation::Relu => (0.0, f32::INFINITY),
            Activation::Relu6 => (0.0, 6.0),
        }
    }

    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        let (lo, hi) = self.bounds();
        v.max(lo).min(hi)
    }
}

/// Below this many multiply-adds an operation runs on the calling thread (splitting it would cost
/// more than it saves).
const PARALLEL_MACS: usize = 1 << 16;

/// Entry point of the kernels, bound to one instruction set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
    /// Whether one operation may be split over rayon's threads.
    parallel: bool,
}

impl Kernels {
    /// The fastest instruction set this CPU supports.
    /// `VIGIL_KERNELS=avx512|avx2|neon|portable` picks another one this CPU runs (for comparisons,
    /// or where a slower-looking set measures faster on the line).
    pub fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            let available = Self::available();
            let Ok(wanted) = std::env::var("VIGIL_KERNELS") else {
                return available[0];
            };
            match available.iter().find(|k| k.isa.name() == wanted) {
                Some(kernels) => *kernels,
                None => {
                    let names: Vec<&str> = available.iter().map(|k| k.isa.name()).collect();
                    log::warn!(
                        "VIGIL_KERNELS={wanted} ignored: this CPU runs {}",
                        names.join(", ")
                    );
                    available[0]
                }
            }
        })
    }

    /// Every instruction set this CPU runs, the fastest first (for tests and comparisons).
    pub fn available() -> Vec<Self> {
        let mut isas = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            if is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
            isas.push(Isa::Avx2Fma);
        }
        #[cfg(target_arch = "aarch64")]
        isas.push(Isa::Neon);
        isas.push(Isa::Portable);
        isas.into_iter()
            .map(|isa| Self {
                isa,
                parallel: true,
            })
            .collect()
    }

    /// The portable kernels, whatever the CPU (for tests and comparisons).
    pub fn portable() -> Self {
        Self {
            isa: Isa::Portable,
            parallel: true,
        }
    }

    /// The same kernels, each operation on the calling thread only (for callers that split the
    /// work over threads themselves, e.g. one image per thread).
    pub fn serial(self) -> Self {
        Self {
            parallel: false,
            ..self
        }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Runs `pass` (a sequence of operations on one image, on the calling thread) with the
    /// threads kept spinning between its operations, when these kernels split operations over
    /// threads (see [`team`]: waking parked threads for every operation costs more than the
    /// split gains).
    pub fn in_team<R>(&self, pass: impl FnOnce() -> R) -> R {
        let threads = rayon::current_num_threads().max(1);
        if self.parallel && threads > 1 {
            Team::run(threads - 1, pass)
        } else {
            pass()
        }
    }

    /// `out[M, N] = epilogue(A · B + bias)`, with `M = out.len() / B.n()`.
    pub fn gemm(&self, a: ASource, b: &PackedB, epilogue: Epilogue, out: &mut [f32]) -> Result<()> {
        let m = out.len() / b.n().max(1);
        check_len("gemm output", out.len(), m * b.n())?;
        match a {
            ASource::Matrix { data, lda } => {
                if lda < b.k() || (m > 0 && data.len() < (m - 1) * lda + b.k()) {
                    return Err(Error::invalid(
                        "gemm input",
                        format!(
                            "{} values with row stride {lda} cannot hold {m}x{} rows",
                            data.len(),
                            b.k()
                        ),
                    ));
                }
            }
            ASource::Im2col { image, geom } => {
                check_len(
                    "convolution input",
                    image.len(),
                    geom.batch * geom.height * geom.width * geom.in_c,
                )?;
                check_len("convolution output rows", m, geom.rows())?;
                check_len("convolution weight depth", b.k(), geom.depth())?;
            }
        }
        if let Some(res) = epilogue.residual {
            check_len("gemm residual", res.len(), out.len())?;
        }
        let isa = self.isa;
        let macs = if self.parallel { m * b.n() * b.k() } else { 0 };
        par_rows(m, b.n(), gemm::MR, macs, out, |_, rows, chunk| {
            gemm::gemm_rows(isa, a, b, rows, epilogue, chunk)
        });
        Ok(())
    }

    /// Dense convolution of a channels-last image with weights packed as `[(ky, kx, c), out]`
    /// (see [`pack_conv_weight`]); `out` is `[B, OH, OW, out]`.
    pub fn conv2d(
        &self,
        image: &[f32],
        geom: ConvGeom,
        weight: &PackedB,
        epilogue: Epilogue,
        out: &mut [f32],
    ) -> Result<()> {
        check_len("convolution output", out.len(), geom.rows() * weight.n())?;
        self.gemm(ASource::Im2col { image, geom }, weight, epilogue, out)
    }

    /// Depthwise convolution; `weights` `[k·k, C]`, `bias` `[C]`, `out` `[B, OH, OW, C]`.
    pub fn depthwise(
        &self,
        geom: &DepthwiseGeom,
        input: &[f32],
        weights: &[f32],
        bias: &[f32],
        activation: Activation,
        out: &mut [f32],
    ) -> Result<()> {
        let c = geom.channels;
        check_len(
            "depthwise input",
            input.len(),
            geom.batch * geom.height * geom.width * c,
        )?;
        let rows = geom.batch * geom.out_h;
        check_depthwise(geom, weights, bias, out.len(), rows)?;
        let isa = self.isa;
        let macs = if self.parallel {
            rows * geom.out_w * c * geom.kernel * geom.kernel
        } else {
            0
        };
        par_rows(rows, geom.out_w * c, 1, macs, out, |_, range, chunk| {
            depthwise::depthwise_rows(
                isa,
                geom,
                input,
                RowSource::Plane,
                weights,
                bias,
                activation,
                range,
                chunk,
            )
        });
        Ok(())
    }

    /// [`nchw_to_nhwc`] of one image, split over the threads by rows when these kernels split
    /// operations (the first step of a Lite0 pass: serial, it took ~140 µs on one thread while
    /// the other waited).
    pub fn nchw_to_nhwc_one(
        &self,
        src: &[f32],
        [c, h, w]: [usize; 3],
        dst: &mut [f32],
        f: impl Fn(f32) -> f32 + Sync,
    ) -> Result<()> {
        check_len("channels-first image", src.len(), c * h * w)?;
        check_len("channels-last image", dst.len(), c * h * w)?;
        let macs = if self.parallel { c * h * w * 8 } else { 0 };
        par_rows(h, w * c, 1, macs, dst, |_, rows, chunk| {
            pixels_to_channels_last(src, [c, h * w], rows.start * w..rows.end * w, chunk, &f)
        });
        Ok(())
    }

    /// Output rows `rows` of a depthwise convolution of one image whose input rows come from a
    /// ring of `slots` rows (`[slots, W, C]`, input row `iy` in slot `iy % slots`; see
    /// [`RowSource::Ring`]), on the calling thread. The caller keeps every input row these output
    /// rows read in the ring.
    #[allow(clippy::too_many_arguments)]
    pub fn depthwise_ring_rows(
        &self,
        geom: &DepthwiseGeom,
        ring: &[f32],
        slots: usize,
        rows: Range<usize>,
        weights: &[f32],
        bias: &[f32],
        activation: Activation,
        out: &mut [f32],
    ) -> Result<()> {
        let window = (rows.len().max(1) - 1) * geom.stride + geom.kernel;
        if geom.batch != 1 || rows.end > geom.out_h || slots < window.min(geom.height) {
            return Err(Error::invalid(
                "depthwise ring",
                format!(
                    "{slots} slots cannot hold output rows {rows:?} of {geom:?} (one image, \
                     {window} input rows)"
                ),
            ));
        }
        check_len(
            "depthwise ring",
            ring.len(),
            slots * geom.width * geom.channels,
        )?;
        check_depthwise(geom, weights, bias, out.len(), rows.len())?;
        depthwise::depthwise_rows(
            self.isa,
            geom,
            ring,
            RowSource::Ring { slots },
            weights,
            bias,
            activation,
            rows,
            out,
        );
        Ok(())
    }
}

/// The checks every depthwise entry point shares: kernel, stride, weights, bias and an output
/// of `rows` rows.
fn check_depthwise(
    geom: &DepthwiseGeom,
    weights: &[f32],
    bias: &[f32],
    out_len: usize,
    rows: usize,
) -> Result<()> {
    if geom.stride == 0 || geom.kernel == 0 || geom.kernel > depthwise::MAX_KERNEL {
        return Err(Error::invalid(
            "depthwise geometry",
            format!(
                "kernel {} and stride {} must be 1..={} and >= 1",
                geom.kernel,
                geom.stride,
                depthwise::MAX_KERNEL
            ),
        ));
    }
    let c = geom.channels;
    check_len(
        "depthwise weights",
        weights.len(),
        geom.kernel * geom.kernel * c,
    )?;
    check_len("depthwise bias", bias.len(), c)?;
    check_len("depthwise output", out_len, rows * geom.out_w * c)
}

fn check_len(what: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::invalid(
            what,
            format!("{got} values, expected {expected}"),
        ));
    }
    Ok(())
}

/// Splits `rows` output rows of `row_len` values (chunks a multiple of `granule` rows) over
/// the threads when the work is worth it, and runs `f(part, rows, out_chunk)` on each part
/// (parts number from 0, at most one per thread).
fn par_rows(
    rows: usize,
    row_len: usize,
    granule: usize,
    macs: usize,
    out: &mut [f32],
    f: impl Fn(usize, Range<usize>, &mut [f32]) + Sync,
) {
    let threads = rayon::current_num_threads().max(1);
    if threads == 1 || macs < PARALLEL_MACS || rows <= granule {
        f(0, 0..rows, out);
        return;
    }
    let per = rows.div_ceil(threads).div_ceil(granule) * granule;
    let out = Disjoint::new(&mut out[..rows * row_len]);
    run_parts(rows.div_ceil(per), &|part| {
        let rows = part * per..((part + 1) * per).min(rows);
        // SAFETY: each part writes only its own rows of `out`.
        let chunk = unsafe { out.range(rows.start * row_len..rows.end * row_len) };
        f(part, rows, chunk);
    });
}

/// Runs `f(part)` for every part at once: on the team the calling thread leads, if any (see
/// [`team`]), else on rayon's threads.
fn run_parts(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    if parts <= 1 {
        (0..parts).for_each(f);
    } else if !Team::parts(parts, f) {
        rayon::scope(|s| {
            for part in 0..parts {
                s.spawn(move |_| f(part));
            }
        });
    }
}

/// Packs a PyTorch-layout convolution weight `[out, in, kh, kw]` (row-major) for [`Kernels::conv2d`]
/// and [`Kernels::gemm`] (1×1): depth ordered `(ky, kx, in)` as the implicit im2col reads it.
pub fn pack_conv_weight(
    weight: &[f32],
    out_c: usize,
    in_c: usize,
    kh: usize,
    kw: usize,
    bias: &[f32],
) -> PackedB {
    PackedB::new(
        kh * kw * in_c,
        out_c,
        |k, n| {
            let (tap, c) = (k / in_c, k % in_c);
            weight[((n * in_c + c) * kh + tap / kw) * kw + tap % kw]
        },
        bias,
    )
}

/// Depthwise weights `[C, 1, k, k]` (row-major) → `[k·k, C]`.
pub fn pack_depthwise_weight(weight: &[f32], channels: usize, kernel: usize) -> Vec<f32> {
    let taps = kernel * kernel;
    let mut out = vec![0.0; taps * channels];
    for c in 0..channels {
        for t in 0..taps {
            out[t * channels + c] = weight[c * taps + t];
        }
    }
    out
}

/// `[B, C, H, W]` → `[B, H, W, C]`, each value mapped through `f`.
pub fn nchw_to_nhwc(src: &[f32], dims: [usize; 4], dst: &mut [f32], f: impl Fn(f32) -> f32) {
    let [b, c, h, w] = dims;
    for bi in 0..b {
        let image = &src[bi * c * h * w..(bi + 1) * c * h * w];
        let dst = &mut dst[bi * c * h * w..(bi + 1) * c * h * w];
        pixels_to_channels_last(image, [c, h * w], 0..h * w, dst, &f);
    }
}

/// Pixels `pixels` of one `[C, P]` image into `dst`, their `[pixels, C]` part, through `f`.
fn pixels_to_channels_last(
    image: &[f32],
    [c, plane]: [usize; 2],
    pixels: Range<usize>,
    dst: &mut [f32],
    f: &impl Fn(f32) -> f32,
) {
    for ci in 0..c {
        let src = &image[ci * plane + pixels.start..ci * plane + pixels.end];
        for (p, &v) in src.iter().enumerate() {
            dst[p * c + ci] = f(v);
        }
    }
}

/// `[B, H, W, C]` → `[B, C, H, W]`.
pub fn nhwc_to_nchw(src: &[f32], dims: [usize; 4], dst: &mut [f32]) {
    let [b, c, h, w] = dims;
    let plane = h * w;
    for bi in 0..b {
        let src = &src[bi * c * plane..(bi + 1) * c * plane];
        let dst = &mut dst[bi * c * plane..(bi + 1) * c * plane];
        for (p, pixel) in src.chunks_exact(c).enumerate() {
            for (ci, &v) in pixel.iter().enumerate() {
                dst[ci * plane + p] = v;
            }
        }
    }
}
