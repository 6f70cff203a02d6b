//! Import → export is lossless and deterministic, on the shipped real models and on hand-made
//! graphs with the parts real models rarely have (subgraphs, functions, odd Constant forms).

mod common;

use common::*;
use onnxq::ir::Model;
use onnxq::onnx::{self, SaveOptions};
use onnxq::proto::tensor_proto::DataType;
use onnxq::proto::ModelProto;
use prost::Message;

fn shipped_models() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(repo("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    v.sort();
    assert!(v.len() >= 2, "models/ should ship at least two models");
    v
}

/// The original proto as onnxq should write it back: value_info with symbolic dims dropped.
fn expected_proto(mut original: ModelProto) -> ModelProto {
    let g = original.graph.as_mut().unwrap();
    g.value_info.retain(onnxq::ir::has_static_shape);
    original
}

#[test]
fn shipped_models_round_trip_exactly() {
    for path in shipped_models() {
        let bytes = std::fs::read(&path).unwrap();
        let original = ModelProto::decode(bytes.as_slice()).unwrap();
        let model = onnx::load_model(&path).unwrap();
        model.graph.check().unwrap();
        let exported = model.to_proto().unwrap();
        assert!(
            exported == expected_proto(original),
            "{}: the exported proto differs from the original",
            path.display()
        );
    }
}

#[test]
fn export_is_deterministic_and_idempotent() {
    for path in shipped_models() {
        let model = onnx::load_model(&path).unwrap();
        let first = onnx::model_bytes(&model).unwrap();
        assert_eq!(first, onnx::model_bytes(&model).unwrap());
        let again = Model::from_proto(ModelProto::decode(first.as_slice()).unwrap()).unwrap();
        assert_eq!(
            first,
            onnx::model_bytes(&again).unwrap(),
            "{}: re-import changes the bytes",
            path.display()
        );
        assert_eq!(model.to_string(), again.to_string());
    }
}

#[test]
fn constant_nodes_and_initializers_are_both_constants() {
    let ppocr = onnx::load_model(&repo("models/ppocr_mobile_v2_cls.onnx")).unwrap();
    let conv = ppocr.graph.nodes.node_weights().find(|n| n.op_type == "Conv").unwrap();
    let weight = &ppocr.graph.constants[&conv.inputs[1]];
    assert!(matches!(weight.origin, onnxq::ir::ConstantOrigin::ConstantNode { .. }));
    assert_eq!(weight.tensor.dims.len(), 4);
    assert!(ppocr.graph.nodes.node_weights().all(|n| n.op_type != "Constant"));

    let crepe = onnx::load_model(&repo("models/crepe_tiny.onnx")).unwrap();
    let w = &crepe.graph.constants["conv1.weight"];
    assert!(matches!(w.origin, onnxq::ir::ConstantOrigin::Initializer { .. }));
    assert_eq!(w.tensor.dims, vec![128, 1, 512, 1]);
}

/// An If whose branches read an outer tensor: the capture must order the If after its producer,
/// and the bodies come back untouched.
fn if_model() -> ModelProto {
    let then_branch = graph(
        vec![node("Add", "then_add", &["h", "h"], &["then_out"])],
        vec![],
        vec![],
        vec![value_info("then_out", DataType::Float, &[2])],
    );
    let else_branch = graph(
        vec![node("Neg", "else_neg", &["h"], &["else_out"])],
        vec![],
        vec![],
        vec![value_info("else_out", DataType::Float, &[2])],
    );
    let iff = with_attr(
        with_attr(
            node("If", "branch", &["cond"], &["y"]),
            attr_graph("then_branch", then_branch),
        ),
        attr_graph("else_branch", else_branch),
    );
    let value_floats = onnxq::proto::AttributeProto {
        name: Some("value_floats".into()),
        r#type: Some(onnxq::proto::attribute_proto::AttributeType::Floats as i32),
        floats: vec![0.5, 2.0],
        ..Default::default()
    };
    // Node order puts the If before the producer of `h` it captures: export must reorder.
    let nodes = vec![
        iff,
        with_attr(node("Constant", "k", &[], &["k"]), value_floats),
        node("Mul", "make_h", &["x", "k"], &["h"]),
    ];
    let mut g = graph(
        nodes,
        vec![],
        vec![
            value_info("cond", DataType::Bool, &[]),
            value_info("x", DataType::Float, &[2]),
        ],
        vec![value_info("y", DataType::Float, &[2])],
    );
    g.value_info.push(value_info("h", DataType::Float, &[-1]));
    g.value_info.push(value_info("y", DataType::Float, &[2]));
    let mut m = model(g, 17);
    m.metadata_props.push(onnxq::proto::StringStringEntryProto {
        key: Some("k".into()),
        value: Some("v".into()),
    });
    m.functions.push(onnxq::proto::FunctionProto {
        name: Some("Twice".into()),
        domain: Some("custom".into()),
        node: vec![node("Add", "", &["a", "a"], &["b"])],
        input: vec!["a".into()],
        output: vec!["b".into()],
        ..Default::default()
    });
    m
}

#[test]
fn subgraph_captures_order_the_export_and_bodies_survive() {
    let original = if_model();
    let model = Model::from_proto(original.clone()).unwrap();
    model.graph.check().unwrap();
    let iff = model.graph.nodes.node_weights().find(|n| n.op_type == "If").unwrap();
    assert_eq!(iff.implicit_inputs, vec!["h".to_string()]);
    let exported = model.to_proto().unwrap();
    let g = exported.graph.as_ref().unwrap();
    let names: Vec<&str> = g.node.iter().map(|n| n.name()).collect();
    assert_eq!(
        names,
        vec!["k", "make_h", "branch"],
        "the If must follow the producer of what it captures"
    );
    let original_g = original.graph.as_ref().unwrap();
    assert_eq!(
        g.node[2].attribute, original_g.node[0].attribute,
        "subgraph bodies change"
    );
    assert_eq!(
        g.node[0], original_g.node[1],
        "the Constant node (value_floats form) changes"
    );
    assert_eq!(exported.functions, original.functions);
    assert_eq!(exported.metadata_props, original.metadata_props);
    let kept: Vec<&str> = g.value_info.iter().map(|v| v.name()).collect();
    assert_eq!(kept, vec!["y"], "symbolic value_info must be dropped, static kept");
    let k = &model.graph.constants["k"].tensor;
    assert_eq!(onnxq::ir::tensor::values_f32(k), Some(vec![0.5, 2.0]));
}

#[test]
fn external_data_is_read_and_written() {
    let dir = tempfile::tempdir().unwrap();
    let weights = seeded(600, 7);
    let g = graph(
        vec![node("Add", "add", &["x", "w"], &["y"])],
        vec![tensor_f32("w", &[600], &weights)],
        vec![value_info("x", DataType::Float, &[600])],
        vec![value_info("y", DataType::Float, &[600])],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let path = dir.path().join("m.onnx");
    onnx::save_model(
        &model,
        &path,
        &SaveOptions {
            external_data_threshold: Some(1024),
        },
    )
    .unwrap();
    let data = std::fs::read(dir.path().join("m.onnx.data")).unwrap();
    assert_eq!(data.len(), 2400);
    let proto = ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    let w = &proto.graph.as_ref().unwrap().initializer[0];
    assert!(w.raw_data.is_none(), "the weight should live in the data file");
    assert_eq!(w.data_location, Some(1));

    let back = onnx::load_model(&path).unwrap();
    assert_eq!(
        onnxq::ir::tensor::values_f32(&back.graph.constants["w"].tensor).unwrap(),
        weights
    );
    assert_eq!(back.to_string(), model.to_string());

    // The weight stays in the data file: the IR knows where, not what.
    let w = &back.graph.constants["w"].tensor;
    assert!(w.raw_data.is_none());
    let (file, offset, length) = onnxq::ir::tensor::on_disk(w).expect("kept on disk");
    assert!(
        file.is_absolute() && file.ends_with("m.onnx.data"),
        "{}",
        file.display()
    );
    assert_eq!((offset, length), (0, 2400));

    // Saving inline again gives the original bytes, through the file writer too.
    assert_eq!(onnx::model_bytes(&back).unwrap(), onnx::model_bytes(&model).unwrap());
    let inline = dir.path().join("inline.onnx");
    onnx::save_model(&back, &inline, &SaveOptions::default()).unwrap();
    assert_eq!(std::fs::read(&inline).unwrap(), onnx::model_bytes(&model).unwrap());
    // And saving it external again copies the data file.
    let again = dir.path().join("again.onnx");
    onnx::save_model(
        &back,
        &again,
        &SaveOptions {
            external_data_threshold: Some(1024),
        },
    )
    .unwrap();
    assert_eq!(std::fs::read(dir.path().join("again.onnx.data")).unwrap(), data);
    // tract reads it from the file.
    assert_eq!(outputs(&back, &[600]), outputs(&model, &[600]));

    // A data file cut short is a clear error: when loading, and when a weight kept on disk is
    // read after the file changed.
    std::fs::write(dir.path().join("m.onnx.data"), &data[..100]).unwrap();
    let err = onnx::load_model(&path).unwrap_err().to_string();
    assert!(err.contains("past the end"), "{err}");
    let err = onnx::save_model(&back, &inline, &SaveOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("shorter than when it was read"), "{err}");
    let input = vec![("x".to_string(), tract_onnx::prelude::DatumType::F32, vec![600])];
    let err = onnxq::runtime::Runner::new(&back, &input, &[])
        .err()
        .expect("no weight to read")
        .to_string();
    assert!(err.contains("shorter than when it was read"), "{err}");
    assert_eq!(
        std::fs::read(&inline).unwrap(),
        onnx::model_bytes(&model).unwrap(),
        "the output is untouched"
    );
}

#[test]
fn a_changed_constant_node_is_written_with_its_new_value() {
    let mut model = onnx::load_model(&repo("models/ppocr_mobile_v2_cls.onnx")).unwrap();
    let conv = model.graph.nodes.node_weights().find(|n| n.op_type == "Conv").unwrap();
    let name = conv.inputs[1].clone();
    let mut t = model.graph.constants[&name].tensor.clone();
    let doubled: Vec<f32> = onnxq::ir::tensor::values_f32(&t)
        .unwrap()
        .iter()
        .map(|v| v * 2.0)
        .collect();
    t.raw_data = Some(doubled.iter().flat_map(|v| v.to_le_bytes()).collect());
    t.float_data.clear();
    model.graph.set_constant(&name, t).unwrap();
    let proto = model.to_proto().unwrap();
    let node = proto
        .graph
        .unwrap()
        .node
        .into_iter()
        .find(|n| n.output == [name.clone()])
        .unwrap();
    assert_eq!(node.op_type(), "Constant");
    let value = node.attribute[0].t.as_ref().unwrap();
    assert_eq!(node.attribute[0].name(), "value");
    assert_eq!(onnxq::ir::tensor::values_f32(value).unwrap(), doubled);
    assert!(model.graph.set_constant("no such weight", value.clone()).is_err());
}

#[test]
fn a_dangling_input_is_rejected_at_load() {
    let g = graph(
        vec![node("Add", "add", &["x", "ghost"], &["y"])],
        vec![],
        vec![value_info("x", DataType::Float, &[2])],
        vec![value_info("y", DataType::Float, &[2])],
    );
    let (_dir, path) = write_temp(&model(g, 17), "m.onnx");
    let err = onnx::load_model(&path).unwrap_err().to_string();
    assert!(err.contains("reads 'ghost', which nothing defines"), "{err}");
}
