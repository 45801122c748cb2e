//! The GPIO signal: a reject pulse of set width a set delay after capture (in time, or in encoder
//! counts when the belt speed varies), and READY/FAULT outputs.
//!
//! The timing logic ([`RejectTimer`]) works on positions and talks to hardware only through
//! [`GpioOutputs`], so it is tested with a recording double; the Linux character-device backend
//! (`--features gpio`) is in [`cdev`].
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputLine {
    Reject,
    Ready,
    Fault,
}

/// The output lines, as the timing logic sees them.
pub trait GpioOutputs: Send {
    fn set(&mut self, line: OutputLine, high: bool) -> Result<()>;
}

/// Where the belt is: microseconds since start (delay in time) or encoder counts.
pub type Position = u64;

/// Schedules reject pulses. A part's pulse starts when the belt has moved `delay` from the part's
/// capture position and lasts `width`; pulses that overlap merge into one (one rising edge for
/// several parts, so `pulsed` counts the parts, not the edges). A verdict that arrives after its
/// part passed the ejector fires nothing (it would reject the next part) and is counted as late;
/// the station raises FAULT for it.
pub struct RejectTimer {
    delay: Position,
    width: Duration,
    /// Start positions of pulses to come, ascending.
    due: VecDeque<Position>,
    /// Time (microseconds since start) the output goes low again, while high.
    high_until: Option<u64>,
    /// Rejected parts whose pulse started.
    pub pulsed: u64,
    pub late: u64,
}

impl RejectTimer {
    pub fn new(delay: Position, width: Duration) -> RejectTimer {
        RejectTimer {
            delay,
            width,
            due: VecDeque::new(),
            high_until: None,
            pulsed: 0,
            late: 0,
        }
    }

    /// Schedules the pulse of a rejected part captured at `captured`; false when already too late.
    pub fn reject(&mut self, captured: Position, now: Position) -> bool {
        let at = captured.saturating_add(self.delay);
        if at < now {
            self.late += 1;
            return false;
        }
        let i = self.due.partition_point(|&p| p <= at);
        self.due.insert(i, at);
        true
    }

    /// Applies what is due at belt position `pos` and time `now_us`.
    pub fn poll(&mut self, pos: Position, now_us: u64, out: &mut dyn GpioOutputs) -> Result<()> {
        let mut started = false;
        while self.due.front().is_some_and(|&p| p <= pos) {
            self.due.pop_front();
            self.pulsed += 1;
            started = true;
        }
        if started {
            if self.high_until.is_none() {
                out.set(OutputLine::Reject, true)?;
            }
            self.high_until = Some(now_us + self.width.as_micros() as u64);
        } else if self.high_until.is_some_and(|until| now_us >= until) {
            out.set(OutputLine::Reject, false)?;
            self.high_until = None;
        }
        Ok(())
    }

    /// Pulses scheduled and not yet started.
    pub fn pending(&self) -> usize {
        self.due.len()
    }

    /// Time until the output must next change in time mode (None: nothing scheduled).
    pub fn next_change_us(&self, now_us: u64, time_mode: bool) -> Option<u64> {
        let end = self.high_until.map(|u| u.saturating_sub(now_us));
        let start = if time_mode {
            self.due.front().map(|&p| p.saturating_sub(now_us))
        } else {
            None
        };
        match (end, start) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// READY and FAULT outputs: READY high while inspecting, FAULT high while something is wrong.
pub fn set_state(out: &mut dyn GpioOutputs, ready: bool) -> Result<()> {
    out.set(OutputLine::Ready, ready)?;
    out.set(OutputLine::Fault, !ready)
}

/// Belt position from an encoder: edges counted with their arrival times, so the count at a
/// past instant (a part's capture) is known.
#[derive(Default)]
pub struct Encoder {
    edges: Mutex<(u64, VecDeque<Instant>)>,
}

/// Edge times kept: far more than fit between a capture and its verdict.
const ENCODER_HISTORY: usize = 8192;

impl Encoder {
    pub fn edge(&self, at: Instant) {
        let mut e = self.edges.lock().expect("encoder lock");
        e.0 += 1;
        if e.1.len() == ENCODER_HISTORY {
            e.1.pop_front();
        }
        e.1.push_back(at);
    }

    pub fn count(&self) -> u64 {
        self.edges.lock().expect("encoder lock").0
    }

    /// The count at instant `t` (edges after `t` not included).
    pub fn count_at(&self, t: Instant) -> u64 {
        let e = self.edges.lock().expect("encoder lock");
        e.0 - e.1.iter().rev().take_while(|&&at| at > t).count() as u64
    }
}

#[cfg(feature = "gpio")]
pub mod cdev;
