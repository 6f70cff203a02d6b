//! Turns a plan into QuantizeLinear/DequantizeLinear nodes: the only place Q/DQ nodes are made.
//!
//! - An activation `t` gets `t::q = QuantizeLinear(t, t::scale, t::zero_point)` and
//!   `t::dq = DequantizeLinear(t::q, ...)`; the consumer inputs the plan lists read `t::dq`, the
//!   others (and graph outputs) keep reading `t`.
//! - A weight `w` is stored quantized as `w::quantized` (per-channel on the plan's axis) and read
//!   through `w::dq = DequantizeLinear(w::quantized, w::scale, w::zero_point, axis)`; the float
//!   weight goes when nothing else reads it.
//! - A bias `b` becomes int32 with scale `s_in·s_w[c]` (zero point 0) behind `b::dq`, unless it
//!   would overflow int32, in which case it stays float and the notes say so.
//!
//! - A codebook weight (`quant::codebook`) is read through `w::indices → Cast → (Add offsets) →
//!   Gather(w::codebook)` instead of a DequantizeLinear, and gets no int32 bias.
//! - 4-bit weights are packed two per byte, low nibble first; FP8 weights are their codes; all
//!   in `raw_data` (OpenVINO misreads FP8 held in `int32_data`). A blocked weight's
//!   DequantizeLinear carries `block_size` and block-shaped scales and zero points.
//!
//! The default-domain opset is raised first when the plan needs it (per-axis DequantizeLinear:
//! 13; FP8: 19; 16-bit, 4-bit and blocked Q/DQ: 21).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::ir::tensor;
use crate::ir::{Constant, ConstantOrigin, Model, Node};
use crate::proto::{AttributeProto, TensorProto};
use crate::quant::params::{self, BiasQuantization, QuantDtype};
use crate::quant::plan::{node_key, InputRef, Plan, Precision};

/// The opset the plan needs: its types' ([`QuantDtype::min_opset`]: FP8 19, 16- and 4-bit 21),
/// blocked weights 21, per-axis weights and int32 biases 13.
pub fn required_opset(plan: &Plan) -> i64 {
    let types = plan
        .activations
        .values()
        .map(|a| a.scheme.dtype)
        .chain(
            plan.weights
                .values()
                .filter(|w| w.codebook.is_none())
                .map(|w| w.scheme.dtype),
        )
        .map(QuantDtype::min_opset)
        .chain(plan.weights.values().filter_map(|w| w.codebook).map(|c| c.min_opset()))
        .max()
        .unwrap_or(10);
    let layout = if plan.weights.values().any(|w| w.block_size.is_some()) {
        21
    } else if plan.weights.values().any(|w| w.axis.is_some()) || !plan.biases.is_empty() {
        13
    } else {
        10
    };
    types.max(layout)
}

fn axis_attr(axis: i64) -> AttributeProto {
    crate::ir::attribute::int("axis", axis)
}

/// Makes each of `consumers` (a node by key, an input slot) read `to`.
pub fn rewire(model: &mut Model, consumers: &[InputRef], to: &str) -> Result<()> {
    for (key, slot) in consumers {
        let node = model
            .graph
            .nodes
            .node_weights_mut()
            .find(|n| n.outputs.first().is_some_and(|o| o == key) || (n.outputs.is_empty() && &n.name == key))
            .ok_or_else(|| Error::internal(format!("the plan names a consumer '{key}' that is not in the graph")))?;
        let input = node
            .inputs
            .get_mut(*slot)
            .ok_or_else(|| Error::Graph(format!("consumer '{key}' has no input {slot}")))?;
        *input = to.to_string();
    }
    Ok(())
}

/// The names a model uses (constants, graph inputs, node outputs and node names), for
/// generating new ones that collide with none.
pub struct Names(std::collections::BTreeSet<String>);

