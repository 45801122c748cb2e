//! The inspection station: capture → preprocess → infer → decide → signal, one thread per stage,
//! joined by bounded channels (a slow stage holds the source back instead of growing a queue).
//! The layout shows the rule that no output may hold up a stage or another output: `stages`
//! (the threads that carry parts), `outputs` (serial, JSON, GPIO, audit, each behind its own
//! never-blocking `queue`), `health` (faults and READY), and `pipeline`, which wires them.
//!
//! Every captured part gets exactly one verdict, in capture order: the decision stage keeps a
//! register of the parts in flight, and a part that is not decided within its deadline, whose
//! processing failed, or that the source had to drop, gets the fail-safe verdict (NG, or ERR if
//! configured) — never a silent pass.
pub mod audit;
pub mod config;
pub mod decision;
pub mod gpio;
pub mod health;
pub mod ops;
pub mod outputs;
pub mod pipeline;
pub mod protocol;
pub mod pty;
pub mod queue;
pub mod reload;
pub mod serial;
pub mod source;
pub mod stages;
pub mod status;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use crate::data::Image;

pub use config::StationConfig;
pub use pipeline::{run, Controls, Hooks, Summary};

/// The stages whose time each part records.
pub const STAGES: [&str; 5] = ["capture", "preprocess", "inference", "decision", "signal"];

/// What the source delivers: a file to decode, or pixels already in memory.
#[derive(Clone, Debug)]
pub enum Frame {
    File(PathBuf),
    Pixels(Image),
}

/// A part on its way through the pipeline.
#[derive(Debug)]
pub struct Part {
    /// Consecutive from 0 in capture order.
    pub id: u64,
    pub captured: Instant,
    pub captured_wall: SystemTime,
    /// The file name, or the source's name for the frame.
    pub name: String,
    /// Time spent in each of [`STAGES`] (waiting in queues not included).
    pub timings: [Duration; 5],
    pub frame: Option<Frame>,
    /// The preprocessed image at the model's input size.
    pub image: Option<Image>,
    /// Score and anomaly map once inferred.
    pub scored: Option<(f32, Vec<f32>)>,
    /// Why the part could not be processed.
    pub failure: Option<String>,
    /// The start-up image that proves the pipeline works; it gets no verdict.
    pub self_test: bool,
    /// Not a part: the marker of a new model taking over, with what the decision stage switches
    /// to ([`reload`]); it gets no verdict.
    pub switch: Option<Box<reload::Switch>>,
}

impl Part {
    pub fn new(id: u64, name: String, frame: Frame, captured: Instant) -> Part {
        Part {
            id,
            captured,
            captured_wall: SystemTime::now(),
            name,
            timings: [Duration::ZERO; 5],
            frame: Some(frame),
            image: None,
            scored: None,
            failure: None,
            self_test: false,
            switch: None,
        }
    }

    /// The start-up image: mid-grey at the model's input size.
    pub fn self_test(spec: &crate::data::InputSpec) -> Part {
        let mut image = Image::zeros(spec.channels, spec.height, spec.width);
        image.data.fill(0.5);
        let mut part = Part::new(
            u64::MAX,
            "self-test".into(),
            Frame::Pixels(image),
            Instant::now(),
        );
        part.self_test = true;
        part
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Ok,
    Ng,
    Err,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "OK",
            Verdict::Ng => "NG",
            Verdict::Err => "ERR",
        }
    }
}

/// A part's verdict, as every signal sees it.
#[derive(Clone, Debug)]
pub struct Decided {
    pub id: u64,
    pub name: String,
    pub verdict: Verdict,
    /// None when the part could not be scored.
    pub score: Option<f32>,
    /// On the calibration's 0..1 scale (0.5 = threshold).
    pub normalized: Option<f32>,
    /// Why the fail-safe verdict was given (`deadline`, `dropped`, or the processing error).
    pub reason: Option<String>,
    pub captured: Instant,
    pub captured_wall: SystemTime,
    pub timings: [Duration; 5],
    /// Image, anomaly map and the map's colour range (of the model that scored it), kept only for
    /// rejected parts when auditing.
    pub evidence: Option<(Image, Vec<f32>, (f32, f32))>,
}

impl Decided {
    /// Capture to now.
    pub fn latency(&self) -> Duration {
        self.captured.elapsed()
    }

    /// A part for unit tests: captured now, no timings, no normalised score, no evidence.
    #[cfg(test)]
    pub(crate) fn for_test(
        id: u64,
        verdict: Verdict,
        score: Option<f32>,
        reason: Option<&str>,
    ) -> Decided {
        Decided {
            id,
            name: format!("{id:03}.png"),
            verdict,
            score,
            normalized: None,
            reason: reason.map(String::from),
            captured: Instant::now(),
            captured_wall: SystemTime::now(),
            timings: [Duration::ZERO; 5],
            evidence: None,
        }
    }
}

/// Station-level events sent to the PLC and the log.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Model loaded and self-tested, source delivering, nothing at fault.
    Ready,
    /// Something stops the station from inspecting (source lost, empty folder, ...).
    Fault(String),
    /// Answer to a reload request: the new threshold, or why the old one stays.
    Reloaded(std::result::Result<f32, String>),
    /// A new model and calibration took over (their threshold and the model's digest), or why
    /// the running pair stays.
    ModelReloaded(std::result::Result<(f32, String), String>),
    /// Answer to a status request.
    Status(String),
}
