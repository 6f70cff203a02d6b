//! Running models in tract: load from bytes (no temp files), input shapes fixed from the data,
//! any intermediate tensor exposed by its ONNX name, many samples in parallel over one shared
//! plan (tract's plan is Send + Sync; each run has its own state).
//!
//! Visiting a sample's tensors (`Runner::run_visiting`) does not hold them: the intermediates
//! are declared as model outputs so tract's optimiser keeps each one as a tensor of its own
//! (the values are those `run` returns), but a second plan over the same optimised model keeps
//! only the sinks to the end, and tract-core's per-node evaluation hook
//! (`SimpleState::run_plan_with_eval`) shows each node's outputs to the visitor right after the
//! node runs; tract then drops each value after its last consumer, as in plain inference.
//!
//! Work-arounds for what tract trips on: value_info and declared output shapes are ignored
//! (symbolic dims there break its shape analysis); input shapes are fixed before optimising.
//!
//! tract reads the graph from protobuf bytes, but not the weights: the large tensors (1 KiB and
//! more) are marked as external data and tract's data resolver (`Weights`) copies each, when
//! tract loads it, straight from the IR's shared bytes or from the file an external-data model
//! keeps it in. So building a plan holds the weights once more (tract's own copy), not four
//! times (the proto, its encoding, tract's decoded proto, tract's tensors).

use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context as _};
use rayon::prelude::*;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::plan::{SimplePlan, SimpleState};

use crate::error::{tract_error, Error, Result};
use crate::ir::Model;

pub mod memory;
pub mod onnxruntime;
pub mod step;

/// The engine that runs the float model for calibration: tract, embedded (the default), or
/// ONNX Runtime, loaded at run time (`runtime::onnxruntime`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    #[default]
    Tract,
    Onnxruntime,
}

impl Engine {
    /// Its name as users write it (`engine:`, `--engine`).
    pub fn name(self) -> &'static str {
        match self {
            Engine::Tract => "tract",
            Engine::Onnxruntime => "onnxruntime",
        }
    }

    /// Fails now, with the reason, when this engine cannot be loaded.
    pub fn check_available(self) -> Result<()> {
        match self {
            Engine::Tract => Ok(()),
            Engine::Onnxruntime => onnxruntime::check_available(),
        }
    }

    /// Loads the engine for a job that asked for `providers` (ONNX Runtime's, in order; tract
    /// has none) and returns the providers it runs on, said on stderr when they are not all
    /// the ones asked for (`onnxruntime::use_providers`); fails now when it cannot run.
    pub fn start(self, providers: &[onnxruntime::Provider]) -> Result<Vec<onnxruntime::Provider>> {
        match self {
            Engine::Tract => Ok(Vec::new()),
            Engine::Onnxruntime => onnxruntime::use_providers(providers),
        }
    }
}

/// A model ready to run samples in the chosen engine, returning its outputs and the requested
/// intermediates.
pub enum EngineRunner {
    Tract(Runner),
    Onnxruntime(onnxruntime::OrtRunner),
}

impl EngineRunner {
    /// [`Runner::new`] in `engine`.
    pub fn new(
        engine: Engine,
        model: &Model,
        inputs: &[(String, DatumType, Vec<usize>)],
        extra_outputs: &[String],
    ) -> Result<EngineRunner> {
        Ok(match engine {
            Engine::Tract => EngineRunner::Tract(Runner::new(model, inputs, extra_outputs)?),
            Engine::Onnxruntime => {
                EngineRunner::Onnxruntime(onnxruntime::OrtRunner::new(model, inputs, extra_outputs)?)
            }
        })
    }

    pub fn engine(&self) -> Engine {
        match self {
            EngineRunner::Tract(_) => Engine::Tract,
            EngineRunner::Onnxruntime(_) => Engine::Onnxruntime,
        }
    }

