//! The `vigil` command line: parses arguments and calls the library.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use vigil::commands::{self, RunOptions};
use vigil::data::dataset::DataSource;
use vigil::data::synth::SynthConfig;
use vigil::device::DeviceChoice;

/// `vigil demo`'s NF-BMR hyper-parameters when `--method-config` is not given.
const DEMO_METHOD_CONFIG: &str = include_str!("../configs/nf-bmr-demo.toml");

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "Unsupervised visual defect detection for production lines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Write a deterministic synthetic product dataset (MVTec AD layout).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 128)]
        height: usize,
        #[arg(long, default_value_t = 128)]
        width: usize,
        #[arg(long, default_value_t = 60)]
        train_good: usize,
        #[arg(long, default_value_t = 20)]
        test_good: usize,
        #[arg(long, default_value_t = 10)]
        test_per_defect: usize,
    },
    /// Train a detector on defect-free images.
    Train {
        #[arg(long, default_value = "nf-bmr")]
        method: String,
        #[command(flatten)]
        data: DataArgs,
        /// Model file to write (.safetensors).
        #[arg(long)]
        out: PathBuf,
        /// TOML file of method hyper-parameters.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one hyper-parameter, e.g. `--set flow_epochs=5` (repeatable).
        #[arg(long = "set")]
        set: Vec<String>,
        /// Model input height (default: from the data).
        #[arg(long)]
        height: Option<usize>,
        /// Model input width (default: from the data).
        #[arg(long)]
        width: Option<usize>,
        /// Share of defect-free training images kept out for score statistics.
        #[arg(long, default_value_t = 0.1)]
        validation_fraction: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Backbone weights (installed by models/get-weights.sh).
        #[arg(long, default_value = commands::DEFAULT_BACKBONE)]
        backbone: PathBuf,
        /// Checkpoint written after every epoch (default: the model path with `.ckpt`).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Continue a stopped training from its checkpoint (same data, method, config and seed).
        #[arg(long)]
        resume: bool,
        /// Also train on K defective test images of each defect type (MVTec layout, methods that
        /// learn from defects). They are recorded in the model file and left out of every
        /// `vigil eval` of it. With plain folders, `--defect DIR --masks DIR` train on all of DIR.
        #[arg(long, value_name = "K")]
        few_shot: Option<usize>,
        /// Train on only N of the defect-free images (a seeded choice): how a product with fewer
        /// images would train.
        #[arg(long, value_name = "N")]
        train_limit: Option<usize>,
        /// Stop after N epochs (all phases counted), keeping the checkpoint; `--resume` goes on.
        #[arg(long, value_name = "N")]
        stop_after_epochs: Option<usize>,
        /// Research diagnostic: score the test split of DATA (MVTec layout) after every epoch and
        /// write the table beside the model (NAME.test-each-epoch.md/.json). It uses TEST LABELS
        /// and never selects the epoch kept or calibrates; its maximum is the protocol of
        /// GANomaly-family papers (best epoch by test AUROC), which a line cannot use.
        #[arg(long, value_name = "DATA")]
        eval_each_epoch: Option<PathBuf>,
        #[command(flatten)]
        paths: Box<MethodPaths>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Choose among trained candidates of one product without test labels: each scores the
    /// defect-free validation images its training kept out and synthetic anomalies of them, of
    /// the kinds no candidate learned; the best separation wins (a tie: the earlier candidate).
    Select {
        /// The candidates' model files, trained on the same data with the same seed and input.
        #[arg(required = true)]
        models: Vec<PathBuf>,
        #[command(flatten)]
        data: DataArgs,
        /// The validation share the candidates were trained with.
        #[arg(long, default_value_t = 0.1)]
        validation_fraction: f32,
        /// The training limit the candidates were trained with.
        #[arg(long, value_name = "N")]
        train_limit: Option<usize>,
        /// Synthetic anomalies drawn from every validation image.
        #[arg(long, default_value_t = 4)]
        draws: usize,
        /// Copy the chosen model file here.
        #[arg(long)]
        keep: Option<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// List the detection methods.
    Methods,
    /// Measure a model on labelled test images and write a report.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        /// Report directory.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Set the reject threshold from defect-free (and optionally defective) images.
    Calibrate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        good: PathBuf,
        #[arg(long)]
        defect: Option<PathBuf>,
        /// Target false-reject rate of defect-free parts.
        #[arg(long, default_value_t = 0.005)]
        target_frr: f64,
        /// Calibration file to write (default: calibration/<model stem>.toml).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Score images and print a verdict per image.
    Score {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        calibration: Option<PathBuf>,
        /// Write a heatmap overlay per image into this directory.
        #[arg(long)]
        heatmap: Option<PathBuf>,
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Pretrained backbone weights.
    Weights {
        #[command(subcommand)]
        command: WeightsCommand,
    },
    /// Time a model's inference, split into its stages.
    Bench {
        #[arg(long)]
        model: PathBuf,
        /// Batch sizes to time.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batch: Vec<usize>,
        /// Timed iterations per batch size (after warm-up).
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
    },
    /// Run the inspection station (capture → infer → verdict → PLC) until SIGTERM.
    Run {
        /// Station file (see systemd/station.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Teach mode: store parts from the station's source as training images.
    Capture {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        count: usize,
    },
    /// Teach a product at the line: capture defect-free parts from the station's source and
    /// trigger, build the detector (memory bank), calibrate it, and install model and calibration
    /// at the station file's paths (a running station swaps them in).
    Teach {
        /// Station file (its source, trigger, model and calibration paths).
        #[arg(long)]
        config: PathBuf,
        /// Defect-free parts to capture.
        #[arg(long)]
        count: usize,
        /// Share of the parts kept out of training to calibrate on.
        #[arg(long, default_value_t = 0.25)]
        calibration_share: f64,
        /// Target false-reject rate (default: the station's current calibration's, else 0.005).
        #[arg(long)]
        target_frr: Option<f64>,
        #[arg(long, default_value = "memory-bank")]
        method: String,
        /// TOML file of method hyper-parameters.
        #[arg(long)]
        method_config: Option<PathBuf>,
        /// Override one hyper-parameter, e.g. `--set bank_ratio=0.02` (repeatable).
        #[arg(long = "set")]
        set: Vec<String>,
        /// Model input height (default: the station's current model's, else from the parts).
        #[arg(long)]
        height: Option<usize>,
        /// Model input width (default: the station's current model's, else from the parts).
        #[arg(long)]
        width: Option<usize>,
        /// Teach folder for the parts, the model and the replaced pair (default: teach-<time>
        /// beside the station's model).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Backbone weights (installed by models/get-weights.sh).
        #[arg(long, default_value = commands::DEFAULT_BACKBONE)]
        backbone: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        run: RunArgs,
    },
    /// The demo: synthetic product → train → calibrate → station with its serial signal on a
    /// pseudo-terminal pair, printing each line the PLC receives.
    Demo {
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// NF-BMR hyper-parameters (default: configs/nf-bmr-demo.toml, built into vigil).
        #[arg(long)]
        method_config: Option<PathBuf>,
        /// Backbone weights (installed by models/get-weights.sh).
        #[arg(long, default_value = commands::DEFAULT_BACKBONE)]
        backbone: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Parts per second on the line (0 = as fast as the station goes).
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
    },
}

#[derive(Subcommand)]
enum WeightsCommand {
    /// Convert the legacy PyTorch EfficientNet-Lite0 checkpoint to safetensors.
    Import { src: PathBuf, dst: PathBuf },
}

/// A dataset: `--data DIR` (MVTec AD layout) or `--good DIR [--defect DIR] [--masks DIR]`.
#[derive(Args)]
struct DataArgs {
    /// Dataset root in the MVTec AD layout.
    #[arg(long, conflicts_with_all = ["good", "defect", "masks"])]
    data: Option<PathBuf>,
    /// Folder of defect-free images (plain form).
    #[arg(long)]
    good: Option<PathBuf>,
    /// Folder of defective images (plain form).
    #[arg(long, requires = "good")]
    defect: Option<PathBuf>,
    /// Folder of masks named <stem>_mask.png or <stem>.png (plain form).
    #[arg(long, requires = "good")]
    masks: Option<PathBuf>,
}

impl DataArgs {
    fn source(self) -> anyhow::Result<DataSource> {
        match (self.data, self.good) {
            (Some(root), None) => Ok(DataSource::Mvtec { root }),
            (None, Some(good)) => Ok(DataSource::Plain {
                good,
                defect: self.defect,
                masks: self.masks,
            }),
            _ => bail!("give a dataset: --data DIR, or --good DIR [--defect DIR] [--masks DIR]"),
        }
    }
}

/// Training inputs of the methods that take them (`vigil methods` lists which).
#[derive(Args)]
struct MethodPaths {
    /// NDP-Net: a folder of images (e.g. a texture set) pasted into the training images as
    /// artificial defects (default: procedural textures and the training images themselves).
    #[arg(long, value_name = "DIR")]
    anomaly_source: Option<PathBuf>,
    /// NDP-Net: the defect-free reference image whose features repair the input's (default: the
    /// training image closest to the mean of all); stored in the model file.
    #[arg(long, value_name = "IMAGE")]
    reference: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// cpu or cuda (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Skip unreadable image files (they are counted and listed) instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

impl From<RunArgs> for RunOptions {
    fn from(a: RunArgs) -> Self {
        RunOptions {
            device: a.device,
            batch_size: a.batch_size,
            skip_bad: a.skip_bad,
            progress: !a.quiet,
        }
    }
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.4}"))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Synth {
            out,
            seed,
            height,
            width,
            train_good,
            test_good,
            test_per_defect,
        } => {
            let cfg = SynthConfig {
                height,
                width,
                channels: 1,
                train_good,
                test_good,
                test_per_defect,
                seed,
            };
            let summary = vigil::data::synth::generate(&out, &cfg)
                .with_context(|| format!("writing synthetic data to {}", out.display()))?;
            println!("wrote {} files to {}", summary.files, out.display());
        }
        Command::Train {
            method,
            data,
            out,
            config,
            set,
            height,
            width,
            validation_fraction,
            seed,
            backbone,
            checkpoint,
            resume,
            few_shot,
            train_limit,
            stop_after_epochs,
            eval_each_epoch,
            paths,
            run,
        } => {
            let mut set = set;
            let MethodPaths {
                anomaly_source,
                reference,
            } = *paths;
            for (key, path) in [("anomaly_source", anomaly_source), ("reference", reference)] {
                if let Some(path) = path {
                    set.push(commands::path_setting(&method, key, &path)?);
                }
            }
            let args = commands::TrainArgs {
                method,
                data: data.source()?,
                out,
                config,
                set,
                height,
                width,
                validation_fraction,
                seed,
                backbone,
                checkpoint,
                resume,
                few_shot,
                train_limit,
                stop_after_epochs,
                run: run.into(),
            };
            let s = match &eval_each_epoch {
                Some(data) => commands::train_testing_each_epoch(&args, data),
                None => commands::train(&args),
            }
            .context("training failed")?;
            let Some(model) = &s.model else {
                println!(
                    "paused after {} epochs in {:.1} s; continue with the same command and --resume",
                    stop_after_epochs.unwrap_or_default(),
                    s.seconds
                );
                return Ok(ExitCode::SUCCESS);
            };
            println!(
                "wrote {} ({} training images, {} defective, {} skipped) in {:.1} s; validation scores: n {} mean {:.4} std {:.4} max {:.4}",
                model.display(),
                s.train_images,
                s.defect_images,
                s.skipped,
                s.seconds,
                s.validation.count,
                s.validation.mean,
                s.validation.std,
                s.validation.max
            );
            if let Some(d) = &s.test_each_epoch {
                let pixel = |e: &vigil::train::each_epoch::EpochAuroc| fmt(e.pixel_auroc);
                println!(
                    "TEST-LABEL DIAGNOSTIC (--eval-each-epoch: {}), phase `{}`, {} epochs, {} \
                     test images:\n  image AUROC max {:.4} (epoch {}, the paper's protocol), \
                     median {:.4}, last {:.4} (epoch {})\n  epoch kept by vigil's selection: {} \
                     (image AUROC {:.4})\n  pixel AUROC max-epoch {}, median {}, last {}, kept {}\n  \
                     table: {} ({:.1} s, not counted in the training time)",
                    vigil::train::each_epoch::TEST_LABELS_NOTICE,
                    d.phase,
                    d.epochs,
                    d.images,
                    d.max.image_auroc,
                    d.max.epoch,
                    d.median_image_auroc,
                    d.last.image_auroc,
                    d.last.epoch,
                    d.kept.epoch,
                    d.kept.image_auroc,
                    pixel(&d.max),
                    fmt(d.median_pixel_auroc),
                    pixel(&d.last),
                    pixel(&d.kept),
                    d.table.display(),
                    d.seconds
                );
            }
        }
        Command::Select {
            models,
            data,
            validation_fraction,
            train_limit,
            draws,
            keep,
            run,
        } => {
            let args = commands::select::SelectArgs {
                models,
                data: data.source()?,
                validation_fraction,
                train_limit,
                draws,
                keep,
                run: run.into(),
            };
            let r = commands::select::select(&args).context("selection failed")?;
            println!(
                "{} defect-free validation images and {} synthetic anomalies of them ({}); no test image read",
                r.validation_images,
                r.anomalies,
                r.kinds.join(", ")
            );
            for (i, c) in r.candidates.iter().enumerate() {
                let learned = if c.learned.is_empty() {
                    "none".to_string()
                } else {
                    c.learned.join(", ")
                };
                println!(
                    "{} separation {:.4}  {} ({}, learned: {learned})",
                    if i == r.chosen { "*" } else { " " },
                    c.separation,
                    c.model.display(),
                    c.method
                );
            }
            let chosen = &r.candidates[r.chosen].model;
            match &args.keep {
                Some(keep) => println!("chosen: {} -> {}", chosen.display(), keep.display()),
                None => println!("chosen: {}", chosen.display()),
            }
        }
        Command::Methods => {
            for m in commands::methods() {
                let mut traits = vec![format!("version {}", m.version)];
                if m.uses_backbone {
                    traits.push("pretrained Lite0 backbone".into());
                }
                if m.learns_from_defects {
                    traits.push("learns from defects (--few-shot, --defect/--masks)".into());
                }
                println!(
                    "{:<8} {}\n         ({})",
                    m.name,
                    m.summary,
                    traits.join("; ")
                );
            }
        }
        Command::Eval {
            model,
            data,
            out,
            run,
        } => {
            let args = commands::EvalArgs {
                model,
                data: data.source()?,
                out,
                run: run.into(),
            };
            let r = commands::eval(&args).context("evaluation failed")?;
            println!(
                "image AUROC {}  pixel AUROC {}  pixel AP {}  AUPRO {}  F1-max {}  {:.1} images/s  ({} images, {} skipped) -> {}",
                fmt(r.metrics.image_auroc),
                fmt(r.metrics.pixel_auroc),
                fmt(r.metrics.pixel_ap),
                fmt(r.metrics.aupro),
                fmt(r.metrics.image_f1_max),
                r.images_per_second,
                r.images,
                r.skipped.len(),
                args.out.display()
            );
        }
        Command::Calibrate {
            model,
            good,
            defect,
            target_frr,
            out,
            run,
        } => {
            let args = commands::CalibrateArgs {
                model,
                good,
                defect,
                target_frr,
                out,
                run: run.into(),
            };
            let (path, c) = commands::calibrate(&args).context("calibration failed")?;
            println!(
                "threshold {:.6} for target false-reject rate {} on {} defect-free images: {} rejected \
                 (observed {:.4}, {:.0}% upper bound {:.4}); {} defect-free images would show the target with zero rejects",
                c.threshold,
                c.target_frr,
                c.counts.good,
                c.counts.good_rejected,
                c.false_reject.observed,
                c.confidence * 100.0,
                c.false_reject.upper_bound,
                c.images_needed
            );
            if let Some(e) = c.escape {
                println!(
                    "defects: {} of {} escaped (rate {:.4}, upper bound {:.4})",
                    c.counts.defect_escaped, c.counts.defect, e.observed, e.upper_bound
                );
            }
            if let Some(f) = c.f1_optimal {
                println!(
                    "F1-optimal threshold {:.6}: F1 {:.4}, precision {:.4}, recall {:.4}",
                    f.threshold, f.f1, f.precision, f.recall
                );
            }
            println!("wrote {}", path.display());
        }
        Command::Score {
            model,
            calibration,
            heatmap,
            images,
            run,
        } => {
            let args = commands::ScoreArgs {
                model,
                calibration,
                images,
                heatmap,
                run: run.into(),
            };
            let lines = commands::score(&args).context("scoring failed")?;
            let mut failed = 0;
            for line in &lines {
                match &line.result {
                    Ok(v) => {
                        let verdict = match v.reject {
                            Some(true) => "NG",
                            Some(false) => "OK",
                            None => "-",
                        };
                        let norm = v
                            .normalized
                            .map_or(String::new(), |n| format!(" normalized {n:.3}"));
                        println!(
                            "{}\tscore {:.6}{norm}\t{verdict}",
                            line.path.display(),
                            v.score
                        );
                    }
                    Err(e) => {
                        failed += 1;
                        println!("{}\tERR\t{e}", line.path.display());
                    }
                }
            }
            if failed > 0 {
                eprintln!("{failed} of {} images could not be scored", lines.len());
                return Ok(ExitCode::from(2));
            }
        }
        Command::Weights {
            command: WeightsCommand::Import { src, dst },
        } => {
            let s = vigil::weights::import_legacy_pth(&src, &dst)
                .with_context(|| format!("importing {}", src.display()))?;
            println!(
                "wrote {}: {} tensors, {} parameters ({} step counters skipped); source sha256 {}",
                dst.display(),
                s.tensors,
                s.parameters,
                s.skipped.len(),
                s.source_sha256
            );
        }
        Command::Bench {
            model,
            batch,
            iterations,
            device,
        } => {
            let report = vigil::bench::run(&model, &batch, iterations, device)
                .context("benchmark failed")?;
            print!("{report}");
        }
        Command::Run { config } => {
            let s = commands::station::run(&config)
                .with_context(|| format!("station {}", config.display()))?;
            println!(
                "stopped: {} parts captured, OK {} NG {} ERR {} (deadline misses {}, failures {}, drops {}; reject pulses {}, late rejects {}) in {:.1} s",
                s.captured,
                s.ok,
                s.ng,
                s.err,
                s.deadline_misses,
                s.failures,
                s.drops,
                s.pulsed_rejects,
                s.late_rejects,
                s.seconds
            );
        }
        Command::Capture { config, out, count } => {
            let files =
                commands::station::capture(&config, &out, count).context("capture failed")?;
            println!("stored {} parts in {}", files.len(), out.display());
        }
        Command::Teach {
            config,
            count,
            calibration_share,
            target_frr,
            method,
            method_config,
            set,
            height,
            width,
            out,
            backbone,
            seed,
            run,
        } => {
            let args = commands::teach::TeachArgs {
                config,
                count,
                calibration_share,
                target_frr,
                method,
                method_config,
                set,
                height,
                width,
                out,
                backbone,
                seed,
                run: run.into(),
            };
            let t = commands::teach::teach(&args).context("teach failed")?;
            let c = &t.calibration;
            println!(
                "taught {} parts in {:.1} s (capture {:.1} s, build {:.1} s, calibration {:.1} s): \
                 {} training, {} validation, {} calibration images",
                t.captured,
                t.seconds.0 + t.seconds.1 + t.seconds.2,
                t.seconds.0,
                t.seconds.1,
                t.seconds.2,
                t.train_images,
                t.validation_images,
                t.calibration_images
            );
            if let Some((entries, bytes)) = t.bank {
                println!(
                    "memory bank: {entries} entries, {:.1} MiB",
                    bytes as f64 / (1u64 << 20) as f64
                );
            }
            println!(
                "threshold {:.6} for target false-reject rate {}: {} of {} calibration parts \
                 rejected (observed {:.4}, {:.0}% upper bound {:.4}); a trustworthy bound at the \
                 target needs {} defect-free parts with none rejected",
                c.threshold,
                c.target_frr,
                c.counts.good_rejected,
                c.counts.good,
                c.false_reject.observed,
                c.confidence * 100.0,
                c.false_reject.upper_bound,
                c.images_needed
            );
            println!(
                "installed {} and {}; parts, model and the replaced pair in {}",
                t.model.display(),
                t.calibration_path.display(),
                t.folder.display()
            );
        }
        Command::Demo {
            out,
            method_config,
            backbone,
            seed,
            rate,
        } => {
            // Checked first: the demo would otherwise generate its data and only then fail.
            if !backbone.is_file() {
                bail!(
                    "no backbone weights at {}: run models/get-weights.sh in the vigil checkout \
                     (it installs {}), or give --backbone PATH",
                    std::path::absolute(&backbone)
                        .unwrap_or_else(|_| backbone.clone())
                        .display(),
                    commands::DEFAULT_BACKBONE
                );
            }
            // Built in, so an installed vigil needs no checkout.
            let method_config = match method_config {
                Some(path) => path,
                None => {
                    let path = out.join("nf-bmr-demo.toml");
                    vigil::atomic::write_atomic(&path, DEMO_METHOD_CONFIG.as_bytes())?;
                    path
                }
            };
            let args = commands::station::DemoArgs {
                out,
                method_config,
                backbone,
                seed,
                rate_hz: rate,
            };
            println!("PLC side of the serial line:");
            let d = commands::station::demo(&args, |line| println!("  {line}"))
                .context("demo failed")?;
            let s = &d.station;
            println!(
                "{} parts: OK {} NG {} ERR {}; {} of {} scored verdicts match the ground truth; deadline misses {}, drops {}",
                s.captured, s.ok, s.ng, s.err, d.correct, d.scored, s.deadline_misses, s.drops
            );
            println!("status: {}", s.status);
            println!(
                "results: {0}/results.jsonl, rejected parts: {0}/audit, station file: {0}/station.toml",
                args.out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    vigil::runtime::tune_allocator();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
