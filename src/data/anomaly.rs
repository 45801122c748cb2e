//! Anomaly synthesis shared by every method: each generator alters a defect-free image and returns
//! the exact mask of what it changed.
//!
//! Guarantee (checked by tests/anomaly.rs): pixels outside the mask are bit-identical to the input,
//! and every mask pixel differs from the input by at least [`MIN_CHANGE`] in some channel. Pixels a
//! generator would change by less (a pasted patch that happens to match, a faint blend) are pushed
//! to that minimum, so masks stay solid and labels never mark an unchanged pixel.
use std::f32::consts::{SQRT_2, TAU};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::dataset::list_images;
use crate::data::image::{load_image, Image, InputSpec, Mask};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// The least change (in 0..=1 units, in at least one channel) of every masked pixel; above 8-bit
/// quantisation so a saved anomaly keeps its mask.
pub const MIN_CHANGE: f32 = 0.02;

/// A random fill colour is redrawn while its mean distance to the image's mean colour is below this.
const MIN_COLOUR_DISTANCE: f32 = 0.15;

/// A closed range `[min, max]` written as a two-element array in configs.
pub type Range = [f32; 2];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AnomalyGenerator {
    Cutout(CutoutParams),
    CutPaste(CutPasteParams),
    Confetti(ConfettiParams),
    PerlinBlend(PerlinBlendParams),
}

/// A rectangle filled with a random colour or with noise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CutoutParams {
    /// Rectangle area as a fraction of the image area.
    pub area: Range,
    /// Largest width/height (or height/width) ratio.
    pub max_aspect: f32,
    /// Probability of a per-pixel noise fill instead of one colour.
    pub noise_probability: f32,
}

impl Default for CutoutParams {
    fn default() -> Self {
        CutoutParams {
            area: [0.02, 0.15],
            max_aspect: 3.0,
            noise_probability: 0.5,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CutPasteVariant {
    /// An axis-aligned rectangle moved elsewhere.
    Patch,
    /// A thin rectangle moved elsewhere and rotated.
    Scar,
}

/// CutPaste (Li et al. 2021): a region of the same image pasted elsewhere, colour-jittered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CutPasteParams {
    pub variant: CutPasteVariant,
    /// Patch area as a fraction of the image area.
    pub area: Range,
    pub max_aspect: f32,
    /// Scar width and length as fractions of the shorter image side.
    pub scar_width: Range,
    pub scar_length: Range,
    pub scar_max_rotation_deg: f32,
    /// Brightness shift and contrast change up to this much (0 = plain copy).
    pub jitter: f32,
}

impl Default for CutPasteParams {
    fn default() -> Self {
        CutPasteParams {
            variant: CutPasteVariant::Patch,
            area: [0.02, 0.15],
            max_aspect: 3.3,
            scar_width: [0.01, 0.06],
            scar_length: [0.04, 0.1],
            scar_max_rotation_deg: 45.0,
            jitter: 0.1,
        }
    }
}

/// FCDD's confetti noise (Liznerski et al. 2021, the MVTec-AD `confetti` mode as the HSC paper's
/// runs used it): square blobs added to the image, then clamped; see [`confetti_noise`].
///
/// Defaults are FCDD's, whose images are 240×240 when the noise is drawn: sides scale with the
/// image's shorter side over `reference_size`, rates are per pixel (so the expected number of
/// blobs is proportional to the image area: about 1.04 coloured and 0.69 dark ones at 240×240,
/// with at least one of each always drawn).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfettiParams {
    /// Per-pixel probability of a coloured blob's centre (FCDD: 1.8e-5).
    pub colour_rate: f32,
    /// Per-pixel probability of a dark blob's centre (FCDD: 1.2e-5).
    pub dark_rate: f32,
    /// Blob side range in pixels, inclusive, at `reference_size` (FCDD: 8 to 54).
    pub side_px: [usize; 2],
    /// The shorter image side `side_px` refers to (FCDD: 240).
    pub reference_size: usize,
    /// Coloured blobs are rotated by a uniform angle up to this, either way (FCDD: 45°).
    pub max_rotation_deg: f32,
}

impl Default for ConfettiParams {
    fn default() -> Self {
        ConfettiParams {
            colour_rate: 1.8e-5,
            dark_rate: 1.2e-5,
            side_px: [8, 54],
            reference_size: 240,
            max_rotation_deg: 45.0,
        }
    }
}

/// DRAEM: Perlin noise thresholded into a mask, a texture blended in with opacity β inside it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PerlinBlendParams {
    /// The noise has 2^k cells across the image, k drawn from this inclusive range.
    pub scale_pow: [u32; 2],
    /// Noise (roughly in -1..1) above this is masked.
    pub threshold: f32,
    /// Texture opacity β, drawn from [min, max).
    pub opacity: Range,
    /// A folder of texture images (e.g. DTD); procedural textures when absent.
    pub texture_dir: Option<PathBuf>,
}

impl Default for PerlinBlendParams {
    fn default() -> Self {
        PerlinBlendParams {
            scale_pow: [0, 5],
            threshold: 0.5,
            opacity: [0.1, 1.0],
            texture_dir: None,
        }
    }
}

