//! Verification: a model against itself is identical; a hand-made int8 QDQ model against its float
//! twin has the SQNR uniform rounding noise predicts, layer by layer; int16/int4 Q/DQ lowered for
//! tract computes exactly what ONNX specifies; thresholds fail and name the output.

mod common;

use std::path::Path;

use common::*;
use onnxq::calib::data::{DataArray, Dataset, InputSpec};
use onnxq::calib::source::DataSource;
use onnxq::ir::Model;
use onnxq::proto::tensor_proto::DataType;
use onnxq::proto::type_proto::Value;
use onnxq::proto::{ModelProto, NodeProto, TensorProto};
use onnxq::runtime::{to_f32_vec, Runner};
use onnxq::verify::{lower_all_qdq, lower_for_tract, verify, Comparison, VerifyOptions};
use tract_onnx::prelude::{IntoTValue, Tensor};

fn source_from_file(model: &Model, path: &Path) -> DataSource {
    let inputs = InputSpec::of_graph(&model.graph);
    let dataset = Dataset::load(path).unwrap();
    let samples = dataset.bind(&inputs).unwrap().samples;
    DataSource::Arrays {
        shards: vec![dataset],
        inputs,
        offsets: vec![0],
        samples,
    }
}

/// A data source of `samples` samples of shape `shape` for the input "x".
fn source_from_values(model: &Model, samples: usize, shape: &[usize], values: Vec<f32>) -> DataSource {
    let inputs = InputSpec::of_graph(&model.graph);
    let mut full = vec![samples];
    full.extend_from_slice(shape);
    let dataset = Dataset {
        path: "memory.npz".into(),
        arrays: vec![DataArray::new("x", Tensor::from_shape(&full, &values).unwrap())],
    };
    DataSource::Arrays {
        shards: vec![dataset],
        inputs,
        offsets: vec![0],
        samples,
    }
}

fn float_metrics(c: &Comparison) -> &onnxq::verify::FloatMetrics {
    match c {
        Comparison::Float(m) => m,
        other => panic!("expected a float comparison, got {other:?}"),
    }
}

#[test]
fn a_model_verified_against_itself_is_identical() {
    let m = onnxq::onnx::load_model(&repo("models/ppocr_mobile_v2_cls.onnx")).unwrap();
    let data = source_from_file(&m, &repo("models/ppocr_mobile_v2_cls.eval.npz"));
    let options = VerifyOptions {
        min_sqnr_db: Some(60.0),
        min_cosine: Some(0.9999),
        min_top1_agreement: Some(1.0),
        ..Default::default()
    };
    let report = verify(&m, &m, &data, &options).unwrap();
    assert_eq!(report.samples, 8);
    assert!(report.passed(), "{report}");
    assert_eq!(report.outputs.len(), 1);
    let out = &report.outputs[0];
    assert_eq!(out.shape, vec![1, 2]);
    let metrics = float_metrics(&out.comparison);
    assert_eq!(metrics.sqnr_db, f64::INFINITY);
    assert!(metrics.identical);
    assert_eq!(metrics.cosine, 1.0);
    assert_eq!(metrics.max_abs_err, 0.0);
    assert_eq!(metrics.top1_agreement, Some(1.0));
    assert_eq!(metrics.top1_rows, Some(8));
    // Every intermediate float tensor is compared, and identical.
    assert!(report.layers.len() > 20, "{} layers", report.layers.len());
    assert!(report.layers.iter().all(|l| l.identical), "{report}");
    assert!(report.layers.iter().any(|l| l.op_type == "Conv"));
    assert_eq!(report.first_drop, None);
    assert!(report.layers_note.is_none());
    assert!(report.lowering.is_empty());
    // +inf goes to JSON as f64::MAX, numerically comparable.
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["outputs"][0]["sqnr_db"].as_f64(), Some(f64::MAX));
    assert_eq!(json["outputs"][0]["kind"], "float");
    assert_eq!(json["passed"], true);
    // Results do not depend on the thread count.
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let serial = one.install(|| verify(&m, &m, &data, &options).unwrap());
    assert_eq!(
        serde_json::to_string(&serial).unwrap(),
        serde_json::to_string(&report).unwrap()
    );
}

const SCALE: f32 = 0.05;

fn scalar_f32(name: &str, v: f32) -> TensorProto {
    tensor_f32(name, &[], &[v])
}

