//! Typed library errors: each names the file, field or value that was wrong.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot decode image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error("dataset {path}: {reason}")]
    Dataset { path: PathBuf, reason: String },
    #[error("model file {path}: {reason}")]
    ModelFile { path: PathBuf, reason: String },
    #[error("weights file {path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("calibration {path}: {reason}")]
    Calibration { path: PathBuf, reason: String },
    #[error("config field `{field}`: {reason}")]
    Config { field: String, reason: String },
    #[error("invalid input `{what}`: {reason}")]
    Invalid { what: String, reason: String },
    #[error("device: {0}")]
    Device(String),
    #[error("tensor operation: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
