//! FCDD through the commands: a tiny detector localises synthetic defects, the few-shot images
//! never reach the metrics, and the plain form trains on a defect folder.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use vigil::commands::{self, EvalArgs, RunOptions, TrainArgs};
use vigil::data::dataset::DataSource;
use vigil::data::synth::{self, SynthConfig};
use vigil::methods;
use vigil::model_file;

mod common;
use common::backbone;

fn run() -> RunOptions {
    RunOptions::quiet_cpu(8)
}

/// `key=value` overrides for FCDD: its tiny config with `extra` on top.
fn settings(extra: &[(&str, serde_json::Value)]) -> Vec<String> {
    let mut config = (methods::entry("fcdd").unwrap().tiny_config)();
    for (k, v) in extra {
        config[*k] = v.clone();
    }
    config
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

fn train_args(data: DataSource, out: &Path, set: Vec<String>, side: usize) -> TrainArgs {
    TrainArgs {
        set,
        height: Some(side),
        width: Some(side),
        seed: 2,
        ..TrainArgs::new("fcdd", data, out.to_path_buf(), backbone(), run())
    }
}

fn product(dir: &Path, side: usize, train_good: usize) -> PathBuf {
    let data = dir.join("data");
    synth::generate(
        &data,
        &SynthConfig {
            height: side,
            width: side,
            channels: 1,
            train_good,
            test_good: 10,
            test_per_defect: 6,
            seed: 4,
        },
    )
    .unwrap();
    data
}

/// Trained on confetti noise alone, FCDD finds the synthetic product's real-looking defects.
#[test]
fn a_tiny_fcdd_localises_synthetic_defects() {
    let dir = tempfile::tempdir().unwrap();
    let side = 96;
    let data = product(dir.path(), side, 40);
    let model = dir.path().join("fcdd.safetensors");
    // 15 passes at the paper's learning rate (1e-3); ten times that diverges to huge scores.
    let set = settings(&[
        ("epochs", 15.into()),
        ("passes_per_epoch", 1.into()),
        ("batch", 8.into()),
    ]);
    commands::train(&train_args(
        DataSource::Mvtec { root: data.clone() },
        &model,
        set,
        side,
    ))
    .unwrap();
    let report = commands::eval(&EvalArgs {
        model,
        data: DataSource::Mvtec { root: data },
        out: dir.path().join("report"),
        run: run(),
    })
    .unwrap();
    let pixel = report.metrics.pixel_auroc.unwrap();
    eprintln!(
        "tiny FCDD on synthetic data: pixel AUROC {pixel:.3}, image AUROC {:?}",
        report.metrics.image_auroc
    );
    assert!(pixel >= 0.9, "pixel AUROC {pixel}");
}

/// `--few-shot 1` trains on one image per defect type, records them, and `vigil eval` leaves them
/// out: no row of scores.csv names them and the counts drop by exactly those images.
#[test]
fn few_shot_images_never_reach_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let side = 64;
    let data = product(dir.path(), side, 12);
    let model = dir.path().join("few.safetensors");
    let mut args = train_args(
        DataSource::Mvtec { root: data.clone() },
        &model,
        settings(&[]),
        side,
    );
    args.few_shot = Some(1);
    let summary = commands::train(&args).unwrap();
    let meta = model_file::read_meta(&model).unwrap();
    let types: BTreeSet<String> = std::fs::read_dir(data.join("test"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|t| t != "good")
        .collect();
    assert_eq!(meta.training.defects.len(), types.len());
    assert_eq!(summary.defect_images, types.len());
    let taken: BTreeSet<String> = meta
        .training
        .defects
        .iter()
        .map(|h| h.path.clone())
        .collect();
    for t in &types {
        assert!(
            taken.iter().any(|p| p.starts_with(&format!("test/{t}/"))),
            "no `{t}` image taken: {taken:?}"
        );
    }

    let out = dir.path().join("report");
    let report = commands::eval(&EvalArgs {
        model: model.clone(),
        data: DataSource::Mvtec { root: data.clone() },
        out: out.clone(),
        run: run(),
    })
    .unwrap();
    assert_eq!(report.defective, types.len() * 6 - types.len());
    assert_eq!(report.good, 10);
    let csv = std::fs::read_to_string(out.join("scores.csv")).unwrap();
    for path in &taken {
        assert!(
            !csv.lines().any(|row| row.contains(path.as_str())),
            "{path} was scored"
        );
    }

    // A copy of the set elsewhere is recognised by content, not by path.
    let copy = dir.path().join("copy");
    copy_dir(&data, &copy);
    let report = commands::eval(&EvalArgs {
        model,
        data: DataSource::Mvtec { root: copy },
        out: dir.path().join("report-copy"),
        run: run(),
    })
    .unwrap();
    assert_eq!(report.defective, types.len() * 5);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The plain form: `--good DIR --defect DIR --masks DIR` trains on every image of the defect
/// folder; a method that cannot learn from defects refuses the same command.
#[test]
fn the_plain_form_trains_on_a_defect_folder_and_nf_bmr_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let side = 64;
    let data = product(dir.path(), side, 12);
    let source = DataSource::Plain {
        good: data.join("train/good"),
        defect: Some(data.join("test/crack")),
        masks: Some(data.join("ground_truth/crack")),
    };
    let model = dir.path().join("plain.safetensors");
    let summary =
        commands::train(&train_args(source.clone(), &model, settings(&[]), side)).unwrap();
    assert_eq!(summary.defect_images, 6);
    let meta = model_file::read_meta(&model).unwrap();
    assert_eq!(meta.training.defects.len(), 6);

    let mut args = train_args(source, &dir.path().join("nf.safetensors"), Vec::new(), side);
    args.method = "nf-bmr".into();
    let err = commands::train(&args).unwrap_err().to_string();
    assert!(err.contains("defect-free images only"), "{err}");

    // Without masks, a defective training image is refused by name.
    let source = DataSource::Plain {
        good: data.join("train/good"),
        defect: Some(data.join("test/crack")),
        masks: None,
    };
    let err = commands::train(&train_args(source, &model, settings(&[]), side))
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs its mask"), "{err}");
}
