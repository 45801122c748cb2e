//! Scoring image sets with a trained detector, and the evaluation report (`vigil eval`).
use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use crate::atomic::write_atomic;
use crate::data::dataset::Loaded;
use crate::data::{batch_tensor, Image};
use crate::error::{Error, Result};
use crate::methods::Method;
use crate::metrics::{self, EvalItem, Summary};
use crate::model_file::ModelMeta;
use crate::report;
use crate::train::progress_bar;

/// Scores and anomaly maps of a set of images.
#[derive(Clone, Debug)]
pub struct Scored {
    pub scores: Vec<f32>,
    /// `N * height * width` map values, image after image.
    pub maps: Vec<f32>,
    pub height: usize,
    pub width: usize,
    /// Time spent in inference alone (no file reading or decoding).
    pub inference_seconds: f64,
}

impl Scored {
    pub fn map(&self, i: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.maps[i * n..(i + 1) * n]
    }
}

/// Runs `method` over `images`, `batch_size` at a time.
pub fn score_images(
    method: &dyn Method,
    images: &[&Image],
    batch_size: usize,
    device: &Device,
    progress: bool,
) -> Result<Scored> {
    let first = images
        .first()
        .ok_or_else(|| Error::invalid("images", "nothing to score"))?;
    let (height, width) = (first.height, first.width);
    let bar = progress_bar(images.len() as u64, "score", progress);
    let mut scores = Vec::with_capacity(images.len());
    let mut maps = Vec::with_capacity(images.len() * height * width);
    let mut inference_seconds = 0.0;
    for chunk in images.chunks(batch_size.max(1)) {
        let batch = batch_tensor(chunk, device)?;
        let start = Instant::now();
        let out = method.infer(&batch)?;
        let batch_scores = out.scores.to_vec1::<f32>()?;
        let batch_maps = out.maps.flatten_all()?.to_vec1::<f32>()?;
        inference_seconds += start.elapsed().as_secs_f64();
        scores.extend(batch_scores);
        maps.extend(batch_maps);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(Scored {
        scores,
        maps,
        height,
        width,
        inference_seconds,
    })
}

/// `metrics.json` as `vigil eval` writes it.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    /// `image_auroc`, `pixel_auroc`, `pixel_ap`, `aupro`, `image_f1_max`, `f1_threshold`,
    /// `per_type`.
    #[serde(flatten)]
    pub metrics: Summary,
    pub images_per_second: f64,
    pub images: usize,
    pub good: usize,
    pub defective: usize,
    pub skipped: Vec<String>,
    pub method: String,
    pub model: String,
    pub data: String,
    pub device: String,
    pub batch_size: usize,
}

/// How many of the most confusing parts get a heatmap overlay in the report.
const WORST_CASES: usize = 8;

