//! OCR-GAN (Liang et al., IEEE TIP 2023): the image is split into omni-frequency bands
//! ([`fd`]), each band is reconstructed by its own Skip-GANomaly U-Net while channel selection
//! mixes the band encoders ([`model`]), and the summed reconstruction is judged by a DCGAN
//! discriminator that also learns to call CutPaste/cutout forgeries positive. Trained from scratch:
//! no pretrained network and no extra data.
//!
//! Score: `A = λ·L_con + (1 − λ)·L_lat` per image (mean |I − Î|, or another pooling of the error,
//! and the mean squared distance of the discriminator's latent features), min-max scaled with the
//! defect-free validation scores
//! kept in the model file (the paper scales over the test set, which a running line cannot do):
//! validation parts score in 0..1, defects above. Heatmap: |I − Î| averaged over channels and
//! smoothed.
//!
//! Images enter in 0..1 and are mapped to −1..1 (the generators end in tanh).
//!
//! The authors' released code departs from the paper in places; each departure is a config key
//! (see [`config`]): its optimiser setting, per-image MSE, a projected 100-d latent with uncapped
//! discriminator widths, `L_lat` in the discriminator's loss, discriminator BatchNorm frozen after
//! the first epoch, untrained channel selection, one combined forgery and 8-bit OpenCV bands.
pub mod config;
mod fast;
pub mod fd;
pub mod forgery;
pub mod loss;
pub mod model;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

pub use config::{
    BandCoding, ChannelSelectionMode, ContentPooling, DiscriminatorNorm, Forgeries, OcrGanConfig,
};

use self::fast::FastOcrGan;
use self::fd::FrequencyDecoupling;
use self::forgery::Forger;
use self::loss::{bce_with_logits, content_error, mean_squared_error};
use self::model::{Discriminator, Generator};
use super::config_check;
use super::fast_snapshot::FastSnapshot;
use crate::data::{batch_tensor, Image, InputSpec};
use crate::error::{Error, Result};
use crate::methods::anomaly_map::{top_mean, MapResizer};
use crate::methods::{
    Inference, Method, MethodEntry, PhaseInput, PhaseSpec, Selection, Setup, StepLosses, TrainBatch,
};
use crate::model_file::stored_scalar;
use crate::nn::init::{detached, seeded_var_builder};
use crate::nn::kernels::maps::Maps;
use crate::nn::kernels::Kernels;
use crate::nn::norm::Builders;
use crate::nn::optim::{Adam, AdamParams};
use crate::nn::train_state::TrainState;
use crate::rng::Rng;

/// Raised whenever older OCR-GAN model files would load or score differently.
pub const VERSION: u32 = 1;

pub const ENTRY: MethodEntry = MethodEntry {
    name: "ocr-gan",
    summary: "omni-frequency bands, one Skip-GANomaly generator per band with channel selection, \
              a discriminator; reconstruction + latent error",
    version: VERSION,
    learns_from_defects: false,
    uses_backbone: false,
    default_config: || config_check::to_json("ocr-gan", &OcrGanConfig::default()),
    tiny_config: || {
        serde_json::json!({
            "bands": 2, "width": 2, "levels": 2, "disc_width": 2, "disc_levels": 2,
            "cs_min_hidden": 2, "epochs": 2
        })
    },
    create: |setup: &Setup, _backbone: &Path| {
        let cfg: OcrGanConfig = config_check::parse("ocr-gan", setup.config.clone())?;
        Ok(Box::new(OcrGan::new(
            cfg,
            setup.input,
            Err(setup.seed),
            setup.device,
        )?))
    },
    load: |setup: &Setup, tensors: &HashMap<String, Tensor>| {
        let cfg: OcrGanConfig = config_check::parse("ocr-gan", setup.config.clone())?;
        Ok(Box::new(OcrGan::new(
            cfg,
            setup.input,
            Ok(tensors),
            setup.device,
        )?))
    },
};

const SCORE_MIN: &str = "score.min";
const SCORE_MAX: &str = "score.max";
const G_GROUP: &str = "g";
const D_GROUP: &str = "d";

struct Nets {
    generator: Generator,
    discriminator: Discriminator,
}

impl Nets {
    fn new(
        g: VarBuilder,
        d: VarBuilder,
        buffers: VarBuilder,
        cfg: &OcrGanConfig,
        input: InputSpec,
    ) -> Result<Self> {
        Ok(Nets {
            generator: Generator::new(
                Builders {
                    params: g.pp("g"),
                    buffers: buffers.pp("g"),
                },
                cfg,
                input.channels,
            )?,
            discriminator: Discriminator::new(
                Builders {
                    params: d.pp("d"),
                    buffers: buffers.pp("d"),
                },
                cfg,
                input.channels,
                (input.height, input.width),
            )?,
        })
    }
}

/// The discriminator's latent features and logits of one step's images.
struct Judged {
    f_x: Tensor,
    logits_x: Tensor,
    f_r: Tensor,
    logits_r: Tensor,
    logits_f: Option<Tensor>,
}

