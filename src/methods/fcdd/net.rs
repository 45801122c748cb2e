//! The FCDD network on Lite0: the pretrained trunk cut after block 4 (stride 8, 40 channels),
//! fine-tuned from a configurable block on, a 1×1 convolution with bias to one channel, and the
//! pseudo-Huber function: a low-resolution anomaly map, upsampled by FCDD's Gaussian stamps.
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};

use crate::error::{Error, Result};
use crate::methods::fcdd::loss::pseudo_huber;
use crate::methods::fcdd::upsample::{GaussianUpsampler, FCDD_SIGMA_224};
use crate::nn::backbone::EfficientNetLite0;
use crate::nn::init::{load_vars, seeded_var_builder};
use crate::nn::kernels::lite0::{FastLite0, FeatureMap};
use crate::nn::kernels::Kernels;

/// The trunk's last block: stride 8, 40 channels, a 67-pixel receptive field.
pub const CUT_BLOCK: usize = 4;

/// The first fine-tuned block by default: block 3 opens the stride-8 stage. The paper's VGG-11 is
/// frozen up to its third max-pool and cut before the fourth, so that only the stride-8 stage
/// learns; on Lite0 that stage is blocks 3 and 4.
pub const DEFAULT_FIRST_TRAINABLE: usize = 3;

const HEAD_WEIGHT: &str = "head.weight";
const HEAD_BIAS: &str = "head.bias";

/// How to build an [`FcddNet`].
#[derive(Clone, Debug, PartialEq)]
pub struct FcddNetParams {
    /// The input size the upsampler is built for.
    pub height: usize,
    pub width: usize,
    /// Blocks from this one to [`CUT_BLOCK`] are fine-tuned.
    pub first_trainable: usize,
    /// The upsampling σ at 224×224 (scaled with the shorter input side; FCDD: 12).
    pub sigma_224: f64,
    /// Seeds the head's initial weights.
    pub seed: u64,
}

impl FcddNetParams {
    /// FCDD's choices for `height`×`width` inputs.
    pub fn new(height: usize, width: usize) -> Self {
        FcddNetParams {
            height,
            width,
            first_trainable: DEFAULT_FIRST_TRAINABLE,
            sigma_224: FCDD_SIGMA_224,
            seed: 0,
        }
    }
}

/// Trunk → 1×1 head → pseudo-Huber, and the upsampler for the input size.
#[derive(Clone, Debug)]
pub struct FcddNet {
    trunk: EfficientNetLite0,
    /// `[1, 40]`.
    head_weight: Tensor,
    /// `[1]`.
    head_bias: Tensor,
    upsampler: GaussianUpsampler,
    input: (usize, usize),
    first_trainable: usize,
    /// The frozen front (stem and blocks before `first_trainable`) on the fast CPU kernels: its
    /// weights never change, and it needs no graph, so training runs it there (CPU only).
    frozen_front: Option<Arc<FastLite0>>,
}