/// One entry of a method's anomaly list, e.g. in TOML:
/// `[[anomalies]]` / `kind = "cut-paste"` / `variant = "scar"` / `weight = 2.0`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightedGenerator {
    #[serde(default = "unit_weight")]
    pub weight: f32,
    #[serde(flatten)]
    pub generator: AnomalyGenerator,
}

fn unit_weight() -> f32 {
    1.0
}

fn check_range(field: &str, range: Range, lo: f32, hi: f32) -> Result<()> {
    let [a, b] = range;
    if !(a.is_finite() && b.is_finite() && lo <= a && a <= b && b <= hi) {
        return Err(Error::config(
            field,
            format!("[{a}, {b}] (need {lo} <= min <= max <= {hi})"),
        ));
    }
    Ok(())
}

fn check_probability(field: &str, p: f32) -> Result<()> {
    check_range(field, [p, p], 0.0, 1.0)
}

impl AnomalyGenerator {
    /// Checks the parameters; `field` prefixes the names in errors (e.g. `anomalies[2]`).
    pub fn validate(&self, field: &str) -> Result<()> {
        let f = |name: &str| format!("{field}.{name}");
        match self {
            AnomalyGenerator::Cutout(p) => {
                check_range(&f("area"), p.area, 1e-4, 1.0)?;
                check_range(&f("max_aspect"), [1.0, p.max_aspect], 1.0, 100.0)?;
                check_probability(&f("noise_probability"), p.noise_probability)
            }
            AnomalyGenerator::CutPaste(p) => {
                check_range(&f("area"), p.area, 1e-4, 0.5)?;
                check_range(&f("max_aspect"), [1.0, p.max_aspect], 1.0, 100.0)?;
                check_range(&f("scar_width"), p.scar_width, 0.0, 0.5)?;
                check_range(&f("scar_length"), p.scar_length, 0.0, 0.5)?;
                check_range(
                    &f("scar_max_rotation_deg"),
                    [0.0, p.scar_max_rotation_deg],
                    0.0,
                    180.0,
                )?;
                check_range(&f("jitter"), [0.0, p.jitter], 0.0, 0.5)
            }
            AnomalyGenerator::Confetti(p) => {
                for (name, rate) in [("colour_rate", p.colour_rate), ("dark_rate", p.dark_rate)] {
                    if !(rate > 0.0 && rate <= 1.0) {
                        return Err(Error::config(
                            f(name),
                            format!("{rate} (need a probability above 0 and at most 1)"),
                        ));
                    }
                }
                let [a, b] = p.side_px;
                if a == 0 || a > b || b > 10_000 {
                    return Err(Error::config(
                        f("side_px"),
                        format!("[{a}, {b}] (need 1 <= min <= max <= 10000)"),
                    ));
                }
                if p.reference_size == 0 {
                    return Err(Error::config(f("reference_size"), "must be at least 1"));
                }
                check_range(
                    &f("max_rotation_deg"),
                    [0.0, p.max_rotation_deg],
                    0.0,
                    180.0,
                )
            }
            AnomalyGenerator::PerlinBlend(p) => {
                let [a, b] = p.scale_pow;
                if a > b || b > 8 {
                    return Err(Error::config(
                        f("scale_pow"),
                        format!("[{a}, {b}] (need min <= max <= 8)"),
                    ));
                }
                check_range(&f("threshold"), [p.threshold, p.threshold], -1.0, 1.0)?;
                check_range(&f("opacity"), p.opacity, 0.0, 1.0)?;
                if p.opacity[1] <= 0.0 {
                    return Err(Error::config(f("opacity"), "max must be above 0"));
                }
                Ok(())
            }
        }
    }
}

struct Entry {
    weight: f32,
    generator: AnomalyGenerator,
    /// Texture files for a Perlin blend with a texture folder, decoded when drawn.
    textures: Vec<PathBuf>,
}

/// Draws one of several generators by weight and applies it.
pub struct AnomalySynth {
    entries: Vec<Entry>,
    total_weight: f32,
}

impl AnomalySynth {
    /// Validates the list (field names in errors are `anomalies[i]...`) and lists texture folders.
    pub fn new(generators: &[WeightedGenerator]) -> Result<AnomalySynth> {
        if generators.is_empty() {
            return Err(Error::config("anomalies", "no anomaly generators given"));
        }
        let mut entries = Vec::with_capacity(generators.len());
        for (i, g) in generators.iter().enumerate() {
            let field = format!("anomalies[{i}]");
            if !(g.weight.is_finite() && g.weight > 0.0) {
                return Err(Error::config(
                    format!("{field}.weight"),
                    format!("{} (must be a positive number)", g.weight),
                ));
            }
            g.generator.validate(&field)?;
            let textures = match &g.generator {
                AnomalyGenerator::PerlinBlend(PerlinBlendParams {
                    texture_dir: Some(dir),
                    ..
                }) => list_images(dir)?,
                _ => Vec::new(),
            };
            entries.push(Entry {
                weight: g.weight,
                generator: g.generator.clone(),
                textures,
            });
        }
        let total_weight = entries.iter().map(|e| e.weight).sum();
        Ok(AnomalySynth {
            entries,
            total_weight,
        })
    }

