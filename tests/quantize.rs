//! Quantization end to end. On small hand-built graphs calibrated on seeded data: snapshots of
//! the Q/DQ rewrite (the unified diff of the dump before/after) and of the plan, with scales,
//! zero points and int32 biases checked by hand, what must stay float and why, shared
//! parameters (Concat, MaxPool), the TensorRT rules, the SQNR of the quantized model and
//! byte-identical output whatever the thread count. Then the main job on a shipped real model:
//! verification table and report, dry run, threshold failure (exit 3), config errors (exit 1).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use onnxq::calib::data::{write_npz, InputSpec};
use onnxq::calib::observers::Method;
use onnxq::calib::source::DataSource;
use onnxq::calib::stats::{collect, CalibrationStats};
use onnxq::ir::dump::fmt_float;
use onnxq::ir::tensor::{values_f32, values_i128};
use onnxq::ir::{Model, Node};
use onnxq::pipeline::config::Config;
use onnxq::pipeline::dump_diff;
use onnxq::proto::tensor_proto::DataType;
use onnxq::proto::TensorProto;
use onnxq::quant::materialize::materialize;
use onnxq::quant::plan::{build_plan, Overrides, Plan, PlanOptions, Precision};
use onnxq::quant::rules::Target;
use onnxq::verify::{verify, Comparison, VerifyOptions};
use tract_onnx::prelude::Tensor;

/// Calibration samples of the hand-built graphs.
const SAMPLES: usize = 8;

// ---------------------------------------------------------------------------------------------
// Builders and helpers
// ---------------------------------------------------------------------------------------------

fn tensor_i64(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// Seeded values in [-1, 1) times `gain`.
fn values(n: usize, seed: u64, gain: f32) -> Vec<f32> {
    seeded(n, seed).into_iter().map(|v| v * gain).collect()
}

/// `n` samples of `shape`, uniform in [-gain, gain), seeded.
fn uniform(shape: &[usize], n: usize, seed: u64, gain: f32) -> Vec<Tensor> {
    let len = shape.iter().product();
    (0..n)
        .map(|i| Tensor::from_shape(shape, &values(len, seed * 1000 + i as u64, gain)).unwrap())
        .collect()
}

fn write_data(dir: &Path, file: &str, arrays: Vec<(&str, Vec<Tensor>)>) -> PathBuf {
    let p = dir.join(file);
    let arrays: Vec<(String, Vec<Tensor>)> = arrays.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
    write_npz(&p, &arrays).unwrap();
    p
}

/// `SAMPLES` samples of the conv nets' input x [1, 3, 8, 8], uniform in [-1, 1), seeded, in
/// `dir/file`.
fn x_data(dir: &Path, file: &str, seed: u64) -> PathBuf {
    write_data(dir, file, vec![("x", uniform(&[1, 3, 8, 8], SAMPLES, seed, 1.0))])
}

/// The data source the main job would open for `calibration: {data: <path>}`.
fn open_data(model: &Model, data: &Path) -> DataSource {
    let yaml = format!("calibration: {{data: {:?}}}\n", data.to_str().unwrap());
    let config = Config::parse(&yaml, Path::new("q.yaml")).unwrap();
    DataSource::open(config.calibration.as_ref().unwrap(), &InputSpec::of_graph(&model.graph)).unwrap()
}

fn calibrate(model: &Model, data: &Path) -> CalibrationStats {
    let source = open_data(model, data);
    collect(model, &source, source.fingerprints().unwrap()).unwrap()
}

fn plan_options(target: Target, exclude: Overrides) -> PlanOptions {
    PlanOptions {
        target,
        rules: target.rules(),
        method: Method::MinMax,
        overrides: exclude,
    }
}

/// The exclusions of a config's `overrides:` (YAML list).
fn overrides(yaml: &str) -> Overrides {
    Config::parse(
        &format!("calibration: {{data: d.npz}}\noverrides: {yaml}\n"),
        Path::new("q.yaml"),
    )
    .unwrap()
    .overrides()
}

/// Plan, then materialise into a copy: (plan, quantized model, notes).
fn quantize(model: &Model, stats: &CalibrationStats, options: &PlanOptions) -> (Plan, Model, Vec<String>) {
    let plan = build_plan(model, stats, options).unwrap();
    let mut after = model.clone();
    let notes = materialize(&mut after, &plan).unwrap();
    (plan, after, notes)
}

/// The plan as stable text: summary, every decision with its parameters, what stays float and
/// why, and the materialisation notes.
fn plan_text(plan: &Plan, notes: &[String]) -> String {
    let refs = |c: &[(String, usize)]| c.iter().map(|(k, s)| format!("{k}:{s}")).collect::<Vec<_>>().join(", ");
    let mut t = format!("{}\n", plan.summary());
    t += "activations:\n";
    for (name, a) in &plan.activations {
        t += &format!(
            "  {name}: {} {} scale={} zero_point={} range=[{}, {}] read by {}",
            a.scheme.dtype,
            if a.scheme.symmetric { "symmetric" } else { "asymmetric" },
            fmt_float(a.params.scale as f64),
            a.params.zero_point,
            fmt_float(a.range.0 as f64),
            fmt_float(a.range.1 as f64),
            refs(&a.consumers)
        );
        if !a.shared_with.is_empty() {
            t += &format!(" (shared with {})", a.shared_with.join(", "));
        }
        t += "\n";
    }
    t += "weights:\n";
    for (name, w) in &plan.weights {
        let axis = w.axis.map_or("per-tensor".to_string(), |a| format!("axis {a}"));
        t += &format!("  {name}: {} {axis} read by {}\n", w.scheme.dtype, refs(&w.consumers));
    }
    t += "biases:\n";
    for (name, b) in &plan.biases {
        t += &format!(
            "  {name}: i32, scale {}·{} read by {}\n",
            b.input,
            b.weight,
            refs(&b.consumers)
        );
    }
    t += "kept float:\n";
    for (name, reason) in &plan.kept_float {
        t += &format!("  {name}: {reason}\n");
    }
    t += "notes:\n";
    for n in notes {
        t += &format!("  {n}\n");
    }
    t
}

fn constant<'a>(m: &'a Model, name: &str) -> &'a TensorProto {
    &m.graph
        .constants
        .get(name)
        .unwrap_or_else(|| panic!("no constant '{name}'"))
        .tensor
}

fn const_f32(m: &Model, name: &str) -> Vec<f32> {
    values_f32(constant(m, name)).unwrap()
}

fn const_int(m: &Model, name: &str) -> Vec<i128> {
    values_i128(constant(m, name)).unwrap()
}

fn dtype(m: &Model, name: &str) -> DataType {
    DataType::try_from(constant(m, name).data_type()).unwrap()
}

fn node_named<'a>(m: &'a Model, name: &str) -> &'a Node {
    m.graph
        .nodes
        .node_weights()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node '{name}'"))
}

fn ops<'a>(m: &'a Model, op: &str) -> Vec<&'a Node> {
    m.graph.nodes.node_weights().filter(|n| n.op_type == op).collect()
}

/// The op producing `tensor` (None for inputs and constants).
fn producer_op<'a>(m: &'a Model, tensor: &str) -> Option<&'a str> {
    m.graph
        .nodes
        .node_weights()
        .find(|n| n.outputs.iter().any(|o| o == tensor))
        .map(|n| n.op_type.as_str())
}

