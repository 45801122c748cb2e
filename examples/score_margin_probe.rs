//! How the image score of a trained model depends on the border left out of it and on averaging
//! the top-k map values: the measurement behind NF-BMR's `score_margin` (docs/RESULTS.md).
//! `cargo run --release --example score_margin_probe -- MODEL MVTEC_DATASET`
use std::path::Path;
use vigil::commands::open_model;
use vigil::data::dataset::{load_samples, DataSource, Dataset, SplitOptions};
use vigil::eval::score_images;

fn main() -> vigil::Result<()> {
    vigil::runtime::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: score_margin_probe MODEL MVTEC_DATASET");
        std::process::exit(2);
    }
    let dev = candle_core::Device::Cpu;
    let (meta, m) = open_model(Path::new(&args[1]), &dev)?;
    let data = Dataset::open(
        &DataSource::Mvtec {
            root: args[2].clone().into(),
        },
        &SplitOptions {
            validation_fraction: 0.0,
            seed: 0,
        },
    )?;
    let loaded = load_samples(&data.test, &meta.input, false, None)?;
    let imgs: Vec<_> = loaded.loaded.iter().map(|l| &l.image).collect();
    let s = score_images(m.as_ref(), &imgs, 8, &dev, false)?;
    let labels: Vec<bool> = loaded
        .loaded
        .iter()
        .map(|l| l.sample.is_defective())
        .collect();
    let (h, w) = (s.height, s.width);
    for margin in [0usize, 4, 8, 16, 24, 32] {
        for topk in [1usize, 50, 200] {
            let scores: Vec<f32> = (0..imgs.len())
                .map(|i| {
                    let map = s.map(i);
                    let mut v: Vec<f32> = (margin..h - margin)
                        .flat_map(|y| (margin..w - margin).map(move |x| (y, x)))
                        .map(|(y, x)| map[y * w + x])
                        .collect();
                    v.sort_by(|a, b| b.total_cmp(a));
                    v[..topk].iter().sum::<f32>() / topk as f32
                })
                .collect();
            println!(
                "margin {margin:>2} top{topk:>3}: image AUROC {:.4}",
                vigil::metrics::auroc(&scores, &labels).unwrap()
            );
        }
    }
    Ok(())
}
