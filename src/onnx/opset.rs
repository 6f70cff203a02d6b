//! Raising the default-domain (ai.onnx) opset of a model, converting the nodes whose operator
//! signature or semantics changed on the way.
//!
//! Quantized QDQ models need newer opsets than many float models ship with: a per-axis
//! DequantizeLinear needs opset 13, 16-bit Q/DQ needs 21. Bumping the import is not enough:
//! operators were redefined in incompatible ways (attributes that became inputs, changed
//! semantics, deprecations), and a model that only claims the new opset fails the ONNX checker or
//! computes something else. This module walks every default-domain node (also inside If/Loop/Scan
//! bodies) through each opset at which its operator was redefined between the model's opset and
//! the target, and applies a conversion for each redefinition that is not backward compatible.
//! Every (operator, version) pair up to [`MAX_TARGET_OPSET`] is classified here, from the ONNX
//! changelog and the schemas of onnx 1.23: either compatible (types added, constraints relaxed,
//! new attributes whose default is the old behaviour) or converted. A pair nobody classified is
//! refused, so a schema table regenerated with newer operators cannot slip through unreviewed.
//!
//! Conversions (opset at which the change happened):
//! - 9  BatchNormalization: `spatial` removed (1 dropped; 0 refused). Upsample: `scales`
//!   attribute becomes an input.
//! - 10 Slice: `starts`/`ends`/`axes` attributes become int64 inputs. TopK: `k` becomes the input
//!   `K`. Dropout: the mask output becomes bool (dropped when unused, refused when read).
//!   Upsample is deprecated: it becomes Resize.
//! - 11 Clip: `min`/`max` become inputs (scalars of the input's type). Pad: `pads`/`value` become
//!   inputs. Resize: `roi` input added; Resize-10's asymmetric coordinates (and, for nearest,
//!   flooring) made explicit. Scatter is deprecated: it becomes ScatterElements.
//! - 12 Dropout: `ratio` becomes an input.
//! - 13 Softmax/LogSoftmax/Hardmax: before 13 the input was coerced to 2-D at `axis` and normalised
//!   over all trailing dimensions; from 13 over the one `axis`, whose default went from 1 to -1.
//!   Nothing changes when `axis` is the last dimension (explicitly -1, or `rank - 1` with the rank
//!   known); otherwise the node is wrapped as `Reshape(op(Flatten(x, axis), axis = -1), Shape(x))`,
//!   which is exact for any rank, known or not. Squeeze/Unsqueeze/ReduceSum/Split: `axes`/`split` become
//!   inputs. Resize: `tf_half_pixel_for_nn` removed (refused); `scales` omitted when `sizes` is
//!   given. Erf: integer types removed (refused).
//! - 14 BatchNormalization: the training outputs went (dropped when unused, refused when read).
//! - 16 RoiAlign: default `coordinate_transformation_mode` changed: the old one made explicit.
//! - 18 ReduceL1/L2/LogSum/LogSumExp/Max/Mean/Min/Prod/SumSquare: `axes` becomes an input. Split
//!   without a `split` input needs `num_outputs`.
//! - 20 DFT: `axis` becomes an input. GridSample: modes `bilinear`/`bicubic` renamed.
//! - 21 GroupNormalization: scale and bias are per channel instead of per group (repeated).
//!
//! Refused: upgrading from below opset 7, Scan-8 (batched Scan), BatchNormalization with
//! `spatial = 0` or with training outputs that are read, a Dropout mask that is read, Resize-10
//! nearest that may downsample (runtimes disagree on its rounding), Resize `tf_half_pixel_for_nn`,
//! integer Erf, GroupNormalization to opset 19 or 20 (GroupNormalization-18 is deprecated: the
//! checker rejects it below 21), local functions whose body needs a conversion, and any
//! redefinition not classified here. On refusal the model is left as it was.
//!
//! Element types and ranks the conversions need (the type of a Clip bound, the rank under a
//! Softmax) come from declared value infos and a forward inference over the common operators.
//! Created constants are named `<node>::<what>` (node name, or its first output when unnamed),
//! made unique with `_1`, `_2`, ... in the rare case of a clash; created nodes take the order key
//! of the node they belong to. An original constant a conversion replaced is removed when nothing
//! else reads it.

use std::collections::{BTreeSet, HashMap};

use petgraph::stable_graph::NodeIndex;

use crate::error::{Error, Result};
use crate::ir::tensor::{self, float_tensor, i64_tensor};
use crate::ir::{Constant, ConstantOrigin, Graph, Model, Node};
use crate::onnx::schema_since;
use crate::proto::attribute_proto::AttributeType;
use crate::proto::tensor_proto::DataType;
use crate::proto::{AttributeProto, GraphProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto};

/// Oldest default-domain opset this module upgrades from.
pub const MIN_SOURCE_OPSET: i64 = 7;
/// Newest default-domain opset this module upgrades to: every redefinition up to it is reviewed.
pub const MAX_TARGET_OPSET: i64 = 23;

/// The lowest IR version a model importing `opset` of the default domain must declare (the ONNX
/// versioning table).
pub fn min_ir_version(opset: i64) -> i64 {
    match opset {
        ..=8 => 3,
        9 => 4,
        10 => 5,
        11 => 6,
        12..=14 => 7,
        15..=18 => 8,
        19 | 20 => 9,
        21 | 22 => 10,
        23 => 11,
        24 => 12,
        25..=27 => 13,
        _ => 14,
    }
}

/// Raises the default-domain opset to `target` (no-op if already ≥ target: it never lowers it),
/// converting every node whose signature changed between the model's opset and `target`, and
/// raises the IR version when the target needs a newer one. Returns one note per converted node
/// for the report. Refuses (Err, naming node and op) when an op cannot be converted, leaving the
/// model unchanged.
pub fn upgrade_opset(model: &mut Model, target: i64) -> Result<Vec<String>> {
    match model.opset("") {
        Some(current) if current >= target => Ok(Vec::new()),
        _ => convert_opset(model, target),
    }
}

/// Sets the default-domain opset to exactly `target`, converting nodes as [`upgrade_opset`]
/// does. Refuses a downgrade (a target below the model's opset).
pub fn convert_opset(model: &mut Model, target: i64) -> Result<Vec<String>> {
    if !(MIN_SOURCE_OPSET..=MAX_TARGET_OPSET).contains(&target) {
        return Err(Error::Graph(format!(
            "cannot convert to opset ai.onnx {target}: onnxq converts to opsets {MIN_SOURCE_OPSET} to {MAX_TARGET_OPSET}"
        )));
    }
    let Some(from) = model.opset("") else {
        // No default-domain import: nothing to convert, provided no node needs one.
        if let Some(n) = model.graph.nodes.node_weights().find(|n| n.is_default_domain()) {
            return Err(Error::Graph(format!(
                "{} is in the default domain, which the model does not import",
                n.label()
            )));
        }
        model.header.opset_import.push(OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(target),
        });
        raise_ir_version(model, target);
        return Ok(Vec::new());
    };
    if target < from {
        return Err(Error::Graph(format!(
            "refusing to downgrade the model from opset ai.onnx {from} to {target}: onnxq only raises opsets"
        )));
    }
    if target == from {
        return Ok(Vec::new());
    }
    if from < MIN_SOURCE_OPSET {
        return Err(Error::Graph(format!(
            "cannot upgrade from opset ai.onnx {from}: onnxq upgrades models of opset {MIN_SOURCE_OPSET} and newer \
             (convert it first, e.g. with onnx.version_converter)"
        )));
    }
    let functions = check_functions(model, target)?;

    let mut names = Names::of_model(model);
    let nodes_before = model.graph.nodes.clone();
    let value_info_before = model.graph.value_info.clone();
    let mut undo = Undo::default();
    let result = convert_graph(
        &mut model.graph,
        &mut names,
        &mut undo,
        from,
        target,
        &HashMap::new(),
        "",
    )
    .and_then(|notes| {
        model.graph.rebuild_edges()?;
        model.graph.check()?;
        Ok(notes)
    });
    let notes = match result {
        Ok(notes) => notes,
        Err(e) => {
            model.graph.nodes = nodes_before;
            model.graph.value_info = value_info_before;
            for c in &undo.created {
                model.graph.constants.remove(c);
            }
            model.graph.constants.extend(undo.removed);
            return Err(e);
        }
    };

    for o in &mut model.header.opset_import {
        if is_default_domain(o.domain()) {
            o.version = Some(target);
        }
    }
    for f in functions {
        for o in &mut model.header.functions[f].opset_import {
            if is_default_domain(o.domain()) {
                o.version = Some(target);
            }
        }
    }
    raise_ir_version(model, target);
    Ok(notes)
}

fn raise_ir_version(model: &mut Model, target: i64) {
    let needed = min_ir_version(target);
    if model.header.ir_version.unwrap_or(0) < needed {
        model.header.ir_version = Some(needed);
    }
}

fn is_default_domain(d: &str) -> bool {
    d.is_empty() || d == "ai.onnx"
}

/// Local functions import opsets of their own, and the checker wants each node of a function to
/// resolve to the same schema under the function's and the model's imports. A function whose
/// body only crosses compatible redefinitions gets its import raised with the model's (the
/// indices returned); one that would need a conversion is refused.
fn check_functions(model: &Model, target: i64) -> Result<Vec<usize>> {
    let mut raise = Vec::new();
    for (i, f) in model.header.functions.iter().enumerate() {
        let Some(version) = f
            .opset_import
            .iter()
            .find(|o| is_default_domain(o.domain()))
            .map(|o| o.version())
        else {
            continue;
        };
        if version >= target {
            continue;
        }
        for n in f.node.iter().filter(|n| is_default_domain(n.domain())) {
            let Some(since) = schema_since("", n.op_type()) else {
                continue;
            };
            for &v in since.iter().filter(|&&v| v > version && v <= target) {
                if step_kind(n.op_type(), v) != StepKind::Compatible {
                    return Err(Error::Graph(format!(
                        "local function '{}' uses {} (node '{}'), which changed in opset {v}; onnxq does not convert \
                         function bodies",
                        f.name(),
                        n.op_type(),
                        n.name()
                    )));
                }
            }
            if n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()) {
                return Err(Error::Graph(format!(
                    "local function '{}' has a subgraph in node '{}' ({}); onnxq does not convert function bodies",
                    f.name(),
                    n.name(),
                    n.op_type()
                )));
            }
        }
        raise.push(i);
    }
    Ok(raise)
}

// ---------------------------------------------------------------------------------------------
// Which redefinitions need what.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StepKind {
    /// Types added, constraints relaxed, attributes added with the old behaviour as default.
    Compatible,
    /// Needs a conversion (or a check that may refuse): see `Converter::step`.
    Convert,
    /// Not reviewed: refused.
    Unknown,
}

