//! `vigil run`, `vigil capture` (teach mode) and `vigil demo` as library functions.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::ProgressBar;

use super::{calibrate, train, CalibrateArgs, RunOptions, TrainArgs};
use crate::data::dataset::DataSource;
use crate::data::synth::{self, SynthConfig};
use crate::error::{Error, Result};
use crate::station::config::{StationConfig, TriggerConfig};
use crate::station::protocol::Command;
use crate::station::{pty, serial, source};
use crate::station::{Controls, Frame, Hooks, Summary};

/// Runs the station of `config` until its source ends or SIGTERM/SIGINT; SIGHUP reloads the
/// calibration.
pub fn run(config: &Path) -> Result<Summary> {
    let cfg = StationConfig::load(config)?;
    let controls = Controls::default();
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, controls.stop.clone())
            .map_err(|e| Error::Device(format!("cannot handle signal {signal}: {e}")))?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, controls.reload.clone())
        .map_err(|e| Error::Device(format!("cannot handle SIGHUP: {e}")))?;
    crate::station::run(&cfg, &controls, Hooks::default())
}

/// Teach mode: stores `count` parts from the configured source in `out` as training images
/// (files are copied as they are; frames in memory are written as PNG), each at the station's
/// trigger.
pub fn capture(config: &Path, out: &Path, count: usize) -> Result<Vec<PathBuf>> {
    let cfg = StationConfig::load(config)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    capture_parts(&cfg, count, &ProgressBar::hidden(), |index| {
        Ok(out.join(format!("{index:05}")))
    })
}

/// Stores `count` parts of the station's source, each when the station's trigger says (a `TRIG`
/// line on its serial port, a GPIO edge) or at the source's own pace, at the path `place` gives
/// for its index (a file keeps its extension, a frame in memory is written as PNG). Fewer when
/// the source ends. `bar` counts the parts.
pub fn capture_parts(
    cfg: &StationConfig,
    count: usize,
    bar: &ProgressBar,
    mut place: impl FnMut(usize) -> Result<PathBuf>,
) -> Result<Vec<PathBuf>> {
    let mut source = source::from_config(&cfg.source)?;
    source.open()?;
    let (trigger, _running) = capture_trigger(cfg)?;
    let period = (source.rate_hz() > 0.0)
        .then(|| std::time::Duration::from_secs_f64(1.0 / source.rate_hz()));
    bar.set_length(count as u64);
    let mut written = Vec::with_capacity(count);
    while written.len() < count {
        let start = Instant::now();
        if let Some(trigger) = &trigger {
            trigger.recv().map_err(|_| {
                Error::Device("the trigger stopped before every part was captured".into())
            })?;
        }
        let Some((name, frame)) = source.grab()? else {
            break;
        };
        let stem = place(written.len())?;
        let path = match frame {
            Frame::File(src) => {
                let ext = src
                    .extension()
                    .map_or("png".into(), |e| e.to_string_lossy().into_owned());
                let dst = stem.with_extension(ext);
                std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
                dst
            }
            Frame::Pixels(image) => {
                let dst = stem.with_extension("png");
                crate::data::image::save_png(&image, &dst)?;
                dst
            }
        };
        log::debug!("captured {name} -> {}", path.display());
        written.push(path);
        bar.inc(1);
        if let (Some(p), None) = (period, &trigger) {
            std::thread::sleep(p.saturating_sub(start.elapsed()));
        }
    }
    Ok(written)
}

