//! `gptq`: rounding-aware weight quantization (Frantar et al., "GPTQ: Accurate Post-Training
//! Quantization for Generative Pre-trained Transformers", ICLR 2023, built on the Optimal Brain
//! Quantizer of Frantar & Alistarh, "Optimal Brain Compression", NeurIPS 2022). Rounding each
//! weight to its nearest grid point minimises the weight error, not the layer's output error;
//! on layers with few weights per output (a stem's 3×3×3, a depthwise 3×3) and strongly
//! correlated inputs (neighbouring pixels), choosing the roundings together does much better.
//!
//! Maths. One output row `w` (an output channel's `d` weights: Conv `C_in/group·Πk`, Gemm and
//! MatMul `K`) and its input vectors `x` (Conv: the im2col patches of the row's group, zero
//! padding included; Gemm/MatMul: the rows of A). The output error of a rounding `w̃` is
//! `E = Σ_x ((w̃ − w)·x)² = (w̃ − w) H (w̃ − w)ᵀ` with `H = Σ x xᵀ` (uncentred, so the mean shift
//! counts too). GPTQ quantizes the columns in order; after rounding column `i` it spreads the
//! error over the columns not yet rounded so that `E` stays minimal given the choices made:
//! `δ = (w_i − w̃_i) / U_ii`, `w_j −= δ·U_ij` for `j > i`, where `U` is the upper Cholesky factor
//! of `H⁻¹` (`H⁻¹ = UᵀU`). `H` gets `λ = 1%` of its mean diagonal added first (GPTQ's damping),
//! and a column whose input is always zero is rounded to nearest.
//!
//! The grid is the plan's: scales and zero points come from [`params::quantize_weights`] on the
//! float weight (or are those `easyquant` chose, `Plan::weight_grid`), exactly as without this
//! pass; only which grid point each weight takes changes.
//! The float model is untouched: the choice is kept in the plan (`Plan::rounded`), which
//! `materialize` and `correct_bias` read. So `correct_bias`, which runs after this, removes
//! what mean shift is left.
//!
//! Skipped, with the reason: a weight the plan does not quantize or quantizes for several
//! layers, FP8 weights (not an integer grid), ConvTranspose, Gemm with `transA = 1`, a MatMul whose weight is not its 2-D second
//! input, Conv with `auto_pad`, and a layer whose calibration gives fewer than
//! [`MIN_ROWS_PER_COLUMN`]` · d` input vectors: `H` is then a poor estimate of the input
//! covariance, and rounding fitted to it does worse on new data (measured on efficientnet_lite1
//! with a numpy prototype of this pass: GPTQ on every layer 17.1 dB, on the layers with at
//! least 10 to 200 vectors per column 20.9–21.2 dB, nearest rounding 17.9 dB). A
//! layer where GPTQ does not lower `E` on the calibration data keeps nearest rounding. Beyond
//! [`MAX_ROWS_PER_COLUMN`]` · d` vectors, `H` is summed over an evenly spaced subset of them.

use std::collections::HashMap;

use rayon::prelude::*;
use tract_onnx::prelude::tract_ndarray::{Array2, ArrayView2, Zip};

use super::{Context, Pass};
use crate::calib::source::DataSource;
use crate::calib::stats::{ride, Rider};
use crate::error::{Error, Result};
use crate::ir::ops::{self, AutoPad};
use crate::ir::tensor;
use crate::ir::{Graph, Model, Node};
use crate::quant::params::{self, QuantizedTensor};
use crate::quant::plan::{Plan, RoundedWeight};
use crate::runtime::{Engine, EngineRunner};
use tract_onnx::prelude::Tensor;

/// Input vectors per weight column below which a layer keeps nearest rounding (module docs).
pub const MIN_ROWS_PER_COLUMN: usize = 100;
/// GPTQ's damping: this fraction of the mean diagonal of `H` is added to its diagonal.
const DAMPING: f64 = 0.01;
/// Conv patches are gathered this many output positions at a time (bounded memory).
const PATCH_CHUNK: usize = 4096;
/// Input vectors per weight column beyond which `H` is estimated from an evenly spread subset:
/// its entries then have a relative standard error of about 1/√1000 ≈ 3%, well below what moves
/// a rounding, while the cost of `H` (vectors · d²) stays bounded on high-resolution inputs (a
/// 416×416 detector's first layers read millions of patches).
const MAX_ROWS_PER_COLUMN: usize = 1000;
/// Rows wider than this keep nearest rounding: `H` costs `vectors · d²` ≥ 100·d³.
const MAX_COLUMNS: usize = 256;

pub struct Gptq;

impl Pass for Gptq {
    fn name(&self) -> &'static str {
        "gptq"
    }

    fn phase(&self) -> super::Phase {
        super::Phase::Plan
    }

    fn requires(&self) -> &'static [super::Requirement] {
        &[super::Requirement::CalibrationData(
            "fits the weight rounding to the layers' inputs (it has no data-free mode)",
        )]
    }

    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        learn_from_layer_inputs(
            "gptq",
            "it fits the rounding to the layers' inputs",
            model,
            ctx,
            apply_measured,
        )
    }
}