fn min_max(samples: &[Tensor]) -> (f32, f32) {
    samples
        .iter()
        .flat_map(|t| onnxq::runtime::to_f32_vec(t).unwrap())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// Input x [1,3,8,8] → conv1 (W1 [4,3,3,3], bias b1) → c1 → relu → r → conv2 (W2 [2,4,1,1],
/// bias b2) → y [1,2,6,6]; with `third`, conv2 writes c2 and conv3 (W3 [3,2,1,1], no bias)
/// reads it directly and writes y [1,3,6,6].
fn conv_relu_conv(opset: i64, third: bool) -> Model {
    let conv2_out = if third { "c2" } else { "y" };
    let mut nodes = vec![
        node("Conv", "conv1", &["x", "W1", "b1"], &["c1"]),
        node("Relu", "relu", &["c1"], &["r"]),
        node("Conv", "conv2", &["r", "W2", "b2"], &[conv2_out]),
    ];
    let mut inits = vec![
        conv_weight("W1", &[4, 3, 3, 3], 11),
        tensor_f32("b1", &[4], &[0.1, -0.25, 0.037, 0.5]),
        conv_weight("W2", &[2, 4, 1, 1], 12),
        tensor_f32("b2", &[2], &[0.05, -0.3]),
    ];
    let mut out_channels = 2;
    if third {
        nodes.push(node("Conv", "conv3", &["c2", "W3"], &["y"]));
        inits.push(conv_weight("W3", &[3, 2, 1, 1], 13));
        out_channels = 3;
    }
    let g = graph(
        nodes,
        inits,
        vec![value_info("x", DataType::Float, &[1, 3, 8, 8])],
        vec![value_info("y", DataType::Float, &[1, out_channels, 6, 6])],
    );
    Model::from_proto(model(g, opset)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1a. Conv → Relu → Conv, generic target
// ---------------------------------------------------------------------------------------------

#[test]
fn conv_relu_conv_gets_qdq_per_channel_weights_and_int32_bias() {
    let dir = tempfile::tempdir().unwrap();
    let float = conv_relu_conv(11, false);
    let xs = uniform(&[1, 3, 8, 8], SAMPLES, 1, 1.0);
    let data = write_data(dir.path(), "calib.npz", vec![("x", xs.clone())]);
    let stats = calibrate(&float, &data);
    let (plan, quant, notes) = quantize(&float, &stats, &plan_options(Target::Generic, Overrides::default()));
    insta::assert_snapshot!("conv_relu_conv_dump", dump_diff(&float.to_string(), &quant.to_string()));
    insta::assert_snapshot!("conv_relu_conv_plan", plan_text(&plan, &notes));

    // Opset raised from 11 to (at least) 13 for per-axis DequantizeLinear.
    assert_eq!(float.opset(""), Some(11));
    assert!(quant.opset("").unwrap() >= 13, "{:?}", quant.opset(""));

    // Q/DQ on the graph input and on the Relu output only (the Conv output feeds Relu, which is
    // not quantized): uint8 asymmetric.
    assert_eq!(plan.activations.keys().collect::<Vec<_>>(), ["r", "x"]);
    assert_eq!(ops(&quant, "QuantizeLinear").len(), 2);
    assert_eq!(
        ops(&quant, "DequantizeLinear").len(),
        2 + 2 + 1,
        "2 activations, 2 weights, 1 bias: conv2 writes the graph output, which is not quantized, so no integer kernel would use an int32 b2"
    );
    for t in ["x", "r"] {
        assert_eq!(dtype(&quant, &format!("{t}::zero_point")), DataType::Uint8);
    }

    // x's scale and zero point from the data itself: the range widened to contain 0, then
    // scale = (hi − lo) / 255 and zero point = round(−lo / scale).
    let (lo, hi) = min_max(&xs);
    let (lo, hi) = (lo.min(0.0) as f64, hi.max(0.0) as f64);
    let s_in = ((hi - lo) / 255.0) as f32;
    assert_eq!(const_f32(&quant, "x::scale"), [s_in]);
    let zp = (-lo / s_in as f64).round_ties_even();
    assert_eq!(const_int(&quant, "x::zero_point"), [zp as i128]);
    assert!(
        zp > 100.0 && zp < 155.0,
        "uniform [-1, 1) has its zero near the middle: {zp}"
    );
    // The Relu output is non-negative: zero point 0.
    assert_eq!(const_int(&quant, "r::zero_point"), [0]);

    // Weights: int8 symmetric per output channel (axis 0), scale = max|w_c| / 127.
    let w1 = values_f32(constant(&float, "W1")).unwrap();
    let s_w = const_f32(&quant, "W1::scale");
    assert_eq!(s_w.len(), 4);
    for (c, &s) in s_w.iter().enumerate() {
        let amax = w1[c * 27..(c + 1) * 27].iter().fold(0f32, |a, v| a.max(v.abs()));
        assert_eq!(s, (amax as f64 / 127.0) as f32, "channel {c}");
    }
    assert!(s_w[3] > 3.0 * s_w[0], "channels have their own scales: {s_w:?}");
    assert_eq!(dtype(&quant, "W1::quantized"), DataType::Int8);
    assert!(const_int(&quant, "W1::quantized")
        .iter()
        .all(|v| (-127..=127).contains(v)));
    assert_eq!(const_int(&quant, "W1::zero_point"), [0, 0, 0, 0]);
    let w1_dq = node_named(&quant, "W1::dq");
    assert_eq!(w1_dq.op_type, "DequantizeLinear");
    assert_eq!(w1_dq.attribute("axis").map(|a| a.i()), Some(0));

    // Bias: int32 with scale s_in · s_w[c], zero point 0; value round_half_even(b / scale).
    let b1 = [0.1f32, -0.25, 0.037, 0.5];
    assert_eq!(dtype(&quant, "b1::quantized"), DataType::Int32);
    let b_scale = const_f32(&quant, "b1::scale");
    let b_q = const_int(&quant, "b1::quantized");
    assert_eq!(const_int(&quant, "b1::zero_point"), [0, 0, 0, 0]);
    for c in 0..4 {
        let scale = (s_in as f64 * s_w[c] as f64) as f32;
        assert_eq!(b_scale[c], scale, "channel {c}");
        let q = (b1[c] as f64 / scale as f64).round_ties_even();
        assert_eq!(b_q[c], q as i128, "channel {c}");
        assert!((b_q[c] as f64 * scale as f64 - b1[c] as f64).abs() <= scale as f64 / 2.0);
    }
    // Channel 1 by hand: s_in = 0.00783935 (x in [-0.999489, 0.999545]), s_w[1] = 0.00351094,
    // scale = 2.75234e-5, −0.25 / 2.75234e-5 = −9083.2 → −9083.
    assert_eq!(b_q[1], -9083, "{b_q:?}");
    assert_eq!(node_named(&quant, "b1::dq").attribute("axis").map(|a| a.i()), Some(0));

    // Every consumer rewired; the float weights and biases are gone.
    assert_eq!(node_named(&quant, "conv1").inputs, ["x::dq", "W1::dq", "b1::dq"]);
    assert_eq!(node_named(&quant, "relu").inputs, ["c1"]);
    assert_eq!(node_named(&quant, "conv2").inputs, ["r::dq", "W2::dq", "b2"]);
    assert_eq!(dtype(&quant, "b2"), DataType::Float);
    for gone in ["W1", "b1", "W2"] {
        assert!(!quant.graph.constants.contains_key(gone), "{gone} should be removed");
    }
    assert!(plan.kept_float.is_empty(), "{:?}", plan.kept_float);
}

// ---------------------------------------------------------------------------------------------
// 1b. What must not be quantized
// ---------------------------------------------------------------------------------------------

/// x [1,4,6] and an attention mask m [1,1,6] of 0/1:
/// - shape path: Shape(x) → Gather → Concat(…, [-1]) → Reshape(x, ·) → xr (int64 all along);
/// - MatMul(xr, Wq) → Add(·, bq) (bias-style: a constant operand) → sb → Add(sb, xr) (residual)
///   → res → MatMul(res, Wr) → y3;
/// - the mask as additive bias from a graph input: (1 − m) · −3.4028235e38 → mb (sentinel),
///   Add(res, mb) → Softmax → MatMul(probs, Wo) → y;
/// - a mask from constants: Mul(cmask, −3.4028235e38) → cmb, Add(sb, cmb) → Sigmoid → sg →
///   MatMul 'keep_me' (Wk) → y2, which the override excludes by node name.
fn no_quantize_graph() -> Model {
    let big = -3.4028235e38f32;
    let nodes = vec![
        node("Shape", "shape", &["x"], &["s"]),
        node("Gather", "gather", &["s", "gi"], &["g"]),
        with_attr(
            node("Concat", "concat_shape", &["g", "minus1"], &["shp"]),
            attr_int("axis", 0),
        ),
        node("Reshape", "reshape", &["x", "shp"], &["xr"]),
        node("MatMul", "proj", &["xr", "Wq"], &["scores"]),
        node("Add", "bias_add", &["scores", "bq"], &["sb"]),
        node("Add", "residual", &["sb", "xr"], &["res"]),
        node("MatMul", "res_proj", &["res", "Wr"], &["y3"]),
        node("Sub", "one_minus", &["one", "m"], &["om"]),
        node("Mul", "mask_bias", &["om", "neg_big"], &["mb"]),
        node("Add", "mask_add", &["res", "mb"], &["masked"]),
        with_attr(
            node("Softmax", "softmax", &["masked"], &["probs"]),
            attr_int("axis", -1),
        ),
        node("MatMul", "out_proj", &["probs", "Wo"], &["y"]),
        node("Mul", "const_mask_bias", &["cmask", "neg_big"], &["cmb"]),
        node("Add", "const_mask_add", &["sb", "cmb"], &["cm"]),
        node("Sigmoid", "sigmoid", &["cm"], &["sg"]),
        node("MatMul", "keep_me", &["sg", "Wk"], &["y2"]),
    ];
    let inits = vec![
        tensor_i64("gi", &[2], &[0, 1]),
        tensor_i64("minus1", &[1], &[-1]),
        tensor_f32("Wq", &[6, 6], &values(36, 21, 0.5)),
        tensor_f32("bq", &[6], &values(6, 22, 0.2)),
        tensor_f32("one", &[], &[1.0]),
        tensor_f32("neg_big", &[], &[big]),
        tensor_f32("Wo", &[6, 3], &values(18, 23, 0.5)),
        tensor_f32("cmask", &[1, 1, 6], &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0]),
        tensor_f32("Wk", &[6, 2], &values(12, 24, 0.5)),
        tensor_f32("Wr", &[6, 2], &values(12, 25, 0.5)),
    ];
    let g = graph(
        nodes,
        inits,
        vec![
            value_info("x", DataType::Float, &[1, 4, 6]),
            value_info("m", DataType::Float, &[1, 1, 6]),
        ],
        vec![
            value_info("y", DataType::Float, &[1, 4, 3]),
            value_info("y2", DataType::Float, &[1, 4, 2]),
            value_info("y3", DataType::Float, &[1, 4, 2]),
        ],
    );
    Model::from_proto(model(g, 13)).unwrap()
}

fn no_quantize_data(dir: &Path) -> PathBuf {
    // The last two positions are always masked out, the others at random.
    let masks: Vec<Tensor> = (0..SAMPLES)
        .map(|i| {
            let v: Vec<f32> = seeded(6, 300 + i as u64)
                .iter()
                .enumerate()
                .map(|(j, &r)| if j < 4 && r > -0.3 { 1.0 } else { 0.0 })
                .collect();
            Tensor::from_shape(&[1, 1, 6], &v).unwrap()
        })
        .collect();
    write_data(
        dir,
        "calib.npz",
        vec![("x", uniform(&[1, 4, 6], SAMPLES, 3, 2.0)), ("m", masks)],
    )
}

/// Tensors read by a QuantizeLinear.
fn quantized_tensors(m: &Model) -> Vec<String> {
    ops(m, "QuantizeLinear").iter().map(|n| n.inputs[0].clone()).collect()
}

#[test]
fn shape_paths_sentinels_bias_adds_residuals_softmax_and_overrides_stay_float() {
    let dir = tempfile::tempdir().unwrap();
    let float = no_quantize_graph();
    let data = no_quantize_data(dir.path());
    let stats = calibrate(&float, &data);
    assert!(
        stats.tensors["mb"].min <= -3.0e38,
        "the mask bias reaches the sentinel: {}",
        stats.tensors["mb"].min
    );
    let exclude = overrides("[{node: keep_me, exclude: true}]");
    let (plan, quant, notes) = quantize(&float, &stats, &plan_options(Target::Generic, exclude.clone()));
    insta::assert_snapshot!(
        "must_not_quantize_dump",
        dump_diff(&float.to_string(), &quant.to_string())
    );
    insta::assert_snapshot!("must_not_quantize_plan", plan_text(&plan, &notes));

    let q = quantized_tensors(&quant);
    // Shape path: int64 tensors never get Q/DQ; the one a quantized op (Concat) reads is kept
    // float with the reason.
    for t in ["s", "g", "shp", "gi", "minus1"] {
        assert!(!q.contains(&t.to_string()), "{t} must not be quantized: {q:?}");
    }
    assert!(
        plan.kept_float["g"].contains("not a float activation"),
        "{:?}",
        plan.kept_float
    );
    assert_eq!(node_named(&quant, "reshape").inputs[1], "shp");
    // Bias-style Add (constant operand), residual Add (generic), the mask Adds, Softmax input:
    // none of their inputs is quantized, and they still read the float tensors (`res` is, for
    // the MatMul that reads it).
    for t in ["scores", "bq", "sb", "mb", "masked", "cmb", "cm"] {
        assert!(!plan.activations.contains_key(t), "{t} must stay float");
        assert!(!q.contains(&t.to_string()), "{t} must stay float: {q:?}");
    }
    assert_eq!(node_named(&quant, "bias_add").inputs, ["scores", "bq"]);
    assert_eq!(node_named(&quant, "residual").inputs, ["sb", "xr"]);
    assert_eq!(node_named(&quant, "mask_add").inputs, ["res", "mb"]);
    assert_eq!(node_named(&quant, "softmax").inputs, ["masked"]);
    // The excluded node: its input and weight stay float, with the override as the reason.
    assert_eq!(node_named(&quant, "keep_me").inputs, ["sg", "Wk"]);
    assert!(!plan.weights.contains_key("Wk"));
    let reason = &plan.kept_float["sg"];
    assert!(reason.contains("keep_me") && reason.contains("override"), "{reason}");
    // What is quantized: the matmul inputs (and Reshape's input, tied to its output).
    assert_eq!(plan.activations.keys().collect::<Vec<_>>(), ["probs", "res", "x", "xr"]);
    assert_eq!(node_named(&quant, "proj").inputs, ["xr::dq", "Wq::dq"]);
    assert_eq!(node_named(&quant, "out_proj").inputs, ["probs::dq", "Wo::dq"]);
    assert_eq!(const_f32(&quant, "x::scale"), const_f32(&quant, "xr::scale"));

    // A target that quantizes residual Adds quantizes the one whose result a MatMul reads; the
    // mask Add, whose result reaches only the Softmax (no integer compute), stays float, and so
    // its sentinel operand; the constant-derived mask and the bias-style Add still are not.
    let (plan, quant, notes) = quantize(&float, &stats, &plan_options(Target::Onnxruntime, exclude));
    insta::assert_snapshot!("must_not_quantize_plan_onnxruntime", plan_text(&plan, &notes));
    assert!(plan.activations.contains_key("res") && plan.activations.contains_key("sb"));
    assert_eq!(node_named(&quant, "mask_add").inputs, ["res", "mb"]);
    assert_eq!(node_named(&quant, "residual").inputs, ["sb::dq", "xr::dq"]);
    assert_eq!(node_named(&quant, "res_proj").inputs, ["res::dq", "Wr::dq"]);
    let q = quantized_tensors(&quant);
    for t in ["scores", "mb", "masked", "cmb", "cm", "g", "shp"] {
        assert!(!q.contains(&t.to_string()), "{t} must stay float: {q:?}");
    }
    assert_eq!(node_named(&quant, "const_mask_add").inputs, ["sb", "cmb"]);
}

// ---------------------------------------------------------------------------------------------
// 1c. Shared parameters
// ---------------------------------------------------------------------------------------------

/// x [1,2,8,8] → conv_a (3×3, pads 1) → Relu → ra; x → conv_b (1×1) → ·3 → b3 (a wider range);
/// Concat(ra, b3) → c → MaxPool 2×2 → p → conv_c → y.
fn concat_pool_graph() -> Model {
    let nodes = vec![
        with_attr(
            node("Conv", "conv_a", &["x", "Wa"], &["a"]),
            attr_ints("pads", &[1, 1, 1, 1]),
        ),
        node("Relu", "relu_a", &["a"], &["ra"]),
        node("Conv", "conv_b", &["x", "Wb"], &["b"]),
        node("Mul", "triple", &["b", "three"], &["b3"]),
        with_attr(node("Concat", "concat", &["ra", "b3"], &["c"]), attr_int("axis", 1)),
        with_attr(
            with_attr(
                node("MaxPool", "pool", &["c"], &["p"]),
                attr_ints("kernel_shape", &[2, 2]),
            ),
            attr_ints("strides", &[2, 2]),
        ),
        node("Conv", "conv_c", &["p", "Wc"], &["y"]),
    ];
    let inits = vec![
        conv_weight("Wa", &[3, 2, 3, 3], 31),
        conv_weight("Wb", &[2, 2, 1, 1], 32),
        tensor_f32("three", &[], &[3.0]),
        conv_weight("Wc", &[2, 5, 1, 1], 33),
    ];
    let g = graph(
        nodes,
        inits,
        vec![value_info("x", DataType::Float, &[1, 2, 8, 8])],
        vec![value_info("y", DataType::Float, &[1, 2, 4, 4])],
    );
    Model::from_proto(model(g, 13)).unwrap()
}

#[test]
fn concat_inputs_and_maxpool_share_scale_and_zero_point() {
    let dir = tempfile::tempdir().unwrap();
    let float = concat_pool_graph();
    let data = write_data(
        dir.path(),
        "calib.npz",
        vec![("x", uniform(&[1, 2, 8, 8], SAMPLES, 4, 1.0))],
    );
    let stats = calibrate(&float, &data);
    let (plan, quant, notes) = quantize(&float, &stats, &plan_options(Target::Generic, Overrides::default()));
    insta::assert_snapshot!("concat_pool_dump", dump_diff(&float.to_string(), &quant.to_string()));
    insta::assert_snapshot!("concat_pool_plan", plan_text(&plan, &notes));

    // The Concat inputs have different ranges on their own ...
    let (ra, b3) = (&stats.tensors["ra"], &stats.tensors["b3"]);
    assert!(
        ra.min >= 0.0 && b3.min < 0.0,
        "ra [{}, {}], b3 [{}, {}]",
        ra.min,
        ra.max,
        b3.min,
        b3.max
    );
    // ... and one set of parameters, from the union of the ranges, in the model.
    let group = ["ra", "b3", "c", "p"];
    for t in group {
        assert_eq!(
            const_f32(&quant, &format!("{t}::scale")),
            const_f32(&quant, "ra::scale"),
            "{t}"
        );
        assert_eq!(
            const_int(&quant, &format!("{t}::zero_point")),
            const_int(&quant, "ra::zero_point"),
            "{t}"
        );
        assert_eq!(
            plan.activations[t].range,
            (ra.min.min(b3.min), ra.max.max(b3.max)),
            "{t}"
        );
    }
    let s = const_f32(&quant, "ra::scale")[0] as f64;
    let (lo, hi) = (ra.min.min(b3.min) as f64, ra.max.max(b3.max) as f64);
    assert_eq!(s as f32, ((hi - lo) / 255.0) as f32);
    assert_ne!(
        const_f32(&quant, "x::scale"),
        const_f32(&quant, "ra::scale"),
        "x is not tied"
    );
    // MaxPool's output has its input's parameters: the pool runs on the quantized grid.
    let shared: Vec<&str> = plan.activations["p"].shared_with.iter().map(String::as_str).collect();
    assert!(shared.contains(&"c"), "{shared:?}");
    assert_eq!(node_named(&quant, "concat").inputs, ["ra::dq", "b3::dq"]);
    assert_eq!(node_named(&quant, "pool").inputs, ["c::dq"]);
    assert_eq!(node_named(&quant, "conv_c").inputs, ["p::dq", "Wc::dq"]);
}

// ---------------------------------------------------------------------------------------------
// 1d. TensorRT
// ---------------------------------------------------------------------------------------------

#[test]
fn tensorrt_is_int8_symmetric_with_no_qdq_on_weighted_outputs_and_float_bias() {
    let dir = tempfile::tempdir().unwrap();
    let float = conv_relu_conv(11, true);
    let xs = uniform(&[1, 3, 8, 8], SAMPLES, 1, 1.0);
    let data = write_data(dir.path(), "calib.npz", vec![("x", xs.clone())]);
    let stats = calibrate(&float, &data);
    let (plan, quant, notes) = quantize(&float, &stats, &plan_options(Target::Tensorrt, Overrides::default()));
    insta::assert_snapshot!("tensorrt_dump", dump_diff(&float.to_string(), &quant.to_string()));
    insta::assert_snapshot!("tensorrt_plan", plan_text(&plan, &notes));

    // Every zero point is int8 and 0.
    let zero_points: Vec<&String> = quant
        .graph
        .constants
        .keys()
        .filter(|k| k.ends_with("::zero_point"))
        .collect();
    assert_eq!(zero_points.len(), 2 + 3, "x, r and three weights: {zero_points:?}");
    for z in zero_points {
        assert_eq!(dtype(&quant, z), DataType::Int8, "{z}");
        assert!(const_int(&quant, z).iter().all(|&v| v == 0), "{z}");
    }
    // Symmetric activation scale: max|x| / 127.
    let (lo, hi) = min_max(&xs);
    let amax = hi.max(-lo) as f64;
    assert_eq!(const_f32(&quant, "x::scale"), [(amax / 127.0) as f32]);
    // No QuantizeLinear reads the output of a weighted op; conv3's input c2 stays float.
    for q in ops(&quant, "QuantizeLinear") {
        let p = producer_op(&quant, &q.inputs[0]);
        assert!(
            !matches!(p, Some("Conv" | "Gemm" | "MatMul" | "ConvTranspose")),
            "{} quantizes the output of a {p:?}",
            q.name
        );
    }
    assert!(plan.kept_float["c2"].contains("weighted op"), "{:?}", plan.kept_float);
    assert_eq!(node_named(&quant, "conv3").inputs, ["c2", "W3::dq"]);
    // Bias stays float and is read as such.
    assert!(plan.biases.is_empty());
    assert_eq!(node_named(&quant, "conv1").inputs, ["x::dq", "W1::dq", "b1"]);
    assert_eq!(node_named(&quant, "conv2").inputs, ["r::dq", "W2::dq", "b2"]);
    assert_eq!(dtype(&quant, "b1"), DataType::Float);
    assert!(
        quant
            .graph
            .constants
            .values()
            .all(|c| c.tensor.data_type() != DataType::Int32 as i32),
        "no int32 bias"
    );
}

// ---------------------------------------------------------------------------------------------
// 1e. Numbers: the quantized model against the float one
// ---------------------------------------------------------------------------------------------

/// Bounds for conv_relu_conv on uniform [-1, 1) inputs, from the rounding noise of each grid
/// (noise power Δ²/12 against the signal's):
/// - the input grid (uint8 over [-1, 1], Δ = 2/255): 10·log10((1/3)/(Δ²/12)) = 10·log10(255²)
///   ≈ 48.1 dB;
/// - per-channel int8 weights uniform in [-a, a] (Δ = a/127): 10·log10(4·127²) ≈ 48.1 dB;
/// - so conv1's output carries two independent 48.1 dB noises: ≈ 45.1 dB (the bias adds signal,
///   not noise);
/// - the Relu output's uint8 grid spans the widest channel (≈ 46 dB), conv2's weights another
///   ≈ 48 dB: the output ≈ 42 dB on the calibration data, where no value is clipped.
///
/// Bounds 2 to 4 dB under those. Checked once by hand against corrupted scales: x::scale ×0.5
/// (clipping) gives 9 dB, r::scale ×0.5 15 dB, W1::scale ×1.1 19 dB, W2::scale ×0.9 19 dB,
/// b1::scale ×2 16 dB, b2::scale ×2 13 dB: all fail; x::scale ×2 fails the conv1 bound (41.0 dB).
const MIN_CONV1_SQNR_DB: f64 = 43.0;
const MIN_OUTPUT_SQNR_DB: f64 = 38.0;
/// On held-out data, values beyond the range 8 calibration samples saw are clipped (the Relu
/// output peaks ≈ 0.8 above its calibrated maximum here), which costs up to 10 dB more.
const MIN_HELD_OUT_SQNR_DB: f64 = 25.0;

fn output_sqnr(report: &onnxq::verify::VerifyReport) -> f64 {
    match &report.output("y").unwrap().comparison {
        Comparison::Float(m) => {
            assert!(!m.identical, "quantization must change something");
            m.sqnr_db
        }
        other => panic!("float output expected: {other:?}"),
    }
}

#[test]
fn quantized_conv_net_is_close_to_the_float_one() {
    let dir = tempfile::tempdir().unwrap();
    let float = conv_relu_conv(11, false);
    let calib = x_data(dir.path(), "calib.npz", 1);
    let eval = x_data(dir.path(), "eval.npz", 2);
    let stats = calibrate(&float, &calib);
    let (_, quant, _) = quantize(&float, &stats, &plan_options(Target::Generic, Overrides::default()));

    let on_calib = verify(&float, &quant, &open_data(&float, &calib), &VerifyOptions::default()).unwrap();
    let sqnr = output_sqnr(&on_calib);
    assert!(sqnr > MIN_OUTPUT_SQNR_DB && sqnr < 50.0, "SQNR {sqnr} dB\n{on_calib}");
    let c1 = on_calib.layer("c1").unwrap().sqnr_db;
    assert!(c1 > MIN_CONV1_SQNR_DB && c1 < 50.0, "conv1 {c1} dB\n{on_calib}");

    let held_out = verify(&float, &quant, &open_data(&float, &eval), &VerifyOptions::default()).unwrap();
    let sqnr = output_sqnr(&held_out);
    assert!(sqnr > MIN_HELD_OUT_SQNR_DB, "SQNR {sqnr} dB\n{held_out}");
    assert!(held_out.passed());
}

#[test]
fn equalising_through_hardswish_pays_off_with_per_tensor_weights() {
    // conv1's output channels span 16× (as after folding a BatchNorm): one per-tensor scale rounds
    // the narrow channels to a few levels, and HardSwish breaks the chain unless rewritten.
    let w1: Vec<f32> = values(6 * 3 * 9, 71, 1.0)
        .iter()
        .enumerate()
        .map(|(i, v)| v * 4f32.powi((i / 27) as i32 % 4 - 1))
        .collect();
    // conv2 reads the narrow channels with the large weights (a BatchNorm normalised them: each
    // channel matters as much downstream).
    let w2: Vec<f32> = values(2 * 6, 73, 1.0)
        .iter()
        .enumerate()
        .map(|(i, v)| v / 4f32.powi((i % 6) as i32 % 4 - 1))
        .collect();
    let g = graph(
        vec![
            node("Conv", "conv1", &["x", "W1", "b1"], &["c1"]),
            node("HardSwish", "hswish", &["c1"], &["h"]),
            node("Conv", "conv2", &["h", "W2"], &["y"]),
        ],
        vec![
            tensor_f32("W1", &[6, 3, 3, 3], &w1),
            tensor_f32("b1", &[6], &values(6, 72, 0.5)),
            tensor_f32("W2", &[2, 6, 1, 1], &w2),
        ],
        vec![f32_info("x", &[1, 3, 8, 8])],
        vec![f32_info("y", &[1, 2, 6, 6])],
    );
    let float = Model::from_proto(model(g, 17)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let calib = x_data(dir.path(), "calib.npz", 7);
    let eval = x_data(dir.path(), "eval.npz", 8);
    let mut options = plan_options(Target::Generic, Overrides::default());
    options.rules.per_channel_weights = false;
    let sqnr = |m: &Model| {
        let (_, quant, _) = quantize(m, &calibrate(m, &calib), &options);
        output_sqnr(&verify(&float, &quant, &open_data(&float, &eval), &VerifyOptions::default()).unwrap())
    };
    let mut equalised = float.clone();
    let spec = onnxq::pipeline::PassSpec {
        name: "equalize".into(),
        options: serde_yaml::from_str("{hardswish: per_channel}").unwrap(),
    };
    onnxq::pipeline::run_pipeline(
        &mut equalised,
        &[spec],
        &mut onnxq::passes::Context::default(),
        &Default::default(),
    )
    .unwrap();
    let (plain, better) = (sqnr(&float), sqnr(&equalised));
    println!("per-tensor int8: {plain:.2} dB plain, {better:.2} dB equalised");
    assert!(
        better > plain + 6.0,
        "per-tensor int8: {plain:.2} dB plain, {better:.2} dB equalised"
    );
}

// ---------------------------------------------------------------------------------------------
// 1f. Determinism
// ---------------------------------------------------------------------------------------------

/// A wider net: conv1 (W [32,3,3,3]) → Relu → conv2 (W [64,32,3,3], 18432 values: the parallel
/// path of weight quantization) → Relu → GlobalAveragePool → Flatten → Gemm (W [64,10], b).
fn wide_net() -> Model {
    let nodes = vec![
        node("Conv", "conv1", &["x", "W1", "b1"], &["c1"]),
        node("Relu", "relu1", &["c1"], &["r1"]),
        node("Conv", "conv2", &["r1", "W2", "b2"], &["c2"]),
        node("Relu", "relu2", &["c2"], &["r2"]),
        node("GlobalAveragePool", "gap", &["r2"], &["g"]),
        node("Flatten", "flatten", &["g"], &["f"]),
        node("Gemm", "fc", &["f", "Wf", "bf"], &["y"]),
    ];
    let inits = vec![
        conv_weight("W1", &[32, 3, 3, 3], 41),
        tensor_f32("b1", &[32], &values(32, 42, 0.1)),
        conv_weight("W2", &[64, 32, 3, 3], 43),
        tensor_f32("b2", &[64], &values(64, 44, 0.1)),
        tensor_f32("Wf", &[64, 10], &values(640, 45, 0.3)),
        tensor_f32("bf", &[10], &values(10, 46, 0.1)),
    ];
    let g = graph(
        nodes,
        inits,
        vec![value_info("x", DataType::Float, &[1, 3, 12, 12])],
        vec![value_info("y", DataType::Float, &[1, 10])],
    );
    Model::from_proto(model(g, 13)).unwrap()
}

#[test]
fn plan_and_qdq_are_byte_identical_whatever_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let float = wide_net();
    let data = write_data(
        dir.path(),
        "calib.npz",
        vec![("x", uniform(&[1, 3, 12, 12], SAMPLES, 5, 1.0))],
    );
    let run = || {
        let stats = calibrate(&float, &data);
        let (plan, quant, notes) = quantize(&float, &stats, &plan_options(Target::Generic, Overrides::default()));
        (
            onnxq::onnx::model_bytes(&quant).unwrap(),
            serde_json::to_string(&plan).unwrap(),
            notes,
        )
    };
    let first = run();
    let second = run();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let serial = one.install(run);
    assert!(first.1.contains("\"W2\""), "the big weight is quantized");
    assert_eq!(first, second, "two runs differ");
    assert_eq!(first, serial, "one thread differs from the default pool");
    // And the result is a valid quantized model: Gemm weights per column (axis 1), int32 biases.
    use prost::Message;
    let quant = Model::from_proto(onnxq::proto::ModelProto::decode(first.0.as_slice()).unwrap()).unwrap();
    assert_eq!(node_named(&quant, "Wf::dq").attribute("axis").map(|a| a.i()), Some(1));
    assert_eq!(
        node_named(&quant, "fc").inputs,
        ["f::dq", "Wf::dq", "bf"],
        "fc writes the float graph output: float bias"
    );
    assert_eq!(dtype(&quant, "b2::quantized"), DataType::Int32);
}

// ---------------------------------------------------------------------------------------------
// 2. The main job on the shipped PaddleOCR classifier
// ---------------------------------------------------------------------------------------------

fn onnxq_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onnxq"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ppocr() -> PathBuf {
    repo("models/ppocr_mobile_v2_cls.onnx")
}

/// A config in `dir` with the shipped calibration data (absolute path) and `extra` lines.
fn ppocr_config(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("q.yaml");
    let text = format!(
        "calibration: {{data: {:?}}}\n{extra}",
        s(&repo("models/ppocr_mobile_v2_cls.calib.npz"))
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn verify_line(extra: &str) -> String {
    format!(
        "verify: {{data: {:?}{extra}}}\n",
        s(&repo("models/ppocr_mobile_v2_cls.eval.npz"))
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn count_ops(m: &Model, op: &str) -> usize {
    ops(m, op).len()
}

#[test]
fn cli_quantizes_and_verifies_the_shipped_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ppocr_config(dir.path(), &verify_line(""));
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("r.json");
    let o = onnxq_cli(&[s(&ppocr()), "--config", s(&cfg), "-o", s(&out), "--report", s(&report)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("verification on 8 samples in tract: passed"), "{text}");
    for needle in [
        "SQNR dB",
        "cosine",
        "top-1",
        "save_infer_model/scale_0.tmp_1",
        "of 8 rows",
        "layers:",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }

    let r = read_json(&report);
    let plan = &r["quantization"]["plan"];
    let activations = plan["activations"].as_object().unwrap();
    assert!(activations.len() > 10, "{} activations", activations.len());
    assert!(!plan["weights"].as_object().unwrap().is_empty());
    let sqnr = r["verification"]["outputs"][0]["sqnr_db"].as_f64().unwrap();
    assert!(sqnr > 15.0, "output SQNR {sqnr} dB");
    assert_eq!(r["verification"]["passed"], true);

    let quant = onnxq::onnx::load_model(&out).unwrap();
    assert!(quant.opset("").unwrap() >= 13, "{:?}", quant.opset(""));
    assert_eq!(count_ops(&quant, "QuantizeLinear"), activations.len());
    assert!(count_ops(&quant, "DequantizeLinear") > activations.len());
    let float = onnxq::onnx::load_model(&ppocr()).unwrap();
    assert_eq!(count_ops(&float, "QuantizeLinear"), 0);
    // Every Q/DQ reads constant parameters of the right kind: uint8, or uint16 for what the
    // accuracy guard raised to int16 (the plan says which).
    let sixteen: Vec<&String> = activations
        .iter()
        .filter(|(_, a)| a["scheme"]["dtype"] == "uint16")
        .map(|(t, _)| t)
        .collect();
    let guard = &r["quantization"]["guard"];
    let raised16 = guard["raised"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["precision"] == "int16")
        .count();
    assert!(
        sixteen.is_empty() == (raised16 == 0 || guard["kept"] == false),
        "{sixteen:?}\n{guard:#}"
    );
    for q in ops(&quant, "QuantizeLinear") {
        assert_eq!(dtype(&quant, &q.inputs[1]), DataType::Float, "{}", q.name);
        let expected = if sixteen.iter().any(|t| q.inputs[0] == **t) {
            DataType::Uint16
        } else {
            DataType::Uint8
        };
        assert_eq!(dtype(&quant, &q.inputs[2]), expected, "{}", q.name);
    }
}

#[test]
fn cli_dry_run_prints_the_plan_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ppocr_config(dir.path(), "");
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("r.json");
    let o = onnxq_cli(&[
        s(&ppocr()),
        "--config",
        s(&cfg),
        "-o",
        s(&out),
        "--report",
        s(&report),
        "--dry-run",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("stdout is the plan as JSON");
    for key in ["activations", "weights", "biases", "kept_float"] {
        assert!(plan[key].is_object(), "{key} missing from the plan");
    }
    let first = plan["activations"].as_object().unwrap().values().next().unwrap();
    assert!(first["params"]["scale"].as_f64().unwrap() > 0.0, "{first}");
    assert!(stderr(&o).contains("dry run"), "{}", stderr(&o));
    assert!(!out.exists(), "a dry run writes no model");
    assert!(!report.exists(), "a dry run writes no report");
}

#[test]
fn cli_verification_below_threshold_exits_3_and_still_writes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ppocr_config(dir.path(), &verify_line(", min_sqnr_db: 200"));
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("r.json");
    let o = onnxq_cli(&[s(&ppocr()), "--config", s(&cfg), "-o", s(&out), "--report", s(&report)]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("verification failed") && err.contains("below 200 dB"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(stdout(&o).contains("FAILED"), "{}", stdout(&o));
    let r = read_json(&report);
    assert_eq!(r["verification"]["passed"], false);
    assert_eq!(r["verification"]["failures"][0]["metric"], "sqnr_db");
    assert_eq!(r["verification"]["failures"][0]["threshold"], 200.0);
    let quant = onnxq::onnx::load_model(&out).unwrap();
    assert!(count_ops(&quant, "QuantizeLinear") > 0);
}

/// A one-line `error:` on stderr with exit code 1, and nothing written.
fn assert_config_error(o: &Output, needles: &[&str], out: &Path) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "a one-line error, before any work: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} missing from: {err}");
    }
    assert!(!out.exists());
}

#[test]
fn cli_config_errors_stop_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let cfg = ppocr_config(dir.path(), "overrides: [{tensor: no_such_tensor, exclude: true}]\n");
    let o = onnxq_cli(&[s(&ppocr()), "--config", s(&cfg), "-o", s(&out)]);
    assert_config_error(&o, &["no_such_tensor", "matches nothing", s(&cfg)], &out);

    let cfg = ppocr_config(dir.path(), "target: tensorrt\nactivations: {symmetric: false}\n");
    let o = onnxq_cli(&[s(&ppocr()), "--config", s(&cfg), "-o", s(&out)]);
    assert_config_error(&o, &["symmetric only", s(&cfg)], &out);
}

// ---------------------------------------------------------------------------------------------
// Regressions: bugs these tests found, each asserting the correct behaviour.
// ---------------------------------------------------------------------------------------------

/// Regression (src/quant/plan.rs, build_plan, the `for s in data` loop): the data input of a
/// pass-through op (Transpose, Reshape, MaxPool, ...) was quantized even when nothing quantized
/// read the op's output. Here the generic target keeps the residual Add float on purpose
/// (outlier channels), yet `res` gets Q/DQ because a Transpose follows it on its way to a
/// Softmax: quantization error on a path that stays float, for no int8 op. ONNX Runtime's QDQ
/// quantizer quantizes such ops only when their input is quantized already.
#[test]
fn a_pass_through_op_is_quantized_only_for_a_quantized_reader() {
    let dir = tempfile::tempdir().unwrap();
    let g = graph(
        vec![
            node("MatMul", "mm", &["x", "W"], &["h"]),
            node("Add", "residual", &["h", "x"], &["res"]),
            with_attr(node("Transpose", "tr", &["res"], &["t"]), attr_ints("perm", &[0, 2, 1])),
            with_attr(node("Softmax", "sm", &["t"], &["y"]), attr_int("axis", -1)),
        ],
        vec![tensor_f32("W", &[4, 4], &values(16, 5, 0.5))],
        vec![value_info("x", DataType::Float, &[1, 3, 4])],
        vec![value_info("y", DataType::Float, &[1, 4, 3])],
    );
    let float = Model::from_proto(model(g, 13)).unwrap();
    let data = write_data(
        dir.path(),
        "calib.npz",
        vec![("x", uniform(&[1, 3, 4], SAMPLES, 9, 1.0))],
    );
    let stats = calibrate(&float, &data);
    let (plan, quant, _) = quantize(&float, &stats, &plan_options(Target::Generic, Overrides::default()));
    // The MatMul's input is quantized ...
    assert_eq!(node_named(&quant, "mm").inputs, ["x::dq", "W::dq"]);
    // ... the residual stream, which only reaches float ops, is not.
    assert!(
        !plan.activations.contains_key("res"),
        "res quantized for a lone Transpose: {:?}",
        plan.activations.keys().collect::<Vec<_>>()
    );
    assert_eq!(node_named(&quant, "tr").inputs, ["res"]);
}

/// Every Conv/Gemm reading an int32 bias through DequantizeLinear: the bias scale is its own
/// input scale times its own weight scale, channel by channel (integer kernels add the int32
/// values straight into their accumulators; ONNX Runtime's QDQ → QLinearConv fusion takes the
/// int32 data as is, without looking at the scale).
fn assert_int32_bias_scales_match(m: &Model) {
    let dq_of = |t: &str| {
        m.graph
            .nodes
            .node_weights()
            .find(|n| n.op_type == "DequantizeLinear" && n.outputs[0] == t)
    };
    let mut checked = 0;
    for n in m.graph.nodes.node_weights() {
        if !matches!(n.op_type.as_str(), "Conv" | "Gemm" | "ConvTranspose") || n.inputs.len() < 3 {
            continue;
        }
        let Some(bias_dq) = dq_of(&n.inputs[2]) else { continue };
        if dtype(m, &bias_dq.inputs[0]) != DataType::Int32 {
            continue;
        }
        let input_dq = dq_of(&n.inputs[0]).unwrap_or_else(|| panic!("{}: int32 bias behind a float input", n.name));
        let weight_dq = dq_of(&n.inputs[1]).unwrap_or_else(|| panic!("{}: int32 bias behind a float weight", n.name));
        let s_in = const_f32(m, &input_dq.inputs[1]);
        assert_eq!(s_in.len(), 1, "{}", n.name);
        let s_w = const_f32(m, &weight_dq.inputs[1]);
        let s_b = const_f32(m, &bias_dq.inputs[1]);
        assert_eq!(s_b.len(), s_w.len(), "{}", n.name);
        for (c, (&b, &w)) in s_b.iter().zip(&s_w).enumerate() {
            assert_eq!(
                b,
                (s_in[0] as f64 * w as f64) as f32,
                "{}: bias scale of channel {c} is not input scale {} × weight scale {w}",
                n.name,
                s_in[0]
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "no int32 bias to check");
}

#[test]
fn int32_bias_scales_match_their_conv_and_gemm() {
    let dir = tempfile::tempdir().unwrap();
    let float = conv_relu_conv(11, false);
    let data = x_data(dir.path(), "calib.npz", 1);
    let (_, quant, _) = quantize(
        &float,
        &calibrate(&float, &data),
        &plan_options(Target::Generic, Overrides::default()),
    );
    assert_int32_bias_scales_match(&quant);
    let float = wide_net();
    let data = write_data(
        dir.path(),
        "wide.npz",
        vec![("x", uniform(&[1, 3, 12, 12], SAMPLES, 5, 1.0))],
    );
    let (_, quant, _) = quantize(
        &float,
        &calibrate(&float, &data),
        &plan_options(Target::Generic, Overrides::default()),
    );
    assert_int32_bias_scales_match(&quant);
}

/// Regression (src/quant/plan.rs, the bias entry `plan.biases.entry(b).or_insert(BiasQuant { input:
/// n.inputs[0], .. })`, and src/quant/materialize.rs, which rewires every consumer to the one
/// `b::dq`): a bias constant shared by two Convs with different input scales was quantized once,
/// with the first Conv's input scale, and the second Conv read it too. Float semantics survive
/// (DQ gives back ≈ b), but the int32 values are 10× off for the second Conv's accumulator:
/// ONNX Runtime's QLinearConv fusion would add a bias 10× too large. Exporters and simplifiers
/// that deduplicate identical initializers produce such graphs.
#[test]
fn a_shared_bias_is_never_quantized_with_another_ops_scale() {
    let dir = tempfile::tempdir().unwrap();
    let g = graph(
        vec![
            node("Conv", "c1", &["x", "W", "b"], &["y1"]),
            node("Mul", "times_ten", &["x", "ten"], &["x10"]),
            node("Conv", "c2", &["x10", "W", "b"], &["y2"]),
        ],
        vec![
            conv_weight("W", &[2, 3, 1, 1], 3),
            tensor_f32("b", &[2], &[0.3, -0.2]),
            tensor_f32("ten", &[], &[10.0]),
        ],
        vec![value_info("x", DataType::Float, &[1, 3, 4, 4])],
        vec![
            value_info("y1", DataType::Float, &[1, 2, 4, 4]),
            value_info("y2", DataType::Float, &[1, 2, 4, 4]),
        ],
    );
    let float = Model::from_proto(model(g, 13)).unwrap();
    let data = write_data(
        dir.path(),
        "calib.npz",
        vec![("x", uniform(&[1, 3, 4, 4], SAMPLES, 9, 1.0))],
    );
    let (_, quant, _) = quantize(
        &float,
        &calibrate(&float, &data),
        &plan_options(Target::Generic, Overrides::default()),
    );
    assert_ne!(const_f32(&quant, "x::scale"), const_f32(&quant, "x10::scale"));
    // One int32 version cannot serve two input scales: the shared bias stays float.
    assert_eq!(node_named(&quant, "c1").inputs[2], "b");
    assert_eq!(node_named(&quant, "c2").inputs[2], "b");
}

/// float16 bits of `v` (exact for the normal, 10-bit-mantissa values used here).
fn f16_bits(v: f32) -> u16 {
    if v == 0.0 {
        return 0;
    }
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    assert!(
        (1..31).contains(&exp) && b & 0x1fff == 0,
        "{v} is not an exact normal f16"
    );
    sign | ((exp as u16) << 10) | ((b >> 13) & 0x3ff) as u16
}

/// Regression (src/quant/materialize.rs: `scalar_params_protos` and `to_protos` write float32
/// scales; `required_opset` ignores the activation type): a float16 activation got
/// `QuantizeLinear(xh: f16, scale: f32)` at opset 13, where QuantizeLinear takes float32 (or
/// int32) only, and from opset 19 on x and y_scale must have the same type; its float16 weight
/// comes back as float32 from DequantizeLinear, so the Conv gets float32 inputs while the rest of
/// the graph is float16. ONNX Runtime rejects the model (tract and the float lowering of the
/// verifier accept it, so verification passes). Correct: float16 scales at opset ≥ 19, or the
/// float16 tensors kept float with the reason, or a clear error.
#[test]
fn float16_layers_stay_float() {
    let dir = tempfile::tempdir().unwrap();
    let w = [0.25f32, -0.5, 0.125, 0.375, -0.75, 1.0];
    let wh = TensorProto {
        name: Some("W".into()),
        dims: vec![2, 3, 1, 1],
        data_type: Some(DataType::Float16 as i32),
        raw_data: Some(w.iter().flat_map(|v| f16_bits(*v).to_le_bytes()).collect()),
        ..Default::default()
    };
    let g = graph(
        vec![
            with_attr(
                node("Cast", "to_half", &["x"], &["xh"]),
                attr_int("to", DataType::Float16 as i64),
            ),
            node("Conv", "conv", &["xh", "W"], &["yh"]),
            with_attr(
                node("Cast", "to_float", &["yh"], &["y"]),
                attr_int("to", DataType::Float as i64),
            ),
        ],
        vec![wh],
        vec![value_info("x", DataType::Float, &[1, 3, 4, 4])],
        vec![value_info("y", DataType::Float, &[1, 2, 4, 4])],
    );
    let float = Model::from_proto(model(g, 13)).unwrap();
    let data = write_data(
        dir.path(),
        "calib.npz",
        vec![("x", uniform(&[1, 3, 4, 4], SAMPLES, 9, 1.0))],
    );
    let stats = calibrate(&float, &data);
    let Ok(plan) = build_plan(&float, &stats, &plan_options(Target::Generic, Overrides::default())) else {
        return; // refusing float16 is a correct answer
    };
    let mut quant = float.clone();
    if materialize(&mut quant, &plan).is_err() {
        return;
    }
    // Whatever was quantized is float16 on both sides of its Q/DQ.
    for n in quant.graph.nodes.node_weights() {
        let f16_q = n.op_type == "QuantizeLinear" && n.inputs[0] == "xh";
        let feeds_conv = n.op_type == "DequantizeLinear" && node_named(&quant, "conv").inputs.contains(&n.outputs[0]);
        if f16_q || feeds_conv {
            assert_eq!(
                dtype(&quant, &n.inputs[1]),
                DataType::Float16,
                "{} {}: a float32 scale in a float16 graph",
                n.op_type,
                n.name
            );
            assert!(quant.opset("").unwrap() >= 19, "float16 Q/DQ needs opset 19");
        }
    }
}

/// Overrides that change how a match is quantized: a per-tensor int8 weight for one node, a
/// 16-bit activation, a fixed range.
#[test]
fn overrides_set_dtype_granularity_and_range() {
    let dir = tempfile::tempdir().unwrap();
    let float = conv_relu_conv(13, false);
    let data = x_data(dir.path(), "calib.npz", 1);
    let stats = calibrate(&float, &data);
    let rules = overrides(
        "[{node: conv1, granularity: per_tensor}, {tensor: r, dtype: int16, symmetric: true}, {tensor: x, range: [-2, 2]}]",
    );
    let (plan, quant, notes) = quantize(&float, &stats, &plan_options(Target::Generic, rules));
    assert_eq!(plan.weights["W1"].axis, None, "conv1's weight per-tensor");
    assert_eq!(plan.weights["W2"].axis, Some(0), "conv2's weight keeps per-channel");
    assert_eq!(const_f32(&quant, "W1::scale").len(), 1);
    let r = &plan.activations["r"];
    assert_eq!(r.scheme.dtype, onnxq::quant::params::QuantDtype::Int16);
    assert_eq!(dtype(&quant, "r::zero_point"), DataType::Int16);
    assert_eq!(quant.opset(""), Some(21), "16-bit Q/DQ needs opset 21: {notes:?}");
    let x = &plan.activations["x"];
    assert_eq!(x.range, (-2.0, 2.0));
    // uint8 asymmetric over [-2, 2]: scale 4/255.
    assert_eq!(const_f32(&quant, "x::scale"), vec![(4.0f64 / 255.0) as f32]);
}

// ---------------------------------------------------------------------------------------------
// 4. Mixed precision
// ---------------------------------------------------------------------------------------------

#[test]
fn layers_at_float16_and_int16_are_rewritten_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let float = conv_relu_conv(11, false);
    let calib = x_data(dir.path(), "calib.npz", 1);
    let stats = calibrate(&float, &calib);
    let plan = build_plan(&float, &stats, &plan_options(Target::Generic, Overrides::default())).unwrap();
    assert_eq!(plan.layers().into_iter().collect::<Vec<_>>(), ["c1", "y"]);
    let mixed = plan.with_precisions(
        &[
            ("c1".to_string(), Precision::Float16),
            ("y".to_string(), Precision::Int16),
        ]
        .into(),
    );
    let mut after = float.clone();
    let notes = materialize(&mut after, &mixed).unwrap();
    after.graph.check().unwrap();
    assert!(notes.iter().any(|n| n.contains("raised from 11 to 21")), "{notes:?}");
    insta::assert_snapshot!("mixed_float16_int16", dump_diff(&float.to_string(), &after.to_string()));

    // conv1 reads float16 (input cast, weight and bias stored as float16) and writes float again.
    let conv1 = node_named(&after, "conv1");
    assert_eq!(conv1.inputs, ["x::float16", "W1::float16", "b1::float16"]);
    assert_eq!(dtype(&after, "W1::float16"), DataType::Float16);
    assert_eq!(producer_op(&after, "c1"), Some("Cast"));
    assert!(!after.graph.constants.contains_key("W1"), "the float32 weight goes");
    // conv2 reads a 16-bit activation and its 8-bit weight.
    assert_eq!(dtype(&after, "r::zero_point"), DataType::Uint16);
    assert_eq!(dtype(&after, "W2::quantized"), DataType::Int8);

    // Both raised layers make the model closer to the float one than int8 everywhere.
    let (_, int8, _) = quantize(&float, &stats, &plan_options(Target::Generic, Overrides::default()));
    let data = open_data(&float, &calib);
    let int8_db = output_sqnr(&verify(&float, &int8, &data, &VerifyOptions::default()).unwrap());
    let report = verify(&float, &after, &data, &VerifyOptions::default()).unwrap();
    let mixed_db = output_sqnr(&report);
    assert!(
        mixed_db > int8_db + 6.0,
        "int8 {int8_db} dB, mixed {mixed_db} dB\n{report}"
    );
}

#[test]
fn a_layer_whose_output_is_also_read_in_float_keeps_a_float_bias() {
    let dir = tempfile::tempdir().unwrap();
    let mut float = conv_relu_conv(13, true);
    let calib = x_data(dir.path(), "calib.npz", 1);
    let stats = calibrate(&float, &calib);
    // conv1 → Relu → r, read quantized by conv2 only: an integer kernel, int32 b1; conv2 writes
    // c2, read quantized by conv3: int32 b2.
    let plan = build_plan(&float, &stats, &plan_options(Target::Generic, Overrides::default())).unwrap();
    assert_eq!(plan.biases.keys().collect::<Vec<_>>(), ["b1", "b2"]);
    // r also a graph output: read in float too, so conv1 runs in float and b1 stays float.
    float
        .graph
        .outputs
        .push(value_info("r", DataType::Float, &[1, 4, 6, 6]));
    let stats = calibrate(&float, &calib);
    let (plan, quant, _) = quantize(&float, &stats, &plan_options(Target::Generic, Overrides::default()));
    assert_eq!(plan.biases.keys().collect::<Vec<_>>(), ["b2"]);
    assert_eq!(node_named(&quant, "conv1").inputs, ["x::dq", "W1::dq", "b1"]);
    assert_eq!(dtype(&quant, "b1"), DataType::Float);
    assert_eq!(dtype(&quant, "b2::quantized"), DataType::Int32);
}

#[test]
fn restricting_a_plan_keeps_only_that_layer_quantized() {
    let dir = tempfile::tempdir().unwrap();
    let float = conv_relu_conv(13, false);
    let calib = x_data(dir.path(), "calib.npz", 1);
    let stats = calibrate(&float, &calib);
    let plan = build_plan(&float, &stats, &plan_options(Target::Generic, Overrides::default())).unwrap();
    let only = plan.restricted_to(&["y".to_string()].into());
    assert_eq!(only.activations.keys().collect::<Vec<_>>(), ["r"]);
    assert_eq!(only.weights.keys().collect::<Vec<_>>(), ["W2"]);
    assert!(
        only.biases.is_empty(),
        "conv2 writes the float graph output: b2 stays float"
    );
    assert!(only.kept_float["x"].contains("'c1' at float"), "{:?}", only.kept_float);
    let first = plan.restricted_to(&["c1".to_string()].into());
    assert_eq!(first.activations.keys().collect::<Vec<_>>(), ["x"]);
    assert_eq!(first.weights.keys().collect::<Vec<_>>(), ["W1"]);
    assert_eq!(first.biases.keys().collect::<Vec<_>>(), ["b1"]);
    // A pinned precision from the overrides lands in the plan.
    let pinned = build_plan(
        &float,
        &stats,
        &plan_options(Target::Generic, overrides("[{node: conv1, precision: float}]")),
    )
    .unwrap();
    assert_eq!(pinned.precisions.get("c1"), Some(&Precision::Float));
    assert!(!pinned.weights.contains_key("W1"));
}

fn crepe_mixed_config(dir: &Path, mixed: &str) -> PathBuf {
    let p = dir.join("mixed.yaml");
    let text = format!(
        "calibration: {{data: {:?}}}\n{mixed}",
        s(&repo("models/crepe_tiny.calib.npz"))
    );
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn cli_mixed_precision_reaches_its_target_and_its_pins_reproduce_it() {
    let dir = tempfile::tempdir().unwrap();
    let target = 40.0;
    // The main job on crepe_tiny with `config`, which must succeed: its stderr.
    let quantize_crepe = |config: &Path, out: &Path, report: Option<&Path>| -> String {
        let model = repo("models/crepe_tiny.onnx");
        let mut args = vec![s(&model), "--config", s(config), "-o", s(out)];
        if let Some(r) = report {
            args.extend(["--report", s(r)]);
        }
        let o = onnxq_cli(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    // No passes: the figure the search measured is then the written model's (the default plan
    // passes, which run after the search, would move it; their own check is at the end).
    let config = crepe_mixed_config(
        dir.path(),
        &format!("passes: []\nmixed_precision: {{target_sqnr_db: {target}, samples: 4}}\n"),
    );
    let (out, report) = (dir.path().join("m.onnx"), dir.path().join("r.json"));
    let err = quantize_crepe(&config, &out, Some(&report));
    assert!(err.contains("layer or group (noisiest first)"), "{err}");
    let r = read_json(&report);
    let m = &r["quantization"]["mixed_precision"];
    assert_eq!(m["reached"], true, "{m:#}");
    let lower = m["final_lower_bound_db"].as_f64().unwrap();
    let measured = m["final_db"].as_f64().unwrap();
    assert!(lower >= target && measured >= lower, "{m:#}");
    assert!(m["all_int8_db"].as_f64().unwrap() < target, "{m:#}");
    // The bisection's units cover the 10 layers once each, noisiest first.
    let sensitivity = m["sensitivity"].as_array().unwrap();
    let mut layers: Vec<&str> = sensitivity
        .iter()
        .flat_map(|u| u["layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()))
        .collect();
    layers.sort();
    layers.dedup();
    let covered: usize = sensitivity.iter().map(|u| u["layers"].as_array().unwrap().len()).sum();
    assert_eq!((layers.len(), covered), (10, 10), "{sensitivity:#?}");
    let shares: Vec<f64> = sensitivity.iter().map(|u| u["share"].as_f64().unwrap()).collect();
    assert!(shares.windows(2).all(|w| w[0] >= w[1]), "ranked by share: {shares:?}");
    let raised = m["raised"].as_array().unwrap();
    assert!(!raised.is_empty() && raised.len() < 10, "{raised:?}");

    // The printed overrides pin the same assignment: the same model, byte for byte.
    let pins = m["overrides_yaml"].as_str().unwrap();
    let pinned_config = crepe_mixed_config(dir.path(), &format!("passes: []\n{pins}"));
    let pinned_out = dir.path().join("pinned.onnx");
    quantize_crepe(&pinned_config, &pinned_out, None);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&pinned_out).unwrap());

    // One thread searches and writes the same model as two.
    let single_out = dir.path().join("single.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_onnxq"))
        .args([
            s(&repo("models/crepe_tiny.onnx")),
            "--config",
            s(&config),
            "-o",
            s(&single_out),
        ])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&single_out).unwrap());

    // The measured figure is the verifier's on the same samples.
    let float = onnxq::onnx::load_model(&repo("models/crepe_tiny.onnx")).unwrap();
    let quant = onnxq::onnx::load_model(&out).unwrap();
    let cfg = Config::parse(
        &format!(
            "calibration: {{data: {:?}, samples: 4}}",
            s(&repo("models/crepe_tiny.calib.npz"))
        ),
        Path::new("c.yaml"),
    )
    .unwrap();
    let data = DataSource::open(cfg.calibration.as_ref().unwrap(), &InputSpec::of_graph(&float.graph)).unwrap();
    let report = verify(&float, &quant, &data, &VerifyOptions::default()).unwrap();
    let verified = match &report.output("pitch_probs").unwrap().comparison {
        Comparison::Float(f) => f.sqnr_db,
        other => panic!("{other:?}"),
    };
    assert!(
        (verified - measured).abs() < 0.01,
        "verify {verified} dB, search {measured} dB"
    );

    // With the default passes (gptq, correct_bias after the search), the pins still reproduce
    // the searched model: the plan passes see the same precisions either way.
    let report_path = dir.path().join("r2.json");
    let config = crepe_mixed_config(
        dir.path(),
        &format!("mixed_precision: {{target_sqnr_db: {target}, samples: 4}}\n"),
    );
    quantize_crepe(&config, &out, Some(&report_path));
    let r = read_json(&report_path);
    assert!(r["default_passes"].as_array().is_some_and(|d| !d.is_empty()), "{r:#}");
    let pins = r["quantization"]["mixed_precision"]["overrides_yaml"].as_str().unwrap();
    let pinned_config = crepe_mixed_config(dir.path(), pins);
    quantize_crepe(&pinned_config, &pinned_out, None);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&pinned_out).unwrap());
}

#[test]
fn cli_sensitivity_ranks_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    let config = crepe_mixed_config(dir.path(), "mixed_precision: {target_sqnr_db: 30, samples: 2}\n");
    let report = dir.path().join("s.json");
    let o = onnxq_cli(&[
        "sensitivity",
        s(&repo("models/crepe_tiny.onnx")),
        "--config",
        s(&config),
        "--report",
        s(&report),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("all layers int8:") && out.contains("/conv1/Conv_output_0"),
        "{out}"
    );
    let r = read_json(&report);
    // The units cover the 10 layers once each.
    let layers = r["layers"].as_array().unwrap();
    let covered: usize = layers.iter().map(|u| u["layers"].as_array().unwrap().len()).sum();
    assert_eq!(covered, 10, "{layers:#?}");
    for l in layers {
        // Quantizing one unit alone costs less than quantizing them all (null: no noise left for
        // it once its sibling's was subtracted, an infinite SQNR).
        assert!(
            l["only_this_int8_db"].as_f64().unwrap_or(f64::INFINITY) >= r["all_int8_db"].as_f64().unwrap() - 0.5,
            "{l}"
        );
    }
}

#[test]
fn mixed_precision_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, needle) in [
        ("mixed_precision: {samples: 4}", "set `target_sqnr_db`"),
        ("mixed_precision: {target_sqnr: 30}", "target_sqnr_db"),
        (
            "mixed_precision: {max_float_fraction: 2}",
            "max_float_fraction must be in [0, 1]",
        ),
        (
            "mixed_precision: {target_sqnr_db: 30, candidates: [int8]}",
            "candidates",
        ),
        (
            "target: tensorrt\nmixed_precision: {target_sqnr_db: 30, candidates: [int16]}",
            "TensorRT has no int16",
        ),
        ("overrides: [{tensor: x, precision: float16}]", "applies to a layer"),
        ("guard: {max_layer: 0.1}", "max_layers"),
        ("guard: {max_layers: 1.5}", "max_layers is a fraction"),
        ("guard: maybe", "guard is `true`, `false` or a map"),
        ("overrides: [{node: x, precision: half}]", "float16"),
    ] {
        let config = crepe_mixed_config(dir.path(), &format!("{yaml}\n"));
        let o = onnxq_cli(&[s(&repo("models/crepe_tiny.onnx")), "--config", s(&config)]);
        assert_eq!(o.status.code(), Some(1), "{yaml}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{yaml}: {}", stderr(&o));
    }
}

