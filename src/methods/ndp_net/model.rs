//! NDP-Net's convolutional networks: the five-stage encoder, the feature fusion module (FFM) of
//! RBAM, the decoder and the three segmentation sub-networks of MSDSM. Every layer is a 3×3 (FFM:
//! m×m) convolution followed by BatchNorm and ReLU, as DRAEM's networks are (the paper gives no
//! layer list); each has a snapshot on the fast CPU kernels with BatchNorm folded in.
use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use super::config::{NdpNetConfig, STAGES};
use super::fast::{FastDecoder, FastDsm, FastEncoder, FastFfm, FastLayer};
use crate::error::{Error, Result};
use crate::nn::conv::{Conv, ConvGeometry};
use crate::nn::init::f32_values;
use crate::nn::kernels::{pack_conv_weight, Activation};
use crate::nn::norm::{BatchNorm2d, Builders};

/// A stride-1 convolution without zero padding: [`pad_edges`] pads its input first.
fn valid(kernel: usize) -> ConvGeometry {
    ConvGeometry {
        kernel,
        stride: 1,
        padding: 0,
    }
}

/// Pads `[B, C, H, W]` by `pad` on every side, repeating the edge pixels. Every convolution
/// here is "same" by this padding rather than zeros (vigil's choice; the paper does not say):
/// with zero padding the segmentation heads learnt to fire on a band along the border, whose
/// features and reconstruction differ from the interior's (on the synthetic product at 64², a
/// band of about 10 px held the highest scores of defect-free parts).
pub fn pad_edges(x: &Tensor, pad: usize) -> candle_core::Result<Tensor> {
    if pad == 0 {
        return Ok(x.clone());
    }
    x.pad_with_same(2, pad, pad)?.pad_with_same(3, pad, pad)
}

/// He initialisation (fan-in, ReLU gain) of the convolutions before a BatchNorm.
///
/// DRAEM draws them from N(0, 0.02): their outputs then have a variance around 10⁻⁴ while the
/// running variance starts at 1 and falls by 10% a step, so for the first hundreds of steps the
/// running statistics normalise ~100× too little. A DRAEM run of 700 epochs never notices; a CPU
/// schedule of a few hundred steps froze an encoder whose inference-mode features were almost 0
/// (measured on the synthetic product: mean 0.007 against ~0.4 with the batch's statistics).
const HE: Init = Init::Kaiming {
    dist: candle_nn::init::NormalOrUniform::Normal,
    fan: candle_nn::init::FanInOut::FanIn,
    non_linearity: candle_nn::init::NonLinearity::ReLU,
};

/// `conv k×k (same) → BatchNorm → ReLU`: [`HE`] convolution weights, BatchNorm weights N(1, 0.02)
/// (DRAEM's `weights_init`).
pub struct ConvBn {
    conv: Conv,
    norm: BatchNorm2d,
}

