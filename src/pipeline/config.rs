//! The YAML configuration. Unknown keys are errors that name the closest valid key; the whole
//! pipeline is validated when the config is loaded, before any model or data is read.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::calib::config::CalibrationConfig;
use crate::error::{Error, Result};
use crate::runtime::onnxruntime::Provider;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Quantize (calibrate, plan, write Q/DQ); `false` only runs the graph passes.
    #[serde(default = "default_true")]
    pub quantize: bool,
    /// `passes:` as written: a name, or `{name: {option: value}}` (see `onnxq passes`); graph
    /// passes first, plan passes after them. None when absent: the defaults apply.
    #[serde(default, rename = "passes", deserialize_with = "deserialize_passes")]
    listed_passes: Option<Vec<crate::pipeline::PassSpec>>,
    /// The passes that run, in order: `passes:` as listed, or the defaults that apply.
    #[serde(skip)]
    pub passes: Vec<crate::pipeline::PassSpec>,
    /// When `passes:` is absent: every default pass, whether it applies to this config, and why.
    #[serde(skip)]
    pub defaults: Option<Vec<DefaultPass>>,
    /// Activation statistics from real inputs.
    #[serde(default)]
    pub calibration: Option<CalibrationConfig>,
    /// The backend the model is for: `generic` (default), `tensorrt`, `openvino`, `onnxruntime`.
    #[serde(default)]
    pub target: crate::quant::rules::Target,
    /// `engine:` as written: `tract`, `onnxruntime`, or `{onnxruntime: {providers: [...]}}`.
    #[serde(default, rename = "engine", deserialize_with = "deserialize_engine")]
    engine_setting: (crate::runtime::Engine, Vec<Provider>),
    /// The engine calibration, the guard and verification run the models in: tract (embedded,
    /// the default) or ONNX Runtime (loaded at run time; `--engine` overrides).
    #[serde(skip)]
    pub engine: crate::runtime::Engine,
    /// ONNX Runtime's execution providers, in order of preference (empty: its CPU provider).
    #[serde(skip)]
    pub providers: Vec<Provider>,
    /// Weight quantization, where the target allows a choice.
    #[serde(default)]
    pub weights: WeightsConfig,
    /// Activation quantization, where the target allows a choice.
    #[serde(default)]
    pub activations: ActivationsConfig,
    /// Per-tensor, per-node or per-op-type exceptions.
    #[serde(default)]
    pub overrides: Vec<Override>,
    /// Prove the quantized model against the float one on held-out data.
    #[serde(default)]
    pub verify: Option<VerifyConfig>,
    /// Raise the precision of the layers that need it, from a per-layer sensitivity analysis.
    #[serde(default)]
    pub mixed_precision: Option<MixedPrecisionConfig>,
    /// The accuracy guard (`quant::guard`): on by default with calibration data; `guard: false`
    /// turns it off; a map changes its budget. None: off.
    #[serde(default = "default_guard", deserialize_with = "deserialize_guard")]
    pub guard: Option<GuardConfig>,
    /// Why the guard, on by default, does not run for this config (said in the terminal and
    /// the report).
    #[serde(skip)]
    pub guard_off: Option<String>,
}

/// `guard:` — what the accuracy guard may spend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    /// At most this fraction of the quantized layers raised above int8.
    #[serde(default = "default_guard_max_layers")]
    pub max_layers: f64,
    /// Only raise what gains at least this much output SQNR (dB).
    #[serde(default = "default_guard_min_gain_db")]
    pub min_gain_db: f64,
    /// Calibration samples the guard measures on.
    #[serde(default = "default_guard_samples")]
    pub samples: usize,
}

/// Runs of the model the guard's bisection may make (a dominant layer among 256 is found in 8).
pub const GUARD_MAX_RUNS: usize = 8;

fn default_guard_max_layers() -> f64 {
    0.1
}

fn default_guard_min_gain_db() -> f64 {
    1.0
}

fn default_guard_samples() -> usize {
    4
}

fn default_guard() -> Option<GuardConfig> {
    Some(GuardConfig {
        max_layers: default_guard_max_layers(),
        min_gain_db: default_guard_min_gain_db(),
        samples: default_guard_samples(),
    })
}

/// `guard: true | false | {max_layers, min_gain_db, samples}`.
fn deserialize_guard<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<GuardConfig>, D::Error> {
    use serde::de::Error as _;
    match serde_yaml::Value::deserialize(d)? {
        serde_yaml::Value::Bool(true) => Ok(default_guard()),
        serde_yaml::Value::Bool(false) => Ok(None),
        v @ serde_yaml::Value::Mapping(_) => serde_yaml::from_value(v).map(Some).map_err(D::Error::custom),
        _ => Err(D::Error::custom(
            "guard is `true`, `false` or a map {max_layers, min_gain_db, samples}",
        )),
    }
}

/// `mixed_precision:` — a target output SQNR and/or a budget (at least one).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixedPrecisionConfig {
    /// Raise layers until the output SQNR on the calibration samples reaches this (dB).
    pub target_sqnr_db: Option<f64>,
    /// At most this fraction of the quantized layers in float16 or float.
    pub max_float_fraction: Option<f64>,
    /// At most this many MB of weights in the written model.
    pub max_size_mb: Option<f64>,
    /// Precisions a layer may be raised to [default: the target's: int16, float16, float;
    /// tensorrt: float16, float].
    pub candidates: Option<Vec<crate::quant::plan::Precision>>,
    /// Calibration samples the sensitivity analysis and the search run on.
    #[serde(default = "default_mixed_samples")]
    pub samples: usize,
}

/// Calibration samples the sensitivity analysis and the mixed-precision search run on by default.
pub const DEFAULT_MIXED_SAMPLES: usize = 32;

