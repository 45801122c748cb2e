//! EfficientNet-Lite0 on the fast kernels: channels-last from the stem to the taps, BN folded,
//! every activation buffer owned by the engine and reused across calls.
use std::sync::Mutex;

use super::{
    nchw_to_nhwc, nhwc_to_nchw, pack_conv_weight, pack_depthwise_weight, Activation, ASource,
    ConvGeom, DepthwiseGeom, Epilogue, Kernels, PackedB,
};
use crate::error::{Error, Result};
use crate::nn::depthwise::SamePad;

/// Folded weights of one inverted-residual block, PyTorch layouts (row-major).
pub struct BlockWeights {
    pub kernel: usize,
    pub stride: usize,
    pub in_c: usize,
    pub hidden: usize,
    pub out_c: usize,
    /// `([hidden, in], [hidden])`, absent when the expansion is 1.
    pub expand: Option<(Vec<f32>, Vec<f32>)>,
    /// `([hidden, 1, k, k], [hidden])`.
    pub depthwise: (Vec<f32>, Vec<f32>),
    /// `([out, hidden], [out])`.
    pub project: (Vec<f32>, Vec<f32>),
}

struct Block {
    kernel: usize,
    stride: usize,
    hidden: usize,
    out_c: usize,
    residual: bool,
    expand: Option<PackedB>,
    dw_weight: Vec<f32>,
    dw_bias: Vec<f32>,
    project: PackedB,
}

/// Activation buffers, grown to the largest shape seen and reused.
#[derive(Default)]
struct Workspace {
    input: Vec<f32>,
    current: Vec<f32>,
    expanded: Vec<f32>,
    filtered: Vec<f32>,
    next: Vec<f32>,
}