impl FcddNet {
    /// A trainable network whose variables (the trunk's blocks `first_trainable..=4` and the head
    /// `head.weight` `[1, 40]`, `head.bias` `[1]`) go into `vars`.
    ///
    /// `pretrained`: the backbone tensors ([`crate::nn::backbone::load_tensors`] up to block 4).
    /// Without `stored`, the trunk's variables start from the folded pretrained weights and the
    /// head from PyTorch's default for a convolution (uniform in ±1/√fan_in, seeded); with
    /// `stored` (a trained model's tensors, by variable name) every variable of `vars` is set from
    /// it and `pretrained` needs only the frozen blocks.
    pub fn new(
        pretrained: &HashMap<String, Tensor>,
        vars: &VarMap,
        stored: Option<&HashMap<String, Tensor>>,
        params: &FcddNetParams,
        device: &Device,
    ) -> Result<Self> {
        if params.height == 0 || params.width == 0 {
            return Err(Error::invalid(
                "FCDD input",
                format!("{}x{} pixels", params.height, params.width),
            ));
        }
        let vb = VarBuilder::from_tensors(pretrained.clone(), DType::F32, device);
        let trunk =
            EfficientNetLite0::new_trainable(vb, CUT_BLOCK, params.first_trainable, vars, stored)?;
        let channels = EfficientNetLite0::block_channels(CUT_BLOCK)?;
        let bound = 1.0 / (channels as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let head = seeded_var_builder(vars, params.seed, DType::F32, device);
        let head_weight = head.get_with_hints((1, channels), HEAD_WEIGHT, init)?;
        let head_bias = head.get_with_hints(1, HEAD_BIAS, init)?;
        if let Some(stored) = stored {
            load_vars(vars, stored)?;
        }
        let upsampler = GaussianUpsampler::lite0(
            params.height,
            params.width,
            CUT_BLOCK,
            params.sigma_224,
            device,
        )?;
        // Built from the pretrained values before any step; only its frozen blocks are ever run.
        let frozen_front = (device.is_cpu() && params.first_trainable > 0)
            .then(|| trunk.fast_engine(Kernels::detect()).map(Arc::new))
            .transpose()?;
        Ok(Self {
            trunk,
            head_weight,
            head_bias,
            upsampler,
            input: (params.height, params.width),
            first_trainable: params.first_trainable,
            frozen_front,
        })
    }

    /// The same network on detached views of the variables: no graph, and every optimiser
    /// update (in place) shows through. The inference copy next to the training one.
    pub fn detached(&self) -> Self {
        Self {
            trunk: self.trunk.detached(),
            head_weight: self.head_weight.detach(),
            head_bias: self.head_bias.detach(),
            upsampler: self.upsampler.clone(),
            input: self.input,
            first_trainable: self.first_trainable,
            frozen_front: self.frozen_front.clone(),
        }
    }

    fn check_input(&self, images: &Tensor) -> Result<(usize, usize)> {
        let (batch, channels, height, width) = images.dims4().map_err(|_| {
            Error::invalid(
                "FCDD input",
                format!("shape {:?} is not [B, C, H, W]", images.dims()),
            )
        })?;
        if (height, width) != self.input {
            return Err(Error::invalid(
                "FCDD input",
                format!(
                    "{height}x{width} images, the network was built for {}x{}",
                    self.input.0, self.input.1
                ),
            ));
        }
        Ok((batch, channels))
    }

    /// The 1×1 head and pseudo-Huber on `[B, 40, h, w]` features: `[B, h, w]`.
    fn head(&self, features: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (batch, channels, h, w) = features.dims4()?;
        let scores = weight
            .broadcast_left(batch)?
            .matmul(&features.reshape((batch, channels, h * w))?)?
            .broadcast_add(&bias.reshape((1, 1, 1))?)?;
        pseudo_huber(&scores.reshape((batch, h, w))?)
    }

    /// The low-resolution map `[B, h, w]` of preprocessed images `[B, 1 | 3, H, W]`, on candle's
    /// ops (recording the graph when built on variables).
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.check_input(images)?;
        let features = match &self.frozen_front {
            Some(front) if images.device().is_cpu() => {
                let frozen = self.tap_fast(front, images, self.first_trainable - 1)?;
                self.trunk.forward_from(&frozen, self.first_trainable)?
            }
            _ => self.trunk.forward_taps(images, &[CUT_BLOCK])?.remove(0),
        };
        self.head(&features, &self.head_weight, &self.head_bias)
    }

    /// [`FcddNet::forward`] with the whole trunk on candle's ops (the reference of the fast
    /// frozen front).
    pub fn forward_candle(&self, images: &Tensor) -> Result<Tensor> {
        self.check_input(images)?;
        let features = self.trunk.forward_taps(images, &[CUT_BLOCK])?;
        self.head(&features[0], &self.head_weight, &self.head_bias)
    }

    /// A copy of CPU images `[B, C, H, W]` as row-major f32 values, for the fast kernels.
    fn cpu_values(&self, images: &Tensor) -> Result<(Vec<f32>, [usize; 4])> {
        let (batch, channels) = self.check_input(images)?;
        if !images.device().is_cpu() {
            return Err(Error::invalid(
                "FCDD fast path",
                "the fast kernels take CPU tensors",
            ));
        }
        let values = images
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((values, [batch, channels, self.input.0, self.input.1]))
    }

