//! `equalize` alone: snapshots of the dump diff on small graphs (Conv→Relu→Conv, a depthwise
//! triplet, Gemm→Relu→Gemm with transB, through Pad(0) and MaxPool, the cases where it must not
//! fire with their reasons, ReLU6 replaced on request, ReLU6 and HardSwish rewritten per channel), the outputs in tract unchanged up to float
//! rounding, the per-channel ranges equal after convergence, and the shipped models.

mod common;

use common::*;
use onnxq::ir::Model;
use onnxq::onnx;
use onnxq::passes::Context;
use onnxq::pipeline::{dump_diff, run_pipeline, DebugOptions, PassSpec};
use onnxq::proto::attribute_proto::AttributeType;
use onnxq::proto::tensor_proto::DataType;
use onnxq::proto::{AttributeProto, NodeProto, TensorProto};

fn spec(name: &str, options: &str) -> PassSpec {
    PassSpec {
        name: name.into(),
        options: serde_yaml::from_str(options).unwrap(),
    }
}

/// Runs the passes; returns the dump diff with the last pass's notes appended, the model after,
/// and the context.
fn run(model: &Model, specs: &[PassSpec]) -> (String, Model, Context) {
    let mut after = model.clone();
    let mut ctx = Context::default();
    run_pipeline(&mut after, specs, &mut ctx, &DebugOptions::default()).unwrap();
    let mut text = dump_diff(&model.to_string(), &after.to_string());
    text.push_str("--- notes\n");
    for n in &ctx.pass_reports.last().unwrap().notes {
        text.push_str(n);
        text.push('\n');
    }
    (text, after, ctx)
}

fn run_equalize(model: &Model) -> (String, Model, Context) {
    run(model, &[spec("equalize", "~")])
}

fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

/// A seeded f32 constant whose channels along `axis` have very different ranges: channel c is
/// multiplied by 4^(c mod 3) / 4 along axis 0 (output channels), by 4^(2 − c mod 3) / 4 along
/// axis 1 (input channels), so consecutive layers are unbalanced in opposite directions.
fn weight(name: &str, dims: &[i64], axis: usize, seed: u64) -> TensorProto {
    let n = dims.iter().product::<i64>() as usize;
    let inner: i64 = dims[axis + 1..].iter().product();
    let len = dims[axis];
    let values: Vec<f32> = seeded(n, seed)
        .iter()
        .enumerate()
        .map(|(e, v)| {
            let c = (e as i64 / inner) % len;
            let k = if axis == 0 { c % 3 } else { 2 - c % 3 };
            v * 4f32.powi(k as i32) / 4.0
        })
        .collect();
    tensor_f32(name, dims, &values)
}

fn i64_tensor(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

fn conv(name: &str, inputs: &[&str], y: &str) -> NodeProto {
    with_attr(node("Conv", name, inputs, &[y]), attr_ints("pads", &[1, 1, 1, 1]))
}

fn values(m: &Model, name: &str) -> Vec<f32> {
    onnxq::ir::tensor::values_f32(&m.graph.constants[name].tensor).unwrap()
}

/// Per-channel max |W| of a [O, I/g, k…] Conv weight: (per output channel, per input channel).
fn conv_ranges(m: &Model, name: &str, group: usize) -> (Vec<f32>, Vec<f32>) {
    let dims: Vec<usize> = m.graph.constants[name]
        .tensor
        .dims
        .iter()
        .map(|&d| d as usize)
        .collect();
    let w = values(m, name);
    let inner: usize = dims[2..].iter().product();
    let (o_n, i_pg) = (dims[0], dims[1]);
    let mut out = vec![0f32; o_n];
    let mut inp = vec![0f32; i_pg * group];
    for (e, v) in w.iter().enumerate() {
        let o = e / (i_pg * inner);
        let i = (o / (o_n / group)) * i_pg + (e / inner) % i_pg;
        out[o] = out[o].max(v.abs());
        inp[i] = inp[i].max(v.abs());
    }
    (out, inp)
}

fn assert_equal_ranges(a: &[f32], b: &[f32], tolerance: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x / y - 1.0).abs() <= tolerance, "ranges differ: {a:?} vs {b:?}");
    }
}

