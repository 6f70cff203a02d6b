//! ONNX Runtime as an engine (`engine: onnxruntime`), through the `ort` crate with the library
//! opened at run time: `ORT_DYLIB_PATH`, else the library inside the `onnxruntime` Python
//! package `python3` imports. Nothing is linked or downloaded at build time; without the
//! library onnxq runs on tract as before, and only asking for this engine is an error.
//!
//! Two ORT sessions of the model (one on a single core), each running one sample at a time
//! with its share of the cores as ORT's intra-op threads (deterministic kernels on): observing
//! a sample's tensors costs as much as computing them (measured on ppocr_v3_det at 416²: ~25 ms
//! a run, ~40 ms observing it), so one sample runs while the one before is observed, or both
//! run. (The binding's `run` takes a session mutably: a session runs one sample at a time.)
//!
//! ORT has no per-node hook: the intermediates a caller asks for are added as graph outputs (as
//! ONNX Runtime's own calibrators do). So that a sample's requested tensors are not all held at
//! once, the graph runs as consecutive segments (`SEGMENT_TENSORS` requested tensors each), each
//! a session of its own whose outputs are the requested tensors it produces and what later
//! segments or the graph outputs read; after each segment its requested tensors are shown to
//! the caller and dropped, and what is carried is dropped after its last reader. In a Q/DQ
//! model no cut falls between an op and the QuantizeLinear of its output, and a later segment
//! computes a DequantizeLinear again rather than be fed its float output, so ONNX Runtime sees
//! every DQ → op → Q group it fuses whole.

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
    /// The graph's consecutive segments, in order.
    segments: Vec<Segment>,
    /// One session per segment for each sample that runs at once.
    sessions: Vec<Mutex<Vec<Session>>>,
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
        let proto = model_proto(model)?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| Error::internal("a model without a graph"))?;
        let segments = Segment::split(graph, &outputs[model.graph.outputs.len()..], &outputs);
        let types = carried_types(environment, &proto, &segments)?;
        let count = Self::samples_at_once();
        let threads = (rayon::current_num_threads() / count).max(1);
        let mut sessions = Vec::with_capacity(count);
        for _ in 0..count {
            let mut slot = Vec::with_capacity(segments.len());
            for segment in &segments {
                let bytes = prost::Message::encode_to_vec(&segment.model(&proto, &types)?);
                slot.push(session(environment, threads, &bytes)?);
            }
            sessions.push(Mutex::new(slot));
        }
        Ok(OrtRunner {
            segments,
            sessions,
            input_names: inputs.iter().map(|(n, _, _)| n.clone()).collect(),
            outputs,
        })
    }

    /// Runs one sample; the tensors come back in `outputs` order.
    pub fn run(&self, inputs: Vec<TValue>) -> Result<Vec<Tensor>> {
        let mut returned: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
        self.run_segments(inputs, |name, t| {
            returned.insert(name.to_string(), t);
            Ok(())
        })?;
        self.outputs
            .iter()
            .map(|name| {
                returned
                    .remove(name)
                    .ok_or_else(|| Error::internal(format!("ONNX Runtime returned no tensor '{name}'")))
            })
            .collect()
    }

    /// Runs one sample segment by segment and hands `take` each tensor of `outputs` as its
    /// segment returns it; what later segments read is carried until its last reader has run.
    fn run_segments(&self, inputs: Vec<TValue>, mut take: impl FnMut(&str, Tensor) -> Result<()>) -> Result<()> {
        let mut carried: std::collections::HashMap<String, DynValue> = std::collections::HashMap::new();
        for (name, value) in self.input_names.iter().zip(&inputs) {
            carried.insert(name.clone(), to_ort(value).map_err(|e| input_error(name, e))?);
        }
        drop(inputs);
        let mut sessions = self.free_sessions()?;
        for (segment, session) in self.segments.iter().zip(sessions.iter_mut()) {
            let mut fed: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(segment.inputs.len());
            for n in &segment.inputs {
                let value = carried
                    .get(n)
                    .ok_or_else(|| Error::internal(format!("no tensor '{n}' carried to its segment")))?;
                fed.push((n.clone(), value.into()));
            }
            let mut returned = session.run(fed).map_err(ort_error)?;
            let mut kept = Vec::new();
            for Returned { name, shown, carried } in &segment.outputs {
                let value = returned
                    .remove(name.as_str())
                    .ok_or_else(|| Error::internal(format!("ONNX Runtime returned no tensor '{name}'")))?;
                if *shown {
                    let t =
                        to_tract(&value).map_err(|e| Error::Runtime(format!("ONNX Runtime's tensor '{name}': {e}")))?;
                    take(name, t)?;
                }
                if *carried {
                    kept.push((name.clone(), value));
                }
            }
            drop(returned);
            carried.extend(kept);
            for name in &segment.last_read {
                carried.remove(name);
            }
        }
        Ok(())
    }

    /// How many samples run at once, each in a session of its own.
    pub fn samples_at_once() -> usize {
        rayon::current_num_threads().clamp(1, 2)
    }

    /// Sessions no other sample runs in, else (more threads than sessions) the first to free up.
    fn free_sessions(&self) -> Result<std::sync::MutexGuard<'_, Vec<Session>>> {
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
        self.run_segments(inputs, |name, t| visit(name, &t))
    }
}

