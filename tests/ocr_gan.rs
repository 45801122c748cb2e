//! OCR-GAN: frequency decoupling, channel selection, gradients, resumed training, the model file,
//! and a tiny detector on synthetic data.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use vigil::data::dataset::{self, DataSource, Dataset, SplitOptions};
use vigil::data::synth::{self, SynthConfig};
use vigil::data::{Image, InputSpec};
use vigil::methods::ocr_gan::fd::{gau1, FrequencyDecoupling};
use vigil::methods::ocr_gan::model::ChannelSelection;
use vigil::methods::ocr_gan::{
    BandCoding, ChannelSelectionMode, ContentPooling, DiscriminatorNorm, Forgeries, OcrGan,
    OcrGanConfig,
};
use vigil::methods::{self, Inference, Method, PhaseSpec, StepLosses, TrainBatch, TrainSet};
use vigil::metrics::auroc;
use vigil::model_file::{self, ModelMeta, Preprocessing, ScoreStats, TrainingInfo};
use vigil::nn::train_state::TrainState;
use vigil::rng::Rng;
use vigil::train::{self, TrainOptions};
use vigil::Result;

mod common;
use common::max_abs_diff;

/// A small but complete OCR-GAN: two bands with CS, 3-stage U-Nets, both forgeries.
fn tiny_config() -> OcrGanConfig {
    OcrGanConfig {
        width: 4,
        levels: 3,
        disc_width: 4,
        disc_levels: 2,
        epochs: 2,
        ..Default::default()
    }
}

fn input(side: usize, channels: usize) -> InputSpec {
    InputSpec {
        height: side,
        width: side,
        channels,
    }
}

fn images(n: usize, channels: usize, side: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let data: Vec<f32> = (0..n * channels * side * side).map(|_| rng.f32()).collect();
    Tensor::from_vec(data, (n, channels, side, side), &Device::Cpu).unwrap()
}

#[test]
fn gau1_is_the_papers_kernel() {
    // Equation 1 of the paper, typed from its matrix.
    let paper = [
        1., 4., 6., 4., 1., 4., 16., 24., 16., 4., 6., 24., 36., 24., 6., 4., 16., 24., 16., 4.,
        1., 4., 6., 4., 1.,
    ];
    let k = gau1();
    for (i, (&ours, &theirs)) in k.iter().zip(&paper).enumerate() {
        assert_eq!(ours, theirs / 256.0, "entry {i}");
    }
    assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
}

/// Reflect-101 index (OpenCV's default border).
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let r = if i < 0 {
        -i
    } else if i >= n {
        2 * (n - 1) - i
    } else {
        i
    };
    r as usize
}

/// An independent, loop-by-loop pyramid step on one plane: blur with Gau1, drop odd rows and
/// columns, insert zeros, blur with 4·Gau1.
fn naive_low_pass(x: &[f32], h: usize, w: usize) -> Vec<f32> {
    let k = gau1();
    let blur = |src: &[f32], scale: f32| -> Vec<f32> {
        let mut out = vec![0.0; h * w];
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0.0;
                for dy in 0..5 {
                    for dx in 0..5 {
                        let sy = reflect(y as isize + dy as isize - 2, h);
                        let sx = reflect(x as isize + dx as isize - 2, w);
                        acc += scale * k[dy * 5 + dx] * src[sy * w + sx];
                    }
                }
                out[y * w + x] = acc;
            }
        }
        out
    };
    let blurred = blur(x, 1.0);
    let mut upsampled = vec![0.0; h * w];
    for y in (0..h).step_by(2) {
        for x in (0..w).step_by(2) {
            upsampled[y * w + x] = blurred[y * w + x];
        }
    }
    blur(&upsampled, 4.0)
}

