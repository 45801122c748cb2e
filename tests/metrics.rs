//! Metrics against values worked out by hand, and against scikit-learn / the MVTec AD evaluation
//! code on seeded random cases (fixture made by tests/reference/make_reference.py).
use serde::Deserialize;
use vigil::metrics::{
    at_threshold, aupro, auroc, f1_max, pixel_ap, pixel_auroc, roc, summarize, EvalItem, GOOD,
};
use vigil::rng::Rng;

const T: bool = true;
const F: bool = false;

fn close(actual: f64, expected: f64, tolerance: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: {actual} != {expected} (tolerance {tolerance})"
    );
}

#[test]
fn auroc_counts_ties_as_half() {
    // Pairs (defect, good): 0.4 vs 0.1 -> 1, 0.4 vs 0.4 -> 1/2, 0.8 vs 0.1 -> 1, 0.8 vs 0.4 -> 1.
    // 3.5 of 4 pairs ranked right.
    let value = auroc(&[0.1, 0.4, 0.4, 0.8], &[F, F, T, T]).unwrap();
    close(value, 0.875, 1e-15, "auroc");
    // Order does not matter, and a perfect / reversed ranking gives 1 / 0.
    close(
        auroc(&[0.8, 0.4, 0.1, 0.4], &[T, F, F, T]).unwrap(),
        0.875,
        1e-15,
        "shuffled",
    );
    close(
        auroc(&[0.1, 0.2, 0.3], &[F, T, T]).unwrap(),
        1.0,
        0.0,
        "perfect",
    );
    close(
        auroc(&[0.1, 0.2, 0.3], &[T, F, F]).unwrap(),
        0.0,
        0.0,
        "reversed",
    );
}

#[test]
fn three_threshold_roc() {
    // 2 defects, 2 good; thresholds 0.9, 0.6 (one defect and one good tie), 0.2:
    //   >= 0.9: tp 1, fp 0 -> (0, 0.5);  >= 0.6: tp 2, fp 1 -> (0.5, 1);  >= 0.2: (1, 1).
    // Area: 0.5 * (0.5 + 1) / 2 + 0.5 * 1 = 0.875.
    let scores = [0.9, 0.6, 0.6, 0.2];
    let labels = [T, F, T, F];
    let curve = roc(&scores, &labels).unwrap();
    assert_eq!(curve.fpr, vec![0.0, 0.0, 0.5, 1.0]);
    assert_eq!(curve.tpr, vec![0.0, 0.5, 1.0, 1.0]);
    assert_eq!(curve.thresholds, vec![f32::INFINITY, 0.9, 0.6, 0.2]);
    close(auroc(&scores, &labels).unwrap(), 0.875, 1e-15, "auroc");
}

#[test]
fn roc_drops_collinear_points_like_sklearn() {
    // (fp, tp) after 0.9, 0.8, 0.7, 0.1: (0,1), (0,2), (0,3), (1,3); (0,2) lies between its
    // neighbours and is dropped, as sklearn's roc_curve(drop_intermediate=True) does.
    let curve = roc(&[0.9, 0.8, 0.7, 0.1], &[T, T, T, F]).unwrap();
    assert_eq!(curve.fpr, vec![0.0, 0.0, 0.0, 1.0]);
    assert_eq!(curve.tpr, vec![0.0, 1.0 / 3.0, 1.0, 1.0]);
    assert_eq!(curve.thresholds, vec![f32::INFINITY, 0.9, 0.7, 0.1]);
}

#[test]
fn undefined_inputs_give_none() {
    assert_eq!(auroc(&[0.1, 0.2], &[T, T]), None, "no good sample");
    assert_eq!(auroc(&[0.1, 0.2], &[F, F]), None, "no defect");
    assert_eq!(auroc(&[0.1, 0.2], &[F]), None, "lengths differ");
    assert_eq!(auroc(&[], &[]), None, "empty");
    assert!(roc(&[0.1], &[T]).is_none());
    assert!(f1_max(&[0.1, 0.2], &[F, F]).is_none());
    assert!(f1_max(&[0.1, 0.2], &[T]).is_none());
    assert_eq!(pixel_auroc(&[&[0.1, 0.2]], &[&[0, 1, 0]]), None);
    assert_eq!(pixel_auroc(&[&[0.1, 0.2]], &[]), None);
    let map = [0.5f32; 4];
    assert_eq!(
        aupro(&[&map], &[&[0, 0, 0, 0]], 2, 2, 0.3),
        None,
        "no region"
    );
    assert_eq!(
        aupro(&[&map], &[&[1, 1, 1, 1]], 2, 2, 0.3),
        None,
        "no good pixel"
    );
    assert_eq!(
        aupro(&[&map], &[&[0, 1, 0, 0]], 2, 3, 0.3),
        None,
        "wrong size"
    );
    assert_eq!(aupro(&[&map], &[&[0, 1, 0, 0]], 2, 2, 0.0), None, "limit 0");
    assert_eq!(
        aupro(&[&map], &[&[0, 1, 0, 0]], 2, 2, 1.5),
        None,
        "limit > 1"
    );
}

