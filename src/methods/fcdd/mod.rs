//! FCDD (Liznerski et al. 2021, "Explainable Deep One-Class Classification") with the per-pixel
//! loss of "Adapting the Hypersphere Loss Function from Anomaly Detection to Anomaly
//! Segmentation" (the HSC paper).
pub mod loss;

pub use loss::PixelLoss;
