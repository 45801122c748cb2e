//! The Linux GPIO character device (`/dev/gpiochipN`) through the `gpiocdev` crate (uAPI v2).
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use gpiocdev::line::{EdgeDetection, EventClock, Value};
use gpiocdev::Request;

use super::{Encoder, GpioOutputs, OutputLine};
use crate::error::{Error, Result};

/// The consumer name `gpioinfo` shows on the lines vigil holds.
const CONSUMER: &str = "vigil";
/// How long an edge thread waits for an edge before it looks at `stop` again.
const WAIT: Duration = Duration::from_millis(50);
/// Edges the kernel buffers per line: its maximum (GPIO_V2_LINES_MAX * 16; larger requests are
/// capped), so a fast encoder does not overflow it while its thread is descheduled.
const KERNEL_EVENTS: u32 = 1024;
/// Edge events taken from the kernel in one read.
const EVENTS_PER_READ: usize = 64;

fn device_error(chip: &Path, lines: impl Display, what: &str, e: impl Display) -> Error {
    Error::Device(format!("GPIO {} line {lines}: {what}: {e}", chip.display()))
}

/// The reject, READY and FAULT output lines, requested together and driven low at first.
pub struct Outputs {
    request: Request,
    chip: PathBuf,
    /// The offset of each output, in [`OutputLine`] order.
    lines: [Option<u32>; 3],
}

impl Outputs {
    pub fn open(
        chip: &Path,
        reject: u32,
        ready: Option<u32>,
        fault: Option<u32>,
    ) -> Result<Outputs> {
        let lines = [Some(reject), ready, fault];
        let offsets: Vec<u32> = lines.iter().flatten().copied().collect();
        // gpiocdev merges a repeated offset into one line: two outputs on one wire would pass
        // unnoticed.
        if let Some(i) = (1..offsets.len()).find(|&i| offsets[..i].contains(&offsets[i])) {
            return Err(Error::Device(format!(
                "GPIO {} line {}: used by two of the reject, ready and fault outputs; each \
                 needs its own line",
                chip.display(),
                offsets[i]
            )));
        }
        let request = Request::builder()
            .on_chip(chip)
            .with_consumer(CONSUMER)
            .with_lines(&offsets)
            .as_output(Value::Inactive)
            .request()
            .map_err(|e| device_error(chip, format!("{offsets:?}"), "cannot request outputs", e))?;
        Ok(Outputs {
            request,
            chip: chip.to_path_buf(),
            lines,
        })
    }
}

impl GpioOutputs for Outputs {
    fn set(&mut self, line: OutputLine, high: bool) -> Result<()> {
        let slot = match line {
            OutputLine::Reject => 0,
            OutputLine::Ready => 1,
            OutputLine::Fault => 2,
        };
        let Some(offset) = self.lines[slot] else {
            return Ok(());
        };
        self.request
            .set_value(offset, Value::from(high))
            .map_err(|e| device_error(&self.chip, offset, &format!("cannot set {line:?}"), e))
    }
}

/// CLOCK_MONOTONIC (the clock of edge timestamps, and of `Instant` on Linux) read together with
/// an `Instant`, to date kernel timestamps as `Instant`s.
struct Clock {
    instant: Instant,
    monotonic_ns: u64,
}

impl Clock {
    fn now() -> Clock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Clock {
            instant: Instant::now(),
            monotonic_ns: (ts.tv_sec as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(ts.tv_nsec as u64),
        }
    }

    /// The instant of a CLOCK_MONOTONIC timestamp (now, for one from the future).
    fn instant_of(&self, timestamp_ns: u64) -> Instant {
        let age = Duration::from_nanos(self.monotonic_ns.saturating_sub(timestamp_ns));
        self.instant.checked_sub(age).unwrap_or(self.instant)
    }
}

