//! OCR-GAN's networks: one Skip-GANomaly U-Net generator per frequency band, channel selection
//! (CS) between the band encoders after every encoder stage, and a DCGAN discriminator whose last
//! convolutional features (or their projection, as in the authors' code) are the latent space.
use candle_core::{Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::config::{ChannelSelectionMode, OcrGanConfig};
use super::fast::{
    FastDiscriminator, FastDown, FastGenerator, FastMixing, FastSelection, FastUNet, FastUp,
    FoldedConv,
};
use crate::error::{Error, Result};
use crate::nn::conv::{Conv, ConvGeometry, UpConv, DCGAN_INIT};
use crate::nn::init::f32_values;
use crate::nn::norm::{BatchNorm2d, Builders};

const DOWN: ConvGeometry = ConvGeometry {
    kernel: 4,
    stride: 2,
    padding: 1,
};

fn leaky_relu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.maximum(&(x * 0.2)?)
}

/// Channels of U-Net stage `s` (pix2pix: doubling up to 8× the first stage).
fn stage_channels(width: usize, s: usize) -> usize {
    width * (1usize << s.min(3))
}

/// Channels of discriminator stage `s`: capped as the U-Net's, or doubling at every stage as the
/// authors' `BasicDiscriminator` does.
pub fn disc_stage_channels(cfg: &OcrGanConfig, s: usize) -> usize {
    if cfg.disc_width_capped {
        stage_channels(cfg.disc_width, s)
    } else {
        cfg.disc_width << s
    }
}

/// `[LeakyReLU →] conv 4×4/2 [→ BatchNorm]`.
struct Down {
    activate: bool,
    conv: Conv,
    norm: Option<BatchNorm2d>,
}

impl Down {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = if self.activate {
            leaky_relu(x)?
        } else {
            x.clone()
        };
        let y = self.conv.forward(&x)?;
        match &self.norm {
            Some(norm) => norm.forward_t(&y, train),
            None => Ok(y),
        }
    }
}

/// `ReLU → transposed conv 4×4/2 → BatchNorm`, or `→ Tanh` at the output.
struct Up {
    conv: UpConv,
    norm: Option<BatchNorm2d>,
}

impl Up {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.conv.forward(&x.relu()?)?;
        match &self.norm {
            Some(norm) => norm.forward_t(&y, train),
            None => y.tanh(),
        }
    }
}

/// One band's U-Net. Its encoder runs stage by stage under [`Generator`], so that CS can mix the
/// bands between stages.
struct UNet {
    downs: Vec<Down>,
    ups: Vec<Up>,
}

impl UNet {
    fn new(b: Builders, channels: usize, width: usize, levels: usize) -> Result<Self> {
        let mut downs = Vec::with_capacity(levels);
        for s in 0..levels {
            let in_c = if s == 0 {
                channels
            } else {
                stage_channels(width, s - 1)
            };
            let out_c = stage_channels(width, s);
            let outer_or_inner = s == 0 || s == levels - 1;
            let stage = b.pp(format!("down{s}"));
            downs.push(Down {
                activate: s > 0,
                conv: Conv::new(stage.params.pp("conv"), in_c, out_c, DOWN)?,
                norm: if outer_or_inner {
                    None
                } else {
                    Some(stage.norm(out_c)?)
                },
            });
        }
        let mut ups = Vec::with_capacity(levels);
        for s in 0..levels {
            // The innermost stage takes the bottleneck alone; the others the previous stage's
            // output concatenated with the encoder's skip.
            let in_c = if s == levels - 1 {
                stage_channels(width, s)
            } else {
                2 * stage_channels(width, s)
            };
            let stage = b.pp(format!("up{s}"));
            ups.push(if s == 0 {
                Up {
                    conv: UpConv::new(stage.params.pp("conv"), in_c, channels, true)?,
                    norm: None,
                }
            } else {
                let out_c = stage_channels(width, s - 1);
                Up {
                    conv: UpConv::new(stage.params.pp("conv"), in_c, out_c, false)?,
                    norm: Some(stage.norm(out_c)?),
                }
            });
        }
        Ok(UNet { downs, ups })
    }

