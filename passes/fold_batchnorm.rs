//! `fold_batchnorm`: folds an inference-mode `BatchNormalization` (or the per-channel `Mul`/`Add`
//! some exporters emit in its place) into the weights and bias of the `Conv`, `ConvTranspose` or
//! `Gemm` that produces its input. Step 1 of data-free quantization (Nagel et al., "Data-Free
//! Quantization Through Weight Equalization and Bias Correction", ICCV 2019, §3): the folded
//! weights are what gets equalised and quantized, and the BatchNorm statistics the fold removes
//! are kept as [`BatchNormRecord`]s (in `Context::batchnorm_records`) for bias absorption and
//! analytical bias correction.
//!
//! Maths. Every fold is a per-output-channel affine map `z_c = a_c·y_c + d_c` of the layer output
//! `y = W ⊛ x + b`, absorbed as `W'[c] = a_c·W[c]`, `b'_c = a_c·b_c + d_c` (`b = 0` when the layer
//! has no bias; a bias input `<weight>::bias` is then added when some `d_c ≠ 0`):
//! - BatchNormalization, with γ = scale, β = B, μ = mean, σ² = var, ε = epsilon (default 1e-5):
//!   `s_c = γ_c / sqrt(σ²_c + ε)`, `a_c = s_c`, `d_c = β_c − s_c·μ_c`, i.e. `b'_c = s_c·(b_c − μ_c) + β_c`;
//! - `Mul(y, k)`: `a_c = k_c`, `d_c = 0`; `Add(y, k)`: `a_c = 1`, `d_c = k_c` — only when the
//!   constant `k` broadcasts per output channel exactly: rank ≤ the output rank and, right-aligned,
//!   every dimension is 1 but the channel axis (axis 1), which is 1 or C. A Mul then an Add fold
//!   one after the other.
//!
//! Where output channel `c` lives in the weight:
//! - Conv, W `[C_out, C_in/group, k…]`: `W[c, …]`;
//! - ConvTranspose, W `[C_in, C_out/group, k…]`: output channel `c = g·(C_out/group) + j` is
//!   `W[g·(C_in/group) + i, j, …]` for every `i < C_in/group` (any group count);
//! - Gemm, `Y = alpha·A'·B' + beta·C`: the channel is the column `n` of `Y`, so B `[K, N]` is scaled
//!   along axis 1, or along axis 0 when `transB = 1` (B `[N, K]`). alpha stays (it commutes with a
//!   column scale); beta is folded into a full `[N]` C (`C'_n = a_n·beta·C_n + d_n`) and the beta
//!   attribute is removed. A C that varies per row (`[M, N]`, `[M, 1]`) is refused.
//!
//! The arithmetic runs in f64 and is stored as f32, so outputs change only by float rounding. The
//! candidate node goes; the layer writes the candidate's output tensor (graph outputs and
//! downstream names are kept), the value_info of the removed intermediate is dropped, and constants
//! nobody reads any more (BN parameters, the Mul/Add constant) are removed. Weights held in
//! `Constant` nodes are rewritten through `Graph::set_constant`.
//!
//! Preconditions of a fold; otherwise the candidate is kept and the note says why:
//! - BatchNormalization in inference form: `training_mode` absent or 0, no output but the first
//!   one used, `spatial` not 0, opset ≥ 7; its four parameters are float constants (not graph
//!   inputs, which a runtime may override) with C values each; variance + ε > 0;
//! - its X input is produced by a Conv, ConvTranspose or Gemm (a BN after a Relu is *not* this
//!   pattern: folding through a nonlinearity is wrong);
//! - that intermediate tensor has exactly one reader (the candidate), is not a graph output and is
//!   not read inside a subgraph (any other reader would see the folded values instead);
//! - the weight (input 1) is an f32 constant read by no other node (another reader would see the
//!   rescaled weight); the bias (input 2, optional) likewise; a Gemm's C broadcasts per column.
//!
//! `Mul`/`Add` are only candidates when one input is a constant and the other is the output of a
//! Conv, ConvTranspose or Gemm that nothing else reads (a layer output also read elsewhere, as in
//! HardSwish's `x·f(x + 3)`, is not the pattern); any other Mul/Add is not mentioned.
//!
//! Records: a BatchNormalization fold pushes a record keyed by the layer's output tensor name
//! (after the fold) and its weight name. A later Mul/Add fold into the same layer renames the record
//! and maps its γ, β through the affine map, so they keep describing the layer output.

