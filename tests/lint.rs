//! `onnxq lint`: each TensorRT rule fires on a hand-made QDQ graph that breaks it (and on what
//! ONNX Runtime's default asymmetric quantization looks like), passes what onnxq writes with
//! `target: tensorrt`, and the ONNX Runtime listing says which layers run as integer kernels.

mod common;

use std::process::Command;

use common::*;
use onnxq::ir::Model;
use onnxq::lint::{integer_layers, lint};
use onnxq::proto::tensor_proto::DataType;
use onnxq::proto::TensorProto;
use onnxq::quant::rules::Target;

fn int_tensor(name: &str, dtype: DataType, dims: &[i64], values: &[i32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(dtype as i32),
        int32_data: values.to_vec(),
        ..Default::default()
    }
}

/// x → Q/DQ (uint8, zero point 128) → Conv (int8 weight per channel along axis 1, not 0) → Q/DQ
/// right on the Conv output → Concat with a second DQ'd tensor of another scale → y.
fn breaks_every_tensorrt_rule() -> Model {
    let g = graph(
        vec![
            node("QuantizeLinear", "qx", &["x", "sx", "zx"], &["xq"]),
            node("DequantizeLinear", "dqx", &["xq", "sx", "zx"], &["xd"]),
            with_attr(
                node("DequantizeLinear", "dqw", &["wq", "sw", "zw"], &["wd"]),
                attr_int("axis", 1),
            ),
            node("Conv", "conv", &["xd", "wd"], &["c"]),
            node("QuantizeLinear", "qc", &["c", "sc", "zc"], &["cq"]),
            node("DequantizeLinear", "dqc", &["cq", "sc", "zc"], &["cd"]),
            node("DequantizeLinear", "dqx2", &["xq", "sx2", "zx"], &["xd2"]),
            with_attr(node("Concat", "concat", &["cd", "xd2"], &["y"]), attr_int("axis", 1)),
        ],
        vec![
            tensor_f32("sx", &[], &[0.02]),
            int_tensor("zx", DataType::Uint8, &[], &[128]),
            int_tensor("wq", DataType::Int8, &[2, 2, 1, 1], &[1, -2, 3, -4]),
            tensor_f32("sw", &[2], &[0.1, 0.2]),
            int_tensor("zw", DataType::Int8, &[2], &[0, 0]),
            tensor_f32("sc", &[], &[0.05]),
            int_tensor("zc", DataType::Int8, &[], &[0]),
            tensor_f32("sx2", &[], &[0.03]),
        ],
        vec![f32_info("x", &[1, 2, 4, 4])],
        vec![f32_info("y", &[1, 4, 4, 4])],
    );
    Model::from_proto(model(g, 13)).unwrap()
}

#[test]
fn every_tensorrt_rule_fires_where_it_is_broken() {
    let findings = lint(&breaks_every_tensorrt_rule(), Target::Tensorrt).unwrap();
    let got: Vec<(&str, &str)> = findings.iter().map(|f| (f.rule, f.node.as_str())).collect();
    assert_eq!(
        got,
        [
            ("zero-point", "QuantizeLinear 'qx'"),
            ("type", "QuantizeLinear 'qx'"),
            ("zero-point", "DequantizeLinear 'dqx'"),
            ("type", "DequantizeLinear 'dqx'"),
            ("weight-axis", "Conv 'conv'"),
            ("weighted-output", "Conv 'conv'"),
            ("zero-point", "DequantizeLinear 'dqx2'"),
            ("type", "DequantizeLinear 'dqx2'"),
            ("concat-scales", "Concat 'concat'"),
        ],
        "{findings:#?}"
    );
    assert!(
        findings[4]
            .message
            .contains("along axis 1; its output channels are on axis 0"),
        "{findings:#?}"
    );
    assert!(findings.iter().all(|f| !f.fix.is_empty()));
    // The other targets have no rules to break.
    assert!(lint(&breaks_every_tensorrt_rule(), Target::Generic).unwrap().is_empty());
}

fn onnxq_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_onnxq")).args(args).output().unwrap()
}

