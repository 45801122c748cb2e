//! NF-BMR's inference on the fast CPU kernels against its candle path, for every mapping variant,
//! before and after training steps (the fast head must follow the weights).
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use vigil::data::InputSpec;
use vigil::methods::nf_bmr::{Mapping, NfBmr, NfBmrConfig};
use vigil::methods::Method;
use vigil::rng::Rng;

mod tiny_extractor;
use tiny_extractor::TinyExtractor;

const FEATURES: usize = 7;

const INPUT: InputSpec = InputSpec {
    height: 20,
    width: 14,
    channels: 1,
};

fn random(rng: &mut Rng, dims: &[usize], scale: f32) -> Tensor {
    let n = dims.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.f32() * scale).collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

fn max_relative_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        // A NaN must fail the comparison, not vanish in `f32::max`.
        .map(|d| if d.is_nan() { f32::INFINITY } else { d })
        .fold(0.0, f32::max)
}

#[test]
fn fast_head_equals_the_candle_path() {
    let mut rng = Rng::new(21);
    for mapping in [Mapping::None, Mapping::OneByOne, Mapping::Bmr] {
        for flow_kernel in [1, 3] {
            let cfg = NfBmrConfig {
                flow_hidden: 24,
                flow_kernel,
                bmr_width: 20,
                bmr_blocks: 1,
                mapping,
                flow_lr: 1e-2,
                map_lr: 1e-2,
                smoothing_sigma: 1.0,
                ..Default::default()
            };
            let weight = random(&mut rng, &[FEATURES, 1, 3, 3], 0.6);
            let mut model = NfBmr::new(
                cfg,
                INPUT,
                Box::new(TinyExtractor { weight, gain: 3.0 }),
                HashMap::new(),
                0,
                &Device::Cpu,
            )
            .unwrap();
            let images = random(&mut rng, &[3, 1, INPUT.height, INPUT.width], 1.0);
            let features = model.encode_frozen(&images).unwrap();
            for step in 0..3 {
                let fast = model.per_position_fast(&features).unwrap();
                let reference = model.per_position_reference(&features).unwrap();
                assert_eq!(fast.dims(), &[3, 10, 7]);
                let d = max_relative_diff(&fast, &reference);
                assert!(d < 1e-4, "{mapping:?} k{flow_kernel} step {step}: {d}");
                // One image takes the other path (operations split over threads).
                let single = features.narrow(0, 1, 1).unwrap();
                let fast_one = model.per_position_fast(&single).unwrap();
                let d = max_relative_diff(&fast_one, &reference.narrow(0, 1, 1).unwrap());
                assert!(
                    d < 1e-4,
                    "{mapping:?} k{flow_kernel} step {step}, batch 1: {d}"
                );
                // Training changes the weights and statistics: the fast head must follow.
                for phase in 0..model.phases().len() {
                    model.train_on_features(phase, &features).unwrap();
                }
            }
            // `infer` (what score, eval and bench call) takes the fast path on the CPU.
            let inference = model.infer(&images).unwrap();
            assert_eq!(inference.maps.dims(), &[3, INPUT.height, INPUT.width]);
            assert!(model
                .per_position_fast(&features.narrow(1, 0, FEATURES - 1).unwrap())
                .is_err());
        }
    }
}
