//! Checks and conversions every method's config shares, so each error names its key the same way.
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

pub(crate) fn at_least(field: &str, value: usize, min: usize) -> Result<()> {
    if value < min {
        return Err(Error::config(field, format!("{value} is below {min}")));
    }
    Ok(())
}

pub(crate) fn finite_in(field: &str, value: f64, lo: f64, hi: f64) -> Result<()> {
    if !(value.is_finite() && value >= lo && value <= hi) {
        return Err(Error::config(
            field,
            format!("{value} is outside {lo}..={hi}"),
        ));
    }
    Ok(())
}

pub(crate) fn positive_finite(field: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        return Err(Error::config(
            field,
            format!("{value} is not a positive number"),
        ));
    }
    Ok(())
}

/// Backbone taps: at least one EfficientNet-Lite0 block, each existing, strictly increasing.
pub(crate) fn lite0_taps(field: &str, taps: &[usize]) -> Result<()> {
    if taps.is_empty() {
        return Err(Error::config(field, "needs at least one backbone block"));
    }
    if let Some(&bad) = taps.iter().find(|&&t| t > 15) {
        return Err(Error::config(
            field,
            format!("block {bad} does not exist (EfficientNet-Lite0 has blocks 0..=15)"),
        ));
    }
    if taps.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::config(
            field,
            format!("{taps:?} must be strictly increasing"),
        ));
    }
    Ok(())
}

/// A window of cells centred on a position: at least 1, odd.
pub(crate) fn centred_window(field: &str, value: usize) -> Result<()> {
    at_least(field, value, 1)?;
    if value.is_multiple_of(2) {
        return Err(Error::config(
            field,
            format!("{value} must be odd (centred on the position)"),
        ));
    }
    Ok(())
}

/// A method's config from JSON (a TOML file and `--set` overrides, or a model file's metadata).
pub(crate) fn parse<T: DeserializeOwned>(method: &str, config: serde_json::Value) -> Result<T> {
    serde_json::from_value(config)
        .map_err(|e| Error::config(format!("{method} config"), e.to_string()))
}

/// A method's config as the model file stores it.
pub(crate) fn to_json<T: Serialize>(method: &str, config: &T) -> Result<serde_json::Value> {
    serde_json::to_value(config)
        .map_err(|e| Error::config(format!("{method} config"), e.to_string()))
}