    /// Runs one sample; the tensors come back in [`EngineRunner::outputs`] order.
    pub fn run(&self, inputs: Vec<TValue>) -> Result<Vec<TValue>> {
        Ok(match self {
            EngineRunner::Tract(r) => r.run(inputs)?.into_iter().collect(),
            EngineRunner::Onnxruntime(r) => r.run(inputs)?.into_iter().map(Tensor::into_tvalue).collect(),
        })
    }

    /// [`Runner::run_all`]: `count` samples in parallel, results in sample order.
    pub fn run_all<R: Send>(
        &self,
        count: usize,
        feed: impl Fn(usize) -> Result<Vec<TValue>> + Sync,
        observe: impl Fn(usize, Vec<TValue>) -> Result<R> + Sync,
    ) -> Result<Vec<R>> {
        (0..count)
            .into_par_iter()
            .map(|i| observe(i, self.run(feed(i)?)?))
            .collect()
    }

    /// What the progress line says of how it runs: the engine, and `parallel`.
    pub fn progress_detail(&self, parallel: &memory::Parallelism) -> String {
        format!("{}, {}", self.engine().name(), parallel.describe())
    }

    /// Names of the tensors `run` returns: the graph outputs, then the requested intermediates.
    pub fn outputs(&self) -> &[String] {
        match self {
            EngineRunner::Tract(r) => &r.outputs,
            EngineRunner::Onnxruntime(r) => &r.outputs,
        }
    }

    /// [`Runner::run_visiting`]: each input, then each returned tensor, by ONNX name.
    pub fn run_visiting(&self, inputs: Vec<TValue>, visit: impl FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        match self {
            EngineRunner::Tract(r) => r.run_visiting(inputs, visit),
            EngineRunner::Onnxruntime(r) => r.run_visiting(inputs, visit),
        }
    }

    /// How many samples to run at once. tract: as many as fit the memory budget, one per core;
    /// ONNX Runtime: one per session (`OrtRunner::samples_at_once`).
    pub fn parallelism(&self) -> Result<memory::Parallelism> {
        match self {
            EngineRunner::Tract(r) => Ok(memory::Parallelism::for_samples(r.sample_bytes()?)),
            EngineRunner::Onnxruntime(_) => Ok(memory::Parallelism {
                samples: onnxruntime::OrtRunner::samples_at_once(),
                fits: true,
            }),
        }
    }
}

pub struct Runner {
    plan: Arc<TypedRunnableModel>,
    /// The optimised model `plan` runs.
    model: Arc<TypedModel>,
    /// What `run_visiting` runs, made on its first call.
    visiting: OnceLock<Visiting>,
    /// Names of the model inputs, in the order `run` takes them.
    input_names: Vec<String>,
    /// Names of the tensors `run` returns, in order: the graph outputs, then the requested
    /// intermediates.
    pub outputs: Vec<String>,
}

impl Runner {
    /// Builds an optimised plan for the given input shapes, returning the graph outputs and
    /// `extra_outputs` (intermediate tensors by ONNX name).
    pub fn new(model: &Model, inputs: &[(String, DatumType, Vec<usize>)], extra_outputs: &[String]) -> Result<Runner> {
        let (bytes, weights) = graph_for_tract(model)?;
        Self::build(model, bytes, weights, inputs, extra_outputs)
    }

    /// `new`, dropping the model once its graph is encoded: each weight only the model held
    /// (the f32 weights verification's lowering folds) is then freed as soon as tract has
    /// copied it, so the model and tract's copy of it are never both whole in memory.
    pub fn from_model(
        model: Model,
        inputs: &[(String, DatumType, Vec<usize>)],
        extra_outputs: &[String],
    ) -> Result<Runner> {
        let (bytes, weights) = graph_for_tract(&model)?;
        let mut outline = model;
        outline.graph.constants.clear();
        Self::build(&outline, bytes, weights, inputs, extra_outputs)
    }