use std::collections::BTreeSet;

use petgraph::stable_graph::NodeIndex;

use super::rewritable::{f32_tensor, is_graph_output, own_f32_constant, read_in_subgraph, shared_reason};
use super::{Context, Pass};
use crate::error::{Error, Result};
use crate::ir::dump::fmt_float;
use crate::ir::{ops, tensor};
use crate::ir::{BatchNormRecord, Constant, ConstantOrigin, Graph, Model};
use crate::proto::tensor_proto::DataType;
use crate::proto::TensorProto;

pub struct FoldBatchnorm;

/// The layer a fold rewrites, and where its output channels are.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layer {
    Conv,
    /// `group` of the ConvTranspose.
    ConvTranspose(usize),
    /// `transB` of the Gemm.
    Gemm(bool),
}

/// The layer producing a candidate's input, checked for a fold.
struct LayerMatch {
    node: NodeIndex,
    layer: Layer,
    weight: String,
    /// The existing bias (Conv/ConvTranspose input 2, Gemm C), if any.
    bias: Option<String>,
    /// Gemm's beta (1 otherwise).
    beta: f64,
    /// Output channels.
    channels: usize,
}

/// A match: the candidate node and the per-channel affine map it applies to the layer output.
struct Fold {
    candidate: NodeIndex,
    target: LayerMatch,
    /// `z_c = a[c]·y_c + d[c]`.
    a: Vec<f64>,
    d: Vec<f64>,
    /// The BN statistics, for a BatchNormalization.
    record: Option<BatchNormRecord>,
}

impl Pass for FoldBatchnorm {
    fn name(&self) -> &'static str {
        "fold_batchnorm"
    }

    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        let opset = model.opset("").unwrap_or(0);
        let graph = &mut model.graph;
        let mut notes = Vec::new();
        // Sweeps in topological order until one folds nothing (a Mul then an Add fold in one
        // sweep already; the last sweep confirms). Each fold removes a node, so the number of
        // sweeps is bounded by the node count.
        let cap = graph.nodes.node_count() + 1;
        for _ in 0..cap {
            let mut kept = Vec::new();
            let mut folded = 0;
            for ix in graph.topological_order()? {
                if !graph.nodes.contains_node(ix) {
                    continue;
                }
                match find_fold(graph, ix, opset) {
                    None => {}
                    Some(Err(reason)) => kept.push(format!("kept {}: {reason}", graph.nodes[ix].label())),
                    Some(Ok(fold)) => {
                        notes.push(apply_fold(graph, fold, &mut ctx.batchnorm_records)?);
                        folded += 1;
                    }
                }
            }
            if folded == 0 {
                notes.extend(kept);
                return Ok(notes);
            }
        }
        Err(Error::Graph(
            "fold_batchnorm: no fixpoint after as many sweeps as nodes".into(),
        ))
    }
}

/// A constant the runtime cannot override (an initializer that is also a graph input can be).
fn fixed_constant<'g>(graph: &'g Graph, name: &str) -> Option<&'g TensorProto> {
    if graph.inputs.iter().any(|i| i.name() == name) {
        return None;
    }
    graph.constants.get(name).map(|c| &c.tensor)
}

fn producer_of(graph: &Graph, t: &str) -> Option<NodeIndex> {
    graph
        .nodes
        .node_indices()
        .find(|&ix| graph.nodes[ix].outputs.iter().any(|o| o == t))
}

fn fmt_dims(dims: &[i64]) -> String {
    let d: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", d.join(","))
}

