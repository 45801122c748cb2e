//! Report pictures (PNG): ROC curves, score histograms and anomaly-map overlays.
//!
//! Drawn on a plain RGB raster with text from embedded pre-rasterised DejaVu Sans (see
//! `assets/`), so nothing depends on system fonts or a plotting library.
mod axes;
mod canvas;
mod font;

use std::path::Path;

use image::ImageEncoder;

use crate::data::image::{Image, Mask};
use crate::error::{Error, Result};
use crate::metrics::Roc;
use axes::{nice_ticks, tick_label, Axes, Labels};
use canvas::{Align, Canvas, Rgb, INK, WHITE};
use font::Font;

const CURVE: Rgb = [31, 105, 180];
const GOOD: Rgb = [52, 120, 190];
const DEFECT: Rgb = [215, 70, 45];
const CHANCE: Rgb = [150, 150, 150];
const CONTOUR: Rgb = [255, 255, 255];

/// A ROC curve with the chance diagonal, the area under it shaded and `auroc` in the corner.
pub fn roc_png(roc: &Roc, auroc: Option<f64>, title: &str, path: &Path) -> Result<()> {
    if roc.fpr.len() != roc.tpr.len() || roc.fpr.is_empty() {
        return Err(Error::invalid(
            "roc",
            format!(
                "{} fpr values and {} tpr values",
                roc.fpr.len(),
                roc.tpr.len()
            ),
        ));
    }
    let (regular, bold) = (Font::regular()?, Font::bold()?);
    let mut canvas = Canvas::new(560, 540, WHITE);
    let axes = Axes::inside(canvas.width, canvas.height, (-0.02, 1.02), (-0.02, 1.02));
    axes.draw_grid(&mut canvas);

    // Shade column by column under the curve (at a vertical step, the top of the step).
    for column in axes.px(0.0).round() as i64..axes.px(1.0).round() as i64 {
        let fpr = axes.x_range.0
            + (column as f64 + 0.5 - axes.left) / axes.width * (axes.x_range.1 - axes.x_range.0);
        let top = axes.py(curve_at(&roc.fpr, &roc.tpr, fpr));
        let bottom = axes.py(0.0);
        canvas.fill_rect(column as f64, top, column as f64 + 1.0, bottom, CURVE, 0.12);
    }
    let (start, end) = ((axes.px(0.0), axes.py(0.0)), (axes.px(1.0), axes.py(1.0)));
    canvas.dashed_line(start, end, 1.2, 6.0, CHANCE);

    // Points closer than half a pixel to the last drawn one add nothing visible; skipping them
    // keeps pixel-level curves with millions of points cheap.
    let mut last = (axes.px(roc.fpr[0]), axes.py(roc.tpr[0]));
    for (i, (&fpr, &tpr)) in roc.fpr.iter().zip(&roc.tpr).enumerate().skip(1) {
        let point = (axes.px(fpr), axes.py(tpr));
        let far = (point.0 - last.0).abs() >= 0.5 || (point.1 - last.1).abs() >= 0.5;
        if far || i + 1 == roc.fpr.len() {
            canvas.line(last, point, 2.2, CURVE);
            last = point;
        }
    }

    let labels = Labels {
        title,
        x: "False positive rate",
        y: "True positive rate",
    };
    axes.draw_frame(&mut canvas, &regular, &bold, &labels);
    if let Some(area) = auroc {
        let text = format!("AUROC {area:.4}");
        let (x, y) = (
            axes.right() - 12.0,
            axes.bottom() - 12.0 - f64::from(bold.line_height),
        );
        canvas.text(&bold, x, y, &text, CURVE, Align::Right);
    }
    canvas.save_png(path)
}

/// The tpr of the curve at `fpr`, linearly interpolated; at a vertical step, its top.
fn curve_at(fprs: &[f64], tprs: &[f64], fpr: f64) -> f64 {
    let after = fprs.partition_point(|&f| f <= fpr);
    match (after.checked_sub(1), tprs.get(after)) {
        (None, _) => tprs[0],
        (Some(before), None) => tprs[before],
        (Some(before), Some(&next)) => {
            let span = fprs[after] - fprs[before];
            tprs[before] + (next - tprs[before]) * (fpr - fprs[before]) / span
        }
    }
}