    fn build(
        model: &Model,
        bytes: Vec<u8>,
        weights: Weights,
        inputs: &[(String, DatumType, Vec<usize>)],
        extra_outputs: &[String],
    ) -> Result<Runner> {
        let mut outputs: Vec<String> = model.graph.outputs.iter().map(|o| o.name().to_string()).collect();
        for e in extra_outputs {
            if !outputs.contains(e) {
                outputs.push(e.clone());
            }
        }
        let (mut typed, input_names) = inference_model(bytes, weights, inputs)?;
        typed.select_outputs_by_name(&outputs).map_err(tract_error)?;
        let optimized = Arc::new(typed.into_optimized().map_err(tract_error)?);
        let plan = SimplePlan::new(optimized.clone()).map_err(tract_error)?;
        Ok(Runner {
            plan,
            model: optimized,
            visiting: OnceLock::new(),
            input_names,
            outputs,
        })
    }

    /// Runs one sample.
    pub fn run(&self, inputs: Vec<TValue>) -> Result<TVec<TValue>> {
        self.plan.run(inputs.into()).map_err(tract_error)
    }

    /// Runs one sample and shows `visit` each input it is fed, then each tensor `run` returns, by
    /// ONNX name, with the values `run` returns. The tensors are shown as tract produces them
    /// (in its evaluation order, not in the order of `outputs`), and each is dropped after its
    /// last consumer has run: a sample's tensors are never all held at once. When `visit` errs
    /// on a returned tensor the run goes on and the error of the tensor first in `outputs` order
    /// is returned (the one a visit in that order would have stopped at).
    pub fn run_visiting(&self, inputs: Vec<TValue>, mut visit: impl FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        for (name, value) in self.input_names.iter().zip(&inputs) {
            visit(name, value)?;
        }
        // The visitor's error with the smallest index into `outputs`.
        let mut failed: Option<(usize, Error)> = None;
        let mut show = |index: usize, value: &Tensor| {
            if failed.as_ref().is_some_and(|(first, _)| *first < index) {
                return;
            }
            if let Err(e) = visit(&self.outputs[index], value) {
                failed = Some((index, e));
            }
        };
        let visiting = self.visiting()?;
        for (index, value) in &visiting.constants {
            show(*index, value);
        }
        let mut state = SimpleState::new(&visiting.plan).map_err(tract_error)?;
        // What it returns (the sinks, already shown) is dropped at once.
        state
            .run_plan_with_eval(inputs.into(), |ctx, op_state, node, node_inputs| {
                let values = tract_onnx::tract_core::plan::eval(ctx, op_state, node, node_inputs)?;
                for &(slot, index) in &visiting.produced[node.id] {
                    show(index, &values[slot]);
                }
                TractResult::Ok(values)
            })
            .map_err(tract_error)?;
        match failed {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// The nodes of the plan (by tract node id) whose values depend on the inputs at `changed`
    /// (indices into the inputs `run` takes): what a run whose inputs differ from a recorded
    /// one's only there must compute again ([`Runner::run_reusing`]).
    pub fn dependents(&self, changed: &[usize]) -> Result<Vec<bool>> {
        let mut dependent = vec![false; self.model.nodes().len()];
        let sources = self.model.input_outlets().map_err(tract_error)?;
        for &i in changed {
            dependent[sources[i].node] = true;
        }
        for &n in self.plan.order_without_consts() {
            if self.model.node(n).inputs.iter().any(|i| dependent[i.node]) {
                dependent[n] = true;
            }
        }
        Ok(dependent)
    }

    /// Runs one sample and keeps every node's values, for runs of variants of the same sample
    /// ([`Runner::run_reusing`]). Holding them costs [`Runner::recording_bytes`].
    pub fn run_recording(&self, inputs: Vec<TValue>) -> Result<(TVec<TValue>, Recording)> {
        let mut values: Vec<Option<TVec<TValue>>> = vec![None; self.model.nodes().len()];
        let mut state = SimpleState::new(&self.plan).map_err(tract_error)?;
        let outputs = state
            .run_plan_with_eval(inputs.into(), |ctx, op_state, node, node_inputs| {
                let v = tract_onnx::tract_core::plan::eval(ctx, op_state, node, node_inputs)?;
                values[node.id] = Some(v.clone());
                TractResult::Ok(v)
            })
            .map_err(tract_error)?;
        Ok((outputs, Recording(values)))
    }

    /// Runs one sample whose inputs equal the recorded run's except where `dependent` (from
    /// [`Runner::dependents`]) says: every other node hands on its recorded values instead of
    /// computing them again. The results are those of [`Runner::run`], bit for bit (the same
    /// kernels on the same values).
    pub fn run_reusing(&self, inputs: Vec<TValue>, recording: &Recording, dependent: &[bool]) -> Result<TVec<TValue>> {
        let mut state = SimpleState::new(&self.plan).map_err(tract_error)?;
        state
            .run_plan_with_eval(inputs.into(), |ctx, op_state, node, node_inputs| {
                if let (false, Some(v)) = (dependent[node.id], &recording.0[node.id]) {
                    return TractResult::Ok(v.clone());
                }
                tract_onnx::tract_core::plan::eval(ctx, op_state, node, node_inputs)
            })
            .map_err(tract_error)
    }

    fn visiting(&self) -> Result<&Visiting> {
        if let Some(v) = self.visiting.get() {
            return Ok(v);
        }
        // Two threads may both build it: the plans are the same, the first one set is kept.
        let built = Visiting::new(&self.model)?;
        Ok(self.visiting.get_or_init(|| built))
    }

    /// Runs `count` samples in parallel; `feed(i)` makes sample i's inputs and `observe(i,
    /// outputs)` consumes its outputs, which are dropped right after. Results come back in
    /// sample order, whatever the thread count.
    pub fn run_all<R: Send>(
        &self,
        count: usize,
        feed: impl Fn(usize) -> Result<Vec<TValue>> + Sync,
        observe: impl Fn(usize, TVec<TValue>) -> Result<R> + Sync,
    ) -> Result<Vec<R>> {
        (0..count)
            .into_par_iter()
            .map(|i| observe(i, self.run(feed(i)?)?))
            .collect()
    }
}

/// Tensors of at least this many bytes reach tract through `Weights` rather than the protobuf.
const WEIGHT_BYTES: usize = 1024;

/// The model's protobuf encoding without the bytes of its large tensors (top-level
/// initializers and `Constant` values of `WEIGHT_BYTES` and more, and every tensor kept on
/// disk): each is marked as external data at location `.` of the folder `/` with its index in
/// the returned `Weights` as offset. (tract canonicalises `/.` to `/`, inside `/`, before asking
/// its resolver; `Weights` ignores the path.)
fn graph_for_tract(model: &Model) -> Result<(Vec<u8>, Weights)> {
    use crate::proto::tensor_proto::DataLocation;
    use crate::proto::{StringStringEntryProto, TensorProto};
    let mut proto = model.to_proto()?;
    let mut weights = Vec::new();
    let mut detach = |t: &mut TensorProto| {
        let large = t.raw_data.as_ref().is_some_and(|r| r.len() >= WEIGHT_BYTES);
        if !large && crate::ir::tensor::on_disk(t).is_none() {
            return;
        }
        let length = match &t.raw_data {
            Some(r) => r.len() as u64,
            None => crate::ir::tensor::on_disk(t).map_or(0, |(_, _, length)| length),
        };
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v),
        };
        let external = vec![
            entry("location", ".".into()),
            entry("offset", weights.len().to_string()),
            entry("length", length.to_string()),
        ];
        let mut held = std::mem::take(t);
        t.name = held.name.clone();
        t.dims = std::mem::take(&mut held.dims);
        t.data_type = held.data_type;
        t.data_location = Some(DataLocation::External as i32);
        t.external_data = external;
        weights.push(Some(held));
    };
    if let Some(g) = proto.graph.as_mut() {
        for t in &mut g.initializer {
            detach(t);
        }
        for n in &mut g.node {
            if n.op_type() == "Constant" && n.domain().is_empty() {
                for a in &mut n.attribute {
                    if let Some(t) = a.t.as_mut() {
                        detach(t);
                    }
                }
            }
        }
    }
    Ok((
        prost::Message::encode_to_vec(&proto),
        Weights(std::sync::Mutex::new(weights)),
    ))
}

