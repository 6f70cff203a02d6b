//! The quantization plan: what gets Q/DQ, with which dtype, granularity, symmetry and
//! parameters, decided from the op rules, the target, the calibration statistics and the config
//! *before* any node is written. The plan is inspectable (`--dry-run`), serialisable, and keyed by
//! tensor name; only `materialize` turns it into QuantizeLinear/DequantizeLinear nodes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use petgraph::stable_graph::NodeIndex;

use serde::Serialize;

use crate::calib::observers::Method;
use crate::calib::stats::CalibrationStats;
use crate::error::{Error, Result};
use crate::ir::{Graph, Model, Node};
use crate::quant::codebook::CodebookSpec;
use crate::quant::params::{self, params_for_range, QParams, QuantDtype, Scheme};
use crate::quant::rules::{self, OpRole, Rule, Target, TargetRules, WeightRule, SENTINEL_MAGNITUDE};

/// A consumer input: the consumer's first output name (unique, stable across passes) and slot.
pub type InputRef = (String, usize);

#[derive(Clone, Debug, Serialize)]
pub struct ActivationQuant {
    pub scheme: Scheme,
    /// Range chosen by the calibration method (after sharing with tied tensors).
    pub range: (f32, f32),
    pub params: QParams,
    /// Consumer inputs that read the quantized tensor; other consumers keep the float one.
    pub consumers: Vec<InputRef>,
    /// Tensors that share these parameters (Concat inputs, pass-through ops), if any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shared_with: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WeightQuant {
    pub scheme: Scheme,
    /// Output-channel axis for per-channel parameters (the reduction axis when blocked);
    /// None: per-tensor.
    pub axis: Option<usize>,
    /// Blocks of this many elements along `axis` (ONNX 21's `block_size`), each its own scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// Clustered into a K-means table instead of a grid (`scheme` then unused; `axis` is the
    /// channel axis of per-channel tables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codebook: Option<crate::quant::codebook::CodebookSpec>,
    pub consumers: Vec<InputRef>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BiasQuant {
    /// The activation input and the weight whose scales make the bias scale.
    pub input: String,
    pub weight: String,
    pub consumers: Vec<InputRef>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Plan {
    pub activations: BTreeMap<String, ActivationQuant>,
    pub weights: BTreeMap<String, WeightQuant>,
    pub biases: BTreeMap<String, BiasQuant>,
    /// Tensors a quantized op reads that stay float, with the reason.
    pub kept_float: BTreeMap<String, String>,
    /// Layers (keyed like consumers) that do not run at the default int8, from mixed-precision
    /// overrides or the automatic assignment; `materialize` converts the float16 ones.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub precisions: BTreeMap<String, Precision>,
    /// Weights whose grid points were chosen by the `gptq` pass rather than nearest rounding.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rounded: BTreeMap<String, RoundedWeight>,
    /// Weights whose per-channel (or per-tensor) scales were chosen by the `easyquant` pass
    /// rather than from the weight's range.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scaled: BTreeMap<String, ScaledWeight>,
}

/// The parameters chosen for a weight under a scheme and axis (one per output channel, or one);
/// used only while the plan quantizes the weight the same way, like [`RoundedWeight`].
#[derive(Clone, Debug, Serialize)]
pub struct ScaledWeight {
    pub scheme: Scheme,
    pub axis: Option<usize>,
    #[serde(skip)]
    pub params: Vec<QParams>,
}

/// The integer values chosen for a weight under a scheme and axis; used only while the plan
/// quantizes the weight the same way (the grid is [`params::quantize_weights`]'s either way).
#[derive(Clone, Debug, Serialize)]
pub struct RoundedWeight {
    pub scheme: Scheme,
    pub axis: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    #[serde(skip)]
    pub values: Vec<i32>,
}

/// The precision a layer (an op the plan quantizes) runs at, cheapest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// The plan as built: 8-bit activations and weights (W8A8).
    Int8,
    /// 16-bit activations, 8-bit weights (A16W8).
    Int16,
    /// Inputs cast to float16, weights stored as float16, output cast back to float.
    Float16,
    /// Not quantized.
    Float,
}

impl Precision {
    pub const ALL: [Precision; 4] = [Precision::Int8, Precision::Int16, Precision::Float16, Precision::Float];

    pub fn name(self) -> &'static str {
        match self {
            Precision::Int8 => "int8",
            Precision::Int16 => "int16",
            Precision::Float16 => "float16",
            Precision::Float => "float",
        }
    }
}

/// What the planner needs from the config.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub target: Target,
    pub rules: TargetRules,
    pub method: Method,
    /// Tensors, nodes (by name) and op types never quantized.
    pub overrides: Overrides,
}

/// The config's `overrides:`, in order: a later rule wins over an earlier one.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub rules: Vec<OverrideRule>,
}

