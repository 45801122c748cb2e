//! The running station: wires the stages, the outputs and their threads, and runs the
//! self-test, the status lines and the systemd watchdog until the source is done.
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};

use super::audit::Audit;
use super::config::{StationConfig, TriggerConfig};
use super::decision::{load_roi, Decider, InFlight};
use super::gpio::{Encoder, GpioOutputs, RejectTimer};
use super::health::Health;
use super::ops::Notifier;
use super::outputs::{self, JsonSink, OutputSet, Outputs};
use super::protocol::{self, Command};
use super::reload::{Reloader, ReloaderConfig, Slot};
use super::serial::{self, PortState};
use super::source::{self, FrameSource};
use super::stages::{self, spawn, DecisionStage, SourceStage};
use super::status::{StallCheck, Stats};
use super::{Event, Part};
use crate::data::image::ImageLimits;
use crate::error::{Error, Result};

/// Asked of the station from outside (signal handlers, tests).
#[derive(Clone, Default)]
pub struct Controls {
    /// Stop the source, decide and signal every part in flight, return.
    pub stop: Arc<AtomicBool>,
    /// Reload what changed (SIGHUP): the model and its calibration when the model file's bytes
    /// changed, else the calibration.
    pub reload: Arc<AtomicBool>,
    /// Swap in the model and calibration files whether or not they changed (`RELOAD MODEL`).
    pub reload_model: Arc<AtomicBool>,
}

/// Test and integration seams.
#[derive(Default)]
pub struct Hooks {
    /// Used instead of the configured source (a camera double, say).
    pub source: Option<Box<dyn FrameSource>>,
    /// Called in the inference stage before each part is inferred (to inject a delay).
    pub before_inference: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    /// Receives every station event (never waited for: a full channel drops, counted).
    pub events: Option<Sender<Event>>,
    /// GPIO outputs used instead of the character device.
    pub gpio: Option<Box<dyn GpioOutputs>>,
    /// Where JSON lines go instead of `json.path` (a failing disk, in tests).
    pub json: Option<Box<dyn std::io::Write + Send>>,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// This run's identifier (in READY, RES and HB lines).
    pub run: u64,
    pub captured: u64,
    pub ok: u64,
    pub ng: u64,
    pub err: u64,
    pub deadline_misses: u64,
    pub failures: u64,
    pub drops: u64,
    pub late: u64,
    pub serial_dropped: u64,
    pub json_failed: u64,
    pub json_lost: u64,
    pub audit_skipped: u64,
    pub audit_failed: u64,
    /// Rejected parts whose GPIO pulse started (overlapping pulses merge, so the reject line may
    /// rise fewer times).
    pub pulsed_rejects: u64,
    pub late_rejects: u64,
    pub seconds: f64,
    /// Capture-to-signal p50 and p99 (milliseconds) over the last 1,024 parts.
    pub latency_ms: Option<(f64, f64)>,
    /// The last status line.
    pub status: String,
}

/// How long the start waits for the self-test image's verdict.
const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The file in `state_dir` that keeps the last run's identifier.
pub const RUN_FILE: &str = "vigil-run";

/// An error that happened with the file behind a config key, named by that key.
fn keyed(key: &str, e: Error) -> Error {
    match e {
        Error::Config { .. } => e,
        other => Error::config(key, other.to_string()),
    }
}

