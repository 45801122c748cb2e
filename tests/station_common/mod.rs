//! The station test fixture: a tiny NF-BMR trained once per test binary, line folders, station
//! files, and readers for what the PLC and the JSON file see.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vigil::commands::{self, CalibrateArgs, RunOptions, TrainArgs};
use vigil::data::dataset::DataSource;
use vigil::data::synth::{self, SynthConfig};
use vigil::error::Result;
use vigil::station::pty::LineReader;
use vigil::station::{self, Controls, Hooks, StationConfig};

#[path = "../common/mod.rs"]
mod common;
pub use common::backbone;

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub model: PathBuf,
    pub calibration: PathBuf,
    pub good: Vec<PathBuf>,
    pub defect: Vec<PathBuf>,
}

pub const SIDE: usize = 64;

pub fn run_opts() -> RunOptions {
    RunOptions::quiet_cpu(8)
}

pub fn files(dir: &Path) -> Vec<PathBuf> {
    vigil::station::source::image_files(dir).unwrap()
}

/// A tiny model and its calibration, trained once per test binary.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // RUST_LOG=info shows the station's log in a failing test's output.
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        synth::generate(
            &data,
            &SynthConfig {
                height: SIDE,
                width: SIDE,
                channels: 1,
                train_good: 12,
                test_good: 6,
                test_per_defect: 2,
                seed: 5,
            },
        )
        .unwrap();
        let model = root.join("model.safetensors");
        commands::train(&TrainArgs {
            set: [
                "taps=[4]",
                "flow_blocks=2",
                "flow_hidden=16",
                "bmr_blocks=1",
                "bmr_width=8",
                "flow_epochs=1",
                "map_epochs=1",
                "flow_min_steps=0",
                "map_min_steps=0",
            ]
            .map(String::from)
            .to_vec(),
            height: Some(SIDE),
            width: Some(SIDE),
            validation_fraction: 0.2,
            seed: 1,
            ..TrainArgs::new(
                "nf-bmr",
                DataSource::Mvtec { root: data.clone() },
                model.clone(),
                backbone(),
                run_opts(),
            )
        })
        .unwrap();
        let calibration = root.join("calibration.toml");
        commands::calibrate(&CalibrateArgs {
            model: model.clone(),
            good: data.join("test/good"),
            defect: Some(data.join("test/crack")),
            target_frr: 0.2,
            out: Some(calibration.clone()),
            run: run_opts(),
        })
        .unwrap();
        let mut defect = files(&data.join("test/crack"));
        defect.extend(files(&data.join("test/spot")));
        Fixture {
            good: files(&data.join("test/good")),
            defect,
            _dir: dir,
            root,
            model,
            calibration,
        }
    })
}

/// A fresh folder for one test, with `parts` copied in as 000.png, 001.png, ...
pub fn line_folder(name: &str, parts: &[PathBuf]) -> PathBuf {
    let dir = fixture().root.join(name);
    std::fs::create_dir_all(dir.join("line")).unwrap();
    for (i, p) in parts.iter().enumerate() {
        std::fs::copy(p, dir.join("line").join(format!("{i:03}.png"))).unwrap();
    }
    dir
}

pub fn config(dir: &Path, extra: &str) -> StationConfig {
    let f = fixture();
    let text = format!(
        "model = {:?}\ncalibration = {:?}\n{extra}\n",
        f.model.display().to_string(),
        f.calibration.display().to_string(),
    );
    let path = dir.join("station.toml");
    std::fs::write(&path, text).unwrap();
    StationConfig::load(&path).unwrap()
}

pub fn folder_source(dir: &Path, looped: bool, rate_hz: f64) -> String {
    format!(
        "[source]\nkind = \"folder\"\npath = {:?}\nloop = {looped}\nrate_hz = {rate_hz}\n",
        dir.join("line").display().to_string()
    )
}

pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("id").is_some())
        .collect()
}

/// `RES` lines as (id, verdict, score, rest).
pub fn res_fields(line: &str) -> Option<(u64, String, String)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    (f.first() == Some(&"RES")).then(|| (f[1].parse().unwrap(), f[2].to_string(), f[3].to_string()))
}

/// Runs a station in a thread while `plc` reads its serial lines; returns the run's summary.
pub fn with_station<T>(
    cfg: StationConfig,
    controls: Controls,
    hooks: Hooks,
    plc: impl FnOnce(&dyn Fn() -> bool) -> T,
) -> (station::Summary, T) {
    let stop = controls.stop.clone();
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| station::run(&cfg, &controls, hooks));
        let finished = || handle.is_finished();
        let seen = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plc(&finished)));
        // A failed check must fail the test, not leave a triggered station waiting forever.
        if seen.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let summary = handle.join().unwrap().unwrap();
        (
            summary,
            seen.unwrap_or_else(|e| std::panic::resume_unwind(e)),
        )
    })
}

/// Reads lines until the station has finished and nothing more arrives.
pub fn read_all(reader: &mut LineReader, finished: &dyn Fn() -> bool, into: &mut Vec<String>) {
    let mut quiet_after_finish = 0;
    while quiet_after_finish < 4 {
        match reader.read_line(Duration::from_millis(100)) {
            Some(line) => into.push(line),
            None if finished() => quiet_after_finish += 1,
            None => {}
        }
    }
}

/// The `vigil` binary as a command. Under user-mode emulation (`scripts/cross-test.sh`) it is a
/// foreign executable that the host kernel cannot start without binfmt_misc, so the script names
/// the emulator in `VIGIL_TEST_RUNNER` and the binary runs under it.
pub fn vigil_command() -> std::process::Command {
    let binary = env!("CARGO_BIN_EXE_vigil");
    let runner = std::env::var("VIGIL_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(emulator) => {
            let mut command = std::process::Command::new(emulator);
            command.args(words).arg(binary);
            command
        }
        None => std::process::Command::new(binary),
    }
}

/// GPIO outputs that record each change with its time.
pub struct RecordingGpio(
    pub Arc<std::sync::Mutex<Vec<(Instant, vigil::station::gpio::OutputLine, bool)>>>,
);

impl vigil::station::gpio::GpioOutputs for RecordingGpio {
    fn set(&mut self, line: vigil::station::gpio::OutputLine, high: bool) -> Result<()> {
        self.0.lock().unwrap().push((Instant::now(), line, high));
        Ok(())
    }
}

pub fn expect_line(
    reader: &mut LineReader,
    prefix: &str,
    within: Duration,
    log: &mut Vec<String>,
) -> String {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(line) = reader.read_line(Duration::from_millis(50)) {
            log.push(line.clone());
            if line.starts_with(prefix) {
                return line;
            }
        }
    }
    panic!("no line starting {prefix:?} within {within:?}: {log:?}");
}
