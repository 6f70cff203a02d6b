//! `fold_batchnorm` alone: snapshots of the dump diff on small graphs (each layer kind, the
//! Mul/Add form, and the cases where it must not fire, with their reasons), the outputs in tract
//! unchanged up to float rounding, the BatchNorm records it leaves, and the shipped models
//! (ppocr: Conv → BN everywhere, weights in Constant nodes; crepe: Conv → Relu → BN, never folded).

mod common;

use common::*;
use onnxq::ir::Model;
use onnxq::onnx;
use onnxq::passes::Context;
use onnxq::pipeline::{dump_diff, run_passes, DebugOptions};
use onnxq::proto::{AttributeProto, NodeProto, TensorProto};

/// Runs the pass; returns the dump diff with the notes appended, the model after, and the context.
fn run_fold(model: &Model) -> (String, Model, Context) {
    let mut after = model.clone();
    let mut ctx = Context::default();
    run_passes(
        &mut after,
        &["fold_batchnorm".to_string()],
        &mut ctx,
        &DebugOptions::default(),
    )
    .unwrap();
    let mut text = dump_diff(&model.to_string(), &after.to_string());
    text.push_str("--- notes\n");
    for n in &ctx.pass_reports[0].notes {
        text.push_str(n);
        text.push('\n');
    }
    (text, after, ctx)
}

fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(onnxq::proto::attribute_proto::AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

/// A seeded f32 constant of the given shape.
fn weight(name: &str, dims: &[i64], seed: u64) -> TensorProto {
    let n = dims.iter().product::<i64>() as usize;
    tensor_f32(name, dims, &seeded(n, seed))
}

/// BatchNormalization `name` over `x` with seeded parameters `<name>.{scale,B,mean,var}` of
/// `channels` values (var in [0.1, 1.1), scale away from 0), returned with the node.
fn batchnorm(name: &str, x: &str, y: &str, channels: i64, seed: u64) -> (NodeProto, Vec<TensorProto>) {
    let c = channels as usize;
    let scale: Vec<f32> = seeded(c, seed).iter().map(|v| v + 1.5).collect();
    let var: Vec<f32> = seeded(c, seed + 3).iter().map(|v| v.abs() + 0.1).collect();
    batchnorm_node(name, x, y, &scale, &seeded(c, seed + 1), &seeded(c, seed + 2), &var)
}

fn conv(name: &str, inputs: &[&str], y: &str) -> NodeProto {
    with_attr(node("Conv", name, inputs, &[y]), attr_ints("pads", &[1, 1, 1, 1]))
}

#[test]
fn conv_with_bias_then_batchnorm() {
    let (bn, params) = batchnorm("bn", "c", "y", 3, 10);
    let mut inits = vec![weight("w", &[3, 2, 3, 3], 1), weight("b", &[3], 2)];
    inits.extend(params);
    let g = graph(
        vec![conv("conv", &["x", "w", "b"], "c"), bn],
        inits,
        vec![f32_info("x", &[1, 2, 5, 5])],
        vec![f32_info("y", &[1, 3, 5, 5])],
    );
    let mut g = g;
    g.value_info.push(f32_info("c", &[1, 3, 5, 5]));
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after, ctx) = run_fold(&model);
    insta::assert_snapshot!(diff);
    assert_same_outputs(&model, &after, &[1, 2, 5, 5]);
    assert!(after.graph.value_info.is_empty(), "the intermediate's value_info goes");

    // The record keeps the BN statistics, keyed by the tensor the conv now writes.
    let [r] = ctx.batchnorm_records.as_slice() else {
        panic!("one record expected: {:?}", ctx.batchnorm_records)
    };
    assert_eq!((r.output.as_str(), r.weight.as_str()), ("y", "w"));
    let values = |name: &str| {
        let t = model.graph.constants[name].tensor.clone();
        onnxq::ir::tensor::values_f32(&t).unwrap()
    };
    assert_eq!(r.gamma, values("bn.scale"));
    assert_eq!(r.beta, values("bn.B"));
    assert_eq!(r.mean, values("bn.mean"));
    assert_eq!(r.var, values("bn.var"));
    assert_eq!(r.epsilon, 1e-5);
}