/// The main job on crepe_tiny with `yaml` after its calibration data, `extra` before the model:
/// its output (successful), the written model's path and the report.
fn crepe_guard_job(dir: &Path, yaml: &str, extra: &[&str]) -> (std::process::Output, PathBuf, serde_json::Value) {
    let config = crepe_mixed_config(dir, yaml);
    let (out, report) = (dir.join("g.onnx"), dir.join("g.json"));
    let model = repo("models/crepe_tiny.onnx");
    let mut args = extra.to_vec();
    args.extend([s(&model), "--config", s(&config), "-o", s(&out), "--report", s(&report)]);
    let o = onnxq_cli(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = read_json(&report);
    (o, out, r)
}

/// The accuracy guard, on by default: its units cover every layer, what it raises carries a
/// measured reason and is in the written plan only when it measured better; `guard: false`
/// leaves it out.
#[test]
fn the_guard_raises_what_measurably_helps_and_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let run = |yaml: &str| crepe_guard_job(dir.path(), yaml, &[]).2;
    let r = run("passes: []\n");
    let steps = step_names(&r);
    assert_eq!(steps, ["calibrate", "plan", "guard", "materialize"]);
    let g = &r["quantization"]["guard"];
    let covered: usize = g["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["layers"].as_array().unwrap().len())
        .sum();
    assert_eq!(covered, 10, "{g:#}");
    let raised = g["raised"].as_array().unwrap();
    let precisions = &r["quantization"]["plan"]["precisions"];
    if g["kept"] == true {
        assert!(
            g["guarded_db"].as_f64().unwrap() > g["all_int8_db"].as_f64().unwrap(),
            "{g:#}"
        );
        assert!(
            !raised.is_empty() && raised.len() <= 1,
            "at most 10% of 10 layers: {g:#}"
        );
        for d in raised {
            assert!(d["reason"].as_str().unwrap().contains("% of the all-int8 noise"), "{d}");
            assert_eq!(precisions[d["layer"].as_str().unwrap()], d["precision"], "{r:#}");
        }
    } else {
        assert!(
            precisions.is_null() || precisions.as_object().unwrap().is_empty(),
            "{r:#}"
        );
    }
    let r = run("passes: []\nguard: false\n");
    let steps = step_names(&r);
    assert_eq!(steps, ["calibrate", "plan", "materialize"]);
    assert!(r["quantization"]["guard"].is_null());
}

/// Where its measuring model (about five times the quantized weights) does not fit the memory
/// budget, the guard is skipped and says why; the job goes on.
#[test]
fn the_guard_steps_aside_when_its_measurement_does_not_fit_the_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (o, out, r) = crepe_guard_job(dir.path(), "passes: []\n", &["--max-memory", "1M"]);
    assert!(
        stderr(&o).contains("onnxq: guard: skipped: measuring needs about"),
        "{}",
        stderr(&o)
    );
    assert_eq!(step_names(&r), ["calibrate", "plan", "guard", "materialize"]);
    assert!(r["quantization"]["guard"].is_null(), "{r:#}");
    assert!(out.exists());
}