/// Overlaid histograms of good and defect scores, each as shares of its own class so an
/// imbalanced test set still shows both, with the threshold as a dashed line. Non-finite scores
/// cannot be placed on the axis; their number is printed instead.
pub fn histogram_png(
    good: &[f32],
    defect: &[f32],
    threshold: Option<f32>,
    title: &str,
    path: &Path,
) -> Result<()> {
    let finite = |v: &&f32| v.is_finite();
    let threshold = threshold.filter(|t| t.is_finite()).map(f64::from);
    let (mut lo, mut hi) = good
        .iter()
        .chain(defect)
        .filter(finite)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(f64::from(v)), hi.max(f64::from(v)))
        });
    if lo > hi {
        return Err(Error::invalid(
            "histogram scores",
            "no finite score to plot",
        ));
    }
    if let Some(t) = threshold {
        (lo, hi) = (lo.min(t), hi.max(t));
    }
    if hi - lo < 1e-12 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }

    const BINS: usize = 40;
    let bin_width = (hi - lo) / BINS as f64;
    let shares = |scores: &[f32]| {
        let mut counts = [0usize; BINS];
        let values = scores.iter().filter(finite);
        let total = values.clone().count();
        for &v in values {
            let bin = ((f64::from(v) - lo) / bin_width) as usize;
            counts[bin.min(BINS - 1)] += 1;
        }
        counts.map(|c| {
            if total == 0 {
                0.0
            } else {
                c as f64 / total as f64
            }
        })
    };
    let (good_shares, defect_shares) = (shares(good), shares(defect));
    let top = good_shares
        .iter()
        .chain(&defect_shares)
        .fold(0.0f64, |m, &v| m.max(v));

    let (regular, bold) = (Font::regular()?, Font::bold()?);
    let mut canvas = Canvas::new(680, 460, WHITE);
    let pad = 0.03 * (hi - lo);
    let axes = Axes::inside(
        canvas.width,
        canvas.height,
        (lo - pad, hi + pad),
        (0.0, top * 1.15),
    );
    axes.draw_grid(&mut canvas);
    for (bars, color) in [(&good_shares, GOOD), (&defect_shares, DEFECT)] {
        for (i, &share) in bars.iter().enumerate().filter(|(_, &s)| s > 0.0) {
            let left = axes.px(lo + i as f64 * bin_width);
            let right = axes.px(lo + (i + 1) as f64 * bin_width);
            canvas.fill_rect(
                left + 0.5,
                axes.py(share),
                right - 0.5,
                axes.bottom(),
                color,
                0.55,
            );
        }
    }
    if let Some(t) = threshold {
        let x = axes.px(t);
        canvas.dashed_line((x, axes.bottom()), (x, axes.top), 1.5, 5.0, INK);
        let ticks = nice_ticks(lo, hi, 6);
        let text = format!("threshold {}", precise_label(t, &ticks));
        let (align, x) = if x > axes.left + axes.width * 0.7 {
            (Align::Right, x - 6.0)
        } else {
            (Align::Left, x + 6.0)
        };
        canvas.text(&regular, x, axes.top + 6.0, &text, INK, align);
    }

    let labels = Labels {
        title,
        x: "Anomaly score",
        y: "Share of class",
    };
    axes.draw_frame(&mut canvas, &regular, &bold, &labels);

    let skipped = good.len() + defect.len() - good.iter().chain(defect).filter(finite).count();
    let mut legend = vec![
        (Some(GOOD), format!("good (n={})", good.len())),
        (Some(DEFECT), format!("defect (n={})", defect.len())),
    ];
    if skipped > 0 {
        legend.push((None, format!("{skipped} non-finite not shown")));
    }
    let line = f64::from(regular.line_height) + 4.0;
    // The legend goes to the side away from the threshold line.
    let threshold_right = threshold.is_some_and(|t| axes.px(t) > axes.left + axes.width / 2.0);
    let x = if threshold_right {
        axes.left + 12.0
    } else {
        axes.right() - 170.0
    };
    let y = axes.top + 26.0;
    let legend_width = legend
        .iter()
        .map(|(_, t)| regular.text_width(t))
        .max()
        .unwrap_or(0);
    let legend_height = legend.len() as f64 * line;
    let backing = (x + 24.0 + f64::from(legend_width), y + legend_height + 2.0);
    canvas.fill_rect(x - 6.0, y - 4.0, backing.0, backing.1, WHITE, 0.85);
    for (row, (color, text)) in legend.iter().enumerate() {
        let y = y + row as f64 * line;
        if let Some(color) = color {
            canvas.fill_rect(x, y + 3.0, x + 12.0, y + 15.0, *color, 0.7);
        }
        canvas.text(&regular, x + 18.0, y, text, INK, Align::Left);
    }
    canvas.save_png(path)
}

