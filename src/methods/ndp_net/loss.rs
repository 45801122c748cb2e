//! NDP-Net's losses: the pixel-level defect perception loss (eq. 2), the feature repair loss
//! (eq. 9), the focal segmentation loss (eq. 10) and the perceptual loss (eqs. 13, 16) on the
//! frozen pretrained Lite0 in place of VGG-16.
use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::nn::backbone::EfficientNetLite0;

/// Keeps the min-max normalisation finite when a feature difference is flat (identical images).
const RANGE_EPS: f64 = 1e-6;

/// `[B, 1, H, W]` masks (0/1) as the share of defective pixels in each cell of a map `factor`
/// times smaller (area resizing: a thin defect keeps a partial label at coarse scales).
pub fn resize_mask(mask: &Tensor, factor: usize) -> Result<Tensor> {
    if factor == 1 {
        return Ok(mask.clone());
    }
    Ok(mask.avg_pool2d(factor)?)
}

/// Eq. 2: for each stage `l`, the per-position channel mean of `(Φ_l(I_o) − Φ_l(I_ad))²`,
/// min-max normalised per image, against the mask area-resized to that stage, squared error
/// averaged over positions; the mean over stages. `mask` is `[B, 1, H, W]` at the input size.
///
/// With identical images and an empty mask it is 0. The normalisation makes it blind to the
/// difference's scale: what it measures is where the features differ against where the mask says
/// they should.
pub fn defect_perception(clean: &[Tensor], defective: &[Tensor], mask: &Tensor) -> Result<Tensor> {
    if clean.len() != defective.len() || clean.is_empty() {
        return Err(Error::invalid(
            "defect perception loss",
            format!(
                "{} clean and {} defective feature maps",
                clean.len(),
                defective.len()
            ),
        ));
    }
    let (_, _, height, _) = mask.dims4()?;
    let mut total: Option<Tensor> = None;
    for (o, ad) in clean.iter().zip(defective) {
        let (b, _, h, w) = o.dims4()?;
        let d = (o - ad)?.sqr()?.mean(1)?.reshape((b, h * w))?;
        let lo = d.min_keepdim(1)?;
        let hi = d.max_keepdim(1)?;
        let normalised = d
            .broadcast_sub(&lo)?
            .broadcast_div(&((hi - &lo)? + RANGE_EPS)?)?;
        let target = resize_mask(mask, height / h)?.reshape((b, h * w))?;
        let term = (normalised - target)?.sqr()?.mean_all()?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    Ok((total.expect("checked non-empty") / clean.len() as f64)?)
}

/// Eq. 9: the mean squared error between the repaired features and the defect-free image's,
/// averaged over the stages RBAM repairs.
pub fn feature_repair(repaired: &[Tensor], clean: &[Tensor]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (r, o) in repaired.iter().zip(clean) {
        let term = (r - o)?.sqr()?.mean_all()?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    let total = total.ok_or_else(|| Error::invalid("feature repair loss", "no stages"))?;
    Ok((total / repaired.len() as f64)?)
}

/// `log σ(z)` without overflow: `−softplus(−z)`, `softplus(x) = max(x, 0) + ln(1 + e^(−|x|))`.
fn log_sigmoid(z: &Tensor) -> Result<Tensor> {
    let neg = z.neg()?;
    let softplus = (neg.relu()? + (neg.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(softplus.neg()?)
}

/// Binary focal loss (Lin et al.; DRAEM's, α = 1) of `[B, 1, h, w]` logits against targets in
/// 0..=1 (area-resized masks): `−y·(1 − p)^γ·ln p − (1 − y)·p^γ·ln(1 − p)`, averaged.
pub fn focal(logits: &Tensor, target: &Tensor, gamma: f64) -> Result<Tensor> {
    // From the log-probabilities: basic ops only, so the gradient is candle's own.
    let log_p = log_sigmoid(logits)?;
    let log_q = log_sigmoid(&logits.neg()?)?;
    let (p, q) = (log_p.exp()?, log_q.exp()?);
    let (push_up, push_down) = if gamma == 0.0 {
        (log_p, log_q)
    } else {
        ((q.powf(gamma)? * log_p)?, (p.powf(gamma)? * log_q)?)
    };
    let loss = ((target * push_up)? + ((1.0 - target)? * push_down)?)?.neg()?;
    Ok(loss.mean_all()?)
}

/// The Lite0 blocks whose maps the perceptual loss compares: the first five, up to stride 8
/// (the paper takes VGG-16's first five ReLU maps, up to stride 4; no VGG weights exist here).
pub const PERCEPTUAL_TAPS: [usize; 5] = [0, 1, 2, 3, 4];

/// The perceptual loss: the mean absolute difference of the frozen Lite0's maps of `target`
/// (computed without a graph) and of `image` (through candle's ops, so gradients reach it),
/// averaged over [`PERCEPTUAL_TAPS`].
pub fn perceptual(lite0: &EfficientNetLite0, image: &Tensor, target: &Tensor) -> Result<Tensor> {
    let want = lite0.forward_taps(&target.detach(), &PERCEPTUAL_TAPS)?;
    let got = lite0.forward_taps_candle(image, &PERCEPTUAL_TAPS)?;
    let mut total: Option<Tensor> = None;
    for (g, t) in got.iter().zip(&want) {
        let term = (g - t)?.abs()?.mean_all()?;
        total = Some(match total {
            Some(s) => (s + term)?,
            None => term,
        });
    }
    Ok((total.expect("five taps") / PERCEPTUAL_TAPS.len() as f64)?)
}

/// The mean squared error of two same-shaped tensors.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.mean_all()?)
}