/// Requested tensors per segment: a segment returns this many of them at most, besides what it
/// carries on (ppocr_v3_det's 166 observed tensors run as 6 segments).
const SEGMENT_TENSORS: usize = 32;

/// A consecutive run of the graph's nodes (in the protobuf's topological order), loaded as a
/// session of its own.
struct Segment {
    /// Its nodes: `graph.node[nodes]`.
    nodes: std::ops::Range<usize>,
    /// DequantizeLinear nodes of earlier segments whose outputs its nodes read, computed again
    /// here (before its nodes) from the integer tensor they read: so ONNX Runtime sees each
    /// DQ → op it fuses (QLinearConv, MatMulNBits ...) in one session, and carries the integer
    /// tensor instead of the float one.
    borrowed: Vec<usize>,
    /// What it is fed: graph inputs and earlier segments' outputs, in first-read order.
    inputs: Vec<String>,
    /// What it returns, in node order.
    outputs: Vec<Returned>,
    /// Its inputs no later segment reads: dropped after it.
    last_read: Vec<String>,
}

/// Whether `node` is the standard `op` (QuantizeLinear, DequantizeLinear), or its contrib form.
fn is_qdq(node: &crate::proto::NodeProto, op: &str) -> bool {
    node.op_type() == op && matches!(node.domain(), "" | "ai.onnx" | "com.microsoft")
}

/// For each position in `graph.node` (0..=len), whether cutting the graph before it would carry
/// a QuantizeLinear's float input from one segment to the next: a cut there would split an
/// op → Q that ONNX Runtime fuses (QLinearConv, ...), and the segments would not compute what
/// the whole model does. (DQ → op is kept whole by borrowing the DQ: `Segment::borrowed`.)
fn quantized_spans(graph: &crate::proto::GraphProto) -> Vec<bool> {
    let n = graph.node.len();
    let producer: std::collections::HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, node)| node.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    // +1 at the first position a span covers, −1 after its last.
    let mut delta = vec![0i64; n + 2];
    for (i, node) in graph.node.iter().enumerate() {
        if let Some(&from) = node
            .input
            .first()
            .filter(|_| is_qdq(node, "QuantizeLinear"))
            .and_then(|x| producer.get(x.as_str()))
        {
            if from < i {
                delta[from + 1] += 1;
                delta[i + 1] -= 1;
            }
        }
    }
    let mut open = 0i64;
    (0..=n)
        .map(|c| {
            open += delta[c];
            open > 0
        })
        .collect()
}