fn int_tensor(name: &str, dt: DataType, dims: &[i64], values: &[i64]) -> TensorProto {
    let raw: Vec<u8> = match dt {
        DataType::Int8 => values.iter().map(|&v| v as i8 as u8).collect(),
        DataType::Uint8 => values.iter().map(|&v| v as u8).collect(),
        DataType::Int16 => values.iter().flat_map(|&v| (v as i16).to_le_bytes()).collect(),
        DataType::Uint16 => values.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect(),
        DataType::Int4 | DataType::Uint4 => values
            .chunks(2)
            .map(|c| (c[0] as u8 & 0xf) | ((c.get(1).copied().unwrap_or(0) as u8 & 0xf) << 4))
            .collect(),
        other => panic!("{other:?}"),
    };
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(dt as i32),
        raw_data: Some(raw.into()),
        ..Default::default()
    }
}

/// x → [Q(int8, 0.05) → DQ] → Relu → r → Mul(0.5) → out, with or without the Q/DQ pair.
fn relu_models(n: i64) -> (Model, Model) {
    let tail = vec![
        node("Relu", "relu", &["xin"], &["r"]),
        node("Mul", "half", &["r", "h"], &["out"]),
    ];
    let io = || {
        (
            vec![value_info("x", DataType::Float, &[1, n])],
            vec![value_info("out", DataType::Float, &[1, n])],
        )
    };
    let mut float_nodes = vec![node("Identity", "in", &["x"], &["xin"])];
    float_nodes.extend(tail.clone());
    let (i, o) = io();
    let float = graph(float_nodes, vec![scalar_f32("h", 0.5)], i, o);
    let mut quant_nodes = vec![
        node("QuantizeLinear", "q", &["x", "s", "zp"], &["x::q"]),
        node("DequantizeLinear", "dq", &["x::q", "s", "zp"], &["xin"]),
    ];
    quant_nodes.extend(tail);
    let (i, o) = io();
    let quant = graph(
        quant_nodes,
        vec![
            scalar_f32("h", 0.5),
            scalar_f32("s", SCALE),
            int_tensor("zp", DataType::Int8, &[], &[0]),
        ],
        i,
        o,
    );
    (
        Model::from_proto(model(float, 13)).unwrap(),
        Model::from_proto(model(quant, 13)).unwrap(),
    )
}

fn relu_setup() -> (Model, Model, DataSource, f64) {
    let (n, samples, a) = (1024usize, 8usize, 2.0f32);
    let (float, quant) = relu_models(n as i64);
    let values: Vec<f32> = seeded(n * samples, 7).into_iter().map(|v| v * a).collect();
    let data = source_from_values(&float, samples, &[1, n], values);
    // x uniform in [-a, a]. Where x > 0 the error of relu(dq(q(x))) is uniform rounding noise
    // (x in (0, s/2) rounds to 0: error x, same second moment s²/12); where x < 0 both are 0.
    // E[e²] = ½·s²/12, E[relu(x)²] = ½·a²/3, so SQNR = 10·log10(4a²/s²) (≈ 38.06 dB); the
    // Mul by 0.5 after it does not change it.
    let expected = 10.0 * (4.0 * (a as f64).powi(2) / (SCALE as f64).powi(2)).log10();
    (float, quant, data, expected)
}

#[test]
fn int8_qdq_has_the_sqnr_of_uniform_rounding_noise_layer_by_layer() {
    let (float, quant, data, expected) = relu_setup();
    assert!((expected - 38.06).abs() < 0.01);
    let report = verify(&float, &quant, &data, &VerifyOptions::default()).unwrap();
    assert!(report.passed());
    let out = float_metrics(&report.output("out").unwrap().comparison);
    assert!(
        (out.sqnr_db - expected).abs() < 0.3,
        "SQNR {} dB, expected {expected:.2} dB\n{report}",
        out.sqnr_db
    );
    assert!(!out.identical);
    // Error bounded by half a step (halved again by the Mul).
    assert!(out.max_abs_err <= SCALE as f64 / 4.0 + 1e-6, "{}", out.max_abs_err);
    assert!(out.max_abs_err > SCALE as f64 / 8.0);
    // Cosine ≈ 1 − noise/(2·signal) = 1 − 10^(−SQNR/10)/2.
    let predicted_cos = 1.0 - 10f64.powf(-expected / 10.0) / 2.0;
    assert!(
        (out.cosine - predicted_cos).abs() < 1e-4,
        "{} vs {predicted_cos}",
        out.cosine
    );
    // Layers: the float tensors the quantized model also produces, in topological order; the
    // Q/DQ names are not matched, the Identity output `xin` is produced by the DQ in the
    // quantized model (same name, a node output in both) and carries the rounding noise of x.
    let names: Vec<&str> = report.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["xin", "r", "out"], "{report}");
    let relu = report.layer("r").unwrap();
    assert_eq!(relu.op_type, "Relu");
    assert!((relu.sqnr_db - expected).abs() < 0.3, "{}", relu.sqnr_db);
    // Before the Relu the noise is uniform everywhere: 10·log10((a²/3)/(s²/12)) = 10·log10(4a²/s²) too.
    assert!((report.layer("xin").unwrap().sqnr_db - expected).abs() < 0.3);
    assert_eq!(report.first_drop, None);
    let text = report.to_string();
    assert!(text.contains("out") && text.contains("Relu"), "{text}");

    // First drop: the first layer in topological order below the floor.
    let strict = VerifyOptions {
        layer_floor_db: 40.0,
        ..Default::default()
    };
    let report = verify(&float, &quant, &data, &strict).unwrap();
    assert_eq!(report.first_drop.as_deref(), Some("xin"));
    assert!(
        report.to_string().contains("first below 40 dB: xin (Identity)"),
        "{report}"
    );
    // Per-layer comparison off.
    let off = VerifyOptions {
        per_layer: false,
        ..Default::default()
    };
    assert!(verify(&float, &quant, &data, &off).unwrap().layers.is_empty());
}

