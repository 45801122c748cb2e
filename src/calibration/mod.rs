//! Calibration: the reject threshold a technician can trust, and how sure it is.
//!
//! From scores of defect-free parts alone, the threshold is set so that at most `target_frr` of
//! them would be rejected; since a false-reject rate measured on n parts is itself uncertain, the
//! file also carries a one-sided Clopper-Pearson upper bound on the true rate and the number of
//! defect-free images that would be needed to show the target with zero rejects. With defect
//! scores it adds the escape rate (defects passed) and the F1-optimal threshold.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;
use crate::error::{Error, Result};
use crate::metrics;
use crate::model_file::ScoreStats;

/// Confidence of the reported bounds.
pub const CONFIDENCE: f64 = 0.95;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// A part whose score is at or above this is rejected (NG).
    pub threshold: f32,
    pub target_frr: f64,
    pub confidence: f64,
    pub scale: Scale,
    pub counts: Counts,
    /// False-reject rate of the defect-free calibration images at the threshold.
    pub false_reject: RateEstimate,
    /// Defect-free images needed to show `target_frr` at `confidence` with zero rejects.
    pub images_needed: usize,
    /// Defects passed at the threshold, when defect images were given.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub escape: Option<RateEstimate>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub f1_optimal: Option<F1Optimal>,
    pub model: ModelRef,
    /// RFC 3339, UTC.
    pub date: String,
}

