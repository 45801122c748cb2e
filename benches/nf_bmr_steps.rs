//! Times NF-BMR's `train_step` (both phases) and `infer` on realistic feature sizes.
//! `cargo bench --bench nf_bmr_steps -- [channels feat_h feat_w batch flow_hidden flow_kernel bmr_width]`
//! (defaults: the paper's widths on Lite0 block-4 features of a 640×256 part).
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use vigil::bench::BenchArgs;
use vigil::data::InputSpec;
use vigil::methods::nf_bmr::{NfBmr, NfBmrConfig};
use vigil::methods::Method;
use vigil::nn::FeatureExtractor;

/// Average-pools the image to the feature grid and repeats it over the channels: cheap, so the
/// timings are NF-BMR's own.
struct PoolExtractor {
    channels: usize,
    stride: usize,
}

impl FeatureExtractor for PoolExtractor {
    fn extract(&self, images: &Tensor) -> vigil::Result<Tensor> {
        let pooled = images.avg_pool2d(self.stride)?;
        Ok(pooled.repeat((1, self.channels, 1, 1))?)
    }
    fn out_channels(&self) -> usize {
        self.channels
    }
    fn stride(&self) -> usize {
        self.stride
    }
}

fn main() -> vigil::Result<()> {
    vigil::runtime::tune_allocator();
    let args = BenchArgs::from_env();
    let (c, h, w, b) = (
        args.number(0, 40),
        args.number(1, 32),
        args.number(2, 80),
        args.number(3, 8),
    );
    let cfg = NfBmrConfig {
        flow_hidden: args.number(4, 1024),
        flow_kernel: args.number(5, 3),
        bmr_width: args.number(6, 256),
        ..Default::default()
    };
    let stride = 8;
    let input = InputSpec {
        height: h * stride,
        width: w * stride,
        channels: 1,
    };
    let device = Device::Cpu;
    let mut model = NfBmr::new(
        cfg.clone(),
        input,
        Box::new(PoolExtractor {
            channels: c,
            stride,
        }),
        HashMap::new(),
        0,
        &device,
    )?;
    let encoded = Tensor::randn(0f32, 1.0, (b, c, h, w), &device)?;
    let images = Tensor::rand(0f32, 1.0, (b, 1, input.height, input.width), &device)?
        .to_dtype(DType::F32)?;
    println!(
        "features {c}x{h}x{w}, batch {b}, flow_hidden {}, flow_kernel {}, bmr_width {}",
        cfg.flow_hidden, cfg.flow_kernel, cfg.bmr_width
    );
    for (phase, name) in [(0, "flow"), (1, "map")] {
        model.train_on_features(phase, &encoded)?;
        let reps = 3;
        let start = Instant::now();
        for _ in 0..reps {
            model.train_on_features(phase, &encoded)?;
        }
        println!(
            "train step {name}: {:.1} ms",
            start.elapsed().as_secs_f64() * 1e3 / reps as f64
        );
    }
    for batch in [b, 1] {
        let imgs = images.narrow(0, 0, batch)?;
        model.infer(&imgs)?;
        let reps = 5;
        let start = Instant::now();
        for _ in 0..reps {
            model.infer(&imgs)?;
        }
        println!(
            "infer batch {batch}: {:.1} ms",
            start.elapsed().as_secs_f64() * 1e3 / reps as f64
        );
    }
    Ok(())
}