#[test]
fn thresholds_fail_and_name_the_output() {
    let (float, quant, data, expected) = relu_setup();
    let failing = VerifyOptions {
        min_sqnr_db: Some(expected + 5.0),
        min_cosine: Some(0.99),
        ..Default::default()
    };
    let report = verify(&float, &quant, &data, &failing).unwrap();
    assert!(!report.passed());
    assert_eq!(report.failures().len(), 1, "{:?}", report.failures());
    assert_eq!(report.failures()[0].output, "out");
    assert_eq!(report.failures()[0].metric, "sqnr_db");
    let err = report.to_error().unwrap();
    assert_eq!(err.exit_code(), 3);
    assert!(err.to_string().contains("'out'"), "{err}");
    assert!(report.to_string().contains("FAILED"), "{report}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["passed"], false);
    assert_eq!(json["failures"][0]["output"], "out");

    let cosine = VerifyOptions {
        min_cosine: Some(0.999999),
        ..Default::default()
    };
    let report = verify(&float, &quant, &data, &cosine).unwrap();
    assert_eq!(report.failures()[0].metric, "cosine");

    let passing = VerifyOptions {
        min_sqnr_db: Some(expected - 2.0),
        min_cosine: Some(0.999),
        ..Default::default()
    };
    let report = verify(&float, &quant, &data, &passing).unwrap();
    assert!(report.passed(), "{report}");
    assert!(report.to_error().is_none());
}

#[test]
fn integer_outputs_are_compared_for_equality() {
    // out = ArgMax(x) as int64; the quantized twin quantizes x to int8 first.
    let n = 16i64;
    let argmax = |input: &str| {
        let mut a = node("ArgMax", "argmax", &[input], &["idx"]);
        a.attribute.push(attr_int("axis", 1));
        a
    };
    let io = || {
        (
            vec![value_info("x", DataType::Float, &[1, n])],
            vec![value_info("idx", DataType::Int64, &[1, 1])],
        )
    };
    let (i, o) = io();
    let float = Model::from_proto(model(graph(vec![argmax("x")], vec![], i, o), 13)).unwrap();
    let (i, o) = io();
    let quant = graph(
        vec![
            node("QuantizeLinear", "q", &["x", "s", "zp"], &["x::q"]),
            node("DequantizeLinear", "dq", &["x::q", "s", "zp"], &["x::dq"]),
            argmax("x::dq"),
        ],
        vec![scalar_f32("s", 0.5), int_tensor("zp", DataType::Int8, &[], &[0])],
        i,
        o,
    );
    let quant = Model::from_proto(model(quant, 13)).unwrap();
    // Sample 0: clear winner; sample 1: 1.1 vs 1.2 both round to 1.0, argmax goes to the first.
    let mut values = vec![0f32; 2 * n as usize];
    values[3] = 5.0;
    values[n as usize + 2] = 1.1;
    values[n as usize + 5] = 1.2;
    let data = source_from_values(&float, 2, &[1, n as usize], values);
    let options = VerifyOptions {
        min_equal_fraction: Some(1.0),
        ..Default::default()
    };
    let report = verify(&float, &quant, &data, &options).unwrap();
    let out = report.output("idx").unwrap();
    assert_eq!(out.dtype, "i64");
    match &out.comparison {
        Comparison::Integer(m) => {
            assert_eq!(m.equal_fraction, 0.5);
            assert_eq!(m.samples_equal, 1);
        }
        other => panic!("{other:?}"),
    }
    assert!(!report.passed());
    assert_eq!(report.failures()[0].metric, "equal_fraction");
    assert!(report.to_string().contains("50.00% of elements equal"), "{report}");
}

// ---- Lowering -------------------------------------------------------------------------------

/// ONNX QuantizeLinear then DequantizeLinear, by hand: f32 division, round half to even.
fn fake_quant(x: f32, s: f32, zp: i64, lo: f32, hi: f32) -> f32 {
    let q = ((x / s).round_ties_even() + zp as f32).clamp(lo, hi);
    (q - zp as f32) * s
}

fn run_single(m: &Model, shape: &[usize], x: &[f32]) -> Vec<f32> {
    let runner = Runner::new(
        m,
        &[("x".into(), tract_onnx::prelude::DatumType::F32, shape.to_vec())],
        &[],
    )
    .unwrap();
    let out = runner
        .run(vec![Tensor::from_shape(shape, x).unwrap().into_tvalue()])
        .unwrap();
    to_f32_vec(&out[0]).unwrap()
}

fn qdq_model(dt: DataType, s: f32, zp: i64, n: i64, opset: i64) -> ModelProto {
    let g = graph(
        vec![
            node("QuantizeLinear", "q", &["x", "s", "zp"], &["x::q"]),
            node("DequantizeLinear", "dq", &["x::q", "s", "zp"], &["y"]),
        ],
        vec![scalar_f32("s", s), int_tensor("zp", dt, &[], &[zp])],
        vec![value_info("x", DataType::Float, &[1, n])],
        vec![value_info("y", DataType::Float, &[1, n])],
    );
    model(g, opset)
}

#[test]
fn int16_qdq_lowered_for_tract_is_exact_fake_quantization() {
    let n = 6000usize;
    let s = 0.0013f32;
    // Near-ties ((k + ½)·s rounded to f32) where x·(1/s) and x/s round differently, random
    // values, and values beyond the int16 range (clipped).
    let mut x: Vec<f32> = (0..2000).map(|k| ((k as f32 - 1000.0) + 0.5) * s).collect();
    x.extend(seeded(3000, 11).into_iter().map(|v| v * 30.0));
    x.extend(seeded(1000, 12).into_iter().map(|v| v * 80.0));
    assert_eq!(x.len(), n);
    // The data tells division from multiplication by the reciprocal (what tract does for Div).
    let recip = 1.0 / s;
    let differ = x
        .iter()
        .filter(|&&v| (v / s).round_ties_even() != (v * recip).round_ties_even())
        .count();
    assert!(differ > 0, "test data does not exercise the division");
    for (dt, zp, lo, hi) in [
        (DataType::Int16, 3i64, -32768.0f32, 32767.0f32),
        (DataType::Uint16, 30000, 0.0, 65535.0),
    ] {
        let proto = qdq_model(dt, s, zp, n as i64, 21);
        let m = Model::from_proto(proto).unwrap();
        // tract cannot run it as is.
        assert!(Runner::new(
            &m,
            &[("x".into(), tract_onnx::prelude::DatumType::F32, vec![1, n])],
            &[]
        )
        .is_err());
        let lowered = lower_for_tract(&m).unwrap();
        lowered.graph.check().unwrap();
        let ops: Vec<&str> = lowered.graph.nodes.node_weights().map(|n| n.op_type.as_str()).collect();
        assert!(
            !ops.contains(&"QuantizeLinear") && !ops.contains(&"DequantizeLinear"),
            "{ops:?}"
        );
        // New names show where they come from.
        for n in lowered.graph.nodes.node_weights() {
            let o = &n.outputs[0];
            assert!(
                o == "y" || o.starts_with("x::q::lowered_") || o.starts_with("y::lowered_"),
                "{o}"
            );
        }
        let got = run_single(&lowered, &[1, n], &x);
        let mismatches: Vec<(f32, f32, f32)> = x
            .iter()
            .zip(&got)
            .map(|(&v, &g)| (v, g, fake_quant(v, s, zp, lo, hi)))
            .filter(|(_, g, w)| g.to_bits() != w.to_bits())
            .collect();
        assert!(
            mismatches.is_empty(),
            "{dt:?}: {} mismatches, first {:?}",
            mismatches.len(),
            &mismatches[..mismatches.len().min(5)]
        );
        // Clipping happened.
        assert!(got.contains(&((hi - zp as f32) * s)));
    }
}

#[test]
fn exact_ties_round_half_to_even() {
    let s = 0.25f32;
    let x = [0.125f32, 0.375, -0.125, -0.375, 0.625, 1.0, -1000.0, 1e4];
    let m = Model::from_proto(qdq_model(DataType::Int16, s, 0, x.len() as i64, 21)).unwrap();
    let got = run_single(&lower_for_tract(&m).unwrap(), &[1, x.len()], &x);
    assert_eq!(got, vec![0.0, 0.5, 0.0, -0.5, 0.5, 1.0, -1000.0, 8191.75]);
}

#[test]
fn int8_qdq_is_left_to_tract() {
    let m = Model::from_proto(qdq_model(DataType::Int8, 0.1, 0, 4, 13)).unwrap();
    let lowered = lower_for_tract(&m).unwrap();
    let ops: Vec<&str> = lowered.graph.nodes.node_weights().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops.len(), 2);
    assert!(ops.contains(&"QuantizeLinear") && ops.contains(&"DequantizeLinear"));
}