/// Redefinitions that need nothing, by opset (reviewed against the ONNX changelog and the
/// onnx 1.23 schemas; the onnx version converter registers the same ones as compatible).
const COMPATIBLE: &[(i64, &str)] = &[
    (8, "Max MaxPool Mean Min Sum"),
    (9, "Cast Constant Flatten Gemm Greater Less MatMul PRelu"),
    (10, "AveragePool MaxPool"),
    (
        11,
        "ArgMax ArgMin AveragePool Compress Concat Constant Conv ConvTranspose DepthToSpace Equal \
         Flatten Gather Gemm Hardmax If LogSoftmax Loop LpPool MaxPool MaxUnpool \
         NonMaxSuppression OneHot ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax \
         ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Scan Slice Softmax Split \
         Squeeze TopK Unsqueeze",
    ),
    (
        12,
        "ArgMax ArgMin Clip Constant GatherND Max MaxPool Min Pow ReduceMax ReduceMin",
    ),
    (
        13,
        "Abs Add ArgMax ArgMin Cast Ceil Clip Concat Constant DepthToSpace DequantizeLinear Div \
         Dropout Equal Exp Expand Flatten Floor Gather GatherElements GatherND Gemm Greater \
         Identity If IsNaN LRN Less Log Loop MatMul Max Mean MeanVarianceNormalization Min Mod \
         Mul Neg NegativeLogLikelihoodLoss NonZero Pad Pow QuantizeLinear Reciprocal ReduceL1 \
         ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd \
         ReduceSumSquare Relu Reshape ScatterElements ScatterND Shape Sigmoid Sign Size Slice \
         SoftmaxCrossEntropyLoss SpaceToDepth Sqrt Sub Sum Tanh Tile Transpose",
    ),
    (14, "Add CumSum Div GRU Identity LSTM Mul RNN Relu Reshape Sub"),
    (15, "BatchNormalization Pow Shape"),
    (
        16,
        "GreaterOrEqual Identity If LeakyRelu LessOrEqual Loop PRelu Scan ScatterElements \
         ScatterND Where",
    ),
    (
        18,
        "LpPool OptionalGetElement OptionalHasElement Pad Resize ScatterElements ScatterND",
    ),
    (
        19,
        "AveragePool Cast CastLike Constant DequantizeLinear Equal Identity If Loop Pad \
         QuantizeLinear Reshape Resize Scan Shape Size",
    ),
    (20, "ConstantOfShape IsInf IsNaN ReduceMax ReduceMin"),
    (
        21,
        "Cast CastLike Constant ConstantOfShape DequantizeLinear Flatten Identity If Loop Pad \
         QLinearMatMul QuantizeLinear Reshape Scan Shape Size Squeeze Transpose Unsqueeze",
    ),
    // bfloat16 added to these.
    (
        22,
        "Acos Acosh Asin Asinh Atan Atanh AveragePool Bernoulli Conv ConvTranspose Cos Cosh \
         DeformConv Det Dropout Elu EyeLike GRU GlobalAveragePool GlobalLpPool GlobalMaxPool \
         GridSample HardSigmoid HardSwish InstanceNormalization LSTM LpNormalization LpPool \
         MaxPool MaxRoiPool MaxUnpool Mish Multinomial NegativeLogLikelihoodLoss RNN RandomNormal \
         RandomNormalLike RandomUniform RandomUniformLike RoiAlign Round Selu Sin Sinh Softplus \
         Softsign Tan ThresholdedRelu",
    ),
    // float4e2m1 added to these.
    (
        23,
        "Cast CastLike Constant ConstantOfShape DequantizeLinear Flatten Identity If Loop Pad \
         QuantizeLinear Reshape Scan Shape Size Squeeze Transpose Unsqueeze",
    ),
];

/// Reduce ops whose `axes` became an input at 18 (ReduceSum's did at 13).
const REDUCE_AXES_18: &str =
    "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd \
    ReduceSumSquare";

/// Whether `op` is in a space-separated list.
fn listed(list: &str, op: &str) -> bool {
    list.split_whitespace().any(|o| o == op)
}

fn step_kind(op: &str, v: i64) -> StepKind {
    let convert = matches!(
        (op, v),
        ("BatchNormalization", 9 | 14)
            | ("Upsample", 9 | 10)
            | ("Scan", 9)
            | ("Dropout", 10 | 12)
            | ("Slice", 10)
            | ("TopK", 10)
            | ("Clip", 11)
            | ("Pad", 11)
            | ("Resize", 11 | 13)
            | ("Scatter", 11)
            | ("Softmax" | "LogSoftmax" | "Hardmax", 13)
            | ("ReduceSum" | "Squeeze" | "Unsqueeze" | "Erf", 13)
            | ("Split", 13 | 18)
            | ("RoiAlign", 16)
            | ("GridSample" | "DFT", 20)
            | ("GroupNormalization", 21)
    ) || (v == 18 && listed(REDUCE_AXES_18, op));
    if convert {
        StepKind::Convert
    } else if COMPATIBLE.iter().any(|(version, ops)| *version == v && listed(ops, op)) {
        StepKind::Compatible
    } else {
        StepKind::Unknown
    }
}

// ---------------------------------------------------------------------------------------------
// Unique names for what the conversions create.

struct Names {
    taken: BTreeSet<String>,
}

impl Names {
    fn of_model(model: &Model) -> Names {
        let g = &model.graph;
        let mut taken = BTreeSet::new();
        taken.extend(g.constants.keys().cloned());
        for v in g.inputs.iter().chain(&g.outputs).chain(&g.value_info) {
            taken.insert(v.name().to_string());
        }
        for n in g.nodes.node_weights() {
            taken.insert(n.name.clone());
            taken.extend(n.inputs.iter().cloned());
            taken.extend(n.outputs.iter().cloned());
            for a in &n.attributes {
                for sg in a.g.iter().chain(&a.graphs) {
                    names_of_proto(sg, &mut taken);
                }
            }
        }
        taken.remove("");
        Names { taken }
    }

    /// `<base>::<what>`, or with `_1`, `_2`, ... appended if that is taken.
    fn fresh(&mut self, base: &str, what: &str) -> String {
        let first = format!("{base}::{what}");
        let mut name = first.clone();
        let mut i = 1;
        while self.taken.contains(&name) {
            name = format!("{first}_{i}");
            i += 1;
        }
        self.taken.insert(name.clone());
        name
    }
}