/// tract's data resolver for `graph_for_tract`'s graph: the tensor at index `offset`, from the
/// IR's bytes or from its file. tract reads each once; its entry is dropped then.
struct Weights(std::sync::Mutex<Vec<Option<crate::proto::TensorProto>>>);

impl tract_onnx::data_resolver::ModelDataResolver for Weights {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        _: &std::path::Path,
        offset: usize,
        _: Option<usize>,
    ) -> TractResult<()> {
        let t = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("a thread reading the weights panicked"))?
            .get_mut(offset)
            .and_then(Option::take)
            .with_context(|| format!("onnxq handed tract no weight #{offset}, or it was read already"))?;
        match &t.raw_data {
            Some(raw) => buf.extend_from_slice(raw),
            None => {
                crate::ir::tensor::read_on_disk(&t, buf).with_context(|| format!("reading weight '{}'", t.name()))?
            }
        }
        Ok(())
    }
}

/// What `Framework::model_for_read` does, with `/` as the model's folder (see `graph_for_tract`).
fn framework_model(framework: &tract_onnx::Onnx, bytes: &[u8]) -> TractResult<InferenceModel> {
    let proto = framework
        .proto_model_for_read(&mut &*bytes)
        .context("Reading proto model")?;
    let parsed = framework
        .parse(&proto, Some("/"))
        .context("Translating proto model to model")?;
    if !parsed.unresolved_inputs.is_empty() {
        bail!("Could not resolve inputs at top-level: {:?}", parsed.unresolved_inputs)
    }
    Ok(parsed.model)
}

