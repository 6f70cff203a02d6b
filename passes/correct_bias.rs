//! `correct_bias`: bias correction (Nagel et al., "Data-Free Quantization Through Weight
//! Equalization and Bias Correction", ICCV 2019, §4.3). Quantizing a weight `W` to `W̃` shifts
//! the expected layer output by `E[(W̃ − W)·x] = (W̃ − W)·E[x]`, a per-output-channel bias error
//! that does not average out; subtracting it from the bias removes it.
//!
//! Maths. Per output channel `o`: `Δb_o = Σ_{c,k} (W̃ − W)[o, c, k]·E[x_c]`, summed over the input
//! channels `c` of `o`'s group and the kernel taps `k`, and the bias becomes `b − Δb`:
//! - Conv, W `[C_out, C_in/group, k…]`. At zero-padded borders some taps read 0, not `E[x_c]`;
//!   one bias per channel can only remove the shift averaged over output positions, so when the
//!   statistics know the input's spatial size, tap `k` is weighted by the fraction `f_k` of
//!   output positions where it reads inside the input (per spatial axis, from strides, pads,
//!   dilations; product over axes): `Δb_o = Σ (W̃ − W)[o, c, k]·f_k·E[x_c]`. On small feature
//!   maps (3×12 in ppocr's last stages) this matters: a 3×3 tap row reads padding in a third of
//!   the rows. Without the size (data-free statistics) `f_k = 1`: borders are ignored;
//! - ConvTranspose, W `[C_in, C_out/group, k…]`: with strides `s`, an output pixel receives one
//!   tap in `Πs` on average (the taps split over the `Πs` output phases), so
//!   `Δb_o = Σ (W̃ − W)·E[x] / Πs` — exact for stride 1, the phase average otherwise;
//! - Gemm `Y = alpha·A·B' + beta·C` with `transA = 0` (the features of A on axis 1): `Δ_n =
//!   alpha·Σ_k (B̃' − B')[k, n]·E[a_k]` and `C_n ← C_n − Δ_n / beta`.
//!
//! `W̃` is the weight fake-quantized exactly as the plan quantizes it (`params::quantize_weights`
//! with the plan's scheme and axis, rounding half to even). A layer without a bias gets one,
//! `<weight>::bias`, starting at 0.
//!
//! `E[x_c]`, by mode (option `mode: empirical | analytical`; by default empirical when the
//! statistics come from calibration data, analytical in data-free mode):
//! - `empirical`: the per-channel (axis 1) mean of the layer input in the calibration statistics;
//! - `analytical` (§4.3): the layer input is `f(z)` with `z ~ N(β_c, γ_c²)` from the BatchNorm
//!   record of the layer that produced it (`fold_batchnorm`, kept up to date by `equalize` and
//!   `absorb_bias`), and `f` the activation between them: identity → `β`; Relu →
//!   `E[max(0, z)] = β·Φ(β/|γ|) + |γ|·φ(β/|γ|)`; Clip(a, b) (ReLU6) → the doubly clipped normal
//!   `a·Φ(α) + b·(1 − Φ(β')) + μ·(Φ(β') − Φ(α)) + σ·(φ(α) − φ(β'))`, `α = (a − μ)/σ`,
//!   `β' = (b − μ)/σ`; HardSwish (the op, or `x·Clip(x + 3, 0, 6)/6`) → `E[hardswish(z)]` by
//!   numerical integration (no closed form), and the per-channel forms `equalize` writes
//!   (`x·HardSigmoid(s·x)`, or the Add reading `s·x`) → `E[hardswish(s·z)]/s`. A zero Pad just
//!   before the layer is looked through.
//!   Any other activation, or an input without a record, skips the layer.
//!
//! A plan pass: it runs after planning, in the order the config lists it (after `gptq` to
//! correct the mean shift of the roundings gptq chose). Changing a bias then is safe: the plan's
//! int32 bias quantization reads the bias values at materialisation, and activation ranges move
//! by about `Δb`, a fraction of a quantization step. A bias [`apply`] creates is not in that
//! plan: the pass re-plans (same statistics) so it is quantized too.
//!
//! Skipped, with the reason: MatMul (it has no bias input, and an Add written after planning
//! would change the tensor names the plan is keyed by), Gemm with `transA = 1` (its features are
//! on axis 0, the statistics' channels on axis 1), a bias that is shared, a graph input, not f32
//! or not one value per output channel, and a mode whose `E[x]` is not available for the input.

use std::collections::BTreeMap;

use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;

use super::equalize::{Kind, Layout};
use super::hardswish::exported_hardswish;
use super::rewritable::f32_tensor;
use super::{Context, Pass};
use crate::calib::stats::CalibrationStats;
use crate::error::{Error, Result};
use crate::ir::dump::fmt_float;
use crate::ir::ops::{self, AutoPad};
use crate::ir::tensor;
use crate::ir::BatchNormRecord;
use crate::ir::{Constant, ConstantOrigin, Graph, Model, Node};
use crate::proto::tensor_proto::DataType;
use crate::proto::TensorProto;
use crate::quant::plan::Plan;

