//! The forgeries OCR-GAN's discriminator learns to call positive beside the reconstructions.
use super::config::{Forgeries, OcrGanConfig};
use crate::data::anomaly::{AnomalyGenerator, AnomalySynth, CutPasteParams, CutoutParams};
use crate::data::Image;
use crate::error::Result;
use crate::rng::Rng;

/// Makes a training batch's forgeries as the config says.
pub struct Forger {
    kind: Forgeries,
    cutout: AnomalySynth,
    cut_paste: AnomalySynth,
    cutout_px: usize,
}

impl Forger {
    pub fn new(cfg: &OcrGanConfig) -> Result<Self> {
        Ok(Forger {
            kind: cfg.forgeries,
            cutout: AnomalySynth::single(AnomalyGenerator::Cutout(CutoutParams::default()))?,
            // vigil's CutPaste defaults are the authors' `CutPaste()`: area 2–15%, aspect up to
            // 3.3, jitter 0.1, a patch of the same image.
            cut_paste: AnomalySynth::single(AnomalyGenerator::CutPaste(CutPasteParams::default()))?,
            cutout_px: cfg.cutout_px,
        })
    }

    /// The forged versions of `images`: none, one per image, or (`Both`) a cutout and then a
    /// CutPaste version of each.
    pub fn forge(&self, images: &[&Image], rng: &mut Rng) -> Result<Vec<Image>> {
        let mut forged = Vec::with_capacity(2 * images.len());
        for image in images {
            match self.kind {
                Forgeries::None => {}
                Forgeries::Cutout => forged.push(self.cutout.apply(image, rng)?.0),
                Forgeries::Cutpaste => forged.push(self.cut_paste.apply(image, rng)?.0),
                Forgeries::Both => {
                    forged.push(self.cutout.apply(image, rng)?.0);
                    forged.push(self.cut_paste.apply(image, rng)?.0);
                }
                Forgeries::Combined => {
                    let mut both = self.cut_paste.apply(image, rng)?.0;
                    black_square(&mut both, self.cutout_px, rng);
                    forged.push(both);
                }
            }
        }
        Ok(forged)
    }
}

/// The authors' `Cutout(1, side)`: a centre drawn uniformly over the image, the square of `side`
/// (rounded down to even) around it clipped at the borders, set to 0 (black) in every channel.
pub fn black_square(image: &mut Image, side: usize, rng: &mut Rng) {
    let (h, w, half) = (image.height, image.width, side / 2);
    let (cy, cx) = (rng.range_usize(0, h), rng.range_usize(0, w));
    let (y0, y1) = (cy.saturating_sub(half), (cy + half).min(h));
    let (x0, x1) = (cx.saturating_sub(half), (cx + half).min(w));
    for c in 0..image.channels {
        let plane = image.plane_mut(c);
        for y in y0..y1 {
            plane[y * w + x0..y * w + x1].fill(0.0);
        }
    }
}