/// tract's model of the graph, its inputs fixed to `inputs`' types and shapes; and the input
/// names in order.
fn inference_model(
    bytes: Vec<u8>,
    weights: Weights,
    inputs: &[(String, DatumType, Vec<usize>)],
) -> Result<(InferenceModel, Vec<String>)> {
    let mut framework = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .with_ignore_output_shapes(true);
    framework.provider = Arc::new(weights);
    let mut typed = framework_model(&framework, &bytes).map_err(tract_error)?;
    drop(framework);
    let input_names: Vec<String> = typed
        .input_outlets()
        .map_err(tract_error)?
        .iter()
        .map(|o| typed.node(o.node).name.clone())
        .collect();
    for (ix, name) in input_names.iter().enumerate() {
        let (_, dt, shape) = inputs
            .iter()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| Error::Runtime(format!("no shape given for model input '{name}'")))?;
        typed
            .set_input_fact(ix, InferenceFact::dt_shape(*dt, shape.clone()))
            .map_err(tract_error)?;
    }
    Ok((typed, input_names))
}

/// The rank of every tensor of `model` tract's analysis knows, by ONNX name, with the inputs'
/// shapes fixed to `inputs` (tract's own facts: exact where ONNX value infos may be missing).
pub fn tensor_ranks(
    model: &Model,
    inputs: &[(String, DatumType, Vec<usize>)],
) -> Result<std::collections::HashMap<String, usize>> {
    let (bytes, weights) = graph_for_tract(model)?;
    let (inference, input_names) = inference_model(bytes, weights, inputs)?;
    let typed = inference.into_typed().map_err(tract_error)?;
    let mut ranks = std::collections::HashMap::new();
    for (name, outlet) in input_names.into_iter().zip(typed.input_outlets().map_err(tract_error)?) {
        ranks.insert(name, typed.outlet_fact(*outlet).map_err(tract_error)?.rank());
    }
    for node in typed.nodes() {
        for slot in 0..node.outputs.len() {
            let outlet = OutletId::new(node.id, slot);
            if let Some(label) = typed.outlet_label(outlet) {
                ranks.insert(label.to_string(), node.outputs[slot].fact.rank());
            }
        }
    }
    Ok(ranks)
}

