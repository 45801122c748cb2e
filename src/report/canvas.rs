//! A small RGB raster with anti-aliased lines and text, enough for report plots.
use std::path::Path;

use super::font::Font;
use crate::error::Result;

pub(crate) type Rgb = [u8; 3];

pub(crate) const WHITE: Rgb = [255, 255, 255];
pub(crate) const INK: Rgb = [40, 40, 40];
pub(crate) const GRID: Rgb = [225, 225, 225];

/// Horizontal placement of text relative to the given x.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Center,
    Right,
}

pub(crate) struct Canvas {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize, background: Rgb) -> Self {
        Canvas {
            width,
            height,
            pixels: background.repeat(width * height),
        }
    }

    pub fn set(&mut self, x: usize, y: usize, color: Rgb) {
        if x < self.width && y < self.height {
            let i = 3 * (y * self.width + x);
            self.pixels[i..i + 3].copy_from_slice(&color);
        }
    }

    /// Mixes `color` into the pixel with weight `alpha` (0..=1); outside the canvas does nothing.
    pub fn blend(&mut self, x: i64, y: i64, color: Rgb, alpha: f32) {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
            return;
        }
        let i = 3 * (y as usize * self.width + x as usize);
        let alpha = alpha.clamp(0.0, 1.0);
        for (channel, &c) in self.pixels[i..i + 3].iter_mut().zip(&color) {
            *channel = (f32::from(*channel) * (1.0 - alpha) + f32::from(c) * alpha).round() as u8;
        }
    }

    /// Fills the pixels whose centres lie in `[x0, x1) x [y0, y1)`.
    pub fn fill_rect(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, color: Rgb, alpha: f32) {
        let (xa, xb) = (x0.round() as i64, x1.round() as i64);
        let (ya, yb) = (y0.round() as i64, y1.round() as i64);
        for y in ya..yb {
            for x in xa..xb {
                self.blend(x, y, color, alpha);
            }
        }
    }

    /// An anti-aliased line of `width` pixels with round ends, in pixel coordinates (pixel centres
    /// at +0.5).
    pub fn line(&mut self, from: (f64, f64), to: (f64, f64), width: f64, color: Rgb) {
        let reach = width / 2.0 + 1.0;
        let (dx, dy) = (to.0 - from.0, to.1 - from.1);
        let length2 = dx * dx + dy * dy;
        let x_range = (from.0.min(to.0) - reach).floor() as i64..=(from.0.max(to.0) + reach) as i64;
        let y_range = (from.1.min(to.1) - reach).floor() as i64..=(from.1.max(to.1) + reach) as i64;
        for y in y_range {
            for x in x_range.clone() {
                let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                let t = if length2 > 0.0 {
                    (((px - from.0) * dx + (py - from.1) * dy) / length2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let distance = (px - from.0 - t * dx).hypot(py - from.1 - t * dy);
                let coverage = (width / 2.0 + 0.5 - distance).clamp(0.0, 1.0);
                if coverage > 0.0 {
                    self.blend(x, y, color, coverage as f32);
                }
            }
        }
    }

    /// A dashed line: `dash` pixels drawn, `dash` pixels left out.
    pub fn dashed_line(
        &mut self,
        from: (f64, f64),
        to: (f64, f64),
        width: f64,
        dash: f64,
        color: Rgb,
    ) {
        let length = (to.0 - from.0).hypot(to.1 - from.1);
        let steps = (length / (2.0 * dash)).ceil() as usize;
        let at = |d: f64| {
            let t = (d / length).min(1.0);
            (from.0 + t * (to.0 - from.0), from.1 + t * (to.1 - from.1))
        };
        for i in 0..steps {
            let start = i as f64 * 2.0 * dash;
            self.line(at(start), at(start + dash), width, color);
        }
    }

    /// Draws `text` with the top of its line at `y`.
    pub fn text(&mut self, font: &Font, x: f64, y: f64, text: &str, color: Rgb, align: Align) {
        let width = f64::from(font.text_width(text));
        let left = match align {
            Align::Left => x,
            Align::Center => x - width / 2.0,
            Align::Right => x - width,
        }
        .round() as i64;
        let top = y.round() as i64;
        // Along the line (pen, dx) runs right, across it (dy) down.
        self.glyphs(font, text, left, color, |pen, dx, dy| (pen + dx, top + dy));
    }

    /// Draws `text` turned a quarter anticlockwise (read bottom to top), centred on `center_y`,
    /// with the top of its line at `x`.
    pub fn text_vertical(&mut self, font: &Font, x: f64, center_y: f64, text: &str, color: Rgb) {
        let bottom = (center_y + f64::from(font.text_width(text)) / 2.0).round() as i64;
        let left = x.round() as i64;
        // The pen runs up from `bottom`; across the line is to the right.
        self.glyphs(font, text, 0, color, |pen, dx, dy| {
            (left + dy, bottom - pen - dx)
        });
    }

    /// Blends each glyph's coverage at `place(pen, dx, dy)`, where `pen` advances along the line
    /// from `start` and `(dx, dy)` is the pixel's offset along and across it.
    fn glyphs(
        &mut self,
        font: &Font,
        text: &str,
        start: i64,
        color: Rgb,
        place: impl Fn(i64, i64, i64) -> (i64, i64),
    ) {
        let mut pen = start;
        for c in text.chars() {
            let glyph = font.glyph(c);
            let coverage = font.coverage(&glyph);
            for row in 0..glyph.height {
                for col in 0..glyph.width {
                    let alpha = coverage[row * glyph.width + col];
                    if alpha > 0 {
                        let dx = i64::from(glyph.left) + col as i64;
                        let dy = i64::from(glyph.top) + row as i64;
                        let (px, py) = place(pen, dx, dy);
                        self.blend(px, py, color, f32::from(alpha) / 255.0);
                    }
                }
            }
            pen += i64::from(glyph.advance);
        }
    }

    pub fn save_png(&self, path: &Path) -> Result<()> {
        super::write_png_rgb(&self.pixels, self.width, self.height, path)
    }
}
