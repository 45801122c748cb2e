//! Pretrained weights: converting the published EfficientNet-Lite0 checkpoint to safetensors.
//!
//! The only obtainable Lite0 weights are a legacy (torch < 1.6, non-zip) PyTorch pickle stream,
//! which candle's loader rejects; [`import_legacy_pth`] converts it once, in Rust, so inference only
//! ever reads safetensors.
use std::fs;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::error::{Error, Result};

mod legacy_pth;

/// What [`import_legacy_pth`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// Tensors written to the safetensors file.
    pub tensors: usize,
    /// Total number of scalars in them.
    pub parameters: usize,
    /// Entries of the checkpoint that were not written (BatchNorm step counters).
    pub skipped: Vec<String>,
    /// Hex SHA-256 of the source file, also stored in the output's metadata as `source_sha256`.
    pub source_sha256: String,
}

/// Converts a legacy PyTorch state dict (`torch.save` before 1.6) to a safetensors file, keeping
/// PyTorch's tensor names. `num_batches_tracked` counters are skipped. The output is written to a
/// temporary file next to `dst` and renamed, so `dst` is either absent, the old file or complete.
pub fn import_legacy_pth(src: &Path, dst: &Path) -> Result<ImportSummary> {
    let bytes = fs::read(src).map_err(|e| Error::io(src, e))?;
    let source_sha256 = crate::digest::sha256_hex(&bytes);
    let entries = legacy_pth::read_legacy_pth(&bytes).map_err(|reason| Error::Weights {
        path: src.to_path_buf(),
        reason,
    })?;

    let mut skipped = Vec::new();
    let mut kept = Vec::new();
    for entry in entries {
        if entry.name.ends_with("num_batches_tracked") {
            skipped.push(entry.name);
        } else if let Some(values) = entry.f32_values {
            kept.push((entry.name, entry.shape, values));
        } else {
            return Err(Error::Weights {
                path: src.to_path_buf(),
                reason: format!("tensor `{}` is not float32", entry.name),
            });
        }
    }

    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = kept
        .into_iter()
        .map(|(name, shape, values)| {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, shape, bytes)
        })
        .collect();
    let views = raw
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
                .map_err(|e| Error::Weights {
                    path: src.to_path_buf(),
                    reason: format!("tensor `{name}`: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    // A single metadata entry keeps the output byte-for-byte reproducible (the header is a map).
    let metadata = [("source_sha256".to_string(), source_sha256.clone())].into();
    let serialized = safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Weights {
        path: dst.to_path_buf(),
        reason: format!("cannot serialise: {e}"),
    })?;
    crate::atomic::write_atomic(dst, &serialized)?;

    Ok(ImportSummary {
        tensors: raw.len(),
        parameters: raw
            .iter()
            .map(|(_, shape, _)| shape.iter().product::<usize>())
            .sum(),
        skipped,
        source_sha256,
    })
}
