//! `easyquant`: scale search (Wu et al., "EasyQuant: Post-training Quantization via Scale
//! Optimization", 2020). The plan's scales come from ranges (a channel's largest weight, the
//! calibrated activation range); EasyQuant instead chooses, layer by layer, the scales that make
//! the quantized layer's output most like the float one, measured by their cosine similarity.
//!
//! Maths. For a Conv, Gemm or MatMul whose constant weight the plan quantizes, with float input
//! vectors `x` (Conv: im2col patches, zero padding included; Gemm/MatMul: rows of A) taken from
//! the float model on the first `samples` calibration samples, the float output of output
//! channel `r` is `y_r = α·w_r·x + b_r` and the quantized one `ỹ_r = α·Q(w_r; s_r)·Q(x; s_x) + b_r`,
//! with `Q(v; s) = s·(clamp(round(v/s) + z, qmin, qmax) − z)` (weights clamped to the scheme's
//! range, activations saturated to the dtype's as QuantizeLinear does). The cosine of two
//! outputs is `cos(ỹ, y) = Σ ỹ·y / √(Σ ỹ² · Σ y²)` over every value they have on the samples
//! (f64 sums in a fixed order). Alternately, for `rounds` rounds or until the layer's cosine
//! stops improving:
//!
//! (a) each output channel's weight scale `s_r ∈ {f·S_r}` maximising `cos(ỹ_r, y_r)`, the input
//!     scale fixed (channels are independent; a per-tensor weight: one factor, the whole
//!     output's cosine);
//! (b) the input activation's scale `s_x ∈ {f·S_x}` maximising the cosine of the whole output
//!     `cos(ỹ, y)`, the weight scales fixed;
//!
//! where `S` is the plan's scale and `f` runs over `steps` evenly spaced factors in `[low,
//! high]` with the factor 1 always among them, so a channel or the layer never ends worse on
//! the samples than with the plan's scale (a layer whose final cosine is not above the plan's
//! keeps the plan's scales). The paper's range is α = 0.5, β = 2 (`high: 2`); the default
//! `high` is 1, measured: on ppocr_mobile_v2_cls (int8, the default recipe with easyquant
//! before gptq, `search: weights`) the weight search over [0.5, 2] chose coarser grids for most
//! channels (factors 1.0–1.9, fitting the rounding noise of the samples) and lost 2.5 dB in ONNX
//! Runtime, over [0.5, 1] it gained 0.6 dB (README, "EasyQuant"). The zero point is kept: scaling both ends of an
//! asymmetric range `[lo, hi]` by `f` scales its step by `f` and leaves `z = qmin − lo/S` where
//! it is, and a symmetric scheme's zero point is fixed anyway.
//!
//! With `bias_corrected` (the default), the quantized output is compared as `correct_bias`
//! (listed after the pass, as in the default recipe) will leave it: each channel's mean shift
//! of the weight rounding, `α·(w̃_r − w_r)·E[x]` over the samples, is subtracted from `ỹ_r`, so
//! the weight search does not pay for choosing scales whose rounding merely cancels a mean
//! shift that the bias correction removes anyway. `search: weights` or `activations` runs one
//! of the two searches only.
//!
//! Where the scales go: the weights' into `Plan::scaled` (honoured by `Plan::quantized_weight`
//! while the plan quantizes the weight under the same scheme and axis, as gptq's roundings are),
//! the activation's into its `ActivationQuant::params`. int32 biases follow, since they are
//! quantized from `s_x·s_w` when the model is written. The pass changes scales, so list it
//! before the rounding passes (`gptq`, `adaround`), which then round on its grid; a rounding
//! chosen earlier on the old grid is dropped (with a note).
//!
//! What this does not do, and why: every layer's input is the float model's, not that of the
//! model with the earlier layers already quantized (the paper's layer-by-layer order then does
//! not matter: each layer's search reads only its own input and weight); the input's scale is
//! searched only when this layer is its only quantized reader and it shares its parameters
//! with no other tensor (Concat inputs, pass-through ops): an activation read by several layers
//! or by an Add keeps the plan's scale, and the layer's weight scales are still searched on it.
//! The bias is the float one (its int32 rounding is far below the weights').
//!
//! Cost and memory. A candidate's cosine is a matrix product over `M` input vectors: the
//! activation step costs `steps` products `rows × d × M` (and quantizing `d × M` inputs) a
//! round; the weight step, with the inputs fixed, `steps` products `rows × d × min(d, M)`
//! (from the quantized inputs' moments `X̃X̃ᵀ`, `X̃Yᵀ`, `X̃·1` in f64 when a row is shorter than
//! `M`). `M` is at most about `vectors` (an evenly spaced subset of each sample's vectors, the
//! offset moving with the sample, as gptq's). What is held: per layer only its `M` input
//! vectors (`d·M` floats per group), gathered for as many layers at a time as fit in
//! [`GATHER_BYTES`] in one run of the float model over the samples (more runs when they do
//! not), never a whole activation; the float outputs are recomputed from them.
//!
//! Skipped, with a note: FP8, ternary and binary weights (not a uniform integer grid), blocked
//! weights, shared weights, layers mixed precision raised, weights per channel along another
//! axis than the output channels, ConvTranspose, Conv with `auto_pad`, Gemm with `transA`, and
//! layers without a constant weight (not in the plan's weighted layers at all).

use std::collections::HashMap;

