//! Counters and per-stage timings shared by the stages, and the periodic status line.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Verdict, STAGES};

/// Timings kept per stage for the percentiles (a fixed ring: no growth over months).
const WINDOW: usize = 1024;

struct Ring {
    values: Box<[u32; WINDOW]>,
    len: usize,
    next: usize,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            values: Box::new([0; WINDOW]),
            len: 0,
            next: 0,
        }
    }

    fn push(&mut self, micros: u32) {
        self.values[self.next] = micros;
        self.next = (self.next + 1) % WINDOW;
        self.len = (self.len + 1).min(WINDOW);
    }

    fn percentiles(&self, scratch: &mut Vec<u32>) -> Option<(u32, u32)> {
        if self.len == 0 {
            return None;
        }
        scratch.clear();
        scratch.extend_from_slice(&self.values[..self.len]);
        scratch.sort_unstable();
        let at = |q: f64| scratch[((q * (self.len - 1) as f64).round() as usize).min(self.len - 1)];
        Some((at(0.5), at(0.99)))
    }
}

/// What every stage reports; read by the status line, the heartbeat and the watchdog.
pub struct Stats {
    started: Instant,
    /// Parts each stage handed on (capture: parts handed to preprocessing, drops not included;
    /// decision: results received from inference, late ones included).
    pub through: [AtomicU64; 5],
    /// OK, NG, ERR.
    pub verdicts: [AtomicU64; 3],
    /// Fail-safe verdicts for a missed deadline.
    pub deadline_misses: AtomicU64,
    /// Fail-safe verdicts for a processing error.
    pub failures: AtomicU64,
    /// Parts the source could not hand on because the pipeline was full (each got fail-safe).
    pub drops: AtomicU64,
    /// Results that arrived after their part's fail-safe verdict and were discarded.
    pub late: AtomicU64,
    /// Serial lines dropped because the port stayed away (or the PLC did not read) longer than
    /// its queue lasts; each gap is marked by a `LOST` line.
    pub serial_dropped: AtomicU64,
    /// JSON writes that failed (each raised FAULT `json`; the line was retried).
    pub json_failed: AtomicU64,
    /// JSON lines dropped while writes failed; each gap is marked by a `lost` event line.
    pub json_lost: AtomicU64,
    /// Rejected parts not kept in the audit folder (it could not keep up, or the disk is low).
    pub audit_skipped: AtomicU64,
    /// Audit writes that failed (each raised FAULT `audit`).
    pub audit_failed: AtomicU64,
    /// Events an observer's full channel did not take.
    pub observer_dropped: AtomicU64,
    pub fault: AtomicBool,
    rings: [Mutex<Ring>; 6],
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            started: Instant::now(),
            through: Default::default(),
            verdicts: Default::default(),
            deadline_misses: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            drops: AtomicU64::new(0),
            late: AtomicU64::new(0),
            serial_dropped: AtomicU64::new(0),
            json_failed: AtomicU64::new(0),
            json_lost: AtomicU64::new(0),
            audit_skipped: AtomicU64::new(0),
            audit_failed: AtomicU64::new(0),
            observer_dropped: AtomicU64::new(0),
            fault: AtomicBool::new(false),
            rings: std::array::from_fn(|_| Mutex::new(Ring::new())),
        }
    }

    /// Records a stage's time for one part (stage 5 = capture to signal).
    pub fn record(&self, stage: usize, took: Duration) {
        let micros = took.as_micros().min(u32::MAX as u128) as u32;
        if let Ok(mut ring) = self.rings[stage].lock() {
            ring.push(micros);
        }
    }

    pub fn passed(&self, stage: usize) {
        self.through[stage].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self, verdict: Verdict) {
        let i = match verdict {
            Verdict::Ok => 0,
            Verdict::Ng => 1,
            Verdict::Err => 2,
        };
        self.verdicts[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn counts(&self) -> [u64; 3] {
        std::array::from_fn(|i| self.verdicts[i].load(Ordering::Relaxed))
    }

    pub fn decided(&self) -> u64 {
        self.counts().iter().sum()
    }

    /// p50/p99 in milliseconds of a stage (5 = capture to signal).
    pub fn percentiles_ms(&self, stage: usize) -> Option<(f64, f64)> {
        let mut scratch = Vec::with_capacity(WINDOW);
        let ring = self.rings[stage].lock().ok()?;
        ring.percentiles(&mut scratch)
            .map(|(a, b)| (a as f64 / 1000.0, b as f64 / 1000.0))
    }

    /// `fps 24.8 | capture 0.1/0.3 ms | ... | OK 120 NG 3 ERR 0 | deadline 0 failed 0 drops 0 late 0 |
    /// lost: serial 0 json 0 audit 0 | up 12 s`
    pub fn status_line(&self, since: &mut (Instant, u64)) -> String {
        let now = Instant::now();
        let decided = self.decided();
        let secs = now.duration_since(since.0).as_secs_f64().max(1e-9);
        let fps = (decided - since.1) as f64 / secs;
        *since = (now, decided);
        let mut line = format!("fps {fps:.1}");
        for (i, name) in STAGES.iter().chain(["total"].iter()).enumerate() {
            match self.percentiles_ms(i) {
                Some((p50, p99)) => line.push_str(&format!(" | {name} {p50:.1}/{p99:.1} ms")),
                None => line.push_str(&format!(" | {name} -")),
            }
        }
        let [ok, ng, err] = self.counts();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        line.push_str(&format!(
            " | OK {ok} NG {ng} ERR {err} | deadline {} failed {} drops {} late {} | lost: serial {} json {} audit {} | up {:.0} s",
            load(&self.deadline_misses),
            load(&self.failures),
            load(&self.drops),
            load(&self.late),
            load(&self.serial_dropped),
            load(&self.json_lost),
            load(&self.audit_skipped),
            self.started.elapsed().as_secs_f64()
        ));
        line
    }
}

/// Watchdog logic: a stage is stalled when parts wait for it and it did not advance since the
/// last check. Capture is not watched (a source waiting for a trigger is not a stall).
pub struct StallCheck {
    last: [u64; 5],
    waiting: [bool; 5],
}

impl StallCheck {
    pub fn new() -> StallCheck {
        StallCheck {
            last: [0; 5],
            waiting: [false; 5],
        }
    }

    /// The first stage that had parts waiting at this check and the last one and handed none on
    /// in between.
    pub fn stalled(&mut self, stats: &Stats) -> Option<&'static str> {
        let now: [u64; 5] = std::array::from_fn(|i| stats.through[i].load(Ordering::Relaxed));
        let mut stalled = None;
        for stage in 1..5 {
            let waiting = now[stage - 1] > now[stage];
            if waiting && self.waiting[stage] && now[stage] == self.last[stage] && stalled.is_none()
            {
                stalled = Some(STAGES[stage]);
            }
            self.waiting[stage] = waiting;
        }
        self.last = now;
        stalled
    }
}

impl Default for StallCheck {
    fn default() -> Self {
        StallCheck::new()
    }
}
