//! An approximate nearest-neighbour search: an inverted file over the bank (IVF, as faiss's
//! `IndexIVFFlat`). The bank is split into lists around coarse centres; a query is compared with
//! every centre, then searched exactly in the `probes` lists whose centres are nearest. A query
//! whose true neighbour lies in an unprobed list gets a larger distance, never a smaller one.
//!
//! The coarse centres are k-means' (Lloyd's rounds) over the bank entries, from entries evenly
//! strided through the bank: deterministic, so a model file builds the same index every time it
//! loads. (The coreset's first entries, the free choice, are its outliers, since greedy k-centre
//! takes the farthest point first: with them as centres one list of a 32,768-entry magnetic-tile
//! bank held 12,714 entries, and probing 4 of 128 lists saved a fifth to a quarter of the search.)
//!
//! Searching the probed lists is the exact search's GEMM on each list's members, with the queries
//! that probe the list gathered into blocks; the results are kept per (query, probe) slot, so the
//! lists run in parallel without sharing an output.
use std::sync::Mutex;

use rayon::prelude::*;

use super::search::{check_queries, fold_nearest, pack_entries, rows_of, squared_norm, ROWS};
use crate::error::{Error, Result};
use crate::nn::kernels::{ASource, Activation, Epilogue, Kernels, PackedB};

/// Bank entries assigned to their lists at a time while the index is built.
const ASSIGN_BLOCK: usize = 4096;
/// Lloyd rounds for the coarse centres.
const KMEANS_ROUNDS: usize = 10;

/// An inverted file over a bank of `[len, dims]` entries.
pub struct InvertedBank {
    dims: usize,
    len: usize,
    probes: usize,
    /// The coarse centres, packed as a bank chunk is (`−2·c` as weights, `‖c‖²` as bias).
    centres: PackedB,
    /// Each list's entries, packed the same way; `None` for a list no entry is nearest to.
    lists: Vec<Option<PackedB>>,
    scratch: Mutex<Scratch>,
}

/// Buffers reused from part to part.
#[derive(Default)]
struct Scratch {
    /// `[queries, lists]`: `‖c‖² − 2 q·c`.
    coarse: Vec<f32>,
    /// `[queries, probes]`: the lists each query probes.
    probed: Vec<usize>,
    /// Slot ranges per list, and each list's next free slot while they are filled.
    offsets: Vec<usize>,
    cursor: Vec<usize>,
    /// Per slot (grouped by list): the query, and the nearest distance found in that list.
    members: Vec<usize>,
    best: Vec<f32>,
    /// Per (query, probe): its slot.
    slot: Vec<usize>,
}

