//! Helpers shared by the integration tests.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

/// The backbone weights `scripts/test.sh` installs (models/get-weights.sh).
pub fn backbone() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(vigil::commands::DEFAULT_BACKBONE);
    assert!(
        path.exists(),
        "{} is missing: run models/get-weights.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The largest absolute difference between two tensors of the same shape (f32 or f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
