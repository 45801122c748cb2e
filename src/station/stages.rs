//! The stages of the station, one thread each, joined by bounded channels: source →
//! preprocess → inference → decision. The decision stage hands each verdict to the outputs
//! (`outputs.rs`), whose queues never block it.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;
use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError};

use super::decision::{Decider, InFlight, Pending};
use super::health::Health;
use super::ops::Notifier;
use super::reload::{self, Slot};
use super::source::{FrameSource, BACKOFF_MAX, BACKOFF_MIN};
use super::status::Stats;
use super::{Decided, Event, Frame, Part};
use crate::data::image::{self, ImageLimits};
use crate::data::{Image, InputSpec};
use crate::error::{Error, Result};
use crate::eval::score_images;
use crate::methods::Method;

/// The image as the model takes it: `vigil score`'s preprocessing for files (within the
/// station's decoded-size limits), and the same channel conversion and resize for frames already
/// in memory.
pub fn preprocess(frame: Frame, spec: &InputSpec, limits: &ImageLimits) -> Result<Image> {
    match frame {
        Frame::File(path) => image::load_image_limited(&path, spec, limits),
        Frame::Pixels(img) => {
            if img.width > limits.max_width as usize || img.height > limits.max_height as usize {
                return Err(Error::invalid(
                    "frame",
                    format!(
                        "{}x{} is above input.max_width {} or input.max_height {}",
                        img.width, img.height, limits.max_width, limits.max_height
                    ),
                ));
            }
            let converted = match (img.channels, spec.channels) {
                (a, b) if a == b => img,
                (1, 3) => Image {
                    channels: 3,
                    height: img.height,
                    width: img.width,
                    data: img.data.repeat(3),
                },
                (3, 1) => {
                    // Rec. 709 luma, the weights the `image` crate uses for files.
                    let mut grey = Image::zeros(1, img.height, img.width);
                    let (r, g, b) = (img.plane(0), img.plane(1), img.plane(2));
                    for (i, v) in grey.data.iter_mut().enumerate() {
                        *v = 0.2126 * r[i] + 0.7152 * g[i] + 0.0722 * b[i];
                    }
                    grey
                }
                (a, b) => {
                    return Err(Error::invalid(
                        "frame",
                        format!("{a} channels for a model of {b}"),
                    ))
                }
            };
            Ok(converted.resize(spec.height, spec.width))
        }
    }
}

pub fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let until = Instant::now() + total;
    while !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

pub fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::Device(format!("cannot start the {name} thread: {e}")))
}

pub struct SourceStage {
    pub source: Box<dyn FrameSource>,
    pub triggered: Option<Receiver<()>>,
    pub out: Sender<Part>,
    pub in_flight: Arc<InFlight>,
    pub stats: Arc<Stats>,
    pub health: Arc<Health>,
    pub stop: Arc<AtomicBool>,
}

impl SourceStage {
    /// Waits for the next trigger or pacing slot; false when stopping.
    fn wait_turn(&self, next_at: &mut Instant, period: Option<Duration>) -> bool {
        if let Some(trigger) = &self.triggered {
            while !self.stop.load(Ordering::Relaxed) {
                if trigger.recv_timeout(Duration::from_millis(50)).is_ok() {
                    return true;
                }
            }
            return false;
        }
        if let Some(period) = period {
            let now = Instant::now();
            if *next_at > now {
                sleep_unless(&self.stop, *next_at - now);
            }
            // After a stall, keep the rate from here instead of bursting to catch up.
            *next_at = (*next_at + period).max(Instant::now());
        }
        !self.stop.load(Ordering::Relaxed)
    }

