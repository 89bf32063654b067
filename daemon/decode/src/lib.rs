//! Image decoding and resizing for ferryd's input pipeline.
//!
//! A crate of its own so that it is compiled optimised even in debug builds: the workspace
//! sets `opt-level = 3` for it, and generic code of `image` and `fast_image_resize` is
//! instantiated here (a profile override for those crates alone would not reach generics
//! instantiated in an unoptimised caller; measured: 6x slower). Its functions are not generic.

use std::fmt;

/// Why an image could not be decoded or resized.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// Decoded pixels: rows of `width` pixels, `channels` (1 or 3) bytes each.
pub struct Pixels {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub data: Vec<u8>,
}

/// Decodes a PNG or JPEG (found by its first bytes) to grey (`channels` 1) or RGB (3).
pub fn decode(bytes: &[u8], channels: u32) -> Result<Pixels, Error> {
    let img = image::load_from_memory(bytes).map_err(|e| Error(e.to_string()))?;
    let (width, height) = (img.width(), img.height());
    let data = if channels == 1 {
        img.into_luma8().into_raw()
    } else {
        img.into_rgb8().into_raw()
    };
    Ok(Pixels {
        width,
        height,
        channels: if channels == 1 { 1 } else { 3 },
        data,
    })
}

/// An image's (width, height), read from its header.
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), Error> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error(e.to_string()))?
        .into_dimensions()
        .map_err(|e| Error(e.to_string()))
}

/// Resizes `crop` (left, top, width, height in source pixels; all of it if None) of `src`
/// to `width`×`height`: bilinear, antialiased when shrinking, as PIL's `BILINEAR`.
pub fn resize(
    src: Pixels,
    crop: Option<[f64; 4]>,
    width: u32,
    height: u32,
) -> Result<Pixels, Error> {
    use fast_image_resize::images::Image;
    use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
    let kind = if src.channels == 1 {
        PixelType::U8
    } else {
        PixelType::U8x3
    };
    let channels = src.channels;
    let image = Image::from_vec_u8(src.width, src.height, src.data, kind)
        .map_err(|e| Error(e.to_string()))?;
    let mut dst = Image::new(width, height, kind);
    let mut options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    if let Some([l, t, w, h]) = crop {
        options = options.crop(l, t, w, h);
    }
    Resizer::new()
        .resize(&image, &mut dst, &options)
        .map_err(|e| Error(e.to_string()))?;
    Ok(Pixels {
        width,
        height,
        channels,
        data: dst.into_vec(),
    })
}
