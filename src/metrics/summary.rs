//! The evaluation summary: overall and per-defect-type metrics of a test set.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{auroc, f1_max, pixel_keys, pro::aupro, ranking};

/// The defect type of defect-free images.
pub const GOOD: &str = "good";

/// AUPRO's usual false positive rate limit (MVTec AD).
pub const AUPRO_FPR_LIMIT: f64 = 0.3;

/// What the evaluator knows about one test image.
#[derive(Clone, Copy, Debug)]
pub struct EvalItem<'a> {
    /// [`GOOD`] for a defect-free image, else the defect type.
    pub defect_type: &'a str,
    pub score: f32,
    /// The anomaly map, `height * width`, row-major.
    pub map: &'a [f32],
    /// The ground-truth mask (`!= 0` = defect); good images need none.
    pub mask: Option<&'a [u8]>,
}

/// One defect type measured against all good images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TypeMetrics {
    /// Images of this type.
    pub count: usize,
    pub image_auroc: Option<f64>,
    pub pixel_auroc: Option<f64>,
    /// Pixel average precision; `None` when no pixel of this type is a defect.
    pub pixel_ap: Option<f64>,
    pub aupro: Option<f64>,
}

/// Metrics of a whole test set; a metric is `None` when the data cannot define it (e.g. no good
/// image, or no mask for pixel metrics).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub image_auroc: Option<f64>,
    pub pixel_auroc: Option<f64>,
    /// Pixel average precision (see [`super::pixel_ap`]); `None` when no pixel is a defect.
    pub pixel_ap: Option<f64>,
    /// Up to a false positive rate of [`AUPRO_FPR_LIMIT`].
    pub aupro: Option<f64>,
    pub image_f1_max: Option<f64>,
    /// The image score threshold reaching `image_f1_max` (`score >= threshold` = defect).
    pub f1_threshold: Option<f32>,
    pub per_type: BTreeMap<String, TypeMetrics>,
}

/// Computes the summary. Pixel metrics use the images that have a mask plus the good images (as
/// all-zero masks); an image whose map or mask is not `height * width` long leaves the pixel
/// metrics of the sets it belongs to at `None`.
pub fn summarize(items: &[EvalItem], height: usize, width: usize) -> Summary {
    let zeros = vec![0u8; height * width];
    let all: Vec<&EvalItem> = items.iter().collect();
    let (image_auroc, image_f1) = image_metrics(&all);
    let pixel = pixel_metrics(&all, &zeros, height, width);

    let mut by_type: BTreeMap<&str, Vec<&EvalItem>> = BTreeMap::new();
    for item in items.iter().filter(|i| i.defect_type != GOOD) {
        by_type.entry(item.defect_type).or_default().push(item);
    }
    let good: Vec<&EvalItem> = items.iter().filter(|i| i.defect_type == GOOD).collect();
    let per_type = by_type
        .into_iter()
        .map(|(name, defects)| {
            let count = defects.len();
            let mut subset = good.clone();
            subset.extend(defects);
            let (image_auroc, _) = image_metrics(&subset);
            let pixel = pixel_metrics(&subset, &zeros, height, width);
            let metrics = TypeMetrics {
                count,
                image_auroc,
                pixel_auroc: pixel.auroc,
                pixel_ap: pixel.ap,
                aupro: pixel.aupro,
            };
            (name.to_string(), metrics)
        })
        .collect();

    Summary {
        image_auroc,
        pixel_auroc: pixel.auroc,
        pixel_ap: pixel.ap,
        aupro: pixel.aupro,
        image_f1_max: image_f1.map(|s| s.f1),
        f1_threshold: image_f1.map(|s| s.threshold),
        per_type,
    }
}

fn image_metrics(items: &[&EvalItem]) -> (Option<f64>, Option<super::ThresholdStats>) {
    let scores: Vec<f32> = items.iter().map(|i| i.score).collect();
    let labels: Vec<bool> = items.iter().map(|i| i.defect_type != GOOD).collect();
    (auroc(&scores, &labels), f1_max(&scores, &labels))
}

/// The pixel metrics of one set of images.
#[derive(Default)]
struct PixelMetrics {
    auroc: Option<f64>,
    ap: Option<f64>,
    aupro: Option<f64>,
}

fn pixel_metrics(items: &[&EvalItem], zeros: &[u8], height: usize, width: usize) -> PixelMetrics {
    let mut maps = Vec::with_capacity(items.len());
    let mut masks = Vec::with_capacity(items.len());
    for item in items {
        let mask = match (item.mask, item.defect_type == GOOD) {
            (Some(mask), _) => mask,
            (None, true) => zeros,
            (None, false) => continue,
        };
        maps.push(item.map);
        masks.push(mask);
    }
    if maps.iter().any(|m| m.len() != height * width) {
        return PixelMetrics::default();
    }
    // AUROC and AP share one sort of the pixels.
    let keys = pixel_keys(&maps, &masks);
    let keys = keys.as_deref();
    PixelMetrics {
        auroc: keys.and_then(ranking::auroc_of_sorted),
        ap: keys.and_then(ranking::average_precision_of_sorted),
        aupro: aupro(&maps, &masks, height, width, AUPRO_FPR_LIMIT),
    }
}
