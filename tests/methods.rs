//! The tests every registered method runs, driven by the registry and each method's tiny config,
//! so a new method cannot skip them: every trainable parameter receives a non-zero gradient, every
//! phase fitted without steps changes the method's fitted state, and no frozen tensor changes; the
//! model file round-trips and scores identically; a resumed training ends with the same model; the
//! fast CPU path agrees with the reference path.
use std::collections::{BTreeSet, HashMap};

use candle_core::{Device, Tensor};
use vigil::data::{batch_tensor, Image, InputSpec, Mask};
use vigil::methods::{
    self, Defective, FitContext, Learning, Method, MethodEntry, PhaseInput, Setup, TrainBatch,
    TrainSet, REGISTRY,
};
use vigil::model_file::{self, ModelMeta, Preprocessing, ScoreStats, TrainingInfo};
use vigil::rng::Rng;
use vigil::train::{self, TrainOptions};
use vigil::Result;

mod common;
use common::{backbone, max_abs_diff};

const SIDE: usize = 32;
/// Defect-free validation images: enough for the memory bank's fusion to standardise on.
const VALIDATION: usize = 6;

fn input(channels: usize) -> InputSpec {
    InputSpec {
        height: SIDE,
        width: SIDE,
        channels,
    }
}

/// Defect-free "products": a smooth gradient with mild noise.
fn good_images(n: usize, channels: usize, seed: u64) -> Vec<Image> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let tilt = rng.range_f32(-0.1, 0.1);
            let data = (0..channels * SIDE * SIDE)
                .map(|i| {
                    let x = (i % SIDE) as f32 / SIDE as f32;
                    (0.5 + tilt * x + 0.03 * rng.normal()).clamp(0.0, 1.0)
                })
                .collect();
            Image {
                channels,
                height: SIDE,
                width: SIDE,
                data,
            }
        })
        .collect()
}

/// Defective images: a bright square, and its mask.
fn defects(n: usize, channels: usize, seed: u64) -> Vec<Defective> {
    good_images(n, channels, seed)
        .into_iter()
        .enumerate()
        .map(|(k, mut image)| {
            let mut mask = Mask::zeros(SIDE, SIDE);
            let at = 4 + 3 * k;
            for y in at..at + 8 {
                for x in at..at + 8 {
                    mask.data[y * SIDE + x] = 1;
                    for c in 0..channels {
                        image.data[(c * SIDE + y) * SIDE + x] = 0.95;
                    }
                }
            }
            Defective { image, mask }
        })
        .collect()
}

fn train_set(entry: &MethodEntry, channels: usize) -> TrainSet {
    TrainSet {
        good: good_images(12, channels, 1),
        defects: if entry.learns_from_defects {
            defects(2, channels, 2)
        } else {
            Vec::new()
        },
    }
}

fn build(entry: &MethodEntry, channels: usize) -> Result<Box<dyn Method>> {
    let setup = Setup {
        config: (entry.tiny_config)(),
        input: input(channels),
        seed: 3,
        device: &Device::Cpu,
    };
    (entry.create)(&setup, &backbone())
}

fn batch<'a>(method: &dyn Method, phase: usize, set: &'a TrainSet) -> Result<TrainBatch<'a>> {
    let good: Vec<&Image> = set.good.iter().take(4).collect();
    let features = match method.phases()[phase].input {
        PhaseInput::Features => Some(method.encode_frozen(&batch_tensor(&good, &Device::Cpu)?)?),
        PhaseInput::Images => None,
    };
    Ok(TrainBatch {
        phase,
        epoch: 0,
        good,
        features,
        defects: &set.defects,
    })
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// One pass of a phase fitted without steps, on the whole training set (the scale-like phases
/// read the validation images).
fn fit_phase(
    method: &mut dyn Method,
    phase: usize,
    set: &TrainSet,
    validation: &[Image],
) -> Result<()> {
    for chunk in set.good.chunks(4) {
        let good: Vec<&Image> = chunk.iter().collect();
        let features = match method.phases()[phase].input {
            PhaseInput::Features => {
                Some(method.encode_frozen(&batch_tensor(&good, &Device::Cpu)?)?)
            }
            PhaseInput::Images => None,
        };
        let batch = TrainBatch {
            phase,
            epoch: 0,
            good,
            features,
            defects: &set.defects,
        };
        method.observe(&batch, &mut Rng::new(4))?;
    }
    let bar = indicatif::ProgressBar::hidden();
    let fit = FitContext {
        phase,
        validation,
        batch_size: 4,
        bar: &bar,
    };
    method.conclude(&fit, &mut Rng::new(4))?;
    method.weights_changed();
    Ok(())
}

