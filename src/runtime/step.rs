//! A sample run node by node (`Runner::start`), so a caller can interleave two models' runs
//! and compare their tensors as both produce them (verification), holding only those one model
//! has produced and the other not yet.
//!
//! Same plan, same evaluation (`tract_core::plan::eval` via `SimpleState::compute_one`) and same
//! values as `Runner::run_visiting`; each node's values are dropped as soon as the nodes that
//! read them have run, the returned tensors too once shown (a caller keeps what it needs by
//! cloning the `TValue`, a reference count).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::SimpleState;

use super::{Runner, Visiting};
use crate::error::{tract_error, Result};

/// One sample of one model in progress.
pub struct Stepping<'r> {
    runner: &'r Runner,
    visiting: &'r Visiting,
    state: SimpleState<TypedFact, Box<dyn TypedOp>>,
    /// The inputs and tract-folded constants, shown by the first `step`.
    first: Option<Vec<TValue>>,
    /// Position in the plan's order.
    step: usize,
    /// Per node: readers in the plan not run yet (its values are dropped at 0).
    readers_left: Vec<usize>,
}

impl Runner {
    /// Starts running one sample; `Stepping::step` runs it node by node.
    pub fn start(&self, inputs: Vec<TValue>) -> Result<Stepping<'_>> {
        let visiting = self.visiting()?;
        let mut state = SimpleState::new(&visiting.plan).map_err(tract_error)?;
        state
            .set_inputs(inputs.iter().cloned().collect())
            .map_err(tract_error)?;
        let model = visiting.plan.model();
        let mut readers_left = vec![0usize; model.nodes().len()];
        for &n in visiting.plan.order_without_consts() {
            for i in &model.node(n).inputs {
                readers_left[i.node] += 1;
            }
        }
        Ok(Stepping {
            runner: self,
            visiting,
            state,
            first: Some(inputs),
            step: 0,
            readers_left,
        })
    }
}

impl Stepping<'_> {
    /// Whether every node has run.
    pub fn finished(&self) -> bool {
        self.first.is_none() && self.step >= self.visiting.plan.order_without_consts().len()
    }

    /// Runs the next node and shows `visit` each tensor `Runner::run` would return that it
    /// produced (the first call shows the inputs and the constants instead), by index into
    /// `Runner::outputs`. Returns whether there is more to run.
    pub fn step(&mut self, mut visit: impl FnMut(usize, &TValue) -> Result<()>) -> Result<bool> {
        if let Some(inputs) = self.first.take() {
            for (name, value) in self.runner.input_names.iter().zip(&inputs) {
                if let Some(index) = self.runner.outputs.iter().position(|o| o == name) {
                    visit(index, value)?;
                }
            }
            for (index, value) in &self.visiting.constants {
                visit(*index, &value.clone().into_tvalue())?;
            }
            return Ok(!self.finished());
        }
        let order = self.visiting.plan.order_without_consts();
        let Some(&node) = order.get(self.step) else {
            return Ok(false);
        };
        self.step += 1;
        self.state.compute_one(node).map_err(tract_error)?;
        let values = &mut self.state.turn_state.values;
        if let Some(produced) = values[node].as_ref() {
            for &(slot, index) in &self.visiting.produced[node] {
                visit(index, &produced[slot])?;
            }
        }
        let model = self.visiting.plan.model();
        for i in &model.node(node).inputs {
            self.readers_left[i.node] -= 1;
            if self.readers_left[i.node] == 0 {
                values[i.node] = None;
            }
        }
        if self.readers_left[node] == 0 {
            values[node] = None;
        }
        Ok(!self.finished())
    }
}
