//! Which ops are quantized, which of their inputs are data, and what each target backend
//! expects. One table, one place: the planner and (later) a lint read the same rules.

use serde::{Deserialize, Serialize};

use crate::quant::params::{QuantDtype, Scheme};

/// How an op takes part in quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpRole {
    /// Computes with a weight: its data inputs get Q/DQ, its weight is quantized
    /// (per-channel on `weight_axis`), its bias goes int32 or stays float per target.
    Weighted,
    /// Joins activations (residual Add, Concat): inputs get Q/DQ; Concat inputs share one scale.
    Join,
    /// Reorders or selects values without arithmetic (MaxPool, Reshape, Transpose, ...): its
    /// output must share the input's parameters so backends run it in int8.
    PassThrough,
    /// Averages (AveragePool, GlobalAveragePool): inputs get Q/DQ.
    Pool,
}

/// The role of an op, if onnxq quantizes it; `None` keeps it float.
pub fn op_role(op_type: &str) -> Option<OpRole> {
    Some(match op_type {
        "Conv" | "ConvTranspose" | "Gemm" | "MatMul" => OpRole::Weighted,
        "Add" | "Concat" => OpRole::Join,
        "AveragePool" | "GlobalAveragePool" => OpRole::Pool,
        "MaxPool" | "GlobalMaxPool" | "Reshape" | "Transpose" | "Flatten" | "Squeeze" | "Unsqueeze" | "Slice"
        | "Identity" | "DepthToSpace" | "SpaceToDepth" | "Resize" | "Split" => OpRole::PassThrough,
        _ => return None,
    })
}

/// Input slots that carry data (not shapes, axes, scales or weights) for an op with a role.
pub fn data_inputs(op_type: &str, input_count: usize) -> Vec<usize> {
    match op_type {
        "Add" | "Concat" => (0..input_count).collect(),
        // MatMul: both operands may be activations (attention); constants are weights.
        "MatMul" => vec![0, 1],
        // Gemm: A always; B when it is not a constant (checked by the planner).
        "Gemm" => vec![0, 1],
        _ => vec![0],
    }
}

/// For a weighted op, the weight input and its output-channel axis given the weight's rank and
/// the node's attributes; None when that input is not a constant weight.
pub fn weight_axis(op_type: &str, weight_rank: usize, trans_b: bool) -> Option<usize> {
    match op_type {
        "Conv" => Some(0),
        "ConvTranspose" => Some(1),
        // Gemm B is [K, N], or [N, K] with transB: the output column axis.
        "Gemm" => Some(if trans_b { 0 } else { 1 }),
        // MatMul B [.., K, N]: the last axis holds output columns.
        "MatMul" => weight_rank.checked_sub(1),
        _ => None,
    }
}

/// Target backends: each a fixed rule set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The most accurate plain QDQ that TensorRT, OpenVINO and ONNX Runtime all load.
    #[default]
    Generic,
    /// int8 symmetric everywhere (zero point 0), activations per-tensor, weights per-channel,
    /// Q/DQ on inputs of weighted ops only, bias float.
    Tensorrt,
    /// u8 activations, s8 per-channel weights, int32 bias.
    Openvino,
    /// u8 activations, s8 per-channel weights, int32 bias.
    Onnxruntime,
}

/// What a target fixes; the config may override where the target allows it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TargetRules {
    pub activations: Scheme,
    pub weights: Scheme,
    pub per_channel_weights: bool,
    /// Bias as int32 with scale s_in·s_w (false: bias stays float).
    pub int32_bias: bool,
    /// Quantize the inputs of Join ops (residual Add, Concat).
    pub quantize_joins: bool,
    /// Quantize residual Adds too. Off for `generic`: residual streams carry outlier channels
    /// (transformers: one channel at 170 while the rest is under 8), and a float Add costs
    /// little; measured on paraphrase_minilm_l3: 14 dB with, 24 dB without.
    pub quantize_residual_adds: bool,
    /// Q/DQ only where a weighted op reads an activation: every extra Q/DQ point adds rounding
    /// noise, and symmetric int8 already costs unsigned tensors one bit.
    pub only_weighted_inputs: bool,
    /// Zero points must be 0 (symmetric only).
    pub symmetric_only: bool,
}

impl Target {
    pub fn rules(self) -> TargetRules {
        let s8_weights = Scheme {
            dtype: QuantDtype::Int8,
            symmetric: true,
            narrow_range: true,
            reduce_range: false,
        };
        let u8_activations = Scheme {
            dtype: QuantDtype::Uint8,
            symmetric: false,
            narrow_range: false,
            reduce_range: false,
        };
        match self {
            Target::Generic | Target::Openvino | Target::Onnxruntime => TargetRules {
                activations: u8_activations,
                weights: s8_weights,
                per_channel_weights: true,
                int32_bias: true,
                quantize_joins: true,
                quantize_residual_adds: self != Target::Generic,
                only_weighted_inputs: false,
                symmetric_only: false,
            },
            Target::Tensorrt => TargetRules {
                activations: Scheme {
                    dtype: QuantDtype::Int8,
                    symmetric: true,
                    narrow_range: false,
                    reduce_range: false,
                },
                weights: s8_weights,
                per_channel_weights: true,
                int32_bias: false,
                quantize_joins: true,
                quantize_residual_adds: false,
                only_weighted_inputs: true,
                symmetric_only: true,
            },
        }
    }
}

/// Ranges this wide are sentinels (float32-min attention masks, "minus infinity" padding), not
/// signal: quantizing them would make the scale useless for the real values.
pub const SENTINEL_MAGNITUDE: f32 = 1e30;
