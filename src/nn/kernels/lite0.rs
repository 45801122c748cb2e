//! EfficientNet-Lite0 on the fast kernels: channels-last from the stem to the taps, BN folded,
//! every activation buffer owned by the engine and reused across calls.
use std::ops::Range;
use std::sync::Mutex;

use super::team::Disjoint;
use super::{
    nhwc_to_nchw, pack_conv_weight, pack_depthwise_weight, par_rows, ASource, Activation, ConvGeom,
    DepthwiseGeom, Epilogue, Kernels, PackedB,
};
use crate::error::{Error, Result};
use crate::nn::depthwise::SamePad;

/// Folded weights of one inverted-residual block, PyTorch layouts (row-major).
pub struct BlockWeights {
    pub kernel: usize,
    pub stride: usize,
    pub in_c: usize,
    pub hidden: usize,
    pub out_c: usize,
    /// `([hidden, in], [hidden])`, absent when the expansion is 1.
    pub expand: Option<(Vec<f32>, Vec<f32>)>,
    /// `([hidden, 1, k, k], [hidden])`.
    pub depthwise: (Vec<f32>, Vec<f32>),
    /// `([out, hidden], [out])`.
    pub project: (Vec<f32>, Vec<f32>),
}

struct Block {
    kernel: usize,
    stride: usize,
    hidden: usize,
    out_c: usize,
    residual: bool,
    expand: Option<PackedB>,
    dw_weight: Vec<f32>,
    dw_bias: Vec<f32>,
    project: PackedB,
}

/// Where a fused block reads its input rows.
#[derive(Clone, Copy)]
enum BlockInput<'a> {
    /// The previous block's output, `[H, W, c]`.
    Map(&'a [f32]),
    /// The stem's output, computed row by row into the ring from the channels-last image, so
    /// that it never passes through memory either (block 0 has no expansion).
    Stem {
        image: &'a [f32],
        geom: ConvGeom,
        weight: &'a PackedB,
    },
}

/// Output rows `rows` of the stem convolution `geom` (one image) into `out`.
fn stem_rows(
    k: Kernels,
    image: &[f32],
    geom: &ConvGeom,
    weight: &PackedB,
    rows: Range<usize>,
    out: &mut [f32],
) -> Result<()> {
    // The convolution of the image from the first row these outputs read, padding only what
    // lies above the image.
    let top = (rows.start * geom.stride) as isize - geom.pad_top as isize;
    let first = top.max(0) as usize;
    let part = ConvGeom {
        height: geom.height - first,
        pad_top: (first as isize - top) as usize,
        out_h: rows.len(),
        ..*geom
    };
    let row_len = geom.width * geom.in_c;
    k.conv2d(&image[first * row_len..], part, weight, RELU6, out)
}

