//! Calibration data from a folder of images: the usual vision preprocessing, declared in the
//! `calibration.images:` section of the YAML config, turns each `.png`/`.jpg`/`.jpeg` file into
//! one model input tensor, so calibrating a vision model needs no Python.
//!
//! Order of operations in [`load_image`]:
//!
//! 1. **Decode.** The format is sniffed from the file's content (a PNG named `.jpg` still loads;
//!    anything but PNG or JPEG is an error). The image becomes 8-bit RGB: grayscale is replicated
//!    to three channels, alpha is dropped (not composited, like PIL's `convert("RGB")`), 16-bit
//!    samples are scaled to 8 bits (`round(v * 255 / 65535)`). EXIF orientation is *not*
//!    applied, like `PIL.Image.open` without `ImageOps.exif_transpose`.
//! 2. **Resize** (optional), on the 8-bit image, with bilinear filtering
//!    (`image::imageops::FilterType::Triangle`: a separable triangle filter whose support widens
//!    when downscaling, i.e. antialiased like PIL's `BILINEAR` and torchvision's PIL path; close
//!    to PIL but not bit-identical, expect ±1 differences in 8-bit values). Result rounded to 8 bits.
//!    - `{short_side: S}` matches torchvision `Resize(S)`: the shorter side becomes `S`, the other
//!      becomes `int(S * long / short)`, computed in f64 and **truncated** exactly as torchvision's
//!      `_compute_resized_output_size` does (a 35x20 image with `S = 10` gives 17x10, not 18x10).
//!      An image whose shorter side already is `S` is left unchanged.
//!    - `{size: [H, W]}` matches torchvision `Resize((H, W))`: exact size, aspect ratio not kept.
//! 3. **Center crop** (optional) to `[H, W]`, matching torchvision `CenterCrop`: the offsets are
//!    `top = round((img_h - H) / 2)`, `left = round((img_w - W) / 2)` with Python's round half to
//!    even (so a difference of 3 gives offset 2, of 5 gives 2, of 7 gives 4). Unlike torchvision,
//!    a crop larger than the (resized) image is an error instead of zero padding.
//! 4. **Channel order**: RGB (default) or BGR (OpenCV/Caffe models).
//! 5. **Normalise** in f32, per channel `c` of the *model's* channel order:
//!    `(pixel * scale - mean[c]) / std[c]`, `pixel` in 0..=255. torchvision's
//!    `ToTensor()` + `Normalize(mean, std)` is `scale: 1/255`; it divides by 255 where this
//!    multiplies by `1/255`, which can differ by one ulp. With `dtype: uint8` the raw 0..=255
//!    values are fed unchanged (scale/mean/std must then keep their defaults).
//! 6. **Layout**: `[1, 3, H, W]` (nchw, default) or `[1, H, W, 3]` (nhwc); the leading 1 is the
//!    batch dimension.
//!
//! [`list_images`] gives the image files of a folder in a deterministic (file name) order.
//! Without a resize/crop that fixes the size, images of different sizes give tensors of
//! different shapes; [`load_images`] (or a caller comparing shapes itself with
//! [`size_mismatch_error`]) reports that as one clear data error.

use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::{ImageFormat, RgbImage};
use tract_onnx::prelude::Tensor;

use crate::error::{Error, Result};

/// The file extensions [`list_images`] picks up (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Refuse resize targets (and the resizer's intermediate image) above this many pixels: a
/// mistyped size should be an error, not an out-of-memory abort.
const MAX_PIXELS: u64 = 1 << 26;

/// How to turn an image file into a model input tensor. Deserialised from the
/// `calibration.images:` YAML section.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePreprocess {
    /// Resize before cropping: `{short_side: 256}` (keep aspect ratio, the shorter side becomes
    /// 256) or `{size: [H, W]}` (exact). None: keep the size.
    #[serde(default)]
    pub resize: Option<Resize>,
    /// Center crop to `[H, W]` after resizing. None: no crop.
    #[serde(default)]
    pub center_crop: Option<[u32; 2]>,
    /// Channel order of the model input: rgb (default) or bgr.
    #[serde(default)]
    pub channel_order: ChannelOrder,
    /// Multiply the 0..255 pixel values by this first (e.g. 1/255). Default 1.0.
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// Then subtract mean and divide by std, per channel, in the model's channel order (3 values
    /// each). Defaults: [0, 0, 0] and [1, 1, 1].
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    #[serde(default = "default_std")]
    pub std: [f32; 3],
    /// Memory layout of the model input: nchw (default) or nhwc. The tensor gets a leading batch
    /// dim of 1: `[1, 3, H, W]` or `[1, H, W, 3]`.
    #[serde(default)]
    pub layout: Layout,
    /// Element type of the model input: float32 (default) or uint8 (raw 0..255 values; scale,
    /// mean and std must then be the defaults).
    #[serde(default)]
    pub dtype: PixelType,
}