/// How `E[x]` is obtained (the pass option `mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasCorrectionMode {
    /// Empirical when the statistics come from data, analytical in data-free mode.
    #[default]
    Auto,
    Empirical,
    Analytical,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    pub mode: BiasCorrectionMode,
}

#[derive(Default)]
pub struct CorrectBias {
    options: Options,
}

impl Pass for CorrectBias {
    fn name(&self) -> &'static str {
        "correct_bias"
    }

    fn configure(&mut self, options: &serde_yaml::Value) -> std::result::Result<(), String> {
        self.options = super::parse_options("correct_bias", options)?;
        Ok(())
    }

    fn phase(&self) -> super::Phase {
        super::Phase::Plan
    }

    /// Corrects the biases against the current plan, then re-plans (same statistics) so the
    /// biases it created get int32 quantization too; roundings and scales chosen earlier (`gptq`,
    /// `easyquant`) and the layers' precisions (`mixed_precision`) are kept.
    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        let (Some(plan), Some(stats), Some(options)) =
            (ctx.plan.as_mut(), ctx.stats.as_ref(), ctx.plan_options.as_ref())
        else {
            return Err(Error::internal("correct_bias ran before the plan"));
        };
        let notes = apply(model, plan, Some(stats), self.options.mode, &ctx.batchnorm_records)?;
        let precisions = std::mem::take(&mut plan.precisions);
        let before = std::mem::replace(plan, crate::quant::plan::build_plan(model, stats, options)?);
        plan.keep_choices(&before);
        if !precisions.is_empty() {
            *plan = plan.with_precisions(&precisions);
        }
        Ok(notes)
    }
}

fn mode_name(mode: BiasCorrectionMode) -> &'static str {
    match mode {
        BiasCorrectionMode::Auto => "auto",
        BiasCorrectionMode::Empirical => "empirical",
        BiasCorrectionMode::Analytical => "analytical",
    }
}

// ---------------------------------------------------------------------------------------------
// find

/// Where a layer's output and input channels sit in its weight.
#[derive(Clone, Debug, PartialEq)]
pub enum Geometry {
    /// Conv (any group) and Gemm: equalize's layouts.
    Layout(Layout),
    /// ConvTranspose, W `[C_in, C_out/group, k…]`, with the product of its strides.
    ConvTranspose {
        dims: Vec<usize>,
        group: usize,
        stride_product: usize,
    },
}

impl Geometry {
    pub fn out_channels(&self) -> usize {
        match self {
            Geometry::Layout(l) => l.out_channels(),
            Geometry::ConvTranspose { dims, group, .. } => dims[1] * group,
        }
    }
    pub fn in_channels(&self) -> usize {
        match self {
            Geometry::Layout(l) => l.in_channels(),
            Geometry::ConvTranspose { dims, .. } => dims[0],
        }
    }
    /// Taps an output pixel receives, relative to all taps (1, or `1/Πs` for ConvTranspose).
    fn tap_fraction(&self) -> f64 {
        match self {
            Geometry::Layout(_) => 1.0,
            Geometry::ConvTranspose { stride_product, .. } => 1.0 / (*stride_product).max(1) as f64,
        }
    }
    /// `(output channel, input channel)` of every weight element, in order.
    fn channels_of_elements(&self) -> Vec<(usize, usize)> {
        let n: usize = match self {
            Geometry::Layout(l) => l.dims.iter().product(),
            Geometry::ConvTranspose { dims, .. } => dims.iter().product(),
        };
        match self {
            Geometry::Layout(l) => l.channels().collect(),
            Geometry::ConvTranspose { dims, group, .. } => {
                let inner: usize = dims[2..].iter().product();
                let per_group_in = dims[0] / group;
                (0..n)
                    .map(|e| {
                        let i = e / (dims[1] * inner);
                        let j = (e / inner) % dims[1];
                        ((i / per_group_in) * dims[1] + j, i)
                    })
                    .collect()
            }
        }
    }
}

/// A layer whose bias is corrected.
#[derive(Clone, Debug)]
struct Target {
    node: NodeIndex,
    label: String,
    input: String,
    weight: String,
    bias: Option<String>,
    geometry: Geometry,
    /// Gemm's alpha / beta (1 otherwise): the bias moves by `alpha·Δ/beta`.
    bias_factor: f64,
    /// Conv: the kernel's spatial dims, for the border weights.
    kernel: Vec<usize>,
}

/// The layers the plan quantizes a weight of, in topological order: a target, or the reason it
/// is skipped.
fn find_targets(graph: &Graph, plan: &Plan) -> Result<Vec<std::result::Result<Target, (String, String)>>> {
    Ok(plan
        .weighted_layers(graph)?
        .into_iter()
        .map(|(ix, weight)| read_target(graph, ix, weight).map_err(|r| (graph.nodes[ix].label(), r)))
        .collect())
}