impl Block {
    /// Output rows `rows` of this block for one image (`input`: `c` channels, the depthwise
    /// geometry `dw`), written to `out`: the expansion of each input row (or the stem's output
    /// row) goes into a ring of rows just before the depthwise convolution needs it, and the
    /// depthwise output of a few rows straight into the projection, so that the expanded maps (up
    /// to 6 MB per image) never pass through memory.
    #[allow(clippy::too_many_arguments)]
    fn fused_rows(
        &self,
        k: Kernels,
        dw: &DepthwiseGeom,
        c: usize,
        input: BlockInput,
        rows: Range<usize>,
        out: &mut [f32],
        scratch: &mut BandScratch,
    ) -> Result<()> {
        let (h, w, ow, hidden) = (dw.height, dw.width, dw.out_w, self.hidden);
        let step = rows_per_step(ow);
        let slots = (step - 1) * self.stride + self.kernel;
        let first_row = |oy: usize| (oy * self.stride).saturating_sub(dw.pad_top);
        let rows_end = |oy_end: usize| {
            ((oy_end - 1) * self.stride + self.kernel)
                .saturating_sub(dw.pad_top)
                .min(h)
        };
        let ring = slot(&mut scratch.ring, slots * w * hidden);
        let mut produced_to = first_row(rows.start);
        let mut oy = rows.start;
        while oy < rows.end {
            let oy_end = (oy + step).min(rows.end);
            let filtered = slot(&mut scratch.filtered, (oy_end - oy) * ow * hidden);
            // Without an expansion the previous block's whole output is the ring.
            let (source, source_slots): (&[f32], usize) = match (&self.expand, input) {
                (None, BlockInput::Map(input)) => (input, h),
                (expand, input) => {
                    // Produce the input rows these output rows need and the ring lacks, in
                    // runs that do not wrap around the ring.
                    let need = rows_end(oy_end);
                    while produced_to < need {
                        let at = produced_to % slots;
                        let n = (need - produced_to).min(slots - at);
                        let dst = &mut ring[at * w * hidden..(at + n) * w * hidden];
                        match (expand, input) {
                            (Some(expand), BlockInput::Map(input)) => k.gemm(
                                ASource::Matrix {
                                    data: &input[produced_to * w * c..(produced_to + n) * w * c],
                                    lda: c,
                                },
                                expand,
                                RELU6,
                                dst,
                            )?,
                            (
                                None,
                                BlockInput::Stem {
                                    image,
                                    geom,
                                    weight,
                                },
                            ) => stem_rows(
                                k,
                                image,
                                &geom,
                                weight,
                                produced_to..produced_to + n,
                                dst,
                            )?,
                            _ => {
                                return Err(Error::invalid(
                                    "fused block",
                                    "the stem can only feed a block without an expansion",
                                ))
                            }
                        }
                        produced_to += n;
                    }
                    (ring, slots)
                }
            };
            k.depthwise_ring_rows(
                dw,
                source,
                source_slots,
                oy..oy_end,
                &self.dw_weight,
                &self.dw_bias,
                Activation::Relu6,
                filtered,
            )?;
            let residual = match (self.residual, input) {
                (false, _) => None,
                (true, BlockInput::Map(input)) => Some(&input[oy * w * c..oy_end * w * c]),
                (true, BlockInput::Stem { .. }) => {
                    return Err(Error::invalid("fused block", "no skip around the stem"))
                }
            };
            k.gemm(
                ASource::Matrix {
                    data: filtered,
                    lda: hidden,
                },
                &self.project,
                Epilogue {
                    activation: Activation::Identity,
                    residual,
                },
                &mut out
                    [(oy - rows.start) * ow * self.out_c..(oy_end - rows.start) * ow * self.out_c],
            )?;
            oy = oy_end;
        }
        Ok(())
    }

    /// The depthwise geometry of this block on an `h × w` map of one image.
    fn depthwise_geom(&self, h: usize, w: usize) -> DepthwiseGeom {
        let pad = SamePad::new(h, w, self.kernel, self.stride);
        DepthwiseGeom {
            batch: 1,
            height: h,
            width: w,
            channels: self.hidden,
            kernel: self.kernel,
            stride: self.stride,
            pad_top: pad.top,
            pad_left: pad.left,
            out_h: h.div_ceil(self.stride),
            out_w: w.div_ceil(self.stride),
        }
    }

    /// The whole block one operation after another, each split over the threads by rows: for
    /// small maps, where bands of rows would recompute too many shared input rows.
    fn unfused(&self, k: Kernels, ws: &mut Workspace, dw: &DepthwiseGeom, c: usize) -> Result<()> {
        let pixels = dw.batch * dw.height * dw.width;
        let current = &ws.current[..pixels * c];
        let hidden_in: &[f32] = match &self.expand {
            Some(expand) => {
                let out = slot(&mut ws.expanded, pixels * self.hidden);
                k.gemm(
                    ASource::Matrix {
                        data: current,
                        lda: c,
                    },
                    expand,
                    RELU6,
                    out,
                )?;
                out
            }
            None => current,
        };
        let filtered = slot(
            &mut ws.filtered,
            dw.batch * dw.out_h * dw.out_w * self.hidden,
        );
        k.depthwise(
            dw,
            hidden_in,
            &self.dw_weight,
            &self.dw_bias,
            Activation::Relu6,
            filtered,
        )?;
        let next = slot(&mut ws.next, dw.batch * dw.out_h * dw.out_w * self.out_c);
        let project = Epilogue {
            activation: Activation::Identity,
            residual: self.residual.then_some(current),
        };
        k.gemm(
            ASource::Matrix {
                data: filtered,
                lda: self.hidden,
            },
            &self.project,
            project,
            next,
        )
    }
}