#[test]
fn conv_without_bias_then_batchnorm() {
    // The weight is a Constant node (as in ppocr): it is rewritten in place, and a bias is added.
    let w = with_attr(
        node("Constant", "w_node", &[], &["w"]),
        attr_tensor("value", weight("", &[4, 1, 3, 3], 3)),
    );
    let (bn, params) = batchnorm("bn", "c", "y", 4, 20);
    let bn = with_attr(bn, attr_float("epsilon", 1e-3));
    // Depthwise: group = 4.
    let cv = with_attr(conv("dw", &["x", "w"], "c"), attr_int("group", 4));
    let g = graph(
        vec![w, cv, bn, node("Relu", "relu", &["y"], &["z"])],
        params,
        vec![f32_info("x", &[1, 4, 5, 5])],
        vec![f32_info("z", &[1, 4, 5, 5])],
    );
    let model = Model::from_proto(model(g, 11)).unwrap();
    let (diff, after, ctx) = run_fold(&model);
    insta::assert_snapshot!(diff);
    assert_same_outputs(&model, &after, &[1, 4, 5, 5]);
    assert_eq!(ctx.batchnorm_records[0].epsilon, 1e-3);
    // Written out, the Constant node carries the folded weight.
    let proto = after.to_proto().unwrap();
    let constant = proto
        .graph
        .unwrap()
        .node
        .into_iter()
        .find(|n| n.op_type() == "Constant")
        .unwrap();
    let written = constant.attribute[0].t.clone().unwrap();
    assert_eq!(
        onnxq::ir::tensor::values_f32(&written),
        onnxq::ir::tensor::values_f32(&after.graph.constants["w"].tensor)
    );
}

#[test]
fn conv_transpose_then_batchnorm() {
    // group = 1 then group = 2 (output channel g·3 + j lives in weight rows of group g, column j).
    let (bn1, p1) = batchnorm("bn1", "t1", "y1", 4, 30);
    let (bn2, p2) = batchnorm("bn2", "t2", "y", 6, 40);
    let mut inits = vec![
        weight("w1", &[2, 4, 2, 2], 4),
        weight("b1", &[4], 5),
        weight("w2", &[4, 3, 3, 3], 6),
    ];
    inits.extend(p1);
    inits.extend(p2);
    let t1 = with_attr(
        node("ConvTranspose", "up1", &["x", "w1", "b1"], &["t1"]),
        attr_ints("strides", &[2, 2]),
    );
    let t2 = with_attr(
        node("ConvTranspose", "up2", &["y1", "w2"], &["t2"]),
        attr_int("group", 2),
    );
    let g = graph(
        vec![t1, bn1, t2, bn2],
        inits,
        vec![f32_info("x", &[1, 2, 3, 3])],
        vec![f32_info("y", &[1, 6, 8, 8])],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after, ctx) = run_fold(&model);
    insta::assert_snapshot!(diff);
    assert_same_outputs(&model, &after, &[1, 2, 3, 3]);
    let outputs: Vec<&str> = ctx.batchnorm_records.iter().map(|r| r.output.as_str()).collect();
    assert_eq!(outputs, ["y1", "y"]);
}

#[test]
fn gemm_then_batchnorm() {
    // transB = 1 with alpha, beta and a [1, N] C; then transB = 0 without C.
    let (bn1, p1) = batchnorm("bn1", "g1", "y1", 3, 50);
    let (bn2, p2) = batchnorm("bn2", "g2", "y", 5, 60);
    let mut inits = vec![
        weight("B1", &[3, 4], 7),
        weight("C1", &[1, 3], 8),
        weight("B2", &[3, 5], 9),
    ];
    inits.extend(p1);
    inits.extend(p2);
    let mut gemm1 = node("Gemm", "fc1", &["x", "B1", "C1"], &["g1"]);
    gemm1.attribute = vec![attr_int("transB", 1), attr_float("alpha", 0.5), attr_float("beta", 2.0)];
    let gemm2 = node("Gemm", "fc2", &["y1", "B2"], &["g2"]);
    let g = graph(
        vec![gemm1, bn1, gemm2, bn2],
        inits,
        vec![f32_info("x", &[2, 4])],
        vec![f32_info("y", &[2, 5])],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after, _) = run_fold(&model);
    insta::assert_snapshot!(diff);
    assert_same_outputs(&model, &after, &[2, 4]);
}

