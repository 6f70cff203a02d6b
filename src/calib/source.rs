//! Where calibration samples come from: `.npz`/`.npy` files (one or several shards, read in
//! order) or a folder of images with declared preprocessing. Samples are produced one at a time,
//! on demand, so images are decoded by the worker that observes them.

use std::path::{Path, PathBuf};

use tract_onnx::prelude::{DatumType, IntoTValue, TValue};

use crate::calib::config::CalibrationConfig;
use crate::calib::data::{Dataset, InputSpec};
use crate::calib::images::{self, ImagePreprocess};
use crate::error::{Error, Result};
use crate::ir::tensor::Fnv64;

pub enum DataSource {
    /// Arrays already bound to the model inputs, shard after shard.
    Arrays {
        shards: Vec<Dataset>,
        inputs: Vec<InputSpec>,
        offsets: Vec<usize>,
        samples: usize,
    },
    /// One image file per sample, feeding one model input.
    Images {
        files: Vec<PathBuf>,
        preprocess: ImagePreprocess,
        input: String,
        dtype: DatumType,
        shape: Vec<usize>,
    },
}

impl DataSource {
    /// Opens the configured data and checks it against the model inputs.
    pub fn open(config: &CalibrationConfig, inputs: &[InputSpec]) -> Result<DataSource> {
        let paths = config.data.paths();
        let source = if paths.len() == 1 && paths[0].is_dir() {
            let dir = &paths[0];
            let preprocess = config.images.clone().ok_or_else(|| {
                Error::data(dir, "is a folder of images: describe their preprocessing in calibration.images (resize, center_crop, mean, std, layout, ...)")
            })?;
            let input = match (&config.input, inputs) {
                (Some(name), _) => inputs
                    .iter()
                    .find(|i| &i.name == name)
                    .ok_or_else(|| Error::data(dir, format!("calibration.input '{name}' is not a model input")))?,
                (None, [only]) => only,
                (None, _) => {
                    return Err(Error::data(
                        dir,
                        "the model has several inputs: say which one the images feed with calibration.input",
                    ))
                }
            };
            if inputs.len() > 1 {
                return Err(Error::data(dir, "images can feed a single-input model only"));
            }
            let mut files = images::list_images(dir)?;
            if let Some(cap) = config.samples {
                files.truncate(cap);
            }
            let first = images::load_image(&files[0], &preprocess)?;
            let spec_fits = |shape: &[usize]| match &input.dims {
                None => true,
                Some(d) => d.len() == shape.len() && d.iter().zip(shape).all(|(d, &s)| d.is_none_or(|d| d == s as u64)),
            };
            if !spec_fits(first.shape()) {
                return Err(Error::data(
                    &files[0],
                    format!(
                        "preprocessed to {:?}, which does not fit model input '{}': {}",
                        first.shape(),
                        input.name,
                        input.describe()
                    ),
                ));
            }
            DataSource::Images {
                dtype: first.datum_type(),
                shape: first.shape().to_vec(),
                files,
                preprocess,
                input: input.name.clone(),
            }
        } else {
            let mut shards = Vec::new();
            let mut offsets = Vec::new();
            let mut total = 0;
            let mut shapes: Option<Vec<(String, DatumType, Vec<usize>)>> = None;
            for p in &paths {
                let dataset = Dataset::load(p)?;
                let bound = dataset.bind(inputs)?;
                let these = bound.sample_shapes();
                if let Some(first) = &shapes {
                    if first != &these {
                        return Err(Error::data(
                            p,
                            format!("samples have shapes {these:?}, the first shard's are {first:?}"),
                        ));
                    }
                } else {
                    shapes = Some(these);
                }
                offsets.push(total);
                total += bound.samples;
                drop(bound);
                shards.push(dataset);
            }
            let samples = config.samples.map_or(total, |cap| cap.min(total));
            DataSource::Arrays {
                shards,
                inputs: inputs.to_vec(),
                offsets,
                samples,
            }
        };
        Ok(source)
    }

