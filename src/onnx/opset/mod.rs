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
//!
//! - [`table`]: every (operator, version) pair up to [`MAX_TARGET_OPSET`], classified from the
//!   ONNX changelog and the schemas of onnx 1.23: compatible (types added, constraints relaxed,
//!   new attributes whose default is the old behaviour) or converted. A pair nobody classified is
//!   refused, so a schema table regenerated with newer operators cannot slip through unreviewed.
//! - [`infer`]: what the conversions need to know of a tensor (the element type of a Clip bound,
//!   the rank under a Softmax), from declared value infos and a forward inference over the
//!   common operators.
//! - [`convert`]: the conversions, one function per kind of change (the list is there).
//!
//! Refused: upgrading from below opset 7, Scan-8 (batched Scan), BatchNormalization with
//! `spatial = 0` or with training outputs that are read, a Dropout mask that is read, Resize-10
//! nearest that may downsample (runtimes disagree on its rounding), Resize `tf_half_pixel_for_nn`,
//! integer Erf, GroupNormalization to opset 19 or 20 (GroupNormalization-18 is deprecated: the
//! checker rejects it below 21), local functions whose body needs a conversion, and any
//! redefinition not classified. On refusal the model is left as it was.

mod convert;
mod infer;
mod table;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ir::Model;
use crate::onnx::schema_since;
use crate::proto::OperatorSetIdProto;

use convert::{convert_graph, Names, Undo};
use table::{step_kind, StepKind};

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

/// Whether `op` is in a space-separated list.
fn listed(list: &str, op: &str) -> bool {
    list.split_whitespace().any(|o| o == op)
}