/// The names of the tensors ONNX Runtime keeps when it optimises `model` (its graph inputs and
/// the outputs of the nodes of its optimised graph): those a fusion removed are not among them.
pub fn surviving_tensors(model: &Model) -> Result<std::collections::HashSet<String>> {
    let environment = environment()?;
    let bytes = prost::Message::encode_to_vec(&model_proto(model)?);
    let dir = tempfile::tempdir().map_err(|e| Error::Runtime(format!("a temporary folder: {e}")))?;
    let path = dir.path().join("optimized.onnx");
    Session::builder(environment)
        .and_then(|b| Ok(b.with_optimized_model_path(&path)?))
        .and_then(|b| Ok(b.with_execution_providers(session_providers())?))
        .and_then(|mut b| b.commit_from_memory(&bytes))
        .map_err(ort_error)?;
    let written = std::fs::read(&path)
        .map_err(|e| Error::Runtime(format!("ONNX Runtime's optimised model {}: {e}", path.display())))?;
    let optimized: crate::proto::ModelProto = prost::Message::decode(written.as_slice())
        .map_err(|e| Error::internal(format!("ONNX Runtime's optimised model does not decode: {e}")))?;
    let graph = optimized.graph.unwrap_or_default();
    Ok(graph
        .input
        .iter()
        .map(|i| i.name().to_string())
        .chain(graph.node.into_iter().flat_map(|n| n.output))
        .collect())
}

/// A tensor a segment returns.
#[derive(Debug, PartialEq)]
struct Returned {
    name: String,
    /// One the runner returns: shown to the caller.
    shown: bool,
    /// Read by a later segment: carried on.
    carried: bool,
}