#[test]
fn conv_relu_conv() {
    let inits = vec![
        weight("w1", &[3, 2, 3, 3], 0, 1),
        tensor_f32("b1", &[3], &[0.5, -0.25, 1.0]),
        weight("w2", &[2, 3, 3, 3], 1, 2),
        tensor_f32("b2", &[2], &[0.1, 0.2]),
    ];
    let g = graph(
        vec![
            conv("conv1", &["x", "w1", "b1"], "c1"),
            node("Relu", "relu", &["c1"], &["r"]),
            conv("conv2", &["r", "w2", "b2"], "y"),
        ],
        inits,
        vec![f32_info("x", &[1, 2, 5, 5])],
        vec![f32_info("y", &[1, 2, 5, 5])],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after, _) = run_equalize(&model);
    insta::assert_snapshot!(diff);
    assert_same_outputs(&model, &after, &[1, 2, 5, 5]);
    // The goal: the output-channel ranges of w1 equal the input-channel ranges of w2.
    let (r1, _) = conv_ranges(&after, "w1", 1);
    let (_, r2) = conv_ranges(&after, "w2", 1);
    assert_equal_ranges(&r1, &r2, 1e-5);
    let (before1, _) = conv_ranges(&model, "w1", 1);
    assert!(
        before1[2] / before1[0] > 4.0,
        "the test weights start unequal: {before1:?}"
    );
}

#[test]
fn conv_depthwise_conv() {
    // Conv → Relu → depthwise Conv (group = 4) → PRelu (scalar slope) → Conv: two pairs sharing
    // the depthwise layer, iterated jointly.
    let inits = vec![
        weight("w1", &[4, 2, 1, 1], 0, 3),
        weight("wd", &[4, 1, 3, 3], 0, 4),
        tensor_f32("bd", &[4], &[0.3, -0.3, 0.2, 0.0]),
        weight("w3", &[3, 4, 1, 1], 1, 5),
        tensor_f32("slope", &[1], &[0.25]),
    ];
    let g = graph(
        vec![
            node("Conv", "expand", &["x", "w1"], &["c1"]),
            node("Relu", "relu", &["c1"], &["r1"]),
            with_attr(conv("dw", &["r1", "wd", "bd"], "c2"), attr_int("group", 4)),
            node("PRelu", "prelu", &["c2", "slope"], &["r2"]),
            node("Conv", "project", &["r2", "w3"], &["y"]),
        ],
        inits,
        vec![f32_info("x", &[1, 2, 5, 5])],
        vec![f32_info("y", &[1, 3, 5, 5])],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after, _) = run(&model, &[spec("equalize", "{tolerance: 1.0e-7, max_iterations: 100}")]);
    insta::assert_snapshot!(diff);
    assert_same_outputs(&model, &after, &[1, 2, 5, 5]);
    // At convergence both pairs have equal ranges.
    let (r1, _) = conv_ranges(&after, "w1", 1);
    let (rd_out, rd_in) = conv_ranges(&after, "wd", 4);
    let (_, r3) = conv_ranges(&after, "w3", 1);
    assert_equal_ranges(&r1, &rd_in, 1e-5);
    assert_equal_ranges(&rd_out, &r3, 1e-5);
}

#[test]
fn gemm_relu_gemm_with_trans_b() {
    // fc1: transB = 1, B1 [N=4, K=3], C [4]; fc2: transB = 0, B2 [K=4, N=2], C [1, 2].
    let inits = vec![
        weight("B1", &[4, 3], 0, 6),
        tensor_f32("C1", &[4], &[0.5, -0.5, 1.0, 2.0]),
        weight("B2", &[4, 2], 0, 7),
        tensor_f32("C2", &[1, 2], &[0.1, -0.1]),
    ];
    let mut fc1 = node("Gemm", "fc1", &["x", "B1", "C1"], &["h"]);
    fc1.attribute = vec![attr_int("transB", 1), attr_float("alpha", 0.5), attr_float("beta", 2.0)];
    let g = graph(
        vec![
            fc1,
            node("Relu", "relu", &["h"], &["r"]),
            node("Gemm", "fc2", &["r", "B2", "C2"], &["y"]),
        ],
        inits,
        vec![f32_info("x", &[2, 3])],
        vec![f32_info("y", &[2, 2])],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after, _) = run_equalize(&model);
    insta::assert_snapshot!(diff);
    assert_same_outputs(&model, &after, &[2, 3]);
    // Rows of B1 (its output channels) against rows of B2 (its input channels).
    let row_max = |m: &Model, name: &str, cols: usize| -> Vec<f32> {
        values(m, name)
            .chunks(cols)
            .map(|r| r.iter().fold(0f32, |a, v| a.max(v.abs())))
            .collect()
    };
    assert_equal_ranges(&row_max(&after, "B1", 3), &row_max(&after, "B2", 2), 1e-5);
}

