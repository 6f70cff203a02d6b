//! ONNX Runtime as an engine (`engine: onnxruntime`), through the `ort` crate with the library
//! opened at run time: `ORT_DYLIB_PATH`, else the library inside the `onnxruntime` Python
//! package `python3` imports. Nothing is linked or downloaded at build time; without the
//! library onnxq runs on tract as before, and only asking for this engine is an error.
//!
//! Two ORT sessions of the model (one on a single core), each running one sample at a time
//! with its share of the cores as ORT's intra-op threads (deterministic kernels on): observing
//! a sample's tensors costs as much as computing them (measured on ppocr_v3_det at 416²: ~25 ms
//! a run, ~40 ms observing it), so one sample runs while the one before is observed, or both
//! run. (The binding's `run` takes a session mutably: a session runs one sample at a time.) ORT has no per-node hook: the intermediates a caller asks for
//! are added as graph outputs (as ONNX Runtime's own calibrators do), so a run holds its
//! sample's requested tensors until it returns, and they are shown to the caller and dropped
//! one by one after.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;
use ort::value::{DynValue, TensorElementType, ValueType};
use tract_onnx::prelude::{DatumType, TValue, Tensor};

use crate::error::{Error, Result};
use crate::ir::Model;

/// The oldest ONNX Runtime the binding's C API needs (1.x).
pub const MINIMUM_MINOR_VERSION: u32 = ort::MINOR_VERSION;

/// A model loaded in ONNX Runtime, returning its graph outputs and the requested intermediates.
pub struct OrtRunner {
    sessions: Vec<Mutex<Session>>,
    /// The names the samples' inputs are fed as, in the order `run` takes them.
    input_names: Vec<String>,
    /// Names of the tensors `run` returns, in order: the graph outputs, then the intermediates.
    pub outputs: Vec<String>,
}

impl OrtRunner {
    /// Loads `model` with `extra_outputs` (intermediate tensors by ONNX name) added to its
    /// outputs; `inputs` names the tensors `run` is fed, in order.
    pub fn new(
        model: &Model,
        inputs: &[(String, DatumType, Vec<usize>)],
        extra_outputs: &[String],
    ) -> Result<OrtRunner> {
        let environment = environment()?;
        let mut outputs: Vec<String> = model.graph.outputs.iter().map(|o| o.name().to_string()).collect();
        for e in extra_outputs {
            if !outputs.contains(e) {
                outputs.push(e.clone());
            }
        }
        let bytes = model_bytes(model, &outputs)?;
        let cores = rayon::current_num_threads();
        let count = Self::samples_at_once();
        let sessions = (0..count)
            .map(|_| {
                Session::builder(environment)
                    .and_then(|b| Ok(b.with_intra_threads((cores / count).max(1))?))
                    .and_then(|b| Ok(b.with_deterministic_compute(true)?))
                    // int4 DequantizeLinear → MatMul fuses into MatMulNBits, which by default
                    // quantizes its input on the fly; 0 keeps the graph's float maths.
                    .and_then(|b| Ok(b.with_config_entry("session.qdq_matmulnbits_accuracy_level", "0")?))
                    .and_then(|mut b| b.commit_from_memory(&bytes))
                    .map(Mutex::new)
                    .map_err(ort_error)
            })
            .collect::<Result<Vec<_>>>()?;
        drop(bytes);
        Ok(OrtRunner {
            sessions,
            input_names: inputs.iter().map(|(n, _, _)| n.clone()).collect(),
            outputs,
        })
    }