    /// Decodes from the encoder outputs of every stage (`skips[s]`), innermost last.
    fn decode(&self, skips: &[Tensor], train: bool) -> candle_core::Result<Tensor> {
        let levels = self.ups.len();
        let mut y = self.ups[levels - 1].forward(&skips[levels - 1], train)?;
        for s in (0..levels - 1).rev() {
            y = self.ups[s].forward(&Tensor::cat(&[&y, &skips[s]], 1)?, train)?;
        }
        Ok(y)
    }
}

/// Channel selection over the bands' features of one stage (the paper's eqs. 4–8 for N branches):
/// `z = FC(GAP(Σ F_b))`, per branch `W_b z`, softmax across branches per channel, `F_b' = a_b·F_b`.
pub struct ChannelSelection {
    fc: Linear,
    /// One `[C, d]` matrix per branch.
    branches: Vec<Tensor>,
    channels: usize,
}

impl ChannelSelection {
    pub fn new(vb: VarBuilder, channels: usize, bands: usize, hidden: usize) -> Result<Self> {
        let fc = candle_nn::linear(channels, hidden, vb.pp("fc"))?;
        let branches = (0..bands)
            .map(|b| vb.get_with_hints((channels, hidden), &format!("branch{b}"), DCGAN_INIT))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(ChannelSelection {
            fc,
            branches,
            channels,
        })
    }

    /// `[B, bands, C]` attention weights; they sum to 1 over the bands.
    pub fn attention(&self, features: &[Tensor]) -> Result<Tensor> {
        if features.len() != self.branches.len() {
            return Err(Error::invalid(
                "channel selection",
                format!(
                    "{} feature maps for {} branches",
                    features.len(),
                    self.branches.len()
                ),
            ));
        }
        let mut fused = features[0].clone();
        for f in &features[1..] {
            fused = (fused + f)?;
        }
        let pooled = fused.mean((2, 3))?;
        let z = self.fc.forward(&pooled)?;
        let logits = self
            .branches
            .iter()
            .map(|w| z.matmul(&w.t()?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // `ops::softmax` (not `softmax_last_dim`, which has no gradient).
        Ok(candle_nn::ops::softmax(&Tensor::stack(&logits, 1)?, 1)?)
    }

    pub fn forward(&self, features: &[Tensor]) -> Result<Vec<Tensor>> {
        let attention = self.attention(features)?;
        let b = attention.dim(0)?;
        features
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let a = attention
                    .narrow(1, i, 1)?
                    .reshape((b, self.channels, 1, 1))?;
                Ok(f.broadcast_mul(&a)?)
            })
            .collect()
    }
}

/// The band generators and the CS modules between their encoder stages.
pub struct Generator {
    unets: Vec<UNet>,
    mode: ChannelSelectionMode,
    /// One module per encoder stage when `mode` is learned.
    selection: Vec<ChannelSelection>,
}

