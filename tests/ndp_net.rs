//! NDP-Net's parts and its training: RBFRM's convex repair and its matching, the FFM's attention,
//! the defect perception loss, the gradients and the frozen encoder of each phase, and a tiny
//! NDP-Net that segments the synthetic product's defects.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use vigil::commands::{self, EvalArgs, RunOptions, TrainArgs};
use vigil::data::anomaly::{AnomalyGenerator, AnomalySynth};
use vigil::data::dataset::DataSource;
use vigil::data::image::{load_image, save_mask_png, save_png};
use vigil::data::synth::{self, SynthConfig};
use vigil::data::{batch_tensor, Image, InputSpec};
use vigil::methods::ndp_net::loss::defect_perception;
use vigil::methods::ndp_net::model::Ffm;
use vigil::methods::ndp_net::rbam::{patches, ReferencePatches};
use vigil::methods::ndp_net::{NdpNetConfig, PHASE1_GROUP, PHASE2_GROUP};
use vigil::methods::{self, Method, Setup, TrainBatch, TrainSet};
use vigil::nn::norm::Builders;
use vigil::rng::Rng;
use vigil::Result;

mod common;
use common::backbone;

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(data, shape.to_vec(), &Device::Cpu).unwrap()
}

/// Every repaired patch is a convex combination of the reference's patches: the weights are
/// non-negative, sum to 1 per input patch, and the repaired map is exactly their weighted sum.
#[test]
fn rbfrm_repairs_each_patch_as_a_convex_combination_of_reference_patches() -> Result<()> {
    for (k, scale) in [(2, 1.0), (4, 1.0), (2, 10.0)] {
        let reference = ReferencePatches::new(&random(&[1, 6, 8, 8], 1), k)?;
        let input = random(&[2, 6, 8, 8], 2);
        let weights = reference.weights(&input, scale)?;
        let n_ref = (8 / k) * (8 / k);
        assert_eq!(weights.dims(), &[2, n_ref, n_ref]);
        assert!(values(&weights).iter().all(|&w| w >= 0.0));
        for total in values(&weights.sum(D::Minus1)?) {
            assert!((total - 1.0).abs() < 1e-5, "K {k}: weights sum to {total}");
        }
        // Rebuilt by hand: weight row × reference patches, patch by patch.
        let raw = patches(&random(&[1, 6, 8, 8], 1), k)?.squeeze(0)?;
        let by_hand = weights.broadcast_matmul(&raw)?;
        let repaired = patches(&reference.repair(&input, scale)?, k)?;
        let diff = values(&(by_hand - repaired)?.abs()?);
        assert!(
            diff.iter().all(|&d| d < 1e-5),
            "K {k}: not the weighted sum"
        );
        // Not a trivial repair: the weights differ between patches.
        let w = values(&weights);
        assert!(
            w.iter().any(|&x| (x - w[0]).abs() > 1e-4),
            "K {k}: uniform weights"
        );
    }
    Ok(())
}

/// An input patch equal to a distinctive reference patch puts its largest weight on that patch,
/// wherever it sits in the input.
#[test]
fn an_input_patch_equal_to_a_reference_patch_weighs_that_patch_most() -> Result<()> {
    let k = 2;
    let reference = random(&[1, 4, 8, 8], 3);
    let patches_ref = ReferencePatches::new(&reference, k)?;
    // The input holds the reference's patches in reverse order.
    let p = patches(&reference, k)?.squeeze(0)?;
    let n = p.dim(0)?;
    let reversed: Vec<u32> = (0..n as u32).rev().collect();
    let shuffled = p.index_select(&Tensor::new(reversed.as_slice(), &Device::Cpu)?, 0)?;
    let input = vigil::methods::ndp_net::rbam::unpatch(&shuffled.unsqueeze(0)?, (4, 8, 8), k)?;
    for scale in [1.0, 10.0] {
        let weights = patches_ref.weights(&input, scale)?.squeeze(0)?;
        let best = weights.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let expected: Vec<u32> = (0..n as u32).rev().collect();
        assert_eq!(best, expected, "scale {scale}");
    }
    // With a temperature the exact match takes nearly all the weight.
    let sharp = values(&patches_ref.weights(&input, 50.0)?.max(D::Minus1)?);
    assert!(sharp.iter().all(|&w| w > 0.9), "{sharp:?}");
    Ok(())
}