impl Segment {
    /// Cuts `graph` into segments of about `SEGMENT_TENSORS` of the `requested` tensors each
    /// (one segment for a graph with subgraphs, whose outer-scope reads are not followed).
    /// `returned`: every tensor the runner returns (graph outputs and `requested`).
    fn split(graph: &crate::proto::GraphProto, requested: &[String], returned: &[String]) -> Vec<Segment> {
        use std::collections::HashSet;
        let requested: HashSet<&str> = requested.iter().map(String::as_str).collect();
        let returned: HashSet<&str> = returned.iter().map(String::as_str).collect();
        let has_subgraphs = graph
            .node
            .iter()
            .any(|n| n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()));
        let mut cuts = vec![0];
        if !has_subgraphs {
            let splits_qdq = quantized_spans(graph);
            let mut in_segment = 0;
            for (i, node) in graph.node.iter().enumerate() {
                in_segment += node.output.iter().filter(|o| requested.contains(o.as_str())).count();
                if in_segment >= SEGMENT_TENSORS && i + 1 < graph.node.len() && !splits_qdq[i + 1] {
                    cuts.push(i + 1);
                    in_segment = 0;
                }
            }
        }
        cuts.push(graph.node.len());
        let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
        let ranges: Vec<std::ops::Range<usize>> = cuts.windows(2).map(|w| w[0]..w[1]).collect();
        let dequantizer: std::collections::HashMap<&str, usize> = graph
            .node
            .iter()
            .enumerate()
            .filter(|(_, n)| is_qdq(n, "DequantizeLinear"))
            .flat_map(|(i, n)| n.output.first().map(|o| (o.as_str(), i)))
            .collect();
        // The DQ nodes of earlier segments each segment reads the outputs of.
        let borrowed: Vec<Vec<usize>> = ranges
            .iter()
            .map(|r| {
                let mut b: Vec<usize> = graph.node[r.clone()]
                    .iter()
                    .flat_map(|n| &n.input)
                    .filter_map(|name| dequantizer.get(name.as_str()).copied())
                    .filter(|&d| d < r.start)
                    .collect();
                b.sort_unstable();
                b.dedup();
                b
            })
            .collect();
        // Each segment's inputs: what its nodes (borrowed ones first) read that they do not produce.
        let inputs: Vec<Vec<String>> = ranges
            .iter()
            .zip(&borrowed)
            .map(|(r, b)| {
                let nodes: Vec<&crate::proto::NodeProto> = b
                    .iter()
                    .map(|&d| &graph.node[d])
                    .chain(&graph.node[r.clone()])
                    .collect();
                let produced: HashSet<&str> = nodes.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
                let mut read: Vec<String> = Vec::new();
                for name in nodes.iter().flat_map(|n| &n.input) {
                    let fresh = !name.is_empty()
                        && !produced.contains(name.as_str())
                        && !initializers.contains(name.as_str())
                        && !read.contains(name);
                    if fresh {
                        read.push(name.clone());
                    }
                }
                read
            })
            .collect();
        // One segment is the whole graph: every input and initializer, read where they may be
        // (subgraphs read them from the outer scope too).
        let inputs = match inputs.len() {
            1 => vec![graph
                .input
                .iter()
                .map(|i| i.name().to_string())
                .filter(|n| !initializers.contains(n.as_str()))
                .collect()],
            _ => inputs,
        };
        let mut segments = Vec::with_capacity(ranges.len());
        for (k, range) in ranges.iter().enumerate() {
            let read_later = |name: &str| inputs[k + 1..].iter().any(|i| i.iter().any(|n| n == name));
            let mut outputs = Vec::new();
            for name in graph.node[range.clone()].iter().flat_map(|n| &n.output) {
                let (shown, carried) = (returned.contains(name.as_str()), read_later(name));
                if !name.is_empty() && (shown || carried) {
                    outputs.push(Returned {
                        name: name.clone(),
                        shown,
                        carried,
                    });
                }
            }
            let last_read = inputs[k].iter().filter(|n| !read_later(n)).cloned().collect();
            segments.push(Segment {
                nodes: range.clone(),
                borrowed: borrowed[k].clone(),
                inputs: inputs[k].clone(),
                outputs,
                last_read,
            });
        }
        segments
    }

    /// The segment as a model of its own: its nodes, the initializers they read, its inputs
    /// typed (graph inputs as declared, carried tensors from `types`), its outputs by name.
    fn model(
        &self,
        proto: &crate::proto::ModelProto,
        types: &std::collections::HashMap<String, i32>,
    ) -> Result<crate::proto::ModelProto> {
        use crate::proto::type_proto::{Tensor as TensorType, Value};
        use crate::proto::{TypeProto, ValueInfoProto};
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| Error::internal("a model without a graph"))?;
        let nodes: Vec<crate::proto::NodeProto> = self
            .borrowed
            .iter()
            .map(|&d| &graph.node[d])
            .chain(&graph.node[self.nodes.clone()])
            .cloned()
            .collect();
        let whole = self.nodes == (0..graph.node.len());
        let read: std::collections::HashSet<String> = nodes.iter().flat_map(|n| n.input.iter().cloned()).collect();
        let mut inputs = Vec::with_capacity(self.inputs.len());
        for name in &self.inputs {
            match graph.input.iter().find(|i| i.name() == name) {
                Some(declared) => inputs.push(declared.clone()),
                None => {
                    let elem_type = *types
                        .get(name)
                        .ok_or_else(|| Error::internal(format!("no element type for carried tensor '{name}'")))?;
                    inputs.push(ValueInfoProto {
                        name: Some(name.clone()),
                        r#type: Some(TypeProto {
                            value: Some(Value::TensorType(TensorType {
                                elem_type: Some(elem_type),
                                shape: None,
                            })),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                }
            }
        }
        let g = crate::proto::GraphProto {
            name: graph.name.clone(),
            node: nodes,
            initializer: graph
                .initializer
                .iter()
                .filter(|t| whole || read.contains(t.name()))
                .cloned()
                .collect(),
            input: inputs,
            output: self
                .outputs
                .iter()
                .map(|r| ValueInfoProto {
                    name: Some(r.name.clone()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        Ok(crate::proto::ModelProto {
            ir_version: proto.ir_version,
            opset_import: proto.opset_import.clone(),
            functions: proto.functions.clone(),
            graph: Some(g),
            ..Default::default()
        })
    }
}

/// The ONNX element type of each tensor carried from one segment to a later one, from a session
/// of the whole model returning them (loaded, never run). Empty for a single segment.
fn carried_types(
    environment: &Environment,
    proto: &crate::proto::ModelProto,
    segments: &[Segment],
) -> Result<std::collections::HashMap<String, i32>> {
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| Error::internal("a model without a graph"))?;
    let mut carried: Vec<String> = Vec::new();
    for segment in segments.iter().skip(1) {
        for name in &segment.inputs {
            if !graph.input.iter().any(|i| i.name() == name) && !carried.contains(name) {
                carried.push(name.clone());
            }
        }
    }
    if carried.is_empty() {
        return Ok(Default::default());
    }
    let mut whole = proto.clone();
    add_outputs(&mut whole, &carried);
    let typing = session(environment, 1, &prost::Message::encode_to_vec(&whole))?;
    let mut types = std::collections::HashMap::new();
    for outlet in typing.outputs() {
        if let ValueType::Tensor { ty, .. } = outlet.dtype() {
            if let Some(code) = onnx_type(*ty) {
                types.insert(outlet.name().to_string(), code);
            }
        }
    }
    Ok(types)
}

/// A session of `bytes` with `threads` intra-op threads.
fn session(environment: &Environment, threads: usize, bytes: &[u8]) -> Result<Session> {
    Session::builder(environment)
        .and_then(|b| Ok(b.with_intra_threads(threads)?))
        .and_then(|b| Ok(b.with_deterministic_compute(true)?))
        // No arena: each of the sessions would keep its own peak of a sample's tensors.
        .and_then(|b| Ok(b.with_memory_pattern(false)?))
        .and_then(|b| Ok(b.with_execution_providers(session_providers())?))
        // int4 DequantizeLinear → MatMul fuses into MatMulNBits, which by default quantizes its
        // input on the fly; 0 keeps the graph's float maths.
        .and_then(|b| Ok(b.with_config_entry("session.qdq_matmulnbits_accuracy_level", "0")?))
        .and_then(|mut b| b.commit_from_memory(bytes))
        .map_err(ort_error)
}

/// The ONNX `TensorProto.DataType` code of an ORT element type.
fn onnx_type(ty: TensorElementType) -> Option<i32> {
    use crate::proto::tensor_proto::DataType;
    let t = match ty {
        TensorElementType::Float32 => DataType::Float,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::String => DataType::String,
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Float16 => DataType::Float16,
        TensorElementType::Float64 => DataType::Double,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Bfloat16 => DataType::Bfloat16,
        _ => return None,
    };
    Some(t as i32)
}

/// Fails, with the reason, when the library cannot be found or loaded.
pub fn check_available() -> Result<()> {
    environment().map(|_| ())
}

/// An execution provider of ONNX Runtime, as users name it
/// (`engine: {onnxruntime: {providers: [cuda, cpu]}}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cuda,
    Tensorrt,
    Cpu,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cuda => "cuda",
            Provider::Tensorrt => "tensorrt",
            Provider::Cpu => "cpu",
        }
    }

    /// For a session: CPU without its arena (each session would keep its own peak), the others
    /// failing the session when they cannot start (`use_providers` has checked they can).
    fn dispatch(self) -> ort::ep::ExecutionProviderDispatch {
        match self {
            Provider::Cuda => ort::ep::CUDA::default().build().error_on_failure(),
            Provider::Tensorrt => ort::ep::TensorRT::default().build().error_on_failure(),
            Provider::Cpu => ort::ep::CPU::default().with_arena_allocator(false).build(),
        }
    }

    /// Why this provider cannot run here, or None when it can: in the library's build and
    /// registering on a session (its device and its own libraries present).
    fn unusable(self, environment: &Environment) -> Option<String> {
        use ort::ep::ExecutionProvider as _;
        let built = match self {
            Provider::Cuda => ort::ep::CUDA::is_available(),
            Provider::Tensorrt => ort::ep::TensorRT::is_available(),
            Provider::Cpu => return None,
        };
        match built {
            Ok(true) => {}
            Ok(false) => {
                return Some(format!(
                    "this ONNX Runtime ({}) was built without it (the GPU build, e.g. `pip install onnxruntime-gpu`, has it)",
                    library_path().map_or_else(|e| e, |p| p.display().to_string())
                ))
            }
            Err(e) => return Some(format!("ONNX Runtime cannot list its providers: {e}")),
        }
        match Session::builder(environment).and_then(|b| Ok(b.with_execution_providers([self.dispatch()])?)) {
            Ok(_) => None,
            Err(e) => Some(format!("it does not start: {}", e.to_string().trim_end())),
        }
    }
}

