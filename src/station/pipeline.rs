//! The running station: one thread per stage, bounded channels between them.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;
use crossbeam_channel::{
    bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError,
};

use super::audit::Audit;
use super::config::{StationConfig, TriggerConfig};
use super::decision::{Decider, InFlight, Pending};
use super::gpio::{self, Encoder, GpioOutputs, RejectTimer};
use super::ops::Notifier;
use super::protocol::{self, Command};
use super::source::{self, FrameSource, BACKOFF_MAX, BACKOFF_MIN};
use super::status::{StallCheck, Stats};
use super::{serial, Decided, Event, Frame, Part, Verdict};
use crate::data::{image, Image, InputSpec};
use crate::error::{Error, Result};
use crate::eval::{heatmap_range, score_images};
use crate::methods::Method;

/// Asked of the station from outside (signal handlers, tests).
#[derive(Clone, Default)]
pub struct Controls {
    /// Stop the source, decide and signal every part in flight, return.
    pub stop: Arc<AtomicBool>,
    /// Reload the calibration.
    pub reload: Arc<AtomicBool>,
}

/// Test and integration seams.
#[derive(Default)]
pub struct Hooks {
    /// Used instead of the configured source (a camera double, say).
    pub source: Option<Box<dyn FrameSource>>,
    /// Called in the inference stage before each part is inferred (to inject a delay).
    pub before_inference: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    /// Receives every station event.
    pub events: Option<Sender<Event>>,
    /// GPIO outputs used instead of the character device.
    pub gpio: Option<Box<dyn GpioOutputs>>,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub captured: u64,
    pub ok: u64,
    pub ng: u64,
    pub err: u64,
    pub deadline_misses: u64,
    pub failures: u64,
    pub drops: u64,
    pub late: u64,
    pub serial_dropped: u64,
    pub late_rejects: u64,
    pub seconds: f64,
    /// Capture-to-signal p50 and p99 (milliseconds) over the last 1,024 parts.
    pub latency_ms: Option<(f64, f64)>,
    /// The last status line.
    pub status: String,
}

/// Where events and results go besides the result stream.
struct Outputs {
    serial: Option<Sender<String>>,
    json: Option<Mutex<Box<dyn Write + Send>>>,
    observer: Option<Sender<Event>>,
    gpio: Option<Sender<GpioMsg>>,
}

impl Outputs {
    fn event(&self, event: &Event) {
        match event {
            Event::Fault(reason) => log::warn!("FAULT {reason}"),
            other => log::info!("{other:?}"),
        }
        if let Some(serial) = &self.serial {
            let _ = serial.send(protocol::event_line(event));
        }
        if let Some(json) = &self.json {
            let value = match event {
                Event::Ready => serde_json::json!({"event": "ready"}),
                Event::Fault(r) => serde_json::json!({"event": "fault", "reason": r}),
                Event::Reloaded(Ok(t)) => serde_json::json!({"event": "reloaded", "threshold": t}),
                Event::Reloaded(Err(r)) => {
                    serde_json::json!({"event": "reload_refused", "reason": r})
                }
                Event::Status(s) => serde_json::json!({"event": "status", "status": s}),
            };
            write_json(json, &value.to_string());
        }
        if let Some(gpio) = &self.gpio {
            match event {
                Event::Ready => drop(gpio.send(GpioMsg::State(true))),
                Event::Fault(_) => drop(gpio.send(GpioMsg::State(false))),
                _ => {}
            }
        }
        if let Some(observer) = &self.observer {
            let _ = observer.send(event.clone());
        }
    }
}

fn write_json(json: &Mutex<Box<dyn Write + Send>>, line: &str) {
    if let Ok(mut w) = json.lock() {
        if let Err(e) = writeln!(w, "{line}").and_then(|_| w.flush()) {
            log::warn!("JSON output: {e}");
        }
    }
}

/// Faults by origin; READY once none is left.
struct Health {
    faults: Mutex<BTreeMap<&'static str, String>>,
    stats: Arc<Stats>,
    outputs: Arc<Outputs>,
}

