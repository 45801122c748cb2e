//! The decided part the station unit and property tests feed to the line builders: captured now,
//! no timings, no evidence, normalised to 0.25 when scored.
use std::time::{Duration, Instant, SystemTime};

use vigil::station::{Decided, Verdict};

pub fn decided(id: u64, verdict: Verdict, score: Option<f32>, reason: Option<&str>) -> Decided {
    Decided {
        id,
        name: format!("{id:03}.png"),
        verdict,
        score,
        normalized: score.map(|_| 0.25),
        reason: reason.map(String::from),
        captured: Instant::now(),
        captured_wall: SystemTime::now(),
        timings: [Duration::ZERO; 5],
        evidence: None,
    }
}
