//! EfficientNet-Lite0 pretrained on ImageNet, as a frozen feature extractor.
//!
//! Inference only: BatchNorm (eval mode, eps 1e-3) is folded into the preceding convolution's
//! weights and a bias at load time, 1×1 convolutions run as matrix products on `[B, C, H·W]`
//! views, and depthwise convolutions use [`depthwise_conv2d`]. Padding is TensorFlow "same".
//!
//! On CPU the feature path runs on the fast kernels instead ([`FastLite0`], channels-last, no
//! autograd graph, reused buffers); the candle ops stay the reference
//! ([`EfficientNetLite0::forward_taps_candle`]) and the path on CUDA.
//!
//! For fine-tuning ([`EfficientNetLite0::new_trainable`]) the folded weights and biases of the
//! later blocks are variables instead; the BatchNorm statistics stay folded (eval mode), as when
//! a network is fine-tuned with frozen BN.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};

use crate::error::{Error, Result};
use crate::nn::depthwise::{depthwise_conv2d, SamePad};
use crate::nn::kernels::lite0::{BlockWeights, FastLite0};
use crate::nn::kernels::{self, Activation, Kernels};
use crate::nn::FeatureExtractor;

const BN_EPS: f64 = 1e-3;
const STEM_CHANNELS: usize = 32;
const HEAD_CHANNELS: usize = 1280;
const CLASSES: usize = 1000;
/// Index of the last inverted-residual block.
pub const LAST_BLOCK: usize = 15;

#[derive(Clone, Copy)]
struct BlockSpec {
    kernel: usize,
    stride: usize,
    expansion: usize,
    in_channels: usize,
    out_channels: usize,
    /// Output stride of the network after this block.
    net_stride: usize,
}

const fn block(
    kernel: usize,
    stride: usize,
    expansion: usize,
    in_channels: usize,
    out_channels: usize,
    net_stride: usize,
) -> BlockSpec {
    BlockSpec {
        kernel,
        stride,
        expansion,
        in_channels,
        out_channels,
        net_stride,
    }
}

/// The 16 blocks of Lite0's seven stages (repeats 1, 2, 2, 3, 3, 4, 1).
const BLOCKS: [BlockSpec; LAST_BLOCK + 1] = [
    block(3, 1, 1, 32, 16, 2),
    block(3, 2, 6, 16, 24, 4),
    block(3, 1, 6, 24, 24, 4),
    block(5, 2, 6, 24, 40, 8),
    block(5, 1, 6, 40, 40, 8),
    block(3, 2, 6, 40, 80, 16),
    block(3, 1, 6, 80, 80, 16),
    block(3, 1, 6, 80, 80, 16),
    block(5, 1, 6, 80, 112, 16),
    block(5, 1, 6, 112, 112, 16),
    block(5, 1, 6, 112, 112, 16),
    block(5, 2, 6, 112, 192, 32),
    block(5, 1, 6, 192, 192, 32),
    block(5, 1, 6, 192, 192, 32),
    block(5, 1, 6, 192, 192, 32),
    block(3, 1, 6, 192, 320, 32),
];

fn block_spec(block: usize) -> Result<&'static BlockSpec> {
    BLOCKS.get(block).ok_or_else(|| {
        Error::invalid(
            "backbone block",
            format!("{block} is out of range 0..={LAST_BLOCK}"),
        )
    })
}