#[test]
fn nan_scores_rank_as_most_anomalous() {
    // A NaN on a defect ranks it above the good samples; on a good sample, above the defects.
    close(
        auroc(&[f32::NAN, 0.1, 0.2], &[T, F, F]).unwrap(),
        1.0,
        0.0,
        "nan defect",
    );
    close(
        auroc(&[f32::NAN, 0.1, 0.2], &[F, T, T]).unwrap(),
        0.0,
        0.0,
        "nan good",
    );
    let stats = at_threshold(&[f32::NAN, 0.1], &[T, F], 0.5);
    assert_eq!((stats.tp, stats.fp, stats.tn, stats.fn_), (1, 0, 1, 0));
}

/// Defects at 0.95, 0.7, 0.6; good at 0.9, 0.4, 0.2.
const SCORES: [f32; 6] = [0.95, 0.9, 0.7, 0.6, 0.4, 0.2];
const LABELS: [bool; 6] = [T, F, T, T, F, F];

#[test]
fn precision_and_recall_at_a_threshold() {
    // >= 0.7 calls 0.95, 0.9, 0.7: tp 2, fp 1; the 0.6 defect is missed; 0.4, 0.2 are tn.
    // precision 2/3, recall 2/3, F1 2/3.
    let stats = at_threshold(&SCORES, &LABELS, 0.7);
    assert_eq!((stats.tp, stats.fp, stats.tn, stats.fn_), (2, 1, 2, 1));
    close(stats.precision, 2.0 / 3.0, 1e-15, "precision");
    close(stats.recall, 2.0 / 3.0, 1e-15, "recall");
    close(stats.f1, 2.0 / 3.0, 1e-15, "f1");
    // Above every score nothing is called: precision and F1 are 0, not NaN.
    let none_called = at_threshold(&SCORES, &LABELS, 1.0);
    assert_eq!((none_called.tp, none_called.fp, none_called.fn_), (0, 0, 3));
    assert_eq!((none_called.precision, none_called.f1), (0.0, 0.0));
}

#[test]
fn f1_max_picks_the_best_threshold() {
    // F1 = 2TP / (2TP + FP + FN) at each threshold:
    //   0.95: 2/4 = 0.5   0.9: 2/5   0.7: 4/6   0.6: 6/7 (tp 3, fp 1)   0.4: 6/8   0.2: 6/9
    let best = f1_max(&SCORES, &LABELS).unwrap();
    assert_eq!(best.threshold, 0.6);
    assert_eq!((best.tp, best.fp, best.tn, best.fn_), (3, 1, 2, 0));
    close(best.f1, 6.0 / 7.0, 1e-15, "f1");
    close(best.precision, 0.75, 1e-15, "precision");
    close(best.recall, 1.0, 0.0, "recall");
    // The threshold reproduces its own statistics.
    assert_eq!(at_threshold(&SCORES, &LABELS, best.threshold), best);
}

#[test]
fn f1_max_ties_take_the_lowest_threshold() {
    // 0.9: tp 1, fn 1 -> 2/3;  0.8: 2/4;  0.7: 2/5;  0.1: tp 2, fp 2 -> 4/6. 0.9 and 0.1 tie at
    // 2/3; the lower one misses no defect.
    let best = f1_max(&[0.9, 0.8, 0.7, 0.1], &[T, F, F, T]).unwrap();
    assert_eq!(best.threshold, 0.1);
    assert_eq!((best.tp, best.fp, best.fn_), (2, 2, 0));
    close(best.f1, 2.0 / 3.0, 1e-15, "f1");
}