/// Is `ix` a candidate, and does it fold? `None`: not a candidate at all; `Some(Err(reason))`:
/// a candidate that must stay.
fn find_fold(graph: &Graph, ix: NodeIndex, opset: i64) -> Option<std::result::Result<Fold, String>> {
    let node = &graph.nodes[ix];
    if !node.is_default_domain() {
        return None;
    }
    match node.op_type.as_str() {
        "BatchNormalization" => Some(match_batchnorm(graph, ix, opset)),
        "Mul" | "Add" => match_affine(graph, ix),
        _ => None,
    }
}

/// The layer producing the candidate's input `x`, if a fold may rewrite it.
fn match_layer(graph: &Graph, candidate: NodeIndex, x: &str) -> std::result::Result<LayerMatch, String> {
    let Some(layer_node) = producer_of(graph, x) else {
        let what = if graph.constants.contains_key(x) {
            "a constant"
        } else {
            "a graph input"
        };
        return Err(format!(
            "its input '{x}' is {what}, not the output of a Conv, ConvTranspose or Gemm"
        ));
    };
    let p = &graph.nodes[layer_node];
    // The views refuse a malformed layer (no weight, group < 1, …) with the reason.
    let (layer, beta, bias_slot) = match (p.is_default_domain(), p.op_type.as_str()) {
        (true, "Conv" | "ConvTranspose") => match ops::Conv::view(p)? {
            c if c.transposed => (Layer::ConvTranspose(c.group), 1.0, c.bias_slot),
            c => (Layer::Conv, 1.0, c.bias_slot),
        },
        (true, "Gemm") => {
            let g = ops::Gemm::view(p)?;
            (Layer::Gemm(g.trans_b), g.beta as f64, g.bias_slot)
        }
        _ => {
            return Err(format!(
                "its input '{x}' comes from {}, not a Conv, ConvTranspose or Gemm",
                p.label()
            ))
        }
    };
    let label = p.label();
    if p.outputs.first().map(String::as_str) != Some(x) {
        return Err(format!("'{x}' is not the first output of {label}"));
    }
    if let Some(reason) = shared_reason(graph, x, candidate) {
        return Err(format!("output of {label}: {reason}"));
    }
    let weight = p.inputs[ops::WEIGHT_SLOT].clone();
    own_f32_constant(graph, &weight, layer_node, "weight")?;
    let wdims = &graph.constants[&weight].tensor.dims;
    let channels = match layer {
        Layer::Conv => {
            if wdims.len() < 3 {
                return Err(format!(
                    "weight '{weight}' of shape {} is not a Conv weight",
                    fmt_dims(wdims)
                ));
            }
            wdims[0] as usize
        }
        Layer::ConvTranspose(group) => {
            if wdims.len() < 3 || !(wdims[0] as usize).is_multiple_of(group) {
                return Err(format!(
                    "weight '{weight}' of shape {} does not fit a ConvTranspose with group={group}",
                    fmt_dims(wdims)
                ));
            }
            wdims[1] as usize * group
        }
        Layer::Gemm(trans_b) => {
            if wdims.len() != 2 {
                return Err(format!("Gemm B '{weight}' of shape {} is not 2-D", fmt_dims(wdims)));
            }
            wdims[if trans_b { 0 } else { 1 }] as usize
        }
    };
    let bias = bias_slot.map(|slot| p.inputs[slot].clone());
    if let Some(b) = &bias {
        own_f32_constant(graph, b, layer_node, "bias")?;
        let bdims = &graph.constants[b].tensor.dims;
        let per_channel = match layer {
            Layer::Gemm(_) => per_channel_shape(bdims, 2, channels),
            _ => tensor::element_count(&graph.constants[b].tensor) == channels as u64,
        };
        if !per_channel {
            return Err(format!(
                "bias '{b}' of shape {} is not one value per output channel ({channels})",
                fmt_dims(bdims)
            ));
        }
    }
    Ok(LayerMatch {
        node: layer_node,
        layer,
        weight,
        bias,
        beta,
        channels,
    })
}

