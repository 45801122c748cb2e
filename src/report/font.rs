//! Bitmap fonts: printable ASCII of DejaVu Sans pre-rasterised with anti-aliasing into
//! `assets/*.vgf` by `assets/make_glyphs.py`, embedded so reports need no font at run time.
use crate::error::{Error, Result};

const REGULAR: &[u8] = include_bytes!("../../assets/sans-13.vgf");
const BOLD: &[u8] = include_bytes!("../../assets/sans-bold-16.vgf");
const FIRST_CHAR: u8 = 32;
const LAST_CHAR: u8 = 126;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Glyph {
    pub advance: i32,
    pub width: usize,
    pub height: usize,
    /// Offset of the bitmap from the pen position, rightwards.
    pub left: i32,
    /// Offset of the bitmap from the top of the line, downwards.
    pub top: i32,
    start: usize,
}

pub(crate) struct Font {
    pub line_height: i32,
    glyphs: Vec<Glyph>,
    coverage: &'static [u8],
}

impl Font {
    /// The 13 px regular face, for tick labels and legends.
    pub fn regular() -> Result<Font> {
        Font::parse(REGULAR, "sans-13.vgf")
    }

    /// The 16 px bold face, for titles.
    pub fn bold() -> Result<Font> {
        Font::parse(BOLD, "sans-bold-16.vgf")
    }

    fn parse(bytes: &'static [u8], name: &str) -> Result<Font> {
        let corrupt = || Error::invalid(format!("font atlas {name}"), "truncated or corrupt");
        if bytes.get(..4) != Some(b"VGF1") {
            return Err(corrupt());
        }
        let line_height = i32::from(*bytes.get(4).ok_or_else(corrupt)?);
        let mut at = 6;
        let mut glyphs = Vec::with_capacity(usize::from(LAST_CHAR - FIRST_CHAR) + 1);
        for _ in FIRST_CHAR..=LAST_CHAR {
            let header = bytes.get(at..at + 5).ok_or_else(corrupt)?;
            let (width, height) = (usize::from(header[1]), usize::from(header[2]));
            let glyph = Glyph {
                advance: i32::from(header[0]),
                width,
                height,
                left: i32::from(header[3] as i8),
                top: i32::from(header[4] as i8),
                start: at + 5,
            };
            at = glyph.start + width * height;
            if at > bytes.len() {
                return Err(corrupt());
            }
            glyphs.push(glyph);
        }
        Ok(Font {
            line_height,
            glyphs,
            coverage: bytes,
        })
    }

    /// The glyph of `c`, or of '?' for characters outside printable ASCII.
    pub fn glyph(&self, c: char) -> Glyph {
        let code = match c {
            ' '..='~' => c as u8,
            _ => b'?',
        };
        self.glyphs[usize::from(code - FIRST_CHAR)]
    }

    /// Coverage (0..=255) of `glyph`'s bitmap, row-major.
    pub fn coverage(&self, glyph: &Glyph) -> &[u8] {
        &self.coverage[glyph.start..glyph.start + glyph.width * glyph.height]
    }

    pub fn text_width(&self, text: &str) -> i32 {
        text.chars().map(|c| self.glyph(c).advance).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_atlases_parse_and_have_visible_glyphs() {
        for font in [Font::regular().unwrap(), Font::bold().unwrap()] {
            assert!(font.line_height > 10);
            let a = font.glyph('A');
            assert!(a.width > 3 && a.height > 5 && a.advance > 5);
            assert!(font.coverage(&a).contains(&255));
            assert_eq!(font.glyph(' ').width, 0);
            assert_eq!(font.glyph('\u{2265}').advance, font.glyph('?').advance);
        }
        assert!(Font::parse(&REGULAR[..100], "cut").is_err());
    }
}