    pub fn len(&self) -> usize {
        match self {
            DataSource::Arrays { samples, .. } => *samples,
            DataSource::Images { files, .. } => files.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Input shapes of one sample, in model-input order.
    pub fn sample_shapes(&self) -> Result<Vec<(String, DatumType, Vec<usize>)>> {
        match self {
            DataSource::Arrays { shards, inputs, .. } => Ok(shards[0].bind(inputs)?.sample_shapes()),
            DataSource::Images {
                input, dtype, shape, ..
            } => Ok(vec![(input.clone(), *dtype, shape.clone())]),
        }
    }

    /// The model inputs of sample `i`.
    pub fn sample(&self, i: usize) -> Result<Vec<TValue>> {
        match self {
            DataSource::Arrays {
                shards,
                inputs,
                offsets,
                ..
            } => {
                let shard = offsets.partition_point(|&o| o <= i) - 1;
                shards[shard].bind(inputs)?.sample(i - offsets[shard])
            }
            DataSource::Images {
                files,
                preprocess,
                shape,
                ..
            } => {
                let t = images::load_image(&files[i], preprocess)?;
                if t.shape() != shape.as_slice() {
                    return Err(images::size_mismatch_error(&files[0], shape, &files[i], t.shape()));
                }
                Ok(vec![t.into_tvalue()])
            }
        }
    }

    /// A label for sample `i` in messages ("eval.npz sample 3", "photos/cat.jpg").
    pub fn sample_label(&self, i: usize) -> String {
        match self {
            DataSource::Arrays { shards, offsets, .. } => {
                let shard = offsets.partition_point(|&o| o <= i) - 1;
                format!("{} sample {}", shards[shard].path.display(), i - offsets[shard])
            }
            DataSource::Images { files, .. } => files[i].display().to_string(),
        }
    }

    /// Fingerprints of the data, one per shard (a folder of images is one shard): what a
    /// statistics file records so it is only reused on the same data.
    pub fn fingerprints(&self) -> Result<Vec<String>> {
        match self {
            DataSource::Arrays { shards, samples, .. } => {
                let mut left = *samples;
                shards
                    .iter()
                    .filter_map(|d| {
                        if left == 0 {
                            return None;
                        }
                        let n = d.arrays.first().map_or(0, |a| a.shape[0]).min(left);
                        left -= n;
                        Some(file_fingerprint(&d.path).map(|h| format!("{h}:{n}")))
                    })
                    .collect()
            }
            DataSource::Images { files, preprocess, .. } => {
                let mut h = Fnv64::default();
                for f in files {
                    h.write(
                        f.file_name()
                            .map(|n| n.to_string_lossy().to_string())
                            .unwrap_or_default()
                            .as_bytes(),
                    );
                    h.write(file_fingerprint(f)?.as_bytes());
                }
                h.write(serde_json::to_string(preprocess).unwrap_or_default().as_bytes());
                Ok(vec![format!("{:016x}:{}", h.finish(), files.len())])
            }
        }
    }
}

/// FNV-1a of a file's bytes, hex. Read in blocks: a data file can be larger than everything
/// else the job holds (960×960 detector data, 128 samples: 1.4 GB).
pub fn file_fingerprint(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Fnv64::default();
    let mut block = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut block) {
            Ok(0) => break,
            Ok(n) => h.write(&block[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(format!("{:016x}", h.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_fingerprinted_in_blocks_as_if_whole() {
        let bytes: Vec<u8> = (0..(3usize << 20) + 12345).map(|i| (i * 131 % 251) as u8).collect();
        let path = std::env::temp_dir().join(format!("onnxq-fingerprint-{}.bin", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let mut whole = Fnv64::default();
        whole.write(&bytes);
        assert_eq!(file_fingerprint(&path).unwrap(), format!("{:016x}", whole.finish()));
        std::fs::remove_file(&path).unwrap();
    }
}