impl ConvBn {
    fn new(b: &Builders, in_c: usize, out_c: usize, kernel: usize) -> Result<Self> {
        Ok(ConvBn {
            conv: Conv::with_init(b.params.pp("conv"), in_c, out_c, valid(kernel), HE)?,
            norm: b.norm(out_c)?,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let pad = self.conv.geometry().kernel / 2;
        self.norm
            .forward_fused(&self.conv.forward_fused(&pad_edges(x, pad)?)?, train, true)
    }

    fn fast(&self) -> Result<FastLayer> {
        let (scale, shift) = self.norm.folded()?;
        fast_layer(&self.conv, &scale, &shift, Activation::Relu)
    }
}

/// `conv k×k (same)` with a bias and no normalisation: the layers that end a network. Weights
/// start small (DRAEM's N(0, 0.02)), so the FFM's attention starts even, the image near 0 and the
/// logits at their prior.
pub struct BiasConv {
    conv: Conv,
    bias: Tensor,
    out_c: usize,
}

impl BiasConv {
    fn new(vb: VarBuilder, in_c: usize, out_c: usize, kernel: usize, bias: f64) -> Result<Self> {
        Ok(BiasConv {
            conv: Conv::new(vb.pp("conv"), in_c, out_c, valid(kernel))?,
            bias: vb.get_with_hints(out_c, "bias", Init::Const(bias))?,
            out_c,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let pad = self.conv.geometry().kernel / 2;
        self.conv
            .forward_fused(&pad_edges(x, pad)?)?
            .broadcast_add(&self.bias.reshape((1, self.out_c, 1, 1))?)
    }

    fn fast(&self) -> Result<FastLayer> {
        let scale = vec![1.0; self.out_c];
        fast_layer(
            &self.conv,
            &scale,
            &f32_values(&self.bias)?,
            Activation::Identity,
        )
    }
}

/// A convolution with a per-output `scale` folded into its weights and `shift` as its bias.
fn fast_layer(
    conv: &Conv,
    scale: &[f32],
    shift: &[f32],
    activation: Activation,
) -> Result<FastLayer> {
    let (out, depth) = conv.weight().dims2()?;
    let kernel = conv.geometry().kernel;
    let in_c = depth / (kernel * kernel);
    let mut w = f32_values(conv.weight())?;
    for (row, s) in w.chunks_exact_mut(depth).zip(scale) {
        row.iter_mut().for_each(|v| *v *= s);
    }
    Ok(FastLayer {
        packed: pack_conv_weight(&w, out, in_c, kernel, kernel, shift),
        kernel,
        activation,
    })
}

fn sequence(layers: &[ConvBn], x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
    let mut y = x.clone();
    for layer in layers {
        y = layer.forward(&y, train)?;
    }
    Ok(y)
}

/// Nearest-neighbour ×2 upsampling as a broadcast (its backward is a sum; candle's bilinear
/// upsampling has no backward).
pub fn upsample2(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
}

/// Five stages of two `ConvBn` each, a 2×2 max-pool before every stage but the first (DRAEM's
/// encoder): channels `width · (1, 2, 4, 8, 8)`, strides 1, 2, 4, 8, 16.
pub struct Encoder {
    stages: Vec<[ConvBn; 2]>,
}

impl Encoder {
    pub fn new(b: &Builders, cfg: &NdpNetConfig, channels: usize) -> Result<Self> {
        let stages = (0..STAGES)
            .map(|s| {
                let in_c = if s == 0 {
                    channels
                } else {
                    cfg.stage_channels(s - 1)
                };
                let out_c = cfg.stage_channels(s);
                let stage = b.pp(format!("stage{s}"));
                Ok([
                    ConvBn::new(&stage.pp("conv0"), in_c, out_c, 3)?,
                    ConvBn::new(&stage.pp("conv1"), out_c, out_c, 3)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Encoder { stages })
    }

    /// The features of the first `upto` stages.
    pub fn forward(&self, x: &Tensor, train: bool, upto: usize) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(upto);
        let mut y = x.clone();
        for (s, stage) in self.stages.iter().take(upto).enumerate() {
            if s > 0 {
                y = y.max_pool2d(2)?;
            }
            y = sequence(stage, &y, train)?;
            out.push(y.clone());
        }
        Ok(out)
    }

    pub(super) fn fast(&self) -> Result<FastEncoder> {
        let stages = self
            .stages
            .iter()
            .map(|stage| stage.iter().map(ConvBn::fast).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        Ok(FastEncoder { stages })
    }
}

/// RBAM's feature fusion module for one encoder stage of `C` channels and `n − 1` repaired maps:
/// `F_U = F + Σ F_rep`, an m×m `ConvBn` to `ffm_channels` (BatchNorm and ReLU as SKNet's fuse
/// step, which the paper follows), one m×m convolution giving the `n` attention maps of `C`
/// channels (the paper's `n` convolutions, run as one), softmax across the `n` maps per position
/// and channel, and `Σ Ā ⊙ F`.
pub struct Ffm {
    compress: ConvBn,
    attention: BiasConv,
    channels: usize,
    maps: usize,
}

impl Ffm {
    pub fn new(b: &Builders, cfg: &NdpNetConfig, channels: usize) -> Result<Self> {
        let maps = 1 + cfg.patch_sizes.len();
        let m = cfg.ffm_kernel;
        Ok(Ffm {
            compress: ConvBn::new(&b.pp("compress"), channels, cfg.ffm_channels, m)?,
            attention: BiasConv::new(
                b.params.pp("attention"),
                cfg.ffm_channels,
                maps * channels,
                m,
                0.0,
            )?,
            channels,
            maps,
        })
    }

    /// `[B, n, C, H, W]` attention over `[features, repaired...]`; sums to 1 across dimension 1.
    pub fn attention(&self, features: &Tensor, repaired: &[Tensor], train: bool) -> Result<Tensor> {
        if repaired.len() + 1 != self.maps {
            return Err(Error::invalid(
                "feature fusion",
                format!("{} repaired maps for {} inputs", repaired.len(), self.maps),
            ));
        }
        let mut fused = features.clone();
        for r in repaired {
            fused = (fused + r)?;
        }
        let (b, _, h, w) = features.dims4()?;
        let logits = self
            .attention
            .forward(&self.compress.forward(&fused, train)?)?
            .reshape((b, self.maps, self.channels, h, w))?;
        // A softmax of exp and sum (candle's fused softmax has no gradient), max-subtracted.
        let top = logits.max_keepdim(1)?.detach();
        let e = logits.broadcast_sub(&top)?.exp()?;
        Ok(e.broadcast_div(&e.sum_keepdim(1)?)?)
    }

    pub fn forward(&self, features: &Tensor, repaired: &[Tensor], train: bool) -> Result<Tensor> {
        let attention = self.attention(features, repaired, train)?;
        let inputs: Vec<&Tensor> = std::iter::once(features).chain(repaired).collect();
        let stacked = Tensor::stack(&inputs, 1)?;
        Ok((attention * stacked)?.sum(1)?)
    }

    pub(super) fn fast(&self) -> Result<FastFfm> {
        Ok(FastFfm {
            compress: self.compress.fast()?,
            attention: self.attention.fast()?,
            maps: self.maps,
        })
    }
}

/// One decoder level: ×2 upsampling, a `ConvBn`, the skip connection (if any) concatenated, and
/// two `ConvBn` (DRAEM's reconstructive decoder, with NDP-Net's skips).
struct UpStage {
    up: ConvBn,
    convs: [ConvBn; 2],
}

impl UpStage {
    fn forward(&self, x: &Tensor, skip: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let y = self.up.forward(&upsample2(x)?, train)?;
        let y = match skip {
            Some(skip) => Tensor::cat(&[&y, skip], 1)?,
            None => y,
        };
        Ok(sequence(&self.convs, &y, train)?)
    }
}

/// Reconstructs the image from the (repaired) features of the three deepest stages: the deepest
/// is its input, the two others join by skip connections at their resolutions. The first two
/// stages have no skip, so no defective detail reaches the output unrepaired; a final 3×3
/// convolution with bias gives the image (no activation, as DRAEM).
pub struct Decoder {
    stages: Vec<UpStage>,
    out: BiasConv,
}

impl Decoder {
    pub fn new(b: &Builders, cfg: &NdpNetConfig, channels: usize) -> Result<Self> {
        let c = |s| cfg.stage_channels(s);
        // (input channels, skip channels, output channels) per level, deepest first.
        let levels = [
            (c(4), c(3), c(2)),
            (c(2), c(2), c(1)),
            (c(1), 0, c(0)),
            (c(0), 0, c(0)),
        ];
        let stages = levels
            .iter()
            .enumerate()
            .map(|(i, &(in_c, skip_c, out_c))| {
                let level = b.pp(format!("up{i}"));
                Ok(UpStage {
                    up: ConvBn::new(&level.pp("up"), in_c, in_c, 3)?,
                    convs: [
                        ConvBn::new(&level.pp("conv0"), in_c + skip_c, in_c.max(out_c), 3)?,
                        ConvBn::new(&level.pp("conv1"), in_c.max(out_c), out_c, 3)?,
                    ],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Decoder {
            stages,
            out: BiasConv::new(b.params.pp("out"), c(0), channels, 3, 0.0)?,
        })
    }

    /// `deep`: the features of stages 3, 4 and 5 (1-based), repaired or not.
    pub fn forward(&self, deep: [&Tensor; 3], train: bool) -> Result<Tensor> {
        let [f3, f4, f5] = deep;
        let mut y = self.stages[0].forward(f5, Some(f4), train)?;
        y = self.stages[1].forward(&y, Some(f3), train)?;
        y = self.stages[2].forward(&y, None, train)?;
        y = self.stages[3].forward(&y, None, train)?;
        Ok(self.out.forward(&y)?)
    }

    pub(super) fn fast(&self) -> Result<FastDecoder> {
        let levels = self
            .stages
            .iter()
            .map(|s| Ok([s.up.fast()?, s.convs[0].fast()?, s.convs[1].fast()?]))
            .collect::<Result<Vec<_>>>()?;
        Ok(FastDecoder {
            levels,
            out: self.out.fast()?,
        })
    }
}

/// The logit bias a segmentation head starts from: probability 0.01 of "defective" everywhere,
/// the focal loss paper's prior initialisation (Lin et al.), so the first steps need not learn
/// that defects are rare (with a bias of 0 on the synthetic product they took about 60 steps).
const PRIOR_LOGIT: f64 = -4.595_119_850_134_589; // ln(0.01 / 0.99)

/// One segmentation sub-network of MSDSM: on the concatenated features of the input and its
/// reconstruction at one encoder stage (`2C` channels), two `ConvBn` to `C` channels and a 1×1
/// convolution to one logit per position (the paper gives no layer list).
pub struct Dsm {
    convs: [ConvBn; 2],
    logit: BiasConv,
}

impl Dsm {
    pub fn new(b: &Builders, channels: usize) -> Result<Self> {
        Ok(Dsm {
            convs: [
                ConvBn::new(&b.pp("conv0"), 2 * channels, channels, 3)?,
                ConvBn::new(&b.pp("conv1"), channels, channels, 3)?,
            ],
            logit: BiasConv::new(b.params.pp("logit"), channels, 1, 1, PRIOR_LOGIT)?,
        })
    }

    /// `[B, 1, h, w]` logits of "defective".
    pub fn forward(&self, input: &Tensor, recon: &Tensor, train: bool) -> Result<Tensor> {
        let x = Tensor::cat(&[input, recon], 1)?;
        Ok(self.logit.forward(&sequence(&self.convs, &x, train)?)?)
    }

    pub(super) fn fast(&self) -> Result<FastDsm> {
        Ok(FastDsm {
            convs: [self.convs[0].fast()?, self.convs[1].fast()?],
            logit: self.logit.fast()?,
        })
    }
}

/// The sigmoid of `[B, 1, h, w]` logits as `[B, h, w]` probabilities.
pub fn probabilities(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::sigmoid(&logits.squeeze(1)?)?)
}
