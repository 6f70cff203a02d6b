//! Opset upgrade on the shipped real models: the upgraded model declares the new opset and IR
//! version, loads back through the validating loader, round-trips exactly, and computes the same
//! outputs in tract on the shipped eval data.
//!
//! Set `ONNXQ_WRITE_UPGRADED=<dir>` to keep the upgraded models (`<model>.opset<N>.onnx`) for
//! `tests/python/check_opset_upgrade.py` (ONNX checker and ONNX Runtime cross-check).

mod common;

use common::{max_relative_error, repo};
use onnxq::calib::data::{Dataset, InputSpec};
use onnxq::ir::Model;
use onnxq::onnx::{self, opset};
use onnxq::proto::ModelProto;
use onnxq::runtime::{to_f32_vec, Runner};
use prost::Message;

/// Every output of every eval sample, flattened per output.
fn outputs(model: &Model, data: &Dataset) -> Vec<Vec<f32>> {
    let bound = data.bind(&InputSpec::of_graph(&model.graph)).unwrap();
    let runner = Runner::new(model, &bound.sample_shapes(), &[]).unwrap();
    let per_sample = runner
        .run_all(
            bound.samples,
            |i| bound.sample(i),
            |_, outs| outs.iter().map(|t| to_f32_vec(t)).collect::<onnxq::Result<Vec<_>>>(),
        )
        .unwrap();
    (0..runner.outputs.len())
        .map(|o| per_sample.iter().flat_map(|s| s[o].iter().copied()).collect())
        .collect()
}