/// Regression: two float16 layers in a row (conv2 → conv3) stopped with "generated name
/// 'c2::float16' already exists in the model", exit code 2. conv3 now reads conv2's float16
/// output directly, and a model naming its own tensor like a generated one still quantizes.
/// conv_relu_conv (three convs) calibrated in `dir`, its plan, and the plan with its last two
/// layers (`c2`, `y`) at float16.
fn with_last_two_layers_float16(dir: &Path) -> (Model, PathBuf, Plan, Plan) {
    let float = conv_relu_conv(11, true);
    let calib = x_data(dir, "calib.npz", 1);
    let stats = calibrate(&float, &calib);
    let plan = build_plan(&float, &stats, &plan_options(Target::Generic, Overrides::default())).unwrap();
    let mixed = plan.with_precisions(
        &[
            ("c2".to_string(), Precision::Float16),
            ("y".to_string(), Precision::Float16),
        ]
        .into(),
    );
    (float, calib, plan, mixed)
}

#[test]
fn consecutive_float16_layers_share_the_float16_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (float, calib, _, mixed) = with_last_two_layers_float16(dir.path());
    let mut after = float.clone();
    materialize(&mut after, &mixed).unwrap();
    after.graph.check().unwrap();
    assert_eq!(node_named(&after, "conv2").outputs, ["c2::float16"]);
    assert_eq!(node_named(&after, "conv3").inputs, ["c2::float16", "W3::float16"]);
    assert_eq!(dtype(&after, "W3::float16"), DataType::Float16);
    let data = open_data(&float, &calib);
    let report = verify(&float, &after, &data, &VerifyOptions::default()).unwrap();
    assert!(output_sqnr(&report) > 30.0, "{report}");

    // A tensor of the model already called like a generated name: the generated one moves aside.
    let mut clash = float.clone();
    let relu = clash
        .graph
        .nodes
        .node_indices()
        .find(|&ix| clash.graph.nodes[ix].name == "relu")
        .unwrap();
    clash.graph.nodes[relu].outputs[0] = "c2::float16".into();
    let conv2 = clash
        .graph
        .nodes
        .node_indices()
        .find(|&ix| clash.graph.nodes[ix].name == "conv2")
        .unwrap();
    clash.graph.nodes[conv2].inputs[0] = "c2::float16".into();
    clash.graph.rebuild_edges().unwrap();
    let stats = calibrate(&clash, &calib);
    let plan = build_plan(&clash, &stats, &plan_options(Target::Generic, Overrides::default())).unwrap();
    let mixed = plan.with_precisions(&[("c2".to_string(), Precision::Float16)].into());
    materialize(&mut clash, &mixed).unwrap();
    clash.graph.check().unwrap();
    assert_eq!(node_named(&clash, "conv2").outputs, ["c2::float16.1"]);
}

