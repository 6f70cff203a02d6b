//! Pools: ops that average their input. The input gets Q/DQ (an int8 kernel reads it); a mean
//! spans a narrower range than its input, so the output keeps its own scale.

use super::{OpRole, Rule};

pub(super) const RULES: &[Rule] = &[
    // Averages each window of an int8 input (QLinearAveragePool).
    Rule::new("AveragePool", OpRole::Pool),
    // Averages each channel of an int8 input (QLinearGlobalAveragePool).
    Rule::new("GlobalAveragePool", OpRole::Pool),
];
