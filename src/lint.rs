//! `onnxq lint`: checks any QDQ model (onnxq's, ONNX Runtime's, a hand-made one) against what a
//! target backend accepts and fuses, and explains each finding with the node, the rule and the
//! fix. The main job lints its own output for its target: a finding there is onnxq's bug.
//!
//! Every graph is read: the main graph, then the bodies of If, Loop and Scan nodes (findings
//! name the node holding them, `If 'x' then_branch / Conv 'y'`), each with the constants of the
//! enclosing graphs it reads.
//!
//! Rules, by target (each stated on the graph's structure, never on names):
//! - `tensorrt` (TensorRT 10's explicit quantization; its documented Q/DQ requirements):
//!   - `zero-point`: every zero point is 0 — TensorRT quantizes symmetrically only;
//!   - `type`: Q/DQ are int8 (or FP8 e4m3fn), or int4 on a DequantizeLinear of a constant weight;
//!     uint8, 16-bit and int32 (a quantized bias) are rejected: TensorRT keeps biases float;
//!   - `weight-axis`: a per-channel weight is quantized along its output channels (Conv axis 0,
//!     ConvTranspose 1, Gemm 1 or 0 with transB, MatMul the last axis);
//!   - `weighted-output`: no QuantizeLinear right on a Conv/ConvTranspose/Gemm/MatMul output:
//!     TensorRT fuses the layer with what follows (bias, activation, residual Add) and quantizes
//!     after the fusion; a Q there splits it;
//!   - `concat-scales`: the quantized inputs of a Concat share one scale, else TensorRT
//!     requantizes each of them.
//! - `onnxruntime`: no rule breaks; [`integer_layers`] lists the Conv/MatMul its QDQ
//!   transformer turns into integer kernels (QLinearConv, QLinearMatMul): DequantizeLinear on
//!   the data and the constant weight, 8-bit types, and one QuantizeLinear reading the output.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::ir::tensor::{dtype_name, values_f64};
use crate::ir::{Graph, Model, Node};

/// The node writing each tensor, computed once per lint.
struct Producers<'g>(std::collections::HashMap<&'g str, (petgraph::stable_graph::NodeIndex, usize)>);

impl<'g> Producers<'g> {
    fn of(g: &'g Graph) -> Self {
        Producers(g.producers())
    }
    /// The node writing `tensor`, if it is `op`.
    fn op(&self, g: &'g Graph, tensor: &str, op: &str) -> Option<&'g Node> {
        let &(p, _) = self.0.get(tensor)?;
        let n = &g.nodes[p];
        (n.op_type == op).then_some(n)
    }
}
use crate::proto::tensor_proto::DataType;
use crate::quant::rules::Target;

/// One broken rule.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub rule: &'static str,
    /// The node, as `Op 'name'` (or `Op -> output` when unnamed).
    pub node: String,
    pub message: String,
    pub fix: &'static str,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}: {} — fix: {}", self.rule, self.node, self.message, self.fix)
    }
}

/// The target's name as the config spells it.
pub fn target_name(target: Target) -> &'static str {
    match target {
        Target::Generic => "generic",
        Target::Tensorrt => "tensorrt",
        Target::Openvino => "openvino",
        Target::Onnxruntime => "onnxruntime",
    }
}

/// Whether `target` has rules a model can break (module docs).
pub fn has_rules(target: Target) -> bool {
    target == Target::Tensorrt
}

/// The findings for `target`, in topological order of the nodes, each graph's after the graph
/// holding it (If, Loop and Scan bodies included).
pub fn lint(model: &Model, target: Target) -> crate::Result<Vec<Finding>> {
    let mut findings = Vec::new();
    if !has_rules(target) {
        return Ok(findings);
    }
    each_graph(&model.graph, "", &mut |g, scope| lint_graph(g, scope, &mut findings))?;
    Ok(findings)
}

/// Calls `visit` on `g` and then on every subgraph of its nodes, depth first, with the scope
/// that names where a node stands (`If 'cond' then_branch / `; "" in the main graph). A
/// subgraph gets the constants of the enclosing graphs it reads, so a DequantizeLinear of an
/// outer weight is seen as one.
fn each_graph(g: &Graph, scope: &str, visit: &mut dyn FnMut(&Graph, &str) -> crate::Result<()>) -> crate::Result<()> {
    visit(g, scope)?;
    for ix in g.topological_order()? {
        let n = &g.nodes[ix];
        for a in &n.attributes {
            for body in a.g.iter().chain(a.graphs.iter()) {
                let mut inner = Graph::from_proto(body.clone())?;
                for outer in &n.implicit_inputs {
                    if let Some(c) = g.constants.get(outer) {
                        inner.constants.entry(outer.clone()).or_insert_with(|| c.clone());
                    }
                }
                each_graph(&inner, &format!("{scope}{} {} / ", n.label(), a.name()), visit)?;
            }
        }
    }
    Ok(())
}

