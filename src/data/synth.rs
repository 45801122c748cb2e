//! A deterministic synthetic product (`vigil synth`): brushed, finely woven metal whose defect-free
//! images vary in brightness, brushing angle, weave phase, illumination and noise, with three defect
//! types drawn with exact masks. Written in the MVTec AD layout so every command can use it.
use std::f32::consts::{PI, TAU};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::dataset::GOOD;
use crate::data::image::{save_mask_png, save_png, Image, Mask};
use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefectKind {
    Scratch,
    Spot,
    Crack,
}

impl DefectKind {
    pub const ALL: [DefectKind; 3] = [DefectKind::Scratch, DefectKind::Spot, DefectKind::Crack];

    /// The folder name under `test/` and `ground_truth/`.
    pub fn name(self) -> &'static str {
        match self {
            DefectKind::Scratch => "scratch",
            DefectKind::Spot => "spot",
            DefectKind::Crack => "crack",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthConfig {
    pub height: usize,
    pub width: usize,
    /// 1 (grey) or 3 (tinted RGB).
    pub channels: usize,
    pub train_good: usize,
    pub test_good: usize,
    pub test_per_defect: usize,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            height: 128,
            width: 128,
            channels: 1,
            train_good: 60,
            test_good: 20,
            test_per_defect: 10,
            seed: 0,
        }
    }
}

impl SynthConfig {
    /// Smallest side on which the texture and defects still make sense.
    pub const MIN_SIDE: usize = 16;

