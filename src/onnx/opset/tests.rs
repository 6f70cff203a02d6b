//! Tests of the whole upgrade, through [`super::upgrade_opset`] and [`super::convert_opset`]:
//! one or more small models per kind of conversion, the refusals (which must leave the model as
//! it was), names of created tensors, and subgraphs.

use std::collections::HashMap;

use super::infer::infer_facts;
use super::*;
use crate::ir::attribute::{float, int as int_attr, ints};
use crate::ir::tensor::{self, float_tensor, i64_tensor};
use crate::ir::Node;
use crate::proto::attribute_proto::AttributeType;
use crate::proto::tensor_proto::DataType;
use crate::proto::tensor_shape_proto::{dimension, Dimension};
use crate::proto::type_proto::{self, Value};
use crate::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn graph_attr(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    }
}

/// A tensor value info; a dim < 0 is symbolic. `None` dims: rank unknown.
fn vi(name: &str, elem: DataType, dims: Option<&[i64]>) -> ValueInfoProto {
    let shape = dims.map(|dims| TensorShapeProto {
        dim: dims
            .iter()
            .map(|&d| Dimension {
                value: Some(if d >= 0 {
                    dimension::Value::DimValue(d)
                } else {
                    dimension::Value::DimParam("n".into())
                }),
                ..Default::default()
            })
            .collect(),
    });
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn proto(
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    opset: i64,
) -> ModelProto {
    ModelProto {
        ir_version: Some(5),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: nodes,
            initializer: inits,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn model(nodes: Vec<NodeProto>, inputs: Vec<ValueInfoProto>, outputs: Vec<ValueInfoProto>, opset: i64) -> Model {
    Model::from_proto(proto(nodes, vec![], inputs, outputs, opset)).unwrap()
}

fn find<'a>(m: &'a Model, name: &str) -> &'a Node {
    m.graph.nodes.node_weights().find(|n| n.name == name).unwrap()
}

fn const_i64(m: &Model, name: &str) -> (Vec<i64>, Vec<i64>) {
    let t = &m.graph.constants[name].tensor;
    assert_eq!(t.data_type(), DataType::Int64 as i32, "{name}");
    let v = tensor::values_i128(t).unwrap().into_iter().map(|x| x as i64).collect();
    (t.dims.clone(), v)
}

fn const_f64(m: &Model, name: &str) -> (i32, Vec<i64>, Vec<f64>) {
    let t = &m.graph.constants[name].tensor;
    (t.data_type(), t.dims.clone(), tensor::values_f64(t).unwrap())
}

fn f32vi(name: &str, dims: &[i64]) -> ValueInfoProto {
    vi(name, DataType::Float, Some(dims))
}

#[test]
fn clip_attributes_become_typed_inputs_at_11() {
    let mut m = model(
        vec![
            node(
                "Clip",
                "clip",
                &["x"],
                &["y"],
                vec![float("min", 0.0), float("max", 6.0)],
            ),
            node("Clip", "", &["h"], &["z"], vec![float("max", 1.5)]),
        ],
        vec![f32vi("x", &[1, 4]), vi("h", DataType::Float16, Some(&[2]))],
        vec![f32vi("y", &[1, 4]), vi("z", DataType::Float16, Some(&[2]))],
        10,
    );
    let notes = upgrade_opset(&mut m, 11).unwrap();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert_eq!(find(&m, "clip").inputs, ["x", "clip::min", "clip::max"]);
    assert!(find(&m, "clip").attributes.is_empty());
    assert_eq!(const_f64(&m, "clip::min"), (DataType::Float as i32, vec![], vec![0.0]));
    assert_eq!(const_f64(&m, "clip::max"), (DataType::Float as i32, vec![], vec![6.0]));
    // Unnamed node: named after its output; max only, min omitted; f16 like the data.
    let half = m.graph.nodes.node_weights().find(|n| n.outputs == ["z"]).unwrap();
    assert_eq!(half.inputs, ["h", "", "z::max"]);
    assert_eq!(const_f64(&m, "z::max"), (DataType::Float16 as i32, vec![], vec![1.5]));
    assert_eq!(m.opset(""), Some(11));
    assert_eq!(m.header.ir_version, Some(6));
    m.graph.check().unwrap();
}

#[test]
fn clip_of_unknown_type_assumes_f32_and_says_so() {
    let mut m = model(
        vec![
            node("Custom", "c", &["x"], &["t"], vec![]),
            node("Clip", "clip", &["t"], &["y"], vec![float("min", -1.0)]),
        ],
        vec![f32vi("x", &[3])],
        vec![f32vi("y", &[3])],
        9,
    );
    m.graph.nodes.node_weights_mut().find(|n| n.name == "c").unwrap().domain = "custom".into();
    let notes = upgrade_opset(&mut m, 11).unwrap();
    assert!(notes[0].contains("f32 assumed"), "{notes:?}");
    assert_eq!(const_f64(&m, "clip::min").0, DataType::Float as i32);
}

#[test]
fn axes_and_split_become_inputs_at_13() {
    let mut m = model(
        vec![
            node("Squeeze", "sq", &["x"], &["s"], vec![ints("axes", &[0, 2])]),
            node("Unsqueeze", "unsq", &["s"], &["u"], vec![ints("axes", &[0])]),
            node(
                "Split",
                "split",
                &["u"],
                &["a", "b"],
                vec![int_attr("axis", 1), ints("split", &[1, 2])],
            ),
            node(
                "ReduceSum",
                "sum",
                &["a"],
                &["r"],
                vec![ints("axes", &[2]), int_attr("keepdims", 0)],
            ),
            node("ReduceMean", "mean", &["b"], &["m"], vec![ints("axes", &[1])]),
            node("Squeeze", "sq_all", &["m"], &["m2"], vec![]),
        ],
        vec![f32vi("x", &[1, 3, 1, 4])],
        vec![f32vi("r", &[1, 1]), f32vi("m2", &[4])],
        11,
    );
    let notes = upgrade_opset(&mut m, 13).unwrap();
    assert_eq!(notes.len(), 4, "{notes:?}");
    assert_eq!(find(&m, "sq").inputs, ["x", "sq::axes"]);
    assert_eq!(const_i64(&m, "sq::axes"), (vec![2], vec![0, 2]));
    assert_eq!(find(&m, "unsq").inputs, ["s", "unsq::axes"]);
    assert_eq!(const_i64(&m, "unsq::axes"), (vec![1], vec![0]));
    assert_eq!(find(&m, "split").inputs, ["u", "split::split"]);
    assert_eq!(const_i64(&m, "split::split"), (vec![2], vec![1, 2]));
    assert_eq!(find(&m, "split").attributes.len(), 1);
    assert_eq!(find(&m, "sum").inputs, ["a", "sum::axes"]);
    assert_eq!(find(&m, "sum").attribute("keepdims").unwrap().i(), 0);
    // ReduceMean keeps its attribute until 18; Squeeze without axes needs nothing.
    assert_eq!(find(&m, "mean").inputs, ["b"]);
    assert!(find(&m, "mean").attribute("axes").is_some());
    assert_eq!(find(&m, "sq_all").inputs, ["m"]);
    assert_eq!(m.header.ir_version, Some(7));
    m.graph.check().unwrap();

    // 13 → 18: ReduceMean's axes become an input, Split gets num_outputs only when it
    // has no split input (it has one here).
    let notes = upgrade_opset(&mut m, 18).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(find(&m, "mean").inputs, ["b", "mean::axes"]);
    assert_eq!(const_i64(&m, "mean::axes"), (vec![1], vec![1]));
    assert!(find(&m, "split").attribute("num_outputs").is_none());
    assert_eq!(m.header.ir_version, Some(8));
    m.graph.check().unwrap();
}

#[test]
fn reduce_mean_axes_move_at_18_not_before() {
    let mk = || {
        model(
            vec![node("ReduceMean", "mean", &["x"], &["y"], vec![ints("axes", &[-1])])],
            vec![f32vi("x", &[2, 3])],
            vec![f32vi("y", &[2, 1])],
            13,
        )
    };
    let mut m = mk();
    assert!(upgrade_opset(&mut m, 17).unwrap().is_empty());
    assert_eq!(find(&m, "mean").inputs, ["x"]);
    assert_eq!(m.opset(""), Some(17));
    let mut m = mk();
    assert_eq!(upgrade_opset(&mut m, 18).unwrap().len(), 1);
    assert_eq!(find(&m, "mean").inputs, ["x", "mean::axes"]);
    assert_eq!(const_i64(&m, "mean::axes"), (vec![1], vec![-1]));
}

#[test]
fn split_without_sizes_gets_num_outputs_at_18() {
    let mut m = model(
        vec![node("Split", "split", &["x"], &["a", "b"], vec![int_attr("axis", 0)])],
        vec![f32vi("x", &[4])],
        vec![f32vi("a", &[2]), f32vi("b", &[2])],
        13,
    );
    upgrade_opset(&mut m, 18).unwrap();
    assert_eq!(find(&m, "split").attribute("num_outputs").unwrap().i(), 2);
}

#[test]
fn slice_and_topk_attributes_become_inputs_at_10() {
    let mut m = model(
        vec![
            node(
                "Slice",
                "slice",
                &["x"],
                &["s"],
                vec![ints("starts", &[1]), ints("ends", &[i64::MAX]), ints("axes", &[1])],
            ),
            node("TopK", "topk", &["s"], &["v", "i"], vec![int_attr("k", 2)]),
        ],
        vec![f32vi("x", &[2, 5])],
        vec![f32vi("v", &[2, 2]), vi("i", DataType::Int64, Some(&[2, 2]))],
        9,
    );
    let notes = upgrade_opset(&mut m, 10).unwrap();
    assert_eq!(notes.len(), 2);
    assert_eq!(
        find(&m, "slice").inputs,
        ["x", "slice::starts", "slice::ends", "slice::axes"]
    );
    assert_eq!(const_i64(&m, "slice::ends"), (vec![1], vec![i64::MAX]));
    assert_eq!(find(&m, "topk").inputs, ["s", "topk::k"]);
    assert_eq!(const_i64(&m, "topk::k"), (vec![1], vec![2]));
    assert_eq!(m.header.ir_version, Some(5));
    m.graph.check().unwrap();
}

#[test]
fn pad_attributes_become_inputs_at_11() {
    let mut m = model(
        vec![
            node(
                "Pad",
                "pad",
                &["x"],
                &["p"],
                vec![ints("pads", &[0, 1, 0, 2]), float("value", 0.5)],
            ),
            node("Pad", "pad0", &["p"], &["q"], vec![ints("pads", &[1, 0, 1, 0])]),
        ],
        vec![f32vi("x", &[2, 2])],
        vec![f32vi("q", &[4, 5])],
        10,
    );
    upgrade_opset(&mut m, 11).unwrap();
    assert_eq!(find(&m, "pad").inputs, ["x", "pad::pads", "pad::constant_value"]);
    assert_eq!(
        const_f64(&m, "pad::constant_value"),
        (DataType::Float as i32, vec![], vec![0.5])
    );
    assert_eq!(find(&m, "pad0").inputs, ["p", "pad0::pads"]);
    m.graph.check().unwrap();
}

#[test]
fn softmax_on_the_last_axis_is_kept_and_others_are_wrapped() {
    let mut m = model(
        vec![
            node("Softmax", "last", &["x"], &["a"], vec![int_attr("axis", 2)]),
            node("LogSoftmax", "middle", &["x"], &["b"], vec![int_attr("axis", 1)]),
            node("Softmax", "default2d", &["f"], &["c"], vec![]),
            node("Softmax", "minus1", &["u"], &["d"], vec![int_attr("axis", -1)]),
            node("Hardmax", "unknown_rank", &["u"], &["e"], vec![int_attr("axis", 1)]),
        ],
        vec![
            f32vi("x", &[2, 3, 4]),
            f32vi("f", &[2, 3]),
            vi("u", DataType::Float, None),
        ],
        vec![
            f32vi("a", &[2, 3, 4]),
            f32vi("b", &[2, 3, 4]),
            f32vi("c", &[2, 3]),
            vi("d", DataType::Float, None),
            vi("e", DataType::Float, None),
        ],
        11,
    );
    let notes = upgrade_opset(&mut m, 13).unwrap();
    assert_eq!(notes.len(), 3, "{notes:?}");
    // Last axis: untouched.
    assert_eq!(find(&m, "last").inputs, ["x"]);
    assert_eq!(find(&m, "last").attribute("axis").unwrap().i(), 2);
    assert_eq!(find(&m, "minus1").inputs, ["u"]);
    // Default axis 1 on a rank-2 input: made explicit (the default became -1, same here).
    assert_eq!(find(&m, "default2d").attribute("axis").unwrap().i(), 1);
    // Not the last axis: Reshape(op(Flatten(x, 1), -1), Shape(x)), the output name kept.
    let mid = find(&m, "middle");
    assert_eq!(mid.inputs, ["middle::flattened"]);
    assert_eq!(mid.outputs, ["middle::2d"]);
    assert_eq!(mid.attribute("axis").unwrap().i(), -1);
    let flatten = find(&m, "middle::flatten");
    assert_eq!(
        (flatten.op_type.as_str(), flatten.inputs.as_slice()),
        ("Flatten", &["x".to_string()][..])
    );
    assert_eq!(flatten.attribute("axis").unwrap().i(), 1);
    let reshape = find(&m, "middle::reshape");
    assert_eq!(reshape.inputs, ["middle::2d", "middle::input_shape"]);
    assert_eq!(reshape.outputs, ["b"]);
    assert_eq!(find(&m, "middle::shape").op_type, "Shape");
    // Rank unknown and axis not -1: wrapped as well (exact whatever the rank).
    assert_eq!(find(&m, "unknown_rank").inputs, ["unknown_rank::flattened"]);
    assert!(notes
        .iter()
        .any(|n| n.contains("unknown_rank") && n.contains("rank unknown")));
    m.graph.check().unwrap();
}

#[test]
fn softmax_rank_is_inferred_through_shape_arithmetic() {
    // x → Shape → Slice [0:1] → Concat with [200] → Reshape: rank 2 (as in ppocr's head).
    let mut m = Model::from_proto(proto(
        vec![
            node("GlobalAveragePool", "gap", &["x"], &["p"], vec![]),
            node("Shape", "shape", &["p"], &["sh"], vec![]),
            node("Slice", "slice", &["sh", "zero", "one", "zero"], &["n"], vec![]),
            node("Concat", "cat", &["n", "c"], &["target"], vec![int_attr("axis", 0)]),
            node("Reshape", "reshape", &["p", "target"], &["r"], vec![]),
            node("Softmax", "softmax", &["r"], &["y"], vec![int_attr("axis", 1)]),
        ],
        vec![
            TensorProto {
                name: Some("zero".into()),
                ..i64_tensor(vec![1], &[0])
            },
            TensorProto {
                name: Some("one".into()),
                ..i64_tensor(vec![1], &[1])
            },
            TensorProto {
                name: Some("c".into()),
                ..i64_tensor(vec![1], &[200])
            },
        ],
        vec![f32vi("x", &[-1, 200, -1, -1])],
        vec![vi("y", DataType::Float, None)],
        11,
    ))
    .unwrap();
    let notes = upgrade_opset(&mut m, 13).unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(find(&m, "softmax").inputs, ["r"]);
    let facts = infer_facts(&m.graph, &HashMap::new()).unwrap();
    assert_eq!(facts["r"].shape, Some(vec![None, Some(200)]));
}

#[test]
fn created_names_are_deterministic_and_never_clash() {
    let mk = || {
        model(
            vec![
                node("Identity", "id", &["x"], &["clip::min"], vec![]),
                node("Clip", "clip", &["clip::min"], &["y"], vec![float("min", 0.0)]),
            ],
            vec![f32vi("x", &[2])],
            vec![f32vi("y", &[2])],
            10,
        )
    };
    let (mut a, mut b) = (mk(), mk());
    let notes = upgrade_opset(&mut a, 13).unwrap();
    assert_eq!(notes, upgrade_opset(&mut b, 13).unwrap());
    assert_eq!(find(&a, "clip").inputs, ["clip::min", "clip::min_1"]);
    assert_eq!(
        crate::onnx::model_bytes(&a).unwrap(),
        crate::onnx::model_bytes(&b).unwrap()
    );
    a.graph.check().unwrap();
}

#[test]
fn already_at_or_above_the_target_is_a_no_op() {
    let mk = || {
        model(
            vec![node("Unsqueeze", "u", &["x", "axes"], &["y"], vec![])],
            vec![f32vi("x", &[2]), vi("axes", DataType::Int64, Some(&[1]))],
            vec![f32vi("y", &[1, 2])],
            13,
        )
    };
    let mut m = mk();
    let before = crate::onnx::model_bytes(&m).unwrap();
    assert!(upgrade_opset(&mut m, 13).unwrap().is_empty());
    assert!(upgrade_opset(&mut m, 11).unwrap().is_empty());
    assert_eq!(crate::onnx::model_bytes(&m).unwrap(), before);
    assert!(convert_opset(&mut m, 13).unwrap().is_empty());
    assert_eq!(crate::onnx::model_bytes(&m).unwrap(), before);
}

#[test]
fn a_downgrade_is_refused() {
    let mut m = model(
        vec![node("Relu", "r", &["x"], &["y"], vec![])],
        vec![f32vi("x", &[2])],
        vec![f32vi("y", &[2])],
        13,
    );
    let e = convert_opset(&mut m, 11).unwrap_err().to_string();
    assert!(e.contains("downgrade") && e.contains("13") && e.contains("11"), "{e}");
    assert_eq!(m.opset(""), Some(13));
    assert!(convert_opset(&mut m, MAX_TARGET_OPSET + 1).is_err());
}

#[test]
fn refusals_name_the_node_and_leave_the_model_unchanged() {
    // A Dropout-7 mask that is read changes type (float → bool) at opset 10.
    let mut m = model(
        vec![
            node("Clip", "clip", &["x"], &["c"], vec![float("min", 0.0)]),
            node("Dropout", "drop", &["c"], &["d", "mask"], vec![]),
            node("Add", "add", &["d", "mask"], &["y"], vec![]),
        ],
        vec![f32vi("x", &[2])],
        vec![f32vi("y", &[2])],
        9,
    );
    let before = crate::onnx::model_bytes(&m).unwrap();
    let e = upgrade_opset(&mut m, 13).unwrap_err().to_string();
    assert!(e.contains("Dropout 'drop'") && e.contains("mask"), "{e}");
    assert_eq!(crate::onnx::model_bytes(&m).unwrap(), before);
    assert_eq!(m.opset(""), Some(9));
    assert!(m.graph.constants.is_empty());

    // Scan-8 has no opset-9 equivalent onnxq writes.
    let mut m = model(
        vec![node(
            "Scan",
            "scan",
            &["", "x"],
            &["y"],
            vec![int_attr("num_scan_inputs", 1)],
        )],
        vec![f32vi("x", &[1, 2])],
        vec![f32vi("y", &[1, 2])],
        8,
    );
    let e = upgrade_opset(&mut m, 9).unwrap_err().to_string();
    assert!(e.contains("Scan 'scan'") && e.contains("Scan-8"), "{e}");

    // BatchNormalization with spatial = 0.
    let mut m = model(
        vec![node(
            "BatchNormalization",
            "bn",
            &["x", "s", "b", "m", "v"],
            &["y"],
            vec![int_attr("spatial", 0)],
        )],
        vec![
            f32vi("x", &[1, 2, 3]),
            f32vi("s", &[2, 3]),
            f32vi("b", &[2, 3]),
            f32vi("m", &[2, 3]),
            f32vi("v", &[2, 3]),
        ],
        vec![f32vi("y", &[1, 2, 3])],
        7,
    );
    let e = upgrade_opset(&mut m, 13).unwrap_err().to_string();
    assert!(e.contains("BatchNormalization 'bn'") && e.contains("spatial"), "{e}");

    // Below opset 7.
    let mut m = model(vec![], vec![], vec![], 6);
    assert!(upgrade_opset(&mut m, 13).unwrap_err().to_string().contains("opset 7"));
}

#[test]
fn unused_training_outputs_are_dropped() {
    let mut m = model(
        vec![node(
            "BatchNormalization",
            "bn",
            &["x", "s", "b", "m", "v"],
            &["y", "", "", "saved_mean", ""],
            vec![int_attr("spatial", 1)],
        )],
        vec![
            f32vi("x", &[1, 2, 3]),
            f32vi("s", &[2]),
            f32vi("b", &[2]),
            f32vi("m", &[2]),
            f32vi("v", &[2]),
        ],
        vec![f32vi("y", &[1, 2, 3])],
        7,
    );
    let notes = upgrade_opset(&mut m, 15).unwrap();
    assert_eq!(find(&m, "bn").outputs, ["y"]);
    assert!(find(&m, "bn").attribute("spatial").is_none());
    assert!(
        notes[0].contains("spatial") && notes[0].contains("saved_mean"),
        "{notes:?}"
    );
}

#[test]
fn upsample_becomes_resize_with_its_old_semantics() {
    let mut m = model(
        vec![node(
            "Upsample",
            "up",
            &["x"],
            &["y"],
            vec![AttributeProto {
                name: Some("scales".into()),
                r#type: Some(AttributeType::Floats as i32),
                floats: vec![1.0, 1.0, 2.0, 2.0],
                ..Default::default()
            }],
        )],
        vec![f32vi("x", &[1, 1, 2, 2])],
        vec![f32vi("y", &[1, 1, 4, 4])],
        8,
    );
    let mut at11 = m.clone();
    upgrade_opset(&mut at11, 11).unwrap();
    let r = find(&at11, "up");
    assert_eq!(r.op_type, "Resize");
    assert_eq!(r.inputs, ["x", "up::roi", "up::scales"]);
    assert_eq!(const_f64(&at11, "up::roi"), (DataType::Float as i32, vec![0], vec![]));
    assert_eq!(r.attr_string("coordinate_transformation_mode").unwrap(), "asymmetric");
    assert_eq!(r.attr_string("nearest_mode").unwrap(), "floor");
    at11.graph.check().unwrap();
    // From 13 on roi is optional: left out.
    let notes = upgrade_opset(&mut m, 13).unwrap();
    assert_eq!(notes.len(), 1);
    assert_eq!(find(&m, "up").inputs, ["x", "", "up::scales"]);
    assert!(!m.graph.constants.contains_key("up::roi"));
}

#[test]
fn resize_10_that_may_downsample_with_nearest_is_refused() {
    let mut m = model(
        vec![node("Resize", "rs", &["x", "scales"], &["y"], vec![])],
        vec![f32vi("x", &[1, 1, 4, 4]), f32vi("scales", &[4])],
        vec![f32vi("y", &[1, 1, 2, 2])],
        10,
    );
    let e = upgrade_opset(&mut m, 11).unwrap_err().to_string();
    assert!(e.contains("Resize 'rs'"), "{e}");
}

#[test]
fn group_normalization_scale_and_bias_become_per_channel_at_21() {
    let mut m = Model::from_proto(proto(
        vec![node(
            "GroupNormalization",
            "gn",
            &["x", "s", "b"],
            &["y"],
            vec![int_attr("num_groups", 2)],
        )],
        vec![
            TensorProto {
                name: Some("s".into()),
                ..float_tensor(DataType::Float as i32, vec![2], &[1.0, 2.0])
            },
            TensorProto {
                name: Some("b".into()),
                ..float_tensor(DataType::Float as i32, vec![2], &[0.5, -0.5])
            },
        ],
        vec![f32vi("x", &[1, 4, 3])],
        vec![f32vi("y", &[1, 4, 3])],
        18,
    ))
    .unwrap();
    upgrade_opset(&mut m, 21).unwrap();
    assert_eq!(find(&m, "gn").inputs, ["x", "gn::scale", "gn::bias"]);
    assert_eq!(const_f64(&m, "gn::scale").2, [1.0, 1.0, 2.0, 2.0]);
    assert_eq!(const_f64(&m, "gn::bias").2, [0.5, 0.5, -0.5, -0.5]);
    // The per-group originals nothing reads any more are gone.
    assert!(!m.graph.constants.contains_key("s") && !m.graph.constants.contains_key("b"));
    assert_eq!(m.header.ir_version, Some(10));
    m.graph.check().unwrap();
}

#[test]
fn deprecated_group_normalization_is_refused_below_21() {
    let mut m = model(
        vec![node(
            "GroupNormalization",
            "gn",
            &["x", "s", "b"],
            &["y"],
            vec![int_attr("num_groups", 2)],
        )],
        vec![f32vi("x", &[1, 4, 3]), f32vi("s", &[2]), f32vi("b", &[2])],
        vec![f32vi("y", &[1, 4, 3])],
        18,
    );
    let e = upgrade_opset(&mut m, 20).unwrap_err().to_string();
    assert!(e.contains("GroupNormalization 'gn'") && e.contains("21"), "{e}");
    // Scale and bias are graph inputs: repeated in the graph.
    let notes = upgrade_opset(&mut m, 21).unwrap();
    assert_eq!(
        find(&m, "gn").inputs,
        ["x", "gn::scale_per_channel", "gn::bias_per_channel"]
    );
    assert!(notes[0].contains("in the graph"), "{notes:?}");
    m.graph.check().unwrap();
}

#[test]
fn a_refusal_late_in_the_graph_restores_what_earlier_conversions_changed() {
    // Resize drops its empty scales at 13 (the initializer goes), then a BatchNormalization
    // whose training output is read is refused at 14: everything comes back.
    let mut m = Model::from_proto(proto(
        vec![
            node("Resize", "rs", &["x", "roi", "scales", "sizes"], &["r"], vec![]),
            node(
                "BatchNormalization",
                "bn",
                &["r", "p", "p", "p", "p"],
                &["y", "running_mean"],
                vec![],
            ),
        ],
        vec![
            TensorProto {
                name: Some("roi".into()),
                ..float_tensor(DataType::Float as i32, vec![0], &[])
            },
            TensorProto {
                name: Some("scales".into()),
                ..float_tensor(DataType::Float as i32, vec![0], &[])
            },
            TensorProto {
                name: Some("sizes".into()),
                ..i64_tensor(vec![4], &[1, 1, 4, 4])
            },
            TensorProto {
                name: Some("p".into()),
                ..float_tensor(DataType::Float as i32, vec![1], &[1.0])
            },
        ],
        vec![f32vi("x", &[1, 1, 2, 2])],
        vec![f32vi("y", &[1, 1, 4, 4]), f32vi("running_mean", &[1])],
        11,
    ))
    .unwrap();
    let before = crate::onnx::model_bytes(&m).unwrap();
    let e = upgrade_opset(&mut m, 14).unwrap_err().to_string();
    assert!(
        e.contains("BatchNormalization 'bn'") && e.contains("running_mean"),
        "{e}"
    );
    assert_eq!(crate::onnx::model_bytes(&m).unwrap(), before);
    // At 13 the Resize conversion alone goes through.
    let notes = upgrade_opset(&mut m, 13).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(find(&m, "rs").inputs, ["x", "roi", "", "sizes"]);
    assert!(!m.graph.constants.contains_key("scales"));
    m.graph.check().unwrap();
}

#[test]
fn nodes_inside_subgraphs_are_converted() {
    let then_branch = GraphProto {
        name: Some("then".into()),
        node: vec![node("Unsqueeze", "inner", &["x"], &["t"], vec![ints("axes", &[0])])],
        output: vec![f32vi("t", &[1, 2])],
        ..Default::default()
    };
    let else_branch = GraphProto {
        name: Some("else".into()),
        node: vec![node("Identity", "same", &["x2"], &["e"], vec![])],
        output: vec![f32vi("e", &[1, 2])],
        ..Default::default()
    };
    let mut m = model(
        vec![
            node("Unsqueeze", "x2", &["x"], &["x2"], vec![ints("axes", &[0])]),
            node(
                "If",
                "if",
                &["cond"],
                &["y"],
                vec![
                    graph_attr("then_branch", then_branch),
                    graph_attr("else_branch", else_branch.clone()),
                ],
            ),
        ],
        vec![f32vi("x", &[2]), vi("cond", DataType::Bool, Some(&[]))],
        vec![f32vi("y", &[1, 2])],
        11,
    );
    let notes = upgrade_opset(&mut m, 13).unwrap();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("If 'if' / then_branch: Unsqueeze 'inner'")),
        "{notes:?}"
    );
    let node_if = find(&m, "if");
    let then = node_if.attribute("then_branch").unwrap().g.as_ref().unwrap();
    assert_eq!(then.node[0].input, ["x", "inner::axes"]);
    assert_eq!(then.initializer[0].name(), "inner::axes");
    // The untouched branch is kept as it was.
    assert_eq!(
        node_if.attribute("else_branch").unwrap().g.as_ref().unwrap(),
        &else_branch
    );
    m.graph.check().unwrap();
}

