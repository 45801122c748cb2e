//! OCR-GAN's inference on the fast CPU kernels, channels-last: the band generators (strided
//! convolutions, channel selection, the transposed convolutions as one 3×3 convolution of four
//! phases and a pixel shuffle) and the discriminator's latent features, with BatchNorm folded into
//! the convolutions. A snapshot of the weights, built by `Generator::fast` and
//! `Discriminator::fast`; [`super::OcrGan`] drops it when training changes them and builds the
//! next one on first use.
use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::nn::conv::Conv;
use crate::nn::init::f32_values;
use crate::nn::kernels::maps::Maps;
use crate::nn::kernels::{pack_conv_weight, Activation, ConvGeom, Epilogue, Kernels, PackedB};
use crate::nn::norm::BatchNorm2d;

/// Element-wise functions the networks put before their convolutions.
#[derive(Clone, Copy)]
enum Pointwise {
    LeakyRelu,
    Relu,
}

impl Pointwise {
    fn apply(self, v: f32) -> f32 {
        match self {
            Pointwise::LeakyRelu => v.max(0.2 * v),
            Pointwise::Relu => v.max(0.0),
        }
    }
}

/// A `kh×kw` convolution with stride and zero padding, BatchNorm (or a bias) folded in, `in`
/// channels in, `out` out.
pub(super) struct FoldedConv {
    packed: PackedB,
    kernel: (usize, usize),
    stride: usize,
    padding: usize,
}

impl FoldedConv {
    /// `weight` `[out, in·k·k]` (PyTorch's order); `affine` the per-output `(scale, shift)` of a
    /// BatchNorm after it, or `(1, bias)`.
    pub fn new(
        weight: &Tensor,
        kernel: usize,
        stride: usize,
        padding: usize,
        affine: Option<(Vec<f32>, Vec<f32>)>,
    ) -> Result<Self> {
        Self::with_kernel(weight, (kernel, kernel), stride, padding, affine)
    }

    /// The valid convolution whose `(h, w)` kernel covers a whole `h×w` map: a linear map of the
    /// map's values (the discriminator's latent projection).
    pub fn valid(weight: &Tensor, map: (usize, usize)) -> Result<Self> {
        Self::with_kernel(weight, map, 1, 0, None)
    }

    fn with_kernel(
        weight: &Tensor,
        (kernel_h, kernel_w): (usize, usize),
        stride: usize,
        padding: usize,
        affine: Option<(Vec<f32>, Vec<f32>)>,
    ) -> Result<Self> {
        let (out, depth) = weight.dims2()?;
        let taps = kernel_h * kernel_w;
        let in_c = depth / taps.max(1);
        let mut w = f32_values(weight)?;
        let (scale, shift) = affine.unwrap_or_else(|| (vec![1.0; out], vec![0.0; out]));
        if scale.len() != out || shift.len() != out || taps == 0 || in_c * taps != depth {
            return Err(Error::invalid(
                "fast OCR-GAN convolution",
                format!(
                    "weight [{out}, {depth}], {} scales for a {kernel_h}x{kernel_w} kernel",
                    scale.len()
                ),
            ));
        }
        for (row, s) in w.chunks_exact_mut(depth).zip(&scale) {
            row.iter_mut().for_each(|v| *v *= s);
        }
        Ok(FoldedConv {
            packed: pack_conv_weight(&w, out, in_c, kernel_h, kernel_w, &shift),
            kernel: (kernel_h, kernel_w),
            stride,
            padding,
        })
    }

    /// A strided convolution of the candle networks, with the BatchNorm after it (if any).
    pub fn from_conv(conv: &Conv, norm: Option<&BatchNorm2d>) -> Result<Self> {
        let g = conv.geometry();
        let affine = norm.map(BatchNorm2d::folded).transpose()?;
        Self::new(conv.weight(), g.kernel, g.stride, g.padding, affine)
    }

    fn forward(&self, k: Kernels, x: &Maps) -> Result<Maps> {
        let (kernel_h, kernel_w) = self.kernel;
        let span = |n: usize, kernel: usize| {
            (n + 2 * self.padding)
                .checked_sub(kernel)
                .map(|s| s / self.stride + 1)
        };
        let (Some(height), Some(width)) = (span(x.height, kernel_h), span(x.width, kernel_w))
        else {
            return Err(Error::invalid(
                "fast OCR-GAN convolution",
                format!(
                    "a {kernel_h}x{kernel_w} kernel does not fit a {}x{} map",
                    x.height, x.width
                ),
            ));
        };
        let geom = ConvGeom {
            batch: x.batch,
            height: x.height,
            width: x.width,
            in_c: x.channels,
            kernel_h,
            kernel_w,
            stride: self.stride,
            pad_top: self.padding,
            pad_left: self.padding,
            out_h: height,
            out_w: width,
        };
        let channels = self.packed.n();
        let mut data = vec![0.0; x.batch * height * width * channels];
        let identity = Epilogue {
            activation: Activation::Identity,
            residual: None,
        };
        k.conv2d(&x.data, geom, &self.packed, identity, &mut data)?;
        Ok(Maps {
            data,
            batch: x.batch,
            height,
            width,
            channels,
        })
    }
}