#[test]
fn mul_add_affine_form() {
    // Mul [C,1,1] then Add [1,C,1,1] (both fold), an Add alone (constant first), and a Mul by a
    // scalar into a Gemm.
    let inits = vec![
        weight("w1", &[3, 2, 3, 3], 11),
        weight("k1", &[3, 1, 1], 12),
        weight("a1", &[1, 3, 1, 1], 13),
        weight("w2", &[2, 3, 1, 1], 14),
        weight("b2", &[2], 15),
        weight("a2", &[2, 1, 1], 16),
        weight("B3", &[50, 4], 17),
        tensor_f32("k3", &[], &[-0.75]),
    ];
    let g = graph(
        vec![
            conv("conv1", &["x", "w1"], "c1"),
            node("Mul", "scale1", &["c1", "k1"], &["m1"]),
            node("Add", "shift1", &["m1", "a1"], &["s1"]),
            node("Relu", "relu", &["s1"], &["r"]),
            node("Conv", "conv2", &["r", "w2", "b2"], &["c2"]),
            node("Add", "shift2", &["a2", "c2"], &["s2"]),
            node("Flatten", "flat", &["s2"], &["f"]),
            node("Gemm", "fc", &["f", "B3"], &["g"]),
            node("Mul", "scale3", &["g", "k3"], &["y"]),
        ],
        inits,
        vec![f32_info("x", &[1, 2, 5, 5])],
        vec![f32_info("y", &[1, 4])],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after, ctx) = run_fold(&model);
    insta::assert_snapshot!(diff);
    assert_same_outputs(&model, &after, &[1, 2, 5, 5]);
    assert!(ctx.batchnorm_records.is_empty(), "no BatchNorm, no record");
}

