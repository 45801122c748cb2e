//! The verdict: the calibrated threshold (over an optional region of interest), hot reload of
//! the calibration, and the register of parts in flight that enforces the deadline.
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::config::OnFailure;
use super::{Decided, Part, Verdict};
use crate::calibration::Calibration;
use crate::data::image::load_mask;
use crate::data::Mask;
use crate::error::{Error, Result};
use crate::model_file::ScoreStats;

/// The region-of-interest mask at the model's input size; one that selects nothing is an error.
pub fn load_roi(path: &Path, height: usize, width: usize) -> Result<Mask> {
    let mask =
        load_mask(path, height, width).map_err(|e| Error::config("decision.roi", e.to_string()))?;
    if !mask.any() {
        return Err(Error::config(
            "decision.roi",
            format!("{} selects no pixel", path.display()),
        ));
    }
    Ok(mask)
}

/// A captured part not yet decided.
#[derive(Clone, Debug)]
pub struct Pending {
    pub id: u64,
    pub name: String,
    pub captured: Instant,
    pub captured_wall: SystemTime,
    /// The source could not hand it on (pipeline full): it gets the fail-safe verdict.
    pub dropped: bool,
}

/// Parts between capture and verdict, in capture order. The source registers each part before
/// handing it on; the decision stage removes it when it decides it, or gives it the fail-safe
/// verdict when its deadline passes first.
#[derive(Default)]
pub struct InFlight {
    parts: Mutex<VecDeque<Pending>>,
}

impl InFlight {
    pub fn register(&self, pending: Pending) {
        self.parts
            .lock()
            .expect("in-flight lock")
            .push_back(pending);
    }

    pub fn mark_dropped(&self, id: u64) {
        let mut parts = self.parts.lock().expect("in-flight lock");
        if let Some(p) = parts.iter_mut().rev().find(|p| p.id == id) {
            p.dropped = true;
        }
    }

    pub fn len(&self) -> usize {
        self.parts.lock().expect("in-flight lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The oldest part, if any.
    pub fn front(&self) -> Option<Pending> {
        self.parts.lock().expect("in-flight lock").front().cloned()
    }

    pub fn pop_front(&self) -> Option<Pending> {
        self.parts.lock().expect("in-flight lock").pop_front()
    }
}

/// The threshold in force and where it came from.
pub struct Decider {
    calibration: Calibration,
    path: PathBuf,
    model_sha256: String,
    validation: ScoreStats,
    roi: Option<Mask>,
    pub deadline: Duration,
    pub on_failure: OnFailure,
}

/// Loads a calibration and checks it was made for this model and that its threshold is
/// plausible for the model's validation scores.
pub fn load_checked(
    path: &Path,
    model_sha256: &str,
    validation: &ScoreStats,
) -> Result<Calibration> {
    let cal = Calibration::load(path)?;
    cal.check_model(model_sha256, path)?;
    cal.check_plausible(validation, path)?;
    Ok(cal)
}

impl Decider {
    /// `validation`: the model's defect-free validation scores, which bound a plausible
    /// threshold (`Calibration::check_plausible`).
    pub fn new(
        path: &Path,
        model_sha256: &str,
        validation: &ScoreStats,
        roi: Option<Mask>,
        deadline: Duration,
        on_failure: OnFailure,
    ) -> Result<Decider> {
        let calibration = load_checked(path, model_sha256, validation)?;
        if crate::calibration::plausible_range(validation).is_none() {
            log::warn!(
                "the model carries no validation scores: the calibration's threshold cannot be checked for plausibility"
            );
        }
        Ok(Decider {
            calibration,
            path: path.to_path_buf(),
            model_sha256: model_sha256.to_string(),
            validation: validation.clone(),
            roi,
            deadline,
            on_failure,
        })
    }

    pub fn threshold(&self) -> f32 {
        self.calibration.threshold
    }

    /// Reads the calibration file again. A file that does not parse or was made for another
    /// model is refused and the one in force stays.
    pub fn reload(&mut self) -> std::result::Result<f32, String> {
        match load_checked(&self.path, &self.model_sha256, &self.validation) {
            Ok(cal) => {
                self.calibration = cal;
                Ok(self.calibration.threshold)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Judges with the calibration of a new model from now on (it was checked against that
    /// model's digest and validation scores); returns its threshold.
    pub fn switch_to(&mut self, switch: super::reload::Switch) -> f32 {
        self.calibration = switch.calibration;
        self.model_sha256 = switch.model_sha256;
        self.validation = switch.validation;
        self.calibration.threshold
    }

    /// The score the threshold applies to: the model's score, or the map's maximum in the ROI.
    pub fn score(&self, score: f32, map: &[f32]) -> f32 {
        match &self.roi {
            Some(roi) if roi.data.len() == map.len() => map
                .iter()
                .zip(&roi.data)
                .filter(|(_, &m)| m != 0)
                .map(|(&v, _)| v)
                .fold(f32::NEG_INFINITY, f32::max),
            _ => score,
        }
    }

    pub fn failure_verdict(&self) -> Verdict {
        match self.on_failure {
            OnFailure::Ng => Verdict::Ng,
            OnFailure::Err => Verdict::Err,
        }
    }

    /// The verdict of a part that came through the pipeline. `keep_evidence`: keep the image and
    /// map of a rejected part (for the audit folder).
    pub fn decide(&self, mut part: Part, keep_evidence: bool) -> Decided {
        let overdue = part.captured.elapsed() > self.deadline;
        let (verdict, score, normalized, reason) = match (&part.scored, &part.failure) {
            (_, Some(why)) => (self.failure_verdict(), None, None, Some(why.clone())),
            (Some(_), None) if overdue => (
                self.failure_verdict(),
                None,
                None,
                Some("deadline".to_string()),
            ),
            (Some((raw, map)), None) => {
                let s = self.score(*raw, map);
                if s.is_finite() {
                    let verdict = if self.calibration.is_reject(s) {
                        Verdict::Ng
                    } else {
                        Verdict::Ok
                    };
                    (verdict, Some(s), Some(self.calibration.normalized(s)), None)
                } else {
                    (
                        self.failure_verdict(),
                        None,
                        None,
                        Some(format!("score {s} is not finite")),
                    )
                }
            }
            (None, None) => (
                self.failure_verdict(),
                None,
                None,
                Some("not scored".to_string()),
            ),
        };
        let evidence = if keep_evidence && verdict != Verdict::Ok {
            match (part.image.take(), part.scored.take()) {
                (Some(image), Some((_, map))) => {
                    Some((image, map, crate::eval::map_range(&self.validation)))
                }
                _ => None,
            }
        } else {
            None
        };
        Decided {
            id: part.id,
            name: part.name,
            verdict,
            score,
            normalized,
            reason,
            captured: part.captured,
            captured_wall: part.captured_wall,
            timings: part.timings,
            evidence,
        }
    }

    /// The fail-safe verdict of a part that never came back (deadline) or was dropped.
    pub fn fail_safe(&self, pending: Pending, reason: &str) -> Decided {
        Decided {
            id: pending.id,
            name: pending.name,
            verdict: self.failure_verdict(),
            score: None,
            normalized: None,
            reason: Some(reason.to_string()),
            captured: pending.captured,
            captured_wall: pending.captured_wall,
            timings: [Duration::ZERO; 5],
            evidence: None,
        }
    }
}
