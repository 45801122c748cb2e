//! In-memory images and masks as the rest of vigil sees them.
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageDecoder, ImageEncoder, ImageReader};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The size and channel count a model takes; images of any size are resized to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    pub height: usize,
    pub width: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
}

impl InputSpec {
    /// Errors unless `images` is a `[B, C, H, W]` batch of this size, naming both sizes.
    pub fn check_batch(&self, images: &Tensor) -> Result<()> {
        let (_, c, h, w) = images.dims4()?;
        if (c, h, w) != (self.channels, self.height, self.width) {
            return Err(Error::invalid(
                "images",
                format!(
                    "{c}x{h}x{w}, the model takes {}x{}x{}",
                    self.channels, self.height, self.width
                ),
            ));
        }
        Ok(())
    }
}

/// A CHW image with values in 0..=1.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// A binary mask, row-major, 1 = defect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

impl Image {
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Image {
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
        }
    }

    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }

    pub fn plane_mut(&mut self, c: usize) -> &mut [f32] {
        let n = self.height * self.width;
        &mut self.data[c * n..(c + 1) * n]
    }
}

impl Mask {
    pub fn zeros(height: usize, width: usize) -> Self {
        Mask {
            height,
            width,
            data: vec![0; height * width],
        }
    }

    pub fn any(&self) -> bool {
        self.data.iter().any(|&v| v != 0)
    }
}

/// Stacks same-sized images into a `[B, C, H, W]` tensor.
pub fn batch_tensor(images: &[&Image], device: &Device) -> Result<Tensor> {
    let first = images
        .first()
        .ok_or_else(|| crate::error::Error::invalid("batch", "no images"))?;
    let (c, h, w) = (first.channels, first.height, first.width);
    let mut data = Vec::with_capacity(images.len() * c * h * w);
    for img in images {
        if (img.channels, img.height, img.width) != (c, h, w) {
            return Err(crate::error::Error::invalid(
                "batch",
                format!(
                    "image of {}x{}x{} in a batch of {c}x{h}x{w}",
                    img.channels, img.height, img.width
                ),
            ));
        }
        data.extend_from_slice(&img.data);
    }
    Ok(Tensor::from_vec(data, (images.len(), c, h, w), device)?)
}

impl Image {
    /// Resamples to `height` × `width` with a triangle (bilinear, antialiased when shrinking) filter.
    pub fn resize(&self, height: usize, width: usize) -> Image {
        if (height, width) == (self.height, self.width) {
            return self.clone();
        }
        let mut out = Image::zeros(self.channels, height, width);
        if self.height == 0 || self.width == 0 {
            return out;
        }
        for c in 0..self.channels {
            let plane = image::ImageBuffer::<image::Luma<f32>, &[f32]>::from_raw(
                self.width as u32,
                self.height as u32,
                self.plane(c),
            )
            .expect("a plane holds height * width values");
            let resized =
                imageops::resize(&plane, width as u32, height as u32, FilterType::Triangle);
            out.plane_mut(c).copy_from_slice(resized.as_raw());
        }
        out
    }
}

impl Mask {
    /// Nearest-neighbour resampling, so a mask stays binary.
    pub fn resize(&self, height: usize, width: usize) -> Mask {
        if (height, width) == (self.height, self.width) {
            return self.clone();
        }
        let mut out = Mask::zeros(height, width);
        if self.height == 0 || self.width == 0 {
            return out;
        }
        for y in 0..height {
            let sy = nearest_source(y, height, self.height);
            let src_row = &self.data[sy * self.width..(sy + 1) * self.width];
            for (x, v) in out.data[y * width..(y + 1) * width].iter_mut().enumerate() {
                *v = src_row[nearest_source(x, width, self.width)];
            }
        }
        out
    }
}

/// The source index whose pixel centre is nearest to destination pixel `i`'s centre.
fn nearest_source(i: usize, dst_len: usize, src_len: usize) -> usize {
    (((i as f64 + 0.5) * src_len as f64 / dst_len as f64) as usize).min(src_len - 1)
}

fn image_error(path: &Path, reason: impl ToString) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn open_reader(path: &Path) -> Result<ImageReader<BufReader<File>>> {
    ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| image_error(path, e))
}

/// Bounds on an image before it is decoded: a small compressed file can claim a huge image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    pub max_width: u32,
    pub max_height: u32,
    /// Bytes of the decoded pixel buffer, in the file's own colour type and bit depth.
    pub max_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_width: 8192,
            max_height: 8192,
            max_bytes: 256 << 20,
        }
    }
}

/// What `load_image` and `load_mask` always had: any size, and the image crate's own default
/// allocation limit.
const DECODER_DEFAULT: ImageLimits = ImageLimits {
    max_width: u32::MAX,
    max_height: u32::MAX,
    max_bytes: 512 << 20,
};

/// Reads the header, refuses an image beyond `limits` before allocating anything for it, then
/// decodes with the same limits handed to the decoder as a backstop.
fn decode(path: &Path, limits: &ImageLimits) -> Result<DynamicImage> {
    let mut reader = open_reader(path)?;
    // The PNG decoder takes its allocation limit when it is made; dimensions are checked below,
    // with messages that name the keys.
    let mut at_open = image::Limits::no_limits();
    at_open.max_alloc = Some(limits.max_bytes);
    reader.limits(at_open);
    let mut decoder = reader.into_decoder().map_err(|e| image_error(path, e))?;
    let (width, height) = decoder.dimensions();
    if width > limits.max_width {
        return Err(image_error(
            path,
            format!(
                "image is {width}x{height}, above input.max_width {}",
                limits.max_width
            ),
        ));
    }
    if height > limits.max_height {
        return Err(image_error(
            path,
            format!(
                "image is {width}x{height}, above input.max_height {}",
                limits.max_height
            ),
        ));
    }
    let total = decoder.total_bytes();
    if total > limits.max_bytes {
        return Err(image_error(
            path,
            format!(
                "decoded size {total} bytes is above input.max_bytes {}",
                limits.max_bytes
            ),
        ));
    }
    // As the image crate's own `decode`: the pixel buffer is taken from the budget, the rest
    // bounds the decoder's working allocations.
    let mut backstop = image::Limits::no_limits();
    backstop.max_image_width = Some(limits.max_width);
    backstop.max_image_height = Some(limits.max_height);
    backstop.max_alloc = Some(limits.max_bytes - total);
    decoder
        .set_limits(backstop)
        .map_err(|e| image_error(path, e))?;
    DynamicImage::from_decoder(decoder).map_err(|e| image_error(path, e))
}

