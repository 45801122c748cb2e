//! NDP-Net's inference on the fast CPU kernels, channels-last: every convolution (BatchNorm folded,
//! ReLU fused), the max-pools, the nearest upsampling and concatenations as plain loops, and the
//! RBFRM patch attention as two GEMMs on the same kernels (similarities to the reference's unit
//! patches, then the softmax-weighted sum of its patches). A snapshot of the weights, built by the
//! networks' `fast()`; [`super::NdpNet`] drops it when training changes them.
use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::nn::kernels::maps::Maps;
use crate::nn::kernels::{ASource, Activation, ConvGeom, Epilogue, Kernels, PackedB};

/// A convolution with its bias (BatchNorm folded in) and activation, "same" by edge padding
/// (see [`super::model::pad_edges`]).
pub(super) struct FastLayer {
    pub packed: PackedB,
    pub kernel: usize,
    pub activation: Activation,
}

/// `x` padded by `pad` on every side with its edge pixels repeated.
fn pad_edges(x: &Maps, pad: usize) -> Maps {
    let (h, w, c) = (x.height + 2 * pad, x.width + 2 * pad, x.channels);
    let mut y = Maps::zeros(x.batch, h, w, c);
    for b in 0..x.batch {
        for oy in 0..h {
            let sy = oy.saturating_sub(pad).min(x.height - 1);
            for ox in 0..w {
                let sx = ox.saturating_sub(pad).min(x.width - 1);
                let src = ((b * x.height + sy) * x.width + sx) * c;
                let dst = ((b * h + oy) * w + ox) * c;
                y.data[dst..dst + c].copy_from_slice(&x.data[src..src + c]);
            }
        }
    }
    y
}

impl FastLayer {
    fn forward(&self, k: Kernels, x: &Maps) -> Result<Maps> {
        let in_c = self.packed.k() / (self.kernel * self.kernel);
        if x.channels != in_c {
            return Err(Error::invalid(
                "fast NDP-Net layer",
                format!("{} channels into a {in_c}-channel convolution", x.channels),
            ));
        }
        let pad = self.kernel / 2;
        let padded = if pad > 0 {
            Some(pad_edges(x, pad))
        } else {
            None
        };
        let input = padded.as_ref().unwrap_or(x);
        let geom = ConvGeom {
            batch: x.batch,
            height: input.height,
            width: input.width,
            in_c,
            kernel_h: self.kernel,
            kernel_w: self.kernel,
            stride: 1,
            pad_top: 0,
            pad_left: 0,
            out_h: x.height,
            out_w: x.width,
        };
        let mut y = Maps::zeros(x.batch, x.height, x.width, self.packed.n());
        let epilogue = Epilogue {
            activation: self.activation,
            residual: None,
        };
        k.conv2d(&input.data, geom, &self.packed, epilogue, &mut y.data)?;
        Ok(y)
    }
}

fn layers(k: Kernels, stack: &[FastLayer], x: Maps) -> Result<Maps> {
    let mut y = x;
    for layer in stack {
        y = layer.forward(k, &y)?;
    }
    Ok(y)
}

/// 2×2 max-pool with stride 2 (sides are even: checked at construction).
fn max_pool2(x: &Maps) -> Maps {
    let (h, w, c) = (x.height / 2, x.width / 2, x.channels);
    let mut y = Maps::zeros(x.batch, h, w, c);
    let row = x.width * c;
    for b in 0..x.batch {
        let src = &x.data[b * x.height * row..(b + 1) * x.height * row];
        for oy in 0..h {
            for ox in 0..w {
                let out = &mut y.data[((b * h + oy) * w + ox) * c..][..c];
                let at =
                    |dy: usize, dx: usize| &src[(2 * oy + dy) * row + (2 * ox + dx) * c..][..c];
                let (p, q, r, s) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
                for ch in 0..c {
                    out[ch] = p[ch].max(q[ch]).max(r[ch]).max(s[ch]);
                }
            }
        }
    }
    y
}