fn default_scale() -> f32 {
    1.0
}
fn default_mean() -> [f32; 3] {
    [0.0; 3]
}
fn default_std() -> [f32; 3] {
    [1.0; 3]
}

impl Default for ImagePreprocess {
    fn default() -> Self {
        ImagePreprocess {
            resize: None,
            center_crop: None,
            channel_order: ChannelOrder::default(),
            scale: default_scale(),
            mean: default_mean(),
            std: default_std(),
            layout: Layout::default(),
            dtype: PixelType::default(),
        }
    }
}

/// YAML: `resize: {short_side: 256}` or `resize: {size: [224, 224]}` (`[H, W]`).
///
/// (De)serialised through a one-key map rather than serde's externally tagged enum: serde_yaml
/// 0.9 reads and writes those as YAML tags (`resize: !short_side 256`) and rejects the map form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "ResizeRepr", into = "ResizeRepr")]
pub enum Resize {
    /// Keep the aspect ratio; the shorter side becomes this (torchvision `Resize(int)`).
    ShortSide(u32),
    /// Exact `[H, W]` (torchvision `Resize((H, W))`).
    Size([u32; 2]),
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct ResizeRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    short_side: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<[u32; 2]>,
}

impl TryFrom<ResizeRepr> for Resize {
    type Error = String;
    fn try_from(r: ResizeRepr) -> std::result::Result<Self, String> {
        match (r.short_side, r.size) {
            (Some(s), None) => Ok(Resize::ShortSide(s)),
            (None, Some(hw)) => Ok(Resize::Size(hw)),
            _ => Err("resize takes exactly one of `short_side: N` or `size: [H, W]`".to_string()),
        }
    }
}