/// A tick-style label with two more decimals, so a threshold between ticks is told apart.
fn precise_label(value: f64, ticks: &[f64]) -> String {
    let step = match ticks {
        [a, b, ..] => (b - a) / 100.0,
        _ => 0.01,
    };
    tick_label(value, &[0.0, step])
}

/// The image on the left; on the right, the image under a jet-coloured anomaly map (blue =
/// `map_range.0` or lower, red = `map_range.1` or higher); the ground-truth contour on both; a
/// colour bar. A fixed `map_range` (e.g. from validation scores) keeps overlays comparable.
/// Small images are enlarged by whole pixels so the picture stays readable.
pub fn heatmap_overlay(
    image: &Image,
    map: &[f32],
    map_range: (f32, f32),
    mask: Option<&Mask>,
    path: &Path,
) -> Result<()> {
    let (h, w) = (image.height, image.width);
    let planes = image.channels * h * w;
    if !matches!(image.channels, 1 | 3) || image.data.len() != planes || h == 0 || w == 0 {
        return Err(Error::invalid(
            "overlay image",
            format!(
                "{} values for {} channels of {h}x{w} (need 1 or 3 channels)",
                image.data.len(),
                image.channels
            ),
        ));
    }
    if map.len() != h * w {
        return Err(Error::invalid(
            "overlay map",
            format!("{} values for a {h}x{w} image", map.len()),
        ));
    }
    if let Some(m) = mask.filter(|m| (m.height, m.width) != (h, w) || m.data.len() != h * w) {
        return Err(Error::invalid(
            "overlay mask",
            format!("{}x{} mask for a {h}x{w} image", m.height, m.width),
        ));
    }
    let (lo, hi) = map_range;
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return Err(Error::invalid(
            "overlay map_range",
            format!("({lo}, {hi}) is not a finite increasing range"),
        ));
    }

    let (regular, bold) = (Font::regular()?, Font::bold()?);
    let scale = (256 / h.max(w)).clamp(1, 8);
    let (panel_w, panel_h) = (w * scale, h * scale);
    let (margin, caption) = (12usize, 30usize);
    let bar_x = margin + 2 * panel_w + margin + 16;
    let bar_w = 16;
    let width = bar_x + bar_w + 64;
    let height = caption + panel_h + margin;
    let mut canvas = Canvas::new(width, height, WHITE);

    let second = margin + panel_w + margin;
    let source_rgb = |x: usize, y: usize| -> Rgb {
        let pixel = y * w + x;
        let level =
            |c: usize| (image.data[c * h * w + pixel].clamp(0.0, 1.0) * 255.0).round() as u8;
        if image.channels == 1 {
            [level(0); 3]
        } else {
            [level(0), level(1), level(2)]
        }
    };
    for y in 0..panel_h {
        for x in 0..panel_w {
            let (sx, sy) = (x / scale, y / scale);
            let original = source_rgb(sx, sy);
            let t = (map[sy * w + sx] - lo) / (hi - lo);
            let heat = jet(t);
            let mixed =
                [0, 1, 2].map(|c| ((u16::from(original[c]) + u16::from(heat[c])) / 2) as u8);
            canvas.set(margin + x, caption + y, original);
            canvas.set(second + x, caption + y, mixed);
        }
    }
    if let Some(mask) = mask {
        let thickness = if scale >= 3 { 2 } else { 1 };
        for y in 0..panel_h {
            for x in 0..panel_w {
                if on_contour(mask, scale, thickness, x, y) {
                    canvas.set(margin + x, caption + y, CONTOUR);
                    canvas.set(second + x, caption + y, CONTOUR);
                }
            }
        }
    }

    let caption_y = 7.0;
    canvas.text(
        &bold,
        (margin + panel_w / 2) as f64,
        caption_y,
        "image",
        INK,
        Align::Center,
    );
    let max = map.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let map_caption = format!("anomaly map (max {max:.3})");
    let centre = (second + panel_w / 2) as f64;
    canvas.text(&bold, centre, caption_y, &map_caption, INK, Align::Center);

    for y in 0..panel_h {
        let t = 1.0 - (y as f32 + 0.5) / panel_h as f32;
        for x in 0..bar_w {
            canvas.set(bar_x + x, caption + y, jet(t));
        }
    }
    let ticks = nice_ticks(f64::from(lo), f64::from(hi), 5);
    let bar_y =
        |v: f64| caption as f64 + (1.0 - (v - f64::from(lo)) / f64::from(hi - lo)) * panel_h as f64;
    let half_line = f64::from(regular.line_height) / 2.0;
    let bar_right = (bar_x + bar_w) as f64;
    for &v in &ticks {
        let y = bar_y(v);
        canvas.line((bar_right, y), (bar_right + 4.0, y), 1.0, INK);
        let text = tick_label(v, &ticks);
        canvas.text(
            &regular,
            bar_right + 7.0,
            y - half_line,
            &text,
            INK,
            Align::Left,
        );
    }
    canvas.save_png(path)
}

