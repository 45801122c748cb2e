//! Exact nearest-neighbour search against the memory bank: each query's squared distance to its
//! nearest entry, `‖q‖² + min_b (‖b‖² − 2 q·b)`.
//!
//! On the CPU the products are the fast kernels' packed GEMM: the bank is packed once, in chunks of
//! [`CHUNK`] entries with `−2·b` as weights and `‖b‖²` as bias, and each block of [`ROWS`] queries
//! goes through the chunks one after the other, keeping a running minimum per query. So the
//! distance matrix is never whole in memory: one `ROWS × CHUNK` tile per thread (256 KiB).
//! [`nearest_sq_candle`] is the same on candle's ops (the reference, and the path on CUDA), also
//! chunked; [`nearest_sq_naive`] the plain definition the tests hold both to.
use candle_core::{Tensor, D};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::nn::kernels::{ASource, Activation, Epilogue, Kernels, PackedB};

/// Bank entries per packed chunk: one tile of distances is `ROWS × CHUNK` floats.
pub const CHUNK: usize = 1024;
/// Queries per block: one block's work is spread over the chunks before the next block starts.
pub const ROWS: usize = 64;
/// Bank entries per step of the candle search (a `queries × CANDLE_CHUNK` matrix at a time).
const CANDLE_CHUNK: usize = 8192;

/// The bank as the fast search reads it.
pub struct PackedBank {
    dims: usize,
    len: usize,
    chunks: Vec<PackedB>,
}