fn with(mut n: NodeProto, attrs: &[(&str, i64)]) -> NodeProto {
    for (k, v) in attrs {
        n.attribute.push(attr_int(k, *v));
    }
    n
}

#[test]
fn per_axis_int16_activation_uses_the_declared_rank() {
    // x [1, 3, 4], per-channel along axis 1.
    let scales = [0.01f32, 0.1, 0.003];
    let zps = [0i64, -7, 100];
    let g = graph(
        vec![
            with(
                node("QuantizeLinear", "q", &["x", "s", "zp"], &["x::q"]),
                &[("axis", 1)],
            ),
            with(
                node("DequantizeLinear", "dq", &["x::q", "s", "zp"], &["y"]),
                &[("axis", 1)],
            ),
        ],
        vec![
            tensor_f32("s", &[3], &scales),
            int_tensor("zp", DataType::Int16, &[3], &zps),
        ],
        vec![value_info("x", DataType::Float, &[1, 3, 4])],
        vec![value_info("y", DataType::Float, &[1, 3, 4])],
    );
    let m = Model::from_proto(model(g, 21)).unwrap();
    let lowered = lower_for_tract(&m).unwrap();
    assert_eq!(lowered.graph.constants["x::q::lowered_scale"].tensor.dims, vec![3, 1]);
    let x: Vec<f32> = seeded(12, 3).into_iter().map(|v| v * 50.0).collect();
    let got = run_single(&lowered, &[1, 3, 4], &x);
    for (i, (&v, &g)) in x.iter().zip(&got).enumerate() {
        let c = i / 4;
        assert_eq!(
            g.to_bits(),
            fake_quant(v, scales[c], zps[c], -32768.0, 32767.0).to_bits(),
            "element {i}"
        );
    }

    // The same without a declared rank is refused with a clear error.
    let mut unknown = m.clone();
    for v in unknown.graph.inputs.iter_mut().chain(unknown.graph.outputs.iter_mut()) {
        if let Some(Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
            t.shape = None;
        }
    }
    let err = lower_for_tract(&unknown).unwrap_err().to_string();
    assert!(err.contains("rank") && err.contains("'q'"), "{err}");
}