/// One batch's losses, as scalar tensors that record the backward graph.
pub struct Losses {
    /// `λ_con·L_con + λ_adv·L_adv + λ_lat·L_lat`, minimised by the generators.
    pub generator: Tensor,
    /// Cross-entropy of normal images (negative) against reconstructions and forgeries
    /// (positive), minimised by the discriminator (plus `λ_lat·L_lat` with `disc_latent_loss`).
    pub discriminator: Tensor,
    pub content: Tensor,
    pub adversarial: Tensor,
    pub latent: Tensor,
}

pub struct OcrGan {
    cfg: OcrGanConfig,
    input: InputSpec,
    fd: FrequencyDecoupling,
    /// Generators (group "g") and discriminator (group "d") with their Adam optimisers, and the
    /// BatchNorm running statistics (buffers: saved and loaded, never optimised).
    state: TrainState,
    train: Nets,
    /// The same storage through detached views: inference records no backward graph.
    eval: Nets,
    /// `eval` on the fast CPU kernels, built on first use after the weights changed (CPU only).
    fast: FastSnapshot<FastOcrGan>,
    forger: Forger,
    /// Raw scores of the validation images that map to 0 and 1.
    score_min: f32,
    score_max: f32,
    smoother: MapResizer,
    device: Device,
}

