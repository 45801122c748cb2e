//! The training of `tests/ocr_gan.rs::a_tiny_ocr_gan_separates_synthetic_defects` with another
//! training seed or config, printing its test image AUROC: how much margin the test's bar has.
//! `vigil synth --out DATA --seed 3`, then
//! `cargo run --release --example ocr_gan_probe -- DATA SEED ['content_pooling = "top"' ...]`
//! (each argument one TOML `key = value` over the test's config; `VAL` sets the validation share).
use candle_core::Device;
use vigil::data::dataset::{load_samples, DataSource, Dataset, SplitOptions};
use vigil::data::{batch_tensor, Image, InputSpec};
use vigil::methods::ocr_gan::{OcrGan, OcrGanConfig};
use vigil::methods::Method;
use vigil::metrics::auroc;
use vigil::train::{self, TrainOptions};

fn main() -> vigil::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (root, seed) = (&args[1], args[2].parse::<u64>().unwrap());
    let mut table: toml::Table = toml::from_str("width = 8\nlevels = 5\ndisc_width = 8\ndisc_levels = 4\nepochs = 12\ncontent_pooling = \"max\"\nsmoothing_sigma = 1.0\n").unwrap();
    for kv in &args[3..] {
        table.extend(toml::from_str::<toml::Table>(kv).unwrap());
    }
    let cfg: OcrGanConfig = table.try_into().unwrap();
    let dev = Device::Cpu;
    let data = Dataset::open(
        &DataSource::Mvtec { root: root.into() },
        &SplitOptions {
            validation_fraction: std::env::var("VAL").map_or(0.1, |v| v.parse().unwrap()),
            seed: 0,
        },
    )?;
    let spec = InputSpec {
        height: 128,
        width: 128,
        channels: 1,
    };
    let imgs = |s| -> vigil::Result<Vec<Image>> {
        Ok(load_samples(s, &spec, false, None)?
            .loaded
            .into_iter()
            .map(|l| l.image)
            .collect())
    };
    let (train_set, val) = (imgs(&data.train)?, imgs(&data.validation)?);
    let test = load_samples(&data.test, &spec, false, None)?.loaded;
    let labels: Vec<bool> = test.iter().map(|l| l.sample.is_defective()).collect();
    let mut model = OcrGan::new(cfg, spec, None, &dev)?;
    let opts = TrainOptions {
        batch_size: 8,
        seed,
        progress: false,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let report = train::fit(&mut model, &train_set, &val, &opts, &dev)?;
    let mut scores = Vec::new();
    for chunk in test.chunks(8) {
        let refs: Vec<&Image> = chunk.iter().map(|l| &l.image).collect();
        scores.extend(
            model
                .infer(&batch_tensor(&refs, &dev)?)?
                .scores
                .to_vec1::<f32>()?,
        );
    }
    println!(
        "seed {seed} {:?}: AUROC {:.3} kept {:?} ({:.0} s)",
        &args[3..],
        auroc(&scores, &labels).unwrap(),
        report.phases[0].kept_epoch,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
