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

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::plan::{SimplePlan, SimpleState};

use crate::error::{tract_error, Error, Result};
use crate::ir::Model;

pub mod memory;
pub mod step;

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
        let bytes = crate::onnx::model_bytes(model)?;
        let mut outputs: Vec<String> = model.graph.outputs.iter().map(|o| o.name().to_string()).collect();
        for e in extra_outputs {
            if !outputs.contains(e) {
                outputs.push(e.clone());
            }
        }
        let framework = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .with_ignore_output_shapes(true);
        let mut typed = framework.model_for_read(&mut bytes.as_slice()).map_err(tract_error)?;
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