/// True when a constant of shape `dims` broadcast against a layer output of rank `rank` with
/// `channels` channels on axis 1 holds one value per channel and leaves the output shape alone.
fn per_channel_shape(dims: &[i64], rank: usize, channels: usize) -> bool {
    if dims.len() > rank {
        return false;
    }
    let offset = rank - dims.len();
    dims.iter().enumerate().all(|(i, &d)| {
        let axis = i + offset;
        d == 1 || (axis == 1 && d == channels as i64)
    })
}

fn match_batchnorm(graph: &Graph, ix: NodeIndex, opset: i64) -> std::result::Result<Fold, String> {
    let bn = &graph.nodes[ix];
    if opset < 7 {
        return Err(format!(
            "opset {opset} BatchNormalization (is_test semantics) is not folded"
        ));
    }
    if bn.attr_int("training_mode").unwrap_or(0) != 0 {
        return Err("training_mode=1".into());
    }
    if bn.attr_int("spatial").unwrap_or(1) == 0 {
        return Err("spatial=0 (per-activation statistics)".into());
    }
    if bn.inputs.len() != 5 || bn.outputs.first().is_none_or(|o| o.is_empty()) {
        return Err("not the 5-input inference form".into());
    }
    for o in bn.outputs.iter().skip(1).filter(|o| !o.is_empty()) {
        if !graph.consumers(o).is_empty() || is_graph_output(graph, o) || read_in_subgraph(graph, o) {
            return Err(format!("its training output '{o}' is used"));
        }
    }
    let target = match_layer(graph, ix, &bn.inputs[0])?;
    let channels = target.channels;
    let mut params = Vec::new();
    for (name, what) in bn.inputs[1..].iter().zip(["scale", "B", "mean", "var"]) {
        let Some(t) = fixed_constant(graph, name) else {
            return Err(format!("{what} '{name}' is not a constant"));
        };
        if !tensor::is_float(t.data_type()) {
            return Err(format!("{what} '{name}' is not a float tensor"));
        }
        let v = tensor::values_f64(t).ok_or_else(|| format!("{what} '{name}' has no readable values"))?;
        if v.len() != channels {
            return Err(format!(
                "{what} '{name}' has {} values for {channels} output channels",
                v.len()
            ));
        }
        params.push(v);
    }
    let epsilon = bn.attr_float("epsilon").unwrap_or(1e-5);
    let [gamma, beta, mean, var] = <[Vec<f64>; 4]>::try_from(params).expect("four parameters");
    let mut a = Vec::with_capacity(channels);
    let mut d = Vec::with_capacity(channels);
    for c in 0..channels {
        let denom = var[c] + epsilon as f64;
        if denom.is_nan() || denom <= 0.0 {
            return Err(format!("variance + epsilon is {} for channel {c}", fmt_float(denom)));
        }
        let s = gamma[c] / denom.sqrt();
        let shift = beta[c] - s * mean[c];
        if !s.is_finite() || !shift.is_finite() {
            return Err(format!("channel {c} folds to a non-finite scale or shift"));
        }
        a.push(s);
        d.push(shift);
    }
    let f32s = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
    let record = BatchNormRecord {
        output: bn.outputs[0].clone(),
        weight: target.weight.clone(),
        gamma: f32s(&gamma),
        beta: f32s(&beta),
        mean: f32s(&mean),
        var: f32s(&var),
        epsilon,
    };
    Ok(Fold {
        candidate: ix,
        target,
        a,
        d,
        record: Some(record),
    })
}