/// `[f →] conv`: an encoder stage (LeakyReLU before all but the first) or a discriminator stage.
pub(super) struct FastDown {
    pub before: bool,
    pub conv: FoldedConv,
}

/// `ReLU → transposed conv 4×4/2 (four phases of a 3×3 conv, interleaved) [→ tanh]`.
pub(super) struct FastUp {
    pub phases: FoldedConv,
    pub out_c: usize,
    pub tanh: bool,
}

/// Channel selection of one stage: `fc` `[d, C]` with its bias, one `[C, d]` matrix per branch.
pub(super) struct FastSelection {
    pub fc: Vec<f32>,
    pub fc_bias: Vec<f32>,
    pub branches: Vec<Vec<f32>>,
}

pub(super) struct FastUNet {
    pub downs: Vec<FastDown>,
    pub ups: Vec<FastUp>,
}

/// How the band encoders are mixed after each stage (the config's `channel_selection`).
pub(super) enum FastMixing {
    /// One module per stage.
    Learned(Vec<FastSelection>),
    /// Every band scaled by 1/N.
    Uniform,
    Off,
}

pub(super) struct FastGenerator {
    pub unets: Vec<FastUNet>,
    pub mixing: FastMixing,
}

/// Every stage is `conv [→ BatchNorm] → LeakyReLU`; the output, or its projection, is the latent
/// space.
pub(super) struct FastDiscriminator {
    pub stages: Vec<FoldedConv>,
    pub projection: Option<FoldedConv>,
}

fn map_in_place(x: &mut Maps, f: Pointwise) {
    x.data.iter_mut().for_each(|v| *v = f.apply(*v));
}

impl FastUp {
    fn forward(&self, k: Kernels, x: &Maps) -> Result<Maps> {
        let phased = self.phases.forward(k, x)?;
        let (h, w, c) = (x.height, x.width, self.out_c);
        let mut data = vec![0.0; x.batch * 4 * h * w * c];
        // Output pixel (2y + a, 2x + b), channel o is phase channel 4o + 2a + b of pixel (y, x).
        for (n, image) in phased.data.chunks_exact(h * w * 4 * c).enumerate() {
            let out = &mut data[n * 4 * h * w * c..(n + 1) * 4 * h * w * c];
            for y in 0..h {
                for x in 0..w {
                    let pixel = &image[(y * w + x) * 4 * c..(y * w + x + 1) * 4 * c];
                    for (o, phase) in pixel.chunks_exact(4).enumerate() {
                        for (p, &v) in phase.iter().enumerate() {
                            let (a, b) = (p / 2, p % 2);
                            let v = if self.tanh { v.tanh() } else { v };
                            out[((2 * y + a) * 2 * w + 2 * x + b) * c + o] = v;
                        }
                    }
                }
            }
        }
        Ok(Maps {
            data,
            batch: x.batch,
            height: 2 * h,
            width: 2 * w,
            channels: c,
        })
    }
}

impl FastSelection {
    /// Scales every band's channels by its attention (softmax across the bands).
    fn apply(&self, features: &mut [Maps]) {
        let (c, d) = (features[0].channels, self.fc_bias.len());
        let (batch, pixels) = (features[0].batch, features[0].pixels());
        for n in 0..batch {
            let mut pooled = vec![0.0f32; c];
            for f in features.iter() {
                for pixel in f.data[n * pixels * c..(n + 1) * pixels * c].chunks_exact(c) {
                    pooled.iter_mut().zip(pixel).for_each(|(p, &v)| *p += v);
                }
            }
            pooled.iter_mut().for_each(|p| *p /= pixels as f32);
            let z: Vec<f32> = (0..d)
                .map(|j| {
                    let row = &self.fc[j * c..(j + 1) * c];
                    self.fc_bias[j] + row.iter().zip(&pooled).map(|(w, p)| w * p).sum::<f32>()
                })
                .collect();
            let logits: Vec<Vec<f32>> = self
                .branches
                .iter()
                .map(|w| {
                    (0..c)
                        .map(|ch| {
                            w[ch * d..(ch + 1) * d]
                                .iter()
                                .zip(&z)
                                .map(|(a, b)| a * b)
                                .sum()
                        })
                        .collect()
                })
                .collect();
            // Softmax across the bands, per channel, in place of the logits; then one pass over
            // each band's pixels.
            let mut attention = logits;
            for ch in 0..c {
                let top = attention
                    .iter()
                    .map(|l| l[ch])
                    .fold(f32::NEG_INFINITY, f32::max);
                let total: f32 = attention.iter().map(|l| (l[ch] - top).exp()).sum();
                for a in attention.iter_mut() {
                    a[ch] = (a[ch] - top).exp() / total;
                }
            }
            for (f, a) in features.iter_mut().zip(&attention) {
                for pixel in f.data[n * pixels * c..(n + 1) * pixels * c].chunks_exact_mut(c) {
                    pixel.iter_mut().zip(a).for_each(|(v, &w)| *v *= w);
                }
            }
        }
    }
}

