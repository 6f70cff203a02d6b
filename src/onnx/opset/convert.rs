//! The conversions, one function per kind of change (which (operator, opset) pair needs which
//! kind is in [`super::table`]); every change leaves a note for the report:
//!
//! - attributes that became inputs, all through the one [`Converter::attribute_to_input`]:
//!   9 Upsample `scales`; 10 Slice `starts`/`ends`/`axes`, TopK `k` (the input `K`); 11 Clip
//!   `min`/`max` (scalars of the input's type), Pad `pads` and `value`; 12 Dropout `ratio`; 13
//!   Squeeze/Unsqueeze/ReduceSum `axes`, Split `split`; 18 ReduceL1/L2/LogSum/LogSumExp/Max/
//!   Mean/Min/Prod/SumSquare `axes`; 20 DFT `axis`.
//! - outputs that changed or went, dropped when unused and refused when read: 10 Dropout's mask
//!   (its type became bool); 14 BatchNormalization's training outputs.
//! - deprecated operators renamed to their successor: 10 Upsample → Resize (Resize-10 is
//!   Upsample-9 under a new name), 11 Scatter → ScatterElements.
//! - attributes restated: 9 BatchNormalization `spatial` removed (1 dropped; 0 refused); 16
//!   RoiAlign's old default `coordinate_transformation_mode` made explicit; 18 Split without a
//!   `split` input gets `num_outputs`; 20 GridSample modes `bilinear`/`bicubic` renamed.
//! - checks, for what was removed without an equivalent: 9 Scan (Scan-8 is batched: refused);
//!   13 Erf of an integer type (refused).
//! - rewrites of changed semantics, one function each: 11 Resize (a `roi` input added;
//!   Resize-10's asymmetric coordinates and, for nearest, flooring made explicit); 13 Resize
//!   (`tf_half_pixel_for_nn` refused; `scales` omitted when `sizes` is given); 13
//!   Softmax/LogSoftmax/Hardmax (before 13 the input was coerced to 2-D at `axis` and normalised
//!   over all trailing dimensions, from 13 over the one `axis`, whose default went from 1 to -1:
//!   nothing changes when `axis` is the last dimension (explicitly -1, or `rank - 1` with the
//!   rank known); otherwise the node is wrapped as `Reshape(op(Flatten(x, axis), axis = -1),
//!   Shape(x))`, which is exact for any rank, known or not); 21 GroupNormalization (scale and
//!   bias per channel instead of per group: repeated).
//!
//! Created constants are named `<node>::<what>` (node name, or its first output when unnamed),
//! made unique with `_1`, `_2`, ... in the rare case of a clash; created nodes take the order key
//! of the node they belong to. An original constant a conversion replaced is removed when nothing
//! else reads it.

use std::collections::BTreeSet;

use petgraph::stable_graph::NodeIndex;

use super::infer::{constant_fact, infer_facts, normalize_axis, Facts};
use super::listed;
use super::table::{step_kind, Conversion, StepKind, REDUCE_AXES_18};
use crate::error::{Error, Result};
use crate::ir::attribute;
use crate::ir::tensor::{self, float_tensor, i64_tensor};
use crate::ir::{Constant, ConstantOrigin, Graph, Model, Node};
use crate::onnx::schema_since;
use crate::proto::tensor_proto::DataType;
use crate::proto::{AttributeProto, GraphProto, TensorProto};

// ---------------------------------------------------------------------------------------------
// Unique names for what the conversions create.

/// Every name the model uses (tensors and nodes, inside subgraphs too), so that created ones
/// never clash.
pub(super) struct Names {
    taken: BTreeSet<String>,
}