/// Names and shapes of the checkpoint tensors the network up to `last_block` needs (plus the
/// classifier head when `with_head`), in PyTorch's naming.
fn parameter_shapes(last_block: usize, with_head: bool) -> Result<Vec<(String, Vec<usize>)>> {
    block_spec(last_block)?;
    let mut shapes = vec![(
        "_conv_stem.weight".to_string(),
        vec![STEM_CHANNELS, 3, 3, 3],
    )];
    let bn = |shapes: &mut Vec<(String, Vec<usize>)>, prefix: &str, channels: usize| {
        for field in ["weight", "bias", "running_mean", "running_var"] {
            shapes.push((format!("{prefix}.{field}"), vec![channels]));
        }
    };
    bn(&mut shapes, "_bn0", STEM_CHANNELS);
    for (index, spec) in BLOCKS.iter().enumerate().take(last_block + 1) {
        let p = format!("_blocks.{index}");
        let hidden = spec.in_channels * spec.expansion;
        if spec.expansion != 1 {
            shapes.push((
                format!("{p}._expand_conv.weight"),
                vec![hidden, spec.in_channels, 1, 1],
            ));
            bn(&mut shapes, &format!("{p}._bn0"), hidden);
        }
        shapes.push((
            format!("{p}._depthwise_conv.weight"),
            vec![hidden, 1, spec.kernel, spec.kernel],
        ));
        bn(&mut shapes, &format!("{p}._bn1"), hidden);
        shapes.push((
            format!("{p}._project_conv.weight"),
            vec![spec.out_channels, hidden, 1, 1],
        ));
        bn(&mut shapes, &format!("{p}._bn2"), spec.out_channels);
    }
    if with_head {
        if last_block != LAST_BLOCK {
            return Err(Error::invalid(
                "backbone head",
                format!(
                    "the classifier needs all blocks (last_block {LAST_BLOCK}, not {last_block})"
                ),
            ));
        }
        let last = BLOCKS[LAST_BLOCK].out_channels;
        shapes.push(("_conv_head.weight".into(), vec![HEAD_CHANNELS, last, 1, 1]));
        bn(&mut shapes, "_bn1", HEAD_CHANNELS);
        shapes.push(("_fc.weight".into(), vec![CLASSES, HEAD_CHANNELS]));
        shapes.push(("_fc.bias".into(), vec![CLASSES]));
    }
    Ok(shapes)
}

/// Loads from a safetensors file exactly the tensors the backbone up to `last_block` needs (no
/// classifier head), so that a model file can embed them.
pub fn load_tensors(
    path: &Path,
    last_block: usize,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let weights_error = |reason: String| Error::Weights {
        path: path.to_path_buf(),
        reason,
    };
    if !path.exists() {
        return Err(weights_error(
            "not found; run models/get-weights.sh to download and convert it".into(),
        ));
    }
    let mut all = candle_core::safetensors::load(path, device)
        .map_err(|e| weights_error(format!("cannot read safetensors: {e}")))?;
    parameter_shapes(last_block, false)?
        .into_iter()
        .map(|(name, shape)| {
            let tensor = all
                .remove(&name)
                .ok_or_else(|| weights_error(format!("tensor `{name}` is missing")))?;
            if tensor.dims() != shape.as_slice() {
                return Err(weights_error(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    tensor.dims()
                )));
            }
            if tensor.dtype() != DType::F32 {
                return Err(weights_error(format!(
                    "tensor `{name}` is {:?}, expected f32",
                    tensor.dtype()
                )));
            }
            Ok((name, tensor))
        })
        .collect()
}

/// A convolution followed by eval-mode BatchNorm, folded into `weight` and a per-channel `bias`.
fn fold_batch_norm(
    vb: &VarBuilder,
    conv: &str,
    bn: &str,
    shape: &[usize],
) -> Result<(Tensor, Tensor)> {
    let channels = shape[0];
    let weight = vb.get(shape, &format!("{conv}.weight"))?;
    let gamma = vb.get(channels, &format!("{bn}.weight"))?;
    let beta = vb.get(channels, &format!("{bn}.bias"))?;
    let mean = vb.get(channels, &format!("{bn}.running_mean"))?;
    let var = vb.get(channels, &format!("{bn}.running_var"))?;
    let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
    let bias = (beta - (mean * &scale)?)?;
    let mut scale_shape = vec![1; shape.len()];
    scale_shape[0] = channels;
    let weight = weight.broadcast_mul(&scale.reshape(scale_shape)?)?;
    // Frozen: detached from any variables the builder may hold.
    Ok((weight.detach(), bias.detach()))
}

/// Where each block's folded weights come from: folded from the pretrained tensors and frozen,
/// or, from block `first_trainable` on, variables of `vars`.
struct Folder<'a> {
    vb: &'a VarBuilder<'a>,
    trainable: Option<Trainable<'a>>,
}