/// Nearest-neighbour ×2 upsampling.
fn upsample2(x: &Maps) -> Maps {
    let (h, w, c) = (2 * x.height, 2 * x.width, x.channels);
    let mut y = Maps::zeros(x.batch, h, w, c);
    for b in 0..x.batch {
        for oy in 0..h {
            for ox in 0..w {
                let src = ((b * x.height + oy / 2) * x.width + ox / 2) * c;
                let dst = ((b * h + oy) * w + ox) * c;
                y.data[dst..dst + c].copy_from_slice(&x.data[src..src + c]);
            }
        }
    }
    y
}

/// `[a, b]` concatenated along channels.
fn concat(a: &Maps, b: &Maps) -> Maps {
    let mut data = Vec::with_capacity(a.data.len() + b.data.len());
    for (pa, pb) in a
        .data
        .chunks_exact(a.channels)
        .zip(b.data.chunks_exact(b.channels))
    {
        data.extend_from_slice(pa);
        data.extend_from_slice(pb);
    }
    Maps {
        data,
        channels: a.channels + b.channels,
        ..*a
    }
}

pub(super) struct FastEncoder {
    pub stages: Vec<Vec<FastLayer>>,
}

impl FastEncoder {
    /// The features of the first `upto` stages.
    pub fn forward(&self, k: Kernels, x: Maps, upto: usize) -> Result<Vec<Maps>> {
        let mut out: Vec<Maps> = Vec::with_capacity(upto);
        let mut first = Some(x);
        for stage in self.stages.iter().take(upto) {
            let input = match (first.take(), out.last()) {
                (Some(x), _) => x,
                (None, Some(previous)) => max_pool2(previous),
                (None, None) => unreachable!("the first stage takes the input"),
            };
            out.push(layers(k, stage, input)?);
        }
        Ok(out)
    }
}

/// The FFM of one stage: compression (`ConvBn`), the `maps` attention maps in one convolution
/// (channel `i·C + c` is map `i`'s channel `c`), softmax across the maps, weighted sum.
pub(super) struct FastFfm {
    pub compress: FastLayer,
    pub attention: FastLayer,
    pub maps: usize,
}

impl FastFfm {
    fn forward(&self, k: Kernels, f: &Maps, repaired: &[Maps]) -> Result<Maps> {
        let mut fused = f.clone();
        for r in repaired {
            fused
                .data
                .iter_mut()
                .zip(&r.data)
                .for_each(|(a, b)| *a += b);
        }
        let logits = self
            .attention
            .forward(k, &self.compress.forward(k, &fused)?)?;
        let (c, n) = (f.channels, self.maps);
        let inputs: Vec<&Maps> = std::iter::once(f).chain(repaired).collect();
        let mut out = Maps::zeros(f.batch, f.height, f.width, c);
        let mut weights = vec![0.0f32; n];
        for (p, (dst, a)) in out
            .data
            .chunks_exact_mut(c)
            .zip(logits.data.chunks_exact(n * c))
            .enumerate()
        {
            for (ch, d) in dst.iter_mut().enumerate() {
                let top = (0..n)
                    .map(|i| a[i * c + ch])
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0.0;
                for (i, w) in weights.iter_mut().enumerate() {
                    *w = (a[i * c + ch] - top).exp();
                    total += *w;
                }
                *d = weights
                    .iter()
                    .zip(&inputs)
                    .map(|(w, m)| w * m.data[p * c + ch])
                    .sum::<f32>()
                    / total;
            }
        }
        Ok(out)
    }
}

/// One RBFRM patch size on the reference's features of one stage: the unit patches as a GEMM
/// operand for the similarities, the raw patches for the weighted sum. Patches are flattened
/// `(ky, kx, c)`, the channels-last order.
pub(super) struct FastReference {
    unit: PackedB,
    raw: PackedB,
    patches: usize,
    k: usize,
}

