//! Models with control flow: an If the data decides is calibrated on the branch it takes and
//! written back with both branches; a Loop tract cannot run is cut out of calibration and stays
//! float with the reason (`calib::control_flow`, `ir::inline`, `quant::subgraphs`).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use onnxq::ir::Model;
use onnxq::proto::tensor_proto::DataType;
use onnxq::proto::{GraphProto, ModelProto, NodeProto, TensorProto};
use tract_onnx::prelude::{IntoTValue, Tensor};

fn tensor_i64(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Int64 as i32),
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

fn tensor_bool(name: &str, value: bool) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        data_type: Some(DataType::Bool as i32),
        int32_data: vec![value as i32],
        ..Default::default()
    }
}

fn constant_node(t: TensorProto) -> NodeProto {
    let name = t.name().to_string();
    let mut value = t;
    value.name = None;
    with_attr(node("Constant", &name, &[], &[&name]), attr_tensor("value", value))
}

/// A branch `out = MatMul(MatMul(h, W), V)` with its weights in `Constant` nodes (as exporters
/// write branches); every name carries `tag`, so the two branches define different names.
fn matmul_branch(tag: &str, seed: u64) -> GraphProto {
    let (w, v, m, out) = (
        format!("{tag}_w"),
        format!("{tag}_v"),
        format!("{tag}_m"),
        format!("{tag}_out"),
    );
    graph(
        vec![
            constant_node(tensor_f32(&w, &[4, 4], &seeded(16, seed))),
            constant_node(tensor_f32(&v, &[4, 4], &seeded(16, seed + 10))),
            node("MatMul", &format!("{tag}_matmul"), &["h", &w], &[&m]),
            node("MatMul", &format!("{tag}_matmul2"), &[&m, &v], &[&out]),
        ],
        vec![],
        vec![],
        vec![f32_info(&out, &[1, 4])],
    )
}

/// `y = If(sr == 16000, then: MatMul(MatMul(h, W1), V1), else: the same with W2, V2)` with
/// `h = MatMul(x, W0)` before it: a sample-rate switch as in silero_vad.
fn if_model() -> ModelProto {
    let g = graph(
        vec![
            node("MatMul", "first", &["x", "w0"], &["h"]),
            node("Equal", "is_16k", &["sr", "k16"], &["cond"]),
            with_attr(
                with_attr(
                    node("If", "by_rate", &["cond"], &["y"]),
                    attr_graph("then_branch", matmul_branch("t", 2)),
                ),
                attr_graph("else_branch", matmul_branch("e", 3)),
            ),
        ],
        vec![
            tensor_f32("w0", &[4, 4], &seeded(16, 1)),
            tensor_i64("k16", &[], &[16000]),
        ],
        vec![f32_info("x", &[1, 4]), value_info("sr", DataType::Int64, &[])],
        vec![f32_info("y", &[1, 4])],
    );
    model(g, 17)
}

/// `y = MatMul(Relu(Loop(3 times: v ← v + v; from h)), W1)` with `h = MatMul(x, W0)`.
fn loop_model() -> ModelProto {
    let body = graph(
        vec![
            node("Identity", "keep_going", &["c"], &["c_out"]),
            node("Add", "double", &["v", "v"], &["v_out"]),
        ],
        vec![],
        vec![
            value_info("i", DataType::Int64, &[]),
            value_info("c", DataType::Bool, &[]),
            f32_info("v", &[1, 4]),
        ],
        vec![value_info("c_out", DataType::Bool, &[]), f32_info("v_out", &[1, 4])],
    );
    let g = graph(
        vec![
            node("MatMul", "first", &["x", "w0"], &["h"]),
            with_attr(
                node("Loop", "repeat", &["trips", "go", "h"], &["looped"]),
                attr_graph("body", body),
            ),
            node("Relu", "after_relu", &["looped"], &["r"]),
            node("MatMul", "after", &["r", "w1"], &["y"]),
        ],
        vec![
            tensor_f32("w0", &[4, 4], &seeded(16, 1)),
            tensor_f32("w1", &[4, 4], &seeded(16, 2)),
            tensor_i64("trips", &[], &[3]),
            tensor_bool("go", true),
        ],
        vec![f32_info("x", &[1, 4])],
        vec![f32_info("y", &[1, 4])],
    );
    model(g, 17)
}

