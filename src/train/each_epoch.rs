//! `vigil train --eval-each-epoch DATA`: a research diagnostic that scores the labelled test split
//! after every epoch and writes the table beside the model.
//!
//! It exists to compare with published numbers. GANomaly, Skip-GANomaly and OCR-GAN report the
//! epoch with the best **test-set** AUROC; a line cannot pick its model by labelled test parts.
//! The observer only reads the method (it is lent immutably, between epochs, and the training's
//! randomness is seeded per epoch), so the epoch vigil keeps, the model file and its calibration
//! are what they are without it (`tests/test_each_epoch.rs` checks that the model file is the
//! same). The table and the printed summary say that they use test labels.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use super::{EpochObserver, TrainReport};
use crate::atomic::write_atomic;
use crate::data::dataset::{Loaded, GOOD};
use crate::data::Image;
use crate::error::{Error, Result};
use crate::eval::score_images;
use crate::methods::Method;
use crate::metrics;

/// What the table's header and the printed summary say about where the numbers come from.
pub const TEST_LABELS_NOTICE: &str = "uses TEST LABELS: a research diagnostic, never used to \
    select the epoch kept or to calibrate; its maximum picks a model by its test result (the \
    protocol of GANomaly, Skip-GANomaly and OCR-GAN's published numbers), which a line cannot do";

/// The test split's metrics after one epoch.
#[derive(Clone, Debug, Serialize)]
pub struct EpochTest {
    pub phase: String,
    /// 1-based, within the phase.
    pub epoch: usize,
    pub image_auroc: Option<f64>,
    pub pixel_auroc: Option<f64>,
    /// Image AUROC of each defect type against all good images.
    pub per_type_image_auroc: BTreeMap<String, Option<f64>>,
    /// The training's own, label-free yardstick in this epoch (synthetic anomalies of the
    /// validation images), where the phase selects an epoch.
    pub validation_separation: Option<f32>,
    /// The epoch whose parameters the phase kept (vigil's selection, or its last epoch).
    pub kept: bool,
    /// Time the diagnostic took after this epoch.
    pub seconds: f64,
}

/// One epoch's image and pixel AUROC.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EpochAuroc {
    pub epoch: usize,
    pub image_auroc: f64,
    pub pixel_auroc: Option<f64>,
}

/// The last phase's epochs summarised (the phase whose parameters the model file holds).
#[derive(Clone, Debug, Serialize)]
pub struct EachEpochSummary {
    pub notice: &'static str,
    pub phase: String,
    pub epochs: usize,
    /// The best epoch by test image AUROC: the paper's protocol.
    pub max: EpochAuroc,
    pub median_image_auroc: f64,
    pub median_pixel_auroc: Option<f64>,
    pub last: EpochAuroc,
    /// The epoch vigil's own selection kept: what the model file holds (its `vigil eval` image
    /// AUROC is this one, up to ties its score scaling may create).
    pub kept: EpochAuroc,
    /// Test images scored after each epoch.
    pub images: usize,
    /// The Markdown table (a JSON copy sits beside it).
    pub table: PathBuf,
    /// Time the diagnostic took in all (left out of the training's time).
    pub seconds: f64,
}

/// Scores the test split after every epoch ([`EpochObserver`]); [`TestEachEpoch::finish`] marks
/// the kept epochs and writes the summary.
pub struct TestEachEpoch {
    test: Vec<Loaded>,
    data: PathBuf,
    batch_size: usize,
    device: Device,
    table: PathBuf,
    rows: Vec<EpochTest>,
}

/// Median of non-empty values (the mean of the middle two for an even count).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn cell(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.4}"))
}