#[test]
fn frequency_bands_follow_the_pyramid_and_sum_to_the_image() -> Result<()> {
    let (h, w) = (16, 12);
    let image = images(1, 1, 16, 3).narrow(3, 0, w)?.contiguous()?;
    let plane = image.flatten_all()?.to_vec1::<f32>()?;
    for n in [2, 3] {
        let bands = FrequencyDecoupling::new(n, &Device::Cpu)?.split(&image)?;
        assert_eq!(bands.len(), n);
        // I_G(N-1) and I_G(N-2) by the naive pyramid; I_1 is the lowest.
        let g1 = naive_low_pass(&plane, h, w);
        let lowest = if n == 2 {
            g1.clone()
        } else {
            naive_low_pass(&g1, h, w)
        };
        let lowest = Tensor::from_vec(lowest, (1, 1, h, w), &Device::Cpu)?;
        assert!(max_abs_diff(&bands[0], &lowest) < 1e-5, "I_1 for N = {n}");
        let highest = (&image - Tensor::from_vec(g1, (1, 1, h, w), &Device::Cpu)?)?;
        assert!(
            max_abs_diff(&bands[n - 1], &highest) < 1e-5,
            "I_N for N = {n}"
        );
        let mut total = bands[0].clone();
        for b in &bands[1..] {
            total = (total + b)?;
        }
        assert!(max_abs_diff(&total, &image) < 1e-5, "bands sum, N = {n}");
    }
    Ok(())
}

/// An 8 × 6 8-bit image and what OpenCV 5.1.0 (opencv-python-headless) made of it:
/// `up = cv2.pyrUp(cv2.pyrDown(img))`, `cv2.subtract(img, up)` and `cv2.pyrUp(cv2.pyrDown(up))`.
const CV_IMAGE: [u8; 48] = [
    0, 91, 182, 17, 108, 199, 37, 135, 233, 75, 173, 15, 74, 179, 28, 133, 238, 87, 111, 223, 79,
    191, 47, 68, 148, 11, 130, 249, 21, 140, 185, 55, 181, 216, 86, 212, 222, 99, 232, 18, 151,
    193, 3, 143, 192, 76, 125, 9,
];
const CV_UP: [u8; 48] = [
    109, 116, 124, 124, 121, 121, 114, 119, 125, 125, 123, 122, 122, 124, 128, 127, 125, 124, 123,
    126, 130, 128, 125, 124, 123, 128, 132, 130, 125, 124, 127, 131, 135, 132, 126, 125, 131, 134,
    137, 133, 127, 126, 133, 136, 138, 134, 128, 126,
];
const CV_SUBTRACT: [u8; 48] = [
    0, 0, 58, 0, 0, 78, 0, 16, 108, 0, 50, 0, 0, 55, 0, 6, 113, 0, 0, 97, 0, 63, 0, 0, 25, 0, 0,
    119, 0, 16, 58, 0, 46, 84, 0, 87, 91, 0, 95, 0, 24, 67, 0, 7, 54, 0, 0, 0,
];
const CV_UP2: [u8; 48] = [
    119, 121, 122, 123, 123, 124, 121, 122, 123, 124, 124, 124, 123, 124, 125, 126, 125, 125, 125,
    126, 127, 127, 126, 126, 128, 129, 129, 129, 127, 127, 130, 131, 131, 130, 129, 128, 132, 132,
    133, 131, 129, 129, 133, 133, 133, 132, 130, 129,
];

/// `band_coding = "opencv"`: the bands are OpenCV's rounded 8-bit pyramid and saturating
/// difference, each coded `2v/255 − 1`; negative detail is lost, so they do not sum to the image.
#[test]
fn opencv_band_coding_matches_opencv() -> Result<()> {
    let device = Device::Cpu;
    let image = Tensor::from_vec(
        CV_IMAGE
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect::<Vec<_>>(),
        (1, 1, 8, 6),
        &device,
    )?;
    let coded = |values: &[u8]| -> Tensor {
        let data: Vec<f32> = values
            .iter()
            .map(|&v| 2.0 * v as f32 / 255.0 - 1.0)
            .collect();
        Tensor::from_vec(data, (1, 1, 8, 6), &device).unwrap()
    };
    let two = FrequencyDecoupling::new(2, &device)?.split_opencv(&image)?;
    assert!(max_abs_diff(&two[0], &coded(&CV_UP)) < 1e-6);
    assert!(max_abs_diff(&two[1], &coded(&CV_SUBTRACT)) < 1e-6);
    let middle: Vec<u8> = CV_UP
        .iter()
        .zip(&CV_UP2)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let three = FrequencyDecoupling::new(3, &device)?.split_opencv(&image)?;
    assert!(max_abs_diff(&three[0], &coded(&CV_UP2)) < 1e-6);
    assert!(max_abs_diff(&three[1], &coded(&middle)) < 1e-6);
    assert!(max_abs_diff(&three[2], &coded(&CV_SUBTRACT)) < 1e-6);
    // Where the image is darker than its low pass, the high band saturates at −1.
    let signed = ((&image * 2.0)? - 1.0)?;
    let summed = ((&two[0] + &two[1])? + 1.0)?;
    assert!(max_abs_diff(&summed, &signed) > 0.1);
    Ok(())
}

