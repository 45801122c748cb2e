//! Calibration on known score sets. Reference values were computed with SciPy 1.17.1:
//! `scipy.stats.beta.ppf(0.95, k + 1, n - k)` (one-sided Clopper-Pearson upper bound) and
//! `scipy.stats.binom.cdf(k, n, p)`.
use std::path::Path;

use vigil::calibration::{
    binomial_cdf, clopper_pearson_upper, images_needed, plausible_range, threshold_for_frr,
    Calibration, ModelRef,
};
use vigil::model_file::ScoreStats;

fn model() -> ModelRef {
    ModelRef {
        file: "m.safetensors".into(),
        sha256: "abc".into(),
        method: "nf-bmr".into(),
    }
}

#[test]
fn binomial_and_bounds_match_scipy() {
    assert!((binomial_cdf(5, 1000, 0.004) - 0.785_444_123_954_653_2).abs() < 1e-9);
    assert!((binomial_cdf(50, 10_000, 0.006) - 0.106_978_461_743_259_9).abs() < 1e-9);
    for (k, n, want) in [
        (5, 1000, 0.010_484_076_911_415_651),
        (0, 100, 0.029_513_049_607_039_925),
        (3, 200, 0.038_309_708_498_569_34),
    ] {
        let got = clopper_pearson_upper(k, n, 0.95);
        assert!((got - want).abs() < 1e-9, "k {k} n {n}: {got} vs {want}");
    }
    // ln(0.05) / ln(0.995) = 597.6: the "rule of three" count for 0.5%.
    assert_eq!(images_needed(0.005, 0.95), 598);
}

#[test]
fn threshold_rejects_the_allowed_share_of_good_parts() {
    // 1000 good scores 0.001 .. 1.000; 0.5% allowed = 5 rejects: between 0.995 and 0.996.
    let good: Vec<f32> = (1..=1000).map(|i| i as f32 / 1000.0).collect();
    let cal = Calibration::from_scores(&good, &[], 0.005, model()).unwrap();
    assert!((cal.threshold - 0.9955).abs() < 1e-6, "{}", cal.threshold);
    assert_eq!(cal.counts.good_rejected, 5);
    assert!((cal.false_reject.observed - 0.005).abs() < 1e-12);
    assert!((cal.false_reject.upper_bound - 0.010_484_076_911_415_651).abs() < 1e-9);
    assert_eq!(cal.images_needed, 598);
    assert!(cal.escape.is_none() && cal.f1_optimal.is_none());
    assert!((cal.normalized(cal.threshold) - 0.5).abs() < 1e-6);
    assert!(cal.normalized(0.5) < 0.5 && cal.normalized(0.999) > 0.5);
}

#[test]
fn too_few_images_put_the_threshold_just_above_the_highest_good_score() {
    let good = [0.1f32, 0.4, 0.2, 0.3];
    let cal = Calibration::from_scores(&good, &[], 0.005, model()).unwrap();
    assert!(cal.threshold > 0.4 && cal.threshold < 0.400_001);
    assert_eq!(cal.counts.good_rejected, 0);
    assert!((cal.false_reject.upper_bound - (1.0 - 0.05f64.powf(0.25))).abs() < 1e-9);
    // Ties at the cut never push more rejects than allowed.
    let tied = [1.0f32; 10];
    assert!(threshold_for_frr(&tied, 0.2) > 1.0);
}

#[test]
fn defect_scores_give_escape_rate_and_f1_threshold() {
    let good: Vec<f32> = (0..200).map(|i| i as f32 / 200.0).collect(); // 0 .. 0.995
    let defect = [0.5f32, 1.5, 2.0, 3.0];
    let cal = Calibration::from_scores(&good, &defect, 0.01, model()).unwrap();
    // 2 of 200 allowed: threshold between 0.985 and 0.99; the 0.5 defect escapes.
    assert!((cal.threshold - 0.9875).abs() < 1e-6, "{}", cal.threshold);
    assert_eq!(cal.counts.defect_escaped, 1);
    let escape = cal.escape.unwrap();
    assert!((escape.observed - 0.25).abs() < 1e-12);
    let f1 = cal.f1_optimal.unwrap();
    assert!(
        f1.threshold > 0.995 && f1.threshold <= 1.5,
        "{}",
        f1.threshold
    );
    assert!((f1.f1 - 6.0 / 7.0).abs() < 1e-9, "{}", f1.f1);
    assert!(cal.normalized(3.0) <= 1.0 && cal.normalized(0.0) >= 0.0);
}

#[test]
fn toml_round_trip_and_bad_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good: Vec<f32> = (0..50).map(|i| i as f32).collect();
    let cal = Calibration::from_scores(&good, &[60.0], 0.02, model()).unwrap();
    let path = dir.path().join("c.toml");
    cal.save(&path).unwrap();
    assert_eq!(Calibration::load(&path).unwrap(), cal);
    assert!(cal.check_model("abc", &path).is_ok());
    let err = cal.check_model("other", &path).unwrap_err().to_string();
    assert!(
        err.contains("m.safetensors") && err.contains("c.toml"),
        "{err}"
    );

    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("threshold =", "treshold =")).unwrap();
    let err = Calibration::load(&path).unwrap_err().to_string();
    assert!(err.contains("c.toml") && err.contains("treshold"), "{err}");
    assert!(Calibration::from_scores(&[], &[], 0.01, model()).is_err());
    assert!(Calibration::from_scores(&[1.0], &[], 1.5, model())
        .unwrap_err()
        .to_string()
        .contains("target-frr"));
}

/// Validation scores 0.25 .. 0.75: the plausible range is (0.25, 0.75 + 10 * 0.75] = (0.25, 8.25].
fn validation() -> ScoreStats {
    ScoreStats::from_values(&[0.25, 0.5, 0.75], &mut [0.1, 0.2])
}

fn with_threshold(threshold: f32) -> Calibration {
    let mut cal = Calibration::from_scores(&[0.3, 0.4], &[], 0.01, model()).unwrap();
    cal.threshold = threshold;
    cal
}

#[test]
fn plausible_range_follows_the_validation_scores() {
    assert_eq!(plausible_range(&validation()), Some((0.25, 8.25)));
    assert_eq!(plausible_range(&ScoreStats::default()), None);
    // All scores equal and zero: the range still has a width.
    let flat = ScoreStats::from_values(&[0.0, 0.0], &mut []);
    let (lo, hi) = plausible_range(&flat).unwrap();
    assert!(lo == 0.0 && hi > 0.0, "({lo}, {hi}]");
}

#[test]
fn implausible_thresholds_are_refused_naming_threshold_and_bounds() {
    let path = Path::new("c.toml");
    for (threshold, shown) in [(1e30f32, "1e30"), (0.0, "threshold 0 "), (0.25, "0.25 ")] {
        let err = with_threshold(threshold)
            .check_plausible(&validation(), path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.toml")
                && err.contains(shown)
                && err.contains("(0.25, 8.25]")
                && err.contains("min 0.25, max 0.75"),
            "{err}"
        );
    }
}

#[test]
fn plausible_thresholds_and_missing_statistics_are_accepted() {
    let path = Path::new("c.toml");
    for threshold in [0.5f32, 0.26, 0.8, 8.25] {
        assert!(
            with_threshold(threshold)
                .check_plausible(&validation(), path)
                .is_ok(),
            "{threshold}"
        );
    }
    assert!(with_threshold(1e30)
        .check_plausible(&ScoreStats::default(), path)
        .is_ok());
}
