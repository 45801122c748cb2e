//! NF-BMR: the flow's invertibility and log-det, gradients of every phase, the shared middle block,
//! the model-file round trip, the anomaly map's geometry and an end-to-end detection on tiny data.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use vigil::data::InputSpec;
use vigil::methods::anomaly_map::MapResizer;
use vigil::methods::nf_bmr::{Mapping, NfBmr, NfBmrConfig};
use vigil::methods::Method;
use vigil::nn::flow::{nll_loss, FlowSpec, RealNvp};
use vigil::nn::init::seeded_var_builder;
use vigil::rng::Rng;

mod common;
mod tiny_extractor;
use common::max_abs_diff;
use tiny_extractor::TinyExtractor;

const FEATURES: usize = 6;

/// This file's extractor: seeded weights, and its frozen tensors as a model file stores them.
impl TinyExtractor {
    fn new(in_channels: usize) -> Self {
        let mut rng = Rng::new(99);
        let n = FEATURES * in_channels * 9;
        let values: Vec<f32> = (0..n).map(|_| rng.normal() / 3.0).collect();
        let weight = Tensor::from_vec(values, (FEATURES, in_channels, 3, 3), &Device::Cpu).unwrap();
        TinyExtractor { weight, gain: 4.0 }
    }

    fn frozen(&self) -> HashMap<String, Tensor> {
        HashMap::from([("tiny.weight".to_string(), self.weight.clone())])
    }
}

const INPUT: InputSpec = InputSpec {
    height: 16,
    width: 16,
    channels: 1,
};

fn tiny_config(mapping: Mapping) -> NfBmrConfig {
    NfBmrConfig {
        flow_hidden: 16,
        bmr_width: 16,
        bmr_blocks: 1,
        mapping,
        smoothing_sigma: 1.0,
        flow_lr: 2e-3,
        map_lr: 2e-3,
        ..Default::default()
    }
}

fn tiny_model(mapping: Mapping) -> NfBmr {
    let extractor = TinyExtractor::new(INPUT.channels);
    let frozen = extractor.frozen();
    NfBmr::new(
        tiny_config(mapping),
        INPUT,
        Box::new(extractor),
        frozen,
        0,
        &Device::Cpu,
    )
    .unwrap()
}

/// "Normal" images: a smooth-ish random texture around mid grey.
fn normal_images(rng: &mut Rng, batch: usize, spec: InputSpec) -> Tensor {
    let n = batch * spec.channels * spec.height * spec.width;
    let values: Vec<f32> = (0..n).map(|_| 0.5 + 0.08 * rng.normal()).collect();
    Tensor::from_vec(
        values,
        (batch, spec.channels, spec.height, spec.width),
        &Device::Cpu,
    )
    .unwrap()
}