/// The FFM's attention over its three inputs (features, K = 2 and K = 4 repairs) is a softmax
/// across them: non-negative and summing to 1 per position and channel, and the output is the
/// attention-weighted sum.
#[test]
fn the_ffm_attention_sums_to_one_across_its_three_maps() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = NdpNetConfig {
        ffm_channels: 8,
        ..Default::default()
    };
    let (params, buffers) = (VarMap::new(), VarMap::new());
    let b = Builders {
        params: VarBuilder::from_varmap(&params, DType::F32, &dev),
        buffers: VarBuilder::from_varmap(&buffers, DType::F32, &dev),
    };
    let ffm = Ffm::new(&b, &cfg, 5)?;
    // Weights large enough that the attention is far from uniform.
    for var in params.all_vars() {
        var.set(&(var.as_tensor() * 40.0)?)?;
    }
    let f = random(&[2, 5, 8, 8], 4);
    let repaired = [random(&[2, 5, 8, 8], 5), random(&[2, 5, 8, 8], 6)];
    let attention = ffm.attention(&f, &repaired, false)?;
    assert_eq!(attention.dims(), &[2, 3, 5, 8, 8]);
    assert!(values(&attention).iter().all(|&a| a >= 0.0));
    for total in values(&attention.sum(1)?) {
        assert!((total - 1.0).abs() < 1e-5, "attention sums to {total}");
    }
    let spread = values(&attention);
    assert!(spread.iter().any(|&a| a > 0.6) && spread.iter().any(|&a| a < 0.2));
    let inputs = Tensor::stack(&[&f, &repaired[0], &repaired[1]], 1)?;
    let expected = (&attention * inputs)?.sum(1)?;
    let out = ffm.forward(&f, &repaired, false)?;
    let diff = values(&(out - expected)?.abs()?);
    assert!(diff.iter().all(|&d| d < 1e-5));
    Ok(())
}

/// `[1, C, 8, 8]` features that differ from `base` by `delta` on the pixels of `region`.
fn altered(base: &Tensor, region: &[(usize, usize)], delta: f32) -> Tensor {
    let mut v = values(base);
    let c = base.dim(1).unwrap();
    for ch in 0..c {
        for &(y, x) in region {
            v[(ch * 8 + y) * 8 + x] += delta;
        }
    }
    Tensor::from_vec(v, base.dims(), &Device::Cpu).unwrap()
}

fn mask(region: &[(usize, usize)]) -> Tensor {
    let mut m = vec![0f32; 64];
    for &(y, x) in region {
        m[y * 8 + x] = 1.0;
    }
    Tensor::from_vec(m, (1, 1, 8, 8), &Device::Cpu).unwrap()
}

fn block(y0: usize, x0: usize, side: usize) -> Vec<(usize, usize)> {
    (y0..y0 + side)
        .flat_map(|y| (x0..x0 + side).map(move |x| (y, x)))
        .collect()
}

fn loss(clean: &Tensor, defective: &Tensor, m: &Tensor) -> f32 {
    defect_perception(
        std::slice::from_ref(clean),
        std::slice::from_ref(defective),
        m,
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap()
}

/// Eq. 2 is 0 for identical images and an empty mask, and grows as the features differ where
/// the mask says they should not. Its min-max normalisation makes it blind to the difference's
/// scale, so "grows" is measured over the extent of the difference: an empty mask against a
/// growing differing region, and a fixed mask against a difference spilling further outside it.
#[test]
fn the_defect_perception_loss_is_zero_when_nothing_differs_and_grows_with_the_mismatch() {
    let clean = random(&[1, 3, 8, 8], 7);
    let empty = mask(&[]);
    assert_eq!(loss(&clean, &clean, &empty), 0.0);

    let mut last = 0.0;
    for side in 1..=6 {
        let l = loss(&clean, &altered(&clean, &block(1, 1, side), 2.0), &empty);
        assert!(l > last, "side {side}: {l} after {last}");
        last = l;
    }

    // A difference exactly on the mask costs (almost) nothing; the same difference spilling out
    // of it costs more the further it spills.
    let m = mask(&block(2, 2, 3));
    let exact = loss(&clean, &altered(&clean, &block(2, 2, 3), 2.0), &m);
    assert!(exact < 1e-6, "{exact}");
    let mut last = exact;
    for side in 4..=6 {
        let l = loss(&clean, &altered(&clean, &block(2, 2, side), 2.0), &m);
        assert!(l > last, "spill to side {side}: {l} after {last}");
        last = l;
    }
    // A difference of the mask's size costs more the further it lies from the mask.
    let mut last = exact;
    for shift in 1..=3 {
        let l = loss(
            &clean,
            &altered(&clean, &block(2 + shift, 2 + shift, 3), 2.0),
            &m,
        );
        assert!(l > last, "shift {shift}: {l} after {last}");
        last = l;
    }
}

fn synthetic(n: usize, side: usize, seed: u64) -> Vec<Image> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let phase = rng.range_f32(0.0, 6.0);
            let data = (0..side * side)
                .map(|i| {
                    let (y, x) = ((i / side) as f32, (i % side) as f32);
                    (0.5 + 0.2 * ((x + phase) * 0.8).sin() * (y * 0.5).cos() + 0.02 * rng.normal())
                        .clamp(0.0, 1.0)
                })
                .collect();
            Image {
                channels: 1,
                height: side,
                width: side,
                data,
            }
        })
        .collect()
}

