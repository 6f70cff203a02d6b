//! Joins: ops that combine activations (residual Add, Concat). Every input gets Q/DQ where the
//! target quantizes joins; Concat's inputs and output share one scale.

use super::{DataInputs, OpRole, Rule, TargetRules};
use crate::ir::Node;

pub(super) const RULES: &[Rule] = &[
    // An int8 Add of two activations; the residual ones stay float unless the target wants them
    // (outlier channels), and a bias add (a constant operand) always does.
    Rule {
        data: DataInputs::All,
        stays_float: Some(add_stays_float),
        ..Rule::new("Add", OpRole::Join)
    },
    // Concat copies int8 values unchanged only when its inputs and its output share one scale.
    Rule {
        data: DataInputs::All,
        shared_scale: true,
        ..Rule::new("Concat", OpRole::Join)
    },
];

fn add_stays_float(n: &Node, target: &TargetRules, is_constant: &dyn Fn(&str) -> bool) -> Option<&'static str> {
    if !target.quantize_residual_adds {
        return Some("residual Add: the target keeps residual streams float (outlier channels)");
    }
    // Quantizing a bias add gains nothing, and OpenVINO's Add transformation rejects a
    // dequantized constant operand.
    n.inputs
        .iter()
        .any(|t| is_constant(t))
        .then_some("bias Add (a constant operand): nothing to gain, and OpenVINO rejects it")
}