impl From<Resize> for ResizeRepr {
    fn from(r: Resize) -> Self {
        match r {
            Resize::ShortSide(s) => ResizeRepr {
                short_side: Some(s),
                size: None,
            },
            Resize::Size(hw) => ResizeRepr {
                short_side: None,
                size: Some(hw),
            },
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    #[default]
    Rgb,
    Bgr,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelType {
    #[default]
    Float32,
    Uint8,
}

impl ImagePreprocess {
    /// Checks the settings on their own (no image needed). The message names the offending key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        const KEY: &str = "calibration.images";
        match self.resize {
            Some(Resize::ShortSide(0)) => return Err(format!("{KEY}.resize.short_side must be > 0")),
            Some(Resize::Size([h, w])) if h == 0 || w == 0 => {
                return Err(format!(
                    "{KEY}.resize.size must be [H, W] with both > 0 (got [{h}, {w}])"
                ))
            }
            _ => {}
        }
        if let Some([h, w]) = self.center_crop {
            if h == 0 || w == 0 {
                return Err(format!(
                    "{KEY}.center_crop must be [H, W] with both > 0 (got [{h}, {w}])"
                ));
            }
            if let Some(Resize::Size([rh, rw])) = self.resize {
                if h > rh || w > rw {
                    return Err(format!(
                        "{KEY}.center_crop [{h}, {w}] is larger than {KEY}.resize.size [{rh}, {rw}]: \
                         the crop must fit inside the resized image"
                    ));
                }
            }
        }
        if !self.scale.is_finite() || self.scale == 0.0 {
            return Err(format!("{KEY}.scale must be finite and non-zero (got {})", self.scale));
        }
        for (c, m) in self.mean.iter().enumerate() {
            if !m.is_finite() {
                return Err(format!("{KEY}.mean[{c}] must be finite (got {m})"));
            }
        }
        for (c, s) in self.std.iter().enumerate() {
            if !s.is_finite() || *s == 0.0 {
                return Err(format!("{KEY}.std[{c}] must be finite and non-zero (got {s})"));
            }
        }
        if self.dtype == PixelType::Uint8 {
            let mut set = Vec::new();
            if self.scale != default_scale() {
                set.push(format!("scale {}", self.scale));
            }
            if self.mean != default_mean() {
                set.push(format!("mean {:?}", self.mean));
            }
            if self.std != default_std() {
                set.push(format!("std {:?}", self.std));
            }
            if !set.is_empty() {
                return Err(format!(
                    "{KEY}.dtype uint8 feeds the raw 0..255 pixel values, so scale, mean and std must keep \
                     their defaults (got {}): remove them, or use dtype float32",
                    set.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// The `(H, W)` every image gives when the settings fix it (a center crop, else an exact
/// resize); None when the output size depends on the image.
pub fn fixed_output_size(pre: &ImagePreprocess) -> Option<(u32, u32)> {
    match (pre.center_crop, pre.resize) {
        (Some([h, w]), _) => Some((h, w)),
        (None, Some(Resize::Size([h, w]))) => Some((h, w)),
        _ => None,
    }
}

/// The `.png`/`.jpg`/`.jpeg` files (case-insensitive extension) directly in `dir`, sorted by file
/// name. Subfolders and hidden files (name starting with `.`, e.g. macOS `._x.jpg`) are skipped.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Err(Error::data(dir, "image folder does not exist"));
    }
    if !dir.is_dir() {
        return Err(Error::data(
            dir,
            "not a directory: image calibration expects a folder of .png/.jpg/.jpeg files",
        ));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') || !path.is_file() {
            continue;
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        if ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
            files.push((name, path));
        }
    }
    if files.is_empty() {
        return Err(Error::data(dir, "no .png, .jpg or .jpeg images in this folder"));
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// Decodes one image file and preprocesses it into a model input tensor (`[1, 3, H, W]` or
/// `[1, H, W, 3]`, f32 or u8); see the module documentation for the exact steps. Every error
/// names the file.
pub fn load_image(path: &Path, pre: &ImagePreprocess) -> Result<Tensor> {
    pre.validate().map_err(|m| Error::data(path, m))?;
    let img = decode_rgb8(path)?;
    let img = resize(path, img, pre.resize)?;
    let img = match pre.center_crop {
        Some(crop) => center_crop(path, &img, crop, pre.resize.is_some())?,
        None => img,
    };
    to_tensor(path, &img, pre)
}

/// Loads every file with [`load_image`] and checks that all tensors have the same shape (the
/// first differing file gives [`size_mismatch_error`]). Holds all tensors in memory.
pub fn load_images(files: &[PathBuf], pre: &ImagePreprocess) -> Result<Vec<Tensor>> {
    let mut tensors: Vec<Tensor> = Vec::with_capacity(files.len());
    for file in files {
        let t = load_image(file, pre)?;
        if let Some(first) = tensors.first() {
            if first.shape() != t.shape() {
                return Err(size_mismatch_error(&files[0], first.shape(), file, t.shape()));
            }
        }
        tensors.push(t);
    }
    Ok(tensors)
}

/// The error for two images whose tensors differ in shape: names both files with their sizes
/// (W x H) and says which settings fix it. `*_shape` are the tensor shapes from [`load_image`]
/// (`[1, 3, H, W]` or `[1, H, W, 3]`); other shapes are shown as they are.
pub fn size_mismatch_error(first: &Path, first_shape: &[usize], other: &Path, other_shape: &[usize]) -> Error {
    // Same folder (the usual case): report against the folder and show bare file names.
    let same_dir = first
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && Some(*p) == other.parent());
    let show = |p: &Path| match (same_dir, p.file_name()) {
        (Some(_), Some(n)) => n.to_string_lossy().into_owned(),
        _ => p.display().to_string(),
    };
    let sizes = match (image_hw(first_shape, other_shape), image_hw(other_shape, first_shape)) {
        (Some((h1, w1)), Some((h2, w2))) => (format!("{w1}x{h1}"), format!("{w2}x{h2}")),
        _ => (format!("{first_shape:?}"), format!("{other_shape:?}")),
    };
    Error::data(
        same_dir.unwrap_or(other),
        format!(
            "images differ in size ({} is {}, {} is {}): set calibration.images.resize and/or center_crop \
             so every image gives the same input shape",
            show(first),
            sizes.0,
            show(other),
            sizes.1
        ),
    )
}

/// `(H, W)` of an image tensor shape, the layout decided by either shape of the pair (both come
/// from the same settings); None when it cannot be told.
fn image_hw(shape: &[usize], partner: &[usize]) -> Option<(usize, usize)> {
    let nchw = |s: &[usize]| s.len() == 4 && s[0] == 1 && s[1] == 3;
    let nhwc = |s: &[usize]| s.len() == 4 && s[0] == 1 && s[3] == 3;
    let is_nchw = nchw(shape) && nchw(partner);
    let is_nhwc = nhwc(shape) && nhwc(partner);
    match (is_nchw, is_nhwc) {
        (true, false) => Some((shape[2], shape[3])),
        (false, true) => Some((shape[1], shape[2])),
        _ => None,
    }
}

fn decode_rgb8(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => {}
        Some(other) => {
            return Err(Error::data(
                path,
                format!("is a {other:?} image; only PNG and JPEG are supported"),
            ))
        }
        None => return Err(Error::data(path, "not a PNG or JPEG image")),
    }
    let img = reader
        .decode()
        .map_err(|e| Error::data(path, format!("cannot decode image: {e}")))?;
    let img = img.into_rgb8();
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::data(
            path,
            format!("image is empty ({}x{})", img.width(), img.height()),
        ));
    }
    Ok(img)
}

/// The `(W, H)` a resize gives for a `w` x `h` image (torchvision's rule, see the module docs).
fn resized_size(w: u32, h: u32, resize: Resize) -> (u64, u64) {
    match resize {
        Resize::Size([rh, rw]) => (rw as u64, rh as u64),
        Resize::ShortSide(s) => {
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            // Python: int(s * long / short): exact integer product, f64 division, truncation.
            let new_long = (s as f64 * long as f64 / short as f64) as u64;
            if w <= h {
                (s as u64, new_long)
            } else {
                (new_long, s as u64)
            }
        }
    }
}

fn resize(path: &Path, img: RgbImage, resize: Option<Resize>) -> Result<RgbImage> {
    let Some(resize) = resize else { return Ok(img) };
    let (w, h) = img.dimensions();
    let (nw, nh) = resized_size(w, h, resize);
    if (nw, nh) == (w as u64, h as u64) {
        return Ok(img);
    }
    // The resizer first scales vertically into a w x nh intermediate image.
    if nw.saturating_mul(nh) > MAX_PIXELS || (w as u64).saturating_mul(nh) > MAX_PIXELS {
        return Err(Error::data(
            path,
            format!("resizing this {w}x{h} image to {nw}x{nh} would exceed {MAX_PIXELS} pixels; check calibration.images.resize"),
        ));
    }
    Ok(imageops::resize(&img, nw as u32, nh as u32, FilterType::Triangle))
}

/// Python's `int(round((full - crop) / 2))` (round half to even), for `crop <= full`.
fn center_offset(full: u32, crop: u32) -> u32 {
    let d = full - crop;
    let half = d / 2;
    if d % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

fn center_crop(path: &Path, img: &RgbImage, [ch, cw]: [u32; 2], resized: bool) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    if ch > h || cw > w {
        let after = if resized { " after resize" } else { "" };
        return Err(Error::data(
            path,
            format!(
                "calibration.images.center_crop [{ch}, {cw}] (HxW) is larger than the image ({h}x{w} HxW{after}); \
                 resize it first (e.g. resize: {{short_side: {}}})",
                ch.max(cw)
            ),
        ));
    }
    if (cw, ch) == (w, h) {
        return Ok(img.clone());
    }
    let (top, left) = (center_offset(h, ch), center_offset(w, cw));
    Ok(imageops::crop_imm(img, left, top, cw, ch).to_image())
}

/// Lays the 8-bit RGB pixels out in the model's channel order and layout, mapping each value
/// with `f(value, model channel)`.
fn arrange<T: Copy + Default>(
    img: &RgbImage,
    order: ChannelOrder,
    layout: Layout,
    f: impl Fn(u8, usize) -> T,
) -> Vec<T> {
    let plane = img.width() as usize * img.height() as usize;
    let src: [usize; 3] = match order {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    let mut out = vec![T::default(); 3 * plane];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for (c, &s) in src.iter().enumerate() {
            let idx = match layout {
                Layout::Nchw => c * plane + i,
                Layout::Nhwc => i * 3 + c,
            };
            out[idx] = f(px[s], c);
        }
    }
    out
}

fn to_tensor(path: &Path, img: &RgbImage, pre: &ImagePreprocess) -> Result<Tensor> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    let shape = match pre.layout {
        Layout::Nchw => [1, 3, h, w],
        Layout::Nhwc => [1, h, w, 3],
    };
    let tensor = match pre.dtype {
        PixelType::Float32 => {
            let data = arrange(img, pre.channel_order, pre.layout, |p, c| {
                (p as f32 * pre.scale - pre.mean[c]) / pre.std[c]
            });
            Tensor::from_shape::<f32>(&shape, &data)
        }
        PixelType::Uint8 => {
            let data = arrange(img, pre.channel_order, pre.layout, |p, _| p);
            Tensor::from_shape::<u8>(&shape, &data)
        }
    };
    tensor.map_err(|e| Error::data(path, format!("cannot build the input tensor: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};
    use tract_onnx::prelude::DatumType;

    const PIXELS: [[u8; 3]; 4] = [[10, 20, 30], [40, 50, 60], [70, 80, 90], [200, 250, 255]];

    /// 2x2: row 0 = PIXELS[0], PIXELS[1]; row 1 = PIXELS[2], PIXELS[3].
    fn write_2x2(dir: &Path) -> PathBuf {
        let img = RgbImage::from_fn(2, 2, |x, y| Rgb(PIXELS[(y * 2 + x) as usize]));
        let path = dir.join("px.png");
        img.save(&path).unwrap();
        path
    }

    fn write_uniform(dir: &Path, name: &str, w: u32, h: u32, color: [u8; 3]) -> PathBuf {
        let path = dir.join(name);
        RgbImage::from_pixel(w, h, Rgb(color)).save(&path).unwrap();
        path
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        assert_eq!(t.datum_type(), DatumType::F32);
        t.to_plain_array_view::<f32>().unwrap().iter().copied().collect()
    }

    fn u8s(t: &Tensor) -> Vec<u8> {
        assert_eq!(t.datum_type(), DatumType::U8);
        t.to_plain_array_view::<u8>().unwrap().iter().copied().collect()
    }

    fn imagenet() -> ImagePreprocess {
        ImagePreprocess {
            scale: 1.0 / 255.0,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            ..Default::default()
        }
    }

    #[test]
    fn nchw_values_rgb_and_bgr() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_2x2(dir.path());
        for order in [ChannelOrder::Rgb, ChannelOrder::Bgr] {
            let pre = ImagePreprocess {
                channel_order: order,
                ..imagenet()
            };
            let t = load_image(&path, &pre).unwrap();
            assert_eq!(t.shape(), &[1, 3, 2, 2]);
            let v = f32s(&t);
            for c in 0..3 {
                let src = if order == ChannelOrder::Rgb { c } else { 2 - c };
                for (i, px) in PIXELS.iter().enumerate() {
                    let want = (px[src] as f32 * pre.scale - pre.mean[c]) / pre.std[c];
                    assert_eq!(v[c * 4 + i], want, "{order:?} channel {c} pixel {i}");
                }
            }
        }
    }

    #[test]
    fn nhwc_puts_channels_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_2x2(dir.path());
        let pre = ImagePreprocess {
            layout: Layout::Nhwc,
            channel_order: ChannelOrder::Bgr,
            mean: [1.0, 2.0, 3.0],
            std: [2.0, 4.0, 8.0],
            ..Default::default()
        };
        let t = load_image(&path, &pre).unwrap();
        assert_eq!(t.shape(), &[1, 2, 2, 3]);
        let v = f32s(&t);
        for (i, px) in PIXELS.iter().enumerate() {
            for c in 0..3 {
                let want = (px[2 - c] as f32 - pre.mean[c]) / pre.std[c];
                assert_eq!(v[i * 3 + c], want, "pixel {i} channel {c}");
            }
        }
    }

    #[test]
    fn uint8_gives_raw_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_2x2(dir.path());
        let pre = ImagePreprocess {
            dtype: PixelType::Uint8,
            ..Default::default()
        };
        let t = load_image(&path, &pre).unwrap();
        assert_eq!(t.datum_type(), DatumType::U8);
        assert_eq!(t.shape(), &[1, 3, 2, 2]);
        let want: Vec<u8> = (0..3).flat_map(|c| PIXELS.iter().map(move |p| p[c])).collect();
        assert_eq!(u8s(&t), want);

        let pre = ImagePreprocess {
            layout: Layout::Nhwc,
            channel_order: ChannelOrder::Bgr,
            ..pre
        };
        let t = load_image(&path, &pre).unwrap();
        let want: Vec<u8> = PIXELS.iter().flat_map(|p| [p[2], p[1], p[0]]).collect();
        assert_eq!(t.shape(), &[1, 2, 2, 3]);
        assert_eq!(u8s(&t), want);
    }

    #[test]
    fn short_side_resize_then_crop() {
        let dir = tempfile::tempdir().unwrap();
        let wide = write_uniform(dir.path(), "wide.png", 40, 20, [100, 150, 200]);
        let tall = write_uniform(dir.path(), "tall.png", 20, 40, [100, 150, 200]);
        let mut pre = ImagePreprocess {
            resize: Some(Resize::ShortSide(10)),
            ..Default::default()
        };
        let t = load_image(&wide, &pre).unwrap();
        assert_eq!(t.shape(), &[1, 3, 10, 20]); // 20x10 (W x H)
                                                // A uniform image stays uniform through the bilinear filter.
        let v = f32s(&t);
        assert!(v[..200].iter().all(|&x| x == 100.0) && v[400..].iter().all(|&x| x == 200.0));
        assert_eq!(load_image(&tall, &pre).unwrap().shape(), &[1, 3, 20, 10]);

        pre.center_crop = Some([8, 8]);
        assert_eq!(load_image(&wide, &pre).unwrap().shape(), &[1, 3, 8, 8]);
        pre.layout = Layout::Nhwc;
        assert_eq!(load_image(&tall, &pre).unwrap().shape(), &[1, 8, 8, 3]);
    }

    #[test]
    fn short_side_truncates_like_torchvision() {
        // 35 * 10 / 20 = 17.5: torchvision's int() gives 17.
        assert_eq!(resized_size(35, 20, Resize::ShortSide(10)), (17, 10));
        assert_eq!(resized_size(20, 35, Resize::ShortSide(10)), (10, 17));
        assert_eq!(resized_size(500, 375, Resize::ShortSide(256)), (341, 256));
        assert_eq!(resized_size(640, 480, Resize::Size([224, 300])), (300, 224));
        let dir = tempfile::tempdir().unwrap();
        let p = write_uniform(dir.path(), "a.png", 35, 20, [1, 2, 3]);
        let pre = ImagePreprocess {
            resize: Some(Resize::ShortSide(10)),
            ..Default::default()
        };
        assert_eq!(load_image(&p, &pre).unwrap().shape(), &[1, 3, 10, 17]);
    }

    #[test]
    fn exact_size_resize() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_uniform(dir.path(), "a.png", 40, 20, [9, 8, 7]);
        let pre = ImagePreprocess {
            resize: Some(Resize::Size([12, 30])),
            ..Default::default()
        };
        let t = load_image(&p, &pre).unwrap();
        assert_eq!(t.shape(), &[1, 3, 12, 30]);
        assert!(f32s(&t)[..360].iter().all(|&x| x == 9.0));
        let pre = ImagePreprocess {
            layout: Layout::Nhwc,
            ..pre
        };
        assert_eq!(load_image(&p, &pre).unwrap().shape(), &[1, 12, 30, 3]);
    }

    #[test]
    fn center_crop_offsets_round_half_to_even() {
        assert_eq!(center_offset(8, 4), 2);
        assert_eq!(center_offset(5, 4), 0); // 0.5 -> 0
        assert_eq!(center_offset(7, 4), 2); // 1.5 -> 2
        assert_eq!(center_offset(9, 4), 2); // 2.5 -> 2
        assert_eq!(center_offset(11, 4), 4); // 3.5 -> 4
        assert_eq!(center_offset(4, 4), 0);

        // 7 wide x 6 high, R = 10 x, G = 10 y: crop [3, 4] starts at top 2 (1.5), left 2 (1.5).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        RgbImage::from_fn(7, 6, |x, y| Rgb([(10 * x) as u8, (10 * y) as u8, 0]))
            .save(&path)
            .unwrap();
        let pre = ImagePreprocess {
            center_crop: Some([3, 4]),
            ..Default::default()
        };
        let t = load_image(&path, &pre).unwrap();
        assert_eq!(t.shape(), &[1, 3, 3, 4]);
        let v = f32s(&t);
        assert_eq!(&v[0..4], &[20.0, 30.0, 40.0, 50.0]); // R of the first row: x = 2..6
        assert_eq!([v[12], v[16], v[20]], [20.0, 30.0, 40.0]); // G of the first column: y = 2..5
    }

    #[test]
    fn crop_larger_than_image_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_uniform(dir.path(), "small.png", 40, 20, [0, 0, 0]);
        let pre = ImagePreprocess {
            resize: Some(Resize::ShortSide(10)),
            center_crop: Some([16, 16]),
            ..Default::default()
        };
        let msg = load_image(&p, &pre).unwrap_err().to_string();
        assert!(
            msg.contains("small.png") && msg.contains("center_crop") && msg.contains("after resize"),
            "{msg}"
        );
    }

