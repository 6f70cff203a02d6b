//! Control flow tract cannot run: what calibration, planning and verification see instead.
//!
//! - An `If` of the top-level graph whose condition has one value on every sample of the data
//!   (a sample-rate input, a shape test) is replaced by the branch it takes ([`crate::ir::inline`]),
//!   again until no such If is left, so nested Ifs inside a taken branch go too. The condition is
//!   computed in tract from the part of the graph it depends on, which must hold no control flow.
//!   The written model gets its Ifs back ([`ControlFlow::restore`]); a branch not taken keeps its
//!   float nodes.
//! - When tract still cannot run the graph and it has control-flow nodes (a `Loop`, a `Scan`, an
//!   If whose condition varies), calibration runs on the part of the graph upstream of them: the
//!   control-flow nodes and everything downstream of them are cut, and the tensors the cut nodes
//!   read become the outputs. What is downstream has no statistics and stays float, with the
//!   reason; verification measures the outputs of that part and says which it could not.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::calib::source::DataSource;
use crate::error::{Error, Result};
use crate::ir::inline::{self, Inlined};
use crate::ir::{Graph, Model, Node};
use crate::proto::ValueInfoProto;
use crate::runtime::{self, Runner};

/// What was done to a model with control flow, kept from `calibrate` to the written model.
#[derive(Clone, Debug)]
pub struct ControlFlow {
    /// The Ifs replaced by their branch, to put back.
    pub inlined: Inlined,
    /// When tract cannot run the flat graph: where its runnable part ends.
    pub cut: Option<Cut>,
    /// What was decided and why, for the terminal and the report.
    pub notes: Vec<String>,
}

/// The part of a graph tract can run: everything but the control-flow nodes left and what is
/// downstream of them.
#[derive(Clone, Debug)]
pub struct Cut {
    /// Keys of the control-flow nodes cut, with a label for messages.
    pub roots: BTreeMap<String, String>,
    /// Why tract could not run the whole graph.
    pub reason: String,
    /// The outputs of the runnable part: the model outputs it computes, then the tensors the
    /// cut nodes read from it.
    pub outputs: Vec<String>,
    /// The model outputs it does not compute.
    pub unmeasured: Vec<String>,
    /// Tensors of the cut part (not calibrated).
    pub cut_tensors: BTreeSet<String>,
}

fn has_subgraph(n: &Node) -> bool {
    n.attributes.iter().any(|a| a.g.is_some() || !a.graphs.is_empty())
}

/// The nodes `name` depends on (by key), and the runtime inputs it reads; None when that part of
/// the graph holds control flow.
fn cone(g: &Graph, name: &str) -> Option<(BTreeSet<String>, BTreeSet<String>)> {
    let producers = g.producers();
    let runtime: BTreeSet<&str> = g.runtime_inputs().map(|i| i.name()).collect();
    let (mut nodes, mut inputs) = (BTreeSet::new(), BTreeSet::new());
    let mut stack = vec![name.to_string()];
    while let Some(t) = stack.pop() {
        if runtime.contains(t.as_str()) {
            inputs.insert(t);
            continue;
        }
        let Some(&(ix, _)) = producers.get(t.as_str()) else {
            continue;
        };
        let n = &g.nodes[ix];
        if has_subgraph(n) {
            return None;
        }
        if nodes.insert(inline::key(n)) {
            stack.extend(n.inputs.iter().filter(|i| !i.is_empty()).cloned());
        }
    }
    Some((nodes, inputs))
}

/// `model` with only the nodes in `keep` (by key) and `outputs` as its outputs (a model output
/// keeps its declared type; the others are named only).
fn submodel(
    model: &Model,
    keep: impl Fn(&Node) -> bool,
    outputs: &[String],
    inputs: Option<&BTreeSet<String>>,
) -> Result<Model> {
    let mut m = model.clone();
    let g = &mut m.graph;
    g.nodes.retain_nodes(|nodes, ix| keep(&nodes[ix]));
    let declared: HashMap<String, ValueInfoProto> =
        g.outputs.iter().map(|o| (o.name().to_string(), o.clone())).collect();
    g.outputs = outputs
        .iter()
        .map(|o| {
            declared.get(o).cloned().unwrap_or_else(|| ValueInfoProto {
                name: Some(o.clone()),
                ..Default::default()
            })
        })
        .collect();
    if let Some(inputs) = inputs {
        let constants = &g.constants;
        g.inputs
            .retain(|i| inputs.contains(i.name()) || constants.contains_key(i.name()));
    }
    g.value_info.clear();
    g.rebuild_edges()?;
    Ok(m)
}

