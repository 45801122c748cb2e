//! `vigil select`: which of several trained candidates (configs, methods) to keep for a product,
//! without a single labelled defect. Every candidate scores the same images: the defect-free
//! validation share its training kept out, and synthetic anomalies drawn from those images of the
//! kinds that no candidate learned (a detector must not be judged by what it was taught). The one
//! that separates them best is chosen. No test image is read.
use std::path::{Path, PathBuf};

use crate::atomic::write_atomic;
use crate::data::dataset::{self, DataSource, Dataset, SplitOptions};
use crate::data::Image;
use crate::error::{Error, Result};
use crate::model_file::{self, ModelMeta};
use crate::train::{forge_validation, validation_separation, yardstick_kinds};

use super::{load, open_model, RunOptions};

#[derive(Clone, Debug)]
pub struct SelectArgs {
    /// The candidates' model files, in order of preference (a tie goes to the earlier).
    pub models: Vec<PathBuf>,
    /// The data the candidates were trained on.
    pub data: DataSource,
    /// The validation share and training limit the candidates were trained with.
    pub validation_fraction: f32,
    pub train_limit: Option<usize>,
    /// Synthetic anomalies drawn from every validation image.
    pub draws: usize,
    /// Copy the chosen model file here (atomically).
    pub keep: Option<PathBuf>,
    pub run: RunOptions,
}

#[derive(Clone, Debug)]
pub struct Candidate {
    pub model: PathBuf,
    pub method: String,
    /// The synthetic kinds it learned, left out of everyone's yardstick.
    pub learned: Vec<&'static str>,
    /// Image AUROC of the synthetic anomalies against the validation images.
    pub separation: f32,
}

#[derive(Clone, Debug)]
pub struct SelectReport {
    /// The kinds of synthetic anomaly every candidate was judged by.
    pub kinds: Vec<&'static str>,
    pub validation_images: usize,
    pub anomalies: usize,
    pub candidates: Vec<Candidate>,
    /// Index into `candidates`.
    pub chosen: usize,
}

/// The first candidate with the highest separation.
pub fn best(separations: &[f32]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &s) in separations.iter().enumerate() {
        if best.is_none_or(|b| s > separations[b]) {
            best = Some(i);
        }
    }
    best
}

pub fn select(args: &SelectArgs) -> Result<SelectReport> {
    let first = args
        .models
        .first()
        .ok_or_else(|| Error::invalid("candidates", "give at least one model file"))?;
    if args.draws == 0 {
        return Err(Error::config("draws", "must be at least 1"));
    }
    let metas = args
        .models
        .iter()
        .map(|m| model_file::read_meta(m))
        .collect::<Result<Vec<_>>>()?;
    let reference = &metas[0];
    for (path, meta) in args.models.iter().zip(&metas).skip(1) {
        same_validation(reference, first, meta, path)?;
    }
    if !reference.training.defects.is_empty() {
        return Err(Error::ModelFile {
            path: first.clone(),
            reason: "trained on defective images (few-shot): its validation share cannot be \
                     rebuilt here; compare models trained on defect-free images"
                .into(),
        });
    }
    let data = Dataset::open(
        &args.data,
        &SplitOptions {
            validation_fraction: args.validation_fraction,
            seed: reference.training.seed,
            train_limit: args.train_limit,
        },
    )?;
    if dataset::fingerprint(&data.train)? != reference.training.data_fingerprint {
        return Err(Error::ModelFile {
            path: first.clone(),
            reason: format!(
                "was not trained on these images with validation share {} and training limit \
                 {:?} (or some of its training images were unreadable and skipped): its \
                 validation images cannot be told apart from its training images",
                args.validation_fraction, args.train_limit
            ),
        });
    }
    let loaded = load(
        &data.validation,
        &reference.input,
        &RunOptions {
            skip_bad: false,
            ..args.run.clone()
        },
        "load val",
    )?;
    let validation: Vec<Image> = loaded.loaded.into_iter().map(|l| l.image).collect();
    if validation.len() != reference.training.validation_images {
        return Err(Error::ModelFile {
            path: first.clone(),
            reason: format!(
                "kept {} validation images out of its training, this split has {}",
                reference.training.validation_images,
                validation.len()
            ),
        });
    }
    if validation.len() < 2 {
        return Err(Error::invalid(
            "validation images",
            format!(
                "{} defect-free validation image(s): too few to compare candidates; raise \
                 --validation-fraction when training",
                validation.len()
            ),
        ));
    }
    let device = args.run.device.open()?;
    let mut methods = Vec::with_capacity(args.models.len());
    let mut excluded: Vec<&'static str> = Vec::new();
    for path in &args.models {
        let (meta, method) = open_model(path, &device)?;
        let learned = method.synthetic_kinds();
        for k in &learned {
            if !excluded.contains(k) {
                excluded.push(k);
            }
        }
        methods.push((path, meta.method, learned, method));
    }
    let kinds = yardstick_kinds(&excluded);
    let forged = forge_validation(&validation, reference.training.seed, &excluded, args.draws)?;
    let mut candidates = Vec::with_capacity(methods.len());
    for (path, name, learned, method) in methods {
        let separation = validation_separation(
            method.as_ref(),
            &validation,
            &forged,
            args.run.batch_size,
            &device,
        )?;
        log::info!("{}: separation {separation:.4}", path.display());
        candidates.push(Candidate {
            model: path.clone(),
            method: name,
            learned,
            separation,
        });
    }
    let separations: Vec<f32> = candidates.iter().map(|c| c.separation).collect();
    let chosen = best(&separations).expect("at least one candidate");
    if let Some(keep) = &args.keep {
        let from = &candidates[chosen].model;
        let bytes = std::fs::read(from).map_err(|e| Error::io(from, e))?;
        write_atomic(keep, &bytes)?;
    }
    Ok(SelectReport {
        kinds,
        validation_images: validation.len(),
        anomalies: forged.len(),
        candidates,
        chosen,
    })
}

/// Refuses a candidate whose validation share differs from the first one's: they must all be
/// judged by the same images.
fn same_validation(
    reference: &ModelMeta,
    reference_path: &Path,
    meta: &ModelMeta,
    path: &Path,
) -> Result<()> {
    let differs = |what: &str| {
        Err(Error::ModelFile {
            path: path.into(),
            reason: format!(
                "has another {what} than {}: candidates must be trained on the same images with \
                 the same seed and input size, so they are judged by the same validation images",
                reference_path.display()
            ),
        })
    };
    if meta.training.seed != reference.training.seed {
        return differs("seed");
    }
    if meta.training.data_fingerprint != reference.training.data_fingerprint {
        return differs("set of training images");
    }
    if meta.input != reference.input {
        return differs("input size");
    }
    if meta.training.defects != reference.training.defects {
        return differs("set of defective training images");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::best;

    #[test]
    fn the_highest_separation_wins_and_a_tie_goes_to_the_earlier() {
        assert_eq!(best(&[]), None);
        assert_eq!(best(&[0.6, 0.8, 0.7]), Some(1));
        assert_eq!(best(&[0.8, 0.6, 0.8]), Some(0));
        assert_eq!(best(&[0.5, 0.9, 0.9]), Some(1));
    }
}