#[test]
fn a_constant_image_is_all_low_frequency() -> Result<()> {
    let image = (Tensor::ones((1, 3, 8, 8), DType::F32, &Device::Cpu)? * 0.3)?;
    let bands = FrequencyDecoupling::new(2, &Device::Cpu)?.split(&image)?;
    assert!(max_abs_diff(&bands[0], &image) < 1e-6);
    assert!(
        bands[1]
            .abs()?
            .max_keepdim(D::Minus1)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?
            < 1e-6
    );
    Ok(())
}

#[test]
fn channel_selection_weights_sum_to_one_across_branches() -> Result<()> {
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    for bands in [2, 3] {
        let cs = ChannelSelection::new(vb.pp(format!("cs{bands}")), 6, bands, 4)?;
        let features: Vec<Tensor> = (0..bands)
            .map(|b| Tensor::randn(b as f32, 1.0, (2, 6, 5, 5), &Device::Cpu).unwrap())
            .collect();
        let a = cs.attention(&features)?;
        assert_eq!(a.dims(), &[2, bands, 6]);
        let ones = Tensor::ones((2, 6), DType::F32, &Device::Cpu)?;
        assert!(max_abs_diff(&a.sum(1)?, &ones) < 1e-6);
        // Not a constant split: the weights depend on the features.
        let values = a.flatten_all()?.to_vec1::<f32>()?;
        assert!(values
            .iter()
            .any(|&v| (v - 1.0 / bands as f32).abs() > 1e-3));
        let selected = cs.forward(&features)?;
        assert_eq!(selected.len(), bands);
        assert_eq!(selected[0].dims(), &[2, 6, 5, 5]);
    }
    Ok(())
}

/// The paper's networks with 1–3 bands, and each of the authors' code's switches (the projected
/// latent behind uncapped widths, L_lat in the discriminator's loss, BatchNorm frozen or joint,
/// uniform CS, 8-bit bands, the combined forgery), in the first and a later epoch.
fn gradient_configs() -> Vec<(String, OcrGanConfig, usize)> {
    let mut configs = Vec::new();
    for bands in [1, 2, 3] {
        let cfg = OcrGanConfig {
            bands,
            channel_selection: if bands > 1 {
                ChannelSelectionMode::Learned
            } else {
                ChannelSelectionMode::Off
            },
            ..tiny_config()
        };
        configs.push((format!("{bands} bands"), cfg, 0));
    }
    let code = OcrGanConfig {
        latent_dim: 10,
        disc_width_capped: false,
        disc_latent_loss: true,
        channel_selection: ChannelSelectionMode::Uniform,
        band_coding: BandCoding::Opencv,
        forgeries: Forgeries::Combined,
        cutout_px: 4,
        ..tiny_config()
    };
    for norm in [
        DiscriminatorNorm::PerBatch,
        DiscriminatorNorm::Frozen,
        DiscriminatorNorm::Joint,
    ] {
        for epoch in [0, 1] {
            let cfg = OcrGanConfig {
                disc_norm: norm,
                ..code.clone()
            };
            configs.push((
                format!("code switches, {norm:?}, epoch {epoch}"),
                cfg,
                epoch,
            ));
        }
    }
    configs
}