impl Names {
    pub(super) fn of_model(model: &Model) -> Names {
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
// Attributes and inputs.

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

/// How [`Converter::attribute_to_input`] stores an attribute's value.
enum AsInput {
    /// An `ints` attribute, as a 1-D int64 tensor.
    Ints,
    /// An `int` attribute, as an int64 tensor of these dims (`[1]`, or `[]` for a scalar).
    Int(Vec<i64>),
    /// A `floats` attribute, as a 1-D float32 tensor.
    Floats,
    /// A `float` attribute, as a float32 scalar.
    Float,
    /// A `float` attribute, as a scalar of the data's element type (which the note names).
    LikeData(i32),
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
pub(super) struct Undo {
    pub(super) created: Vec<String>,
    pub(super) removed: Vec<(String, Constant)>,
}

/// What happened to one node, for its note.
#[derive(Default)]
struct NodeState {
    changes: Vec<String>,
    /// The node was an Upsample: its scales are ≥ 1 by definition.
    from_upsample: bool,
}

/// Converts the nodes of `graph` (and of its subgraphs) from opset `from` to `target`.
pub(super) fn convert_graph(
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
                    StepKind::Convert(kind) => conv.step(ix, &op, v, kind, &mut st).map_err(|e| match e {
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

    /// The one way an attribute becomes an input: the value of `a` (already taken off the
    /// node), stored `as_input`, becomes the constant `<node>::<what>` wired to input `slot`, and
    /// the note says `attribute <name> <value> → input '<constant>'`.
    fn attribute_to_input(
        &mut self,
        ix: NodeIndex,
        a: &AttributeProto,
        what: &str,
        slot: usize,
        as_input: AsInput,
        st: &mut NodeState,
    ) {
        let f32_type = DataType::Float as i32;
        let (t, shown, typed) = match as_input {
            AsInput::Ints => (
                i64_tensor(vec![a.ints.len() as i64], &a.ints),
                format!("{:?}", a.ints),
                String::new(),
            ),
            AsInput::Int(dims) => (i64_tensor(dims, &[a.i()]), a.i().to_string(), String::new()),
            AsInput::Floats => {
                let values: Vec<f64> = a.floats.iter().map(|&f| f as f64).collect();
                (
                    float_tensor(f32_type, vec![values.len() as i64], &values),
                    format!("{:?}", a.floats),
                    String::new(),
                )
            }
            AsInput::Float => (
                float_tensor(f32_type, vec![], &[a.f() as f64]),
                a.f().to_string(),
                String::new(),
            ),
            AsInput::LikeData(dtype) => (
                float_tensor(dtype, vec![], &[a.f() as f64]),
                a.f().to_string(),
                format!(" ({})", tensor::dtype_name(dtype)),
            ),
        };
        let name = self.add_constant(ix, what, t);
        set_input(self.node_mut(ix), slot, name.clone());
        st.changes
            .push(format!("attribute {} {shown} → input '{name}'{typed}", a.name()));
    }

    /// Moves an integer-list attribute to an int64 1-D constant input at `slot`.
    fn ints_attr_to_input(&mut self, ix: NodeIndex, attr: &str, slot: usize, st: &mut NodeState) {
        let Some(a) = take_attr(self.node_mut(ix), attr) else {
            return;
        };
        if a.ints.is_empty() && attr == "axes" {
            // An empty list meant "all axes", as an absent input does; an empty input would not
            // (Reduce* with noop_with_empty_axes, and Squeeze, read it differently).
            st.changes
                .push("empty attribute axes dropped (all axes, as before)".into());
            return;
        }
        self.attribute_to_input(ix, &a, attr, slot, AsInput::Ints, st);
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

    /// Converts the node across the redefinition of `op` at opset `v`, a conversion of `kind`.
    fn step(&mut self, ix: NodeIndex, op: &str, v: i64, kind: Conversion, st: &mut NodeState) -> Result<()> {
        match kind {
            Conversion::AttributesToInputs => self.attributes_to_inputs(ix, op, v, st),
            Conversion::DropOutputs => self.drop_changed_outputs(ix, op, v, st),
            Conversion::Rename => self.rename(ix, op, v, st),
            Conversion::RestateAttributes => self.restate_attributes(ix, op, v, st),
            Conversion::Check => self.check(ix, op, v),
            Conversion::Rewrite => match (op, v) {
                ("Resize", 11) => self.resize_11(ix, st),
                ("Resize", 13) => self.resize_13(ix, st),
                ("Softmax" | "LogSoftmax" | "Hardmax", 13) => self.softmax_13(ix, st),
                ("GroupNormalization", 21) => self.group_norm_21(ix, st),
                _ => Err(self.no_conversion(ix, op, v)),
            },
        }
    }

    /// For a pair the table gives a kind whose function has no case for it.
    fn no_conversion(&self, ix: NodeIndex, op: &str, v: i64) -> Error {
        self.refuse(ix, format!("no conversion for {op} at opset {v}"))
    }

    /// Attributes that became inputs.
    fn attributes_to_inputs(&mut self, ix: NodeIndex, op: &str, v: i64, st: &mut NodeState) -> Result<()> {
        match (op, v) {
            ("Upsample", 9) => {
                if let Some(a) = take_attr(self.node_mut(ix), "scales") {
                    self.attribute_to_input(ix, &a, "scales", 1, AsInput::Floats, st);
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
                self.attribute_to_input(ix, &a, "k", 1, AsInput::Int(vec![1]), st);
            }
            ("Clip", 11) => {
                let min = take_attr(self.node_mut(ix), "min");
                let max = take_attr(self.node_mut(ix), "max");
                if min.is_some() || max.is_some() {
                    let dtype = self.data_dtype(ix, st);
                    for (a, slot) in [(min, 1), (max, 2)] {
                        let Some(a) = a else { continue };
                        self.attribute_to_input(ix, &a, a.name(), slot, AsInput::LikeData(dtype), st);
                    }
                }
            }
            ("Pad", 11) => {
                let mode = self.node(ix).attr_string("mode").unwrap_or_else(|| "constant".into());
                let Some(pads) = take_attr(self.node_mut(ix), "pads") else {
                    return Err(self.refuse(ix, "Pad-2 without its required attribute pads"));
                };
                self.attribute_to_input(ix, &pads, "pads", 1, AsInput::Ints, st);
                if let Some(value) = take_attr(self.node_mut(ix), "value") {
                    if mode == "constant" && value.f() != 0.0 {
                        let dtype = self.data_dtype(ix, st);
                        self.attribute_to_input(ix, &value, "constant_value", 2, AsInput::LikeData(dtype), st);
                    } else {
                        st.changes
                            .push(format!("attribute value {} dropped (default or unused)", value.f()));
                    }
                }
            }
            ("Dropout", 12) => {
                if let Some(a) = take_attr(self.node_mut(ix), "ratio") {
                    self.attribute_to_input(ix, &a, "ratio", 1, AsInput::Float, st);
                }
            }
            ("ReduceSum" | "Squeeze" | "Unsqueeze", 13) => self.ints_attr_to_input(ix, "axes", 1, st),
            ("Split", 13) => self.ints_attr_to_input(ix, "split", 1, st),
            (_, 18) if listed(REDUCE_AXES_18, op) => self.ints_attr_to_input(ix, "axes", 1, st),
            ("DFT", 20) => {
                // Absent, the attribute's default (1) becomes the input.
                let a = take_attr(self.node_mut(ix), "axis").unwrap_or_else(|| attribute::int("axis", 1));
                self.attribute_to_input(ix, &a, "axis", 2, AsInput::Int(vec![]), st);
            }
            _ => return Err(self.no_conversion(ix, op, v)),
        }
        Ok(())
    }

    /// Outputs that changed or went: dropped when nothing reads them, else refused.
    fn drop_changed_outputs(&mut self, ix: NodeIndex, op: &str, v: i64, st: &mut NodeState) -> Result<()> {
        match (op, v) {
            ("Dropout", 10) => self.drop_outputs(ix, 1, "mask", "its type changed to bool in opset 10", st),
            ("BatchNormalization", 14) => self.drop_outputs(
                ix,
                1,
                "training statistics",
                "from opset 14 BatchNormalization has them in training mode only",
                st,
            ),
            _ => Err(self.no_conversion(ix, op, v)),
        }
    }

    /// A deprecated operator renamed to its successor, which has the same signature.
    fn rename(&mut self, ix: NodeIndex, op: &str, v: i64, st: &mut NodeState) -> Result<()> {
        let successor = match (op, v) {
            // Resize-10 is Upsample-9 under a new name (same inputs, same `mode`).
            ("Upsample", 10) => {
                st.from_upsample = true;
                "Resize"
            }
            ("Scatter", 11) => "ScatterElements",
            _ => return Err(self.no_conversion(ix, op, v)),
        };
        self.node_mut(ix).op_type = successor.into();
        st.changes.push(format!("deprecated {op} → {successor}"));
        Ok(())
    }

    /// Attributes removed, renamed, or whose default changed.
    fn restate_attributes(&mut self, ix: NodeIndex, op: &str, v: i64, st: &mut NodeState) -> Result<()> {
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
            ("RoiAlign", 16) => {
                if self.node(ix).attribute("coordinate_transformation_mode").is_none() {
                    set_attr(
                        self.node_mut(ix),
                        attribute::string("coordinate_transformation_mode", "output_half_pixel"),
                    );
                    st.changes
                        .push("coordinate_transformation_mode = output_half_pixel (the old default)".into());
                }
            }
            ("Split", 18) => {
                let n = self.node(ix);
                let has_split = n.inputs.get(1).is_some_and(|s| !s.is_empty());
                if !has_split && n.attribute("num_outputs").is_none() {
                    let count = n.outputs.len() as i64;
                    set_attr(self.node_mut(ix), attribute::int("num_outputs", count));
                    st.changes.push(format!("num_outputs = {count} set (equal split)"));
                }
            }
            ("GridSample", 20) => {
                if let Some(mode) = self.node(ix).attr_string("mode") {
                    let renamed = match mode.as_str() {
                        "bilinear" => "linear",
                        "bicubic" => "cubic",
                        _ => return Ok(()),
                    };
                    set_attr(self.node_mut(ix), attribute::string("mode", renamed));
                    st.changes.push(format!("mode {mode} → {renamed}"));
                }
            }
            _ => return Err(self.no_conversion(ix, op, v)),
        }
        Ok(())
    }

    /// Forms that were removed without an equivalent: refused when the node uses them.
    fn check(&self, ix: NodeIndex, op: &str, v: i64) -> Result<()> {
        match (op, v) {
            ("Scan", 9) => Err(self.refuse(
                ix,
                "Scan-8 has a batch axis and sequence_lens, Scan-9 has neither; onnxq does not rewrite it",
            )),
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
                Ok(())
            }
            _ => Err(self.no_conversion(ix, op, v)),
        }
    }

    /// Resize-10 (X, scales) → Resize-11 (X, roi, scales): Resize-10 samples at `x_out / scale`
    /// (asymmetric) and, for nearest, takes the floor when upsampling; Resize-11 defaults to
    /// half_pixel and round_prefer_floor, so the old behaviour is made explicit.
    fn resize_11(&mut self, ix: NodeIndex, st: &mut NodeState) -> Result<()> {
        let mode = self.node(ix).attr_string("mode").unwrap_or_else(|| "nearest".into());
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
        set_attr(n, attribute::string("coordinate_transformation_mode", "asymmetric"));
        if mode == "nearest" {
            set_attr(n, attribute::string("nearest_mode", "floor"));
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

    /// Resize-13: `tf_half_pixel_for_nn` was removed (refused), and `scales` must be omitted
    /// when `sizes` is given (Resize-11 wanted an empty tensor there).
    fn resize_13(&mut self, ix: NodeIndex, st: &mut NodeState) -> Result<()> {
        if self.node(ix).attr_string("coordinate_transformation_mode").as_deref() == Some("tf_half_pixel_for_nn") {
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
        Ok(())
    }

    /// Softmax, LogSoftmax, Hardmax: opset 13 normalises over `axis` alone instead of over the
    /// input flattened to 2-D at `axis`; the same thing when `axis` is the last dimension.
    fn softmax_13(&mut self, ix: NodeIndex, st: &mut NodeState) -> Result<()> {
        let n = self.node(ix);
        let op = n.op_type.clone();
        let explicit = n.attr_int("axis");
        let axis = explicit.unwrap_or(1);
        let input = n.inputs.first().cloned().unwrap_or_default();
        let output = n.outputs.first().cloned().unwrap_or_default();
        let rank = self.rank_of(&input).or_else(|| self.rank_of(&output));
        let last = axis == -1 || rank.is_some_and(|r| normalize_axis(axis, r) == Some(r.saturating_sub(1)));
        if last {
            if explicit.is_none() {
                set_attr(self.node_mut(ix), attribute::int("axis", axis));
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
        let mut flatten = Node::new(&flat, "Flatten", vec![input.clone()], &flat_out, order);
        flatten.attributes.push(attribute::int("axis", axis));
        let shape_node = Node::new(&shape, "Shape", vec![input], &shape_out, order);
        let reshape_node = Node::new(&reshape, "Reshape", vec![inner_out.clone(), shape_out], &output, order);
        let n = self.node_mut(ix);
        n.inputs[0] = flat_out;
        n.outputs[0] = inner_out;
        set_attr(n, attribute::int("axis", -1));
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
        let groups = n
            .attr_int("num_groups")
            .ok_or_else(|| self.refuse(ix, "no num_groups attribute"))?;
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
        let mut shape = Node::new(&c, "Shape", vec![n.inputs[0].clone()], &c, order);
        shape.attributes = vec![attribute::int("start", 1), attribute::int("end", 2)];
        let g = self.add_constant(ix, "num_groups", i64_tensor(vec![1], &[groups]));
        let per = self.names.fresh(&base, "channels_per_group");
        let div = Node::new(&per, "Div", vec![c, g], &per, order);
        let one = self.add_constant(ix, "one", i64_tensor(vec![1], &[1]));
        let expand_to = self.names.fresh(&base, "expand_shape");
        let mut concat = Node::new(&expand_to, "Concat", vec![one, per], &expand_to, order);
        concat.attributes = vec![attribute::int("axis", 0)];
        let column = self.add_constant(ix, "column", i64_tensor(vec![2], &[-1, 1]));
        let flat = self.add_constant(ix, "flat", i64_tensor(vec![1], &[-1]));
        let mut added = vec![shape, div, concat];
        for (slot, what) in [(1, "scale"), (2, "bias")] {
            let col = self.names.fresh(&base, &format!("{what}_column"));
            let wide = self.names.fresh(&base, &format!("{what}_expanded"));
            let out = self.names.fresh(&base, &format!("{what}_per_channel"));
            added.push(Node::new(
                &col,
                "Reshape",
                vec![n.inputs[slot].clone(), column.clone()],
                &col,
                order,
            ));
            added.push(Node::new(&wide, "Expand", vec![col, expand_to.clone()], &wide, order));
            added.push(Node::new(&out, "Reshape", vec![wide, flat.clone()], &out, order));
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