/// Every phase proves it learns: a phase of steps gives every parameter of each group it trains a
/// non-zero gradient (and together they train every group); a fitted phase changes or adds a
/// tensor of the method's fitted state. A method with no trainable parameter is held to the second
/// check for all of its phases, so none passes by having nothing to check.
#[test]
fn every_trainable_parameter_gets_a_gradient_and_no_frozen_tensor_changes() -> Result<()> {
    for entry in REGISTRY {
        for channels in [1, 3] {
            let what = format!("{} ({channels} channels)", entry.name);
            let mut method = build(entry, channels)?;
            let set = train_set(entry, channels);
            let validation = good_images(VALIDATION, channels, 7);
            method.prepare(&set)?;
            let groups = method.train_state().group_names();
            let mut covered = BTreeSet::new();
            let mut trainable = BTreeSet::new();
            for phase in 0..method.phases().len() {
                if method.learning(phase) == Learning::Fitted {
                    let before = method.extra_state()?;
                    fit_phase(method.as_mut(), phase, &set, &validation)?;
                    let after = method.extra_state()?;
                    let changed = after.iter().any(|(name, t)| {
                        before
                            .get(name)
                            .is_none_or(|b| b.dims() != t.dims() || values(b) != values(t))
                    });
                    assert!(
                        changed,
                        "{what}: fitted phase {phase} changed none of the method's fitted state"
                    );
                    continue;
                }
                let batch = batch(method.as_ref(), phase, &set)?;
                let losses = method.step_losses(&batch, &mut Rng::new(4))?;
                assert!(
                    !losses.objectives.is_empty(),
                    "{what}: phase {phase} of steps has no objective"
                );
                for (group, loss) in losses.objectives {
                    let grads = loss.backward()?;
                    for (name, var) in method.train_state().group_vars(group)? {
                        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| {
                            panic!("{what}: `{name}` (group {group}) gets no gradient")
                        });
                        let norm: f32 = values(&grad.abs()?).iter().sum();
                        assert!(
                            norm > 0.0 && norm.is_finite(),
                            "{what}: `{name}` (group {group}) gradient {norm}"
                        );
                        trainable.insert(name);
                    }
                    covered.insert(group);
                }
            }
            assert_eq!(
                covered,
                groups.iter().copied().collect(),
                "{what}: a parameter group no phase trains"
            );

            // One more pass of every phase (a step, or a fit) changes nothing but parameters,
            // buffers and the method's own fitted state and statistics.
            let not_frozen: BTreeSet<String> = trainable
                .into_iter()
                .chain(method.train_state().buffer_names()?)
                .chain(method.extra_state()?.into_keys())
                .collect();
            let before = method.tensors()?;
            for phase in 0..method.phases().len() {
                if method.learning(phase) == Learning::Fitted {
                    fit_phase(method.as_mut(), phase, &set, &validation)?;
                } else {
                    let batch = batch(method.as_ref(), phase, &set)?;
                    methods::step(method.as_mut(), &batch, &mut Rng::new(5))?;
                }
            }
            let after = method.tensors()?;
            let frozen: Vec<&String> = before.keys().filter(|k| !not_frozen.contains(*k)).collect();
            if entry.uses_backbone {
                assert!(
                    frozen.iter().any(|k| k.starts_with("backbone.")),
                    "{what}: no frozen backbone tensor in the model file"
                );
            }
            for name in frozen {
                assert_eq!(
                    values(&before[name]),
                    values(&after[name]),
                    "{what}: frozen `{name}` changed"
                );
            }
        }
    }
    Ok(())
}

fn meta_for(entry: &MethodEntry, method: &dyn Method, channels: usize) -> Result<ModelMeta> {
    Ok(ModelMeta {
        format: model_file::FORMAT.into(),
        format_version: model_file::FORMAT_VERSION,
        method: entry.name.into(),
        method_version: entry.version,
        config: method.config_json()?,
        backbone: None,
        input: input(channels),
        preprocessing: Preprocessing::default(),
        validation: ScoreStats::default(),
        training: TrainingInfo {
            data_fingerprint: "synthetic".into(),
            train_images: 12,
            defects: Vec::new(),
            validation_images: VALIDATION,
            seed: 3,
            date: "2026-12-02T00:00:00Z".into(),
            vigil_version: "test".into(),
            device: "Cpu".into(),
            seconds: 0.0,
        },
    })
}

fn assert_same(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    assert_eq!(
        a.keys().collect::<BTreeSet<_>>(),
        b.keys().collect::<BTreeSet<_>>(),
        "{what}"
    );
    for (name, t) in a {
        assert_eq!(max_abs_diff(t, &b[name]), 0.0, "{what}: `{name}` differs");
    }
}

/// The largest difference relative to the reference's largest magnitude (at least 1e-6).
fn relative_diff(a: &Tensor, reference: &Tensor) -> f64 {
    let largest = max_abs_diff(reference, &reference.zeros_like().unwrap()).max(1e-6);
    max_abs_diff(a, reference) / largest
}

