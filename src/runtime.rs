//! Running models in tract: load from bytes (no temp files), input shapes fixed from the data,
//! any intermediate tensor exposed by its ONNX name, many samples in parallel over one shared
//! plan (tract's plan is Send + Sync; each run has its own state).
//!
//! Work-arounds for what tract trips on: value_info and declared output shapes are ignored
//! (symbolic dims there break its shape analysis); input shapes are fixed before optimising.

use std::sync::Arc;

use rayon::prelude::*;
use tract_onnx::prelude::*;

use crate::error::{tract_error, Error, Result};
use crate::ir::Model;

pub struct Runner {
    plan: Arc<TypedRunnableModel>,
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
        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(tract_error)?;
        Ok(Runner {
            plan,
            input_names,
            outputs,
        })
    }

    /// Runs one sample.
    pub fn run(&self, inputs: Vec<TValue>) -> Result<TVec<TValue>> {
        self.plan.run(inputs.into()).map_err(tract_error)
    }

    /// Runs one sample and shows `visit` each input it is fed, then each tensor `run` returns, by
    /// ONNX name; the returned tensors are dropped when it is done.
    pub fn run_visiting(&self, inputs: Vec<TValue>, mut visit: impl FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        for (name, value) in self.input_names.iter().zip(&inputs) {
            visit(name, value)?;
        }
        let outputs = self.run(inputs)?;
        for (name, value) in self.outputs.iter().zip(outputs.iter()) {
            visit(name, value)?;
        }
        Ok(())
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