struct Trainable<'a> {
    first: usize,
    vars: &'a VarMap,
    /// Folded values by variable name, instead of folding the pretrained tensors.
    stored: Option<&'a HashMap<String, Tensor>>,
}

/// The variable names of a trainable block's folded convolution `kind` (`expand`, `depthwise`
/// or `project`): `blocks.{index}.{kind}.weight` and `.bias`.
fn variable_names(index: usize, kind: &str) -> [String; 2] {
    [
        format!("blocks.{index}.{kind}.weight"),
        format!("blocks.{index}.{kind}.bias"),
    ]
}

fn stored_tensor(stored: &HashMap<String, Tensor>, name: &str, dims: &[usize]) -> Result<Tensor> {
    let tensor = stored
        .get(name)
        .ok_or_else(|| Error::invalid(format!("backbone tensor `{name}`"), "missing"))?;
    if tensor.dims() != dims {
        return Err(Error::invalid(
            format!("backbone tensor `{name}`"),
            format!("shape {:?}, expected {dims:?}", tensor.dims()),
        ));
    }
    Ok(tensor.to_dtype(DType::F32)?)
}

impl Folder<'_> {
    /// Folded weight (`shape`) and bias of convolution `conv` + BatchNorm `bn` of block `index`.
    /// A trainable block's pair is a variable of the map, reused when the map already has it.
    fn get(
        &self,
        index: usize,
        kind: &str,
        (conv, bn): (&str, &str),
        shape: &[usize],
    ) -> Result<(Tensor, Tensor)> {
        let trainable = match &self.trainable {
            Some(t) if index >= t.first => t,
            _ => return fold_batch_norm(self.vb, conv, bn, shape),
        };
        let names = variable_names(index, kind);
        let mut vars = trainable
            .vars
            .data()
            .lock()
            .map_err(|_| Error::invalid("variable map", "lock poisoned"))?;
        if let (Some(w), Some(b)) = (vars.get(&names[0]), vars.get(&names[1])) {
            if w.dims() != shape || b.dims() != [shape[0]] {
                return Err(Error::invalid(
                    format!("backbone variable `{}`", names[0]),
                    format!("shape {:?}, expected {shape:?}", w.dims()),
                ));
            }
            return Ok((w.as_tensor().clone(), b.as_tensor().clone()));
        }
        let (weight, bias) = match trainable.stored {
            Some(stored) => (
                stored_tensor(stored, &names[0], shape)?,
                stored_tensor(stored, &names[1], &shape[..1])?,
            ),
            None => fold_batch_norm(self.vb, conv, bn, shape)?,
        };
        let weight = Var::from_tensor(&weight.to_device(self.vb.device())?)?;
        let bias = Var::from_tensor(&bias.to_device(self.vb.device())?)?;
        let tensors = (weight.as_tensor().clone(), bias.as_tensor().clone());
        let [w_name, b_name] = names;
        vars.insert(w_name, weight);
        vars.insert(b_name, bias);
        Ok(tensors)
    }
}

/// 1×1 convolution + folded BN (+ ReLU6), as `[C_out, C_in] × [B, C_in, H·W]`.
#[derive(Clone, Debug)]
struct Pointwise {
    weight: Tensor,
    bias: Tensor,
    relu6: bool,
}

impl Pointwise {
    /// From a folded `[out_c, in_c, 1, 1]` weight and its `[out_c]` bias (views, so that
    /// variables behind them keep their gradients and their in-place updates).
    fn from_folded((weight, bias): (Tensor, Tensor), relu6: bool) -> Result<Self> {
        let (out_c, in_c) = (weight.dim(0)?, weight.dim(1)?);
        Ok(Self {
            weight: weight.reshape((out_c, in_c))?,
            bias: bias.reshape((out_c, 1))?,
            relu6,
        })
    }

    fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            relu6: self.relu6,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_plus(x, None)
    }

    /// The convolution, plus `residual` (shaped as the output) when given.
    fn forward_plus(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (batch, in_c, height, width) = x.dims4()?;
        let out_c = self.weight.dim(0)?;
        let x = x.reshape((batch, in_c, height * width))?;
        let y = self.weight.broadcast_left(batch)?.matmul(&x)?;
        if kernels::cuda::usable(&[&y, &self.bias]) {
            // One kernel for bias, clamp and skip (candle's ops: two or three).
            let activation = match self.relu6 {
                true => Activation::Relu6,
                false => Activation::Identity,
            };
            let residual = residual
                .map(|r| r.reshape((batch, out_c, height * width)))
                .transpose()?;
            let y = kernels::cuda::bias_activation(&y, &self.bias, activation, residual.as_ref())?;
            return Ok(y.reshape((batch, out_c, height, width))?);
        }
        let y = y.broadcast_add(&self.bias)?;
        let y = if self.relu6 { y.clamp(0f32, 6f32)? } else { y };
        let y = y.reshape((batch, out_c, height, width))?;
        Ok(match residual {
            Some(residual) => (y + residual)?,
            None => y,
        })
    }
}

/// Depthwise k×k convolution + folded BN + ReLU6.
#[derive(Clone, Debug)]
struct Depthwise {
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    stride: usize,
}

impl Depthwise {
    fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            ..*self
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        let pad = SamePad::new(height, width, self.kernel, self.stride);
        if kernels::cuda::usable(&[x, &self.weight, &self.bias]) {
            let (weight, bias) = (&self.weight, &self.bias);
            return kernels::cuda::depthwise(x, weight, bias, self.stride, pad, Activation::Relu6);
        }
        let y = depthwise_conv2d(x, &self.weight, self.stride, pad)?;
        Ok(y.broadcast_add(&self.bias)?.clamp(0f32, 6f32)?)
    }
}

/// Inverted residual block without squeeze-excitation (Lite variant).
#[derive(Clone, Debug)]
struct Block {
    expand: Option<Pointwise>,
    depthwise: Depthwise,
    project: Pointwise,
    residual: bool,
}

impl Block {
    fn new(folder: &Folder, index: usize, spec: &BlockSpec) -> Result<Self> {
        let p = format!("_blocks.{index}");
        let hidden = spec.in_channels * spec.expansion;
        let expand = (spec.expansion != 1)
            .then(|| {
                let folded = folder.get(
                    index,
                    "expand",
                    (&format!("{p}._expand_conv"), &format!("{p}._bn0")),
                    &[hidden, spec.in_channels, 1, 1],
                )?;
                Pointwise::from_folded(folded, true)
            })
            .transpose()?;
        let (weight, bias) = folder.get(
            index,
            "depthwise",
            (&format!("{p}._depthwise_conv"), &format!("{p}._bn1")),
            &[hidden, 1, spec.kernel, spec.kernel],
        )?;
        let depthwise = Depthwise {
            weight,
            bias: bias.reshape((1, hidden, 1, 1))?,
            kernel: spec.kernel,
            stride: spec.stride,
        };
        let project = Pointwise::from_folded(
            folder.get(
                index,
                "project",
                (&format!("{p}._project_conv"), &format!("{p}._bn2")),
                &[spec.out_channels, hidden, 1, 1],
            )?,
            false,
        )?;
        Ok(Self {
            expand,
            depthwise,
            project,
            residual: spec.stride == 1 && spec.in_channels == spec.out_channels,
        })
    }

    fn detached(&self) -> Self {
        Self {
            expand: self.expand.as_ref().map(Pointwise::detached),
            depthwise: self.depthwise.detached(),
            project: self.project.detached(),
            residual: self.residual,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = match &self.expand {
            Some(expand) => expand.forward(x)?,
            None => x.clone(),
        };
        let residual = self.residual.then_some(x);
        self.project
            .forward_plus(&self.depthwise.forward(&hidden)?, residual)
    }
}

#[derive(Clone, Debug)]
struct Head {
    conv: Pointwise,
    fc_weight: Tensor,
    fc_bias: Tensor,
}

/// The cells of a feature map along one input axis: cell `i` is centred on input pixel
/// `offset + jump·i`, for `i < cells`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CellGrid {
    pub cells: usize,
    pub offset: usize,
    pub jump: usize,
}