#[test]
fn dropout_ratio_and_dft_axis_become_inputs() {
    let mut m = model(
        vec![node("Dropout", "drop", &["x"], &["y"], vec![float("ratio", 0.25)])],
        vec![f32vi("x", &[2])],
        vec![f32vi("y", &[2])],
        9,
    );
    let notes = upgrade_opset(&mut m, 12).unwrap();
    assert_eq!(notes, ["Dropout 'drop': attribute ratio 0.25 → input 'drop::ratio'"]);
    assert_eq!(find(&m, "drop").inputs, ["x", "drop::ratio"]);
    assert_eq!(
        const_f64(&m, "drop::ratio"),
        (DataType::Float as i32, vec![], vec![0.25])
    );

    // DFT-17 without an axis attribute: its default, 1, becomes the input at 20.
    let mut m = model(
        vec![node("DFT", "dft", &["x"], &["y"], vec![])],
        vec![f32vi("x", &[1, 8, 1])],
        vec![f32vi("y", &[1, 8, 2])],
        17,
    );
    let notes = upgrade_opset(&mut m, 20).unwrap();
    assert_eq!(notes, ["DFT 'dft': attribute axis 1 → input 'dft::axis'"]);
    assert_eq!(find(&m, "dft").inputs, ["x", "", "dft::axis"]);
    assert_eq!(const_i64(&m, "dft::axis"), (vec![], vec![1]));
    m.graph.check().unwrap();
}
