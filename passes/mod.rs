//! The registry of passes: one explicit list of names, one constructor. The YAML `passes:` list
//! names passes from here; an unknown name is an error that lists these.

mod absorb_bias;
pub mod correct_bias;
mod eliminate_identity;
mod equalize;
mod fold_batchnorm;
pub mod gptq;
mod hardswish;
mod rewritable;

pub use correct_bias::BiasCorrectionMode;
pub use fold_batchnorm::BatchNormRecord;

use crate::pipeline::Pass;

/// Every pass onnxq has, by the name the config uses.
pub const NAMES: &[&str] = &[
    "eliminate_identity",
    "fold_batchnorm",
    "equalize",
    "absorb_bias",
    "correct_bias",
    "gptq",
];

/// What a pass does and its options with their defaults, for `onnxq passes`.
pub fn describe(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "eliminate_identity" => ("removes Identity nodes (exact)", "none"),
        "fold_batchnorm" => (
            "folds BatchNormalization (or its Mul/Add form) into the Conv, ConvTranspose or Gemm before it, keeping the statistics for the passes below (exact up to rounding)",
            "none",
        ),
        "equalize" => (
            "cross-layer equalisation (Nagel et al. 2019): balances the per-channel weight ranges of consecutive layers (float-preserving)",
            "relu6: keep|per_channel|as_relu (keep); hardswish: keep|per_channel (keep); tolerance (1e-4); max_iterations (20)",
        ),
        "absorb_bias" => (
            "high-bias absorption across a Relu, from the BatchNorm statistics (exact where the pre-activation exceeds the absorbed amount)",
            "sigmas (6); padded: skip|absorb (skip)",
        ),
        "correct_bias" => (
            "bias correction: removes the expected output shift of weight rounding once the plan is known",
            "mode: empirical|analytical (empirical with calibration data, analytical without)",
        ),
        "gptq" => (
            "GPTQ (Frantar et al. 2023): chooses each weight's rounding to minimise the layer's output error on the calibration data, on the plan's grid (runs before correct_bias)",
            "none",
        ),
        _ => return None,
    })
}

pub fn create(name: &str) -> Option<Box<dyn Pass>> {
    Some(match name {
        "eliminate_identity" => Box::new(eliminate_identity::EliminateIdentity),
        "fold_batchnorm" => Box::new(fold_batchnorm::FoldBatchnorm),
        "equalize" => Box::new(equalize::Equalize::default()),
        "absorb_bias" => Box::new(absorb_bias::AbsorbBias::default()),
        "correct_bias" => Box::new(correct_bias::CorrectBias::default()),
        "gptq" => Box::new(gptq::Gptq),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_pass_is_described_and_created() {
        for name in super::NAMES {
            assert!(super::describe(name).is_some(), "{name} has no description");
            assert!(super::create(name).is_some(), "{name} cannot be created");
        }
        assert!(super::describe("nope").is_none());
    }
}