/// The providers sessions use, in order (empty: ONNX Runtime's CPU provider).
static PROVIDERS: std::sync::RwLock<Vec<Provider>> = std::sync::RwLock::new(Vec::new());

/// Makes the sessions of this process use `requested`, in order, less those that cannot run here
/// (each said on stderr, with the reason); returns the ones used. An error when none of them can
/// run and `cpu` is not among them: the user asked not to fall back to it.
pub fn use_providers(requested: &[Provider]) -> Result<Vec<Provider>> {
    let environment = environment()?;
    let mut used = Vec::new();
    let mut dropped = Vec::new();
    for &p in requested {
        match p.unusable(environment) {
            None => used.push(p),
            Some(why) => dropped.push(format!("{}: {why}", p.name())),
        }
    }
    if used.is_empty() && !requested.is_empty() {
        return Err(Error::Usage(format!(
            "engine: onnxruntime cannot use the providers asked for ({}); add `cpu` to the list to fall back to it",
            dropped.join("; ")
        )));
    }
    for d in &dropped {
        eprintln!(
            "onnxq: ONNX Runtime: not using {d}; running on {}",
            used.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
        );
    }
    *PROVIDERS
        .write()
        .map_err(|_| Error::internal("a thread setting ONNX Runtime's providers panicked"))? = used.clone();
    Ok(if used.is_empty() { vec![Provider::Cpu] } else { used })
}