use rayon::prelude::*;
use tract_onnx::prelude::tract_ndarray::{concatenate, linalg::general_mat_mul, Array2, ArrayView2, Axis};
use tract_onnx::prelude::Tensor;

use super::gptq::{self, Reader, Target};
use super::{Context, Pass};
use crate::calib::source::DataSource;
use crate::calib::stats::{ride, Rider};
use crate::error::{Error, Result};
use crate::ir::{ops, tensor, Graph, Model};
use crate::quant::params::{self, QParams, QuantDtype};
use crate::quant::plan::{node_key, Plan, ScaledWeight};
use crate::runtime::{Engine, EngineRunner};

/// Bytes of gathered input vectors held at once (layers beyond it wait for another run).
pub const GATHER_BYTES: usize = 256 << 20;

/// The pass's options (`passes: [{easyquant: {rounds: 2}}]`).
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Alternations of the weight and activation searches per layer, at most (it stops earlier
    /// when a round does not raise the layer's cosine).
    pub rounds: usize,
    /// Calibration samples the layers' inputs are taken from (the first ones).
    pub samples: usize,
    /// Candidate scales per search, evenly spaced factors of the plan's scale in [low, high].
    pub steps: usize,
    pub low: f64,
    pub high: f64,
    /// Input vectors per layer the cosine is measured on, at most (spread over the samples).
    pub vectors: usize,
    /// Compare the outputs as `correct_bias` (listed after the pass) leaves them: without the
    /// mean shift `(w̃ − w)·E[x]` of the weight rounding.
    pub bias_corrected: bool,
    /// What is searched: `both` (the paper's alternation), `weights` or `activations` only.
    pub search: Search,
}

/// The scales [`Options::search`] searches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Search {
    #[default]
    Both,
    Weights,
    Activations,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rounds: 3,
            samples: 50,
            steps: 100,
            low: 0.5,
            high: 1.0,
            vectors: 512,
            bias_corrected: true,
            search: Search::Both,
        }
    }
}

impl Options {
    fn check(&self) -> std::result::Result<(), String> {
        let at_least = |what: &str, v: usize, min: usize| {
            if v < min {
                Err(format!("pass `easyquant`: {what} must be at least {min}, not {v}"))
            } else {
                Ok(())
            }
        };
        at_least("rounds", self.rounds, 1)?;
        at_least("samples", self.samples, 1)?;
        at_least("steps", self.steps, 2)?;
        at_least("vectors", self.vectors, 1)?;
        if !(self.low.is_finite() && self.low > 0.0 && self.low <= 1.0) {
            return Err(format!("pass `easyquant`: low must be in (0, 1], not {}", self.low));
        }
        if !(self.high.is_finite() && self.high >= 1.0 && self.high > self.low) {
            return Err(format!(
                "pass `easyquant`: high must be at least 1 and above low, not {}",
                self.high
            ));
        }
        Ok(())
    }

    /// The factors tried, ascending, with 1 among them; and the index of 1.
    pub fn factors(&self) -> (Vec<f32>, usize) {
        let n = self.steps;
        let mut f: Vec<f32> = (0..n)
            .map(|i| (self.low + (self.high - self.low) * i as f64 / (n - 1) as f64) as f32)
            .collect();
        if !f.contains(&1.0) {
            f.push(1.0);
            f.sort_by(f32::total_cmp);
        }
        let one = f.iter().position(|&x| x == 1.0).expect("1 is among the factors");
        (f, one)
    }
}

#[derive(Default)]
pub struct EasyQuant {
    options: Options,
}

impl Pass for EasyQuant {
    fn name(&self) -> &'static str {
        "easyquant"
    }

    fn phase(&self) -> super::Phase {
        super::Phase::Plan
    }

    fn requires(&self) -> &'static [super::Requirement] {
        &[super::Requirement::CalibrationData(
            "searches the scales on the layers' inputs (it has no data-free mode)",
        )]
    }

    fn configure(&mut self, options: &serde_yaml::Value) -> std::result::Result<(), String> {
        let o: Options = super::parse_options("easyquant", options)?;
        o.check()?;
        self.options = o;
        Ok(())
    }

    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        let started = std::time::Instant::now();
        let (Some(plan), Some(source)) = (ctx.plan.as_mut(), ctx.calibration.as_ref()) else {
            return Err(Error::Graph(
                "easyquant needs calibration data (`calibration: {data: …}`) and a plan: it searches the scales on the layers' inputs".into(),
            ));
        };
        // The layer inputs calibration measured for gptq (`ctx.layer_inputs`) stay for it.
        let runnable = crate::calib::control_flow::runnable(ctx.control_flow.as_ref(), model)?;
        let notes = apply_in(&runnable, plan, source, &self.options, ctx.engine)?;
        eprintln!("onnxq: easyquant took {:.1} s", started.elapsed().as_secs_f64());
        Ok(notes)
    }
}

// ---------------------------------------------------------------------------------------------
// find

/// A layer whose scales are searched.
struct Layer {
    target: Target,
    /// The output's bias per output row (`β·C` for Gemm), zero without one.
    bias: Vec<f32>,
    /// Gemm's `alpha` (1 otherwise).
    alpha: f32,
    /// The input's parameters and dtype when the plan quantizes it for this layer.
    input: Option<(QParams, QuantDtype)>,
    /// Why the input's scale is not searched (None: it is).
    input_kept: Option<String>,
}