/// Runs a pass that learns from the layers' inputs (gptq, adaround): `learn` gets the part of
/// the model tract runs (with a Loop tract cannot run, calib::control_flow), the plan, the
/// calibration data and the layer inputs calibration's run measured, when it did. Timed.
pub(crate) fn learn_from_layer_inputs(
    pass: &str,
    why: &str,
    model: &Model,
    ctx: &mut Context,
    learn: impl FnOnce(&Model, &mut Plan, &DataSource, Option<Measured>, Engine) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    let started = std::time::Instant::now();
    let (Some(plan), Some(source)) = (ctx.plan.as_mut(), ctx.calibration.as_ref()) else {
        return Err(Error::Graph(format!(
            "{pass} needs calibration data (`calibration: {{data: …}}`) and a plan: {why}"
        )));
    };
    let runnable = crate::calib::control_flow::runnable(ctx.control_flow.as_ref(), model)?;
    let notes = learn(&runnable, plan, source, ctx.layer_inputs.take(), ctx.engine)?;
    eprintln!("onnxq: {pass} took {:.1} s", started.elapsed().as_secs_f64());
    Ok(notes)
}

/// How a layer's input vectors are read from its input tensor.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Reader {
    /// Conv: im2col patches per group.
    Conv(ConvWindow),
    /// Gemm (transA = 0) and MatMul: the input's last axis holds the `d` features.
    Rows { features: usize },
}

/// A Conv's sliding window (explicit pads).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ConvWindow {
    group: usize,
    channels_per_group: usize,
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    pads_begin: Vec<usize>,
    pads_end: Vec<usize>,
}

impl ConvWindow {
    /// The output's spatial dims for an input of `shape` (checked against the layer).
    pub(crate) fn output_dims(&self, shape: &[usize]) -> std::result::Result<Vec<usize>, String> {
        let rank = self.kernel.len();
        let channels = self.group * self.channels_per_group;
        if shape.len() != rank + 2 || shape[1] != channels {
            return Err(format!(
                "input of shape {shape:?} does not fit a {rank}-D Conv with {channels} input channels"
            ));
        }
        (0..rank)
            .map(|a| {
                let span = self.dilations[a] * (self.kernel[a] - 1) + 1;
                let padded = shape[2 + a] + self.pads_begin[a] + self.pads_end[a];
                if padded < span {
                    return Err(format!("input of shape {shape:?} is smaller than the kernel"));
                }
                Ok((padded - span) / self.strides[a] + 1)
            })
            .collect()
    }
}

impl Reader {
    /// How many input vectors one tensor of `shape` gives.
    pub(crate) fn vectors(&self, shape: &[usize]) -> std::result::Result<usize, String> {
        match self {
            Reader::Rows { features } => {
                if shape.last() != Some(features) {
                    return Err(format!("input of shape {shape:?} does not end in {features} features"));
                }
                Ok(shape.iter().product::<usize>() / features.max(&1))
            }
            Reader::Conv(w) => Ok(shape[0] * w.output_dims(shape)?.iter().product::<usize>()),
        }
    }
}

/// Where weight element (row, column) sits in the flat weight.
#[derive(Clone, Copy, Debug, PartialEq)]
enum WeightOrder {
    /// `[rows, columns]` row-major (Conv `[C_out, C_in/group·Πk]`, Gemm transB = 1).
    RowMajor,
    /// `[columns, rows]` (Gemm transB = 0, MatMul `[K, N]`).
    ColumnMajor,
}

/// A layer whose weight rounding is fitted to its inputs (by gptq or adaround): its input, its
/// weight and how the weight's rows (output channels) and columns sit in it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Target {
    pub(crate) label: String,
    pub(crate) input: String,
    pub(crate) weight: String,
    pub(crate) reader: Reader,
    order: WeightOrder,
    /// Output rows and columns per group.
    pub(crate) rows_per_group: usize,
    pub(crate) columns: usize,
    pub(crate) groups: usize,
}

impl Target {
    /// The weight's axis holding the output rows (per-channel parameters run along it).
    pub(crate) fn output_axis(&self) -> usize {
        match self.order {
            WeightOrder::RowMajor => 0,
            WeightOrder::ColumnMajor => 1,
        }
    }

    pub(crate) fn flat_index(&self, row: usize, column: usize) -> usize {
        match self.order {
            WeightOrder::RowMajor => row * self.columns + column,
            WeightOrder::ColumnMajor => column * self.rows_per_group * self.groups + row,
        }
    }
}

