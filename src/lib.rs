//! onnxq: a post-training quantization compiler for ONNX models.
//!
//! Rooms: `onnx` (files in and out), `ir` (the graph), `pipeline` (passes and config), `calib`
//! (data), `runtime` (tract), `inspect`; the passes themselves live in the top-level `passes/`.

pub mod calib;
pub mod error;
pub mod inspect;
pub mod ir;
pub mod job;
pub mod lint;
pub mod onnx;
pub mod pipeline;
pub mod quant;
pub mod report;
pub mod runtime;
pub mod verify;

#[path = "../passes/mod.rs"]
pub mod passes;

/// The ONNX protobuf messages, generated from proto/onnx.proto at build time.
#[allow(clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use error::{Error, Result};