impl TestEachEpoch {
    /// `test`: the loaded test split (defect types and masks), without any image the model
    /// trains on; `model`: the model file the table goes beside (`NAME.test-each-epoch.md`).
    pub fn new(
        test: Vec<Loaded>,
        data: &Path,
        model: &Path,
        batch_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let defective = test.iter().filter(|l| l.sample.is_defective()).count();
        if defective == 0 || defective == test.len() {
            return Err(Error::Dataset {
                path: data.into(),
                reason: format!(
                    "--eval-each-epoch needs good and defective test images; found {} good and \
                     {defective} defective",
                    test.len() - defective
                ),
            });
        }
        Ok(TestEachEpoch {
            test,
            data: data.into(),
            batch_size,
            device: device.clone(),
            table: model.with_extension("test-each-epoch.md"),
            rows: Vec::new(),
        })
    }

    fn measure(&self, method: &dyn Method, phase: &str, epoch: usize) -> Result<EpochTest> {
        let start = Instant::now();
        let images: Vec<&Image> = self.test.iter().map(|l| &l.image).collect();
        let scored = score_images(method, &images, self.batch_size, &self.device, false)?;
        let labels: Vec<bool> = self.test.iter().map(|l| l.sample.is_defective()).collect();
        let zeros = vec![0u8; scored.height * scored.width];
        let (mut maps, mut masks) = (Vec::new(), Vec::new());
        for (i, loaded) in self.test.iter().enumerate() {
            let mask = match &loaded.mask {
                Some(mask) => mask.data.as_slice(),
                None if !loaded.sample.is_defective() => zeros.as_slice(),
                None => continue,
            };
            maps.push(scored.map(i));
            masks.push(mask);
        }
        let mut types: BTreeMap<String, (Vec<f32>, Vec<bool>)> = BTreeMap::new();
        for loaded in self.test.iter().filter(|l| l.sample.defect_type != GOOD) {
            types.entry(loaded.sample.defect_type.clone()).or_default();
        }
        for (loaded, &score) in self.test.iter().zip(&scored.scores) {
            for (name, (scores, labels)) in types.iter_mut() {
                let defective = loaded.sample.defect_type == *name;
                if defective || !loaded.sample.is_defective() {
                    scores.push(score);
                    labels.push(defective);
                }
            }
        }
        Ok(EpochTest {
            phase: phase.to_string(),
            epoch,
            image_auroc: metrics::auroc(&scored.scores, &labels),
            pixel_auroc: metrics::pixel_auroc(&maps, &masks),
            per_type_image_auroc: types
                .into_iter()
                .map(|(name, (scores, labels))| (name, metrics::auroc(&scores, &labels)))
                .collect(),
            validation_separation: None,
            kept: false,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    fn markdown(&self, summary: Option<&EachEpochSummary>) -> String {
        let defective = self.test.iter().filter(|l| l.sample.is_defective()).count();
        let types: Vec<&String> = self
            .rows
            .first()
            .map(|r| r.per_type_image_auroc.keys().collect())
            .unwrap_or_default();
        let mut s = format!(
            "# Test-set AUROC after every epoch\n\n**This table {TEST_LABELS_NOTICE}.**\n\n\
             Test data `{}`: {} images ({} good, {defective} defective).\n\n\
             | phase | epoch | image AUROC | pixel AUROC | validation separation | kept |",
            self.data.display(),
            self.test.len(),
            self.test.len() - defective,
        );
        for name in &types {
            s.push_str(&format!(" {name} |"));
        }
        s.push_str("\n|---|---|---|---|---|---|");
        s.push_str(&"---|".repeat(types.len()));
        s.push('\n');
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |",
                r.phase,
                r.epoch,
                cell(r.image_auroc),
                cell(r.pixel_auroc),
                cell(r.validation_separation.map(f64::from)),
                if r.kept { "kept" } else { "" }
            ));
            for name in &types {
                s.push_str(&format!(
                    " {} |",
                    cell(r.per_type_image_auroc.get(*name).copied().flatten())
                ));
            }
            s.push('\n');
        }
        if let Some(m) = summary {
            s.push_str(&format!(
                "\nPhase `{}`, {} epochs: image AUROC **max {:.4}** (epoch {}, the paper's \
                 protocol), median {:.4}, last {:.4} (epoch {}); **vigil's selection kept epoch \
                 {}: {:.4}** (pixel AUROC max {}, median {}, last {}, kept {}).\n",
                m.phase,
                m.epochs,
                m.max.image_auroc,
                m.max.epoch,
                m.median_image_auroc,
                m.last.image_auroc,
                m.last.epoch,
                m.kept.epoch,
                m.kept.image_auroc,
                cell(m.max.pixel_auroc),
                cell(m.median_pixel_auroc),
                cell(m.last.pixel_auroc),
                cell(m.kept.pixel_auroc),
            ));
        }
        s
    }