/// One override: what it matches (a regex anchored on the whole name) and what it changes.
#[derive(Clone, Debug)]
pub struct OverrideRule {
    pub kind: MatchKind,
    /// The pattern as written in the config, for messages.
    pub pattern: String,
    pub regex: regex::Regex,
    pub exclude: bool,
    pub dtype: Option<crate::quant::params::QuantDtype>,
    pub symmetric: Option<bool>,
    /// Weights only: per-channel (true) or per-tensor (false).
    pub per_channel: Option<bool>,
    /// Weights only: a K-means codebook instead of a grid.
    pub codebook: Option<crate::quant::codebook::CodebookSpec>,
    /// Activations only (tensor rules): a fixed range instead of the calibrated one.
    pub range: Option<(f32, f32)>,
    /// Node and op_type rules: the layer's precision (mixed precision); wins over the
    /// automatic assignment.
    pub precision: Option<Precision>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchKind {
    Tensor,
    Node,
    OpType,
}

impl OverrideRule {
    fn matches_node(&self, n: &Node) -> bool {
        match self.kind {
            // A node without a name is matched by its layer key (its first output).
            MatchKind::Node if n.name.is_empty() => self.regex.is_match(&node_key(n)),
            MatchKind::Node => self.regex.is_match(&n.name),
            MatchKind::OpType => self.regex.is_match(&n.op_type),
            MatchKind::Tensor => false,
        }
    }
    fn matches_tensor(&self, t: &str) -> bool {
        self.kind == MatchKind::Tensor && self.regex.is_match(t)
    }
    fn apply(&self, scheme: &mut Scheme) {
        if let Some(d) = self.dtype {
            // Another dtype takes its full range: `bits` narrows the configured dtype only.
            if d != scheme.dtype {
                scheme.bits = None;
            }
            scheme.dtype = d;
        }
        if let Some(s) = self.symmetric {
            scheme.symmetric = s;
            scheme.narrow_range &= s;
        }
    }
}

impl Overrides {
    fn node(&self, n: &Node) -> Option<String> {
        self.rules
            .iter()
            .rev()
            .find(|r| r.exclude && r.matches_node(n))
            .map(|r| format!("excluded by override ({:?} `{}`)", r.kind, r.pattern))
    }
    fn tensor(&self, t: &str) -> Option<String> {
        self.rules
            .iter()
            .rev()
            .find(|r| r.exclude && r.matches_tensor(t))
            .map(|r| format!("excluded by override (tensor `{}`)", r.pattern))
    }
    /// A weight's scheme, granularity and codebook (from `rules`) after the rules matching its
    /// node or its name: a rule's `codebook` sets one, its `dtype` or granularity a grid.
    fn weight(&self, n: &Node, weight: &str, rules: &TargetRules) -> (Scheme, bool, Option<CodebookSpec>) {
        let (mut scheme, mut per_channel, mut codebook) =
            (rules.weights, rules.per_channel_weights, rules.weight_codebook);
        for r in self
            .rules
            .iter()
            .filter(|r| !r.exclude && (r.matches_node(n) || r.matches_tensor(weight)))
        {
            r.apply(&mut scheme);
            per_channel = r.per_channel.unwrap_or(per_channel);
            if r.dtype.is_some() || r.per_channel.is_some() {
                codebook = None;
            }
            if let Some(c) = r.codebook {
                codebook = Some(c);
                per_channel = c.per_channel;
            }
        }
        (scheme, per_channel, codebook)
    }
    /// Whether a rule matching this weight sets its granularity.
    fn sets_granularity(&self, n: &Node, weight: &str) -> bool {
        self.rules
            .iter()
            .any(|r| !r.exclude && r.per_channel.is_some() && (r.matches_node(n) || r.matches_tensor(weight)))
    }
    /// The precision the last matching node or op_type rule pins for this node, if any.
    pub fn precision(&self, n: &Node) -> Option<Precision> {
        self.rules
            .iter()
            .rev()
            .find(|r| r.precision.is_some() && r.matches_node(n))
            .and_then(|r| r.precision)
    }
    /// An activation's scheme and fixed range after the tensor rules matching it.
    fn activation(&self, t: &str, mut scheme: Scheme) -> (Scheme, Option<(f32, f32)>) {
        let mut range = None;
        for r in self.rules.iter().filter(|r| !r.exclude && r.matches_tensor(t)) {
            r.apply(&mut scheme);
            range = r.range.or(range);
        }
        (scheme, range)
    }
}

/// A layer's key: its first output name (unique and stable across passes), else its node name.
pub fn node_key(n: &Node) -> String {
    n.outputs
        .iter()
        .find(|o| !o.is_empty())
        .cloned()
        .unwrap_or_else(|| n.name.clone())
}

/// Why a tensor whose every quantized reader moved to a higher precision stays float.
fn float_reason(consumers: &[InputRef], of: &impl Fn(&str) -> Precision) -> String {
    let readers: Vec<String> = consumers
        .iter()
        .map(|(k, _)| format!("'{k}' at {}", of(k).name()))
        .collect();
    format!("read by {} (mixed precision)", readers.join(", "))
}

/// Builds the plan. Every activation a quantized op reads is either in `activations` or in
/// `kept_float` with the reason.
///
/// One walk over the graph asks the op registry ([`rules::rule_for`]) what each node quantizes
/// and applies the overrides and the target; then tied tensors get shared parameters, and
/// int32 biases stay only where an integer kernel would use them.
pub fn build_plan(model: &Model, stats: &CalibrationStats, options: &PlanOptions) -> Result<Plan> {
    let g = &model.graph;
    let order = g.topological_order()?;
    let mut walk = Walk::new(g, stats, options, &order);
    for &ix in &order {
        walk.node(&g.nodes[ix]);
    }
    let (mut plan, wanted, ties) = walk.finish();
    share_parameters(&mut plan, &wanted, &ties, stats, options);
    keep_fused_biases(&mut plan, g);
    if plan.activations.is_empty() && plan.weights.is_empty() {
        return Err(Error::Graph(
            "nothing to quantize: the model has no op onnxq quantizes with a float input".into(),
        ));
    }
    let pinned = pinned_precisions(model, &plan, &options.overrides)?;
    if !pinned.is_empty() {
        plan = plan.with_precisions(&pinned);
    }
    Ok(plan)
}

/// The axis a weight's dot products run along, from its output-channel axis: Conv's input
/// channels (1, output axis 0), ConvTranspose's 0 (output 1), a `[K, N]` MatMul/Gemm weight's
/// K (rank − 2, output rank − 1), a transposed Gemm weight's 1 (output 0).
fn reduction_axis(output_axis: usize, rank: usize) -> usize {
    if output_axis == 0 {
        1
    } else if output_axis + 1 == rank {
        rank - 2
    } else {
        0
    }
}

/// The weight types blocked DequantizeLinear is written for.
pub fn blockable(d: QuantDtype) -> bool {
    matches!(d, QuantDtype::Int8 | QuantDtype::Int4 | QuantDtype::Uint4)
}

/// The walk over the graph: what each node's rule asks for, before any parameter is chosen.
struct Walk<'a> {
    g: &'a Graph,
    stats: &'a CalibrationStats,
    options: &'a PlanOptions,
    producers: HashMap<&'a str, (NodeIndex, usize)>,
    /// Tensors computed from constants only (Paddle's Reshape(bias)): constants for quantization.
    constant_derived: BTreeSet<&'a str>,
    /// Weights, biases and kept-float tensors; activations are chosen after the walk.
    plan: Plan,
    /// Tensor -> the consumer inputs reading its quantized version.
    wanted: BTreeMap<String, Vec<InputRef>>,
    /// Tensors that share parameters where both are quantized.
    ties: Vec<(String, String)>,
    /// Pass-through inputs (input, output, consumer, slot), decided after the walk.
    pending_pass_through: Vec<(String, String, String, usize)>,
}