#[test]
fn through_pad_and_maxpool() {
    // Conv → Relu → Pad (pads computed from constants as PyTorch's F.pad exports them, value 0)
    // → MaxPool → Conv; then Identity and a second Pad with constant pads and no value input.
    let mut inits = vec![
        weight("w1", &[3, 2, 3, 3], 0, 8),
        weight("w2", &[3, 3, 3, 3], 1, 9),
        weight("w3", &[2, 3, 1, 1], 1, 10),
        i64_tensor("p.begin_end", &[4], &[0, 1, 0, 1]),
        i64_tensor("p.len", &[1], &[4]),
        i64_tensor("p.shape", &[2], &[-1, 2]),
        i64_tensor("p.starts", &[1], &[-1]),
        i64_tensor("p.ends", &[1], &[-9223372036854775807]),
        i64_tensor("p.axes", &[1], &[0]),
        i64_tensor("p.steps", &[1], &[-1]),
        i64_tensor("p.flat", &[1], &[-1]),
        i64_tensor("pads2", &[8], &[0, 0, 1, 1, 0, 0, 1, 1]),
    ];
    inits.push(tensor_f32("p.value", &[], &[0.0]));
    let zeros = with_attr(
        node("ConstantOfShape", "p.zeros", &["p.len"], &["p.z"]),
        attr_tensor("value", i64_tensor("", &[1], &[0])),
    );
    let g = graph(
        vec![
            node("Conv", "conv1", &["x", "w1"], &["c1"]),
            node("Relu", "relu", &["c1"], &["r"]),
            zeros,
            with_attr(
                node("Concat", "p.concat", &["p.begin_end", "p.z"], &["p.c"]),
                attr_int("axis", 0),
            ),
            node("Reshape", "p.reshape", &["p.c", "p.shape"], &["p.r"]),
            node(
                "Slice",
                "p.slice",
                &["p.r", "p.starts", "p.ends", "p.axes", "p.steps"],
                &["p.s"],
            ),
            with_attr(
                node("Transpose", "p.transpose", &["p.s"], &["p.t"]),
                attr_ints("perm", &[1, 0]),
            ),
            node("Reshape", "p.reshape2", &["p.t", "p.flat"], &["p.f"]),
            with_attr(node("Cast", "p.cast", &["p.f"], &["pads"]), attr_int("to", 7)),
            node("Pad", "pad", &["r", "pads", "p.value"], &["padded"]),
            with_attr(
                with_attr(
                    node("MaxPool", "pool", &["padded"], &["pooled"]),
                    attr_ints("kernel_shape", &[2, 2]),
                ),
                attr_ints("strides", &[1, 1]),
            ),
            node("Conv", "conv2", &["pooled", "w2"], &["c2"]),
            node("Identity", "same", &["c2"], &["c2b"]),
            node("Pad", "pad2", &["c2b", "pads2"], &["padded2"]),
            node("Conv", "conv3", &["padded2", "w3"], &["y"]),
        ],
        inits,
        vec![f32_info("x", &[1, 2, 6, 6])],
        vec![f32_info("y", &[1, 2, 6, 6])],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after, _) = run_equalize(&model);
    insta::assert_snapshot!(diff);
    assert_same_outputs(&model, &after, &[1, 2, 6, 6]);
}

