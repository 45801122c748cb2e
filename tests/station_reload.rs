//! Swapping the model and calibration of a running station (issue 17): under a running source no
//! part is lost, repeated or judged by the other model's calibration; a corrupt or mismatched
//! pair is refused with its reason and the running pair stays.
mod station_common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use station_common::*;
use vigil::atomic::write_atomic;
use vigil::calibration::Calibration;
use vigil::commands::{self, CalibrateArgs, TrainArgs};
use vigil::data::dataset::DataSource;
use vigil::data::image::load_image;
use vigil::eval::score_images;
use vigil::station::pty::{self, LineReader};
use vigil::station::{Controls, Event, Hooks};

/// A second model of the fixture's product (a memory bank, another method, so every image scores
/// differently) and its calibration; and one of another input size.
struct Second {
    model: PathBuf,
    calibration: PathBuf,
    small_model: PathBuf,
    small_calibration: PathBuf,
}

fn memory_bank(name: &str, side: usize) -> (PathBuf, PathBuf) {
    let f = fixture();
    let data = f.root.join("data");
    let model = f.root.join(format!("{name}.safetensors"));
    commands::train(&TrainArgs {
        // The fixture's 12 training images leave too few validation images for the fusion.
        set: vec![
            "taps=[4]".into(),
            "bank_ratio=0.2".into(),
            "fusion=false".into(),
        ],
        height: Some(side),
        width: Some(side),
        validation_fraction: 0.2,
        seed: 2,
        ..TrainArgs::new(
            "memory-bank",
            DataSource::Mvtec { root: data.clone() },
            model.clone(),
            backbone(),
            run_opts(),
        )
    })
    .unwrap();
    let calibration = f.root.join(format!("{name}.toml"));
    commands::calibrate(&CalibrateArgs {
        model: model.clone(),
        good: data.join("test/good"),
        defect: Some(data.join("test/crack")),
        target_frr: 0.2,
        out: Some(calibration.clone()),
        run: run_opts(),
    })
    .unwrap();
    (model, calibration)
}

fn second() -> &'static Second {
    static SECOND: OnceLock<Second> = OnceLock::new();
    SECOND.get_or_init(|| {
        let (model, calibration) = memory_bank("bank", SIDE);
        let (small_model, small_calibration) = memory_bank("bank-small", SIDE / 2);
        Second {
            model,
            calibration,
            small_model,
            small_calibration,
        }
    })
}

/// Puts a model and a calibration at the station's paths, each atomically, the model first.
fn install(station: (&Path, &Path), model: &Path, calibration: &Path) {
    write_atomic(station.0, &std::fs::read(model).unwrap()).unwrap();
    write_atomic(station.1, &std::fs::read(calibration).unwrap()).unwrap();
}

/// Each line file's score under `model`, as the station computes it.
fn scores(model: &Path, files: &[PathBuf]) -> HashMap<String, f32> {
    let (meta, method) = commands::open_model(model, &candle_core::Device::Cpu).unwrap();
    files
        .iter()
        .map(|p| {
            let image = load_image(p, &meta.input).unwrap();
            let scored = score_images(
                method.as_ref(),
                &[&image],
                1,
                &candle_core::Device::Cpu,
                false,
            )
            .unwrap();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                scored.scores[0],
            )
        })
        .collect()
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-4 * a.abs().max(1.0)
}

/// Waits for the next model swap event, answering with its outcome.
fn next_swap(events: &crossbeam_channel::Receiver<Event>, within: Duration) -> Result<f32, String> {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if let Ok(Event::ModelReloaded(outcome)) = events.recv_timeout(Duration::from_millis(50)) {
            return outcome.map(|(threshold, _)| threshold);
        }
    }
    panic!("no model swap within {within:?}");
}

/// A running source (a looped folder, parts as fast as the line takes them), swapped to the other
/// model by a file change and back by SIGHUP: every part gets exactly one result, in order, scored
/// by exactly one of the models and judged by that model's calibration, the models taking turns
/// exactly at the two swaps.
#[test]
fn a_model_swap_under_a_running_source_loses_and_repeats_no_part() {
    let f = fixture();
    let b = second();
    let parts: Vec<PathBuf> = f.good.iter().chain(&f.defect).cloned().collect();
    let dir = line_folder("swap-running", &parts);
    let line = files(&dir.join("line"));
    let (station_model, station_cal) =
        (dir.join("model.safetensors"), dir.join("calibration.toml"));
    install((&station_model, &station_cal), &f.model, &f.calibration);
    let json = dir.join("results.jsonl");
    let mut cfg = config(
        &dir,
        &format!(
            "{}[decision]\ndeadline_ms = 20000\nreload_poll_ms = 100\n[json]\npath = {:?}\n",
            folder_source(&dir, true, 0.0),
            json.display().to_string()
        ),
    );
    cfg.model = station_model.clone();
    cfg.calibration = station_cal.clone();
    let (a_scores, b_scores) = (scores(&f.model, &line), scores(&b.model, &line));
    let thresholds = [
        Calibration::load(&f.calibration).unwrap().threshold,
        Calibration::load(&b.calibration).unwrap().threshold,
    ];
    let inferred = Arc::new(AtomicU64::new(0));
    let count = inferred.clone();
    let (events_tx, events) = crossbeam_channel::bounded(256);
    let hooks = Hooks {
        before_inference: Some(Arc::new(move |_| {
            count.fetch_add(1, Ordering::Relaxed);
        })),
        events: Some(events_tx),
        ..Hooks::default()
    };
    let controls = Controls::default();
    let (stop, hangup) = (controls.stop.clone(), controls.reload.clone());
    let wait_parts = |n: u64| {
        let target = inferred.load(Ordering::Relaxed) + n;
        let start = Instant::now();
        while inferred.load(Ordering::Relaxed) < target {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the line stopped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let (summary, swaps) = with_station(cfg, controls, hooks, |_| {
        wait_parts(15);
        install((&station_model, &station_cal), &b.model, &b.calibration);
        let first = next_swap(&events, Duration::from_secs(30));
        wait_parts(15);
        install((&station_model, &station_cal), &f.model, &f.calibration);
        hangup.store(true, Ordering::Relaxed);
        let second = next_swap(&events, Duration::from_secs(30));
        wait_parts(15);
        stop.store(true, Ordering::Relaxed);
        (first, second)
    });
    assert_eq!(swaps, (Ok(thresholds[1]), Ok(thresholds[0])));
    let results = json_lines(&json);
    assert_eq!(
        results.len() as u64,
        summary.captured,
        "one result per part"
    );
    let mut turns = Vec::new();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["id"].as_u64(), Some(i as u64), "results in capture order");
        assert!(r["reason"].is_null(), "a fail-safe verdict: {r}");
        let name = r["name"].as_str().unwrap();
        let score = r["score"].as_f64().unwrap() as f32;
        let model = match (close(score, a_scores[name]), close(score, b_scores[name])) {
            (true, false) => 0,
            (false, true) => 1,
            other => panic!("part {i} ({name}) scored {score}: model A/B match {other:?}"),
        };
        let rejected = r["verdict"].as_str() == Some("NG");
        assert_eq!(
            rejected,
            score >= thresholds[model],
            "part {i} judged by the other model's calibration: {r}"
        );
        if turns.last().is_none_or(|&(m, _)| m != model) {
            turns.push((model, 0));
        }
        turns.last_mut().unwrap().1 += 1;
    }
    let order: Vec<usize> = turns.iter().map(|t| t.0).collect();
    assert_eq!(order, [0, 1, 0], "{turns:?}");
    assert!(turns.iter().all(|t| t.1 >= 10), "{turns:?}");
}