#[test]
fn quantized_weights_are_folded_to_float_constants() {
    // y = x + DQ(w): int16 per-axis (axis 0) and int4 blocked (blocks of 2 along axis 1).
    let w16 = [1i64, -2, 300, -32768, 32767, 5];
    let s16 = [0.5f32, 0.0021];
    let z16 = [3i64, -1];
    let w4 = [-8i64, 7, 1, -1, 0, 3, -4, 2];
    let s4 = [0.5f32, 2.0, 0.25, 0.125]; // [2, 2]: rows × blocks
    let g = graph(
        vec![
            with(
                node("DequantizeLinear", "dq16", &["w16", "s16", "z16"], &["w16::dq"]),
                &[("axis", 0)],
            ),
            node("Add", "add16", &["x", "w16::dq"], &["y16"]),
            with(
                node("DequantizeLinear", "dq4", &["w4", "s4"], &["w4::dq"]),
                &[("axis", 1), ("block_size", 2)],
            ),
            node("Add", "add4", &["x4", "w4::dq"], &["y4"]),
        ],
        vec![
            int_tensor("w16", DataType::Int16, &[2, 3], &w16),
            tensor_f32("s16", &[2], &s16),
            int_tensor("z16", DataType::Int16, &[2], &z16),
            int_tensor("w4", DataType::Int4, &[2, 4], &w4),
            tensor_f32("s4", &[2, 2], &s4),
        ],
        vec![
            value_info("x", DataType::Float, &[2, 3]),
            value_info("x4", DataType::Float, &[2, 4]),
        ],
        vec![
            value_info("y16", DataType::Float, &[2, 3]),
            value_info("y4", DataType::Float, &[2, 4]),
        ],
    );
    let m = Model::from_proto(model(g, 21)).unwrap();
    let lowered = lower_for_tract(&m).unwrap();
    let values = |name: &str| onnxq::ir::tensor::values_f32(&lowered.graph.constants[name].tensor).unwrap();
    let want16: Vec<f32> = w16
        .iter()
        .enumerate()
        .map(|(i, &q)| (q - z16[i / 3]) as f32 * s16[i / 3])
        .collect();
    assert_eq!(values("w16::dq"), want16);
    assert_eq!(lowered.graph.constants["w16::dq"].tensor.dims, vec![2, 3]);
    let want4: Vec<f32> = w4
        .iter()
        .enumerate()
        .map(|(i, &q)| q as f32 * s4[(i / 4) * 2 + (i % 4) / 2])
        .collect();
    assert_eq!(values("w4::dq"), want4);
    assert_eq!(want4[..4], [-4.0, 3.5, 2.0, -2.0]);
    // The quantized originals are gone (tract would not parse int4).
    assert!(!lowered.graph.constants.contains_key("w4") && !lowered.graph.constants.contains_key("w16"));
    // And tract runs it.
    let runner = Runner::new(
        &lowered,
        &[
            ("x".into(), tract_onnx::prelude::DatumType::F32, vec![2, 3]),
            ("x4".into(), tract_onnx::prelude::DatumType::F32, vec![2, 4]),
        ],
        &[],
    )
    .unwrap();
    let out = runner
        .run(vec![
            Tensor::from_shape(&[2, 3], &[0f32; 6]).unwrap().into_tvalue(),
            Tensor::from_shape(&[2, 4], &[1f32; 8]).unwrap().into_tvalue(),
        ])
        .unwrap();
    assert_eq!(to_f32_vec(&out[0]).unwrap(), want16);
    assert_eq!(
        to_f32_vec(&out[1]).unwrap(),
        want4.iter().map(|v| v + 1.0).collect::<Vec<_>>()
    );
}