#[test]
fn must_not_fire() {
    let inits = vec![
        weight("wa1", &[2, 2, 1, 1], 0, 21),
        weight("wa2", &[2, 2, 1, 1], 1, 22),
        weight("w_shared", &[2, 2, 1, 1], 0, 23),
        weight("wb2", &[2, 2, 1, 1], 1, 24),
        weight("wc1", &[2, 2, 1, 1], 0, 25),
        weight("wc2", &[2, 2, 1, 1], 1, 26),
        weight("wd1", &[2, 2, 1, 1], 0, 27),
        weight("wd2", &[2, 2, 1, 1], 1, 28),
        weight("we1", &[2, 2, 1, 1], 0, 29),
        weight("we2", &[2, 2, 1, 1], 1, 30),
        tensor_f32("zero", &[], &[0.0]),
        tensor_f32("six", &[], &[6.0]),
        weight("wf1", &[2, 2, 1, 1], 0, 31),
        weight("wf2", &[2, 2, 1, 1], 1, 32),
        tensor_f32("slope_f", &[1, 2, 1, 1], &[0.1, 0.2]),
    ];
    let nodes = vec![
        // a: HardSwish between (not positively homogeneous).
        node("Conv", "conv_a1", &["x", "wa1"], &["ca"]),
        node("HardSwish", "hswish_a", &["ca"], &["ha"]),
        node("Conv", "conv_a2", &["ha", "wa2"], &["ya"]),
        // b: the first layer's weight is shared with another conv.
        node("Conv", "conv_b1", &["x", "w_shared"], &["cb"]),
        node("Relu", "relu_b", &["cb"], &["rb"]),
        node("Conv", "conv_b2", &["rb", "wb2"], &["yb"]),
        node("Conv", "conv_b3", &["x", "w_shared"], &["yb3"]),
        // c: the Relu output in the middle is a graph output.
        node("Conv", "conv_c1", &["x", "wc1"], &["cc"]),
        node("Relu", "relu_c", &["cc"], &["rc"]),
        node("Conv", "conv_c2", &["rc", "wc2"], &["yc"]),
        // d: the first conv's output has two readers.
        node("Conv", "conv_d1", &["x", "wd1"], &["cd"]),
        node("Relu", "relu_d", &["cd"], &["rd"]),
        node("Conv", "conv_d2", &["rd", "wd2"], &["yd"]),
        node("Sigmoid", "side_d", &["cd"], &["sd"]),
        // e: a ReLU6 (Clip 0, 6) with the default `relu6: keep`.
        node("Conv", "conv_e1", &["x", "we1"], &["ce"]),
        node("Clip", "relu6_e", &["ce", "zero", "six"], &["re"]),
        node("Conv", "conv_e2", &["re", "we2"], &["ye"]),
        // f: a PRelu with a per-channel slope.
        node("Conv", "conv_f1", &["x", "wf1"], &["cf"]),
        node("PRelu", "prelu_f", &["cf", "slope_f"], &["rf"]),
        node("Conv", "conv_f2", &["rf", "wf2"], &["yf"]),
    ];
    let outs: Vec<_> = ["ya", "yb", "yb3", "rc", "yc", "yd", "sd", "ye", "yf"]
        .iter()
        .map(|o| f32_info(o, &[1, 2, 2, 2]))
        .collect();
    let g = graph(nodes, inits, vec![f32_info("x", &[1, 2, 2, 2])], outs);
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after, _) = run_equalize(&model);
    insta::assert_snapshot!(diff);
    assert_eq!(after.to_string(), model.to_string(), "nothing may change");
}

/// conv1 (weight `w1` [3,2,3,3]) → Clip(0, 6) with min/max as inputs → conv2 (`w2`, seeded).
fn conv_relu6_conv(w1: TensorProto) -> (Vec<NodeProto>, Vec<TensorProto>) {
    let inits = vec![
        w1,
        weight("w2", &[2, 3, 3, 3], 1, 42),
        tensor_f32("zero", &[], &[0.0]),
        tensor_f32("six", &[], &[6.0]),
    ];
    let nodes = vec![
        conv("conv1", &["x", "w1"], "c1"),
        node("Clip", "relu6", &["c1", "zero", "six"], &["r"]),
        conv("conv2", &["r", "w2"], "y"),
    ];
    (nodes, inits)
}

