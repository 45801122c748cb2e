//! The yardstick for NF-BMR, rebuilt: nearest-neighbour detectors on frozen Lite0
//! features (blocks 4, 7, 10; no training), scored per defect type, so that a method's misses can
//! be told apart from what the features cannot show (docs/RESULTS.md).
//!
//! - patch: each position's distance to the closest training position (a random share of them);
//!   the image score is the map's maximum inside a border margin.
//! - image: the distance of the image's mean feature to the closest training image's.
//! - both: the two standardised with the defect-free validation images' scores, then summed.
//!
//! `cargo run --release --example nn_baseline -- MVTEC_DATASET HEIGHT WIDTH [BANK_FRACTION [NEIGHBOURHOOD]]`
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor, D};
use vigil::commands::DEFAULT_BACKBONE;
use vigil::data::dataset::{load_samples, DataSource, Dataset, Loaded, SplitOptions};
use vigil::data::image::{batch_tensor, InputSpec};
use vigil::nn::backbone::{load_tensors, Lite0Features};
use vigil::nn::FeatureExtractor;
use vigil::rng::Rng;

const TAPS: [usize; 3] = [4, 7, 10];
const BATCH: usize = 8;
const MARGINS: [usize; 4] = [0, 1, 2, 3];

/// Per image, `[positions, channels]` features, each position averaged over its
/// `neighbourhood` × `neighbourhood` cells (3 as PatchCore; 1 = none).
fn patch_features(
    net: &Lite0Features,
    loaded: &[Loaded],
    neighbourhood: usize,
    dev: &Device,
) -> vigil::Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(loaded.len());
    for chunk in loaded.chunks(BATCH) {
        let images: Vec<_> = chunk.iter().map(|l| &l.image).collect();
        let r = neighbourhood / 2;
        let f = net
            .extract(&batch_tensor(&images, dev)?)?
            .pad_with_same(2, r, r)?
            .pad_with_same(3, r, r)?
            .avg_pool2d_with_stride(neighbourhood, 1)?;
        let (b, c, h, w) = f.dims4()?;
        for i in 0..b {
            out.push(f.get(i)?.reshape((c, h * w))?.t()?.contiguous()?);
        }
    }
    Ok(out)
}

/// The training features every score is measured against.
struct Memory {
    bank: Tensor,
    bank_sq: Tensor,
    image_means: Tensor,
}

impl Memory {
    fn new(features: &[Tensor], fraction: f64, dev: &Device) -> vigil::Result<Memory> {
        // A random share of all training positions keeps the search within minutes on 2 cores.
        let mut rng = Rng::new(0);
        let mut rows = Vec::with_capacity(features.len());
        for f in features {
            let keep: Vec<u32> = (0..f.dim(0)? as u32)
                .filter(|_| f64::from(rng.f32()) < fraction)
                .collect();
            rows.push(f.index_select(&Tensor::new(keep.as_slice(), dev)?, 0)?);
        }
        let bank = Tensor::cat(&rows, 0)?;
        let means: Vec<Tensor> = features
            .iter()
            .map(|f| f.mean(0))
            .collect::<candle_core::Result<_>>()?;
        Ok(Memory {
            bank_sq: bank.sqr()?.sum(1)?,
            bank,
            image_means: Tensor::stack(&means, 0)?,
        })
    }

    /// Squared distance of each position to its nearest bank position: `|q|² + |b|² − 2 q·b`.
    fn patch_map(&self, f: &Tensor) -> vigil::Result<Vec<f32>> {
        Ok(f.matmul(&self.bank.t()?)?
            .affine(-2.0, 0.0)?
            .broadcast_add(&self.bank_sq.unsqueeze(0)?)?
            .broadcast_add(&f.sqr()?.sum_keepdim(1)?)?
            .min(D::Minus1)?
            .to_vec1()?)
    }

    fn image_distance(&self, f: &Tensor) -> vigil::Result<f32> {
        Ok(self
            .image_means
            .broadcast_sub(&f.mean_keepdim(0)?)?
            .sqr()?
            .sum(1)?
            .min(0)?
            .to_scalar()?)
    }
}