#[test]
fn records_follow_a_later_affine_fold() {
    // Conv → BN → Mul → Add: the record moves to the Add's output, γ and β mapped through.
    let (bn, params) = batchnorm("bn", "c", "n", 2, 70);
    let mut inits = vec![
        weight("w", &[2, 1, 1, 1], 18),
        tensor_f32("k", &[2, 1, 1], &[2.0, -0.5]),
        tensor_f32("a", &[2, 1, 1], &[1.0, 3.0]),
    ];
    inits.extend(params);
    let g = graph(
        vec![
            node("Conv", "conv", &["x", "w"], &["c"]),
            bn,
            node("Mul", "mul", &["n", "k"], &["m"]),
            node("Add", "add", &["m", "a"], &["y"]),
        ],
        inits,
        vec![f32_info("x", &[1, 1, 3, 3])],
        vec![f32_info("y", &[1, 2, 3, 3])],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (_, after, ctx) = run_fold(&model);
    assert_same_outputs(&model, &after, &[1, 1, 3, 3]);
    assert_eq!(after.graph.nodes.node_count(), 1);
    let [r] = ctx.batchnorm_records.as_slice() else {
        panic!()
    };
    assert_eq!(r.output, "y");
    let gamma = onnxq::ir::tensor::values_f32(&model.graph.constants["bn.scale"].tensor).unwrap();
    let beta = onnxq::ir::tensor::values_f32(&model.graph.constants["bn.B"].tensor).unwrap();
    assert_eq!(r.gamma, [gamma[0] * 2.0, gamma[1] * -0.5]);
    assert_eq!(r.beta, [beta[0] * 2.0 + 1.0, beta[1] * -0.5 + 3.0]);
}

#[test]
fn must_not_fire() {
    let mut inits = vec![
        weight("wa", &[2, 2, 1, 1], 21),
        weight("wb", &[2, 2, 1, 1], 22),
        weight("wc", &[2, 2, 1, 1], 23),
        weight("w_shared", &[2, 2, 1, 1], 24),
        weight("wf", &[2, 2, 1, 1], 25),
        weight("wg", &[2, 2, 1, 1], 26),
        weight("wh", &[2, 2, 1, 1], 27),
        weight("kh", &[1, 1, 1, 4], 28),
        weight("wi", &[2, 2, 1, 1], 29),
        weight("ki", &[2], 30),
    ];
    let mut nodes = vec![];
    let mut add_bn = |nodes: &mut Vec<NodeProto>, bn: (NodeProto, Vec<TensorProto>)| {
        nodes.push(bn.0);
        inits.extend(bn.1);
    };
    // a: the conv output is read twice.
    nodes.push(node("Conv", "conv_a", &["x", "wa"], &["ca"]));
    add_bn(&mut nodes, batchnorm("bn_a", "ca", "ya", 2, 100));
    nodes.push(node("Sigmoid", "side_a", &["ca"], &["sa"]));
    // b: a Relu between the conv and the BN (crepe_tiny).
    nodes.push(node("Conv", "conv_b", &["x", "wb"], &["cb"]));
    nodes.push(node("Relu", "relu_b", &["cb"], &["rb"]));
    add_bn(&mut nodes, batchnorm("bn_b", "rb", "yb", 2, 110));
    // c: the conv output is a graph output.
    nodes.push(node("Conv", "conv_c", &["x", "wc"], &["cc"]));
    add_bn(&mut nodes, batchnorm("bn_c", "cc", "yc", 2, 120));
    // d, e: two convs share a weight.
    nodes.push(node("Conv", "conv_d", &["x", "w_shared"], &["cd"]));
    add_bn(&mut nodes, batchnorm("bn_d", "cd", "yd", 2, 130));
    nodes.push(node("Conv", "conv_e", &["x", "w_shared"], &["ce"]));
    add_bn(&mut nodes, batchnorm("bn_e", "ce", "ye", 2, 140));
    // f: training mode.
    nodes.push(node("Conv", "conv_f", &["x", "wf"], &["cf"]));
    let (bn_f, p) = batchnorm("bn_f", "cf", "yf", 2, 150);
    add_bn(&mut nodes, (with_attr(bn_f, attr_int("training_mode", 1)), p));
    // g: the mean is computed, not a constant.
    nodes.push(node("Conv", "conv_g", &["x", "wg"], &["cg"]));
    let (mut bn_g, p) = batchnorm("bn_g", "cg", "yg", 2, 160);
    bn_g.input[3] = "mean_g".into();
    nodes.push(node("Neg", "neg_g", &["bn_g.mean"], &["mean_g"]));
    add_bn(&mut nodes, (bn_g, p));
    // h: a Mul whose constant varies along the width, not per channel; i: an Add of a [C]
    // constant, which broadcasts along the width too.
    nodes.push(node("Conv", "conv_h", &["x", "wh"], &["ch"]));
    nodes.push(node("Mul", "mul_h", &["ch", "kh"], &["yh"]));
    nodes.push(node("Conv", "conv_i", &["x", "wi"], &["ci"]));
    nodes.push(node("Add", "add_i", &["ci", "ki"], &["yi"]));
    // j: a BN straight on the graph input.
    add_bn(&mut nodes, batchnorm("bn_j", "x", "yj", 2, 170));
    let outs: Vec<_> = ["ya", "sa", "yb", "cc", "yc", "yd", "ye", "yf", "yg", "yh", "yi", "yj"]
        .iter()
        .map(|o| f32_info(o, &[1, 2, 2, 2]))
        .collect();
    let g = graph(nodes, inits, vec![f32_info("x", &[1, 2, 2, 2])], outs);
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after, ctx) = run_fold(&model);
    insta::assert_snapshot!(diff);
    assert_eq!(after.to_string(), model.to_string(), "nothing may change");
    assert!(ctx.batchnorm_records.is_empty());
}

