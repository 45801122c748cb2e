//! NF-BMR's training losses and per-position anomaly scores.
use candle_core::Tensor;

use super::model::MappingNets;
use crate::error::Result;

/// Squared errors of both directions, each summed over channels: `(TMNN, SMNN)`, `[B, H, W]`.
pub fn mapping_errors(
    nets: &MappingNets,
    source: &Tensor,
    target: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let to_target = nets.to_target(source)?.sub(target)?.sqr()?.sum(1)?;
    let to_source = nets.to_source(target)?.sub(source)?.sqr()?.sum(1)?;
    Ok((to_target, to_source))
}

/// The mapping phase's loss: the mean squared error of TMNN plus that of SMNN. The caller detaches
/// `target` so that the flow stays fixed.
pub fn mapping_loss(nets: &MappingNets, source: &Tensor, target: &Tensor) -> Result<Tensor> {
    let (to_target, to_source) = mapping_errors(nets, source, target)?;
    let channels = source.dim(1)? as f64;
    Ok(((to_target.mean_all()? + to_source.mean_all()?)? / channels)?)
}

/// The anomaly score of each position: both directions' squared errors summed, `[B, H, W]`.
pub fn mapping_score(nets: &MappingNets, source: &Tensor, target: &Tensor) -> Result<Tensor> {
    let (to_target, to_source) = mapping_errors(nets, source, target)?;
    Ok((to_target + to_source)?)
}