/// Output rows per fused step for maps `ow` pixels wide.
fn rows_per_step(ow: usize) -> usize {
    FUSED_PIXELS.div_ceil(ow.max(1)).max(1)
}

/// Bands of output rows the fused path would run `block` in with `threads` threads, or 0 when
/// it should run unfused: split over threads, each band recomputes the input rows it shares with
/// the band above, which is not worth it unless the bands are tall. The bound (a quarter of a
/// band shared, at most) was measured: at 256² it fuses blocks 4, 6 and 7 too, which was faster at
/// batch 1 than an eighth (A/B, 8 alternating runs) and not clearly slower than a half.
fn fused_bands(block: &Block, dw: &DepthwiseGeom, threads: usize) -> usize {
    if threads <= 1 {
        return 1;
    }
    let band_rows = dw.out_h.div_ceil(threads) * block.stride;
    let shared = block.kernel.saturating_sub(block.stride);
    if band_rows >= 4 * shared {
        threads.min(dw.out_h)
    } else {
        0
    }
}

const RELU6: Epilogue<'static> = Epilogue {
    activation: Activation::Relu6,
    residual: None,
};

/// Activation buffers, grown to the largest shape seen and reused.
#[derive(Default)]
struct Workspace {
    input: Vec<f32>,
    current: Vec<f32>,
    expanded: Vec<f32>,
    filtered: Vec<f32>,
    next: Vec<f32>,
    /// One per band of rows that runs at the same time.
    bands: Vec<BandScratch>,
}

/// Buffers of one band of a fused block: a ring of expanded input rows and the depthwise output
/// of a few rows, both small enough to stay in L2.
#[derive(Default)]
struct BandScratch {
    ring: Vec<f32>,
    filtered: Vec<f32>,
}

/// Output pixels a fused step aims to handle at once, so that its GEMMs get enough rows.
const FUSED_PIXELS: usize = 64;