/// `[a, b]` concatenated along channels, through ReLU (the decoder's input).
fn concat_relu(a: &Maps, b: &Maps) -> Maps {
    let (ca, cb) = (a.channels, b.channels);
    let mut data = Vec::with_capacity(a.data.len() + b.data.len());
    for (pa, pb) in a.data.chunks_exact(ca).zip(b.data.chunks_exact(cb)) {
        data.extend(pa.iter().chain(pb).map(|&v| v.max(0.0)));
    }
    Maps {
        data,
        batch: a.batch,
        height: a.height,
        width: a.width,
        channels: ca + cb,
    }
}

impl FastGenerator {
    /// The summed reconstruction of the bands (`[B, C, H, W]` tensors, −1..1).
    pub fn reconstruct(&self, k: Kernels, bands: &[Tensor]) -> Result<Maps> {
        if bands.len() != self.unets.len() {
            return Err(Error::invalid(
                "generator input",
                format!("{} bands for {} generators", bands.len(), self.unets.len()),
            ));
        }
        let levels = self.unets[0].downs.len();
        let mut features = bands
            .iter()
            .map(Maps::from_nchw)
            .collect::<Result<Vec<_>>>()?;
        let mut skips: Vec<Vec<Maps>> = (0..bands.len()).map(|_| Vec::new()).collect();
        for s in 0..levels {
            for (f, unet) in features.iter_mut().zip(&self.unets) {
                let down = &unet.downs[s];
                if down.before {
                    map_in_place(f, Pointwise::LeakyRelu);
                }
                *f = down.conv.forward(k, f)?;
            }
            match &self.mixing {
                FastMixing::Learned(selection) => selection[s].apply(&mut features),
                FastMixing::Uniform => {
                    let share = 1.0 / features.len() as f32;
                    for f in features.iter_mut() {
                        f.data.iter_mut().for_each(|v| *v *= share);
                    }
                }
                FastMixing::Off => {}
            }
            for (skip, f) in skips.iter_mut().zip(&features) {
                skip.push(Maps {
                    data: f.data.clone(),
                    ..*f
                });
            }
        }
        let mut total: Option<Maps> = None;
        for (unet, skip) in self.unets.iter().zip(&mut skips) {
            let mut innermost = skip
                .pop()
                .ok_or_else(|| Error::invalid("generator", "no stages"))?;
            map_in_place(&mut innermost, Pointwise::Relu);
            let mut y = unet.ups[levels - 1].forward(k, &innermost)?;
            for s in (0..levels - 1).rev() {
                y = unet.ups[s].forward(k, &concat_relu(&y, &skip[s]))?;
            }
            total = Some(match total {
                None => y,
                Some(mut t) => {
                    t.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
                    t
                }
            });
        }
        total.ok_or_else(|| Error::invalid("generator", "no bands"))
    }
}

impl FastDiscriminator {
    /// The latent features of `x` (channels-last, flattened per image as `[B, h·w·C']`, or the
    /// projection `[B, latent_dim]`).
    pub fn latent(&self, k: Kernels, x: &Maps, device: &candle_core::Device) -> Result<Tensor> {
        let mut y = self.stages[0].forward(k, x)?;
        map_in_place(&mut y, Pointwise::LeakyRelu);
        for stage in &self.stages[1..] {
            y = stage.forward(k, &y)?;
            map_in_place(&mut y, Pointwise::LeakyRelu);
        }
        if let Some(projection) = &self.projection {
            y = projection.forward(k, &y)?;
        }
        let per_image = y.data.len() / y.batch.max(1);
        Ok(Tensor::from_vec(y.data, (y.batch, per_image), device)?)
    }
}

/// Both networks on the fast kernels.
pub(super) struct FastOcrGan {
    pub generator: FastGenerator,
    pub discriminator: FastDiscriminator,
    pub kernels: Kernels,
}
