//! The passes: the `Pass` trait, the `Context` they share, and the registry (one explicit list of
//! names, one constructor). The YAML `passes:` list names passes from here; an unknown name is an
//! error that lists these. The fixed stages (calibrate, plan, materialize, ...) implement the
//! same trait in `pipeline::stages`; `pipeline` runs both.

mod absorb_bias;
pub mod adaround;
pub mod correct_bias;
pub mod easyquant;
mod eliminate_identity;
mod equalize;
mod fold_batchnorm;
pub mod gptq;
mod hardswish;
mod rewritable;

pub use correct_bias::BiasCorrectionMode;

use crate::calib::source::DataSource;
use crate::calib::stats::CalibrationStats;
use crate::error::Result;
use crate::ir::{BatchNormRecord, Model};
use crate::quant::plan::{Plan, PlanOptions};

/// When a pass runs: on the float graph before calibration, or on the plan once it exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Rewrites the float graph (before calibration: the statistics are taken on its result).
    Graph,
    /// Reads and changes the quantization plan (`Context::plan`), in the order listed, after
    /// planning and before mixed precision; needs `quantize: true`.
    Plan,
}

/// What a pass needs beyond its phase, checked when the config is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// `calibration: {data: …}`; the text says why, for the error.
    CalibrationData(&'static str),
}

pub trait Pass {
    fn name(&self) -> &'static str;
    fn phase(&self) -> Phase {
        Phase::Graph
    }
    fn requires(&self) -> &'static [Requirement] {
        &[]
    }
    /// Takes the pass's options from the config (`passes: [{name: {option: value}}]`). Passes
    /// without options refuse any.
    fn configure(&mut self, options: &serde_yaml::Value) -> std::result::Result<(), String> {
        match options {
            serde_yaml::Value::Null => Ok(()),
            _ => Err(format!("pass `{}` takes no options", self.name())),
        }
    }
    /// Rewrites the model (and, in the plan phase, the plan). Returns notes for the report (what
    /// changed, what was left and why). A precondition that does not hold is an error, never a
    /// silent skip.
    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>>;
}

/// What passes and stages share, as explicit fields, each set by the step named in its doc.
/// Everything is keyed by tensor name, never by node index.
#[derive(Default)]
pub struct Context {
    /// One entry per step run: what it changed, for the report.
    pub pass_reports: Vec<PassReport>,
    /// The engine the job runs models in (`engine:`): set by `calibrate`, read by the passes
    /// that gather layer inputs (gptq, adaround, easyquant).
    pub engine: crate::runtime::Engine,
    /// The BatchNormalization statistics `fold_batchnorm` folded away, keyed by the folded layer's
    /// output tensor, for bias absorption, analytical bias correction and data-free ranges.
    pub batchnorm_records: Vec<BatchNormRecord>,
    /// The Ifs inlined and the part tract runs, for a model with control flow (`calibrate`); the
    /// job writes the model with its control flow put back.
    pub control_flow: Option<crate::calib::control_flow::ControlFlow>,
    /// The calibration data (`calibrate`; None in data-free mode).
    pub calibration: Option<DataSource>,
    /// Activation statistics of the float model after the graph passes (`calibrate`).
    pub stats: Option<CalibrationStats>,
    /// Whether the first pass after `calibrate` is one that fits roundings to the layers' inputs
    /// ([`MEASURES_LAYER_INPUTS`]: gptq, adaround; set by the pass manager, `pipeline::run`):
    /// the stages between change only the plan, so calibration's run of the float model sees
    /// the layer inputs that pass would and measures them for it, instead of the pass running
    /// the model over the data again.
    pub layer_inputs_follow_calibration: bool,
    /// The layers' input statistics (`H`), measured by `calibrate` when
    /// `layer_inputs_follow_calibration` (and the statistics were not reused from a file); the
    /// first of gptq and adaround takes them.
    pub layer_inputs: Option<gptq::Measured>,
    /// How the plan is built (`plan`), so a plan pass can re-plan after changing the graph.
    pub plan_options: Option<PlanOptions>,
    /// What gets Q/DQ with which parameters (`plan`, then the plan passes and mixed precision).
    pub plan: Option<Plan>,
    /// The model after the graph passes, which the quantized model is verified against and the
    /// guard measures against, before the plan passes correct its biases (`calibrate`).
    pub float_model: Option<Model>,
    /// The model as loaded, when the job also verifies against it (set by the job).
    pub original_model: Option<Model>,
    /// Held-out data for `verify` (`calibrate` opens it, so bad data fails early).
    pub verify_data: Option<DataSource>,
    /// The mixed-precision search's result (`mixed_precision`).
    pub mixed_precision: Option<crate::quant::mixed::Assignment>,
    /// What the accuracy guard measured and raised (`guard`).
    pub guard: Option<crate::quant::guard::GuardReport>,
    /// The verification against `float_model`, and against `original_model` (`verify`).
    pub verification: Option<crate::verify::VerifyReport>,
    pub verification_against_original: Option<crate::verify::VerifyReport>,
}