fn names_of_proto(g: &GraphProto, out: &mut BTreeSet<String>) {
    for v in g.input.iter().chain(&g.output).chain(&g.value_info) {
        out.insert(v.name().to_string());
    }
    out.extend(g.initializer.iter().map(|t| t.name().to_string()));
    for n in &g.node {
        out.insert(n.name().to_string());
        out.extend(n.input.iter().cloned());
        out.extend(n.output.iter().cloned());
        for a in &n.attribute {
            for sg in a.g.iter().chain(&a.graphs) {
                names_of_proto(sg, out);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What is known of each tensor: element type, shape (rank with possibly unknown dims), and the
// values of small integer tensors (shapes being computed). Declared value infos first, then a
// forward pass over the common operators; anything unknown stays None.

type Dims = Vec<Option<i64>>;

#[derive(Clone, Debug, Default)]
struct Fact {
    dtype: Option<i32>,
    shape: Option<Dims>,
    /// Values of a scalar or 1-D integer tensor.
    value: Option<Dims>,
}

type Facts = HashMap<String, Fact>;

fn declared_fact(v: &ValueInfoProto) -> Option<Fact> {
    use crate::proto::tensor_shape_proto::dimension::Value as Dim;
    use crate::proto::type_proto::Value;
    let Some(Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return None;
    };
    let dtype = t.elem_type.filter(|&d| d != DataType::Undefined as i32);
    let shape = t.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match d.value {
                Some(Dim::DimValue(v)) if v >= 0 => Some(v),
                _ => None,
            })
            .collect()
    });
    Some(Fact {
        dtype,
        shape,
        value: None,
    })
}

fn constant_fact(t: &TensorProto) -> Fact {
    let value = if t.dims.len() <= 1 && tensor::element_count(t) <= 64 {
        tensor::values_i128(t).map(|v| v.into_iter().map(|x| i64::try_from(x).ok()).collect())
    } else {
        None
    };
    Fact {
        dtype: Some(t.data_type()),
        shape: Some(t.dims.iter().map(|&d| Some(d)).collect()),
        value,
    }
}

/// Merges what inference found into what is declared: declared element type and shape win,
/// inferred values are kept.
fn merge(known: &mut Fact, inferred: Fact) {
    if known.dtype.is_none() {
        known.dtype = inferred.dtype;
    }
    match (&mut known.shape, inferred.shape) {
        (None, s) => known.shape = s,
        (Some(k), Some(s)) if k.len() == s.len() => {
            for (a, b) in k.iter_mut().zip(s) {
                if a.is_none() {
                    *a = b;
                }
            }
        }
        _ => {}
    }
    if known.value.is_none() {
        known.value = inferred.value;
    }
}

fn infer_facts(graph: &Graph, outer: &Facts) -> Result<Facts> {
    let mut facts = outer.clone();
    for v in graph.inputs.iter().chain(&graph.value_info).chain(&graph.outputs) {
        if let Some(f) = declared_fact(v) {
            facts.insert(v.name().to_string(), f);
        }
    }
    for (name, c) in &graph.constants {
        facts.insert(name.clone(), constant_fact(&c.tensor));
    }
    for ix in graph.topological_order()? {
        let n = &graph.nodes[ix];
        if !n.is_default_domain() {
            continue;
        }
        let inferred = infer_node(n, &facts);
        for (out, f) in n.outputs.iter().zip(inferred) {
            if out.is_empty() {
                continue;
            }
            merge(facts.entry(out.clone()).or_default(), f);
        }
    }
    Ok(facts)
}

fn attr_i(n: &Node, name: &str) -> Option<i64> {
    n.attribute(name).map(|a| a.i())
}

fn attr_ints(n: &Node, name: &str) -> Option<Vec<i64>> {
    n.attribute(name).map(|a| a.ints.clone())
}

fn attr_s(n: &Node, name: &str) -> Option<String> {
    n.attribute(name).map(|a| String::from_utf8_lossy(a.s()).into_owned())
}

/// Ops whose output 0 has the type and shape of input 0.
const SAME_AS_INPUT: &str = "Abs Acos Acosh Asin Asinh Atan Atanh BatchNormalization Ceil Celu Clip Cos Cosh CumSum \
    Dropout Elu Erf Exp Floor Gelu GroupNormalization HardSigmoid HardSwish Hardmax Identity \
    InstanceNormalization LRN LayerNormalization LeakyRelu Log LogSoftmax LpNormalization \
    MeanVarianceNormalization Mish Neg Reciprocal Relu ReverseSequence Round Scatter \
    ScatterElements ScatterND Selu Shrink Sigmoid Sign Sin Sinh Softmax Softplus Softsign Sqrt \
    Tan Tanh ThresholdedRelu Trilu";

/// Ops whose output 0 has the rank and type of input 0 (dims may differ).
const SAME_RANK: &str = "DepthToSpace SpaceToDepth Pad Resize Upsample Tile MaxUnpool LpPool Col2Im";

const BROADCAST: &str = "Add Sub Mul Div Pow Mod PRelu BitShift BitwiseAnd BitwiseOr BitwiseXor Max Min Sum Mean";

const COMPARISON: &str = "Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor";

fn broadcast(shapes: &[&Dims]) -> Dims {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    (0..rank)
        .map(|i| {
            let dims: Vec<Option<i64>> = shapes
                .iter()
                .filter_map(|s| (i + s.len()).checked_sub(rank).map(|j| s[j]))
                .collect();
            let big = dims.iter().flatten().copied().find(|&d| d != 1);
            match big {
                Some(d) => Some(d),
                None if dims.iter().all(|d| d.is_some()) => Some(1),
                None => None,
            }
        })
        .collect()
}

fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

fn slice_len(dim: i64, start: i64, end: i64, step: i64) -> Option<i64> {
    if step == 0 {
        return None;
    }
    let clamp = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
    let fix = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
    let len = if step > 0 {
        let s = clamp(fix(start), 0, dim);
        let e = clamp(fix(end), 0, dim);
        (e - s + step - 1).div_euclid(step)
    } else {
        let s = clamp(fix(start), 0, dim - 1);
        let e = clamp(fix(end), -1, dim - 1);
        (s - e + (-step) - 1).div_euclid(-step)
    };
    Some(len.max(0))
}

fn infer_node(n: &Node, facts: &Facts) -> Vec<Fact> {
    let fact = |i: usize| -> Option<&Fact> { n.inputs.get(i).filter(|s| !s.is_empty()).and_then(|s| facts.get(s)) };
    let shape = |i: usize| fact(i).and_then(|f| f.shape.clone());
    let dtype = |i: usize| fact(i).and_then(|f| f.dtype);
    let value = |i: usize| fact(i).and_then(|f| f.value.clone());
    // A fully known integer input, or the attribute of the same name (older opsets).
    let ints = |i: usize, attr: &str| -> Option<Vec<i64>> {
        match n.inputs.get(i).filter(|s| !s.is_empty()) {
            Some(_) => value(i).and_then(|v| v.into_iter().collect()),
            None => attr_ints(n, attr),
        }
    };
    let has_input = |i: usize| n.inputs.get(i).is_some_and(|s| !s.is_empty());
    let out = |dtype: Option<i32>, shape: Option<Dims>| Fact {
        dtype,
        shape,
        value: None,
    };
    let unknown_rank = |r: Option<usize>| r.map(|r| vec![None; r]);
    let op = n.op_type.as_str();
    let int64 = Some(DataType::Int64 as i32);
    let boolean = Some(DataType::Bool as i32);

    if listed(SAME_AS_INPUT, op) {
        let mut outs = vec![out(dtype(0), shape(0))];
        match op {
            "Dropout" => outs.push(out(boolean, shape(0))),
            "Identity" => outs[0].value = value(0),
            _ => {}
        }
        return outs;
    }
    if listed(SAME_RANK, op) {
        return vec![out(dtype(0), unknown_rank(shape(0).map(|s| s.len())))];
    }
    if listed(BROADCAST, op) || listed(COMPARISON, op) || op == "Where" {
        let shapes: Vec<Dims> = (0..n.inputs.len()).filter_map(shape).collect();
        let s = (shapes.len() == n.inputs.len()).then(|| broadcast(&shapes.iter().collect::<Vec<_>>()));
        let dt = match op {
            _ if listed(COMPARISON, op) => boolean,
            "Where" => dtype(1),
            _ => dtype(0),
        };
        return vec![out(dt, s)];
    }
    match op {
        "Cast" => {
            let to = attr_i(n, "to").map(|t| t as i32);
            let mut f = out(to, shape(0));
            if to.is_some_and(|t| matches!(DataType::try_from(t), Ok(DataType::Int64 | DataType::Int32))) {
                f.value = value(0);
            }
            vec![f]
        }
        "CastLike" => vec![out(dtype(1), shape(0))],
        "QuantizeLinear" => {
            let dt = dtype(2)
                .or_else(|| attr_i(n, "output_dtype").filter(|&d| d != 0).map(|d| d as i32))
                .or(Some(DataType::Uint8 as i32));
            vec![out(dt, shape(0))]
        }
        "DequantizeLinear" => vec![out(dtype(1), shape(0))],
        "Shape" => {
            let s = shape(0);
            let (dims, value) = match &s {
                Some(dims) => {
                    let r = dims.len() as i64;
                    let fix = |v: i64| if v < 0 { (v + r).max(0) } else { v.min(r) };
                    let start = fix(attr_i(n, "start").unwrap_or(0)) as usize;
                    let end = fix(attr_i(n, "end").unwrap_or(r)) as usize;
                    let v: Dims = if start < end { dims[start..end].to_vec() } else { vec![] };
                    (Some(vec![Some(v.len() as i64)]), Some(v))
                }
                None => (Some(vec![None]), None),
            };
            vec![Fact {
                dtype: int64,
                shape: dims,
                value,
            }]
        }
        "Size" => vec![out(int64, Some(vec![]))],
        "Conv" | "ConvInteger" | "QLinearConv" => {
            let w = if op == "QLinearConv" { 3 } else { 1 };
            let s = shape(0).map(|x| {
                let mut d = vec![None; x.len()];
                if let Some(n0) = x.first() {
                    d[0] = *n0;
                }
                if x.len() > 1 {
                    d[1] = shape(w).and_then(|w| w.first().copied().flatten());
                }
                d
            });
            let dt = match op {
                "Conv" => dtype(0),
                "ConvInteger" => Some(DataType::Int32 as i32),
                _ => dtype(7),
            };
            vec![out(dt, s)]
        }
        "ConvTranspose" => {
            let group = attr_i(n, "group").unwrap_or(1);
            let s = shape(0).map(|x| {
                let mut d = vec![None; x.len()];
                if let Some(n0) = x.first() {
                    d[0] = *n0;
                }
                if x.len() > 1 {
                    d[1] = shape(1).and_then(|w| w.get(1).copied().flatten()).map(|c| c * group);
                }
                d
            });
            vec![out(dtype(0), s)]
        }
        "MaxPool" | "AveragePool" => {
            let s = shape(0).map(|x| {
                x.iter()
                    .enumerate()
                    .map(|(i, d)| if i < 2 { *d } else { None })
                    .collect::<Dims>()
            });
            vec![out(dtype(0), s.clone()), out(int64, s)]
        }
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => {
            let s = shape(0).map(|x| {
                x.iter()
                    .enumerate()
                    .map(|(i, d)| if i < 2 { *d } else { Some(1) })
                    .collect()
            });
            vec![out(dtype(0), s)]
        }
        "MatMul" | "MatMulInteger" | "QLinearMatMul" => {
            let (a, b) = if op == "QLinearMatMul" {
                (shape(0), shape(3))
            } else {
                (shape(0), shape(1))
            };
            let s = match (a, b) {
                (Some(a), Some(b)) => match (a.len(), b.len()) {
                    (0, _) | (_, 0) => None,
                    (1, 1) => Some(vec![]),
                    (1, rb) => {
                        let mut d = b[..rb - 2].to_vec();
                        d.push(b[rb - 1]);
                        Some(d)
                    }
                    (ra, 1) => Some(a[..ra - 1].to_vec()),
                    (ra, rb) => {
                        let mut d = broadcast(&[&a[..ra - 2].to_vec(), &b[..rb - 2].to_vec()]);
                        d.push(a[ra - 2]);
                        d.push(b[rb - 1]);
                        Some(d)
                    }
                },
                _ => None,
            };
            let dt = match op {
                "MatMul" => dtype(0),
                "MatMulInteger" => Some(DataType::Int32 as i32),
                _ => dtype(7),
            };
            vec![out(dt, s)]
        }
        "Gemm" => {
            let m = shape(0)
                .filter(|a| a.len() == 2)
                .and_then(|a| a[attr_i(n, "transA").unwrap_or(0).clamp(0, 1) as usize]);
            let nn = shape(1)
                .filter(|b| b.len() == 2)
                .and_then(|b| b[1 - attr_i(n, "transB").unwrap_or(0).clamp(0, 1) as usize]);
            vec![out(dtype(0), Some(vec![m, nn]))]
        }
        "Flatten" => {
            let s = shape(0).and_then(|x| {
                let r = x.len();
                let axis = attr_i(n, "axis").unwrap_or(1);
                let axis = if axis < 0 { axis + r as i64 } else { axis };
                if !(0..=r as i64).contains(&axis) {
                    return None;
                }
                let prod = |d: &[Option<i64>]| d.iter().try_fold(1i64, |p, d| d.map(|d| p * d));
                Some(vec![prod(&x[..axis as usize]), prod(&x[axis as usize..])])
            });
            vec![out(dtype(0), s.or(Some(vec![None, None])))]
        }
        "Reshape" => {
            let target = value(1).or_else(|| {
                // The shape input's length alone gives the rank.
                shape(1).and_then(|s| match s.as_slice() {
                    [Some(len)] => Some(vec![None; *len as usize]),
                    _ => None,
                })
            });
            let s = target.map(|t| {
                let input = shape(0);
                let allowzero = attr_i(n, "allowzero").unwrap_or(0) != 0;
                let mut d: Dims = t
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Some(0) if !allowzero => input.as_ref().and_then(|x| x.get(i).copied().flatten()),
                        Some(-1) => None,
                        v => *v,
                    })
                    .collect();
                if let (Some(pos), Some(total)) = (
                    t.iter().position(|v| *v == Some(-1)),
                    input
                        .as_ref()
                        .and_then(|x| x.iter().try_fold(1i64, |p, d| d.map(|d| p * d))),
                ) {
                    let others: Option<i64> = d
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != pos)
                        .try_fold(1i64, |p, (_, d)| d.map(|d| p * d));
                    if let Some(o) = others.filter(|&o| o > 0) {
                        d[pos] = Some(total / o);
                    }
                }
                d
            });
            let mut f = out(dtype(0), s);
            if f.shape.as_ref().is_some_and(|s| s.len() <= 1) {
                f.value = value(0);
            }
            vec![f]
        }
        "Transpose" => {
            let s = shape(0).map(|x| {
                let perm = attr_ints(n, "perm").unwrap_or_else(|| (0..x.len() as i64).rev().collect());
                perm.iter().map(|&p| x.get(p as usize).copied().flatten()).collect()
            });
            vec![out(dtype(0), s)]
        }
        "Squeeze" => {
            let axes = ints(1, "axes");
            let s = shape(0).and_then(|x| match &axes {
                Some(axes) => {
                    let axes: Option<Vec<usize>> = axes.iter().map(|&a| normalize_axis(a, x.len())).collect();
                    axes.map(|axes| {
                        x.iter()
                            .enumerate()
                            .filter(|(i, _)| !axes.contains(i))
                            .map(|(_, d)| *d)
                            .collect()
                    })
                }
                None if !has_input(1) && x.iter().all(|d| d.is_some()) => {
                    Some(x.iter().filter(|d| **d != Some(1)).copied().collect())
                }
                None => None,
            });
            let mut f = out(dtype(0), s);
            f.value = value(0);
            vec![f]
        }
        "Unsqueeze" => {
            let axes = ints(1, "axes");
            let s = match (shape(0), axes) {
                (Some(x), Some(axes)) => {
                    let r = x.len() + axes.len();
                    let axes: Option<Vec<usize>> = axes.iter().map(|&a| normalize_axis(a, r)).collect();
                    axes.map(|axes| {
                        let mut rest = x.iter();
                        (0..r)
                            .map(|i| {
                                if axes.contains(&i) {
                                    Some(1)
                                } else {
                                    rest.next().copied().flatten()
                                }
                            })
                            .collect()
                    })
                }
                _ => None,
            };
            let mut f = out(dtype(0), s);
            f.value = value(0);
            vec![f]
        }
        "Concat" => {
            let shapes: Option<Vec<Dims>> = (0..n.inputs.len()).map(shape).collect();
            let s = shapes.and_then(|shapes| {
                let r = shapes.first()?.len();
                if shapes.iter().any(|s| s.len() != r) {
                    return None;
                }
                let axis = normalize_axis(attr_i(n, "axis").unwrap_or(0), r)?;
                Some(
                    (0..r)
                        .map(|i| {
                            if i == axis {
                                shapes.iter().try_fold(0i64, |acc, s| s[i].map(|d| acc + d))
                            } else {
                                shapes.iter().find_map(|s| s[i])
                            }
                        })
                        .collect(),
                )
            });
            let mut f = out(dtype(0), s);
            let values: Option<Vec<Dims>> = (0..n.inputs.len()).map(value).collect();
            if let Some(values) = values {
                if f.shape.as_ref().is_some_and(|s| s.len() == 1) {
                    f.value = Some(values.concat());
                }
            }
            vec![f]
        }
        "Split" => {
            let count = n.outputs.len();
            let x = shape(0);
            let axis = x
                .as_ref()
                .and_then(|x| normalize_axis(attr_i(n, "axis").unwrap_or(0), x.len()));
            let sizes: Option<Vec<i64>> = ints(1, "split").or_else(|| {
                let d = (*x.as_ref()?.get(axis?)?)?;
                let parts = attr_i(n, "num_outputs").unwrap_or(count as i64);
                (parts > 0 && d % parts == 0).then(|| vec![d / parts; parts as usize])
            });
            (0..count)
                .map(|i| {
                    let s = x.as_ref().map(|x| {
                        let mut d = x.clone();
                        if let Some(a) = axis {
                            d[a] = sizes.as_ref().and_then(|s| s.get(i).copied());
                        }
                        d
                    });
                    out(dtype(0), s)
                })
                .collect()
        }
        "Slice" => {
            let x = shape(0);
            let starts = ints(1, "starts");
            let ends = ints(2, "ends");
            let axes = ints(3, "axes");
            let steps = ints(4, "steps");
            let s = x.as_ref().map(|x| {
                let mut d = x.clone();
                let (Some(starts), Some(ends)) = (&starts, &ends) else {
                    return vec![None; x.len()];
                };
                let axes = if has_input(3) || n.attribute("axes").is_some() {
                    match &axes {
                        Some(a) => a.clone(),
                        None => return vec![None; x.len()],
                    }
                } else {
                    (0..starts.len() as i64).collect()
                };
                let steps = if has_input(4) {
                    match &steps {
                        Some(s) => s.clone(),
                        None => return vec![None; x.len()],
                    }
                } else {
                    vec![1; starts.len()]
                };
                for (k, &a) in axes.iter().enumerate() {
                    let Some(a) = normalize_axis(a, x.len()) else {
                        return vec![None; x.len()];
                    };
                    d[a] = match (x[a], starts.get(k), ends.get(k), steps.get(k)) {
                        (Some(dim), Some(&s), Some(&e), Some(&st)) => slice_len(dim, s, e, st),
                        _ => None,
                    };
                }
                d
            });
            let mut f = out(dtype(0), s);
            // A 1-D slice with step 1 of known values (shape arithmetic).
            if let (Some(v), Some(starts), Some(ends)) = (value(0), &starts, &ends) {
                let steps_one = !has_input(4) || steps.as_ref().is_some_and(|s| s.iter().all(|&s| s == 1));
                if x.as_ref().is_some_and(|x| x.len() == 1) && starts.len() == 1 && steps_one {
                    let len = v.len() as i64;
                    if let Some(l) = slice_len(len, starts[0], ends[0], 1) {
                        let s = if starts[0] < 0 {
                            (starts[0] + len).max(0)
                        } else {
                            starts[0].min(len)
                        };
                        f.value = Some(v[s as usize..(s + l) as usize].to_vec());
                    }
                }
            }
            vec![f]
        }
        "Gather" => {
            let x = shape(0);
            let idx = shape(1);
            let s = match (&x, &idx) {
                (Some(x), Some(idx)) => normalize_axis(attr_i(n, "axis").unwrap_or(0), x.len()).map(|a| {
                    let mut d = x[..a].to_vec();
                    d.extend(idx.iter().copied());
                    d.extend(x[a + 1..].iter().copied());
                    d
                }),
                _ => None,
            };
            let mut f = out(dtype(0), s);
            if let (Some(v), Some(i)) = (value(0), ints(1, "")) {
                if x.as_ref().is_some_and(|x| x.len() == 1) {
                    let len = v.len() as i64;
                    f.value = i
                        .iter()
                        .map(|&i| {
                            let i = if i < 0 { i + len } else { i };
                            v.get(usize::try_from(i).ok()?).copied()
                        })
                        .collect();
                }
            }
            vec![f]
        }
        "GatherElements" => vec![out(dtype(0), shape(1))],
        "Expand" => {
            let s = match (shape(0), value(1)) {
                (Some(x), Some(t)) => Some(broadcast(&[&x, &t])),
                (Some(x), None) => shape(1).and_then(|s| match s.as_slice() {
                    [Some(len)] => Some(vec![None; (*len as usize).max(x.len())]),
                    _ => None,
                }),
                _ => None,
            };
            vec![out(dtype(0), s)]
        }
        "ConstantOfShape" => {
            let dt = n
                .attribute("value")
                .and_then(|a| a.t.as_ref())
                .map(|t| t.data_type())
                .or(Some(DataType::Float as i32));
            let s = value(0).or_else(|| {
                shape(0).and_then(|s| match s.as_slice() {
                    [Some(len)] => Some(vec![None; *len as usize]),
                    _ => None,
                })
            });
            vec![out(dt, s)]
        }
        "ReduceL1" | "ReduceL2" | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceMax" | "ReduceMean" | "ReduceMin"
        | "ReduceProd" | "ReduceSum" | "ReduceSumSquare" | "ArgMax" | "ArgMin" => {
            let keep = attr_i(n, "keepdims").unwrap_or(1) != 0;
            let is_arg = op.starts_with("Arg");
            let axes: Option<Vec<i64>> = if is_arg {
                Some(vec![attr_i(n, "axis").unwrap_or(0)])
            } else if has_input(1) {
                value(1).and_then(|v| v.into_iter().collect())
            } else {
                Some(attr_ints(n, "axes").unwrap_or_default())
            };
            let noop = attr_i(n, "noop_with_empty_axes").unwrap_or(0) != 0;
            let s = shape(0).and_then(|x| {
                let r = x.len();
                let axes: Vec<usize> = match &axes {
                    Some(a) if a.is_empty() && noop => return Some(x.clone()),
                    Some(a) if a.is_empty() => (0..r).collect(),
                    Some(a) => a.iter().map(|&a| normalize_axis(a, r)).collect::<Option<_>>()?,
                    None if keep => return Some(vec![None; r]),
                    None => return None,
                };
                Some(if keep {
                    x.iter()
                        .enumerate()
                        .map(|(i, d)| if axes.contains(&i) { Some(1) } else { *d })
                        .collect()
                } else {
                    x.iter()
                        .enumerate()
                        .filter(|(i, _)| !axes.contains(i))
                        .map(|(_, d)| *d)
                        .collect()
                })
            });
            vec![out(if is_arg { int64 } else { dtype(0) }, s)]
        }
        "TopK" => {
            let k = ints(1, "").and_then(|k| k.first().copied()).or_else(|| attr_i(n, "k"));
            let s = shape(0).map(|x| {
                let mut d = x.clone();
                if let Some(a) = normalize_axis(attr_i(n, "axis").unwrap_or(-1), x.len()) {
                    d[a] = k;
                }
                d
            });
            vec![out(dtype(0), s.clone()), out(int64, s)]
        }
        "NonZero" => vec![out(int64, shape(0).map(|x| vec![Some(x.len() as i64), None]))],
        "Range" => vec![out(dtype(0), Some(vec![None]))],
        _ => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Attributes the conversions create.

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn string_attr(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn take_attr(n: &mut Node, name: &str) -> Option<AttributeProto> {
    let i = n.attributes.iter().position(|a| a.name() == name)?;
    Some(n.attributes.remove(i))
}

fn set_attr(n: &mut Node, a: AttributeProto) {
    match n.attributes.iter_mut().find(|x| x.name() == a.name()) {
        Some(x) => *x = a,
        None => n.attributes.push(a),
    }
}

fn set_input(n: &mut Node, slot: usize, name: String) {
    if n.inputs.len() <= slot {
        n.inputs.resize(slot + 1, String::new());
    }
    n.inputs[slot] = name;
}

fn new_node(name: String, op: &str, inputs: Vec<String>, output: String, order: u64) -> Node {
    Node {
        name,
        domain: String::new(),
        op_type: op.to_string(),
        inputs,
        outputs: vec![output],
        attributes: Vec::new(),
        implicit_inputs: Vec::new(),
        extra: NodeProto::default(),
        order,
    }
}

// ---------------------------------------------------------------------------------------------
// The conversions.

struct Converter<'a> {
    graph: &'a mut Graph,
    names: &'a mut Names,
    undo: &'a mut Undo,
    facts: Facts,
    target: i64,
}