fn x_samples(n: usize) -> Vec<Tensor> {
    (0..n)
        .map(|i| Tensor::from_shape::<f32>(&[1, 4], &seeded(4, 100 + i as u64)).unwrap())
        .collect()
}

/// Writes the model, its data (`x`, and `sr` per sample when given) and a config quantizing
/// with it; runs the main job. Returns (folder guard, output path, report, job result).
fn quantize(
    m: &ModelProto,
    rates: Option<&[i64]>,
    extra_config: &str,
) -> (tempfile::TempDir, PathBuf, onnxq::Result<serde_json::Value>) {
    let (dir, input) = write_temp(m, "in.onnx");
    let n = rates.map_or(16, |r| r.len());
    let mut arrays = vec![("x".to_string(), x_samples(n))];
    if let Some(rates) = rates {
        arrays.push(("sr".to_string(), rates.iter().map(|&r| Tensor::from(r)).collect()));
    }
    let data = dir.path().join("calib.npz");
    onnxq::calib::data::write_npz(&data, &arrays).unwrap();
    let config = dir.path().join("q.yaml");
    std::fs::write(
        &config,
        format!("calibration: {{data: calib.npz}}\nverify: {{data: calib.npz}}\n{extra_config}"),
    )
    .unwrap();
    let (output, report) = (dir.path().join("out.onnx"), dir.path().join("report.json"));
    let result = onnxq::job::main_job(onnxq::job::MainJob {
        model: input,
        config,
        output: Some(output.clone()),
        report: Some(report.clone()),
        html: None,
        external_data: false,
        dump_after: None,
        dump_dir: None,
        stop_after: None,
        stats: None,
        dry_run: false,
        engine: None,
    })
    .map(|()| serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap());
    (dir, output, result)
}

fn load(path: &Path) -> Model {
    onnxq::onnx::load_model(path).unwrap()
}

fn branch<'m>(m: &'m Model, attr: &str) -> &'m GraphProto {
    let n = m
        .graph
        .nodes
        .node_weights()
        .find(|n| n.op_type == "If")
        .expect("the If is written back");
    n.attribute(attr).and_then(|a| a.g.as_ref()).unwrap()
}

fn count(g: &GraphProto, op: &str) -> usize {
    g.node.iter().filter(|n| n.op_type() == op).count()
}

fn ops(m: &Model, op: &str) -> usize {
    m.graph.nodes.node_weights().filter(|n| n.op_type == op).count()
}

/// Runs a model with an `sr` input on `x_samples(1)` at sample rate `sr`.
fn run_at(m: &Model, sr: i64) -> Vec<f32> {
    let shapes = [
        ("x".to_string(), tract_onnx::prelude::DatumType::F32, vec![1, 4]),
        ("sr".to_string(), tract_onnx::prelude::DatumType::I64, vec![]),
    ];
    let runner = onnxq::runtime::Runner::new(m, &shapes, &[]).unwrap();
    let x = x_samples(1).remove(0);
    let out = runner
        .run(vec![x.into_tvalue(), Tensor::from(sr).into_tvalue()])
        .unwrap();
    onnxq::runtime::to_f32_vec(&out[0]).unwrap()
}