impl Names {
    pub fn of(model: &Model) -> Names {
        let mut taken: std::collections::BTreeSet<String> = model.graph.constants.keys().cloned().collect();
        taken.extend(model.graph.inputs.iter().map(|i| i.name().to_string()));
        for n in model.graph.nodes.node_weights() {
            taken.extend(n.outputs.iter().cloned());
            taken.insert(n.name.clone());
        }
        Names(taken)
    }

    /// Reserves a generated name: `name`, or `name.1`, `name.2`… when the model already has it
    /// (a model may name its own tensors like onnxq's generated ones).
    pub fn reserve(&mut self, name: String) -> String {
        let mut unique = name.clone();
        let mut k = 1;
        while !self.0.insert(unique.clone()) {
            unique = format!("{name}.{k}");
            k += 1;
        }
        unique
    }
}

/// The lowest `order` among the nodes `consumers` names (0 when none is found).
pub fn order_of_consumers(graph: &crate::ir::Graph, consumers: &[InputRef]) -> u64 {
    consumers
        .iter()
        .filter_map(|(key, _)| {
            graph
                .nodes
                .node_weights()
                .find(|n| n.outputs.first() == Some(key))
                .map(|n| n.order)
        })
        .min()
        .unwrap_or(0)
}

struct Builder<'a> {
    model: &'a mut Model,
    taken: Names,
    /// Float16 versions made so far (of a constant, a Cast of an activation, or a float16 layer's
    /// own output), by original.
    float16: BTreeMap<String, String>,
}

impl Builder<'_> {
    /// Reserves a generated name ([`Names::reserve`]).
    fn name(&mut self, name: String) -> Result<String> {
        Ok(self.taken.reserve(name))
    }

    fn constant(&mut self, mut t: TensorProto, name: String) -> Result<String> {
        let name = self.name(name)?;
        t.name = Some(name.clone());
        self.model.graph.constants.insert(
            name.clone(),
            Constant {
                tensor: t,
                origin: ConstantOrigin::Created,
            },
        );
        Ok(name)
    }

    fn rewire(&mut self, consumers: &[InputRef], to: &str) -> Result<()> {
        rewire(self.model, consumers, to)
    }

    fn order_of_consumers(&self, consumers: &[InputRef]) -> u64 {
        order_of_consumers(&self.model.graph, consumers)
    }
}