fn tensors_named(method: &dyn Method, prefix: &str) -> HashMap<String, Vec<f32>> {
    method
        .tensors()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k, values(&v)))
        .collect()
}

/// Phase 1 gives every encoder and decoder variable a gradient; phase 2 every decoder, FFM and
/// DSM variable and none of the encoder's; steps of phase 2 leave the encoder's weights and its
/// BatchNorm statistics exactly as they were, while phase 1 moves them.
#[test]
fn each_phase_trains_its_parameters_and_phase_two_leaves_the_encoder_alone() -> Result<()> {
    let side = 64;
    let setup = Setup {
        config: serde_json::json!({
            "width": 2, "ffm_channels": 4, "ffm_kernel": 3, "phase1_epochs": 1,
            "phase2_epochs": 1, "anomaly_probability": 0.75
        }),
        input: InputSpec {
            height: side,
            width: side,
            channels: 1,
        },
        seed: 1,
        device: &Device::Cpu,
    };
    let mut method = methods::create("ndp-net", &setup, &backbone())?;
    let set = TrainSet {
        good: synthetic(6, side, 1),
        defects: Vec::new(),
    };
    method.prepare(&set)?;
    let good: Vec<&Image> = set.good.iter().take(4).collect();
    let batch = |phase| TrainBatch {
        phase,
        epoch: 0,
        good: good.clone(),
        features: None,
        defects: &[],
    };
    for (phase, group) in [(0, PHASE1_GROUP), (1, PHASE2_GROUP)] {
        let losses = method.step_losses(&batch(phase), &mut Rng::new(2))?;
        assert_eq!(losses.objectives.len(), 1);
        let (name, loss) = &losses.objectives[0];
        assert_eq!(*name, group);
        let grads = loss.backward()?;
        let vars = method.train_state().group_vars(group)?;
        let (mut encoder, mut others) = (0, 0);
        for (name, var) in &vars {
            let grad = grads.get(var.as_tensor());
            let norm: f32 = grad.map_or(0.0, |g| values(&g.abs().unwrap()).iter().sum());
            assert!(
                norm > 0.0 && norm.is_finite(),
                "phase {phase}: `{name}` gradient {norm}"
            );
            if name.starts_with("encoder.") {
                encoder += 1;
            } else {
                others += 1;
            }
        }
        match phase {
            0 => assert!(
                encoder > 0 && others > 0,
                "phase 1 trains encoder and decoder"
            ),
            _ => assert!(encoder == 0 && others > 0, "phase 2 leaves the encoder out"),
        }
        if phase == 1 {
            let names: Vec<&String> = vars.iter().map(|(n, _)| n).collect();
            for part in ["decoder.", "ffm2.", "ffm4.", "dsm0.", "dsm2."] {
                assert!(
                    names.iter().any(|n| n.starts_with(part)),
                    "phase 2 lacks {part}"
                );
            }
        }
    }
    // Real steps: phase 1 moves the encoder (weights and statistics), phase 2 does not.
    let before = tensors_named(method.as_ref(), "encoder.");
    methods::step(method.as_mut(), &batch(0), &mut Rng::new(3))?;
    let moved = tensors_named(method.as_ref(), "encoder.");
    assert!(
        before.iter().any(|(k, v)| moved[k] != *v),
        "phase 1 left the encoder"
    );
    let stats = moved.keys().filter(|k| k.contains("running_")).count();
    assert!(stats > 0, "no encoder BatchNorm statistics in the model");
    for seed in 4..7 {
        methods::step(method.as_mut(), &batch(1), &mut Rng::new(seed))?;
    }
    let after = tensors_named(method.as_ref(), "encoder.");
    for (name, v) in &moved {
        assert_eq!(after[name], *v, "phase 2 changed `{name}`");
    }
    // The rest of phase 2's model did change.
    let decoder = tensors_named(method.as_ref(), "dsm0.");
    assert!(!decoder.is_empty());
    let _ = batch_tensor(&good, &Device::Cpu)?;
    Ok(())
}

