//! The mapping nets between the source domain (standardised backbone features) and the target
//! domain (the flow's output): SMNN maps target → source, TMNN source → target.
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::config::Mapping;
use super::fast::{FastBmr, FastMapping};
use crate::error::Result;
use crate::nn::residual::{MatmulConv, ResidualBlock};

/// One BMR direction: a 1×1 conv raising the channels, `n` residual blocks, the shared middle
/// block, `n` more, and a 1×1 conv lowering the channels. The raising conv is linear so the
/// residual stream can carry signed features; the lowering conv is linear because both domains are
/// signed (standardised features, Gaussian latents).
struct BmrDirection {
    raise: MatmulConv,
    before: Vec<ResidualBlock>,
    after: Vec<ResidualBlock>,
    lower: MatmulConv,
}

impl BmrDirection {
    fn new(vb: VarBuilder, channels: usize, width: usize, n: usize) -> Result<Self> {
        let blocks = |name: &str| {
            (0..n)
                .map(|i| ResidualBlock::new(vb.pp(name).pp(i), width))
                .collect::<Result<Vec<_>>>()
        };
        Ok(BmrDirection {
            raise: MatmulConv::new(vb.pp("raise"), channels, width, 1, 1.0)?,
            before: blocks("before")?,
            after: blocks("after")?,
            lower: MatmulConv::new(vb.pp("lower"), width, channels, 1, 1.0)?,
        })
    }

    fn forward(&self, x: &Tensor, shared: &ResidualBlock) -> Result<Tensor> {
        let mut h = self.raise.forward(x)?;
        for block in &self.before {
            h = block.forward(&h)?;
        }
        h = shared.forward(&h)?;
        for block in &self.after {
            h = block.forward(&h)?;
        }
        Ok(self.lower.forward(&h)?)
    }
}

/// B-PFM's mapping: five 1×1 convolutions with ReLU between them (not after the last).
struct OneByOneDirection {
    convs: Vec<MatmulConv>,
}

impl OneByOneDirection {
    fn new(vb: VarBuilder, channels: usize, width: usize) -> Result<Self> {
        let widths = [channels, width, width, width, width, channels];
        let convs = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| MatmulConv::new(vb.pp(i), w[0], w[1], 1, 1.0))
            .collect::<Result<Vec<_>>>()?;
        Ok(OneByOneDirection { convs })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut h = x.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            h = conv.forward(&h)?;
            if i < last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

enum Directions {
    OneByOne {
        smnn: OneByOneDirection,
        tmnn: OneByOneDirection,
    },
    Bmr {
        smnn: Box<BmrDirection>,
        tmnn: Box<BmrDirection>,
        shared: Box<ResidualBlock>,
    },
}

/// Both directions of a mapping variant (there is none for [`Mapping::None`]).
pub struct MappingNets {
    directions: Directions,
}

impl MappingNets {
    /// Parameters under `vb`: `pfm.{smnn,tmnn}.{0..5}.*` or
    /// `bmr.{smnn,tmnn}.{raise,before.i,after.i,lower}.*` plus one `bmr.shared.*`.
    /// `None` for [`Mapping::None`].
    pub fn new(
        vb: VarBuilder,
        mapping: Mapping,
        channels: usize,
        width: usize,
        n: usize,
    ) -> Result<Option<Self>> {
        let directions = match mapping {
            Mapping::None => return Ok(None),
            Mapping::OneByOne => {
                let vb = vb.pp("pfm");
                Directions::OneByOne {
                    smnn: OneByOneDirection::new(vb.pp("smnn"), channels, width)?,
                    tmnn: OneByOneDirection::new(vb.pp("tmnn"), channels, width)?,
                }
            }
            Mapping::Bmr => {
                let vb = vb.pp("bmr");
                Directions::Bmr {
                    smnn: Box::new(BmrDirection::new(vb.pp("smnn"), channels, width, n)?),
                    tmnn: Box::new(BmrDirection::new(vb.pp("tmnn"), channels, width, n)?),
                    shared: Box::new(ResidualBlock::new(vb.pp("shared"), width)?),
                }
            }
        };
        Ok(Some(MappingNets { directions }))
    }

    /// A snapshot of the current weights for the fast CPU kernels (inference only).
    pub(super) fn fast(&self) -> Result<FastMapping> {
        let bmr = |d: &BmrDirection| -> Result<FastBmr> {
            let blocks =
                |b: &[ResidualBlock]| b.iter().map(|b| b.fast()).collect::<Result<Vec<_>>>();
            Ok(FastBmr {
                raise: d.raise.fast()?,
                before: blocks(&d.before)?,
                after: blocks(&d.after)?,
                lower: d.lower.fast()?,
            })
        };
        let convs =
            |d: &OneByOneDirection| d.convs.iter().map(|c| c.fast()).collect::<Result<Vec<_>>>();
        Ok(match &self.directions {
            Directions::OneByOne { smnn, tmnn } => FastMapping::OneByOne {
                smnn: convs(smnn)?,
                tmnn: convs(tmnn)?,
            },
            Directions::Bmr { smnn, tmnn, shared } => FastMapping::Bmr {
                smnn: Box::new(bmr(smnn)?),
                tmnn: Box::new(bmr(tmnn)?),
                shared: Box::new(shared.fast()?),
            },
        })
    }

    /// TMNN: source-domain features → predicted target-domain features.
    pub fn to_target(&self, source: &Tensor) -> Result<Tensor> {
        match &self.directions {
            Directions::OneByOne { tmnn, .. } => tmnn.forward(source),
            Directions::Bmr { tmnn, shared, .. } => tmnn.forward(source, shared),
        }
    }

    /// SMNN: target-domain features → predicted source-domain features.
    pub fn to_source(&self, target: &Tensor) -> Result<Tensor> {
        match &self.directions {
            Directions::OneByOne { smnn, .. } => smnn.forward(target),
            Directions::Bmr { smnn, shared, .. } => smnn.forward(target, shared),
        }
    }
}
