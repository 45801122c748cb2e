//! Where parts come from: a folder of image files, the synthetic product, or a camera.
//!
//! A [`FrameSource`] only opens and grabs; the source stage around it (in `pipeline`) paces,
//! waits for triggers, and when `open` or `grab` fails reports FAULT and retries with back-off.
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::SourceConfig;
use super::Frame;
use crate::data::synth::{self, DefectKind, SynthConfig};
use crate::error::{Error, Result};
use crate::rng::Rng;

pub trait FrameSource: Send {
    /// Opens the device or folder; called again after a failure.
    fn open(&mut self) -> Result<()>;
    /// The next frame and its name; `None` when the source is finished.
    fn grab(&mut self) -> Result<Option<(String, Frame)>>;
    /// Parts per second the source should be paced at (0 = as fast as taken).
    fn rate_hz(&self) -> f64 {
        0.0
    }
}

/// First and longest pause between attempts to reopen a failed source.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub fn from_config(cfg: &SourceConfig) -> Result<Box<dyn FrameSource>> {
    match cfg {
        SourceConfig::Folder {
            path,
            looped,
            rate_hz,
        } => Ok(Box::new(FolderSource::new(path, *looped, *rate_hz))),
        SourceConfig::Synthetic {
            height,
            width,
            channels,
            seed,
            defect_rate,
            count,
            rate_hz,
        } => Ok(Box::new(SyntheticSource::new(
            SynthConfig {
                height: *height,
                width: *width,
                channels: *channels,
                seed: *seed,
                ..SynthConfig::default()
            },
            *defect_rate,
            *count,
            *rate_hz,
        ))),
        #[cfg(feature = "camera")]
        SourceConfig::Camera { .. } => Ok(Box::new(camera::CameraSource::new(cfg)?)),
        #[cfg(not(feature = "camera"))]
        SourceConfig::Camera { .. } => Err(Error::config(
            "source.kind",
            "`camera` needs a vigil built with `--features camera`",
        )),
    }
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// Image files of a folder in name order, once or looped. The folder is listed again at each
/// pass, so files added to an empty folder are picked up.
pub struct FolderSource {
    dir: PathBuf,
    looped: bool,
    rate_hz: f64,
    files: Vec<PathBuf>,
    next: usize,
}

impl FolderSource {
    pub fn new(dir: &Path, looped: bool, rate_hz: f64) -> FolderSource {
        FolderSource {
            dir: dir.to_path_buf(),
            looped,
            rate_hz,
            files: Vec::new(),
            next: 0,
        }
    }
}

/// Image files directly in `dir`, sorted by name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|e| {
                    IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str())
                })
        })
        .collect();
    files.sort();
    Ok(files)
}

impl FrameSource for FolderSource {
    fn open(&mut self) -> Result<()> {
        self.files = image_files(&self.dir)?;
        self.next = 0;
        if self.files.is_empty() {
            return Err(Error::Dataset {
                path: self.dir.clone(),
                reason: "no image files".into(),
            });
        }
        Ok(())
    }

    fn grab(&mut self) -> Result<Option<(String, Frame)>> {
        if self.next == self.files.len() {
            if !self.looped {
                return Ok(None);
            }
            // A new pass: an emptied folder is a fault (reopen), not the end.
            self.open()?;
        }
        let path = self.files[self.next].clone();
        self.next += 1;
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        Ok(Some((name, Frame::File(path))))
    }

    fn rate_hz(&self) -> f64 {
        self.rate_hz
    }
}

/// The synthetic product generated on the fly, a share of parts with a defect.
pub struct SyntheticSource {
    cfg: SynthConfig,
    defect_rate: f32,
    count: u64,
    rate_hz: f64,
    produced: u64,
    rng: Rng,
}

impl SyntheticSource {
    pub fn new(cfg: SynthConfig, defect_rate: f32, count: u64, rate_hz: f64) -> SyntheticSource {
        let rng = Rng::new(cfg.seed);
        SyntheticSource {
            cfg,
            defect_rate,
            count,
            rate_hz,
            produced: 0,
            rng,
        }
    }
}

impl FrameSource for SyntheticSource {
    fn open(&mut self) -> Result<()> {
        self.cfg.validate()
    }

    fn grab(&mut self) -> Result<Option<(String, Frame)>> {
        if self.count > 0 && self.produced == self.count {
            return Ok(None);
        }
        let mut part_rng = self.rng.fork(self.produced);
        let defect = part_rng.bool(self.defect_rate).then(|| {
            DefectKind::ALL[part_rng.range_usize(0, DefectKind::ALL.len()) % DefectKind::ALL.len()]
        });
        let (image, _) = synth::product(&self.cfg, &mut part_rng, defect);
        let name = format!(
            "synthetic-{}-{}",
            self.produced,
            defect.map_or("good", DefectKind::name)
        );
        self.produced += 1;
        Ok(Some((name, Frame::Pixels(image))))
    }

    fn rate_hz(&self) -> f64 {
        self.rate_hz
    }
}

