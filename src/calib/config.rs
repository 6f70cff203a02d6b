//! The `calibration:` section of the config: where the data comes from and how a tensor's range
//! is chosen from its statistics. The method names and their defaults live here once.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::calib::images::ImagePreprocess;
use crate::calib::observers::{
    default_bits, default_ema_constant, default_percentile, Method, DEFAULT_BITS, DEFAULT_EMA_CONSTANT,
    DEFAULT_PERCENTILE,
};
use crate::error::{Error, Result};

/// `calibration:` — where the data comes from and how ranges are chosen from the statistics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationConfig {
    /// A `.npz`/`.npy` file, a list of them (shards, read in order), or a folder of images.
    /// Relative paths are relative to the config file.
    pub data: DataPaths,
    /// Use at most this many samples (in file order).
    #[serde(default)]
    pub samples: Option<usize>,
    /// How a tensor's range is chosen from its statistics.
    #[serde(default)]
    pub method: MethodName,
    /// `ema`: the moving-average constant.
    #[serde(default = "default_ema_constant")]
    pub ema_constant: f64,
    /// `percentile`: the percentile of |x| kept.
    #[serde(default = "default_percentile")]
    pub percentile: f64,
    /// `entropy` and `mse`: the bit width the search optimises for.
    #[serde(default = "default_bits")]
    pub bits: u32,
    /// Preprocessing of a folder of images (required when `data` is a folder).
    #[serde(default)]
    pub images: Option<ImagePreprocess>,
    /// The model input images feed (default: the model's only input).
    #[serde(default)]
    pub input: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DataPaths {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl DataPaths {
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            DataPaths::One(p) => vec![p.clone()],
            DataPaths::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodName {
    Minmax,
    Ema,
    Percentile,
    Entropy,
    Mse,
    /// The default: per tensor, clipping where its measured error says clipping pays
    /// (`calib::observers`, module docs).
    #[default]
    Auto,
}

impl MethodName {
    pub const ALL: [MethodName; 6] = [
        MethodName::Minmax,
        MethodName::Ema,
        MethodName::Percentile,
        MethodName::Entropy,
        MethodName::Mse,
        MethodName::Auto,
    ];

    /// The name the config uses.
    pub fn as_str(self) -> &'static str {
        match self {
            MethodName::Minmax => "minmax",
            MethodName::Ema => "ema",
            MethodName::Percentile => "percentile",
            MethodName::Entropy => "entropy",
            MethodName::Mse => "mse",
            MethodName::Auto => "auto",
        }
    }
}

impl CalibrationConfig {
    /// Plain `.npz`/`.npy` data with every default: what `verify` data and `onnxq verify` read.
    pub fn of_file(path: PathBuf) -> CalibrationConfig {
        CalibrationConfig {
            data: DataPaths::One(path),
            samples: None,
            method: MethodName::default(),
            ema_constant: DEFAULT_EMA_CONSTANT,
            percentile: DEFAULT_PERCENTILE,
            bits: DEFAULT_BITS,
            images: None,
            input: None,
        }
    }

    /// The observer method with its parameters.
    pub fn method(&self) -> Method {
        self.method_named(self.method)
    }

    /// The observer method `name` with this section's parameters.
    pub fn method_named(&self, name: MethodName) -> Method {
        match name {
            MethodName::Minmax => Method::MinMax,
            MethodName::Ema => Method::Ema {
                constant: self.ema_constant,
            },
            MethodName::Percentile => Method::Percentile {
                percentile: self.percentile,
            },
            MethodName::Entropy => Method::Entropy { bits: self.bits },
            MethodName::Mse => Method::Mse { bits: self.bits },
            MethodName::Auto => Method::Auto { bits: self.bits },
        }
    }

    /// Checks the values and resolves relative data paths against the config file's folder.
    pub fn validate(&mut self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(path, format!("calibration: {m}")));
        if !(self.ema_constant > 0.0 && self.ema_constant <= 1.0) {
            return bad(format!("ema_constant must be in (0, 1], got {}", self.ema_constant));
        }
        if !(self.percentile > 0.0 && self.percentile <= 100.0) {
            return bad(format!("percentile must be in (0, 100], got {}", self.percentile));
        }
        if !(2..=16).contains(&self.bits) {
            return bad(format!("bits must be between 2 and 16, got {}", self.bits));
        }
        if self.samples == Some(0) {
            return bad("samples must be at least 1".into());
        }
        if let Some(images) = &self.images {
            if let Err(m) = images.validate() {
                return bad(format!("images: {m}"));
            }
        }
        // Relative data paths are relative to the config file.
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &PathBuf| if p.is_absolute() { p.clone() } else { base.join(p) };
        self.data = match &self.data {
            DataPaths::One(p) => DataPaths::One(resolve(p)),
            DataPaths::Many(v) => {
                if v.is_empty() {
                    return bad("data: the list of files is empty".into());
                }
                DataPaths::Many(v.iter().map(resolve).collect())
            }
        };
        Ok(())
    }
}