/// A Conv with `group: 0` (malformed: ONNX wants a positive group) is no candidate: the BN stays,
/// and the notes say why (the `ir::ops` view refuses the node), instead of a panic or a fold
/// that reads the group as 1.
#[test]
fn malformed_conv_is_kept_with_its_reason() {
    let (bn, params) = batchnorm("bn", "c", "y", 2, 180);
    let mut inits = vec![weight("w", &[2, 2, 1, 1], 31)];
    inits.extend(params);
    let conv = with_attr(node("Conv", "conv", &["x", "w"], &["c"]), attr_int("group", 0));
    let g = graph(
        vec![conv, bn],
        inits,
        vec![f32_info("x", &[1, 2, 2, 2])],
        vec![f32_info("y", &[1, 2, 2, 2])],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (_, after, ctx) = run_fold(&model);
    assert_eq!(after.to_string(), model.to_string(), "nothing may change");
    assert!(ctx.batchnorm_records.is_empty());
    let notes = &ctx.pass_reports[0].notes;
    assert!(
        notes.iter().any(|n| n.starts_with("kept BatchNormalization 'bn'")
            && n.contains("Conv 'conv': group 0 is not a positive number")),
        "{notes:?}"
    );
}

fn assert_close(got: &[Vec<Vec<f32>>], want: &[Vec<Vec<f32>>], tolerance: f64) {
    assert_eq!(got.len(), want.len());
    let outputs = want[0].len();
    for o in 0..outputs {
        let g: Vec<f32> = got.iter().flat_map(|s| s[o].iter().copied()).collect();
        let w: Vec<f32> = want.iter().flat_map(|s| s[o].iter().copied()).collect();
        let err = max_relative_error(&g, &w);
        assert!(err <= tolerance, "output {o}: relative error {err:e}");
    }
}

/// BatchNormalization nodes, and how many read the output of a Conv directly.
fn batchnorms(m: &Model) -> (usize, usize) {
    let producers = m.graph.producers();
    let bns: Vec<_> = m
        .graph
        .nodes
        .node_weights()
        .filter(|n| n.op_type == "BatchNormalization")
        .collect();
    let after_conv = bns
        .iter()
        .filter(|bn| {
            producers
                .get(bn.inputs[0].as_str())
                .is_some_and(|&(p, _)| m.graph.nodes[p].op_type == "Conv")
        })
        .count();
    (bns.len(), after_conv)
}

#[test]
fn ppocr_folds_every_batchnorm() {
    let m = onnx::load_model(&repo("models/ppocr_mobile_v2_cls.onnx")).unwrap();
    // Read from the graph: 35 BNs, each right after a Conv whose output it alone reads, and
    // every weight in a Constant node.
    assert_eq!(batchnorms(&m), (35, 35));
    let (_, after, ctx) = run_fold(&m);
    let notes = &ctx.pass_reports[0].notes;
    let folded = notes
        .iter()
        .filter(|n| n.starts_with("folded BatchNormalization"))
        .count();
    assert_eq!(folded, 35, "{notes:#?}");
    assert_eq!(notes.len(), 35, "nothing kept: {notes:#?}");
    assert_eq!(batchnorms(&after), (0, 0));
    assert_eq!(ctx.batchnorm_records.len(), 35);
    assert_eq!(m.graph.nodes.node_count() - after.graph.nodes.node_count(), 35);
    for r in &ctx.batchnorm_records {
        assert!(
            matches!(
                after.graph.constants[&r.weight].origin,
                onnxq::ir::ConstantOrigin::ConstantNode { modified: true, .. }
            ),
            "{}",
            r.weight
        );
    }

    let want = run_eval(&m, "models/ppocr_mobile_v2_cls.eval.npz");
    let got = run_eval(&after, "models/ppocr_mobile_v2_cls.eval.npz");
    assert_close(&got, &want, 1e-4);

    // Written and read back: checked, and the same outputs bit for bit.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("folded.onnx");
    onnx::save_model(&after, &path, &Default::default()).unwrap();
    let back = onnx::load_model(&path).unwrap();
    back.graph.check().unwrap();
    assert_eq!(batchnorms(&back), (0, 0));
    assert_eq!(run_eval(&back, "models/ppocr_mobile_v2_cls.eval.npz"), got);
}

#[test]
fn crepe_keeps_batchnorms_after_relu() {
    let m = onnx::load_model(&repo("models/crepe_tiny.onnx")).unwrap();
    // Read from the graph: 6 BNs, none reading a Conv (each comes after a Relu).
    assert_eq!(batchnorms(&m), (6, 0));
    let relu_first = m
        .graph
        .nodes
        .node_weights()
        .filter(|n| n.op_type == "BatchNormalization")
        .all(|bn| {
            let (p, _) = m.graph.producers()[bn.inputs[0].as_str()];
            m.graph.nodes[p].op_type == "Relu"
        });
    assert!(relu_first);
    let (_, after, ctx) = run_fold(&m);
    let notes = &ctx.pass_reports[0].notes;
    assert_eq!(notes.len(), 6, "{notes:#?}");
    assert!(
        notes
            .iter()
            .all(|n| n.starts_with("kept BatchNormalization") && n.contains("comes from Relu")),
        "{notes:#?}"
    );
    assert_eq!(after.to_string(), m.to_string(), "nothing may change");
    assert!(ctx.batchnorm_records.is_empty());

    let want = run_eval(&m, "models/crepe_tiny.eval.npz");
    assert_close(&run_eval(&after, "models/crepe_tiny.eval.npz"), &want, 1e-4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crepe.onnx");
    onnx::save_model(&after, &path, &Default::default()).unwrap();
    onnx::load_model(&path).unwrap().graph.check().unwrap();
}