    /// The output of block `tap` on `engine`, without a graph. CPU images only.
    fn tap_fast(&self, engine: &FastLite0, images: &Tensor, tap: usize) -> Result<Tensor> {
        let (values, dims) = self.cpu_values(images)?;
        let map = tap_values(engine, &values, dims, tap)?;
        Ok(Tensor::from_vec(
            map.data,
            map.dims.to_vec(),
            images.device(),
        )?)
    }

    /// The anomaly map at the input size, `[B, H, W]`.
    pub fn upsampled(&self, images: &Tensor) -> Result<Tensor> {
        self.upsample(&self.forward(images)?)
    }

    /// The trunk (Lite0 up to [`CUT_BLOCK`]), e.g. for its intermediate maps.
    pub fn trunk(&self) -> &EfficientNetLite0 {
        &self.trunk
    }

    /// Upsamples a low-resolution map `[B, h, w]` to the input size.
    pub fn upsample(&self, low: &Tensor) -> Result<Tensor> {
        self.upsampler.forward(low)
    }

    /// The trunk as it is now on the fast CPU kernels (rebuild after training changes it).
    pub fn fast_engine(&self) -> Result<FastLite0> {
        self.trunk.fast_engine(Kernels::detect())
    }

    /// The trunk's features after [`CUT_BLOCK`] on `engine`, of `[B, C, H, W]` preprocessed
    /// values (row-major, CPU), without a graph.
    pub fn features_from_values(
        &self,
        engine: &FastLite0,
        values: &[f32],
        dims: [usize; 4],
    ) -> Result<FeatureMap> {
        tap_values(engine, values, dims, CUT_BLOCK)
    }

    /// The anomaly maps of fast-kernel features into `maps` (`[B, H, W]`, row-major): the 1×1 head
    /// and pseudo-Huber in one loop over the low-resolution cells, then the upsampling on the
    /// host ([`GaussianUpsampler::upsample_cpu`]). No graph, no tensor in between.
    pub fn maps_from_features(&self, features: &FeatureMap, maps: &mut [f32]) -> Result<()> {
        let [batch, channels, h, w] = features.dims;
        let pixels = self.input.0 * self.input.1;
        if maps.len() != batch * pixels {
            return Err(Error::invalid(
                "FCDD fast path",
                format!("{} map values for {batch} images", maps.len()),
            ));
        }
        let weight = self.head_weight.flatten_all()?.to_vec1::<f32>()?;
        let bias = self.head_bias.flatten_all()?.to_vec1::<f32>()?[0];
        let cells = h * w;
        let mut low = vec![bias; cells];
        let mut scratch = Vec::new();
        for (image, map) in features
            .data
            .chunks_exact(channels * cells)
            .zip(maps.chunks_exact_mut(pixels))
        {
            low.fill(bias);
            for (plane, &wc) in image.chunks(cells).zip(&weight) {
                low.iter_mut().zip(plane).for_each(|(o, &f)| *o += wc * f);
            }
            // Pseudo-Huber, as `loss::pseudo_huber`.
            low.iter_mut()
                .for_each(|x| *x = (*x * *x + 1.0).sqrt() - 1.0);
            self.upsampler.upsample_cpu(&low, &mut scratch, map)?;
        }
        Ok(())
    }

    /// [`FcddNet::upsampled`] with the trunk on `engine` and the head, pseudo-Huber and upsampling
    /// in plain loops ([`FcddNet::maps_from_features`]), without a graph. CPU images only.
    pub fn upsampled_fast(&self, engine: &FastLite0, images: &Tensor) -> Result<Tensor> {
        let (values, dims) = self.cpu_values(images)?;
        let features = self.features_from_values(engine, &values, dims)?;
        let mut maps = vec![0.0; dims[0] * self.input.0 * self.input.1];
        self.maps_from_features(&features, &mut maps)?;
        Ok(Tensor::from_vec(
            maps,
            (dims[0], self.input.0, self.input.1),
            images.device(),
        )?)
    }
}

/// The output of block `tap` on `engine` for row-major `[B, C, H, W]` values.
fn tap_values(
    engine: &FastLite0,
    values: &[f32],
    dims: [usize; 4],
    tap: usize,
) -> Result<FeatureMap> {
    engine
        .forward_taps(values, dims, &[tap])?
        .pop()
        .ok_or_else(|| Error::invalid("FCDD fast path", "no feature map"))
}