fn slot(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// The fast Lite0 feature extractor (inference only).
pub struct FastLite0 {
    kernels: Kernels,
    stem_rgb: PackedB,
    stem_grey: PackedB,
    stem_channels: usize,
    blocks: Vec<Block>,
    workspace: Mutex<Workspace>,
}

/// A feature map `[B, C, H, W]` (channels-first, as candle expects) from [`FastLite0::forward_taps`].
pub struct FeatureMap {
    pub data: Vec<f32>,
    pub dims: [usize; 4],
}

impl FastLite0 {
    /// `stem`: folded `[32, 3, 3, 3]` weight and its bias.
    pub fn new(kernels: Kernels, stem: (&[f32], &[f32]), blocks: Vec<BlockWeights>) -> Self {
        let (stem_w, stem_b) = stem;
        let stem_channels = stem_b.len();
        let grey: Vec<f32> = stem_w.chunks_exact(27).flat_map(sum_rgb).collect();
        let blocks = blocks
            .into_iter()
            .map(|b| Block {
                kernel: b.kernel,
                stride: b.stride,
                hidden: b.hidden,
                out_c: b.out_c,
                residual: b.stride == 1 && b.in_c == b.out_c,
                expand: b
                    .expand
                    .map(|(w, bias)| PackedB::from_out_in(&w, b.hidden, b.in_c, &bias)),
                dw_weight: pack_depthwise_weight(&b.depthwise.0, b.hidden, b.kernel),
                dw_bias: b.depthwise.1,
                project: PackedB::from_out_in(&b.project.0, b.out_c, b.hidden, &b.project.1),
            })
            .collect();
        Self {
            kernels,
            stem_rgb: pack_conv_weight(stem_w, stem_channels, 3, 3, 3, stem_b),
            stem_grey: pack_conv_weight(&grey, stem_channels, 1, 3, 3, stem_b),
            stem_channels,
            blocks,
            workspace: Mutex::new(Workspace::default()),
        }
    }

    pub fn last_block(&self) -> usize {
        self.blocks.len().saturating_sub(1)
    }

    /// `images` `[B, 1 | 3, H, W]` (values in 0..=1, row-major) → the maps after each block in
    /// `taps`, in the order given.
    pub fn forward_taps(
        &self,
        images: &[f32],
        dims: [usize; 4],
        taps: &[usize],
    ) -> Result<Vec<FeatureMap>> {
        let [batch, channels, height, width] = dims;
        let stem = match channels {
            1 => &self.stem_grey,
            3 => &self.stem_rgb,
            _ => {
                return Err(Error::invalid(
                    "backbone input",
                    format!("shape {dims:?} is not [B, 1 or 3, H, W]"),
                ))
            }
        };
        if batch == 0 || height == 0 || width == 0 || images.len() != dims.iter().product::<usize>() {
            return Err(Error::invalid(
                "backbone input",
                format!("{} values for shape {dims:?}", images.len()),
            ));
        }
        let deepest = *taps
            .iter()
            .max()
            .ok_or_else(|| Error::invalid("backbone taps", "no block was requested"))?;
        if deepest > self.last_block() {
            return Err(Error::invalid(
                "backbone taps",
                format!(
                    "block {deepest} requested but the network stops at block {}",
                    self.last_block()
                ),
            ));
        }
        let mut guard = self
            .workspace
            .lock()
            .map_err(|_| Error::invalid("backbone workspace", "poisoned by a panic"))?;
        let ws = &mut *guard;
        let k = self.kernels;

        // Stem: (x − 0.5) / 0.5 while converting to channels-last; zero padding after that.
        let input = slot(&mut ws.input, images.len());
        nchw_to_nhwc(images, dims, input, |v| 2.0 * v - 1.0);
        let pad = SamePad::new(height, width, 3, 2);
        let (mut h, mut w) = (height.div_ceil(2), width.div_ceil(2));
        let geom = ConvGeom {
            batch,
            height,
            width,
            in_c: channels,
            kernel_h: 3,
            kernel_w: 3,
            stride: 2,
            pad_top: pad.top,
            pad_left: pad.left,
            out_h: h,
            out_w: w,
        };
        let mut c = self.stem_channels;
        let relu6 = Epilogue {
            activation: Activation::Relu6,
            residual: None,
        };
        k.conv2d(
            input,
            geom,
            stem,
            relu6,
            slot(&mut ws.current, batch * h * w * c),
        )?;

        let mut outputs: Vec<Option<FeatureMap>> = taps.iter().map(|_| None).collect();
        for (index, block) in self.blocks[..=deepest].iter().enumerate() {
            let pixels = batch * h * w;
            let current = &ws.current[..pixels * c];
            let hidden_in: &[f32] = match &block.expand {
                Some(expand) => {
                    let out = slot(&mut ws.expanded, pixels * block.hidden);
                    k.gemm(ASource::Matrix { data: current, lda: c }, expand, relu6, out)?;
                    out
                }
                None => current,
            };
            let pad = SamePad::new(h, w, block.kernel, block.stride);
            let (oh, ow) = (h.div_ceil(block.stride), w.div_ceil(block.stride));
            let dw = DepthwiseGeom {
                batch,
                height: h,
                width: w,
                channels: block.hidden,
                kernel: block.kernel,
                stride: block.stride,
                pad_top: pad.top,
                pad_left: pad.left,
                out_h: oh,
                out_w: ow,
            };
            let filtered = slot(&mut ws.filtered, batch * oh * ow * block.hidden);
            k.depthwise(
                &dw,
                hidden_in,
                &block.dw_weight,
                &block.dw_bias,
                Activation::Relu6,
                filtered,
            )?;
            let next = slot(&mut ws.next, batch * oh * ow * block.out_c);
            let project = Epilogue {
                activation: Activation::Identity,
                residual: block.residual.then_some(current),
            };
            k.gemm(
                ASource::Matrix {
                    data: filtered,
                    lda: block.hidden,
                },
                &block.project,
                project,
                next,
            )?;
            std::mem::swap(&mut ws.current, &mut ws.next);
            (h, w, c) = (oh, ow, block.out_c);
            for (slot_index, _) in taps.iter().enumerate().filter(|(_, &t)| t == index) {
                let dims = [batch, c, h, w];
                let mut data = vec![0.0; batch * c * h * w];
                nhwc_to_nchw(&ws.current[..data.len()], dims, &mut data);
                outputs[slot_index] = Some(FeatureMap { data, dims });
            }
        }
        outputs
            .into_iter()
            .map(|t| t.ok_or_else(|| Error::invalid("backbone taps", "a tap was not reached")))
            .collect()
    }
}

/// A `[3, 3, 3]` RGB stem filter summed over its input channels (a grey image replicated to RGB).
fn sum_rgb(filter: &[f32]) -> Vec<f32> {
    (0..9)
        .map(|t| filter[t] + filter[9 + t] + filter[18 + t])
        .collect()
}

impl std::fmt::Debug for FastLite0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastLite0")
            .field("isa", &self.kernels.isa())
            .field("blocks", &self.blocks.len())
            .finish()
    }
}
