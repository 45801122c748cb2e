//! Memory-bank hyper-parameters. The defaults were chosen by measurement on the real sets
//! (docs/RESULTS.md, issue 17); PatchCore's (Roth et al. 2022) values are named where they differ.
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::methods::config_check::{centred_window, finite_in, lite0_taps};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryBankConfig {
    /// Backbone blocks whose maps make the patch features (EfficientNet-Lite0 blocks 0..=15),
    /// brought to the finest tap's stride (bilinear) and concatenated on channels. The default,
    /// 4 + 10 + 14, is the last block at stride 8, 16 and 32: the stride-32 context lifted both
    /// real sets over 4 + 7 + 10 (docs/RESULTS.md, issue 17).
    pub taps: Vec<usize>,
    /// Each position averaged over its `neighbourhood` × `neighbourhood` cells (those inside the
    /// map), PatchCore's local aggregation; 1 = none. Odd.
    pub neighbourhood: usize,
    /// Dimensions of the seeded Gaussian random projection the features are searched in; 0 = the
    /// features themselves. Distances in the projection are within a few per cent of the true ones
    /// (Johnson–Lindenstrauss) at a fraction of the search cost.
    pub projection: usize,
    /// Share of the training positions the coreset keeps (PatchCore: 0.1, or 0.01).
    pub bank_ratio: f64,
    /// Largest bank, in bytes of f32 entries; the ratio is cut to fit (a station's memory, and the
    /// search time per part, grow with the bank).
    pub bank_max_bytes: u64,
    /// Dimensions of the random projection the coreset selection measures distances in
    /// (PatchCore: 128); 0 = the search features.
    pub selection_dims: usize,
    /// Feature cells at each border left out of the image score (the anomaly map keeps them):
    /// zero padding makes border features unlike any training position.
    pub score_margin: usize,
    /// The image score is the maximum of the distances averaged over `score_window` ×
    /// `score_window` cells (those inside the map), so that one odd position weighs less than a
    /// defect's cluster of them; 1 = the single positions' maximum (PatchCore). Odd. The anomaly
    /// map is not averaged.
    pub score_window: usize,
    /// Fuse the patch score with the image-level nearest-neighbour distance (the image's mean
    /// feature against each training image's), each standardised on the defect-free validation
    /// images. Off: the image score is the patch score alone.
    pub fusion: bool,
    /// Gaussian smoothing of the anomaly map at input resolution, in pixels (PatchCore: 4).
    pub smoothing_sigma: f32,
    /// Lists of an inverted-file index over the patch bank (approximate search, CPU only:
    /// [`super::index`]); 0 = the exact search of the whole bank.
    pub index_lists: usize,
    /// Lists searched per position when `index_lists` > 0: more, nearer the exact search.
    pub index_probes: usize,
}

impl Default for MemoryBankConfig {
    fn default() -> Self {
        MemoryBankConfig {
            taps: vec![4, 10, 14],
            neighbourhood: 3,
            projection: 128,
            bank_ratio: 0.01,
            bank_max_bytes: 16 << 20,
            selection_dims: 64,
            score_margin: 3,
            score_window: 1,
            fusion: true,
            smoothing_sigma: 4.0,
            index_lists: 0,
            index_probes: 8,
        }
    }
}

impl MemoryBankConfig {
    pub fn validate(&self) -> Result<()> {
        lite0_taps("taps", &self.taps)?;
        centred_window("neighbourhood", self.neighbourhood)?;
        centred_window("score_window", self.score_window)?;
        if !(self.bank_ratio.is_finite() && self.bank_ratio > 0.0 && self.bank_ratio <= 1.0) {
            return Err(Error::config(
                "bank_ratio",
                format!("{} is not a share in (0, 1]", self.bank_ratio),
            ));
        }
        if self.bank_max_bytes < 4 {
            return Err(Error::config(
                "bank_max_bytes",
                format!("{} cannot hold one entry", self.bank_max_bytes),
            ));
        }
        finite_in("smoothing_sigma", self.smoothing_sigma as f64, 0.0, 64.0)?;
        if self.index_lists > 0 && !(1..=self.index_lists).contains(&self.index_probes) {
            return Err(Error::config(
                "index_probes",
                format!(
                    "{} is not between 1 and index_lists ({})",
                    self.index_probes, self.index_lists
                ),
            ));
        }
        Ok(())
    }
}