/// The K×K patches of image `b` of `x` as rows `[N, K·K·C]`.
fn gather_patches(x: &Maps, b: usize, k: usize, out: &mut Vec<f32>) {
    let (h, w, c) = (x.height, x.width, x.channels);
    out.clear();
    for py in 0..h / k {
        for px in 0..w / k {
            for ky in 0..k {
                let start = ((b * h + py * k + ky) * w + px * k) * c;
                out.extend_from_slice(&x.data[start..start + k * c]);
            }
        }
    }
}

fn normalise_rows(rows: &mut [f32], d: usize) {
    for row in rows.chunks_exact_mut(d) {
        let norm = (row.iter().map(|v| v * v).sum::<f32>() + 1e-12).sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
}

impl FastReference {
    /// From the reference's features of one stage (a batch of one).
    pub fn new(reference: &Maps, k: usize) -> Result<Self> {
        if reference.batch != 1
            || !reference.height.is_multiple_of(k)
            || !reference.width.is_multiple_of(k)
        {
            return Err(Error::invalid(
                "RBFRM reference",
                format!(
                    "{} images of {}x{} for {k}x{k} patches",
                    reference.batch, reference.height, reference.width
                ),
            ));
        }
        let d = k * k * reference.channels;
        let mut raw = Vec::new();
        gather_patches(reference, 0, k, &mut raw);
        let patches = raw.len() / d;
        let mut unit = raw.clone();
        normalise_rows(&mut unit, d);
        let zeros = vec![0.0; patches.max(d)];
        Ok(FastReference {
            unit: PackedB::from_out_in(&unit, patches, d, &zeros[..patches]),
            raw: PackedB::new(patches, d, |j, i| raw[j * d + i], &zeros[..d]),
            patches,
            k,
        })
    }

    /// The repaired map of `x` (eqs. 3–5 with temperature `scale`).
    fn repair(&self, kernels: Kernels, x: &Maps, scale: f32) -> Result<Maps> {
        let (k, c) = (self.k, x.channels);
        let d = k * k * c;
        let (ph, pw) = (x.height / k, x.width / k);
        let n = ph * pw;
        let mut out = Maps::zeros(x.batch, x.height, x.width, c);
        let mut rows = Vec::with_capacity(n * d);
        let mut similarity = vec![0.0f32; n * self.patches];
        let mut repaired = vec![0.0f32; n * d];
        let plain = Epilogue {
            activation: Activation::Identity,
            residual: None,
        };
        for b in 0..x.batch {
            gather_patches(x, b, k, &mut rows);
            normalise_rows(&mut rows, d);
            kernels.gemm(
                ASource::Matrix {
                    data: &rows,
                    lda: d,
                },
                &self.unit,
                plain,
                &mut similarity,
            )?;
            for row in similarity.chunks_exact_mut(self.patches) {
                let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0.0;
                row.iter_mut().for_each(|s| {
                    *s = ((*s - top) * scale).exp();
                    total += *s;
                });
                row.iter_mut().for_each(|s| *s /= total);
            }
            kernels.gemm(
                ASource::Matrix {
                    data: &similarity,
                    lda: self.patches,
                },
                &self.raw,
                plain,
                &mut repaired,
            )?;
            for (p, patch) in repaired.chunks_exact(d).enumerate() {
                let (py, px) = (p / pw, p % pw);
                for ky in 0..k {
                    let start = ((b * x.height + py * k + ky) * x.width + px * k) * c;
                    out.data[start..start + k * c].copy_from_slice(&patch[ky * k * c..][..k * c]);
                }
            }
        }
        Ok(out)
    }
}

pub(super) struct FastDecoder {
    /// Per level, deepest first: the layer after the upsampling, then the two after the skip.
    pub levels: Vec<[FastLayer; 3]>,
    pub out: FastLayer,
}

impl FastDecoder {
    fn forward(&self, k: Kernels, deep: [&Maps; 3]) -> Result<Maps> {
        let [f3, f4, f5] = deep;
        let skips = [Some(f4), Some(f3), None, None];
        let mut y = f5.clone();
        for (level, skip) in self.levels.iter().zip(skips) {
            let up = level[0].forward(k, &upsample2(&y))?;
            let joined = match skip {
                Some(skip) => concat(&up, skip),
                None => up,
            };
            y = level[2].forward(k, &level[1].forward(k, &joined)?)?;
        }
        self.out.forward(k, &y)
    }
}

pub(super) struct FastDsm {
    pub convs: [FastLayer; 2],
    pub logit: FastLayer,
}

impl FastDsm {
    /// `[B, h, w, 1]` logits.
    fn forward(&self, k: Kernels, input: &Maps, recon: &Maps) -> Result<Maps> {
        let y = self.convs[1].forward(k, &self.convs[0].forward(k, &concat(input, recon))?)?;
        self.logit.forward(k, &y)
    }
}

/// RBAM of one stage: the FFM and one reference per patch size.
pub(super) struct FastRbam {
    pub ffm: FastFfm,
    pub references: Vec<FastReference>,
}

/// The whole network on the fast kernels.
pub(super) struct FastNdpNet {
    pub encoder: FastEncoder,
    /// Stages 3, 4, 5 (1-based), when RBAM is on.
    pub rbam: Option<Vec<FastRbam>>,
    pub decoder: FastDecoder,
    /// DSM1..3, when the map comes from MSDSM.
    pub dsm: Option<Vec<FastDsm>>,
    pub attention_scale: f32,
    pub kernels: Kernels,
}

/// What one pass gives: the reconstruction and, with MSDSM, the three scales' probabilities.
pub(super) struct FastOutput {
    pub recon: Maps,
    pub probabilities: Option<[Maps; 3]>,
}

impl FastNdpNet {
    /// One pass over `[B, C, H, W]` images; `lap` is called after each stage (encoder, RBAM,
    /// decoder, MSDSM).
    pub fn forward(
        &self,
        images: &Tensor,
        lap: &mut dyn FnMut(&'static str) -> Result<()>,
    ) -> Result<FastOutput> {
        let k = self.kernels;
        let x = Maps::from_nchw(images)?;
        let features = self.encoder.forward(k, x.clone(), super::config::STAGES)?;
        lap("encoder")?;
        let deep: Vec<Maps> = match &self.rbam {
            Some(rbam) => features[2..]
                .iter()
                .zip(rbam)
                .map(|(f, stage)| {
                    let repaired = stage
                        .references
                        .iter()
                        .map(|r| r.repair(k, f, self.attention_scale))
                        .collect::<Result<Vec<_>>>()?;
                    stage.ffm.forward(k, f, &repaired)
                })
                .collect::<Result<_>>()?,
            None => features[2..].iter().map(Maps::clone).collect(),
        };
        lap("RBAM")?;
        let recon = self.decoder.forward(k, [&deep[0], &deep[1], &deep[2]])?;
        lap("decoder")?;
        let probabilities = match &self.dsm {
            Some(dsm) => {
                let again = self.encoder.forward(k, recon.clone(), 3)?;
                let mut scales = Vec::with_capacity(3);
                for ((input, re), net) in features.iter().zip(&again).zip(dsm) {
                    let mut logits = net.forward(k, input, re)?;
                    logits
                        .data
                        .iter_mut()
                        .for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()));
                    scales.push(logits);
                }
                let [a, b, c]: [Maps; 3] = scales
                    .try_into()
                    .map_err(|_| Error::invalid("MSDSM", "three scales expected"))?;
                Some([a, b, c])
            }
            None => None,
        };
        Ok(FastOutput {
            recon,
            probabilities,
        })
    }
}
