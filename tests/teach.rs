//! `vigil teach` (issue 17): against a synthetic source from nothing, the station then runs with
//! the pair it installed and tells the synthetic defects from good parts; against a folder source
//! while a station runs on the same file, the running station swaps the taught pair in.
mod station_common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use station_common::*;
use vigil::calibration::Calibration;
use vigil::commands::teach::{teach, TeachArgs};
use vigil::data::synth::{self, SynthConfig};
use vigil::model_file;
use vigil::station::{self, Controls, Event, Hooks, StationConfig};

fn args(config: &Path, count: usize, out: &Path) -> TeachArgs {
    TeachArgs {
        config: config.to_path_buf(),
        count,
        calibration_share: 0.25,
        target_frr: Some(0.1),
        method: "memory-bank".into(),
        method_config: None,
        // An 8 × 8 grid at 64² (4 × 4 at 32²): the default 3-cell margin would leave 2 × 2.
        set: vec!["taps=[4, 7]".into(), "score_margin=1".into()],
        height: None,
        width: None,
        out: Some(out.to_path_buf()),
        backbone: backbone(),
        seed: 3,
        run: run_opts(),
    }
}

fn synthetic(dir: &Path, name: &str, source: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "model = \"model.safetensors\"\ncalibration = \"calibration.toml\"\n\
             [decision]\ndeadline_ms = 20000\n[json]\npath = \"results-{name}.jsonl\"\n\
             [source]\nkind = \"synthetic\"\nheight = 64\nwidth = 64\n{source}"
        ),
    )
    .unwrap();
    path
}

/// A station with no model yet: the teach captures 48 good synthetic parts, installs a pair tied
/// together by its digest, and the station then runs on it, rejecting the synthetic defects.
#[test]
fn teach_against_a_synthetic_source_installs_a_pair_the_station_runs_with() {
    let dir = tempfile::tempdir().unwrap();
    let teach_file = synthetic(dir.path(), "teach.toml", "seed = 1\n");
    let mut a = args(&teach_file, 48, &dir.path().join("taught"));
    a.height = Some(64);
    a.width = Some(64);
    let summary = teach(&a).unwrap();
    assert_eq!(summary.captured, 48);
    assert_eq!(summary.calibration_images, 12);
    assert_eq!(summary.train_images + summary.validation_images, 36);
    assert!(summary.validation_images >= 5, "{summary:?}");
    assert!(summary.bank.is_some_and(|(entries, _)| entries > 0));
    let model = dir.path().join("model.safetensors");
    let calibration = Calibration::load(&dir.path().join("calibration.toml")).unwrap();
    assert_eq!(
        calibration.model.sha256,
        model_file::file_sha256(&model).unwrap()
    );
    assert_eq!(calibration.counts.good, 12);
    // What was captured stays in the teach folder: the parts and the pair.
    let kept = |sub: &str| std::fs::read_dir(summary.folder.join(sub)).unwrap().count();
    assert_eq!(kept("train/good") + kept("calibration"), 48);
    assert!(summary.folder.join("model.safetensors").is_file());

    // The line: other parts of the same product, half of them defective.
    let line_file = synthetic(
        dir.path(),
        "line.toml",
        "seed = 2\ndefect_rate = 0.5\ncount = 40\n",
    );
    let cfg = StationConfig::load(&line_file).unwrap();
    let run = station::run(&cfg, &Controls::default(), Hooks::default()).unwrap();
    assert_eq!(run.captured, 40);
    assert_eq!(run.failures + run.deadline_misses + run.drops, 0, "{run:?}");
    let results = json_lines(&dir.path().join("results-line.toml.jsonl"));
    assert_eq!(results.len(), 40);
    let (scores, defective): (Vec<f32>, Vec<bool>) = results
        .iter()
        .map(|r| {
            (
                r["score"].as_f64().unwrap() as f32,
                !r["name"].as_str().unwrap().ends_with("-good"),
            )
        })
        .unzip();
    let auroc = vigil::metrics::auroc(&scores, &defective).unwrap();
    assert!(auroc >= 0.9, "the taught station's image AUROC {auroc}");
}

/// A station runs on a folder with the fixture's model; a teach on the same station file (its
/// folder source of good parts) installs a memory bank at the model's input size, and the running
/// station takes it over between two parts. The pair it replaced is kept in the teach folder.
#[test]
fn teach_against_a_folder_source_is_swapped_into_the_running_station() {
    let f = fixture();
    let good = dir_of_good_parts(&f.root.join("teach-folder-parts"), 24);
    let dir = line_folder("teach-folder", &good);
    let (model, cal) = (dir.join("model.safetensors"), dir.join("calibration.toml"));
    std::fs::copy(&f.model, &model).unwrap();
    std::fs::copy(&f.calibration, &cal).unwrap();
    let json = dir.join("results.jsonl");
    let mut cfg = config(
        &dir,
        &format!(
            "{}[decision]\ndeadline_ms = 20000\nreload_poll_ms = 100\n[json]\npath = {:?}\n",
            folder_source(&dir, true, 50.0),
            json.display().to_string()
        ),
    );
    cfg.model = model.clone();
    cfg.calibration = cal.clone();
    // The station file the teach reads names the same paths.
    let station_file = dir.join("station.toml");
    let text = std::fs::read_to_string(&station_file)
        .unwrap()
        .replace(&f.model.display().to_string(), &model.display().to_string())
        .replace(
            &f.calibration.display().to_string(),
            &cal.display().to_string(),
        );
    std::fs::write(&station_file, text).unwrap();
    let (events_tx, events) = crossbeam_channel::bounded(256);
    let hooks = Hooks {
        events: Some(events_tx),
        ..Hooks::default()
    };
    let controls = Controls::default();
    let stop = controls.stop.clone();
    let out = dir.join("taught");
    let (_, (summary, swapped)) = with_station(cfg, controls, hooks, |_| {
        let summary = teach(&args(&station_file, 24, &out)).unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        let mut swapped = None;
        while swapped.is_none() && Instant::now() < until {
            if let Ok(Event::ModelReloaded(outcome)) =
                events.recv_timeout(Duration::from_millis(50))
            {
                swapped = Some(outcome);
            }
        }
        stop.store(true, Ordering::Relaxed);
        (summary, swapped)
    });
    let (threshold, sha) = swapped
        .expect("no model swap")
        .expect("the swap was refused");
    assert_eq!(sha, model_file::file_sha256(&model).unwrap());
    assert_eq!(threshold, summary.calibration.threshold);
    assert_eq!(
        model_file::read_meta(&model).unwrap().input,
        model_file::read_meta(&f.model).unwrap().input,
        "taught at the running model's input size"
    );
    assert_eq!(
        std::fs::read(out.join("previous-model.safetensors")).unwrap(),
        std::fs::read(&f.model).unwrap()
    );
    assert!(out.join("previous-calibration.toml").is_file());
}

/// `n` good parts of the fixture's synthetic product, in a folder of their own.
fn dir_of_good_parts(dir: &Path, n: usize) -> Vec<PathBuf> {
    synth::generate(
        dir,
        &SynthConfig {
            height: SIDE,
            width: SIDE,
            channels: 1,
            train_good: n,
            test_good: 0,
            test_per_defect: 0,
            seed: 9,
        },
    )
    .unwrap();
    files(&dir.join("train/good"))
}
