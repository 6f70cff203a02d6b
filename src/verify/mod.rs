//! Verification: run the float model and the quantized (QDQ) model side by side in tract over
//! every sample and measure how far the quantized outputs are from the float ones, output by
//! output and layer by layer.
//!
//! - Outputs are matched by graph output name, in the float model's order. Float outputs get
//!   SQNR, cosine similarity, max absolute error and, when they look like class scores, top-1
//!   agreement (see [`metrics`] for the exact definitions: SQNR over all elements of all samples,
//!   cosine as the mean of per-sample cosines, top-1 per row for `[N, C]` scores). Integer and
//!   bool outputs are compared for exact equality instead (fraction of equal elements).
//! - Layers are the float model's node outputs that the quantized model also produces by a node
//!   (Q/DQ insertion keeps the producers' tensor names and adds new ones, which are not matched),
//!   restricted to tensors that depend on the runtime inputs and are not obviously integer (shape
//!   arithmetic). In the quantized model a tensor followed by QuantizeLinear → DequantizeLinear is
//!   represented by that DQ's output: the value the next layers read, its own rounding included
//!   (and the only right one when a quantizer folded an activation into the Q range, as ONNX
//!   Runtime does with a Relu after a Conv). They are asked from tract as extra outputs and
//!   reported in the float model's topological order with their SQNR. The *first drop* is the
//!   first layer in that order whose SQNR is below [`VerifyOptions::layer_floor_db`] (NaN counts
//!   as below): where the quantization error first becomes large, usually the layer to keep in
//!   float or to calibrate differently.
//! - Thresholds ([`VerifyOptions`]) apply to every output; [`verify`] returns the report either
//!   way, and [`VerifyReport::passed`] / [`VerifyReport::failures`] say whether they held (the
//!   CLI writes the report, then exits with code 3 via [`VerifyReport::to_error`]).
//! - Streaming and deterministic: on each sample the two models run in lockstep, node by node
//!   ([`Runner::start`]), and each compared pair is reduced to a few f64 sums as soon as both
//!   models have produced it, then dropped: a sample never holds all its tensors of both models.
//!   Samples run in parallel, as many as the memory budget fits ([`crate::runtime::memory`]),
//!   and the sums are combined in sample order, so the report is the same whatever the thread
//!   count or the budget, and memory does not grow with the samples.
//! - The quantized model is run with every Q/DQ rewritten into the exact float arithmetic ONNX
//!   specifies ([`lower_all_qdq`]): results match ONNX Runtime's, not tract's int8 kernels (which
//!   0.23.9 gets wrong on quantized softmax outputs). With
//!   [`VerifyOptions::tract_quantized_kernels`] only what tract cannot run is rewritten
//!   ([`lower_for_tract`]: int16/uint16/int4 types, blocked scales, non-constant scales,
//!   `output_dtype`, quantized weights of those types).
//!
//! JSON: an SQNR of +∞ (identical tensors) is written as `1.7976931348623157e308` (f64::MAX) and
//! −∞ (an all-zero reference against a non-zero quantized tensor) as its negative, so numeric
//! comparisons in scripts keep working; `identical: true` says it explicitly. NaN (a NaN in the
//! outputs) is written as `null`, and fails every threshold.

pub mod lower;
pub mod metrics;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};
use tract_onnx::prelude::{DatumType, TValue, Tensor};

use crate::calib::source::DataSource;
use crate::calib::stats::Progress;
use crate::error::{tract_error, Error, Result};
use crate::ir::Model;
use crate::runtime::memory::{run_samples, Parallelism};
use crate::runtime::onnxruntime::OrtRunner;
use crate::runtime::step::Stepping;
use crate::runtime::{to_f32_vec, Engine, Runner};
use metrics::{FloatSums, FloatTotals, IntegerTotals};

pub use lower::{lower_all_qdq, lower_for_tract, lower_with_notes};

/// Thresholds and knobs of a verification run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifyOptions {
    /// Every float output must reach this SQNR (dB).
    pub min_sqnr_db: Option<f64>,
    /// Every float output must reach this mean per-sample cosine similarity.
    pub min_cosine: Option<f64>,
    /// Every output that looks like class scores must reach this top-1 agreement (0..1).
    pub min_top1_agreement: Option<f64>,
    /// Every integer output must have at least this fraction of equal elements (0..1).
    pub min_equal_fraction: Option<f64>,
    /// The first layer (topological order) whose SQNR is below this is reported as the first
    /// drop. 20 dB: an int8 layer with well-chosen ranges is at 30-45 dB; below 20 dB the error is
    /// a tenth of the signal's amplitude.
    pub layer_floor_db: f64,
    /// Compare intermediate tensors (costs memory and some of tract's fusions while verifying).
    pub per_layer: bool,
    /// Let tract run int8/uint8 QuantizeLinear/DequantizeLinear with its own quantized kernels.
    /// Off by default: every Q/DQ is then rewritten into the exact float arithmetic the ONNX
    /// specification defines ([`lower_all_qdq`]), so the verdict does not depend on tract's int8
    /// implementation (tract 0.23.9 fuses DequantizeLinear → Softmax → QuantizeLinear into a
    /// quantized softmax that ignores the output zero point, and quantizes by multiplying with
    /// the reciprocal of the scale). Q/DQ tract cannot run are rewritten either way.
    pub tract_quantized_kernels: bool,
    /// Run each model on a whole sample and compare after, holding every compared tensor of
    /// both models, instead of in lockstep node by node. The figures are the same; kept to
    /// check that, and to measure what the lockstep saves. Not part of the report.
    #[serde(skip)]
    pub hold_samples: bool,
    /// The engine both models run in. ONNX Runtime runs the written quantized model as it is
    /// (no lowering, its own integer kernels, exact maths for MatMulNBits), per layer where ORT
    /// keeps the tensors.
    pub engine: Engine,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            min_sqnr_db: None,
            min_cosine: None,
            min_top1_agreement: None,
            min_equal_fraction: None,
            layer_floor_db: 20.0,
            per_layer: true,
            tract_quantized_kernels: false,
            hold_samples: false,
            engine: Engine::Tract,
        }
    }
}