impl<'a> Walk<'a> {
    fn new(g: &'a Graph, stats: &'a CalibrationStats, options: &'a PlanOptions, order: &[NodeIndex]) -> Walk<'a> {
        let mut constant_derived: BTreeSet<&str> = g.constants.keys().map(String::as_str).collect();
        for &ix in order {
            let n = &g.nodes[ix];
            if !n.inputs.is_empty()
                && n.implicit_inputs.is_empty()
                && n.inputs
                    .iter()
                    .all(|i| i.is_empty() || constant_derived.contains(i.as_str()))
            {
                constant_derived.extend(n.outputs.iter().map(String::as_str));
            }
        }
        Walk {
            g,
            stats,
            options,
            producers: g.producers(),
            constant_derived,
            plan: Plan::default(),
            wanted: BTreeMap::new(),
            ties: Vec::new(),
            pending_pass_through: Vec::new(),
        }
    }

    fn is_constant(&self, t: &str) -> bool {
        self.constant_derived.contains(t)
    }

    /// Weights and biases are quantized from float32 only (f16 models keep their f16 layers
    /// float: their Q/DQ would need f16 scales).
    fn is_float_constant(&self, t: &str) -> bool {
        self.g
            .constants
            .get(t)
            .is_some_and(|c| c.tensor.data_type() == crate::proto::tensor_proto::DataType::Float as i32)
    }

    fn readers(&self, t: &str) -> usize {
        self.g
            .nodes
            .node_weights()
            .filter(|n| n.inputs.iter().any(|i| i == t))
            .count()
    }

    /// Whether an output of `n` is read, directly or through pass-through ops and joins, as a
    /// data input of a weighted op or a pool: the ops that compute on quantized values.
    fn reaches_integer_compute(&self, n: &Node, depth: usize) -> bool {
        // Chains of joins and pass-through ops are short; the bound keeps a pathological graph cheap.
        if depth > 64 {
            return true;
        }
        n.outputs.iter().filter(|o| !o.is_empty()).any(|o| {
            self.g.consumers(o).into_iter().any(|(ix, slot)| {
                let c = &self.g.nodes[ix];
                match rules::rule_for(c) {
                    Some(r) if matches!(r.role, rules::OpRole::Weighted | rules::OpRole::Pool) => {
                        r.data_inputs(c.inputs.len()).contains(&slot)
                    }
                    Some(r) if matches!(r.role, rules::OpRole::Join | rules::OpRole::PassThrough) => {
                        self.reaches_integer_compute(c, depth + 1)
                    }
                    _ => false,
                }
            })
        })
    }

    /// One node: what its rule quantizes, unless an override or the target keeps it float.
    fn node(&mut self, n: &Node) {
        let Some(rule) = rules::rule_for(n) else { return };
        let key = node_key(n);
        if let Some(reason) = self.options.overrides.node(n) {
            for t in n
                .inputs
                .iter()
                .filter(|t| !t.is_empty() && !self.g.constants.contains_key(*t))
            {
                self.plan
                    .kept_float
                    .entry(t.clone())
                    .or_insert_with(|| format!("{} {reason}", n.label()));
            }
            return;
        }
        if rule
            .why_float(n, &self.options.rules, &|t: &str| self.is_constant(t))
            .is_some()
        {
            return;
        }
        // A join whose result reaches no integer compute (only float ops and graph outputs, say
        // a detector head's Concat of boxes and scores) would add quantization error and save
        // nothing: it stays float.
        if rule.role == rules::OpRole::Join && !self.reaches_integer_compute(n, 0) {
            return;
        }
        if let Some(weight) = rule.weight {
            self.weight(n, rule, weight, &key);
        }
        for slot in rule.data_inputs(n.inputs.len()) {
            self.data_input(n, rule, slot, &key);
        }
        self.ties.extend(rule.ties(n));
    }

    /// A weighted node's weight, when it is a float constant, and its bias where it may go int32.
    fn weight(&mut self, n: &Node, rule: &Rule, weight: WeightRule, key: &str) {
        let Some(w) = n.inputs.get(weight.slot).filter(|t| self.is_float_constant(t)) else {
            return;
        };
        let rank = self.g.constants[w].tensor.dims.len();
        let rules = &self.options.rules;
        let (scheme, per_channel, codebook) = self.options.overrides.weight(n, w, rules);
        let mut axis = (weight.axis)(n, rank).filter(|&a| per_channel && a < rank && rank > 1);
        let dims = &self.g.constants[w].tensor.dims;
        // Blocks run along the reduction axis. Per-channel instead: an override's granularity or
        // dtype, and a reduction axis the block does not divide (OpenVINO refuses a partial
        // last block; a depthwise Conv's axis is 1 long: a scale per weight).
        let block = rules
            .weight_block_size
            .filter(|_| !self.options.overrides.sets_granularity(n, w) && blockable(scheme.dtype) && per_channel);
        let block = match (block, axis) {
            (Some(b), Some(out)) => {
                let reduction = reduction_axis(out, rank);
                (dims.get(reduction).is_some_and(|&d| d > 1 && d % b as i64 == 0)).then(|| {
                    axis = Some(reduction);
                    b
                })
            }
            _ => None,
        };
        if self.options.overrides.tensor(w).is_some() {
            return;
        }
        // A codebook no smaller than the float weight (small tensors, or a table per channel of
        // few weights: depthwise convolutions) leaves the weight float.
        if let Some(c) = codebook {
            let elements = dims.iter().product::<i64>().max(0) as u64;
            let tables = axis.map_or(1, |a| dims[a].max(1) as u64);
            let stored = c.stored_bytes(elements, tables);
            if stored >= 4 * elements {
                self.plan.kept_float.entry(w.clone()).or_insert_with(|| {
                    format!(
                        "its codebook ({tables} table(s) of {} entries and the indices: {stored} bytes) would be no smaller than the float weight ({} bytes)",
                        c.entries(),
                        4 * elements
                    )
                });
                return;
            }
        }
        let entry = self.plan.weights.entry(w.clone()).or_insert(WeightQuant {
            scheme,
            axis,
            block_size: block,
            codebook,
            consumers: vec![],
        });
        if entry.axis != axis || entry.block_size != block {
            // Shared by ops wanting different axes: per-tensor serves both.
            entry.axis = None;
            entry.block_size = None;
        }
        entry.consumers.push((key.to_string(), weight.slot));
        // A codebook has no weight scale to make an int32 bias's.
        if entry.codebook.is_some() {
            return;
        }
        let Some(bias) = rule.int32_bias(rules) else { return };
        let Some(b) = n.inputs.get(bias.slot).filter(|t| self.is_float_constant(t)) else {
            return;
        };
        // A bias read by two ops would need two int32 versions (one per input scale): a shared
        // bias stays float.
        if self.g.constants[b].tensor.dims.len() == 1 && (bias.when)(n) && self.readers(b) == 1 {
            let entry = self.plan.biases.entry(b.clone()).or_insert(BiasQuant {
                input: n.inputs[0].clone(),
                weight: w.clone(),
                consumers: vec![],
            });
            entry.consumers.push((key.to_string(), bias.slot));
        }
    }

    /// A data input: wanted quantized (a pass-through op's pending), or kept float with the reason.
    fn data_input(&mut self, n: &Node, rule: &Rule, slot: usize, key: &str) {
        let Some(t) = n.inputs.get(slot).filter(|t| !t.is_empty()) else {
            return;
        };
        if self.is_constant(t) {
            return;
        }
        if !self.options.rules.quantize_activations {
            self.plan
                .kept_float
                .entry(t.clone())
                .or_insert_with(|| "weight-only quantization (`activations.dtype: float`)".into());
            return;
        }
        if let Some(reason) = self.kept_float_reason(t) {
            self.plan.kept_float.entry(t.clone()).or_insert(reason);
        } else if rule.role == OpRole::PassThrough {
            // Decided after the walk, once it is known whether a quantized op reads the output.
            if let Some(o) = n.outputs.first() {
                self.pending_pass_through
                    .push((t.clone(), o.clone(), key.to_string(), slot));
            }
        } else {
            self.wanted.entry(t.clone()).or_default().push((key.to_string(), slot));
        }
    }

    /// Why an activation a quantized op reads stays float, if it does.
    fn kept_float_reason(&self, t: &str) -> Option<String> {
        let produced_by_weighted = || {
            self.producers
                .get(t)
                .is_some_and(|&(ix, _)| rules::rule_for(&self.g.nodes[ix]).is_some_and(|r| r.role == OpRole::Weighted))
        };
        if self.options.target.fuses_weighted_outputs() && produced_by_weighted() {
            return Some("output of a weighted op (TensorRT fuses it)".into());
        }
        if let Some(reason) = self.options.overrides.tensor(t) {
            return Some(reason);
        }
        let Some(st) = self.stats.tensors.get(t) else {
            let reason = if self.stats.is_data_free() {
                "no range: data-free mode derives none for it (no BatchNorm statistics reach it)"
            } else {
                "not a float activation (integer or shape tensor)"
            };
            return Some(reason.into());
        };
        if st.min.abs() >= SENTINEL_MAGNITUDE || st.max.abs() >= SENTINEL_MAGNITUDE {
            return Some(format!(
                "sentinel-dominated range [{:e}, {:e}] (e.g. an attention mask)",
                st.min, st.max
            ));
        }
        None
    }

    /// The plan so far, the activations to quantize (tensor -> readers) and the ties. A
    /// pass-through op is quantized only to let a quantized reader of its output run in int8:
    /// they are walked backwards so chains (Reshape -> Transpose -> MatMul) resolve.
    fn finish(mut self) -> (Plan, BTreeMap<String, Vec<InputRef>>, Vec<(String, String)>) {
        for (input, output, key, slot) in self.pending_pass_through.into_iter().rev() {
            if self.wanted.contains_key(&output) {
                self.wanted.entry(input).or_default().push((key, slot));
            }
        }
        for t in self.wanted.keys() {
            self.plan.kept_float.remove(t);
        }
        (self.plan, self.wanted, self.ties)
    }
}

/// The activations' parameters: tied tensors that are both quantized (union-find) share one
/// range, the union of theirs, and one scheme.
fn share_parameters(
    plan: &mut Plan,
    wanted: &BTreeMap<String, Vec<InputRef>>,
    ties: &[(String, String)],
    stats: &CalibrationStats,
    options: &PlanOptions,
) {
    let rules = &options.rules;
    let names: Vec<&String> = wanted.keys().collect();
    let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let mut parent: Vec<usize> = (0..names.len()).collect();
    fn find(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    for (a, b) in ties {
        if let (Some(&a), Some(&b)) = (index.get(a.as_str()), index.get(b.as_str())) {
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
            if ra != rb {
                parent[ra.max(rb)] = ra.min(rb);
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..names.len() {
        let r = find(&mut parent, i);
        groups.entry(r).or_default().push(i);
    }
    for members in groups.values() {
        let mut lo = f32::INFINITY;
        let mut hi = f32::NEG_INFINITY;
        // Tied tensors share one scheme: the overrides of the first member that has any.
        let mut scheme = rules.activations;
        for &m in members {
            let (member_scheme, fixed) = options.overrides.activation(names[m], rules.activations);
            if member_scheme != rules.activations && scheme == rules.activations {
                scheme = member_scheme;
            }
            let (l, h) = fixed.unwrap_or_else(|| stats.tensors[names[m].as_str()].range(&options.method));
            lo = lo.min(l);
            hi = hi.max(h);
        }
        let params = params_for_range(lo, hi, &scheme);
        for &m in members {
            let shared_with: Vec<String> = members.iter().filter(|&&o| o != m).map(|&o| names[o].clone()).collect();
            plan.activations.insert(
                names[m].clone(),
                ActivationQuant {
                    scheme,
                    range: (lo, hi),
                    params,
                    consumers: wanted[names[m].as_str()].clone(),
                    shared_with,
                },
            );
        }
    }
}

/// Keeps a bias int32 only when its input and weight are both quantized, and the layer's
/// output is quantized right after it (directly or through one of the
/// [`rules::FUSED_ACTIVATIONS`]): the pattern runtimes fuse into an integer kernel
/// (QLinearConv), the only one that uses an int32 bias. Elsewhere the layer runs in float on
/// dequantized inputs and an int32 bias would only add its rounding, a systematic per-channel
/// shift that averaging (GlobalAveragePool, SE blocks) does not wash out: ppocr_mobile_v2_cls
/// with folded BatchNorms, 22.4 → 24.8 dB.
fn keep_fused_biases(plan: &mut Plan, g: &Graph) {
    // Every read of `t` is of its quantized version (no float reader, not a graph output).
    let only_read_quantized = |t: &str| {
        let reads = g
            .nodes
            .node_weights()
            .map(|n| n.inputs.iter().filter(|i| *i == t).count())
            .sum::<usize>();
        plan.activations.get(t).is_some_and(|a| a.consumers.len() == reads) && !g.outputs.iter().any(|o| o.name() == t)
    };
    let quantized_after = |layer_output: &str| {
        only_read_quantized(layer_output) || {
            let readers: Vec<&Node> = g
                .nodes
                .node_weights()
                .filter(|n| n.inputs.iter().any(|i| i == layer_output))
                .collect();
            matches!(readers.as_slice(), [r] if rules::FUSED_ACTIVATIONS.contains(&r.op_type.as_str())
                && r.inputs.iter().filter(|i| *i == layer_output).count() == 1
                && !g.outputs.iter().any(|o| o.name() == layer_output)
                && r.outputs.first().is_some_and(|o| only_read_quantized(o)))
        }
    };
    let fused: BTreeSet<String> = plan
        .biases
        .iter()
        .filter(|(_, b)| b.consumers.iter().all(|(layer, _)| quantized_after(layer)))
        .map(|(name, _)| name.clone())
        .collect();
    plan.biases.retain(|name, b| {
        fused.contains(name) && plan.activations.contains_key(&b.input) && plan.weights.contains_key(&b.weight)
    });
}

/// The precisions the overrides pin, for the plan's layers; float16 only where it is possible.
pub fn pinned_precisions(model: &Model, plan: &Plan, overrides: &Overrides) -> Result<BTreeMap<String, Precision>> {
    let layers = plan.layers();
    let mut pinned = BTreeMap::new();
    for n in model.graph.nodes.node_weights() {
        let key = node_key(n);
        if !layers.contains(&key) {
            continue;
        }
        if let Some(p) = overrides.precision(n) {
            if p == Precision::Float16 {
                if let Err(why) = float16_possible(model, plan, &key) {
                    return Err(Error::Usage(format!(
                        "override: {} cannot run in float16: {why}",
                        n.label()
                    )));
                }
            }
            pinned.insert(key, p);
        }
    }
    Ok(pinned)
}

/// Largest finite float16.
pub const FLOAT16_MAX: f32 = 65504.0;

/// Whether a layer can run in float16: a weighted op (Conv, ConvTranspose, Gemm, MatMul) whose
/// float inputs (calibrated ranges and constant weights) fit float16's range.
pub fn float16_possible(model: &Model, plan: &Plan, key: &str) -> std::result::Result<(), String> {
    let g = &model.graph;
    let n = g
        .nodes
        .node_weights()
        .find(|n| node_key(n) == key)
        .ok_or_else(|| format!("no layer '{key}'"))?;
    if !rules::rule_for(n).is_some_and(|r| r.role == OpRole::Weighted) {
        let offered: Vec<&str> = rules::weighted_op_types().collect();
        return Err(format!(
            "{} ops stay in float32 (float16 is offered for {})",
            n.op_type,
            offered.join(", ")
        ));
    }
    for t in n.inputs.iter().filter(|t| !t.is_empty()) {
        if let Some(c) = g.constants.get(t) {
            if c.tensor.data_type() != crate::proto::tensor_proto::DataType::Float as i32 {
                return Err(format!("input '{t}' is not float32"));
            }
            let values = crate::ir::tensor::values_f32(&c.tensor).unwrap_or_default();
            if values.iter().any(|v| v.abs() > FLOAT16_MAX) {
                return Err(format!("weight '{t}' exceeds float16's range"));
            }
        } else if let Some(a) = plan.activations.get(t) {
            if a.range.0.abs() > FLOAT16_MAX || a.range.1.abs() > FLOAT16_MAX {
                return Err(format!(
                    "input '{t}' ranges over [{:e}, {:e}], beyond float16",
                    a.range.0, a.range.1
                ));
            }
        } else {
            return Err(format!("input '{t}' has no calibrated range"));
        }
    }
    Ok(())
}

/// A weight constant's float values and dims.
fn weight_values<'g>(graph: &'g crate::ir::Graph, weight: &str) -> Result<(Vec<f32>, &'g [i64])> {
    let t = &graph
        .constants
        .get(weight)
        .ok_or_else(|| Error::Graph(format!("weight '{weight}' is not a constant")))?
        .tensor;
    let values = crate::ir::tensor::values_f32(t)
        .ok_or_else(|| Error::Graph(format!("weight '{weight}' is not a float tensor")))?;
    Ok((values, &t.dims))
}

impl Plan {
    /// Tensors with Q/DQ, weights, biases: counts for the summary.
    pub fn summary(&self) -> String {
        let per_channel = self.weights.values().filter(|w| w.axis.is_some()).count();
        let codebooks = self.weights.values().filter(|w| w.codebook.is_some()).count();
        format!(
            "{} activations, {} weights ({} per-channel{}), {} int32 biases quantized; {} tensors kept float",
            self.activations.len(),
            self.weights.len(),
            per_channel,
            if codebooks > 0 {
                format!(", {codebooks} codebooks")
            } else {
                String::new()
            },
            self.biases.len(),
            self.kept_float.len()
        )
    }

    /// The weighted nodes (Conv, ConvTranspose, Gemm, MatMul) whose weight (input 1) this plan
    /// quantizes, in topological order.
    pub fn weighted_layers<'g>(
        &self,
        graph: &'g crate::ir::Graph,
    ) -> Result<Vec<(petgraph::stable_graph::NodeIndex, &'g str)>> {
        let mut out = Vec::new();
        for ix in graph.topological_order()? {
            let n = &graph.nodes[ix];
            let Some(weight) = rules::rule_for(n).and_then(|r| r.weight) else {
                continue;
            };
            if let Some(w) = n.inputs.get(weight.slot).filter(|w| self.weights.contains_key(*w)) {
                out.push((ix, w.as_str()));
            }
        }
        Ok(out)
    }

    /// A weight quantized as this plan says: the grid of [`params::quantize_weights`] (or the
    /// scales `easyquant` chose, [`Plan::weight_grid`]), at the grid points `gptq` chose when it
    /// rounded this weight under the same scheme and axis.
    pub fn quantized_weight(&self, graph: &crate::ir::Graph, weight: &str) -> Result<params::QuantizedTensor> {
        let mut q = self.weight_grid(graph, weight)?;
        if let Some(r) = self.rounded.get(weight) {
            let wq = &self.weights[weight];
            if r.scheme == wq.scheme
                && r.axis == wq.axis
                && r.block_size == wq.block_size
                && r.values.len() == q.values.len()
            {
                q.values.clone_from(&r.values);
            }
        }
        Ok(q)
    }

    /// A weight on the plan's grid, rounded to nearest: the parameters of
    /// [`params::quantize_weights`], or those `easyquant` chose for it under the same scheme
    /// and axis (unblocked).
    pub fn weight_grid(&self, graph: &crate::ir::Graph, weight: &str) -> Result<params::QuantizedTensor> {
        let wq = self
            .weights
            .get(weight)
            .ok_or_else(|| Error::Graph(format!("the plan does not quantize weight '{weight}'")))?;
        let (values, dims) = weight_values(graph, weight)?;
        let mut q = params::quantize_weights_blocked(&values, dims, wq.axis, wq.block_size, &wq.scheme)?;
        if let Some(s) = self.scaled.get(weight) {
            if s.scheme == wq.scheme && s.axis == wq.axis && wq.block_size.is_none() && s.params.len() == q.params.len()
            {
                q.params.clone_from(&s.params);
                let (qmin, qmax) = wq.scheme.qrange();
                q.values = values
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| params::quantize(x, q.params_of(i), wq.scheme.dtype).clamp(qmin, qmax))
                    .collect();
            }
        }
        Ok(q)
    }

    /// A weight's values as the quantized model computes them: its codebook's entries, or its
    /// grid points ([`Plan::quantized_weight`]).
    pub fn dequantized_weight(&self, graph: &crate::ir::Graph, weight: &str) -> Result<Vec<f32>> {
        match self.weights.get(weight).is_some_and(|w| w.codebook.is_some()) {
            true => Ok(self.codebook(graph, weight)?.dequantized()),
            false => Ok(self.quantized_weight(graph, weight)?.dequantized()),
        }
    }

    /// A codebook weight clustered as this plan says ([`crate::quant::codebook::cluster`]).
    pub fn codebook(&self, graph: &crate::ir::Graph, weight: &str) -> Result<crate::quant::codebook::Codebook> {
        let (wq, spec) = self
            .weights
            .get(weight)
            .and_then(|w| w.codebook.map(|c| (w, c)))
            .ok_or_else(|| Error::internal(format!("the plan has no codebook for weight '{weight}'")))?;
        let (values, dims) = weight_values(graph, weight)?;
        crate::quant::codebook::cluster(&values, dims, wq.axis, spec)
    }

    /// Keeps what plan passes chose in `from` (a plan of the same model built again from the
    /// same statistics, as `correct_bias` does): roundings, searched weight scales, and the
    /// parameters of every activation quantized under the same scheme over the same range.
    pub fn keep_choices(&mut self, from: &Plan) {
        self.rounded.clone_from(&from.rounded);
        self.scaled.clone_from(&from.scaled);
        for (t, a) in &mut self.activations {
            if let Some(old) = from
                .activations
                .get(t)
                .filter(|o| o.scheme == a.scheme && o.range == a.range)
            {
                a.params = old.params;
            }
        }
    }

    /// The layers: every op that reads a quantized activation or weight, by key, sorted.
    pub fn layers(&self) -> BTreeSet<String> {
        self.activations
            .values()
            .flat_map(|a| a.consumers.iter())
            .chain(self.weights.values().flat_map(|w| w.consumers.iter()))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The plan with only these layers quantized (the others read float): for sensitivity.
    pub fn restricted_to(&self, layers: &BTreeSet<String>) -> Plan {
        let assignment = self
            .layers()
            .into_iter()
            .filter(|l| !layers.contains(l))
            .map(|l| (l, Precision::Float))
            .collect();
        self.with_precisions(&assignment)
    }

    /// The plan with these layers at these precisions (layers not named keep theirs): float and
    /// float16 layers read float tensors, int16 layers read 16-bit activations (every reader of
    /// an activation an int16 layer reads gets the 16-bit version) and keep their 8-bit weights.
    pub fn with_precisions(&self, assignment: &BTreeMap<String, Precision>) -> Plan {
        let mut precisions = self.precisions.clone();
        for (layer, &p) in assignment {
            if p == Precision::Int8 {
                precisions.remove(layer);
            } else {
                precisions.insert(layer.clone(), p);
            }
        }
        let of = |key: &str| precisions.get(key).copied().unwrap_or(Precision::Int8);
        let reads_quantized = |(key, _): &InputRef| of(key) <= Precision::Int16;
        let mut plan = Plan {
            kept_float: self.kept_float.clone(),
            rounded: self.rounded.clone(),
            scaled: self.scaled.clone(),
            ..Plan::default()
        };
        for (t, a) in &self.activations {
            let consumers: Vec<InputRef> = a.consumers.iter().filter(|c| reads_quantized(c)).cloned().collect();
            if consumers.is_empty() {
                plan.kept_float.insert(t.clone(), float_reason(&a.consumers, &of));
                continue;
            }
            let mut a = ActivationQuant { consumers, ..a.clone() };
            if a.consumers.iter().any(|(k, _)| of(k) == Precision::Int16) {
                a.scheme.dtype = match a.scheme.dtype {
                    QuantDtype::Uint8 | QuantDtype::Uint16 | QuantDtype::Uint4 => QuantDtype::Uint16,
                    QuantDtype::Int8
                    | QuantDtype::Int16
                    | QuantDtype::Int4
                    | QuantDtype::Float8e4m3fn
                    | QuantDtype::Float8e5m2
                    | QuantDtype::Ternary
                    | QuantDtype::Binary => QuantDtype::Int16,
                };
                a.scheme.reduce_range = false;
                a.scheme.bits = None;
                a.params = params_for_range(a.range.0, a.range.1, &a.scheme);
            }
            plan.activations.insert(t.clone(), a);
        }
        for (w, q) in &self.weights {
            let consumers: Vec<InputRef> = q.consumers.iter().filter(|c| reads_quantized(c)).cloned().collect();
            if consumers.is_empty() {
                plan.kept_float.insert(w.clone(), float_reason(&q.consumers, &of));
            } else {
                plan.weights.insert(w.clone(), WeightQuant { consumers, ..q.clone() });
            }
        }
        for (b, q) in &self.biases {
            let consumers: Vec<InputRef> = q.consumers.iter().filter(|c| reads_quantized(c)).cloned().collect();
            if !consumers.is_empty() && plan.activations.contains_key(&q.input) && plan.weights.contains_key(&q.weight)
            {
                plan.biases.insert(b.clone(), BiasQuant { consumers, ..q.clone() });
            }
        }
        plan.precisions = precisions;
        plan
    }

    /// Names of every tensor the plan touches, for override checks.
    pub fn tensors(&self) -> BTreeSet<&str> {
        self.activations
            .keys()
            .chain(self.weights.keys())
            .chain(self.kept_float.keys())
            .map(String::as_str)
            .collect()
    }
}