fn abs_sum(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn config_defaults_follow_the_paper_and_bad_fields_are_named() {
    let cfg = NfBmrConfig::default();
    cfg.validate().unwrap();
    assert_eq!(
        (
            cfg.flow_blocks,
            cfg.flow_hidden,
            cfg.bmr_blocks,
            cfg.mapping
        ),
        (4, 1024, 2, Mapping::Bmr)
    );
    assert_eq!(cfg.smoothing_sigma, 4.0);
    let parsed: NfBmrConfig = serde_json::from_str(r#"{"mapping": "one-by-one"}"#).unwrap();
    assert_eq!(parsed.mapping, Mapping::OneByOne);
    assert!(serde_json::from_str::<NfBmrConfig>(r#"{"flow_blockz": 3}"#).is_err());
    let cases: Vec<(&str, NfBmrConfig)> = vec![
        (
            "taps",
            NfBmrConfig {
                taps: vec![],
                ..Default::default()
            },
        ),
        (
            "taps",
            NfBmrConfig {
                taps: vec![7, 4],
                ..Default::default()
            },
        ),
        (
            "flow_kernel",
            NfBmrConfig {
                flow_kernel: 2,
                ..Default::default()
            },
        ),
        (
            "flow_hidden",
            NfBmrConfig {
                flow_hidden: 0,
                ..Default::default()
            },
        ),
        (
            "map_lr",
            NfBmrConfig {
                map_lr: f64::NAN,
                ..Default::default()
            },
        ),
        (
            "smoothing_sigma",
            NfBmrConfig {
                smoothing_sigma: -1.0,
                ..Default::default()
            },
        ),
    ];
    for (field, cfg) in cases {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{err} should name {field}");
    }
}

/// log|det| of a row-major `n × n` matrix by Gaussian elimination with partial pivoting.
fn log_abs_det(mut m: Vec<f64>, n: usize) -> f64 {
    let mut log_det = 0.0;
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&a, &b| m[a * n + col].abs().total_cmp(&m[b * n + col].abs()))
            .unwrap();
        for k in 0..n {
            m.swap(col * n + k, pivot * n + k);
        }
        let p = m[col * n + col];
        log_det += p.abs().ln();
        for row in col + 1..n {
            let f = m[row * n + col] / p;
            for k in col..n {
                m[row * n + k] -= f * m[col * n + k];
            }
        }
    }
    log_det
}

/// A float64 flow with its weights scaled up so that the scales are far from 1.
fn test_flow(spec: &FlowSpec) -> RealNvp {
    let vars = VarMap::new();
    let flow = RealNvp::new(
        seeded_var_builder(&vars, 5, DType::F64, &Device::Cpu).pp("flow"),
        spec,
    )
    .unwrap();
    for var in vars.all_vars() {
        var.set(&(var.as_tensor() * 4.0).unwrap()).unwrap();
    }
    flow
}

fn random_f64(rng: &mut Rng, shape: (usize, usize, usize, usize)) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let values: Vec<f64> = (0..n).map(|_| rng.normal() as f64).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// The Jacobian of `f` at `x` (flattened), by central differences.
fn jacobian(f: impl Fn(&Tensor) -> Tensor, x: &Tensor) -> Vec<f64> {
    let x_flat = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let n = x_flat.len();
    let eps = 1e-6;
    let mut jac = vec![0.0; n * n];
    for j in 0..n {
        let eval = |delta: f64| {
            let mut v = x_flat.clone();
            v[j] += delta;
            let xt = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
            f(&xt).flatten_all().unwrap().to_vec1::<f64>().unwrap()
        };
        let (plus, minus) = (eval(eps), eval(-eps));
        for i in 0..n {
            jac[i * n + j] = (plus[i] - minus[i]) / (2.0 * eps);
        }
    }
    jac
}

#[test]
fn flow_is_invertible_and_its_log_det_matches_the_jacobian() {
    let mut rng = Rng::new(1);
    // Kernel 3: the couplings mix positions, so check the whole map's log-det.
    let spec = FlowSpec {
        channels: 5,
        blocks: 4,
        hidden: 8,
        kernel: 3,
        clamp: 2.0,
    };
    let flow = test_flow(&spec);
    let x = random_f64(&mut rng, (1, 5, 3, 3));
    let (z, log_det) = flow.forward(&x).unwrap();
    assert!(max_abs_diff(&flow.inverse(&z).unwrap(), &x) < 1e-9);
    assert_eq!(log_det.dims(), &[1, 3, 3]);
    let brute = log_abs_det(jacobian(|t| flow.forward(t).unwrap().0, &x), 45);
    let total = log_det.sum_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(
        brute.abs() > 0.5,
        "scales too close to 1 for a real test: {brute}"
    );
    assert!(
        (brute - total).abs() < 1e-5,
        "brute force {brute}, flow {total}"
    );

    // Kernel 1: each position is its own flow, so each position's log-det is checkable.
    let spec = FlowSpec { kernel: 1, ..spec };
    let flow = test_flow(&spec);
    let x = random_f64(&mut rng, (1, 5, 1, 2));
    let (_, log_det) = flow.forward(&x).unwrap();
    let log_det = log_det.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for (pos, flow_log_det) in log_det.iter().enumerate() {
        let at = |t: &Tensor| t.narrow(3, pos, 1).unwrap();
        let brute = log_abs_det(jacobian(|t| flow.forward(t).unwrap().0, &at(&x)), 5);
        assert!(
            (brute - flow_log_det).abs() < 1e-5,
            "position {pos}: {brute} vs {flow_log_det}"
        );
    }
}

#[test]
fn flow_nll_decreases_on_gaussianish_data() {
    let mut rng = Rng::new(2);
    let spec = FlowSpec {
        channels: 4,
        blocks: 4,
        hidden: 32,
        kernel: 1,
        clamp: 2.0,
    };
    let vars = VarMap::new();
    let flow = RealNvp::new(
        seeded_var_builder(&vars, 0, DType::F32, &Device::Cpu),
        &spec,
    )
    .unwrap();
    let mut opt = AdamW::new(
        vars.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    // Correlated, scaled, shifted and skewed Gaussian features: far from N(0, I).
    let batch = |rng: &mut Rng| {
        let mut v = Vec::with_capacity(4 * 64);
        let cols: Vec<[f32; 4]> = (0..64)
            .map(|_| {
                let (a, b) = (rng.normal(), rng.normal());
                [
                    2.0 * a + 1.0,
                    a + 0.3 * b,
                    0.5 * b * b,
                    -a + 0.1 * rng.normal(),
                ]
            })
            .collect();
        for c in 0..4 {
            v.extend(cols.iter().map(|col| col[c]));
        }
        Tensor::from_vec(v, (1, 4, 8, 8), &Device::Cpu).unwrap()
    };
    let held_out = batch(&mut rng);
    let nll = |flow: &RealNvp| {
        let (z, ld) = flow.forward(&held_out).unwrap();
        nll_loss(&z, &ld).unwrap().to_scalar::<f32>().unwrap()
    };
    let before = nll(&flow);
    for _ in 0..60 {
        let (z, ld) = flow.forward(&batch(&mut rng)).unwrap();
        opt.backward_step(&nll_loss(&z, &ld).unwrap()).unwrap();
    }
    let after = nll(&flow);
    assert!(
        after < before - 0.3,
        "held-out NLL per dim {before} -> {after}"
    );
}

#[test]
fn every_parameter_gets_a_gradient_in_its_phase_and_the_flow_stays_fixed_in_map() {
    for mapping in [Mapping::None, Mapping::OneByOne, Mapping::Bmr] {
        let mut model = tiny_model(mapping);
        let mut rng = Rng::new(3);
        let encoded = model
            .encode_frozen(&normal_images(&mut rng, 4, INPUT))
            .unwrap();
        model.train_on_features(0, &encoded).unwrap();
        let phases = model.phases().len();
        assert_eq!(phases, if mapping == Mapping::None { 1 } else { 2 });
        let flow_vars = model.trainable_vars(0).unwrap();
        for phase in 0..phases {
            let grads = model
                .phase_loss(phase, &encoded)
                .unwrap()
                .backward()
                .unwrap();
            let vars = model.trainable_vars(phase).unwrap();
            assert!(!vars.is_empty());
            for (name, var) in &vars {
                let grad = grads.get(var).unwrap_or_else(|| {
                    panic!("{mapping:?} phase {phase}: `{name}` has no gradient")
                });
                assert!(
                    abs_sum(grad) > 0.0,
                    "{mapping:?} phase {phase}: `{name}` gradient is zero"
                );
            }
            if phase == 1 {
                for (name, var) in &flow_vars {
                    assert!(
                        grads.get(var).is_none(),
                        "map phase reaches flow parameter `{name}`"
                    );
                }
            }
        }
        if phases == 2 {
            let before: Vec<Tensor> = flow_vars
                .iter()
                .map(|(_, v)| v.as_tensor().copy().unwrap())
                .collect();
            let map_before = model.trainable_vars(1).unwrap()[0]
                .1
                .as_tensor()
                .copy()
                .unwrap();
            model.train_on_features(1, &encoded).unwrap();
            for ((name, var), old) in flow_vars.iter().zip(&before) {
                assert_eq!(
                    max_abs_diff(var.as_tensor(), old),
                    0.0,
                    "map step changed `{name}`"
                );
            }
            let map_after = model.trainable_vars(1).unwrap()[0]
                .1
                .as_tensor()
                .copy()
                .unwrap();
            assert!(
                max_abs_diff(&map_after, &map_before) > 0.0,
                "map step changed nothing"
            );
        }
    }
}

#[test]
fn middle_block_is_one_set_of_tensors_shared_by_both_directions() {
    let mut model = tiny_model(Mapping::Bmr);
    let mut rng = Rng::new(4);
    let encoded = model
        .encode_frozen(&normal_images(&mut rng, 2, INPUT))
        .unwrap();
    model.train_on_features(0, &encoded).unwrap();
    let tensors = model.tensors().unwrap();
    let shared: Vec<&String> = tensors.keys().filter(|k| k.contains("shared")).collect();
    assert_eq!(
        shared.len(),
        6,
        "three convs, weight and bias each: {shared:?}"
    );
    assert!(
        shared.iter().all(|k| k.starts_with("bmr.shared.")),
        "{shared:?}"
    );

    let source = model.standardize(&encoded).unwrap();
    let target = model.trainable_flow().forward(&source).unwrap().0.detach();
    let nets = model.trainable_mapping().unwrap();
    let shared_vars: Vec<_> = model
        .trainable_vars(1)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n.starts_with("bmr.shared."))
        .collect();
    let direction_losses = [
        (
            "tmnn",
            nets.to_target(&source).unwrap().sub(&target).unwrap(),
        ),
        (
            "smnn",
            nets.to_source(&target).unwrap().sub(&source).unwrap(),
        ),
    ];
    for (direction, diff) in direction_losses {
        let grads = diff.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        for (name, var) in &shared_vars {
            let grad = grads
                .get(var)
                .unwrap_or_else(|| panic!("{direction}: no gradient for `{name}`"));
            assert!(
                abs_sum(grad) > 0.0,
                "{direction}: zero gradient for `{name}`"
            );
        }
    }

    // Changing the one shared tensor changes both directions.
    let outputs = |m: &NfBmr| {
        let nets = m.trainable_mapping().unwrap();
        (
            nets.to_target(&source).unwrap(),
            nets.to_source(&target).unwrap(),
        )
    };
    let (t0, s0) = outputs(&model);
    let (name, var) = shared_vars
        .iter()
        .find(|(n, _)| n.ends_with("expand.bias"))
        .unwrap();
    var.set(&(var.as_tensor() + 1.0).unwrap()).unwrap();
    let (t1, s1) = outputs(&model);
    assert!(
        max_abs_diff(&t0, &t1) > 1e-3,
        "`{name}` does not reach TMNN"
    );
    assert!(
        max_abs_diff(&s0, &s1) > 1e-3,
        "`{name}` does not reach SMNN"
    );
}

#[test]
fn tensors_round_trip_gives_identical_inference() {
    for mapping in [Mapping::None, Mapping::OneByOne, Mapping::Bmr] {
        let mut model = tiny_model(mapping);
        let mut rng = Rng::new(5);
        for phase in 0..model.phases().len() {
            for _ in 0..3 {
                let encoded = model
                    .encode_frozen(&normal_images(&mut rng, 4, INPUT))
                    .unwrap();
                model.train_on_features(phase, &encoded).unwrap();
            }
        }
        let saved = model.tensors().unwrap();
        assert!(saved.contains_key("tiny.weight") && saved.contains_key("norm.std"));
        let extractor = TinyExtractor::new(INPUT.channels);
        let frozen = extractor.frozen();
        let restored = NfBmr::from_tensors(
            tiny_config(mapping),
            INPUT,
            Box::new(extractor),
            frozen,
            &saved,
            &Device::Cpu,
        )
        .unwrap();
        let images = normal_images(&mut rng, 2, INPUT);
        let (a, b) = (
            model.infer(&images).unwrap(),
            restored.infer(&images).unwrap(),
        );
        assert_eq!(a.maps.dims(), &[2, 16, 16]);
        assert_eq!(a.scores.dims(), &[2]);
        assert_eq!(max_abs_diff(&a.maps, &b.maps), 0.0, "{mapping:?}");
        assert_eq!(max_abs_diff(&a.scores, &b.scores), 0.0, "{mapping:?}");
    }
}

#[test]
fn bad_inputs_and_model_tensors_are_errors_that_name_them() {
    let model = tiny_model(Mapping::Bmr);
    let wrong_size = Tensor::zeros((1, 1, 16, 12), DType::F32, &Device::Cpu).unwrap();
    assert!(model
        .infer(&wrong_size)
        .unwrap_err()
        .to_string()
        .contains("images"));
    let mut model = model;
    let wrong_channels = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(model
        .train_on_features(0, &wrong_channels)
        .unwrap_err()
        .to_string()
        .contains("channels"));
    assert!(model
        .train_on_features(
            2,
            &wrong_channels
                .narrow(1, 0, 1)
                .unwrap()
                .repeat((1, FEATURES, 1, 1))
                .unwrap(),
        )
        .is_err());

    let saved = model.tensors().unwrap();
    let key = "bmr.tmnn.raise.weight";
    for (broken, what) in [
        (
            {
                let mut s = saved.clone();
                s.remove(key);
                s
            },
            "missing",
        ),
        (
            {
                let mut s = saved.clone();
                s.insert(
                    key.into(),
                    Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
                );
                s
            },
            "shape",
        ),
    ] {
        let extractor = TinyExtractor::new(1);
        let err = NfBmr::from_tensors(
            tiny_config(Mapping::Bmr),
            INPUT,
            Box::new(extractor),
            HashMap::new(),
            &broken,
            &Device::Cpu,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains(key) && err.contains(what), "{err}");
    }
    // A frozen tensor may not shadow one of the model's own.
    let extractor = TinyExtractor::new(1);
    let clash = HashMap::from([(
        "norm.mean".to_string(),
        Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap(),
    )]);
    assert!(NfBmr::new(
        tiny_config(Mapping::Bmr),
        INPUT,
        Box::new(extractor),
        clash,
        0,
        &Device::Cpu
    )
    .is_err());
}

#[test]
fn map_resizer_is_bilinear_upsampling_then_gaussian_smoothing() {
    let mut rng = Rng::new(6);
    let (h, w, big_h, big_w) = (5, 7, 20, 23);
    let values: Vec<f32> = (0..2 * h * w).map(|_| rng.normal()).collect();
    let scores = Tensor::from_vec(values, (2, h, w), &Device::Cpu).unwrap();
    let plain = MapResizer::new((h, w), (big_h, big_w), 0.0, &Device::Cpu).unwrap();
    let reference = scores
        .unsqueeze(1)
        .unwrap()
        .upsample_bilinear2d(big_h, big_w, false)
        .unwrap()
        .squeeze(1)
        .unwrap();
    assert!(max_abs_diff(&plain.resize(&scores).unwrap(), &reference) < 1e-5);

    let smooth = MapResizer::new((h, w), (big_h, big_w), 2.0, &Device::Cpu).unwrap();
    let constant = Tensor::full(3.0f32, (1, h, w), &Device::Cpu).unwrap();
    let out = smooth.resize(&constant).unwrap();
    assert!(
        max_abs_diff(
            &out,
            &Tensor::full(3.0f32, (1, big_h, big_w), &Device::Cpu).unwrap()
        ) < 1e-5
    );

    // A single hot cell stays centred where bilinear upsampling puts it, and spreads.
    let mut hot = vec![0.0f32; h * w];
    hot[2 * w + 3] = 1.0;
    let hot = Tensor::from_vec(hot, (1, h, w), &Device::Cpu).unwrap();
    let (sharp, blurred) = (plain.resize(&hot).unwrap(), smooth.resize(&hot).unwrap());
    let argmax = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap()
    };
    assert_eq!(argmax(&sharp), argmax(&blurred));
    let peak = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(peak(&blurred) < peak(&sharp));
    assert!(smooth
        .resize(&Tensor::zeros((1, h + 1, w), DType::F32, &Device::Cpu).unwrap())
        .is_err());
}

#[test]
fn out_of_distribution_patch_scores_highest_at_its_location() {
    let spec = InputSpec {
        height: 32,
        width: 32,
        channels: 1,
    };
    for mapping in [Mapping::None, Mapping::OneByOne, Mapping::Bmr] {
        let extractor = TinyExtractor::new(1);
        let frozen = extractor.frozen();
        let mut model = NfBmr::new(
            NfBmrConfig {
                smoothing_sigma: 1.5,
                ..tiny_config(mapping)
            },
            spec,
            Box::new(extractor),
            frozen,
            0,
            &Device::Cpu,
        )
        .unwrap();
        let mut rng = Rng::new(7);
        for phase in 0..model.phases().len() {
            for _ in 0..20 {
                let encoded = model
                    .encode_frozen(&normal_images(&mut rng, 8, spec))
                    .unwrap();
                model.train_on_features(phase, &encoded).unwrap();
            }
        }
        let normal = normal_images(&mut rng, 4, spec);
        // A bright 6×6 patch at rows 4..10, columns 20..26 of the first image.
        let patch = Tensor::ones((1, 1, 6, 6), DType::F32, &Device::Cpu).unwrap();
        let first = normal
            .narrow(0, 0, 1)
            .unwrap()
            .slice_assign(&[0..1, 0..1, 4..10, 20..26], &patch)
            .unwrap();
        let images = Tensor::cat(&[&first, &normal.narrow(0, 1, 3).unwrap()], 0).unwrap();
        let out = model.infer(&images).unwrap();
        let map = out.maps.get(0).unwrap().to_vec2::<f32>().unwrap();
        let inside = map[4..10]
            .iter()
            .flat_map(|r| r[20..26].iter())
            .cloned()
            .fold(f32::MIN, f32::max);
        // Outside: everything farther than 4 px from the patch.
        let outside = map
            .iter()
            .enumerate()
            .flat_map(|(y, r)| r.iter().enumerate().map(move |(x, v)| (y, x, *v)))
            .filter(|&(y, x, _)| !(0..14).contains(&y) || !(16..30).contains(&x))
            .map(|(_, _, v)| v)
            .fold(f32::MIN, f32::max);
        assert!(
            inside > 2.0 * outside,
            "{mapping:?}: patch {inside}, elsewhere {outside}"
        );
        let scores = out.scores.to_vec1::<f32>().unwrap();
        assert!(
            scores[1..].iter().all(|&s| s < scores[0]),
            "{mapping:?}: scores {scores:?}"
        );
    }
}