pub(crate) fn read_target(graph: &Graph, n: &Node, weight: &str) -> std::result::Result<Target, String> {
    let wt = &graph.constants[weight].tensor;
    let dims: Vec<usize> = wt.dims.iter().map(|&d| d.max(0) as usize).collect();
    if tensor::element_count(wt) != dims.iter().product::<usize>() as u64 {
        return Err(format!("weight '{weight}' has a bad element count"));
    }
    let bad_shape = || format!("weight '{weight}' of shape {dims:?} does not fit a {}", n.op_type);
    let input = n.inputs[0].clone();
    let (reader, order, rows_per_group, columns, groups) = match n.op_type.as_str() {
        "Conv" => {
            let conv = ops::Conv::view(n)?;
            let group = conv.group;
            if dims.len() < 3 || !dims[0].is_multiple_of(group) {
                return Err(bad_shape());
            }
            if conv.auto_pad != AutoPad::NotSet {
                return Err("Conv with auto_pad (explicit pads only)".into());
            }
            let kernel = dims[2..].to_vec();
            let rank = kernel.len();
            let (pads_begin, pads_end) = conv.pads(rank)?;
            let reader = Reader::Conv(ConvWindow {
                group,
                channels_per_group: dims[1],
                strides: conv.strides(rank)?,
                dilations: conv.dilations(rank)?,
                pads_begin,
                pads_end,
                kernel: kernel.clone(),
            });
            let columns = dims[1] * kernel.iter().product::<usize>();
            (reader, WeightOrder::RowMajor, dims[0] / group, columns, group)
        }
        "Gemm" => {
            let gemm = ops::Gemm::view(n)?;
            if gemm.trans_a {
                return Err("Gemm with transA = 1 (the features of A are on axis 0)".into());
            }
            if dims.len() != 2 {
                return Err(bad_shape());
            }
            let trans_b = gemm.trans_b;
            let (rows, columns) = if trans_b {
                (dims[0], dims[1])
            } else {
                (dims[1], dims[0])
            };
            let order = if trans_b {
                WeightOrder::RowMajor
            } else {
                WeightOrder::ColumnMajor
            };
            (Reader::Rows { features: columns }, order, rows, columns, 1)
        }
        "MatMul" => {
            let matmul = ops::MatMul::view(n)?;
            if dims.len() != 2 || n.inputs[matmul.weight_slot] != weight {
                return Err("MatMul whose weight is not its 2-D second input".into());
            }
            (
                Reader::Rows { features: dims[0] },
                WeightOrder::ColumnMajor,
                dims[1],
                dims[0],
                1,
            )
        }
        other => return Err(format!("{other} is not supported (Conv, Gemm and MatMul are)")),
    };
    Ok(Target {
        label: n.label(),
        input,
        weight: weight.to_string(),
        reader,
        order,
        rows_per_group,
        columns,
        groups,
    })
}