impl Health {
    fn fault(&self, origin: &'static str, reason: String) {
        let mut faults = self.faults.lock().expect("health lock");
        if faults.get(origin) != Some(&reason) {
            faults.insert(origin, reason.clone());
            self.stats.fault.store(true, Ordering::Relaxed);
            drop(faults);
            self.outputs
                .event(&Event::Fault(format!("{origin}: {reason}")));
        }
    }

    fn clear(&self, origin: &'static str) {
        let mut faults = self.faults.lock().expect("health lock");
        if faults.remove(origin).is_some() && faults.is_empty() {
            self.stats.fault.store(false, Ordering::Relaxed);
            drop(faults);
            self.outputs.event(&Event::Ready);
        }
    }
}

enum GpioMsg {
    /// A rejected part captured at this instant.
    Reject(Instant),
    /// READY (true) or FAULT (false).
    State(bool),
}

/// The JSON line of a part (JSON output and audit).
pub fn json_line(d: &Decided) -> String {
    let ms = |t: Duration| (t.as_secs_f64() * 1e6).round() / 1e3;
    let timings: serde_json::Map<String, serde_json::Value> = super::STAGES[..4]
        .iter()
        .zip(d.timings)
        .map(|(name, t)| (name.to_string(), ms(t).into()))
        .collect();
    serde_json::json!({
        "id": d.id,
        "name": d.name,
        "verdict": d.verdict.as_str(),
        "score": d.score,
        "normalized": d.normalized,
        "reason": d.reason,
        "captured": chrono::DateTime::<chrono::Utc>::from(d.captured_wall)
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "latency_ms": ms(d.latency()),
        "timings_ms": timings,
    })
    .to_string()
}

/// The image as the model takes it: `vigil score`'s preprocessing for files, and the same
/// channel conversion and resize for frames already in memory.
pub fn preprocess(frame: Frame, spec: &InputSpec) -> Result<Image> {
    match frame {
        Frame::File(path) => image::load_image(&path, spec),
        Frame::Pixels(img) => {
            let converted = match (img.channels, spec.channels) {
                (a, b) if a == b => img,
                (1, 3) => Image {
                    channels: 3,
                    height: img.height,
                    width: img.width,
                    data: img.data.repeat(3),
                },
                (3, 1) => {
                    // Rec. 709 luma, the weights the `image` crate uses for files.
                    let mut grey = Image::zeros(1, img.height, img.width);
                    let (r, g, b) = (img.plane(0), img.plane(1), img.plane(2));
                    for (i, v) in grey.data.iter_mut().enumerate() {
                        *v = 0.2126 * r[i] + 0.7152 * g[i] + 0.0722 * b[i];
                    }
                    grey
                }
                (a, b) => {
                    return Err(Error::invalid(
                        "frame",
                        format!("{a} channels for a model of {b}"),
                    ))
                }
            };
            Ok(converted.resize(spec.height, spec.width))
        }
    }
}

fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let until = Instant::now() + total;
    while !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawn station thread")
}

struct SourceStage {
    source: Box<dyn FrameSource>,
    triggered: Option<Receiver<()>>,
    out: Sender<Part>,
    in_flight: Arc<InFlight>,
    stats: Arc<Stats>,
    health: Arc<Health>,
    stop: Arc<AtomicBool>,
}

impl SourceStage {
    /// Waits for the next trigger or pacing slot; false when stopping.
    fn wait_turn(&self, next_at: &mut Instant, period: Option<Duration>) -> bool {
        if let Some(trigger) = &self.triggered {
            while !self.stop.load(Ordering::Relaxed) {
                if trigger.recv_timeout(Duration::from_millis(50)).is_ok() {
                    return true;
                }
            }
            return false;
        }
        if let Some(period) = period {
            let now = Instant::now();
            if *next_at > now {
                sleep_unless(&self.stop, *next_at - now);
            }
            // After a stall, keep the rate from here instead of bursting to catch up.
            *next_at = (*next_at + period).max(Instant::now());
        }
        !self.stop.load(Ordering::Relaxed)
    }