#[test]
fn an_if_the_data_decides_is_calibrated_on_its_branch_and_written_with_both() {
    let original = if_model();
    // The guard off: on this 4×4 graph it may rightly keep a layer float, and what is checked
    // here is where Q/DQ go, not which layers stay int8.
    let (_dir, out, report) = quantize(&original, Some(&[16000; 16]), "guard: false\n");
    let report = report.unwrap();
    let written = load(&out);
    let float = Model::from_proto(original.clone()).unwrap();

    // The taken branch got Q/DQ (the activation it makes, its Constant-node weights); the other is as read.
    let then = branch(&written, "then_branch");
    assert!(
        count(then, "QuantizeLinear") == 1 && count(then, "DequantizeLinear") == 3,
        "{then:?}"
    );
    assert_eq!(branch(&written, "else_branch"), branch(&float, "else_branch"));
    assert_eq!(ops(&written, "If"), 1);
    assert_eq!(
        ops(&written, "MatMul"),
        1,
        "the branches' MatMuls stay in their branches"
    );
    let cf = &report["control_flow"]["inlined_ifs"][0];
    assert_eq!(cf["taken"], "then_branch");
    assert_eq!(cf["kept_float"], "else_branch");
    // `h` is made outside the branch that reads it: no Q/DQ across the boundary, with the reason.
    let kept = &report["quantization"]["plan"]["kept_float"];
    assert!(kept["h"].as_str().unwrap().contains("graph boundary"), "{kept}");
    // Verified on the flat model: the written model's outputs were measured, and the report says how.
    assert!(
        report["verification"]["outputs"][0]["name"] == "y",
        "{}",
        report["verification"]
    );
    let notes = report["passes"].to_string();
    assert!(notes.contains("the branches not taken (float) were not run"), "{notes}");

    // The written model runs on either branch, near the float model (its `h` is quantized).
    for rate in [16000, 8000] {
        let (q, f) = (run_at(&written, rate), run_at(&float, rate));
        assert_ne!(q, f);
        assert!(max_relative_error(&q, &f) < 0.05, "{rate}: {q:?} vs {f:?}");
    }
}

#[test]
fn an_if_whose_condition_varies_keeps_its_branches_float() {
    let original = if_model();
    let rates: Vec<i64> = (0..16).map(|i| if i % 2 == 0 { 16000 } else { 8000 }).collect();
    let (_dir, out, report) = quantize(&original, Some(&rates), "guard: false\n");
    let report = report.unwrap();
    let written = load(&out);
    let float = Model::from_proto(original).unwrap();
    for attr in ["then_branch", "else_branch"] {
        assert_eq!(branch(&written, attr), branch(&float, attr), "{attr} must stay as read");
    }
    // The MatMul before the If is still quantized.
    assert!(written.graph.constants.contains_key("w0::quantized"));
    let notes = report["control_flow"]["notes"].to_string();
    assert!(notes.contains("differs between samples"), "{notes}");
    assert_eq!(report["control_flow"]["inlined_ifs"].as_array().unwrap().len(), 0);
}

#[test]
fn a_loop_tract_cannot_run_is_cut_and_what_follows_it_stays_float() {
    let original = loop_model();
    let (_dir, out, report) = quantize(&original, None, "");
    let report = report.unwrap();
    let written = load(&out);
    // Before the Loop: quantized. After it: float, with the reason.
    assert!(written.graph.constants.contains_key("w0::quantized"));
    let plan = &report["quantization"]["plan"];
    assert!(plan["activations"].get("r").is_none());
    let why = plan["kept_float"]["r"].as_str().unwrap();
    assert!(why.contains("not calibrated") && why.contains("Loop 'repeat'"), "{why}");
    let cut = &report["control_flow"]["cut"];
    assert_eq!(cut["outputs_not_measured"], serde_json::json!(["y"]));
    assert_eq!(cut["calibrated_up_to"], serde_json::json!(["h"]));
    // Verification measured the part tract runs, and the report says so.
    assert_eq!(report["verification"]["outputs"][0]["name"], "h");
    let notes = report["passes"].to_string();
    assert!(notes.contains("not measured: the model outputs 'y'"), "{notes}");
    // The Loop and its body are written back as they were.
    let as_read = Model::from_proto(original).unwrap();
    let body = |m: &Model| {
        m.graph
            .nodes
            .node_weights()
            .find(|n| n.op_type == "Loop")
            .unwrap()
            .attribute("body")
            .unwrap()
            .g
            .clone()
    };
    assert_eq!(body(&written), body(&as_read));
}