fn read_target(graph: &Graph, ix: NodeIndex, weight: &str) -> std::result::Result<Target, String> {
    let n = &graph.nodes[ix];
    let wt = &graph.constants[weight].tensor;
    let dims: Vec<usize> = wt.dims.iter().map(|&d| d.max(0) as usize).collect();
    let bad_shape = || format!("weight '{weight}' of shape {dims:?} does not fit a {}", n.op_type);
    let mut bias_factor = 1.0;
    let geometry = match n.op_type.as_str() {
        "MatMul" => {
            return Err(
                "MatMul has no bias input (an Add written after planning would change the tensor names the plan is keyed by)"
                    .into(),
            )
        }
        "Conv" | "ConvTranspose" => {
            let conv = ops::Conv::view(n)?;
            let group = conv.group;
            if dims.len() < 3 || !dims[0].is_multiple_of(group) {
                return Err(bad_shape());
            }
            let rank = dims.len() - 2;
            if conv.transposed {
                Geometry::ConvTranspose {
                    dims: dims.clone(),
                    group,
                    stride_product: conv.strides(rank)?.iter().product(),
                }
            } else {
                // The lists `conv_taps` reads: a malformed one is a reason here, not a silent
                // "borders ignored" there.
                conv.strides(rank)?;
                conv.dilations(rank)?;
                if conv.auto_pad == AutoPad::NotSet {
                    conv.pads(rank)?;
                }
                Geometry::Layout(Layout {
                    kind: Kind::Conv { group },
                    dims: dims.clone(),
                })
            }
        }
        _ => {
            let gemm = ops::Gemm::view(n)?;
            if gemm.trans_a {
                return Err("Gemm with transA = 1: the features of A are on axis 0, the statistics' channels on axis 1".into());
            }
            if dims.len() != 2 {
                return Err(bad_shape());
            }
            if gemm.beta == 0.0 {
                return Err("Gemm with beta = 0 ignores its C".into());
            }
            bias_factor = gemm.alpha as f64 / gemm.beta as f64;
            Geometry::Layout(Layout {
                kind: Kind::Gemm { trans_b: gemm.trans_b },
                dims: dims.clone(),
            })
        }
    };
    if tensor::element_count(wt) != dims.iter().product::<usize>() as u64 {
        return Err(format!("weight '{weight}' has a bad element count"));
    }
    let bias = n.inputs.get(2).filter(|b| !b.is_empty()).cloned();
    if let Some(b) = &bias {
        if graph.inputs.iter().any(|i| i.name() == b) {
            return Err(format!("bias '{b}' is a graph input (a runtime may override it)"));
        }
        let Some(c) = graph.constants.get(b) else {
            return Err(format!("bias '{b}' is not a constant"));
        };
        if c.tensor.data_type() != DataType::Float as i32 {
            return Err(format!("bias '{b}' is not f32"));
        }
        let readers = graph.consumers(b);
        if readers.len() != 1 || graph.outputs.iter().any(|o| o.name() == b) {
            return Err(format!(
                "bias '{b}' is shared (another reader would see the correction)"
            ));
        }
        let channels = geometry.out_channels() as i64;
        if c.tensor.dims != [channels] && !(n.op_type == "Gemm" && c.tensor.dims == [1, channels]) {
            return Err(format!(
                "bias '{b}' of shape {:?} does not hold one value per output channel ({channels})",
                c.tensor.dims
            ));
        }
    }
    Ok(Target {
        node: ix,
        label: n.label(),
        input: n.inputs[0].clone(),
        weight: weight.to_string(),
        bias,
        geometry,
        bias_factor,
        kernel: if n.op_type == "Conv" {
            dims[2..].to_vec()
        } else {
            vec![]
        },
    })
}

/// `E[x_c]` of a layer input from the calibration statistics (per-channel means along axis 1).
fn empirical_mean(stats: &CalibrationStats, input: &str, channels: usize) -> std::result::Result<Vec<f64>, String> {
    let st = stats
        .tensors
        .get(input)
        .ok_or_else(|| format!("no statistics for its input '{input}'"))?;
    let ch = st
        .channels
        .as_ref()
        .filter(|c| c.count_per_channel > 0)
        .ok_or_else(|| format!("no per-channel statistics for its input '{input}'"))?;
    if ch.channels() != channels {
        return Err(format!(
            "its input '{input}' has {} channels on axis 1, the weight expects {channels}",
            ch.channels()
        ));
    }
    Ok(ch.mean())
}

