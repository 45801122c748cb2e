//! `vigil train --eval-each-epoch`: the research diagnostic scores the test split after every
//! epoch, says it uses test labels, and never changes what the training keeps: the model file is
//! the same with and without it, for every registered method. Needs the backbone weights that
//! `scripts/test.sh` installs (NF-BMR).
use std::path::{Path, PathBuf};

use candle_core::Device;
use vigil::commands::{self, EvalArgs, RunOptions, TrainArgs};
use vigil::data::dataset::DataSource;
use vigil::data::synth::{self, SynthConfig};
use vigil::methods::{MethodEntry, REGISTRY};
use vigil::model_file;

mod common;
use common::backbone;

const SIDE: usize = 32;

fn run() -> RunOptions {
    RunOptions::quiet_cpu(4)
}

fn synthetic(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    synth::generate(
        &data,
        &SynthConfig {
            height: SIDE,
            width: SIDE,
            channels: 1,
            train_good: 25,
            test_good: 6,
            test_per_defect: 2,
            seed: 5,
        },
    )
    .unwrap();
    data
}

/// The method's tiny config as `--set key=value` overrides.
fn tiny_overrides(entry: &MethodEntry) -> Vec<String> {
    (entry.tiny_config)()
        .as_object()
        .expect("a table")
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

fn train_args(entry: &MethodEntry, data: &Path, out: PathBuf) -> TrainArgs {
    TrainArgs {
        set: tiny_overrides(entry),
        height: Some(SIDE),
        width: Some(SIDE),
        validation_fraction: 0.2,
        seed: 2,
        ..TrainArgs::new(
            entry.name,
            DataSource::Mvtec { root: data.into() },
            out,
            backbone(),
            run(),
        )
    }
}

/// A model file's metadata and tensors, with the two fields that differ between any two runs
/// (the date and the training's wall time) blanked.
fn model_content(path: &Path) -> (serde_json::Value, Vec<(String, Vec<f32>)>) {
    let (meta, tensors) = model_file::load(path, &Device::Cpu).unwrap();
    let mut meta = serde_json::to_value(&meta).unwrap();
    meta["training"]["date"] = serde_json::Value::Null;
    meta["training"]["seconds"] = serde_json::Value::Null;
    let mut tensors: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|(name, t)| {
            let values = t
                .flatten_all()
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (name, values)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    (meta, tensors)
}

#[test]
fn the_diagnostic_never_changes_the_model_kept_and_says_it_uses_test_labels() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path());
    for entry in REGISTRY {
        let what = entry.name;
        let plain = dir.path().join(format!("{what}-plain.safetensors"));
        let observed = dir.path().join(format!("{what}-observed.safetensors"));
        let without = commands::train(&train_args(entry, &data, plain.clone())).unwrap();
        assert!(without.test_each_epoch.is_none());
        let with =
            commands::train_testing_each_epoch(&train_args(entry, &data, observed.clone()), &data)
                .unwrap();

        let (meta_a, tensors_a) = model_content(&plain);
        let (meta_b, tensors_b) = model_content(&observed);
        assert_eq!(meta_a, meta_b, "{what}: model metadata");
        assert_eq!(
            tensors_a.iter().map(|t| &t.0).collect::<Vec<_>>(),
            tensors_b.iter().map(|t| &t.0).collect::<Vec<_>>(),
            "{what}: tensor names"
        );
        for ((name, a), (_, b)) in tensors_a.iter().zip(&tensors_b) {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{what}: tensor {name} differs with the diagnostic"
            );
        }

        let d = with.test_each_epoch.expect("the diagnostic's summary");
        assert_eq!(
            d.images, 12,
            "{what}: 6 good and 3 × 2 defective test images"
        );
        assert!(d.epochs >= 1, "{what}");
        assert!(d.max.image_auroc >= d.kept.image_auroc && d.max.image_auroc >= d.last.image_auroc);
        let table = std::fs::read_to_string(&d.table).unwrap();
        assert!(table.contains("TEST LABELS"), "{what}: {table}");
        let rows = table.lines().filter(|l| l.starts_with("| ")).count();
        // The header row, then one row per epoch of every phase.
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.table.with_extension("json")).unwrap())
                .unwrap();
        assert_eq!(json["uses_test_labels"], true, "{what}");
        let epochs = json["epochs"].as_array().unwrap();
        // Tiny configs train at least 2 epochs in all (tests/methods.rs).
        assert!(epochs.len() >= 2, "{what}");
        assert_eq!(rows, epochs.len() + 1, "{what}: {table}");
        assert_eq!(
            epochs.iter().filter(|e| e["kept"] == true).count(),
            {
                let phases: std::collections::BTreeSet<&str> = epochs
                    .iter()
                    .map(|e| e["phase"].as_str().unwrap())
                    .collect();
                phases.len()
            },
            "{what}: one kept epoch per phase"
        );

        // The kept epoch's row is the model file's evaluation (OCR-GAN's score scaling is
        // monotone, so only ties it might create could move the AUROC).
        let report = commands::eval(&EvalArgs {
            model: observed.clone(),
            data: DataSource::Mvtec { root: data.clone() },
            out: dir.path().join(format!("{what}-report")),
            run: run(),
        })
        .unwrap();
        let eval_auroc = report.metrics.image_auroc.unwrap();
        assert!(
            (eval_auroc - d.kept.image_auroc).abs() < 1e-3,
            "{what}: kept epoch {} scored {} in the diagnostic, the model file {eval_auroc}",
            d.kept.epoch,
            d.kept.image_auroc
        );
        assert_eq!(
            report.metrics.pixel_auroc, d.kept.pixel_auroc,
            "{what}: pixel AUROC of the kept epoch"
        );
    }
}

#[test]
fn the_diagnostic_refuses_what_it_cannot_tabulate() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path());
    let entry = REGISTRY.iter().find(|m| m.name == "ocr-gan").unwrap();
    let out = dir.path().join("m.safetensors");
    let resumed = TrainArgs {
        resume: true,
        ..train_args(entry, &data, out.clone())
    };
    let err = commands::train_testing_each_epoch(&resumed, &data)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("eval-each-epoch") && err.contains("resume"),
        "{err}"
    );

    // A test split without defective images has no AUROC.
    let good_only = dir.path().join("good-only");
    std::fs::create_dir_all(good_only.join("test")).unwrap();
    for split in ["train/good", "test/good"] {
        let from = data.join(split);
        let to = good_only.join(split);
        std::fs::create_dir_all(&to).unwrap();
        for file in std::fs::read_dir(&from).unwrap() {
            let file = file.unwrap().path();
            std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
        }
    }
    let err = commands::train_testing_each_epoch(&train_args(entry, &good_only, out), &good_only)
        .unwrap_err()
        .to_string();
    assert!(err.contains("defective"), "{err}");
}
