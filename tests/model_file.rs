//! The model file: round trip, and truncated or mismatched files rejected with a clear error.
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use vigil::data::InputSpec;
use vigil::model_file::{self, ModelMeta, Preprocessing, ScoreStats, TrainingInfo};

fn meta() -> ModelMeta {
    ModelMeta {
        format: model_file::FORMAT.into(),
        format_version: model_file::FORMAT_VERSION,
        method: "nf-bmr".into(),
        config: serde_json::json!({ "flow_blocks": 4 }),
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
