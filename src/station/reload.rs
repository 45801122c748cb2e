//! Swapping the model and its calibration in a running station, between two parts.
//!
//! A reloader thread of its own does the slow work beside the running pair: it reads the model
//! file once (its digest names exactly the bytes it loads), rebuilds the detector, checks that it
//! takes the station's input size, loads the calibration and checks it was made for those bytes
//! and is plausible for the model's validation scores, and scores one part with the new model: the
//! start-up image (which also builds its fast-kernel state, so the first part on the line pays
//! nothing for it) and then a copy of the next part the line scores, within the deadline. Only then
//! is the pair offered in [`Slot`]. The inference stage takes it between two parts and sends a
//! marker down the channel to the decision stage, which switches to the new calibration when the
//! marker arrives: every part before it was scored and judged by the old pair, every part after it
//! by the new one, and none is skipped or seen twice. A pair that fails any check is refused with
//! the reason (`NAK RELOAD MODEL ...`) and the old one stays.
//!
//! What asks for a swap: `RELOAD MODEL` on the serial line (always a swap), SIGHUP and the poll
//! of both files every `decision.reload_poll_ms` (a swap when the model file's bytes differ from
//! the running model's, else a calibration reload, as `RELOAD`). The poll acts once both files
//! have stood still for one poll, so that a teach writing the model and then the calibration is
//! taken as one pair; a pair refused once is not tried again until one of its files changes.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;

use super::decision::load_checked;
use super::outputs::Outputs;
use super::{Event, Part};
use crate::calibration::Calibration;
use crate::data::{Image, InputSpec};
use crate::eval::score_images;
use crate::methods::{self, Method};
use crate::model_file::{self, ScoreStats};

/// What the decision stage switches to when the new model takes over.
#[derive(Debug)]
pub struct Switch {
    pub calibration: Calibration,
    pub model_sha256: String,
    pub validation: ScoreStats,
}

/// A validated model and the switch that goes with it.
pub struct Pair {
    pub method: Box<dyn Method>,
    pub switch: Switch,
}

/// Between the reloader and the inference stage. Every call the inference stage makes here costs
/// one atomic load when nothing is asked of it.
#[derive(Default)]
pub struct Slot {
    offered: AtomicBool,
    pair: Mutex<Option<Pair>>,
    /// Replaced models: freed by the reloader, not by the line.
    retired: Mutex<Vec<Box<dyn Method>>>,
    wants_sample: AtomicBool,
    sample: Mutex<Option<Image>>,
}