/// `RELOAD MODEL` on the serial line with a truncated model file, a model of another input size,
/// and a model whose calibration was made for another: each refused with its reason, the running
/// model scoring the next part as before; then a valid pair takes over.
#[test]
fn a_corrupt_or_mismatched_model_is_refused_and_the_old_one_stays() {
    let f = fixture();
    let b = second();
    let dir = line_folder("swap-refused", &f.good[..1]);
    let (station_model, station_cal) =
        (dir.join("model.safetensors"), dir.join("calibration.toml"));
    install((&station_model, &station_cal), &f.model, &f.calibration);
    let pair = pty::open().unwrap();
    let mut cfg = config(
        &dir,
        &format!(
            "[trigger]\nkind = \"serial\"\n{}[decision]\nreload_poll_ms = 0\n[serial]\nport = {:?}\nheartbeat_s = 0\n",
            folder_source(&dir, true, 0.0),
            pair.port.display().to_string()
        ),
    );
    cfg.model = station_model.clone();
    cfg.calibration = station_cal.clone();
    let line = files(&dir.join("line"));
    let a_score = scores(&f.model, &line)["000.png"];
    let b_score = scores(&b.model, &line)["000.png"];
    let mut reader = LineReader::new(pair.master);
    let controls = Controls::default();
    let stop = controls.stop.clone();
    let (_, (naks, scored, ack)) = with_station(cfg, controls, Hooks::default(), |_| {
        let mut log = Vec::new();
        let mut expect = |reader: &mut LineReader, prefix: &str| {
            expect_line(reader, prefix, Duration::from_secs(30), &mut log)
        };
        expect(&mut reader, "READY");
        let bytes = std::fs::read(&b.model).unwrap();
        let cases: [(&[u8], &Path); 3] = [
            (&bytes[..bytes.len() / 2], &b.calibration),
            (
                &std::fs::read(&b.small_model).unwrap(),
                &b.small_calibration,
            ),
            (&bytes, &f.calibration),
        ];
        let (mut naks, mut scored) = (Vec::new(), Vec::new());
        for (i, (model, calibration)) in cases.into_iter().enumerate() {
            write_atomic(&station_model, model).unwrap();
            write_atomic(&station_cal, &std::fs::read(calibration).unwrap()).unwrap();
            reader.send("RELOAD MODEL").unwrap();
            naks.push(expect(&mut reader, "NAK RELOAD MODEL"));
            reader.send("TRIG").unwrap();
            scored.push(expect(&mut reader, &format!("RES {i} ")));
        }
        install((&station_model, &station_cal), &b.model, &b.calibration);
        reader.send("RELOAD MODEL").unwrap();
        let ack = expect(&mut reader, "ACK RELOAD MODEL");
        reader.send("TRIG").unwrap();
        scored.push(expect(&mut reader, "RES 3 "));
        stop.store(true, Ordering::Relaxed);
        (naks, scored, ack)
    });
    assert!(
        naks[0].contains("truncated") || naks[0].contains("corrupt"),
        "{}",
        naks[0]
    );
    assert!(naks[1].contains("takes 1x32x32 images"), "{}", naks[1]);
    assert!(naks[2].contains("made for model"), "{}", naks[2]);
    let score = |line: &str| -> f32 { res_fields(line).unwrap().2.parse().unwrap() };
    for line in &scored[..3] {
        assert!(
            close(score(line), a_score),
            "{line} against model A's {a_score}"
        );
    }
    assert!(
        close(score(&scored[3]), b_score),
        "{} against model B's {b_score}",
        scored[3]
    );
    let threshold = Calibration::load(&b.calibration).unwrap().threshold;
    assert!(
        ack.starts_with(&format!("ACK RELOAD MODEL {threshold:.6} ")),
        "{ack}"
    );
}