/// The constants a conversion created and removed, to put back if the upgrade is refused.
#[derive(Default)]
struct Undo {
    created: Vec<String>,
    removed: Vec<(String, Constant)>,
}

/// What happened to one node, for its note.
#[derive(Default)]
struct NodeState {
    changes: Vec<String>,
    /// The node was an Upsample: its scales are ≥ 1 by definition.
    from_upsample: bool,
}

/// Converts the nodes of `graph` (and of its subgraphs) from opset `from` to `target`.
fn convert_graph(
    graph: &mut Graph,
    names: &mut Names,
    undo: &mut Undo,
    from: i64,
    target: i64,
    outer: &Facts,
    prefix: &str,
) -> Result<Vec<String>> {
    let facts = infer_facts(graph, outer)?;
    let order = graph.topological_order()?;
    let mut conv = Converter {
        graph,
        names,
        undo,
        facts,
        target,
    };
    let mut notes = Vec::new();
    for ix in order {
        let label = conv.graph.nodes[ix].label();
        if conv.graph.nodes[ix].is_default_domain() {
            let mut st = NodeState::default();
            let mut cur = from;
            loop {
                let op = conv.graph.nodes[ix].op_type.clone();
                // Not an ONNX operator: a model-local function (the loader rejects anything
                // else), whose body follows its own opset import (see `check_functions`).
                let Some(since) = schema_since("", &op) else { break };
                let Some(&v) = since.iter().find(|&&v| v > cur && v <= target) else {
                    break;
                };
                match step_kind(&op, v) {
                    StepKind::Compatible => {}
                    StepKind::Convert => conv.step(ix, &op, v, &mut st).map_err(|e| match e {
                        Error::Graph(m) => Error::Graph(format!("{prefix}{m}")),
                        e => e,
                    })?,
                    StepKind::Unknown => {
                        return Err(Error::Graph(format!(
                            "{prefix}{label}: {op} was redefined in opset {v} and onnxq has no conversion for it \
                             (upgrading from opset {from} to {target})"
                        )))
                    }
                }
                cur = v;
            }
            if conv.graph.nodes[ix].op_type == "GroupNormalization" && target < 21 {
                return Err(Error::Graph(format!(
                    "{prefix}{label}: cannot upgrade to opset {target}: GroupNormalization-18 is deprecated (the ONNX \
                     checker rejects it at opsets 18 to 20); upgrade to opset 21 or later, where it is converted"
                )));
            }
            if !st.changes.is_empty() {
                notes.push(format!("{prefix}{label}: {}", st.changes.join("; ")));
            }
        }
        notes.extend(conv.convert_subgraphs(ix, from, &format!("{prefix}{label} / "))?);
    }
    Ok(notes)
}