#[test]
fn verify_lowers_an_int16_model_itself() {
    // Float twin: y = Identity(x); quantized: int16 Q/DQ. SQNR of int16 with a range covering
    // the data: uniform noise s²/12 against a²/3 → 10·log10(4a²/s²).
    let n = 512usize;
    let s = 0.0002f32;
    let float = graph(
        vec![node("Identity", "id", &["x"], &["y"])],
        vec![],
        vec![value_info("x", DataType::Float, &[1, n as i64])],
        vec![value_info("y", DataType::Float, &[1, n as i64])],
    );
    let float = Model::from_proto(model(float, 21)).unwrap();
    let quant = Model::from_proto(qdq_model(DataType::Int16, s, 0, n as i64, 21)).unwrap();
    let data = source_from_values(&float, 4, &[1, n], seeded(4 * n, 5));
    let report = verify(&float, &quant, &data, &VerifyOptions::default()).unwrap();
    assert_eq!(report.lowering.len(), 2, "{:?}", report.lowering);
    let m = float_metrics(&report.output("y").unwrap().comparison);
    let expected = 10.0 * (4.0f64 / (s as f64).powi(2)).log10();
    assert!((m.sqnr_db - expected).abs() < 0.5, "{} vs {expected}", m.sqnr_db);
    assert!(report.to_string().contains("rewritten as exact float arithmetic"));
}

#[test]
fn all_qdq_lowered_is_exact_fake_quantization() {
    // x → Q/DQ(int8, zp 5) → MatMul with an int8 per-column weight (DQ of a constant) → y.
    let n = 64usize;
    let s = 0.013f32;
    let (ws, wz) = ([0.02f32, 0.5], [0i64, -3]);
    let w: Vec<i64> = (0..n as i64 * 2).map(|i| (i * 37 % 255) - 127).collect();
    let g = graph(
        vec![
            node("QuantizeLinear", "q", &["x", "s", "zp"], &["x::q"]),
            node("DequantizeLinear", "dq", &["x::q", "s", "zp"], &["x::dq"]),
            with(
                node("DequantizeLinear", "wdq", &["w", "ws", "wz"], &["w::dq"]),
                &[("axis", 1)],
            ),
            node("MatMul", "mm", &["x::dq", "w::dq"], &["y"]),
        ],
        vec![
            scalar_f32("s", s),
            int_tensor("zp", DataType::Int8, &[], &[5]),
            int_tensor("w", DataType::Int8, &[n as i64, 2], &w),
            tensor_f32("ws", &[2], &ws),
            int_tensor("wz", DataType::Int8, &[2], &wz),
        ],
        vec![value_info("x", DataType::Float, &[1, n as i64])],
        vec![value_info("y", DataType::Float, &[1, 2])],
    );
    let m = Model::from_proto(model(g, 13)).unwrap();
    // lower_for_tract leaves int8 alone; lower_all_qdq rewrites every Q/DQ.
    assert_eq!(lower_for_tract(&m).unwrap().graph.nodes.node_count(), 4);
    let lowered = lower_all_qdq(&m).unwrap();
    let ops: Vec<&str> = lowered.graph.nodes.node_weights().map(|n| n.op_type.as_str()).collect();
    assert!(!ops.iter().any(|o| o.contains("Quantize")), "{ops:?}");
    let wf = onnxq::ir::tensor::values_f32(&lowered.graph.constants["w::dq"].tensor).unwrap();
    let want_w: Vec<f32> = w
        .iter()
        .enumerate()
        .map(|(i, &q)| (q - wz[i % 2]) as f32 * ws[i % 2])
        .collect();
    assert_eq!(wf, want_w);
    // Near-ties and clipping on the activation.
    let x: Vec<f32> = (0..n).map(|k| ((k as f32 - 20.0) * 3.0 + 0.5) * s).collect();
    let got = run_single(&lowered, &[1, n], &x);
    let xq: Vec<f32> = x.iter().map(|&v| fake_quant(v, s, 5, -128.0, 127.0)).collect();
    assert!(xq.contains(&((127.0 - 5.0) * s)), "clipping not exercised");
    let want: Vec<f32> = (0..2)
        .map(|c| (0..n).map(|k| xq[k] as f64 * want_w[k * 2 + c] as f64).sum::<f64>() as f32)
        .collect();
    for c in 0..2 {
        assert!(
            (got[c] - want[c]).abs() <= 1e-4 * want[c].abs().max(1.0),
            "{got:?} vs {want:?}"
        );
    }
}