/// `Mul(y, k)` / `Add(y, k)` with `y` from a layer and `k` a constant (either order).
fn match_affine(graph: &Graph, ix: NodeIndex) -> Option<std::result::Result<Fold, String>> {
    let node = &graph.nodes[ix];
    if node.inputs.len() != 2 || node.outputs.len() != 1 || node.outputs[0].is_empty() {
        return None;
    }
    let is_const = |t: &str| graph.constants.contains_key(t);
    // A layer output read by other nodes too is not the pattern (e.g. HardSwish's `x·f(x + 3)`).
    let from_layer = |t: &str| {
        let from = producer_of(graph, t).is_some_and(|p| {
            let p = &graph.nodes[p];
            p.is_default_domain() && matches!(p.op_type.as_str(), "Conv" | "ConvTranspose" | "Gemm")
        });
        from && graph.consumers(t).len() == 1
    };
    let (y, k) = match (&node.inputs[0], &node.inputs[1]) {
        (y, k) if from_layer(y) && is_const(k) => (y, k),
        (k, y) if from_layer(y) && is_const(k) => (y, k),
        _ => return None,
    };
    Some(check_affine(graph, ix, y, k, node.op_type == "Mul"))
}

fn check_affine(graph: &Graph, ix: NodeIndex, y: &str, k: &str, is_mul: bool) -> std::result::Result<Fold, String> {
    let Some(kt) = fixed_constant(graph, k) else {
        return Err(format!("constant '{k}' is a graph input (a runtime may override it)"));
    };
    if kt.data_type() != DataType::Float as i32 {
        return Err(format!(
            "constant '{k}' is {}, not f32",
            tensor::dtype_name(kt.data_type())
        ));
    }
    let target = match_layer(graph, ix, y)?;
    let channels = target.channels;
    let rank = match target.layer {
        Layer::Gemm(_) => 2,
        _ => graph.constants[&target.weight].tensor.dims.len(),
    };
    if !per_channel_shape(&kt.dims, rank, channels) {
        return Err(format!(
            "constant '{k}' of shape {} does not broadcast per output channel (rank-{rank} output, {channels} channels on axis 1)",
            fmt_dims(&kt.dims)
        ));
    }
    let v = tensor::values_f64(kt).ok_or_else(|| format!("constant '{k}' has no readable values"))?;
    let per_channel: Vec<f64> = match v.len() {
        1 => vec![v[0]; channels],
        n if n == channels => v,
        n => return Err(format!("constant '{k}' holds {n} values")),
    };
    if per_channel.iter().any(|x| !x.is_finite()) {
        return Err(format!("constant '{k}' is not finite"));
    }
    let (a, d) = if is_mul {
        (per_channel, vec![0.0; channels])
    } else {
        (vec![1.0; channels], per_channel)
    };
    Ok(Fold {
        candidate: ix,
        target,
        a,
        d,
        record: None,
    })
}

/// Scales the weight per output channel: `W'[…c…] = a[c]·W[…c…]`, in f64, stored as f32.
fn scale_weight(layer: Layer, w: &[f64], dims: &[i64], a: &[f64]) -> Vec<f32> {
    let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    // The weight as [outer, axis, inner] along the axis that carries the channel.
    let (axis, channel_of): (usize, Box<dyn Fn(usize, usize) -> usize>) = match layer {
        Layer::Conv => (0, Box::new(|_, j| j)),
        Layer::ConvTranspose(group) => {
            let in_per_group = dims[0] / group;
            let out_per_group = dims[1];
            (1, Box::new(move |i, j| (i / in_per_group) * out_per_group + j))
        }
        Layer::Gemm(true) => (0, Box::new(|_, j| j)),
        Layer::Gemm(false) => (1, Box::new(|_, j| j)),
    };
    let outer: usize = dims[..axis].iter().product();
    let len = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(w.len());
    for i in 0..outer {
        for j in 0..len {
            let s = a[channel_of(i, j)];
            let start = (i * len + j) * inner;
            out.extend(w[start..start + inner].iter().map(|x| (s * x) as f32));
        }
    }
    out
}