fn check_spec(spec: &InputSpec) -> Result<()> {
    if spec.channels != 1 && spec.channels != 3 {
        return Err(Error::invalid(
            "input channels",
            format!("{} (must be 1 or 3)", spec.channels),
        ));
    }
    if spec.height == 0 || spec.width == 0 {
        return Err(Error::invalid(
            "input size",
            format!("{}x{} (must be non-zero)", spec.height, spec.width),
        ));
    }
    Ok(())
}

/// Decodes a PNG, JPEG, BMP or TIFF file (recognised by content; 8- or 16-bit, grey or colour,
/// alpha dropped), converts it to `spec.channels` and resizes it to the spec's size.
pub fn load_image(path: &Path, spec: &InputSpec) -> Result<Image> {
    load_image_limited(path, spec, &DECODER_DEFAULT)
}

/// [`load_image`], refusing from the header alone, before decoding, an image wider, taller or
/// larger once decoded than `limits`.
pub fn load_image_limited(path: &Path, spec: &InputSpec, limits: &ImageLimits) -> Result<Image> {
    check_spec(spec)?;
    let decoded = decode(path, limits)?;
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    let mut native = Image::zeros(spec.channels, height, width);
    if spec.channels == 1 {
        native.data.copy_from_slice(decoded.to_luma32f().as_raw());
    } else {
        // Interleaved RGB to planar CHW.
        let rgb = decoded.to_rgb32f();
        let n = height * width;
        for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                native.data[c * n + i] = v;
            }
        }
    }
    Ok(native.resize(spec.height, spec.width))
}

/// Loads a defect mask (any pixel above 127 is defect) resized by nearest neighbour.
pub fn load_mask(path: &Path, height: usize, width: usize) -> Result<Mask> {
    if height == 0 || width == 0 {
        return Err(Error::invalid(
            "mask size",
            format!("{height}x{width} (must be non-zero)"),
        ));
    }
    let grey = decode(path, &DECODER_DEFAULT)?.into_luma8();
    let mask = Mask {
        height: grey.height() as usize,
        width: grey.width() as usize,
        data: grey.as_raw().iter().map(|&v| u8::from(v > 127)).collect(),
    };
    Ok(mask.resize(height, width))
}

/// Reads only the header: (channels 1 or 3, height, width). Colour images report 3.
pub fn probe(path: &Path) -> Result<(usize, usize, usize)> {
    let decoder = open_reader(path)?
        .into_decoder()
        .map_err(|e| image_error(path, e))?;
    let (width, height) = decoder.dimensions();
    let channels = if decoder.color_type().has_color() {
        3
    } else {
        1
    };
    Ok((channels, height as usize, width as usize))
}

fn write_png(
    path: &Path,
    data: &[u8],
    width: usize,
    height: usize,
    color: image::ExtendedColorType,
) -> Result<()> {
    // Encoded in memory, then written: `image::save_buffer` drops its BufWriter unflushed, which
    // loses the write error of a small file on a full disk.
    let mut encoded = Vec::new();
    image::codecs::png::PngEncoder::new(&mut encoded)
        .write_image(data, width as u32, height as u32, color)
        .map_err(|e| image_error(path, e))?;
    std::fs::write(path, encoded).map_err(|e| Error::io(path, e))
}

/// Writes an 8-bit grey or RGB PNG (values clamped to 0..=1 and rounded).
pub fn save_png(image: &Image, path: &Path) -> Result<()> {
    let (c, h, w) = (image.channels, image.height, image.width);
    let color = match c {
        1 => image::ExtendedColorType::L8,
        3 => image::ExtendedColorType::Rgb8,
        other => {
            return Err(Error::invalid(
                "image channels",
                format!("{other} (PNG output takes 1 or 3)"),
            ))
        }
    };
    if image.data.len() != c * h * w {
        return Err(Error::invalid(
            "image data",
            format!("{} values for {c}x{h}x{w}", image.data.len()),
        ));
    }
    let n = h * w;
    let mut bytes = vec![0u8; c * n];
    for (i, px) in bytes.chunks_exact_mut(c).enumerate() {
        for (ch, b) in px.iter_mut().enumerate() {
            *b = (image.data[ch * n + i].clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    write_png(path, &bytes, w, h, color)
}

/// Writes a mask as an 8-bit grey PNG, 255 = defect (the MVTec convention).
pub fn save_mask_png(mask: &Mask, path: &Path) -> Result<()> {
    if mask.data.len() != mask.height * mask.width {
        return Err(Error::invalid(
            "mask data",
            format!(
                "{} values for {}x{}",
                mask.data.len(),
                mask.height,
                mask.width
            ),
        ));
    }
    let bytes: Vec<u8> = mask
        .data
        .iter()
        .map(|&v| if v != 0 { 255 } else { 0 })
        .collect();
    write_png(
        path,
        &bytes,
        mask.width,
        mask.height,
        image::ExtendedColorType::L8,
    )
}
