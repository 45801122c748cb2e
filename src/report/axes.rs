//! A framed plot area with gridlines, tick labels, axis labels and a title.
use super::canvas::{Align, Canvas, GRID, INK};
use super::font::Font;

pub(crate) struct Axes {
    /// Plot area in pixels: left, top, width, height.
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
}

pub(crate) struct Labels<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
}

impl Axes {
    /// Plot area inside a `width` x `height` canvas with room for the title, labels and ticks.
    pub fn inside(width: usize, height: usize, x_range: (f64, f64), y_range: (f64, f64)) -> Self {
        let (left, top, right, bottom) = (72.0, 44.0, 24.0, 56.0);
        Axes {
            left,
            top,
            width: width as f64 - left - right,
            height: height as f64 - top - bottom,
            x_range,
            y_range,
        }
    }

    pub fn px(&self, x: f64) -> f64 {
        self.left + (x - self.x_range.0) / (self.x_range.1 - self.x_range.0) * self.width
    }

    pub fn py(&self, y: f64) -> f64 {
        self.top + self.height
            - (y - self.y_range.0) / (self.y_range.1 - self.y_range.0) * self.height
    }

    pub fn right(&self) -> f64 {
        self.left + self.width
    }

    pub fn bottom(&self) -> f64 {
        self.top + self.height
    }

    /// Gridlines under the data; call [`Axes::draw_frame`] after drawing the data.
    pub fn draw_grid(&self, canvas: &mut Canvas) {
        for x in nice_ticks(self.x_range.0, self.x_range.1, 6) {
            canvas.line(
                (self.px(x), self.top),
                (self.px(x), self.bottom()),
                1.0,
                GRID,
            );
        }
        for y in nice_ticks(self.y_range.0, self.y_range.1, 6) {
            canvas.line(
                (self.left, self.py(y)),
                (self.right(), self.py(y)),
                1.0,
                GRID,
            );
        }
    }

    pub fn draw_frame(&self, canvas: &mut Canvas, regular: &Font, bold: &Font, labels: &Labels) {
        let (l, t, r, b) = (self.left, self.top, self.right(), self.bottom());
        for (from, to) in [
            ((l, t), (r, t)),
            ((r, t), (r, b)),
            ((r, b), (l, b)),
            ((l, b), (l, t)),
        ] {
            canvas.line(from, to, 1.0, INK);
        }
        let x_ticks = nice_ticks(self.x_range.0, self.x_range.1, 6);
        for &x in &x_ticks {
            let px = self.px(x);
            canvas.line((px, b), (px, b + 5.0), 1.0, INK);
            let text = tick_label(x, &x_ticks);
            canvas.text(regular, px, b + 7.0, &text, INK, Align::Center);
        }
        let y_ticks = nice_ticks(self.y_range.0, self.y_range.1, 6);
        let half_line = f64::from(regular.line_height) / 2.0;
        let mut widest = 0;
        for &y in &y_ticks {
            let py = self.py(y);
            canvas.line((l - 5.0, py), (l, py), 1.0, INK);
            let text = tick_label(y, &y_ticks);
            widest = widest.max(regular.text_width(&text));
            canvas.text(regular, l - 8.0, py - half_line, &text, INK, Align::Right);
        }
        canvas.text(
            regular,
            (l + r) / 2.0,
            b + 28.0,
            labels.x,
            INK,
            Align::Center,
        );
        let y_label_x = l - 8.0 - f64::from(widest) - 6.0 - f64::from(regular.line_height);
        canvas.text_vertical(regular, y_label_x.max(2.0), (t + b) / 2.0, labels.y, INK);
        let canvas_middle = canvas.width as f64 / 2.0;
        canvas.text(bold, canvas_middle, 12.0, labels.title, INK, Align::Center);
    }
}

/// Round tick values (steps of 1, 2 or 5 times a power of ten) inside `[lo, hi]`, about `target`
/// of them.
pub(crate) fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return Vec::new();
    }
    let step = tick_step(lo, hi, target);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    // Multiplying the index (not accumulating) keeps 0.3 from printing as 0.30000000000000004.
    (first..=last).map(|i| i as f64 * step).collect()
}

fn tick_step(lo: f64, hi: f64, target: usize) -> f64 {
    let rough = (hi - lo) / target.max(1) as f64;
    let magnitude = 10f64.powf(rough.log10().floor());
    let mantissa = rough / magnitude;
    let nice = if mantissa < 1.5 {
        1.0
    } else if mantissa < 3.5 {
        2.0
    } else if mantissa < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// `value` with as many decimals as the spacing of `ticks` needs.
pub(crate) fn tick_label(value: f64, ticks: &[f64]) -> String {
    let step = match ticks {
        [a, b, ..] => b - a,
        _ => value.abs().max(1.0),
    };
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let text = format!("{value:.decimals$}");
    // "-0" and "-0.0" read as noise.
    if text
        .trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        text.trim_start_matches('-').to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        assert_eq!(
            nice_ticks(0.0, 1.0, 6),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        let ticks = nice_ticks(-0.37, 2.91, 6);
        assert_eq!(ticks, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
        let labels: Vec<String> = nice_ticks(0.0, 1.0, 6)
            .iter()
            .map(|&v| tick_label(v, &nice_ticks(0.0, 1.0, 6)))
            .collect();
        assert_eq!(labels, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(tick_label(1500.0, &[1000.0, 2000.0]), "1500");
        assert_eq!(tick_label(-0.0001, &[-0.001, 0.0]), "0.000");
        assert!(nice_ticks(1.0, 1.0, 6).is_empty());
        assert!(nice_ticks(f64::NAN, 1.0, 6).is_empty());
    }
}
