//! NF-BMR's inference after the backbone (standardisation, flow, mapping nets, per-position score)
//! on the fast CPU kernels, channels-last, with buffers reused across calls. A snapshot of the
//! trained weights: [`super::NfBmr`] rebuilds it after every training step.
use std::sync::Mutex;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::nn::kernels::heads::{slot, FastConv, FastFlow, FastResidual, Grid, HeadScratch};
use crate::nn::kernels::{nchw_to_nhwc, Activation, Kernels};

/// One BMR direction (see `model::BmrDirection`).
pub(super) struct FastBmr {
    pub raise: FastConv,
    pub before: Vec<FastResidual>,
    pub after: Vec<FastResidual>,
    pub lower: FastConv,
}

/// Both mapping directions (see `model::MappingNets`).
pub(super) enum FastMapping {
    OneByOne {
        smnn: Vec<FastConv>,
        tmnn: Vec<FastConv>,
    },
    Bmr {
        smnn: Box<FastBmr>,
        tmnn: Box<FastBmr>,
        shared: Box<FastResidual>,
    },
}

#[derive(Default)]
struct Workspace {
    source: Vec<f32>,
    target: Vec<f32>,
    log_det: Vec<f32>,
    ping: Vec<f32>,
    pong: Vec<f32>,
    scratch: HeadScratch,
}

pub(super) struct FastHead {
    kernels: Kernels,
    mean: Vec<f32>,
    std: Vec<f32>,
    flow: FastFlow,
    mapping: Option<FastMapping>,
    /// Buffers of each worker, reused across calls.
    workspaces: Mutex<Vec<Workspace>>,
}

impl FastMapping {
    fn macs(&self) -> usize {
        let bmr = |d: &FastBmr| {
            d.raise.macs()
                + d.lower.macs()
                + d.before
                    .iter()
                    .chain(&d.after)
                    .map(|b| b.macs())
                    .sum::<usize>()
        };
        match self {
            FastMapping::OneByOne { smnn, tmnn } => smnn.iter().chain(tmnn).map(|c| c.macs()).sum(),
            FastMapping::Bmr { smnn, tmnn, shared } => bmr(smnn) + bmr(tmnn) + 2 * shared.macs(),
        }
    }

    /// Runs the direction `to_target` (TMNN) or SMNN on `x`, leaving the prediction in `ws.ping`.
    #[allow(clippy::too_many_arguments)]
    fn predict(
        &self,
        k: Kernels,
        to_target: bool,
        x: &[f32],
        grid: Grid,
        ping: &mut Vec<f32>,
        pong: &mut Vec<f32>,
        scratch: &mut HeadScratch,
    ) -> Result<()> {
        let n = grid.positions();
        match self {
            FastMapping::OneByOne { smnn, tmnn } => {
                let convs = if to_target { tmnn } else { smnn };
                let last = convs.len() - 1;
                for (i, conv) in convs.iter().enumerate() {
                    let activation = if i < last {
                        Activation::Relu
                    } else {
                        Activation::Identity
                    };
                    let out = slot(pong, n * conv.out_c());
                    let input = if i == 0 { x } else { &ping[..n * conv.in_c()] };
                    conv.forward(k, input, grid, activation, None, out)?;
                    std::mem::swap(ping, pong);
                }
            }
            FastMapping::Bmr { smnn, tmnn, shared } => {
                let d = if to_target { tmnn } else { smnn };
                let width = d.raise.out_c();
                d.raise.forward(
                    k,
                    x,
                    grid,
                    Activation::Identity,
                    None,
                    slot(ping, n * width),
                )?;
                for block in d.before.iter().chain([&**shared]).chain(&d.after) {
                    block.forward(k, &ping[..n * width], grid, scratch, slot(pong, n * width))?;
                    std::mem::swap(ping, pong);
                }
                let out = slot(pong, n * d.lower.out_c());
                d.lower
                    .forward(k, &ping[..n * width], grid, Activation::Identity, None, out)?;
                std::mem::swap(ping, pong);
            }
        }
        Ok(())
    }
}

impl FastHead {
    pub fn new(
        kernels: Kernels,
        mean: &Tensor,
        std: &Tensor,
        flow: FastFlow,
        mapping: Option<FastMapping>,
    ) -> Result<Self> {
        let values = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        Ok(Self {
            kernels,
            mean: values(mean)?,
            std: values(std)?,
            flow,
            mapping,
            workspaces: Mutex::new(Vec::new()),
        })
    }