#[test]
fn every_parameter_of_generators_and_discriminator_gets_a_gradient() -> Result<()> {
    for (what, cfg, epoch) in gradient_configs() {
        let bands = cfg.bands;
        let learned = cfg.channel_selection == ChannelSelectionMode::Learned;
        let model = OcrGan::new(cfg, input(16, 3), Err(0), &Device::Cpu)?;
        let batch = as_images(&images(2, 3, 16, 1));
        let losses = model.losses(&batch.iter().collect::<Vec<_>>(), epoch, &mut Rng::new(0))?;
        let g_grads = losses.generator.backward()?;
        let d_grads = losses.discriminator.backward()?;
        let vars = model.trainable_vars()?;
        assert!(vars.iter().any(|(n, _)| n.starts_with("g.")));
        assert!(vars.iter().any(|(n, _)| n.starts_with("d.")));
        assert_eq!(
            vars.iter().any(|(n, _)| n.contains(".cs0.")),
            bands > 1 && learned,
            "{what}"
        );
        for (name, var) in vars {
            let grads = if name.starts_with("g.") {
                &g_grads
            } else {
                &d_grads
            };
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{what}: {name} gradient {norm}"
            );
        }
    }
    Ok(())
}

#[test]
fn bad_configs_and_inputs_are_errors_that_name_them() {
    let err = |cfg: OcrGanConfig, side: usize| {
        OcrGan::new(cfg, input(side, 1), Err(0), &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(err(
        OcrGanConfig {
            bands: 1,
            ..tiny_config()
        },
        16
    )
    .contains("channel_selection"));
    assert!(err(tiny_config(), 20).contains("divide by 8"));
    assert!(err(
        OcrGanConfig {
            lr: -1.0,
            ..tiny_config()
        },
        16
    )
    .contains("lr"));
    let model = OcrGan::new(tiny_config(), input(16, 1), Err(0), &Device::Cpu).unwrap();
    assert!(model
        .infer(&images(1, 3, 16, 0))
        .unwrap_err()
        .to_string()
        .contains("3x16x16"));
}

fn as_images(t: &Tensor) -> Vec<Image> {
    let (n, c, h, w) = t.dims4().unwrap();
    let data = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (0..n)
        .map(|i| Image {
            channels: c,
            height: h,
            width: w,
            data: data[i * c * h * w..(i + 1) * c * h * w].to_vec(),
        })
        .collect()
}

/// Delegates to OCR-GAN and fails on the `fail_at`-th training step: a training stopped midway.
struct Interrupted {
    inner: OcrGan,
    steps: usize,
    fail_at: usize,
}

impl Method for Interrupted {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn phases(&self) -> Vec<PhaseSpec> {
        self.inner.phases()
    }
    fn step_losses(&mut self, batch: &TrainBatch, rng: &mut Rng) -> Result<StepLosses> {
        self.steps += 1;
        if self.steps == self.fail_at {
            return Err(vigil::Error::invalid("test", "power cut"));
        }
        self.inner.step_losses(batch, rng)
    }
    fn train_state(&self) -> &TrainState {
        self.inner.train_state()
    }
    fn train_state_mut(&mut self) -> &mut TrainState {
        self.inner.train_state_mut()
    }
    fn weights_changed(&mut self) {
        self.inner.weights_changed()
    }
    fn infer(&self, images: &Tensor) -> Result<Inference> {
        self.inner.infer(images)
    }
    fn infer_reference(&self, images: &Tensor) -> Result<Inference> {
        self.inner.infer_reference(images)
    }
    fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.inner.tensors()
    }
    fn config_json(&self) -> Result<serde_json::Value> {
        self.inner.config_json()
    }
}

fn good(images: &[Image]) -> TrainSet {
    TrainSet {
        good: images.to_vec(),
        defects: Vec::new(),
    }
}

fn assert_same_state(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
    assert_eq!(a.len(), b.len());
    for (name, t) in a {
        let other = &b[name];
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().ok(),
            other.flatten_all().unwrap().to_vec1::<f32>().ok(),
            "{name}"
        );
        if t.dtype() == DType::F64 {
            assert_eq!(
                t.to_vec1::<f64>().unwrap(),
                other.to_vec1::<f64>().unwrap(),
                "{name}"
            );
        }
    }
}

