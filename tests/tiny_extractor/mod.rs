//! A stand-in for the backbone in NF-BMR tests: a frozen 3×3 stride-2 convolution with tanh.
use candle_core::Tensor;
use vigil::nn::FeatureExtractor;
use vigil::Result;

pub struct TinyExtractor {
    /// `[features, in_channels, 3, 3]`.
    pub weight: Tensor,
    /// Scale before the tanh: how far the features spread into its non-linear range.
    pub gain: f64,
}

impl FeatureExtractor for TinyExtractor {
    fn extract(&self, images: &Tensor) -> Result<Tensor> {
        let centred = (images - 0.5)?;
        Ok((centred.conv2d(&self.weight, 1, 2, 1, 1)? * self.gain)?.tanh()?)
    }
    fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }
    fn stride(&self) -> usize {
        2
    }
}