/// The value of each condition when it is the same on every sample of every source (None
/// otherwise), computed in tract on the part of the graph the conditions depend on.
fn constant_conditions(
    model: &Model,
    conditions: &[(String, BTreeSet<String>, BTreeSet<String>)],
    sources: &[&DataSource],
) -> Result<Vec<Option<bool>>> {
    let keep: BTreeSet<&String> = conditions.iter().flat_map(|(_, nodes, _)| nodes).collect();
    let inputs: BTreeSet<String> = conditions.iter().flat_map(|(_, _, i)| i.iter().cloned()).collect();
    let names: Vec<String> = conditions.iter().map(|(c, _, _)| c.clone()).collect();
    let cone = submodel(model, |n| keep.contains(&inline::key(n)), &names, Some(&inputs))?;
    let mut seen: Vec<Option<Option<bool>>> = vec![None; names.len()];
    let mut note = |i: usize, v: Option<bool>| {
        seen[i] = Some(match seen[i] {
            None => v,
            Some(prev) if prev == v => v,
            Some(_) => None,
        });
    };
    for source in sources {
        let shapes = source.sample_shapes()?;
        let wanted: Vec<usize> = cone
            .graph
            .runtime_inputs()
            .map(|i| {
                shapes
                    .iter()
                    .position(|(n, _, _)| n == i.name())
                    .ok_or_else(|| Error::internal(format!("no data for input '{}'", i.name())))
            })
            .collect::<Result<_>>()?;
        let runner = Runner::new(&cone, &shapes, &[])?;
        let values = runner.run_all(
            source.len(),
            |i| {
                let mut sample = source.sample(i)?;
                Ok(wanted
                    .iter()
                    .map(|&k| std::mem::replace(&mut sample[k], tract_onnx::prelude::Tensor::from(0f32).into()))
                    .collect())
            },
            |_, outs| {
                outs.iter()
                    .map(|t| {
                        Ok(match runtime::to_f32_vec(t)?.as_slice() {
                            [v] => Some(*v != 0.0),
                            _ => None,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            },
        )?;
        for sample in values {
            for (i, v) in sample.into_iter().enumerate() {
                note(i, v);
            }
        }
    }
    Ok(seen.into_iter().map(|v| v.flatten()).collect())
}

impl ControlFlow {
    /// Replaces the Ifs the data decides by their branch in `model` (module docs), and finds
    /// the part tract can run when it cannot run all of it. None when the top-level graph has
    /// no control flow (nothing is tried then). `sources`: every data set the model will run on
    /// (calibration, verification): an If is inlined only when they all take the same branch.
    pub fn prepare(model: &mut Model, sources: &[&DataSource]) -> Result<Option<ControlFlow>> {
        if sources.is_empty() || !model.graph.nodes.node_weights().any(has_subgraph) {
            return Ok(None);
        }
        let mut inlined = Inlined::new(model);
        let mut notes = Vec::new();
        let mut undecided: BTreeSet<String> = BTreeSet::new();
        loop {
            let g = &model.graph;
            let mut candidates = Vec::new();
            for n in g
                .nodes
                .node_weights()
                .filter(|n| n.op_type == "If" && n.is_default_domain())
            {
                let k = inline::key(n);
                let Some(cond) = n.inputs.first().filter(|c| !c.is_empty()) else {
                    continue;
                };
                if undecided.contains(&k) {
                    continue;
                }
                if let Some((nodes, inputs)) = cone(g, cond) {
                    candidates.push((k, n.label(), (cond.clone(), nodes, inputs)));
                }
            }
            if candidates.is_empty() {
                break;
            }
            candidates.sort();
            let conditions: Vec<_> = candidates.iter().map(|(_, _, c)| c.clone()).collect();
            let values = constant_conditions(model, &conditions, sources)?;
            for ((k, label, (cond, _, _)), value) in candidates.into_iter().zip(values) {
                match value {
                    Some(then) => {
                        inline::inline_if(model, &k, then, &mut inlined)?;
                        let f = inlined.folded.last().expect("just folded");
                        notes.push(format!(
                            "{label}: condition '{cond}' is {then} on every sample: {} inlined, calibrated and quantized; the {} ({} nodes) is kept float in the written model",
                            f.branch,
                            if then { "else_branch" } else { "then_branch" },
                            f.untaken_nodes()
                        ));
                    }
                    None => {
                        notes.push(format!(
                            "{label}: condition '{cond}' differs between samples: kept as an If"
                        ));
                        undecided.insert(k);
                    }
                }
            }
        }
        let cut = Cut::find(model, sources[0])?;
        if let Some(cut) = &cut {
            notes.push(format!(
                "tract cannot run {} ({}): calibrated the part of the graph upstream of {}, ending at {}; the {} tensors downstream are not calibrated and stay float",
                cut.roots.values().cloned().collect::<Vec<_>>().join(", "),
                cut.reason,
                if cut.roots.len() == 1 { "it" } else { "them" },
                cut.outputs.iter().map(|o| format!("'{o}'")).collect::<Vec<_>>().join(", "),
                cut.cut_tensors.len()
            ));
        }
        Ok(Some(ControlFlow { inlined, cut, notes }))
    }

    /// Replaces the same Ifs in another copy of the model (the model as loaded, for the
    /// verification against it).
    pub fn apply(&self, model: &Model) -> Result<Model> {
        let mut m = model.clone();
        let mut record = Inlined::new(&m);
        for f in &self.inlined.folded {
            inline::inline_if(&mut m, &inline::key(&f.node), f.branch == "then_branch", &mut record)?;
        }
        Ok(m)
    }

    /// The written model: the inlined Ifs put back with both branches.
    pub fn restore(&self, model: &Model) -> Result<Model> {
        inline::restore(model, &self.inlined)
    }

    /// Gives the tensors of the cut part the plan keeps float their reason (they have no
    /// statistics because tract cannot run what produces them).
    pub fn explain_uncalibrated(&self, kept_float: &mut BTreeMap<String, String>) {
        let Some(cut) = &self.cut else { return };
        let why = format!(
            "not calibrated: downstream of {}, which tract cannot run",
            cut.roots.values().cloned().collect::<Vec<_>>().join(", ")
        );
        for (t, reason) in kept_float.iter_mut() {
            if cut.cut_tensors.contains(t) {
                *reason = why.clone();
            }
        }
    }

    /// What verification measured and could not measure; `whole`: it ran the whole models
    /// (ONNX Runtime runs what tract cannot), not the part tract runs.
    pub fn verification_note(&self, whole: bool) -> Option<String> {
        let list = |v: &[String]| v.iter().map(|o| format!("'{o}'")).collect::<Vec<_>>().join(", ");
        let mut parts = Vec::new();
        if !self.inlined.folded.is_empty() {
            parts.push(format!(
                "verified with the branches the data takes of {} If(s); the branches not taken (float) were not run",
                self.inlined.folded.len()
            ));
        }
        match &self.cut {
            Some(cut) if whole => parts.push(format!(
                "verified the whole models in ONNX Runtime, {} included (calibration measured the part tract runs, at {})",
                cut.roots.values().cloned().collect::<Vec<_>>().join(", "),
                list(&cut.outputs)
            )),
            Some(cut) => parts.push(format!(
                "verified on the part tract runs, at {}; not measured: the model outputs {} (downstream of {}, which tract cannot run)",
                list(&cut.outputs),
                list(&cut.unmeasured),
                cut.roots.values().cloned().collect::<Vec<_>>().join(", ")
            )),
            None => {}
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// The report's `control_flow` section.
    pub fn report(&self) -> serde_json::Value {
        let ifs: Vec<serde_json::Value> = self
            .inlined
            .folded
            .iter()
            .map(|f| {
                serde_json::json!({
                    "if": f.node.label(),
                    "taken": f.branch,
                    "calibrated_and_quantized": f.branch,
                    "kept_float": if f.branch == "then_branch" { "else_branch" } else { "then_branch" },
                    "kept_float_nodes": f.untaken_nodes(),
                })
            })
            .collect();
        let cut = self.cut.as_ref().map(|c| {
            serde_json::json!({
                "not_run_by_tract": c.roots.values().collect::<Vec<_>>(),
                "reason": c.reason,
                "calibrated_up_to": c.outputs,
                "outputs_not_measured": c.unmeasured,
                "tensors_not_calibrated": c.cut_tensors.len(),
            })
        });
        serde_json::json!({ "notes": self.notes, "inlined_ifs": ifs, "cut": cut })
    }
}

impl Cut {
    /// None when the graph has no control-flow node left or tract runs it.
    fn find(model: &Model, source: &DataSource) -> Result<Option<Cut>> {
        let g = &model.graph;
        let roots: BTreeMap<String, String> = g
            .nodes
            .node_weights()
            .filter(|n| has_subgraph(n))
            .map(|n| (inline::key(n), n.label()))
            .collect();
        if roots.is_empty() {
            return Ok(None);
        }
        let reason = match Runner::new(model, &source.sample_shapes()?, &[]) {
            Ok(_) => return Ok(None),
            Err(e) => e.to_string(),
        };
        let cut = Cut::of(model, roots, reason)?;
        Ok(Some(cut))
    }

    fn of(model: &Model, roots: BTreeMap<String, String>, reason: String) -> Result<Cut> {
        let g = &model.graph;
        let removed = downstream(g, &roots);
        let cut_tensors: BTreeSet<String> = removed
            .iter()
            .flat_map(|&ix| g.nodes[ix].outputs.iter().filter(|o| !o.is_empty()).cloned())
            .collect();
        let mut outputs: Vec<String> = Vec::new();
        let mut unmeasured = Vec::new();
        for o in &g.outputs {
            if cut_tensors.contains(o.name()) {
                unmeasured.push(o.name().to_string());
            } else {
                outputs.push(o.name().to_string());
            }
        }
        let mut read: BTreeSet<String> = BTreeSet::new();
        for &ix in &removed {
            let n = &g.nodes[ix];
            read.extend(
                n.inputs
                    .iter()
                    .chain(&n.implicit_inputs)
                    .filter(|i| !i.is_empty() && !cut_tensors.contains(*i) && !g.constants.contains_key(*i))
                    .cloned(),
            );
        }
        let extra: Vec<String> = read.into_iter().filter(|r| !outputs.contains(r)).collect();
        outputs.extend(extra);
        Ok(Cut {
            roots,
            reason,
            outputs,
            unmeasured,
            cut_tensors,
        })
    }

    /// The runnable part of `model` (the float model or its quantized version): the roots and
    /// everything downstream of them removed, the cut's outputs as outputs.
    pub fn apply(&self, model: &Model) -> Result<Model> {
        let removed: BTreeSet<String> = downstream(&model.graph, &self.roots)
            .into_iter()
            .map(|ix| inline::key(&model.graph.nodes[ix]))
            .collect();
        submodel(model, |n| !removed.contains(&inline::key(n)), &self.outputs, None)
    }
}

/// The nodes with a key in `roots` and every node downstream of them.
fn downstream(g: &Graph, roots: &BTreeMap<String, String>) -> BTreeSet<petgraph::stable_graph::NodeIndex> {
    let mut stack: Vec<_> = g
        .nodes
        .node_indices()
        .filter(|&ix| roots.contains_key(&inline::key(&g.nodes[ix])))
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(ix) = stack.pop() {
        if seen.insert(ix) {
            stack.extend(g.nodes.neighbors_directed(ix, petgraph::Direction::Outgoing));
        }
    }
    seen
}

/// What calibration and verification run of `model`: its runnable part when tract cannot run
/// all of it, else the model itself.
pub fn runnable<'a>(control_flow: Option<&ControlFlow>, model: &'a Model) -> Result<Cow<'a, Model>> {
    match control_flow.and_then(|cf| cf.cut.as_ref()) {
        Some(cut) => Ok(Cow::Owned(cut.apply(model)?)),
        None => Ok(Cow::Borrowed(model)),
    }
}