fn slot(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// The fast Lite0 feature extractor (inference only).
pub struct FastLite0 {
    kernels: Kernels,
    stem_rgb: PackedB,
    stem_grey: PackedB,
    stem_channels: usize,
    blocks: Vec<Block>,
    /// Buffers of each worker, reused across calls.
    workspaces: Mutex<Vec<Workspace>>,
}

/// A feature map `[B, C, H, W]` (channels-first, as candle expects) from [`FastLite0::forward_taps`].
pub struct FeatureMap {
    pub data: Vec<f32>,
    pub dims: [usize; 4],
}

impl FastLite0 {
    /// `stem`: folded `[32, 3, 3, 3]` weight and its bias.
    pub fn new(kernels: Kernels, stem: (&[f32], &[f32]), blocks: Vec<BlockWeights>) -> Self {
        let (stem_w, stem_b) = stem;
        let stem_channels = stem_b.len();
        let grey: Vec<f32> = stem_w.chunks_exact(27).flat_map(sum_rgb).collect();
        let blocks = blocks
            .into_iter()
            .map(|b| Block {
                kernel: b.kernel,
                stride: b.stride,
                hidden: b.hidden,
                out_c: b.out_c,
                residual: b.stride == 1 && b.in_c == b.out_c,
                expand: b
                    .expand
                    .map(|(w, bias)| PackedB::from_out_in(&w, b.hidden, b.in_c, &bias)),
                dw_weight: pack_depthwise_weight(&b.depthwise.0, b.hidden, b.kernel),
                dw_bias: b.depthwise.1,
                project: PackedB::from_out_in(&b.project.0, b.out_c, b.hidden, &b.project.1),
            })
            .collect();
        Self {
            kernels,
            stem_rgb: pack_conv_weight(stem_w, stem_channels, 3, 3, 3, stem_b),
            stem_grey: pack_conv_weight(&grey, stem_channels, 1, 3, 3, stem_b),
            stem_channels,
            blocks,
            workspaces: Mutex::new(Vec::new()),
        }
    }

    pub fn last_block(&self) -> usize {
        self.blocks.len().saturating_sub(1)
    }

    /// `images` `[B, 1 | 3, H, W]` (values in 0..=1, row-major) → the maps after each block in
    /// `taps`, in the order given.
    pub fn forward_taps(
        &self,
        images: &[f32],
        dims: [usize; 4],
        taps: &[usize],
    ) -> Result<Vec<FeatureMap>> {
        let [batch, channels, height, width] = dims;
        let stem = match channels {
            1 => &self.stem_grey,
            3 => &self.stem_rgb,
            _ => {
                return Err(Error::invalid(
                    "backbone input",
                    format!("shape {dims:?} is not [B, 1 or 3, H, W]"),
                ))
            }
        };
        if batch == 0 || height == 0 || width == 0 || images.len() != dims.iter().product::<usize>()
        {
            return Err(Error::invalid(
                "backbone input",
                format!("{} values for shape {dims:?}", images.len()),
            ));
        }
        crate::nn::backbone::deepest_tap(taps, self.last_block())?;
        let mut outputs: Vec<FeatureMap> = self
            .tap_dims(dims, taps)
            .into_iter()
            .map(|dims| FeatureMap {
                data: vec![0.0; dims.iter().product()],
                dims,
            })
            .collect();
        let mut guard = self
            .workspaces
            .lock()
            .map_err(|_| Error::invalid("backbone workspace", "poisoned by a panic"))?;
        let threads = rayon::current_num_threads().max(1);
        let image_dims = [channels, height, width];
        if batch == 1 {
            // One image: every operation split over a team of threads kept spinning for the
            // whole pass.
            if guard.is_empty() {
                guard.push(Workspace::default());
            }
            let mut views: Vec<&mut [f32]> = outputs.iter_mut().map(|m| &mut m.data[..]).collect();
            let ws = &mut guard[0];
            self.kernels.in_team(|| {
                self.run(self.kernels, ws, images, image_dims, stem, taps, &mut views)
            })?;
        } else {
            // Several images: whole images per thread, one at a time, with its own buffers, so
            // that no operation waits for another thread and each working set stays one image.
            let workers = threads.min(batch);
            if guard.len() < workers {
                guard.resize_with(workers, Workspace::default);
            }
            let per = batch.div_ceil(workers);
            let image_len = images.len() / batch;
            let map_lens: Vec<usize> = outputs.iter().map(|m| m.data.len() / batch).collect();
            // Per worker: its images and its part of every output map.
            let mut parts: Vec<Vec<&mut [f32]>> = (0..workers).map(|_| Vec::new()).collect();
            for (map, &len) in outputs.iter_mut().zip(&map_lens) {
                for (part, chunk) in parts.iter_mut().zip(map.data.chunks_mut(per * len)) {
                    part.push(chunk);
                }
            }
            let kernels = self.kernels.serial();
            let workspaces: &mut [Workspace] = &mut guard[..];
            let mut results: Vec<Result<()>> = (0..workers).map(|_| Ok(())).collect();
            rayon::scope(|s| {
                for (((worker, ws), part), result) in workspaces
                    .iter_mut()
                    .enumerate()
                    .zip(parts.iter_mut())
                    .zip(results.iter_mut())
                {
                    let map_lens = &map_lens;
                    s.spawn(move |_| {
                        let first = worker * per;
                        let last = (first + per).min(batch);
                        for image in first..last {
                            let src = &images[image * image_len..(image + 1) * image_len];
                            let mut views: Vec<&mut [f32]> = part
                                .iter_mut()
                                .zip(map_lens)
                                .map(|(chunk, &len)| {
                                    &mut chunk[(image - first) * len..(image - first + 1) * len]
                                })
                                .collect();
                            *result =
                                self.run(kernels, ws, src, image_dims, stem, taps, &mut views);
                            if result.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            results.into_iter().collect::<Result<Vec<()>>>()?;
        }
        Ok(outputs)
    }

    /// Shapes `[B, C, H, W]` of the maps after each block in `taps`.
    fn tap_dims(&self, [batch, _, height, width]: [usize; 4], taps: &[usize]) -> Vec<[usize; 4]> {
        taps.iter()
            .map(|&tap| {
                let (mut h, mut w) = (height.div_ceil(2), width.div_ceil(2));
                for block in &self.blocks[..=tap] {
                    (h, w) = (h.div_ceil(block.stride), w.div_ceil(block.stride));
                }
                [batch, self.blocks[tap].out_c, h, w]
            })
            .collect()
    }

    /// Runs one image (`[C, H, W]`) through the network up to the deepest tap with `ws`'s
    /// buffers, writing the taps (channels-first) into `outputs`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        k: Kernels,
        ws: &mut Workspace,
        image: &[f32],
        [channels, height, width]: [usize; 3],
        stem: &PackedB,
        taps: &[usize],
        outputs: &mut [&mut [f32]],
    ) -> Result<()> {
        let deepest = taps.iter().copied().max().unwrap_or(0);
        // Stem: (x − 0.5) / 0.5 while converting to channels-last; zero padding after that.
        let input = slot(&mut ws.input, image.len());
        k.nchw_to_nhwc_one(image, [channels, height, width], input, |v| 2.0 * v - 1.0)?;
        let pad = SamePad::new(height, width, 3, 2);
        let (mut h, mut w) = (height.div_ceil(2), width.div_ceil(2));
        let geom = ConvGeom {
            batch: 1,
            height,
            width,
            in_c: channels,
            kernel_h: 3,
            kernel_w: 3,
            stride: 2,
            pad_top: pad.top,
            pad_left: pad.left,
            out_h: h,
            out_w: w,
        };
        let mut c = self.stem_channels;
        let threads = if k.parallel {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        // Block 0 reads the stem's rows from its ring when it runs fused.
        let stem_fused = self.blocks[0].expand.is_none()
            && fused_bands(
                &self.blocks[0],
                &self.blocks[0].depthwise_geom(h, w),
                threads,
            ) > 0;
        if !stem_fused {
            k.conv2d(input, geom, stem, RELU6, slot(&mut ws.current, h * w * c))?;
        }

        for (index, block) in self.blocks[..=deepest].iter().enumerate() {
            let dw = block.depthwise_geom(h, w);
            let (oh, ow) = (dw.out_h, dw.out_w);
            let bands = fused_bands(block, &dw, threads);
            if bands > 0 {
                let Workspace {
                    input: input_image,
                    current,
                    next,
                    bands: scratch,
                    ..
                } = &mut *ws;
                if scratch.len() < bands {
                    scratch.resize_with(bands, BandScratch::default);
                }
                let input = if index == 0 && stem_fused {
                    BlockInput::Stem {
                        image: &input_image[..image.len()],
                        geom,
                        weight: stem,
                    }
                } else {
                    BlockInput::Map(&current[..h * w * c])
                };
                let out = slot(next, oh * ow * block.out_c);
                let scratch = Disjoint::new(&mut scratch[..bands]);
                let failure = Mutex::new(None);
                // The bands split the rows as any operation's rows are split, one per thread
                // (`bands` of them), or run as one when these kernels are serial.
                let macs = if bands > 1 { usize::MAX } else { 0 };
                par_rows(oh, ow * block.out_c, 1, macs, out, |band, rows, chunk| {
                    // SAFETY: each band uses only its own scratch.
                    let scratch = unsafe { &mut scratch.range(band..band + 1)[0] };
                    if let Err(e) =
                        block.fused_rows(k.serial(), &dw, c, input, rows, chunk, scratch)
                    {
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                });
                if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    return Err(e);
                }
            } else {
                block.unfused(k, ws, &dw, c)?;
            }
            std::mem::swap(&mut ws.current, &mut ws.next);
            (h, w, c) = (oh, ow, block.out_c);
            for (out, _) in outputs.iter_mut().zip(taps).filter(|(_, &t)| t == index) {
                nhwc_to_nchw(&ws.current[..h * w * c], [1, c, h, w], out);
            }
        }
        Ok(())
    }
}

/// A `[3, 3, 3]` RGB stem filter summed over its input channels (a grey image replicated to RGB).
fn sum_rgb(filter: &[f32]) -> Vec<f32> {
    (0..9)
        .map(|t| filter[t] + filter[9 + t] + filter[18 + t])
        .collect()
}

impl std::fmt::Debug for FastLite0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastLite0")
            .field("isa", &self.kernels.isa())
            .field("blocks", &self.blocks.len())
            .finish()
    }
}