impl Slot {
    /// The pair waiting to take over, if any (inference stage, between two parts).
    pub fn take(&self) -> Option<Pair> {
        if !self.offered.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.pair.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The model a new one replaced, for the reloader to free.
    pub fn retire(&self, old: Box<dyn Method>) {
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(old);
    }

    /// A copy of `image` when the reloader waits for a part to score (inference stage, after
    /// scoring a part).
    pub fn offer_sample(&self, image: &Image) {
        if self.wants_sample.swap(false, Ordering::AcqRel) {
            *self.sample.lock().unwrap_or_else(|p| p.into_inner()) = Some(image.clone());
        }
    }

    fn offer(&self, pair: Pair) {
        // A pair still waiting is replaced by the newer one (and freed here, off the line).
        let replaced = self
            .pair
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(pair);
        self.offered.store(true, Ordering::Release);
        drop(replaced);
    }

    fn free_retired(&self) {
        let retired = std::mem::take(&mut *self.retired.lock().unwrap_or_else(|p| p.into_inner()));
        drop(retired);
    }

    /// The next part the line scores, or none within `wait`.
    fn sample(&self, wait: Duration, stop: &AtomicBool) -> Option<Image> {
        *self.sample.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.wants_sample.store(true, Ordering::Release);
        let until = Instant::now() + wait;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            if let Some(image) = self.sample.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Some(image);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.wants_sample.store(false, Ordering::Release);
        self.sample.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The marker the inference stage sends after taking over: not a part, no verdict.
pub fn marker(switch: Switch) -> Part {
    let mut part = Part::new(
        u64::MAX,
        "model switch".into(),
        super::Frame::Pixels(Image::zeros(1, 1, 1)),
        Instant::now(),
    );
    part.frame = None;
    part.switch = Some(Box::new(switch));
    part
}

/// What a file looks like without reading it: any write or replacement changes it (the change
/// time moves even when the modification time is put back).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp(Option<(u64, u64, i64, i64, i64, i64)>);

impl Stamp {
    fn of(path: &Path) -> Stamp {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Stamp(std::fs::metadata(path).ok().map(|m| {
                (
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                )
            }))
        }
        #[cfg(not(unix))]
        {
            Stamp(std::fs::metadata(path).ok().map(|m| {
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .unwrap_or_default();
                (
                    0,
                    m.len(),
                    mtime.as_secs() as i64,
                    mtime.subsec_nanos() as i64,
                    0,
                    0,
                )
            }))
        }
    }
}

/// Both files as the poll sees them: the model's stamp (it may be large) and the calibration's
/// content digest (it is small; a copy with its old times is still a change).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Files {
    model: Stamp,
    calibration: Option<String>,
}

impl Files {
    fn of(model: &Path, calibration: &Path) -> Files {
        Files {
            model: Stamp::of(model),
            calibration: std::fs::read(calibration)
                .ok()
                .map(|b| crate::digest::sha256_hex(&b)),
        }
    }
}

/// What the reloader needs to know of the station.
pub struct ReloaderConfig {
    pub model: PathBuf,
    pub calibration: PathBuf,
    pub device: Device,
    pub input: InputSpec,
    pub deadline: Duration,
    /// How often both files are looked at; none: only on request.
    pub poll: Option<Duration>,
    /// The digest of the model the station started with.
    pub running_sha256: String,
}

pub struct Reloader {
    cfg: ReloaderConfig,
    slot: Arc<Slot>,
    outputs: Arc<Outputs>,
    /// `RELOAD MODEL`: the pair, changed or not.
    asked: Arc<AtomicBool>,
    /// SIGHUP: reload what changed.
    hangup: Arc<AtomicBool>,
    /// The decision stage's calibration reload.
    calibration_reload: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    running_sha256: String,
    /// The files as last acted on, and as seen by the last poll (acted on when the next agrees).
    acted: Files,
    settling: Option<Files>,
    /// The files of the last pair refused by a poll: not tried again until one changes.
    refused: Option<Files>,
}

/// The longest the reloader waits for a part of the line to score with a new model.
const SAMPLE_WAIT: Duration = Duration::from_secs(2);
/// How often the reloader looks at its flags.
const TICK: Duration = Duration::from_millis(50);

impl Reloader {
    pub fn new(
        cfg: ReloaderConfig,
        slot: Arc<Slot>,
        outputs: Arc<Outputs>,
        asked: Arc<AtomicBool>,
        hangup: Arc<AtomicBool>,
        calibration_reload: Arc<AtomicBool>,
        stop: Arc<AtomicBool>,
    ) -> Reloader {
        let acted = Files::of(&cfg.model, &cfg.calibration);
        Reloader {
            running_sha256: cfg.running_sha256.clone(),
            cfg,
            slot,
            outputs,
            asked,
            hangup,
            calibration_reload,
            stop,
            acted,
            settling: None,
            refused: None,
        }
    }

    /// Runs until `stop` is set.
    pub fn run(mut self) {
        // The model file may have changed while the station loaded it.
        if model_file::file_sha256(&self.cfg.model).is_ok_and(|sha| sha != self.running_sha256) {
            self.changed(false);
        }
        let mut next_poll = self.cfg.poll.map(|every| Instant::now() + every);
        while !self.stop.load(Ordering::Relaxed) {
            self.slot.free_retired();
            std::thread::sleep(TICK);
            if self.asked.swap(false, Ordering::Relaxed) {
                self.swap();
            }
            if self.hangup.swap(false, Ordering::Relaxed) {
                self.acted = Files::of(&self.cfg.model, &self.cfg.calibration);
                self.changed(true);
            }
            if let (Some(at), Some(every)) = (next_poll, self.cfg.poll) {
                if Instant::now() >= at {
                    self.poll();
                    next_poll = Some(Instant::now() + every);
                }
            }
        }
        self.slot.free_retired();
    }

    fn poll(&mut self) {
        let now = Files::of(&self.cfg.model, &self.cfg.calibration);
        if now == self.acted {
            self.settling = None;
            return;
        }
        if self.settling.as_ref() != Some(&now) {
            // Changed since the last look: wait until it stands still.
            self.settling = Some(now);
            return;
        }
        self.settling = None;
        self.acted = now.clone();
        if self.refused.as_ref() == Some(&now) {
            return;
        }
        self.changed(false);
    }

