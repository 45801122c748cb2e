//! The station's throughput against its inference stage alone, capture-to-signal latency at 50%
//! and 90% of that rate, and memory after 1,000 vs 10,000 parts.
//!
//! `cargo bench --bench station_throughput -- MODEL CALIBRATION [parts] [memory_parts]`
//! (`memory_parts` 0 skips the memory run)
//! (the demo's `runs/demo/model.safetensors` and `runs/demo/calibration.toml` by default).
//! Frames come from memory at the model's input size, so the numbers are the pipeline's own
//! (no PNG decoding); a folder-source row shows what decoding adds.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vigil::bench::BenchArgs;
use vigil::data::synth::{self, SynthConfig};
use vigil::data::Image;
use vigil::error::Result;
use vigil::eval::score_images;
use vigil::rng::Rng;
use vigil::station::config::StationConfig;
use vigil::station::source::FrameSource;
use vigil::station::{self, Controls, Frame, Hooks};

/// `count` frames cycling through a few synthetic parts held in memory.
struct MemorySource {
    frames: Vec<Image>,
    count: u64,
    rate_hz: f64,
    produced: u64,
}

impl FrameSource for MemorySource {
    fn open(&mut self) -> Result<()> {
        Ok(())
    }
    fn grab(&mut self) -> Result<Option<(String, Frame)>> {
        if self.produced == self.count {
            return Ok(None);
        }
        let image = self.frames[(self.produced % self.frames.len() as u64) as usize].clone();
        self.produced += 1;
        Ok(Some((
            format!("mem{}", self.produced),
            Frame::Pixels(image),
        )))
    }
    fn rate_hz(&self) -> f64 {
        self.rate_hz
    }
}