/// Scores the loaded test set and writes `metrics.json`, `summary.md`, `scores.csv`, `roc.png`,
/// `histogram.png` and overlays of the worst-scored parts under `out`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    method: &dyn Method,
    meta: &ModelMeta,
    test: &[Loaded],
    skipped: &[(std::path::PathBuf, String)],
    names: (&Path, &Path),
    out: &Path,
    batch_size: usize,
    device: &Device,
    progress: bool,
) -> Result<EvalReport> {
    let images: Vec<&Image> = test.iter().map(|l| &l.image).collect();
    let scored = score_images(method, &images, batch_size, device, progress)?;
    let items: Vec<EvalItem> = test
        .iter()
        .enumerate()
        .map(|(i, l)| EvalItem {
            defect_type: &l.sample.defect_type,
            score: scored.scores[i],
            map: scored.map(i),
            mask: l.mask.as_ref().map(|m| m.data.as_slice()),
        })
        .collect();
    let summary: Summary = metrics::summarize(&items, scored.height, scored.width);
    let defective = test.iter().filter(|l| l.sample.is_defective()).count();
    let report = EvalReport {
        metrics: summary,
        images_per_second: test.len() as f64 / scored.inference_seconds.max(1e-9),
        images: test.len(),
        good: test.len() - defective,
        defective,
        skipped: skipped
            .iter()
            .map(|(p, why)| format!("{}: {why}", p.display()))
            .collect(),
        method: meta.method.clone(),
        model: names.0.display().to_string(),
        data: names.1.display().to_string(),
        device: format!("{device:?}"),
        batch_size,
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| Error::invalid("metrics", e.to_string()))?;
    write_atomic(&out.join("metrics.json"), json.as_bytes())?;
    let mut summary = summary_markdown(&report);
    if let Some(reference) = method.reference_image() {
        crate::data::image::save_png(&reference, &out.join("reference.png"))?;
        summary.push_str(
            "\nReference image (the defect-free part whose features repair the input's): \
             `reference.png`.\n",
        );
    }
    write_atomic(&out.join("summary.md"), summary.as_bytes())?;
    write_atomic(
        &out.join("scores.csv"),
        scores_csv(test, &scored.scores).as_bytes(),
    )?;

    let labels: Vec<bool> = test.iter().map(|l| l.sample.is_defective()).collect();
    if let Some(roc) = metrics::roc(&scored.scores, &labels) {
        report::roc_png(
            &roc,
            report.metrics.image_auroc,
            &format!("{} image ROC", meta.method),
            &out.join("roc.png"),
        )?;
    }
    let score_of = |defective: bool| -> Vec<f32> {
        scored
            .scores
            .iter()
            .zip(&labels)
            .filter(|(_, &d)| d == defective)
            .map(|(&s, _)| s)
            .collect()
    };
    let (good, bad) = (score_of(false), score_of(true));
    report::histogram_png(
        &good,
        &bad,
        report.metrics.f1_threshold,
        &format!("{} image scores", meta.method),
        &out.join("histogram.png"),
    )?;
    write_worst_cases(test, &scored, meta, &out.join("worst"))?;
    Ok(report)
}

/// One line per part (`path,defect_type,score`), in test-set order: what a technician sorts or
/// plots to see which parts, lots or capture settings score high.
fn scores_csv(test: &[Loaded], scores: &[f32]) -> String {
    let mut csv = String::from("path,defect_type,score\n");
    for (loaded, score) in test.iter().zip(scores) {
        let path = loaded.sample.path.display().to_string();
        // Quote a path that holds a comma or a quote, doubling its quotes (RFC 4180).
        let path = if path.contains([',', '"', '\n']) {
            format!("\"{}\"", path.replace('"', "\"\""))
        } else {
            path
        };
        csv.push_str(&format!("{path},{},{score}\n", loaded.sample.defect_type));
    }
    csv
}

/// Overlays for the defect-free parts scored highest and the defective parts scored lowest:
/// the ones a technician has to look at before trusting a threshold.
fn write_worst_cases(test: &[Loaded], scored: &Scored, meta: &ModelMeta, dir: &Path) -> Result<()> {
    let mut good: Vec<usize> = (0..test.len())
        .filter(|&i| !test[i].sample.is_defective())
        .collect();
    let mut bad: Vec<usize> = (0..test.len())
        .filter(|&i| test[i].sample.is_defective())
        .collect();
    good.sort_by(|&a, &b| scored.scores[b].total_cmp(&scored.scores[a]));
    bad.sort_by(|&a, &b| scored.scores[a].total_cmp(&scored.scores[b]));
    let picks = good
        .iter()
        .take(WORST_CASES / 2)
        .map(|&i| ("high-good", i))
        .chain(bad.iter().take(WORST_CASES / 2).map(|&i| ("low-defect", i)));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let range = heatmap_range(meta);
    for (rank, (kind, i)) in picks.enumerate() {
        let stem = test[i]
            .sample
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = format!(
            "{rank:02}-{kind}-{}-{stem}-score{:.3}.png",
            test[i].sample.defect_type, scored.scores[i]
        );
        report::heatmap_overlay(
            &test[i].image,
            scored.map(i),
            range,
            test[i].mask.as_ref(),
            &dir.join(name),
        )?;
    }
    Ok(())
}