#[test]
fn relu6_as_relu_replaces_the_clip_and_says_so() {
    // Clip(0, 6) with min/max as inputs (opset 17), and one with attributes (opset 6 style is
    // not mixed in: a Clip with min 0 and max 6 as attributes is in its own graph below).
    let (nodes, inits) = conv_relu6_conv(weight("w1", &[3, 2, 3, 3], 0, 41));
    let g = graph(
        nodes.clone(),
        inits.clone(),
        vec![f32_info("x", &[1, 2, 5, 5])],
        vec![f32_info("y", &[1, 2, 5, 5])],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after, ctx) = run(&model, &[spec("equalize", "{relu6: as_relu}")]);
    insta::assert_snapshot!(diff);
    let notes = &ctx.pass_reports[0].notes;
    assert!(
        notes
            .iter()
            .any(|n| n.contains("replaced Clip 'relu6'") && n.contains("the function changes")),
        "{notes:#?}"
    );
    // The same as the original model with the Clip written as a Relu, up to rounding.
    let mut relu_nodes = nodes;
    relu_nodes[1] = node("Relu", "relu6", &["c1"], &["r"]);
    let g = graph(
        relu_nodes,
        inits[..2].to_vec(),
        vec![f32_info("x", &[1, 2, 5, 5])],
        vec![f32_info("y", &[1, 2, 5, 5])],
    );
    let relu_model = Model::from_proto(common::model(g, 17)).unwrap();
    assert_same_outputs(&relu_model, &after, &[1, 2, 5, 5]);

    // Attribute form (opset 6) is recognised too; Clip(0, 4) is not a ReLU6 and stays.
    let clip_attrs = |name: &str, max: f32, x: &str, y: &str| {
        let mut n = node("Clip", name, &[x], &[y]);
        n.attribute = vec![attr_float("min", 0.0), attr_float("max", max)];
        n
    };
    let g = graph(
        vec![
            node("Conv", "conv1", &["x", "w1"], &["c1"]),
            clip_attrs("relu6", 6.0, "c1", "r"),
            node("Conv", "conv2", &["r", "w2"], &["c2"]),
            clip_attrs("clip4", 4.0, "c2", "y"),
        ],
        inits[..2].to_vec(),
        vec![f32_info("x", &[1, 2, 5, 5])],
        vec![f32_info("y", &[1, 2, 1, 1])],
    );
    let clip_model = Model::from_proto(common::model(g, 6)).unwrap();
    let (_, after, ctx) = run(&clip_model, &[spec("equalize", "{relu6: as_relu}")]);
    let ops: Vec<&str> = after.graph.nodes.node_weights().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops.iter().filter(|o| **o == "Clip").count(), 1, "{ops:?}");
    assert_eq!(ops.iter().filter(|o| **o == "Relu").count(), 1, "{ops:?}");
    assert!(ctx.pass_reports[0].notes[0].starts_with("1 chain equalised"));
}

#[test]
fn relu6_per_channel_equalises_through_the_clip_and_keeps_the_function() {
    // Large conv1 weights: the clip at 6 is active on the seeded input.
    let w1 = weight("w1", &[3, 2, 3, 3], 0, 41);
    let w1: Vec<f32> = onnxq::ir::tensor::values_f32(&w1)
        .unwrap()
        .iter()
        .map(|v| v * 20.0)
        .collect();
    let (nodes, inits) = conv_relu6_conv(tensor_f32("w1", &[3, 2, 3, 3], &w1));
    let g = graph(
        nodes,
        inits,
        vec![f32_info("x", &[1, 2, 5, 5])],
        vec![f32_info("y", &[1, 2, 5, 5])],
    );
    let model = Model::from_proto(common::model(g, 17)).unwrap();
    let mut probe = model.clone();
    probe.graph.outputs[0] = f32_info("c1", &[1, 3, 5, 5]);
    let c1 = &common::outputs(&probe, &[1, 2, 5, 5])[0];
    assert!(
        c1.iter().any(|v| *v > 6.0) && c1.iter().any(|v| *v > 0.0 && *v < 6.0),
        "{c1:?}"
    );
    let (diff, after, ctx) = run(&model, &[spec("equalize", "{relu6: per_channel}")]);
    insta::assert_snapshot!(diff);
    let notes = &ctx.pass_reports[0].notes;
    assert!(
        notes
            .iter()
            .any(|n| n.contains("rewrote Clip 'relu6'") && n.contains("float-preserving")),
        "{notes:#?}"
    );
    // The clip bounds are 6/s per channel; equalised: per channel, the geometric mean of conv1's
    // output range and the clip bound equals conv2's input range...
    let bounds = values(&after, "r::upper_bound");
    assert_eq!(bounds.len(), 3);
    assert!(bounds.iter().any(|b| (b - 6.0).abs() > 0.1), "{bounds:?}");
    let (r1, _) = conv_ranges(&after, "w1", 1);
    let (_, r2) = conv_ranges(&after, "w2", 1);
    let side1: Vec<f32> = r1.iter().zip(&bounds).map(|(r, b)| (r * b).sqrt()).collect();
    assert_equal_ranges(&side1, &r2, 1e-3);
    // ...and the outputs are unchanged, inputs pushed well past the clip included.
    assert_same_outputs(&model, &after, &[1, 2, 5, 5]);
}