/// The layers whose scales can be searched, in topological order, or why not.
fn find_layers(graph: &Graph, plan: &Plan) -> Result<Vec<std::result::Result<Layer, String>>> {
    let mut out = Vec::new();
    for (ix, weight) in plan.weighted_layers(graph)? {
        let n = &graph.nodes[ix];
        let key = node_key(n);
        let wq = &plan.weights[weight];
        let skip = |why: String| Err(format!("kept the plan's scales for {}: {why}", n.label()));
        let dtype = wq.scheme.dtype;
        if dtype.float8().is_some() || dtype.is_ternary_or_binary() {
            out.push(skip(format!(
                "weight '{weight}' is {dtype}, not a uniform integer grid"
            )));
            continue;
        }
        if wq.codebook.is_some() {
            out.push(skip(format!("weight '{weight}' is a codebook, not a grid")));
            continue;
        }
        if wq.block_size.is_some() {
            out.push(skip(format!("weight '{weight}' is quantized in blocks")));
            continue;
        }
        if wq.consumers.len() != 1 {
            out.push(skip(format!(
                "weight '{weight}' is shared by {} layers",
                wq.consumers.len()
            )));
            continue;
        }
        if let Some(p) = plan.precisions.get(&key) {
            out.push(skip(format!("the layer runs at {} (mixed precision)", p.name())));
            continue;
        }
        let target = match gptq::read_target(graph, n, weight) {
            Ok(t) => t,
            Err(why) => {
                out.push(skip(why));
                continue;
            }
        };
        let rows = target.rows_per_group * target.groups;
        if wq.axis.is_some_and(|a| a != target.output_axis()) {
            out.push(skip(format!(
                "weight '{weight}' is per channel along axis {:?}, not its output channels",
                wq.axis
            )));
            continue;
        }
        let (bias_input, alpha, beta) = match n.op_type.as_str() {
            "Gemm" => {
                let g = ops::Gemm::view(n).map_err(Error::Graph)?;
                (g.bias_slot.and_then(|s| n.inputs.get(s)), g.alpha, g.beta)
            }
            "Conv" => {
                let c = ops::Conv::view(n).map_err(Error::Graph)?;
                (c.bias_slot.and_then(|s| n.inputs.get(s)), 1.0, 1.0)
            }
            _ => (None, 1.0, 1.0),
        };
        let mut bias = vec![0f32; rows];
        if let Some(b) = bias_input.filter(|b| !b.is_empty()) {
            let values = graph.constants.get(b).and_then(|c| tensor::values_f32(&c.tensor));
            match values {
                Some(v) if v.len() == rows => bias.iter_mut().zip(&v).for_each(|(o, &x)| *o = beta * x),
                Some(v) if v.len() == 1 => bias.iter_mut().for_each(|o| *o = beta * v[0]),
                _ => {
                    out.push(skip(format!("bias '{b}' is not a constant of one value per output")));
                    continue;
                }
            }
        }
        let activation = plan.activations.get(&target.input);
        let input = activation
            .filter(|a| a.consumers.iter().any(|(k, _)| *k == key))
            .map(|a| (a.params, a.scheme.dtype));
        let input_kept = match activation {
            None => Some(format!("input '{}' is not quantized", target.input)),
            Some(_) if input.is_none() => Some(format!("input '{}' is read float by this layer", target.input)),
            Some(a) if a.scheme.dtype.float8().is_some() => {
                Some(format!("input '{}' is {}", target.input, a.scheme.dtype))
            }
            Some(a) if !a.shared_with.is_empty() => Some(format!(
                "input '{}' shares its parameters with {}",
                target.input,
                a.shared_with.join(", ")
            )),
            Some(a) if a.consumers.iter().any(|(k, _)| *k != key) => {
                let others: Vec<&str> = a
                    .consumers
                    .iter()
                    .filter(|(k, _)| *k != key)
                    .map(|(k, _)| k.as_str())
                    .collect();
                Some(format!(
                    "input '{}' is also read by {}",
                    target.input,
                    others.join(", ")
                ))
            }
            Some(_) => None,
        };
        out.push(Ok(Layer {
            target,
            bias,
            alpha,
            input,
            input_kept,
        }));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// gather: each layer's input vectors on the samples

/// The input vectors of a batch of layers on the samples, as a calibration [`Rider`]: per layer
/// and group a `d × k` matrix per sample, joined in sample order.
struct Gather<'l> {
    layers: Vec<&'l Layer>,
    readers: HashMap<String, Vec<usize>>,
    /// Input vectors wanted per sample and layer.
    per_sample: usize,
    source: &'l DataSource,
}

/// Per layer (None until seen) and group, the sample's vectors.
type Vectors = Vec<Option<Vec<Array2<f32>>>>;

impl<'l> Gather<'l> {
    fn new(layers: Vec<&'l Layer>, per_sample: usize, source: &'l DataSource) -> Gather<'l> {
        let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, l) in layers.iter().enumerate() {
            readers.entry(l.target.input.clone()).or_default().push(i);
        }
        Gather {
            layers,
            readers,
            per_sample,
            source,
        }
    }
}