impl Context {
    /// A stable text of what the stages have produced so far (statistics ranges, the plan), for
    /// `--dump-after`: appended to the graph dump, so a plan step's dump diff shows the plan change.
    pub fn dump(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        if let Some(stats) = &self.stats {
            writeln!(out, "# statistics: {} samples", stats.samples).expect("writing to a String");
            for (name, t) in &stats.tensors {
                writeln!(
                    out,
                    "stats {name}: min={} max={} count={}",
                    crate::ir::dump::fmt_float(t.min as f64),
                    crate::ir::dump::fmt_float(t.max as f64),
                    t.count
                )
                .expect("writing to a String");
            }
        }
        if let Some(plan) = &self.plan {
            writeln!(out, "# plan").expect("writing to a String");
            out.push_str(&serde_json::to_string_pretty(plan).expect("the plan serialises"));
            out.push('\n');
        }
        out
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PassReport {
    pub pass: String,
    /// One line per rewrite or per rejected candidate, with its reason.
    pub notes: Vec<String>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Wall time of the step.
    pub ms: f64,
}

/// Every pass onnxq has, by the name the config uses.
pub const NAMES: &[&str] = &[
    "eliminate_identity",
    "fold_batchnorm",
    "equalize",
    "absorb_bias",
    "correct_bias",
    "easyquant",
    "gptq",
    "adaround",
];

/// The plan passes that fit weight roundings to the layers' inputs (the `H` of
/// [`gptq::LayerInputs`]), which calibration's run can measure for the first of them.
pub const MEASURES_LAYER_INPUTS: &[&str] = &["gptq", "adaround"];

/// The plan passes that change neither the float model nor what the layers read (scales only),
/// which calibration's measurement of the layer inputs looks through (easyquant).
pub const CHANGES_ONLY_SCALES: &[&str] = &["easyquant"];

/// A pass's options from its YAML (`passes: [{name: {option: value}}]`); none given: the defaults.
pub(crate) fn parse_options<O: serde::de::DeserializeOwned + Default>(
    pass: &str,
    options: &serde_yaml::Value,
) -> std::result::Result<O, String> {
    if options.is_null() {
        return Ok(O::default());
    }
    serde_yaml::from_value(options.clone()).map_err(|e| format!("pass `{pass}`: bad options: {e}"))
}

/// What a pass does and its options with their defaults, for `onnxq passes`.
pub fn describe(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "eliminate_identity" => ("removes Identity nodes (exact)", "none"),
        "fold_batchnorm" => (
            "folds BatchNormalization (or its Mul/Add form) into the Conv, ConvTranspose or Gemm before it, keeping the statistics for the passes below (exact up to rounding)",
            "none",
        ),
        "equalize" => (
            "cross-layer equalisation (Nagel et al. 2019): balances the per-channel weight ranges of consecutive layers (float-preserving)",
            "relu6: keep|per_channel|as_relu (keep); hardswish: keep|per_channel (keep); tolerance (1e-4); max_iterations (20)",
        ),
        "absorb_bias" => (
            "high-bias absorption across a Relu, from the BatchNorm statistics (exact where the pre-activation exceeds the absorbed amount)",
            "sigmas (6); padded: skip|absorb (skip)",
        ),
        "correct_bias" => (
            "bias correction: removes the expected output shift of weight rounding once the plan is known",
            "mode: empirical|analytical (empirical with calibration data, analytical without)",
        ),
        "easyquant" => (
            "EasyQuant (Wu et al. 2020): searches each output channel's weight scale and then the layer's input scale over [low·S, high·S] of the plan's scale S, alternately, maximising the cosine of the quantized layer's output with the float one on the calibration samples (list it before gptq, adaround and correct_bias)",
            "rounds (3); samples (50); steps (100); low (0.5); high (1.0; the paper's 2 measured worse: README \"EasyQuant\"); vectors (512); bias_corrected (true); search: both|weights|activations (both)",
        ),
        "gptq" => (
            "GPTQ (Frantar et al. 2023): chooses each weight's rounding to minimise the layer's output error on the calibration data, on the plan's grid (list it before correct_bias, which then removes the mean shift left)",
            "none",
        ),
        "adaround" => (
            "AdaRound (Nagel et al. 2020): learns each weight's rounding (down or up) on the plan's grid by minimising the layer's output reconstruction error on the calibration inputs, with a rectified-sigmoid relaxation and an annealed rounding regulariser (list it before correct_bias)",
            "iterations (1000); learning_rate (0.01); regularization (0.01); warmup (0.2); beta_start (20); beta_end (2)",
        ),
        _ => return None,
    })
}

pub fn create(name: &str) -> Option<Box<dyn Pass>> {
    Some(match name {
        "eliminate_identity" => Box::new(eliminate_identity::EliminateIdentity),
        "fold_batchnorm" => Box::new(fold_batchnorm::FoldBatchnorm),
        "equalize" => Box::new(equalize::Equalize::default()),
        "absorb_bias" => Box::new(absorb_bias::AbsorbBias::default()),
        "correct_bias" => Box::new(correct_bias::CorrectBias::default()),
        "easyquant" => Box::new(easyquant::EasyQuant::default()),
        "gptq" => Box::new(gptq::Gptq),
        "adaround" => Box::new(adaround::AdaRound::default()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_pass_is_described_and_created() {
        for name in super::NAMES {
            assert!(super::describe(name).is_some(), "{name} has no description");
            assert!(super::create(name).is_some(), "{name} cannot be created");
        }
        assert!(super::describe("nope").is_none());
    }
}