#[test]
fn hardswish_per_channel_equalises_through_both_forms_and_keeps_the_function() {
    // conv1 → HardSwish (the op) → conv2 → x·Clip(x + 3, 0, 6)/6 (as exporters write it) → conv3.
    let scaled = |t: TensorProto, k: f32| {
        let v: Vec<f32> = onnxq::ir::tensor::values_f32(&t)
            .unwrap()
            .iter()
            .map(|v| v * k)
            .collect();
        tensor_f32(t.name(), &t.dims, &v)
    };
    let inits = vec![
        scaled(weight("w1", &[3, 2, 3, 3], 0, 51), 8.0),
        tensor_f32("b1", &[3], &[0.5, -0.25, 1.0]),
        scaled(weight("w2", &[3, 3, 3, 3], 1, 52), 2.0),
        weight("w3", &[2, 3, 3, 3], 1, 53),
        tensor_f32("zero", &[], &[0.0]),
        tensor_f32("three", &[], &[3.0]),
        tensor_f32("six", &[], &[6.0]),
    ];
    let g = graph(
        vec![
            conv("conv1", &["x", "w1", "b1"], "c1"),
            node("HardSwish", "hswish", &["c1"], &["h1"]),
            conv("conv2", &["h1", "w2"], "c2"),
            node("Add", "add3", &["c2", "three"], &["a"]),
            node("Clip", "clip06", &["a", "zero", "six"], &["g"]),
            node("Mul", "times", &["c2", "g"], &["m"]),
            node("Div", "by6", &["m", "six"], &["h2"]),
            conv("conv3", &["h2", "w3"], "y"),
        ],
        inits,
        vec![f32_info("x", &[1, 2, 5, 5])],
        vec![f32_info("y", &[1, 2, 5, 5])],
    );
    let model = Model::from_proto(common::model(g, 17)).unwrap();
    // Both HardSwishes see inputs in their curved part and past it.
    for (t, c) in [("c1", 3), ("c2", 3)] {
        let mut probe = model.clone();
        probe.graph.outputs[0] = f32_info(t, &[1, c, 5, 5]);
        let v = &common::outputs(&probe, &[1, 2, 5, 5])[0];
        assert!(
            v.iter().any(|v| v.abs() > 3.0) && v.iter().any(|v| v.abs() < 3.0),
            "{t}: {v:?}"
        );
    }
    let (diff, after, ctx) = run(&model, &[spec("equalize", "{hardswish: per_channel}")]);
    insta::assert_snapshot!(diff);
    let notes = &ctx.pass_reports[0].notes;
    assert!(
        notes[0].starts_with("1 chain equalised (3 layers)") && notes[0].contains("2 HardSwish rewritten per channel"),
        "{notes:#?}"
    );
    for needle in [
        "rewrote HardSwish 'hswish' (HardSwish) to x·HardSigmoid(s·x)",
        "rewrote Add 'add3' (the Add of an exported HardSwish) to read s·x",
    ] {
        assert!(
            notes
                .iter()
                .any(|n| n.contains(needle) && n.contains("float-preserving")),
            "{needle}: {notes:#?}"
        );
    }
    // Weights alone are balanced (no clip bound to weigh in): each pair's ranges meet.
    let (r1, _) = conv_ranges(&after, "w1", 1);
    let (r2_out, r2_in) = conv_ranges(&after, "w2", 1);
    let (_, r3) = conv_ranges(&after, "w3", 1);
    assert_equal_ranges(&r1, &r2_in, 1e-3);
    assert_equal_ranges(&r2_out, &r3, 1e-3);
    let (before1, _) = conv_ranges(&model, "w1", 1);
    assert!(before1[2] / before1[0] > 4.0, "{before1:?}");
    assert_same_outputs(&model, &after, &[1, 2, 5, 5]);
    // Without the option, the HardSwish ends the walk and says how to go through it.
    let (_, _, ctx) = run(&model, &[spec("equalize", "~")]);
    assert!(
        ctx.pass_reports[0]
            .notes
            .iter()
            .any(|n| n.contains("option `hardswish: per_channel`")),
        "{:#?}",
        ctx.pass_reports[0].notes
    );
}