fn run() -> RunOptions {
    RunOptions::quiet_cpu(8)
}

/// The synthetic product's defect-free images (`vigil synth`) with defects of two kinds NDP-Net
/// never trains on (it learns from Perlin-masked texture blends): cutouts and confetti noise,
/// drawn on held-out defect-free images, in the MVTec layout.
fn textures_with_defects(dir: &Path, side: usize) -> PathBuf {
    let product = dir.join("product");
    synth::generate(
        &product,
        &SynthConfig {
            height: side,
            width: side,
            channels: 1,
            train_good: 40,
            test_good: 20,
            test_per_defect: 1,
            seed: 4,
        },
    )
    .unwrap();
    let data = dir.join("data");
    let spec = InputSpec {
        height: side,
        width: side,
        channels: 1,
    };
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    };
    copy(&product.join("train/good"), &data.join("train/good"));
    let mut held_out: Vec<PathBuf> = std::fs::read_dir(product.join("test/good"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    held_out.sort();
    let (good, to_alter) = held_out.split_at(10);
    std::fs::create_dir_all(data.join("test/good")).unwrap();
    for path in good {
        std::fs::copy(path, data.join("test/good").join(path.file_name().unwrap())).unwrap();
    }
    let kinds = [
        ("cutout", AnomalyGenerator::Cutout(Default::default())),
        ("confetti", AnomalyGenerator::Confetti(Default::default())),
    ];
    let mut rng = Rng::new(9);
    for (i, path) in to_alter.iter().enumerate() {
        let (kind, generator) = &kinds[i % 2];
        let image = load_image(path, &spec).unwrap();
        let (altered, mask) = AnomalySynth::single(generator.clone())
            .unwrap()
            .apply(&image, &mut rng)
            .unwrap();
        let (images, masks) = (
            data.join("test").join(kind),
            data.join("ground_truth").join(kind),
        );
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&masks).unwrap();
        save_png(&altered, &images.join(format!("{i:03}.png"))).unwrap();
        save_mask_png(&mask, &masks.join(format!("{i:03}_mask.png"))).unwrap();
    }
    data
}

/// A tiny NDP-Net trained on synthetic textures (the synthetic product's defect-free images)
/// segments defects of kinds it never saw (pixel AUROC ≥ 0.9), and its report shows the
/// reference it chose.
#[test]
fn a_tiny_ndp_net_segments_defects_on_synthetic_textures() {
    let dir = tempfile::tempdir().unwrap();
    let side = 64;
    let data = textures_with_defects(dir.path(), side);
    let model = dir.path().join("ndp.safetensors");
    let set = [
        "width=8",
        "ffm_channels=16",
        "phase1_epochs=5",
        "phase2_epochs=30",
        "lr=0.001",
    ]
    .map(String::from)
    .to_vec();
    commands::train(&TrainArgs {
        set,
        height: Some(side),
        width: Some(side),
        seed: 2,
        ..TrainArgs::new(
            "ndp-net",
            DataSource::Mvtec { root: data.clone() },
            model.clone(),
            backbone(),
            run(),
        )
    })
    .unwrap();
    let out = dir.path().join("report");
    let report = commands::eval(&EvalArgs {
        model,
        data: DataSource::Mvtec { root: data },
        out: out.clone(),
        run: run(),
    })
    .unwrap();
    let pixel = report.metrics.pixel_auroc.unwrap();
    eprintln!(
        "tiny NDP-Net on synthetic textures: pixel AUROC {pixel:.3}, image AUROC {:?}, per type {:?}",
        report.metrics.image_auroc, report.metrics.per_type
    );
    assert!(
        out.join("reference.png").exists(),
        "the report shows the reference"
    );
    assert!(pixel >= 0.9, "pixel AUROC {pixel}");
}