    /// Multiply-adds per feature position of the flow and the mapping nets.
    pub fn macs_per_position(&self) -> usize {
        self.flow.macs() + self.mapping.as_ref().map_or(0, |m| m.macs())
    }

    /// Backbone features `[B, C, h, w]` → the anomaly score of each position `[B, h, w]`.
    pub fn per_position(&self, features: &Tensor) -> Result<Tensor> {
        let (batch, c, height, width) = features.dims4()?;
        if c != self.mean.len() {
            return Err(Error::invalid(
                "encoded features",
                format!("{c} channels, the model has {}", self.mean.len()),
            ));
        }
        let values: Vec<f32> = features.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut scores = vec![0f32; batch * height * width];
        let mut guard = self
            .workspaces
            .lock()
            .map_err(|_| Error::invalid("NF-BMR workspace", "poisoned by a panic"))?;
        let threads = rayon::current_num_threads().max(1);
        let one = |b: usize| Grid {
            batch: b,
            height,
            width,
        };
        if batch == 1 {
            // One image: every operation split over a team of threads.
            if guard.is_empty() {
                guard.push(Workspace::default());
            }
            let ws = &mut guard[0];
            self.kernels
                .in_team(|| self.run(self.kernels, ws, &values, one(1), &mut scores))?;
        } else {
            // Several images: whole images per thread, one at a time, so that each thread's
            // working set stays one image (a batch of flow activations outgrows the caches).
            let workers = threads.min(batch);
            if guard.len() < workers {
                guard.resize_with(workers, Workspace::default);
            }
            let per = batch.div_ceil(workers);
            let (image_len, map_len) = (c * height * width, height * width);
            let kernels = self.kernels.serial();
            let workspaces: &mut [Workspace] = &mut guard[..];
            let mut results: Vec<Result<()>> = (0..workers).map(|_| Ok(())).collect();
            let values = &values;
            rayon::scope(|s| {
                for (((ws, scores), result), inputs) in workspaces
                    .iter_mut()
                    .zip(scores.chunks_mut(per * map_len))
                    .zip(results.iter_mut())
                    .zip(values.chunks(per * image_len))
                {
                    s.spawn(move |_| {
                        for (input, out) in inputs.chunks(image_len).zip(scores.chunks_mut(map_len))
                        {
                            *result = self.run(kernels, ws, input, one(1), out);
                            if result.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            results.into_iter().collect::<Result<Vec<()>>>()?;
        }
        Ok(Tensor::from_vec(
            scores,
            (batch, height, width),
            features.device(),
        )?)
    }

    /// Scores `out` (`[B, h, w]`) of the channels-first features `values` with `ws`'s buffers.
    fn run(
        &self,
        k: Kernels,
        ws: &mut Workspace,
        values: &[f32],
        grid: Grid,
        out: &mut [f32],
    ) -> Result<()> {
        let (n, c) = (grid.positions(), self.mean.len());
        let source = slot(&mut ws.source, n * c);
        nchw_to_nhwc(
            values,
            [grid.batch, c, grid.height, grid.width],
            source,
            |v| v,
        );
        for pixel in source.chunks_exact_mut(c) {
            for ((v, m), s) in pixel.iter_mut().zip(&self.mean).zip(&self.std) {
                *v = (*v - m) / s;
            }
        }
        let target = slot(&mut ws.target, n * c);
        target.copy_from_slice(source);
        let log_det = slot(&mut ws.log_det, n);
        self.flow
            .forward(k, target, grid, log_det, &mut ws.scratch)?;
        let Some(mapping) = &self.mapping else {
            for ((score, z), ld) in out.iter_mut().zip(target.chunks_exact(c)).zip(&*log_det) {
                *score = 0.5 * z.iter().map(|v| v * v).sum::<f32>() - ld;
            }
            return Ok(());
        };
        let (source, target) = (&ws.source[..n * c], &ws.target[..n * c]);
        // TMNN's error first, then SMNN's added (the candle path's order of summation).
        for (to_target, input, expected) in [(true, source, target), (false, target, source)] {
            mapping.predict(
                k,
                to_target,
                input,
                grid,
                &mut ws.ping,
                &mut ws.pong,
                &mut ws.scratch,
            )?;
            for ((e, p), t) in out
                .iter_mut()
                .zip(ws.ping[..n * c].chunks_exact(c))
                .zip(expected.chunks_exact(c))
            {
                let error: f32 = p.iter().zip(t).map(|(p, t)| (p - t) * (p - t)).sum();
                *e = if to_target { error } else { *e + error };
            }
        }
        Ok(())
    }
}