#[test]
fn a_trained_model_round_trips_resumes_exactly_and_its_fast_path_agrees() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    for entry in REGISTRY {
        let channels = 1;
        let what = entry.name;
        let set = train_set(entry, channels);
        let validation = good_images(VALIDATION, channels, 7);
        let opts = |ckpt: &str, resume: bool, stop: Option<usize>| TrainOptions {
            batch_size: 4,
            seed: 3,
            progress: false,
            checkpoint: Some(dir.path().join(format!("{what}-{ckpt}"))),
            resume,
            data_fingerprint: "synthetic".into(),
            stop_after_epochs: stop,
        };
        let mut straight = build(entry, channels)?;
        let report = train::fit(
            straight.as_mut(),
            &set,
            &validation,
            &opts("a.ckpt", false, None),
            &Device::Cpu,
        )?;
        let epochs: usize = report.phases.iter().map(|p| p.epochs.len()).sum();
        assert!(
            epochs >= 2,
            "{what}: the tiny config must train at least 2 epochs, to test resuming"
        );

        // Stopped after the first epoch, then resumed by a fresh process.
        let mut first = build(entry, channels)?;
        let paused = train::fit(
            first.as_mut(),
            &set,
            &validation,
            &opts("b.ckpt", false, Some(1)),
            &Device::Cpu,
        )?;
        assert!(paused.paused, "{what}");
        let mut resumed = build(entry, channels)?;
        let report = train::fit(
            resumed.as_mut(),
            &set,
            &validation,
            &opts("b.ckpt", true, None),
            &Device::Cpu,
        )?;
        assert!(report.resumed_at.is_some() && !report.paused, "{what}");
        assert_same(
            &straight.training_state()?,
            &resumed.training_state()?,
            &format!("{what}: resumed training state"),
        );

        let val_refs: Vec<&Image> = validation.iter().collect();
        let val_batch = batch_tensor(&val_refs, &Device::Cpu)?;
        let scores = values(&straight.infer(&val_batch)?.scores);
        straight.fit_score_scale(&scores)?;

        let path = dir.path().join(format!("{what}.safetensors"));
        model_file::save(
            &path,
            &meta_for(entry, straight.as_ref(), channels)?,
            &straight.tensors()?,
        )?;
        let (meta, tensors) = model_file::load(&path, &Device::Cpu)?;
        let loaded = methods::from_model_file(&meta, tensors, &path, &Device::Cpu)?;
        let probe: Vec<Image> = good_images(2, channels, 9)
            .into_iter()
            .chain(defects(2, channels, 10).into_iter().map(|d| d.image))
            .collect();
        let probe = batch_tensor(&probe.iter().collect::<Vec<_>>(), &Device::Cpu)?;
        let (a, b) = (straight.infer(&probe)?, loaded.infer(&probe)?);
        assert_eq!(
            values(&a.scores),
            values(&b.scores),
            "{what}: loaded scores"
        );
        assert_eq!(values(&a.maps), values(&b.maps), "{what}: loaded maps");
        assert_eq!(a.maps.dims(), &[4, SIDE, SIDE], "{what}");

        let reference = loaded.infer_reference(&probe)?;
        let (scores, maps) = (
            relative_diff(&a.scores, &reference.scores),
            relative_diff(&a.maps, &reference.maps),
        );
        assert!(
            scores < 1e-3 && maps < 1e-3,
            "{what}: fast path against reference: scores {scores}, maps {maps}"
        );

        // A model file of another method version is refused, naming both versions.
        let mut old = meta.clone();
        old.method_version = entry.version + 1;
        let (_, tensors) = model_file::load(&path, &Device::Cpu)?;
        let err = methods::from_model_file(&old, tensors, &path, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("version"), "{what}: {err}");
    }
    Ok(())
}

#[test]
fn a_method_that_cannot_learn_from_defects_refuses_them() -> Result<()> {
    for entry in REGISTRY.iter().filter(|m| !m.learns_from_defects) {
        let mut method = build(entry, 1)?;
        let set = TrainSet {
            good: good_images(4, 1, 1),
            defects: defects(1, 1, 2),
        };
        let err = train::fit(
            method.as_mut(),
            &set,
            &[],
            &TrainOptions {
                progress: false,
                ..Default::default()
            },
            &Device::Cpu,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("defect-free images only"),
            "{}: {err}",
            entry.name
        );
    }
    Ok(())
}

#[test]
fn the_registry_names_each_method_once_with_a_parsable_default_config() -> Result<()> {
    let mut names = BTreeSet::new();
    for entry in REGISTRY {
        assert!(names.insert(entry.name), "{} registered twice", entry.name);
        assert!(!entry.summary.is_empty());
        assert!((entry.default_config)()?.is_object(), "{}", entry.name);
        assert_eq!(methods::entry(entry.name)?.name, entry.name);
    }
    assert!(methods::entry("nope")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
        .contains("nf-bmr"));
    Ok(())
}