/// `E[x_c]` of a layer input from the BatchNorm record of the layer before, through the
/// activation between them.
fn analytical_mean(
    graph: &Graph,
    records: &[BatchNormRecord],
    input: &str,
    channels: usize,
) -> std::result::Result<Vec<f64>, String> {
    let record_of = |t: &str| records.iter().find(|r| r.output == t);
    let producer_of = |t: &str| {
        graph
            .nodes
            .node_indices()
            .map(|ix| &graph.nodes[ix])
            .find(|n| n.outputs.iter().any(|o| o == t))
    };
    // A zero Pad in front of the layer (PyTorch's static padding): the same values, plus zeros
    // at the borders, which are ignored here as for the layer's own pads.
    let mut input = input;
    if let Some(p) = producer_of(input).filter(|p| is_zero_pad(graph, p)) {
        input = p.inputs.first().map(String::as_str).unwrap_or("");
    }
    let (record, act) = if let Some(r) = record_of(input) {
        (r, Activation::Clip(f64::NEG_INFINITY, f64::INFINITY))
    } else {
        let p =
            producer_of(input).ok_or_else(|| format!("its input '{input}' is a graph input (no BatchNorm record)"))?;
        let (source, act) = match (p.is_default_domain(), p.op_type.as_str()) {
            (true, "Relu") => (
                p.inputs.first().map_or("", String::as_str),
                Activation::Clip(0.0, f64::INFINITY),
            ),
            (true, "Clip") => (
                p.inputs.first().map_or("", String::as_str),
                Activation::Clip(
                    graph.clip_bound(p, 1, "min")?.unwrap_or(f64::NEG_INFINITY),
                    graph.clip_bound(p, 2, "max")?.unwrap_or(f64::INFINITY),
                ),
            ),
            (true, "HardSwish") => (p.inputs.first().map_or("", String::as_str), Activation::HardSwish(None)),
            (true, "Mul" | "Div") => {
                let producer_ix = |t: &str| {
                    graph
                        .nodes
                        .node_indices()
                        .find(|&ix| graph.nodes[ix].outputs.iter().any(|o| o == t))
                };
                let gated = (p.op_type == "Mul")
                    .then(|| gated_hard_swish(graph, p, &producer_of))
                    .flatten();
                let exported = producer_ix(input).and_then(|last| exported_hardswish(graph, last, &producer_ix));
                match (gated, exported) {
                    (Some((x, scales)), _) => (x, Activation::HardSwish(Some(scales))),
                    (None, Some(hs)) => match hs.channel_scale.map(|s| channel_scales(graph, s)) {
                        None => (hs.x, Activation::HardSwish(None)),
                        Some(Some(scales)) => (hs.x, Activation::HardSwish(Some(scales))),
                        Some(None) => {
                            return Err(format!(
                                "its input comes through {}, whose channel scales are not positive constants",
                                p.label()
                            ))
                        }
                    },
                    (None, None) if p.op_type == "Div" => {
                        return Err(format!(
                            "its input comes through {} (not a HardSwish x·Clip(x + 3, 0, 6)/6)",
                            p.label()
                        ))
                    }
                    (None, None) => {
                        return Err(format!(
                            "its input comes through {} (only identity, Relu, Clip and HardSwish are modelled)",
                            p.label()
                        ))
                    }
                }
            }
            _ => {
                return Err(format!(
                    "its input comes through {} (only identity, Relu, Clip and HardSwish are modelled)",
                    p.label()
                ))
            }
        };
        let Some(r) = record_of(source) else {
            return Err(format!(
                "no BatchNorm record for its input '{input}' (nor for the input of {})",
                p.label()
            ));
        };
        (r, act)
    };
    if record.beta.len() != channels || record.gamma.len() != channels {
        return Err(format!(
            "the BatchNorm record of '{}' has {} channels, the weight expects {channels}",
            record.output,
            record.beta.len()
        ));
    }
    if let Activation::HardSwish(Some(s)) = &act {
        if s.len() != channels {
            return Err(format!(
                "the HardSwish before it has {} channel scales, the weight expects {channels}",
                s.len()
            ));
        }
    }
    Ok(record
        .beta
        .iter()
        .zip(&record.gamma)
        .enumerate()
        .map(|(c, (&b, &g))| match &act {
            Activation::Clip(lo, hi) => clipped_normal_mean(b as f64, (g as f64).abs(), *lo, *hi),
            Activation::HardSwish(None) => normal_expectation(hard_swish, b as f64, (g as f64).abs()),
            // equalize's per-channel form: hswish(s·z)/s.
            Activation::HardSwish(Some(s)) => {
                let s = s[c];
                normal_expectation(|z| hard_swish(s * z) / s, b as f64, (g as f64).abs())
            }
        })
        .collect())
}

/// A Pad in constant mode with value 0 (input or attribute).
fn is_zero_pad(graph: &Graph, n: &Node) -> bool {
    if !n.is_default_domain() || n.op_type != "Pad" {
        return false;
    }
    let constant_mode = n.attribute("mode").is_none_or(|a| a.s() == b"constant");
    let value = match n.inputs.get(2).filter(|s| !s.is_empty()) {
        Some(name) => graph
            .constants
            .get(name)
            .and_then(|c| tensor::values_f64(&c.tensor))
            .is_some_and(|v| v == [0.0]),
        None => n.attribute("value").is_none_or(|a| a.f() == 0.0),
    };
    constant_mode && value
}

/// The values of a positive per-channel constant (equalize's channel scales).
fn channel_scales(graph: &Graph, t: &str) -> Option<Vec<f64>> {
    let v = tensor::values_f64(&graph.constants.get(t)?.tensor)?;
    v.iter().all(|s| *s > 0.0 && s.is_finite()).then_some(v)
}