/// A 4x4 map with two defect regions: A (the top-left 2x2 block, scores 0.9 0.8 / 0.3 0.2) and
/// B (the bottom-right pixel, 0.7). Good pixels: 0.5 and 0.3 in the top row, nine at 0.1.
#[rustfmt::skip]
const PRO_MASK: [u8; 16] = [
    1, 1, 0, 0,
    1, 1, 0, 0,
    0, 0, 0, 0,
    0, 0, 0, 1,
];
#[rustfmt::skip]
const PRO_MAP: [f32; 16] = [
    0.9, 0.8, 0.5, 0.3,
    0.3, 0.2, 0.1, 0.1,
    0.1, 0.1, 0.1, 0.1,
    0.1, 0.1, 0.1, 0.7,
];

#[test]
fn aupro_on_two_regions() {
    // PRO = mean of the regions' covered fractions; FPR over the 11 good pixels. Curve:
    //   >= 0.9: A 1/4 -> (0, 0.125)   >= 0.8: A 2/4 -> (0, 0.25)   >= 0.7: B 1 -> (0, 0.75)
    //   >= 0.5: one good pixel -> (1/11, 0.75)
    //   >= 0.3: A 3/4 and a good pixel together -> (2/11, 0.875) (a diagonal step)
    //   >= 0.2: A 4/4 -> (2/11, 1)    >= 0.1: (1, 1)
    let maps: [&[f32]; 1] = [&PRO_MAP];
    let masks: [&[u8]; 1] = [&PRO_MASK];
    let eleventh = 1.0 / 11.0;

    // Limit 0.3: 0.75/11 + (0.75 + 0.875)/2/11 + 1 * (0.3 - 2/11), over 0.3.
    let expected = (0.75 * eleventh + 0.8125 * eleventh + (0.3 - 2.0 * eleventh)) / 0.3;
    close(
        aupro(&maps, &masks, 4, 4, 0.3).unwrap(),
        expected,
        1e-12,
        "limit 0.3",
    );
    close(expected, 1.0 - 0.4375 / 3.3, 1e-12, "hand value");

    // Limit 0.15 falls inside the diagonal step: PRO there = 0.75 + 0.125 * (0.15 - 1/11) / (1/11).
    let pro_at_limit = 0.75 + 0.125 * (0.15 - eleventh) / eleventh;
    close(pro_at_limit, 0.83125, 1e-12, "interpolated PRO");
    let expected = (0.75 * eleventh + (0.15 - eleventh) * (0.75 + pro_at_limit) / 2.0) / 0.15;
    close(
        aupro(&maps, &masks, 4, 4, 0.15).unwrap(),
        expected,
        1e-12,
        "limit 0.15",
    );

    // Limit 0.05 is on the flat start at PRO 0.75.
    close(
        aupro(&maps, &masks, 4, 4, 0.05).unwrap(),
        0.75,
        1e-12,
        "limit 0.05",
    );
}

#[test]
fn aupro_regions_span_images_and_good_images_add_false_positives() {
    // The same map twice counts four regions and 22 good pixels; the curve is unchanged.
    let maps: [&[f32]; 2] = [&PRO_MAP, &PRO_MAP];
    let masks: [&[u8]; 2] = [&PRO_MASK, &PRO_MASK];
    let one = aupro(&maps[..1], &masks[..1], 4, 4, 0.3).unwrap();
    close(
        aupro(&maps, &masks, 4, 4, 0.3).unwrap(),
        one,
        1e-12,
        "doubled",
    );

    // A good image scoring 0.95 everywhere: at every threshold <= 0.95 the FPR is >= 16/27 > 0.3,
    // so only the point (16/27, 0) counts: the area is 0.
    let hot = [0.95f32; 16];
    let clean = [0u8; 16];
    let maps: [&[f32]; 2] = [&PRO_MAP, &hot];
    let masks: [&[u8]; 2] = [&PRO_MASK, &clean];
    close(
        aupro(&maps, &masks, 4, 4, 0.3).unwrap(),
        0.0,
        0.0,
        "hot good image",
    );
}

#[test]
fn pixel_auroc_pools_all_images() {
    // Image 1: defect pixel 0.9, good 0.2. Image 2: defect 0.3, good 0.5 and 0.1.
    // Defects {0.9, 0.3} against good {0.2, 0.5, 0.1}: 0.9 beats 3, 0.3 beats 2 -> 5/6.
    let value = pixel_auroc(&[&[0.9, 0.2], &[0.3, 0.5, 0.1]], &[&[1, 0], &[255, 0, 0]]).unwrap();
    close(value, 5.0 / 6.0, 1e-15, "pixel auroc");
}