fn lint_graph(g: &Graph, scope: &str, findings: &mut Vec<Finding>) -> crate::Result<()> {
    let producers = Producers::of(g);
    for ix in g.topological_order()? {
        let n = &g.nodes[ix];
        if !n.is_default_domain() {
            continue;
        }
        let mut found = |rule, message: String, fix| {
            findings.push(Finding {
                rule,
                node: format!("{scope}{}", n.label()),
                message,
                fix,
            })
        };
        match n.op_type.as_str() {
            "QuantizeLinear" | "DequantizeLinear" => {
                if let Some(zp) = n.inputs.get(2).filter(|z| !z.is_empty()) {
                    let nonzero = g
                        .constants
                        .get(zp)
                        .and_then(|c| values_f64(&c.tensor))
                        .is_some_and(|v| v.iter().any(|&x| x != 0.0));
                    if nonzero {
                        found(
                            "zero-point",
                            format!("zero point '{zp}' is not 0"),
                            "quantize symmetrically (onnxq: `target: tensorrt`)",
                        );
                    }
                }
                let dtype = quantized_type(g, &producers, n);
                let weight_dq = n.op_type == "DequantizeLinear" && g.constants.contains_key(first(&n.inputs));
                let accepted = dtype == DataType::Int8 as i32
                    || dtype == DataType::Float8e4m3fn as i32
                    || (weight_dq && dtype == DataType::Int4 as i32);
                if !accepted {
                    found(
                        "type",
                        format!(
                            "{} {}: TensorRT takes int8 or FP8 e4m3fn Q/DQ (int4 only for constant weights) and keeps biases float",
                            dtype_name(dtype),
                            if weight_dq { "constant" } else { "activation" }
                        ),
                        "int8 symmetric activations and weights, float biases (onnxq: `target: tensorrt`)",
                    );
                }
            }
            "Conv" | "ConvTranspose" | "Gemm" | "MatMul" => {
                if let Some(message) = wrong_weight_axis(g, &producers, n) {
                    found("weight-axis", message, "quantize the weight per output channel");
                }
                let output = first(&n.outputs);
                if g.consumers(output)
                    .iter()
                    .any(|&(c, _)| g.nodes[c].op_type == "QuantizeLinear")
                {
                    found(
                        "weighted-output",
                        format!("its output '{output}' is quantized right after it"),
                        "quantize the inputs of the next quantized op instead (onnxq: `target: tensorrt`)",
                    );
                }
            }
            "Concat" => {
                let scales: BTreeSet<Vec<u64>> = n
                    .inputs
                    .iter()
                    .filter_map(|i| dequantized_scale(g, &producers, i))
                    .collect();
                if scales.len() > 1 {
                    found(
                        "concat-scales",
                        format!("its quantized inputs have {} different scales", scales.len()),
                        "give the Concat inputs one shared scale (onnxq does)",
                    );
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A node's first input or output ("" when it has none: a malformed node matches nothing).
fn first(names: &[String]) -> &str {
    names.first().map_or("", String::as_str)
}

/// The integer type a QuantizeLinear writes or a DequantizeLinear reads: its zero point's, else
/// (Q) `output_dtype` or uint8, the ONNX default; (DQ) its constant input's, or the producing Q's.
fn quantized_type(g: &Graph, producers: &Producers, n: &Node) -> i32 {
    if let Some(zp) = n
        .inputs
        .get(2)
        .filter(|z| !z.is_empty())
        .and_then(|z| g.constants.get(z))
    {
        return zp.tensor.data_type();
    }
    if n.op_type == "QuantizeLinear" {
        return n
            .attr_int("output_dtype")
            .filter(|&t| t != 0)
            .map_or(DataType::Uint8 as i32, |t| t as i32);
    }
    if let Some(c) = g.constants.get(first(&n.inputs)) {
        return c.tensor.data_type();
    }
    match producers.op(g, first(&n.inputs), "QuantizeLinear") {
        Some(q) => quantized_type(g, producers, q),
        None => DataType::Uint8 as i32,
    }
}

/// The scale values (as bits, to compare exactly) of the DequantizeLinear writing `tensor`, if
/// one does.
fn dequantized_scale(g: &Graph, producers: &Producers, tensor: &str) -> Option<Vec<u64>> {
    let dq = producers.op(g, tensor, "DequantizeLinear")?;
    let scale = g.constants.get(dq.inputs.get(1)?)?;
    Some(values_f64(&scale.tensor)?.iter().map(|v| v.to_bits()).collect())
}

/// A per-channel weight DequantizeLinear feeding `n` along another axis than its output channels.
fn wrong_weight_axis(g: &Graph, producers: &Producers, n: &Node) -> Option<String> {
    let weight = n.inputs.get(1)?;
    let dq = producers.op(g, weight, "DequantizeLinear")?;
    let x = g.constants.get(dq.inputs.first()?)?;
    let scale = g.constants.get(dq.inputs.get(1)?)?;
    if scale.tensor.dims.len() != 1 || scale.tensor.dims[0] <= 1 || dq.attribute("block_size").is_some() {
        return None; // per-tensor or block-wise
    }
    let rank = x.tensor.dims.len() as i64;
    let axis = dq.attr_int("axis").unwrap_or(1);
    let axis = if axis < 0 { axis + rank } else { axis };
    let expected = match n.op_type.as_str() {
        "Conv" => 0,
        "ConvTranspose" => 1,
        "Gemm" if n.attr_int("transB").unwrap_or(0) != 0 => 0,
        "Gemm" => 1,
        _ => rank - 1,
    };
    (axis != expected).then(|| {
        format!(
            "weight '{weight}' is quantized per channel along axis {axis}; its output channels are on axis {expected}"
        )
    })
}

/// The Conv/ConvTranspose/Gemm/MatMul ONNX Runtime's QDQ transformer runs as integer kernels:
/// DequantizeLinear on the data input and on a constant weight, 8-bit types, an int32 bias (if
/// any) dequantized too, and exactly one reader of the output, a QuantizeLinear. With the reason
/// for every other one.
pub fn integer_layers(model: &Model) -> crate::Result<Vec<(String, Result<(), String>)>> {
    let mut out = Vec::new();
    each_graph(&model.graph, "", &mut |g, scope| integer_layers_of(g, scope, &mut out))?;
    Ok(out)
}

fn integer_layers_of(g: &Graph, scope: &str, out: &mut Vec<(String, Result<(), String>)>) -> crate::Result<()> {
    let eight_bit = [DataType::Int8 as i32, DataType::Uint8 as i32];
    let producers = Producers::of(g);
    for ix in g.topological_order()? {
        let n = &g.nodes[ix];
        if !n.is_default_domain() || !["Conv", "ConvTranspose", "Gemm", "MatMul"].contains(&n.op_type.as_str()) {
            continue;
        }
        let dq_of = |slot: usize| producers.op(g, n.inputs.get(slot)?, "DequantizeLinear");
        let verdict = (|| {
            let x = dq_of(0).ok_or("its data input is not dequantized")?;
            let w = dq_of(1).ok_or("its weight is not dequantized")?;
            if !g.constants.contains_key(first(&w.inputs)) {
                return Err("its weight is not a constant".to_string());
            }
            let (tx, tw) = (quantized_type(g, &producers, x), quantized_type(g, &producers, w));
            for (what, t) in [("data", tx), ("weight", tw)] {
                if !eight_bit.contains(&t) {
                    return Err(format!("its {what} is {}, not 8-bit", dtype_name(t)));
                }
            }
            if tx == DataType::Int8 as i32 && tw != tx {
                return Err("int8 data needs int8 weights".to_string());
            }
            if n.inputs.get(2).is_some_and(|b| !b.is_empty()) && dq_of(2).is_none() {
                return Err("its bias is float (an integer kernel reads an int32 bias)".to_string());
            }
            // One QuantizeLinear reads the output, directly or through one Relu or Clip (which
            // ONNX Runtime folds into the Q: ReluQuantFusion, ClipQuantFusion).
            let only_reader = |t: &str| match g.consumers(t).as_slice() {
                [(r, _)] => Some(*r),
                _ => None,
            };
            let q = only_reader(first(&n.outputs)).and_then(|r| {
                let r = &g.nodes[r];
                if r.op_type == "QuantizeLinear" {
                    return Some(r);
                }
                let through = ["Relu", "Clip"].contains(&r.op_type.as_str());
                let q = &g.nodes[only_reader(first(&r.outputs)).filter(|_| through)?];
                (q.op_type == "QuantizeLinear").then_some(q)
            });
            match q {
                None => Err(
                    "its output is not quantized right after it (by one QuantizeLinear, or one through a Relu or Clip)"
                        .to_string(),
                ),
                Some(q) if quantized_type(g, &producers, q) != tx => {
                    Err("its output is quantized to another type than its input".to_string())
                }
                Some(_) => Ok(()),
            }
        })();
        out.push((format!("{scope}{}", n.label()), verdict));
    }
    Ok(())
}
