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