    #[test]
    fn grayscale_rgba_and_16_bit_become_rgb8() {
        let dir = tempfile::tempdir().unwrap();
        let gray = dir.path().join("gray.png");
        GrayImage::from_fn(3, 2, |x, y| Luma([(x * 40 + y * 100) as u8]))
            .save(&gray)
            .unwrap();
        let t = load_image(&gray, &ImagePreprocess::default()).unwrap();
        assert_eq!(t.shape(), &[1, 3, 2, 3]);
        let v = f32s(&t);
        assert_eq!(&v[0..6], &[0.0, 40.0, 80.0, 100.0, 140.0, 180.0]);
        assert_eq!(&v[0..6], &v[6..12]);
        assert_eq!(&v[0..6], &v[12..18]);

        let rgba = dir.path().join("rgba.png");
        RgbaImage::from_pixel(2, 1, Rgba([1, 2, 3, 0])).save(&rgba).unwrap();
        let t = load_image(&rgba, &ImagePreprocess::default()).unwrap();
        assert_eq!(f32s(&t), vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);

        let deep = dir.path().join("deep.png");
        ImageBuffer::<Rgb<u16>, Vec<u16>>::from_pixel(1, 1, Rgb([65535, 257 * 100, 0]))
            .save(&deep)
            .unwrap();
        let t = load_image(&deep, &ImagePreprocess::default()).unwrap();
        assert_eq!(f32s(&t), vec![255.0, 100.0, 0.0]);
    }

