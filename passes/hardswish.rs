//! HardSwish as exporters write it, `Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)` (or a final
//! `Mul(…, 1/6)`; operands of Add and Mul in either order), matched in one place for `equalize`,
//! which rewrites it to its per-channel form (the Add reads `Mul(x, s)`: `hswish(s·x)/s`), and
//! `correct_bias`, which models both forms.

use petgraph::stable_graph::NodeIndex;

use crate::ir::Graph;

/// The nodes of an exported HardSwish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportedHardSwish<'g> {
    /// The input: read by the Mul, and by the Add directly or through `Mul(x, s)`.
    pub x: &'g str,
    pub add: NodeIndex,
    /// The Add input that reads `x` (or `Mul(x, s)`).
    pub add_slot: usize,
    pub clip: NodeIndex,
    pub mul: NodeIndex,
    /// The last node: Div by 6 or Mul by 1/6.
    pub last: NodeIndex,
    /// `equalize`'s per-channel form: the constant `s` of the `Mul(x, s)` the Add reads.
    pub channel_scale: Option<&'g str>,
}

/// The exported HardSwish whose last node is `last`, if it is one; `producer(t)` is the node that
/// writes tensor `t`. Constants (3, 0, 6, 1/6) must be scalars that are not graph inputs.
pub fn exported_hardswish<'g>(
    graph: &'g Graph,
    last: NodeIndex,
    producer: &dyn Fn(&str) -> Option<NodeIndex>,
) -> Option<ExportedHardSwish<'g>> {
    let node = |ix: NodeIndex| &graph.nodes[ix];
    let binary = |ix: NodeIndex, op: &str| {
        let n = node(ix);
        n.is_default_domain() && n.op_type == op && n.inputs.len() == 2
    };
    let by = graph.constant_scalar(node(last).inputs.get(1)?)?;
    let sixth = (binary(last, "Div") && by == 6.0) || (binary(last, "Mul") && (by - 1.0 / 6.0).abs() < 1e-6);
    if !sixth {
        return None;
    }
    let mul = producer(&node(last).inputs[0]).filter(|&m| binary(m, "Mul"))?;
    for x_slot in [0, 1] {
        let (x, gate) = (&node(mul).inputs[x_slot], &node(mul).inputs[1 - x_slot]);
        let Some(clip) = producer(gate).filter(|&c| node(c).is_default_domain() && node(c).op_type == "Clip") else {
            continue;
        };
        let bounds = (
            graph.clip_bound(node(clip), 1, "min"),
            graph.clip_bound(node(clip), 2, "max"),
        );
        if bounds != (Ok(Some(0.0)), Ok(Some(6.0))) {
            continue;
        }
        let Some(add) = node(clip)
            .inputs
            .first()
            .and_then(|t| producer(t))
            .filter(|&a| binary(a, "Add"))
        else {
            continue;
        };
        for add_slot in [0, 1] {
            let (a, three) = (&node(add).inputs[add_slot], &node(add).inputs[1 - add_slot]);
            if graph.constant_scalar(three) != Some(3.0) {
                continue;
            }
            let found = |channel_scale| ExportedHardSwish {
                x: x.as_str(),
                add,
                add_slot,
                clip,
                mul,
                last,
                channel_scale,
            };
            if a == x {
                return Some(found(None));
            }
            let Some(scaled) = producer(a).filter(|&m| binary(m, "Mul")) else {
                continue;
            };
            for u in [0, 1] {
                let (operand, s) = (&node(scaled).inputs[u], &node(scaled).inputs[1 - u]);
                if operand == x && graph.constants.contains_key(s) {
                    return Some(found(Some(s.as_str())));
                }
            }
        }
    }
    None
}
