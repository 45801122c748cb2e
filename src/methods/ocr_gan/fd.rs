//! Frequency decoupling (FD): a Laplacian-pyramid split of the image into N omni-frequency images.
//!
//! `I_GN = I`; `I_G(n-1) = Up(Down(I_Gn * Gau1)) * Gau2`, where Down drops every second row and
//! column, Up inserts zero rows and columns, `Gau1 = [1 4 6 4 1]ᵀ[1 4 6 4 1] / 256` and
//! `Gau2 = 4·Gau1` (the zeros take three quarters of the samples). The bands are `I_1 = I_G1` and
//! `I_n = I_Gn − I_G(n-1)`: they telescope back to `I`, which the summed reconstruction needs (the
//! paper prints the difference the other way round). Borders are reflected without repeating the
//! edge (OpenCV's `pyrDown`/`pyrUp` default, which the paper's pipeline follows).
//!
//! [`FrequencyDecoupling::split_opencv`] is the authors' code instead: the same pyramid on 8-bit
//! values, rounded after each `pyrDown` and `pyrUp` as OpenCV's integer arithmetic does, the high
//! bands by saturating subtraction (`cv2.subtract`), and each band mapped to −1..1 on its own.
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

const BINOMIAL: [f32; 5] = [1.0, 4.0, 6.0, 4.0, 1.0];

/// The paper's `Gau1`, row-major 5×5.
pub fn gau1() -> [f32; 25] {
    let mut k = [0.0; 25];
    for (i, a) in BINOMIAL.iter().enumerate() {
        for (j, b) in BINOMIAL.iter().enumerate() {
            k[i * 5 + j] = a * b / 256.0;
        }
    }
    k
}

pub struct FrequencyDecoupling {
    bands: usize,
    /// `[1, 1, 5, 5]`.
    gau1: Tensor,
    gau2: Tensor,
}

/// Reflect-101 indices for padding `n` samples by 2 on each side.
fn reflect_indices(n: usize, device: &Device) -> Result<Tensor> {
    let ids: Vec<u32> = (-2isize..n as isize + 2)
        .map(|i| {
            let r = if i < 0 {
                -i
            } else if i >= n as isize {
                2 * (n as isize - 1) - i
            } else {
                i
            };
            r.clamp(0, n as isize - 1) as u32
        })
        .collect();
    Ok(Tensor::new(ids, device)?)
}

impl FrequencyDecoupling {
    pub fn new(bands: usize, device: &Device) -> Result<Self> {
        if bands == 0 {
            return Err(Error::config("bands", "must be at least 1"));
        }
        let gau1 = Tensor::from_vec(gau1().to_vec(), (1, 1, 5, 5), device)?;
        Ok(FrequencyDecoupling {
            bands,
            gau2: (&gau1 * 4.0)?,
            gau1,
        })
    }

    /// `[B, C, H, W]` convolved per channel with `kernel`, borders reflected.
    fn blur(x: &Tensor, kernel: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let padded = x
            .reshape((b * c, 1, h, w))?
            .index_select(&reflect_indices(h, x.device())?, 2)?
            .index_select(&reflect_indices(w, x.device())?, 3)?;
        Ok(padded.conv2d(kernel, 0, 1, 1, 1)?.reshape((b, c, h, w))?)
    }

    /// One pyramid step: the low-pass version of `x` at the same size, each half of the step
    /// (`pyrDown`, `pyrUp`) followed by `round` where given.
    fn low_pass_with(&self, x: &Tensor, round: fn(Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if h % 2 != 0 || w % 2 != 0 || h < 4 || w < 4 {
            return Err(Error::invalid(
                "frequency decoupling",
                format!("a {h}x{w} image cannot be halved (sides must be even and at least 4)"),
            ));
        }
        let down = Self::blur(x, &self.gau1)?
            .reshape((b, c, h / 2, 2, w / 2, 2))?
            .narrow(3, 0, 1)?
            .narrow(5, 0, 1)?;
        let down = round(down)?;
        let zeros = down.zeros_like()?;
        let rows = Tensor::cat(&[&down, &zeros], 3)?;
        let up = Tensor::cat(&[&rows, &rows.zeros_like()?], 5)?.reshape((b, c, h, w))?;
        round(Self::blur(&up, &self.gau2)?)
    }

    fn low_pass(&self, x: &Tensor) -> Result<Tensor> {
        self.low_pass_with(x, Ok)
    }

    /// The omni-frequency images `[I_1 (lowest), …, I_N (highest)]`, each `[B, C, H, W]`.
    pub fn split(&self, image: &Tensor) -> Result<Vec<Tensor>> {
        // blurred[k] = I_G(N-k): the image first, then ever lower-passed versions.
        let mut blurred = vec![image.clone()];
        for _ in 1..self.bands {
            let next = self.low_pass(blurred.last().expect("non-empty"))?;
            blurred.push(next);
        }
        blurred.reverse();
        let mut bands = Vec::with_capacity(self.bands);
        bands.push(blurred[0].clone());
        for pair in blurred.windows(2) {
            bands.push((&pair[1] - &pair[0])?);
        }
        Ok(bands)
    }

    /// The authors' bands of `[B, C, H, W]` images in 0..1, lowest first, each coded `2v − 1`
    /// from its 8-bit value `v/255`: `I_1` the rounded pyramid's low pass, the others
    /// `max(I_Gn − I_G(n-1), 0)` (`cv2.subtract` saturates). They do not sum to the image.
    pub fn split_opencv(&self, images: &Tensor) -> Result<Vec<Tensor>> {
        // OpenCV rounds its integer sums half up; the sums are exact in f32 (multiples of 1/256
        // below 2^16), so `round` (half away from zero, on values ≥ 0) matches it.
        let round = |t: Tensor| -> Result<Tensor> { Ok(t.round()?) };
        let mut levels = vec![(images * 255.0)?.round()?.clamp(0.0, 255.0)?];
        for _ in 1..self.bands {
            let next = self.low_pass_with(levels.last().expect("non-empty"), round)?;
            levels.push(next);
        }
        levels.reverse();
        let code = |v: &Tensor| -> Result<Tensor> { Ok(((v * (2.0 / 255.0))? - 1.0)?) };
        let mut bands = Vec::with_capacity(self.bands);
        bands.push(code(&levels[0])?);
        for pair in levels.windows(2) {
            bands.push(code(&(&pair[1] - &pair[0])?.relu()?)?);
        }
        Ok(bands)
    }
}
