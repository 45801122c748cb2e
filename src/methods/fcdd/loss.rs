//! FCDD's pixel losses on upsampled anomaly maps: FCDD's own (the HSC paper's eq. 4) and the
//! paper's per-pixel hypersphere-classifier loss (eq. 5), plus the pseudo-Huber map and the push
//! function both use.
//!
//! Shapes: `a` is the upsampled anomaly map `[B, H, W]` (≥ 0), `y` the masks `[B, H, W]` with
//! values in {0, 1} (f32, 1 = anomalous). Both losses are differentiable in `a`.
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Added to the push function's argument: `p(0)` would be infinite with an infinite gradient.
/// At 1e-6 a pixel scored 0 costs `-ln(1e-6)` ≈ 13.8 and pulls with gradient ≈ -1e6: large
/// enough to dominate, finite so one pixel cannot turn a step into NaN. FCDD's code instead adds
/// 1e-31 inside the logarithm, which leaves the gradient at 0 infinite.
pub const PUSH_EPSILON: f64 = 1e-6;

/// Below this, `1 - exp(-x)` is computed by its series: in f32, `1 - exp(-1e-6)` keeps about one
/// significant digit.
const SERIES_BELOW: f64 = 0.1;

/// Which pixel loss trains the map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelLoss {
    /// The HSC paper's eq. 5: each anomalous pixel pushed on its own, weighted by |J0|/|J1|.
    #[default]
    Hsc,
    /// FCDD's loss (eq. 4): the push applied to each image's mean anomalous score.
    Fcdd,
}

impl PixelLoss {
    /// The loss of maps `a` against masks `y` (both `[B, H, W]`), a scalar tensor.
    pub fn loss(self, a: &Tensor, y: &Tensor) -> Result<Tensor> {
        match self {
            PixelLoss::Hsc => hsc_loss(a, y),
            PixelLoss::Fcdd => fcdd_loss(a, y),
        }
    }
}

/// The pseudo-Huber function `sqrt(x² + 1) - 1`, elementwise: FCDD's robust stand-in for the
/// squared distance to the centre (≥ 0, quadratic near 0, linear far away).
pub fn pseudo_huber(x: &Tensor) -> Result<Tensor> {
    Ok((x.sqr()? + 1.0)?.sqrt()?.affine(1.0, -1.0)?)
}

/// The push function `p(a) = -ln(1 - exp(-a))`, elementwise, evaluated at `a + PUSH_EPSILON`
/// (see [`PUSH_EPSILON`]); `1 - exp(-x)` is `x(1 - x/2(1 - x/3(1 - x/4)))` below 0.1 (relative
/// error under 1e-6 there) so that it keeps its precision near 0. Both branches and their
/// derivatives are finite for every `a ≥ 0`, so the unselected one cannot leak NaN into the
/// gradient of the selection.
pub fn push(a: &Tensor) -> Result<Tensor> {
    let x = (a + PUSH_EPSILON)?;
    let series = {
        // x(1 - x/2(1 - x/3(1 - x/4))), Horner from the inside out.
        let t = x.affine(-0.25, 1.0)?; // 1 - x/4
        let t = (x.affine(-1.0 / 3.0, 0.0)? * t)?.affine(1.0, 1.0)?; // 1 - x/3 · t
        let t = (x.affine(-0.5, 0.0)? * t)?.affine(1.0, 1.0)?; // 1 - x/2 · t
        (&x * t)?
    };
    let direct = x.neg()?.exp()?.neg()?.affine(1.0, 1.0)?;
    let small = x.lt(SERIES_BELOW)?;
    let one_minus_exp = small.where_cond(&series, &direct)?;
    Ok(one_minus_exp.log()?.neg()?)
}

/// Checks that `a` and `y` are `[B, H, W]` f32 tensors of one shape; returns (B, H·W).
fn check_maps(a: &Tensor, y: &Tensor) -> Result<(usize, usize)> {
    let (batch, height, width) = a.dims3().map_err(|_| {
        Error::invalid(
            "anomaly maps",
            format!("shape {:?} is not [B, H, W]", a.dims()),
        )
    })?;
    if y.dims() != a.dims() {
        return Err(Error::invalid(
            "anomaly masks",
            format!("shape {:?} differs from the maps' {:?}", y.dims(), a.dims()),
        ));
    }
    if a.dtype() != DType::F32 || y.dtype() != DType::F32 {
        return Err(Error::invalid(
            "anomaly maps",
            format!("{:?} maps and {:?} masks (need f32)", a.dtype(), y.dtype()),
        ));
    }
    if batch == 0 || height * width == 0 {
        return Err(Error::invalid("anomaly maps", "empty batch"));
    }
    Ok((batch, height * width))
}

/// The HSC paper's eq. 5:
/// `1/(n·m) Σ_ij [(1 - Y_ij)·A_ij + |J0|/|J1| · Y_ij · p(A_ij)]`, with |J0| and |J1| the counts
/// of normal and anomalous pixels in the whole batch. Without anomalous pixels the second term is
/// 0 (the weight's denominator is clamped to 1; every `Y_ij` is 0).
pub fn hsc_loss(a: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (batch, pixels) = check_maps(a, y)?;
    let total = (batch * pixels) as f64;
    let y = y.detach();
    let normal = ((1.0 - &y)? * a)?.sum_all()?;
    let anomalous = (&y * push(a)?)?.sum_all()?;
    let j1 = y.sum_all()?;
    // |J0| / max(|J1|, 1), kept on the device (no synchronisation in a training step).
    let weight = (j1.affine(-1.0, total)? / j1.maximum(1.0)?)?;
    Ok((normal + (anomalous * weight)?)?.affine(1.0 / total, 0.0)?)
}

/// FCDD's loss as its code computes it (the HSC paper's eq. 4):
/// `1/n Σ_i [mean_j((1 - Y_ij)·A_ij) + p(mean_j(Y_ij·A_ij))]`, where the push term is 0 for an
/// image without anomalous pixels (FCDD excludes completely nominal samples from it).
pub fn fcdd_loss(a: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (batch, _) = check_maps(a, y)?;
    let y = y.detach();
    let a = a.flatten_from(1)?;
    let y = y.flatten_from(1)?;
    let normal = ((1.0 - &y)? * &a)?.mean(1)?;
    let anomalous = push(&(&y * &a)?.mean(1)?)?;
    let has_anomaly = y.max(1)?.gt(0.0)?.to_dtype(DType::F32)?;
    Ok((normal + (anomalous * has_anomaly)?)?
        .sum_all()?
        .affine(1.0 / batch as f64, 0.0)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn series_and_direct_branches_meet_at_the_switch() {
        // Both sides of 0.1 agree with f64's -ln(-expm1(-x)).
        let xs = [0.0, 1e-30, 1e-6, 0.05, 0.0999, 0.1001, 0.5, 3.0, 20.0];
        let t = Tensor::new(&xs.map(|x| x as f32), &Device::Cpu).unwrap();
        let got = push(&t).unwrap().to_vec1::<f32>().unwrap();
        for (&x, g) in xs.iter().zip(got) {
            let x = x + PUSH_EPSILON;
            let want = -(-(-x).exp_m1()).ln();
            assert!(
                (g as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                "p({x}) = {g}, expected {want}"
            );
        }
    }
}
