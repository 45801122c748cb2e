//! vigil: unsupervised visual defect detection for production lines.
//!
//! Architecture: [`data`] (datasets, the synthetic product, anomaly synthesis) feeds [`train`],
//! which trains any [`methods::Method`] built from the [`nn`] blocks; [`metrics`] and [`report`]
//! measure it; [`model_file`] stores it and [`calibration`] sets its threshold.
pub mod atomic;
pub mod bench;
pub mod calibration;
pub mod commands;
pub mod data;
pub mod device;
pub mod digest;
pub mod error;
pub mod eval;
pub mod methods;
pub mod metrics;
pub mod model_file;
pub mod nn;
pub mod report;
pub mod rng;
pub mod runtime;
pub mod station;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