/// `Mul(x, HardSigmoid(Mul(x, s)))` with alpha 1/6, beta 1/2 (operands in either order): the
/// per-channel HardSwish `hswish(s·x)/s` that `equalize` writes; `x` and `s`.
fn gated_hard_swish<'g>(
    graph: &'g Graph,
    mul: &'g Node,
    producer_of: &dyn Fn(&str) -> Option<&'g Node>,
) -> Option<(&'g str, Vec<f64>)> {
    if mul.inputs.len() != 2 {
        return None;
    }
    for (x, gate) in [(&mul.inputs[0], &mul.inputs[1]), (&mul.inputs[1], &mul.inputs[0])] {
        let Some(sigmoid) = producer_of(gate).filter(|n| n.is_default_domain() && n.op_type == "HardSigmoid") else {
            continue;
        };
        let attr = |name: &str, default: f32| sigmoid.attribute(name).map_or(default, |a| a.f());
        if (attr("alpha", 0.2) - 1.0 / 6.0).abs() > 1e-6 || attr("beta", 0.5) != 0.5 {
            continue;
        }
        let Some(scaled) = producer_of(sigmoid.inputs.first()?).filter(|n| n.op_type == "Mul" && n.inputs.len() == 2)
        else {
            continue;
        };
        for (a, b) in [
            (&scaled.inputs[0], &scaled.inputs[1]),
            (&scaled.inputs[1], &scaled.inputs[0]),
        ] {
            if a == x {
                if let Some(s) = channel_scales(graph, b) {
                    return Some((x.as_str(), s));
                }
            }
        }
    }
    None
}

/// The activation between a BatchNorm-folded layer and the layer whose input it is.
#[derive(Clone, Debug)]
enum Activation {
    /// Identity (infinite bounds), Relu, Clip.
    Clip(f64, f64),
    /// HardSwish; with channel scales `s`, `equalize`'s per-channel form hswish(s·x)/s.
    HardSwish(Option<Vec<f64>>),
}

fn hard_swish(x: f64) -> f64 {
    x * (x / 6.0 + 0.5).clamp(0.0, 1.0)
}