/// The layers whose weight the plan quantizes, in topological order: a target, or the reason
/// it is skipped.
fn find_targets(graph: &Graph, plan: &Plan) -> Result<Vec<std::result::Result<Target, (String, String)>>> {
    Ok(plan
        .weighted_layers(graph)?
        .into_iter()
        .map(|(ix, weight)| {
            let n = &graph.nodes[ix];
            let wq = &plan.weights[weight];
            match wq.consumers.len() {
                _ if wq.codebook.is_some() => Err(format!(
                    "weight '{weight}' is a codebook: its values are clustered, not rounded onto a grid"
                )),
                // The rounding is chosen on a uniform integer grid; FP8's is not one.
                _ if wq.scheme.dtype.float8().is_some() => Err(format!(
                    "weight '{weight}' is {}: the rounding is chosen on an integer grid",
                    wq.scheme.dtype
                )),
                // Ternary and binary codes follow their threshold rule: nothing to round.
                _ if wq.scheme.dtype.is_ternary_or_binary() => Err(format!(
                    "weight '{weight}' is {}: its values follow the sign rule, not a rounding",
                    wq.scheme.dtype
                )),
                1 => read_target(graph, n, weight),
                k => Err(format!("weight '{weight}' is shared by {k} layers")),
            }
            .map_err(|r| (n.label(), r))
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// statistics: H = Σ x xᵀ per group

/// One layer's `H` per group (`columns × columns`) and the number of input vectors seen.
pub struct Gram {
    pub(crate) per_group: Vec<Array2<f64>>,
    pub(crate) rows: u64,
}

impl Gram {
    fn new(t: &Target) -> Gram {
        Gram {
            per_group: vec![Array2::zeros((t.columns, t.columns)); t.groups],
            rows: 0,
        }
    }

    /// Adds one sample's contribution ([`contribution`]), in the order it was made.
    fn absorb(&mut self, c: Contribution) {
        for (g, product) in c.products {
            Zip::from(&mut self.per_group[g])
                .and(&product)
                .for_each(|h, &p| *h += p as f64);
        }
        self.rows += c.rows;
    }
}

/// Every `step`-th input vector is added when all samples give `vectors` (see
/// [`MAX_ROWS_PER_COLUMN`]).
fn step_for(t: &Target, vectors: u64) -> usize {
    let cap = (MAX_ROWS_PER_COLUMN * t.columns) as u64;
    vectors.div_ceil(cap).max(1) as usize
}

/// The vectors of sample `sample` that are added: indices `i` with `(i + sample) % step == 0`
/// (the offset moves with the sample, so that every position is seen across samples).
pub(crate) fn picked(step: usize, count: usize, sample: usize) -> impl Iterator<Item = usize> {
    let first = (step - sample % step) % step;
    (first..count).step_by(step)
}

/// One sample's share of a layer's `H`: the f32 products `xᵀx` of its picked input vectors, a
/// chunk at a time, with the group each goes to, in the order they are summed; and how many
/// vectors that is. Made while the sample's tensor is alive, so the tensor is never copied.
pub struct Contribution {
    products: Vec<(usize, Array2<f32>)>,
    rows: u64,
}

/// The input vectors of one sample's input tensor (`values` of shape `shape`), picked every
/// `step`-th.
fn contribution(
    t: &Target,
    step: usize,
    values: &[f32],
    shape: &[usize],
    sample: usize,
) -> std::result::Result<Contribution, String> {
    let mut products = Vec::new();
    let rows = match &t.reader {
        Reader::Rows { features } => {
            let count = t.reader.vectors(shape)?;
            let picked: Vec<usize> = picked(step, count, sample).collect();
            let mut x = Vec::with_capacity(picked.len().min(PATCH_CHUNK) * features);
            for chunk in picked.chunks(PATCH_CHUNK) {
                x.clear();
                for &r in chunk {
                    x.extend_from_slice(&values[r * features..][..*features]);
                }
                let x = ArrayView2::from_shape((chunk.len(), *features), &x[..]).map_err(|e| e.to_string())?;
                products.push((0, x.t().dot(&x)));
            }
            picked.len() as u64
        }
        Reader::Conv(window) => {
            let picked: Vec<usize> = picked(step, window.output_dims(shape)?.iter().product(), sample).collect();
            // f32 products within a chunk (a relative error of ~1e-4), f64 across chunks.
            conv_patches(t, window, &picked, values, shape, |g, xt| {
                products.push((g, xt.dot(&xt.t())));
                Ok(())
            })?;
            (shape[0] * picked.len()) as u64
        }
    };
    Ok(Contribution { products, rows })
}

/// The im2col patches of a Conv's input at the output positions `picked` (of every batch entry
/// in turn), a chunk of at most [`PATCH_CHUNK`] positions and one group at a time: `each(group,
/// xt)` gets the chunk transposed, one row per column of the weight (`c·taps + k`) and one
/// element per position, zero in the padding. The buffer is reused between calls.
pub(crate) fn conv_patches(
    t: &Target,
    window: &ConvWindow,
    picked: &[usize],
    values: &[f32],
    shape: &[usize],
    mut each: impl FnMut(usize, ArrayView2<f32>) -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    let ConvWindow {
        channels_per_group,
        kernel,
        strides,
        dilations,
        pads_begin,
        ..
    } = window;
    let rank = kernel.len();
    let out_dims = window.output_dims(shape)?;
    let spatial = &shape[2..];
    let taps: usize = kernel.iter().product();
    let in_size: usize = spatial.iter().product();
    let channels = shape[1];
    // Where in an input plane tap `tap` of output position `p` reads; None in the padding.
    let tap_offset = |p: usize, tap: usize| -> Option<usize> {
        let (mut p, mut tap) = (p, tap);
        let mut offset = 0;
        for a in (0..rank).rev() {
            let (o, k) = (p % out_dims[a], tap % kernel[a]);
            p /= out_dims[a];
            tap /= kernel[a];
            let i = (o * strides[a] + k * dilations[a]) as isize - pads_begin[a] as isize;
            if i < 0 || i as usize >= spatial[a] {
                return None;
            }
            let stride: usize = spatial[a + 1..].iter().product();
            offset += i as usize * stride;
        }
        Some(offset)
    };
    // One buffer for every chunk and group (a fresh zeroed matrix each time cost more than
    // the products on efficientnet_lite1).
    let mut xt = vec![0f32; t.columns * picked.len().min(PATCH_CHUNK)];
    for batch in 0..shape[0] {
        let image = &values[batch * channels * in_size..][..channels * in_size];
        for chunk in picked.chunks(PATCH_CHUNK) {
            let count = chunk.len();
            // Tap-major: offsets[k·count + r], None in the padding.
            let offsets: Vec<Option<usize>> = (0..taps)
                .flat_map(|k| chunk.iter().map(move |&p| (p, k)))
                .map(|(p, k)| tap_offset(p, k))
                .collect();
            let xt = &mut xt[..t.columns * count];
            for g in 0..t.groups {
                for c in 0..*channels_per_group {
                    let plane = &image[(g * channels_per_group + c) * in_size..][..in_size];
                    for k in 0..taps {
                        let row = &mut xt[(c * taps + k) * count..][..count];
                        for (x, o) in row.iter_mut().zip(&offsets[k * count..][..count]) {
                            *x = o.map_or(0.0, |o| plane[o]);
                        }
                    }
                }
                let xt = ArrayView2::from_shape((t.columns, count), &*xt).map_err(|e| e.to_string())?;
                each(g, xt)?;
            }
        }
    }
    Ok(())
}

/// gptq's layer statistics as a calibration [`Rider`]: every target's `H`, from the layer
/// inputs of each sample as the engine produces them. A layer whose samples give fewer than
/// [`MIN_ROWS_PER_COLUMN`] input vectors per column (known from any sample: the runner's input
/// shapes are fixed) is not measured, and says why. Each layer input is reduced to its sample's
/// [`Contribution`] while the engine holds it (the tensor is neither copied nor held past its last
/// reader), and each layer adds its samples' contributions in sample order, so the sums do not
/// depend on the thread count, nor on whether the samples ran for gptq alone ([`gram_matrices`])
/// or in calibration's run of the model (`pipeline::stages::Calibrate`, when gptq is the first
/// pass after it: [`LayerInputs::before_plan`]).
pub struct LayerInputs<'s> {
    targets: Vec<Target>,
    /// Which targets read each tensor.
    readers: HashMap<String, Vec<usize>>,
    source: &'s DataSource,
}

/// Sample `sample`'s share of every target: how many vectors all samples give (from this
/// sample's shape, the same for every sample), or why the layer is not measured; and its
/// contribution.
pub struct SampleShare {
    sample: usize,
    targets: Vec<Option<TargetShare>>,
}

/// One target's share of a sample: the vectors all samples give or why it is not measured, and
/// the sample's contribution when it is.
type TargetShare = (std::result::Result<u64, String>, Option<Contribution>);

/// Every target's `H` or why it is not measured; None before the first sample.
pub type Grams = Vec<Option<std::result::Result<Gram, String>>>;

/// The layer statistics calibration's run measured for gptq, handed over in
/// [`Context::layer_inputs`]: the layers, each with its `H` or why it is not measured.
pub struct Measured {
    layers: Vec<(Target, std::result::Result<Gram, String>)>,
}

impl<'s> LayerInputs<'s> {
    fn new(targets: Vec<Target>, source: &'s DataSource) -> LayerInputs<'s> {
        let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
        for (ti, t) in targets.iter().enumerate() {
            readers.entry(t.input.clone()).or_default().push(ti);
        }
        LayerInputs {
            targets,
            readers,
            source,
        }
    }

    /// What gptq may ask for once the plan exists: every layer whose weight a plan can quantize
    /// and whose layout gptq reads ([`read_target`]), so calibration's run can measure them
    /// before the plan is known (the plan's targets are among them; the others cost their `H`).
    pub fn before_plan(model: &Model, source: &'s DataSource) -> Result<LayerInputs<'s>> {
        let graph = &model.graph;
        let mut targets = Vec::new();
        for ix in graph.topological_order()? {
            let n = &graph.nodes[ix];
            let Some(slot) = crate::quant::rules::rule_for(n).and_then(|r| r.weight).map(|w| w.slot) else {
                continue;
            };
            let Some(weight) = n.inputs.get(slot).filter(|w| graph.constants.contains_key(*w)) else {
                continue;
            };
            if let Ok(t) = read_target(graph, n, weight) {
                targets.push(t);
            }
        }
        Ok(LayerInputs::new(targets, source))
    }

    /// The statistics of every layer, once every sample is absorbed into `sum`.
    pub fn measured(self, sum: Grams) -> Result<Measured> {
        let layers = self
            .targets
            .into_iter()
            .zip(sum)
            .map(|(t, g)| {
                let g = g.ok_or_else(|| missing(&t))?;
                Ok((t, g))
            })
            .collect::<Result<_>>()?;
        Ok(Measured { layers })
    }
}

fn missing(t: &Target) -> Error {
    Error::Runtime(format!("gptq: no value for '{}'", t.input))
}

impl Rider for LayerInputs<'_> {
    type Share = SampleShare;
    type Sum = Grams;

    fn tensors(&self) -> Vec<String> {
        let mut wanted: Vec<String> = self.readers.keys().cloned().collect();
        wanted.sort();
        wanted
    }

    fn start(&self, sample: usize) -> SampleShare {
        SampleShare {
            sample,
            targets: (0..self.targets.len()).map(|_| None).collect(),
        }
    }

    fn visit(&self, share: &mut SampleShare, name: &str, tensor: &Tensor) -> Result<()> {
        let Some(tis) = self.readers.get(name) else {
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
        let (i, total) = (share.sample, self.source.len());
        let shape = tensor.shape();
        for &ti in tis {
            let t = &self.targets[ti];
            let at = |e: String| Error::data(self.source.sample_label(i), format!("gptq: {}: {e}", t.label));
            let vectors = t.reader.vectors(shape).map_err(at)? as u64 * total as u64;
            let needed = MIN_ROWS_PER_COLUMN as u64 * t.columns as u64;
            let measured = if t.columns > MAX_COLUMNS {
                Err(format!(
                    "nearest rounding {}: {} columns, more than the {MAX_COLUMNS} whose H is worth its cost",
                    t.label, t.columns
                ))
            } else if vectors >= needed {
                Ok(vectors)
            } else {
                Err(format!(
                    "nearest rounding {}: {vectors} input vectors for {} columns, fewer than the {MIN_ROWS_PER_COLUMN} per column that estimate H",
                    t.label, t.columns
                ))
            };
            let contribution = match &measured {
                Ok(vectors) => Some(contribution(t, step_for(t, *vectors), values, shape, i).map_err(at)?),
                Err(_) => None,
            };
            share.targets[ti] = Some((measured, contribution));
        }
        Ok(())
    }

    fn empty(&self) -> Grams {
        (0..self.targets.len()).map(|_| None).collect()
    }

    fn absorb(&self, sum: &mut Grams, share: SampleShare) -> Result<()> {
        for ((gram, t), s) in sum.iter_mut().zip(&self.targets).zip(share.targets) {
            let (measured, contribution) = s.ok_or_else(|| missing(t))?;
            match gram {
                // The first sample decides which layers are measured.
                None => {
                    *gram = Some(measured.map(|_| {
                        let mut gram = Gram::new(t);
                        gram.absorb(contribution.expect("a measured layer has its contribution"));
                        gram
                    }))
                }
                Some(Ok(gram)) => {
                    if let Some(c) = contribution {
                        gram.absorb(c);
                    }
                }
                Some(Err(_)) => {}
            }
        }
        Ok(())
    }
}

impl Measured {
    /// The statistics of `t`, when calibration measured that very layer (taken out).
    fn take(&mut self, t: &Target) -> Option<std::result::Result<Gram, String>> {
        let at = self.layers.iter().position(|(m, _)| m == t)?;
        Some(self.layers.swap_remove(at).1)
    }
}

/// Runs the float model over the calibration samples for gptq alone and accumulates every
/// target's `H`, or says why not ([`LayerInputs`]): the first sample runs first, and the others
/// only if it leaves a layer to measure. As many samples run at once as the memory budget fits.
fn gram_matrices(
    model: &Model,
    source: &DataSource,
    targets: Vec<Target>,
    progress_label: &'static str,
    engine: Engine,
) -> Result<Vec<std::result::Result<Gram, String>>> {
    let rider = LayerInputs::new(targets, source);
    let shapes = source.sample_shapes()?;
    let input_names: Vec<String> = shapes.iter().map(|(n, _, _)| n.clone()).collect();
    let extra: Vec<String> = rider
        .tensors()
        .into_iter()
        .filter(|n| !input_names.contains(n))
        .collect();
    let runner = EngineRunner::new(engine, model, &shapes, &extra)?;
    let total = source.len();
    let parallel = runner.parallelism()?;
    let progress = crate::calib::stats::Progress::new(progress_label, total as u64, &runner.progress_detail(&parallel));
    let mut sum = rider.empty();
    if total > 0 {
        ride(&runner, source, &rider, 0..1, parallel.samples, &mut sum, &progress)?;
        if sum.iter().any(|g| matches!(g, Some(Ok(_)))) {
            ride(&runner, source, &rider, 1..total, parallel.samples, &mut sum, &progress)?;
        }
    }
    progress.finish();
    Ok(rider.measured(sum)?.layers.into_iter().map(|(_, g)| g).collect())
}

// ---------------------------------------------------------------------------------------------
// the rounding

/// Lower Cholesky factor of a symmetric positive definite matrix; None if it is not.
fn cholesky(a: &Array2<f64>) -> Option<Array2<f64>> {
    let n = a.nrows();
    let mut l = Array2::<f64>::zeros((n, n));
    for j in 0..n {
        let mut d = a[[j, j]];
        for k in 0..j {
            d -= l[[j, k]] * l[[j, k]];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        l[[j, j]] = d;
        for i in j + 1..n {
            let mut s = a[[i, j]];
            for k in 0..j {
                s -= l[[i, k]] * l[[j, k]];
            }
            l[[i, j]] = s / d;
        }
    }
    Some(l)
}

/// Inverse of `L Lᵀ` from the lower factor `L`.
fn inverse_from_cholesky(l: &Array2<f64>) -> Array2<f64> {
    let n = l.nrows();
    // L⁻¹ by forward substitution, then (L Lᵀ)⁻¹ = L⁻ᵀ L⁻¹.
    let mut inv = Array2::<f64>::zeros((n, n));
    for c in 0..n {
        for i in c..n {
            let mut s = if i == c { 1.0 } else { 0.0 };
            for k in c..i {
                s -= l[[i, k]] * inv[[k, c]];
            }
            inv[[i, c]] = s / l[[i, i]];
        }
    }
    inv.t().dot(&inv)
}

/// The upper factor `U` of `H⁻¹ = UᵀU` after damping; dead columns (zero diagonal) get 1 on the
/// diagonal. None if `H` is not finite. Retries with 10× the damping a few times if `H` is not numerically definite.
fn inverse_factor(h: &Array2<f64>) -> Option<Array2<f64>> {
    let n = h.nrows();
    let mean_diagonal = (0..n).map(|i| h[[i, i]]).sum::<f64>() / n.max(1) as f64;
    if !mean_diagonal.is_finite() {
        return None;
    }
    // An input that is always zero (a dead channel's group): every column is dead, U is diagonal
    // and the rounding is nearest.
    let mean_diagonal = if mean_diagonal > 0.0 { mean_diagonal } else { 1.0 };
    let mut damping = DAMPING;
    for _ in 0..4 {
        let mut damped = h.clone();
        for i in 0..n {
            if damped[[i, i]] == 0.0 {
                damped[[i, i]] = 1.0;
            }
            damped[[i, i]] += damping * mean_diagonal;
        }
        if let Some(l) = cholesky(&damped) {
            let hinv = inverse_from_cholesky(&l);
            return cholesky(&hinv).map(|lh| lh.t().to_owned());
        }
        damping *= 10.0;
    }
    None
}

/// `(w̃ − w) H (w̃ − w)ᵀ` of one row.
pub(crate) fn output_error(delta: &[f64], h: &Array2<f64>) -> f64 {
    let n = delta.len();
    let mut e = 0.0;
    for i in 0..n {
        if delta[i] == 0.0 {
            continue;
        }
        let mut s = 0.0;
        for j in 0..n {
            s += h[[i, j]] * delta[j];
        }
        e += delta[i] * s;
    }
    e
}

/// GPTQ on one row: the integer value of each column, quantized with `quant` (the plan's grid
/// for this row) in column order, each rounding error spread over the later columns by `U`.
fn round_row(w: &[f64], u: &Array2<f64>, quant: impl Fn(usize, f64) -> (i32, f64)) -> Vec<(i32, f64)> {
    let mut w = w.to_vec();
    let mut out = Vec::with_capacity(w.len());
    for i in 0..w.len() {
        let (q, dq) = quant(i, w[i]);
        out.push((q, dq));
        let delta = (w[i] - dq) / u[[i, i]];
        for j in i + 1..w.len() {
            w[j] -= delta * u[[i, j]];
        }
    }
    out
}

/// Result of one layer: the chosen integers (None: keep nearest) and the note.
fn round_layer(
    t: &Target,
    gram: &Gram,
    weights: &[f32],
    nearest: &QuantizedTensor,
    qrange: (i32, i32),
) -> (Option<Vec<i32>>, String) {
    let dtype = nearest.dtype;
    let (mut error_nearest, mut error_gptq) = (0.0, 0.0);
    let mut values = nearest.values.clone();
    for (g, h) in gram.per_group.iter().enumerate() {
        let Some(u) = inverse_factor(h) else {
            return (
                None,
                format!("nearest rounding {}: H of group {g} is not positive definite", t.label),
            );
        };
        // Per row: flat indices, (integer, dequantized) per column, nearest's and GPTQ's error.
        type RowResult = (Vec<usize>, Vec<(i32, f64)>, f64, f64);
        let rows: Vec<RowResult> = (0..t.rows_per_group)
            .into_par_iter()
            .map(|r| {
                let row = g * t.rows_per_group + r;
                let index: Vec<usize> = (0..t.columns).map(|c| t.flat_index(row, c)).collect();
                let w: Vec<f64> = index.iter().map(|&i| weights[i] as f64).collect();
                let (qmin, qmax) = qrange;
                let rounded = round_row(&w, &u, |c, v| {
                    let p = nearest.params_of(index[c]);
                    let q = params::quantize(v as f32, p, dtype).clamp(qmin, qmax);
                    (q, params::dequantize(q, p) as f64)
                });
                let near: Vec<f64> = index
                    .iter()
                    .zip(&w)
                    .map(|(&i, &x)| params::dequantize(nearest.values[i], nearest.params_of(i)) as f64 - x)
                    .collect();
                let ours: Vec<f64> = rounded.iter().zip(&w).map(|(&(_, dq), &x)| dq - x).collect();
                (index, rounded, output_error(&near, h), output_error(&ours, h))
            })
            .collect();
        for (index, rounded, near, ours) in rows {
            error_nearest += near;
            error_gptq += ours;
            for (i, (q, _)) in index.into_iter().zip(rounded) {
                values[i] = q;
            }
        }
    }
    if error_gptq >= error_nearest {
        return (
            None,
            format!(
                "nearest rounding {}: GPTQ did not lower the output error on the calibration data",
                t.label
            ),
        );
    }
    let ratio = if error_nearest > 0.0 {
        error_gptq / error_nearest
    } else {
        0.0
    };
    (
        Some(values),
        format!(
            "rounded {} ({} columns, {} input vectors): output error {:.3}× nearest rounding's",
            t.label, t.columns, gram.rows, ratio
        ),
    )
}

/// Chooses the rounding of every weight the plan quantizes that GPTQ applies to, from the
/// calibration data (module docs), and records it in `plan.rounded`. Returns one note per layer.
pub fn apply(model: &Model, plan: &mut Plan, source: &DataSource) -> Result<Vec<String>> {
    apply_measured(model, plan, source, None, Engine::Tract)
}

/// [`apply`], with the layer statistics calibration's run measured on the same model and
/// data when it did (`measured`): the layers it measured are not measured again.
pub fn apply_measured(
    model: &Model,
    plan: &mut Plan,
    source: &DataSource,
    measured: Option<Measured>,
    engine: Engine,
) -> Result<Vec<String>> {
    let layers = measure_layers(model, plan, source, measured, "gptq", engine)?;
    let mut notes = layers.skipped.clone();
    let mut rounded = Vec::new();
    for (t, gram) in &layers.measured {
        let (weights, nearest, qrange) = layer_weights(&model.graph, plan, t)?;
        let (values, note) = round_layer(t, gram, &weights, &nearest, qrange);
        if let Some(values) = values {
            record_rounding(plan, t, values);
            rounded.push(note);
        } else {
            notes.push(note);
        }
    }
    let mut out = vec![
        format!(
            "gptq: {} weights rounded, {} kept nearest rounding",
            rounded.len(),
            notes.len()
        ),
        layers.provenance("gptq"),
    ];
    out.extend(rounded);
    out.extend(notes);
    Ok(out)
}

/// The layers a rounding pass fits ([`measure_layers`]): each with its `H`, the notes of those
/// it leaves at nearest rounding, and where the statistics came from.
pub(crate) struct Layers {
    pub(crate) measured: Vec<(Target, Gram)>,
    /// "nearest rounding LAYER: why", in graph order of the layers.
    pub(crate) skipped: Vec<String>,
    from_calibration: usize,
    targets: usize,
}

impl Layers {
    /// The note on where the layer inputs came from.
    pub(crate) fn provenance(&self, pass: &str) -> String {
        format!(
            "layer inputs of {} layers from calibration's run of the model, {} from {pass}'s own run",
            self.from_calibration,
            self.targets - self.from_calibration
        )
    }
}

/// The layers whose weights the plan quantizes and whose rounding can be fitted, each with the
/// `H` of its inputs: taken from what calibration's run measured (`measured`) where it measured
/// that very layer, the rest from a run of the model over `source` (labelled `pass` in the
/// progress line and errors). Shared by gptq and adaround.
pub(crate) fn measure_layers(
    model: &Model,
    plan: &Plan,
    source: &DataSource,
    measured: Option<Measured>,
    pass: &'static str,
    engine: Engine,
) -> Result<Layers> {
    if source.is_empty() {
        return Err(Error::Graph(format!(
            "{pass} needs calibration data (`calibration: {{data: …}}`): it fits the rounding to the layers' inputs"
        )));
    }
    let graph = &model.graph;
    let mut skipped = Vec::new();
    let mut targets = Vec::new();
    for f in find_targets(graph, plan)? {
        match f {
            Ok(t) => targets.push(t),
            Err((label, reason)) => skipped.push(format!("nearest rounding {label}: {reason}")),
        }
    }
    // What calibration measured, and the rest measured now.
    let mut measured = measured.unwrap_or(Measured { layers: Vec::new() });
    let mut grams: Vec<Option<std::result::Result<Gram, String>>> = targets.iter().map(|t| measured.take(t)).collect();
    let from_calibration = grams.iter().filter(|g| g.is_some()).count();
    let unmeasured: Vec<Target> = targets
        .iter()
        .zip(&grams)
        .filter(|(_, g)| g.is_none())
        .map(|(t, _)| t.clone())
        .collect();
    if !unmeasured.is_empty() {
        let label = if pass == "adaround" {
            "adaround: measuring layer inputs"
        } else {
            "gptq: measuring layer inputs"
        };
        let mut measuring = gram_matrices(model, source, unmeasured, label, engine)?.into_iter();
        for g in grams.iter_mut().filter(|g| g.is_none()) {
            *g = measuring.next();
        }
    }
    let count = targets.len();
    let mut layers = Vec::new();
    for (g, t) in grams.into_iter().zip(targets) {
        match g.ok_or_else(|| missing(&t))? {
            Ok(gram) => layers.push((t, gram)),
            Err(reason) => skipped.push(reason),
        }
    }
    Ok(Layers {
        measured: layers,
        skipped,
        from_calibration,
        targets: count,
    })
}

/// A layer's float weight, its nearest rounding on the plan's grid and the grid's integer range.
pub(crate) fn layer_weights(graph: &Graph, plan: &Plan, t: &Target) -> Result<(Vec<f32>, QuantizedTensor, (i32, i32))> {
    let wt = &graph.constants[&t.weight].tensor;
    let weights =
        tensor::values_f32(wt).ok_or_else(|| Error::Graph(format!("weight '{}' is not a float tensor", t.weight)))?;
    let wq = &plan.weights[&t.weight];
    let nearest = plan.weight_grid(graph, &t.weight)?;
    Ok((weights, nearest, wq.scheme.qrange()))
}

/// Records the grid points chosen for `t`'s weight in the plan (`Plan::rounded`), which
/// `materialize` and `correct_bias` read.
pub(crate) fn record_rounding(plan: &mut Plan, t: &Target, values: Vec<i32>) {
    let wq = &plan.weights[&t.weight];
    let rounded = RoundedWeight {
        scheme: wq.scheme,
        axis: wq.axis,
        block_size: wq.block_size,
        values,
    };
    plan.rounded.insert(t.weight.clone(), rounded);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_columns_cover_each_weight_once_in_its_output_channel() {
        use crate::passes::equalize::{Kind, Layout};
        let cases = [
            (
                Kind::Conv { group: 2 },
                vec![4, 3, 2, 2],
                WeightOrder::RowMajor,
                2,
                12,
                2,
            ),
            (
                Kind::Gemm { trans_b: false },
                vec![5, 3],
                WeightOrder::ColumnMajor,
                3,
                5,
                1,
            ),
            (Kind::Gemm { trans_b: true }, vec![3, 5], WeightOrder::RowMajor, 3, 5, 1),
        ];
        for (kind, dims, order, rows_per_group, columns, groups) in cases {
            let t = Target {
                label: String::new(),
                input: String::new(),
                weight: String::new(),
                reader: Reader::Rows { features: columns },
                order,
                rows_per_group,
                columns,
                groups,
            };
            let layout = Layout {
                kind,
                dims: dims.clone(),
            };
            let channels = layout.indexer();
            let mut seen = vec![false; dims.iter().product()];
            for row in 0..rows_per_group * groups {
                for c in 0..columns {
                    let e = t.flat_index(row, c);
                    assert!(!seen[e], "{dims:?}: element {e} twice");
                    seen[e] = true;
                    assert_eq!(channels(e).0, row, "{dims:?}: element {e}");
                }
            }
            assert!(seen.iter().all(|&s| s), "{dims:?}");
        }
    }

    #[test]
    fn inverse_factor_inverts() {
        let h = Array2::from_shape_vec((3, 3), vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0]).unwrap();
        let mean = (4.0 + 3.0 + 2.0) / 3.0;
        let mut damped = h.clone();
        for i in 0..3 {
            damped[[i, i]] += DAMPING * mean;
        }
        let u = inverse_factor(&h).unwrap();
        // UᵀU · H_damped = I, and U is upper triangular.
        let product = u.t().dot(&u).dot(&damped);
        for i in 0..3 {
            for j in 0..3 {
                assert!(
                    (product[[i, j]] - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9,
                    "{product:?}"
                );
                if i > j {
                    assert_eq!(u[[i, j]], 0.0);
                }
            }
        }
    }

    #[test]
    fn correlated_inputs_round_better_than_nearest() {
        // Two nearly equal inputs: rounding one weight up and the other down cancels, which
        // nearest rounding cannot do when both fractions are above one half.
        let h = Array2::from_shape_vec((2, 2), vec![1.0, 0.99, 0.99, 1.0]).unwrap();
        let u = inverse_factor(&h).unwrap();
        let w = [0.6, 0.6];
        let quant = |_: usize, v: f64| {
            let q = v.round_ties_even();
            (q as i32, q)
        };
        let ours = round_row(&w, &u, quant);
        let delta: Vec<f64> = ours.iter().zip(&w).map(|(&(_, dq), &x)| dq - x).collect();
        let near: Vec<f64> = w.iter().map(|&x| x.round_ties_even() - x).collect();
        assert_eq!(ours.iter().map(|&(q, _)| q).collect::<Vec<_>>(), vec![1, 0]);
        assert!(output_error(&delta, &h) < 0.1 * output_error(&near, &h));
    }
}