/// Clears its flag when dropped: the trigger's thread of a capture then ends.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// The station's trigger for a capture: none when the source sets the pace, else a channel that
/// receives one message per `TRIG` line on the serial port or per edge on the GPIO line, while
/// the returned guard lives.
fn capture_trigger(
    cfg: &StationConfig,
) -> Result<(Option<crossbeam_channel::Receiver<()>>, Running)> {
    let running = Arc::new(AtomicBool::new(true));
    let guard = Running(running.clone());
    let (tx, rx) = crossbeam_channel::bounded::<()>(16);
    match &cfg.trigger {
        TriggerConfig::FreeRun => return Ok((None, guard)),
        TriggerConfig::Serial => {
            let scfg = cfg
                .serial
                .as_ref()
                .ok_or_else(|| Error::config("trigger.kind", "`serial` needs a [serial] table"))?;
            let port = serial::open_port(scfg)?;
            let sink: serial::CommandSink = Arc::new(move |cmd| {
                if cmd == Command::Trigger && tx.try_send(()).is_err() {
                    log::warn!("TRIG while {} parts wait to be captured: ignored", tx.len());
                }
            });
            std::thread::Builder::new()
                .name("capture-trigger".into())
                .spawn(move || serial::read_commands(port, running, sink))
                .map_err(|e| Error::Device(format!("cannot start the trigger reader: {e}")))?;
        }
        #[cfg(feature = "gpio")]
        TriggerConfig::Gpio { chip, line, edge } => {
            // Its thread watches a stop flag: set by a watcher of ours when the guard goes.
            let stop = Arc::new(AtomicBool::new(false));
            crate::station::gpio::cdev::spawn_trigger(
                chip,
                *line,
                edge == "rising",
                tx,
                stop.clone(),
            )?;
            std::thread::spawn(move || {
                while running.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                stop.store(true, Ordering::Relaxed);
            });
        }
        #[cfg(not(feature = "gpio"))]
        TriggerConfig::Gpio { .. } => {
            return Err(Error::config(
                "trigger.kind",
                "`gpio` needs a vigil built with `--features gpio`",
            ))
        }
    }
    Ok((Some(rx), guard))
}

#[derive(Clone, Debug)]
pub struct DemoArgs {
    pub out: PathBuf,
    /// NF-BMR hyper-parameters (configs/nf-bmr-demo.toml).
    pub method_config: PathBuf,
    pub backbone: PathBuf,
    pub seed: u64,
    /// Parts per second on the line; 0 = as fast as the station goes.
    pub rate_hz: f64,
}

#[derive(Clone, Debug)]
pub struct DemoSummary {
    pub station: Summary,
    /// The lines the "PLC" read from the pseudo-terminal.
    pub lines: Vec<String>,
    /// Scored parts whose verdict matched their ground truth (good → OK, defect → NG).
    pub correct: usize,
    /// Parts that got a score (not a fail-safe verdict).
    pub scored: usize,
    pub parts: usize,
}