    /// Runs one sample; the tensors come back in `outputs` order.
    pub fn run(&self, inputs: Vec<TValue>) -> Result<Vec<Tensor>> {
        let mut fed: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
        for (name, value) in self.input_names.iter().zip(&inputs) {
            fed.push((name.clone(), to_ort(value).map_err(|e| input_error(name, e))?));
        }
        drop(inputs);
        let mut session = self.free_session()?;
        let mut returned = session.run(fed).map_err(ort_error)?;
        let mut values = Vec::with_capacity(self.outputs.len());
        for name in &self.outputs {
            let value = returned
                .remove(name.as_str())
                .ok_or_else(|| Error::internal(format!("ONNX Runtime returned no tensor '{name}'")))?;
            values.push(to_tract(&value).map_err(|e| Error::Runtime(format!("ONNX Runtime's tensor '{name}': {e}")))?);
        }
        Ok(values)
    }

    /// How many samples run at once, each in a session of its own.
    pub fn samples_at_once() -> usize {
        rayon::current_num_threads().clamp(1, 2)
    }

    /// A session no other sample runs in, else (more threads than sessions) the first to free up.
    fn free_session(&self) -> Result<std::sync::MutexGuard<'_, Session>> {
        for s in &self.sessions {
            if let Ok(guard) = s.try_lock() {
                return Ok(guard);
            }
        }
        let at = rayon::current_thread_index().unwrap_or(0) % self.sessions.len();
        self.sessions[at]
            .lock()
            .map_err(|_| Error::internal("a thread running ONNX Runtime panicked"))
    }

    /// Runs one sample and shows `visit` each input it is fed, then each returned tensor by
    /// name in `outputs` order, dropping each after its visit; stops at the first error.
    pub fn run_visiting(&self, inputs: Vec<TValue>, mut visit: impl FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        for (name, value) in self.input_names.iter().zip(&inputs) {
            visit(name, value)?;
        }
        for (name, value) in self.outputs.iter().zip(self.run(inputs)?) {
            visit(name, &value)?;
        }
        Ok(())
    }
}

/// Fails, with the reason, when the library cannot be found or loaded.
pub fn check_available() -> Result<()> {
    environment().map(|_| ())
}

/// The ONNX Runtime environment, loaded on first use; its error, when it cannot be, every time.
fn environment() -> Result<&'static Environment> {
    static ENVIRONMENT: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();
    ENVIRONMENT
        .get_or_init(|| {
            let path = library_path()?;
            let builder = ort::init_from(&path).map_err(|e| {
                format!(
                    "cannot load ONNX Runtime from {}: {e} (engine: onnxruntime needs ONNX Runtime 1.{MINIMUM_MINOR_VERSION} or newer)",
                    path.display()
                )
            })?;
            builder
                .with_name("onnxq")
                .build()
                .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", path.display()))
        })
        .as_ref()
        .map_err(|e| Error::Usage(e.clone()))
}

/// The ONNX Runtime library to load: `ORT_DYLIB_PATH`, else the one inside the `onnxruntime`
/// Python package of `python3`.
pub fn library_path() -> std::result::Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(format!("ORT_DYLIB_PATH is {}, which is not a file", path.display()));
        }
        return Ok(path);
    }
    let how = format!(
        "engine: onnxruntime needs the ONNX Runtime library (1.{MINIMUM_MINOR_VERSION} or newer): set ORT_DYLIB_PATH to \
         it (e.g. .../libonnxruntime.so.1.31.1), or install the onnxruntime Python package for python3 \
         (`pip install onnxruntime`), whose library onnxq then finds"
    );
    let package = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, onnxruntime; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .output();
    let folder = match package {
        Ok(out) if out.status.success() => PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("capi"),
        Ok(_) => return Err(format!("{how}; python3 cannot import onnxruntime")),
        Err(e) => return Err(format!("{how}; python3 cannot be run: {e}")),
    };
    let prefix = format!("{}onnxruntime", std::env::consts::DLL_PREFIX);
    let suffix = std::env::consts::DLL_SUFFIX;
    let mut found: Vec<PathBuf> = std::fs::read_dir(&folder)
        .map_err(|e| format!("{how}; cannot read {}: {e}", folder.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // libonnxruntime.so or libonnxruntime.so.1.31.1, not libonnxruntime_providers_shared.so.
            name.strip_prefix(&prefix).is_some_and(|rest| rest.starts_with(suffix))
        })
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| format!("{how}; {} holds no {prefix}{suffix}", folder.display()))
}