#[test]
fn pixel_ap_by_hand_with_ties_across_images() {
    // Pixels (score, defect): image 1 (0.7 T) (0.7 F) (0.4 T) (0.2 F), image 2 (0.7 F) (0.4 T)
    // (0.4 F) (0.2 F); 3 defects. Thresholds, each tie group at once:
    //   >= 0.7: {T, F, F}: tp 1, fp 2 -> recall 1/3, precision 1/3
    //   >= 0.4: {T, T, F}: tp 3, fp 3 -> recall 1,   precision 1/2
    //   >= 0.2: no defect, no recall gained.
    // AP = 1/3 * 1/3 + 2/3 * 1/2 = 4/9. (Defects first within a tie would give 2/3.)
    let maps: [&[f32]; 2] = [&[0.7, 0.7, 0.4, 0.2], &[0.7, 0.4, 0.4, 0.2]];
    let masks: [&[u8]; 2] = [&[1, 0, 1, 0], &[0, 255, 0, 0]];
    close(
        pixel_ap(&maps, &masks).unwrap(),
        4.0 / 9.0,
        1e-15,
        "pixel ap",
    );
    // AUROC of the same pixels: 4 + 2.5 + 2.5 of 15 pairs = 0.6.
    close(
        pixel_auroc(&maps, &masks).unwrap(),
        0.6,
        1e-15,
        "pixel auroc",
    );

    // One tie group holding two defects and one good pixel: precision 2/3 at recall 1.
    close(
        pixel_ap(&[&[0.5, 0.5, 0.5]], &[&[1, 1, 0]]).unwrap(),
        2.0 / 3.0,
        1e-15,
        "one group",
    );
}

#[test]
fn pixel_ap_differs_from_auroc_under_imbalance() {
    // One defect pixel among ten, ranked second: it beats 8 of the 9 good pixels (AUROC 8/9),
    // but at the only threshold that finds it precision is 1/2, so AP is 1/2.
    let maps: [&[f32]; 2] = [&[0.9, 0.8, 0.1, 0.1, 0.1], &[0.1; 5]];
    let masks: [&[u8]; 2] = [&[0, 1, 0, 0, 0], &[0; 5]];
    close(pixel_ap(&maps, &masks).unwrap(), 0.5, 1e-15, "pixel ap");
    close(
        pixel_auroc(&maps, &masks).unwrap(),
        8.0 / 9.0,
        1e-15,
        "pixel auroc",
    );
    // Pooled as in pixel_auroc_pools_all_images: 0.9 T (P 1, R 1/2), 0.5 F, 0.3 T (P 2/3, R 1).
    close(
        pixel_ap(&[&[0.9, 0.2], &[0.3, 0.5, 0.1]], &[&[1, 0], &[255, 0, 0]]).unwrap(),
        0.5 + 0.5 * 2.0 / 3.0,
        1e-15,
        "pooled",
    );
}

#[test]
fn pixel_ap_of_perfect_and_constant_maps() {
    // Every defect pixel above every good one: precision 1 at each recall step.
    let maps: [&[f32]; 2] = [&[0.9, 0.2, 0.6, 0.1], &[0.3, 0.3, 0.2, 0.7]];
    let masks: [&[u8]; 2] = [&[1, 0, 1, 0], &[0, 0, 0, 1]];
    close(pixel_ap(&maps, &masks).unwrap(), 1.0, 0.0, "perfect");
    // Only defect pixels: precision is 1 everywhere.
    close(
        pixel_ap(&[&[0.2, 0.4]], &[&[1, 1]]).unwrap(),
        1.0,
        0.0,
        "no good pixel",
    );
    // A constant map is one threshold at recall 1: AP is the defect fraction, 3 of 16 here.
    let constant = [0.25f32; 8];
    let maps: [&[f32]; 2] = [&constant, &constant];
    let masks: [&[u8]; 2] = [&[0, 1, 0, 0, 1, 0, 0, 0], &[0, 0, 0, 0, 0, 0, 0, 7]];
    close(
        pixel_ap(&maps, &masks).unwrap(),
        3.0 / 16.0,
        1e-15,
        "constant",
    );
    // -0.0 and 0.0 are one score.
    close(
        pixel_ap(&[&[0.0, -0.0, 0.0, -0.0]], &[&[1, 0, 0, 0]]).unwrap(),
        0.25,
        1e-15,
        "signed zeros",
    );
}

