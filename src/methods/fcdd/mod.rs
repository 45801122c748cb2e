//! FCDD (Liznerski et al. 2021, "Explainable Deep One-Class Classification") with the per-pixel
//! loss of "Adapting the Hypersphere Loss Function from Anomaly Detection to Anomaly
//! Segmentation" (the HSC paper): a fine-tuned pretrained trunk and a 1×1 convolution score each
//! cell of a low-resolution map, which Gaussian stamps upsample to the input size; training pushes
//! the scores of synthetic anomalies (confetti noise, [`crate::data::anomaly::ConfettiParams`]) up
//! and the others down.
//!
//! The building blocks: [`net`] (the network), [`loss`] (eq. 4 and eq. 5), [`upsample`] (the
//! Gaussian upsampling), [`augment`] (FCDD's augmentation and preprocessing).
pub mod augment;
pub mod loss;
pub mod net;
pub mod upsample;

pub use loss::PixelLoss;
pub use net::{FcddNet, FcddNetParams};
pub use upsample::GaussianUpsampler;