/// Piecewise-linear map of scores to 0..1 with the threshold at 0.5: `lo` (the lowest defect-free
/// score) maps to 0 and `hi` to 1, so operators read every model on the same scale.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    pub lo: f32,
    pub hi: f32,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    pub good: usize,
    pub good_rejected: usize,
    pub defect: usize,
    pub defect_escaped: usize,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateEstimate {
    pub observed: f64,
    /// One-sided Clopper-Pearson upper bound at `confidence`.
    pub upper_bound: f64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct F1Optimal {
    pub threshold: f32,
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    pub file: String,
    pub sha256: String,
    pub method: String,
}

impl Calibration {
    /// Calibrates from validation-style scores. `good` must not be empty.
    pub fn from_scores(
        good: &[f32],
        defect: &[f32],
        target_frr: f64,
        model: ModelRef,
    ) -> Result<Calibration> {
        if !(0.0..1.0).contains(&target_frr) || target_frr == 0.0 {
            return Err(Error::invalid(
                "target-frr",
                format!("{target_frr} is not in (0, 1)"),
            ));
        }
        if good.is_empty() {
            return Err(Error::invalid(
                "good",
                "no defect-free scores to calibrate on",
            ));
        }
        if let Some(bad) = good.iter().chain(defect).find(|s| !s.is_finite()) {
            return Err(Error::invalid("score", format!("{bad} is not finite")));
        }
        let mut sorted = good.to_vec();
        sorted.sort_by(f32::total_cmp);
        let threshold = threshold_for_frr(&sorted, target_frr);
        let good_rejected = good.iter().filter(|&&s| s >= threshold).count();
        let defect_escaped = defect.iter().filter(|&&s| s < threshold).count();
        let lo = sorted[0];
        let spread = (threshold - lo).max(f32::EPSILON * threshold.abs().max(1.0));
        let top = defect.iter().copied().fold(f32::MIN, f32::max);
        let hi = top.max(threshold + spread);
        let escape = (!defect.is_empty()).then(|| RateEstimate {
            observed: defect_escaped as f64 / defect.len() as f64,
            upper_bound: clopper_pearson_upper(defect_escaped, defect.len(), CONFIDENCE),
        });
        let f1_optimal = if defect.is_empty() {
            None
        } else {
            let scores: Vec<f32> = good.iter().chain(defect).copied().collect();
            let labels: Vec<bool> = good
                .iter()
                .map(|_| false)
                .chain(defect.iter().map(|_| true))
                .collect();
            metrics::f1_max(&scores, &labels).map(|s| F1Optimal {
                threshold: s.threshold,
                f1: s.f1,
                precision: s.precision,
                recall: s.recall,
            })
        };
        Ok(Calibration {
            threshold,
            target_frr,
            confidence: CONFIDENCE,
            scale: Scale {
                lo: threshold - spread,
                hi,
            },
            counts: Counts {
                good: good.len(),
                good_rejected,
                defect: defect.len(),
                defect_escaped,
            },
            false_reject: RateEstimate {
                observed: good_rejected as f64 / good.len() as f64,
                upper_bound: clopper_pearson_upper(good_rejected, good.len(), CONFIDENCE),
            },
            images_needed: images_needed(target_frr, CONFIDENCE),
            escape,
            f1_optimal,
            model,
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })
    }

    /// True when the part is to be rejected.
    pub fn is_reject(&self, score: f32) -> bool {
        score >= self.threshold
    }

    /// The score on the 0..1 operator scale; 0.5 is the threshold.
    pub fn normalized(&self, score: f32) -> f32 {
        let t = self.threshold;
        let v = if score < t {
            0.5 * (score - self.scale.lo) / (t - self.scale.lo)
        } else {
            0.5 + 0.5 * (score - t) / (self.scale.hi - t)
        };
        // Keep the verdict readable from the normalised value even where clamping bites.
        if score < t {
            v.clamp(0.0, 0.499_999)
        } else {
            v.clamp(0.5, 1.0)
        }
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::invalid("calibration", format!("cannot encode as TOML: {e}")))
    }

    /// Writes the calibration atomically, so a station reloading it never reads half a file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# vigil calibration: reject when score >= threshold. Written by `vigil calibrate`.\n{}",
            self.to_toml()?
        );
        write_atomic(path, text.as_bytes())
    }

    pub fn load(path: &Path) -> Result<Calibration> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cal: Calibration = toml::from_str(&text).map_err(|e| Error::Calibration {
            path: path.into(),
            reason: e.to_string(),
        })?;
        cal.validate(path)?;
        Ok(cal)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::Calibration {
            path: path.into(),
            reason,
        };
        if !self.threshold.is_finite() {
            return Err(bad(format!("threshold {} is not finite", self.threshold)));
        }
        if !(self.scale.lo < self.threshold && self.threshold < self.scale.hi) {
            return Err(bad(format!(
                "scale lo {} .. hi {} does not enclose threshold {}",
                self.scale.lo, self.scale.hi, self.threshold
            )));
        }
        Ok(())
    }

    /// Refuses a threshold outside [`plausible_range`] of the model's validation statistics; Ok
    /// when it is inside or when the model carries no statistics (the caller warns).
    pub fn check_plausible(&self, v: &ScoreStats, path: &Path) -> Result<()> {
        match plausible_range(v) {
            Some((lo, hi)) if !(lo < self.threshold && self.threshold <= hi) => {
                Err(Error::Calibration {
                    path: path.into(),
                    reason: format!(
                        "threshold {} is outside the plausible range ({}, {}] derived from the \
                         model's validation scores (min {}, max {})",
                        number(self.threshold),
                        number(lo),
                        number(hi),
                        number(v.min),
                        number(v.max)
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    /// Refuses a calibration made for another model file.
    pub fn check_model(&self, model_sha256: &str, path: &Path) -> Result<()> {
        if self.model.sha256 != model_sha256 {
            return Err(Error::Calibration {
                path: path.into(),
                reason: format!(
                    "made for model {} (sha256 {}), not for this model (sha256 {model_sha256})",
                    self.model.file, self.model.sha256
                ),
            });
        }
        Ok(())
    }
}

/// The thresholds `(lo, hi]` a calibration may plausibly have for a model whose defect-free
/// validation scores are `v`; None when the model carries no statistics (`v.count == 0`).
///
/// `lo` is the lowest validation score: a threshold at or below it would reject every validation
/// part. `hi` is the highest validation score plus ten times the larger of the score range, the
/// magnitude of the highest score and `f32::EPSILON`: a threshold beyond it would pass nearly
/// every defect. A threshold `t` is plausible when `lo < t <= hi`.
pub fn plausible_range(v: &ScoreStats) -> Option<(f32, f32)> {
    if v.count == 0 {
        return None;
    }
    let spread = (v.max - v.min).max(v.max.abs()).max(f32::EPSILON);
    Some((v.min, v.max + 10.0 * spread))
}

/// A score for a message: plain digits where they read well, else exponent form (1e30).
fn number(v: f32) -> String {
    if v == 0.0 || (1e-4..1e7).contains(&v.abs()) {
        v.to_string()
    } else {
        format!("{v:e}")
    }
}

/// The threshold that rejects at most `floor(target * n)` of the ascending `sorted` good scores,
/// placed midway between the last accepted and the first rejected score.
pub fn threshold_for_frr(sorted: &[f32], target: f64) -> f32 {
    let n = sorted.len();
    let allowed = ((target * n as f64).floor() as usize).min(n - 1);
    let last_accepted = sorted[n - 1 - allowed];
    if allowed == 0 {
        return last_accepted.next_up();
    }
    let first_rejected = sorted[n - allowed];
    let mid = last_accepted + (first_rejected - last_accepted) / 2.0;
    if mid > last_accepted {
        mid
    } else {
        last_accepted.next_up()
    }
}

/// P(X <= k) for X ~ Binomial(n, p), summed in log space so large n does not underflow.
pub fn binomial_cdf(k: usize, n: usize, p: f64) -> f64 {
    if k >= n || p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return 0.0;
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    let mut log_term = n as f64 * lq;
    let mut log_sum = log_term;
    for i in 0..k {
        log_term += ((n - i) as f64).ln() - ((i + 1) as f64).ln() + lp - lq;
        let (a, b) = (log_sum.max(log_term), log_sum.min(log_term));
        log_sum = a + (b - a).exp().ln_1p();
    }
    log_sum.exp().min(1.0)
}

/// One-sided Clopper-Pearson upper bound of a rate after `k` events in `n` trials.
pub fn clopper_pearson_upper(k: usize, n: usize, confidence: f64) -> f64 {
    if n == 0 || k >= n {
        return 1.0;
    }
    let alpha = 1.0 - confidence;
    let (mut lo, mut hi) = (k as f64 / n as f64, 1.0);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if binomial_cdf(k, n, mid) > alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// Defect-free images needed so that zero rejects bound the true rate below `target`.
pub fn images_needed(target: f64, confidence: f64) -> usize {
    ((1.0 - confidence).ln() / (1.0 - target).ln()).ceil() as usize
}