    fn write(&self, summary: Option<&EachEpochSummary>) -> Result<()> {
        write_atomic(&self.table, self.markdown(summary).as_bytes())?;
        let json = serde_json::json!({
            "uses_test_labels": true,
            "notice": TEST_LABELS_NOTICE,
            "data": self.data,
            "epochs": self.rows,
            "summary": summary,
        });
        let text = serde_json::to_string_pretty(&json)
            .map_err(|e| Error::invalid("per-epoch table", e.to_string()))?;
        write_atomic(&self.table.with_extension("json"), text.as_bytes())
    }

    /// Marks each phase's kept epoch and its validation separation from the training's report,
    /// writes the final table and summarises the last phase.
    pub fn finish(mut self, report: &TrainReport) -> Result<EachEpochSummary> {
        for row in &mut self.rows {
            if let Some(phase) = report.phases.iter().find(|p| p.name == row.phase) {
                let kept = phase.kept_epoch.unwrap_or(phase.epochs.len());
                row.kept = row.epoch == kept;
                row.validation_separation = phase
                    .epochs
                    .get(row.epoch - 1)
                    .and_then(|e| e.validation_separation);
            }
        }
        let phase = report
            .phases
            .last()
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let last_phase: Vec<EpochAuroc> = self
            .rows
            .iter()
            .filter(|r| r.phase == phase)
            .filter_map(|r| {
                r.image_auroc.map(|image_auroc| EpochAuroc {
                    epoch: r.epoch,
                    image_auroc,
                    pixel_auroc: r.pixel_auroc,
                })
            })
            .collect();
        let kept_epoch = self
            .rows
            .iter()
            .find(|r| r.phase == phase && r.kept)
            .map(|r| r.epoch);
        let (Some(&last), Some(kept)) = (
            last_phase.last(),
            last_phase.iter().find(|e| Some(e.epoch) == kept_epoch),
        ) else {
            return Err(Error::invalid(
                "--eval-each-epoch",
                format!("no test AUROC for the kept epoch of phase `{phase}`"),
            ));
        };
        let max = *last_phase
            .iter()
            .max_by(|a, b| {
                a.image_auroc
                    .total_cmp(&b.image_auroc)
                    .then(b.epoch.cmp(&a.epoch))
            })
            .expect("non-empty");
        let mut image: Vec<f64> = last_phase.iter().map(|e| e.image_auroc).collect();
        let mut pixel: Vec<f64> = last_phase.iter().filter_map(|e| e.pixel_auroc).collect();
        let summary = EachEpochSummary {
            notice: TEST_LABELS_NOTICE,
            phase,
            epochs: last_phase.len(),
            max,
            median_image_auroc: median(&mut image),
            median_pixel_auroc: (!pixel.is_empty()).then(|| median(&mut pixel)),
            last,
            kept: *kept,
            images: self.test.len(),
            table: self.table.clone(),
            seconds: self.rows.iter().map(|r| r.seconds).sum(),
        };
        self.write(Some(&summary))?;
        Ok(summary)
    }
}

impl EpochObserver for TestEachEpoch {
    fn epoch_done(&mut self, method: &dyn Method, phase: &str, epoch: usize) -> Result<()> {
        let row = self.measure(method, phase, epoch)?;
        log::info!(
            "epoch {epoch} of `{phase}` on the TEST split (diagnostic, not used for selection): \
             image AUROC {}, pixel AUROC {}",
            cell(row.image_auroc),
            cell(row.pixel_auroc)
        );
        self.rows.push(row);
        // Rewritten after every epoch: a long run shows its progress, a stopped one keeps it.
        self.write(None)
    }
}
