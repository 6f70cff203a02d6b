//! Pass-through ops: they reorder, reshape or select values without arithmetic, so every output
//! value is an input value. The output shares the input's parameters (input 0 with output 0) and
//! a backend runs the op on int8 values; it is quantized only when a quantized op reads its
//! output. Only input 0 is data: the others are shapes, axes, indices or scales.

use super::{OpRole, Rule};
use crate::ir::Node;

pub(super) const RULES: &[Rule] = &[
    // Quantization is monotone: the int8 max of a window is the quantized float max.
    Rule::new("MaxPool", OpRole::PassThrough),
    // The same over the whole spatial extent.
    Rule::new("GlobalMaxPool", OpRole::PassThrough),
    // The input's values under a new shape.
    Rule::new("Reshape", OpRole::PassThrough),
    // A permutation of the input's values.
    Rule::new("Transpose", OpRole::PassThrough),
    // The input's values under a new shape.
    Rule::new("Flatten", OpRole::PassThrough),
    // The input's values under a new shape.
    Rule::new("Squeeze", OpRole::PassThrough),
    // The input's values under a new shape.
    Rule::new("Unsqueeze", OpRole::PassThrough),
    // A subset of the input's values.
    Rule::new("Slice", OpRole::PassThrough),
    // The input itself.
    Rule::new("Identity", OpRole::PassThrough),
    // A permutation of the input's values (depth into blocks).
    Rule::new("DepthToSpace", OpRole::PassThrough),
    // A permutation of the input's values (blocks into depth).
    Rule::new("SpaceToDepth", OpRole::PassThrough),
    // Nearest mode copies input values; the other modes interpolate (see `resize_by_mode`).
    Rule {
        refine: Some(resize_by_mode),
        ..Rule::new("Resize", OpRole::PassThrough)
    },
    // Subsets of the input's values (only the first output is tied to the input).
    Rule::new("Split", OpRole::PassThrough),
];

/// Linear and cubic Resize weigh neighbouring values like a pool: the input gets Q/DQ, the output
/// keeps its own scale.
const RESIZE_INTERPOLATING: Rule = Rule::new("Resize", OpRole::Pool);

fn resize_by_mode(n: &Node) -> Option<&'static Rule> {
    let nearest = n.attr_string("mode").is_none_or(|m| m == "nearest");
    (!nearest).then_some(&RESIZE_INTERPOLATING)
}