impl OcrGan {
    /// The detector a model file's tensors hold (`Ok`), or a fresh one initialised from a seed
    /// (`Err`).
    pub fn new(
        cfg: OcrGanConfig,
        input: InputSpec,
        weights: std::result::Result<&HashMap<String, Tensor>, u64>,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let factor = cfg.size_factor();
        if !(input.height.is_multiple_of(factor) && input.width.is_multiple_of(factor)) {
            return Err(Error::invalid(
                "input size",
                format!(
                    "{}x{}: OCR-GAN halves it {} times (levels, disc_levels, bands), so both \
                     sides must divide by {factor}; pass --height/--width",
                    input.height,
                    input.width,
                    factor.trailing_zeros()
                ),
            ));
        }
        let (g_vars, d_vars, buffers) = (VarMap::new(), VarMap::new(), VarMap::new());
        // Loaded weights replace the initial values, so any seed will do there.
        let seed = weights.err().unwrap_or(0);
        let seeded = |vars: &VarMap| seeded_var_builder(vars, seed, DType::F32, device);
        let train = Nets::new(
            seeded(&g_vars),
            seeded(&d_vars),
            seeded(&buffers),
            &cfg,
            input,
        )?;
        let adam = AdamParams {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        };
        let state = TrainState::new()
            .with_group(G_GROUP, g_vars.clone(), Adam::new(&g_vars, adam)?)
            .with_group(D_GROUP, d_vars.clone(), Adam::new(&d_vars, adam)?)
            .with_buffers(buffers.clone());
        let (mut score_min, mut score_max) = (0.0, 1.0);
        if let Ok(stored) = weights {
            state.load(stored)?;
            (score_min, score_max) = (
                stored_scalar(stored, SCORE_MIN)?,
                stored_scalar(stored, SCORE_MAX)?,
            );
        }
        let view = |vars: &VarMap| -> Result<VarBuilder<'static>> {
            Ok(VarBuilder::from_tensors(
                detached(vars)?,
                DType::F32,
                device,
            ))
        };
        let eval = Nets::new(view(&g_vars)?, view(&d_vars)?, view(&buffers)?, &cfg, input)?;
        Ok(OcrGan {
            forger: Forger::new(&cfg)?,
            fd: FrequencyDecoupling::new(cfg.bands, device)?,
            smoother: MapResizer::new(
                (input.height, input.width),
                (input.height, input.width),
                cfg.smoothing_sigma,
                device,
            )?,
            cfg,
            input,
            state,
            train,
            eval,
            fast: FastSnapshot::default(),
            score_min,
            score_max,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &OcrGanConfig {
        &self.cfg
    }

    /// One optimisation step on defect-free `images` (what the training loop does with each
    /// batch); returns the logged losses.
    pub fn train_on_images(
        &mut self,
        images: &[Image],
        rng: &mut Rng,
    ) -> Result<Vec<(&'static str, f32)>> {
        let batch = TrainBatch {
            phase: 0,
            epoch: 0,
            good: images.iter().collect(),
            features: None,
            defects: &[],
        };
        super::step(self, &batch, rng)
    }

    /// The generators and the discriminator on the trainable variables (for gradient tests).
    pub fn trainable(&self) -> (&Generator, &Discriminator) {
        (&self.train.generator, &self.train.discriminator)
    }

    /// Every trainable variable, generator then discriminator.
    pub fn trainable_vars(&self) -> Result<Vec<(String, candle_core::Var)>> {
        let mut all = self.state.group_vars(G_GROUP)?;
        all.extend(self.state.group_vars(D_GROUP)?);
        Ok(all)
    }

    /// The omni-frequency bands of `[B, C, H, W]` images in 0..1, in the generators' −1..1 range.
    pub fn bands(&self, images: &Tensor) -> Result<Vec<Tensor>> {
        Ok(self.decouple(images)?.0)
    }

    /// The bands of `[B, C, H, W]` images in 0..1 and the target the generators' summed output
    /// reconstructs (the image in −1..1, or the sum of the authors' coded bands).
    fn decouple(&self, images: &Tensor) -> Result<(Vec<Tensor>, Tensor)> {
        match self.cfg.band_coding {
            BandCoding::Exact => {
                let x = to_signed(images)?;
                Ok((self.fd.split(&x)?, x))
            }
            BandCoding::Opencv => {
                let bands = self.fd.split_opencv(images)?;
                let target = sum(&bands)?;
                Ok((bands, target))
            }
        }
    }

    /// The forgeries of the batch's images as the config says, `[B·k, C, H, W]` in −1..1.
    fn forge(&self, images: &[&Image], rng: &mut Rng) -> Result<Option<Tensor>> {
        let forged = self.forger.forge(images, rng)?;
        if forged.is_empty() {
            return Ok(None);
        }
        let refs: Vec<&Image> = forged.iter().collect();
        Ok(Some(to_signed(&batch_tensor(&refs, &self.device)?)?))
    }

    /// The discriminator's view of `x`, `recon` and the forgeries normalised together: one
    /// batch, so one set of BatchNorm statistics (or the running ones, `train` false).
    fn judge_jointly(
        &self,
        x: &Tensor,
        recon: &Tensor,
        forged: Option<&Tensor>,
        train: bool,
    ) -> Result<Judged> {
        let n = x.dim(0)?;
        let mut parts = vec![x, recon];
        parts.extend(forged);
        let (f, logits) = self
            .train
            .discriminator
            .forward(&Tensor::cat(&parts, 0)?, train)?;
        let total = logits.dim(0)?;
        Ok(Judged {
            f_x: f.narrow(0, 0, n)?,
            logits_x: logits.narrow(0, 0, n)?,
            f_r: f.narrow(0, n, n)?,
            logits_r: logits.narrow(0, n, n)?,
            logits_f: if total > 2 * n {
                Some(logits.narrow(0, 2 * n, total - 2 * n)?)
            } else {
                None
            },
        })
    }

    /// The training losses of one batch on the current parameters (eqs. 9–12), in `epoch`
    /// (0-based) of the training. Both are computed before either network steps, as
    /// Skip-GANomaly does: the discriminator judges the reconstructions made before the
    /// generators' update.
    pub fn losses(&self, good: &[&Image], epoch: usize, rng: &mut Rng) -> Result<Losses> {
        let images = &batch_tensor(good, &self.device)?;
        self.input.check_batch(images)?;
        // Training-mode BatchNorm updates the running statistics.
        self.fast.drop_snapshot();
        let cfg = &self.cfg;
        let (bands, x) = self.decouple(images)?;
        let recon = sum(&self.train.generator.forward(&bands, true)?)?;
        let train_d = !(cfg.disc_norm == DiscriminatorNorm::Frozen && epoch >= 1);
        let joint = cfg.disc_norm == DiscriminatorNorm::Joint;
        let (generator_view, discriminator_view) = if joint {
            // Two passes over the same batch: the discriminator's with the reconstructions
            // detached, so its loss does not backpropagate through the generators.
            let forged = self.forge(good, rng)?;
            (
                self.judge_jointly(&x, &recon, forged.as_ref(), train_d)?,
                self.judge_jointly(&x, &recon.detach(), forged.as_ref(), train_d)?,
            )
        } else {
            // One pass per kind of image; the discriminator's loss reuses the real images' pass
            // and judges the reconstructions detached.
            let d = &self.train.discriminator;
            let (f_x, logits_x) = d.forward(&x, train_d)?;
            let (f_r, logits_r) = d.forward(&recon, train_d)?;
            let (f_rd, logits_rd) = d.forward(&recon.detach(), train_d)?;
            let logits_f = match self.forge(good, rng)? {
                Some(forged) => Some(d.forward(&forged, train_d)?.1),
                None => None,
            };
            (
                Judged {
                    f_x: f_x.clone(),
                    logits_x: logits_x.clone(),
                    f_r,
                    logits_r,
                    logits_f: None,
                },
                Judged {
                    f_x,
                    logits_x,
                    f_r: f_rd,
                    logits_r: logits_rd,
                    logits_f,
                },
            )
        };
        // The generators want their reconstructions judged normal (label 0).
        let content = content_error(&x, &recon)?.mean_all()?;
        let adversarial = bce_with_logits(&generator_view.logits_r, 0.0)?;
        let latent =
            mean_squared_error(&generator_view.f_x.detach(), &generator_view.f_r)?.mean_all()?;
        let generator = (((&content * cfg.lambda_con)? + (&adversarial * cfg.lambda_adv)?)?
            + (&latent * cfg.lambda_lat)?)?;
        let Judged {
            f_x,
            logits_x,
            f_r,
            logits_r,
            logits_f,
        } = discriminator_view;
        let mut discriminator =
            (bce_with_logits(&logits_x, 0.0)? + bce_with_logits(&logits_r, 1.0)?)?;
        if let Some(logits_f) = logits_f {
            discriminator = (discriminator + bce_with_logits(&logits_f, 1.0)?)?;
        }
        if cfg.disc_latent_loss {
            let latent_d = mean_squared_error(&f_x, &f_r)?.mean_all()?;
            discriminator = (discriminator + (latent_d * cfg.lambda_lat)?)?;
        }
        Ok(Losses {
            generator,
            discriminator,
            content,
            adversarial,
            latent,
        })
    }

    /// The networks on the fast CPU kernels for the current weights (built on first use after a
    /// change), or `None` off the CPU.
    fn fast_nets(&self) -> Result<Option<Arc<FastOcrGan>>> {
        if !self.device.is_cpu() {
            return Ok(None);
        }
        let nets = self.fast.get_or_build(|| {
            Ok(FastOcrGan {
                generator: self.eval.generator.fast()?,
                discriminator: self.eval.discriminator.fast()?,
                kernels: Kernels::detect(),
            })
        })?;
        Ok(Some(nets))
    }

    /// Raw `A = λ·L_con + (1 − λ)·L_lat` and the smoothed heatmap `[B, H, W]`.
    fn raw_scores(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        self.scores_on(images, self.fast_nets()?.as_deref())
    }

    /// [`OcrGan::raw_scores`] on the fast networks, or on candle's ops without them.
    fn scores_on(&self, images: &Tensor, fast: Option<&FastOcrGan>) -> Result<(Tensor, Tensor)> {
        self.input.check_batch(images)?;
        let (bands, x) = self.decouple(images)?;
        let (recon, f_x, f_r) = match fast {
            Some(fast) => {
                let recon = fast.generator.reconstruct(fast.kernels, &bands)?;
                let d = &fast.discriminator;
                let f_x = d.latent(fast.kernels, &Maps::from_nchw(&x)?, &self.device)?;
                let f_r = d.latent(fast.kernels, &recon, &self.device)?;
                (recon.to_nchw(&self.device)?, f_x, f_r)
            }
            None => {
                let recon = sum(&self.eval.generator.forward(&bands, false)?)?;
                let d = &self.eval.discriminator;
                let (f_x, _) = d.forward(&x, false)?;
                let (f_r, _) = d.forward(&recon, false)?;
                (recon, f_x, f_r)
            }
        };
        let maps = self.smoother.resize(&(&x - &recon)?.abs()?.mean(1)?)?;
        let content = match self.cfg.content_pooling {
            ContentPooling::Mean => content_error(&x, &recon)?,
            ContentPooling::Mse => mean_squared_error(&x, &recon)?,
            ContentPooling::Max => maps.flatten_from(1)?.max(1)?,
            ContentPooling::Top => top_mean(&maps, self.cfg.top_fraction)?,
        };
        let lambda = self.cfg.score_lambda;
        let a = ((content * lambda)? + (mean_squared_error(&f_x, &f_r)? * (1.0 - lambda))?)?;
        Ok((a, maps))
    }
}

impl OcrGan {
    /// Raw scores min-max scaled with the validation range.
    fn scaled(&self, raw: Tensor, maps: Tensor) -> Result<Inference> {
        let range = (self.score_max - self.score_min).max(f32::EPSILON) as f64;
        let scores = ((raw - self.score_min as f64)? / range)?;
        Ok(Inference { maps, scores })
    }
}

fn to_signed(images: &Tensor) -> Result<Tensor> {
    Ok(((images * 2.0)? - 1.0)?)
}

fn sum(tensors: &[Tensor]) -> Result<Tensor> {
    let mut total = tensors
        .first()
        .ok_or_else(|| Error::invalid("reconstruction", "no bands"))?
        .clone();
    for t in &tensors[1..] {
        total = (total + t)?;
    }
    Ok(total)
}

impl Method for OcrGan {
    fn name(&self) -> &'static str {
        ENTRY.name
    }

    fn phases(&self) -> Vec<PhaseSpec> {
        let trained_on = self.cfg.forgeries.kinds();
        vec![PhaseSpec {
            name: "gan",
            input: PhaseInput::Images,
            epochs: self.cfg.epochs,
            min_steps: self.cfg.min_steps,
            batch: None,
            selection: Selection::Separation { trained_on },
        }]
    }

    /// Both losses are computed before either network steps, as Skip-GANomaly does (the
    /// discriminator judges the reconstructions made before the generators' update).
    fn step_losses(&mut self, batch: &TrainBatch, rng: &mut Rng) -> Result<StepLosses> {
        if batch.phase != 0 {
            return Err(Error::invalid(
                "training phase",
                format!("{}; OCR-GAN has one phase", batch.phase),
            ));
        }
        let losses = self.losses(&batch.good, batch.epoch, rng)?;
        Ok(StepLosses {
            logged: vec![
                ("con", losses.content),
                ("adv", losses.adversarial),
                ("lat", losses.latent),
                ("d", losses.discriminator.clone()),
            ],
            objectives: vec![(G_GROUP, losses.generator), (D_GROUP, losses.discriminator)],
        })
    }

    fn train_state(&self) -> &TrainState {
        &self.state
    }

    fn train_state_mut(&mut self) -> &mut TrainState {
        &mut self.state
    }

    fn weights_changed(&mut self) {
        self.fast.drop_snapshot();
    }

    fn infer(&self, images: &Tensor) -> Result<Inference> {
        let (raw, maps) = self.raw_scores(images)?;
        self.scaled(raw, maps)
    }

    fn infer_reference(&self, images: &Tensor) -> Result<Inference> {
        let (raw, maps) = self.scores_on(images, None)?;
        self.scaled(raw, maps)
    }

    fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = self.state.tensors()?;
        out.insert(
            SCORE_MIN.into(),
            Tensor::new(&[self.score_min], &self.device)?,
        );
        out.insert(
            SCORE_MAX.into(),
            Tensor::new(&[self.score_max], &self.device)?,
        );
        Ok(out)
    }