/// synth → train → calibrate → the station on a folder of test parts, its serial signal on a
/// pseudo-terminal pair; `on_line` sees every line the PLC side reads.
pub fn demo(args: &DemoArgs, mut on_line: impl FnMut(&str)) -> Result<DemoSummary> {
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    // The station file takes relative paths from its own folder: write absolute ones.
    let out = &std::path::absolute(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let data = out.join("data");
    let synth_cfg = SynthConfig {
        seed: args.seed,
        ..SynthConfig::default()
    };
    synth::generate(&data, &synth_cfg)?;
    let run_opts = RunOptions::quiet_cpu(8);
    let model = out.join("model.safetensors");
    log::info!("demo: training NF-BMR on {}", data.display());
    train(&TrainArgs {
        config: Some(args.method_config.clone()),
        // The synthetic product's own size: a model at 128² keeps up with the demo's line rate.
        height: Some(synth_cfg.height),
        width: Some(synth_cfg.width),
        seed: args.seed,
        ..TrainArgs::new(
            "nf-bmr",
            DataSource::Mvtec { root: data.clone() },
            model.clone(),
            args.backbone.clone(),
            run_opts.clone(),
        )
    })?;
    let calibration = out.join("calibration.toml");
    calibrate(&CalibrateArgs {
        model: model.clone(),
        good: data.join("test/good"),
        defect: Some(data.join("test/crack")),
        target_frr: 0.05,
        out: Some(calibration.clone()),
        run: run_opts,
    })?;

    // The line: test parts interleaved, named so that name order is the order on the belt.
    let line_dir = out.join("line");
    let _ = std::fs::remove_dir_all(&line_dir);
    std::fs::create_dir_all(&line_dir).map_err(|e| Error::io(&line_dir, e))?;
    let mut truth = Vec::new();
    let kinds = ["good", "scratch", "spot", "crack"];
    let lists: Vec<Vec<PathBuf>> = kinds
        .iter()
        .map(|k| source::image_files(&data.join("test").join(k)))
        .collect::<Result<_>>()?;
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        for (kind, files) in kinds.iter().zip(&lists) {
            if let Some(src) = files.get(i) {
                let dst = line_dir.join(format!("{:03}-{kind}.png", truth.len()));
                std::fs::copy(src, &dst).map_err(|e| Error::io(src, e))?;
                truth.push(*kind != "good");
            }
        }
    }

    let pair = pty::open()?;
    let config_text = format!(
        "# Written by `vigil demo`.\nmodel = {model:?}\ncalibration = {calibration:?}\n\n\
         [source]\nkind = \"folder\"\npath = {line:?}\nrate_hz = {rate}\n\n\
         [decision]\ndeadline_ms = 2000\n\n\
         [serial]\nport = {port:?}\nheartbeat_s = 0\n\n\
         [json]\npath = {json:?}\n\n\
         [audit]\ndir = {audit:?}\nmax_parts = 100\n\n\
         [status]\ninterval_s = 5\n",
        model = model.display().to_string(),
        calibration = calibration.display().to_string(),
        line = line_dir.display().to_string(),
        rate = args.rate_hz,
        port = pair.port.display().to_string(),
        json = out.join("results.jsonl").display().to_string(),
        audit = out.join("audit").display().to_string(),
    );
    let config_path = out.join("station.toml");
    std::fs::write(&config_path, &config_text).map_err(|e| Error::io(&config_path, e))?;
    let cfg = StationConfig::load(&config_path)?;

    // The PLC side: read lines from the master until the station is done.
    let (line_tx, line_rx) = crossbeam_channel::unbounded::<String>();
    let master = pair.master;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_done = done.clone();
    let reader = std::thread::spawn(move || plc_reader(master, line_tx, reader_done));
    let station = {
        let controls = Controls::default();
        let result = std::thread::scope(|scope| {
            let h = scope.spawn(|| crate::station::run(&cfg, &controls, Hooks::default()));
            let mut lines = Vec::new();
            while !h.is_finished() || !line_rx.is_empty() {
                if let Ok(line) = line_rx.recv_timeout(std::time::Duration::from_millis(50)) {
                    on_line(&line);
                    lines.push(line);
                }
            }
            (h.join(), lines)
        });
        result
    };
    let (joined, mut lines) = station;
    let summary = joined.map_err(|_| Error::Device("station thread panicked".into()))??;
    // Lines still in the terminal after the station returned.
    std::thread::sleep(std::time::Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    let _ = reader.join();
    for line in line_rx.try_iter() {
        on_line(&line);
        lines.push(line);
    }
    let (mut correct, mut scored) = (0, 0);
    for line in &lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let ["RES", id, verdict, score, ..] = fields.as_slice() {
            let defect = id.parse::<usize>().ok().and_then(|i| truth.get(i));
            if let (Some(&defect), true) = (defect, *score != "-") {
                scored += 1;
                correct += usize::from((*verdict == "NG") == defect);
            }
        }
    }
    Ok(DemoSummary {
        station: summary,
        lines,
        correct,
        scored,
        parts: truth.len(),
    })
}

fn plc_reader(
    master: std::fs::File,
    lines: crossbeam_channel::Sender<String>,
    done: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut reader = pty::LineReader::new(master);
    while !done.load(Ordering::Relaxed) {
        if let Some(line) = reader.read_line(std::time::Duration::from_millis(50)) {
            let _ = lines.send(line);
        }
    }
}