/// Every node's values of one run (by tract node id), kept for [`Runner::run_reusing`]. The
/// values are shared (`Arc`), so no op of a later run writes into them in place.
pub struct Recording(Vec<Option<TVec<TValue>>>);

/// A plan for `Runner::run_visiting` over the same optimised model as `Runner::plan`: it
/// computes every model output but keeps to the end of the run only those no node reads (sinks,
/// which tract never flushes anyway), so the others are dropped after their last reader.
struct Visiting {
    plan: Arc<TypedRunnableModel>,
    /// Per node: `(output slot, index into Runner::outputs)` of each returned tensor it
    /// produces (several names can share an outlet).
    produced: Vec<Vec<(usize, usize)>>,
    /// The returned tensors tract folded to constants: `(index into Runner::outputs, value)`.
    constants: Vec<(usize, Arc<Tensor>)>,
}

impl Visiting {
    fn new(model: &Arc<TypedModel>) -> Result<Visiting> {
        let outlets = model.output_outlets().map_err(tract_error)?;
        let mut produced: Vec<Vec<(usize, usize)>> = vec![Vec::new(); model.nodes().len()];
        let mut constants = Vec::new();
        for (index, outlet) in outlets.iter().enumerate() {
            match model.node(outlet.node).op_as::<Const>() {
                Some(k) => constants.push((index, k.val().clone())),
                None => produced[outlet.node].push((outlet.slot, index)),
            }
        }
        let is_sink = |node: usize| model.node(node).outputs.iter().all(|o| o.successors.is_empty());
        let mut kept: Vec<OutletId> = Vec::new();
        for outlet in outlets {
            if !produced[outlet.node].is_empty() && is_sink(outlet.node) && !kept.contains(outlet) {
                kept.push(*outlet);
            }
        }
        let build = |kept: &[OutletId]| {
            #[allow(deprecated)]
            SimplePlan::build_with_outputs_and_deps(model.clone(), kept, &[], &RunOptions::default())
                .map_err(tract_error)
        };
        let mut plan = build(&kept)?;
        // Every model output leads to a sink in an optimised model; should one not, keep it too.
        let computed: std::collections::HashSet<usize> = plan.order_without_consts().iter().copied().collect();
        let missing: Vec<OutletId> = outlets
            .iter()
            .filter(|o| !produced[o.node].is_empty() && !computed.contains(&o.node) && !kept.contains(o))
            .copied()
            .collect();
        if !missing.is_empty() {
            kept.extend(missing);
            plan = build(&kept)?;
        }
        Ok(Visiting {
            plan: Arc::new(plan),
            produced,
            constants,
        })
    }
}

/// Lists the ops of a model that tract has no implementation for.
pub fn unsupported_ops(model: &Model) -> Vec<String> {
    let onnx = tract_onnx::onnx();
    let mut ops: Vec<String> = model
        .graph
        .nodes
        .node_weights()
        .filter(|n| !onnx.op_register.0.contains_key(&n.op_type))
        .map(|n| {
            if n.is_default_domain() {
                n.op_type.clone()
            } else {
                format!("{}.{}", n.domain, n.op_type)
            }
        })
        .collect();
    ops.sort();
    ops.dedup();
    ops
}

/// A tensor's values as f32 (floats and integers alike), for comparisons and reports.
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.cast_to::<f32>().map_err(tract_error)?;
    let view = t.to_plain_array_view::<f32>().map_err(tract_error)?;
    Ok(view.iter().copied().collect())
}