/// x → DQ(Q(x)) → Softmax → Q(int8, scale 1/255, zp −128) → DQ → y, and its float twin.
fn softmax_models() -> (Model, Model) {
    let io = || {
        (
            vec![value_info("x", DataType::Float, &[1, 4])],
            vec![value_info("y", DataType::Float, &[1, 4])],
        )
    };
    let (i, o) = io();
    let float = graph(
        vec![with(node("Softmax", "sm", &["x"], &["y"]), &[("axis", 1)])],
        vec![],
        i,
        o,
    );
    let (i, o) = io();
    let quant = graph(
        vec![
            node("QuantizeLinear", "q0", &["x", "s0", "z0"], &["x::q"]),
            node("DequantizeLinear", "dq0", &["x::q", "s0", "z0"], &["x::dq"]),
            with(node("Softmax", "sm", &["x::dq"], &["p"]), &[("axis", 1)]),
            node("QuantizeLinear", "q1", &["p", "s1", "z1"], &["p::q"]),
            node("DequantizeLinear", "dq1", &["p::q", "s1", "z1"], &["y"]),
        ],
        vec![
            scalar_f32("s0", 0.05),
            int_tensor("z0", DataType::Int8, &[], &[3]),
            scalar_f32("s1", 1.0 / 255.0),
            int_tensor("z1", DataType::Int8, &[], &[-128]),
        ],
        i,
        o,
    );
    (
        Model::from_proto(model(float, 13)).unwrap(),
        Model::from_proto(model(quant, 13)).unwrap(),
    )
}

#[test]
fn verification_does_not_depend_on_tract_quantized_kernels() {
    let (float, quant) = softmax_models();
    let data = source_from_values(
        &float,
        16,
        &[1, 4],
        seeded(64, 9).into_iter().map(|v| v * 3.0).collect(),
    );
    let report = verify(&float, &quant, &data, &VerifyOptions::default()).unwrap();
    let m = float_metrics(&report.output("y").unwrap().comparison);
    // Softmax outputs in [0, 1] with steps of 1/255 and inputs with steps of 0.05: ~35 dB.
    assert!(m.sqnr_db > 30.0, "{report}");
    assert_eq!(m.top1_agreement, Some(1.0));
    // tract 0.23.9's own kernels fuse DQ → Softmax → Q into a quantized softmax that ignores
    // the output zero point (every probability comes out as 1.0). If this starts failing after
    // a tract upgrade, the bug is fixed: reconsider the default of `tract_quantized_kernels`.
    let kernels = VerifyOptions {
        tract_quantized_kernels: true,
        ..Default::default()
    };
    let report = verify(&float, &quant, &data, &kernels).unwrap();
    let m = float_metrics(&report.output("y").unwrap().comparison);
    assert!(m.sqnr_db < 10.0, "{report}");
}

