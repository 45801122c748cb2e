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
    workspace: Mutex<Workspace>,
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
            workspace: Mutex::new(Workspace::default()),
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
        let grid = Grid {
            batch,
            height,
            width,
        };
        let n = grid.positions();
        let values: Vec<f32> = features.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut guard = self
            .workspace
            .lock()
            .map_err(|_| Error::invalid("NF-BMR workspace", "poisoned by a panic"))?;
        let ws = &mut *guard;
        let k = self.kernels;
        let source = slot(&mut ws.source, n * c);
        nchw_to_nhwc(&values, [batch, c, height, width], source, |v| v);
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
        let mut scores = vec![0f32; n];
        match &self.mapping {
            None => {
                for ((score, z), ld) in scores.iter_mut().zip(target.chunks_exact(c)).zip(&*log_det)
                {
                    *score = 0.5 * z.iter().map(|v| v * v).sum::<f32>() - ld;
                }
            }
            Some(mapping) => {
                let (source, target) = (&ws.source[..n * c], &ws.target[..n * c]);
                let mut to_target = vec![0f32; n];
                for (from, to, errors) in
                    [(true, target, &mut to_target), (false, source, &mut scores)]
                {
                    let input = if from { source } else { target };
                    mapping.predict(
                        k,
                        from,
                        input,
                        grid,
                        &mut ws.ping,
                        &mut ws.pong,
                        &mut ws.scratch,
                    )?;
                    for ((e, p), t) in errors
                        .iter_mut()
                        .zip(ws.ping[..n * c].chunks_exact(c))
                        .zip(to.chunks_exact(c))
                    {
                        *e = p.iter().zip(t).map(|(p, t)| (p - t) * (p - t)).sum();
                    }
                }
                for (s, t) in scores.iter_mut().zip(&to_target) {
                    *s += t;
                }
            }
        }
        Ok(Tensor::from_vec(
            scores,
            (batch, height, width),
            features.device(),
        )?)
    }
}