impl Converter<'_> {
    fn node(&self, ix: NodeIndex) -> &Node {
        &self.graph.nodes[ix]
    }

    fn node_mut(&mut self, ix: NodeIndex) -> &mut Node {
        &mut self.graph.nodes[ix]
    }

    fn base(&self, ix: NodeIndex) -> String {
        let n = self.node(ix);
        if !n.name.is_empty() {
            n.name.clone()
        } else {
            n.outputs
                .iter()
                .find(|o| !o.is_empty())
                .cloned()
                .unwrap_or_else(|| n.op_type.clone())
        }
    }

    fn refuse(&self, ix: NodeIndex, why: impl std::fmt::Display) -> Error {
        Error::Graph(format!(
            "{}: cannot upgrade to opset {}: {why}",
            self.node(ix).label(),
            self.target
        ))
    }

    fn add_constant(&mut self, ix: NodeIndex, what: &str, mut t: TensorProto) -> String {
        let name = self.names.fresh(&self.base(ix), what);
        t.name = Some(name.clone());
        self.graph.constants.insert(
            name.clone(),
            Constant {
                tensor: t,
                origin: ConstantOrigin::Created,
            },
        );
        self.facts
            .insert(name.clone(), constant_fact(&self.graph.constants[&name].tensor));
        self.undo.created.push(name.clone());
        name
    }

    fn dtype_of(&self, tensor: &str) -> Option<i32> {
        self.facts.get(tensor).and_then(|f| f.dtype)
    }

    fn rank_of(&self, tensor: &str) -> Option<usize> {
        self.facts.get(tensor).and_then(|f| f.shape.as_ref()).map(|s| s.len())
    }

    /// Whether anything reads `tensor`: a node input, a subgraph, or the graph outputs.
    fn is_read(&self, tensor: &str) -> bool {
        self.graph.outputs.iter().any(|o| o.name() == tensor)
            || self
                .graph
                .nodes
                .node_weights()
                .any(|n| n.inputs.iter().chain(&n.implicit_inputs).any(|i| i == tensor))
    }

    /// Removes an original constant that a conversion replaced, when nothing reads it any more
    /// (a graph input of that name, IR < 4 style, is part of the interface: kept).
    fn release_constant(&mut self, name: &str) {
        if !self.graph.constants.contains_key(name)
            || self.graph.inputs.iter().any(|i| i.name() == name)
            || self.is_read(name)
        {
            return;
        }
        if let Some(c) = self.graph.constants.remove(name) {
            self.graph.value_info.retain(|v| v.name() != name);
            if !self.undo.created.iter().any(|c| c == name) {
                self.undo.removed.push((name.to_string(), c));
            }
        }
    }

    /// Drops optional outputs from `first` on when nothing reads them; refuses otherwise.
    fn drop_outputs(&mut self, ix: NodeIndex, first: usize, what: &str, why: &str, st: &mut NodeState) -> Result<()> {
        if self.node(ix).outputs.len() <= first {
            return Ok(());
        }
        let extra: Vec<String> = self
            .node(ix)
            .outputs
            .iter()
            .skip(first)
            .filter(|o| !o.is_empty())
            .cloned()
            .collect();
        if extra.is_empty() {
            self.node_mut(ix).outputs.truncate(first);
            st.changes.push(format!("empty {what} output slots removed"));
            return Ok(());
        }
        if let Some(read) = extra.iter().find(|o| self.is_read(o)) {
            return Err(self.refuse(ix, format!("its {what} output '{read}' is read, and {why}")));
        }
        self.node_mut(ix).outputs.truncate(first);
        self.graph.value_info.retain(|v| !extra.iter().any(|e| e == v.name()));
        st.changes.push(format!(
            "unused {what} output{} {} dropped ({why})",
            if extra.len() > 1 { "s" } else { "" },
            extra.join(", ")
        ));
        Ok(())
    }

    /// Moves an integer-list attribute to an int64 1-D constant input at `slot`.
    fn ints_attr_to_input(&mut self, ix: NodeIndex, attr: &str, slot: usize, st: &mut NodeState) {
        let Some(a) = take_attr(self.node_mut(ix), attr) else {
            return;
        };
        let values = a.ints.clone();
        if values.is_empty() && attr == "axes" {
            // An empty list meant "all axes", as an absent input does; an empty input would not
            // (Reduce* with noop_with_empty_axes, and Squeeze, read it differently).
            st.changes
                .push("empty attribute axes dropped (all axes, as before)".into());
            return;
        }
        let name = self.add_constant(ix, attr, i64_tensor(vec![values.len() as i64], &values));
        set_input(self.node_mut(ix), slot, name.clone());
        st.changes.push(format!("attribute {attr} {values:?} → input '{name}'"));
    }

    /// The element type of the node's input 0, for constants that must match it; float32 with a
    /// note when it cannot be known.
    fn data_dtype(&self, ix: NodeIndex, st: &mut NodeState) -> i32 {
        let input = self.node(ix).inputs.first().cloned().unwrap_or_default();
        match self.dtype_of(&input) {
            Some(d) => d,
            None => {
                st.changes
                    .push(format!("element type of '{input}' unknown: f32 assumed"));
                DataType::Float as i32
            }
        }
    }

    fn step(&mut self, ix: NodeIndex, op: &str, v: i64, st: &mut NodeState) -> Result<()> {
        match (op, v) {
            ("BatchNormalization", 9) => match take_attr(self.node_mut(ix), "spatial").map(|a| a.i()) {
                Some(0) => return Err(self.refuse(
                    ix,
                    "spatial = 0 (per-activation statistics) was removed in opset 9; fold or rewrite the node first",
                )),
                Some(_) => st
                    .changes
                    .push("attribute spatial = 1 (the only behaviour from opset 9) dropped".into()),
                None => {}
            },
            ("BatchNormalization", 14) => self.drop_outputs(
                ix,
                1,
                "training statistics",
                "from opset 14 BatchNormalization has them in training mode only",
                st,
            )?,
            ("Scan", 9) => {
                return Err(self.refuse(
                    ix,
                    "Scan-8 has a batch axis and sequence_lens, Scan-9 has neither; onnxq does not rewrite it",
                ))
            }
            ("Upsample", 9) => {
                if let Some(a) = take_attr(self.node_mut(ix), "scales") {
                    let scales: Vec<f64> = a.floats.iter().map(|&f| f as f64).collect();
                    let t = float_tensor(DataType::Float as i32, vec![scales.len() as i64], &scales);
                    let name = self.add_constant(ix, "scales", t);
                    set_input(self.node_mut(ix), 1, name.clone());
                    st.changes
                        .push(format!("attribute scales {:?} → input '{name}'", a.floats));
                }
            }
            ("Upsample", 10) => {
                // Resize-10 is Upsample-9 under a new name (same inputs, same `mode`).
                self.node_mut(ix).op_type = "Resize".into();
                st.from_upsample = true;
                st.changes.push("deprecated Upsample → Resize".into());
            }
            ("Dropout", 10) => self.drop_outputs(ix, 1, "mask", "its type changed to bool in opset 10", st)?,
            ("Dropout", 12) => {
                if let Some(a) = take_attr(self.node_mut(ix), "ratio") {
                    let t = float_tensor(DataType::Float as i32, vec![], &[a.f() as f64]);
                    let name = self.add_constant(ix, "ratio", t);
                    set_input(self.node_mut(ix), 1, name.clone());
                    st.changes.push(format!("attribute ratio {} → input '{name}'", a.f()));
                }
            }
            ("Slice", 10) => {
                for (attr, slot) in [("starts", 1), ("ends", 2), ("axes", 3)] {
                    self.ints_attr_to_input(ix, attr, slot, st);
                }
            }
            ("TopK", 10) => {
                let Some(a) = take_attr(self.node_mut(ix), "k") else {
                    return Err(self.refuse(ix, "TopK-1 without its required attribute k"));
                };
                let name = self.add_constant(ix, "k", i64_tensor(vec![1], &[a.i()]));
                set_input(self.node_mut(ix), 1, name.clone());
                st.changes.push(format!("attribute k {} → input '{name}'", a.i()));
            }
            ("Clip", 11) => {
                let min = take_attr(self.node_mut(ix), "min");
                let max = take_attr(self.node_mut(ix), "max");
                if min.is_some() || max.is_some() {
                    let dtype = self.data_dtype(ix, st);
                    for (a, slot) in [(min, 1), (max, 2)] {
                        let Some(a) = a else { continue };
                        let t = float_tensor(dtype, vec![], &[a.f() as f64]);
                        let name = self.add_constant(ix, a.name(), t);
                        set_input(self.node_mut(ix), slot, name.clone());
                        st.changes.push(format!(
                            "attribute {} {} → input '{name}' ({})",
                            a.name(),
                            a.f(),
                            tensor::dtype_name(dtype)
                        ));
                    }
                }
            }
            ("Pad", 11) => {
                let mode = attr_s(self.node(ix), "mode").unwrap_or_else(|| "constant".into());
                let Some(pads) = take_attr(self.node_mut(ix), "pads") else {
                    return Err(self.refuse(ix, "Pad-2 without its required attribute pads"));
                };
                let name = self.add_constant(ix, "pads", i64_tensor(vec![pads.ints.len() as i64], &pads.ints));
                set_input(self.node_mut(ix), 1, name.clone());
                st.changes
                    .push(format!("attribute pads {:?} → input '{name}'", pads.ints));
                if let Some(value) = take_attr(self.node_mut(ix), "value") {
                    if mode == "constant" && value.f() != 0.0 {
                        let dtype = self.data_dtype(ix, st);
                        let t = float_tensor(dtype, vec![], &[value.f() as f64]);
                        let name = self.add_constant(ix, "constant_value", t);
                        set_input(self.node_mut(ix), 2, name.clone());
                        st.changes.push(format!(
                            "attribute value {} → input '{name}' ({})",
                            value.f(),
                            tensor::dtype_name(dtype)
                        ));
                    } else {
                        st.changes
                            .push(format!("attribute value {} dropped (default or unused)", value.f()));
                    }
                }
            }
            ("Resize", 11) => self.resize_11(ix, st)?,
            ("Resize", 13) => {
                if attr_s(self.node(ix), "coordinate_transformation_mode").as_deref() == Some("tf_half_pixel_for_nn") {
                    return Err(self.refuse(
                        ix,
                        "coordinate_transformation_mode 'tf_half_pixel_for_nn' was removed in opset 13",
                    ));
                }
                let n = self.node(ix);
                let has_sizes = n.inputs.get(3).is_some_and(|s| !s.is_empty());
                if has_sizes && n.inputs.get(2).is_some_and(|s| !s.is_empty()) {
                    let scales = n.inputs[2].clone();
                    self.node_mut(ix).inputs[2] = String::new();
                    self.release_constant(&scales);
                    st.changes
                        .push(format!("empty scales '{scales}' omitted (sizes given)"));
                }
            }
            ("Scatter", 11) => {
                self.node_mut(ix).op_type = "ScatterElements".into();
                st.changes.push("deprecated Scatter → ScatterElements".into());
            }
            ("Softmax" | "LogSoftmax" | "Hardmax", 13) => self.softmax_13(ix, st)?,
            ("ReduceSum" | "Squeeze" | "Unsqueeze", 13) => self.ints_attr_to_input(ix, "axes", 1, st),
            (_, 18) if listed(REDUCE_AXES_18, op) => self.ints_attr_to_input(ix, "axes", 1, st),
            ("Erf", 13) => {
                let input = self.node(ix).inputs.first().cloned().unwrap_or_default();
                if let Some(d) = self.dtype_of(&input).filter(|&d| !tensor::is_float(d)) {
                    return Err(self.refuse(
                        ix,
                        format!(
                            "Erf of {} input: integer types were removed in opset 13",
                            tensor::dtype_name(d)
                        ),
                    ));
                }
            }
            ("Split", 13) => self.ints_attr_to_input(ix, "split", 1, st),
            ("Split", 18) => {
                let n = self.node(ix);
                let has_split = n.inputs.get(1).is_some_and(|s| !s.is_empty());
                if !has_split && n.attribute("num_outputs").is_none() {
                    let count = n.outputs.len() as i64;
                    set_attr(self.node_mut(ix), int_attr("num_outputs", count));
                    st.changes.push(format!("num_outputs = {count} set (equal split)"));
                }
            }
            ("RoiAlign", 16) => {
                if self.node(ix).attribute("coordinate_transformation_mode").is_none() {
                    set_attr(
                        self.node_mut(ix),
                        string_attr("coordinate_transformation_mode", "output_half_pixel"),
                    );
                    st.changes
                        .push("coordinate_transformation_mode = output_half_pixel (the old default)".into());
                }
            }
            ("GridSample", 20) => {
                if let Some(mode) = attr_s(self.node(ix), "mode") {
                    let renamed = match mode.as_str() {
                        "bilinear" => "linear",
                        "bicubic" => "cubic",
                        _ => return Ok(()),
                    };
                    set_attr(self.node_mut(ix), string_attr("mode", renamed));
                    st.changes.push(format!("mode {mode} → {renamed}"));
                }
            }
            ("DFT", 20) => {
                let axis = take_attr(self.node_mut(ix), "axis").map(|a| a.i()).unwrap_or(1);
                let name = self.add_constant(ix, "axis", i64_tensor(vec![], &[axis]));
                set_input(self.node_mut(ix), 2, name.clone());
                st.changes.push(format!("attribute axis {axis} → input '{name}'"));
            }
            ("GroupNormalization", 21) => self.group_norm_21(ix, st)?,
            _ => return Err(self.refuse(ix, format!("no conversion for {op} at opset {v}"))),
        }
        Ok(())
    }

    /// Resize-10 (X, scales) → Resize-11 (X, roi, scales): Resize-10 samples at `x_out / scale`
    /// (asymmetric) and, for nearest, takes the floor when upsampling; Resize-11 defaults to
    /// half_pixel and round_prefer_floor, so the old behaviour is made explicit.
    fn resize_11(&mut self, ix: NodeIndex, st: &mut NodeState) -> Result<()> {
        let mode = attr_s(self.node(ix), "mode").unwrap_or_else(|| "nearest".into());
        let scales = self.node(ix).inputs.get(1).cloned().unwrap_or_default();
        if mode == "nearest" && !st.from_upsample {
            let upsampling = self
                .graph
                .constants
                .get(&scales)
                .and_then(|c| tensor::values_f64(&c.tensor))
                .is_some_and(|v| v.iter().all(|&s| s >= 1.0));
            if !upsampling {
                return Err(self.refuse(
                    ix,
                    "Resize-10 nearest with scales that are not constants ≥ 1: its rounding when downsampling \
                     differs between runtimes and has no exact Resize-11 equivalent",
                ));
            }
        }
        let roi = if self.target >= 13 {
            String::new()
        } else {
            self.add_constant(ix, "roi", float_tensor(DataType::Float as i32, vec![0], &[]))
        };
        let n = self.node_mut(ix);
        n.inputs = vec![n.inputs.first().cloned().unwrap_or_default(), roi.clone(), scales];
        set_attr(n, string_attr("coordinate_transformation_mode", "asymmetric"));
        if mode == "nearest" {
            set_attr(n, string_attr("nearest_mode", "floor"));
        }
        st.changes.push(format!(
            "{}Resize-10 semantics made explicit: coordinate_transformation_mode = asymmetric{}",
            if roi.is_empty() {
                String::new()
            } else {
                format!("empty roi input '{roi}' added; ")
            },
            if mode == "nearest" {
                ", nearest_mode = floor"
            } else {
                ""
            }
        ));
        Ok(())
    }

    /// Softmax, LogSoftmax, Hardmax: opset 13 normalises over `axis` alone instead of over the
    /// input flattened to 2-D at `axis`; the same thing when `axis` is the last dimension.
    fn softmax_13(&mut self, ix: NodeIndex, st: &mut NodeState) -> Result<()> {
        let n = self.node(ix);
        let op = n.op_type.clone();
        let explicit = n.attribute("axis").map(|a| a.i());
        let axis = explicit.unwrap_or(1);
        let input = n.inputs.first().cloned().unwrap_or_default();
        let output = n.outputs.first().cloned().unwrap_or_default();
        let rank = self.rank_of(&input).or_else(|| self.rank_of(&output));
        let last = axis == -1 || rank.is_some_and(|r| normalize_axis(axis, r) == Some(r.saturating_sub(1)));
        if last {
            if explicit.is_none() {
                set_attr(self.node_mut(ix), int_attr("axis", axis));
                st.changes.push(format!(
                    "axis = {axis} set explicitly (the last axis of the rank-{} input; the default became -1)",
                    rank.unwrap_or(0)
                ));
            }
            return Ok(());
        }
        if let Some(r) = rank {
            if normalize_axis(axis, r).is_none() {
                return Err(self.refuse(ix, format!("axis {axis} is out of range for a rank-{r} input")));
            }
        }
        // y = Reshape(op(Flatten(x, axis), axis = -1), Shape(x)): exact for any rank.
        let base = self.base(ix);
        let order = self.node(ix).order;
        let flat = self.names.fresh(&base, "flatten");
        let flat_out = self.names.fresh(&base, "flattened");
        let shape = self.names.fresh(&base, "shape");
        let shape_out = self.names.fresh(&base, "input_shape");
        let reshape = self.names.fresh(&base, "reshape");
        let inner_out = self.names.fresh(&base, "2d");
        let mut flatten = new_node(flat, "Flatten", vec![input.clone()], flat_out.clone(), order);
        flatten.attributes.push(int_attr("axis", axis));
        let shape_node = new_node(shape, "Shape", vec![input], shape_out.clone(), order);
        let reshape_node = new_node(
            reshape,
            "Reshape",
            vec![inner_out.clone(), shape_out],
            output.clone(),
            order,
        );
        let n = self.node_mut(ix);
        n.inputs[0] = flat_out;
        n.outputs[0] = inner_out;
        set_attr(n, int_attr("axis", -1));
        self.graph.nodes.add_node(flatten);
        self.graph.nodes.add_node(shape_node);
        self.graph.nodes.add_node(reshape_node);
        st.changes.push(format!(
            "axis {axis} is not the last axis ({}): wrapped as Reshape({op}(Flatten(x, {axis}), axis = -1), Shape(x)), \
             the opset-13 equivalent",
            match rank {
                Some(r) => format!("rank {r}"),
                None => "rank unknown".into(),
            }
        ));
        Ok(())
    }

    /// GroupNormalization-18 has one scale and bias per group, -21 one per channel: each is
    /// repeated C / num_groups times (as constants when both are constants and C is known,
    /// else in the graph).
    fn group_norm_21(&mut self, ix: NodeIndex, st: &mut NodeState) -> Result<()> {
        let n = self.node(ix).clone();
        let groups = attr_i(&n, "num_groups").ok_or_else(|| self.refuse(ix, "no num_groups attribute"))?;
        if n.inputs.len() < 3 || groups <= 0 {
            return Err(self.refuse(ix, "GroupNormalization needs X, scale, bias and num_groups > 0"));
        }
        let channels = self
            .facts
            .get(&n.inputs[0])
            .and_then(|f| f.shape.as_ref())
            .and_then(|s| s.get(1).copied().flatten());
        let constant = |name: &str| self.graph.constants.get(name).map(|c| c.tensor.clone());
        if let (Some(c), Some(scale), Some(bias)) = (channels, constant(&n.inputs[1]), constant(&n.inputs[2])) {
            if c % groups == 0 {
                let per = (c / groups) as usize;
                for (slot, t, what) in [(1, scale, "scale"), (2, bias, "bias")] {
                    let Some(values) = tensor::values_f64(&t) else {
                        return Err(self.refuse(ix, format!("cannot read the {what} constant")));
                    };
                    if values.len() != groups as usize {
                        return Err(self.refuse(ix, format!("{what} has {} values for {groups} groups", values.len())));
                    }
                    let repeated: Vec<f64> = values.iter().flat_map(|&v| std::iter::repeat_n(v, per)).collect();
                    let name = self.add_constant(ix, what, float_tensor(t.data_type(), vec![c], &repeated));
                    let old = std::mem::replace(&mut self.node_mut(ix).inputs[slot], name.clone());
                    self.release_constant(&old);
                    st.changes.push(format!(
                        "{what} repeated per channel ({groups} groups × {per}) → '{name}'"
                    ));
                }
                return Ok(());
            }
        }
        // In the graph: Reshape(Expand(Reshape(v, [-1, 1]), [1, C / G]), [-1]).
        let base = self.base(ix);
        let order = n.order;
        let c = self.names.fresh(&base, "channels");
        let mut shape = new_node(c.clone(), "Shape", vec![n.inputs[0].clone()], c.clone(), order);
        shape.attributes = vec![int_attr("start", 1), int_attr("end", 2)];
        let g = self.add_constant(ix, "num_groups", i64_tensor(vec![1], &[groups]));
        let per = self.names.fresh(&base, "channels_per_group");
        let div = new_node(per.clone(), "Div", vec![c, g], per.clone(), order);
        let one = self.add_constant(ix, "one", i64_tensor(vec![1], &[1]));
        let expand_to = self.names.fresh(&base, "expand_shape");
        let mut concat = new_node(expand_to.clone(), "Concat", vec![one, per], expand_to.clone(), order);
        concat.attributes = vec![int_attr("axis", 0)];
        let column = self.add_constant(ix, "column", i64_tensor(vec![2], &[-1, 1]));
        let flat = self.add_constant(ix, "flat", i64_tensor(vec![1], &[-1]));
        let mut added = vec![shape, div, concat];
        for (slot, what) in [(1, "scale"), (2, "bias")] {
            let col = self.names.fresh(&base, &format!("{what}_column"));
            let wide = self.names.fresh(&base, &format!("{what}_expanded"));
            let out = self.names.fresh(&base, &format!("{what}_per_channel"));
            added.push(new_node(
                col.clone(),
                "Reshape",
                vec![n.inputs[slot].clone(), column.clone()],
                col.clone(),
                order,
            ));
            added.push(new_node(
                wide.clone(),
                "Expand",
                vec![col, expand_to.clone()],
                wide.clone(),
                order,
            ));
            added.push(new_node(
                out.clone(),
                "Reshape",
                vec![wide, flat.clone()],
                out.clone(),
                order,
            ));
            self.node_mut(ix).inputs[slot] = out.clone();
            st.changes
                .push(format!("{what} repeated per channel in the graph → '{out}'"));
        }
        for node in added {
            self.graph.nodes.add_node(node);
        }
        Ok(())
    }

    /// Converts the subgraphs in the node's attributes (If/Loop/Scan bodies) in place.
    fn convert_subgraphs(&mut self, ix: NodeIndex, from: i64, prefix: &str) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let attr_count = self.node(ix).attributes.len();
        for a in 0..attr_count {
            let graphs: Vec<GraphProto> = {
                let attr = &self.node(ix).attributes[a];
                attr.g.iter().chain(&attr.graphs).cloned().collect()
            };
            if graphs.is_empty() {
                continue;
            }
            let attr_name = self.node(ix).attributes[a].name().to_string();
            let mut converted = Vec::with_capacity(graphs.len());
            let mut changed = false;
            for g in graphs {
                let mut sub = Graph::from_proto(g.clone())?;
                // The body is only written back on success: nothing to undo in it.
                let sub_notes = convert_graph(
                    &mut sub,
                    self.names,
                    &mut Undo::default(),
                    from,
                    self.target,
                    &self.facts,
                    &format!("{prefix}{attr_name}: "),
                )?;
                // Every change leaves a note: a body without notes is kept byte for byte.
                if !sub_notes.is_empty() {
                    sub.rebuild_edges()?;
                    converted.push(sub.to_proto()?);
                    changed = true;
                } else {
                    converted.push(g);
                }
                notes.extend(sub_notes);
            }
            if changed {
                let attr = &mut self.node_mut(ix).attributes[a];
                if attr.g.is_some() {
                    attr.g = converted.pop();
                } else {
                    attr.graphs = converted;
                }
            }
        }
        Ok(notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::tensor_shape_proto::{dimension, Dimension};
    use crate::proto::type_proto::{self, Value};
    use crate::proto::{ModelProto, TensorShapeProto, TypeProto};

    fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        }
    }

    fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Ints as i32),
            ints: v.to_vec(),
            ..Default::default()
        }
    }

    fn float(name: &str, v: f32) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Float as i32),
            f: Some(v),
            ..Default::default()
        }
    }

    fn graph_attr(name: &str, g: GraphProto) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Graph as i32),
            g: Some(g),
            ..Default::default()
        }
    }

    /// A tensor value info; a dim < 0 is symbolic. `None` dims: rank unknown.
    fn vi(name: &str, elem: DataType, dims: Option<&[i64]>) -> ValueInfoProto {
        let shape = dims.map(|dims| TensorShapeProto {
            dim: dims
                .iter()
                .map(|&d| Dimension {
                    value: Some(if d >= 0 {
                        dimension::Value::DimValue(d)
                    } else {
                        dimension::Value::DimParam("n".into())
                    }),
                    ..Default::default()
                })
                .collect(),
        });
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(Value::TensorType(type_proto::Tensor {
                    elem_type: Some(elem as i32),
                    shape,
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn proto(
        nodes: Vec<NodeProto>,
        inits: Vec<TensorProto>,
        inputs: Vec<ValueInfoProto>,
        outputs: Vec<ValueInfoProto>,
        opset: i64,
    ) -> ModelProto {
        ModelProto {
            ir_version: Some(5),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: nodes,
                initializer: inits,
                input: inputs,
                output: outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn model(nodes: Vec<NodeProto>, inputs: Vec<ValueInfoProto>, outputs: Vec<ValueInfoProto>, opset: i64) -> Model {
        Model::from_proto(proto(nodes, vec![], inputs, outputs, opset)).unwrap()
    }

    fn find<'a>(m: &'a Model, name: &str) -> &'a Node {
        m.graph.nodes.node_weights().find(|n| n.name == name).unwrap()
    }

    fn const_i64(m: &Model, name: &str) -> (Vec<i64>, Vec<i64>) {
        let t = &m.graph.constants[name].tensor;
        assert_eq!(t.data_type(), DataType::Int64 as i32, "{name}");
        let v = tensor::values_i128(t).unwrap().into_iter().map(|x| x as i64).collect();
        (t.dims.clone(), v)
    }

    fn const_f64(m: &Model, name: &str) -> (i32, Vec<i64>, Vec<f64>) {
        let t = &m.graph.constants[name].tensor;
        (t.data_type(), t.dims.clone(), tensor::values_f64(t).unwrap())
    }

    fn f32vi(name: &str, dims: &[i64]) -> ValueInfoProto {
        vi(name, DataType::Float, Some(dims))
    }

    #[test]
    fn clip_attributes_become_typed_inputs_at_11() {
        let mut m = model(
            vec![
                node(
                    "Clip",
                    "clip",
                    &["x"],
                    &["y"],
                    vec![float("min", 0.0), float("max", 6.0)],
                ),
                node("Clip", "", &["h"], &["z"], vec![float("max", 1.5)]),
            ],
            vec![f32vi("x", &[1, 4]), vi("h", DataType::Float16, Some(&[2]))],
            vec![f32vi("y", &[1, 4]), vi("z", DataType::Float16, Some(&[2]))],
            10,
        );
        let notes = upgrade_opset(&mut m, 11).unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert_eq!(find(&m, "clip").inputs, ["x", "clip::min", "clip::max"]);
        assert!(find(&m, "clip").attributes.is_empty());
        assert_eq!(const_f64(&m, "clip::min"), (DataType::Float as i32, vec![], vec![0.0]));
        assert_eq!(const_f64(&m, "clip::max"), (DataType::Float as i32, vec![], vec![6.0]));
        // Unnamed node: named after its output; max only, min omitted; f16 like the data.
        let half = m.graph.nodes.node_weights().find(|n| n.outputs == ["z"]).unwrap();
        assert_eq!(half.inputs, ["h", "", "z::max"]);
        assert_eq!(const_f64(&m, "z::max"), (DataType::Float16 as i32, vec![], vec![1.5]));
        assert_eq!(m.opset(""), Some(11));
        assert_eq!(m.header.ir_version, Some(6));
        m.graph.check().unwrap();
    }

    #[test]
    fn clip_of_unknown_type_assumes_f32_and_says_so() {
        let mut m = model(
            vec![
                node("Custom", "c", &["x"], &["t"], vec![]),
                node("Clip", "clip", &["t"], &["y"], vec![float("min", -1.0)]),
            ],
            vec![f32vi("x", &[3])],
            vec![f32vi("y", &[3])],
            9,
        );
        m.graph.nodes.node_weights_mut().find(|n| n.name == "c").unwrap().domain = "custom".into();
        let notes = upgrade_opset(&mut m, 11).unwrap();
        assert!(notes[0].contains("f32 assumed"), "{notes:?}");
        assert_eq!(const_f64(&m, "clip::min").0, DataType::Float as i32);
    }

    #[test]
    fn axes_and_split_become_inputs_at_13() {
        let mut m = model(
            vec![
                node("Squeeze", "sq", &["x"], &["s"], vec![ints("axes", &[0, 2])]),
                node("Unsqueeze", "unsq", &["s"], &["u"], vec![ints("axes", &[0])]),
                node(
                    "Split",
                    "split",
                    &["u"],
                    &["a", "b"],
                    vec![int_attr("axis", 1), ints("split", &[1, 2])],
                ),
                node(
                    "ReduceSum",
                    "sum",
                    &["a"],
                    &["r"],
                    vec![ints("axes", &[2]), int_attr("keepdims", 0)],
                ),
                node("ReduceMean", "mean", &["b"], &["m"], vec![ints("axes", &[1])]),
                node("Squeeze", "sq_all", &["m"], &["m2"], vec![]),
            ],
            vec![f32vi("x", &[1, 3, 1, 4])],
            vec![f32vi("r", &[1, 1]), f32vi("m2", &[4])],
            11,
        );
        let notes = upgrade_opset(&mut m, 13).unwrap();
        assert_eq!(notes.len(), 4, "{notes:?}");
        assert_eq!(find(&m, "sq").inputs, ["x", "sq::axes"]);
        assert_eq!(const_i64(&m, "sq::axes"), (vec![2], vec![0, 2]));
        assert_eq!(find(&m, "unsq").inputs, ["s", "unsq::axes"]);
        assert_eq!(const_i64(&m, "unsq::axes"), (vec![1], vec![0]));
        assert_eq!(find(&m, "split").inputs, ["u", "split::split"]);
        assert_eq!(const_i64(&m, "split::split"), (vec![2], vec![1, 2]));
        assert_eq!(find(&m, "split").attributes.len(), 1);
        assert_eq!(find(&m, "sum").inputs, ["a", "sum::axes"]);
        assert_eq!(find(&m, "sum").attribute("keepdims").unwrap().i(), 0);
        // ReduceMean keeps its attribute until 18; Squeeze without axes needs nothing.
        assert_eq!(find(&m, "mean").inputs, ["b"]);
        assert!(find(&m, "mean").attribute("axes").is_some());
        assert_eq!(find(&m, "sq_all").inputs, ["m"]);
        assert_eq!(m.header.ir_version, Some(7));
        m.graph.check().unwrap();

        // 13 → 18: ReduceMean's axes become an input, Split gets num_outputs only when it
        // has no split input (it has one here).
        let notes = upgrade_opset(&mut m, 18).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(find(&m, "mean").inputs, ["b", "mean::axes"]);
        assert_eq!(const_i64(&m, "mean::axes"), (vec![1], vec![1]));
        assert!(find(&m, "split").attribute("num_outputs").is_none());
        assert_eq!(m.header.ir_version, Some(8));
        m.graph.check().unwrap();
    }

    #[test]
    fn reduce_mean_axes_move_at_18_not_before() {
        let mk = || {
            model(
                vec![node("ReduceMean", "mean", &["x"], &["y"], vec![ints("axes", &[-1])])],
                vec![f32vi("x", &[2, 3])],
                vec![f32vi("y", &[2, 1])],
                13,
            )
        };
        let mut m = mk();
        assert!(upgrade_opset(&mut m, 17).unwrap().is_empty());
        assert_eq!(find(&m, "mean").inputs, ["x"]);
        assert_eq!(m.opset(""), Some(17));
        let mut m = mk();
        assert_eq!(upgrade_opset(&mut m, 18).unwrap().len(), 1);
        assert_eq!(find(&m, "mean").inputs, ["x", "mean::axes"]);
        assert_eq!(const_i64(&m, "mean::axes"), (vec![1], vec![-1]));
    }

    #[test]
    fn split_without_sizes_gets_num_outputs_at_18() {
        let mut m = model(
            vec![node("Split", "split", &["x"], &["a", "b"], vec![int_attr("axis", 0)])],
            vec![f32vi("x", &[4])],
            vec![f32vi("a", &[2]), f32vi("b", &[2])],
            13,
        );
        upgrade_opset(&mut m, 18).unwrap();
        assert_eq!(find(&m, "split").attribute("num_outputs").unwrap().i(), 2);
    }

    #[test]
    fn slice_and_topk_attributes_become_inputs_at_10() {
        let mut m = model(
            vec![
                node(
                    "Slice",
                    "slice",
                    &["x"],
                    &["s"],
                    vec![ints("starts", &[1]), ints("ends", &[i64::MAX]), ints("axes", &[1])],
                ),
                node("TopK", "topk", &["s"], &["v", "i"], vec![int_attr("k", 2)]),
            ],
            vec![f32vi("x", &[2, 5])],
            vec![f32vi("v", &[2, 2]), vi("i", DataType::Int64, Some(&[2, 2]))],
            9,
        );
        let notes = upgrade_opset(&mut m, 10).unwrap();
        assert_eq!(notes.len(), 2);
        assert_eq!(
            find(&m, "slice").inputs,
            ["x", "slice::starts", "slice::ends", "slice::axes"]
        );
        assert_eq!(const_i64(&m, "slice::ends"), (vec![1], vec![i64::MAX]));
        assert_eq!(find(&m, "topk").inputs, ["s", "topk::k"]);
        assert_eq!(const_i64(&m, "topk::k"), (vec![1], vec![2]));
        assert_eq!(m.header.ir_version, Some(5));
        m.graph.check().unwrap();
    }

    #[test]
    fn pad_attributes_become_inputs_at_11() {
        let mut m = model(
            vec![
                node(
                    "Pad",
                    "pad",
                    &["x"],
                    &["p"],
                    vec![ints("pads", &[0, 1, 0, 2]), float("value", 0.5)],
                ),
                node("Pad", "pad0", &["p"], &["q"], vec![ints("pads", &[1, 0, 1, 0])]),
            ],
            vec![f32vi("x", &[2, 2])],
            vec![f32vi("q", &[4, 5])],
            10,
        );
        upgrade_opset(&mut m, 11).unwrap();
        assert_eq!(find(&m, "pad").inputs, ["x", "pad::pads", "pad::constant_value"]);
        assert_eq!(
            const_f64(&m, "pad::constant_value"),
            (DataType::Float as i32, vec![], vec![0.5])
        );
        assert_eq!(find(&m, "pad0").inputs, ["p", "pad0::pads"]);
        m.graph.check().unwrap();
    }

    #[test]
    fn softmax_on_the_last_axis_is_kept_and_others_are_wrapped() {
        let mut m = model(
            vec![
                node("Softmax", "last", &["x"], &["a"], vec![int_attr("axis", 2)]),
                node("LogSoftmax", "middle", &["x"], &["b"], vec![int_attr("axis", 1)]),
                node("Softmax", "default2d", &["f"], &["c"], vec![]),
                node("Softmax", "minus1", &["u"], &["d"], vec![int_attr("axis", -1)]),
                node("Hardmax", "unknown_rank", &["u"], &["e"], vec![int_attr("axis", 1)]),
            ],
            vec![
                f32vi("x", &[2, 3, 4]),
                f32vi("f", &[2, 3]),
                vi("u", DataType::Float, None),
            ],
            vec![
                f32vi("a", &[2, 3, 4]),
                f32vi("b", &[2, 3, 4]),
                f32vi("c", &[2, 3]),
                vi("d", DataType::Float, None),
                vi("e", DataType::Float, None),
            ],
            11,
        );
        let notes = upgrade_opset(&mut m, 13).unwrap();
        assert_eq!(notes.len(), 3, "{notes:?}");
        // Last axis: untouched.
        assert_eq!(find(&m, "last").inputs, ["x"]);
        assert_eq!(find(&m, "last").attribute("axis").unwrap().i(), 2);
        assert_eq!(find(&m, "minus1").inputs, ["u"]);
        // Default axis 1 on a rank-2 input: made explicit (the default became -1, same here).
        assert_eq!(find(&m, "default2d").attribute("axis").unwrap().i(), 1);
        // Not the last axis: Reshape(op(Flatten(x, 1), -1), Shape(x)), the output name kept.
        let mid = find(&m, "middle");
        assert_eq!(mid.inputs, ["middle::flattened"]);
        assert_eq!(mid.outputs, ["middle::2d"]);
        assert_eq!(mid.attribute("axis").unwrap().i(), -1);
        let flatten = find(&m, "middle::flatten");
        assert_eq!(
            (flatten.op_type.as_str(), flatten.inputs.as_slice()),
            ("Flatten", &["x".to_string()][..])
        );
        assert_eq!(flatten.attribute("axis").unwrap().i(), 1);
        let reshape = find(&m, "middle::reshape");
        assert_eq!(reshape.inputs, ["middle::2d", "middle::input_shape"]);
        assert_eq!(reshape.outputs, ["b"]);
        assert_eq!(find(&m, "middle::shape").op_type, "Shape");
        // Rank unknown and axis not -1: wrapped as well (exact whatever the rank).
        assert_eq!(find(&m, "unknown_rank").inputs, ["unknown_rank::flattened"]);
        assert!(notes
            .iter()
            .any(|n| n.contains("unknown_rank") && n.contains("rank unknown")));
        m.graph.check().unwrap();
    }

    #[test]
    fn softmax_rank_is_inferred_through_shape_arithmetic() {
        // x → Shape → Slice [0:1] → Concat with [200] → Reshape: rank 2 (as in ppocr's head).
        let mut m = Model::from_proto(proto(
            vec![
                node("GlobalAveragePool", "gap", &["x"], &["p"], vec![]),
                node("Shape", "shape", &["p"], &["sh"], vec![]),
                node("Slice", "slice", &["sh", "zero", "one", "zero"], &["n"], vec![]),
                node("Concat", "cat", &["n", "c"], &["target"], vec![int_attr("axis", 0)]),
                node("Reshape", "reshape", &["p", "target"], &["r"], vec![]),
                node("Softmax", "softmax", &["r"], &["y"], vec![int_attr("axis", 1)]),
            ],
            vec![
                TensorProto {
                    name: Some("zero".into()),
                    ..i64_tensor(vec![1], &[0])
                },
                TensorProto {
                    name: Some("one".into()),
                    ..i64_tensor(vec![1], &[1])
                },
                TensorProto {
                    name: Some("c".into()),
                    ..i64_tensor(vec![1], &[200])
                },
            ],
            vec![f32vi("x", &[-1, 200, -1, -1])],
            vec![vi("y", DataType::Float, None)],
            11,
        ))
        .unwrap();
        let notes = upgrade_opset(&mut m, 13).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(find(&m, "softmax").inputs, ["r"]);
        let facts = infer_facts(&m.graph, &HashMap::new()).unwrap();
        assert_eq!(facts["r"].shape, Some(vec![None, Some(200)]));
    }

    #[test]
    fn created_names_are_deterministic_and_never_clash() {
        let mk = || {
            model(
                vec![
                    node("Identity", "id", &["x"], &["clip::min"], vec![]),
                    node("Clip", "clip", &["clip::min"], &["y"], vec![float("min", 0.0)]),
                ],
                vec![f32vi("x", &[2])],
                vec![f32vi("y", &[2])],
                10,
            )
        };
        let (mut a, mut b) = (mk(), mk());
        let notes = upgrade_opset(&mut a, 13).unwrap();
        assert_eq!(notes, upgrade_opset(&mut b, 13).unwrap());
        assert_eq!(find(&a, "clip").inputs, ["clip::min", "clip::min_1"]);
        assert_eq!(
            crate::onnx::model_bytes(&a).unwrap(),
            crate::onnx::model_bytes(&b).unwrap()
        );
        a.graph.check().unwrap();
    }

    #[test]
    fn already_at_or_above_the_target_is_a_no_op() {
        let mk = || {
            model(
                vec![node("Unsqueeze", "u", &["x", "axes"], &["y"], vec![])],
                vec![f32vi("x", &[2]), vi("axes", DataType::Int64, Some(&[1]))],
                vec![f32vi("y", &[1, 2])],
                13,
            )
        };
        let mut m = mk();
        let before = crate::onnx::model_bytes(&m).unwrap();
        assert!(upgrade_opset(&mut m, 13).unwrap().is_empty());
        assert!(upgrade_opset(&mut m, 11).unwrap().is_empty());
        assert_eq!(crate::onnx::model_bytes(&m).unwrap(), before);
        assert!(convert_opset(&mut m, 13).unwrap().is_empty());
        assert_eq!(crate::onnx::model_bytes(&m).unwrap(), before);
    }

    #[test]
    fn a_downgrade_is_refused() {
        let mut m = model(
            vec![node("Relu", "r", &["x"], &["y"], vec![])],
            vec![f32vi("x", &[2])],
            vec![f32vi("y", &[2])],
            13,
        );
        let e = convert_opset(&mut m, 11).unwrap_err().to_string();
        assert!(e.contains("downgrade") && e.contains("13") && e.contains("11"), "{e}");
        assert_eq!(m.opset(""), Some(13));
        assert!(convert_opset(&mut m, MAX_TARGET_OPSET + 1).is_err());
    }

    #[test]
    fn refusals_name_the_node_and_leave_the_model_unchanged() {
        // A Dropout-7 mask that is read changes type (float → bool) at opset 10.
        let mut m = model(
            vec![
                node("Clip", "clip", &["x"], &["c"], vec![float("min", 0.0)]),
                node("Dropout", "drop", &["c"], &["d", "mask"], vec![]),
                node("Add", "add", &["d", "mask"], &["y"], vec![]),
            ],
            vec![f32vi("x", &[2])],
            vec![f32vi("y", &[2])],
            9,
        );
        let before = crate::onnx::model_bytes(&m).unwrap();
        let e = upgrade_opset(&mut m, 13).unwrap_err().to_string();
        assert!(e.contains("Dropout 'drop'") && e.contains("mask"), "{e}");
        assert_eq!(crate::onnx::model_bytes(&m).unwrap(), before);
        assert_eq!(m.opset(""), Some(9));
        assert!(m.graph.constants.is_empty());

        // Scan-8 has no opset-9 equivalent onnxq writes.
        let mut m = model(
            vec![node(
                "Scan",
                "scan",
                &["", "x"],
                &["y"],
                vec![int_attr("num_scan_inputs", 1)],
            )],
            vec![f32vi("x", &[1, 2])],
            vec![f32vi("y", &[1, 2])],
            8,
        );
        let e = upgrade_opset(&mut m, 9).unwrap_err().to_string();
        assert!(e.contains("Scan 'scan'") && e.contains("Scan-8"), "{e}");

        // BatchNormalization with spatial = 0.
        let mut m = model(
            vec![node(
                "BatchNormalization",
                "bn",
                &["x", "s", "b", "m", "v"],
                &["y"],
                vec![int_attr("spatial", 0)],
            )],
            vec![
                f32vi("x", &[1, 2, 3]),
                f32vi("s", &[2, 3]),
                f32vi("b", &[2, 3]),
                f32vi("m", &[2, 3]),
                f32vi("v", &[2, 3]),
            ],
            vec![f32vi("y", &[1, 2, 3])],
            7,
        );
        let e = upgrade_opset(&mut m, 13).unwrap_err().to_string();
        assert!(e.contains("BatchNormalization 'bn'") && e.contains("spatial"), "{e}");

        // Below opset 7.
        let mut m = model(vec![], vec![], vec![], 6);
        assert!(upgrade_opset(&mut m, 13).unwrap_err().to_string().contains("opset 7"));
    }

    #[test]
    fn every_redefinition_up_to_the_max_target_is_classified() {
        for (domain, op, versions) in crate::onnx::schemas::SCHEMAS {
            if !domain.is_empty() {
                continue;
            }
            for pair in versions.windows(2) {
                let v = pair[1];
                if v > MIN_SOURCE_OPSET && v <= MAX_TARGET_OPSET {
                    assert_ne!(
                        step_kind(op, v),
                        StepKind::Unknown,
                        "{op} at opset {v} is not classified"
                    );
                }
            }
        }
        assert_eq!(step_kind("Softmax", 13), StepKind::Convert);
        assert_eq!(step_kind("Conv", 11), StepKind::Compatible);
        assert_eq!(step_kind("Conv", 12), StepKind::Unknown);
    }

    #[test]
    fn unused_training_outputs_are_dropped() {
        let mut m = model(
            vec![node(
                "BatchNormalization",
                "bn",
                &["x", "s", "b", "m", "v"],
                &["y", "", "", "saved_mean", ""],
                vec![int_attr("spatial", 1)],
            )],
            vec![
                f32vi("x", &[1, 2, 3]),
                f32vi("s", &[2]),
                f32vi("b", &[2]),
                f32vi("m", &[2]),
                f32vi("v", &[2]),
            ],
            vec![f32vi("y", &[1, 2, 3])],
            7,
        );
        let notes = upgrade_opset(&mut m, 15).unwrap();
        assert_eq!(find(&m, "bn").outputs, ["y"]);
        assert!(find(&m, "bn").attribute("spatial").is_none());
        assert!(
            notes[0].contains("spatial") && notes[0].contains("saved_mean"),
            "{notes:?}"
        );
    }

    #[test]
    fn upsample_becomes_resize_with_its_old_semantics() {
        let mut m = model(
            vec![node(
                "Upsample",
                "up",
                &["x"],
                &["y"],
                vec![AttributeProto {
                    name: Some("scales".into()),
                    r#type: Some(AttributeType::Floats as i32),
                    floats: vec![1.0, 1.0, 2.0, 2.0],
                    ..Default::default()
                }],
            )],
            vec![f32vi("x", &[1, 1, 2, 2])],
            vec![f32vi("y", &[1, 1, 4, 4])],
            8,
        );
        let mut at11 = m.clone();
        upgrade_opset(&mut at11, 11).unwrap();
        let r = find(&at11, "up");
        assert_eq!(r.op_type, "Resize");
        assert_eq!(r.inputs, ["x", "up::roi", "up::scales"]);
        assert_eq!(const_f64(&at11, "up::roi"), (DataType::Float as i32, vec![0], vec![]));
        assert_eq!(attr_s(r, "coordinate_transformation_mode").unwrap(), "asymmetric");
        assert_eq!(attr_s(r, "nearest_mode").unwrap(), "floor");
        at11.graph.check().unwrap();
        // From 13 on roi is optional: left out.
        let notes = upgrade_opset(&mut m, 13).unwrap();
        assert_eq!(notes.len(), 1);
        assert_eq!(find(&m, "up").inputs, ["x", "", "up::scales"]);
        assert!(!m.graph.constants.contains_key("up::roi"));
    }

    #[test]
    fn resize_10_that_may_downsample_with_nearest_is_refused() {
        let mut m = model(
            vec![node("Resize", "rs", &["x", "scales"], &["y"], vec![])],
            vec![f32vi("x", &[1, 1, 4, 4]), f32vi("scales", &[4])],
            vec![f32vi("y", &[1, 1, 2, 2])],
            10,
        );
        let e = upgrade_opset(&mut m, 11).unwrap_err().to_string();
        assert!(e.contains("Resize 'rs'"), "{e}");
    }

    #[test]
    fn group_normalization_scale_and_bias_become_per_channel_at_21() {
        let mut m = Model::from_proto(proto(
            vec![node(
                "GroupNormalization",
                "gn",
                &["x", "s", "b"],
                &["y"],
                vec![int_attr("num_groups", 2)],
            )],
            vec![
                TensorProto {
                    name: Some("s".into()),
                    ..float_tensor(DataType::Float as i32, vec![2], &[1.0, 2.0])
                },
                TensorProto {
                    name: Some("b".into()),
                    ..float_tensor(DataType::Float as i32, vec![2], &[0.5, -0.5])
                },
            ],
            vec![f32vi("x", &[1, 4, 3])],
            vec![f32vi("y", &[1, 4, 3])],
            18,
        ))
        .unwrap();
        upgrade_opset(&mut m, 21).unwrap();
        assert_eq!(find(&m, "gn").inputs, ["x", "gn::scale", "gn::bias"]);
        assert_eq!(const_f64(&m, "gn::scale").2, [1.0, 1.0, 2.0, 2.0]);
        assert_eq!(const_f64(&m, "gn::bias").2, [0.5, 0.5, -0.5, -0.5]);
        // The per-group originals nothing reads any more are gone.
        assert!(!m.graph.constants.contains_key("s") && !m.graph.constants.contains_key("b"));
        assert_eq!(m.header.ir_version, Some(10));
        m.graph.check().unwrap();
    }

    #[test]
    fn deprecated_group_normalization_is_refused_below_21() {
        let mut m = model(
            vec![node(
                "GroupNormalization",
                "gn",
                &["x", "s", "b"],
                &["y"],
                vec![int_attr("num_groups", 2)],
            )],
            vec![f32vi("x", &[1, 4, 3]), f32vi("s", &[2]), f32vi("b", &[2])],
            vec![f32vi("y", &[1, 4, 3])],
            18,
        );
        let e = upgrade_opset(&mut m, 20).unwrap_err().to_string();
        assert!(e.contains("GroupNormalization 'gn'") && e.contains("21"), "{e}");
        // Scale and bias are graph inputs: repeated in the graph.
        let notes = upgrade_opset(&mut m, 21).unwrap();
        assert_eq!(
            find(&m, "gn").inputs,
            ["x", "gn::scale_per_channel", "gn::bias_per_channel"]
        );
        assert!(notes[0].contains("in the graph"), "{notes:?}");
        m.graph.check().unwrap();
    }

    #[test]
    fn a_refusal_late_in_the_graph_restores_what_earlier_conversions_changed() {
        // Resize drops its empty scales at 13 (the initializer goes), then a BatchNormalization
        // whose training output is read is refused at 14: everything comes back.
        let mut m = Model::from_proto(proto(
            vec![
                node("Resize", "rs", &["x", "roi", "scales", "sizes"], &["r"], vec![]),
                node(
                    "BatchNormalization",
                    "bn",
                    &["r", "p", "p", "p", "p"],
                    &["y", "running_mean"],
                    vec![],
                ),
            ],
            vec![
                TensorProto {
                    name: Some("roi".into()),
                    ..float_tensor(DataType::Float as i32, vec![0], &[])
                },
                TensorProto {
                    name: Some("scales".into()),
                    ..float_tensor(DataType::Float as i32, vec![0], &[])
                },
                TensorProto {
                    name: Some("sizes".into()),
                    ..i64_tensor(vec![4], &[1, 1, 4, 4])
                },
                TensorProto {
                    name: Some("p".into()),
                    ..float_tensor(DataType::Float as i32, vec![1], &[1.0])
                },
            ],
            vec![f32vi("x", &[1, 1, 2, 2])],
            vec![f32vi("y", &[1, 1, 4, 4]), f32vi("running_mean", &[1])],
            11,
        ))
        .unwrap();
        let before = crate::onnx::model_bytes(&m).unwrap();
        let e = upgrade_opset(&mut m, 14).unwrap_err().to_string();
        assert!(
            e.contains("BatchNormalization 'bn'") && e.contains("running_mean"),
            "{e}"
        );
        assert_eq!(crate::onnx::model_bytes(&m).unwrap(), before);
        // At 13 the Resize conversion alone goes through.
        let notes = upgrade_opset(&mut m, 13).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(find(&m, "rs").inputs, ["x", "roi", "", "sizes"]);
        assert!(!m.graph.constants.contains_key("scales"));
        m.graph.check().unwrap();
    }

    #[test]
    fn nodes_inside_subgraphs_are_converted() {
        let then_branch = GraphProto {
            name: Some("then".into()),
            node: vec![node("Unsqueeze", "inner", &["x"], &["t"], vec![ints("axes", &[0])])],
            output: vec![f32vi("t", &[1, 2])],
            ..Default::default()
        };
        let else_branch = GraphProto {
            name: Some("else".into()),
            node: vec![node("Identity", "same", &["x2"], &["e"], vec![])],
            output: vec![f32vi("e", &[1, 2])],
            ..Default::default()
        };
        let mut m = model(
            vec![
                node("Unsqueeze", "x2", &["x"], &["x2"], vec![ints("axes", &[0])]),
                node(
                    "If",
                    "if",
                    &["cond"],
                    &["y"],
                    vec![
                        graph_attr("then_branch", then_branch),
                        graph_attr("else_branch", else_branch.clone()),
                    ],
                ),
            ],
            vec![f32vi("x", &[2]), vi("cond", DataType::Bool, Some(&[]))],
            vec![f32vi("y", &[1, 2])],
            11,
        );
        let notes = upgrade_opset(&mut m, 13).unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("If 'if' / then_branch: Unsqueeze 'inner'")),
            "{notes:?}"
        );
        let node_if = find(&m, "if");
        let then = node_if.attribute("then_branch").unwrap().g.as_ref().unwrap();
        assert_eq!(then.node[0].input, ["x", "inner::axes"]);
        assert_eq!(then.initializer[0].name(), "inner::axes");
        // The untouched branch is kept as it was.
        assert_eq!(
            node_if.attribute("else_branch").unwrap().g.as_ref().unwrap(),
            &else_branch
        );
        m.graph.check().unwrap();
    }
}