/// Upgrades `model` to each target and checks it against the original; returns the notes.
fn check_upgrade(model: &str, from: i64, targets: &[i64]) -> Vec<(i64, Vec<String>)> {
    let path = repo(&format!("models/{model}.onnx"));
    let original = onnx::load_model(&path).unwrap();
    assert_eq!(original.opset(""), Some(from), "{model}: shipped opset changed");
    let data = Dataset::load(&repo(&format!("models/{model}.eval.npz"))).unwrap();
    let want = outputs(&original, &data);
    let mut all_notes = Vec::new();
    for &target in targets {
        let mut m = original.clone();
        let notes = opset::upgrade_opset(&mut m, target).unwrap();
        assert_eq!(m.opset(""), Some(target));
        assert!(m.header.ir_version() >= opset::min_ir_version(target));
        m.graph.check().unwrap();

        // Written and read back: the loader's validation passes, and the bytes are stable.
        let bytes = onnx::model_bytes(&m).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let written = dir.path().join(format!("{model}.opset{target}.onnx"));
        onnx::save_model(&m, &written, &Default::default()).unwrap();
        let back = onnx::load_model(&written).unwrap();
        assert_eq!(
            onnx::model_bytes(&back).unwrap(),
            bytes,
            "{model} at {target}: round trip changes the bytes"
        );
        let decoded = Model::from_proto(ModelProto::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(onnx::model_bytes(&decoded).unwrap(), bytes);
        if let Ok(out) = std::env::var("ONNXQ_WRITE_UPGRADED") {
            std::fs::create_dir_all(&out).unwrap();
            std::fs::copy(&written, std::path::Path::new(&out).join(written.file_name().unwrap())).unwrap();
        }

        // Same outputs in tract.
        let got = outputs(&back, &data);
        assert_eq!(got.len(), want.len());
        for (o, (g, w)) in got.iter().zip(&want).enumerate() {
            let err = max_relative_error(g, w);
            assert!(
                err <= 1e-6,
                "{model} at opset {target}, output {o}: relative error {err:e}"
            );
        }
        // Upgrading again is a no-op.
        let mut again = back;
        assert!(opset::upgrade_opset(&mut again, target).unwrap().is_empty());
        assert_eq!(onnx::model_bytes(&again).unwrap(), bytes);
        all_notes.push((target, notes));
    }
    all_notes
}

#[test]
fn ppocr_upgrades_from_11_to_13_and_21_with_the_same_outputs() {
    let notes = check_upgrade("ppocr_mobile_v2_cls", 11, &[13, 21]);
    // Its Clip already takes min/max as inputs (opset 11) and its Softmax normalises axis 1 of
    // a rank-2 tensor (the rank comes from Shape → Slice → Concat → Reshape): the last axis, so
    // nothing needs converting.
    for (target, n) in &notes {
        assert!(n.is_empty(), "ppocr at {target}: {n:?}");
    }
    let mut m = onnx::load_model(&repo("models/ppocr_mobile_v2_cls.onnx")).unwrap();
    opset::upgrade_opset(&mut m, 13).unwrap();
    let softmax = m.graph.nodes.node_weights().find(|n| n.op_type == "Softmax").unwrap();
    assert_eq!(softmax.inputs, ["linear_1.tmp_1"]);
    assert_eq!(softmax.attribute("axis").unwrap().i(), 1);
    assert_eq!(m.header.ir_version(), 7);
    assert_eq!(
        m.graph.nodes.node_count(),
        onnx::load_model(&repo("models/ppocr_mobile_v2_cls.onnx"))
            .unwrap()
            .graph
            .nodes
            .node_count()
    );
}

#[test]
fn crepe_upgrades_from_17_to_21_with_the_same_outputs() {
    let notes = check_upgrade("crepe_tiny", 17, &[18, 21]);
    for (target, n) in &notes {
        assert!(n.is_empty(), "crepe at {target}: {n:?}");
    }
}

#[test]
fn a_softmax_that_needs_rewriting_computes_the_same_in_tract() {
    // ppocr's Softmax moved to a rank-3 view: [N, 200] → Reshape [N, 2, 100] → Softmax(axis 1)
    // normalises over 200 values at opset 11, so the opset-13 form must flatten around it.
    use onnxq::proto::tensor_proto::DataType;
    use onnxq::proto::{AttributeProto, NodeProto, TensorProto};
    let path = repo("models/ppocr_mobile_v2_cls.onnx");
    let mut proto = ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    let g = proto.graph.as_mut().unwrap();
    let reshape_to = TensorProto {
        name: Some("test::shape3".into()),
        dims: vec![3],
        data_type: Some(DataType::Int64 as i32),
        int64_data: vec![0, 2, -1],
        ..Default::default()
    };
    g.initializer.push(reshape_to);
    // Feed the pooled features, viewed as [N, 2, 100], to a Softmax over axis 1.
    let pos = g.node.iter().position(|n| n.op_type() == "Softmax").unwrap();
    g.node[pos].input = vec!["test::view".into()];
    g.node.insert(
        pos,
        NodeProto {
            op_type: Some("Reshape".into()),
            name: Some("test::view".into()),
            input: vec!["reshape2_0.tmp_0".into(), "test::shape3".into()],
            output: vec!["test::view".into()],
            ..Default::default()
        },
    );
    // The output is now [N, 2, 100]: drop its declared [N, 2] shape.
    if let Some(onnxq::proto::type_proto::Value::TensorType(t)) =
        g.output[0].r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape = None;
    }
    let softmax = g.node.iter_mut().find(|n| n.op_type() == "Softmax").unwrap();
    softmax.attribute = vec![AttributeProto {
        name: Some("axis".into()),
        r#type: Some(onnxq::proto::attribute_proto::AttributeType::Int as i32),
        i: Some(1),
        ..Default::default()
    }];
    let original = Model::from_proto(proto).unwrap();
    original.graph.check().unwrap();
    let data = Dataset::load(&repo("models/ppocr_mobile_v2_cls.eval.npz")).unwrap();
    let want = outputs(&original, &data);
    let mut m = original.clone();
    let notes = opset::upgrade_opset(&mut m, 13).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("Flatten"), "{notes:?}");
    let got = outputs(&m, &data);
    let err = max_relative_error(&got[0], &want[0]);
    assert!(err <= 1e-6, "relative error {err:e}");
    // Normalised over 200 values per sample, not 2: a per-axis softmax would give sums of 100.
    for sample in got[0].chunks(200) {
        let sum: f32 = sample.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "sum {sum}");
    }
}