fn main() -> Result<()> {
    // As `vigil run` does: without it the main thread's allocator page-faults every tensor buffer
    // in again and "inference alone" on the main thread is 2x slower than inside the pipeline.
    vigil::runtime::tune_allocator();
    let args = BenchArgs::from_env();
    let absolute = |p: &str| std::path::absolute(p).map_err(|e| vigil::Error::io(p, e));
    let model = absolute(args.get(0).unwrap_or("runs/demo/model.safetensors"))?;
    let calibration = absolute(args.get(1).unwrap_or("runs/demo/calibration.toml"))?;
    let parts = args.number(2, 300) as u64;
    let memory_parts = args.number(3, 10_000) as u64;
    let dir = tempfile::tempdir().map_err(|e| vigil::Error::io("tempdir", e))?;
    let station_file = dir.path().join("station.toml");
    let write_config = |extra: &str| -> Result<StationConfig> {
        let text = format!(
            "model = {:?}\ncalibration = {:?}\n[source]\nkind = \"folder\"\npath = {:?}\n[decision]\ndeadline_ms = 10000\n[status]\ninterval_s = 0\n{extra}",
            model.display().to_string(),
            calibration.display().to_string(),
            dir.path().join("line").display().to_string()
        );
        std::fs::write(&station_file, text).map_err(|e| vigil::Error::io(&station_file, e))?;
        StationConfig::load(&station_file)
    };
    let cfg = write_config("")?;
    let device = candle_core::Device::Cpu;
    let (meta, method) = vigil::commands::open_model(&model, &device)?;
    let spec = meta.input;
    let synth_cfg = SynthConfig {
        height: spec.height,
        width: spec.width,
        channels: spec.channels,
        ..SynthConfig::default()
    };
    let mut rng = Rng::new(3);
    let frames: Vec<Image> = (0..8)
        .map(|i| synth::product(&synth_cfg, &mut rng.fork(i), None).0)
        .collect();

    // The inference stage alone: the same call the station makes, back to back. Measured
    // before and after the pipeline runs, since the cores may be shared.
    for f in frames.iter().take(3) {
        score_images(method.as_ref(), &[f], 1, &device, false)?;
    }
    let frames_c = frames.clone();
    let inference_alone = move |method: &dyn vigil::methods::Method| -> Result<f64> {
        let start = Instant::now();
        for i in 0..parts {
            score_images(method, &[&frames_c[i as usize % 8]], 1, &device, false)?;
        }
        Ok(parts as f64 / start.elapsed().as_secs_f64())
    };
    // The station infers on a thread of its own: time the stage alone there, and on the main
    // thread for comparison.
    let on_thread = |method: Box<dyn vigil::methods::Method>| {
        let f = inference_alone.clone();
        std::thread::spawn(move || (f(method.as_ref()), method))
            .join()
            .expect("inference thread")
    };
    let main_thread_rate = inference_alone(method.as_ref())?;
    let (rate, method) = on_thread(method);
    let inference_rate = rate?;
    println!(
        "model {} ({}x{}x{}), {} parts per run, RAYON_NUM_THREADS={}",
        model.display(),
        spec.channels,
        spec.height,
        spec.width,
        parts,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    println!(
        "inference stage alone: {inference_rate:.1} parts/s on a spawned thread, \
         {main_thread_rate:.1} parts/s on the main thread"
    );

    let run = |rate_hz: f64, count: u64, hook: Option<Arc<dyn Fn(u64) + Send + Sync>>| {
        let hooks = Hooks {
            source: Some(Box::new(MemorySource {
                frames: frames.clone(),
                count,
                rate_hz,
                produced: 0,
            })),
            before_inference: hook,
            ..Hooks::default()
        };
        station::run(&cfg, &Controls::default(), hooks)
    };
    let full = run(0.0, parts, None)?;
    let pipeline_rate = full.captured as f64 / full.seconds;
    let (rate, method) = on_thread(method);
    let inference_after = rate?;
    println!(
        "pipeline, as fast as it takes parts: {pipeline_rate:.1} parts/s = {:.0}% of inference alone \
         (measured again right after: {inference_after:.1} parts/s; OK {} NG {} ERR {})",
        100.0 * pipeline_rate / inference_rate,
        full.ok,
        full.ng,
        full.err
    );
    drop(method);
    for share in [0.5, 0.9] {
        let s = run(share * inference_rate, parts, None)?;
        let (p50, p99) = s.latency_ms.unwrap_or((f64::NAN, f64::NAN));
        println!(
            "paced at {:.0}% ({:.1} parts/s): capture-to-signal p50 {p50:.1} ms, p99 {p99:.1} ms, drops {}, deadline misses {}",
            share * 100.0,
            share * inference_rate,
            s.drops,
            s.deadline_misses
        );
    }

    // Folder source: PNG decoding in the preprocessing stage.
    std::fs::create_dir_all(dir.path().join("line")).map_err(|e| vigil::Error::io("line", e))?;
    for (i, f) in frames.iter().enumerate() {
        vigil::data::image::save_png(f, &dir.path().join(format!("line/{i:03}.png")))?;
    }
    let folder_cfg = write_config("")?;
    let folder_cfg = StationConfig {
        source: vigil::station::config::SourceConfig::Folder {
            path: dir.path().join("line"),
            looped: true,
            rate_hz: 0.0,
        },
        ..folder_cfg
    };
    let controls = Controls::default();
    let stop = controls.stop.clone();
    let hooks = Hooks {
        before_inference: Some(Arc::new(move |id| {
            if id + 1 >= parts {
                stop.store(true, Ordering::Relaxed);
            }
        })),
        ..Hooks::default()
    };
    let folder = station::run(&folder_cfg, &controls, hooks)?;
    println!(
        "pipeline, folder source (PNG decode): {:.1} parts/s",
        folder.captured as f64 / folder.seconds
    );

    if memory_parts <= 1_000 {
        return Ok(());
    }
    // Memory: resident set after 1,000 parts and after `memory_parts`.
    let at_1000 = Arc::new(AtomicU64::new(0));
    let at_end = Arc::new(AtomicU64::new(0));
    let (a, b) = (at_1000.clone(), at_end.clone());
    let hook: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |id| {
        if id == 1_000 {
            a.store(vigil::bench::rss_kib(), Ordering::Relaxed);
        }
        if id + 1 == memory_parts {
            b.store(vigil::bench::rss_kib(), Ordering::Relaxed);
        }
    });
    let m = run(0.0, memory_parts, Some(hook))?;
    println!(
        "memory: RSS {} KiB after 1,000 parts, {} KiB after {} parts ({:+} KiB); {:.1} parts/s",
        at_1000.load(Ordering::Relaxed),
        at_end.load(Ordering::Relaxed),
        m.captured,
        at_end.load(Ordering::Relaxed) as i64 - at_1000.load(Ordering::Relaxed) as i64,
        m.captured as f64 / m.seconds
    );
    Ok(())
}