/// The new bias, `b'_c = a_c·beta·b_c + d_c` (`b` broadcast to one value per channel, 0 when
/// absent); None when there is no bias and none is needed.
fn fold_bias(bias: Option<&[f64]>, beta: f64, a: &[f64], d: &[f64]) -> Option<Vec<f32>> {
    let channels = a.len();
    let b: Vec<f64> = match bias {
        None if d.iter().all(|x| *x == 0.0) => return None,
        None => vec![0.0; channels],
        Some(b) if b.len() == 1 => vec![b[0]; channels],
        Some(b) => b.to_vec(),
    };
    Some((0..channels).map(|c| (a[c] * (beta * b[c]) + d[c]) as f32).collect())
}

/// Writes a fold back: weight, bias, the layer takes over the candidate's output, the candidate
/// and the constants only it read go, the records follow. Returns the note.
fn apply_fold(graph: &mut Graph, fold: Fold, records: &mut Vec<BatchNormRecord>) -> Result<String> {
    let cand = graph.nodes[fold.candidate].clone();
    let t = &fold.target;
    let layer_label = graph.nodes[t.node].label();
    let old_out = graph.nodes[t.node].outputs[0].clone();
    let new_out = cand.outputs[0].clone();
    let channels = fold.a.len();

    let w = &graph.constants[&t.weight].tensor;
    let w_values = tensor::values_f64(w).ok_or_else(|| Error::Graph(format!("weight '{}' unreadable", t.weight)))?;
    let scaled = scale_weight(t.layer, &w_values, &w.dims, &fold.a);
    let new_w = f32_tensor(w, &scaled);
    graph.set_constant(&t.weight, new_w)?;

    let old_bias = match &t.bias {
        Some(b) => Some(
            tensor::values_f64(&graph.constants[b].tensor)
                .ok_or_else(|| Error::Graph(format!("bias '{b}' unreadable")))?,
        ),
        None => None,
    };
    let is_gemm = matches!(t.layer, Layer::Gemm(_));
    if let Some(values) = fold_bias(old_bias.as_deref(), t.beta, &fold.a, &fold.d) {
        let dims = vec![channels as i64];
        match &t.bias {
            Some(b) => {
                let new_b = TensorProto {
                    dims,
                    ..f32_tensor(&graph.constants[b].tensor, &values)
                };
                graph.set_constant(b, new_b)?;
            }
            None => {
                let name = graph.fresh_name(&format!("{}::bias", t.weight));
                let new_b = TensorProto {
                    name: Some(name.clone()),
                    dims,
                    ..f32_tensor(&TensorProto::default(), &values)
                };
                let created = Constant {
                    tensor: new_b,
                    origin: ConstantOrigin::Created,
                };
                graph.constants.insert(name.clone(), created);
                let layer = &mut graph.nodes[t.node];
                layer.inputs.resize(layer.inputs.len().max(3), String::new());
                layer.inputs[2] = name;
            }
        }
        if is_gemm {
            // beta is now inside C.
            graph.nodes[t.node].attributes.retain(|a| a.name() != "beta");
        }
    }

    graph.nodes[t.node].outputs[0] = new_out.clone();
    graph.nodes.remove_node(fold.candidate);
    let dropped: BTreeSet<&str> = std::iter::once(old_out.as_str())
        .chain(cand.outputs.iter().skip(1).map(String::as_str))
        .collect();
    graph.value_info.retain(|v| !dropped.contains(v.name()));
    // The BN parameters or the Mul/Add constant, unless something else still reads them.
    for input in &cand.inputs {
        let unused = graph.constants.contains_key(input)
            && !graph.nodes.node_weights().any(|n| n.inputs.contains(input))
            && !read_in_subgraph(graph, input)
            && !is_graph_output(graph, input)
            && !graph.inputs.iter().any(|i| i.name() == input);
        if unused {
            graph.constants.remove(input);
        }
    }
    graph.rebuild_edges()?;

    let what = format!("{} '{}'", cand.op_type, cand.name);
    let what = if cand.name.is_empty() {
        cand.op_type.clone()
    } else {
        what
    };
    let note = match fold.record {
        Some(record) => {
            records.retain(|r| r.output != old_out);
            let (lo, hi) = fold.a.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                (lo.min(*x), hi.max(*x))
            });
            records.push(record);
            format!(
                "folded {what} into {layer_label} (weight '{}', {channels} channels, γ/σ in [{}, {}]); it writes '{new_out}'",
                t.weight,
                fmt_float(lo),
                fmt_float(hi)
            )
        }
        None => {
            for r in records.iter_mut().filter(|r| r.output == old_out) {
                r.output = new_out.clone();
                for c in 0..channels {
                    r.gamma[c] = (fold.a[c] * r.gamma[c] as f64) as f32;
                    r.beta[c] = (fold.a[c] * r.beta[c] as f64 + fold.d[c]) as f32;
                }
            }
            format!(
                "folded {what} into {layer_label} (weight '{}', {channels} channels); it writes '{new_out}'",
                t.weight
            )
        }
    };
    Ok(note)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_scales_axis_0() {
        // W [2,1,1,2]
        let w = [1.0, 2.0, 3.0, 4.0];
        let out = scale_weight(Layer::Conv, &w, &[2, 1, 1, 2], &[10.0, -1.0]);
        assert_eq!(out, [10.0, 20.0, -3.0, -4.0]);
    }

    #[test]
    fn conv_transpose_scales_axis_1_per_group() {
        // C_in = 4, group = 2, C_out/group = 2: W [4, 2, 1, 1]; output channel g*2 + j.
        let w = [1.0; 8];
        let a = [1.0, 2.0, 3.0, 4.0];
        let out = scale_weight(Layer::ConvTranspose(2), &w, &[4, 2, 1, 1], &a);
        // rows i = 0,1 belong to group 0 (channels 0,1), rows 2,3 to group 1 (channels 2,3).
        assert_eq!(out, [1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]);
        let out = scale_weight(Layer::ConvTranspose(1), &w, &[2, 4, 1, 1], &a);
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn gemm_scales_columns() {
        // B [K=2, N=3] scaled by column; B^T [N=3, K=2] scaled by row.
        let w = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let a = [1.0, 2.0, 3.0];
        assert_eq!(
            scale_weight(Layer::Gemm(false), &w, &[2, 3], &a),
            [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
        );
        assert_eq!(
            scale_weight(Layer::Gemm(true), &w, &[3, 2], &a),
            [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
        );
    }

    #[test]
    fn bias_folds_batchnorm_formula() {
        // γ = 2, σ² + ε = 4, μ = 1, β = 0.5, b = 3: s = 1, b' = 1·(3 − 1) + 0.5 = 2.5.
        let s = 2.0 / 4f64.sqrt();
        let b = fold_bias(Some(&[3.0]), 1.0, &[s], &[0.5 - s * 1.0]).unwrap();
        assert_eq!(b, [2.5]);
        // No bias and no shift: none is added.
        assert_eq!(fold_bias(None, 1.0, &[2.0, 3.0], &[0.0, 0.0]), None);
        // Gemm beta and a scalar C: C' = a·beta·C + d.
        assert_eq!(
            fold_bias(Some(&[1.0]), 0.5, &[2.0, 4.0], &[1.0, 0.0]).unwrap(),
            [2.0, 2.0]
        );
    }

    #[test]
    fn per_channel_shapes() {
        assert!(per_channel_shape(&[4, 1, 1], 4, 4));
        assert!(per_channel_shape(&[1, 4, 1, 1], 4, 4));
        assert!(per_channel_shape(&[1], 4, 4));
        assert!(per_channel_shape(&[], 4, 4));
        assert!(!per_channel_shape(&[4], 4, 4), "[C] aligns with the last axis");
        assert!(!per_channel_shape(&[1, 4, 1, 1, 1], 4, 4), "would add an axis");
        assert!(!per_channel_shape(&[1, 4, 1, 2], 4, 4));
        assert!(per_channel_shape(&[4], 2, 4), "Gemm: [N] is per column");
        assert!(!per_channel_shape(&[3, 1], 2, 4), "Gemm: per row");
    }
}
