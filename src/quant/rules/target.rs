//! Target backends: what each expects of a QDQ model (schemes, bias, where Q/DQ may go).

use serde::{Deserialize, Serialize};

use crate::quant::params::{QuantDtype, Scheme};

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
    /// Weights in blocks of this many elements along their reduction axis (opset 21).
    pub weight_block_size: Option<usize>,
    /// Weights as K-means codebooks instead of a grid ([`crate::quant::codebook`]).
    pub weight_codebook: Option<crate::quant::codebook::CodebookSpec>,
    /// Q/DQ on activations (false: weight-only quantization).
    pub quantize_activations: bool,
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
            bits: None,
        };
        let u8_activations = Scheme {
            dtype: QuantDtype::Uint8,
            symmetric: false,
            narrow_range: false,
            reduce_range: false,
            bits: None,
        };
        match self {
            Target::Generic | Target::Openvino | Target::Onnxruntime => TargetRules {
                activations: u8_activations,
                weights: s8_weights,
                per_channel_weights: true,
                weight_block_size: None,
                weight_codebook: None,
                quantize_activations: true,
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
                    bits: None,
                },
                weights: s8_weights,
                per_channel_weights: true,
                weight_block_size: None,
                weight_codebook: None,
                quantize_activations: true,
                int32_bias: false,
                quantize_joins: true,
                quantize_residual_adds: false,
                only_weighted_inputs: true,
                symmetric_only: true,
            },
        }
    }

    /// TensorRT fuses a weighted op with what follows it: a Q/DQ on a weighted op's output would
    /// split the fusion, so the output stays float even where a quantized op reads it.
    pub fn fuses_weighted_outputs(self) -> bool {
        self == Target::Tensorrt
    }
}