#[test]
fn unknown_options_are_refused() {
    let model = Model::from_proto(model(
        graph(vec![], vec![], vec![f32_info("x", &[1])], vec![f32_info("x", &[1])]),
        17,
    ))
    .unwrap();
    let mut m = model.clone();
    let err = run_pipeline(
        &mut m,
        &[spec("equalize", "{relu6: as_relu, tolerence: 0.1}")],
        &mut Context::default(),
        &DebugOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown field `tolerence`"), "{err}");
}

fn assert_close(got: &[Vec<Vec<f32>>], want: &[Vec<Vec<f32>>], tolerance: f64) {
    assert_eq!(got.len(), want.len());
    for o in 0..want[0].len() {
        let g: Vec<f32> = got.iter().flat_map(|s| s[o].iter().copied()).collect();
        let w: Vec<f32> = want.iter().flat_map(|s| s[o].iter().copied()).collect();
        let err = max_relative_error(&g, &w);
        println!("output {o}: max relative change {err:e}");
        assert!(err <= tolerance, "output {o}: relative error {err:e}");
    }
}

/// (chains equalised, layers that start no chain), from the notes.
fn counts(notes: &[String]) -> (usize, usize) {
    let chains = notes.iter().filter(|n| n.starts_with("equalised ")).count();
    let rejected = notes.iter().filter(|n| n.starts_with("no chain from ")).count();
    (chains, rejected)
}

#[test]
fn ppocr_after_fold_batchnorm() {
    let m = onnx::load_model(&repo("models/ppocr_mobile_v2_cls.onnx")).unwrap();
    let (_, after, ctx) = run(&m, &[spec("fold_batchnorm", "~"), spec("equalize", "~")]);
    let notes = &ctx.pass_reports[1].notes;
    println!("{}", notes.join("\n"));
    let (chains, rejected) = counts(notes);
    println!("ppocr_mobile_v2_cls: {chains} chains equalised, no chain from {rejected} layers");
    assert!(chains > 0, "{notes:#?}");
    let want = run_eval(&m, "models/ppocr_mobile_v2_cls.eval.npz");
    let got = run_eval(&after, "models/ppocr_mobile_v2_cls.eval.npz");
    assert_close(&got, &want, 1e-4);
}

#[test]
fn ppocr_through_its_hardswishes() {
    let m = onnx::load_model(&repo("models/ppocr_mobile_v2_cls.onnx")).unwrap();
    let fold = || spec("fold_batchnorm", "~");
    let (_, _, plain) = run(&m, &[fold(), spec("equalize", "~")]);
    let (_, after, ctx) = run(&m, &[fold(), spec("equalize", "{hardswish: per_channel}")]);
    let notes = &ctx.pass_reports[1].notes;
    println!("{}", notes.join("\n"));
    let layers = |notes: &[String]| -> usize {
        notes
            .iter()
            .filter(|n| n.starts_with("equalised "))
            .map(|n| n.matches(" → ").count() + 1)
            .sum()
    };
    let (before, now) = (layers(&plain.pass_reports[1].notes), layers(notes));
    println!("ppocr_mobile_v2_cls: {before} layers equalised, {now} through its HardSwishes");
    assert!(now >= before + 10, "{before} → {now}: {notes:#?}");
    assert!(notes[0].contains("HardSwish rewritten per channel"), "{}", notes[0]);
    let want = run_eval(&m, "models/ppocr_mobile_v2_cls.eval.npz");
    let got = run_eval(&after, "models/ppocr_mobile_v2_cls.eval.npz");
    assert_close(&got, &want, 1e-4);
}

#[test]
fn crepe_tiny() {
    let m = onnx::load_model(&repo("models/crepe_tiny.onnx")).unwrap();
    let (_, after, ctx) = run(&m, &[spec("fold_batchnorm", "~"), spec("equalize", "~")]);
    let notes = &ctx.pass_reports[1].notes;
    println!("{}", notes.join("\n"));
    let (chains, rejected) = counts(notes);
    println!("crepe_tiny: {chains} chains equalised, no chain from {rejected} layers");
    assert_eq!(
        chains + rejected,
        7,
        "every Conv and the Gemm is accounted for: {notes:#?}"
    );
    let want = run_eval(&m, "models/crepe_tiny.eval.npz");
    let got = run_eval(&after, "models/crepe_tiny.eval.npz");
    assert_close(&got, &want, 1e-4);
}