    #[test]
    fn jpeg_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_uniform(dir.path(), "photo.JPG", 16, 16, [120, 60, 30]);
        let t = load_image(&p, &ImagePreprocess::default()).unwrap();
        assert_eq!(t.shape(), &[1, 3, 16, 16]);
        let v = f32s(&t);
        for (c, want) in [120.0f32, 60.0, 30.0].iter().enumerate() {
            assert!(
                v[c * 256..(c + 1) * 256].iter().all(|x| (x - want).abs() <= 4.0),
                "channel {c}"
            );
        }
    }

    #[test]
    fn list_images_sorts_and_filters() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in [
            "c.jpeg",
            "b.PNG",
            "a.jpg",
            "notes.txt",
            "anim.gif",
            ".hidden.png",
            "noext",
        ] {
            std::fs::write(d.join(name), b"x").unwrap();
        }
        std::fs::create_dir(d.join("sub.png")).unwrap();
        std::fs::write(d.join("sub.png").join("inner.png"), b"x").unwrap();
        let files = list_images(d).unwrap();
        let names: Vec<_> = files.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["a.jpg", "b.PNG", "c.jpeg"]);
        assert!(files.iter().all(|p| p.parent() == Some(d)));
    }

    #[test]
    fn list_images_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let msg = list_images(&empty).unwrap_err().to_string();
        assert!(msg.contains("empty") && msg.contains("no .png"), "{msg}");

        std::fs::write(empty.join("readme.txt"), b"x").unwrap();
        assert!(list_images(&empty).is_err());

        let file = write_2x2(dir.path());
        let msg = list_images(&file).unwrap_err().to_string();
        assert!(msg.contains("px.png") && msg.contains("not a directory"), "{msg}");

        let msg = list_images(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(msg.contains("missing") && msg.contains("does not exist"), "{msg}");
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let noise = dir.path().join("x.png");
        let bytes: Vec<u8> = (0u32..997).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(&noise, &bytes).unwrap();
        let msg = load_image(&noise, &ImagePreprocess::default()).unwrap_err().to_string();
        assert!(msg.contains("x.png"), "{msg}");

        // A valid PNG cut in half.
        let full = write_uniform(dir.path(), "full.png", 64, 64, [1, 2, 3]);
        let data = std::fs::read(&full).unwrap();
        let cut = dir.path().join("cut.png");
        std::fs::write(&cut, &data[..data.len() / 2]).unwrap();
        let msg = load_image(&cut, &ImagePreprocess::default()).unwrap_err().to_string();
        assert!(msg.contains("cut.png"), "{msg}");

        // Same for a JPEG with only its header.
        let jpg = write_uniform(dir.path(), "ok.jpg", 32, 32, [1, 2, 3]);
        let data = std::fs::read(&jpg).unwrap();
        let cut = dir.path().join("cut.jpg");
        std::fs::write(&cut, &data[..20]).unwrap();
        let msg = load_image(&cut, &ImagePreprocess::default()).unwrap_err().to_string();
        assert!(msg.contains("cut.jpg"), "{msg}");

        // A GIF named .png is recognised and refused.
        let gif = dir.path().join("g.png");
        std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
        let msg = load_image(&gif, &ImagePreprocess::default()).unwrap_err().to_string();
        assert!(msg.contains("g.png") && msg.contains("only PNG and JPEG"), "{msg}");
    }

    #[test]
    fn varying_sizes_without_fixed_size_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_uniform(dir.path(), "a.png", 64, 48, [0, 0, 0]);
        let b = write_uniform(dir.path(), "b.png", 50, 37, [0, 0, 0]);
        let files = vec![a.clone(), b.clone()];
        let pre = ImagePreprocess::default();
        assert_eq!(fixed_output_size(&pre), None);
        let err = load_images(&files, &pre).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("a.png is 64x48")
                && msg.contains("b.png is 50x37")
                && msg.contains("calibration.images.resize"),
            "{msg}"
        );
        assert_eq!(err.exit_code(), 2);
        // The same message for NHWC tensors.
        let msg = size_mismatch_error(&a, &[1, 48, 64, 3], &b, &[1, 37, 50, 3]).to_string();
        assert!(
            msg.contains("a.png is 64x48") && msg.contains("b.png is 50x37"),
            "{msg}"
        );

        // Short side alone does not fix the size; a crop does.
        let pre = ImagePreprocess {
            resize: Some(Resize::ShortSide(32)),
            ..Default::default()
        };
        assert_eq!(fixed_output_size(&pre), None);
        assert!(load_images(&files, &pre).is_err());
        let pre = ImagePreprocess {
            center_crop: Some([30, 30]),
            ..pre
        };
        assert_eq!(fixed_output_size(&pre), Some((30, 30)));
        let tensors = load_images(&files, &pre).unwrap();
        assert!(tensors.iter().all(|t| t.shape() == [1, 3, 30, 30]));
        let pre = ImagePreprocess {
            resize: Some(Resize::Size([20, 24])),
            ..Default::default()
        };
        assert_eq!(fixed_output_size(&pre), Some((20, 24)));
        assert_eq!(load_images(&files, &pre).unwrap().len(), 2);
    }

    #[test]
    fn deserialise_config() {
        let pre: ImagePreprocess = serde_json::from_str(
            r#"{"resize": {"short_side": 256}, "center_crop": [224,224], "mean": [0.485,0.456,0.406],
                "std": [0.229,0.224,0.225], "scale": 0.00392156862745098}"#,
        )
        .unwrap();
        assert_eq!(
            pre,
            ImagePreprocess {
                resize: Some(Resize::ShortSide(256)),
                center_crop: Some([224, 224]),
                scale: 1.0 / 255.0,
                ..imagenet()
            }
        );
        assert_eq!(pre.channel_order, ChannelOrder::Rgb);
        assert_eq!(pre.layout, Layout::Nchw);
        assert_eq!(pre.dtype, PixelType::Float32);
        pre.validate().unwrap();

        let empty: ImagePreprocess = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, ImagePreprocess::default());

        let yaml = "resize: {size: [224, 240]}\nchannel_order: bgr\nlayout: nhwc\ndtype: uint8\n";
        let pre: ImagePreprocess = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(pre.resize, Some(Resize::Size([224, 240])));
        assert_eq!(
            (pre.channel_order, pre.layout, pre.dtype),
            (ChannelOrder::Bgr, Layout::Nhwc, PixelType::Uint8)
        );
        let pre: ImagePreprocess = serde_yaml::from_str("resize:\n  short_side: 256\n").unwrap();
        assert_eq!(pre.resize, Some(Resize::ShortSide(256)));

        for bad in [
            r#"{"resise": {"short_side": 256}}"#,
            r#"{"resize": {"long_side": 256}}"#,
            r#"{"channel_order": "RGB"}"#,
            r#"{"mean": [0.5, 0.5]}"#,
        ] {
            assert!(serde_json::from_str::<ImagePreprocess>(bad).is_err(), "{bad}");
        }
        assert!(serde_yaml::from_str::<ImagePreprocess>("center_crop: [224, 224]\ncrop: 1\n").is_err());
        assert!(serde_yaml::from_str::<ImagePreprocess>("resize: {short_side: 256, size: [224, 224]}\n").is_err());
        assert!(serde_yaml::from_str::<ImagePreprocess>("resize: {}\n").is_err());

        // Serialising gives the same map form back, in YAML and JSON.
        let pre = ImagePreprocess {
            resize: Some(Resize::ShortSide(256)),
            center_crop: Some([224, 224]),
            ..imagenet()
        };
        let yaml = serde_yaml::to_string(&pre).unwrap();
        assert!(yaml.contains("short_side: 256") && !yaml.contains('!'), "{yaml}");
        assert_eq!(serde_yaml::from_str::<ImagePreprocess>(&yaml).unwrap(), pre);
        let json = serde_json::to_string(&pre).unwrap();
        assert!(json.contains(r#""resize":{"short_side":256}"#), "{json}");
        assert_eq!(serde_json::from_str::<ImagePreprocess>(&json).unwrap(), pre);
    }

    #[test]
    fn validate_rejects_bad_settings() {
        assert_eq!(ImagePreprocess::default().validate(), Ok(()));
        assert_eq!(imagenet().validate(), Ok(()));

        let msg = ImagePreprocess {
            std: [0.229, 0.0, 0.225],
            ..imagenet()
        }
        .validate()
        .unwrap_err();
        assert!(msg.contains("std[1]") && msg.contains("non-zero"), "{msg}");
        assert!(ImagePreprocess {
            std: [f32::NAN, 1.0, 1.0],
            ..Default::default()
        }
        .validate()
        .is_err());

        let msg = ImagePreprocess {
            dtype: PixelType::Uint8,
            mean: [0.485, 0.456, 0.406],
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(msg.contains("uint8") && msg.contains("mean"), "{msg}");
        assert!(ImagePreprocess {
            dtype: PixelType::Uint8,
            scale: 1.0 / 255.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert_eq!(
            ImagePreprocess {
                dtype: PixelType::Uint8,
                ..Default::default()
            }
            .validate(),
            Ok(())
        );

        let msg = ImagePreprocess {
            resize: Some(Resize::Size([224, 224])),
            center_crop: Some([256, 200]),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(msg.contains("center_crop") && msg.contains("larger"), "{msg}");
        for pre in [
            ImagePreprocess {
                resize: Some(Resize::ShortSide(0)),
                ..Default::default()
            },
            ImagePreprocess {
                resize: Some(Resize::Size([0, 224])),
                ..Default::default()
            },
            ImagePreprocess {
                center_crop: Some([224, 0]),
                ..Default::default()
            },
            ImagePreprocess {
                scale: 0.0,
                ..Default::default()
            },
            ImagePreprocess {
                mean: [0.0, f32::INFINITY, 0.0],
                ..Default::default()
            },
        ] {
            assert!(pre.validate().is_err(), "{pre:?}");
        }

        // load_image refuses invalid settings too, naming the file.
        let dir = tempfile::tempdir().unwrap();
        let p = write_2x2(dir.path());
        let pre = ImagePreprocess {
            std: [1.0, 1.0, 0.0],
            ..Default::default()
        };
        let msg = load_image(&p, &pre).unwrap_err().to_string();
        assert!(msg.contains("px.png") && msg.contains("std[2]"), "{msg}");
    }

    #[test]
    fn absurd_resize_is_an_error_not_an_abort() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_uniform(dir.path(), "thin.png", 200, 1, [0, 0, 0]);
        let pre = ImagePreprocess {
            resize: Some(Resize::ShortSide(100_000)),
            ..Default::default()
        };
        let msg = load_image(&p, &pre).unwrap_err().to_string();
        assert!(msg.contains("thin.png") && msg.contains("exceed"), "{msg}");
    }
}