#[cfg(feature = "camera")]
pub mod camera {
    //! A camera through nokhwa (V4L2 on Linux). The camera lives in a thread of its own that
    //! streams frames into a one-slot channel: the source never depends on nokhwa's types being
    //! `Send`, and a camera that stops delivering is noticed by a timeout, not a hang.
    use std::time::Duration;

    use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};
    use nokhwa::pixel_format::RgbFormat;
    use nokhwa::utils::{
        CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType, Resolution,
    };
    use nokhwa::Camera;

    use super::{FrameSource, SourceConfig};
    use crate::data::Image;
    use crate::error::{Error, Result};
    use crate::station::Frame;

    /// A frame not arriving within this time counts as a dropped camera.
    const FRAME_TIMEOUT: Duration = Duration::from_secs(2);

    pub struct CameraSource {
        index: u32,
        format: CameraFormat,
        frames: Option<Receiver<std::result::Result<Image, String>>>,
        count: u64,
    }

    impl CameraSource {
        pub fn new(cfg: &SourceConfig) -> Result<CameraSource> {
            let SourceConfig::Camera {
                device,
                width,
                height,
                fps,
                pixel_format,
            } = cfg
            else {
                return Err(Error::config("source.kind", "not a camera"));
            };
            let frame_format = match pixel_format.as_str() {
                "mjpeg" => FrameFormat::MJPEG,
                "yuyv" => FrameFormat::YUYV,
                _ => FrameFormat::GRAY,
            };
            Ok(CameraSource {
                index: *device,
                format: CameraFormat::new(Resolution::new(*width, *height), frame_format, *fps),
                frames: None,
                count: 0,
            })
        }
    }

    fn to_image(rgb: &[u8], width: usize, height: usize) -> Image {
        let mut image = Image::zeros(3, height, width);
        let n = height * width;
        for (i, px) in rgb.chunks_exact(3).enumerate().take(n) {
            for (c, &v) in px.iter().enumerate() {
                image.data[c * n + i] = v as f32 / 255.0;
            }
        }
        image
    }

    /// Opens the camera and streams frames until it fails or the receiver is gone.
    fn stream(
        index: u32,
        format: CameraFormat,
        opened: crossbeam_channel::Sender<std::result::Result<(), String>>,
        frames: crossbeam_channel::Sender<std::result::Result<Image, String>>,
    ) {
        let requested = RequestedFormat::new::<RgbFormat>(RequestedFormatType::Exact(format));
        let mut camera = match Camera::new(CameraIndex::Index(index), requested)
            .and_then(|mut c| c.open_stream().map(|_| c))
        {
            Ok(c) => {
                let _ = opened.send(Ok(()));
                c
            }
            Err(e) => {
                let _ = opened.send(Err(e.to_string()));
                return;
            }
        };
        loop {
            let frame = camera
                .frame()
                .map_err(|e| e.to_string())
                .and_then(|buffer| {
                    let rgb = buffer
                        .decode_image::<RgbFormat>()
                        .map_err(|e| e.to_string())?;
                    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
                    Ok(to_image(rgb.as_raw(), w, h))
                });
            let failed = frame.is_err();
            if frames.send(frame).is_err() || failed {
                return;
            }
        }
    }

    impl FrameSource for CameraSource {
        fn open(&mut self) -> Result<()> {
            self.frames = None;
            let (opened_tx, opened_rx) = bounded(1);
            let (frames_tx, frames_rx) = bounded(1);
            let (index, format) = (self.index, self.format);
            std::thread::Builder::new()
                .name(format!("camera{index}"))
                .spawn(move || stream(index, format, opened_tx, frames_tx))
                .map_err(|e| Error::Device(format!("camera {index}: cannot start thread: {e}")))?;
            match opened_rx.recv_timeout(FRAME_TIMEOUT * 5) {
                Ok(Ok(())) => {
                    self.frames = Some(frames_rx);
                    Ok(())
                }
                Ok(Err(e)) => Err(Error::Device(format!("camera {index}: {e}"))),
                Err(_) => Err(Error::Device(format!("camera {index}: does not open"))),
            }
        }

        fn grab(&mut self) -> Result<Option<(String, Frame)>> {
            let index = self.index;
            let frames = self
                .frames
                .as_ref()
                .ok_or_else(|| Error::Device(format!("camera {index}: not open")))?;
            // A frame already waiting was taken before this grab (before the trigger): the
            // part is the next one.
            while let Ok(stale) = frames.try_recv() {
                if let Err(e) = stale {
                    return Err(Error::Device(format!("camera {index}: {e}")));
                }
            }
            let image = match frames.recv_timeout(FRAME_TIMEOUT) {
                Ok(Ok(image)) => image,
                Ok(Err(e)) => return Err(Error::Device(format!("camera {index}: {e}"))),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Device(format!(
                        "camera {index}: no frame for {} s",
                        FRAME_TIMEOUT.as_secs()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Device(format!("camera {index}: stream ended")))
                }
            };
            self.count += 1;
            Ok(Some((
                format!("camera{index}-{}", self.count),
                Frame::Pixels(image),
            )))
        }
    }
}
