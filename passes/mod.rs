//! The registry of passes: one explicit list of names, one constructor. The YAML `passes:` list
//! names passes from here; an unknown name is an error that lists these.

mod absorb_bias;
pub mod correct_bias;
mod eliminate_identity;
mod equalize;
mod fold_batchnorm;
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
];

pub fn create(name: &str) -> Option<Box<dyn Pass>> {
    Some(match name {
        "eliminate_identity" => Box::new(eliminate_identity::EliminateIdentity),
        "fold_batchnorm" => Box::new(fold_batchnorm::FoldBatchnorm),
        "equalize" => Box::new(equalize::Equalize::default()),
        "absorb_bias" => Box::new(absorb_bias::AbsorbBias::default()),
        "correct_bias" => Box::new(correct_bias::CorrectBias::default()),
        _ => return None,
    })
}