#[test]
fn pixel_ap_is_undefined_without_defect_pixels_or_with_bad_shapes() {
    assert_eq!(pixel_ap(&[&[0.1, 0.2]], &[&[0, 0]]), None, "no defect");
    assert_eq!(pixel_ap(&[], &[]), None, "empty");
    assert_eq!(pixel_ap(&[&[0.1, 0.2]], &[&[0, 1, 0]]), None, "lengths");
    assert_eq!(pixel_ap(&[&[0.1, 0.2]], &[]), None, "counts");
}

/// AP straight from its definition: for every distinct score, highest first, count the pixels
/// scoring at least that much, and add the recall gained times the precision.
fn brute_force_ap(maps: &[Vec<f32>], masks: &[Vec<u8>]) -> Option<f64> {
    let pixels: Vec<(f32, bool)> = maps
        .iter()
        .zip(masks)
        .flat_map(|(map, mask)| map.iter().zip(mask).map(|(&s, &m)| (s, m != 0)))
        .collect();
    let positives = pixels.iter().filter(|p| p.1).count();
    if positives == 0 {
        return None;
    }
    let mut thresholds: Vec<f32> = pixels.iter().map(|p| p.0).collect();
    thresholds.sort_by(|a, b| b.total_cmp(a));
    thresholds.dedup();
    let (mut ap, mut previous_recall) = (0.0, 0.0);
    for t in thresholds {
        let called: Vec<&(f32, bool)> = pixels.iter().filter(|p| p.0 >= t).collect();
        let tp = called.iter().filter(|p| p.1).count();
        let recall = tp as f64 / positives as f64;
        let precision = tp as f64 / called.len() as f64;
        ap += (recall - previous_recall) * precision;
        previous_recall = recall;
    }
    Some(ap)
}

#[test]
fn pixel_ap_matches_a_brute_force_reference_on_random_maps() {
    let mut rng = Rng::new(20_240_611);
    for case in 0..24 {
        let images = rng.range_usize(1, 5);
        let pixels = rng.range_usize(1, 60);
        // Even cases draw from few levels (many ties), odd ones are continuous.
        let levels = if case % 2 == 0 {
            rng.range_usize(1, 8)
        } else {
            0
        };
        let defect_rate = [0.02, 0.1, 0.3, 0.7][case % 4];
        let mut maps = Vec::new();
        let mut masks = Vec::new();
        for _ in 0..images {
            let mask: Vec<u8> = (0..pixels)
                .map(|_| u8::from(rng.bool(defect_rate)))
                .collect();
            let map: Vec<f32> = mask
                .iter()
                .map(|&m| {
                    let s = rng.f32() + 0.3 * f32::from(m);
                    if levels == 0 {
                        s
                    } else {
                        (s * levels as f32).floor() / levels as f32
                    }
                })
                .collect();
            maps.push(map);
            masks.push(mask);
        }
        let map_refs: Vec<&[f32]> = maps.iter().map(Vec::as_slice).collect();
        let mask_refs: Vec<&[u8]> = masks.iter().map(Vec::as_slice).collect();
        let expected = brute_force_ap(&maps, &masks);
        let actual = pixel_ap(&map_refs, &mask_refs);
        match (actual, expected) {
            (Some(a), Some(e)) => close(a, e, 1e-12, &format!("case {case}")),
            (a, e) => assert_eq!(a, e, "case {case}"),
        }
    }
}