    fn run(mut self) -> u64 {
        let period = (self.source.rate_hz() > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / self.source.rate_hz()));
        // Paced or triggered parts cannot wait for a full pipeline: they are dropped (fail-safe).
        let may_drop = period.is_some() || self.triggered.is_some();
        let mut backoff = BACKOFF_MIN;
        let mut open = false;
        let mut next_id = 0u64;
        let mut next_at = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if !open {
                match self.source.open() {
                    Ok(()) => {
                        open = true;
                        backoff = BACKOFF_MIN;
                        self.health.clear("source");
                    }
                    Err(e) => {
                        self.health.fault("source", e.to_string());
                        sleep_unless(&self.stop, backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
            if !self.wait_turn(&mut next_at, period) {
                break;
            }
            let start = Instant::now();
            let (name, frame) = match self.source.grab() {
                Ok(Some(grabbed)) => grabbed,
                Ok(None) => break,
                Err(e) => {
                    self.health.fault("source", e.to_string());
                    open = false;
                    continue;
                }
            };
            let mut part = Part::new(next_id, name, frame, start);
            part.timings[0] = start.elapsed();
            self.stats.record(0, part.timings[0]);
            self.in_flight.register(Pending {
                id: part.id,
                name: part.name.clone(),
                captured: part.captured,
                captured_wall: part.captured_wall,
                dropped: false,
            });
            next_id += 1;
            if !self.hand_on(part, may_drop) {
                break;
            }
        }
        next_id
    }

    /// False when the pipeline is gone.
    fn hand_on(&self, mut part: Part, may_drop: bool) -> bool {
        let id = part.id;
        if may_drop {
            return match self.out.try_send(part) {
                Ok(()) => {
                    self.stats.passed(0);
                    true
                }
                Err(TrySendError::Full(_)) => {
                    self.stats.drops.fetch_add(1, Ordering::Relaxed);
                    self.in_flight.mark_dropped(id);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            };
        }
        loop {
            match self.out.send_timeout(part, Duration::from_millis(50)) {
                Ok(()) => {
                    self.stats.passed(0);
                    return true;
                }
                Err(SendTimeoutError::Timeout(p)) if !self.stop.load(Ordering::Relaxed) => part = p,
                Err(_) => {
                    self.in_flight.mark_dropped(id);
                    return false;
                }
            }
        }
    }
}

fn preprocess_stage(rx: Receiver<Part>, tx: Sender<Part>, spec: InputSpec, stats: Arc<Stats>) {
    for mut part in rx {
        let start = Instant::now();
        if let Some(frame) = part.frame.take() {
            match preprocess(frame, &spec) {
                Ok(img) => part.image = Some(img),
                Err(e) => part.failure = Some(e.to_string()),
            }
        }
        part.timings[1] = start.elapsed();
        stats.record(1, part.timings[1]);
        stats.passed(1);
        if tx.send(part).is_err() {
            break;
        }
    }
}

fn inference_stage(
    rx: Receiver<Part>,
    tx: Sender<Part>,
    method: Box<dyn Method>,
    device: Device,
    hook: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    stats: Arc<Stats>,
) {
    for mut part in rx {
        if let (Some(img), None) = (&part.image, &part.failure) {
            if let Some(hook) = &hook {
                hook(part.id);
            }
            let start = Instant::now();
            // Exactly `vigil score`'s call: one image, batch of one.
            match score_images(method.as_ref(), &[img], 1, &device, false) {
                Ok(scored) => part.scored = Some((scored.scores[0], scored.maps)),
                Err(e) => part.failure = Some(e.to_string()),
            }
            part.timings[2] = start.elapsed();
            stats.record(2, part.timings[2]);
        }
        stats.passed(2);
        if tx.send(part).is_err() {
            break;
        }
    }
}

struct DecisionStage {
    decider: Decider,
    rx: Receiver<Part>,
    tx: Sender<Decided>,
    in_flight: Arc<InFlight>,
    stats: Arc<Stats>,
    outputs: Arc<Outputs>,
    reload: Arc<AtomicBool>,
    reload_poll: Option<Duration>,
    source_done: Arc<AtomicBool>,
    keep_evidence: bool,
}

impl DecisionStage {
    fn emit(&self, d: Decided) -> bool {
        if let Some(reason) = &d.reason {
            match reason.as_str() {
                "deadline" => self.stats.deadline_misses.fetch_add(1, Ordering::Relaxed),
                "dropped" => 0,
                _ => self.stats.failures.fetch_add(1, Ordering::Relaxed),
            };
        }
        self.tx.send(d).is_ok()
    }

    /// Gives the fail-safe verdict to dropped parts and parts past their deadline at the front.
    fn expire(&self, everything: bool) -> bool {
        let now = Instant::now();
        while let Some(front) = self.in_flight.front() {
            let reason = if front.dropped {
                "dropped"
            } else if now.duration_since(front.captured) > self.decider.deadline {
                "deadline"
            } else if everything {
                "lost"
            } else {
                break;
            };
            let pending = self.in_flight.pop_front().expect("front exists");
            if !self.emit(self.decider.fail_safe(pending, reason)) {
                return false;
            }
        }
        true
    }

    fn run(mut self) {
        let mut next_poll = Instant::now();
        loop {
            let reload_asked = self.reload.swap(false, Ordering::Relaxed);
            let poll_due = self
                .reload_poll
                .is_some_and(|_| Instant::now() >= next_poll);
            if poll_due {
                next_poll = Instant::now() + self.reload_poll.expect("poll set");
            }
            if reload_asked || (poll_due && self.decider.file_changed()) {
                let result = self.decider.reload();
                match &result {
                    Ok(t) => log::info!("calibration reloaded: threshold {t}"),
                    Err(e) => log::warn!("calibration reload refused, old one stays: {e}"),
                }
                self.outputs.event(&Event::Reloaded(result));
            }
            if !self.expire(false) {
                return;
            }
            if self.source_done.load(Ordering::Relaxed) && self.in_flight.is_empty() {
                return;
            }
            let wait = self
                .in_flight
                .front()
                .map_or(Duration::from_millis(50), |f| {
                    (f.captured + self.decider.deadline).saturating_duration_since(Instant::now())
                })
                .clamp(Duration::from_millis(1), Duration::from_millis(50));
            match self.rx.recv_timeout(wait) {
                Ok(part) => {
                    self.stats.passed(3);
                    if !self.take(part) {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.expire(true);
                    return;
                }
            }
        }
    }

    fn take(&self, mut part: Part) -> bool {
        loop {
            match self.in_flight.front() {
                Some(f) if f.id < part.id => {
                    let pending = self.in_flight.pop_front().expect("front exists");
                    let reason = if pending.dropped { "dropped" } else { "lost" };
                    if !self.emit(self.decider.fail_safe(pending, reason)) {
                        return false;
                    }
                }
                Some(f) if f.id == part.id => {
                    self.in_flight.pop_front();
                    let start = Instant::now();
                    let mut timings = part.timings;
                    part.timings = [Duration::ZERO; 5];
                    let mut d = self.decider.decide(part, self.keep_evidence);
                    timings[3] = start.elapsed();
                    d.timings = timings;
                    self.stats.record(3, timings[3]);
                    return self.emit(d);
                }
                _ => {
                    // Already given the fail-safe verdict.
                    self.stats.late.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
            }
        }
    }
}

struct SignalStage {
    rx: Receiver<Decided>,
    outputs: Arc<Outputs>,
    audit: Option<Sender<(Decided, String)>>,
    stats: Arc<Stats>,
    notifier: Arc<Notifier>,
}

impl SignalStage {
    fn run(self) {
        let mut line = String::with_capacity(96);
        let mut first = true;
        for mut d in self.rx {
            let start = Instant::now();
            if let Some(serial) = &self.outputs.serial {
                protocol::result_line(&d, &mut line);
                let _ = serial.send(line.clone());
            }
            let json = (self.outputs.json.is_some() || self.audit.is_some()).then(|| json_line(&d));
            if let (Some(out), Some(json)) = (&self.outputs.json, &json) {
                write_json(out, json);
            }
            if let Some(gpio) = &self.outputs.gpio {
                if d.verdict != Verdict::Ok {
                    let _ = gpio.send(GpioMsg::Reject(d.captured));
                }
            }
            self.stats.count(d.verdict);
            d.timings[4] = start.elapsed();
            self.stats.record(4, d.timings[4]);
            self.stats.record(5, d.latency());
            self.stats.passed(4);
            if first {
                self.notifier.ready();
                first = false;
            }
            if let (Some(audit), Some(json)) = (&self.audit, json) {
                if d.verdict != Verdict::Ok && audit.try_send((d, json)).is_err() {
                    self.stats.audit_skipped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

fn audit_stage(rx: Receiver<(Decided, String)>, mut audit: Audit) {
    for (d, json) in rx {
        if let Err(e) = audit.store(&d, &json) {
            log::warn!("audit of part {}: {e}", d.id);
        }
    }
}

fn gpio_stage(
    rx: Receiver<GpioMsg>,
    mut out: Box<dyn GpioOutputs>,
    mut timer: RejectTimer,
    encoder: Option<Arc<Encoder>>,
    stats: Arc<Stats>,
) -> u64 {
    let origin = Instant::now();
    let us = |t: Instant| t.saturating_duration_since(origin).as_micros() as u64;
    let position = |t: Instant| encoder.as_ref().map_or_else(|| us(t), |e| e.count_at(t));
    let next_wait = |timer: &RejectTimer| {
        let now = us(Instant::now());
        match timer.next_change_us(now, encoder.is_none()) {
            // Encoder counts cannot be predicted: look again every millisecond.
            _ if encoder.is_some() && timer.pending() > 0 => Duration::from_millis(1),
            Some(w) => Duration::from_micros(w),
            None => Duration::from_millis(100),
        }
    };
    let mut closed = false;
    loop {
        if closed {
            if timer.pending() == 0 && timer.next_change_us(us(Instant::now()), true).is_none() {
                break;
            }
            std::thread::sleep(next_wait(&timer));
        } else {
            match rx.recv_timeout(next_wait(&timer)) {
                Ok(GpioMsg::Reject(captured)) => {
                    if !timer.reject(position(captured), position(Instant::now())) {
                        log::error!("reject verdict arrived after its part passed the ejector");
                        stats.fault.store(true, Ordering::Relaxed);
                    }
                }
                Ok(GpioMsg::State(ready)) => {
                    if let Err(e) = gpio::set_state(out.as_mut(), ready) {
                        log::warn!("GPIO state: {e}");
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Finish the pulses still due, then leave the outputs in FAULT.
                Err(RecvTimeoutError::Disconnected) => closed = true,
            }
        }
        let now = Instant::now();
        if let Err(e) = timer.poll(position(now), us(now), out.as_mut()) {
            log::warn!("GPIO reject output: {e}");
        }
    }
    let _ = gpio::set_state(out.as_mut(), false);
    timer.late
}

fn open_json(path: &Path) -> Result<Box<dyn Write + Send>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(std::io::stdout()));
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    Ok(Box::new(std::io::LineWriter::new(file)))
}

/// Counts encoder edges on `line`.
#[cfg(feature = "gpio")]
fn encoder(chip: &Path, line: u32, stop: &Arc<AtomicBool>) -> Result<Arc<Encoder>> {
    let encoder = Arc::new(Encoder::default());
    gpio::cdev::spawn_encoder(chip, line, encoder.clone(), stop.clone())?;
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
            Some(encoder(&g.chip, line, stop)?),
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
        let lines = gpio::cdev::Outputs::open(&g.chip, g.reject_line, g.ready_line, g.fault_line)?;
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
    let (meta, method) = crate::commands::open_model(&cfg.model, &device)?;
    let model_sha = crate::model_file::file_sha256(&cfg.model)?;
    let roi = cfg
        .decision
        .roi
        .as_deref()
        .map(|p| (p, meta.input.height, meta.input.width));
    let decider = Decider::new(
        &cfg.calibration,
        &model_sha,
        roi,
        Duration::from_millis(cfg.decision.deadline_ms),
        cfg.decision.on_failure,
    )?;
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
    let audit = match &cfg.audit {
        Some(a) => Some(Audit::open(
            &a.dir,
            a.max_parts,
            a.max_bytes,
            heatmap_range(&meta),
        )?),
        None => None,
    };
    let json = match &cfg.json {
        Some(j) => Some(Mutex::new(open_json(&j.path)?)),
        None => None,
    };
    let gpio = gpio_outputs(cfg, &mut hooks, &controls.stop)?;
    #[cfg(not(feature = "gpio"))]
    if matches!(cfg.trigger, TriggerConfig::Gpio { .. }) {
        return Err(Error::config(
            "trigger.kind",
            "`gpio` needs a vigil built with `--features gpio`",
        ));
    }

    let stats = Arc::new(Stats::new());
    let notifier = Arc::new(Notifier::from_env());
    let q = cfg.pipeline.queue;
    let (serial_tx, serial_rx) = bounded::<String>(1024);
    let (gpio_tx, gpio_rx) = bounded::<GpioMsg>(1024);
    let outputs = Arc::new(Outputs {
        serial: cfg.serial.as_ref().map(|_| serial_tx.clone()),
        json,
        observer: hooks.events.take(),
        gpio: gpio.as_ref().map(|_| gpio_tx.clone()),
    });
    drop((serial_tx, gpio_tx));
    let health = Arc::new(Health {
        faults: Mutex::new(BTreeMap::from([("source", "not started".to_string())])),
        stats: stats.clone(),
        outputs: outputs.clone(),
    });
    stats.fault.store(true, Ordering::Relaxed);

    let gpio_handle = gpio.map(|(out, timer, encoder)| {
        let stats = stats.clone();
        spawn("signal-gpio", move || {
            gpio_stage(gpio_rx, out, timer, encoder, stats)
        })
    });

    let (trigger_tx, trigger_rx) = bounded::<()>(16);
    let triggered = (cfg.trigger != TriggerConfig::FreeRun).then_some(trigger_rx);
    #[cfg(feature = "gpio")]
    if let TriggerConfig::Gpio { chip, line, edge } = &cfg.trigger {
        super::gpio::cdev::spawn_trigger(
            chip,
            *line,
            edge == "rising",
            trigger_tx.clone(),
            controls.stop.clone(),
        )?;
    }
    let serial_handle = cfg.serial.clone().map(|scfg| {
        // Weak: the writer ends when the last strong `Outputs` (its line sender) is dropped.
        let (stats_c, outputs_w, reload) = (
            stats.clone(),
            Arc::downgrade(&outputs),
            controls.reload.clone(),
        );
        let trigger = trigger_tx.clone();
        let commands: serial::CommandSink = Arc::new(move |cmd: Command| {
            let Some(outputs_c) = outputs_w.upgrade() else {
                return;
            };
            let reply = |line: String| {
                if let Some(s) = &outputs_c.serial {
                    let _ = s.send(line);
                }
            };
            match cmd {
                Command::Trigger => {
                    if trigger.try_send(()).is_err() {
                        reply("NAK TRIG busy\r\n".into());
                    }
                }
                Command::Status => {
                    let mut since = (Instant::now(), stats_c.decided());
                    outputs_c.event(&Event::Status(stats_c.status_line(&mut since)));
                }
                Command::Reload => reload.store(true, Ordering::Relaxed),
                Command::Ping => reply("PONG\r\n".into()),
                Command::Unknown(word) => reply(format!("NAK {word} unknown command\r\n")),
            }
        });
        let weak_health = Arc::downgrade(&health);
        let port_health: serial::PortHealth = Arc::new(move |lost: Option<String>| {
            if let Some(h) = weak_health.upgrade() {
                match lost {
                    Some(reason) => h.fault("serial", reason),
                    None => h.clear("serial"),
                }
            }
        });
        serial::start(scfg, serial_rx, stats.clone(), commands, port_health).handle
    });
    drop(trigger_tx);

    let in_flight = Arc::new(InFlight::default());
    let source_done = Arc::new(AtomicBool::new(false));
    let (src_tx, pre_rx) = bounded::<Part>(q);
    let (pre_tx, inf_rx) = bounded::<Part>(q);
    let (inf_tx, dec_rx) = bounded::<Part>(q);
    let (dec_tx, sig_rx) = bounded::<Decided>(q);
    let (audit_tx, audit_rx) = bounded::<(Decided, String)>(64);

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
        })
    };
    let spec = meta.input;
    let pre_handle = {
        let stats = stats.clone();
        spawn("preprocess", move || {
            preprocess_stage(pre_rx, pre_tx, spec, stats)
        })
    };
    let inf_handle = {
        let (stats, hook) = (stats.clone(), hooks.before_inference.take());
        spawn("inference", move || {
            inference_stage(inf_rx, inf_tx, method, device, hook, stats)
        })
    };
    let dec_handle = {
        let stage = DecisionStage {
            decider,
            rx: dec_rx,
            tx: dec_tx,
            in_flight: in_flight.clone(),
            stats: stats.clone(),
            outputs: outputs.clone(),
            reload: controls.reload.clone(),
            reload_poll: (cfg.decision.reload_poll_ms > 0)
                .then(|| Duration::from_millis(cfg.decision.reload_poll_ms)),
            source_done: source_done.clone(),
            keep_evidence: audit.is_some(),
        };
        spawn("decision", move || stage.run())
    };
    let audit_handle = audit.map(|a| spawn("audit", move || audit_stage(audit_rx, a)));
    let sig_handle = {
        let stage = SignalStage {
            rx: sig_rx,
            outputs: outputs.clone(),
            audit: audit_handle.as_ref().map(|_| audit_tx.clone()),
            stats: stats.clone(),
            notifier: notifier.clone(),
        };
        spawn("signal", move || stage.run())
    };
    drop(audit_tx);

    // Status lines and the systemd watchdog, until the signal stage is done.
    let status_every =
        (cfg.status.interval_s > 0.0).then(|| Duration::from_secs_f64(cfg.status.interval_s));
    let mut next_status = Instant::now() + status_every.unwrap_or(Duration::MAX / 4);
    let mut next_watchdog = Instant::now();
    let mut stall = StallCheck::new();
    let mut since = (Instant::now(), 0u64);
    while !sig_handle.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if now >= next_status {
            let line = stats.status_line(&mut since);
            log::info!("status: {line}");
            notifier.status(&line);
            next_status = now + status_every.expect("status interval set");
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
    let _ = sig_handle.join();
    if let Some(h) = audit_handle {
        let _ = h.join();
    }
    // A hung stage is left behind: every part already has its verdict.
    for (name, h) in [("preprocess", pre_handle), ("inference", inf_handle)] {
        if h.is_finished() {
            let _ = h.join();
        } else {
            log::error!("stage {name} did not finish; leaving it");
        }
    }
    drop(health);
    drop(outputs);
    if let Some(h) = serial_handle {
        let _ = h.join();
    }
    let late_rejects = gpio_handle.map_or(0, |h| h.join().unwrap_or(0));
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let [ok, ng, err] = stats.counts();
    let mut since = (started, 0);
    Ok(Summary {
        captured,
        ok,
        ng,
        err,
        deadline_misses: load(&stats.deadline_misses),
        failures: load(&stats.failures),
        drops: load(&stats.drops),
        late: load(&stats.late),
        serial_dropped: load(&stats.serial_dropped),
        late_rejects,
        seconds: started.elapsed().as_secs_f64(),
        latency_ms: stats.percentiles_ms(5),
        status: stats.status_line(&mut since),
    })
}
