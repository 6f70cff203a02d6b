//! One model for every variant of a plan: the float model with a fake-quantizer on each tensor
//! the plan quantizes, whose parameters and on/off switch are model inputs. Measuring a variant
//! (a subset of the layers quantized, some at int16) is then one run of the same compiled model
//! with other inputs, instead of materialising, lowering and compiling the variant (which takes
//! tract 10–20× longer than running it on a few samples). The sensitivity bisection
//! (`quant::sensitivity`) measures its units with it.
//!
//! An activation `x` the plan quantizes becomes, for the plan's readers of `x`,
//! `s·((clamp(x / s, lo − z, hi − z) + r) − r)` with `s, lo − z, hi − z, r` scalar inputs: when
//! on, r = 1.5·2²³ rounds to an integer, ties to even (clamping before rounding is the same as
//! after, the bounds being integers; z is an integer, so this is the QuantizeLinear/
//! DequantizeLinear pair); when off, s = 1, r = 0 and no clamp: exactly `x`. Six elementwise ops
//! per tensor, each a vectorised scalar-operand kernel in tract (its `Round` is a scalar loop,
//! 8% of a default job's time on efficientnet_lite1), not
//! the ten of an exact on/off switch: tract's compile time grows faster than the node count
//! (on ppocr_v3_det 3.7 s with ten, 2.0 s with five), and every op runs on every sample. A weight `w`
//! becomes `w + on·(dq(q(w)) − w)`, the difference a constant, and so does an int32 bias. A bias
//! the plan passes corrected (`correct_bias`) and the plan quantizes to int32 is its float value
//! when off and its corrected int32 one when on. What this does not model, as
//! it only ranks layers (a variant's final figure is measured on the written model): a tensor is
//! quantized for all the plan's readers or none (a variant quantizing it for only some of them
//! quantizes it for all), a corrected bias that is not among the plan's biases (read by a layer
//! whose bias stays float) is corrected in every variant, a bias is int32 at the base plan's
//! scale also when its input is int16 (the written model's error is smaller there), float16
//! layers run in float, and `x / s` is tract's multiplication by the reciprocal.

use std::collections::{BTreeMap, HashMap};

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::ir::tensor::{float_tensor, values_f32};
use crate::ir::{Constant, ConstantOrigin, Model, Node};
use crate::proto::tensor_proto::DataType;
use crate::proto::{type_proto, TensorShapeProto, TypeProto, ValueInfoProto};
use crate::quant::materialize::{order_of_consumers, rewire, Names};
use crate::quant::params::{quantize_bias, BiasQuantization};
use crate::quant::plan::Plan;

/// The inputs of one fake-quantized activation, in this order.
const ACTIVATION_INPUTS: [&str; 4] = ["scale", "lo", "hi", "round"];
/// Added and subtracted to round to an integer, ties to even: from 2²³ to 2²⁴ the f32 spacing is
/// 1, so `(v + R) − R` is v rounded (|v| ≤ 2²², which the clamp before it ensures for every
/// integer type the plan writes).
const ROUNDER: f32 = 12_582_912.0; // 1.5·2²³

pub struct SwitchedModel {
    pub model: Model,
    /// The base plan's activations and weights, in the order their inputs come.
    activations: Vec<String>,
    weights: Vec<String>,
    /// The biases quantized to int32, in the base plan's (int8) scales.
    biases: Vec<String>,
    /// The switch inputs, after the model's own: name, type, shape (scalars).
    pub extra_inputs: Vec<(String, DatumType, Vec<usize>)>,
}

