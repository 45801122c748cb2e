//! Where verdicts and events go: the serial line, the JSON file, the GPIO reject pulse, the audit
//! folder and observers. Each output has its own bounded [`DropQueue`] and its own thread, so no
//! output can hold up a stage or another output; the reject pulse is queued first.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::audit::{Audit, Stored};
use super::gpio::{self, Encoder, GpioOutputs, RejectTimer};
use super::health::Health;
use super::protocol;
use super::queue::{DropQueue, Loss, Next, PartEntry};
use super::status::Stats;
use super::{Decided, Event, Verdict};
use crate::error::{Error, Result};

/// How long queued lines may wait for a failing output at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Pause between attempts to write a JSON line that failed (full disk).
const JSON_RETRY: Duration = Duration::from_millis(200);
/// Queue bounds of the outputs that have no configured bound.
const JSON_QUEUE: usize = 10_000;
const AUDIT_QUEUE: usize = 64;
const GPIO_QUEUE: usize = 4096;

/// A line for the PLC; results carry their part id.
#[derive(Debug)]
pub struct SerialLine {
    pub text: String,
    pub id: Option<u64>,
}

impl PartEntry for SerialLine {
    fn part_id(&self) -> Option<u64> {
        self.id
    }
}

#[derive(Debug)]
pub struct JsonLine {
    text: String,
    id: Option<u64>,
}

impl PartEntry for JsonLine {
    fn part_id(&self) -> Option<u64> {
        self.id
    }
}

pub struct AuditEntry {
    decided: Decided,
    json: String,
}

impl PartEntry for AuditEntry {
    fn part_id(&self) -> Option<u64> {
        Some(self.decided.id)
    }
}

pub enum GpioMsg {
    /// A rejected part captured at this instant.
    Reject { id: u64, captured: Instant },
    /// READY (true) or FAULT (false).
    State(bool),
}

impl PartEntry for GpioMsg {
    fn part_id(&self) -> Option<u64> {
        match self {
            GpioMsg::Reject { id, .. } => Some(*id),
            GpioMsg::State(_) => None,
        }
    }
}

/// The queues of the outputs a station has.
pub struct Outputs {
    /// This run's identifier (docs/protocol.md).
    pub run: u64,
    pub serial: Option<Arc<DropQueue<SerialLine>>>,
    pub json: Option<Arc<DropQueue<JsonLine>>>,
    pub gpio: Option<Arc<DropQueue<GpioMsg>>>,
    pub audit: Option<Arc<DropQueue<AuditEntry>>>,
    observer: Option<Sender<Event>>,
    stats: Arc<Stats>,
}

/// Which outputs to create.
pub struct OutputSet {
    pub serial_queue: Option<usize>,
    pub json: bool,
    pub gpio: bool,
    pub audit: bool,
    pub observer: Option<Sender<Event>>,
}

impl Outputs {
    pub fn new(run: u64, set: OutputSet, stats: Arc<Stats>) -> Outputs {
        Outputs {
            run,
            serial: set.serial_queue.map(|n| Arc::new(DropQueue::new(n))),
            json: set.json.then(|| Arc::new(DropQueue::new(JSON_QUEUE))),
            gpio: set.gpio.then(|| Arc::new(DropQueue::new(GPIO_QUEUE))),
            audit: set.audit.then(|| Arc::new(DropQueue::new(AUDIT_QUEUE))),
            observer: set.observer,
            stats,
        }
    }