/// Waits up to [`WAIT`] for edges and hands each to `on_edge` with the instant it happened
/// (events are read in batches after a wake-up, so the kernel timestamp, not the read time, says
/// when) and how many edges the kernel dropped before it (its buffer overflowed). Ok(false) when
/// `on_edge` wants no more.
fn read_edges(
    request: &Request,
    buf: &mut [u64],
    last_seqno: &mut u32,
    on_edge: &mut impl FnMut(Instant, u32) -> bool,
) -> gpiocdev::Result<bool> {
    if !request.wait_edge_event(WAIT)? {
        return Ok(true);
    }
    let words = request.read_edge_events_into_slice(buf)?;
    let clock = Clock::now();
    for raw in buf[..words.min(buf.len())].chunks_exact(request.edge_event_u64_size()) {
        let event = request.edge_event_from_slice(raw)?;
        let dropped = event.line_seqno.wrapping_sub(*last_seqno).saturating_sub(1);
        *last_seqno = event.line_seqno;
        if !on_edge(clock.instant_of(event.timestamp_ns), dropped) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Calls `on_edge` for each edge on an input line, from a thread of its own, until `stop` is set
/// (noticed within [`WAIT`]) or `on_edge` returns false.
fn watch_edges(
    chip: &Path,
    line: u32,
    edge: EdgeDetection,
    stop: Arc<AtomicBool>,
    mut on_edge: impl FnMut(Instant, u32) -> bool + Send + 'static,
) -> Result<()> {
    let request = Request::builder()
        .on_chip(chip)
        .with_consumer(CONSUMER)
        .with_kernel_event_buffer_size(KERNEL_EVENTS)
        .with_line(line)
        .with_edge_detection(edge)
        .with_event_clock(EventClock::Monotonic)
        .request()
        .map_err(|e| device_error(chip, line, "cannot request edge events", e))?;
    let name = chip.display().to_string();
    std::thread::Builder::new()
        .name(format!("gpio-line-{line}"))
        .spawn(move || {
            let mut buf = vec![0u64; request.edge_event_u64_size() * EVENTS_PER_READ];
            // The kernel numbers the edges of a line from 1: a gap is edges it dropped.
            let mut last_seqno = 0;
            let mut failures = 0u32;
            while !stop.load(Ordering::Relaxed) {
                match read_edges(&request, &mut buf, &mut last_seqno, &mut on_edge) {
                    Ok(true) => failures = 0,
                    Ok(false) => return,
                    Err(e) => {
                        // A signal (SIGHUP: reload) fails one wait with EINTR, which gpiocdev's
                        // error does not let us tell apart: retried at once. A failure that
                        // repeats is the device's: logged once per run, retried until `stop`.
                        failures = failures.saturating_add(1);
                        if failures == 2 {
                            log::error!("GPIO {name} line {line}: {e}");
                        }
                        if failures > 1 {
                            std::thread::sleep(WAIT);
                        }
                    }
                }
            }
        })
        .map_err(|e| device_error(chip, line, "cannot start its thread", e))?;
    Ok(())
}

/// Sends a trigger for each edge on `line` (rising or falling). A trigger that finds the queue
/// full is dropped, never waited for, and counted (logged at 1, 2, 4, ... drops).
pub fn spawn_trigger(
    chip: &Path,
    line: u32,
    rising: bool,
    trigger: Sender<()>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let edge = if rising {
        EdgeDetection::RisingEdge
    } else {
        EdgeDetection::FallingEdge
    };
    let name = chip.display().to_string();
    let mut ignored = 0u64;
    watch_edges(chip, line, edge, stop, move |_, dropped| {
        if dropped > 0 {
            log::warn!("GPIO {name} line {line}: the kernel dropped {dropped} trigger edges");
        }
        match trigger.try_send(()) {
            Ok(()) => true,
            Err(TrySendError::Full(())) => {
                ignored += 1;
                if ignored.is_power_of_two() {
                    log::warn!(
                        "GPIO {name} line {line}: trigger while the queue is full: ignored \
                         ({ignored} so far)"
                    );
                }
                true
            }
            // The station is gone: nobody left to trigger.
            Err(TrySendError::Disconnected(())) => false,
        }
    })
}

/// Counts rising edges of the encoder on `line`, dated by the kernel. Edges the kernel dropped
/// are still counted (at the next edge's time): the belt moved, and positions come from counts.
pub fn spawn_encoder(
    chip: &Path,
    line: u32,
    encoder: Arc<Encoder>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let name = chip.display().to_string();
    watch_edges(
        chip,
        line,
        EdgeDetection::RisingEdge,
        stop,
        move |at, dropped| {
            if dropped > 0 {
                log::warn!("GPIO {name} line {line}: the kernel dropped {dropped} encoder edges");
            }
            for _ in 0..=dropped {
                encoder.edge(at);
            }
            true
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_for_two_outputs_is_refused_before_opening_the_chip() {
        let err = Outputs::open(Path::new("/dev/gpiochip-none"), 3, Some(4), Some(3))
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(
            text.contains("/dev/gpiochip-none") && text.contains("line 3"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_chip_is_named() {
        let err = Outputs::open(Path::new("/dev/gpiochip-none"), 3, None, None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("/dev/gpiochip-none"), "{err}");
        let (tx, _rx) = crossbeam_channel::bounded(1);
        let stop = Arc::new(AtomicBool::new(false));
        let err = spawn_trigger(Path::new("/dev/gpiochip-none"), 7, true, tx, stop).unwrap_err();
        assert!(err.to_string().contains("line 7"), "{err}");
    }

    #[test]
    fn kernel_timestamps_become_instants() {
        let clock = Clock::now();
        let earlier = clock.instant_of(clock.monotonic_ns - 5_000_000);
        assert_eq!(clock.instant - earlier, Duration::from_millis(5));
        assert_eq!(clock.instant_of(clock.monotonic_ns + 1), clock.instant);
        // CLOCK_MONOTONIC and `Instant` run together.
        std::thread::sleep(Duration::from_millis(20));
        let later = Clock::now();
        let by_instant = later.instant.duration_since(clock.instant).as_nanos() as i128;
        let by_clock = i128::from(later.monotonic_ns - clock.monotonic_ns);
        assert!(
            (by_instant - by_clock).abs() < 1_000_000,
            "{by_instant} vs {by_clock} ns"
        );
    }
}