/// A float input of one value, of shape [1; rank] (a rank-0 operand would cost tract one
/// broadcasting node per axis and per op: on ppocr_v3_det, 3516 nodes to optimise instead of
/// about 1400, 1.2 s of its 1.8 s compile).
fn scalar_input(name: &str, rank: usize) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto {
                    dim: vec![
                        crate::proto::tensor_shape_proto::Dimension {
                            value: Some(crate::proto::tensor_shape_proto::dimension::Value::DimValue(1)),
                            ..Default::default()
                        };
                        rank
                    ],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `model` (the float model, or it with the biases the plan passes corrected) with switches for
/// every tensor `base` quantizes, every switch off computing `float` (module header). `ranks`:
/// the rank of each activation (`runtime::tensor_ranks`), its switches' shape [1; rank]
/// (rank 0 where it is unknown).
pub fn build(float: &Model, model: &Model, base: &Plan, ranks: &HashMap<String, usize>) -> Result<SwitchedModel> {
    let mut model = model.clone();
    let mut names = Names::of(&model);
    let mut fresh = |base: String| names.reserve(base);
    let mut extra_inputs = Vec::new();
    let mut input = |model: &mut Model, name: String, rank: usize| {
        model.graph.inputs.push(scalar_input(&name, rank));
        extra_inputs.push((name.clone(), DatumType::F32, vec![1; rank]));
        name
    };
    let order_after = |model: &Model, t: &str| {
        model
            .graph
            .nodes
            .node_weights()
            .find(|n| n.outputs.iter().any(|o| o == t))
            .map_or(0, |n| n.order + 1)
    };
    for (t, a) in &base.activations {
        let rank = ranks.get(t).copied().unwrap_or(0);
        let [s, lo, hi, round] =
            ACTIVATION_INPUTS.map(|what| input(&mut model, fresh(format!("{t}::switch_{what}")), rank));
        let order = order_after(&model, t);
        let mut op = |model: &mut Model, op: &str, inputs: Vec<String>| {
            let out = fresh(format!("{t}::switch_{}", op.to_lowercase()));
            model.graph.nodes.add_node(Node::new(&out, op, inputs, &out, order));
            out
        };
        let divided = op(&mut model, "Div", vec![t.clone(), s.clone()]);
        let above = op(&mut model, "Max", vec![divided, lo]);
        let clamped = op(&mut model, "Min", vec![above, hi]);
        let shifted = op(&mut model, "Add", vec![clamped, round.clone()]);
        let rounded = op(&mut model, "Sub", vec![shifted, round]);
        let dequantized = op(&mut model, "Mul", vec![rounded, s]);
        rewire(&mut model, &a.consumers, &dequantized)?;
    }
    // A constant `c` read through `c + on·delta` by `consumers`.
    let mut switch_constant =
        |model: &mut Model, c: &str, dequantized: Vec<f32>, consumers: &[crate::quant::plan::InputRef]| -> Result<()> {
            let tensor = &model.graph.constants[c].tensor;
            let values = values_f32(tensor).ok_or_else(|| Error::internal(format!("constant '{c}' is not float")))?;
            let delta: Vec<f64> = dequantized
                .iter()
                .zip(&values)
                .map(|(&d, &v)| d as f64 - v as f64)
                .collect();
            let rank = tensor.dims.len();
            let mut delta = float_tensor(DataType::Float as i32, tensor.dims.clone(), &delta);
            let delta_name = fresh(format!("{c}::switch_delta"));
            delta.name = Some(delta_name.clone());
            model.graph.constants.insert(
                delta_name.clone(),
                Constant {
                    tensor: delta,
                    origin: ConstantOrigin::Created,
                },
            );
            let on = input(model, fresh(format!("{c}::switch_on")), rank);
            let order = order_of_consumers(&model.graph, consumers).saturating_sub(1);
            let scaled = fresh(format!("{c}::switch_mul"));
            model
                .graph
                .nodes
                .add_node(Node::new(&scaled, "Mul", vec![delta_name, on], &scaled, order));
            let switched = fresh(format!("{c}::switch_add"));
            model.graph.nodes.add_node(Node::new(
                &switched,
                "Add",
                vec![c.to_string(), scaled],
                &switched,
                order,
            ));
            rewire(model, consumers, &switched)
        };
    let mut weight_scales: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
    for (w, q) in &base.weights {
        let quantized = base.quantized_weight(&model.graph, w)?;
        weight_scales.insert(w, quantized.params.iter().map(|p| p.scale).collect());
        switch_constant(&mut model, w, quantized.dequantized(), &q.consumers)?;
    }
    let mut biases = Vec::new();
    for (b, q) in &base.biases {
        let corrected = values_f32(&model.graph.constants[b].tensor)
            .ok_or_else(|| Error::internal(format!("bias '{b}' is not float")))?;
        // Off: the float model's bias (none, a bias of zeros, where a plan pass created it).
        let original = match float.graph.constants.get(b) {
            Some(c) => values_f32(&c.tensor).ok_or_else(|| Error::internal(format!("bias '{b}' is not float")))?,
            None => vec![0.0; corrected.len()],
        };
        let input_scale = base.activations[&q.input].params.scale;
        let on = match quantize_bias(&corrected, input_scale, &weight_scales[q.weight.as_str()]) {
            BiasQuantization::Int32 { values: ints, scales } => ints
                .iter()
                .enumerate()
                .map(|(c, &v)| (v as f64 * scales[if scales.len() == 1 { 0 } else { c }] as f64) as f32)
                .collect(),
            _ if corrected != original => corrected.clone(),
            _ => continue,
        };
        if original.len() != on.len() {
            return Err(Error::internal(format!("bias '{b}' changed size in the plan passes")));
        }
        if original != corrected {
            let tensor = &mut model.graph.constants.get_mut(b).expect("read above").tensor;
            let values: Vec<f64> = original.iter().map(|&v| v as f64).collect();
            *tensor = float_tensor(DataType::Float as i32, tensor.dims.clone(), &values);
            tensor.name = Some(b.clone());
        }
        switch_constant(&mut model, b, on, &q.consumers)?;
        biases.push(b.clone());
    }
    model.graph.rebuild_edges()?;
    model.graph.check()?;
    Ok(SwitchedModel {
        model,
        activations: base.activations.keys().cloned().collect(),
        weights: base.weights.keys().cloned().collect(),
        biases,
        extra_inputs,
    })
}

impl SwitchedModel {
    /// The switch inputs that make the model compute `plan` (a variant of the base plan: a
    /// subset of its tensors, some at other types).
    pub fn inputs_for(&self, plan: &Plan) -> Vec<TValue> {
        let mut inputs: Vec<f32> = Vec::with_capacity(self.extra_inputs.len());
        for t in &self.activations {
            match plan.activations.get(t) {
                Some(a) => {
                    // QuantizeLinear saturates to the type's full range.
                    let (lo, hi) = a.scheme.dtype.range(false);
                    let z = a.params.zero_point as f32;
                    inputs.extend([a.params.scale, lo as f32 - z, hi as f32 - z, ROUNDER]);
                }
                None => inputs.extend([1.0, f32::MIN, f32::MAX, 0.0]),
            }
        }
        for w in &self.weights {
            inputs.push(if plan.weights.contains_key(w) { 1.0 } else { 0.0 });
        }
        // A bias at its base (int8) scale whenever the variant quantizes it, also when its input
        // is int16 (where the written model's finer scale makes its error smaller still).
        for b in &self.biases {
            inputs.push(if plan.biases.contains_key(b) { 1.0 } else { 0.0 });
        }
        inputs
            .into_iter()
            .zip(&self.extra_inputs)
            .map(|(v, (_, _, shape))| {
                Tensor::from_shape(shape, &[v])
                    .expect("one value of shape [1; rank]")
                    .into_tvalue()
            })
            .collect()
    }
}