#[test]
fn what_onnxq_writes_for_tensorrt_passes_and_its_generic_output_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let data = repo("models/ppocr_mobile_v2_cls.calib.npz");
    let quantize = |target: &str, passes: &str| {
        let config = dir.path().join(format!("{target}.yaml"));
        let yaml = format!(
            "target: {target}\ncalibration: {{data: {:?}, samples: 4}}\npasses: {passes}\n",
            data.to_str().unwrap()
        );
        std::fs::write(&config, yaml).unwrap();
        let out = dir.path().join(format!("{target}.onnx"));
        let report = dir.path().join(format!("{target}.json"));
        let o = onnxq_cli(&[
            repo("models/ppocr_mobile_v2_cls.onnx").to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
        (out, report)
    };
    // The main job lints its own TensorRT output (the `lint` stage), and `onnxq lint` agrees.
    let (trt, report) = quantize("tensorrt", "[]");
    let steps = step_names(&report);
    assert_eq!(steps, ["calibrate", "plan", "guard", "materialize", "lint"]);
    assert_eq!(report["passes"][4]["notes"][0], "no rule of target tensorrt broken");
    let o = onnxq_cli(&["lint", trt.to_str().unwrap(), "--target", "tensorrt"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
    // The generic target's uint8 asymmetric activations break TensorRT's rules: exit code 3.
    let (generic, _) = quantize("generic", "[fold_batchnorm]");
    let o = onnxq_cli(&["lint", generic.to_str().unwrap(), "--target", "tensorrt", "--json"]);
    assert_eq!(o.status.code(), Some(3));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rules: std::collections::BTreeSet<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rule"].as_str().unwrap())
        .collect();
    assert!(rules.contains("zero-point") && rules.contains("type"), "{rules:?}");
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("error: lint: "));

    // ONNX Runtime: with folded BatchNorms, convs followed by a Relu and quantized run as
    // QLinearConv; those followed by a HardSwish keep a float bias (onnxq's placement) and run
    // in float, each with its reason.
    let m = onnxq::onnx::load_model(&generic).unwrap();
    let layers = integer_layers(&m).unwrap();
    assert!(layers.iter().any(|(_, v)| v.is_ok()), "{layers:#?}");
    assert!(
        layers
            .iter()
            .any(|(_, v)| v.as_ref().is_err_and(|r| r.contains("bias is float"))),
        "{layers:#?}"
    );
    let o = onnxq_cli(&["lint", generic.to_str().unwrap(), "--target", "onnxruntime"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains(": runs as an integer kernel"));
    // A bad target name is a usage error.
    let o = onnxq_cli(&["lint", generic.to_str().unwrap(), "--target", "tensorflow"]);
    assert_eq!(o.status.code(), Some(1));
}

/// An If whose then branch holds a QDQ Conv: the data's Q/DQ (uint8, zero point 128) inside the
/// branch, the weight's DequantizeLinear inside it too but its int8 weight, scale and zero point
/// constants of the main graph; the else branch is float.
fn qdq_conv_inside_an_if() -> Model {
    let then_branch = graph(
        vec![
            node("QuantizeLinear", "qx", &["x", "sx", "zx"], &["xq"]),
            node("DequantizeLinear", "dqx", &["xq", "sx", "zx"], &["xd"]),
            node("DequantizeLinear", "dqw", &["wq", "sw", "zw"], &["wd"]),
            node("Conv", "conv", &["xd", "wd"], &["c"]),
            node("QuantizeLinear", "qc", &["c", "sc", "zc"], &["cq"]),
            node("DequantizeLinear", "dqc", &["cq", "sc", "zc"], &["t"]),
        ],
        vec![
            tensor_f32("sx", &[], &[0.02]),
            int_tensor("zx", DataType::Uint8, &[], &[128]),
            tensor_f32("sc", &[], &[0.05]),
            int_tensor("zc", DataType::Uint8, &[], &[128]),
        ],
        vec![],
        vec![f32_info("t", &[1, 2, 4, 4])],
    );
    let else_branch = graph(
        vec![node("Identity", "id", &["x"], &["e"])],
        vec![],
        vec![],
        vec![f32_info("e", &[1, 2, 4, 4])],
    );
    let g = graph(
        vec![with_attr(
            with_attr(
                node("If", "branch", &["cond"], &["y"]),
                attr_graph("then_branch", then_branch),
            ),
            attr_graph("else_branch", else_branch),
        )],
        vec![
            int_tensor("wq", DataType::Int8, &[2, 2, 1, 1], &[1, -2, 3, -4]),
            tensor_f32("sw", &[], &[0.1]),
            int_tensor("zw", DataType::Int8, &[], &[0]),
        ],
        vec![f32_info("x", &[1, 2, 4, 4]), value_info("cond", DataType::Bool, &[])],
        vec![f32_info("y", &[1, 2, 4, 4])],
    );
    Model::from_proto(model(g, 13)).unwrap()
}

#[test]
fn lint_reads_the_bodies_of_if_branches_with_the_outer_constants_they_use() {
    let m = qdq_conv_inside_an_if();
    let findings = lint(&m, Target::Tensorrt).unwrap();
    let got: Vec<(&str, &str)> = findings.iter().map(|f| (f.rule, f.node.as_str())).collect();
    let inside = |n: &str| format!("If 'branch' then_branch / {n}");
    let (qx, dqx, conv, qc, dqc) = (
        inside("QuantizeLinear 'qx'"),
        inside("DequantizeLinear 'dqx'"),
        inside("Conv 'conv'"),
        inside("QuantizeLinear 'qc'"),
        inside("DequantizeLinear 'dqc'"),
    );
    // The weight's DequantizeLinear reads int8 constants of the main graph with zero point 0:
    // no finding (without the outer constants it would be taken for a uint8 activation).
    assert_eq!(
        got,
        [
            ("zero-point", qx.as_str()),
            ("type", qx.as_str()),
            ("zero-point", dqx.as_str()),
            ("type", dqx.as_str()),
            ("weighted-output", conv.as_str()),
            ("zero-point", qc.as_str()),
            ("type", qc.as_str()),
            ("zero-point", dqc.as_str()),
            ("type", dqc.as_str()),
        ],
        "{findings:#?}"
    );
    // ONNX Runtime runs the branch's Conv as an integer kernel: all its Q/DQ are in its graph.
    assert_eq!(integer_layers(&m).unwrap(), [(conv, Ok(()))]);
}