/// Whether enlarged pixel (x, y) is inside the mask within `thickness` pixels of its edge.
fn on_contour(mask: &Mask, scale: usize, thickness: usize, x: usize, y: usize) -> bool {
    let inside = |x: i64, y: i64| {
        let (sx, sy) = (x.div_euclid(scale as i64), y.div_euclid(scale as i64));
        sx >= 0
            && sy >= 0
            && (sx as usize) < mask.width
            && (sy as usize) < mask.height
            && mask.data[sy as usize * mask.width + sx as usize] != 0
    };
    let (x, y, t) = (x as i64, y as i64, thickness as i64);
    inside(x, y) && (-t..=t).any(|dy| (-t..=t).any(|dx| !inside(x + dx, y + dy)))
}

/// The jet colour map: blue at 0, through cyan, green and yellow, to red at 1. NaN is red, as
/// NaN scores rank as most anomalous.
fn jet(t: f32) -> Rgb {
    let t = if t.is_nan() { 1.0 } else { t.clamp(0.0, 1.0) };
    let channel =
        |centre: f32| ((1.5 - (4.0 * t - centre).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// Writes row-major RGB bytes as a PNG file.
pub fn write_png_rgb(pixels: &[u8], width: usize, height: usize, path: &Path) -> Result<()> {
    if pixels.len() != 3 * width * height {
        return Err(Error::invalid(
            "png pixels",
            format!("{} bytes for {width}x{height} RGB", pixels.len()),
        ));
    }
    let to_u32 = |v: usize| {
        u32::try_from(v).map_err(|_| Error::invalid("png size", format!("{v} pixels is too large")))
    };
    let mut encoded = Vec::new();
    image::codecs::png::PngEncoder::new(&mut encoded)
        .write_image(
            pixels,
            to_u32(width)?,
            to_u32(height)?,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
    std::fs::write(path, encoded).map_err(|e| Error::io(path, e))
}