impl Generator {
    pub fn new(b: Builders, cfg: &OcrGanConfig, channels: usize) -> Result<Self> {
        let unets = (0..cfg.bands)
            .map(|i| UNet::new(b.pp(format!("band{i}")), channels, cfg.width, cfg.levels))
            .collect::<Result<Vec<_>>>()?;
        let selection = if cfg.channel_selection == ChannelSelectionMode::Learned {
            (0..cfg.levels)
                .map(|s| {
                    let c = stage_channels(cfg.width, s);
                    let hidden = (c / cfg.cs_reduction).max(cfg.cs_min_hidden);
                    ChannelSelection::new(b.params.pp(format!("cs{s}")), c, cfg.bands, hidden)
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(Generator {
            unets,
            mode: cfg.channel_selection,
            selection,
        })
    }

    /// The encoders' outputs of every stage after the bands were mixed (`[band][stage]`): the
    /// skips the decoders take.
    pub fn encode(&self, bands: &[Tensor], train: bool) -> Result<Vec<Vec<Tensor>>> {
        if bands.len() != self.unets.len() {
            return Err(Error::invalid(
                "generator input",
                format!("{} bands for {} generators", bands.len(), self.unets.len()),
            ));
        }
        let levels = self.unets[0].downs.len();
        let mut skips: Vec<Vec<Tensor>> = vec![Vec::with_capacity(levels); bands.len()];
        let mut features = bands.to_vec();
        let share = 1.0 / bands.len() as f64;
        for s in 0..levels {
            for (f, unet) in features.iter_mut().zip(&self.unets) {
                *f = unet.downs[s].forward(f, train)?;
            }
            features = match self.mode {
                ChannelSelectionMode::Learned => self.selection[s].forward(&features)?,
                ChannelSelectionMode::Uniform => features
                    .iter()
                    .map(|f| f * share)
                    .collect::<candle_core::Result<_>>()?,
                ChannelSelectionMode::Off => features,
            };
            for (skip, f) in skips.iter_mut().zip(&features) {
                skip.push(f.clone());
            }
        }
        Ok(skips)
    }

    /// The reconstruction of each band, `[B, C, H, W]` in −1..1.
    pub fn forward(&self, bands: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        let skips = self.encode(bands, train)?;
        Ok(self
            .unets
            .iter()
            .zip(&skips)
            .map(|(unet, skip)| unet.decode(skip, train))
            .collect::<candle_core::Result<Vec<_>>>()?)
    }

    pub fn selection(&self) -> &[ChannelSelection] {
        &self.selection
    }

    /// This generator on the fast CPU kernels: a snapshot of its weights, BatchNorm folded.
    pub(super) fn fast(&self) -> Result<FastGenerator> {
        let unets = self
            .unets
            .iter()
            .map(|unet| {
                let downs = unet
                    .downs
                    .iter()
                    .map(|down| {
                        Ok(FastDown {
                            before: down.activate,
                            conv: FoldedConv::from_conv(&down.conv, down.norm.as_ref())?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let ups = unet
                    .ups
                    .iter()
                    .map(|up| {
                        let out_c = up.conv.out_c();
                        let affine = match (&up.norm, up.conv.bias()) {
                            (Some(norm), _) => Some(norm.folded()?),
                            (None, Some(bias)) => Some((vec![1.0; out_c], bias.to_vec1::<f32>()?)),
                            (None, None) => None,
                        };
                        // One (scale, shift) per output channel, repeated for its four phases.
                        let affine = affine.map(|(scale, shift)| {
                            let four = |v: Vec<f32>| v.iter().flat_map(|&x| [x; 4]).collect();
                            (four(scale), four(shift))
                        });
                        Ok(FastUp {
                            phases: FoldedConv::new(&up.conv.phase_kernel()?, 3, 1, 1, affine)?,
                            out_c,
                            tanh: up.norm.is_none(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(FastUNet { downs, ups })
            })
            .collect::<Result<Vec<_>>>()?;
        let values = f32_values;
        let mixing = match self.mode {
            ChannelSelectionMode::Learned => FastMixing::Learned(
                self.selection
                    .iter()
                    .map(|cs| {
                        let bias = cs.fc.bias().ok_or_else(|| {
                            Error::invalid("channel selection", "its FC has no bias")
                        })?;
                        Ok(FastSelection {
                            fc: values(cs.fc.weight())?,
                            fc_bias: values(bias)?,
                            branches: cs.branches.iter().map(values).collect::<Result<_>>()?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            ChannelSelectionMode::Uniform => FastMixing::Uniform,
            ChannelSelectionMode::Off => FastMixing::Off,
        };
        Ok(FastGenerator { unets, mixing })
    }
}

/// DCGAN discriminator: `conv 4×4/2 → LeakyReLU`, then `conv 4×4/2 → BatchNorm → LeakyReLU`
/// stages. Without a projection, those stages' last features are the latent space and a 3×3
/// convolution to one channel, averaged over positions, is the logit (DCGAN's last 4×4 valid
/// convolution assumes a square 64² input; the average accepts any size). With `latent_dim`, as
/// the authors' `BasicDiscriminator`: a valid convolution over the whole last map (its 4×4 at
/// 256²) projects the features to the latent vector, and the classifier is linear in it (its
/// 3×3 convolution on a 1×1 map uses only the centre tap).
pub struct Discriminator {
    stages: Vec<(Conv, Option<BatchNorm2d>)>,
    /// `[latent_dim, C·h·w]` in PyTorch's `(c, y, x)` order, and the map size `(h, w)` it covers.
    projection: Option<(Tensor, (usize, usize))>,
    classifier: Conv,
}

impl Discriminator {
    /// `size`: the `(height, width)` of the images it judges.
    pub fn new(
        b: Builders,
        cfg: &OcrGanConfig,
        channels: usize,
        size: (usize, usize),
    ) -> Result<Self> {
        let mut stages = Vec::with_capacity(cfg.disc_levels);
        for s in 0..cfg.disc_levels {
            let in_c = if s == 0 {
                channels
            } else {
                disc_stage_channels(cfg, s - 1)
            };
            let out_c = disc_stage_channels(cfg, s);
            let stage = b.pp(format!("stage{s}"));
            let conv = Conv::new(stage.params.pp("conv"), in_c, out_c, DOWN)?;
            let norm = if s == 0 {
                None
            } else {
                Some(stage.norm(out_c)?)
            };
            stages.push((conv, norm));
        }
        let last = disc_stage_channels(cfg, cfg.disc_levels - 1);
        let map = (size.0 >> cfg.disc_levels, size.1 >> cfg.disc_levels);
        let (projection, classifier) = if cfg.latent_dim > 0 {
            let weight = b.params.get_with_hints(
                (cfg.latent_dim, last * map.0 * map.1),
                "latent.weight",
                DCGAN_INIT,
            )?;
            let one = ConvGeometry {
                kernel: 1,
                stride: 1,
                padding: 0,
            };
            let classifier = Conv::new(b.params.pp("classifier"), cfg.latent_dim, 1, one)?;
            (Some((weight, map)), classifier)
        } else {
            let three = ConvGeometry {
                kernel: 3,
                stride: 1,
                padding: 1,
            };
            (None, Conv::new(b.params.pp("classifier"), last, 1, three)?)
        };
        Ok(Discriminator {
            stages,
            projection,
            classifier,
        })
    }

    /// The latent path on the fast CPU kernels: a snapshot of its weights, BatchNorm folded.
    pub(super) fn fast(&self) -> Result<FastDiscriminator> {
        let stages = self
            .stages
            .iter()
            .map(|(conv, norm)| FoldedConv::from_conv(conv, norm.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let projection = self
            .projection
            .as_ref()
            .map(|(weight, (h, w))| FoldedConv::valid(weight, (*h, *w)))
            .transpose()?;
        Ok(FastDiscriminator { stages, projection })
    }

    /// `(latent features [B, C', h, w] or [B, latent_dim, 1, 1], logits [B])`. `train`: the
    /// BatchNorm layers normalise with the batch's statistics and update the running ones;
    /// otherwise they use the running statistics (gradients still reach every parameter).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let mut y = x.clone();
        for (conv, norm) in &self.stages {
            y = conv.forward(&y)?;
            if let Some(norm) = norm {
                y = norm.forward_t(&y, train)?;
            }
            y = leaky_relu(&y)?;
        }
        if let Some((weight, (h, w))) = &self.projection {
            let (b, _, mh, mw) = y.dims4()?;
            if (mh, mw) != (*h, *w) {
                return Err(Error::invalid(
                    "discriminator input",
                    format!("its last map is {mh}x{mw}; the latent projection covers {h}x{w}"),
                ));
            }
            let latent = y.flatten_from(1)?.matmul(&weight.t()?)?;
            y = latent.reshape((b, weight.dim(0)?, 1, 1))?;
        }
        let logits = self
            .classifier
            .forward(&y)?
            .flatten_from(1)?
            .mean(D::Minus1)?;
        Ok((y, logits))
    }
}
