//! Sorting scores as packed integers: one `u64` per sample, the score's descending order key in
//! the high 32 bits and a payload (label or region id) in the low 32. An unstable integer sort of
//! these is several times faster than sorting `(f32, payload)` pairs with a float comparator,
//! which matters for the tens of millions of pixels of a pixel-level evaluation.

/// The packed sort key of `score` with `payload`; ascending keys are descending scores.
pub(crate) fn key(score: f32, payload: u32) -> u64 {
    (u64::from(descending_order(score)) << 32) | u64::from(payload)
}

/// The score whose `descending_order` is `order`.
pub(crate) fn score_of(order: u32) -> f32 {
    let ascending = !order;
    let bits = if ascending & 0x8000_0000 != 0 {
        ascending & 0x7FFF_FFFF
    } else {
        !ascending
    };
    f32::from_bits(bits)
}

fn descending_order(score: f32) -> u32 {
    let canonical = if score.is_nan() {
        f32::NAN
    } else if score == 0.0 {
        0.0
    } else {
        score
    };
    let bits = canonical.to_bits();
    // Flipping makes the IEEE bit patterns order like the numbers (negatives reversed).
    let ascending = if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    !ascending
}

/// Sorted keys of `scores` with their labels as payload; `None` when the lengths differ.
pub(crate) fn label_keys(scores: &[f32], labels: &[bool]) -> Option<Vec<u64>> {
    if scores.len() != labels.len() {
        return None;
    }
    let mut keys: Vec<u64> = scores
        .iter()
        .zip(labels)
        .map(|(&s, &l)| key(s, u32::from(l)))
        .collect();
    keys.sort_unstable();
    Some(keys)
}

/// Calls `f(order, group)` for each run of equal scores in sorted `keys`, highest score first.
pub(crate) fn for_each_group(keys: &[u64], mut f: impl FnMut(u32, &[u64])) {
    let mut rest = keys;
    while let Some(&first) = rest.first() {
        let order = (first >> 32) as u32;
        let len = rest.partition_point(|&k| (k >> 32) as u32 == order);
        f(order, &rest[..len]);
        rest = &rest[len..];
    }
}

/// AUROC of sorted keys whose payload is 1 for a defect: the trapezoidal area under the ROC,
/// summed exactly in integers and divided once.
pub(crate) fn auroc_of_sorted(keys: &[u64]) -> Option<f64> {
    let (mut fp, mut tp) = (0u128, 0u128);
    // Twice the area in units of one false positive by one true positive.
    let mut doubled_area = 0u128;
    for_each_group(keys, |_, group| {
        let positives = group.iter().filter(|&&k| k & 1 == 1).count() as u128;
        let negatives = group.len() as u128 - positives;
        doubled_area += negatives * (2 * tp + positives);
        tp += positives;
        fp += negatives;
    });
    if tp == 0 || fp == 0 {
        return None;
    }
    Some(doubled_area as f64 / (2 * tp * fp) as f64)
}

/// Average precision of sorted keys whose payload is 1 for a defect, as scikit-learn's
/// `average_precision_score`: the sum over thresholds (each distinct score, highest first) of the
/// recall gained there times the precision there, `sum_k (R_k - R_{k-1}) * P_k`, without
/// interpolation. `None` when there is no defect.
pub(crate) fn average_precision_of_sorted(keys: &[u64]) -> Option<f64> {
    let (mut fp, mut tp) = (0u64, 0u64);
    // Sum of (recall gained) * precision, in units of one true positive.
    let mut sum = 0.0f64;
    for_each_group(keys, |_, group| {
        let positives = group.iter().filter(|&&k| k & 1 == 1).count() as u64;
        tp += positives;
        fp += group.len() as u64 - positives;
        if positives > 0 {
            sum += positives as f64 * tp as f64 / (tp + fp) as f64;
        }
    });
    if tp == 0 {
        return None;
    }
    Some(sum / tp as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_scores_descending_and_round_trip() {
        let scores = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            0.0,
            1e-30,
            0.25,
            7.0,
            f32::INFINITY,
        ];
        for pair in scores.windows(2) {
            assert!(key(pair[1], 0) < key(pair[0], 0), "{pair:?}");
        }
        for s in scores {
            assert_eq!(score_of((key(s, 0) >> 32) as u32), s);
        }
        assert_eq!(key(-0.0, 1), key(0.0, 1));
        assert!(key(f32::NAN, 0) < key(f32::INFINITY, 0));
        assert!(key(-f32::NAN, 0) < key(f32::INFINITY, 0));
    }
}