    /// A station event, from `origin` (its own faults the serial writer reports itself).
    pub fn event(&self, event: &Event, origin: &str) {
        match event {
            Event::Fault(reason) => log::warn!("FAULT {reason}"),
            other => log::info!("{other:?}"),
        }
        if let Some(serial) = &self.serial {
            if origin != "serial" || !matches!(event, Event::Fault(_)) {
                serial.push(SerialLine {
                    text: protocol::event_line(event, self.run),
                    id: None,
                });
            }
        }
        if let Some(json) = &self.json {
            let value = match event {
                Event::Ready => serde_json::json!({"event": "ready", "run": self.run}),
                Event::Fault(r) => serde_json::json!({"event": "fault", "reason": r}),
                Event::Reloaded(Ok(t)) => serde_json::json!({"event": "reloaded", "threshold": t}),
                Event::Reloaded(Err(r)) => {
                    serde_json::json!({"event": "reload_refused", "reason": r})
                }
                Event::ModelReloaded(Ok((t, sha))) => serde_json::json!({
                    "event": "model_reloaded", "threshold": t, "model_sha256": sha
                }),
                Event::ModelReloaded(Err(r)) => {
                    serde_json::json!({"event": "model_reload_refused", "reason": r})
                }
                Event::Status(s) => serde_json::json!({"event": "status", "status": s}),
            };
            json.push(JsonLine {
                text: value.to_string(),
                id: None,
            });
        }
        if let Some(gpio) = &self.gpio {
            match event {
                Event::Ready => drop(gpio.push(GpioMsg::State(true))),
                Event::Fault(_) => drop(gpio.push(GpioMsg::State(false))),
                _ => {}
            }
        }
        if let Some(observer) = &self.observer {
            if observer.try_send(event.clone()).is_err() {
                self.stats.observer_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A reply to a PLC command.
    pub fn reply(&self, text: String) {
        if let Some(serial) = &self.serial {
            serial.push(SerialLine { text, id: None });
        }
    }

    /// Hands a verdict to every output, the reject pulse first; never waits. False when the
    /// GPIO queue overflowed (a reject pulse may have been lost: the caller raises a fault).
    pub fn result(&self, d: Decided, line: &mut String) -> bool {
        let mut pulse_kept = true;
        if let Some(gpio) = &self.gpio {
            if d.verdict != Verdict::Ok {
                pulse_kept = gpio.push(GpioMsg::Reject {
                    id: d.id,
                    captured: d.captured,
                });
            }
        }
        if let Some(serial) = &self.serial {
            protocol::result_line(&d, self.run, false, line);
            serial.push(SerialLine {
                text: line.clone(),
                id: Some(d.id),
            });
        }
        let audited = self.audit.as_ref().filter(|_| d.verdict != Verdict::Ok);
        if self.json.is_some() || audited.is_some() {
            let text = json_line(&d, self.run);
            if let Some(json) = &self.json {
                json.push(JsonLine {
                    text: text.clone(),
                    id: Some(d.id),
                });
            }
            if let Some(audit) = audited {
                audit.push(AuditEntry {
                    decided: d,
                    json: text,
                });
            }
        }
        pulse_kept
    }

    /// No more entries: each output's thread writes what is queued and ends.
    pub fn close(&self) {
        if let Some(q) = &self.serial {
            q.close();
        }
        if let Some(q) = &self.json {
            q.close();
        }
        if let Some(q) = &self.gpio {
            q.close();
        }
        if let Some(q) = &self.audit {
            q.close();
        }
    }
}

/// The JSON line of a part (JSON output and audit).
pub fn json_line(d: &Decided, run: u64) -> String {
    let ms = |t: Duration| (t.as_secs_f64() * 1e6).round() / 1e3;
    let timings: serde_json::Map<String, serde_json::Value> = super::STAGES[..4]
        .iter()
        .zip(d.timings)
        .map(|(name, t)| (name.to_string(), ms(t).into()))
        .collect();
    serde_json::json!({
        "id": d.id,
        "run": run,
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

fn lost_json(loss: &Loss, run: u64) -> String {
    let (first, last) = loss.ids.map_or((None, None), |(a, b)| (Some(a), Some(b)));
    serde_json::json!({
        "event": "lost",
        "count": loss.count,
        "first_id": first,
        "last_id": last,
        "run": run,
    })
    .to_string()
}

/// Where JSON lines are appended.
pub enum JsonSink {
    Stdout,
    File {
        file: std::fs::File,
        path: PathBuf,
    },
    /// A writer supplied by the caller (tests stand in a failing disk with one).
    Writer(Box<dyn Write + Send>),
}

impl JsonSink {
    /// A file to append to, or `-` for stdout.
    pub fn open(path: &Path) -> Result<JsonSink> {
        if path.as_os_str() == "-" {
            return Ok(JsonSink::Stdout);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::config("json.path", format!("{}: {e}", path.display())))?;
        Ok(JsonSink::File {
            file,
            path: path.to_path_buf(),
        })
    }

    fn name(&self) -> String {
        match self {
            JsonSink::Stdout => "stdout".into(),
            JsonSink::File { path, .. } => path.display().to_string(),
            JsonSink::Writer(_) => "writer".into(),
        }
    }

    /// Appends one whole line (`text` ends in a newline) in one write; a write that fails part
    /// way is cut back, so a full disk leaves no half line behind.
    fn append(&mut self, text: &[u8]) -> std::io::Result<()> {
        match self {
            JsonSink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(text).and_then(|_| out.flush())
            }
            JsonSink::File { file, .. } => {
                let before = file.metadata()?.len();
                file.write_all(text).inspect_err(|_| {
                    // A character device (/dev/full) has no length to restore.
                    let _ = file.set_len(before);
                })
            }
            JsonSink::Writer(w) => w.write_all(text).and_then(|_| w.flush()),
        }
    }
}

/// The JSON output's thread: appends lines in order. A failed write raises FAULT `json` until a
/// write succeeds again; the line is retried, and what overflows meanwhile is marked by a
/// `{"event": "lost", ...}` line.
pub fn json_writer(
    queue: Arc<DropQueue<JsonLine>>,
    mut sink: JsonSink,
    run: u64,
    health: Arc<Health>,
    stats: Arc<Stats>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut in_hand: Option<String> = None;
    // Set once the queue is closed while writes fail: how long shutdown has waited.
    let mut failing_since_close: Option<Instant> = None;
    loop {
        let text = match in_hand.take() {
            Some(text) => text,
            None => match queue.pop_timeout(Duration::from_millis(200)) {
                Some(Next::Entry(line)) => line.text,
                Some(Next::Lost(loss)) => {
                    stats.json_lost.fetch_add(loss.count, Ordering::Relaxed);
                    lost_json(&loss, run)
                }
                Some(Next::Closed) => break,
                None => continue,
            },
        };
        buf.clear();
        buf.extend_from_slice(text.as_bytes());
        buf.push(b'\n');
        match sink.append(&buf) {
            Ok(()) => health.clear("json"),
            Err(e) => {
                stats.json_failed.fetch_add(1, Ordering::Relaxed);
                health.fault("json", format!("cannot write {}: {e}", sink.name()));
                if queue.is_closed() {
                    let since = *failing_since_close.get_or_insert_with(Instant::now);
                    if since.elapsed() > SHUTDOWN_GRACE {
                        let left = queue.len() as u64 + 1;
                        stats.json_lost.fetch_add(left, Ordering::Relaxed);
                        log::error!(
                            "JSON output {}: {left} lines not written at shutdown",
                            sink.name()
                        );
                        return;
                    }
                }
                in_hand = Some(text);
                std::thread::sleep(JSON_RETRY);
            }
        }
    }
}

/// The audit folder's thread.
pub fn audit_writer(
    queue: Arc<DropQueue<AuditEntry>>,
    mut audit: Audit,
    health: Arc<Health>,
    stats: Arc<Stats>,
) {
    let mut skipped_logged = 0u64;
    loop {
        match queue.pop_timeout(Duration::from_secs(1)) {
            Some(Next::Entry(entry)) => match audit.store(&entry.decided, &entry.json) {
                Ok(Stored::Kept) => health.clear("audit"),
                Ok(Stored::Skipped(why)) => {
                    let n = stats.audit_skipped.fetch_add(1, Ordering::Relaxed);
                    // The first, then one in a hundred: a full disk must not flood the log.
                    if n == 0 || n >= skipped_logged + 100 {
                        log::warn!("audit of part {} skipped: {why}", entry.decided.id);
                        skipped_logged = n;
                    }
                }
                Err(e) => {
                    stats.audit_failed.fetch_add(1, Ordering::Relaxed);
                    health.fault("audit", format!("part {}: {e}", entry.decided.id));
                }
            },
            Some(Next::Lost(loss)) => {
                stats.audit_skipped.fetch_add(loss.count, Ordering::Relaxed);
                log::warn!(
                    "audit could not keep up: {} rejected parts not stored{}",
                    loss.count,
                    loss.ids
                        .map_or(String::new(), |(a, b)| format!(" (ids {a}-{b})"))
                );
            }
            Some(Next::Closed) => return,
            None => {}
        }
    }
}

/// The GPIO output's thread: reject pulses at their ejector position, and the READY/FAULT lines.
/// It waits on nothing but its own queue and the pulse timing; it returns the rejects it pulsed and
/// those that came too late.
pub fn gpio_writer(
    queue: Arc<DropQueue<GpioMsg>>,
    mut out: Box<dyn GpioOutputs>,
    mut timer: RejectTimer,
    encoder: Option<Arc<Encoder>>,
    stats: Arc<Stats>,
) -> RejectCounts {
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
            match queue.pop_timeout(next_wait(&timer)) {
                Some(Next::Entry(GpioMsg::Reject { id, captured })) => {
                    let scheduled = timer.reject(position(captured), position(Instant::now()));
                    if !scheduled {
                        log::error!(
                            "reject verdict of part {id} arrived after it passed the ejector"
                        );
                        stats.fault.store(true, Ordering::Relaxed);
                    }
                }
                Some(Next::Entry(GpioMsg::State(ready))) => {
                    if let Err(e) = gpio::set_state(out.as_mut(), ready) {
                        log::warn!("GPIO state: {e}");
                    }
                }
                Some(Next::Lost(loss)) => {
                    log::error!("GPIO queue overflowed: {} messages lost", loss.count);
                }
                Some(Next::Closed) => closed = true,
                None => {}
            }
        }
        let now = Instant::now();
        if let Err(e) = timer.poll(position(now), us(now), out.as_mut()) {
            log::warn!("GPIO reject output: {e}");
        }
    }
    // Finish in FAULT: a stopped station must not look ready to the PLC.
    let _ = gpio::set_state(out.as_mut(), false);
    RejectCounts {
        pulsed: timer.pulsed,
        late: timer.late,
    }
}

/// What became of the reject verdicts the GPIO output received.
#[derive(Clone, Copy, Debug, Default)]
pub struct RejectCounts {
    pub pulsed: u64,
    pub late: u64,
}