    pub fn run(mut self) -> u64 {
        let period = (self.source.rate_hz() > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / self.source.rate_hz()));
        // Paced or triggered parts cannot wait for a full pipeline: they are dropped (fail-safe).
        let may_drop = period.is_some() || self.triggered.is_some();
        let mut backoff = BACKOFF_MIN;
        let mut open = false;
        let mut next_id = 0u64;
        let mut next_at = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if !open {
                match self.source.open() {
                    Ok(()) => {
                        open = true;
                        backoff = BACKOFF_MIN;
                        self.health.clear("source");
                    }
                    Err(e) => {
                        self.health.fault("source", e.to_string());
                        sleep_unless(&self.stop, backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
            if !self.wait_turn(&mut next_at, period) {
                break;
            }
            let start = Instant::now();
            let (name, frame) = match self.source.grab() {
                Ok(Some(grabbed)) => grabbed,
                Ok(None) => break,
                Err(e) => {
                    self.health.fault("source", e.to_string());
                    open = false;
                    continue;
                }
            };
            let mut part = Part::new(next_id, name, frame, start);
            part.timings[0] = start.elapsed();
            self.stats.record(0, part.timings[0]);
            self.in_flight.register(Pending {
                id: part.id,
                name: part.name.clone(),
                captured: part.captured,
                captured_wall: part.captured_wall,
                dropped: false,
            });
            next_id += 1;
            if !self.hand_on(part, may_drop) {
                break;
            }
        }
        next_id
    }

    /// False when the pipeline is gone.
    fn hand_on(&self, mut part: Part, may_drop: bool) -> bool {
        let id = part.id;
        if may_drop {
            return match self.out.try_send(part) {
                Ok(()) => {
                    self.stats.passed(0);
                    true
                }
                Err(TrySendError::Full(_)) => {
                    self.stats.drops.fetch_add(1, Ordering::Relaxed);
                    self.in_flight.mark_dropped(id);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            };
        }
        loop {
            match self.out.send_timeout(part, Duration::from_millis(50)) {
                Ok(()) => {
                    self.stats.passed(0);
                    return true;
                }
                Err(SendTimeoutError::Timeout(p)) if !self.stop.load(Ordering::Relaxed) => part = p,
                Err(_) => {
                    self.in_flight.mark_dropped(id);
                    return false;
                }
            }
        }
    }
}

pub fn preprocess_stage(
    rx: Receiver<Part>,
    tx: Sender<Part>,
    spec: InputSpec,
    limits: ImageLimits,
    stats: Arc<Stats>,
) {
    for mut part in rx {
        let start = Instant::now();
        if let Some(frame) = part.frame.take() {
            match preprocess(frame, &spec, &limits) {
                Ok(img) => part.image = Some(img),
                Err(e) => part.failure = Some(e.to_string()),
            }
        }
        part.timings[1] = start.elapsed();
        stats.record(1, part.timings[1]);
        stats.passed(1);
        if tx.send(part).is_err() {
            break;
        }
    }
}

pub fn inference_stage(
    rx: Receiver<Part>,
    tx: Sender<Part>,
    mut method: Box<dyn Method>,
    device: Device,
    hook: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    stats: Arc<Stats>,
    swap: Arc<Slot>,
) {
    loop {
        // Between two parts, and while the line is idle: a validated model takes over, and the
        // decision stage learns it from the marker that follows every part scored before it.
        if let Some(pair) = swap.take() {
            swap.retire(std::mem::replace(&mut method, pair.method));
            if tx.send(reload::marker(pair.switch)).is_err() {
                break;
            }
        }
        let mut part = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(part) => part,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if let (Some(img), None) = (&part.image, &part.failure) {
            if let Some(hook) = &hook {
                hook(part.id);
            }
            let start = Instant::now();
            // Exactly `vigil score`'s call: one image, batch of one.
            match score_images(method.as_ref(), &[img], 1, &device, false) {
                Ok(scored) => part.scored = Some((scored.scores[0], scored.maps)),
                Err(e) => part.failure = Some(e.to_string()),
            }
            part.timings[2] = start.elapsed();
            stats.record(2, part.timings[2]);
            swap.offer_sample(img);
        }
        stats.passed(2);
        if tx.send(part).is_err() {
            break;
        }
    }
}

pub struct DecisionStage {
    pub decider: Decider,
    pub rx: Receiver<Part>,
    pub in_flight: Arc<InFlight>,
    pub stats: Arc<Stats>,
    pub health: Arc<Health>,
    pub notifier: Arc<Notifier>,
    /// Reload the calibration (`RELOAD`, or the reloader when only the calibration changed).
    pub reload: Arc<AtomicBool>,
    pub source_done: Arc<AtomicBool>,
    pub keep_evidence: bool,
    /// Told when the self-test part came through (pass or fail).
    pub self_tested: Sender<()>,
    /// The serial line under construction (reused: no allocation per part for it).
    pub line: String,
}

impl DecisionStage {
    /// Counts the verdict and hands it to the outputs (the signal stage's work: never waits).
    fn emit(&mut self, d: Decided) {
        if let Some(reason) = &d.reason {
            match reason.as_str() {
                "deadline" => self.stats.deadline_misses.fetch_add(1, Ordering::Relaxed),
                "dropped" => 0,
                _ => self.stats.failures.fetch_add(1, Ordering::Relaxed),
            };
        }
        let start = Instant::now();
        let (verdict, captured) = (d.verdict, d.captured);
        if !self.health.outputs().result(d, &mut self.line) {
            self.health.fault(
                "gpio",
                "reject queue overflowed: reject pulses may be lost".into(),
            );
        }
        self.stats.count(verdict);
        self.stats.record(4, start.elapsed());
        self.stats.record(5, captured.elapsed());
        self.stats.passed(4);
    }

    /// Gives the fail-safe verdict to dropped parts and parts past their deadline at the front.
    fn expire(&mut self, everything: bool) {
        let now = Instant::now();
        while let Some(front) = self.in_flight.front() {
            let reason = if front.dropped {
                "dropped"
            } else if now.duration_since(front.captured) > self.decider.deadline {
                "deadline"
            } else if everything {
                "lost"
            } else {
                break;
            };
            let Some(pending) = self.in_flight.pop_front() else {
                break;
            };
            let d = self.decider.fail_safe(pending, reason);
            self.emit(d);
        }
    }

    pub fn run(mut self) {
        loop {
            if self.reload.swap(false, Ordering::Relaxed) {
                let result = self.decider.reload();
                match &result {
                    Ok(t) => log::info!("calibration reloaded: threshold {t}"),
                    Err(e) => log::warn!("calibration reload refused, old one stays: {e}"),
                }
                self.health
                    .outputs()
                    .event(&Event::Reloaded(result), "decision");
            }
            self.expire(false);
            if self.source_done.load(Ordering::Relaxed) && self.in_flight.is_empty() {
                return;
            }
            let wait = self
                .in_flight
                .front()
                .map_or(Duration::from_millis(50), |f| {
                    (f.captured + self.decider.deadline).saturating_duration_since(Instant::now())
                })
                .clamp(Duration::from_millis(1), Duration::from_millis(50));
            match self.rx.recv_timeout(wait) {
                Ok(part) if part.self_test => self.self_test(part),
                Ok(part) if part.switch.is_some() => self.switch(part),
                Ok(part) => {
                    self.stats.passed(3);
                    self.take(part);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.expire(true);
                    return;
                }
            }
        }
    }

    /// The start-up image went through preprocessing and inference: the station is ready
    /// (systemd's READY=1) once it scored, whether or not a part has come yet.
    fn self_test(&mut self, part: Part) {
        // Counted through the last stages too, or the stall check would see a part waiting.
        self.stats.passed(3);
        self.stats.passed(4);
        match (&part.scored, &part.failure) {
            (Some((score, _)), None) if score.is_finite() => {
                log::info!("self-test passed: score {score}");
                self.health.clear("self-test");
                self.notifier.ready();
            }
            (_, Some(why)) => self.health.fault("self-test", why.clone()),
            (scored, None) => self.health.fault(
                "self-test",
                format!(
                    "the start-up image scored {:?}, not a finite number",
                    scored.as_ref().map(|s| s.0)
                ),
            ),
        }
        let _ = self.self_tested.try_send(());
    }

    /// A new model took over: every part from here on was scored by it, and is judged with its
    /// calibration.
    fn switch(&mut self, part: Part) {
        let Some(switch) = part.switch else {
            return;
        };
        let sha = switch.model_sha256.clone();
        let threshold = self.decider.switch_to(*switch);
        log::info!(
            "model {} took over: threshold {threshold}",
            &sha[..12.min(sha.len())]
        );
        self.health
            .outputs()
            .event(&Event::ModelReloaded(Ok((threshold, sha))), "decision");
    }

    fn take(&mut self, mut part: Part) {
        loop {
            match self.in_flight.front() {
                Some(f) if f.id < part.id => {
                    let Some(pending) = self.in_flight.pop_front() else {
                        return;
                    };
                    let reason = if pending.dropped { "dropped" } else { "lost" };
                    let d = self.decider.fail_safe(pending, reason);
                    self.emit(d);
                }
                Some(f) if f.id == part.id => {
                    self.in_flight.pop_front();
                    let start = Instant::now();
                    let mut timings = part.timings;
                    part.timings = [Duration::ZERO; 5];
                    let mut d = self.decider.decide(part, self.keep_evidence);
                    timings[3] = start.elapsed();
                    d.timings = timings;
                    self.stats.record(3, timings[3]);
                    self.emit(d);
                    return;
                }
                _ => {
                    // Already given the fail-safe verdict.
                    self.stats.late.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}