#[test]
fn summary_per_type_and_overall() {
    // 2x2 images. Good: scores 0.1, 0.3. Scratch (masked): 0.5, 0.2. Dent (no mask): 0.9.
    let good_a = [0.1, 0.1, 0.2, 0.1];
    let good_b = [0.3, 0.1, 0.1, 0.1];
    let scratch_a = [0.8, 0.1, 0.1, 0.1];
    let scratch_b = [0.2, 0.6, 0.1, 0.1];
    let dent = [0.9, 0.9, 0.9, 0.9];
    let mask_a = [1, 0, 0, 0];
    let mask_b = [0, 1, 0, 0];
    let item = |defect_type, score, map, mask| EvalItem {
        defect_type,
        score,
        map,
        mask,
    };
    let items = [
        item(GOOD, 0.1, &good_a, None),
        item(GOOD, 0.3, &good_b, None),
        item("scratch", 0.5, &scratch_a, Some(&mask_a[..])),
        item("scratch", 0.2, &scratch_b, Some(&mask_b[..])),
        item("dent", 0.9, &dent, None),
    ];
    let summary = summarize(&items, 2, 2);

    // Image AUROC: defects {0.5, 0.2, 0.9} vs good {0.1, 0.3}: 2 + 1 + 2 of 6 pairs.
    close(
        summary.image_auroc.unwrap(),
        5.0 / 6.0,
        1e-15,
        "image auroc",
    );
    // F1: >= 0.5: tp 2, fn 1 -> 4/5; >= 0.3: tp 2, fp 1, fn 1 -> 4/6; >= 0.2: tp 3, fp 1 -> 6/7.
    close(summary.image_f1_max.unwrap(), 6.0 / 7.0, 1e-15, "f1 max");
    assert_eq!(summary.f1_threshold, Some(0.2));
    // Pixel metrics: the dent has no mask and is left out; the good images count as clean.
    let expected_pixel = pixel_auroc(
        &[&good_a, &good_b, &scratch_a, &scratch_b],
        &[&[0; 4], &[0; 4], &mask_a, &mask_b],
    );
    assert_eq!(summary.pixel_auroc, expected_pixel);
    let expected_ap = pixel_ap(
        &[&good_a, &good_b, &scratch_a, &scratch_b],
        &[&[0; 4], &[0; 4], &mask_a, &mask_b],
    );
    assert!(expected_ap.is_some());
    assert_eq!(summary.pixel_ap, expected_ap);
    assert!(summary.aupro.is_some());

    assert_eq!(
        summary.per_type.keys().collect::<Vec<_>>(),
        ["dent", "scratch"]
    );
    let dent_metrics = &summary.per_type["dent"];
    assert_eq!(dent_metrics.count, 1);
    close(dent_metrics.image_auroc.unwrap(), 1.0, 0.0, "dent auroc");
    assert_eq!((dent_metrics.pixel_auroc, dent_metrics.aupro), (None, None));
    assert_eq!(dent_metrics.pixel_ap, None);
    let scratch = &summary.per_type["scratch"];
    assert_eq!(scratch.count, 2);
    // Scratch {0.5, 0.2} vs good {0.1, 0.3}: 2 + 1 of 4 pairs.
    close(scratch.image_auroc.unwrap(), 0.75, 1e-15, "scratch auroc");
    assert_eq!(scratch.pixel_auroc, summary.pixel_auroc);
    assert_eq!(scratch.pixel_ap, summary.pixel_ap);

    let json = serde_json::to_string(&summary).unwrap();
    let back: vigil::metrics::Summary = serde_json::from_str(&json).unwrap();
    assert_eq!(back, summary);
}

#[test]
fn summary_pixel_ap_per_type_uses_that_type_and_all_good_images() {
    // 1x4 images. Good: one hot pixel. Crack and hole are masked and rank differently.
    let good = [0.6, 0.1, 0.1, 0.1];
    let crack = [0.9, 0.2, 0.1, 0.1];
    let hole = [0.5, 0.5, 0.1, 0.1];
    let crack_mask = [1, 0, 0, 0];
    let hole_mask = [0, 1, 0, 0];
    let items = [
        EvalItem {
            defect_type: GOOD,
            score: 0.6,
            map: &good,
            mask: None,
        },
        EvalItem {
            defect_type: "crack",
            score: 0.9,
            map: &crack,
            mask: Some(&crack_mask),
        },
        EvalItem {
            defect_type: "hole",
            score: 0.5,
            map: &hole,
            mask: Some(&hole_mask),
        },
    ];
    let summary = summarize(&items, 1, 4);
    let zeros = [0u8; 4];
    // Crack: its pixel 0.9 is the highest of good + crack: AP 1.
    close(
        summary.per_type["crack"].pixel_ap.unwrap(),
        1.0,
        0.0,
        "crack",
    );
    // Hole: 0.6 (good) first, then 0.5 {T, F}: precision 1/3 at recall 1.
    close(
        summary.per_type["hole"].pixel_ap.unwrap(),
        1.0 / 3.0,
        1e-15,
        "hole",
    );
    // Overall: 0.9 T (P 1, R 1/2), 0.6 F, 0.5 {T, F} (P 2/4, R 1): 1/2 + 1/4.
    close(summary.pixel_ap.unwrap(), 0.75, 1e-15, "overall");
    assert_eq!(
        summary.pixel_ap,
        pixel_ap(&[&good, &crack, &hole], &[&zeros, &crack_mask, &hole_mask])
    );
    // The key is in the JSON, top level and per type.
    let json = serde_json::to_value(&summary).unwrap();
    assert_eq!(json["pixel_ap"].as_f64(), Some(0.75));
    assert_eq!(json["per_type"]["crack"]["pixel_ap"].as_f64(), Some(1.0));
}

