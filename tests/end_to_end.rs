//! The whole path on the synthetic product: synth → train NF-BMR → eval → calibrate → score.
//! Needs the backbone weights that `scripts/test.sh` installs (models/get-weights.sh).
use std::path::{Path, PathBuf};

use vigil::commands::{self, CalibrateArgs, EvalArgs, RunOptions, ScoreArgs, TrainArgs};
use vigil::data::dataset::DataSource;
use vigil::data::synth::{self, SynthConfig};

mod common;
use common::backbone;

fn run() -> RunOptions {
    RunOptions::quiet_cpu(8)
}

#[test]
fn tiny_nf_bmr_separates_synthetic_defects_and_the_station_files_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = SynthConfig {
        height: 96,
        width: 96,
        channels: 1,
        train_good: 40,
        test_good: 12,
        test_per_defect: 6,
        seed: 3,
    };
    synth::generate(&data, &cfg).unwrap();
    let model = dir.path().join("model.safetensors");
    let summary = commands::train(&TrainArgs {
        set: [
            "taps=[4,7]",
            "flow_hidden=64",
            "bmr_width=32",
            "flow_epochs=8",
            "map_epochs=20",
            "flow_min_steps=0",
            "map_min_steps=0",
        ]
        .map(String::from)
        .to_vec(),
        height: Some(96),
        width: Some(96),
        seed: 1,
        ..TrainArgs::new(
            "nf-bmr",
            DataSource::Mvtec { root: data.clone() },
            model.clone(),
            backbone(),
            run(),
        )
    })
    .unwrap();
    assert_eq!(summary.train_images, 36);
    assert_eq!(summary.validation.count, 4);

    let report_dir = dir.path().join("report");
    let report = commands::eval(&EvalArgs {
        model: model.clone(),
        data: DataSource::Mvtec { root: data.clone() },
        out: report_dir.clone(),
        run: run(),
    })
    .unwrap();
    let auroc = report.metrics.image_auroc.unwrap();
    assert!(auroc >= 0.9, "image AUROC {auroc}");
    assert!(report.metrics.pixel_auroc.unwrap() > 0.5 && report.metrics.aupro.is_some());
    for f in [
        "metrics.json",
        "summary.md",
        "scores.csv",
        "roc.png",
        "histogram.png",
    ] {
        assert!(report_dir.join(f).exists(), "{f} missing");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report_dir.join("metrics.json")).unwrap()).unwrap();
    for key in [
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "image_f1_max",
        "per_type",
        "images_per_second",
    ] {
        assert!(json.get(key).is_some(), "metrics.json lacks {key}");
    }
    assert_eq!(json["per_type"].as_object().unwrap().len(), 3);
    assert!(std::fs::read_dir(report_dir.join("worst")).unwrap().count() > 0);
    let csv = std::fs::read_to_string(report_dir.join("scores.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "path,defect_type,score");
    assert_eq!(rows.len() - 1, json["images"].as_u64().unwrap() as usize);
    let good_rows = rows.iter().filter(|r| r.contains(",good,")).count();
    assert_eq!(good_rows, json["good"].as_u64().unwrap() as usize);
    assert!(rows[1..]
        .iter()
        .all(|r| r.rsplit(',').next().unwrap().parse::<f32>().is_ok()));

    let cal_path = dir.path().join("cal.toml");
    let (_, cal) = commands::calibrate(&CalibrateArgs {
        model: model.clone(),
        good: data.join("test/good"),
        defect: Some(data.join("test/crack")),
        target_frr: 0.1,
        out: Some(cal_path.clone()),
        run: run(),
    })
    .unwrap();
    assert_eq!(cal.counts.good, 12);
    assert!(cal.counts.good_rejected <= 1);

    // Scoring offline agrees with the calibration, and a corrupt file costs only its own line.
    let corrupt = dir.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG not really").unwrap();
    let good_image = first_file(&data.join("test/good"));
    let lines = commands::score(&ScoreArgs {
        model: model.clone(),
        calibration: Some(cal_path),
        images: vec![good_image.clone(), corrupt.clone()],
        heatmap: Some(dir.path().join("heat")),
        run: run(),
    })
    .unwrap();
    assert_eq!(lines.len(), 2);
    let v = lines[0].result.as_ref().unwrap();
    assert_eq!(v.reject, Some(cal.is_reject(v.score)));
    assert!(lines[1]
        .result
        .as_ref()
        .unwrap_err()
        .contains("corrupt.png"));
    assert!(dir.path().join("heat").read_dir().unwrap().count() == 1);
}

fn first_file(dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files[0].clone()
}
