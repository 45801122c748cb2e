//! RBAM's reference-based feature repair module (RBFRM), eqs. 3–5: the feature maps of the input
//! and of the fixed defect-free reference are cut into non-overlapping K×K patches; every input
//! patch is replaced by the softmax-weighted sum of the reference patches, weighted by its cosine
//! similarity to each of them. RBFRM has no parameters; the FFM ([`super::model::Ffm`]) learns
//! how to mix the repaired maps with the input's.
//!
//! On candle's ops (training, the reference path, CUDA); the fast path computes the same on the
//! CPU kernels ([`super::fast`]).
use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// Guards the cosine of an all-zero patch (ReLU features can be zero everywhere in a patch).
const NORM_EPS: f64 = 1e-6;

/// `[B, C, H, W]` → `[B, N, D]`: the K×K patches in row-major order, each flattened
/// channel-major (`D = C·K·K`).
pub fn patches(f: &Tensor, k: usize) -> Result<Tensor> {
    let (b, c, h, w) = f.dims4()?;
    check_divisible(h, w, k)?;
    Ok(f.reshape((b, c, h / k, k, w / k, k))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / k) * (w / k), c * k * k))?)
}

/// The inverse of [`patches`] for `[B, N, D]` patches of a `C`×`H`×`W` map.
pub fn unpatch(p: &Tensor, (c, h, w): (usize, usize, usize), k: usize) -> Result<Tensor> {
    let b = p.dim(0)?;
    Ok(p.reshape((b, h / k, w / k, c, k, k))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))?)
}

fn check_divisible(h: usize, w: usize, k: usize) -> Result<()> {
    if k == 0 || !h.is_multiple_of(k) || !w.is_multiple_of(k) {
        return Err(Error::invalid(
            "RBFRM patches",
            format!("a {h}x{w} feature map does not split into {k}x{k} patches"),
        ));
    }
    Ok(())
}

/// Each row scaled to unit length.
fn unit_rows(p: &Tensor) -> Result<Tensor> {
    let norm = (p.sqr()?.sum_keepdim(D::Minus1)? + NORM_EPS * NORM_EPS)?.sqrt()?;
    Ok(p.broadcast_div(&norm)?)
}

/// The reference's patches of one encoder stage at one patch size, ready for matching.
#[derive(Clone, Debug)]
pub struct ReferencePatches {
    /// `[N_ref, D]` as they are (what repaired patches are made of).
    pub raw: Tensor,
    /// `[D, N_ref]`, unit columns (what input patches are matched against).
    pub unit_t: Tensor,
    pub k: usize,
}

impl ReferencePatches {
    /// From the reference's `[1, C, H, W]` features.
    pub fn new(features: &Tensor, k: usize) -> Result<Self> {
        let raw = patches(&features.detach(), k)?.squeeze(0)?;
        let unit_t = unit_rows(&raw)?.t()?.contiguous()?;
        Ok(ReferencePatches { raw, unit_t, k })
    }

    /// `[B, N, N_ref]` softmax weights of every input patch over the reference patches (eq. 4 with
    /// a temperature `scale`; 1 is the paper's). Each row is ≥ 0 and sums to 1.
    pub fn weights(&self, features: &Tensor, scale: f64) -> Result<Tensor> {
        let p = unit_rows(&patches(features, self.k)?)?;
        let similarity = (p.broadcast_matmul(&self.unit_t)? * scale)?;
        // A softmax of exp and sum: candle's fused softmax has no gradient.
        let top = similarity.max_keepdim(D::Minus1)?.detach();
        let e = similarity.broadcast_sub(&top)?.exp()?;
        Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
    }

    /// The repaired `[B, C, H, W]` map (eq. 5): every patch the weighted sum of reference patches.
    pub fn repair(&self, features: &Tensor, scale: f64) -> Result<Tensor> {
        let (_, c, h, w) = features.dims4()?;
        let repaired = self.weights(features, scale)?.broadcast_matmul(&self.raw)?;
        unpatch(&repaired, (c, h, w), self.k)
    }
}