#[test]
fn a_search_can_measure_float16_layers_without_their_activation_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let (float, calib, plan, mixed) = with_last_two_layers_float16(dir.path());
    let mut written = float.clone();
    materialize(&mut written, &mixed).unwrap();
    let casts_to_half = |m: &Model| {
        m.graph
            .nodes
            .node_weights()
            .filter(|n| n.op_type == "Cast" && n.attr_int("to") == Some(DataType::Float16 as i64))
            .count()
    };
    let mut lowered = onnxq::verify::lower::lower_all_qdq(&written).unwrap();
    assert!(casts_to_half(&lowered) > 0);
    let removed = onnxq::verify::lower::skip_float16_rounding(&mut lowered.graph).unwrap();
    assert!(removed > 0);
    assert_eq!(casts_to_half(&lowered), 0, "every activation rounding went");

    let data = open_data(&float, &calib);
    let probe = onnxq::quant::probe::Probe::new(&float, &data, 4, onnxq::runtime::Engine::Tract).unwrap();
    let total = |n: Vec<Vec<f64>>| onnxq::quant::probe::sum_samples(&n)[0];
    let exact = total(probe.sample_noise(&mixed).unwrap());
    let unrounded = total(probe.sample_noise_unrounded(&mixed).unwrap());
    // conv1 stays int8: its noise dominates, the float16 rounding adds a little.
    assert!(exact > 0.0 && unrounded > 0.0);
    assert_ne!(exact, unrounded, "the rounding was skipped");
    assert!(
        (exact - unrounded).abs() <= 0.1 * exact,
        "exact {exact}, unrounded {unrounded}"
    );
    // Without float16 layers the two are the same measurement.
    assert_eq!(
        total(probe.sample_noise(&plan).unwrap()),
        total(probe.sample_noise_unrounded(&plan).unwrap())
    );
}
