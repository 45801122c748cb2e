//! `vigil select`: candidates are judged label-free on the validation images their training kept
//! out, by the training's own yardstick, all by the same images, and the best is kept.
use std::path::{Path, PathBuf};

use vigil::commands::select::{select, SelectArgs};
use vigil::commands::{self, RunOptions, TrainArgs, TrainSummary};
use vigil::data::dataset::DataSource;
use vigil::data::synth::{self, SynthConfig};
use vigil::methods::ocr_gan;

const SIDE: usize = 32;
const VALIDATION: f32 = 0.25;

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
            train_good: 16,
            test_good: 2,
            test_per_defect: 1,
            seed: 9,
        },
    )
    .unwrap();
    data
}

/// A tiny OCR-GAN with `forgeries` and a few `--set` overrides more.
fn train(data: &Path, out: PathBuf, seed: u64, forgeries: &str, more: &[&str]) -> TrainSummary {
    let mut set: Vec<String> = (ocr_gan::ENTRY.tiny_config)()
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    set.push(format!("forgeries={forgeries}"));
    set.extend(more.iter().map(|s| s.to_string()));
    commands::train(&TrainArgs {
        set,
        height: Some(SIDE),
        width: Some(SIDE),
        validation_fraction: VALIDATION,
        seed,
        ..TrainArgs::new(
            "ocr-gan",
            DataSource::Mvtec { root: data.into() },
            out,
            PathBuf::new(),
            run(),
        )
    })
    .unwrap()
}

fn args(data: &Path, models: &[&Path], draws: usize, keep: Option<PathBuf>) -> SelectArgs {
    SelectArgs {
        models: models.iter().map(|m| m.to_path_buf()).collect(),
        data: DataSource::Mvtec { root: data.into() },
        validation_fraction: VALIDATION,
        train_limit: None,
        draws,
        keep,
        run: run(),
    }
}

/// The separation of the epoch the training kept, as the training measured it.
fn kept_separation(summary: &TrainSummary) -> f32 {
    let phase = &summary.report.phases[0];
    let kept = phase.kept_epoch.expect("OCR-GAN selects its epoch");
    phase.epochs[kept - 1].validation_separation.unwrap()
}

#[test]
fn one_draw_reproduces_the_separation_the_training_kept_its_epoch_by() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path());
    let model = dir.path().join("plain.safetensors");
    let summary = train(&data, model.clone(), 3, "none", &[]);
    let r = select(&args(&data, &[&model], 1, None)).unwrap();
    assert_eq!(r.kinds, ["cut-paste", "cutout", "perlin-blend", "confetti"]);
    assert_eq!(r.validation_images, 4);
    assert_eq!(r.anomalies, 4);
    assert!(
        (r.candidates[0].separation - kept_separation(&summary)).abs() < 1e-6,
        "select {} against training {}",
        r.candidates[0].separation,
        kept_separation(&summary)
    );
}

#[test]
fn candidates_are_judged_by_the_kinds_none_learned_and_the_best_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path());
    let plain = dir.path().join("plain.safetensors");
    let forging = dir.path().join("forging.safetensors");
    let wider = dir.path().join("wider.safetensors");
    train(&data, plain.clone(), 3, "none", &[]);
    train(&data, forging.clone(), 3, "both", &[]);
    train(&data, wider.clone(), 3, "cutout", &["width=4", "epochs=3"]);
    let keep = dir.path().join("kept.safetensors");
    let r = select(&args(
        &data,
        &[&plain, &forging, &wider],
        3,
        Some(keep.clone()),
    ))
    .unwrap();
    assert_eq!(r.kinds, ["perlin-blend", "confetti"]);
    assert_eq!(r.anomalies, 3 * r.validation_images);
    assert_eq!(r.candidates[0].learned, Vec::<&str>::new());
    assert_eq!(r.candidates[1].learned, ["cutout", "cut-paste"]);
    let separations: Vec<f32> = r.candidates.iter().map(|c| c.separation).collect();
    assert!(separations.iter().all(|s| (0.0..=1.0).contains(s)));
    assert_eq!(
        r.chosen,
        vigil::commands::select::best(&separations).unwrap()
    );
    assert_eq!(
        std::fs::read(&keep).unwrap(),
        std::fs::read(&r.candidates[r.chosen].model).unwrap()
    );
    // The yardstick does not depend on the order of the candidates: each is judged by the
    // same images.
    let reversed = select(&args(&data, &[&wider, &forging, &plain], 3, None)).unwrap();
    let again: Vec<f32> = reversed
        .candidates
        .iter()
        .rev()
        .map(|c| c.separation)
        .collect();
    assert_eq!(again, separations);
}

#[test]
fn candidates_with_other_validation_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path());
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    train(&data, a.clone(), 3, "none", &[]);
    train(&data, b.clone(), 4, "none", &[]);
    let e = select(&args(&data, &[&a, &b], 1, None)).unwrap_err();
    assert!(e.to_string().contains("b.safetensors"), "{e}");
    assert!(e.to_string().contains("seed"), "{e}");
    // The split they were trained with, not another one.
    let mut other = args(&data, &[&a], 1, None);
    other.validation_fraction = 0.5;
    let e = select(&other).unwrap_err();
    assert!(e.to_string().contains("validation share 0.5"), "{e}");
}