/// EfficientNet-Lite0 truncated after `last_block`, optionally with its ImageNet classifier.
#[derive(Clone, Debug)]
pub struct EfficientNetLite0 {
    /// Stem weights for RGB input and, summed over the input channels, for grey input (a grey
    /// image replicated to RGB gives the same result without the copy).
    stem_rgb: Tensor,
    stem_grey: Tensor,
    stem_bias: Tensor,
    blocks: Vec<Block>,
    head: Option<Head>,
    /// The same network on the fast CPU kernels (CPU only).
    fast: Option<Arc<FastLite0>>,
}

/// The deepest of `taps`, checked against the network's last block.
pub(crate) fn deepest_tap(taps: &[usize], last_block: usize) -> Result<usize> {
    let deepest = *taps
        .iter()
        .max()
        .ok_or_else(|| Error::invalid("backbone taps", "no block was requested"))?;
    if deepest > last_block {
        return Err(Error::invalid(
            "backbone taps",
            format!("block {deepest} requested but the network stops at block {last_block}"),
        ));
    }
    Ok(deepest)
}

impl EfficientNetLite0 {
    /// Builds the network from PyTorch-named weights (`_conv_stem.weight`, `_blocks.N....`).
    /// `with_head` needs `last_block == 15` and the `_conv_head`, `_bn1` and `_fc` tensors.
    pub fn new(vb: VarBuilder, last_block: usize, with_head: bool) -> Result<Self> {
        let mut net = Self::build(&vb, last_block, with_head, None)?;
        if vb.device().is_cpu() {
            net.fast = Some(Arc::new(net.fast_engine(Kernels::detect())?));
        }
        Ok(net)
    }

    /// The network up to `last_block` for fine-tuning: blocks `first_trainable..=last_block` hold
    /// their folded weights and biases as variables of `vars` (named `blocks.{i}.{expand |
    /// depthwise | project}.{weight | bias}`, weights in PyTorch's `[out, in, k, k]` shape, BN
    /// statistics folded in, as in eval mode); the stem and earlier blocks stay frozen and detached.
    ///
    /// The variables start from the folded pretrained tensors of `vb`, or, with `stored`, from
    /// the values stored under their names (then `vb` needs only the frozen part's tensors); a
    /// variable `vars` already holds is reused. There is no built-in fast engine (its weights would
    /// go stale as training updates the variables): [`EfficientNetLite0::forward_taps`] runs
    /// candle's ops and records the graph; for fast inference take a snapshot of the current
    /// values with [`EfficientNetLite0::fast_engine`].
    pub fn new_trainable(
        vb: VarBuilder,
        last_block: usize,
        first_trainable: usize,
        vars: &VarMap,
        stored: Option<&HashMap<String, Tensor>>,
    ) -> Result<Self> {
        if first_trainable > last_block {
            return Err(Error::invalid(
                "backbone first trainable block",
                format!("{first_trainable} is past the last block {last_block}"),
            ));
        }
        let trainable = Trainable {
            first: first_trainable,
            vars,
            stored,
        };
        Self::build(&vb, last_block, false, Some(trainable))
    }

    /// The same network on detached views of its tensors: it records no graph, and sees every
    /// in-place update of the variables behind them (`Var::set`, as the optimisers do), as
    /// [`crate::nn::init::detached`] does for a variable map. No built-in fast engine either.
    pub fn detached(&self) -> Self {
        Self {
            stem_rgb: self.stem_rgb.detach(),
            stem_grey: self.stem_grey.detach(),
            stem_bias: self.stem_bias.detach(),
            blocks: self.blocks.iter().map(Block::detached).collect(),
            head: self.head.as_ref().map(|head| Head {
                conv: head.conv.detached(),
                fc_weight: head.fc_weight.detach(),
                fc_bias: head.fc_bias.detach(),
            }),
            fast: None,
        }
    }