/// The model's protobuf with `outputs` as its outputs (the intermediates by name only: ORT
/// infers their types) and every weight kept on disk read in (the session loads from memory).
fn model_bytes(model: &Model, outputs: &[String]) -> Result<Vec<u8>> {
    use crate::proto::tensor_proto::DataLocation;
    use crate::proto::ValueInfoProto;
    let mut proto = model.to_proto()?;
    if let Some(g) = proto.graph.as_mut() {
        for name in outputs {
            if !g.output.iter().any(|o| o.name() == name) {
                g.output.push(ValueInfoProto {
                    name: Some(name.clone()),
                    ..Default::default()
                });
            }
        }
        for t in &mut g.initializer {
            if crate::ir::tensor::on_disk(t).is_some() {
                let mut bytes = Vec::new();
                crate::ir::tensor::read_on_disk(t, &mut bytes)
                    .map_err(|e| Error::Runtime(format!("reading weight '{}': {e}", t.name())))?;
                t.raw_data = Some(bytes.into());
                t.data_location = Some(DataLocation::Default as i32);
                t.external_data.clear();
            }
        }
    }
    Ok(prost::Message::encode_to_vec(&proto))
}

fn ort_error<R>(e: ort::Error<R>) -> Error {
    Error::Runtime(format!("ONNX Runtime: {e}"))
}

fn input_error(name: &str, e: String) -> Error {
    Error::Runtime(format!("feeding input '{name}' to ONNX Runtime: {e}"))
}

/// A tract tensor as an ORT value (a copy).
fn to_ort(t: &Tensor) -> std::result::Result<DynValue, String> {
    let shape: Vec<usize> = t.shape().to_vec();
    macro_rules! copy {
        ($T:ty) => {
            ort::value::Tensor::from_array((
                shape,
                t.to_plain_array_view::<$T>()
                    .map_err(|e| e.to_string())?
                    .iter()
                    .cloned()
                    .collect::<Vec<$T>>(),
            ))
            .map(|v| v.into_dyn())
            .map_err(|e| e.to_string())
        };
    }
    match t.datum_type() {
        DatumType::F32 => copy!(f32),
        DatumType::F64 => copy!(f64),
        DatumType::I64 => copy!(i64),
        DatumType::I32 => copy!(i32),
        DatumType::I16 => copy!(i16),
        DatumType::I8 => copy!(i8),
        DatumType::U8 => copy!(u8),
        DatumType::U16 => copy!(u16),
        DatumType::Bool => copy!(bool),
        other => Err(format!("onnxq feeds ONNX Runtime no {other:?} tensors")),
    }
}

/// An ORT value as a tract tensor (a copy).
fn to_tract(v: &DynValue) -> std::result::Result<Tensor, String> {
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return Err(format!("a {} is not a tensor", v.dtype()));
    };
    macro_rules! copy {
        ($T:ty) => {{
            let (shape, data) = v.try_extract_tensor::<$T>().map_err(|e| e.to_string())?;
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            Tensor::from_shape(&dims, data).map_err(|e| e.to_string())
        }};
    }
    match ty {
        TensorElementType::Float32 => copy!(f32),
        TensorElementType::Float64 => copy!(f64),
        TensorElementType::Int64 => copy!(i64),
        TensorElementType::Int32 => copy!(i32),
        TensorElementType::Int16 => copy!(i16),
        TensorElementType::Int8 => copy!(i8),
        TensorElementType::Uint8 => copy!(u8),
        TensorElementType::Uint16 => copy!(u16),
        TensorElementType::Bool => copy!(bool),
        other => Err(format!("onnxq reads no {other:?} tensors from ONNX Runtime")),
    }
}
