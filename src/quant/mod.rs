//! Quantization: scale/zero-point maths, the plan (what gets Q/DQ with which parameters), and
//! its materialisation into QuantizeLinear/DequantizeLinear nodes.

pub mod materialize;
pub mod mixed;
pub mod params;
pub mod plan;
pub mod rules;
