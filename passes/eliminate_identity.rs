//! `eliminate_identity`: removes `Identity` nodes, so later pattern matching (Conv→Relu,
//! Q/DQ placement) sees producers and consumers directly.
//!
//! Rule: `y = Identity(x)` ⇒ consumers of `y` read `x`, and the node goes. When `y` is a graph
//! output its name must survive: the producer of `x` is renamed to write `y` instead (consumers
//! of `x` follow). Float-preserving exactly: Identity is a copy.
//!
//! It does not fire (the reason goes into the report) when:
//! - `y` is read inside a subgraph (If/Loop/Scan body), which refers to it by name;
//! - `y` is a graph output and `x` is a graph input, a constant or itself a graph output
//!   (no node to rename, or two outputs would merge);
//! - `y` is a graph output and `x` is read inside a subgraph.

use super::{Context, Pass};
use crate::error::Result;
use crate::ir::Model;

pub struct EliminateIdentity;

impl Pass for EliminateIdentity {
    fn name(&self) -> &'static str {
        "eliminate_identity"
    }

    fn run(&self, model: &mut Model, _ctx: &mut Context) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let order = model.graph.topological_order()?;
        for ix in order {
            let node = &model.graph.nodes[ix];
            if !(node.is_default_domain()
                && node.op_type == "Identity"
                && node.inputs.len() == 1
                && node.outputs.len() == 1)
            {
                continue;
            }
            let (x, y) = (node.inputs[0].clone(), node.outputs[0].clone());
            let label = node.label();
            let graph = &model.graph;
            let read_in_subgraph = |t: &str| {
                graph
                    .nodes
                    .node_weights()
                    .any(|n| n.implicit_inputs.iter().any(|i| i == t))
            };
            let is_output = |t: &str| graph.outputs.iter().any(|o| o.name() == t);
            let reason = if read_in_subgraph(&y) {
                Some(format!("'{y}' is read inside a subgraph"))
            } else if is_output(&y) {
                if graph.inputs.iter().any(|i| i.name() == x) || graph.constants.contains_key(&x) {
                    Some(format!("graph output '{y}' copies graph input or constant '{x}'"))
                } else if is_output(&x) {
                    Some(format!("graph outputs '{x}' and '{y}' would merge"))
                } else if read_in_subgraph(&x) {
                    Some(format!("'{x}' is read inside a subgraph"))
                } else {
                    None
                }
            } else {
                None
            };
            if let Some(reason) = reason {
                notes.push(format!("kept {label}: {reason}"));
                continue;
            }
            let graph = &mut model.graph;
            graph.nodes.remove_node(ix);
            if is_output_name(graph, &y) {
                // Rename x to y everywhere: its producer now writes the graph output.
                rename_tensor(graph, &x, &y);
                notes.push(format!("removed {label}: '{x}' renamed to graph output '{y}'"));
            } else {
                rename_tensor(graph, &y, &x);
                notes.push(format!("removed {label}: readers of '{y}' read '{x}'"));
            }
            graph.rebuild_edges()?;
        }
        Ok(notes)
    }
}

fn is_output_name(graph: &crate::ir::Graph, t: &str) -> bool {
    graph.outputs.iter().any(|o| o.name() == t)
}

/// Renames a tensor in every node that writes or reads it, and drops its stale value_info.
fn rename_tensor(graph: &mut crate::ir::Graph, from: &str, to: &str) {
    for n in graph.nodes.node_weights_mut() {
        for t in n.inputs.iter_mut().chain(n.outputs.iter_mut()) {
            if t == from {
                *t = to.to_string();
            }
        }
    }
    graph.value_info.retain(|v| v.name() != from && v.name() != to);
}