impl Builder<'_> {
    /// Writes a weight as its K-means table ([`crate::quant::codebook`]): indices → Cast →
    /// (Add offsets) → Gather. Adds a note with its SQNR and size; returns (float, stored) bytes.
    fn codebook_weight(
        &mut self,
        codebook: crate::quant::codebook::Codebook,
        w: &str,
        wq: &crate::quant::plan::WeightQuant,
        spec: crate::quant::codebook::CodebookSpec,
        notes: &mut Vec<String>,
    ) -> Result<(u64, u64)> {
        use crate::proto::tensor_proto::DataType;
        let original = tensor::values_f32(&self.model.graph.constants[w].tensor)
            .ok_or_else(|| Error::internal(format!("codebook weight '{w}' is not a float tensor")))?;
        let (float, stored) = (4 * original.len() as u64, codebook.stored_bytes());
        notes.push(format!(
            "weight '{w}': {} entries{}, weight SQNR {:.1} dB, {} → {} bytes",
            spec.entries(),
            if wq.axis.is_some() { " per channel" } else { "" },
            codebook.sqnr_db(&original),
            float,
            stored
        ));
        let (indices, table, offsets) = codebook.to_protos(
            &format!("{w}::indices"),
            &format!("{w}::codebook"),
            &format!("{w}::offsets"),
        );
        let mut indices = indices;
        if tensor::on_disk(&self.model.graph.constants[w].tensor).is_some() {
            tensor::spill(&mut indices).map_err(|e| Error::io(std::env::temp_dir(), e))?;
        }
        let indices = self.constant(indices, format!("{w}::indices"))?;
        let table = self.constant(table, format!("{w}::codebook"))?;
        let order = self.order_of_consumers(&wq.consumers).saturating_sub(3);
        let cast = self.name(format!("{w}::indices_int32"))?;
        let mut node = Node::new(&cast, "Cast", vec![indices], &cast, order);
        node.attributes
            .push(crate::ir::attribute::int("to", DataType::Int32 as i64));
        self.model.graph.nodes.add_node(node);
        let mut entries = cast;
        if let Some(offsets) = offsets {
            let offsets = self.constant(offsets, format!("{w}::offsets"))?;
            let shifted = self.name(format!("{w}::entries"))?;
            self.model
                .graph
                .nodes
                .add_node(Node::new(&shifted, "Add", vec![entries, offsets], &shifted, order + 1));
            entries = shifted;
        }
        let decoded = self.name(format!("{w}::decoded"))?;
        let mut gather = Node::new(&decoded, "Gather", vec![table, entries], &decoded, order + 2);
        gather.attributes.push(axis_attr(0));
        self.model.graph.nodes.add_node(gather);
        self.rewire(&wq.consumers, &decoded)?;
        Ok((float, stored))
    }

    /// Runs a layer in float16: its float inputs are cast to float16 (constants are stored as
    /// float16 instead), it writes `<output>::float16`, and a Cast back to float writes the
    /// original output name, so nothing downstream changes. Returns the float32 constants it
    /// converted.
    fn float16_layer(&mut self, layer: &str) -> Result<Vec<String>> {
        let g = &self.model.graph;
        let ix = g
            .nodes
            .node_indices()
            .find(|&ix| node_key(&g.nodes[ix]) == layer)
            .ok_or_else(|| {
                Error::internal(format!(
                    "the plan names a float16 layer '{layer}' that is not in the graph"
                ))
            })?;
        let node = g.nodes[ix].clone();
        let mut inputs = node.inputs.clone();
        let mut converted_constants = Vec::new();
        for input in inputs.iter_mut().filter(|i| !i.is_empty()) {
            if let Some(made) = self.float16.get(input.as_str()) {
                *input = made.clone();
                continue;
            }
            let original = input.clone();
            let converted = format!("{input}::float16");
            if let Some(c) = self.model.graph.constants.get(input.as_str()) {
                let values = tensor::values_f32(&c.tensor)
                    .ok_or_else(|| Error::Graph(format!("float16 layer '{layer}': '{input}' is not a float tensor")))?;
                let t = TensorProto {
                    dims: c.tensor.dims.clone(),
                    data_type: Some(crate::proto::tensor_proto::DataType::Float16 as i32),
                    raw_data: Some(
                        values
                            .iter()
                            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
                            .collect(),
                    ),
                    ..Default::default()
                };
                converted_constants.push(input.clone());
                *input = self.constant(t, converted)?;
            } else {
                let name = self.name(converted)?;
                let mut cast = Node::new(&name, "Cast", vec![input.clone()], &name, node.order.saturating_sub(1));
                cast.attributes.push(crate::ir::attribute::int(
                    "to",
                    crate::proto::tensor_proto::DataType::Float16 as i64,
                ));
                self.model.graph.nodes.add_node(cast);
                *input = name;
            }
            self.float16.insert(original, input.clone());
        }
        let output = node
            .outputs
            .first()
            .cloned()
            .ok_or_else(|| Error::Graph(format!("float16 layer '{layer}' has no output")))?;
        let half_output = self.name(format!("{output}::float16"))?;
        let back = self.name(format!("{output}::to_float"))?;
        let mut cast = Node::new(&back, "Cast", vec![half_output.clone()], &output, node.order + 1);
        cast.attributes.push(crate::ir::attribute::int(
            "to",
            crate::proto::tensor_proto::DataType::Float as i64,
        ));
        let n = &mut self.model.graph.nodes[ix];
        n.inputs = inputs;
        n.outputs[0] = half_output.clone();
        self.model.graph.nodes.add_node(cast);
        // A float16 layer after this one reads the float16 output directly (no Cast pair).
        self.float16.insert(output, half_output);
        Ok(converted_constants)
    }
}