    fn build(
        vb: &VarBuilder,
        last_block: usize,
        with_head: bool,
        trainable: Option<Trainable>,
    ) -> Result<Self> {
        // Validates `last_block` and the head/last_block combination before any lookup.
        parameter_shapes(last_block, with_head)?;
        let (stem_rgb, stem_bias) =
            fold_batch_norm(vb, "_conv_stem", "_bn0", &[STEM_CHANNELS, 3, 3, 3])?;
        let stem_grey = stem_rgb.sum_keepdim(1)?;
        let folder = Folder { vb, trainable };
        let blocks = BLOCKS[..=last_block]
            .iter()
            .enumerate()
            .map(|(index, spec)| Block::new(&folder, index, spec))
            .collect::<Result<Vec<_>>>()?;
        let head = if with_head {
            let in_c = BLOCKS[LAST_BLOCK].out_channels;
            let folded = fold_batch_norm(vb, "_conv_head", "_bn1", &[HEAD_CHANNELS, in_c, 1, 1])?;
            Some(Head {
                conv: Pointwise::from_folded(folded, true)?,
                fc_weight: vb.get((CLASSES, HEAD_CHANNELS), "_fc.weight")?.detach(),
                fc_bias: vb.get(CLASSES, "_fc.bias")?.detach(),
            })
        } else {
            None
        };
        Ok(Self {
            stem_rgb,
            stem_grey,
            stem_bias: stem_bias.reshape((1, STEM_CHANNELS, 1, 1))?,
            blocks,
            head,
            fast: None,
        })
    }