fn default_mixed_samples() -> usize {
    DEFAULT_MIXED_SAMPLES
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsConfig {
    pub dtype: Option<crate::quant::params::QuantDtype>,
    pub granularity: Option<Granularity>,
    /// `granularity: per_block`: elements per block along the reduction axis.
    pub block_size: Option<usize>,
    pub symmetric: Option<bool>,
    /// One bit less (int8 −64..64), for x86 kernels without VNNI whose u8·s8 pair sums saturate.
    pub reduce_range: Option<bool>,
    /// An integer range of 2..16 bits inside the dtype (7 in int8: −63..63 symmetric).
    pub bits: Option<u32>,
    /// K-means clustering instead of a grid: `{bits: 2..8, per_channel: false}`.
    pub codebook: Option<crate::quant::codebook::CodebookSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    PerTensor,
    PerChannel,
    /// Blocks of `weights.block_size` along the reduction axis (opset 21).
    PerBlock,
}

/// `activations.dtype`: a quantized type, or `float` (weight-only: no activation Q/DQ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationDtype {
    Float,
    Quant(crate::quant::params::QuantDtype),
}

impl<'de> Deserialize<'de> for ActivationDtype {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let name = String::deserialize(d)?;
        if name == "float" {
            return Ok(ActivationDtype::Float);
        }
        serde_yaml::from_value(serde_yaml::Value::String(name.clone()))
            .map(ActivationDtype::Quant)
            .map_err(|_| {
                let valid: Vec<String> = std::iter::once("float")
                    .chain(crate::quant::params::DTYPE_NAMES)
                    .map(|n| format!("`{n}`"))
                    .collect();
                D::Error::custom(format!(
                    "unknown variant `{name}`, expected one of {}",
                    valid.join(", ")
                ))
            })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationsConfig {
    pub dtype: Option<ActivationDtype>,
    pub symmetric: Option<bool>,
    /// One bit less (uint8 0..127).
    pub reduce_range: Option<bool>,
    /// An integer range of 2..16 bits inside the dtype (7 in uint8: 0..127).
    pub bits: Option<u32>,
    /// Never valid (blocks are for constant weights); read only to say so.
    pub block_size: Option<serde_yaml::Value>,
}

/// `overrides:` entry: what it matches (exactly one of tensor, node, op_type: a regular
/// expression matched against the whole name) and what it does.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub tensor: Option<String>,
    pub node: Option<String>,
    pub op_type: Option<String>,
    /// Keep the match float.
    #[serde(default)]
    pub exclude: bool,
    /// Quantize the match (its weight, for node and op_type rules) with this type.
    pub dtype: Option<crate::quant::params::QuantDtype>,
    /// Weights of the match: per_channel or per_tensor.
    pub granularity: Option<Granularity>,
    /// Weights of the match as a K-means codebook (as `weights.codebook`).
    pub codebook: Option<crate::quant::codebook::CodebookSpec>,
    pub symmetric: Option<bool>,
    /// Tensor rules: use this range `[lo, hi]` instead of the calibrated one.
    pub range: Option<[f32; 2]>,
    /// Node and op_type rules: run the layer at int8, int16 (A16W8), float16 or float; wins
    /// over the mixed-precision search.
    pub precision: Option<crate::quant::plan::Precision>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// Held-out data (`.npz`/`.npy`, relative to the config file).
    pub data: PathBuf,
    /// Fail (exit code 3) when any output's SQNR is below this.
    #[serde(default)]
    pub min_sqnr_db: Option<f64>,
    /// Fail (exit code 3) when any output's cosine similarity is below this.
    #[serde(default)]
    pub min_cosine: Option<f64>,
}

fn default_true() -> bool {
    true
}

/// One pass of the default recipe, resolved for a config: it runs when `applied`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DefaultPass {
    /// The pass with the options it runs with.
    #[serde(flatten)]
    pub pass: crate::pipeline::PassSpec,
    pub applied: bool,
    pub why: String,
}

/// The default recipe, in order: what measurably helps and cannot hurt the float function
/// (`fold_batchnorm` and `equalize` preserve it exactly; `gptq` and `correct_bias` change only
/// the quantized weights' rounding and the bias that compensates it). `absorb_bias` is not in
/// it: it changes the float function wherever a pre-activation falls below β − n·|γ|.
fn default_recipe() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        (
            "fold_batchnorm",
            "",
            "float-preserving: folds each BatchNorm into the layer before it, so no quantization sits between them",
        ),
        (
            "equalize",
            "{relu6: per_channel, hardswish: per_channel}",
            "float-preserving: balances the weight ranges of consecutive layers channel by channel (through Relu, ReLU6 and HardSwish)",
        ),
        (
            "gptq",
            "",
            "chooses the weights' roundings from the layers' calibration inputs (where the data give at least 100 vectors per weight column)",
        ),
        (
            "correct_bias",
            "",
            "removes the mean output shift of the weights' rounding",
        ),
    ]
}

