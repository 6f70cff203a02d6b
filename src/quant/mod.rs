//! Quantization: scale/zero-point maths, the op rules and targets, the plan (what gets Q/DQ with
//! which parameters), the mixed-precision search and the probe it measures with, and the plan's
//! materialisation into QuantizeLinear/DequantizeLinear nodes, the ternary and binary weight
//! rules (`ternary`) and K-means weight codebooks (`codebook`).

pub mod codebook;
pub mod guard;
pub mod materialize;
pub mod mixed;
pub mod params;
pub mod plan;
pub mod probe;
pub mod rules;
pub mod sensitivity;
pub mod subgraphs;
pub mod switched;
pub mod ternary;