    /// `validation_scores` are scaled with the current range; recover the raw ones, then map their
    /// minimum to 0 and maximum to 1.
    fn fit_score_scale(&mut self, validation_scores: &[f32]) -> Result<()> {
        let range = (self.score_max - self.score_min).max(f32::EPSILON);
        let raw: Vec<f32> = validation_scores
            .iter()
            .map(|s| s * range + self.score_min)
            .collect();
        let lo = raw.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !(lo.is_finite() && hi.is_finite()) {
            return Err(Error::invalid(
                "validation scores",
                "none, or not finite: cannot scale OCR-GAN's score",
            ));
        }
        self.score_min = lo;
        self.score_max = if hi > lo { hi } else { lo + 1.0 };
        Ok(())
    }

    fn config_json(&self) -> Result<serde_json::Value> {
        config_check::to_json(ENTRY.name, &self.cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest difference relative to the reference's largest magnitude (at least 1).
    fn relative_diff(a: &Tensor, reference: &Tensor) -> Result<f32> {
        let largest =
            |t: &Tensor| -> Result<f32> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?) };
        Ok(largest(&(a - reference)?)? / largest(reference)?.max(1.0))
    }

    /// The fast networks give candle's reconstruction, latent features, scores and maps within
    /// 1e-4, after training steps have moved the weights and BatchNorm statistics from their start
    /// and the weights are scaled up (DCGAN's small initial weights would hide differences), with
    /// two and three bands (channel selection learned), 4 levels (a 1×1 bottleneck at 16²), RGB
    /// and grey, widths that leave partial GEMM tiles; and with the authors' code's switches
    /// (uniform or no CS, 8-bit bands, uncapped widths and the projected latent, whose kernel is
    /// rectangular on a 32×16 input).
    #[test]
    fn fast_networks_score_as_candle_does() -> Result<()> {
        let device = Device::Cpu;
        let paper = |bands, width| OcrGanConfig {
            bands,
            width,
            levels: 4,
            disc_width: 6,
            disc_levels: 3,
            ..Default::default()
        };
        let code = |mode| OcrGanConfig {
            channel_selection: mode,
            band_coding: BandCoding::Opencv,
            disc_width_capped: false,
            disc_levels: 4,
            latent_dim: 5,
            ..paper(2, 4)
        };
        let cases = [
            (paper(2, 4), 3, (16, 16)),
            (paper(3, 6), 1, (16, 16)),
            (code(ChannelSelectionMode::Uniform), 1, (32, 16)),
            (code(ChannelSelectionMode::Off), 3, (16, 32)),
        ];
        for (cfg, channels, (height, width)) in cases {
            let what = format!("{cfg:?}");
            let input = InputSpec {
                height,
                width,
                channels,
            };
            let mut model = OcrGan::new(cfg, input, Err(0), &device)?;
            let mut rng = Rng::new(3);
            let mut random_images = |n: usize| -> Vec<Image> {
                (0..n)
                    .map(|_| Image {
                        channels,
                        height,
                        width,
                        data: (0..channels * height * width).map(|_| rng.f32()).collect(),
                    })
                    .collect()
            };
            let batches = [random_images(2), random_images(2), random_images(2)];
            let test_images = random_images(3);
            let images = batch_tensor(&test_images.iter().collect::<Vec<_>>(), &device)?;
            let mut rng = Rng::new(4);
            for batch in &batches {
                model.train_on_images(batch, &mut rng)?;
            }
            for (_, var) in model.trainable_vars()? {
                var.set(&(var.as_tensor() * 3.0)?)?;
            }
            model.fast.drop_snapshot();
            let fast = model.fast_nets()?.expect("CPU");
            let (split, _) = model.decouple(&images)?;
            let recon = sum(&model.eval.generator.forward(&split, false)?)?;
            let fast_recon = fast.generator.reconstruct(fast.kernels, &split)?;
            let d = fast
                .discriminator
                .latent(fast.kernels, &fast_recon, &device)?;
            let (latent, _) = model.eval.discriminator.forward(&recon, false)?;
            let latent = latent.permute((0, 2, 3, 1))?.flatten_from(1)?;
            let checks = [
                (
                    "reconstruction",
                    relative_diff(&fast_recon.to_nchw(&device)?, &recon)?,
                ),
                ("latent", relative_diff(&d, &latent)?),
            ];
            for (check, diff) in checks {
                assert!(diff < 1e-4, "{what}: {check} {diff}");
            }
            let (fast_scores, fast_maps) = model.scores_on(&images, Some(&fast))?;
            let (scores, maps) = model.scores_on(&images, None)?;
            assert!(relative_diff(&fast_scores, &scores)? < 1e-4, "{what}");
            assert!(relative_diff(&fast_maps, &maps)? < 1e-4, "{what}");
            // A training step replaces the snapshot.
            model.train_on_images(&test_images[..2], &mut rng)?;
            assert!(!Arc::ptr_eq(&fast, &model.fast_nets()?.expect("CPU")));
        }
        Ok(())
    }

