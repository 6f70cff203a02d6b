//! The plan of a model whose If branches were inlined (`calib::control_flow`): Q/DQ only where
//! they stay inside one graph of the written model.
//!
//! A consumer input keeps its Q/DQ only when the tensor is made in the consumer's own graph and
//! the consumer's outputs are read only there: ONNX Runtime 1.31's QDQ propagation aborts the
//! process on a Q/DQ whose tensor comes from an enclosing graph, or whose reader's output a
//! nested graph reads (measured on silero_vad_v5). The other readers read the float tensor, with
//! the reason in the plan.

use std::collections::{BTreeMap, BTreeSet};

use crate::calib::control_flow::ControlFlow;
use crate::ir::inline::{self, Scope};
use crate::ir::Model;
use crate::quant::plan::Plan;

const REASON: &str = "read across a graph boundary of the written model (an If branch): ONNX Runtime's QDQ propagation fails on Q/DQ there";

/// Fits a plan built on the flat graph to the written model: the tensors of the part tract does
/// not run get their reason, and Q/DQ stay inside one graph (module docs). Idempotent: `plan`
/// and `materialize` both call it, since a plan pass may re-plan. Notes say what changed.
pub fn adapt(plan: &mut Plan, model: &Model, cf: &ControlFlow) -> Vec<String> {
    cf.explain_uncalibrated(&mut plan.kept_float);
    keep_inside_graphs(plan, model, cf)
}

/// Drops the consumer inputs whose Q/DQ would cross a graph boundary once the control flow is
/// put back (module docs); notes say how many.
fn keep_inside_graphs(plan: &mut Plan, model: &Model, cf: &ControlFlow) -> Vec<String> {
    let record = &cf.inlined;
    if record.folded.is_empty() {
        return vec![];
    }
    let g = &model.graph;
    let top = Scope::new();
    // The graph each node (by key) comes from. A node standing for an If output is not a
    // consumer (None), but reads the branch output from inside the branch.
    let mut node_scope: BTreeMap<String, Option<Scope>> = BTreeMap::new();
    let mut made_in: BTreeMap<&str, Option<Scope>> = BTreeMap::new();
    let mut read_from: BTreeMap<&str, Vec<Option<Scope>>> = BTreeMap::new();
    for n in g.nodes.node_weights() {
        let key = inline::key(n);
        let synthetic = record.synthetic_scope(&key);
        let scope = match &synthetic {
            Some(_) => None,
            None => Some(record.node_scope(&key).unwrap_or(&top).clone()),
        };
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            made_in.insert(o, scope.clone());
        }
        for i in n.inputs.iter().chain(&n.implicit_inputs) {
            read_from
                .entry(i)
                .or_default()
                .push(synthetic.clone().or_else(|| scope.clone()));
        }
        node_scope.insert(key, scope);
    }
    let scope_of_tensor = |t: &str| -> Option<Scope> {
        match made_in.get(t) {
            Some(s) => s.clone(),
            None => Some(record.constant_scope(t).unwrap_or(&top).clone()),
        }
    };
    let outputs_stay = |key: &str, scope: &Option<Scope>| {
        let Some(ix) = g.nodes.node_indices().find(|&ix| inline::key(&g.nodes[ix]) == key) else {
            return false;
        };
        g.nodes[ix].outputs.iter().all(|o| {
            read_from
                .get(o.as_str())
                .is_none_or(|readers| readers.iter().all(|r| r == scope))
        })
    };
    let mut dropped = 0;
    let mut emptied = Vec::new();
    for (t, a) in plan.activations.iter_mut() {
        let made = scope_of_tensor(t);
        let before = a.consumers.len();
        a.consumers.retain(|(key, _)| {
            let scope = node_scope.get(key).cloned().flatten();
            scope.is_some() && scope == made && outputs_stay(key, &scope)
        });
        dropped += before - a.consumers.len();
        if a.consumers.is_empty() {
            emptied.push(t.clone());
        }
    }
    for t in &emptied {
        plan.activations.remove(t);
        plan.kept_float.insert(t.clone(), REASON.into());
    }
    // An int32 bias needs its layer's input quantized.
    let quantized_inputs: BTreeSet<(&str, &str)> = plan
        .activations
        .iter()
        .flat_map(|(t, a)| a.consumers.iter().map(move |(k, _)| (t.as_str(), k.as_str())))
        .collect();
    let orphan_biases: Vec<String> = plan
        .biases
        .iter()
        .filter(|(_, b)| {
            !b.consumers
                .iter()
                .all(|(k, _)| quantized_inputs.contains(&(b.input.as_str(), k.as_str())))
        })
        .map(|(name, _)| name.clone())
        .collect();
    for b in &orphan_biases {
        plan.biases.remove(b);
        plan.kept_float
            .insert(b.clone(), format!("bias of a layer whose input is {REASON}"));
    }
    if dropped == 0 {
        return vec![];
    }
    vec![format!(
        "{dropped} consumer inputs read float at If branch boundaries ({} tensors and {} biases kept float)",
        emptied.len(),
        orphan_biases.len()
    )]
}