impl PackedBank {
    /// `entries`: `[len, dims]`, row-major.
    pub fn new(entries: &[f32], dims: usize) -> Result<PackedBank> {
        let len = rows_of(entries, dims, "memory bank", "entries")?;
        let chunks = entries
            .chunks(CHUNK * dims)
            .map(|chunk| pack_entries(chunk, dims))
            .collect();
        Ok(PackedBank { dims, len, chunks })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Each query's squared distance to its nearest entry (never below 0): `queries` is
    /// `[out.len(), dims]`, row-major. Blocks of queries are spread over rayon's threads.
    pub fn nearest_sq(&self, kernels: Kernels, queries: &[f32], out: &mut [f32]) -> Result<()> {
        check_queries(queries, out.len(), self.dims)?;
        let serial = kernels.serial();
        let block = |(queries, out): (&[f32], &mut [f32])| {
            TILE.with(|tile| self.nearest_block(serial, queries, out, &mut tile.borrow_mut()))
        };
        // Below about a million multiply-adds, splitting costs more than it saves.
        let serial_only = out.len() * self.len * self.dims < 1 << 20 || out.len() <= ROWS;
        let blocks = queries.chunks(ROWS * self.dims).zip(out.chunks_mut(ROWS));
        if serial_only {
            blocks.into_iter().try_for_each(block)
        } else {
            blocks
                .collect::<Vec<_>>()
                .into_par_iter()
                .try_for_each(block)
        }
    }

    /// One block of at most [`ROWS`] queries through every chunk.
    fn nearest_block(
        &self,
        kernels: Kernels,
        queries: &[f32],
        out: &mut [f32],
        tile: &mut Vec<f32>,
    ) -> Result<()> {
        out.fill(f32::INFINITY);
        for chunk in &self.chunks {
            fold_nearest(kernels, queries, self.dims, chunk, tile, out)?;
        }
        for (best, query) in out.iter_mut().zip(queries.chunks_exact(self.dims)) {
            *best = (*best + squared_norm(query)).max(0.0);
        }
        Ok(())
    }
}

/// How many `dims`-long rows `values` holds: an error naming `what` when none, or not whole ones.
pub(super) fn rows_of(values: &[f32], dims: usize, what: &str, rows: &str) -> Result<usize> {
    if dims == 0 || values.is_empty() || !values.len().is_multiple_of(dims) {
        return Err(Error::invalid(
            what,
            format!(
                "{} values are not {rows} of {dims} dimensions",
                values.len()
            ),
        ));
    }
    Ok(values.len() / dims)
}

/// `queries` must be `count` rows of `dims`.
pub(super) fn check_queries(queries: &[f32], count: usize, dims: usize) -> Result<()> {
    if queries.len() != count * dims {
        return Err(Error::invalid(
            "memory bank queries",
            format!(
                "{} values for {count} queries of {dims} dimensions",
                queries.len()
            ),
        ));
    }
    Ok(())
}

/// Bank entries `[n, dims]` packed as the search reads them: `−2·b` as weights, `‖b‖²` as bias, so
/// that the GEMM of queries against them gives `‖b‖² − 2 q·b`.
pub(super) fn pack_entries(entries: &[f32], dims: usize) -> PackedB {
    let n = entries.len() / dims;
    let norms: Vec<f32> = entries.chunks_exact(dims).map(squared_norm).collect();
    PackedB::new(dims, n, |k, j| -2.0 * entries[j * dims + k], &norms)
}

/// `best[i] = min(best[i], min_b ‖b‖² − 2 q_i·b)` for the queries `rows` (`[best.len(), dims]`)
/// against one packed set of entries, through `tile`.
pub(super) fn fold_nearest(
    kernels: Kernels,
    rows: &[f32],
    dims: usize,
    entries: &PackedB,
    tile: &mut Vec<f32>,
    best: &mut [f32],
) -> Result<()> {
    let n = entries.n();
    tile.resize(best.len() * n, 0.0);
    kernels.gemm(
        ASource::Matrix {
            data: rows,
            lda: dims,
        },
        entries,
        Epilogue {
            activation: Activation::Identity,
            residual: None,
        },
        tile,
    )?;
    for (b, row) in best.iter_mut().zip(tile.chunks_exact(n)) {
        *b = min_of(row, *b);
    }
    Ok(())
}

thread_local! {
    /// Each thread's tile of distances, kept between calls.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Independent partial results of the reductions below, which the compiler keeps in vector
/// registers: a plain `f32` sum or minimum is one dependent chain (it may not reorder them).
const LANES: usize = 16;

/// `Σ (a − b)²`, vectorised (inlined, so that callers compiled for wider vectors widen it too).
#[inline(always)]
pub fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    let mut acc = [0f32; LANES];
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ v²`, vectorised.
pub fn squared_norm(v: &[f32]) -> f32 {
    let chunks = v.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    let mut acc = [0f32; LANES];
    for x in chunks {
        for i in 0..LANES {
            acc[i] += x[i] * x[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The smallest of `values` and `start`, vectorised.
fn min_of(values: &[f32], start: f32) -> f32 {
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(start, |m, &v| m.min(v));
    let mut acc = [f32::INFINITY; LANES];
    for x in chunks {
        for i in 0..LANES {
            acc[i] = if x[i] < acc[i] { x[i] } else { acc[i] };
        }
    }
    acc.iter().fold(tail, |m, &v| m.min(v))
}

/// The definition: for each query, the smallest `Σ (q − b)²` over the bank (both `[·, dims]`).
pub fn nearest_sq_naive(bank: &[f32], queries: &[f32], dims: usize) -> Vec<f32> {
    queries
        .chunks_exact(dims)
        .map(|q| {
            bank.chunks_exact(dims)
                .map(|b| q.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>())
                .fold(f32::INFINITY, f32::min)
        })
        .collect()
}

/// [`PackedBank::nearest_sq`] on candle's ops: `queries` `[Q, D]`, `bank` `[M, D]` and its squared
/// norms `bank_sq` `[M]`, on one device; returns `[Q]`.
pub fn nearest_sq_candle(queries: &Tensor, bank: &Tensor, bank_sq: &Tensor) -> Result<Tensor> {
    let (len, _) = bank.dims2()?;
    let query_sq = queries.sqr()?.sum_keepdim(1)?;
    let mut best: Option<Tensor> = None;
    for start in (0..len).step_by(CANDLE_CHUNK) {
        let n = CANDLE_CHUNK.min(len - start);
        let entries = bank.narrow(0, start, n)?;
        let products = queries.matmul(&entries.t()?)?;
        let nearest = bank_sq
            .narrow(0, start, n)?
            .unsqueeze(0)?
            .broadcast_sub(&(products * 2.0)?)?
            .min(D::Minus1)?;
        best = Some(match best {
            Some(b) => b.minimum(&nearest)?,
            None => nearest,
        });
    }
    let best = best.ok_or_else(|| Error::invalid("memory bank", "empty"))?;
    Ok((best + query_sq.squeeze(1)?)?.clamp(0f32, f32::INFINITY)?)
}