    /// Small networks, the paper's settings otherwise.
    fn small() -> OcrGanConfig {
        OcrGanConfig {
            width: 4,
            levels: 3,
            disc_width: 4,
            disc_levels: 2,
            cs_min_hidden: 4,
            ..Default::default()
        }
    }

    /// An OCR-GAN on `side`² grey images.
    fn tiny(cfg: OcrGanConfig, side: usize) -> Result<OcrGan> {
        let input = InputSpec {
            height: side,
            width: side,
            channels: 1,
        };
        OcrGan::new(cfg, input, Err(0), &Device::Cpu)
    }

    fn noise_images(n: usize, side: usize, seed: u64) -> Vec<Image> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| Image {
                channels: 1,
                height: side,
                width: side,
                data: (0..side * side).map(|_| rng.range_f32(0.1, 0.9)).collect(),
            })
            .collect()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// `lr` and `weight_decay` reach both Adam optimisers: after one step the first moment is
    /// `(1 − β1)·(g + wd·θ)` and every parameter moved by at most `lr` (Adam's first step is
    /// `lr·sign`), the largest by `lr`.
    #[test]
    fn learning_rate_and_weight_decay_switch_adams_step() -> Result<()> {
        let batch = noise_images(2, 16, 1);
        let refs: Vec<&Image> = batch.iter().collect();
        for (lr, weight_decay) in [(0.002, 1e-4), (0.0002, 0.0)] {
            let mut model = tiny(
                OcrGanConfig {
                    lr,
                    weight_decay,
                    ..small()
                },
                16,
            )?;
            let before: Vec<(String, Vec<f32>)> = model
                .trainable_vars()?
                .iter()
                .map(|(n, v)| (n.clone(), values(v.as_tensor())))
                .collect();
            let losses = model.losses(&refs, 0, &mut Rng::new(5))?;
            let grads = (
                losses.generator.backward()?,
                losses.discriminator.backward()?,
            );
            let grad_of: HashMap<String, Vec<f32>> = model
                .trainable_vars()?
                .iter()
                .map(|(n, v)| {
                    let g = if n.starts_with("g.") {
                        &grads.0
                    } else {
                        &grads.1
                    };
                    (n.clone(), values(g.get(v.as_tensor()).expect("a gradient")))
                })
                .collect();
            model.train_on_images(&batch, &mut Rng::new(5))?;
            let state = model.training_state()?;
            let mut largest_step = 0.0f32;
            for (name, theta) in &before {
                let group = if name.starts_with("g.") { "g" } else { "d" };
                let m = values(&state[&format!("optim.{group}.{name}.m")]);
                let after = values(&state[name]);
                for (((&t0, &t1), &g), &m) in theta.iter().zip(&after).zip(&grad_of[name]).zip(&m) {
                    let expected = 0.5 * (g + weight_decay as f32 * t0);
                    assert!(
                        (m - expected).abs() <= 1e-6 * g.abs().max(1e-3),
                        "{name}: moment {m}, expected {expected} (lr {lr}, wd {weight_decay})"
                    );
                    largest_step = largest_step.max((t1 - t0).abs());
                }
            }
            assert!(
                largest_step <= lr as f32 * 1.001 && largest_step >= lr as f32 * 0.99,
                "lr {lr}: largest step {largest_step}"
            );
        }
        Ok(())
    }

    /// With no smoothing and grey images the heatmap is |I − Î|: `content_pooling = "mse"`
    /// scores its mean square, `"mean"` its mean, and the two differ.
    #[test]
    fn the_mse_switch_scores_the_mean_squared_error() -> Result<()> {
        let images = noise_images(3, 16, 2);
        let batch = batch_tensor(&images.iter().collect::<Vec<_>>(), &Device::Cpu)?;
        let score = |pooling| -> Result<(Vec<f32>, Vec<f32>)> {
            let model = tiny(
                OcrGanConfig {
                    content_pooling: pooling,
                    score_lambda: 1.0,
                    smoothing_sigma: 0.0,
                    ..small()
                },
                16,
            )?;
            let out = model.infer_reference(&batch)?;
            Ok((values(&out.scores), values(&out.maps)))
        };
        let (mse, maps) = score(ContentPooling::Mse)?;
        let (mean, _) = score(ContentPooling::Mean)?;
        for (i, map) in maps.chunks(256).enumerate() {
            let square = map.iter().map(|v| v * v).sum::<f32>() / 256.0;
            let plain = map.iter().sum::<f32>() / 256.0;
            assert!((mse[i] - square).abs() < 1e-5 * square.max(1e-3), "{i}");
            assert!((mean[i] - plain).abs() < 1e-5 * plain.max(1e-3), "{i}");
            assert!(
                (mse[i] - mean[i]).abs() > 1e-3,
                "{i}: {} {}",
                mse[i],
                mean[i]
            );
        }
        Ok(())
    }

    /// `latent_dim` projects the discriminator's last map to that many values (a kernel over the
    /// whole 2×2 map here); `disc_width_capped = false` doubles the widths past 8× the first.
    #[test]
    fn the_latent_switches_project_the_uncapped_discriminator() -> Result<()> {
        let x = batch_tensor(
            &noise_images(2, 64, 3).iter().collect::<Vec<_>>(),
            &Device::Cpu,
        )?;
        for (capped, latent_dim) in [(true, 0), (false, 0), (false, 10)] {
            let model = tiny(
                OcrGanConfig {
                    disc_levels: 5,
                    disc_width_capped: capped,
                    latent_dim,
                    ..small()
                },
                64,
            )?;
            let shapes: HashMap<String, Vec<usize>> = model
                .trainable_vars()?
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().dims().to_vec()))
                .collect();
            let last = if capped { 32 } else { 64 };
            assert_eq!(shapes["d.stage4.conv.weight"], vec![last, 32 * 16]);
            let (features, logits) = model.train.discriminator.forward(&x, false)?;
            assert_eq!(logits.dims(), &[2]);
            if latent_dim == 0 {
                assert!(!shapes.contains_key("d.latent.weight"));
                assert_eq!(features.dims(), &[2, last, 2, 2]);
            } else {
                assert_eq!(shapes["d.latent.weight"], vec![10, last * 4]);
                assert_eq!(features.dims(), &[2, 10, 1, 1]);
            }
        }
        Ok(())
    }

    /// `disc_latent_loss` adds exactly `λ_lat·L_lat` to the discriminator's loss.
    #[test]
    fn the_discriminator_latent_switch_adds_the_latent_loss() -> Result<()> {
        let batch = noise_images(2, 16, 4);
        let refs: Vec<&Image> = batch.iter().collect();
        let losses = |on: bool| -> Result<Losses> {
            let model = tiny(
                OcrGanConfig {
                    disc_latent_loss: on,
                    lambda_lat: 2.5,
                    ..small()
                },
                16,
            )?;
            model.losses(&refs, 0, &mut Rng::new(6))
        };
        let (with, without) = (losses(true)?, losses(false)?);
        let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
        let added = scalar(&with.discriminator) - scalar(&without.discriminator);
        let latent = scalar(&with.latent);
        assert!(latent > 0.0);
        assert!(
            (added - 2.5 * latent).abs() < 1e-5 * latent.max(1.0),
            "added {added}, λ_lat·L_lat {}",
            2.5 * latent
        );
        assert_eq!(scalar(&with.generator), scalar(&without.generator));
        Ok(())
    }

    fn buffers(model: &OcrGan, prefix: &str) -> Vec<Vec<f32>> {
        let mut named: Vec<(String, Tensor)> = model
            .state
            .tensors()
            .unwrap()
            .into_iter()
            .filter(|(n, _)| n.starts_with(prefix) && n.contains("running"))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        assert!(!named.is_empty(), "{prefix}");
        named.iter().map(|(_, t)| values(t)).collect()
    }

    /// `disc_norm = "frozen"`: the first epoch moves the discriminator's running statistics, later
    /// ones do not (the generators' still move), and its judgement of an image then does not
    /// depend on the batch. `"joint"`: the real images' judgement depends on the reconstructions
    /// in the batch (one set of statistics); per batch, it does not.
    #[test]
    fn the_batchnorm_switches_freeze_or_share_the_discriminators_statistics() -> Result<()> {
        let batch = noise_images(2, 16, 7);
        let refs: Vec<&Image> = batch.iter().collect();
        let frozen = tiny(
            OcrGanConfig {
                disc_norm: DiscriminatorNorm::Frozen,
                ..small()
            },
            16,
        )?;
        for epoch in [0, 1] {
            let (d0, g0) = (buffers(&frozen, "d."), buffers(&frozen, "g."));
            frozen.losses(&refs, epoch, &mut Rng::new(8))?;
            assert_eq!(buffers(&frozen, "d.") == d0, epoch >= 1, "epoch {epoch}");
            assert_ne!(buffers(&frozen, "g."), g0, "epoch {epoch}");
        }

        let images = batch_tensor(&refs, &Device::Cpu)?;
        let (_, x) = frozen.decouple(&images)?;
        let other = (x.ones_like()? * 0.3)?;
        for norm in [
            DiscriminatorNorm::PerBatch,
            DiscriminatorNorm::Joint,
            DiscriminatorNorm::Frozen,
        ] {
            let model = tiny(
                OcrGanConfig {
                    disc_norm: norm,
                    ..small()
                },
                16,
            )?;
            let train = norm != DiscriminatorNorm::Frozen;
            let judged = |recon: &Tensor| -> Result<Vec<f32>> {
                Ok(values(&if norm == DiscriminatorNorm::Joint {
                    model.judge_jointly(&x, recon, None, train)?.logits_x
                } else {
                    model.train.discriminator.forward(&x, train)?.1
                }))
            };
            let (a, b) = (judged(&x.neg()?)?, judged(&other)?);
            assert_eq!(a != b, norm == DiscriminatorNorm::Joint, "{norm:?}");
        }
        Ok(())
    }

    /// `channel_selection`: learned mixes the bands (band 0's reconstruction depends on band 1's
    /// input); uniform scales each band's features by 1/N and off leaves them, neither mixing
    /// and neither with CS parameters.
    #[test]
    fn the_channel_selection_modes_mix_scale_or_leave_the_bands() -> Result<()> {
        let images = batch_tensor(
            &noise_images(2, 16, 9).iter().collect::<Vec<_>>(),
            &Device::Cpu,
        )?;
        let model = |mode| {
            tiny(
                OcrGanConfig {
                    channel_selection: mode,
                    ..small()
                },
                16,
            )
        };
        let (learned, uniform, off) = (
            model(ChannelSelectionMode::Learned)?,
            model(ChannelSelectionMode::Uniform)?,
            model(ChannelSelectionMode::Off)?,
        );
        let bands = off.bands(&images)?;
        let mut changed = bands.clone();
        changed[1] = (&changed[1] * -1.0)?;
        for (m, mixes) in [(&learned, true), (&uniform, false), (&off, false)] {
            let g = &m.eval.generator;
            let (a, b) = (g.forward(&bands, false)?, g.forward(&changed, false)?);
            assert_eq!(values(&a[0]) != values(&b[0]), mixes);
            let has_cs = m.trainable_vars()?.iter().any(|(n, _)| n.contains(".cs"));
            assert_eq!(has_cs, mixes);
        }
        let first = |m: &OcrGan| -> Result<Vec<Vec<f32>>> {
            Ok(m.eval
                .generator
                .encode(&bands, false)?
                .iter()
                .map(|stages| values(&stages[0]))
                .collect())
        };
        for (u, o) in first(&uniform)?.iter().zip(first(&off)?) {
            assert!(u.iter().zip(&o).all(|(u, o)| (u - o / 2.0).abs() < 1e-7));
            assert!(o.iter().any(|v| v.abs() > 1e-4));
        }
        Ok(())
    }

    /// `forgeries = "combined"`: one forgery per image, carrying a black `cutout_px` square and
    /// a CutPaste patch; `"both"` makes two.
    #[test]
    fn the_combined_forgery_is_one_image_with_a_black_square_and_a_patch() -> Result<()> {
        let images = noise_images(6, 32, 10);
        let refs: Vec<&Image> = images.iter().collect();
        let forger = |forgeries| {
            Forger::new(&OcrGanConfig {
                forgeries,
                cutout_px: 6,
                ..small()
            })
        };
        let mut rng = Rng::new(11);
        assert_eq!(forger(Forgeries::Both)?.forge(&refs, &mut rng)?.len(), 12);
        let forged = forger(Forgeries::Combined)?.forge(&refs, &mut rng)?;
        assert_eq!(forged.len(), 6);
        let mut full_squares = 0;
        for (f, original) in forged.iter().zip(&images) {
            let black: Vec<usize> = (0..f.data.len()).filter(|&i| f.data[i] == 0.0).collect();
            // The noise images have no black pixel: the square is exactly the black pixels.
            assert!(!black.is_empty() && black.len() <= 36);
            let (rows, cols): (Vec<usize>, Vec<usize>) =
                black.iter().map(|&i| (i / 32, i % 32)).unzip();
            let span = |v: &[usize]| v.iter().max().unwrap() - v.iter().min().unwrap() + 1;
            assert_eq!(span(&rows) * span(&cols), black.len(), "a filled rectangle");
            full_squares += usize::from(black.len() == 36);
            let pasted = (0..f.data.len())
                .filter(|&i| f.data[i] != 0.0 && f.data[i] != original.data[i])
                .count();
            assert!(pasted > 0, "a CutPaste patch outside the square");
        }
        assert!(full_squares > 0);
        Ok(())
    }
}