#[test]
fn summary_without_good_images_has_no_image_auroc() {
    let map = [0.5f32; 4];
    let mask = [1u8, 0, 0, 0];
    let items = [EvalItem {
        defect_type: "crack",
        score: 0.5,
        map: &map,
        mask: Some(&mask),
    }];
    let summary = summarize(&items, 2, 2);
    assert_eq!(summary.image_auroc, None);
    assert_eq!(summary.per_type["crack"].image_auroc, None);
    // A wrongly sized map leaves pixel metrics undefined instead of panicking.
    let summary = summarize(&items, 3, 3);
    assert_eq!((summary.pixel_auroc, summary.aupro), (None, None));
    assert_eq!(summary.pixel_ap, None);
    // Good images only: no defect pixel, so no AP (and it is null in the JSON).
    let good = [EvalItem {
        defect_type: GOOD,
        score: 0.5,
        map: &map,
        mask: None,
    }];
    let summary = summarize(&good, 2, 2);
    assert_eq!(summary.pixel_ap, None);
    let json = serde_json::to_value(&summary).unwrap();
    assert!(json["pixel_ap"].is_null() && json.get("pixel_ap").is_some());
}

// ---- the independent reference ----

#[derive(Deserialize)]
struct Reference {
    image_cases: Vec<ImageCase>,
    pixel_cases: Vec<PixelCase>,
}

#[derive(Deserialize)]
struct ImageCase {
    name: String,
    scores: Vec<f32>,
    labels: Vec<bool>,
    auroc: f64,
    /// sklearn's roc_curve, without its leading +inf threshold.
    roc_fpr: Vec<f64>,
    roc_tpr: Vec<f64>,
    roc_thresholds: Vec<f32>,
    f1_max: f64,
    f1_threshold: f32,
}

#[derive(Deserialize)]
struct PixelCase {
    name: String,
    height: usize,
    width: usize,
    maps: Vec<Vec<f32>>,
    masks: Vec<Vec<u8>>,
    pixel_auroc: f64,
    /// (fpr_limit, aupro) pairs.
    aupro: Vec<(f64, f64)>,
}

fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/metrics_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn image_metrics_match_sklearn() {
    let reference = reference();
    assert!(reference.image_cases.len() >= 5);
    for case in &reference.image_cases {
        let name = &case.name;
        close(
            auroc(&case.scores, &case.labels).unwrap(),
            case.auroc,
            1e-12,
            name,
        );
        let curve = roc(&case.scores, &case.labels).unwrap();
        assert_eq!(curve.thresholds[0], f32::INFINITY);
        assert_eq!(&curve.thresholds[1..], &case.roc_thresholds[..], "{name}");
        assert_eq!(curve.fpr.len(), case.roc_fpr.len() + 1, "{name}");
        for (a, b) in curve.fpr[1..].iter().zip(&case.roc_fpr) {
            close(*a, *b, 1e-12, name);
        }
        for (a, b) in curve.tpr[1..].iter().zip(&case.roc_tpr) {
            close(*a, *b, 1e-12, name);
        }
        let best = f1_max(&case.scores, &case.labels).unwrap();
        close(best.f1, case.f1_max, 1e-12, name);
        assert_eq!(best.threshold, case.f1_threshold, "{name}");
    }
}

#[test]
fn pixel_metrics_match_the_mvtec_reference() {
    let reference = reference();
    assert!(reference.pixel_cases.len() >= 3);
    for case in &reference.pixel_cases {
        let maps: Vec<&[f32]> = case.maps.iter().map(Vec::as_slice).collect();
        let masks: Vec<&[u8]> = case.masks.iter().map(Vec::as_slice).collect();
        let name = &case.name;
        close(
            pixel_auroc(&maps, &masks).unwrap(),
            case.pixel_auroc,
            1e-12,
            name,
        );
        for &(limit, expected) in &case.aupro {
            let value = aupro(&maps, &masks, case.height, case.width, limit).unwrap();
            // Both sides sweep every distinct score exactly; only f64 summation order differs.
            close(value, expected, 1e-9, &format!("{name} aupro@{limit}"));
        }
    }
}

// ---- report pictures ----

mod pictures {
    use std::path::Path;

    use vigil::data::image::{Image, Mask};
    use vigil::metrics::roc;
    use vigil::report::{heatmap_overlay, histogram_png, roc_png};
    use vigil::rng::Rng;

    fn load(path: &Path) -> image::RgbImage {
        image::open(path).unwrap().to_rgb8()
    }

