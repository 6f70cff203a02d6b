//! Weighted ops: they compute `y = x·W (+ b)` with a constant weight. Their activation inputs
//! get Q/DQ, the weight (input 1, when a float constant) is quantized per output channel `c` on
//! the axis below, and the bias (input 2) may become int32 with scale `s_in·s_w[c]`, so that
//! `b_q[c] + Σ x_q·W_q[c]` is one integer accumulator (QLinearConv, QGemm).

use super::{BiasRule, DataInputs, OpRole, Rule, WeightRule};
use crate::ir::Node;

pub(super) const RULES: &[Rule] = &[
    // W is [M, C/group, kH, kW]: the output channels are axis 0; B[M] joins the accumulator.
    Rule {
        bias: Some(BIAS),
        ..weighted("Conv", |_, _| Some(0))
    },
    // W is [C, M/group, kH, kW]: the output channels are axis 1; B[M] joins the accumulator.
    Rule {
        bias: Some(BIAS),
        ..weighted("ConvTranspose", |_, _| Some(1))
    },
    // B is [K, N], or [N, K] with transB: the output columns are axis 1, or 0; B may be an
    // activation (then it is data, not a weight); C[N] joins the accumulator.
    Rule {
        data: DataInputs::Slots(&[0, 1]),
        bias: Some(BIAS),
        ..weighted("Gemm", gemm_weight_axis)
    },
    // Both operands may be activations (attention); a constant B [.., K, N] has its output
    // columns on the last axis. No bias input.
    Rule {
        data: DataInputs::Slots(&[0, 1]),
        ..weighted("MatMul", |_, rank| rank.checked_sub(1))
    },
];

/// A weighted op: input 0 is data, input 1 the weight, per channel on `axis(node, rank)`.
const fn weighted(op_type: &'static str, axis: fn(&Node, usize) -> Option<usize>) -> Rule {
    Rule {
        weight: Some(WeightRule { slot: 1, axis }),
        ..Rule::new(op_type, OpRole::Weighted)
    }
}

/// Conv's B and Gemm's C, input 2. Gemm's C goes int32 only with `transA = 0`, as onnxq always
/// has; `transA` is Gemm's attribute, the Convs have none and read 0.
const BIAS: BiasRule = BiasRule {
    slot: 2,
    when: |n| n.attr_int("transA").unwrap_or(0) == 0,
};

fn gemm_weight_axis(n: &Node, _rank: usize) -> Option<usize> {
    Some(if n.attr_int("transB").unwrap_or(0) != 0 { 0 } else { 1 })
}

/// The activations an integer kernel applies to its own accumulator (QLinearConv followed by
/// Relu or Clip fuses into one kernel): a bias may go int32 when the layer's output is quantized
/// right after one of these.
pub const FUSED_ACTIVATIONS: &[&str] = &["Relu", "Clip"];