#[test]
fn a_resumed_training_continues_from_the_saved_epoch_with_the_same_optimizer_state() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OcrGanConfig {
        epochs: 3,
        ..tiny_config()
    };
    let spec = input(16, 1);
    let train_images = as_images(&images(6, 1, 16, 5));
    let validation = as_images(&images(3, 1, 16, 6));
    let opts = |ckpt: &str, resume: bool| TrainOptions {
        batch_size: 4,
        seed: 9,
        progress: false,
        checkpoint: Some(dir.path().join(ckpt)),
        resume,
        data_fingerprint: "synthetic".into(),
        stop_after_epochs: None,
    };
    let mut straight = OcrGan::new(cfg.clone(), spec, Err(0), &Device::Cpu)?;
    let full = train::fit(
        &mut straight,
        &good(&train_images),
        &validation,
        &opts("a.ckpt", false),
        &Device::Cpu,
    )?;

    // Two steps per epoch: step 5 is the first of epoch 3.
    let mut stopped = Interrupted {
        inner: OcrGan::new(cfg.clone(), spec, Err(0), &Device::Cpu)?,
        steps: 0,
        fail_at: 5,
    };
    let stop = train::fit(
        &mut stopped,
        &good(&train_images),
        &validation,
        &opts("b.ckpt", false),
        &Device::Cpu,
    );
    assert!(stop.unwrap_err().to_string().contains("power cut"));

    let mut resumed = OcrGan::new(cfg.clone(), spec, Err(0), &Device::Cpu)?;
    let report = train::fit(
        &mut resumed,
        &good(&train_images),
        &validation,
        &opts("b.ckpt", true),
        &Device::Cpu,
    )?;
    assert_eq!(report.resumed_at, Some(("gan".to_string(), 2)));
    assert_eq!(report.phases[0].epochs.len(), 3);
    assert_eq!(report.phases[0].kept_epoch, full.phases[0].kept_epoch);
    for (a, b) in report.phases[0].epochs.iter().zip(&full.phases[0].epochs) {
        assert_eq!(a.losses, b.losses);
    }
    // Parameters, running statistics and both optimisers' moments and step counts.
    assert_same_state(&resumed.training_state()?, &straight.training_state()?);

    // A checkpoint of another config is refused, naming what differs.
    let mut other = OcrGan::new(
        OcrGanConfig { lr: 0.001, ..cfg },
        spec,
        Err(0),
        &Device::Cpu,
    )?;
    let err = train::fit(
        &mut other,
        &good(&train_images),
        &validation,
        &opts("b.ckpt", true),
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("another config"), "{err}");
    Ok(())
}

fn meta_for(model: &OcrGan, spec: InputSpec) -> ModelMeta {
    ModelMeta {
        format: model_file::FORMAT.into(),
        format_version: model_file::FORMAT_VERSION,
        method: model.name().into(),
        method_version: methods::ocr_gan::VERSION,
        config: model.config_json().unwrap(),
        backbone: None,
        input: spec,
        preprocessing: Preprocessing::default(),
        validation: ScoreStats::from_values(&[0.0, 1.0], &mut [0.0, 1.0]),
        training: TrainingInfo {
            data_fingerprint: "f".repeat(64),
            train_images: 4,
            defects: Vec::new(),
            validation_images: 2,
            seed: 0,
            date: "2026-11-23T00:00:00Z".into(),
            vigil_version: "0.1.0".into(),
            device: "Cpu".into(),
            seconds: 1.0,
        },
    }
}