    /// This network's folded weights, as they are now, on the fast CPU kernels of instruction set
    /// `kernels` (a snapshot: later updates of trainable weights do not reach it).
    pub fn fast_engine(&self, kernels: Kernels) -> Result<FastLite0> {
        let values = crate::nn::init::f32_values;
        let pair = |p: &Pointwise| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((values(&p.weight)?, values(&p.bias)?))
        };
        let blocks = self
            .blocks
            .iter()
            .zip(BLOCKS)
            .map(|(block, spec)| {
                Ok(BlockWeights {
                    kernel: spec.kernel,
                    stride: spec.stride,
                    in_c: spec.in_channels,
                    hidden: spec.in_channels * spec.expansion,
                    out_c: spec.out_channels,
                    expand: block.expand.as_ref().map(pair).transpose()?,
                    depthwise: (
                        values(&block.depthwise.weight)?,
                        values(&block.depthwise.bias)?,
                    ),
                    project: pair(&block.project)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FastLite0::new(
            kernels,
            (&values(&self.stem_rgb)?, &values(&self.stem_bias)?),
            blocks,
        ))
    }

    /// Channels of the feature map after `block`.
    pub fn block_channels(block: usize) -> Result<usize> {
        Ok(block_spec(block)?.out_channels)
    }

    /// Output stride of the feature map after `block` (input size / feature size, rounded up).
    pub fn block_stride(block: usize) -> Result<usize> {
        Ok(block_spec(block)?.net_stride)
    }

    /// Receptive field, in input pixels, of a cell of the map after `block`: 3 for the stem, and
    /// each depthwise `k`×`k` convolution adds `(k - 1)` times the stride before it (67 after
    /// block 4, the stride-8 stage).
    pub fn receptive_field(block: usize) -> Result<usize> {
        block_spec(block)?;
        let (mut field, mut jump) = (3, 2);
        for spec in &BLOCKS[..=block] {
            field += (spec.kernel - 1) * jump;
            jump *= spec.stride;
        }
        Ok(field)
    }

    /// Where the cells of the map after `block` sit along an input axis of `size` pixels.
    ///
    /// A cell's receptive centre is the centre of its window, traced back through every strided
    /// layer (the stem and the stride-2 depthwise convolutions; 1×1 and stride-1 layers keep
    /// centres). Under TensorFlow "same" padding a stride-2 layer on an even input pads one pixel
    /// less before than after, which moves the centres by one of its input cells: for 224 pixels
    /// after block 4, cell `i` is centred on pixel `7 + 8i` (1 + 2 + 4); an odd input size at a
    /// stage pads symmetrically and adds nothing there.
    pub fn cell_grid(size: usize, block: usize) -> Result<CellGrid> {
        block_spec(block)?;
        if size == 0 {
            return Err(Error::invalid("backbone input", "an axis of 0 pixels"));
        }
        let (mut offset, mut jump, mut cells) = (0usize, 1usize, size);
        let layers =
            std::iter::once((3, 2)).chain(BLOCKS[..=block].iter().map(|s| (s.kernel, s.stride)));
        for (kernel, stride) in layers {
            let before = SamePad::new(cells, cells, kernel, stride).top;
            // The window of output 0 starts `before` cells ahead of input 0 (never past its
            // centre: "same" padding adds at most half a window before).
            let shift = ((kernel - 1) / 2).checked_sub(before).ok_or_else(|| {
                Error::invalid("backbone geometry", "padding beyond half a window")
            })?;
            offset += jump * shift;
            jump *= stride;
            cells = cells.div_ceil(stride);
        }
        Ok(CellGrid {
            cells,
            offset,
            jump,
        })
    }

    /// Multiply-accumulates of the features up to `last_block` for one `height`×`width` image
    /// (every convolution; BN is folded, activations are free).
    pub fn macs(height: usize, width: usize, last_block: usize) -> Result<usize> {
        block_spec(last_block)?;
        let (mut h, mut w) = (height.div_ceil(2), width.div_ceil(2));
        let mut macs = h * w * STEM_CHANNELS * 3 * 9;
        for spec in &BLOCKS[..=last_block] {
            let hidden = spec.in_channels * spec.expansion;
            if spec.expansion != 1 {
                macs += h * w * spec.in_channels * hidden;
            }
            (h, w) = (h.div_ceil(spec.stride), w.div_ceil(spec.stride));
            macs += h * w * hidden * (spec.kernel * spec.kernel + spec.out_channels);
        }
        Ok(macs)
    }

    /// The last block this instance has.
    pub fn last_block(&self) -> usize {
        self.blocks.len() - 1
    }

    /// Runs `x` (`[B, 1 | 3, H, W]`, values in 0..=1) and returns the feature maps after each
    /// block in `taps`, in the order given: on the fast kernels when `x` is on the CPU.
    pub fn forward_taps(&self, x: &Tensor, taps: &[usize]) -> Result<Vec<Tensor>> {
        match &self.fast {
            Some(fast) if x.device().is_cpu() => {
                let dims: [usize; 4] = x.dims().try_into().map_err(|_| {
                    Error::invalid(
                        "backbone input",
                        format!("shape {:?} is not [B, 1 or 3, H, W]", x.dims()),
                    )
                })?;
                crate::nn::with_cpu_f32(x, |values| fast.forward_taps(values, dims, taps))?
                    .into_iter()
                    .map(|map| Ok(Tensor::from_vec(map.data, map.dims.to_vec(), x.device())?))
                    .collect()
            }
            _ => self.forward_taps_candle(x, taps),
        }
    }

    /// [`EfficientNetLite0::forward_taps`] on candle's ops (the reference, and the CUDA path).
    pub fn forward_taps_candle(&self, x: &Tensor, taps: &[usize]) -> Result<Vec<Tensor>> {
        let deepest = deepest_tap(taps, self.last_block())?;
        let mut x = self.stem(x)?;
        let mut outputs: Vec<Option<Tensor>> = vec![None; taps.len()];
        for (index, block) in self.blocks[..=deepest].iter().enumerate() {
            x = block.forward(&x)?;
            for (slot, _) in taps.iter().enumerate().filter(|(_, &tap)| tap == index) {
                outputs[slot] = Some(x.clone());
            }
        }
        outputs
            .into_iter()
            .map(|t| t.ok_or_else(|| Error::invalid("backbone taps", "a tap was not reached")))
            .collect()
    }

    /// The blocks `first..=last_block()` on candle's ops from `features`, the output of block
    /// `first − 1`: the trainable part of a network whose frozen front ran elsewhere (on the fast
    /// kernels). Returns the output of the last block.
    pub fn forward_from(&self, features: &Tensor, first: usize) -> Result<Tensor> {
        if first == 0 || first > self.last_block() {
            return Err(Error::invalid(
                "backbone block",
                format!(
                    "cannot start at block {first} (1..={} for a cut after block {})",
                    self.last_block(),
                    self.last_block()
                ),
            ));
        }
        let mut x = features.clone();
        for block in &self.blocks[first..] {
            x = block.forward(&x)?;
        }
        Ok(x)
    }

    /// ImageNet logits `[B, 1000]` (apply a softmax for probabilities).
    pub fn classify(&self, x: &Tensor) -> Result<Tensor> {
        let head = self.head.as_ref().ok_or_else(|| {
            Error::invalid(
                "backbone head",
                "this network was built without its classifier",
            )
        })?;
        let mut x = self.stem(x)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let pooled = head.conv.forward(&x)?.flatten_from(2)?.mean(D::Minus1)?;
        Ok(pooled
            .matmul(&head.fc_weight.t()?)?
            .broadcast_add(&head.fc_bias)?)
    }

    fn stem(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let weight = match *dims {
            [_, 1, h, w] if h > 0 && w > 0 => &self.stem_grey,
            [_, 3, h, w] if h > 0 && w > 0 => &self.stem_rgb,
            _ => {
                return Err(Error::invalid(
                    "backbone input",
                    format!("shape {dims:?} is not [B, 1 or 3, H, W]"),
                ))
            }
        };
        let (height, width) = (dims[2], dims[3]);
        let pad = SamePad::new(height, width, 3, 2);
        let x = x
            .to_dtype(DType::F32)?
            .affine(2.0, -1.0)? // (x - 0.5) / 0.5
            .pad_with_zeros(2, pad.top, pad.bottom)?
            .pad_with_zeros(3, pad.left, pad.right)?;
        let y = x.conv2d(weight, 0, 2, 1, 1)?;
        Ok(y.broadcast_add(&self.stem_bias)?.clamp(0f32, 6f32)?)
    }
}

/// The backbone as a [`FeatureExtractor`]: the maps after several blocks, resized (bilinear) to
/// the finest one's resolution and concatenated on channels.
#[derive(Clone, Debug)]
pub struct Lite0Features {
    net: EfficientNetLite0,
    taps: Vec<usize>,
    out_channels: usize,
    stride: usize,
}

impl Lite0Features {
    /// `tensors` as returned by [`load_tensors`] for at least the deepest tap.
    pub fn new(
        tensors: &HashMap<String, Tensor>,
        taps: Vec<usize>,
        device: &Device,
    ) -> Result<Self> {
        let deepest = *taps
            .iter()
            .max()
            .ok_or_else(|| Error::invalid("backbone taps", "no block was requested"))?;
        let mut out_channels = 0;
        let mut stride = usize::MAX;
        for &tap in &taps {
            out_channels += EfficientNetLite0::block_channels(tap)?;
            stride = stride.min(EfficientNetLite0::block_stride(tap)?);
        }
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, device);
        let net = EfficientNetLite0::new(vb, deepest, false)?;
        Ok(Self {
            net,
            taps,
            out_channels,
            stride,
        })
    }

    pub fn taps(&self) -> &[usize] {
        &self.taps
    }
}

impl Lite0Features {
    /// The tapped maps, resized to the finest one and concatenated on channels.
    fn concatenated(maps: Vec<Tensor>) -> Result<Tensor> {
        if maps.len() == 1 {
            return Ok(maps[0].clone());
        }
        // The finest map is the largest one; coarser ones are resized to it.
        let mut sizes = Vec::with_capacity(maps.len());
        for map in &maps {
            let (_, _, height, width) = map.dims4()?;
            sizes.push((height, width));
        }
        let (height, width) = sizes.iter().copied().max().unwrap_or_default();
        let resized = maps
            .iter()
            .zip(&sizes)
            .map(|(map, &size)| {
                if size == (height, width) {
                    Ok(map.clone())
                } else {
                    map.upsample_bilinear2d(height, width, false)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&resized, 1)?)
    }
}

impl FeatureExtractor for Lite0Features {
    fn extract(&self, images: &Tensor) -> Result<Tensor> {
        Self::concatenated(self.net.forward_taps(images, &self.taps)?)
    }

    fn extract_reference(&self, images: &Tensor) -> Result<Tensor> {
        Self::concatenated(self.net.forward_taps_candle(images, &self.taps)?)
    }

    fn out_channels(&self) -> usize {
        self.out_channels
    }

    fn stride(&self) -> usize {
        self.stride
    }
}
