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
    //! A camera through nokhwa (V4L2 on Linux).
    use nokhwa::pixel_format::RgbFormat;
    use nokhwa::utils::{
        CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType, Resolution,
    };
    use nokhwa::Camera;

    use super::{FrameSource, SourceConfig};
    use crate::data::Image;
    use crate::error::{Error, Result};
    use crate::station::Frame;

    pub struct CameraSource {
        index: u32,
        format: CameraFormat,
        camera: Option<Camera>,
        frames: u64,
    }

    fn camera_error(e: impl std::fmt::Display) -> Error {
        Error::Device(format!("camera: {e}"))
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
                camera: None,
                frames: 0,
            })
        }
    }

    impl FrameSource for CameraSource {
        fn open(&mut self) -> Result<()> {
            self.camera = None;
            let requested =
                RequestedFormat::new::<RgbFormat>(RequestedFormatType::Exact(self.format));
            let mut camera =
                Camera::new(CameraIndex::Index(self.index), requested).map_err(camera_error)?;
            camera.open_stream().map_err(camera_error)?;
            self.camera = Some(camera);
            Ok(())
        }

        fn grab(&mut self) -> Result<Option<(String, Frame)>> {
            let camera = self
                .camera
                .as_mut()
                .ok_or_else(|| camera_error("not open"))?;
            let buffer = camera.frame().map_err(camera_error)?;
            let rgb = buffer.decode_image::<RgbFormat>().map_err(camera_error)?;
            let (w, h) = (rgb.width() as usize, rgb.height() as usize);
            let mut image = Image::zeros(3, h, w);
            let n = h * w;
            for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
                for (c, &v) in px.iter().enumerate() {
                    image.data[c * n + i] = v as f32 / 255.0;
                }
            }
            self.frames += 1;
            Ok(Some((
                format!("camera{}-{}", self.index, self.frames),
                Frame::Pixels(image),
            )))
        }
    }
}
