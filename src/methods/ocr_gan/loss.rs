//! OCR-GAN's losses (the paper's eqs. 9–12) and per-image anomaly score terms (eq. 13).
use candle_core::Tensor;

use crate::error::Result;

/// Mean binary cross-entropy of `logits` against one label (1 = positive: reconstructed or forged;
/// 0 = a normal image), in the stable form `max(x, 0) − x·y + log(1 + e^−|x|)`. This is eq. 10's
/// min-max written as log-likelihoods, as Skip-GANomaly's code trains it.
pub fn bce_with_logits(logits: &Tensor, label: f64) -> Result<Tensor> {
    let softplus_tail = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let loss = ((logits.relu()? - (logits * label)?)? + softplus_tail)?;
    Ok(loss.mean_all()?)
}

/// Per-image mean absolute error `[B]` (L_con of eq. 9 for one image).
pub fn content_error(image: &Tensor, reconstruction: &Tensor) -> Result<Tensor> {
    Ok((image - reconstruction)?.abs()?.flatten_from(1)?.mean(1)?)
}

/// Per-image mean squared difference `[B]`: L_lat of eq. 11 for one image's latent features, and
/// the authors' code's content score of an image and its reconstruction.
pub fn mean_squared_error(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.flatten_from(1)?.mean(1)?)
}
