//! Datasets on disk: the MVTec AD layout or plain folders, split into train, validation and test.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};

use crate::data::image::{load_image, load_mask, Image, InputSpec, Mask};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// The defect type of defect-free images.
pub const GOOD: &str = "good";

const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    /// `"good"` for defect-free images, otherwise the defect type (its folder name).
    pub defect_type: String,
    pub mask: Option<PathBuf>,
}

impl Sample {
    pub fn is_defective(&self) -> bool {
        self.defect_type != GOOD
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// `root/train/good`, `root/test/<type>`, `root/ground_truth/<type>/<stem>_mask.png`.
    Mvtec { root: PathBuf },
    /// A folder of defect-free images, optionally one of defective images and one of their masks
    /// (`<stem>_mask.png` or `<stem>.png`).
    Plain {
        good: PathBuf,
        defect: Option<PathBuf>,
        masks: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SplitOptions {
    /// Share of the defect-free training images held out for validation (calibration); at least
    /// one image is held out whenever there are two or more.
    pub validation_fraction: f32,
    pub seed: u64,
    /// Use only this many of the defect-free training images (a seeded choice, before the
    /// validation split): how a product with fewer images would train.
    pub train_limit: Option<usize>,
}

impl Default for SplitOptions {
    fn default() -> Self {
        SplitOptions {
            validation_fraction: 0.1,
            seed: 0,
            train_limit: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dataset {
    pub train: Vec<Sample>,
    pub validation: Vec<Sample>,
    pub test: Vec<Sample>,
    /// Defective images to train on (with masks): taken out of `test` by [`Dataset::take_few_shot`]
    /// or [`Dataset::train_on_defects`].
    pub train_defects: Vec<Sample>,
}

fn dataset_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn is_image_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(dataset_error(dir, "folder does not exist"));
    }
    let mut paths = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|entry| entry.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<Vec<_>>>()?;
    paths.sort();
    Ok(paths)
}

/// The image files in `dir`, sorted by name; an error when there are none.
pub(crate) fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let images: Vec<PathBuf> = read_dir_sorted(dir)?
        .into_iter()
        .filter(|p| is_image_file(p))
        .collect();
    if images.is_empty() {
        return Err(dataset_error(
            dir,
            format!("no image files ({})", IMAGE_EXTENSIONS.join(", ")),
        ));
    }
    Ok(images)
}

fn good_samples(paths: Vec<PathBuf>) -> Vec<Sample> {
    paths
        .into_iter()
        .map(|path| Sample {
            path,
            defect_type: GOOD.to_string(),
            mask: None,
        })
        .collect()
}

/// Splits defect-free images into (train, validation) with a seeded shuffle; both keep name order.
fn split_train_validation(
    good: Vec<Sample>,
    split: &SplitOptions,
) -> Result<(Vec<Sample>, Vec<Sample>)> {
    let fraction = split.validation_fraction;
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::config(
            "validation_fraction",
            format!("{fraction} (must be in [0, 1))"),
        ));
    }
    let good = match split.train_limit {
        Some(0) => return Err(Error::config("train_limit", "must be at least 1")),
        Some(limit) if limit < good.len() => {
            let mut order: Vec<usize> = (0..good.len()).collect();
            Rng::new(split.seed).fork(0x11_31_7e).shuffle(&mut order);
            let mut keep = vec![false; good.len()];
            for &i in &order[..limit] {
                keep[i] = true;
            }
            good.into_iter()
                .zip(keep)
                .filter_map(|(s, k)| k.then_some(s))
                .collect()
        }
        _ => good,
    };
    let n = good.len();
    if n < 2 {
        return Ok((good, Vec::new()));
    }
    let n_validation = ((n as f32 * fraction).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(split.seed).shuffle(&mut order);
    let mut is_validation = vec![false; n];
    for &i in &order[..n_validation] {
        is_validation[i] = true;
    }
    let (validation, train): (Vec<_>, Vec<_>) =
        good.into_iter().zip(is_validation).partition(|(_, v)| *v);
    Ok((
        train.into_iter().map(|(s, _)| s).collect(),
        validation.into_iter().map(|(s, _)| s).collect(),
    ))
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn find_mask(dir: &Path, image: &Path, names: &[String]) -> Option<PathBuf> {
    let found = names.iter().map(|n| dir.join(n)).find(|p| p.is_file());
    if found.is_none() {
        log::warn!(
            "defective image {} has no mask in {} (looked for {})",
            image.display(),
            dir.display(),
            names.join(" or ")
        );
    }
    found
}

impl Dataset {
    /// Moves `k` defective test images of each defect type (a seeded choice) to
    /// `train_defects`: the few-shot setting. Each needs a mask.
    pub fn take_few_shot(&mut self, k: usize, seed: u64) -> Result<()> {
        if k == 0 {
            return Err(Error::config("few_shot", "must be at least 1"));
        }
        let mut types: Vec<String> = self
            .test
            .iter()
            .filter(|s| s.is_defective())
            .map(|s| s.defect_type.clone())
            .collect();
        types.dedup();
        if types.is_empty() {
            return Err(Error::invalid(
                "few_shot",
                "the data set has no defective test images to take",
            ));
        }
        let mut rng = Rng::new(seed).fork(0xfe_5407);
        let mut taken = vec![false; self.test.len()];
        for defect_type in &types {
            let mut candidates: Vec<usize> = (0..self.test.len())
                .filter(|&i| &self.test[i].defect_type == defect_type)
                .collect();
            if candidates.len() <= k {
                return Err(Error::invalid(
                    "few_shot",
                    format!(
                        "{k} per type would leave no `{defect_type}` image to evaluate on ({} in test)",
                        candidates.len()
                    ),
                ));
            }
            rng.shuffle(&mut candidates);
            for &i in &candidates[..k] {
                taken[i] = true;
            }
        }
        let test = std::mem::take(&mut self.test);
        for (sample, take) in test.into_iter().zip(taken) {
            if take {
                self.train_defects.push(sample);
            } else {
                self.test.push(sample);
            }
        }
        self.check_defect_masks()
    }

    /// Moves every defective test image to `train_defects` (the plain form's `--defect` folder
    /// when training). Each needs a mask.
    pub fn train_on_defects(&mut self) -> Result<()> {
        let (defects, rest): (Vec<Sample>, Vec<Sample>) = std::mem::take(&mut self.test)
            .into_iter()
            .partition(Sample::is_defective);
        self.test = rest;
        self.train_defects = defects;
        self.check_defect_masks()
    }

    fn check_defect_masks(&self) -> Result<()> {
        match self.train_defects.iter().find(|s| s.mask.is_none()) {
            Some(s) => Err(dataset_error(
                &s.path,
                "a defective training image needs its mask (--masks, or ground_truth/)",
            )),
            None => Ok(()),
        }
    }

    pub fn open(source: &DataSource, split: &SplitOptions) -> Result<Dataset> {
        match source {
            DataSource::Mvtec { root } => open_mvtec(root, split),
            DataSource::Plain {
                good,
                defect,
                masks,
            } => open_plain(good, defect.as_deref(), masks.as_deref(), split),
        }
    }
}

fn open_mvtec(root: &Path, split: &SplitOptions) -> Result<Dataset> {
    if !root.is_dir() {
        return Err(dataset_error(root, "dataset folder does not exist"));
    }
    let train_good = root.join("train").join(GOOD);
    if !train_good.is_dir() {
        return Err(dataset_error(
            root,
            "no train/good folder (expected the MVTec AD layout)",
        ));
    }
    let (train, validation) =
        split_train_validation(good_samples(list_images(&train_good)?), split)?;

    // A product being taught may have no test images yet; eval reports an empty test set itself.
    let test_dir = root.join("test");
    let mut test = Vec::new();
    if test_dir.is_dir() {
        let mut type_dirs: Vec<PathBuf> = read_dir_sorted(&test_dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        // "good" first, then defect types by name.
        type_dirs.sort_by_key(|p| (p.file_name() != Some(GOOD.as_ref()), p.clone()));
        for dir in type_dirs {
            let defect_type = dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mask_dir = root.join("ground_truth").join(&defect_type);
            for path in list_images(&dir)? {
                let mask = if defect_type == GOOD {
                    None
                } else {
                    find_mask(
                        &mask_dir,
                        &path,
                        &[format!("{}_mask.png", file_stem(&path))],
                    )
                };
                test.push(Sample {
                    path,
                    defect_type: defect_type.clone(),
                    mask,
                });
            }
        }
    }
    Ok(Dataset {
        train,
        validation,
        test,
        train_defects: Vec::new(),
    })
}

fn open_plain(
    good: &Path,
    defect: Option<&Path>,
    masks: Option<&Path>,
    split: &SplitOptions,
) -> Result<Dataset> {
    let good_images = good_samples(list_images(good)?);
    let mut test = good_images.clone();
    let (train, validation) = split_train_validation(good_images, split)?;
    if let Some(masks) = masks {
        if !masks.is_dir() {
            return Err(dataset_error(masks, "mask folder does not exist"));
        }
    }
    if let Some(defect) = defect {
        for path in list_images(defect)? {
            let mask = masks.and_then(|dir| {
                let stem = file_stem(&path);
                find_mask(
                    dir,
                    &path,
                    &[format!("{stem}_mask.png"), format!("{stem}.png")],
                )
            });
            test.push(Sample {
                path,
                defect_type: "defect".to_string(),
                mask,
            });
        }
    }
    Ok(Dataset {
        train,
        validation,
        test,
        train_defects: Vec::new(),
    })
}

#[derive(Clone, Debug)]
pub struct Loaded {
    pub sample: Sample,
    pub image: Image,
    pub mask: Option<Mask>,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<Loaded>,
    /// Files that could not be read, with the reason (only when skipping bad files).
    pub skipped: Vec<(PathBuf, String)>,
}

fn load_one(sample: &Sample, spec: &InputSpec) -> Result<Loaded> {
    let image = load_image(&sample.path, spec)?;
    let mask = match &sample.mask {
        Some(path) => Some(load_mask(path, spec.height, spec.width)?),
        None => None,
    };
    Ok(Loaded {
        sample: sample.clone(),
        image,
        mask,
    })
}

/// The path an error is about, so a skipped sample names its image or its mask.
fn error_path(error: &Error, sample: &Sample) -> PathBuf {
    match error {
        Error::Image { path, .. } | Error::Io { path, .. } => path.clone(),
        _ => sample.path.clone(),
    }
}

/// Loads images (and masks) at the spec's size on all cores, in sample order. With `skip_bad`
/// unreadable files are listed in the report; without it the first one (in sample order) is the
/// error.
pub fn load_samples(
    samples: &[Sample],
    spec: &InputSpec,
    skip_bad: bool,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<LoadReport> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(samples.len())
        .max(1);
    let failed = AtomicBool::new(false);
    let load_strided = |start: usize| {
        let mut results = Vec::new();
        for i in (start..samples.len()).step_by(threads) {
            if failed.load(Ordering::Relaxed) {
                break;
            }
            let result = load_one(&samples[i], spec);
            if result.is_err() && !skip_bad {
                failed.store(true, Ordering::Relaxed);
            }
            if let Some(bar) = progress {
                bar.inc(1);
            }
            results.push((i, result));
        }
        results
    };
    let mut results: Vec<(usize, Result<Loaded>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| scope.spawn(move || load_strided(t)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);

    let mut report = LoadReport::default();
    for (i, result) in results {
        match result {
            Ok(loaded) => report.loaded.push(loaded),
            Err(e) if skip_bad => {
                let path = error_path(&e, &samples[i]);
                log::warn!("skipping {}: {e}", path.display());
                report.skipped.push((path, e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// SHA-256 (hex) over the samples' defect types, file names and file bytes (masks included), in
/// sorted order: identifies the data a model was trained or evaluated on wherever the folder lives.
pub fn fingerprint(samples: &[Sample]) -> Result<String> {
    let file_name = |p: &Path| {
        p.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut order: Vec<&Sample> = samples.iter().collect();
    order.sort_by_key(|s| (s.defect_type.clone(), file_name(&s.path), s.path.clone()));
    let mut hasher = Sha256::new();
    for sample in order {
        let files = std::iter::once(&sample.path).chain(sample.mask.as_ref());
        hasher.update(sample.defect_type.as_bytes());
        hasher.update([0]);
        for path in files {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            hasher.update(file_name(path).as_bytes());
            hasher.update([0]);
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
        }
    }
    Ok(crate::digest::hex(&hasher.finalize()))
}