#[test]
fn a_quantized_layer_is_compared_through_its_q_dq_pair() {
    // Float: x → Relu → r → Mul(0.5) → out. Quantized the way ONNX Runtime's QDQ quantizer
    // writes it: the Relu is gone, the tensor keeps the name `r` (here from an Identity) and a
    // uint8 Q with zero point 0 clips the negatives in its place.
    let n = 256i64;
    let io = || {
        (
            vec![value_info("x", DataType::Float, &[1, n])],
            vec![value_info("out", DataType::Float, &[1, n])],
        )
    };
    let (i, o) = io();
    let float = graph(
        vec![
            node("Relu", "relu", &["x"], &["r"]),
            node("Mul", "half", &["r", "h"], &["out"]),
        ],
        vec![scalar_f32("h", 0.5)],
        i,
        o,
    );
    let (i, o) = io();
    let quant = graph(
        vec![
            node("Identity", "pre", &["x"], &["r"]),
            node("QuantizeLinear", "q", &["r", "s", "zp"], &["r::q"]),
            node("DequantizeLinear", "dq", &["r::q", "s", "zp"], &["r::dq"]),
            node("Mul", "half", &["r::dq", "h"], &["out"]),
        ],
        vec![
            scalar_f32("h", 0.5),
            scalar_f32("s", 0.01),
            int_tensor("zp", DataType::Uint8, &[], &[0]),
        ],
        i,
        o,
    );
    let float = Model::from_proto(model(float, 13)).unwrap();
    let quant = Model::from_proto(model(quant, 13)).unwrap();
    let data = source_from_values(&float, 4, &[1, n as usize], seeded(4 * n as usize, 2));
    let report = verify(&float, &quant, &data, &VerifyOptions::default()).unwrap();
    let r = report.layer("r").unwrap();
    assert_eq!(r.quantized, "r::dq");
    // Uniform noise of a 0.01 step on relu(x), x in [-1, 1): 10·log10(4/0.01²) ≈ 46 dB; the
    // pre-activation `r` itself would be at about 0 dB.
    assert!((r.sqnr_db - 46.0).abs() < 1.0, "{report}");
    let out = float_metrics(&report.output("out").unwrap().comparison);
    assert!((out.sqnr_db - r.sqnr_db).abs() < 1e-6);
}

/// The shipped classifier quantized by the command line (minmax, generic target), into `dir`.
fn quantized_classifier(dir: &Path) -> (Model, Model) {
    let cfg = dir.join("q.yaml");
    let calib = repo("models/ppocr_mobile_v2_cls.calib.npz");
    std::fs::write(&cfg, format!("calibration:\n  data: {:?}\n", calib.to_str().unwrap())).unwrap();
    let out = dir.join("q.onnx");
    let float_path = repo("models/ppocr_mobile_v2_cls.onnx");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_onnxq"))
        .args([
            float_path.as_os_str(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
        ])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    (
        onnxq::onnx::load_model(&float_path).unwrap(),
        onnxq::onnx::load_model(&out).unwrap(),
    )
}

#[test]
fn lockstep_verification_gives_the_figures_of_whole_samples_whatever_the_threads() {
    let dir = tempfile::tempdir().unwrap();
    let (float, quant) = quantized_classifier(dir.path());
    let data = source_from_file(&float, &repo("models/ppocr_mobile_v2_cls.eval.npz"));
    let on = |threads: usize, hold_samples: bool| {
        let options = VerifyOptions {
            hold_samples,
            ..Default::default()
        };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let report = pool.install(|| verify(&float, &quant, &data, &options).unwrap());
        serde_json::to_string(&report).unwrap()
    };
    let streamed = on(2, false);
    // Real figures: many layers, quantization noise in them (not a model against itself).
    let report: serde_json::Value = serde_json::from_str(&streamed).unwrap();
    let layers = report["layers"].as_array().unwrap();
    assert!(layers.len() > 20, "{} layers", layers.len());
    assert!(layers.iter().all(|l| l["identical"] == false), "{streamed}");
    assert!(report["layers_note"].is_null());
    // Held whole-sample tensors of both models give the same report, bit for bit, and so does
    // one thread.
    assert_eq!(on(2, true), streamed, "held vs lockstep");
    assert_eq!(on(1, false), streamed, "1 vs 2 threads");
}

#[test]
fn a_model_run_node_by_node_shows_what_run_returns() {
    let (float, _) = relu_models(16);
    let x: Vec<f32> = seeded(16, 3);
    let shapes = vec![("x".to_string(), tract_onnx::prelude::DatumType::F32, vec![1, 16])];
    let runner = Runner::new(&float, &shapes, &["r".to_string()]).unwrap();
    let input = || vec![Tensor::from_shape(&[1, 16], &x).unwrap().into_tvalue()];
    let want: Vec<Vec<f32>> = runner
        .run(input())
        .unwrap()
        .iter()
        .map(|t| to_f32_vec(t).unwrap())
        .collect();
    let mut got: Vec<Option<Vec<f32>>> = vec![None; runner.outputs.len()];
    let mut run = runner.start(input()).unwrap();
    let mut steps = 0;
    while run
        .step(|index, t| {
            assert!(got[index].is_none(), "{} shown twice", runner.outputs[index]);
            got[index] = Some(to_f32_vec(t)?);
            Ok(())
        })
        .unwrap()
    {
        steps += 1;
    }
    assert!(run.finished());
    assert!(steps >= 2, "{steps} steps");
    let got: Vec<Vec<f32>> = got
        .into_iter()
        .map(|v| v.expect("every returned tensor shown"))
        .collect();
    assert_eq!(got, want);
    // The plan's peak counts at least the input and the largest returned tensor.
    assert!(runner.sample_bytes().unwrap() >= 2 * 16 * 4);
}