/// The result of [`verify`]: serialisable for the JSON report, `Display` for the terminal.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub samples: usize,
    /// Whether every threshold held (same as [`VerifyReport::passed`]).
    pub passed: bool,
    pub thresholds: VerifyOptions,
    pub failures: Vec<Failure>,
    pub outputs: Vec<OutputReport>,
    /// Float layers present in both models, in the float model's topological order.
    pub layers: Vec<LayerReport>,
    /// The first layer whose SQNR is below `thresholds.layer_floor_db`.
    pub first_drop: Option<String>,
    /// Matched tensors not in `layers`, and why (integer tensors, shapes that differ).
    pub layers_skipped: Vec<SkippedLayer>,
    /// Set when the per-layer comparison could not run (and why).
    pub layers_note: Option<String>,
    /// Nodes of the quantized model rewritten for tract (see [`lower_for_tract`]).
    pub lowering: Vec<String>,
    /// The engine both models ran in.
    pub engine: Engine,
}

/// A threshold that did not hold.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub output: String,
    /// `sqnr_db`, `cosine`, `top1_agreement` or `equal_fraction`.
    pub metric: String,
    #[serde(serialize_with = "serialize_db")]
    pub value: f64,
    pub threshold: f64,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.metric.as_str() {
            "sqnr_db" => write!(
                f,
                "output '{}': SQNR {} dB is below {} dB",
                self.output,
                fmt_db(self.value),
                self.threshold
            ),
            "cosine" => write!(
                f,
                "output '{}': cosine {:.6} is below {}",
                self.output, self.value, self.threshold
            ),
            other => write!(
                f,
                "output '{}': {} {:.4} is below {}",
                self.output,
                other.replace('_', " "),
                self.value,
                self.threshold
            ),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct OutputReport {
    pub name: String,
    /// Element type in the float model (`f32`, `i64`, ...).
    pub dtype: String,
    /// Shape of one sample's output (the first sample's).
    pub shape: Vec<usize>,
    pub samples: usize,
    #[serde(flatten)]
    pub comparison: Comparison,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Comparison {
    Float(FloatMetrics),
    Integer(IntegerMetrics),
}

#[derive(Clone, Debug, Serialize)]
pub struct FloatMetrics {
    /// 10·log10(Σf² / Σ(f−q)²) over all elements of all samples.
    #[serde(serialize_with = "serialize_db")]
    pub sqnr_db: f64,
    /// Every element of every sample equal (SQNR +∞).
    pub identical: bool,
    /// Mean over samples of the per-sample cosine similarity.
    pub cosine: f64,
    /// Lowest per-sample cosine similarity.
    pub cosine_min: f64,
    pub max_abs_err: f64,
    pub mean_abs_err: f64,
    /// Fraction of rows whose argmax agrees, when the output looks like class scores.
    pub top1_agreement: Option<f64>,
    /// Rows compared for top-1 (samples × rows per sample).
    pub top1_rows: Option<usize>,
}

impl FloatMetrics {
    fn of(t: &FloatTotals) -> FloatMetrics {
        let sqnr = t.sqnr_db();
        FloatMetrics {
            sqnr_db: sqnr,
            identical: sqnr == f64::INFINITY,
            cosine: t.cosine_mean(),
            cosine_min: t.cosine_min,
            max_abs_err: t.max_abs,
            mean_abs_err: t.mean_abs(),
            top1_agreement: t.top1_agreement(),
            top1_rows: t.top1.map(|(_, r)| r).filter(|&r| r > 0),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct IntegerMetrics {
    /// Fraction of elements equal in both models, over all samples.
    pub equal_fraction: f64,
    pub elements: u64,
    /// Samples whose output is equal element for element.
    pub samples_equal: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// The tensor name (shared by both models).
    pub name: String,
    /// The op producing it in the float model.
    pub op_type: String,
    /// The quantized model's tensor it is compared with: the output of the Q → DQ pair that
    /// quantizes it when there is one (what the next layers read, its own rounding included),
    /// else the tensor of the same name.
    pub quantized: String,
    #[serde(serialize_with = "serialize_db")]
    pub sqnr_db: f64,
    pub identical: bool,
    pub cosine: f64,
    pub max_abs_err: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SkippedLayer {
    pub name: String,
    pub reason: String,
}

/// +∞/−∞ as ±f64::MAX, NaN as null (see the module documentation).
fn serialize_db<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.is_nan() {
        s.serialize_none()
    } else if v.is_infinite() {
        s.serialize_f64(f64::MAX.copysign(*v))
    } else {
        s.serialize_f64(*v)
    }
}

impl VerifyReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }

    /// `Error::Verification` (exit code 3) naming every failed threshold, or None if all held.
    pub fn to_error(&self) -> Option<Error> {
        if self.failures.is_empty() {
            return None;
        }
        let list: Vec<String> = self.failures.iter().map(|f| f.to_string()).collect();
        Some(Error::Verification(list.join("; ")))
    }

    pub fn output(&self, name: &str) -> Option<&OutputReport> {
        self.outputs.iter().find(|o| o.name == name)
    }

    pub fn layer(&self, name: &str) -> Option<&LayerReport> {
        self.layers.iter().find(|l| l.name == name)
    }

    /// The `n` layers with the lowest SQNR (NaN first), worst first; ties in topological order.
    pub fn worst_layers(&self, n: usize) -> Vec<&LayerReport> {
        let mut v: Vec<&LayerReport> = self.layers.iter().collect();
        let key = |l: &LayerReport| {
            if l.sqnr_db.is_nan() {
                f64::NEG_INFINITY
            } else {
                l.sqnr_db
            }
        };
        v.sort_by(|a, b| key(a).total_cmp(&key(b)));
        v.truncate(n);
        v
    }
}

/// Compares `quant` against `float` on every sample of `data`. Errors: a model or sample tract
/// cannot run, an output missing from the quantized model or whose shape or kind differs
/// (`Error::Verification`), Q/DQ the lowering cannot rewrite (`Error::Runtime`: float8, per-axis
/// quantization of an activation of unknown rank, ...). Threshold failures
/// are not errors: see [`VerifyReport::passed`].
pub fn verify(float: &Model, quant: &Model, data: &DataSource, options: &VerifyOptions) -> Result<VerifyReport> {
    if data.is_empty() {
        return Err(Error::Usage("verification needs at least one sample".into()));
    }
    if options.engine == Engine::Onnxruntime {
        return verify_in_onnxruntime(float, quant, data, options);
    }
    let (lowered, lowering) = lower_with_notes(quant, !options.tract_quantized_kernels)?;
    let shapes = data.sample_shapes()?;

    let output_names = shared_outputs(float, &lowered)?;

    let mut layers = if options.per_layer {
        matched_layers(float, quant, &lowered)?
    } else {
        vec![]
    };
    let mut layers_note = None;
    let float_extra: Vec<String> = layers.iter().map(|l| l.name.clone()).collect();
    let quant_extra: Vec<String> = layers.iter().map(|l| l.quantized.clone()).collect();
    // The lowered model goes to tract by value: the f32 weights its lowering folded are freed
    // one by one as tract copies them (`Runner::from_model`).
    let runners = Runner::new(float, &shapes, &float_extra)
        .and_then(|f| Ok((f, Runner::from_model(lowered, &shapes, &quant_extra)?)));
    let (float_runner, quant_runner) = match runners {
        Ok(r) => r,
        Err(e) if !layers.is_empty() => {
            layers_note = Some(format!("per-layer comparison unavailable: {e}"));
            layers.clear();
            let float_runner = Runner::new(float, &shapes, &[])?;
            let (lowered, _) = lower_with_notes(quant, !options.tract_quantized_kernels)?;
            (float_runner, Runner::from_model(lowered, &shapes, &[])?)
        }
        Err(e) => return Err(e),
    };

    // Tensor pairs (float model, quantized model) to compare: outputs first, then layers.
    let mut tracked: Vec<(String, String)> = output_names.iter().map(|n| (n.clone(), n.clone())).collect();
    for l in &layers {
        let pair = (l.name.clone(), l.quantized.clone());
        if !tracked.contains(&pair) {
            tracked.push(pair);
        }
    }
    let position = |runner: &Runner, name: &str| runner.outputs.iter().position(|o| o == name);
    let slots: Vec<(usize, usize)> = tracked
        .iter()
        .map(
            |(f, q)| match (position(&float_runner, f), position(&quant_runner, q)) {
                (Some(f), Some(q)) => Ok((f, q)),
                (None, _) => Err(Error::Runtime(format!(
                    "tract did not return tensor '{f}' of the float model"
                ))),
                (_, None) => Err(Error::Runtime(format!(
                    "tract did not return tensor '{q}' of the quantized model"
                ))),
            },
        )
        .collect::<Result<_>>()?;

    // Which tracked pairs each tensor a runner returns belongs to.
    let mut float_pairs: Vec<Vec<usize>> = vec![Vec::new(); float_runner.outputs.len()];
    let mut quant_pairs: Vec<Vec<usize>> = vec![Vec::new(); quant_runner.outputs.len()];
    for (k, &(fs, qs)) in slots.iter().enumerate() {
        float_pairs[fs].push(k);
        quant_pairs[qs].push(k);
    }
    let run_sample = |i: usize| -> Result<Vec<SampleValue>> {
        let inputs: Vec<TValue> = data.sample(i)?;
        let label = |which: &str, e: Error| sample_error(data, i, which, e);
        if options.hold_samples {
            let f = float_runner.run(inputs.clone()).map_err(|e| label("float", e))?;
            let q = quant_runner.run(inputs).map_err(|e| label("quantized", e))?;
            return slots.iter().map(|&(fs, qs)| compare_tensors(&f[fs], &q[qs])).collect();
        }
        let runs = [
            float_runner.start(inputs.clone()).map_err(|e| label("float", e))?,
            quant_runner.start(inputs).map_err(|e| label("quantized", e))?,
        ];
        compare_in_lockstep(runs, [&float_pairs, &quant_pairs], slots.len())
            .map_err(|(side, e)| label(if side == 0 { "float" } else { "quantized" }, e))
    };

    // Each sample in flight runs both models; held mode holds every tracked tensor too.
    let mut per_sample = float_runner.sample_bytes()? + quant_runner.sample_bytes()?;
    if options.hold_samples {
        per_sample += float_runner.returned_bytes()? + quant_runner.returned_bytes()?;
    }
    let parallel = Parallelism::for_samples(per_sample);
    let progress = Progress::new("verifying", data.len() as u64, &parallel.describe());
    let totals = compare_samples(
        data,
        parallel.samples,
        &progress,
        &tracked,
        output_names.len(),
        run_sample,
    )?;

    build_report(
        Compared {
            samples: data.len(),
            output_names: &output_names,
            tracked: &tracked,
            totals: &totals,
            layers: &layers,
            layers_note,
            lowering,
            engine: Engine::Tract,
        },
        options,
    )
}

/// [`verify`] in ONNX Runtime: both models as they are (the quantized one with its own Q/DQ and
/// integer kernels, what users deploy). Layer by layer where ONNX Runtime keeps the tensors
/// ([`ort_layer_value`]): a tensor it keeps is asked for without changing what it fuses, and
/// the segments the runner cuts never split a Q/DQ group (`runtime::onnxruntime`).
fn verify_in_onnxruntime(
    float: &Model,
    quant: &Model,
    data: &DataSource,
    options: &VerifyOptions,
) -> Result<VerifyReport> {
    let output_names = shared_outputs(float, quant)?;
    let shapes = data.sample_shapes()?;
    let mut layers = Vec::new();
    let mut layers_note = None;
    // Tensor pairs (float model, quantized model) to compare, outputs first, and for each the
    // quantized tensor's dequantization (scale, zero point) when it is an integer one.
    let mut tracked: Vec<(String, String)> = output_names.iter().map(|n| (n.clone(), n.clone())).collect();
    let mut dequantize: Vec<Option<(f32, i64)>> = vec![None; tracked.len()];
    if options.per_layer {
        let kept = crate::runtime::onnxruntime::surviving_tensors(quant)?;
        let matched = matched_layers(float, quant, quant)?;
        let total = matched.len();
        let mut fused = Vec::new();
        for l in matched {
            match ort_layer_value(quant, &l.quantized, &kept) {
                Some((name, params)) => {
                    let pair = (l.name.clone(), name.clone());
                    if !tracked.contains(&pair) {
                        tracked.push(pair);
                        dequantize.push(params);
                    }
                    layers.push(Layer { quantized: name, ..l });
                }
                None => fused.push(l.name),
            }
        }
        if !fused.is_empty() {
            let shown: Vec<&str> = fused.iter().take(5).map(String::as_str).collect();
            layers_note = Some(format!(
                "{} of {total} layers not compared: ONNX Runtime's fusions remove their tensors ({}{})",
                fused.len(),
                shown.join(", "),
                if fused.len() > shown.len() { ", …" } else { "" }
            ));
        }
    }
    let float_extra: Vec<String> = layers.iter().map(|l| l.name.clone()).collect();
    let quant_extra: Vec<String> = tracked[output_names.len()..].iter().map(|(_, q)| q.clone()).collect();
    // The quantized model's outputs come from a session of the whole model: where the runner
    // cuts a graph into segments (for the layers' tensors), ONNX Runtime fuses float ops across
    // the cuts differently, and a quantized model turns that last-digit difference into other
    // roundings (ppocr_v3_det: 17.12 against 17.16 dB at the output, up to 0.5 dB on a layer).
    let float_runner = OrtRunner::new(float, &shapes, &float_extra)?;
    let quant_runner = OrtRunner::new(quant, &shapes, &[])?;
    let quant_layers = if quant_extra.is_empty() {
        None
    } else {
        Some(OrtRunner::new(quant, &shapes, &quant_extra)?)
    };
    let output_slots: Vec<usize> = output_names
        .iter()
        .map(|name| {
            quant_runner
                .outputs
                .iter()
                .position(|o| o == name)
                .ok_or_else(|| Error::internal(format!("ONNX Runtime was asked for no output '{name}'")))
        })
        .collect::<Result<_>>()?;
    let float_wanted: HashSet<&str> = tracked.iter().map(|(f, _)| f.as_str()).collect();
    // The tracked pairs each of the quantized model's layer tensors belongs to.
    let mut pairs_of: HashMap<&str, Vec<usize>> = HashMap::new();
    for (k, (_, q)) in tracked.iter().enumerate().skip(output_names.len()) {
        pairs_of.entry(q.as_str()).or_default().push(k);
    }
    let parallel = OrtRunner::samples_at_once();
    let progress = Progress::new(
        "verifying",
        data.len() as u64,
        &format!("onnxruntime, {parallel} samples at a time"),
    );
    // A sample's float tensors are held until the quantized model's arrive, each of which is
    // compared as its segment returns it and dropped.
    let run_sample = |i: usize| -> Result<Vec<SampleValue>> {
        let inputs: Vec<TValue> = data.sample(i)?;
        let label = |which: &str, e: Error| sample_error(data, i, which, e);
        let mut float_values: HashMap<String, Tensor> = HashMap::new();
        float_runner
            .run_visiting(inputs.clone(), |name, t| {
                if float_wanted.contains(name) && !float_values.contains_key(name) {
                    float_values.insert(name.to_string(), t.clone());
                }
                Ok(())
            })
            .map_err(|e| label("float", e))?;
        let float_value = |name: &str| {
            float_values
                .get(name)
                .ok_or_else(|| Error::internal(format!("ONNX Runtime returned no tensor '{name}' of the float model")))
        };
        let mut values: Vec<Option<SampleValue>> = (0..tracked.len()).map(|_| None).collect();
        let q = quant_runner.run(inputs.clone()).map_err(|e| label("quantized", e))?;
        for (k, &slot) in output_slots.iter().enumerate() {
            values[k] = Some(compare_tensors(float_value(&tracked[k].0)?, &q[slot])?);
        }
        drop(q);
        if let Some(runner) = &quant_layers {
            runner
                .run_visiting(inputs, |name, t| {
                    for &k in pairs_of.get(name).into_iter().flatten() {
                        let f = float_value(&tracked[k].0)?;
                        values[k] = Some(match dequantize[k] {
                            Some((scale, zero_point)) => compare_tensors(f, &dequantized(t, scale, zero_point)?)?,
                            None => compare_tensors(f, t)?,
                        });
                    }
                    Ok(())
                })
                .map_err(|e| label("quantized", e))?;
        }
        values
            .into_iter()
            .zip(&tracked)
            .map(|(v, (_, q))| {
                v.ok_or_else(|| {
                    Error::internal(format!("ONNX Runtime returned no tensor '{q}' of the quantized model"))
                })
            })
            .collect()
    };
    let totals = compare_samples(data, parallel, &progress, &tracked, output_names.len(), run_sample)?;
    build_report(
        Compared {
            samples: data.len(),
            output_names: &output_names,
            tracked: &tracked,
            totals: &totals,
            layers: &layers,
            layers_note,
            lowering: Vec::new(),
            engine: Engine::Onnxruntime,
        },
        options,
    )
}

/// The tensor of the quantized model that holds layer tensor `t` (as [`matched_layers`] names
/// it: a DequantizeLinear output, or the tensor itself) once ONNX Runtime has optimised the
/// model (`kept`): `t` itself when it is kept; else, for a DQ output, the integer tensor the DQ
/// reads when that is kept, with the DQ's scale and zero point (per tensor) to dequantize it.
/// None when neither is kept: a fusion removed them.
fn ort_layer_value(quant: &Model, t: &str, kept: &HashSet<String>) -> Option<(String, Option<(f32, i64)>)> {
    if kept.contains(t) {
        return Some((t.to_string(), None));
    }
    let g = &quant.graph;
    let dq = g
        .nodes
        .node_weights()
        .find(|n| n.op_type == "DequantizeLinear" && n.outputs.first().is_some_and(|o| o == t))?;
    let x = dq.inputs.first().filter(|x| kept.contains(x.as_str()))?;
    let scale = match crate::ir::tensor::values_f32(&g.constants.get(dq.inputs.get(1)?)?.tensor)?.as_slice() {
        [s] => *s,
        _ => return None,
    };
    let zero_point = match dq.inputs.get(2).filter(|z| !z.is_empty()) {
        Some(z) => match crate::ir::tensor::values_i128(&g.constants.get(z)?.tensor)?.as_slice() {
            [z] => i64::try_from(*z).ok()?,
            _ => return None,
        },
        None => 0,
    };
    Some((x.clone(), Some((scale, zero_point))))
}

/// An integer tensor's values dequantized as DequantizeLinear does: (q − zero_point)·scale in f32.
fn dequantized(q: &Tensor, scale: f32, zero_point: i64) -> Result<Tensor> {
    let values: Vec<f32> = to_f32_vec(q)?
        .into_iter()
        .map(|v| (v - zero_point as f32) * scale)
        .collect();
    Tensor::from_shape(q.shape(), &values).map_err(tract_error)
}

/// The float model's outputs, each of which the quantized model must have.
fn shared_outputs(float: &Model, quant: &Model) -> Result<Vec<String>> {
    let output_names: Vec<String> = float.graph.outputs.iter().map(|o| o.name().to_string()).collect();
    let quant_outputs: Vec<String> = quant.graph.outputs.iter().map(|o| o.name().to_string()).collect();
    for name in &output_names {
        if !quant_outputs.contains(name) {
            return Err(Error::Verification(format!(
                "the quantized model has no output '{name}' (its outputs: {})",
                quant_outputs.join(", ")
            )));
        }
    }
    Ok(output_names)
}

/// A run error of sample `i` of `data` in the `which` model, saying which.
fn sample_error(data: &DataSource, i: usize, which: &str, e: Error) -> Error {
    match e {
        Error::Runtime(m) => Error::Runtime(format!("{} ({which} model): {m}", data.sample_label(i))),
        other => other,
    }
}

/// Runs `run_sample` (each tracked pair's values of one sample) over every sample of `data`,
/// `parallel` at once, advancing `progress`, and sums each pair's values in sample order. A
/// mismatch is an error on an output (the first `outputs` pairs), and leaves a layer out.
fn compare_samples(
    data: &DataSource,
    parallel: usize,
    progress: &Progress,
    tracked: &[(String, String)],
    outputs: usize,
    run_sample: impl Fn(usize) -> Result<Vec<SampleValue>> + Sync,
) -> Result<Vec<Totals>> {
    let mut totals: Vec<Totals> = vec![Totals::default(); tracked.len()];
    let run_and_count = |i: usize| {
        let values = run_sample(i);
        progress.advance(1);
        values
    };
    run_samples(data.len(), parallel, run_and_count, |i, values| {
        for (k, value) in values.into_iter().enumerate() {
            if let Err(m) = totals[k].add(value) {
                if k < outputs {
                    return Err(Error::Verification(format!(
                        "output '{}', {}: {m}",
                        tracked[k].0,
                        data.sample_label(i)
                    )));
                }
            }
        }
        Ok(())
    })?;
    progress.finish();
    Ok(totals)
}

/// What a comparison run measured, for [`build_report`].
struct Compared<'a> {
    samples: usize,
    output_names: &'a [String],
    /// The compared pairs (float model's tensor, quantized model's): the outputs, then layers.
    tracked: &'a [(String, String)],
    totals: &'a [Totals],
    layers: &'a [Layer],
    layers_note: Option<String>,
    lowering: Vec<String>,
    engine: Engine,
}

/// The report of a comparison: each output's metrics against the thresholds, each layer's.
fn build_report(c: Compared<'_>, options: &VerifyOptions) -> Result<VerifyReport> {
    let Compared {
        samples,
        output_names,
        tracked,
        totals,
        layers,
        layers_note,
        lowering,
        engine,
    } = c;
    let by_pair: HashMap<(&str, &str), &Totals> = tracked
        .iter()
        .map(|(f, q)| (f.as_str(), q.as_str()))
        .zip(totals)
        .collect();
    let mut outputs = Vec::new();
    let mut failures = Vec::new();
    for name in output_names {
        let t = by_pair[&(name.as_str(), name.as_str())];
        let comparison = match &t.kind {
            Kind::Float(ft) => Comparison::Float(FloatMetrics::of(ft)),
            Kind::Integer(it) => Comparison::Integer(IntegerMetrics {
                equal_fraction: it.equal_fraction(),
                elements: it.elements,
                samples_equal: it.samples_equal,
            }),
            Kind::Empty | Kind::Skipped(_) => unreachable!("output mismatches are errors"),
        };
        let mut check = |metric: &str, value: Option<f64>, threshold: Option<f64>| {
            if let (Some(v), Some(th)) = (value, threshold) {
                // NaN fails.
                if v.is_nan() || v < th {
                    failures.push(Failure {
                        output: name.clone(),
                        metric: metric.into(),
                        value: v,
                        threshold: th,
                    });
                }
            }
        };
        match &comparison {
            Comparison::Float(m) => {
                check("sqnr_db", Some(m.sqnr_db), options.min_sqnr_db);
                check("cosine", Some(m.cosine), options.min_cosine);
                check("top1_agreement", m.top1_agreement, options.min_top1_agreement);
            }
            Comparison::Integer(m) => check("equal_fraction", Some(m.equal_fraction), options.min_equal_fraction),
        }
        outputs.push(OutputReport {
            name: name.clone(),
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
            samples: t.samples(),
            comparison,
        });
    }

    let mut layer_reports = Vec::new();
    let mut layers_skipped = Vec::new();
    for layer in layers {
        let t = by_pair[&(layer.name.as_str(), layer.quantized.as_str())];
        let name = layer.name.clone();
        match &t.kind {
            Kind::Float(ft) => {
                let sqnr = ft.sqnr_db();
                layer_reports.push(LayerReport {
                    name,
                    op_type: layer.op_type.clone(),
                    quantized: layer.quantized.clone(),
                    sqnr_db: sqnr,
                    identical: sqnr == f64::INFINITY,
                    cosine: ft.cosine_mean(),
                    max_abs_err: ft.max_abs,
                })
            }
            Kind::Integer(_) => layers_skipped.push(SkippedLayer {
                name,
                reason: format!("{} tensor (not compared)", t.dtype),
            }),
            Kind::Skipped(reason) => layers_skipped.push(SkippedLayer {
                name,
                reason: reason.clone(),
            }),
            Kind::Empty => {}
        }
    }
    let first_drop = layer_reports
        .iter()
        .find(|l| l.sqnr_db.is_nan() || l.sqnr_db < options.layer_floor_db)
        .map(|l| l.name.clone());

    Ok(VerifyReport {
        samples,
        passed: failures.is_empty(),
        thresholds: options.clone(),
        failures,
        outputs,
        layers: layer_reports,
        first_drop,
        layers_skipped,
        layers_note,
        lowering,
        engine,
    })
}

/// Ops whose outputs are integers (or bools): shape arithmetic, indices, comparisons.
const INTEGER_OPS: &[&str] = &[
    "Shape",
    "Size",
    "NonZero",
    "ArgMax",
    "ArgMin",
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "Not",
    "And",
    "Or",
    "Xor",
    "IsNaN",
    "IsInf",
];

/// Ops whose output has the element type of their first input (for the integer heuristic).
const TYPE_PRESERVING_OPS: &[&str] = &[
    "Gather",
    "Concat",
    "Unsqueeze",
    "Squeeze",
    "Slice",
    "Reshape",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Identity",
    "ReduceProd",
    "ReduceSum",
    "Expand",
    "Range",
    "Min",
    "Max",
    "Neg",
    "Abs",
    "Tile",
    "Transpose",
    "Flatten",
];

/// Runs the float (`runs[0]`) and the quantized (`runs[1]`) model on one sample node by node,
/// comparing each tracked pair as soon as both have produced it; `pairs[side][index]` lists the
/// pairs a tensor a side returns belongs to. The side holding fewer bytes of tensors the other
/// has not produced yet runs next (the float one on ties), so what is held is where the two
/// evaluation orders diverge, not a sample's tensors of both models. Errors say which side.
fn compare_in_lockstep(
    mut runs: [Stepping<'_>; 2],
    pairs: [&[Vec<usize>]; 2],
    count: usize,
) -> std::result::Result<Vec<SampleValue>, (usize, Error)> {
    let mut values: Vec<Option<SampleValue>> = (0..count).map(|_| None).collect();
    // held[side]: pair → the tensor that side produced and the other has not yet, and its bytes.
    let mut held: [HashMap<usize, TValue>; 2] = Default::default();
    let mut held_bytes = [0usize; 2];
    let mut more = [true, true];
    while more[0] || more[1] {
        let side = usize::from(!more[0] || (more[1] && held_bytes[1] < held_bytes[0]));
        let other = 1 - side;
        let [float_held, quant_held] = &mut held;
        let (mine, theirs) = if side == 0 {
            (float_held, quant_held)
        } else {
            (quant_held, float_held)
        };
        let (mut mine_bytes, mut theirs_bytes) = (held_bytes[side], held_bytes[other]);
        let stepped = runs[side].step(|index, value| {
            for &k in &pairs[side][index] {
                match theirs.remove(&k) {
                    Some(counterpart) => {
                        theirs_bytes -= tensor_bytes(&counterpart);
                        let (f, q) = if side == 0 {
                            (value, &counterpart)
                        } else {
                            (&counterpart, value)
                        };
                        values[k] = Some(compare_tensors(f, q)?);
                    }
                    None => {
                        mine_bytes += tensor_bytes(value);
                        mine.insert(k, value.clone());
                    }
                }
            }
            Ok(())
        });
        more[side] = stepped.map_err(|e| (side, e))?;
        held_bytes[side] = mine_bytes;
        held_bytes[other] = theirs_bytes;
    }
    values
        .into_iter()
        .enumerate()
        .map(|(k, v)| {
            v.ok_or_else(|| {
                (
                    0,
                    Error::internal(format!("tracked tensor pair {k} was not produced by both models")),
                )
            })
        })
        .collect()
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.len() * t.datum_type().size_of()
}

/// A layer to compare: a float tensor and the quantized model's tensor standing for it.
struct Layer {
    name: String,
    op_type: String,
    quantized: String,
}

/// The tensors to compare layer by layer: node outputs of the float model that a node of the
/// quantized model also produces, that depend on a runtime input and are not obviously integers,
/// in the float model's topological order, with the float op producing them. In the quantized
/// model a tensor quantized by QuantizeLinear → DequantizeLinear is represented by the DQ output
/// (the first such pair in node order): the value the next layers actually read, and the only
/// right one when a quantizer dropped an activation into the Q range (ONNX Runtime's QDQ
/// quantizer removes a Relu after Conv and gives its output name to the Conv, the Q clipping
/// at zero in its place).
fn matched_layers(float: &Model, quant: &Model, lowered: &Model) -> Result<Vec<Layer>> {
    use crate::proto::type_proto::Value;
    let lowered_produced: HashSet<&str> = lowered
        .graph
        .nodes
        .node_weights()
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .filter(|o| !o.is_empty())
        .collect();
    let qg = &quant.graph;
    let quant_produced: HashSet<&str> = qg
        .nodes
        .node_weights()
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .filter(|o| !o.is_empty())
        .collect();
    let qdq_op = |ix: petgraph::stable_graph::NodeIndex, op: &str| {
        let n = &qg.nodes[ix];
        n.op_type == op && matches!(n.domain.as_str(), "" | "ai.onnx" | "com.microsoft")
    };
    // First reader (in node order) of each tensor as input 0, among Q nodes and among DQ nodes.
    let mut first_reader: HashMap<(&str, &str), petgraph::stable_graph::NodeIndex> = HashMap::new();
    for ix in qg.nodes.node_indices() {
        for op in ["QuantizeLinear", "DequantizeLinear"] {
            if let Some(input) = qg.nodes[ix].inputs.first().filter(|_| qdq_op(ix, op)) {
                let slot = first_reader.entry((input.as_str(), op)).or_insert(ix);
                if qg.nodes[ix].order < qg.nodes[*slot].order {
                    *slot = ix;
                }
            }
        }
    }
    let dequantized = |t: &str| -> Option<String> {
        let q = first_reader.get(&(t, "QuantizeLinear"))?;
        let y = qg.nodes[*q].outputs.first()?;
        let dq = first_reader.get(&(y.as_str(), "DequantizeLinear"))?;
        qg.nodes[*dq]
            .outputs
            .first()
            .filter(|o| lowered_produced.contains(o.as_str()))
            .cloned()
    };
    let g = &float.graph;
    let mut declared: BTreeMap<&str, i32> = BTreeMap::new();
    for v in g.inputs.iter().chain(&g.value_info).chain(&g.outputs) {
        if let Some(Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            if t.elem_type() != 0 {
                declared.insert(v.name(), t.elem_type());
            }
        }
    }
    let is_float_type = |t: i32| crate::ir::tensor::is_float(t);
    // dynamic: depends on a runtime input; integer: known or guessed to hold integers.
    let mut dynamic: HashSet<String> = g.runtime_inputs().map(|i| i.name().to_string()).collect();
    let mut integer: HashSet<String> = g
        .runtime_inputs()
        .filter(|i| declared.get(i.name()).is_some_and(|&t| !is_float_type(t)))
        .map(|i| i.name().to_string())
        .collect();
    let const_is_int = |name: &str| {
        g.constants
            .get(name)
            .is_some_and(|c| !is_float_type(c.tensor.data_type()))
    };
    let mut layers = Vec::new();
    for ix in g.topological_order()? {
        let n = &g.nodes[ix];
        let is_dynamic = n
            .inputs
            .iter()
            .chain(&n.implicit_inputs)
            .any(|i| dynamic.contains(i.as_str()));
        for (slot, o) in n.outputs.iter().enumerate() {
            if o.is_empty() {
                continue;
            }
            let is_integer = match declared.get(o.as_str()) {
                Some(&t) => !is_float_type(t),
                None if !n.is_default_domain() => false,
                None => match n.op_type.as_str() {
                    op if INTEGER_OPS.contains(&op) => true,
                    "TopK" => slot == 1,
                    "MaxPool" => slot == 1,
                    "Cast" => n.attribute("to").is_some_and(|a| !is_float_type(a.i() as i32)),
                    "ConstantOfShape" => n
                        .attribute("value")
                        .and_then(|a| a.t.as_ref())
                        .is_some_and(|t| !is_float_type(t.data_type())),
                    op if TYPE_PRESERVING_OPS.contains(&op) => n
                        .inputs
                        .first()
                        .is_some_and(|i| integer.contains(i.as_str()) || const_is_int(i)),
                    _ => false,
                },
            };
            if is_dynamic {
                dynamic.insert(o.clone());
            }
            if is_integer {
                integer.insert(o.clone());
            }
            if is_dynamic && !is_integer && quant_produced.contains(o.as_str()) {
                let quantized = dequantized(o).unwrap_or_else(|| o.clone());
                if lowered_produced.contains(quantized.as_str()) {
                    layers.push(Layer {
                        name: o.clone(),
                        op_type: n.op_type.clone(),
                        quantized,
                    });
                }
            }
        }
    }
    Ok(layers)
}

/// One sample of one tensor, reduced.
enum SampleValue {
    Float {
        sums: FloatSums,
        shape: Vec<usize>,
        dtype: DatumType,
    },
    Integer {
        equal: u64,
        elements: u64,
        shape: Vec<usize>,
        dtype: DatumType,
    },
    Mismatch(String),
}

/// `act` on a tensor's values as f32, without a copy when they are f32 already.
fn with_f32<R>(t: &Tensor, act: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.datum_type() == DatumType::F32 {
        let view = t.try_as_plain_ram().map_err(tract_error)?;
        Ok(act(view.as_slice::<f32>().map_err(tract_error)?))
    } else {
        Ok(act(&to_f32_vec(t)?))
    }
}

fn compare_tensors(f: &Tensor, q: &Tensor) -> Result<SampleValue> {
    if f.shape() != q.shape() {
        return Ok(SampleValue::Mismatch(format!(
            "shapes differ: float model {:?}, quantized model {:?}",
            f.shape(),
            q.shape()
        )));
    }
    let (fd, qd) = (f.datum_type(), q.datum_type());
    if fd.is_float() && qd.is_float() {
        let sums = with_f32(f, |fv| with_f32(q, |qv| FloatSums::of(fv, qv, f.shape())))??;
        return Ok(SampleValue::Float {
            sums,
            shape: f.shape().to_vec(),
            dtype: fd,
        });
    }
    if !fd.is_float() && !qd.is_float() {
        let as_i64 = |t: &Tensor| -> Option<Vec<i64>> {
            let t = t.cast_to::<i64>().ok()?;
            let v = t.to_plain_array_view::<i64>().ok()?.iter().copied().collect();
            Some(v)
        };
        if let (Some(fv), Some(qv)) = (as_i64(f), as_i64(q)) {
            let equal = fv.iter().zip(&qv).filter(|(a, b)| a == b).count() as u64;
            return Ok(SampleValue::Integer {
                equal,
                elements: fv.len() as u64,
                shape: f.shape().to_vec(),
                dtype: fd,
            });
        }
        return Ok(SampleValue::Mismatch(format!("{fd:?} values cannot be compared")));
    }
    Ok(SampleValue::Mismatch(format!(
        "element types differ: float model {fd:?}, quantized model {qd:?}"
    )))
}

#[derive(Clone, Debug, Default)]
enum Kind {
    #[default]
    Empty,
    Float(FloatTotals),
    Integer(IntegerTotals),
    /// Not comparable (reason, with the sample).
    Skipped(String),
}

#[derive(Clone, Debug, Default)]
struct Totals {
    kind: Kind,
    /// The first sample's shape and dtype.
    shape: Vec<usize>,
    dtype: String,
}

fn datum_name(dt: DatumType) -> String {
    match dt {
        DatumType::F32 => "f32".into(),
        DatumType::F64 => "f64".into(),
        DatumType::F16 => "f16".into(),
        DatumType::I64 => "i64".into(),
        DatumType::I32 => "i32".into(),
        DatumType::I16 => "i16".into(),
        DatumType::I8 => "i8".into(),
        DatumType::U8 => "u8".into(),
        DatumType::U16 => "u16".into(),
        DatumType::U32 => "u32".into(),
        DatumType::U64 => "u64".into(),
        DatumType::Bool => "bool".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

impl Totals {
    fn samples(&self) -> usize {
        match &self.kind {
            Kind::Float(t) => t.samples,
            Kind::Integer(t) => t.samples,
            _ => 0,
        }
    }

    /// Adds one sample; Err(reason) when it cannot be compared (the tensor is then skipped).
    fn add(&mut self, v: SampleValue) -> std::result::Result<(), String> {
        if let Kind::Skipped(reason) = &self.kind {
            return Err(reason.clone());
        }
        let first = matches!(self.kind, Kind::Empty);
        let result = match v {
            SampleValue::Float { sums, shape, dtype } => {
                if first {
                    self.kind = Kind::Float(FloatTotals::default());
                    self.shape = shape;
                    self.dtype = datum_name(dtype);
                }
                match &mut self.kind {
                    Kind::Float(t) => {
                        t.add(&sums);
                        Ok(())
                    }
                    _ => Err("float in one sample, integer in another".to_string()),
                }
            }
            SampleValue::Integer {
                equal,
                elements,
                shape,
                dtype,
            } => {
                if first {
                    self.kind = Kind::Integer(IntegerTotals::default());
                    self.shape = shape;
                    self.dtype = datum_name(dtype);
                }
                match &mut self.kind {
                    Kind::Integer(t) => {
                        t.add(equal, elements);
                        Ok(())
                    }
                    _ => Err("integer in one sample, float in another".to_string()),
                }
            }
            SampleValue::Mismatch(m) => Err(m),
        };
        if let Err(m) = &result {
            self.kind = Kind::Skipped(m.clone());
        }
        result
    }
}

fn fmt_db(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "inf".into()
    } else if v == f64::NEG_INFINITY {
        "-inf".into()
    } else {
        format!("{v:.2}")
    }
}

fn fmt_err(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else {
        format!("{v:.3e}")
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "verification on {} sample{} in {}: {}",
            self.samples,
            if self.samples == 1 { "" } else { "s" },
            self.engine.name(),
            if self.passed() { "passed" } else { "FAILED" }
        )?;
        if !self.lowering.is_empty() {
            writeln!(
                f,
                "  ({} node{} of the quantized model rewritten as exact float arithmetic for tract)",
                self.lowering.len(),
                if self.lowering.len() == 1 { "" } else { "s" }
            )?;
        }
        let width = self
            .outputs
            .iter()
            .map(|o| o.name.chars().count())
            .chain(std::iter::once(6))
            .max()
            .unwrap_or(6)
            .min(48);
        writeln!(f)?;
        writeln!(
            f,
            "{:<width$}  {:>5}  {:>9}  {:>9}  {:>11}  top-1",
            "output", "type", "SQNR dB", "cosine", "max |err|"
        )?;
        for o in &self.outputs {
            match &o.comparison {
                Comparison::Float(m) => {
                    let top1 = match (m.top1_agreement, m.top1_rows) {
                        (Some(a), Some(r)) => format!("{:.2}% of {r} row{}", a * 100.0, if r == 1 { "" } else { "s" }),
                        _ => "-".into(),
                    };
                    writeln!(
                        f,
                        "{:<width$}  {:>5}  {:>9}  {:>9.6}  {:>11}  {top1}",
                        o.name,
                        o.dtype,
                        fmt_db(m.sqnr_db),
                        m.cosine,
                        fmt_err(m.max_abs_err)
                    )?;
                }
                Comparison::Integer(m) => writeln!(
                    f,
                    "{:<width$}  {:>5}  exact: {:.2}% of elements equal, {}/{} samples identical",
                    o.name,
                    o.dtype,
                    m.equal_fraction * 100.0,
                    m.samples_equal,
                    o.samples
                )?,
            }
        }
        writeln!(f)?;
        if let Some(note) = &self.layers_note {
            writeln!(f, "layers: {note}")?;
        }
        if self.layers.is_empty() {
            if self.layers_note.is_none() {
                writeln!(f, "layers: none compared")?;
            }
        } else {
            writeln!(
                f,
                "layers: {} tensor{} of the float model compared in topological order",
                self.layers.len(),
                if self.layers.len() == 1 { "" } else { "s" }
            )?;
            let floor = self.thresholds.layer_floor_db;
            match self.first_drop.as_deref().and_then(|n| self.layer(n)) {
                Some(l) => writeln!(
                    f,
                    "  first below {floor} dB: {} ({}) at {} dB",
                    l.name,
                    l.op_type,
                    fmt_db(l.sqnr_db)
                )?,
                None => writeln!(f, "  none below {floor} dB")?,
            }
            writeln!(f, "  worst:")?;
            writeln!(f, "    {:>9}  {:>9}  {:>11}  layer", "SQNR dB", "cosine", "max |err|")?;
            for l in self.worst_layers(5) {
                writeln!(
                    f,
                    "    {:>9}  {:>9.6}  {:>11}  {} ({})",
                    fmt_db(l.sqnr_db),
                    l.cosine,
                    fmt_err(l.max_abs_err),
                    l.name,
                    l.op_type
                )?;
            }
        }
        let t = &self.thresholds;
        let mut set = Vec::new();
        if let Some(v) = t.min_sqnr_db {
            set.push(format!("SQNR ≥ {v} dB"));
        }
        if let Some(v) = t.min_cosine {
            set.push(format!("cosine ≥ {v}"));
        }
        if let Some(v) = t.min_top1_agreement {
            set.push(format!("top-1 agreement ≥ {v}"));
        }
        if let Some(v) = t.min_equal_fraction {
            set.push(format!("integer outputs equal ≥ {v}"));
        }
        writeln!(f)?;
        if set.is_empty() {
            writeln!(f, "thresholds: none set")?;
        } else {
            writeln!(f, "thresholds: {}", set.join(", "))?;
        }
        for failure in &self.failures {
            writeln!(f, "  FAILED {failure}")?;
        }
        Ok(())
    }
}
