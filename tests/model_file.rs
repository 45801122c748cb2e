//! The model file: round trip, and truncated, mismatched, corrupt or edited files rejected with a
//! clear error.
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use vigil::data::InputSpec;
use vigil::model_file::{self, ModelMeta, Preprocessing, ScoreStats, TrainingInfo};

fn meta() -> ModelMeta {
    ModelMeta {
        format: model_file::FORMAT.into(),
        format_version: model_file::FORMAT_VERSION,
        method: "nf-bmr".into(),
        method_version: 1,
        config: serde_json::json!({ "flow_blocks": 4 }),
        backbone: None,
        input: InputSpec {
            height: 64,
            width: 48,
            channels: 1,
        },
        preprocessing: Preprocessing::default(),
        validation: ScoreStats::from_values(&[1.0, 2.0, 3.0], &mut [0.5, 0.25]),
        training: TrainingInfo {
            data_fingerprint: "f".repeat(64),
            train_images: 3,
            defects: Vec::new(),
            validation_images: 1,
            seed: 7,
            date: "2026-11-22T00:00:00Z".into(),
            vigil_version: "0.1.0".into(),
            device: "Cpu".into(),
            seconds: 1.5,
        },
    }
}

fn tensors() -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    HashMap::from([
        (
            "a.weight".to_string(),
            Tensor::arange(0f32, 12.0, &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        ),
        (
            "b.bias".to_string(),
            Tensor::new(&[1.5f32, -2.0], &dev).unwrap(),
        ),
    ])
}

#[test]
fn round_trip_keeps_metadata_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    model_file::save(&path, &meta(), &tensors()).unwrap();
    let (back, loaded) = model_file::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back, meta());
    assert_eq!(loaded.len(), 2);
    for (name, t) in tensors() {
        assert_eq!(
            loaded[&name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    assert_eq!(back.validation.count, 3);
    assert!((back.validation.p50 - 2.0).abs() < 1e-6);
    assert_eq!(model_file::file_sha256(&path).unwrap().len(), 64);
    assert_eq!(model_file::read_meta(&path).unwrap(), meta());
}

#[test]
fn truncated_file_is_rejected_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.safetensors");
    model_file::save(&path, &meta(), &tensors()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for keep in [4, 40, bytes.len() - 10] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = model_file::load(&path, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cut.safetensors"), "{err}");
        assert!(err.contains("truncated"), "{err}");
    }
}

#[test]
fn mismatched_metadata_is_rejected_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");

    let mut newer = meta();
    newer.format_version = 99;
    model_file::save(&path, &newer, &tensors()).unwrap();
    let err = model_file::load(&path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("format_version") && err.contains("99"),
        "{err}"
    );

    // Version 1 (no checksum) is refused by the version check, not as a corrupt file.
    let mut older = meta();
    older.format_version = 1;
    model_file::save(&path, &older, &tensors()).unwrap();
    let err = model_file::read_meta(&path).unwrap_err().to_string();
    assert!(
        err.contains("format_version is Some(1)")
            && err.contains(&format!("reads version {}", model_file::FORMAT_VERSION)),
        "{err}"
    );

    let mut odd = meta();
    odd.input.channels = 2;
    model_file::save(&path, &odd, &tensors()).unwrap();
    let err = model_file::read_meta(&path).unwrap_err().to_string();
    assert!(err.contains("channels: 2"), "{err}");

    let mut other = meta();
    other.preprocessing.resize = "nearest".into();
    model_file::save(&path, &other, &tensors()).unwrap();
    assert!(model_file::read_meta(&path)
        .unwrap_err()
        .to_string()
        .contains("preprocessing"));

    // A safetensors file that is not a vigil model.
    let plain = dir.path().join("plain.safetensors");
    candle_core::safetensors::save(&tensors(), &plain).unwrap();
    let err = model_file::read_meta(&plain).unwrap_err().to_string();
    assert!(
        err.contains("plain.safetensors") && err.contains("not a vigil model"),
        "{err}"
    );
}

/// The offset of `needle` in `haystack`, which must hold it exactly once.
fn find_once(haystack: &[u8], needle: &[u8]) -> usize {
    let hits: Vec<usize> = haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "{:?}", String::from_utf8_lossy(needle));
    hits[0]
}

fn assert_checksum_refused(path: &std::path::Path) {
    for err in [
        model_file::load(path, &Device::Cpu)
            .unwrap_err()
            .to_string(),
        model_file::read_meta(path).unwrap_err().to_string(),
    ] {
        assert!(
            err.contains("m.safetensors") && err.contains("checksum mismatch"),
            "{err}"
        );
        // Both digests: the recorded one and the recomputed one.
        let digests = err
            .split(|c: char| !c.is_ascii_hexdigit())
            .filter(|w| w.len() == 64)
            .count();
        assert_eq!(digests, 2, "{err}");
    }
}

#[test]
fn a_flipped_tensor_byte_is_refused_naming_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    model_file::save(&path, &meta(), &tensors()).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    // b.bias = [1.5, -2.0]: -2.0f32 is 00 00 00 c0; flip a mantissa bit, the file stays valid
    // safetensors and the value stays finite.
    let at = find_once(&bytes, &(-2.0f32).to_le_bytes());
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    assert_checksum_refused(&path);
}

#[test]
fn edited_metadata_of_the_same_length_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    model_file::save(&path, &meta(), &tensors()).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    // The JSON sits escaped inside the header: `\"seconds\":1.5` becomes 1.6.
    let at = find_once(&bytes, br#"seconds\":1.5"#);
    let digit = at + br#"seconds\":1."#.len();
    bytes[digit] = b'6';
    std::fs::write(&path, &bytes).unwrap();
    assert_checksum_refused(&path);
}

#[test]
fn a_model_file_without_checksum_is_refused_as_older() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let json = serde_json::to_string(&meta()).unwrap();
    model_file::write_tensors(&path, model_file::METADATA_KEY, json, &tensors()).unwrap();
    for err in [
        model_file::load(&path, &Device::Cpu)
            .unwrap_err()
            .to_string(),
        model_file::read_meta(&path).unwrap_err().to_string(),
    ] {
        assert!(
            err.contains("m.safetensors")
                && err.contains(model_file::CHECKSUM_KEY)
                && err.contains("older vigil"),
            "{err}"
        );
    }
}

#[test]
fn checkpoints_still_round_trip_without_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.ckpt");
    model_file::write_tensors(&path, "k", "{}".into(), &tensors()).unwrap();
    let (json, back) = model_file::read_tensors(&path, "k", &Device::Cpu).unwrap();
    assert_eq!(json, "{}");
    assert_eq!(back.len(), 2);
}