    pub fn single(generator: AnomalyGenerator) -> Result<AnomalySynth> {
        AnomalySynth::new(&[WeightedGenerator {
            weight: 1.0,
            generator,
        }])
    }

    /// The altered image and the mask of exactly the pixels it changed (never empty).
    pub fn apply(&self, image: &Image, rng: &mut Rng) -> Result<(Image, Mask)> {
        let (c, h, w) = (image.channels, image.height, image.width);
        if c == 0 || h < 2 || w < 2 || image.data.len() != c * h * w {
            return Err(Error::invalid(
                "anomaly input image",
                format!(
                    "{c}x{h}x{w} with {} values (need at least 1x2x2)",
                    image.data.len()
                ),
            ));
        }
        let mut pick = rng.f32() * self.total_weight;
        let entry = self
            .entries
            .iter()
            .find(|e| {
                pick -= e.weight;
                pick < 0.0
            })
            .unwrap_or(&self.entries[self.entries.len() - 1]);
        let mut out = image.clone();
        let region = match &entry.generator {
            AnomalyGenerator::Cutout(p) => cutout(&mut out, p, rng),
            AnomalyGenerator::CutPaste(p) => cut_paste(image, &mut out, p, rng),
            AnomalyGenerator::Confetti(p) => confetti(&mut out, p, rng),
            AnomalyGenerator::PerlinBlend(p) => {
                let texture = if entry.textures.is_empty() {
                    procedural_texture(c, h, w, rng)
                } else {
                    let path = &entry.textures[rng.range_usize(0, entry.textures.len())];
                    load_texture(path, c, h, w)?
                };
                perlin_blend(&mut out, &texture, p, rng)
            }
        };
        enforce_exact_change(image, &mut out, &region);
        Ok((out, region))
    }
}

/// An image of a texture folder as a `c`×`h`×`w` texture: resized, grey or RGB as `c` asks (only
/// 1- and 3-channel images exist; other channel counts reuse the first plane).
pub fn load_texture(path: &std::path::Path, c: usize, h: usize, w: usize) -> Result<Image> {
    let spec = InputSpec {
        height: h,
        width: w,
        channels: if c == 1 { 1 } else { 3 },
    };
    let loaded = load_image(path, &spec)?;
    let mut texture = Image::zeros(c, h, w);
    for ch in 0..c {
        let src = ch.min(loaded.channels - 1);
        texture.plane_mut(ch).copy_from_slice(loaded.plane(src));
    }
    Ok(texture)
}

/// DRAEM's Perlin-masked blend of a given `texture` (a natural image, another training image, a
/// procedural texture) into `image`: the mask of Perlin noise above `p.threshold`, the texture
/// blended in with an opacity drawn from `p.opacity` (1 is NDP-Net's eq. 1,
/// `I_o·(1 − M) + I_n·M`). Returns the image and the exact mask of what changed, under this
/// module's guarantee. `p.texture_dir` is not read here: the caller chose the texture.
pub fn perlin_blend_texture(
    image: &Image,
    texture: &Image,
    p: &PerlinBlendParams,
    rng: &mut Rng,
) -> Result<(Image, Mask)> {
    let (c, h, w) = (image.channels, image.height, image.width);
    if c == 0 || h < 2 || w < 2 || image.data.len() != c * h * w {
        return Err(Error::invalid(
            "anomaly input image",
            format!(
                "{c}x{h}x{w} with {} values (need at least 1x2x2)",
                image.data.len()
            ),
        ));
    }
    if (texture.channels, texture.height, texture.width) != (c, h, w)
        || texture.data.len() != c * h * w
    {
        return Err(Error::invalid(
            "anomaly texture",
            format!(
                "{}x{}x{} for a {c}x{h}x{w} image",
                texture.channels, texture.height, texture.width
            ),
        ));
    }
    AnomalyGenerator::PerlinBlend(p.clone()).validate("perlin blend")?;
    let mut out = image.clone();
    let mask = perlin_blend(&mut out, texture, p, rng);
    enforce_exact_change(image, &mut out, &mask);
    Ok((out, mask))
}

/// One of the image operations DRAEM draws three of to alter its anomaly source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TextureOp {
    Gamma,
    Brightness,
    Solarize,
    Posterize,
    Invert,
    Autocontrast,
    Equalize,
    Rotate,
}

const TEXTURE_OPS: [TextureOp; 8] = [
    TextureOp::Gamma,
    TextureOp::Brightness,
    TextureOp::Solarize,
    TextureOp::Posterize,
    TextureOp::Invert,
    TextureOp::Autocontrast,
    TextureOp::Equalize,
    TextureOp::Rotate,
];

/// DRAEM's augmentation of the anomaly source: three distinct operations drawn from gamma contrast
/// (γ in 0.5..2 per channel), brightness (×0.8..1.2, ±30/255), solarize (with probability 0.5,
/// above a threshold of 32..128/255), posterize (1..8 bits), invert, autocontrast, histogram
/// equalisation and rotation (±45°, black outside), applied in the order drawn. DRAEM's
/// sharpness and hue/saturation operations are left out (the first barely changes a texture at
/// these sizes, the second does nothing to the grey parts vigil mostly inspects).
pub fn draem_augment(texture: &Image, rng: &mut Rng) -> Image {
    let mut ops = TEXTURE_OPS;
    rng.shuffle(&mut ops);
    let mut out = texture.clone();
    for op in &ops[..3] {
        out = apply_texture_op(&out, *op, rng);
    }
    out
}