/// `passes:` entries: `name` or `{name: {options}}` (a one-key map).
fn deserialize_passes<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<crate::pipeline::PassSpec>>, D::Error> {
    use serde::de::Error as _;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Entry {
        Name(String),
        WithOptions(std::collections::BTreeMap<String, serde_yaml::Value>),
    }
    let entries: Vec<Entry> = Vec::deserialize(d)?;
    entries
        .into_iter()
        .map(|e| match e {
            Entry::Name(name) => Ok(crate::pipeline::PassSpec {
                name,
                options: serde_yaml::Value::Null,
            }),
            Entry::WithOptions(map) if map.len() == 1 => {
                let (name, options) = map.into_iter().next().expect("one entry");
                Ok(crate::pipeline::PassSpec { name, options })
            }
            Entry::WithOptions(_) => Err(D::Error::custom(
                "a pass with options is a one-key map: `{name: {option: value}}`",
            )),
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Some)
}

/// `engine:`: an engine's name, or `{onnxruntime: {providers: [cuda, cpu]}}`.
fn deserialize_engine<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<(crate::runtime::Engine, Vec<Provider>), D::Error> {
    use crate::runtime::Engine;
    use serde::de::Error as _;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct OnnxruntimeOptions {
        providers: Vec<Provider>,
    }
    match serde_yaml::Value::deserialize(d)? {
        serde_yaml::Value::Mapping(map) if map.len() == 1 => {
            let (name, options) = map.into_iter().next().expect("one entry");
            match serde_yaml::from_value::<Engine>(name).map_err(D::Error::custom)? {
                Engine::Onnxruntime => {
                    let options: OnnxruntimeOptions = serde_yaml::from_value(options).map_err(D::Error::custom)?;
                    if options.providers.is_empty() {
                        return Err(D::Error::custom(
                            "`providers: []` names none: list them in order of preference, e.g. `[cuda, cpu]`",
                        ));
                    }
                    Ok((Engine::Onnxruntime, options.providers))
                }
                Engine::Tract => Err(D::Error::custom("tract has no options: write `engine: tract`")),
            }
        }
        serde_yaml::Value::Mapping(_) => Err(D::Error::custom(
            "an engine with options is a one-key map: `engine: {onnxruntime: {providers: [cuda, cpu]}}`",
        )),
        name => Ok((serde_yaml::from_value(name).map_err(D::Error::custom)?, Vec::new())),
    }
}

impl Config {
    /// The names of the configured passes, in order.
    pub fn pass_names(&self) -> Vec<String> {
        self.passes.iter().map(|p| p.name.clone()).collect()
    }

    /// The precisions a layer may be raised to on this target.
    fn default_candidates(&self) -> Vec<crate::quant::plan::Precision> {
        use crate::quant::plan::Precision;
        match self.target {
            crate::quant::rules::Target::Tensorrt => vec![Precision::Float16, Precision::Float],
            _ => vec![Precision::Int16, Precision::Float16, Precision::Float],
        }
    }

    /// The mixed-precision goal, with the target's default candidates.
    pub fn mixed_precision_goal(&self) -> Option<crate::quant::mixed::Goal> {
        let m = self.mixed_precision.as_ref()?;
        Some(crate::quant::mixed::Goal {
            target_sqnr_db: m.target_sqnr_db,
            max_float_fraction: m.max_float_fraction,
            max_size_mb: m.max_size_mb,
            candidates: m.candidates.clone().unwrap_or_else(|| self.default_candidates()),
            ..Default::default()
        })
    }

    /// The accuracy guard's settings, when it runs: on unless `guard: false`, with calibration
    /// data, and not when `mixed_precision:` already chooses the precisions.
    pub fn guard_settings(&self) -> Option<crate::quant::guard::GuardSettings> {
        let g = self.guard.as_ref()?;
        if !self.quantize || self.calibration.is_none() || self.mixed_precision.is_some() {
            return None;
        }
        Some(crate::quant::guard::GuardSettings {
            samples: g.samples,
            max_layers: g.max_layers,
            min_gain_db: g.min_gain_db,
            max_runs: GUARD_MAX_RUNS,
            // Not float16: the guard measures with `quant::switched`, which runs it as float.
            candidates: self
                .default_candidates()
                .into_iter()
                .filter(|&p| p != crate::quant::plan::Precision::Float16)
                .collect(),
        })
    }

    /// The target's rules with the config's choices applied.
    pub fn target_rules(&self) -> crate::quant::rules::TargetRules {
        let mut rules = self.target.rules();
        if let Some(d) = self.weights.dtype {
            rules.weights.dtype = d;
        }
        if let Some(s) = self.weights.symmetric {
            rules.weights.symmetric = s;
            rules.weights.narrow_range &= s;
        }
        if let Some(r) = self.weights.reduce_range {
            rules.weights.reduce_range = r;
        }
        if let Some(r) = self.activations.reduce_range {
            rules.activations.reduce_range = r;
        }
        rules.weights.bits = self.weights.bits;
        rules.activations.bits = self.activations.bits;
        if let Some(g) = self.weights.granularity {
            rules.per_channel_weights = g != Granularity::PerTensor;
        }
        if self.weights.granularity == Some(Granularity::PerBlock) {
            rules.weight_block_size = self.weights.block_size;
        }
        if let Some(c) = self.weights.codebook {
            rules.weight_codebook = Some(c);
            rules.per_channel_weights = c.per_channel;
        }
        match self.activations.dtype {
            Some(ActivationDtype::Quant(d)) => rules.activations.dtype = d,
            Some(ActivationDtype::Float) => {
                rules.quantize_activations = false;
                // An int32 bias needs the input's scale.
                rules.int32_bias = false;
            }
            None => {}
        }
        if let Some(s) = self.activations.symmetric {
            rules.activations.symmetric = s;
        }
        // FP8 has no zero point: its grid is symmetric around 0. And no integer accumulator to
        // add an int32 bias to (ONNX Runtime would fuse one into an FP8 QLinearConv it rejects).
        for scheme in [&mut rules.weights, &mut rules.activations] {
            if scheme.dtype.float8().is_some() {
                scheme.symmetric = true;
                rules.int32_bias = false;
            }
        }
        rules
    }

    /// How the plan is built: the target, its rules with the config's choices, the calibration
    /// method (data-free statistics give one range whatever the method) and the overrides.
    pub fn plan_options(&self) -> crate::quant::plan::PlanOptions {
        crate::quant::plan::PlanOptions {
            target: self.target,
            rules: self.target_rules(),
            method: self
                .calibration
                .as_ref()
                .map_or(crate::calib::observers::Method::MinMax, |c| c.method()),
            overrides: self.overrides(),
        }
    }

    /// The `overrides:` rules, compiled (anchored: a pattern matches the whole name).
    pub fn overrides(&self) -> crate::quant::plan::Overrides {
        use crate::quant::plan::{MatchKind, OverrideRule};
        let rules = self
            .overrides
            .iter()
            .filter_map(|o| {
                let (kind, p) = match (&o.tensor, &o.node, &o.op_type) {
                    (Some(p), _, _) => (MatchKind::Tensor, p),
                    (_, Some(p), _) => (MatchKind::Node, p),
                    (_, _, Some(p)) => (MatchKind::OpType, p),
                    _ => return None, // validated: exactly one is set
                };
                let regex = regex::Regex::new(&format!("^(?:{p})$")).ok()?; // validated
                Some(OverrideRule {
                    kind,
                    pattern: p.clone(),
                    regex,
                    exclude: o.exclude,
                    dtype: o.dtype,
                    symmetric: o.symmetric,
                    per_channel: o.granularity.map(|g| g != Granularity::PerTensor),
                    codebook: o.codebook,
                    range: o.range.map(|[lo, hi]| (lo, hi)),
                    precision: o.precision,
                })
            })
            .collect();
        crate::quant::plan::Overrides { rules }
    }

    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::config(path, format!("cannot read the config: {e}")))?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let mut config: Config = if text.trim().is_empty() {
            serde_yaml::from_str("{}")
        } else {
            serde_yaml::from_str(text)
        }
        .map_err(|e| Error::config(path, explain_yaml_error(&e.to_string())))?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&mut self, path: &Path) -> Result<()> {
        (self.engine, self.providers) = self.engine_setting.clone();
        if let Some(c) = self.calibration.as_mut() {
            c.validate(path)?;
        }
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if let Some(v) = self.verify.as_mut() {
            if v.data.is_relative() {
                v.data = base.join(&v.data);
            }
        }
        self.validate_formats(path)?;
        if self.target == crate::quant::rules::Target::Tensorrt {
            if self.weights.symmetric == Some(false) || self.activations.symmetric == Some(false) {
                return Err(Error::config(
                    path,
                    "target tensorrt is symmetric only (zero point 0): remove `symmetric: false`",
                ));
            }
            let unsigned = |d: Option<crate::quant::params::QuantDtype>| d.is_some_and(|d| !d.is_signed());
            if unsigned(self.weights.dtype) || unsigned(self.activation_dtype()) {
                return Err(Error::config(
                    path,
                    "target tensorrt takes signed types only (int8, int16, int4, float8e4m3fn)",
                ));
            }
        }
        for (i, o) in self.overrides.iter().enumerate() {
            let set = [&o.tensor, &o.node, &o.op_type].iter().filter(|x| x.is_some()).count();
            if set != 1 {
                return Err(Error::config(
                    path,
                    format!("overrides[{i}]: give exactly one of `tensor`, `node`, `op_type`"),
                ));
            }
            let pattern = o
                .tensor
                .as_ref()
                .or(o.node.as_ref())
                .or(o.op_type.as_ref())
                .expect("one is set");
            if let Err(e) = regex::Regex::new(&format!("^(?:{pattern})$")) {
                return Err(Error::config(
                    path,
                    format!("overrides[{i}]: `{pattern}` is not a valid regular expression: {e}"),
                ));
            }
            let settings = o.dtype.is_some()
                || o.granularity.is_some()
                || o.symmetric.is_some()
                || o.range.is_some()
                || o.precision.is_some()
                || o.codebook.is_some();
            if o.exclude && settings {
                return Err(Error::config(path, format!("overrides[{i}]: `exclude: true` keeps the match float; it cannot also set dtype, granularity, codebook, symmetric, range or precision")));
            }
            if !o.exclude && !settings {
                return Err(Error::config(path, format!("overrides[{i}]: say what it does (`exclude: true`, `dtype`, `granularity`, `codebook`, `symmetric`, `range` or `precision`)")));
            }
            if o.precision.is_some() && o.tensor.is_some() {
                return Err(Error::config(
                    path,
                    format!("overrides[{i}]: `precision` applies to a layer: match it with `node:` or `op_type:`"),
                ));
            }
            if o.precision == Some(crate::quant::plan::Precision::Int16)
                && self.target == crate::quant::rules::Target::Tensorrt
            {
                return Err(Error::config(
                    path,
                    format!("overrides[{i}]: TensorRT has no int16 activations; use float16"),
                ));
            }
            if let Some([lo, hi]) = o.range {
                if o.tensor.is_none() {
                    return Err(Error::config(
                        path,
                        format!("overrides[{i}]: `range` applies to a tensor: match it with `tensor:`"),
                    ));
                }
                if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                    return Err(Error::config(
                        path,
                        format!("overrides[{i}]: range [{lo}, {hi}] must be finite with lo < hi"),
                    ));
                }
            }
            if self.target == crate::quant::rules::Target::Tensorrt && o.symmetric == Some(false) {
                return Err(Error::config(
                    path,
                    format!("overrides[{i}]: target tensorrt is symmetric only (zero point 0)"),
                ));
            }
        }
        if let Some(m) = &self.mixed_precision {
            let bad = |msg: String| Err(Error::config(path, format!("mixed_precision: {msg}")));
            if m.target_sqnr_db.is_none() && m.max_float_fraction.is_none() && m.max_size_mb.is_none() {
                return bad("set `target_sqnr_db` and/or a budget (`max_float_fraction`, `max_size_mb`)".into());
            }
            if let Some(t) = m.target_sqnr_db {
                if !t.is_finite() {
                    return bad(format!("target_sqnr_db must be a finite number of dB, got {t}"));
                }
            }
            if let Some(f) = m.max_float_fraction {
                if !(0.0..=1.0).contains(&f) {
                    return bad(format!("max_float_fraction must be in [0, 1], got {f}"));
                }
            }
            if let Some(mb) = m.max_size_mb {
                if mb.is_nan() || mb <= 0.0 {
                    return bad(format!("max_size_mb must be positive, got {mb}"));
                }
            }
            if m.samples == 0 {
                return bad("samples must be at least 1".into());
            }
            if let Some(c) = &m.candidates {
                use crate::quant::plan::Precision;
                if c.is_empty() || c.contains(&Precision::Int8) {
                    return bad(
                        "candidates lists the precisions above int8 a layer may take (int16, float16, float)".into(),
                    );
                }
                if self.target == crate::quant::rules::Target::Tensorrt && c.contains(&Precision::Int16) {
                    return bad("TensorRT has no int16 activations: candidates float16, float".into());
                }
            }
            if !self.quantize {
                return bad("needs `quantize: true`".into());
            }
            if self.calibration.is_none() {
                return bad("measures layers on calibration data: set `calibration: {data: calib.npz}`".into());
            }
        }
        if let Some(g) = &self.guard {
            let bad = |msg: String| Err(Error::config(path, format!("guard: {msg}")));
            if !(0.0..=1.0).contains(&g.max_layers) {
                return bad(format!(
                    "max_layers is a fraction of the layers in [0, 1], got {}",
                    g.max_layers
                ));
            }
            if !(g.min_gain_db.is_finite() && g.min_gain_db > 0.0) {
                return bad(format!(
                    "min_gain_db must be a positive number of dB, got {}",
                    g.min_gain_db
                ));
            }
            if g.samples == 0 {
                return bad("samples must be at least 1".into());
            }
        }
        self.resolve_passes();
        self.validate_passes(path)
    }

    /// The activations' quantized type, when the config names one.
    fn activation_dtype(&self) -> Option<crate::quant::params::QuantDtype> {
        match self.activations.dtype {
            Some(ActivationDtype::Quant(d)) => Some(d),
            _ => None,
        }
    }

    /// The formats of issue 15 this config uses (4-bit, ternary, binary, FP8, narrower integer
    /// ranges, blocks, weight-only), by key.
    pub fn low_bit_formats(&self) -> Vec<String> {
        use crate::quant::params::QuantDtype;
        let new = |d: QuantDtype| d.bits() == 4 || d.float8().is_some();
        let mut used = Vec::new();
        if let Some(d) = self.weights.dtype.filter(|&d| new(d)) {
            used.push(format!("weights.dtype: {}", dtype_key(d)));
        }
        if let Some(b) = self.weights.bits {
            used.push(format!("weights.bits: {b}"));
        }
        if let Some(b) = self.activations.bits {
            used.push(format!("activations.bits: {b}"));
        }
        if self.weights.granularity == Some(Granularity::PerBlock) {
            used.push("weights.granularity: per_block".into());
        }
        if self.weights.codebook.is_some() {
            used.push("weights.codebook".into());
        }
        match self.activations.dtype {
            Some(ActivationDtype::Float) => used.push("activations.dtype: float".into()),
            Some(ActivationDtype::Quant(d)) if new(d) => used.push(format!("activations.dtype: {}", dtype_key(d))),
            _ => {}
        }
        for (i, o) in self.overrides.iter().enumerate() {
            if let Some(d) = o.dtype.filter(|&d| new(d)) {
                used.push(format!("overrides[{i}].dtype: {}", dtype_key(d)));
            }
            if o.codebook.is_some() {
                used.push(format!("overrides[{i}].codebook"));
            }
        }
        used
    }

    /// The default-domain opset the configured types need at least (FP8 19; 4-bit, 16-bit and
    /// blocks 21), with the key that asks for it; None when 13 does.
    pub fn required_opset(&self) -> Option<(i64, String)> {
        let rules = self.target_rules();
        let mut needs: Vec<(i64, String)> = Vec::new();
        if let Some(d) = self.weights.dtype {
            needs.push((d.min_opset(), format!("weights.dtype: {}", dtype_key(d))));
        }
        if rules.quantize_activations {
            let d = rules.activations.dtype;
            needs.push((d.min_opset(), format!("activations.dtype: {}", dtype_key(d))));
        }
        if rules.weight_block_size.is_some() {
            needs.push((21, "weights.granularity: per_block".into()));
        }
        if let Some(c) = rules.weight_codebook {
            needs.push((c.min_opset(), format!("weights.codebook: {{bits: {}}}", c.bits)));
        }
        for (i, o) in self.overrides.iter().enumerate() {
            if let Some(d) = o.dtype {
                needs.push((d.min_opset(), format!("overrides[{i}].dtype: {}", dtype_key(d))));
            }
            if let Some(c) = o.codebook {
                needs.push((c.min_opset(), format!("overrides[{i}].codebook: {{bits: {}}}", c.bits)));
            }
        }
        needs.into_iter().filter(|(v, _)| *v > 13).max_by_key(|(v, _)| *v)
    }

    /// The rules of the low-bit formats: what can be written, for which target.
    fn validate_formats(&mut self, path: &Path) -> Result<()> {
        use crate::quant::params::QuantDtype;
        use crate::quant::rules::Target;
        let err = |m: String| Err(Error::config(path, m));
        if self.activations.block_size.is_some() {
            return err("activations.block_size: blocks apply to constant weights only (`weights.granularity: per_block`, `weights.block_size`); activations are per-tensor".into());
        }
        let per_block = self.weights.granularity == Some(Granularity::PerBlock);
        match (per_block, self.weights.block_size) {
            (true, None) => {
                return err("weights.granularity: per_block needs `weights.block_size` (elements per block along the reduction axis, e.g. 32)".into())
            }
            (false, Some(_)) => {
                return err("weights.block_size applies with `weights.granularity: per_block`".into())
            }
            (true, Some(0)) => return err("weights.block_size must be positive".into()),
            _ => {}
        }
        if let Some(c) = self.weights.codebook {
            if !(2..=8).contains(&c.bits) {
                return err(format!(
                    "weights.codebook.bits must be in 2..8 (2^bits entries per table), got {}",
                    c.bits
                ));
            }
            let w = &self.weights;
            for (set, key) in [
                (w.dtype.is_some(), "dtype"),
                (w.granularity.is_some(), "granularity"),
                (w.bits.is_some(), "bits"),
                (w.symmetric.is_some(), "symmetric"),
                (w.reduce_range.is_some(), "reduce_range"),
            ] {
                if set {
                    return err(format!(
                        "weights.{key} sets a grid, and `weights.codebook` replaces the grid with a table of values: keep one (a codebook is per tensor, or per channel with `codebook: {{per_channel: true}}`)"
                    ));
                }
            }
            if self.target == Target::Tensorrt {
                return err("target tensorrt has no codebook weights (a Gather of a table is not a weight TensorRT quantizes): choose another target, or int4/int8 weights".into());
            }
        }
        let weights = self.weights.dtype.unwrap_or(self.target.rules().weights.dtype);
        if per_block && !crate::quant::plan::blockable(weights) {
            return err(format!(
                "weights.granularity: per_block is written for int8, int4 and uint4 weights, not {}",
                dtype_key(weights)
            ));
        }
        for (key, d, symmetric, reduce) in [
            (
                "weights",
                Some(weights),
                self.weights.symmetric,
                self.weights.reduce_range,
            ),
            (
                "activations",
                self.activation_dtype(),
                self.activations.symmetric,
                self.activations.reduce_range,
            ),
        ] {
            let Some(d) = d.filter(|d| d.float8().is_some()) else {
                continue;
            };
            if symmetric == Some(false) {
                return err(format!(
                    "{key}.dtype: {}: FP8 has no zero point (it is symmetric): remove `symmetric: false`",
                    dtype_key(d)
                ));
            }
            if reduce == Some(true) {
                return err(format!(
                    "{key}.reduce_range: an integer range; {} has none",
                    dtype_key(d)
                ));
            }
        }
        if self.activations.dtype == Some(ActivationDtype::Float)
            && (self.activations.symmetric.is_some()
                || self.activations.reduce_range.is_some()
                || self.activations.bits.is_some())
        {
            return err("activations.dtype: float quantizes no activation: `symmetric`, `reduce_range` and `bits` have nothing to act on".into());
        }
        if let Some(d) = self.activation_dtype().filter(|d| d.is_ternary_or_binary()) {
            return err(format!(
                "activations.dtype: {} is a weight format (a sign rule over a constant's channels); activations take int8, uint8, int16, uint16, int4, uint4 or FP8",
                dtype_key(d)
            ));
        }
        if weights.is_ternary_or_binary() {
            if self.weights.symmetric == Some(false) {
                return err(format!(
                    "weights.dtype: {}: its zero point is 0 (the levels are symmetric around 0): remove `symmetric: false`",
                    dtype_key(weights)
                ));
            }
            if self.weights.reduce_range == Some(true) {
                return err(format!(
                    "weights.reduce_range: {} has no integer range to reduce",
                    dtype_key(weights)
                ));
            }
        }
        let activations = match self.activations.dtype {
            Some(ActivationDtype::Quant(d)) => d,
            _ => self.target.rules().activations.dtype,
        };
        for (key, bits, d, reduce) in [
            ("weights", self.weights.bits, weights, self.weights.reduce_range),
            (
                "activations",
                self.activations.bits,
                activations,
                self.activations.reduce_range,
            ),
        ] {
            let Some(b) = bits else { continue };
            if !(2..=16).contains(&b) {
                return err(format!("{key}.bits must be in 2..16, got {b}"));
            }
            if d.float8().is_some() || d.is_ternary_or_binary() {
                return err(format!(
                    "{key}.bits narrows an integer range; {} has none",
                    dtype_key(d)
                ));
            }
            if b > d.bits() {
                return err(format!(
                    "{key}.bits: {b} bits do not fit {} ({} bits): choose a wider `{key}.dtype`",
                    dtype_key(d),
                    d.bits()
                ));
            }
            if reduce == Some(true) {
                return err(format!(
                    "{key}.bits and {key}.reduce_range both narrow the range: keep one"
                ));
            }
        }
        for (i, o) in self.overrides.iter().enumerate() {
            if let Some(c) = o.codebook {
                if !(2..=8).contains(&c.bits) {
                    return err(format!("overrides[{i}].codebook.bits must be in 2..8, got {}", c.bits));
                }
                if o.dtype.is_some() || o.granularity.is_some() || o.symmetric.is_some() {
                    return err(format!(
                        "overrides[{i}]: `dtype`, `granularity` and `symmetric` set a grid, and `codebook` replaces it: keep one"
                    ));
                }
                if o.tensor.is_some() {
                    return err(format!(
                        "overrides[{i}]: a codebook is a weight format, and a `tensor:` rule may match an activation: match the layer with `node:` or `op_type:`"
                    ));
                }
                if self.target == Target::Tensorrt {
                    return err(format!("overrides[{i}]: target tensorrt has no codebook weights"));
                }
            }
            if o.granularity == Some(Granularity::PerBlock) {
                return err(format!(
                    "overrides[{i}]: per_block is set for all weights by `weights.granularity`"
                ));
            }
            if let Some(d) = o.dtype.filter(|d| d.is_ternary_or_binary()) {
                if o.tensor.is_some() {
                    return err(format!(
                        "overrides[{i}]: {} is a weight format, and a `tensor:` rule may match an activation: match the layer with `node:` or `op_type:`",
                        dtype_key(d)
                    ));
                }
                if self.target == Target::Tensorrt {
                    return err(format!(
                        "overrides[{i}]: target tensorrt has no {} weights (its int4 is block-wise weight-only)",
                        dtype_key(d)
                    ));
                }
            }
        }
        if self.target == Target::Tensorrt {
            let a = self.activation_dtype();
            if a.is_some_and(|d| d.bits() == 4) {
                return err("target tensorrt: int4 is for weights only (TensorRT has no int4 activations)".into());
            }
            if a == Some(QuantDtype::Float8e5m2) || self.weights.dtype == Some(QuantDtype::Float8e5m2) {
                return err("target tensorrt: its FP8 is float8e4m3fn (no float8e5m2)".into());
            }
            if weights.is_ternary_or_binary() {
                return err(format!(
                    "target tensorrt has no {} weights (its int4 is block-wise weight-only)",
                    dtype_key(weights)
                ));
            }
            if weights.bits() == 4 && self.activations.dtype != Some(ActivationDtype::Float) {
                return err("target tensorrt runs int4 weights weight-only: set `activations.dtype: float`".into());
            }
        }
        let used = self.low_bit_formats();
        if !used.is_empty() {
            if self.mixed_precision.is_some() {
                return err(format!(
                    "mixed_precision measures layers with an integer-grid fake quantizer, which does not model {}: remove `mixed_precision:` or the format",
                    used.join(", ")
                ));
            }
            if self.guard.is_some() {
                self.guard = None;
                self.guard_off = Some(format!(
                    "off: it measures with an integer-grid fake quantizer, which does not model {}",
                    used.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// `passes:` as listed, or (when absent) the default recipe's passes that apply to this config.
    fn resolve_passes(&mut self) {
        if let Some(listed) = &self.listed_passes {
            self.passes = listed.clone();
            self.defaults = None;
            return;
        }
        let defaults: Vec<DefaultPass> = default_recipe()
            .into_iter()
            .map(|(name, options, what)| {
                let options: serde_yaml::Value = if options.is_empty() {
                    serde_yaml::Value::Null
                } else {
                    serde_yaml::from_str(options).expect("the default recipe's options parse")
                };
                let (applied, why) = if !self.quantize {
                    (false, "`quantize: false`: the defaults serve quantization".to_string())
                } else if name == "gptq" && self.calibration.is_none() {
                    (
                        false,
                        "no calibration data: gptq fits roundings to the layers' inputs".to_string(),
                    )
                } else if name == "gptq" && self.weights.codebook.is_some() {
                    (
                        false,
                        "`weights.codebook`: the weights are clustered into tables, not rounded onto a grid"
                            .to_string(),
                    )
                } else {
                    (true, what.to_string())
                };
                DefaultPass {
                    pass: crate::pipeline::PassSpec {
                        name: name.to_string(),
                        options,
                    },
                    applied,
                    why,
                }
            })
            .collect();
        self.passes = defaults.iter().filter(|d| d.applied).map(|d| d.pass.clone()).collect();
        self.defaults = Some(defaults);
    }

    /// One line per default pass (when `passes:` is absent): what runs and why, what does not.
    pub fn describe_defaults(&self) -> Vec<String> {
        self.defaults
            .iter()
            .flatten()
            .map(|d| {
                let options = match &d.pass.options {
                    serde_yaml::Value::Null => String::new(),
                    o => format!(
                        " {{{}}}",
                        serde_yaml::to_string(o).unwrap_or_default().trim().replace('\n', ", ")
                    ),
                };
                format!(
                    "{} {}{options}: {}",
                    if d.applied { "runs" } else { "skipped" },
                    d.pass.name,
                    d.why
                )
            })
            .collect()
    }

    /// Every pass exists and takes its options; plan passes come after the graph passes and need
    /// a plan (`quantize: true`); each pass's requirements hold; and quantizing without data
    /// has a BatchNorm fold to take ranges from.
    fn validate_passes(&self, path: &Path) -> Result<()> {
        use crate::passes::{Phase, Requirement};
        let mut first_plan_pass: Option<&str> = None;
        for spec in &self.passes {
            let name = &spec.name;
            if crate::passes::create(name).is_none() {
                let known = crate::passes::NAMES;
                let hint = closest(name, known)
                    .map(|c| format!(" (did you mean `{c}`?)"))
                    .unwrap_or_default();
                return Err(Error::config(
                    path,
                    format!("unknown pass `{name}`{hint}; valid passes: {}", known.join(", ")),
                ));
            }
            let pass = crate::pipeline::create_pass(spec)
                .map_err(|m| Error::config(path, format!("passes: {}", explain_yaml_error(&m))))?;
            match pass.phase() {
                Phase::Plan => {
                    first_plan_pass.get_or_insert(pass.name());
                    if !self.quantize {
                        return Err(Error::config(
                            path,
                            format!(
                                "`{name}` acts on the quantized weights, and `quantize: false` writes none: remove it or quantize"
                            ),
                        ));
                    }
                }
                Phase::Graph => {
                    if let Some(plan_pass) = first_plan_pass {
                        return Err(Error::config(
                            path,
                            format!(
                                "passes: `{name}` rewrites the float graph, so it runs before calibration, but it is listed after `{plan_pass}`, which changes the plan made from that calibration: list the graph passes first"
                            ),
                        ));
                    }
                }
            }
            for requirement in pass.requires() {
                match requirement {
                    Requirement::CalibrationData(why) => {
                        if self.calibration.is_none() {
                            return Err(Error::config(
                                path,
                                format!("`{name}` {why}: it needs `calibration: {{data: …}}`"),
                            ));
                        }
                    }
                }
            }
        }
        if self.quantize && self.calibration.is_none() && !self.pass_names().iter().any(|p| p == "fold_batchnorm") {
            return Err(Error::config(
                path,
                "quantizing needs calibration data: set `calibration: {data: calib.npz}`, or run `fold_batchnorm` for data-free ranges from the BatchNorm statistics (or `quantize: false` to only run the passes)",
            ));
        }
        Ok(())
    }
}

/// The config's spelling of a dtype (`int4`, `float8e4m3fn`).
fn dtype_key(d: crate::quant::params::QuantDtype) -> String {
    serde_yaml::to_value(d)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| d.to_string())
}

/// Adds "did you mean" to serde's unknown-field and unknown-variant messages, which already
/// list the valid keys and values.
fn explain_yaml_error(message: &str) -> String {
    let Some((_, rest)) = message
        .split_once("unknown field `")
        .or_else(|| message.split_once("unknown variant `"))
    else {
        return message.to_string();
    };
    let Some((field, rest)) = rest.split_once('`') else {
        return message.to_string();
    };
    let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    match closest(field, &expected) {
        Some(c) => format!("{message} (did you mean `{c}`?)"),
        None => message.to_string(),
    }
}

/// The candidate within edit distance 3 of `word` (and less than its length), if any.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= 3 && *d < word.len())
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("q.yaml"))
    }

    #[test]
    fn engine_is_a_name_or_onnxruntime_with_its_providers() {
        use crate::runtime::Engine;
        let c = parse("engine: onnxruntime\n").unwrap();
        assert_eq!((c.engine, c.providers), (Engine::Onnxruntime, vec![]));
        let c = parse("engine: {onnxruntime: {providers: [cuda, cpu]}}\n").unwrap();
        assert_eq!(
            (c.engine, c.providers),
            (Engine::Onnxruntime, vec![Provider::Cuda, Provider::Cpu])
        );
        assert_eq!(parse("{}").unwrap().engine, Engine::Tract);
        let err = |yaml: &str| parse(yaml).unwrap_err().to_string();
        let e = err("engine: {onnxruntime: {provider: [cuda]}}\n");
        assert!(e.contains("`provider`") && e.contains("providers"), "{e}");
        let e = err("engine: {onnxruntime: {providers: [gpu]}}\n");
        assert!(e.contains("gpu") && e.contains("cuda") && e.contains("tensorrt"), "{e}");
        let e = err("engine: {onnxruntime: {providers: []}}\n");
        assert!(e.contains("names none"), "{e}");
        let e = err("engine: {tract: {threads: 2}}\n");
        assert!(e.contains("tract has no options"), "{e}");
        let e = err("engine: {onnxruntime: {providers: [cpu]}, tract: {}}\n");
        assert!(e.contains("one-key map"), "{e}");
    }

    #[test]
    fn unknown_key_names_the_closest_valid_one() {
        let err = parse("quantise: false\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `quantise`"), "{err}");
        assert!(err.contains("did you mean `quantize`?"), "{err}");
    }

    #[test]
    fn unknown_pass_lists_valid_ones() {
        let err = parse("quantize: false\npasses: [eliminate_identities]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `eliminate_identity`?"), "{err}");
    }

    #[test]
    fn passes_take_options_as_one_key_maps() {
        let c = parse("quantize: false\npasses: [eliminate_identity, {eliminate_identity: null}]\n").unwrap();
        assert_eq!(c.pass_names(), vec!["eliminate_identity", "eliminate_identity"]);
        let err = parse("passes: [{eliminate_identity: {strict: true}}]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pass `eliminate_identity` takes no options"), "{err}");
    }

    #[test]
    fn defaults() {
        // Quantizing is the default; without `passes:` the default recipe runs, without gptq when
        // there is no data (data-free ranges from the BatchNorms it folds).
        let names = |c: &Config| c.pass_names().join(" ");
        let c = parse("calibration: {data: d.npz}").unwrap();
        assert!(c.quantize && c.verify.is_none());
        assert_eq!(names(&c), "fold_batchnorm equalize gptq correct_bias");
        assert_eq!(c.passes[1].options["relu6"], serde_yaml::Value::from("per_channel"));
        let c = parse("").unwrap();
        assert_eq!(names(&c), "fold_batchnorm equalize correct_bias");
        let skipped = c.describe_defaults();
        assert!(
            skipped
                .iter()
                .any(|l| l.starts_with("skipped gptq: no calibration data")),
            "{skipped:?}"
        );
        // `passes: []` means none, and then quantizing needs data.
        let err = parse("passes: []").unwrap_err().to_string();
        assert!(err.contains("quantizing needs calibration data"), "{err}");
        let c = parse("calibration: {data: d.npz}\npasses: []").unwrap();
        assert!(c.passes.is_empty() && c.defaults.is_none());
        let c = parse("quantize: false").unwrap();
        assert!(c.passes.is_empty());
        assert!(c.describe_defaults().iter().all(|l| l.starts_with("skipped")));
    }

    #[test]
    fn plan_passes_come_after_graph_passes_and_need_what_they_require() {
        let data = "calibration: {data: d.npz}\n";
        assert!(parse(&format!("{data}passes: [fold_batchnorm, gptq, correct_bias]")).is_ok());
        assert!(parse(&format!("{data}passes: [correct_bias, gptq]")).is_ok());
        let err = parse(&format!("{data}passes: [gptq, equalize]"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`equalize` rewrites the float graph") && err.contains("after `gptq`"),
            "{err}"
        );
        let err = parse("passes: [fold_batchnorm, gptq]").unwrap_err().to_string();
        assert!(
            err.contains("`gptq` fits the weight rounding") && err.contains("needs `calibration:"),
            "{err}"
        );
        let err = parse(&format!("{data}quantize: false\npasses: [correct_bias]"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`quantize: false` writes none"), "{err}");
        // Data-free correction: fold_batchnorm gives the ranges.
        assert!(parse("passes: [fold_batchnorm, correct_bias]").is_ok());
    }

    #[test]
    fn calibration_section_is_checked_and_paths_resolve_against_the_config() {
        let c = Config::parse(
            "quantize: false\ncalibration: {data: d.npz, method: entropy}\n",
            Path::new("cfg/q.yaml"),
        )
        .unwrap();
        let cal = c.calibration.unwrap();
        assert_eq!(cal.data.paths(), vec![PathBuf::from("cfg/d.npz")]);
        assert_eq!(cal.method(), crate::calib::observers::Method::Entropy { bits: 8 });
        let err = parse("quantize: false\ncalibration: {data: d.npz, methd: mse}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `method`?"), "{err}");
        let err = parse("quantize: false\ncalibration: {data: d.npz, percentile: 120}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("percentile must be in (0, 100]"), "{err}");
        let err = parse("quantize: false\ncalibration: {data: d.npz, method: kl}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `kl`"), "{err}");
    }

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