/// One sample's vectors of a layer's input tensor (`values` of shape `shape`): about
/// `per_sample` of them, evenly spaced, per group a `d × k` matrix.
fn sample_vectors(
    t: &Target,
    per_sample: usize,
    values: &[f32],
    shape: &[usize],
    sample: usize,
) -> std::result::Result<Vec<Array2<f32>>, String> {
    match &t.reader {
        Reader::Rows { features } => {
            let count = t.reader.vectors(shape)?;
            let step = count.div_ceil(per_sample.max(1)).max(1);
            let picked: Vec<usize> = gptq::picked(step, count, sample).collect();
            let k = picked.len();
            let mut x = Array2::<f32>::zeros((*features, k));
            for (j, &r) in picked.iter().enumerate() {
                for (c, &v) in values[r * features..][..*features].iter().enumerate() {
                    x[[c, j]] = v;
                }
            }
            Ok(vec![x])
        }
        Reader::Conv(window) => {
            let positions: usize = window.output_dims(shape)?.iter().product();
            let wanted = per_sample.div_ceil(shape[0].max(1)).max(1);
            let step = positions.div_ceil(wanted).max(1);
            let picked: Vec<usize> = gptq::picked(step, positions, sample).collect();
            let mut chunks: Vec<Vec<Array2<f32>>> = vec![Vec::new(); t.groups];
            gptq::conv_patches(t, window, &picked, values, shape, |g, xt| {
                chunks[g].push(xt.to_owned());
                Ok(())
            })?;
            chunks
                .into_iter()
                .map(|c| {
                    let views: Vec<ArrayView2<f32>> = c.iter().map(|a| a.view()).collect();
                    if views.is_empty() {
                        Ok(Array2::zeros((t.columns, 0)))
                    } else {
                        concatenate(Axis(1), &views).map_err(|e| e.to_string())
                    }
                })
                .collect()
        }
    }
}

impl Rider for Gather<'_> {
    type Share = (usize, Vectors);
    type Sum = Vec<Vec<Vec<Array2<f32>>>>;

    fn tensors(&self) -> Vec<String> {
        let mut wanted: Vec<String> = self.readers.keys().cloned().collect();
        wanted.sort();
        wanted
    }

    fn start(&self, sample: usize) -> Self::Share {
        (sample, (0..self.layers.len()).map(|_| None).collect())
    }

    fn visit(&self, share: &mut Self::Share, name: &str, tensor: &Tensor) -> Result<()> {
        let Some(ls) = self.readers.get(name) else {
            return Ok(());
        };
        let copied;
        let values: &[f32] = match tensor.as_plain_ram().and_then(|v| v.as_slice::<f32>().ok()) {
            Some(v) if tensor.datum_type() == tract_onnx::prelude::DatumType::F32 => v,
            _ => {
                copied = crate::runtime::to_f32_vec(tensor)?;
                &copied
            }
        };
        let sample = share.0;
        for &li in ls {
            let t = &self.layers[li].target;
            let v = sample_vectors(t, self.per_sample, values, tensor.shape(), sample)
                .map_err(|e| Error::data(self.source.sample_label(sample), format!("easyquant: {}: {e}", t.label)))?;
            share.1[li] = Some(v);
        }
        Ok(())
    }

    fn empty(&self) -> Self::Sum {
        self.layers.iter().map(|l| vec![Vec::new(); l.target.groups]).collect()
    }

    fn absorb(&self, sum: &mut Self::Sum, share: Self::Share) -> Result<()> {
        for ((layer, l), v) in sum.iter_mut().zip(&self.layers).zip(share.1) {
            let v = v.ok_or_else(|| Error::Runtime(format!("easyquant: no value for '{}'", l.target.input)))?;
            for (g, x) in layer.iter_mut().zip(v) {
                g.push(x);
            }
        }
        Ok(())
    }
}

