//! Images, datasets, the synthetic product, and anomaly synthesis shared by every method.
pub mod anomaly;
pub mod dataset;
pub mod image;
pub mod synth;

pub use image::{batch_tensor, Image, InputSpec, Mask};