    fn out_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn roc_picture_draws_the_curve() {
        let mut rng = Rng::new(7);
        let labels: Vec<bool> = (0..200).map(|i| i % 3 == 0).collect();
        let scores: Vec<f32> = labels
            .iter()
            .map(|&l| (rng.next_u64() % 1000) as f32 / 1000.0 + if l { 0.4 } else { 0.0 })
            .collect();
        let curve = roc(&scores, &labels).unwrap();
        let dir = out_dir();
        let path = dir.path().join("roc.png");
        roc_png(
            &curve,
            vigil::metrics::auroc(&scores, &labels),
            "Image ROC",
            &path,
        )
        .unwrap();
        let picture = load(&path);
        let bluish = picture
            .pixels()
            .filter(|p| p[2] > 150 && p[0] < 80 && p[1] < 130)
            .count();
        assert!(bluish > 500, "{bluish} curve pixels");
        // Wrong lengths are an error, not a panic.
        let mut broken = curve.clone();
        broken.tpr.pop();
        assert!(roc_png(&broken, None, "x", &path).is_err());
    }

    #[test]
    fn histogram_picture_shows_both_classes_and_rejects_empty_input() {
        let good: Vec<f32> = (0..50).map(|i| i as f32 / 100.0).collect();
        let defect: Vec<f32> = (0..10).map(|i| 0.6 + i as f32 / 50.0).collect();
        let dir = out_dir();
        let path = dir.path().join("hist.png");
        histogram_png(&good, &defect, Some(0.55), "Scores", &path).unwrap();
        let picture = load(&path);
        let count =
            |test: fn(&image::Rgb<u8>) -> bool| picture.pixels().filter(|p| test(p)).count();
        assert!(count(|p| p[2] > 150 && p[0] < 150) > 1000, "good bars");
        assert!(
            count(|p| p[0] > 200 && p[1] < 170 && p[2] < 150) > 1000,
            "defect bars"
        );
        let err = histogram_png(&[f32::NAN], &[], None, "x", &path).unwrap_err();
        assert!(err.to_string().contains("histogram scores"), "{err}");
        // All-equal scores still get a readable axis.
        histogram_png(&[0.5, 0.5], &[0.5], None, "flat", &path).unwrap();
    }

    #[test]
    fn overlay_colours_the_map_and_outlines_the_mask() {
        let (h, w) = (32, 32);
        let mut image = Image::zeros(1, h, w);
        image.data.fill(0.5);
        let mut mask = Mask::zeros(h, w);
        let mut map = vec![0.0f32; h * w];
        for y in 8..16 {
            for x in 8..16 {
                mask.data[y * w + x] = 1;
                map[y * w + x] = 1.0;
            }
        }
        let dir = out_dir();
        let path = dir.path().join("overlay.png");
        heatmap_overlay(&image, &map, (0.0, 1.0), Some(&mask), &path).unwrap();
        let picture = load(&path);
        // 32 px images are enlarged 8x; the right panel starts after a 12 px margin, the left
        // panel and another margin; panels start 30 px down.
        let right_panel =
            |x: usize, y: usize| *picture.get_pixel((12 + 256 + 12 + x) as u32, (30 + y) as u32);
        let hot = right_panel(12 * 8, 12 * 8);
        assert!(
            hot[0] > hot[1] + 50 && hot[0] > hot[2] + 50,
            "defect centre is red: {hot:?}"
        );
        let cold = right_panel(28 * 8, 28 * 8);
        assert!(
            cold[2] > cold[0] + 50 && cold[2] > cold[1] + 50,
            "background is blue: {cold:?}"
        );
        assert_eq!(right_panel(8 * 8, 12 * 8).0, [255, 255, 255], "contour");
        let left = *picture.get_pixel(12 + 4 * 8, 30 + 4 * 8);
        assert_eq!(left.0, [128, 128, 128], "the image itself, unchanged");

        let wrong_map = vec![0.0f32; 10];
        assert!(heatmap_overlay(&image, &wrong_map, (0.0, 1.0), None, &path).is_err());
        assert!(heatmap_overlay(&image, &map, (1.0, 1.0), None, &path).is_err());
        let small_mask = Mask::zeros(4, 4);
        assert!(heatmap_overlay(&image, &map, (0.0, 1.0), Some(&small_mask), &path).is_err());
        let bad_path = dir.path().join("missing-dir").join("x.png");
        assert!(heatmap_overlay(&image, &map, (0.0, 1.0), None, &bad_path).is_err());
    }
}