#[test]
#[ignore = "needs the ONNX Runtime library: ORT_DYLIB_PATH or python3's onnxruntime package (CI runs it)"]
fn onnx_runtime_verifies_the_whole_model_a_loop_tract_cannot_run_included() {
    let (_dir, _out, report) = quantize(&loop_model(), None, "engine: onnxruntime\n");
    let report = report.unwrap();
    let verification = &report["verification"];
    assert_eq!(verification["engine"], "onnxruntime");
    // The model's own output, downstream of the Loop: measured, not the part tract runs.
    assert_eq!(verification["outputs"][0]["name"], "y");
    let sqnr = verification["outputs"][0]["sqnr_db"].as_f64().unwrap();
    assert!(sqnr.is_finite() && sqnr > 0.0, "{verification}");
    // Layer by layer too, through the Loop's output.
    let layers: Vec<&str> = verification["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(layers, ["h", "looped", "r", "y"]);
    let notes = report["passes"].to_string();
    assert!(
        notes.contains("verified the whole models in ONNX Runtime, Loop 'repeat' included"),
        "{notes}"
    );
    // Calibration still saw the part tract runs.
    assert_eq!(
        report["control_flow"]["cut"]["calibrated_up_to"],
        serde_json::json!(["h"])
    );
}

#[test]
fn inlining_then_restoring_gives_the_model_back() {
    let original = Model::from_proto(if_model()).unwrap();
    let mut flat = original.clone();
    let mut record = onnxq::ir::inline::Inlined::new(&flat);
    onnxq::ir::inline::inline_if(&mut flat, "y", false, &mut record).unwrap();
    flat.graph.check().unwrap();
    assert_eq!(ops(&flat, "If"), 0);
    assert_eq!(
        ops(&flat, "MatMul"),
        3,
        "the else branch's MatMuls are in the flat graph"
    );
    assert!(flat.graph.constants.contains_key("e_w"));
    let back = onnxq::ir::inline::restore(&flat, &record).unwrap();
    assert_eq!(back.to_proto().unwrap(), original.to_proto().unwrap());
}

#[test]
fn a_branch_redefining_an_outer_name_is_a_model_error() {
    let mut m = if_model();
    let g = m.graph.as_mut().unwrap();
    // The then branch now writes `h`, which the outer graph defines too: not valid ONNX.
    let then = g.node[2]
        .attribute
        .iter_mut()
        .find(|a| a.name() == "then_branch")
        .unwrap();
    then.g.as_mut().unwrap().node[3].output[0] = "h".into();
    then.g.as_mut().unwrap().output[0].name = Some("h".into());
    let mut flat = Model::from_proto(m).unwrap();
    let mut record = onnxq::ir::inline::Inlined::new(&flat);
    let err = onnxq::ir::inline::inline_if(&mut flat, "y", true, &mut record).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("'h' of the then_branch"), "{err}");
}

#[test]
fn a_plan_pass_that_re_plans_keeps_q_dq_inside_the_branches() {
    // correct_bias re-plans after correcting: the boundary rule must hold on the plan written.
    // Without the guard, which may raise the branch's layers to float.
    let (_dir, out, report) = quantize(
        &if_model(),
        Some(&[16000; 16]),
        "passes: [correct_bias]\nguard: false\n",
    );
    let report = report.unwrap();
    let kept = &report["quantization"]["plan"]["kept_float"];
    assert!(kept["h"].as_str().unwrap().contains("graph boundary"), "{kept}");
    let written = load(&out);
    let then = branch(&written, "then_branch");
    assert!(
        then.node
            .iter()
            .all(|n| n.op_type() != "QuantizeLinear" || n.input[0] != "h"),
        "no Q/DQ of the outer `h` inside the branch: {then:?}"
    );
}

#[test]
fn a_format_needing_a_newer_opset_than_an_if_model_has_is_refused_before_any_work() {
    for config in ["weights: {dtype: int4}\n", "weights: {codebook: {bits: 4}}\n"] {
        let (_dir, output, result) = quantize(&if_model(), Some(&[16000, 16000]), config);
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("needs opset 21") && err.contains("opset 17 with If nodes"),
            "{config}: {err}"
        );
        assert!(!output.exists(), "nothing written");
    }
    // An 8-bit codebook needs no newer opset: written with the If intact.
    let (_dir, output, result) = quantize(&if_model(), Some(&[16000, 16000]), "weights: {codebook: {bits: 8}}\n");
    result.unwrap();
    assert_eq!(ops(&load(&output), "If"), 1);
}