#[test]
fn the_model_file_round_trips_and_scores_identically() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let spec = input(16, 3);
    let mut model = OcrGan::new(tiny_config(), spec, Err(0), &Device::Cpu)?;
    let batch = images(4, 3, 16, 2);
    let batch_images = as_images(&batch);
    let mut rng = Rng::new(1);
    for _ in 0..3 {
        let step = TrainBatch {
            phase: 0,
            epoch: 0,
            good: batch_images.iter().collect(),
            features: None,
            defects: &[],
        };
        methods::step(&mut model, &step, &mut rng)?;
    }
    let validation = model.infer(&batch)?.scores.to_vec1::<f32>()?;
    model.fit_score_scale(&validation)?;
    let scaled = model.infer(&batch)?.scores.to_vec1::<f32>()?;
    let (lo, hi) = scaled
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &s| (l.min(s), h.max(s)));
    assert!(
        lo.abs() < 1e-5 && (hi - 1.0).abs() < 1e-5,
        "validation scaled to {lo}..{hi}"
    );

    let path = dir.path().join("ocr.safetensors");
    model_file::save(&path, &meta_for(&model, spec), &model.tensors()?)?;
    let (meta, tensors) = model_file::load(&path, &Device::Cpu)?;
    let loaded = methods::from_model_file(&meta, tensors, &path, &Device::Cpu)?;
    let probe = images(3, 3, 16, 8);
    let (a, b) = (model.infer(&probe)?, loaded.infer(&probe)?);
    assert_eq!(a.scores.to_vec1::<f32>()?, b.scores.to_vec1::<f32>()?);
    assert_eq!(
        a.maps.flatten_all()?.to_vec1::<f32>()?,
        b.maps.flatten_all()?.to_vec1::<f32>()?
    );
    assert_eq!(b.maps.dims(), &[3, 16, 16]);

    // A tensor with the wrong shape is refused by name.
    let (meta, mut tensors) = model_file::load(&path, &Device::Cpu)?;
    let name = tensors
        .keys()
        .find(|k| k.starts_with("g."))
        .unwrap()
        .clone();
    tensors.insert(name.clone(), Tensor::zeros(7, DType::F32, &Device::Cpu)?);
    let err = methods::from_model_file(&meta, tensors, &path, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&name), "{err}");
    Ok(())
}

/// Training, validation and labelled test images of a data set.
struct Split {
    train: Vec<Image>,
    validation: Vec<Image>,
    test: Vec<(Image, bool)>,
}

fn load_split(root: &Path, spec: &InputSpec) -> Result<Split> {
    let data = Dataset::open(
        &DataSource::Mvtec { root: root.into() },
        &SplitOptions {
            validation_fraction: 0.1,
            seed: 0,
            ..Default::default()
        },
    )?;
    let load = |samples: &[dataset::Sample]| -> Result<Vec<(Image, bool)>> {
        Ok(dataset::load_samples(samples, spec, false, None)?
            .loaded
            .into_iter()
            .map(|l| (l.image, l.sample.is_defective()))
            .collect())
    };
    let strip = |v: Vec<(Image, bool)>| v.into_iter().map(|(i, _)| i).collect();
    Ok(Split {
        train: strip(load(&data.train)?),
        validation: strip(load(&data.validation)?),
        test: load(&data.test)?,
    })
}

#[test]
fn a_tiny_ocr_gan_separates_synthetic_defects() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let synth_cfg = SynthConfig {
        seed: 3,
        ..Default::default()
    };
    synth::generate(dir.path(), &synth_cfg)?;
    let spec = input(synth_cfg.height, 1);
    let Split {
        train: train_images,
        validation,
        test,
    } = load_split(dir.path(), &spec)?;
    let cfg = OcrGanConfig {
        width: 8,
        levels: 5,
        disc_width: 8,
        disc_levels: 4,
        epochs: 12,
        content_pooling: ContentPooling::Top,
        smoothing_sigma: 1.0,
        ..Default::default()
    };
    let mut model = OcrGan::new(cfg, spec, Err(0), &Device::Cpu)?;
    let opts = TrainOptions {
        batch_size: 8,
        seed: 0,
        progress: false,
        ..Default::default()
    };
    let report = train::fit(
        &mut model,
        &good(&train_images),
        &validation,
        &opts,
        &Device::Cpu,
    )?;
    let separations: Vec<f32> = report.phases[0]
        .epochs
        .iter()
        .filter_map(|e| e.validation_separation)
        .collect();
    eprintln!(
        "kept epoch {:?}, validation separation by epoch {separations:?}",
        report.phases[0].kept_epoch
    );
    let mut scores = Vec::new();
    let mut labels = Vec::new();
    for chunk in test.chunks(8) {
        let refs: Vec<&Image> = chunk.iter().map(|(i, _)| i).collect();
        let batch = vigil::data::batch_tensor(&refs, &Device::Cpu)?;
        scores.extend(model.infer(&batch)?.scores.to_vec1::<f32>()?);
        labels.extend(chunk.iter().map(|(_, d)| *d));
    }
    let auc = auroc(&scores, &labels).expect("both classes");
    eprintln!("tiny OCR-GAN on synthetic data: image AUROC {auc:.3}");
    assert!(auc >= 0.8, "image AUROC {auc}");
    Ok(())
}