/// Heatmap colour range from the validation statistics in the model file, so overlays of
/// different parts (and runs) are comparable.
pub fn heatmap_range(meta: &ModelMeta) -> (f32, f32) {
    map_range(&meta.validation)
}

/// [`heatmap_range`] of a model's validation score statistics.
pub fn map_range(v: &crate::model_file::ScoreStats) -> (f32, f32) {
    let lo = v.map_p50;
    let hi = v.max.max(v.map_p99);
    if hi > lo {
        (lo, hi)
    } else {
        (lo, lo + 1.0)
    }
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.4}"))
}

fn summary_markdown(r: &EvalReport) -> String {
    let mut s = format!(
        "# vigil eval: {}\n\nmodel `{}`, data `{}`, {} images ({} good, {} defective), \
         {:.1} images/s on {} at batch {}\n\n| metric | value |\n|---|---|\n\
         | image AUROC | {} |\n| pixel AUROC | {} |\n| pixel AP | {} |\n\
         | AUPRO (FPR ≤ 0.3) | {} |\n\
         | image F1-max | {} |\n\n",
        r.method,
        r.model,
        r.data,
        r.images,
        r.good,
        r.defective,
        r.images_per_second,
        r.device,
        r.batch_size,
        fmt(r.metrics.image_auroc),
        fmt(r.metrics.pixel_auroc),
        fmt(r.metrics.pixel_ap),
        fmt(r.metrics.aupro),
        fmt(r.metrics.image_f1_max),
    );
    s.push_str(
        "| defect type | images | image AUROC | pixel AUROC | pixel AP | AUPRO |\n\
         |---|---|---|---|---|---|\n",
    );
    for (name, t) in &r.metrics.per_type {
        s.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            t.count,
            fmt(t.image_auroc),
            fmt(t.pixel_auroc),
            fmt(t.pixel_ap),
            fmt(t.aupro)
        ));
    }
    if !r.skipped.is_empty() {
        s.push_str(&format!(
            "\nSkipped {} unreadable files:\n",
            r.skipped.len()
        ));
        for line in &r.skipped {
            s.push_str(&format!("- {line}\n"));
        }
    }
    s.push_str("\nEvery part's score: `scores.csv`. Pictures: `roc.png`, `histogram.png`, `worst/` (highest-scored good and lowest-scored defective parts).\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::TypeMetrics;

    #[test]
    fn summary_markdown_has_pixel_ap_row_and_column() {
        let per_type = [(
            "scratch".to_string(),
            TypeMetrics {
                count: 2,
                image_auroc: Some(0.5),
                pixel_auroc: Some(0.75),
                pixel_ap: Some(0.125),
                aupro: None,
            },
        )]
        .into_iter()
        .collect();
        let report = EvalReport {
            metrics: Summary {
                image_auroc: Some(0.5),
                pixel_auroc: Some(0.75),
                pixel_ap: Some(0.25),
                aupro: Some(0.5),
                image_f1_max: None,
                f1_threshold: None,
                per_type,
            },
            images_per_second: 1.0,
            images: 4,
            good: 2,
            defective: 2,
            skipped: Vec::new(),
            method: "m".into(),
            model: "model".into(),
            data: "data".into(),
            device: "Cpu".into(),
            batch_size: 1,
        };
        let md = summary_markdown(&report);
        assert!(md.contains("| pixel AP | 0.2500 |\n"), "{md}");
        assert!(
            md.contains(
                "| defect type | images | image AUROC | pixel AUROC | pixel AP | AUPRO |\n"
            ),
            "{md}"
        );
        assert!(
            md.contains("| scratch | 2 | 0.5000 | 0.7500 | 0.1250 | n/a |\n"),
            "{md}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["pixel_ap"].as_f64(), Some(0.25));
        assert_eq!(
            json["per_type"]["scratch"]["pixel_ap"].as_f64(),
            Some(0.125)
        );
    }
}
