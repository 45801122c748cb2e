//! Times OCR-GAN's `train_step` and `infer` (ms per image) for a generator width and input size.
//! `cargo bench --bench ocr_gan -- [width height width_px batch levels disc_width disc_levels train_steps]`
//! (defaults: the light 4-channel generator at 256², batch 8, 3 timed training steps; 0 skips them).
use std::time::Instant;

use candle_core::{Device, Tensor};
use vigil::bench::BenchArgs;
use vigil::data::{Image, InputSpec};
use vigil::methods::ocr_gan::{OcrGan, OcrGanConfig};
use vigil::methods::Method;
use vigil::rng::Rng;

fn main() -> vigil::Result<()> {
    vigil::runtime::tune_allocator();
    let args = BenchArgs::from_env();
    let cfg = OcrGanConfig {
        width: args.number(0, 4),
        levels: args.number(4, 5),
        disc_width: args.number(5, 16),
        disc_levels: args.number(6, 4),
        ..Default::default()
    };
    let (h, w, b) = (args.number(1, 256), args.number(2, 256), args.number(3, 8));
    let input = InputSpec {
        height: h,
        width: w,
        channels: 3,
    };
    let device = Device::Cpu;
    let mut model = OcrGan::new(cfg.clone(), input, Err(0), &device)?;
    let images = Tensor::rand(0f32, 1.0, (b, 3, h, w), &device)?;
    let values = images.flatten_all()?.to_vec1::<f32>()?;
    let batch: Vec<Image> = values
        .chunks(3 * h * w)
        .map(|data| Image {
            channels: 3,
            height: h,
            width: w,
            data: data.to_vec(),
        })
        .collect();
    println!(
        "ocr-gan width {} levels {} disc {}x{} at 3x{h}x{w}:",
        cfg.width, cfg.levels, cfg.disc_width, cfg.disc_levels
    );
    let train_steps = args.number(7, 3);
    if train_steps > 0 {
        let mut rng = Rng::new(0);
        model.train_on_images(&batch, &mut rng)?;
        let start = Instant::now();
        for _ in 0..train_steps {
            model.train_on_images(&batch, &mut rng)?;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / (train_steps * b) as f64;
        println!("  train_step batch {b}: {ms:.1} ms/image");
    }
    let steps = 3;
    for batch in [1, b] {
        let x = images.narrow(0, 0, batch)?;
        model.infer(&x)?;
        let start = Instant::now();
        for _ in 0..steps {
            model.infer(&x)?;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / (steps * batch) as f64;
        println!("  infer batch {batch}: {ms:.1} ms/image");
    }
    Ok(())
}
