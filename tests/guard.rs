//! The accuracy guard measures after the plan passes: the probe's variants carry the corrected
//! int32 biases when on and the float model's when off, and a layer raised to float gets the float
//! model's constants back.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use onnxq::ir::tensor::values_f32;
use onnxq::ir::Model;
use onnxq::passes::Context;
use onnxq::pipeline::DebugOptions;
use onnxq::quant::plan::Precision;
use onnxq::quant::probe::{sum_samples, Probe};
use tract_onnx::prelude::Tensor;

/// x [1, 2, 4, 4] → Conv conv1 (w1, b1) → c1 → Relu → r → Conv conv2 (w2, b2) → y.
fn two_convs() -> Model {
    let g = graph(
        vec![
            node("Conv", "conv1", &["x", "w1", "b1"], &["c1"]),
            node("Relu", "relu", &["c1"], &["r"]),
            node("Conv", "conv2", &["r", "w2", "b2"], &["y"]),
        ],
        vec![
            conv_weight("w1", &[3, 2, 1, 1], 1),
            tensor_f32("b1", &[3], &[0.1, -0.2, 0.3]),
            conv_weight("w2", &[2, 3, 1, 1], 2),
            tensor_f32("b2", &[2], &[0.05, -0.05]),
        ],
        vec![f32_info("x", &[1, 2, 4, 4])],
        vec![f32_info("y", &[1, 2, 4, 4])],
    );
    Model::from_proto(model(g, 17)).unwrap()
}

fn bias(m: &Model, name: &str) -> Vec<f32> {
    values_f32(&m.graph.constants[name].tensor).unwrap()
}