/// The next run identifier: one more than the last, kept in `state_dir` (default: the model's
/// folder) across restarts, so the PLC can tell a restarted station's parts from the last run's.
pub fn next_run(cfg: &StationConfig) -> Result<u64> {
    let dir = match &cfg.state_dir {
        Some(d) => d.clone(),
        None => cfg
            .model
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf(),
    };
    let bad = |what: String| Error::config("state_dir", format!("{}: {what}", dir.display()));
    std::fs::create_dir_all(&dir).map_err(|e| bad(e.to_string()))?;
    // Stations started at the same moment on one folder must not share an identifier.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{RUN_FILE}.lock")))
        .map_err(|e| bad(e.to_string()))?;
    lock.lock().map_err(|e| bad(e.to_string()))?;
    let path = dir.join(RUN_FILE);
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().map_err(|_| {
            bad(format!(
                "{RUN_FILE} holds `{}`, not a run number (remove it to start again from 1)",
                text.trim()
            ))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(bad(e.to_string())),
    };
    let run = last + 1;
    crate::atomic::write_atomic(&path, format!("{run}\n").as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    Ok(run)
}

/// Counts encoder edges on `line`.
#[cfg(feature = "gpio")]
fn encoder(chip: &Path, line: u32, stop: &Arc<AtomicBool>) -> Result<Arc<Encoder>> {
    let encoder = Arc::new(Encoder::default());
    super::gpio::cdev::spawn_encoder(chip, line, encoder.clone(), stop.clone())?;
    Ok(encoder)
}

#[cfg(not(feature = "gpio"))]
fn encoder(_: &Path, _: u32, _: &Arc<AtomicBool>) -> Result<Arc<Encoder>> {
    Err(Error::config(
        "gpio.delay_counts",
        "counting encoder edges needs a vigil built with `--features gpio`",
    ))
}

type GpioParts = (Box<dyn GpioOutputs>, RejectTimer, Option<Arc<Encoder>>);

fn gpio_outputs(
    cfg: &StationConfig,
    hooks: &mut Hooks,
    stop: &Arc<AtomicBool>,
) -> Result<Option<GpioParts>> {
    let Some(g) = &cfg.gpio else {
        return Ok(None);
    };
    let width = Duration::from_millis(g.pulse_ms);
    let (timer, encoder) = match (g.delay_ms, g.delay_counts, g.encoder_line) {
        (Some(ms), _, _) => (RejectTimer::new(ms * 1000, width), None),
        (None, Some(counts), Some(line)) => (
            RejectTimer::new(counts, width),
            Some(encoder(&g.chip, line, stop).map_err(|e| keyed("gpio.encoder_line", e))?),
        ),
        _ => {
            return Err(Error::config(
                "gpio.delay_ms",
                "give delay_ms, or delay_counts and encoder_line",
            ))
        }
    };
    if let Some(double) = hooks.gpio.take() {
        return Ok(Some((double, timer, encoder)));
    }
    #[cfg(feature = "gpio")]
    {
        let lines =
            super::gpio::cdev::Outputs::open(&g.chip, g.reject_line, g.ready_line, g.fault_line)
                .map_err(|e| keyed("gpio.chip", e))?;
        Ok(Some((Box::new(lines), timer, encoder)))
    }
    #[cfg(not(feature = "gpio"))]
    Err(Error::config(
        "gpio",
        "needs a vigil built with `--features gpio`",
    ))
}

/// Runs the station until the source ends or `controls.stop` is set; every captured part has
/// been decided and signalled when it returns.
pub fn run(cfg: &StationConfig, controls: &Controls, mut hooks: Hooks) -> Result<Summary> {
    let started = Instant::now();
    let device = cfg.device_choice()?.open()?;
    let (meta, method) =
        crate::commands::open_model(&cfg.model, &device).map_err(|e| keyed("model", e))?;
    let model_sha = crate::model_file::file_sha256(&cfg.model).map_err(|e| keyed("model", e))?;
    let roi = match &cfg.decision.roi {
        Some(p) => Some(load_roi(p, meta.input.height, meta.input.width)?),
        None => None,
    };
    let decider = Decider::new(
        &cfg.calibration,
        &model_sha,
        &meta.validation,
        roi,
        Duration::from_millis(cfg.decision.deadline_ms),
        cfg.decision.on_failure,
    )
    .map_err(|e| keyed("calibration", e))?;
    log::info!(
        "model {} ({}, {}x{}x{}), threshold {}",
        cfg.model.display(),
        meta.method,
        meta.input.channels,
        meta.input.height,
        meta.input.width,
        decider.threshold()
    );
    let source = match hooks.source.take() {
        Some(s) => s,
        None => source::from_config(&cfg.source)?,
    };
    let spec = meta.input;
    let audit = match &cfg.audit {
        Some(a) => {
            // A stored part: the image as the model saw it and its RGB overlay, uncompressed.
            let part_bytes = (spec.height * spec.width * (spec.channels + 3)) as u64;
            Some(
                Audit::open(
                    &a.dir,
                    a.max_parts,
                    a.max_bytes,
                    a.min_free_bytes,
                    part_bytes,
                )
                .map_err(|e| keyed("audit.dir", e))?,
            )
        }
        None => None,
    };
    let json = match (hooks.json.take(), &cfg.json) {
        (Some(writer), _) => Some(JsonSink::Writer(writer)),
        (None, Some(j)) => Some(JsonSink::open(&j.path)?),
        (None, None) => None,
    };
    let gpio = gpio_outputs(cfg, &mut hooks, &controls.stop)?;
    #[cfg(not(feature = "gpio"))]
    if matches!(cfg.trigger, TriggerConfig::Gpio { .. }) {
        return Err(Error::config(
            "trigger.kind",
            "`gpio` needs a vigil built with `--features gpio`",
        ));
    }
    let run = next_run(cfg)?;
    log::info!("run {run}");

    let stats = Arc::new(Stats::new());
    let notifier = Arc::new(Notifier::from_env());
    let outputs = Arc::new(Outputs::new(
        run,
        OutputSet {
            serial_queue: cfg.serial.as_ref().map(|s| s.queue),
            json: json.is_some(),
            gpio: gpio.is_some(),
            audit: audit.is_some(),
            observer: hooks.events.take(),
        },
        stats.clone(),
    ));
    let health = Arc::new(Health::new(
        &[("self-test", "pending"), ("source", "not started")],
        stats.clone(),
        outputs.clone(),
    ));

    let mut writers = Vec::new();
    let gpio_handle = match (gpio, &outputs.gpio) {
        (Some((out, timer, encoder)), Some(queue)) => {
            let (queue, stats) = (queue.clone(), stats.clone());
            Some(spawn("signal-gpio", move || {
                outputs::gpio_writer(queue, out, timer, encoder, stats)
            })?)
        }
        _ => None,
    };
    if let (Some(sink), Some(queue)) = (json, &outputs.json) {
        let (queue, health, stats) = (queue.clone(), health.clone(), stats.clone());
        writers.push(spawn("signal-json", move || {
            outputs::json_writer(queue, sink, run, health, stats)
        })?);
    }
    if let (Some(audit), Some(queue)) = (audit, &outputs.audit) {
        let (queue, health, stats) = (queue.clone(), health.clone(), stats.clone());
        writers.push(spawn("audit", move || {
            outputs::audit_writer(queue, audit, health, stats)
        })?);
    }

    // Calibration reloads (`RELOAD`, or the reloader when only the calibration changed) and model
    // swaps (`RELOAD MODEL`).
    let calibration_reload = Arc::new(AtomicBool::new(false));
    let (trigger_tx, trigger_rx) = bounded::<()>(16);
    let triggered = (cfg.trigger != TriggerConfig::default()).then_some(trigger_rx);
    #[cfg(feature = "gpio")]
    if let TriggerConfig::Gpio { chip, line, edge } = &cfg.trigger {
        super::gpio::cdev::spawn_trigger(
            chip,
            *line,
            edge == "rising",
            trigger_tx.clone(),
            controls.stop.clone(),
        )
        .map_err(|e| keyed("trigger.chip", e))?;
    }
    if let (Some(scfg), Some(queue)) = (cfg.serial.clone(), &outputs.serial) {
        let acked_below = Arc::new(AtomicU64::new(0));
        let commands = command_sink(
            outputs.clone(),
            stats.clone(),
            trigger_tx.clone(),
            (calibration_reload.clone(), controls.reload_model.clone()),
            acked_below.clone(),
            scfg.ack,
        );
        let port_health: serial::PortHealth = {
            let health = health.clone();
            Arc::new(move |state: PortState| match state {
                PortState::Lost(reason) | PortState::Slow(reason) => health.fault("serial", reason),
                PortState::Fine => health.clear("serial"),
            })
        };
        writers.push(serial::start(
            scfg,
            queue.clone(),
            serial::WriterContext {
                run,
                stats: stats.clone(),
                commands,
                health: port_health,
                acked_below,
            },
        )?);
    }
    drop(trigger_tx);

    let in_flight = Arc::new(InFlight::default());
    let source_done = Arc::new(AtomicBool::new(false));
    let q = cfg.pipeline.queue;
    let (src_tx, pre_rx) = bounded::<Part>(q);
    let (pre_tx, inf_rx) = bounded::<Part>(q);
    let (inf_tx, dec_rx) = bounded::<Part>(q);
    let (self_tested_tx, self_tested) = bounded::<()>(1);

    let limits = ImageLimits {
        max_width: cfg.input.max_width,
        max_height: cfg.input.max_height,
        max_bytes: cfg.input.max_bytes,
    };
    let pre_handle = {
        let stats = stats.clone();
        spawn("preprocess", move || {
            stages::preprocess_stage(pre_rx, pre_tx, spec, limits, stats)
        })?
    };
    let slot = Arc::new(Slot::default());
    let inf_handle = {
        let (stats, hook) = (stats.clone(), hooks.before_inference.take());
        let (device, slot) = (device.clone(), slot.clone());
        spawn("inference", move || {
            stages::inference_stage(inf_rx, inf_tx, method, device, hook, stats, slot)
        })?
    };
    let dec_handle = {
        let stage = DecisionStage {
            decider,
            rx: dec_rx,
            in_flight: in_flight.clone(),
            stats: stats.clone(),
            health: health.clone(),
            notifier: notifier.clone(),
            reload: calibration_reload.clone(),
            source_done: source_done.clone(),
            keep_evidence: outputs.audit.is_some(),
            self_tested: self_tested_tx,
            line: String::with_capacity(128),
        };
        spawn("decision", move || stage.run())?
    };

    // The reloader stops with the decision stage (`reloader_stop`), whatever ends the run.
    let reloader_stop = Arc::new(AtomicBool::new(false));
    let reloader = {
        let reloader = Reloader::new(
            ReloaderConfig {
                model: cfg.model.clone(),
                calibration: cfg.calibration.clone(),
                device,
                input: spec,
                deadline: Duration::from_millis(cfg.decision.deadline_ms),
                poll: (cfg.decision.reload_poll_ms > 0)
                    .then(|| Duration::from_millis(cfg.decision.reload_poll_ms)),
                running_sha256: model_sha.clone(),
            },
            slot,
            outputs.clone(),
            controls.reload_model.clone(),
            controls.reload.clone(),
            calibration_reload,
            reloader_stop.clone(),
        );
        spawn("reload", move || reloader.run())?
    };

    // Ready means the whole pipeline scored an image, not that a part arrived: the start-up
    // image goes through before the source starts.
    if src_tx.send(Part::self_test(&spec)).is_ok() {
        let waited = Instant::now();
        while self_tested.recv_timeout(Duration::from_millis(50)).is_err()
            && !controls.stop.load(Ordering::Relaxed)
        {
            if waited.elapsed() > SELF_TEST_TIMEOUT {
                health.fault(
                    "self-test",
                    format!("no score within {} s", SELF_TEST_TIMEOUT.as_secs()),
                );
                break;
            }
        }
    }

    let source_handle = {
        let stage = SourceStage {
            source,
            triggered,
            out: src_tx,
            in_flight: in_flight.clone(),
            stats: stats.clone(),
            health: health.clone(),
            stop: controls.stop.clone(),
        };
        let done = source_done.clone();
        spawn("source", move || {
            let n = stage.run();
            done.store(true, Ordering::Relaxed);
            n
        })?
    };

    // Status lines and the systemd watchdog, until the decision stage is done.
    let status_every =
        (cfg.status.interval_s > 0.0).then(|| Duration::from_secs_f64(cfg.status.interval_s));
    let mut next_status = status_every.map(|every| Instant::now() + every);
    let mut next_watchdog = Instant::now();
    let mut stall = StallCheck::new();
    let mut since = (Instant::now(), 0u64);
    while !dec_handle.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if let (Some(at), Some(every)) = (next_status, status_every) {
            if now >= at {
                let line = stats.status_line(&mut since);
                log::info!("status: {line}");
                notifier.status(&line);
                next_status = Some(now + every);
            }
        }
        if let Some(every) = notifier.watchdog_every {
            if now >= next_watchdog {
                match stall.stalled(&stats) {
                    None => notifier.watchdog(),
                    Some(stage) => log::error!("stage {stage} stalled: no watchdog keep-alive"),
                }
                next_watchdog = now + every;
            }
        }
    }
    notifier.stopping();
    let captured = source_handle.join().unwrap_or(0);
    let _ = dec_handle.join();
    reloader_stop.store(true, Ordering::Relaxed);
    let _ = reloader.join();
    outputs.close();
    for h in writers {
        let _ = h.join();
    }
    let rejects = gpio_handle.map_or_else(Default::default, |h| h.join().unwrap_or_default());
    // A hung stage is left behind: every part already has its verdict.
    for (name, h) in [("preprocess", pre_handle), ("inference", inf_handle)] {
        if h.is_finished() {
            let _ = h.join();
        } else {
            log::error!("stage {name} did not finish; leaving it");
        }
    }
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let [ok, ng, err] = stats.counts();
    let mut since = (started, 0);
    Ok(Summary {
        run,
        captured,
        ok,
        ng,
        err,
        deadline_misses: load(&stats.deadline_misses),
        failures: load(&stats.failures),
        drops: load(&stats.drops),
        late: load(&stats.late),
        serial_dropped: load(&stats.serial_dropped),
        json_failed: load(&stats.json_failed),
        json_lost: load(&stats.json_lost),
        audit_skipped: load(&stats.audit_skipped),
        audit_failed: load(&stats.audit_failed),
        pulsed_rejects: rejects.pulsed,
        late_rejects: rejects.late,
        seconds: started.elapsed().as_secs_f64(),
        latency_ms: stats.percentiles_ms(5),
        status: stats.status_line(&mut since),
    })
}

/// What the serial reader does with the PLC's commands: nothing here waits (replies go into the
/// serial output's queue, a trigger that finds the queue full is refused).
fn command_sink(
    outputs: Arc<Outputs>,
    stats: Arc<Stats>,
    trigger: Sender<()>,
    (reload, reload_model): (Arc<AtomicBool>, Arc<AtomicBool>),
    acked_below: Arc<AtomicU64>,
    ack_mode: bool,
) -> serial::CommandSink {
    Arc::new(move |cmd: Command| match cmd {
        Command::Trigger => {
            if trigger.try_send(()).is_err() {
                outputs.reply(protocol::nak_line("TRIG", "busy"));
            }
        }
        Command::Status => {
            let mut since = (Instant::now(), stats.decided());
            outputs.event(
                &Event::Status(stats.status_line(&mut since)),
                "serial-command",
            );
        }
        Command::Reload => reload.store(true, Ordering::Relaxed),
        Command::ReloadModel => reload_model.store(true, Ordering::Relaxed),
        Command::Ping => outputs.reply("PONG\r\n".into()),
        Command::Ack(id) if ack_mode => {
            acked_below.fetch_max(id.saturating_add(1), Ordering::Relaxed);
        }
        Command::Ack(_) => outputs.reply(protocol::nak_line(
            "ACK",
            "not in acknowledged mode (serial.ack = false)",
        )),
        Command::Bad { excerpt, reason } => outputs.reply(protocol::nak_line(&excerpt, &reason)),
    })
}