    pub fn validate(&self) -> Result<()> {
        if self.channels != 1 && self.channels != 3 {
            return Err(Error::config(
                "channels",
                format!("{} (must be 1 or 3)", self.channels),
            ));
        }
        for (field, side) in [("height", self.height), ("width", self.width)] {
            if !(Self::MIN_SIDE..=8192).contains(&side) {
                return Err(Error::config(
                    field,
                    format!("{side} (must be {}..=8192)", Self::MIN_SIDE),
                ));
            }
        }
        if self.train_good < 2 {
            return Err(Error::config(
                "train_good",
                format!("{} (need at least 2: one is held out)", self.train_good),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthSummary {
    /// Every file written (images and masks).
    pub files: usize,
    pub train_good: usize,
    pub test_good: usize,
    pub test_defective: usize,
}

/// Writes the synthetic product under `out` in the MVTec AD layout. Same config → byte-identical
/// files.
pub fn generate(out: &Path, cfg: &SynthConfig) -> Result<SynthSummary> {
    cfg.validate()?;
    let mut master = Rng::new(cfg.seed);
    let mut files = 0;
    let mut write_set =
        |dir: &Path, count: usize, defect: Option<DefectKind>, mask_dir: Option<&Path>| {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            if let Some(mask_dir) = mask_dir {
                std::fs::create_dir_all(mask_dir).map_err(|e| Error::io(mask_dir, e))?;
            }
            for i in 0..count {
                let mut rng = master.fork(i as u64);
                let (image, mask) = product(cfg, &mut rng, defect);
                save_png(&image, &dir.join(format!("{i:03}.png")))?;
                files += 1;
                if let Some(mask_dir) = mask_dir {
                    save_mask_png(&mask, &mask_dir.join(format!("{i:03}_mask.png")))?;
                    files += 1;
                }
            }
            Ok::<(), Error>(())
        };
    write_set(&out.join("train").join(GOOD), cfg.train_good, None, None)?;
    write_set(&out.join("test").join(GOOD), cfg.test_good, None, None)?;
    for kind in DefectKind::ALL {
        write_set(
            &out.join("test").join(kind.name()),
            cfg.test_per_defect,
            Some(kind),
            Some(&out.join("ground_truth").join(kind.name())),
        )?;
    }
    Ok(SynthSummary {
        files,
        train_good: cfg.train_good,
        test_good: cfg.test_good,
        test_defective: cfg.test_per_defect * DefectKind::ALL.len(),
    })
}

/// One product image and its defect mask (empty when `defect` is `None`). The surface depends only
/// on the generator's state on entry, so the same state with and without a defect gives images
/// that differ exactly on the mask.
pub fn product(cfg: &SynthConfig, rng: &mut Rng, defect: Option<DefectKind>) -> (Image, Mask) {
    let (h, w) = (cfg.height, cfg.width);
    let mut surface_rng = rng.fork(1);
    let mut defect_rng = rng.fork(2);
    let mut value = surface(h, w, &mut surface_rng);
    let mut mask = Mask::zeros(h, w);
    if let Some(kind) = defect {
        match kind {
            DefectKind::Scratch => scratch(&mut value, &mut mask, h, w, &mut defect_rng),
            DefectKind::Spot => spot(&mut value, &mut mask, h, w, &mut defect_rng),
            DefectKind::Crack => crack(&mut value, &mut mask, h, w, &mut defect_rng),
        }
    }
    let channels = cfg.channels.clamp(1, 3);
    let tint: Vec<f32> = if channels == 1 {
        vec![1.0]
    } else {
        // A faint per-image colour cast of anodised metal.
        let cast = [
            surface_rng.range_f32(0.92, 1.0),
            surface_rng.range_f32(0.95, 1.0),
            surface_rng.range_f32(0.98, 1.06),
        ];
        cast[..channels].to_vec()
    };
    let mut image = Image::zeros(channels, h, w);
    for (c, &t) in tint.iter().enumerate() {
        for (dst, &v) in image.plane_mut(c).iter_mut().zip(&value) {
            *dst = (v * t).clamp(0.0, 1.0);
        }
    }
    (image, mask)
}

/// A row-major field of grey values around 0.5: brushing streaks, a fine weave, an illumination
/// gradient and sensor noise, all drawn per image.
fn surface(h: usize, w: usize, rng: &mut Rng) -> Vec<f32> {
    let brightness = rng.range_f32(0.42, 0.58);
    let angle = rng.range_f32(-0.05, 0.05);
    let (sin_a, cos_a) = angle.sin_cos();
    // Streak profile across the brushing direction: coarse (smoothed) and fine (raw) noise.
    let span = h + w + 2;
    let raw: Vec<f32> = (0..span).map(|_| rng.normal()).collect();
    let coarse = box_blur_1d(&box_blur_1d(&raw, 3), 3);
    let fine: Vec<f32> = (0..span).map(|_| rng.normal()).collect();
    let coarse_amp = rng.range_f32(0.04, 0.07);
    let fine_amp = rng.range_f32(0.008, 0.015);
    let weave_amp = rng.range_f32(0.012, 0.025);
    let weave_period = rng.range_f32(9.0, 13.0);
    let (phase_x, phase_y) = (rng.range_f32(0.0, TAU), rng.range_f32(0.0, TAU));
    let grad_angle = rng.range_f32(0.0, TAU);
    let grad_amp = rng.range_f32(0.0, 0.05) / (h.max(w) as f32);
    let noise = rng.range_f32(0.008, 0.015);

    let mut value = vec![0.0; h * w];
    let (cy, cx) = (h as f32 / 2.0, w as f32 / 2.0);
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (x as f32 - cx, y as f32 - cy);
            let along = dx * cos_a + dy * sin_a;
            let across = -dx * sin_a + dy * cos_a;
            let t = (across + (h + w) as f32 / 2.0).clamp(0.0, (span - 2) as f32);
            let (i, frac) = (t as usize, t.fract());
            let streak =
                coarse_amp * (coarse[i] * (1.0 - frac) + coarse[i + 1] * frac) + fine_amp * fine[i];
            let weave = weave_amp
                * (TAU * along / weave_period + phase_x).sin()
                * (TAU * across / weave_period + phase_y).sin();
            let gradient = grad_amp * (dx * grad_angle.cos() + dy * grad_angle.sin());
            value[y * w + x] = brightness + streak + weave + gradient + noise * rng.normal();
        }
    }
    value
}

fn box_blur_1d(xs: &[f32], radius: usize) -> Vec<f32> {
    let n = xs.len();
    (0..n)
        .map(|i| {
            let (lo, hi) = (i.saturating_sub(radius), (i + radius + 1).min(n));
            xs[lo..hi].iter().sum::<f32>() / (hi - lo) as f32
        })
        .collect()
}

/// Distance from (x, y) to the segment a–b.
fn segment_distance(x: f32, y: f32, a: (f32, f32), b: (f32, f32)) -> f32 {
    let (vx, vy) = (b.0 - a.0, b.1 - a.1);
    let len2 = vx * vx + vy * vy;
    let t = if len2 > 0.0 {
        (((x - a.0) * vx + (y - a.1) * vy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    ((x - a.0 - t * vx).powi(2) + (y - a.1 - t * vy).powi(2)).sqrt()
}

/// Adds `delta(along)` once to every pixel within `half_width` of the polyline (two or more points;
/// pixel centres at integer coordinates) and marks it; `along` is the 0..1 position of the nearest
/// segment.
fn stroke(
    value: &mut [f32],
    mask: &mut Mask,
    w: usize,
    points: &[(f32, f32)],
    half_width: f32,
    delta: impl Fn(f32) -> f32,
) {
    let h = mask.height;
    let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
    for &(x, y) in points {
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
    }
    let clip = |v: f32, len: usize| v.clamp(0.0, (len - 1) as f32) as usize;
    let segments = points.len().saturating_sub(1).max(1) as f32;
    for y in clip((y0 - half_width).floor(), h)..=clip((y1 + half_width).ceil(), h) {
        for x in clip((x0 - half_width).floor(), w)..=clip((x1 + half_width).ceil(), w) {
            let (px, py) = (x as f32, y as f32);
            let nearest = points
                .windows(2)
                .enumerate()
                .map(|(i, s)| (segment_distance(px, py, s[0], s[1]), i))
                .fold((f32::MAX, 0), |a, b| if b.0 < a.0 { b } else { a });
            if nearest.0 <= half_width {
                let i = y * w + x;
                if mask.data[i] == 0 {
                    value[i] += delta(nearest.1 as f32 / segments);
                    mask.data[i] = 1;
                }
            }
        }
    }
}

/// A random pixel centre at least `margin` (a fraction of each side) from the border.
fn random_point(h: usize, w: usize, margin: f32, rng: &mut Rng) -> (f32, f32) {
    let x = rng.range_f32(margin, 1.0 - margin) * (w - 1) as f32;
    let y = rng.range_f32(margin, 1.0 - margin) * (h - 1) as f32;
    (x.round(), y.round())
}

/// A thin, slightly curved line, brighter or darker than the metal, fading along its length.
fn scratch(value: &mut [f32], mask: &mut Mask, h: usize, w: usize, rng: &mut Rng) {
    let side = h.min(w) as f32;
    let start = random_point(h, w, 0.15, rng);
    let length = rng.range_f32(0.25, 0.55) * side;
    let angle = rng.range_f32(0.0, TAU);
    let bend = rng.range_f32(-0.15, 0.15) * length;
    let end = (
        start.0 + length * angle.cos(),
        start.1 + length * angle.sin(),
    );
    let control = (
        (start.0 + end.0) / 2.0 - bend * angle.sin(),
        (start.1 + end.1) / 2.0 + bend * angle.cos(),
    );
    let points: Vec<(f32, f32)> = (0..=24)
        .map(|k| {
            let t = k as f32 / 24.0;
            let (a, b, c) = ((1.0 - t).powi(2), 2.0 * t * (1.0 - t), t * t);
            (
                a * start.0 + b * control.0 + c * end.0,
                a * start.1 + b * control.1 + c * end.1,
            )
        })
        .collect();
    let half_width = rng.range_f32(0.5, 1.1) * (side / 128.0).max(1.0);
    let sign = if rng.bool(0.6) { 1.0 } else { -1.0 };
    let contrast = rng.range_f32(0.08, 0.16);
    stroke(value, mask, w, &points, half_width, |t| {
        sign * contrast * (1.0 - 0.4 * t)
    });
}

/// An irregular dark stain, darkest in its middle, with a sharp edge.
fn spot(value: &mut [f32], mask: &mut Mask, h: usize, w: usize, rng: &mut Rng) {
    let scale = h.min(w) as f32 / 128.0;
    let (cx, cy) = random_point(h, w, 0.1, rng);
    let radius = rng.range_f32(3.0, 9.0) * scale.max(0.5);
    let lobes = [
        (rng.range_usize(2, 5) as f32, rng.range_f32(0.0, TAU), 0.2),
        (rng.range_usize(5, 9) as f32, rng.range_f32(0.0, TAU), 0.1),
    ];
    let contrast = rng.range_f32(0.08, 0.18);
    let reach = (radius * 1.4).ceil() as isize;
    for dy in -reach..=reach {
        for dx in -reach..=reach {
            let (x, y) = (cx as isize + dx, cy as isize + dy);
            if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
                continue;
            }
            let d = ((dx * dx + dy * dy) as f32).sqrt();
            let phi = (dy as f32).atan2(dx as f32);
            let edge = radius
                * (1.0
                    + lobes
                        .iter()
                        .map(|(k, phase, amp)| amp * (k * phi + phase).sin())
                        .sum::<f32>());
            if d <= edge {
                let i = y as usize * w + x as usize;
                value[i] -= contrast * (0.6 + 0.4 * (1.0 - (d / edge).powi(2)));
                mask.data[i] = 1;
            }
        }
    }
}

/// A dark, jagged random walk with an occasional branch.
fn crack(value: &mut [f32], mask: &mut Mask, h: usize, w: usize, rng: &mut Rng) {
    let side = h.min(w) as f32;
    let step = 2.0 * (side / 128.0).max(0.5);
    let walk = |start: (f32, f32), heading: f32, length: f32, rng: &mut Rng| {
        let mut points = vec![start];
        let (mut p, mut a) = (start, heading);
        for _ in 0..(length / step).ceil() as usize {
            a += rng.range_f32(-0.45, 0.45);
            p = (p.0 + step * a.cos(), p.1 + step * a.sin());
            points.push(p);
        }
        points
    };
    let heading = rng.range_f32(0.0, TAU);
    let main = walk(
        random_point(h, w, 0.2, rng),
        heading,
        rng.range_f32(0.2, 0.4) * side,
        rng,
    );
    let half_width = rng.range_f32(0.5, 0.9) * (side / 128.0).max(1.0);
    let contrast = rng.range_f32(0.12, 0.22);
    stroke(value, mask, w, &main, half_width, |_| -contrast);
    if rng.bool(0.5) {
        let from = main[rng.range_usize(main.len() / 3, main.len())];
        let sideways = heading + if rng.bool(0.5) { PI / 3.0 } else { -PI / 3.0 };
        let branch = walk(from, sideways, rng.range_f32(0.08, 0.15) * side, rng);
        stroke(value, mask, w, &branch, half_width * 0.8, |_| {
            -contrast * 0.8
        });
    }
}