/// `E[f(z)]`, `z ~ N(mu, sigma²)`, by Simpson's rule over `mu ± 10σ` (4000 intervals; the tails
/// beyond hold 2·10⁻²³ of the mass). For activations without a closed form (HardSwish).
pub fn normal_expectation(f: impl Fn(f64) -> f64, mu: f64, sigma: f64) -> f64 {
    if !(sigma > 0.0 && sigma.is_finite()) {
        return f(mu);
    }
    let n = 4000;
    let h = 20.0 / n as f64;
    let g = |t: f64| f(mu + sigma * t) * normal_pdf(t);
    let mut s = g(-10.0) + g(10.0);
    for i in 1..n {
        s += g(-10.0 + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    s * h / 3.0
}

// ---------------------------------------------------------------------------------------------
// compute

/// `erfc(x)`, Chebyshev fit (Numerical Recipes `erfcc`), relative error below 1.2e-7 everywhere.
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Standard normal CDF `Φ`.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// Standard normal density `φ`.
pub fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// `E[clamp(z, lo, hi)]` for `z ~ N(mu, sigma²)` (`lo`, `hi` may be infinite):
/// `lo·Φ(α) + hi·(1 − Φ(β)) + μ·(Φ(β) − Φ(α)) + σ·(φ(α) − φ(β))`, `α = (lo − μ)/σ`,
/// `β = (hi − μ)/σ`. With σ = 0, `clamp(μ, lo, hi)`.
pub fn clipped_normal_mean(mu: f64, sigma: f64, lo: f64, hi: f64) -> f64 {
    if !(sigma > 0.0 && sigma.is_finite()) {
        return mu.max(lo).min(hi);
    }
    let a = (lo - mu) / sigma;
    let b = (hi - mu) / sigma;
    // An infinite bound contributes nothing (its probability is 0); avoid ∞·0.
    let (cdf_a, pdf_a, low) = if lo.is_finite() {
        let c = normal_cdf(a);
        (c, normal_pdf(a), lo * c)
    } else {
        (0.0, 0.0, 0.0)
    };
    let (cdf_b, pdf_b, high) = if hi.is_finite() {
        let c = normal_cdf(b);
        (c, normal_pdf(b), hi * (1.0 - c))
    } else {
        (1.0, 0.0, 0.0)
    };
    low + high + mu * (cdf_b - cdf_a) + sigma * (pdf_a - pdf_b)
}

/// `Δb_o = fraction · Σ_{e in o} ΔW[e]·f_{k(e)}·E[x_{c(e)}]`, accumulated in element order;
/// `taps` holds `f_k` per kernel position (None: all 1).
pub fn compute_bias_delta(geometry: &Geometry, delta_w: &[f64], mean: &[f64], taps: Option<&[f64]>) -> Vec<f64> {
    let mut delta = vec![0f64; geometry.out_channels()];
    for (e, ((o, c), dw)) in geometry.channels_of_elements().into_iter().zip(delta_w).enumerate() {
        let f = taps.map_or(1.0, |t| t[e % t.len()]);
        delta[o] += dw * f * mean[c];
    }
    let fraction = geometry.tap_fraction();
    delta.iter_mut().for_each(|d| *d *= fraction);
    delta
}

/// Per kernel position of one spatial axis, the fraction of output positions where the tap
/// reads inside the input (not padding). None when the sizes do not make a valid convolution.
pub fn tap_fractions(
    input: usize,
    kernel: usize,
    stride: usize,
    pad_begin: usize,
    pad_end: usize,
    dilation: usize,
) -> Option<Vec<f64>> {
    let (stride, dilation) = (stride.max(1), dilation.max(1));
    let span = dilation * (kernel.checked_sub(1)?) + 1;
    let padded = input + pad_begin + pad_end;
    if padded < span || input == 0 {
        return None;
    }
    let out = (padded - span) / stride + 1;
    Some(
        (0..kernel)
            .map(|k| {
                let inside = (0..out)
                    .filter(|&o| {
                        let i = (o * stride + k * dilation) as i64 - pad_begin as i64;
                        i >= 0 && (i as usize) < input
                    })
                    .count();
                inside as f64 / out as f64
            })
            .collect(),
    )
}

/// `f_k` of every kernel position of a Conv (row-major over the kernel axes), from the input's
/// sample shape in the statistics; None when unknown (then borders are ignored).
fn conv_taps(conv: &ops::Conv, kernel: &[usize], shape: Option<&[usize]>) -> Option<Vec<f64>> {
    let shape = shape?;
    let rank = kernel.len();
    if shape.len() != rank + 2 {
        return None;
    }
    // `read_target` checked these lists against the kernel's rank.
    let strides = conv.strides(rank).ok()?;
    let dilations = conv.dilations(rank).ok()?;
    let mut per_axis = Vec::with_capacity(rank);
    for d in 0..rank {
        let input = shape[2 + d];
        let (begin, end) = match conv.auto_pad {
            AutoPad::SameUpper | AutoPad::SameLower => {
                let out = input.div_ceil(strides[d].max(1));
                let span = dilations[d].max(1) * (kernel[d].max(1) - 1) + 1;
                let total = ((out.max(1) - 1) * strides[d].max(1) + span).saturating_sub(input);
                if conv.auto_pad == AutoPad::SameUpper {
                    (total / 2, total - total / 2)
                } else {
                    (total - total / 2, total / 2)
                }
            }
            AutoPad::Valid => (0, 0),
            AutoPad::NotSet => {
                let (begin, end) = conv.pads(rank).ok()?;
                (begin[d], end[d])
            }
        };
        per_axis.push(tap_fractions(input, kernel[d], strides[d], begin, end, dilations[d])?);
    }
    // Row-major product over the kernel axes.
    let mut taps = vec![1.0];
    for axis in per_axis {
        taps = taps.iter().flat_map(|t| axis.iter().map(move |f| t * f)).collect();
    }
    Some(taps)
}

/// `W̃ − W` for a weight as the plan quantizes it (with `gptq`'s rounding where it chose one, or
/// its codebook's entries).
fn weight_error(graph: &Graph, plan: &Plan, weight: &str) -> Result<Vec<f64>> {
    let t = &graph.constants[weight].tensor;
    let w = tensor::values_f32(t).ok_or_else(|| Error::Graph(format!("weight '{weight}' is not a float tensor")))?;
    Ok(plan
        .dequantized_weight(graph, weight)?
        .iter()
        .zip(&w)
        .map(|(&a, &b)| a as f64 - b as f64)
        .collect())
}

// ---------------------------------------------------------------------------------------------
// apply

/// Subtracts `delta` from a layer's bias, creating `<weight>::bias` (zeros) when it has none.
fn subtract_from_bias(graph: &mut Graph, target: &Target, delta: &[f64]) -> Result<bool> {
    match &target.bias {
        Some(b) => {
            let t = &graph.constants[b].tensor;
            let old = tensor::values_f64(t).ok_or_else(|| Error::Graph(format!("bias '{b}' unreadable")))?;
            let new: Vec<f64> = old.iter().zip(delta).map(|(a, d)| a - d).collect();
            let t = f32_tensor(t, &new);
            graph.set_constant(b, t)?;
            Ok(false)
        }
        None => {
            let name = graph.fresh_name(&format!("{}::bias", target.weight));
            let proto = TensorProto {
                name: Some(name.clone()),
                dims: vec![delta.len() as i64],
                data_type: Some(DataType::Float as i32),
                ..Default::default()
            };
            let minus: Vec<f64> = delta.iter().map(|d| -d).collect();
            graph.constants.insert(
                name.clone(),
                Constant {
                    tensor: f32_tensor(&proto, &minus),
                    origin: ConstantOrigin::Created,
                },
            );
            let n = &mut graph.nodes[target.node];
            n.inputs.resize(n.inputs.len().max(3), String::new());
            n.inputs[2] = name;
            Ok(true)
        }
    }
}

/// Corrects the biases of the layers whose weights `plan` quantizes (module docs), in `requested`
/// mode, `E[x]` from `stats` or from the BatchNorm `records`. Returns one note per corrected or
/// skipped layer. Errors when the mode cannot run at all (empirical without calibration
/// statistics).
pub fn apply(
    model: &mut Model,
    plan: &Plan,
    stats: Option<&CalibrationStats>,
    requested: BiasCorrectionMode,
    records: &[BatchNormRecord],
) -> Result<Vec<String>> {
    let from_data = stats.is_some_and(|s| s.samples > 0);
    let mode = match requested {
        BiasCorrectionMode::Auto if from_data => BiasCorrectionMode::Empirical,
        BiasCorrectionMode::Auto => BiasCorrectionMode::Analytical,
        m => m,
    };
    if mode == BiasCorrectionMode::Empirical && !from_data {
        return Err(Error::Graph(
            "correct_bias: mode empirical needs statistics from calibration data; without data use mode analytical"
                .into(),
        ));
    }
    let graph = &mut model.graph;
    let found = find_targets(graph, plan)?;
    // E[x] per target (or the reason there is none), then ΔW per weight, once each.
    let mut notes = Vec::new();
    let mut work: Vec<(Target, Vec<f64>, Option<Vec<f64>>)> = Vec::new();
    for f in found {
        let t = match f {
            Ok(t) => t,
            Err((label, reason)) => {
                notes.push(format!("not corrected {label}: {reason}"));
                continue;
            }
        };
        let channels = t.geometry.in_channels();
        let mean = match mode {
            BiasCorrectionMode::Analytical => analytical_mean(graph, records, &t.input, channels),
            _ => empirical_mean(stats.expect("checked above"), &t.input, channels),
        };
        let shape = stats
            .and_then(|s| s.tensors.get(&t.input))
            .and_then(|s| s.sample_shape.as_deref());
        // A Conv target's view read in `read_target` already.
        let taps = (!t.kernel.is_empty())
            .then(|| ops::Conv::view(&graph.nodes[t.node]).ok())
            .flatten()
            .and_then(|conv| conv_taps(&conv, &t.kernel, shape));
        match mean {
            Ok(m) if m.iter().all(|v| v.is_finite()) => work.push((t, m, taps)),
            Ok(_) => notes.push(format!("not corrected {}: E[x] is not finite", t.label)),
            Err(reason) => notes.push(format!("not corrected {}: {reason}", t.label)),
        }
    }
    let mut errors: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (t, _, _) in &work {
        if !errors.contains_key(t.weight.as_str()) {
            errors.insert(t.weight.as_str(), weight_error(graph, plan, &t.weight)?);
        }
    }
    // Pure maths in parallel; results in target order.
    let deltas: Vec<Vec<f64>> = work
        .par_iter()
        .map(|(t, mean, taps)| {
            compute_bias_delta(&t.geometry, &errors[t.weight.as_str()], mean, taps.as_deref())
                .into_iter()
                .map(|d| d * t.bias_factor)
                .collect()
        })
        .collect();
    drop(errors);
    let mut corrected = Vec::new();
    for ((t, _, taps), delta) in work.iter().zip(&deltas) {
        let created = subtract_from_bias(graph, t, delta)?;
        let max = delta.iter().fold(0f64, |m, d| m.max(d.abs()));
        let borders = match taps {
            Some(f) if f.iter().any(|&f| f < 1.0) => ", padded taps weighted",
            None if t.kernel.iter().product::<usize>() > 1 => ", borders ignored (input size unknown)",
            _ => "",
        };
        corrected.push(format!(
            "corrected {} ({} channels{}{borders}): max |Δb| {}",
            t.label,
            delta.len(),
            if created { ", bias created" } else { "" },
            fmt_float(max)
        ));
    }
    let mut out = vec![format!(
        "bias correction (mode {}): {} corrected, {} not",
        mode_name(mode),
        corrected.len(),
        notes.len()
    )];
    out.extend(corrected);
    out.extend(notes);
    graph.rebuild_edges()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::params;

    #[test]
    fn clipped_normal_matches_a_numerical_integral() {
        // Simpson's rule over μ ± 12σ of clamp(z)·pdf(z).
        let integral = |mu: f64, sigma: f64, lo: f64, hi: f64| {
            let n = 200_000;
            let (a, b) = (mu - 12.0 * sigma, mu + 12.0 * sigma);
            let h = (b - a) / n as f64;
            let f = |z: f64| z.max(lo).min(hi) * normal_pdf((z - mu) / sigma) / sigma;
            let mut s = f(a) + f(b);
            for i in 1..n {
                s += f(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
            }
            s * h / 3.0
        };
        for &(mu, sigma, lo, hi) in &[
            (0.0, 1.0, 0.0, f64::INFINITY),
            (1.5, 0.5, 0.0, f64::INFINITY),
            (-2.0, 1.0, 0.0, f64::INFINITY),
            (3.0, 2.0, 0.0, 6.0),
            (5.5, 1.0, 0.0, 6.0),
            (0.3, 0.2, f64::NEG_INFINITY, 0.0),
        ] {
            let got = clipped_normal_mean(mu, sigma, lo, hi);
            let want = integral(mu, sigma, lo, hi);
            assert!(
                (got - want).abs() < 1e-6,
                "μ {mu} σ {sigma} [{lo}, {hi}]: {got} vs {want}"
            );
        }
        // Hand values: E[max(0, z)], z ~ N(0, 1) is φ(0) = 1/√(2π) = 0.398942…
        assert!((clipped_normal_mean(0.0, 1.0, 0.0, f64::INFINITY) - 0.398_942_280_4).abs() < 1e-7);
        // Identity: no bounds gives μ; σ = 0 gives the clamped μ.
        assert!((clipped_normal_mean(2.5, 3.0, f64::NEG_INFINITY, f64::INFINITY) - 2.5).abs() < 1e-12);
        assert_eq!(clipped_normal_mean(7.0, 0.0, 0.0, 6.0), 6.0);
        assert!((normal_cdf(1.0) - 0.841_344_746).abs() < 1e-7);
        // The quadrature agrees with the closed form on a Relu, and on HardSwish far above 3 it
        // is the identity.
        let relu = normal_expectation(|z| z.max(0.0), 0.7, 1.3);
        assert!((relu - clipped_normal_mean(0.7, 1.3, 0.0, f64::INFINITY)).abs() < 1e-6);
        assert!((normal_expectation(hard_swish, 20.0, 1.0) - 20.0).abs() < 1e-9);
    }

    #[test]
    fn bias_delta_of_a_tiny_weight() {
        // Conv W [2, 2, 1, 1] = [[0.1, 0.33], [−0.5, 1.0]], per-tensor int8 symmetric narrow:
        // scale = 1/127, W̃ = round(W·127)/127 = [13, 42, −64 (−63.5 ties to even), 127]/127.
        let w = [0.1f32, 0.33, -0.5, 1.0];
        let scheme = params::Scheme {
            dtype: params::QuantDtype::Int8,
            symmetric: true,
            narrow_range: true,
            reduce_range: false,
            bits: None,
        };
        let q = params::quantize_weights(&w, &[2, 2, 1, 1], None, &scheme).unwrap();
        assert_eq!(q.values, [13, 42, -64, 127]);
        let dw: Vec<f64> = q
            .dequantized()
            .iter()
            .zip(&w)
            .map(|(&a, &b)| a as f64 - b as f64)
            .collect();
        let geometry = Geometry::Layout(Layout {
            kind: Kind::Conv { group: 1 },
            dims: vec![2, 2, 1, 1],
        });
        // E[x] = [2, −1]: Δb0 = 2·(13/127 − 0.1) − (42/127 − 0.33) = 2·0.0023622 − 0.0007087
        // = 0.0040157; Δb1 = 2·(−64/127 + 0.5) − 0 = −0.0078740.
        let d = compute_bias_delta(&geometry, &dw, &[2.0, -1.0], None);
        assert!((d[0] - 0.004_015_7).abs() < 1e-6, "{d:?}");
        assert!((d[1] + 0.007_874_0).abs() < 1e-6, "{d:?}");
        // ConvTranspose W [C_in 2, C_out 1, 1, 2], stride 2: each output pixel gets one of the
        // two taps: Σ/2. ΔW = [1, 2, 3, 4], E[x] = [1, 10]: (1 + 2 + 30 + 40)/2 = 36.5.
        let ct = Geometry::ConvTranspose {
            dims: vec![2, 1, 1, 2],
            group: 1,
            stride_product: 2,
        };
        assert_eq!(
            compute_bias_delta(&ct, &[1.0, 2.0, 3.0, 4.0], &[1.0, 10.0], None),
            [36.5]
        );
        // Grouped ConvTranspose, group 2, W [2, 1, 1, 1]: output channel g reads input g only.
        let gct = Geometry::ConvTranspose {
            dims: vec![2, 1, 1, 1],
            group: 2,
            stride_product: 1,
        };
        assert_eq!(compute_bias_delta(&gct, &[1.0, 2.0], &[3.0, 5.0], None), [3.0, 10.0]);
        // Tap weights: Conv W [1, 1, 1, 2] taps f = [1, 0.5]: ΔW [2, 4], E[x] 3 → 3·(2 + 2) = 12.
        let one = Geometry::Layout(Layout {
            kind: Kind::Conv { group: 1 },
            dims: vec![1, 1, 1, 2],
        });
        assert_eq!(compute_bias_delta(&one, &[2.0, 4.0], &[3.0], Some(&[1.0, 0.5])), [12.0]);
    }

    #[test]
    fn tap_fractions_count_positions_inside_the_input() {
        // Input 3, kernel 3, stride 1, pads 1/1: 3 outputs; tap 0 reads padding at output 0,
        // tap 2 at output 2: [2/3, 1, 2/3].
        let f = tap_fractions(3, 3, 1, 1, 1, 1).unwrap();
        assert_eq!(f, [2.0 / 3.0, 1.0, 2.0 / 3.0]);
        // Input 4, kernel 3, stride 2, pads 1/1: outputs at −1..1, 1..3: tap 0 inside once of 2.
        assert_eq!(tap_fractions(4, 3, 2, 1, 1, 1).unwrap(), [0.5, 1.0, 1.0]);
        // No padding: every tap always inside.
        assert_eq!(tap_fractions(5, 3, 1, 0, 0, 1).unwrap(), [1.0; 3]);
        // Kernel larger than the padded input: not a convolution.
        assert_eq!(tap_fractions(1, 5, 1, 1, 1, 1), None);
    }
}
