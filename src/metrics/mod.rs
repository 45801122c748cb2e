//! Detection metrics: ROC/AUROC (image and pixel level), pixel average precision, AUPRO, F1 and
//! the evaluation summary.
//!
//! Every curve is exact: all scores are sorted once and swept threshold by threshold (each distinct
//! score is a threshold, `score >= threshold` means defect), with counts kept as integers and
//! areas accumulated in f64. Ties are handled like scikit-learn (a group of equal scores moves the
//! curve diagonally). A NaN score ranks above every number, so a model that diverges on an image
//! calls it defective rather than good; -0.0 and 0.0 are the same score.
mod pro;
mod ranking;
mod summary;

pub use pro::aupro;
pub use summary::{summarize, EvalItem, Summary, TypeMetrics, AUPRO_FPR_LIMIT, GOOD};

use serde::{Deserialize, Serialize};

use ranking::{for_each_group, label_keys, score_of};

/// A receiver operating characteristic: one point per distinct threshold, starting at (0, 0) with
/// threshold +inf; collinear intermediate points are dropped as scikit-learn's `roc_curve` does.
#[derive(Clone, Debug, PartialEq)]
pub struct Roc {
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
    pub thresholds: Vec<f32>,
}

/// The confusion counts and scores of the rule `score >= threshold` = defect.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThresholdStats {
    pub threshold: f32,
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    pub fn_: usize,
    /// 0 when nothing is called defective.
    pub precision: f64,
    /// 0 when there are no defects.
    pub recall: f64,
    pub f1: f64,
}

/// The ROC curve; `None` when the lengths differ or either class is missing.
pub fn roc(scores: &[f32], labels: &[bool]) -> Option<Roc> {
    let keys = label_keys(scores, labels)?;
    // Cumulative (fp, tp) after each distinct threshold, highest threshold first.
    let mut points: Vec<(u64, u64, f32)> = Vec::new();
    let (mut fp, mut tp) = (0u64, 0u64);
    for_each_group(&keys, |score_key, group| {
        let positives = group.iter().filter(|&&k| k & 1 == 1).count() as u64;
        tp += positives;
        fp += group.len() as u64 - positives;
        points.push((fp, tp, score_of(score_key)));
    });
    if fp == 0 || tp == 0 {
        return None;
    }
    let (negatives, positives) = (fp as f64, tp as f64);
    let mut roc = Roc {
        fpr: vec![0.0],
        tpr: vec![0.0],
        thresholds: vec![f32::INFINITY],
    };
    for (i, &(fp, tp, threshold)) in points.iter().enumerate() {
        // Keep a point unless it lies on the straight line through its neighbours.
        if i > 0 && i + 1 < points.len() {
            let (prev, next) = (points[i - 1], points[i + 1]);
            let collinear = next.0 + prev.0 == 2 * fp && next.1 + prev.1 == 2 * tp;
            if collinear {
                continue;
            }
        }
        roc.fpr.push(fp as f64 / negatives);
        roc.tpr.push(tp as f64 / positives);
        roc.thresholds.push(threshold);
    }
    Some(roc)
}

/// Area under the ROC curve (ties count one half); `None` when the lengths differ or a class is
/// missing.
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    ranking::auroc_of_sorted(&label_keys(scores, labels)?)
}

/// AUROC over all pixels of all images (mask value != 0 = defect); `None` when a map and its mask
/// differ in length, the counts of maps and masks differ, or a class is missing.
pub fn pixel_auroc(maps: &[&[f32]], masks: &[&[u8]]) -> Option<f64> {
    ranking::auroc_of_sorted(&pixel_keys(maps, masks)?)
}

/// Average precision over all pixels of all images (mask value != 0 = defect), as scikit-learn's
/// `average_precision_score` on the flattened maps and masks: `sum_k (R_k - R_{k-1}) * P_k` over
/// the thresholds at each distinct score, highest first (equal scores are one threshold). `None`
/// when a map and its mask differ in length, the counts of maps and masks differ, or there is no
/// defect pixel; with no defect-free pixel it is 1.
pub fn pixel_ap(maps: &[&[f32]], masks: &[&[u8]]) -> Option<f64> {
    ranking::average_precision_of_sorted(&pixel_keys(maps, masks)?)
}

/// The sorted keys of every pixel of every image, payload 1 for a defect (mask value != 0);
/// `None` when a map and its mask differ in length or the counts of maps and masks differ.
pub(crate) fn pixel_keys(maps: &[&[f32]], masks: &[&[u8]]) -> Option<Vec<u64>> {
    if maps.len() != masks.len() || maps.iter().zip(masks).any(|(m, k)| m.len() != k.len()) {
        return None;
    }
    let total = maps.iter().map(|m| m.len()).sum();
    let mut keys = Vec::with_capacity(total);
    for (map, mask) in maps.iter().zip(masks) {
        keys.extend(
            map.iter()
                .zip(mask.iter())
                .map(|(&s, &m)| ranking::key(s, u32::from(m != 0))),
        );
    }
    keys.sort_unstable();
    Some(keys)
}

/// Counts and scores of `score >= threshold` = defect over the pairs of `scores` and `labels`
/// (pairs beyond the shorter slice are ignored).
pub fn at_threshold(scores: &[f32], labels: &[bool], threshold: f32) -> ThresholdStats {
    let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
    for (&s, &defect) in scores.iter().zip(labels) {
        // NaN ranks above everything, as in the curves.
        let called = s.is_nan() || s >= threshold;
        match (called, defect) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fn_ += 1,
        }
    }
    stats(threshold, tp, fp, tn, fn_)
}

/// The threshold with the highest F1 (the lowest such threshold on ties, which misses fewest
/// defects); `None` when the lengths differ or there is no defect.
pub fn f1_max(scores: &[f32], labels: &[bool]) -> Option<ThresholdStats> {
    if scores.len() != labels.len() || !labels.contains(&true) {
        return None;
    }
    let mut keys: Vec<u64> = scores
        .iter()
        .zip(labels)
        .map(|(&s, &l)| ranking::key(s, u32::from(l)))
        .collect();
    keys.sort_unstable();
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    let (mut tp, mut fp) = (0, 0);
    let mut best: Option<ThresholdStats> = None;
    for_each_group(&keys, |score_key, group| {
        let group_positives = group.iter().filter(|&&k| k & 1 == 1).count();
        tp += group_positives;
        fp += group.len() - group_positives;
        let candidate = stats(score_of(score_key), tp, fp, negatives - fp, positives - tp);
        // Thresholds come highest first, so `>=` keeps the lowest of equal F1s.
        if best.is_none_or(|b| candidate.f1 >= b.f1) {
            best = Some(candidate);
        }
    });
    best
}

fn stats(threshold: f32, tp: usize, fp: usize, tn: usize, fn_: usize) -> ThresholdStats {
    let ratio = |num: usize, den: usize| {
        if den == 0 {
            0.0
        } else {
            num as f64 / den as f64
        }
    };
    let precision = ratio(tp, tp + fp);
    let recall = ratio(tp, tp + fn_);
    // 2TP / (2TP + FP + FN) equals 2PR / (P + R) without the rounding of P and R.
    let f1 = ratio(2 * tp, 2 * tp + fp + fn_);
    ThresholdStats {
        threshold,
        tp,
        fp,
        tn,
        fn_,
        precision,
        recall,
        f1,
    }
}