    /// Something changed (or SIGHUP said so): the pair when the model's bytes differ from the
    /// running model's, else the calibration alone. `asked`: a refusal is reported even for files
    /// refused before.
    fn changed(&mut self, asked: bool) {
        match std::fs::read(&self.cfg.model) {
            Ok(bytes) if crate::digest::sha256_hex(&bytes) == self.running_sha256 => {
                self.calibration_reload.store(true, Ordering::Relaxed);
            }
            Ok(bytes) => {
                let files = Files::of(&self.cfg.model, &self.cfg.calibration);
                if !asked && self.refused.as_ref() == Some(&files) {
                    return;
                }
                if self.attempt(bytes).is_err() {
                    self.refused = Some(files);
                }
            }
            Err(e) => self.refuse(format!("{}: {e}", self.cfg.model.display())),
        }
    }

    /// `RELOAD MODEL`: the pair as the files hold it now.
    fn swap(&mut self) {
        match std::fs::read(&self.cfg.model) {
            Ok(bytes) => {
                let _ = self.attempt(bytes);
            }
            Err(e) => self.refuse(format!("{}: {e}", self.cfg.model.display())),
        }
    }

    fn refuse(&self, reason: String) {
        log::warn!("model reload refused, the running pair stays: {reason}");
        self.outputs
            .event(&Event::ModelReloaded(Err(reason)), "reload");
    }

    /// Loads, checks and offers the pair of these model bytes and the calibration file.
    fn attempt(&mut self, bytes: Vec<u8>) -> std::result::Result<(), ()> {
        let started = Instant::now();
        match self.validate(&bytes) {
            Ok(pair) => {
                log::info!(
                    "model {} ({}) validated in {:.2} s: taking over at the next part",
                    self.cfg.model.display(),
                    &pair.switch.model_sha256[..12],
                    started.elapsed().as_secs_f64()
                );
                self.running_sha256 = pair.switch.model_sha256.clone();
                self.refused = None;
                self.slot.offer(pair);
                Ok(())
            }
            Err(reason) => {
                self.refuse(reason);
                Err(())
            }
        }
    }

    fn validate(&self, bytes: &[u8]) -> std::result::Result<Pair, String> {
        let cfg = &self.cfg;
        let sha = crate::digest::sha256_hex(bytes);
        let (meta, tensors) =
            model_file::load_bytes(&cfg.model, bytes, &cfg.device).map_err(|e| e.to_string())?;
        if meta.input != cfg.input {
            let size = |s: &InputSpec| format!("{}x{}x{}", s.channels, s.height, s.width);
            return Err(format!(
                "model file {}: takes {} images, the station runs {}: restart the station to \
                 change the input size",
                cfg.model.display(),
                size(&meta.input),
                size(&cfg.input)
            ));
        }
        let method = methods::from_model_file(&meta, tensors, &cfg.model, &cfg.device)
            .map_err(|e| e.to_string())?;
        let calibration =
            load_checked(&cfg.calibration, &sha, &meta.validation).map_err(|e| e.to_string())?;
        // The start-up image, then a part of the line.
        let start_up = Part::self_test(&cfg.input)
            .frame
            .and_then(|f| match f {
                super::Frame::Pixels(image) => Some(image),
                super::Frame::File(_) => None,
            })
            .ok_or("no start-up image")?;
        let score = |image: &Image| -> std::result::Result<(f32, Duration), String> {
            let started = Instant::now();
            let scored = score_images(method.as_ref(), &[image], 1, &cfg.device, false)
                .map_err(|e| format!("the new model cannot score a part: {e}"))?;
            let score = scored.scores[0];
            if !score.is_finite() {
                return Err(format!("the new model scores a part {score}"));
            }
            Ok((score, started.elapsed()))
        };
        score(&start_up)?;
        let (part, what) = match self.slot.sample(SAMPLE_WAIT.min(cfg.deadline), &self.stop) {
            Some(image) => (image, "a part of the line"),
            None => (start_up, "the start-up image (no part came)"),
        };
        let (value, took) = score(&part)?;
        if took > cfg.deadline {
            return Err(format!(
                "the new model took {} ms for one part, above decision.deadline_ms {}",
                took.as_millis(),
                cfg.deadline.as_millis()
            ));
        }
        log::info!(
            "the new model scored {what}: {value} in {:.1} ms",
            took.as_secs_f64() * 1e3
        );
        Ok(Pair {
            method,
            switch: Switch {
                calibration,
                model_sha256: sha,
                validation: meta.validation,
            },
        })
    }
}
