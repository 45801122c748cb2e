//! The model file: one `.safetensors` holding every weight (frozen backbone included) and, in its
//! `__metadata__`, one JSON document that says how to rebuild and feed the detector.
//!
//! Everything the station needs to score a part identically on another machine is in this file:
//! method and hyper-parameters, input size and channels, preprocessing, and the score statistics of
//! the defect-free validation images (the default scale for heatmaps and the calibration's start).
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;
use crate::data::InputSpec;
use crate::error::{Error, Result};

/// The `__metadata__` key that holds [`ModelMeta`] as JSON.
pub const METADATA_KEY: &str = "vigil";
/// The `__metadata__` key that holds the file's own checksum: sha256, hex, over the metadata JSON
/// and every tensor (name, dtype, shape, data), verified on every load.
pub const CHECKSUM_KEY: &str = "vigil_sha256";
pub const FORMAT: &str = "vigil-model";
/// 2: the file carries [`CHECKSUM_KEY`]. 3: the method's version, the backbone and the few-shot
/// images are recorded.
pub const FORMAT_VERSION: u32 = 3;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    pub format: String,
    pub format_version: u32,
    pub method: String,
    /// The method's version ([`crate::methods::MethodEntry::version`]) that wrote the file.
    pub method_version: u32,
    /// The method's hyper-parameters, parsed by the method when the model is loaded.
    pub config: serde_json::Value,
    /// The pretrained backbone, for methods that use one.
    pub backbone: Option<BackboneInfo>,
    pub input: InputSpec,
    pub preprocessing: Preprocessing,
    /// Scores of the defect-free validation images, kept out of training.
    pub validation: ScoreStats,
    pub training: TrainingInfo,
}

/// The pretrained backbone a method was built on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneInfo {
    pub architecture: String,
    /// sha256 (hex) of the pretrained weights file the training started from.
    pub weights_sha256: String,
    /// The blocks the method reads features from (taps), or the last block it keeps (cut).
    pub blocks: Vec<usize>,
    /// The first block whose weights the method fine-tunes; none when the backbone stays frozen.
    pub trained_from: Option<usize>,
}

/// A defective image a model trained on: it is left out of every evaluation of the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldImage {
    /// Relative to the data set's root, e.g. `test/crack/003.png`.
    pub path: String,
    /// sha256 (hex) of the file's bytes: recognised wherever a copy of the set lives.
    pub sha256: String,
}

/// How a camera image becomes the model's input. Fixed for this format version; recorded so that a
/// future change is detected rather than silently scoring differently.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    /// Resampling filter to the input size.
    pub resize: String,
    /// Pixel values fed to the method.
    pub range: String,
    /// How images of the other channel count are converted.
    pub channel_conversion: String,
}