fn apply_texture_op(image: &Image, op: TextureOp, rng: &mut Rng) -> Image {
    let (c, h, w) = (image.channels, image.height, image.width);
    let mut out = image.clone();
    let n = h * w;
    match op {
        TextureOp::Gamma => {
            for ch in 0..c {
                let gamma = rng.range_f32(0.5, 2.0);
                out.plane_mut(ch)
                    .iter_mut()
                    .for_each(|v| *v = v.max(0.0).powf(gamma));
            }
        }
        TextureOp::Brightness => {
            let (mul, add) = (rng.range_f32(0.8, 1.2), rng.range_f32(-30.0, 30.0) / 255.0);
            out.data
                .iter_mut()
                .for_each(|v| *v = (*v * mul + add).clamp(0.0, 1.0));
        }
        TextureOp::Solarize => {
            let threshold = rng.range_f32(32.0, 128.0) / 255.0;
            if rng.bool(0.5) {
                out.data
                    .iter_mut()
                    .filter(|v| **v >= threshold)
                    .for_each(|v| *v = 1.0 - *v);
            }
        }
        TextureOp::Posterize => {
            let levels = (1u32 << rng.range_usize(1, 9)) as f32;
            out.data.iter_mut().for_each(|v| {
                *v = ((*v * levels).floor().min(levels - 1.0)) / (levels - 1.0).max(1.0)
            });
        }
        TextureOp::Invert => out.data.iter_mut().for_each(|v| *v = 1.0 - *v),
        TextureOp::Autocontrast => {
            for ch in 0..c {
                let plane = out.plane_mut(ch);
                let lo = plane.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = plane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if hi > lo {
                    plane.iter_mut().for_each(|v| *v = (*v - lo) / (hi - lo));
                }
            }
        }
        TextureOp::Equalize => {
            for ch in 0..c {
                let plane = out.plane_mut(ch);
                let bin = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as usize;
                let mut cdf = [0usize; 256];
                plane.iter().for_each(|&v| cdf[bin(v)] += 1);
                for i in 1..256 {
                    cdf[i] += cdf[i - 1];
                }
                let first = cdf.iter().copied().find(|&k| k > 0).unwrap_or(0);
                if n > first {
                    let span = (n - first) as f32;
                    plane.iter_mut().for_each(|v| {
                        *v = (cdf[bin(*v)].saturating_sub(first)) as f32 / span;
                    });
                }
            }
        }
        TextureOp::Rotate => {
            let (sin_a, cos_a) = rng.range_f32(-45f32, 45.0).to_radians().sin_cos();
            let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
            for ch in 0..c {
                let src = image.plane(ch);
                let dst = out.plane_mut(ch);
                for y in 0..h {
                    for x in 0..w {
                        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                        let (sx, sy) =
                            (cos_a * dx + sin_a * dy + cx, -sin_a * dx + cos_a * dy + cy);
                        let inside =
                            sx >= 0.0 && sy >= 0.0 && sx <= (w - 1) as f32 && sy <= (h - 1) as f32;
                        dst[y * w + x] = if inside {
                            sample(src, h, w, sx, sy)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
    out
}

/// Restores pixels outside `region`, clamps, and pushes region pixels that changed by less than
/// [`MIN_CHANGE`] to that change (in their direction, or away from the nearer bound).
fn enforce_exact_change(original: &Image, out: &mut Image, region: &Mask) {
    let n = original.height * original.width;
    let c = original.channels;
    for (i, &m) in region.data.iter().enumerate() {
        if m == 0 {
            for ch in 0..c {
                out.data[ch * n + i] = original.data[ch * n + i];
            }
            continue;
        }
        let mut largest = 0.0f32;
        let mut total = 0.0f32;
        for ch in 0..c {
            let v = out.data[ch * n + i].clamp(0.0, 1.0);
            out.data[ch * n + i] = v;
            let d = v - original.data[ch * n + i];
            largest = largest.max(d.abs());
            total += d;
        }
        if largest >= MIN_CHANGE {
            continue;
        }
        for ch in 0..c {
            let o = original.data[ch * n + i];
            let d = out.data[ch * n + i] - o;
            let mut sign = if d != 0.0 { d.signum() } else { total.signum() };
            if sign == 0.0 {
                sign = if o < 0.5 { 1.0 } else { -1.0 };
            }
            let pushed = o + sign * MIN_CHANGE;
            out.data[ch * n + i] = if (0.0..=1.0).contains(&pushed) {
                pushed
            } else {
                o - sign * MIN_CHANGE
            };
        }
    }
}

fn mean_colour(image: &Image) -> Vec<f32> {
    let n = (image.height * image.width) as f32;
    (0..image.channels)
        .map(|c| image.plane(c).iter().sum::<f32>() / n)
        .collect()
}

/// A random colour clearly apart from `reference` (redrawn a few times; the exact-change step
/// covers the rare colour that stays close).
fn distinct_colour(reference: &[f32], rng: &mut Rng) -> Vec<f32> {
    let mut colour: Vec<f32> = reference.iter().map(|_| rng.f32()).collect();
    for _ in 0..8 {
        let distance = colour
            .iter()
            .zip(reference)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / reference.len() as f32;
        if distance >= MIN_COLOUR_DISTANCE {
            break;
        }
        colour = reference.iter().map(|_| rng.f32()).collect();
    }
    colour
}

/// Width and height of a rectangle of `area` (fraction) and aspect ratio in
/// [1/max_aspect, max_aspect] (log-uniform), clipped to the image.
fn rectangle_size(h: usize, w: usize, area: Range, max_aspect: f32, rng: &mut Rng) -> (f32, f32) {
    let a = rng.range_f32(area[0], area[1]) * (h * w) as f32;
    let log_aspect = max_aspect.ln();
    let aspect = rng.range_f32(-log_aspect, log_aspect).exp();
    let rw = (a * aspect).sqrt().clamp(1.0, w as f32);
    let rh = (a / aspect).sqrt().clamp(1.0, h as f32);
    (rw, rh)
}

/// The top-left pixel of a `size`-long span placed uniformly inside `len`.
fn span_start(len: usize, size: usize, rng: &mut Rng) -> usize {
    rng.range_usize(0, len - size.min(len) + 1)
}

fn cutout(out: &mut Image, p: &CutoutParams, rng: &mut Rng) -> Mask {
    let (c, h, w) = (out.channels, out.height, out.width);
    let (rw, rh) = rectangle_size(h, w, p.area, p.max_aspect, rng);
    let (rw, rh) = (rw.round() as usize, rh.round() as usize);
    let (x0, y0) = (span_start(w, rw, rng), span_start(h, rh, rng));
    let noise = rng.bool(p.noise_probability);
    let colour = distinct_colour(&mean_colour(out), rng);
    let n = h * w;
    let mut mask = Mask::zeros(h, w);
    for y in y0..y0 + rh {
        for x in x0..x0 + rw {
            let i = y * w + x;
            mask.data[i] = 1;
            for (ch, &col) in colour.iter().enumerate().take(c) {
                out.data[ch * n + i] = if noise { rng.f32() } else { col };
            }
        }
    }
    mask
}

/// Bilinear sample of channel plane `plane` at (x, y), clamped to the border.
fn sample(plane: &[f32], h: usize, w: usize, x: f32, y: f32) -> f32 {
    let x = x.clamp(0.0, (w - 1) as f32);
    let y = y.clamp(0.0, (h - 1) as f32);
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let top = plane[y0 * w + x0] * (1.0 - fx) + plane[y0 * w + x1] * fx;
    let bottom = plane[y1 * w + x0] * (1.0 - fx) + plane[y1 * w + x1] * fx;
    top * (1.0 - fy) + bottom * fy
}

fn cut_paste(original: &Image, out: &mut Image, p: &CutPasteParams, rng: &mut Rng) -> Mask {
    let (c, h, w) = (original.channels, original.height, original.width);
    let side = h.min(w) as f32;
    let (rw, rh, angle) = match p.variant {
        CutPasteVariant::Patch => {
            let (rw, rh) = rectangle_size(h, w, p.area, p.max_aspect, rng);
            (rw, rh, 0.0)
        }
        CutPasteVariant::Scar => {
            let width = (rng.range_f32(p.scar_width[0], p.scar_width[1]) * side).max(1.0);
            let length = (rng.range_f32(p.scar_length[0], p.scar_length[1]) * side).max(2.0);
            let max_rotation = p.scar_max_rotation_deg.to_radians();
            // Scars lie mostly along or across the image, as in the paper's augmentation.
            let base = if rng.bool(0.5) { 0.0 } else { TAU / 4.0 };
            let angle = base + rng.range_f32(-max_rotation, max_rotation);
            (width, length, angle)
        }
    };
    let (half_w, half_h) = (rw / 2.0, rh / 2.0);
    let centre = |rng: &mut Rng, half: f32, len: usize| {
        let lo = half.min((len - 1) as f32 / 2.0);
        rng.range_f32(lo, (len as f32 - lo).max(lo + 1.0)).floor()
    };
    let src = (centre(rng, half_w, w), centre(rng, half_h, h));
    // The destination is drawn away from the source when the image leaves room.
    let mut dst = (centre(rng, half_w, w), centre(rng, half_h, h));
    for _ in 0..8 {
        if (dst.0 - src.0).abs() > half_w || (dst.1 - src.1).abs() > half_h {
            break;
        }
        dst = (centre(rng, half_w, w), centre(rng, half_h, h));
    }
    let brightness = rng.range_f32(-p.jitter, p.jitter);
    let contrast = 1.0 + rng.range_f32(-p.jitter, p.jitter);
    let tints: Vec<f32> = (0..c)
        .map(|_| rng.range_f32(-p.jitter, p.jitter) / 2.0)
        .collect();
    let means = mean_colour(original);

    let (sin_a, cos_a) = angle.sin_cos();
    let reach = (half_w * half_w + half_h * half_h).sqrt().ceil() as isize;
    let n = h * w;
    let mut mask = Mask::zeros(h, w);
    for dy in -reach..=reach {
        for dx in -reach..=reach {
            let (x, y) = (dst.0 as isize + dx, dst.1 as isize + dy);
            if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
                continue;
            }
            // Pasted-frame coordinates of this pixel; the cut region is axis-aligned at `src`.
            let (fx, fy) = (dx as f32, dy as f32);
            let u = fx * cos_a + fy * sin_a;
            let v = -fx * sin_a + fy * cos_a;
            if u.abs() > half_w || v.abs() > half_h {
                continue;
            }
            let i = y as usize * w + x as usize;
            mask.data[i] = 1;
            for (ch, (&mean, &tint)) in means.iter().zip(&tints).enumerate() {
                let s = sample(original.plane(ch), h, w, src.0 + u, src.1 + v);
                out.data[ch * n + i] = (s - mean) * contrast + mean + brightness + tint;
            }
        }
    }
    mask
}

/// Which of confetti's two layers a blob belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfettiLayer {
    /// Random colour, rotated.
    Colour,
    /// −1 in every channel, axis-aligned.
    Dark,
}

/// One square of confetti noise.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfettiBlob {
    pub layer: ConfettiLayer,
    /// The pixel (row, column) the blob was centred on.
    pub row: usize,
    pub col: usize,
    /// Side in pixels of the image it was drawn for (already scaled from the reference size).
    pub side: usize,
    /// Rotation about the centre, degrees.
    pub angle_deg: f32,
    /// The value this blob adds, per channel (before the invert rule).
    pub value: Vec<f32>,
}

impl ConfettiBlob {
    /// The square's centre in pixel coordinates (x, y). An even side has no centre pixel; as in
    /// FCDD it then reaches one pixel further right and down than left and up.
    fn centre(&self) -> (f32, f32) {
        let shift = if self.side.is_multiple_of(2) {
            0.5
        } else {
            0.0
        };
        (self.col as f32 + shift, self.row as f32 + shift)
    }

    /// Whether pixel (x, y) lies inside the (rotated) square: its centre, rotated back by the
    /// blob's angle, falls within half a side of the blob's centre on both axes (nearest-pixel
    /// rendering, like FCDD's order-0 rotation).
    pub fn covers(&self, x: usize, y: usize) -> bool {
        let (cx, cy) = self.centre();
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let (sin_a, cos_a) = self.angle_deg.to_radians().sin_cos();
        let u = dx * cos_a + dy * sin_a;
        let v = -dx * sin_a + dy * cos_a;
        let half = self.side as f32 / 2.0;
        u.abs() <= half && v.abs() <= half
    }

    /// The pixels the blob covers, clipped to an `h`×`w` image, as row-major indices.
    fn pixels(&self, h: usize, w: usize) -> impl Iterator<Item = usize> + '_ {
        // A rotated square reaches at most half its diagonal from the centre.
        let reach = (self.side as f32 * std::f32::consts::FRAC_1_SQRT_2).ceil() as usize + 1;
        let rows = self.row.saturating_sub(reach)..(self.row + reach + 1).min(h);
        let cols = self.col.saturating_sub(reach)..(self.col + reach + 1).min(w);
        rows.flat_map(move |y| cols.clone().map(move |x| (y, x)))
            .filter(|&(y, x)| self.covers(x, y))
            .map(move |(y, x)| y * w + x)
    }
}

/// Confetti noise for one image: the blobs and their sum, before the invert rule.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfettiNoise {
    /// C×H×W values to add to the image (in 0..=1 units; negative where dark).
    pub noise: Image,
    pub blobs: Vec<ConfettiBlob>,
}

/// Uniform in [0, 1) with 53 bits, for geometric gaps at rates far below f32's resolution.
fn uniform_f64(rng: &mut Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The pixels (row-major, ascending) of `n` where a Bernoulli(`p`) draw per pixel succeeds,
/// conditioned on at least one success: FCDD's `ensureblob` redraws a blob-less mask, which is
/// this conditional law. Drawn as geometric gaps (the first one truncated to the image), so a
/// rate of 1e-5 costs a few draws rather than one per pixel, and no redraw loop can stall.
fn bernoulli_positions(n: usize, p: f64, rng: &mut Rng) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    if p >= 1.0 {
        return (0..n).collect();
    }
    let log_q = (-p).ln_1p();
    // P(first success at index < k) = 1 - q^k; conditioned on one below n it is that over 1 - q^n.
    let any = -(n as f64 * log_q).exp_m1();
    let u = uniform_f64(rng) * any;
    let first = ((-u).ln_1p() / log_q).ceil() as usize;
    let mut positions = vec![first.saturating_sub(1).min(n - 1)];
    loop {
        let gap = ((-uniform_f64(rng)).ln_1p() / log_q).ceil().max(1.0);
        let next = positions[positions.len() - 1] as f64 + gap;
        if next >= n as f64 {
            return positions;
        }
        positions.push(next as usize);
    }
}

/// Draws FCDD's confetti noise for a `channels`×`height`×`width` image.
///
/// Two layers, as FCDD's MVTec-AD `confetti` mode: coloured blobs (rate `colour_rate`, one random
/// value per channel in {0, 1/255, …, 1} like FCDD's `randint(0, 256)`, rotated by up to
/// `max_rotation_deg` either way) and dark blobs (rate `dark_rate`, −1 everywhere, FCDD's fill
/// value −255, not rotated). Within a layer a later blob overwrites an earlier one (FCDD assigns
/// by index); the layers add. Each layer has at least one blob.
pub fn confetti_noise(
    channels: usize,
    height: usize,
    width: usize,
    p: &ConfettiParams,
    rng: &mut Rng,
) -> ConfettiNoise {
    let n = height * width;
    let scale = height.min(width) as f32 / p.reference_size.max(1) as f32;
    let mut noise = Image::zeros(channels, height, width);
    let mut blobs = Vec::new();
    for layer in [ConfettiLayer::Colour, ConfettiLayer::Dark] {
        let rate = match layer {
            ConfettiLayer::Colour => p.colour_rate,
            ConfettiLayer::Dark => p.dark_rate,
        };
        let mut plane = vec![0.0f32; channels * n];
        for position in bernoulli_positions(n, rate as f64, rng) {
            let side_ref = rng.range_usize(p.side_px[0], p.side_px[1] + 1);
            let side = ((side_ref as f32 * scale).round() as usize).max(1);
            let (value, angle_deg) = match layer {
                ConfettiLayer::Colour => {
                    let value = (0..channels)
                        .map(|_| rng.range_usize(0, 256) as f32 / 255.0)
                        .collect();
                    let max = p.max_rotation_deg;
                    (value, rng.range_f32(-max, max))
                }
                ConfettiLayer::Dark => (vec![-1.0; channels], 0.0),
            };
            let blob = ConfettiBlob {
                layer,
                row: position / width,
                col: position % width,
                side,
                angle_deg,
                value,
            };
            for i in blob.pixels(height, width) {
                for (ch, &v) in blob.value.iter().enumerate() {
                    plane[ch * n + i] = v;
                }
            }
            blobs.push(blob);
        }
        for (sum, v) in noise.data.iter_mut().zip(plane) {
            *sum += v;
        }
    }
    ConfettiNoise { noise, blobs }
}

/// The mean change (over all values) that adding `noise` and clamping makes to `image`.
fn mean_clamped_change(image: &Image, noise: &[f32], sign: f32) -> f32 {
    let total: f64 = image
        .data
        .iter()
        .zip(noise)
        .map(|(&v, &d)| ((v + sign * d).clamp(0.0, 1.0) - v) as f64)
        .sum();
    (total / image.data.len().max(1) as f64) as f32
}

/// FCDD's invert threshold, 0.025 on its 0..=255 scale.
const CONFETTI_INVERT_THRESHOLD: f32 = 0.025 / 255.0;

/// Adds confetti noise to `out` and clamps. FCDD's invert rule: when the noise changes the image
/// by less than [`CONFETTI_INVERT_THRESHOLD`] on average (signed, over all values) and the negated
/// noise would change it more, the negated noise is added. No border smoothing (the HSC paper's
/// runs did not smooth). The region is exactly the pixels that changed in some channel; should
/// none change (a dark blob under a white coloured one on a saturated image, say), it is redrawn,
/// and after a few tries the blobs' pixels are marked for the exact-change step to push.
fn confetti(out: &mut Image, p: &ConfettiParams, rng: &mut Rng) -> Mask {
    let (c, h, w) = (out.channels, out.height, out.width);
    let n = h * w;
    let original = out.clone();
    let mut mask = Mask::zeros(h, w);
    let mut last = None;
    for _ in 0..8 {
        let ConfettiNoise { mut noise, blobs } = confetti_noise(c, h, w, p, rng);
        let diff = mean_clamped_change(&original, &noise.data, 1.0);
        let diff_inverted = mean_clamped_change(&original, &noise.data, -1.0);
        if diff.abs() < CONFETTI_INVERT_THRESHOLD && diff_inverted.abs() > diff.abs() {
            noise.data.iter_mut().for_each(|v| *v = -*v);
        }
        for ((o, &v), &d) in out.data.iter_mut().zip(&original.data).zip(&noise.data) {
            *o = (v + d).clamp(0.0, 1.0);
        }
        for (i, m) in mask.data.iter_mut().enumerate() {
            *m = u8::from((0..c).any(|ch| out.data[ch * n + i] != original.data[ch * n + i]));
        }
        if mask.any() {
            return mask;
        }
        last = Some(blobs);
    }
    for blob in last.iter().flatten() {
        for i in blob.pixels(h, w) {
            mask.data[i] = 1;
        }
    }
    mask
}

/// Classic gradient noise on an unbounded lattice (hashed gradients), roughly in -0.71..0.71.
struct Perlin {
    permutation: [u8; 256],
    gradients: [(f32, f32); 256],
}

impl Perlin {
    fn new(rng: &mut Rng) -> Perlin {
        let mut permutation = [0u8; 256];
        for (i, p) in permutation.iter_mut().enumerate() {
            *p = i as u8;
        }
        rng.shuffle(&mut permutation);
        let mut gradients = [(0.0, 0.0); 256];
        for g in gradients.iter_mut() {
            let (s, c) = rng.range_f32(0.0, TAU).sin_cos();
            *g = (c, s);
        }
        Perlin {
            permutation,
            gradients,
        }
    }

    fn gradient(&self, ix: i64, iy: i64) -> (f32, f32) {
        let a = self.permutation[(ix & 255) as usize] as i64;
        self.gradients[self.permutation[((a + iy) & 255) as usize] as usize]
    }

    fn at(&self, x: f32, y: f32) -> f32 {
        let (x0, y0) = (x.floor(), y.floor());
        let (fx, fy) = (x - x0, y - y0);
        let (ix, iy) = (x0 as i64, y0 as i64);
        let corner = |cx: i64, cy: i64| {
            let g = self.gradient(ix + cx, iy + cy);
            g.0 * (fx - cx as f32) + g.1 * (fy - cy as f32)
        };
        let fade = |t: f32| t * t * t * (t * (t * 6.0 - 15.0) + 10.0);
        let (u, v) = (fade(fx), fade(fy));
        let top = corner(0, 0) + u * (corner(1, 0) - corner(0, 0));
        let bottom = corner(0, 1) + u * (corner(1, 1) - corner(0, 1));
        top + v * (bottom - top)
    }

    /// A field of `h`×`w` values with `cells` lattice cells across the longer side, rotated and
    /// offset at random, scaled by √2 to roughly -1..1 as in DRAEM.
    fn field(&self, h: usize, w: usize, cells: f32, rng: &mut Rng) -> Vec<f32> {
        let scale = cells / h.max(w) as f32;
        let (sin_a, cos_a) = rng.range_f32(0.0, TAU).sin_cos();
        let (ox, oy) = (rng.range_f32(0.0, 256.0), rng.range_f32(0.0, 256.0));
        let mut values = Vec::with_capacity(h * w);
        for y in 0..h {
            for x in 0..w {
                let (px, py) = (x as f32 * scale, y as f32 * scale);
                let rx = px * cos_a - py * sin_a + ox;
                let ry = px * sin_a + py * cos_a + oy;
                values.push(SQRT_2 * self.at(rx, ry));
            }
        }
        values
    }
}

/// One of: two random colours mixed by Perlin noise, rotated stripes, or a rotated checkerboard.
pub fn procedural_texture(c: usize, h: usize, w: usize, rng: &mut Rng) -> Image {
    let a: Vec<f32> = (0..c).map(|_| rng.f32()).collect();
    let b: Vec<f32> = (0..c).map(|_| rng.f32()).collect();
    let mix: Vec<f32> = match rng.range_usize(0, 3) {
        0 => {
            let cells = 2f32.powi(rng.range_usize(2, 6) as i32);
            Perlin::new(rng)
                .field(h, w, cells, rng)
                .into_iter()
                .map(|v| (v * 0.5 + 0.5).clamp(0.0, 1.0))
                .collect()
        }
        kind => {
            let period = rng.range_f32(3.0, 16.0);
            let (sin_a, cos_a) = rng.range_f32(0.0, TAU).sin_cos();
            (0..h * w)
                .map(|i| {
                    let (x, y) = ((i % w) as f32, (i / w) as f32);
                    let u = (x * cos_a + y * sin_a) / period;
                    let v = (-x * sin_a + y * cos_a) / period;
                    if kind == 1 {
                        0.5 + 0.5 * (TAU * u).sin()
                    } else {
                        ((u.floor() + v.floor()) as i64).rem_euclid(2) as f32
                    }
                })
                .collect()
        }
    };
    let mut texture = Image::zeros(c, h, w);
    for ch in 0..c {
        for (t, &m) in texture.plane_mut(ch).iter_mut().zip(&mix) {
            *t = a[ch] * (1.0 - m) + b[ch] * m;
        }
    }
    texture
}

fn perlin_blend(out: &mut Image, texture: &Image, p: &PerlinBlendParams, rng: &mut Rng) -> Mask {
    let (c, h, w) = (out.channels, out.height, out.width);
    let n = h * w;
    let perlin = Perlin::new(rng);
    let mut values = Vec::new();
    for _ in 0..8 {
        let k = rng.range_usize(p.scale_pow[0] as usize, p.scale_pow[1] as usize + 1);
        values = perlin.field(h, w, 2f32.powi(k as i32), rng);
        if values.iter().any(|&v| v > p.threshold) {
            break;
        }
    }
    // Should every draw stay below the threshold, mask the field's peak instead of nothing.
    let peak = values.iter().copied().fold(f32::MIN, f32::max);
    let masked = |v: f32| v > p.threshold || v >= peak;
    let opacity = if p.opacity[0] < p.opacity[1] {
        rng.range_f32(p.opacity[0], p.opacity[1])
    } else {
        p.opacity[0]
    };
    let mut mask = Mask::zeros(h, w);
    for (i, &v) in values.iter().enumerate() {
        if masked(v) {
            mask.data[i] = 1;
            for ch in 0..c {
                let o = &mut out.data[ch * n + i];
                *o = *o * (1.0 - opacity) + texture.data[ch * n + i] * opacity;
            }
        }
    }
    mask
}