/// Writes the plan into the model. Returns notes (biases kept float and why, opset raised).
pub fn materialize(model: &mut Model, plan: &Plan) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let needed = required_opset(plan);
    let current = model.opset("").unwrap_or(1);
    if current < needed {
        notes.extend(crate::onnx::opset::upgrade_opset(model, needed)?);
        notes.push(format!(
            "default-domain opset raised from {current} to {needed} for the Q/DQ nodes"
        ));
    }
    let mut b = Builder {
        taken: Names::of(model),
        model,
        float16: BTreeMap::new(),
    };
    let producers: BTreeMap<String, u64> = b
        .model
        .graph
        .nodes
        .node_weights()
        .flat_map(|n| n.outputs.iter().map(move |o| (o.clone(), n.order)))
        .collect();

    for (t, a) in &plan.activations {
        let (scale, zero_point) = params::scalar_params_protos(
            a.params,
            a.scheme.dtype,
            &format!("{t}::scale"),
            &format!("{t}::zero_point"),
        );
        let scale = b.constant(scale, format!("{t}::scale"))?;
        let zero_point = b.constant(zero_point, format!("{t}::zero_point"))?;
        let (q, dq) = (b.name(format!("{t}::q"))?, b.name(format!("{t}::dq"))?);
        let order = match producers.get(t) {
            Some(o) => o + 1,
            None => b.order_of_consumers(&a.consumers).saturating_sub(2),
        };
        let inputs = vec![t.clone(), scale.clone(), zero_point.clone()];
        b.model
            .graph
            .nodes
            .add_node(Node::new(&q, "QuantizeLinear", inputs, &q, order));
        b.model.graph.nodes.add_node(Node::new(
            &dq,
            "DequantizeLinear",
            vec![q.clone(), scale, zero_point],
            &dq,
            order + 1,
        ));
        b.rewire(&a.consumers, &dq)?;
    }

    let mut weight_scales: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
    let mut codebook_bytes = (0u64, 0u64);
    // Clustered weight by weight in parallel: a table per tensor is one sequential k-means.
    let mut codebooks = {
        use rayon::prelude::*;
        let graph = &b.model.graph;
        plan.weights
            .iter()
            .filter(|(_, wq)| wq.codebook.is_some())
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(w, _)| Ok((w.as_str(), plan.codebook(graph, w)?)))
            .collect::<Result<BTreeMap<&str, _>>>()?
    };
    for (w, wq) in &plan.weights {
        if let Some(spec) = wq.codebook {
            let codebook = codebooks
                .remove(w.as_str())
                .ok_or_else(|| Error::internal(format!("no codebook made for weight '{w}'")))?;
            let (float, stored) = b.codebook_weight(codebook, w, wq, spec, &mut notes)?;
            codebook_bytes.0 += float;
            codebook_bytes.1 += stored;
            continue;
        }
        let quantized = plan.quantized_weight(&b.model.graph, w)?;
        let (data, scale, zero_point) = quantized.to_protos(
            &format!("{w}::quantized"),
            &format!("{w}::scale"),
            &format!("{w}::zero_point"),
        );
        weight_scales.insert(w.as_str(), quantized.params.iter().map(|p| p.scale).collect());
        // A weight kept on disk (an external-data model's) stays on disk once quantized.
        let mut data = data;
        if b.model
            .graph
            .constants
            .get(w)
            .is_some_and(|c| tensor::on_disk(&c.tensor).is_some())
        {
            tensor::spill(&mut data).map_err(|e| Error::io(std::env::temp_dir(), e))?;
        }
        let data = b.constant(data, format!("{w}::quantized"))?;
        let scale = b.constant(scale, format!("{w}::scale"))?;
        let zero_point = b.constant(zero_point, format!("{w}::zero_point"))?;
        let dq = b.name(format!("{w}::dq"))?;
        let order = b.order_of_consumers(&wq.consumers).saturating_sub(1);
        let mut node = Node::new(&dq, "DequantizeLinear", vec![data, scale, zero_point], &dq, order);
        if let Some(axis) = wq.axis {
            node.attributes.push(axis_attr(axis as i64));
        }
        if let Some(block) = wq.block_size {
            node.attributes
                .push(crate::ir::attribute::int("block_size", block as i64));
        }
        b.model.graph.nodes.add_node(node);
        b.rewire(&wq.consumers, &dq)?;
    }

    if codebook_bytes.0 > 0 {
        notes.insert(
            0,
            format!(
                "codebook weights: {:.2} MB on disk instead of {:.2} MB as float",
                codebook_bytes.1 as f64 / 1e6,
                codebook_bytes.0 as f64 / 1e6
            ),
        );
    }

    for (bias, bq) in &plan.biases {
        let input_scale = plan.activations[&bq.input].params.scale;
        let w_scales = &weight_scales[bq.weight.as_str()];
        let values = tensor::values_f32(&b.model.graph.constants[bias].tensor)
            .ok_or_else(|| Error::Graph(format!("bias '{bias}' is not a float tensor")))?;
        match params::quantize_bias(&values, input_scale, w_scales) {
            BiasQuantization::KeepFloat { reason } => notes.push(format!("bias '{bias}' kept float: {reason}")),
            quantized @ BiasQuantization::Int32 { .. } => {
                let (data, scale, zero_point) = params::bias_protos(
                    &quantized,
                    values.len(),
                    &format!("{bias}::quantized"),
                    &format!("{bias}::scale"),
                    &format!("{bias}::zero_point"),
                )?;
                let per_channel = tensor::element_count(&scale) > 1;
                let data = b.constant(data, format!("{bias}::quantized"))?;
                let scale = b.constant(scale, format!("{bias}::scale"))?;
                let zero_point = b.constant(zero_point, format!("{bias}::zero_point"))?;
                let dq = b.name(format!("{bias}::dq"))?;
                let order = b.order_of_consumers(&bq.consumers).saturating_sub(1);
                let mut node = Node::new(&dq, "DequantizeLinear", vec![data, scale, zero_point], &dq, order);
                if per_channel {
                    node.attributes.push(axis_attr(0));
                }
                b.model.graph.nodes.add_node(node);
                b.rewire(&bq.consumers, &dq)?;
            }
        }
    }

    // In topological order, so a float16 layer's float16 output exists before its readers.
    let mut float16_constants = Vec::new();
    let order = b.model.graph.topological_order()?;
    let float16_layers: Vec<String> = order
        .iter()
        .map(|&ix| node_key(&b.model.graph.nodes[ix]))
        .filter(|key| plan.precisions.get(key) == Some(&Precision::Float16))
        .collect();
    if let Some((missing, _)) = plan
        .precisions
        .iter()
        .find(|(key, &p)| p == Precision::Float16 && !float16_layers.contains(key))
    {
        return Err(Error::internal(format!(
            "the plan names a float16 layer '{missing}' that is not in the graph"
        )));
    }
    for layer in &float16_layers {
        float16_constants.extend(b.float16_layer(layer)?);
    }

    // Float originals nobody reads any more go.
    let graph = &mut b.model.graph;
    let read: std::collections::BTreeSet<String> = graph
        .nodes
        .node_weights()
        .flat_map(|n| n.inputs.iter().cloned())
        .collect();
    let outputs: std::collections::BTreeSet<&str> = graph.outputs.iter().map(|o| o.name()).collect();
    for name in plan.weights.keys().chain(plan.biases.keys()).chain(&float16_constants) {
        if !read.contains(name) && !outputs.contains(name.as_str()) && !graph.inputs.iter().any(|i| i.name() == name) {
            graph.constants.remove(name);
        }
    }
    graph.rebuild_edges()?;
    graph.check()?;
    Ok(notes)
}