/// Runs the float model over the first `samples` samples for `layers` and returns, per layer
/// and group, its input vectors (`d × M`).
fn gather(
    model: &Model,
    source: &DataSource,
    layers: Vec<&Layer>,
    samples: usize,
    per_sample: usize,
    engine: Engine,
) -> Result<Vec<Vec<Array2<f32>>>> {
    let rider = Gather::new(layers, per_sample, source);
    let shapes = source.sample_shapes()?;
    let input_names: Vec<String> = shapes.iter().map(|(n, _, _)| n.clone()).collect();
    let extra: Vec<String> = rider
        .tensors()
        .into_iter()
        .filter(|n| !input_names.contains(n))
        .collect();
    let runner = EngineRunner::new(engine, model, &shapes, &extra)?;
    let parallel = runner.parallelism()?;
    let progress = crate::calib::stats::Progress::new(
        "easyquant: gathering layer inputs",
        samples as u64,
        &runner.progress_detail(&parallel),
    );
    let mut sum = rider.empty();
    ride(
        &runner,
        source,
        &rider,
        0..samples,
        parallel.samples,
        &mut sum,
        &progress,
    )?;
    progress.finish();
    sum.into_iter()
        .map(|groups| {
            groups
                .into_iter()
                .map(|parts| {
                    let views: Vec<ArrayView2<f32>> = parts.iter().map(|a| a.view()).collect();
                    concatenate(Axis(1), &views).map_err(|e| Error::internal(format!("easyquant: {e}")))
                })
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// the search

/// One layer's problem: per group its float weight rows (`rows_g × d`) and input vectors
/// (`d × M`); per output row its bias and weight parameters; the input's parameters.
pub struct Problem {
    pub weights: Vec<Array2<f32>>,
    pub inputs: Vec<Array2<f32>>,
    /// Per output row (all groups, group-major).
    pub bias: Vec<f32>,
    pub alpha: f32,
    /// The plan's weight parameters: one per output row, or one for the whole weight.
    pub weight_params: Vec<QParams>,
    pub weight_dtype: QuantDtype,
    pub weight_range: (i32, i32),
    /// The plan's input parameters and dtype (None: the input is read float).
    pub input: Option<(QParams, QuantDtype)>,
    /// Whether the input's scale is searched.
    pub search_input: bool,
}

/// What the search chose: a factor (index into the factors) per weight parameter and for the
/// input, and the layer's cosine with the plan's scales and with the chosen ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub weight: Vec<usize>,
    pub input: usize,
    pub cosine_plan: f64,
    pub cosine: f64,
    pub rounds: usize,
}

/// The parameters `p` scaled by `f` (the zero point kept).
pub fn scaled(p: QParams, f: f32) -> QParams {
    QParams {
        scale: p.scale * f,
        zero_point: p.zero_point,
    }
}

fn cosine(dot: f64, a: f64, b: f64) -> f64 {
    if a == 0.0 && b == 0.0 {
        1.0
    } else if a == 0.0 || b == 0.0 {
        0.0
    } else {
        dot / (a * b).sqrt()
    }
}

impl Problem {
    fn rows_per_group(&self) -> usize {
        self.weights[0].nrows()
    }

    fn weight_param(&self, row: usize) -> QParams {
        self.weight_params[if self.weight_params.len() == 1 { 0 } else { row }]
    }

    /// The float output `α·W·X + b` of each group.
    fn float_outputs(&self) -> Vec<Array2<f32>> {
        self.weights
            .iter()
            .zip(&self.inputs)
            .enumerate()
            .map(|(g, (w, x))| self.output(g, w, &x.view()))
            .collect()
    }

    fn output(&self, g: usize, w: &Array2<f32>, x: &ArrayView2<f32>) -> Array2<f32> {
        let rows = w.nrows();
        let mut y = Array2::<f32>::zeros((rows, x.ncols()));
        general_mat_mul(self.alpha, w, x, 0.0, &mut y);
        for (r, mut row) in y.rows_mut().into_iter().enumerate() {
            let b = self.bias[g * rows + r];
            if b != 0.0 {
                row.iter_mut().for_each(|v| *v += b);
            }
        }
        y
    }

    /// Group `g`'s weight quantized with row `r`'s parameters scaled by `factor(r)`.
    fn quantized_weight(&self, g: usize, factor: impl Fn(usize) -> f32) -> Array2<f32> {
        let rows = self.rows_per_group();
        let (qmin, qmax) = self.weight_range;
        let mut w = self.weights[g].clone();
        for (r, mut row) in w.rows_mut().into_iter().enumerate() {
            let p = scaled(self.weight_param(g * rows + r), factor(g * rows + r));
            row.iter_mut().for_each(|v| {
                *v = params::dequantize(params::quantize(*v, p, self.weight_dtype).clamp(qmin, qmax), p);
            });
        }
        w
    }

    /// The inputs quantized with the input's parameters scaled by `f` (float when not quantized).
    fn quantized_inputs(&self, f: f32) -> Vec<Array2<f32>> {
        match self.input {
            None => self.inputs.clone(),
            Some((p, dtype)) => {
                let p = scaled(p, f);
                self.inputs
                    .iter()
                    .map(|x| x.mapv(|v| params::dequantize_as(params::quantize(v, p, dtype), p, dtype)))
                    .collect()
            }
        }
    }

    /// Per output row, `(Σ ỹ·y, Σ ỹ²)` of the quantized weights `wq` on the quantized inputs `xq`
    /// (with the mean shift of the weight rounding removed when `ctx` models it).
    fn row_sums(&self, ctx: &Sums, wq: &[Array2<f32>], xq: &[Array2<f32>]) -> Vec<(f64, f64)> {
        let mut out = Vec::with_capacity(self.bias.len());
        for (g, (w, x)) in wq.iter().zip(xq).enumerate() {
            let yq = self.output(g, w, &x.view());
            let shifts = ctx.shifts(self, g, w);
            for (r, (a, b)) in yq.rows().into_iter().zip(ctx.y[g].rows()).enumerate() {
                let (mut dot, mut norm, mut sum) = (0f64, 0f64, 0f64);
                for (&u, &v) in a.iter().zip(b.iter()) {
                    dot += u as f64 * v as f64;
                    norm += u as f64 * u as f64;
                    sum += u as f64;
                }
                out.push(ctx.corrected(g * w.nrows() + r, shifts[r], dot, norm, sum));
            }
        }
        out
    }
}

/// What the cosines are measured against: the float outputs and their per-row sums, and when
/// the bias correction is modelled, the inputs' float means.
struct Sums {
    y: Vec<Array2<f32>>,
    /// Per output row: `Σ y²`, `Σ y`.
    yy: Vec<f64>,
    sy: Vec<f64>,
    /// Per group, the mean float input vector `E[x]` (None: no correction modelled).
    mean: Option<Vec<Vec<f64>>>,
    vectors: f64,
}

impl Sums {
    fn new(problem: &Problem, corrected: bool) -> Sums {
        let y = problem.float_outputs();
        let rows = |f: fn(f32) -> f64| -> Vec<f64> {
            y.iter()
                .flat_map(|g| {
                    g.rows()
                        .into_iter()
                        .map(|r| r.iter().map(|&v| f(v)).sum::<f64>())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let (yy, sy) = (rows(|v| v as f64 * v as f64), rows(|v| v as f64));
        let vectors = problem.inputs.first().map_or(0, |x| x.ncols()) as f64;
        let mean = corrected.then(|| {
            problem
                .inputs
                .iter()
                .map(|x| {
                    x.rows()
                        .into_iter()
                        .map(|r| r.iter().map(|&v| v as f64).sum::<f64>() / vectors.max(1.0))
                        .collect()
                })
                .collect()
        });
        Sums {
            y,
            yy,
            sy,
            mean,
            vectors,
        }
    }

    /// Per row of group `g`, the mean output shift `α·(w̃ − w)·E[x]` of the quantized weight
    /// `wq`, which `correct_bias` removes (zero when not modelled).
    fn shifts(&self, problem: &Problem, g: usize, wq: &Array2<f32>) -> Vec<f64> {
        let Some(mean) = &self.mean else {
            return vec![0.0; wq.nrows()];
        };
        wq.rows()
            .into_iter()
            .zip(problem.weights[g].rows())
            .map(|(q, w)| {
                let d: f64 = q
                    .iter()
                    .zip(w.iter())
                    .zip(&mean[g])
                    .map(|((&a, &b), &m)| (a as f64 - b as f64) * m)
                    .sum();
                problem.alpha as f64 * d
            })
            .collect()
    }

    /// Row `row`'s `(Σ ỹ'·y, Σ ỹ'²)` for `ỹ' = ỹ − c` from the sums of `ỹ`.
    fn corrected(&self, row: usize, c: f64, dot: f64, norm: f64, sum: f64) -> (f64, f64) {
        (
            dot - c * self.sy[row],
            (norm - 2.0 * c * sum + self.vectors * c * c).max(0.0),
        )
    }

    fn row_cosine(&self, row: usize, s: (f64, f64)) -> f64 {
        cosine(s.0, s.1, self.yy[row])
    }

    /// The whole output's cosine from its row sums.
    fn total(&self, sums: &[(f64, f64)]) -> f64 {
        let dot: f64 = sums.iter().map(|s| s.0).sum();
        let norm: f64 = sums.iter().map(|s| s.1).sum();
        cosine(dot, norm, self.yy.iter().sum())
    }
}

/// The quantized inputs' second moments per group, for the weight step: with `X̃` fixed, a
/// candidate's row sums are `Σ ỹ·y = α·w̃·(X̃yᵀ) + b·Σy`, `Σ ỹ² = α²·w̃ H w̃ᵀ + 2αb·w̃·m + M·b²`,
/// `Σ ỹ = α·w̃·m + M·b` with `H = X̃X̃ᵀ`, `m = X̃·1`: `d²` a row instead of `d·M` (f64).
struct Moments {
    h: Vec<Array2<f64>>,
    /// `X̃·Yᵀ` (`d × rows`).
    xy: Vec<Array2<f64>>,
    m: Vec<Vec<f64>>,
}

impl Moments {
    fn new(xq: &[Array2<f32>], y: &[Array2<f32>]) -> Moments {
        let (mut h, mut xy, mut m) = (Vec::new(), Vec::new(), Vec::new());
        for (x, y) in xq.iter().zip(y) {
            let x = x.mapv(|v| v as f64);
            let y = y.mapv(|v| v as f64);
            let mut hg = Array2::<f64>::zeros((x.nrows(), x.nrows()));
            general_mat_mul(1.0, &x, &x.t(), 0.0, &mut hg);
            let mut xyg = Array2::<f64>::zeros((x.nrows(), y.nrows()));
            general_mat_mul(1.0, &x, &y.t(), 0.0, &mut xyg);
            m.push(x.rows().into_iter().map(|r| r.sum()).collect());
            h.push(hg);
            xy.push(xyg);
        }
        Moments { h, xy, m }
    }

    /// [`Problem::row_sums`] of the quantized weights `wq`, from the moments.
    fn row_sums(&self, problem: &Problem, ctx: &Sums, wq: &[Array2<f32>]) -> Vec<(f64, f64)> {
        let alpha = problem.alpha as f64;
        let mut out = Vec::with_capacity(problem.bias.len());
        for (g, w) in wq.iter().enumerate() {
            let w64 = w.mapv(|v| v as f64);
            let mut wh = Array2::<f64>::zeros(w64.dim());
            general_mat_mul(1.0, &w64, &self.h[g], 0.0, &mut wh);
            let shifts = ctx.shifts(problem, g, w);
            for (r, &shift) in shifts.iter().enumerate() {
                let row = g * w64.nrows() + r;
                let b = problem.bias[row] as f64;
                let wr = w64.row(r);
                let quad: f64 = wh.row(r).iter().zip(wr.iter()).map(|(a, b)| a * b).sum();
                let wm: f64 = wr.iter().zip(&self.m[g]).map(|(a, b)| a * b).sum();
                let wxy: f64 = wr.iter().zip(self.xy[g].column(r).iter()).map(|(a, b)| a * b).sum();
                let dot = alpha * wxy + b * ctx.sy[row];
                let norm = alpha * alpha * quad + 2.0 * alpha * b * wm + ctx.vectors * b * b;
                let sum = alpha * wm + ctx.vectors * b;
                out.push(ctx.corrected(row, shift, dot, norm, sum));
            }
        }
        out
    }
}

/// EasyQuant's alternating search on one layer (module docs): `factors` ascending with 1 at
/// `one`; `corrected`: the outputs are compared with the mean shift of the weight rounding
/// removed, as `correct_bias` listed after the pass leaves them. The same result whatever the
/// thread count: each candidate is computed by one task.
pub fn search(problem: &Problem, factors: &[f32], one: usize, rounds: usize, corrected: bool, what: Search) -> Choice {
    let groups = problem.weights.len();
    let ctx = Sums::new(problem, corrected);
    let per_row = problem.weight_params.len() > 1;
    let mut weight = vec![one; problem.weight_params.len()];
    let mut input = one;
    let quantized_weights = |weight: &[usize]| -> Vec<Array2<f32>> {
        (0..groups)
            .map(|g| problem.quantized_weight(g, |r| factors[weight[if per_row { r } else { 0 }]]))
            .collect()
    };
    let evaluate = |weight: &[usize], input: usize| {
        let xq = problem.quantized_inputs(factors[input]);
        ctx.total(&problem.row_sums(&ctx, &quantized_weights(weight), &xq))
    };
    let cosine_plan = evaluate(&weight, input);
    let (mut best, mut best_state) = (cosine_plan, (weight.clone(), input));
    let mut done = 0;
    for _ in 0..rounds {
        done += 1;
        // (a) the weight scales, the input's fixed.
        // From the inputs' moments when a row is shorter than the vectors (`d² < d·M`), else
        // directly.
        let xq = problem.quantized_inputs(factors[input]);
        let by_moments = problem.weights[0].ncols() < ctx.vectors as usize;
        let moments = (what != Search::Activations && by_moments).then(|| Moments::new(&xq, &ctx.y));
        let sums: Vec<Vec<(f64, f64)>> = if what == Search::Activations {
            Vec::new()
        } else {
            (0..factors.len())
                .into_par_iter()
                .map(|k| {
                    let wq: Vec<Array2<f32>> = (0..groups)
                        .map(|g| problem.quantized_weight(g, |_| factors[k]))
                        .collect();
                    match &moments {
                        Some(moments) => moments.row_sums(problem, &ctx, &wq),
                        None => problem.row_sums(&ctx, &wq, &xq),
                    }
                })
                .collect()
        };
        drop(moments);
        if sums.is_empty() {
        } else if per_row {
            for (r, w) in weight.iter_mut().enumerate() {
                let mut top = ctx.row_cosine(r, sums[*w][r]);
                for (k, s) in sums.iter().enumerate() {
                    let c = ctx.row_cosine(r, s[r]);
                    if c > top {
                        (top, *w) = (c, k);
                    }
                }
            }
        } else {
            let mut top = ctx.total(&sums[weight[0]]);
            for (k, s) in sums.iter().enumerate() {
                let c = ctx.total(s);
                if c > top {
                    (top, weight[0]) = (c, k);
                }
            }
        }
        // (b) the input's scale, the weights' fixed.
        let wq = quantized_weights(&weight);
        let mut cos = ctx.total(&problem.row_sums(&ctx, &wq, &xq));
        drop(xq);
        if problem.search_input && problem.input.is_some() && what != Search::Weights {
            let cosines: Vec<f64> = (0..factors.len())
                .into_par_iter()
                .map(|k| ctx.total(&problem.row_sums(&ctx, &wq, &problem.quantized_inputs(factors[k]))))
                .collect();
            for (k, &c) in cosines.iter().enumerate() {
                if c > cos {
                    (cos, input) = (c, k);
                }
            }
        }
        if cos > best {
            best = cos;
            best_state = (weight.clone(), input);
        } else {
            break;
        }
    }
    Choice {
        weight: best_state.0,
        input: best_state.1,
        cosine_plan,
        cosine: best,
        rounds: done,
    }
}

// ---------------------------------------------------------------------------------------------
// apply

/// Searches the scales of every layer the plan quantizes that easyquant applies to, on the
/// first `options.samples` calibration samples (module docs), and records them in the plan.
/// Returns the notes: a summary, then one per layer.
pub fn apply(model: &Model, plan: &mut Plan, source: &DataSource, options: &Options) -> Result<Vec<String>> {
    apply_in(model, plan, source, options, Engine::Tract)
}

/// [`apply`], the layers' inputs gathered by running the model in `engine`.
pub fn apply_in(
    model: &Model,
    plan: &mut Plan,
    source: &DataSource,
    options: &Options,
    engine: Engine,
) -> Result<Vec<String>> {
    options.check().map_err(Error::Graph)?;
    if source.is_empty() {
        return Err(Error::Graph(
            "easyquant needs calibration data (`calibration: {data: …}`): it searches the scales on the layers' inputs"
                .into(),
        ));
    }
    let graph = &model.graph;
    let (factors, one) = options.factors();
    let samples = options.samples.min(source.len());
    let per_sample = options.vectors.div_ceil(samples).max(1);
    let mut skipped = Vec::new();
    let mut layers = Vec::new();
    for l in find_layers(graph, plan)? {
        match l {
            Ok(l) => layers.push(l),
            Err(note) => skipped.push(note),
        }
    }
    // Batches of layers whose gathered vectors fit GATHER_BYTES, in order.
    let bytes = |l: &Layer| l.target.columns * l.target.groups * per_sample * samples * 4;
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut held = 0;
    for (i, l) in layers.iter().enumerate() {
        if batches.is_empty() || held + bytes(l) > GATHER_BYTES {
            batches.push(Vec::new());
            held = 0;
        }
        held += bytes(l);
        batches.last_mut().expect("a batch").push(i);
    }
    let mut changed = Vec::new();
    let mut kept = Vec::new();
    let started = std::time::Instant::now();
    let mut done = 0;
    for batch in &batches {
        let inputs = gather(
            model,
            source,
            batch.iter().map(|&i| &layers[i]).collect(),
            samples,
            per_sample,
            engine,
        )?;
        for (&i, x) in batch.iter().zip(inputs) {
            let l = &layers[i];
            let t = &l.target;
            let wt = &graph.constants[&t.weight].tensor;
            let values = tensor::values_f32(wt)
                .ok_or_else(|| Error::Graph(format!("weight '{}' is not a float tensor", t.weight)))?;
            let grid = plan.weight_grid(graph, &t.weight)?;
            let wq = &plan.weights[&t.weight];
            let weights: Vec<Array2<f32>> = (0..t.groups)
                .map(|g| {
                    Array2::from_shape_fn((t.rows_per_group, t.columns), |(r, c)| {
                        values[t.flat_index(g * t.rows_per_group + r, c)]
                    })
                })
                .collect();
            let problem = Problem {
                weights,
                inputs: x,
                bias: l.bias.clone(),
                alpha: l.alpha,
                weight_params: grid.params.clone(),
                weight_dtype: wq.scheme.dtype,
                weight_range: wq.scheme.qrange(),
                input: l.input,
                search_input: l.input_kept.is_none(),
            };
            let vectors = problem.inputs.first().map_or(0, |x| x.ncols());
            let choice = search(
                &problem,
                &factors,
                one,
                options.rounds,
                options.bias_corrected,
                options.search,
            );
            let (note, improved) = record(plan, l, &choice, &factors, one, &grid.params, vectors);
            if improved {
                changed.push(note);
            } else {
                kept.push(note);
            }
            done += 1;
            let step = layers.len().div_ceil(10).max(1);
            if done % step == 0 || done == layers.len() {
                eprintln!(
                    "easyquant: {done}/{} layers, {:.1} s",
                    layers.len(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    let mut out = vec![format!(
        "easyquant: scales searched on {} layers ({} changed, {} kept the plan's), {} skipped; {samples} samples, at most {} input vectors per layer, {} factors in [{}, {}]",
        layers.len(),
        changed.len(),
        kept.len(),
        skipped.len(),
        per_sample * samples,
        factors.len(),
        options.low,
        options.high
    )];
    out.extend(changed);
    out.extend(kept);
    out.extend(skipped);
    Ok(out)
}

/// Writes a layer's choice into the plan; its note, and whether it changed anything.
fn record(
    plan: &mut Plan,
    l: &Layer,
    choice: &Choice,
    factors: &[f32],
    one: usize,
    params: &[QParams],
    vectors: usize,
) -> (String, bool) {
    let t = &l.target;
    let moved = choice.weight.iter().filter(|&&k| k != one).count();
    if choice.cosine <= choice.cosine_plan || (moved == 0 && choice.input == one) {
        let why = l.input_kept.as_deref().map(|w| format!("; {w}")).unwrap_or_default();
        return (
            format!(
                "kept the plan's scales for {}: no better cosine on {vectors} input vectors ({:.6}){why}",
                t.label, choice.cosine_plan
            ),
            false,
        );
    }
    let mut parts = Vec::new();
    if moved > 0 {
        let chosen: Vec<f32> = choice.weight.iter().map(|&k| factors[k]).collect();
        let (lo, hi) = chosen
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &f| (a.min(f), b.max(f)));
        parts.push(format!(
            "weight scales ×{lo:.3}–{hi:.3} ({moved} of {} changed)",
            chosen.len()
        ));
        let wq = &plan.weights[&t.weight];
        let scaled_params = params.iter().zip(&chosen).map(|(&p, &f)| scaled(p, f)).collect();
        plan.scaled.insert(
            t.weight.clone(),
            ScaledWeight {
                scheme: wq.scheme,
                axis: wq.axis,
                params: scaled_params,
            },
        );
        if plan.rounded.remove(&t.weight).is_some() {
            parts.push(
                "the rounding chosen before on the plan's grid dropped (list easyquant before gptq and adaround)"
                    .into(),
            );
        }
    }
    if choice.input != one {
        let a = plan
            .activations
            .get_mut(&t.input)
            .expect("a searched input is quantized");
        a.params = scaled(a.params, factors[choice.input]);
        parts.push(format!("input '{}' scale ×{:.3}", t.input, factors[choice.input]));
    } else if let Some(why) = &l.input_kept {
        parts.push(format!("input scale kept: {why}"));
    }
    (
        format!(
            "searched {}: cosine {:.6} → {:.6} on {vectors} input vectors in {} rounds; {}",
            t.label,
            choice.cosine_plan,
            choice.cosine,
            choice.rounds,
            parts.join("; ")
        ),
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_factors_hold_one_exactly() {
        let paper = Options {
            high: 2.0,
            ..Options::default()
        };
        let (f, one) = paper.factors();
        assert_eq!(f.len(), 100);
        assert_eq!(f[one], 1.0);
        assert_eq!((f[0], f[99]), (0.5, 2.0));
        let (f, one) = Options::default().factors();
        assert_eq!((f.len(), one, f[0]), (100, 99, 0.5));
        assert_eq!(f[one], 1.0);
        // 0.5 + 1.5·i/7 misses 1: it is added.
        let (f, one) = Options { steps: 8, ..paper }.factors();
        assert_eq!(f.len(), 9);
        assert_eq!(f[one], 1.0);
        assert!(f.windows(2).all(|w| w[0] < w[1]));
    }
}
