//! Weighted ops: they compute `y = x·W (+ b)` with a constant weight. Their activation inputs
//! get Q/DQ, the weight (input 1, when a float constant) is quantized per output channel `c` on
//! the axis below, and the bias (input 2) may become int32 with scale `s_in·s_w[c]`, so that
//! `b_q[c] + Σ x_q·W_q[c]` is one integer accumulator (QLinearConv, QGemm).

use super::{BiasRule, DataInputs, OpRole, Rule, TargetRules, WeightRule};
use crate::ir::{ops, Node};

pub(super) const RULES: &[Rule] = &[
    // W is [M, C/group, kH, kW]: the output channels are axis 0; B[M] joins the accumulator.
    Rule {
        bias: Some(CONV_BIAS),
        ..weighted("Conv", conv_weight_axis)
    },
    // W is [C, M/group, kH, kW]: the output channels are axis 1; B[M] joins the accumulator.
    Rule {
        bias: Some(CONV_BIAS),
        ..weighted("ConvTranspose", conv_weight_axis)
    },
    // B is [K, N], or [N, K] with transB: the output columns are axis 1, or 0; B may be an
    // activation (then it is data, not a weight); C[N] joins the accumulator.
    Rule {
        data: DataInputs::Slots(&[0, 1]),
        bias: Some(GEMM_BIAS),
        ..weighted("Gemm", gemm_weight_axis)
    },
    // Both operands may be activations (attention); a constant B [.., K, N] has its output
    // columns on the last axis. No bias input.
    Rule {
        data: DataInputs::Slots(&[0, 1]),
        ..weighted("MatMul", matmul_weight_axis)
    },
];

/// A weighted op: input 0 is data, input 1 the weight, per channel on `axis(node, rank)`.
const fn weighted(op_type: &'static str, axis: fn(&Node, usize) -> Option<usize>) -> Rule {
    Rule {
        weight: Some(WeightRule {
            slot: ops::WEIGHT_SLOT,
            axis,
        }),
        stays_float: Some(malformed),
        ..Rule::new(op_type, OpRole::Weighted)
    }
}

/// A weighted node whose attributes ONNX forbids (its view refuses it: `group: 0`, an unknown
/// `auto_pad`) is not quantized: its layout, and so its per-channel axis, is unknown.
fn malformed(n: &Node, _: &TargetRules, _: &dyn Fn(&str) -> bool) -> Option<&'static str> {
    let refused = match n.op_type.as_str() {
        "Conv" | "ConvTranspose" => ops::Conv::view(n).is_err(),
        "Gemm" => ops::Gemm::view(n).is_err(),
        _ => ops::MatMul::view(n).is_err(),
    };
    refused.then_some("its attributes break ONNX's rules for the op (a group below 1, an unknown auto_pad), so its weight layout is unknown")
}

/// Conv's and ConvTranspose's B, input 2.
const CONV_BIAS: BiasRule = BiasRule {
    slot: ops::BIAS_SLOT,
    when: |_| true,
};

/// Gemm's C, input 2: int32 only with `transA = 0`, as onnxq always has.
const GEMM_BIAS: BiasRule = BiasRule {
    slot: ops::BIAS_SLOT,
    when: |n| ops::Gemm::view(n).is_ok_and(|g| !g.trans_a),
};

// The axes are the views' (`ir::ops`); a node its view refuses stays float (`malformed`).

fn conv_weight_axis(n: &Node, _rank: usize) -> Option<usize> {
    ops::Conv::view(n).ok().map(|c| c.weight_output_axis)
}

fn gemm_weight_axis(n: &Node, _rank: usize) -> Option<usize> {
    ops::Gemm::view(n).ok().map(|g| g.weight_output_axis)
}

fn matmul_weight_axis(n: &Node, rank: usize) -> Option<usize> {
    ops::MatMul::view(n).ok()?.weight_output_axis(rank)
}

/// The activations an integer kernel applies to its own accumulator (QLinearConv followed by
/// Relu or Clip fuses into one kernel): a bias may go int32 when the layer's output is quantized
/// right after one of these.
pub const FUSED_ACTIVATIONS: &[&str] = &["Relu", "Clip"];