impl Default for Preprocessing {
    fn default() -> Self {
        Preprocessing {
            resize: "bilinear".into(),
            range: "0..1".into(),
            channel_conversion: "rgb->grey: luma; grey->rgb: replicate".into(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScoreStats {
    pub count: usize,
    pub mean: f32,
    pub std: f32,
    pub min: f32,
    pub max: f32,
    pub p50: f32,
    pub p99: f32,
    /// The 99th percentile of anomaly-map values over the validation images: the top of the
    /// heatmap colour scale.
    pub map_p99: f32,
    /// The median anomaly-map value: the bottom of the heatmap colour scale.
    pub map_p50: f32,
}

impl ScoreStats {
    /// Statistics of image scores and of a sample of anomaly-map values.
    pub fn from_values(scores: &[f32], map_values: &mut [f32]) -> ScoreStats {
        if scores.is_empty() {
            return ScoreStats::default();
        }
        let mut sorted = scores.to_vec();
        sorted.sort_by(f32::total_cmp);
        let n = sorted.len() as f64;
        let mean = sorted.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = sorted
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        map_values.sort_by(f32::total_cmp);
        ScoreStats {
            count: sorted.len(),
            mean: mean as f32,
            std: var.sqrt() as f32,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            p50: quantile(&sorted, 0.5),
            p99: quantile(&sorted, 0.99),
            map_p50: quantile(map_values, 0.5),
            map_p99: quantile(map_values, 0.99),
        }
    }
}

/// Linear-interpolated quantile of ascending `sorted` values; 0 for an empty slice.
pub fn quantile(sorted: &[f32], q: f64) -> f32 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let frac = (pos - lo as f64) as f32;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingInfo {
    /// sha256 over the training images' names and bytes.
    pub data_fingerprint: String,
    pub train_images: usize,
    /// The defective images the model trained on (`--defect` or `--few-shot`): every evaluation
    /// of the model leaves them out.
    pub defects: Vec<HeldImage>,
    pub validation_images: usize,
    pub seed: u64,
    /// RFC 3339, UTC.
    pub date: String,
    pub vigil_version: String,
    pub device: String,
    pub seconds: f64,
}

/// Writes the model file atomically, with its checksum under [`CHECKSUM_KEY`].
pub fn save(path: &Path, meta: &ModelMeta, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let bad = |reason: String| Error::ModelFile {
        path: path.into(),
        reason,
    };
    let json =
        serde_json::to_string(meta).map_err(|e| bad(format!("cannot encode metadata: {e}")))?;
    // Digest the views of a first serialisation: the bytes hashed are exactly those written, and
    // `load` recomputes the digest the same way from the file.
    let first = serialize(
        path,
        HashMap::from([(METADATA_KEY.into(), json.clone())]),
        tensors,
    )?;
    let st = safetensors::SafeTensors::deserialize(&first)
        .map_err(|e| bad(format!("cannot read back serialised tensors: {e}")))?;
    let sum = content_sha256(&json, &st);
    let metadata = HashMap::from([
        (METADATA_KEY.to_string(), json),
        (CHECKSUM_KEY.to_string(), sum),
    ]);
    let bytes = safetensors::serialize(st.tensors(), Some(metadata))
        .map_err(|e| bad(format!("cannot serialise tensors: {e}")))?;
    write_atomic(path, &bytes)
}

/// sha256, hex, over the metadata JSON and then every tensor sorted by name: name bytes, a 0
/// byte, dtype name, each dimension as u64 LE, data length as u64 LE, the raw data.
fn content_sha256(json: &str, tensors: &safetensors::SafeTensors) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(json.as_bytes());
    let mut named = tensors.tensors();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in &named {
        hasher.update(name.as_bytes());
        hasher.update([0u8]);
        hasher.update(view.dtype().to_string().as_bytes());
        for &d in view.shape() {
            hasher.update((d as u64).to_le_bytes());
        }
        hasher.update((view.data().len() as u64).to_le_bytes());
        hasher.update(view.data());
    }
    crate::digest::hex(&hasher.finalize())
}

fn serialize(
    path: &Path,
    metadata: HashMap<String, String>,
    tensors: &HashMap<String, Tensor>,
) -> Result<Vec<u8>> {
    let mut named: Vec<(&String, &Tensor)> = tensors.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::serialize(named, Some(metadata)).map_err(|e| Error::ModelFile {
        path: path.into(),
        reason: format!("cannot serialise tensors: {e}"),
    })
}

/// Writes `tensors` with one JSON document under `key` in `__metadata__`, atomically (training
/// checkpoints; model files go through [`save`], which adds the checksum).
pub fn write_tensors(
    path: &Path,
    key: &str,
    json: String,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let bytes = serialize(path, HashMap::from([(key.to_string(), json)]), tensors)?;
    write_atomic(path, &bytes)
}

/// Reads what [`write_tensors`] wrote: the JSON document under `key` and the tensors.
pub fn read_tensors(
    path: &Path,
    key: &str,
    device: &Device,
) -> Result<(String, HashMap<String, Tensor>)> {
    let bad = |reason: String| Error::ModelFile {
        path: path.into(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("unreadable header (truncated?): {e}")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(key))
        .ok_or_else(|| bad(format!("no `{key}` entry in __metadata__")))?
        .clone();
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        bad(format!(
            "tensor data unreadable (truncated or corrupt file?): {e}"
        ))
    })?;
    Ok((json, tensors))
}

/// Reads and validates a model file's metadata, checksum and tensors.
pub fn load(path: &Path, device: &Device) -> Result<(ModelMeta, HashMap<String, Tensor>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    load_bytes(path, &bytes, device)
}

/// [`load`] of a model file's bytes already read (`path` names it in errors): what was checked is
/// exactly what was read, as a digest of the same bytes names it.
pub fn load_bytes(
    path: &Path,
    bytes: &[u8],
    device: &Device,
) -> Result<(ModelMeta, HashMap<String, Tensor>)> {
    let meta = parse_meta(path, bytes)?;
    let tensors =
        candle_core::safetensors::load_buffer(bytes, device).map_err(|e| Error::ModelFile {
            path: path.into(),
            reason: format!("tensor data unreadable (truncated or corrupt file?): {e}"),
        })?;
    Ok((meta, tensors))
}

/// Reads only the metadata (for `vigil info`, calibration checks); the checksum is verified too.
pub fn read_meta(path: &Path) -> Result<ModelMeta> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_meta(path, &bytes)
}

fn parse_meta(path: &Path, bytes: &[u8]) -> Result<ModelMeta> {
    let bad = |reason: String| Error::ModelFile {
        path: path.into(),
        reason,
    };
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a complete safetensors file (truncated?): {e}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("unreadable header: {e}")))?;
    let entry = |key: &str| header.metadata().as_ref().and_then(|m| m.get(key));
    let json = entry(METADATA_KEY).ok_or_else(|| {
        bad(format!(
            "no `{METADATA_KEY}` entry in __metadata__: not a vigil model"
        ))
    })?;
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("metadata is not JSON: {e}")))?;
    match value.get("format").and_then(|f| f.as_str()) {
        Some(FORMAT) => {}
        other => return Err(bad(format!("format is {other:?}, expected \"{FORMAT}\""))),
    }
    match value.get("format_version").and_then(|v| v.as_u64()) {
        Some(v) if v == FORMAT_VERSION as u64 => {}
        other => {
            return Err(bad(format!(
                "format_version is {other:?}; this vigil reads version {FORMAT_VERSION}"
            )))
        }
    }
    // After the version check, so that a version-1 file gets the version message.
    let stored = entry(CHECKSUM_KEY).ok_or_else(|| {
        bad(format!(
            "no `{CHECKSUM_KEY}` checksum in __metadata__: written by an older vigil; retrain the model"
        ))
    })?;
    let actual = content_sha256(json, &st);
    if *stored != actual {
        return Err(bad(format!(
            "checksum mismatch: the file records {stored}, its contents hash to {actual} \
             (corrupt or edited file)"
        )));
    }
    let meta: ModelMeta =
        serde_json::from_value(value).map_err(|e| bad(format!("metadata field: {e}")))?;
    if !(meta.input.channels == 1 || meta.input.channels == 3)
        || meta.input.height == 0
        || meta.input.width == 0
    {
        return Err(bad(format!(
            "input {:?} is not a valid image size",
            meta.input
        )));
    }
    if meta.preprocessing != Preprocessing::default() {
        return Err(bad(format!(
            "preprocessing {:?} differs from this vigil's {:?}",
            meta.preprocessing,
            Preprocessing::default()
        )));
    }
    Ok(meta)
}

/// The model tensor `name`, checked against the expected shape.
pub fn stored<'a>(
    tensors: &'a HashMap<String, Tensor>,
    name: &str,
    dims: &[usize],
) -> Result<&'a Tensor> {
    let tensor = tensors
        .get(name)
        .ok_or_else(|| Error::invalid(format!("model tensor `{name}`"), "missing"))?;
    if tensor.dims() != dims {
        return Err(Error::invalid(
            format!("model tensor `{name}`"),
            format!("shape {:?}, expected {dims:?}", tensor.dims()),
        ));
    }
    Ok(tensor)
}

/// The model tensor `name` holding one finite number.
pub fn stored_scalar(tensors: &HashMap<String, Tensor>, name: &str) -> Result<f32> {
    let t = tensors
        .get(name)
        .ok_or_else(|| Error::invalid(format!("model tensor `{name}`"), "missing"))?;
    let values = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    match values.as_slice() {
        [v] if v.is_finite() => Ok(*v),
        _ => Err(Error::invalid(
            format!("model tensor `{name}`"),
            format!("{values:?} is not one finite number"),
        )),
    }
}

/// sha256 of the file's bytes, hex: what a calibration records to stay tied to its model.
pub fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(crate::digest::sha256_hex(&bytes))
}