/// The model, context and data after calibrate, plan and correct_bias (the steps before the guard).
fn corrected(dir: &std::path::Path) -> (Model, Context) {
    let samples: Vec<Tensor> = (0..16)
        .map(|i| {
            let v: Vec<f32> = seeded(32, 100 + i).iter().map(|x| x * 3.0 + 0.5).collect();
            tract_onnx::prelude::tract_ndarray::Array4::from_shape_vec((1, 2, 4, 4), v)
                .unwrap()
                .into()
        })
        .collect();
    let data = write_x_calibration(dir, &samples);
    let config_path = dir.join("q.yaml");
    std::fs::write(
        &config_path,
        format!(
            "calibration: {{data: {:?}}}\npasses: [correct_bias]\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let config = onnxq::pipeline::config::Config::load(&config_path).unwrap();
    let files = onnxq::pipeline::JobFiles {
        config: config_path,
        ..Default::default()
    };
    let steps = onnxq::pipeline::before(onnxq::pipeline::steps(&config, &files), &["guard"]);
    assert_eq!(
        onnxq::pipeline::step_names(&steps),
        ["calibrate", "plan", "correct_bias"]
    );
    let mut m = two_convs();
    let mut ctx = Context::default();
    onnxq::pipeline::run(&mut m, &steps, &mut ctx, &DebugOptions::default()).unwrap();
    (m, ctx)
}

#[test]
fn switched_variants_compute_the_float_model_when_off_and_the_corrected_plan_when_on() {
    let dir = tempfile::tempdir().unwrap();
    let (prepared, ctx) = corrected(dir.path());
    let float = ctx.float_model.as_ref().expect("kept for the guard");
    assert_ne!(bias(&prepared, "b1"), bias(float, "b1"), "correct_bias changed a bias");
    let plan = ctx.plan.as_ref().unwrap();
    let source = ctx.calibration.as_ref().unwrap();
    let nothing = plan.restricted_to(&BTreeSet::new());

    let probe = Probe::against(float, &prepared, source, 4, onnxq::runtime::Engine::Tract).unwrap();
    // What a reference with the corrected biases would count as noise with nothing quantized.
    let shift = probe.noise(&nothing).unwrap();
    assert!(shift.iter().all(|&n| n > 0.0), "{shift:?}");
    let variants = probe.variants(plan).unwrap();
    // b1 (int32 in the plan) is switched back to the float bias; b2, which the plan leaves float,
    // stays corrected in every variant (what the switched model does not model): all off is the
    // float model but for b2's correction.
    assert!(plan.biases.contains_key("b1") && !plan.biases.contains_key("b2"));
    let off = sum_samples(&variants.sample_noise(&nothing).unwrap());
    let mut only_b2 = float.clone();
    only_b2
        .graph
        .constants
        .insert("b2".into(), prepared.graph.constants["b2"].clone());
    let b2_alone = Probe::against(float, &only_b2, source, 4, onnxq::runtime::Engine::Tract)
        .unwrap()
        .noise(&nothing)
        .unwrap();
    for ((o, b), s) in off.iter().zip(&b2_alone).zip(&shift) {
        assert!(
            (o - b).abs() <= 1e-3 * s,
            "all off: {o}, b2's correction alone: {b}, every correction: {s}"
        );
        assert!(o < &(0.5 * s));
    }
    let on = sum_samples(&variants.sample_noise(plan).unwrap());
    let exact = probe.noise(plan).unwrap();
    for (s, e) in on.iter().zip(&exact) {
        assert!(
            *e > 0.0 && (s - e).abs() <= 0.05 * e,
            "switched {s} against the written plan {e}"
        );
    }
}

#[test]
fn a_layer_raised_to_float_gets_the_float_models_constants_back() {
    let float = two_convs();
    let mut prepared = float.clone();
    // What correct_bias does: b1 corrected; conv2 gets a created bias of its own.
    let corrected = onnxq::ir::tensor::float_tensor(1, vec![3], &[0.11, -0.21, 0.31]);
    prepared.graph.constants.get_mut("b1").unwrap().tensor = onnxq::proto::TensorProto {
        name: Some("b1".into()),
        ..corrected
    };
    let created = onnxq::ir::tensor::float_tensor(1, vec![2], &[0.01, 0.02]);
    prepared.graph.constants.insert(
        "w2::bias".into(),
        onnxq::ir::Constant {
            tensor: onnxq::proto::TensorProto {
                name: Some("w2::bias".into()),
                ..created
            },
            origin: onnxq::ir::ConstantOrigin::Created,
        },
    );

    let conv2 = prepared
        .graph
        .nodes
        .node_weights_mut()
        .find(|n| n.name == "conv2")
        .unwrap();
    conv2.inputs[2] = "w2::bias".into();
    prepared.graph.rebuild_edges().unwrap();

    // Only conv1 in float: its bias is the float one again, conv2's created bias stays.
    let mut m = prepared.clone();
    let restored = onnxq::quant::guard::restore_float_layers(
        &mut m,
        &float,
        &BTreeMap::from([("c1".to_string(), Precision::Float)]),
    );
    assert_eq!(restored, ["b1"]);
    assert_eq!(bias(&m, "b1"), bias(&float, "b1"));
    assert_eq!(bias(&m, "w2::bias"), [0.01, 0.02]);

    // An int16 layer keeps its corrected bias (its weight is still int8).
    let mut m = prepared.clone();
    let restored = onnxq::quant::guard::restore_float_layers(
        &mut m,
        &float,
        &BTreeMap::from([("c1".to_string(), Precision::Int16)]),
    );
    assert!(restored.is_empty());
    assert_eq!(bias(&m, "b1"), [0.11, -0.21, 0.31]);

    // A bias the float model does not have becomes zeros.
    let mut m = prepared.clone();
    let restored = onnxq::quant::guard::restore_float_layers(
        &mut m,
        &float,
        &BTreeMap::from([("y".to_string(), Precision::Float)]),
    );
    assert_eq!(restored, ["w2::bias"]);
    assert_eq!(bias(&m, "w2::bias"), [0.0, 0.0]);
}
