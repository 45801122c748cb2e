//! One vector register of f32 lanes, so that a kernel is written once for AVX2, AVX-512 and NEON:
//! its body is an `#[inline(always)]` function generic over [`F32Vector`], called from one thin
//! `#[target_feature]` wrapper per instruction set, so that the body compiles with the wrapper's
//! instructions.
#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The lane operations the kernels use. Every method is unsafe because it needs the instruction
/// set of its register type (AVX2+FMA for `__m256`, AVX-512F for `__m512`, NEON for
/// `float32x4_t`) and, for the loads and stores, `LANES` valid floats at the pointer.
pub(crate) trait F32Vector: Copy {
    const LANES: usize;
    unsafe fn splat(v: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `self · b + c`, one rounding.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self;
    unsafe fn sum(self) -> f32;
}

#[cfg(target_arch = "x86_64")]
impl F32Vector for __m256 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        _mm256_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self)
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        _mm256_fmadd_ps(self, b, c)
    }
    #[inline(always)]
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
        _mm256_min_ps(_mm256_max_ps(self, lo), hi)
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), self);
        lanes.iter().sum()
    }
}

#[cfg(target_arch = "x86_64")]
impl F32Vector for __m512 {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        _mm512_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self)
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        _mm512_fmadd_ps(self, b, c)
    }
    #[inline(always)]
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
        _mm512_min_ps(_mm512_max_ps(self, lo), hi)
    }
    /// Through memory, not `_mm512_reduce_add_ps`: its 256- and 128-bit steps (without
    /// AVX-512VL) confine every value they touch to the first 16 registers, and LLVM then kept
    /// 24 accumulators of the peak loop half on the stack, a load and a store around each FMA.
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), self);
        lanes.iter().sum()
    }
}

#[cfg(target_arch = "aarch64")]
impl F32Vector for float32x4_t {
    const LANES: usize = 4;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        vdupq_n_f32(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        vld1q_f32(p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        vst1q_f32(p, self)
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        vfmaq_f32(c, self, b)
    }
    #[inline(always)]
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
        vminq_f32(vmaxq_f32(self, lo), hi)
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        vaddvq_f32(self)
    }
}