/// Image scores by name, in the order the variants are printed.
fn scores(
    memory: &Memory,
    features: &[Tensor],
    (cells_h, cells_w): (usize, usize),
) -> vigil::Result<Vec<(String, Vec<f32>)>> {
    let mut patch = vec![Vec::with_capacity(features.len()); MARGINS.len()];
    let mut image = Vec::with_capacity(features.len());
    for f in features {
        let map = &memory.patch_map(f)?;
        for (scores, &m) in patch.iter_mut().zip(&MARGINS) {
            scores.push(
                (m..cells_h - m)
                    .flat_map(|y| (m..cells_w - m).map(move |x| map[y * cells_w + x]))
                    .fold(f32::MIN, f32::max),
            );
        }
        image.push(memory.image_distance(f)?);
    }
    let mut out: Vec<_> = MARGINS
        .iter()
        .zip(patch)
        .map(|(m, s)| (format!("patch, {m}-cell margin"), s))
        .collect();
    out.push(("image".into(), image));
    Ok(out)
}

fn mean_std(v: &[f32]) -> (f32, f32) {
    let n = v.len() as f32;
    let mean = v.iter().sum::<f32>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n;
    (mean, var.sqrt().max(f32::EPSILON))
}

fn main() -> vigil::Result<()> {
    vigil::runtime::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    if !(4..=6).contains(&args.len()) {
        eprintln!("usage: nn_baseline MVTEC_DATASET HEIGHT WIDTH [BANK_FRACTION [NEIGHBOURHOOD]]");
        std::process::exit(2);
    }
    let number = |s: &str| s.parse::<usize>().expect("a whole number");
    let spec = InputSpec {
        height: number(&args[2]),
        width: number(&args[3]),
        channels: 1,
    };
    let fraction: f64 = args.get(4).map_or(0.1, |s| s.parse().expect("a fraction"));
    let neighbourhood = args.get(5).map_or(3, |s| number(s));
    assert!(neighbourhood % 2 == 1, "the neighbourhood must be odd");
    let dev = Device::Cpu;
    let weights = load_tensors(Path::new(DEFAULT_BACKBONE), TAPS[2], &dev)?;
    let net = Lite0Features::new(&weights, TAPS.to_vec(), &dev)?;
    let data = Dataset::open(
        &DataSource::Mvtec {
            root: args[1].clone().into(),
        },
        &SplitOptions {
            validation_fraction: 0.1,
            seed: 0,
        },
    )?;
    let load = |samples| load_samples(samples, &spec, false, None).map(|r| r.loaded);
    let (train, validation, test) = (
        load(&data.train)?,
        load(&data.validation)?,
        load(&data.test)?,
    );
    let memory = Memory::new(
        &patch_features(&net, &train, neighbourhood, &dev)?,
        fraction,
        &dev,
    )?;
    println!(
        "bank: {} positions × {} channels from {} training images; {} validation images",
        memory.bank.dim(0)?,
        memory.bank.dim(1)?,
        train.len(),
        validation.len()
    );
    let cells = (
        spec.height.div_ceil(net.stride()),
        spec.width.div_ceil(net.stride()),
    );
    let validation_scores = scores(
        &memory,
        &patch_features(&net, &validation, neighbourhood, &dev)?,
        cells,
    )?;
    let mut variants = scores(
        &memory,
        &patch_features(&net, &test, neighbourhood, &dev)?,
        cells,
    )?;
    let standardised = |i: usize| {
        let (mean, std) = mean_std(&validation_scores[i].1);
        variants[i].1.iter().map(move |s| (s - mean) / std)
    };
    let image = MARGINS.len();
    let both: Vec<_> = MARGINS
        .iter()
        .enumerate()
        .filter(|&(_, &m)| m >= 2)
        .map(|(i, m)| {
            let sum = standardised(i).zip(standardised(image)).map(|(a, b)| a + b);
            (
                format!("both: patch ({m}-cell margin) + image"),
                sum.collect(),
            )
        })
        .collect();
    variants.extend(both);

    let mut types = BTreeMap::new();
    for l in test.iter().filter(|l| l.sample.is_defective()) {
        *types.entry(l.sample.defect_type.as_str()).or_insert(0) += 1;
    }
    for (name, scores) in &variants {
        let auroc = |keep: &dyn Fn(&str) -> bool| {
            let (s, l): (Vec<f32>, Vec<bool>) = test
                .iter()
                .zip(scores)
                .filter(|(l, _)| !l.sample.is_defective() || keep(&l.sample.defect_type))
                .map(|(l, &s)| (s, l.sample.is_defective()))
                .unzip();
            vigil::metrics::auroc(&s, &l).unwrap_or(f64::NAN)
        };
        let per_type: Vec<String> = types
            .iter()
            .map(|(t, n)| format!("{t} ({n}) {:.4}", auroc(&|d| d == *t)))
            .collect();
        println!(
            "{name}: image AUROC {:.4}; {}",
            auroc(&|_| true),
            per_type.join(", ")
        );
    }
    Ok(())
}