/// The providers a session registers: those in use, then the CPU provider (without its arena)
/// for what they cannot run, unless it is already among them.
fn session_providers() -> Vec<ort::ep::ExecutionProviderDispatch> {
    let mut providers: Vec<Provider> = PROVIDERS.read().map(|p| p.clone()).unwrap_or_default();
    if !providers.contains(&Provider::Cpu) {
        providers.push(Provider::Cpu);
    }
    providers.into_iter().map(Provider::dispatch).collect()
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

/// Adds `names` to the model's outputs, by name only (ORT infers their types).
fn add_outputs(proto: &mut crate::proto::ModelProto, names: &[String]) {
    if let Some(g) = proto.graph.as_mut() {
        for name in names {
            if !g.output.iter().any(|o| o.name() == name) {
                g.output.push(crate::proto::ValueInfoProto {
                    name: Some(name.clone()),
                    ..Default::default()
                });
            }
        }
    }
}

/// The model's protobuf with every weight kept on disk read in (sessions load from memory).
fn model_proto(model: &Model) -> Result<crate::proto::ModelProto> {
    use crate::proto::tensor_proto::DataLocation;
    let mut proto = model.to_proto()?;
    if let Some(g) = proto.graph.as_mut() {
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
    Ok(proto)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{GraphProto, NodeProto, TensorProto, ValueInfoProto};

    fn node(inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: Some("Add".into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            ..Default::default()
        }
    }

    /// x → t0 → … → t{n-1} → y, each node adding weight w, node 1 also reading x (a skip from
    /// the input); every t requested.
    fn chain(n: usize) -> (GraphProto, Vec<String>) {
        let mut nodes = vec![node(&["x", "w"], "t0"), node(&["t0", "x"], "t1")];
        for i in 2..n {
            nodes.push(node(&[&format!("t{}", i - 1), "w"], &format!("t{i}")));
        }
        nodes.push(node(&[&format!("t{}", n - 1), "t0"], "y"));
        let value = |name: &str| ValueInfoProto {
            name: Some(name.into()),
            ..Default::default()
        };
        let graph = GraphProto {
            node: nodes,
            input: vec![value("x")],
            output: vec![value("y")],
            initializer: vec![TensorProto {
                name: Some("w".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        (graph, (0..n).map(|i| format!("t{i}")).collect())
    }

    fn qdq(op: &str, input: &str, output: &str) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            input: vec![input.into(), "s".into(), "z".into()],
            output: vec![output.into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_later_segment_dequantizes_again_instead_of_carrying_a_dq_output() {
        // The chain, with x quantized at the start (Q → DQ) and the DQ output read at the end.
        let (mut graph, requested) = chain(70);
        graph.node.insert(0, qdq("QuantizeLinear", "x", "xq"));
        graph.node.insert(1, qdq("DequantizeLinear", "xq", "xd"));
        let last = graph.node.len() - 1;
        graph.node[last].input[1] = "xd".into();
        let returned: Vec<String> = std::iter::once("y".to_string())
            .chain(requested.iter().cloned())
            .collect();
        let segments = Segment::split(&graph, &requested, &returned);
        assert!(segments.len() >= 2);
        let end = segments.last().unwrap();
        assert_eq!(end.borrowed, [1], "the DQ computed again where its output is read");
        assert!(end.inputs.contains(&"xq".to_string()), "{:?}", end.inputs);
        for s in &segments {
            assert!(
                !s.inputs.contains(&"xd".to_string()),
                "a DQ output carried: {:?}",
                s.inputs
            );
        }
        assert!(segments[0].outputs.iter().any(|r| r.name == "xq" && r.carried));
    }

    #[test]
    fn no_cut_falls_between_an_op_and_the_quantizelinear_of_its_output() {
        // Each t_i read by a Q at the end of the graph: no position after t0 may be cut.
        let (mut graph, requested) = chain(70);
        for i in 0..70 {
            graph
                .node
                .push(qdq("QuantizeLinear", &format!("t{i}"), &format!("q{i}")));
        }
        let spans = quantized_spans(&graph);
        let n = graph.node.len();
        assert!(!spans[0] && !spans[n], "before the first node and after the last");
        assert!(
            spans[1..n].iter().all(|&s| s),
            "t0's Q is the first of the Qs at the end"
        );
        let returned: Vec<String> = std::iter::once("y".to_string())
            .chain(requested.iter().cloned())
            .collect();
        assert_eq!(Segment::split(&graph, &requested, &returned).len(), 1);
    }

    #[test]
    fn segments_carry_what_later_ones_read_and_drop_it_after_its_last_reader() {
        let (graph, requested) = chain(2 * SEGMENT_TENSORS + 5);
        let mut returned = vec!["y".to_string()];
        returned.extend(requested.iter().cloned());
        let segments = Segment::split(&graph, &requested, &returned);
        assert_eq!(segments.len(), 3);
        // Consecutive and covering every node once.
        assert_eq!(segments[0].nodes.start, 0);
        for w in segments.windows(2) {
            assert_eq!(w[0].nodes.end, w[1].nodes.start);
        }
        assert_eq!(segments[2].nodes.end, graph.node.len());
        // Every requested tensor and the graph output is returned exactly once, by its producer.
        let mut all: Vec<&str> = segments
            .iter()
            .flat_map(|s| s.outputs.iter().map(|r| r.name.as_str()))
            .collect();
        all.sort();
        let mut expected: Vec<&str> = returned.iter().map(String::as_str).collect();
        expected.sort();
        assert_eq!(all, expected);
        // t0 (read by the last node) is carried to the end; the weight is never an input.
        assert!(segments[0].outputs.contains(&Returned {
            name: "t0".into(),
            shown: true,
            carried: true
        }));
        assert!(segments[2].inputs.contains(&"t0".to_string()));
        assert!(segments.iter().all(|s| !s.inputs.contains(&"w".to_string())));
        // x is read by the first segment only, and dropped after it; the chain's carried tensor
        // is dropped after the segment that reads it.
        assert_eq!(segments[0].inputs, vec!["x".to_string()]);
        assert_eq!(segments[0].last_read, vec!["x".to_string()]);
        let carried = &segments[1].inputs;
        assert_eq!(carried.len(), 1, "{carried:?}");
        assert_eq!(segments[1].last_read, *carried);
        assert!(segments[2].last_read.contains(&"t0".to_string()));
    }

    #[test]
    fn a_graph_with_subgraphs_runs_as_one_segment() {
        let (mut graph, requested) = chain(3 * SEGMENT_TENSORS);
        graph.node[5].attribute.push(crate::proto::AttributeProto {
            name: Some("then_branch".into()),
            g: Some(GraphProto::default()),
            ..Default::default()
        });
        let segments = Segment::split(&graph, &requested, &requested);
        assert_eq!(segments.len(), 1);
        assert_eq!(segments[0].nodes, 0..graph.node.len());
        assert_eq!(
            segments[0].inputs,
            vec!["x".to_string()],
            "every graph input, none of the initializers"
        );
    }
}