thread_local! {
    /// Each thread's gathered queries and tile of distances, kept between calls.
    static BLOCK: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl InvertedBank {
    /// `entries`: `[len, dims]`, row-major.
    pub fn new(
        kernels: Kernels,
        entries: &[f32],
        dims: usize,
        lists: usize,
        probes: usize,
    ) -> Result<InvertedBank> {
        let len = rows_of(entries, dims, "memory bank index", "entries")?;
        if lists == 0 || probes == 0 || probes > lists {
            return Err(Error::invalid(
                "memory bank index",
                format!("{probes} probes of {lists} lists: need 1 ≤ probes ≤ lists"),
            ));
        }
        let lists = lists.min(len);
        let mut centres: Vec<f32> = (0..lists)
            .flat_map(|l| {
                let e = l * len / lists;
                entries[e * dims..(e + 1) * dims].iter().copied()
            })
            .collect();
        let mut bank = InvertedBank {
            dims,
            len,
            probes: probes.min(lists),
            centres: pack_entries(&centres, dims),
            lists: Vec::new(),
            scratch: Mutex::new(Scratch::default()),
        };
        let mut nearest = Vec::with_capacity(len);
        for round in 0..=KMEANS_ROUNDS {
            // Each entry to its nearest centre (a block of entries at a time, so that the
            // distances to the centres are never whole in memory).
            nearest.clear();
            {
                let mut s = bank.scratch.lock().unwrap_or_else(|p| p.into_inner());
                for block in entries.chunks(ASSIGN_BLOCK * dims) {
                    bank.coarse(kernels, block, 1, &mut s)?;
                    nearest.extend_from_slice(&s.probed);
                }
            }
            if round == KMEANS_ROUNDS {
                break;
            }
            // Each centre to its entries' mean (one left without entries stays where it is).
            let mut sums = vec![0f64; lists * dims];
            let mut counts = vec![0usize; lists];
            for (entry, &list) in entries.chunks_exact(dims).zip(&nearest) {
                counts[list] += 1;
                for (s, &v) in sums[list * dims..(list + 1) * dims].iter_mut().zip(entry) {
                    *s += f64::from(v);
                }
            }
            for ((centre, sum), &count) in centres
                .chunks_exact_mut(dims)
                .zip(sums.chunks_exact(dims))
                .zip(&counts)
            {
                if count > 0 {
                    for (c, s) in centre.iter_mut().zip(sum) {
                        *c = (s / count as f64) as f32;
                    }
                }
            }
            bank.centres = pack_entries(&centres, dims);
        }
        let mut members: Vec<Vec<f32>> = vec![Vec::new(); lists];
        for (entry, &list) in entries.chunks_exact(dims).zip(&nearest) {
            members[list].extend_from_slice(entry);
        }
        bank.lists = members
            .iter()
            .map(|m| (!m.is_empty()).then(|| pack_entries(m, dims)))
            .collect();
        log::debug!(
            "memory bank index: {len} entries in {lists} lists, the largest {}",
            members.iter().map(|m| m.len() / dims).max().unwrap_or(0)
        );
        Ok(bank)
    }

    /// Into `s.probed`: the `probes` nearest centres of each query, nearest first.
    fn coarse(
        &self,
        kernels: Kernels,
        queries: &[f32],
        probes: usize,
        s: &mut Scratch,
    ) -> Result<()> {
        let lists = self.centres.n();
        let n = queries.len() / self.dims;
        s.coarse.resize(n * lists, 0.0);
        kernels.gemm(
            ASource::Matrix {
                data: queries,
                lda: self.dims,
            },
            &self.centres,
            Epilogue {
                activation: Activation::Identity,
                residual: None,
            },
            &mut s.coarse,
        )?;
        s.probed.resize(n * probes, 0);
        for (row, probed) in s
            .coarse
            .chunks_exact(lists)
            .zip(s.probed.chunks_exact_mut(probes))
        {
            smallest(row, probed);
        }
        Ok(())
    }

    /// Each query's squared distance to the nearest entry of its probed lists (never below 0):
    /// `queries` is `[out.len(), dims]`, row-major.
    pub fn nearest_sq(&self, kernels: Kernels, queries: &[f32], out: &mut [f32]) -> Result<()> {
        check_queries(queries, out.len(), self.dims)?;
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        let probes = self.probes;
        self.coarse(kernels, queries, probes, s)?;
        // Group the (query, probe) slots by list.
        let lists = self.lists.len();
        s.offsets.clear();
        s.offsets.resize(lists + 1, 0);
        for &list in &s.probed {
            s.offsets[list + 1] += 1;
        }
        for l in 0..lists {
            s.offsets[l + 1] += s.offsets[l];
        }
        s.cursor.clear();
        s.cursor.extend_from_slice(&s.offsets[..lists]);
        s.members.resize(s.probed.len(), 0);
        s.slot.resize(s.probed.len(), 0);
        for (i, &list) in s.probed.iter().enumerate() {
            let at = s.cursor[list];
            s.members[at] = i / probes;
            s.slot[i] = at;
            s.cursor[list] += 1;
        }
        s.best.resize(s.probed.len(), 0.0);
        let serial = kernels.serial();
        let search = |(list, best): (usize, &mut [f32])| -> Result<()> {
            let members = &s.members[s.offsets[list]..s.offsets[list + 1]];
            match &self.lists[list] {
                Some(packed) => self.search_list(serial, packed, queries, members, best),
                None => {
                    best.fill(f32::INFINITY);
                    Ok(())
                }
            }
        };
        // One slice of `best` per list, in list order (a vector of `lists` slices is the one
        // allocation per call).
        let mut per_list = Vec::with_capacity(lists);
        let mut rest = s.best.as_mut_slice();
        for list in 0..lists {
            let (head, tail) = rest.split_at_mut(s.offsets[list + 1] - s.offsets[list]);
            per_list.push((list, head));
            rest = tail;
        }
        // As for the exact search: below about a million multiply-adds, splitting costs more.
        if s.probed.len() * self.dims * (self.len / lists) < 1 << 20 {
            per_list.into_iter().try_for_each(search)?;
        } else {
            per_list.into_par_iter().try_for_each(search)?;
        }
        for ((o, query), slots) in out
            .iter_mut()
            .zip(queries.chunks_exact(self.dims))
            .zip(s.slot.chunks_exact(probes))
        {
            let nearest = slots.iter().fold(f32::INFINITY, |m, &at| m.min(s.best[at]));
            *o = (nearest + squared_norm(query)).max(0.0);
        }
        Ok(())
    }

    /// The queries `members` against one list, `ROWS` at a time, gathered into this thread's
    /// block: each one's smallest `‖b‖² − 2 q·b` into `best`.
    fn search_list(
        &self,
        kernels: Kernels,
        packed: &PackedB,
        queries: &[f32],
        members: &[usize],
        best: &mut [f32],
    ) -> Result<()> {
        let d = self.dims;
        best.fill(f32::INFINITY);
        BLOCK.with(|block| {
            let (gathered, tile) = &mut *block.borrow_mut();
            for (block, best) in members.chunks(ROWS).zip(best.chunks_mut(ROWS)) {
                gathered.clear();
                for &q in block {
                    gathered.extend_from_slice(&queries[q * d..(q + 1) * d]);
                }
                fold_nearest(kernels, gathered, d, packed, tile, best)?;
            }
            Ok(())
        })
    }
}

/// The indices of the `out.len()` smallest of `values`, smallest first (ties: the lower index).
fn smallest(values: &[f32], out: &mut [usize]) {
    let k = out.len();
    let mut filled = 0;
    for (i, &v) in values.iter().enumerate() {
        if filled == k && v >= values[out[k - 1]] {
            continue;
        }
        let mut at = filled.min(k - 1);
        if filled < k {
            filled += 1;
        }
        while at > 0 && values[out[at - 1]] > v {
            out[at] = out[at - 1];
            at -= 1;
        }
        out[at] = i;
    }
}

#[cfg(test)]
mod tests {
    use super::smallest;

    #[test]
    fn smallest_keeps_the_k_smallest_in_order_and_ties_to_the_lower_index() {
        let values = [5.0, 1.0, 4.0, 1.0, 0.5, 9.0, 3.0];
        let mut out = [0; 3];
        smallest(&values, &mut out);
        assert_eq!(out, [4, 1, 3]);
        let mut one = [0; 1];
        smallest(&values, &mut one);
        assert_eq!(one, [4]);
        let mut all = [0; 7];
        smallest(&values, &mut all);
        assert_eq!(all, [4, 1, 3, 6, 2, 0, 5]);
    }
}
