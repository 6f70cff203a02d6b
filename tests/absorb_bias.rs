//! `absorb_bias` after `fold_batchnorm`: the dump diff on small graphs (Conv→BN→Relu→Conv,
//! Conv→BN→Relu→depthwise Conv, Gemm→BN→Relu→Gemm with transB, and where it must not fire),
//! outputs in tract unchanged where every pre-activation exceeds c, the records updated, and the
//! shipped ppocr model.

mod common;

use common::*;
use onnxq::ir::Model;
use onnxq::onnx;
use onnxq::passes::Context;
use onnxq::pipeline::{dump_diff, run_passes, run_pipeline, DebugOptions, PassSpec};
use onnxq::proto::{NodeProto, TensorProto};
use onnxq::runtime::{to_f32_vec, Runner};
use tract_onnx::prelude::{IntoTValue, Tensor};

/// Runs fold_batchnorm then absorb_bias with the paper's 3σ (the graphs are built for it); the
/// diff is of absorb_bias alone, with its notes.
fn run(model: &Model) -> (String, Model, Model, Context) {
    run_with(model, "{sigmas: 3}")
}

fn run_with(model: &Model, options: &str) -> (String, Model, Model, Context) {
    let mut folded = model.clone();
    let mut ctx = Context::default();
    let debug = DebugOptions::default();
    run_passes(&mut folded, &["fold_batchnorm".into()], &mut ctx, &debug).unwrap();
    let mut after = folded.clone();
    let spec = PassSpec {
        name: "absorb_bias".into(),
        options: serde_yaml::from_str(options).unwrap(),
    };
    run_pipeline(&mut after, &[spec], &mut ctx, &debug).unwrap();
    let mut text = dump_diff(&folded.to_string(), &after.to_string());
    text.push_str("--- notes\n");
    for n in &ctx.pass_reports.last().unwrap().notes {
        text.push_str(n);
        text.push('\n');
    }
    (text, folded, after, ctx)
}

fn assert_same_outputs(before: &Model, after: &Model, shape: &[usize]) {
    let (want, got) = (outputs(before, shape), outputs(after, shape));
    for (o, (g, w)) in got.iter().zip(&want).enumerate() {
        let err = max_relative_error(g, w);
        assert!(err <= 1e-5, "output {o}: relative error {err:e}");
    }
}

/// Small seeded weights (|w| < 0.1), so the layer output stays near the BN's β.
fn weight(name: &str, dims: &[i64], seed: u64) -> TensorProto {
    let n = dims.iter().product::<i64>() as usize;
    let v: Vec<f32> = seeded(n, seed).iter().map(|x| x * 0.1).collect();
    tensor_f32(name, dims, &v)
}

/// A BatchNormalization with mean 0, var 1, scale `gamma`, bias `beta` per channel.
fn batchnorm(name: &str, x: &str, y: &str, gamma: &[f32], beta: &[f32]) -> (NodeProto, Vec<TensorProto>) {
    let c = gamma.len();
    batchnorm_node(name, x, y, gamma, beta, &vec![0.0; c], &vec![1.0; c])
}

#[test]
fn conv_bn_relu_conv() {
    // β − 3|γ| per channel: 5 − 1.5 = 3.5, 0.2 − 3 < 0 (nothing), 4 − 3·|−1| = 1.
    let model = conv_bn_act_conv(
        batchnorm("bn", "c1", "n1", &[0.5, 1.0, -1.0], &[5.0, 0.2, 4.0]),
        ("Relu", "relu", "r"),
        weight("w1", &[3, 2, 1, 1], 1),
        weight("w2", &[2, 3, 1, 1], 2),
    );
    let (diff, folded, after, ctx) = run(&model);
    insta::assert_snapshot!(diff);
    // Every pre-activation of channels 0 and 2 is far above c: exact.
    assert_same_outputs(&folded, &after, &[1, 2, 4, 4]);
    // The record's β is lowered by c.
    let r = &ctx.batchnorm_records[0];
    assert_eq!(r.beta, [1.5, 0.2, 3.0]);
}

#[test]
fn conv_bn_relu_depthwise_and_gemm() {
    // Conv → BN → Relu → depthwise Conv (own bias, pads: skipped by default; with
    // `padded: absorb` border outputs shift, and the note says so); Gemm (transB = 1) → BN → Relu
    // → Gemm (no C: one is created).
    let (bn1, p1) = batchnorm("bn1", "c1", "n1", &[0.5, 0.25], &[3.0, 2.0]);
    let (bn2, p2) = batchnorm("bn2", "g1", "n2", &[0.5, 0.5, 0.5], &[2.0, 0.0, 4.0]);
    let mut inits = vec![
        weight("w1", &[2, 1, 1, 1], 3),
        weight("wd", &[2, 1, 3, 3], 4),
        tensor_f32("bd", &[2], &[0.1, -0.1]),
        weight("B1", &[3, 4], 5),
        weight("B2", &[3, 2], 6),
    ];
    inits.extend(p1);
    inits.extend(p2);
    let dw = with_attr(
        with_attr(node("Conv", "dw", &["r1", "wd", "bd"], &["y1"]), attr_int("group", 2)),
        attr_ints("pads", &[1, 1, 1, 1]),
    );
    let g = graph(
        vec![
            node("Conv", "conv1", &["x", "w1"], &["c1"]),
            bn1,
            node("Relu", "relu1", &["n1"], &["r1"]),
            dw,
            with_attr(node("Gemm", "fc1", &["v", "B1"], &["g1"]), attr_int("transB", 1)),
            bn2,
            node("Relu", "relu2", &["n2"], &["r2"]),
            node("Gemm", "fc2", &["r2", "B2"], &["y2"]),
        ],
        inits,
        vec![f32_info("x", &[1, 1, 4, 4]), f32_info("v", &[2, 4])],
        vec![f32_info("y1", &[1, 2, 4, 4]), f32_info("y2", &[2, 2])],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (_, _, _, ctx) = run(&model);
    let notes = &ctx.pass_reports.last().unwrap().notes;
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("no absorption from Conv 'conv1'") && n.contains("zero-padded")),
        "{notes:#?}"
    );
    let (diff, folded, after, _) = run_with(&model, "{padded: absorb}");
    insta::assert_snapshot!(diff);
    // The Gemm output is exact (no padding).
    let feed = |m: &Model| {
        let runner = Runner::new(
            m,
            &[
                ("x".into(), tract_onnx::prelude::DatumType::F32, vec![1, 1, 4, 4]),
                ("v".into(), tract_onnx::prelude::DatumType::F32, vec![2, 4]),
            ],
            &[],
        )
        .unwrap();
        let x = Tensor::from_shape::<f32>(&[1, 1, 4, 4], &seeded(16, 1)).unwrap();
        let v = Tensor::from_shape::<f32>(&[2, 4], &seeded(8, 2)).unwrap();
        let outs = runner.run(vec![x.into_tvalue(), v.into_tvalue()]).unwrap();
        outs.iter().map(|t| to_f32_vec(t).unwrap()).collect::<Vec<_>>()
    };
    let (want, got) = (feed(&folded), feed(&after));
    assert!(max_relative_error(&got[1], &want[1]) <= 1e-5);
    // The depthwise output: the interior is exact, the border shifts (pads = 1, 3×3 kernel).
    for (i, (g, w)) in got[0].iter().zip(&want[0]).enumerate() {
        let (h, x) = ((i % 16) / 4, i % 4);
        let interior = (1..3).contains(&h) && (1..3).contains(&x);
        if interior {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "interior {i}: {g} vs {w}");
        }
    }
    assert!(got[0] != want[0], "the border shift is real");
}

#[test]
fn must_not_fire() {
    // a: no BatchNorm (no record); b: HardSwish between; c: LeakyRelu (absorption needs Relu).
    let (bn_b, pb) = batchnorm("bn_b", "cb", "nb", &[0.5, 0.5], &[5.0, 5.0]);
    let (bn_c, pc) = batchnorm("bn_c", "cc", "nc", &[0.5, 0.5], &[5.0, 5.0]);
    let mut inits = vec![
        weight("wa1", &[2, 2, 1, 1], 11),
        weight("wa2", &[2, 2, 1, 1], 12),
        weight("wb1", &[2, 2, 1, 1], 13),
        weight("wb2", &[2, 2, 1, 1], 14),
        weight("wc1", &[2, 2, 1, 1], 15),
        weight("wc2", &[2, 2, 1, 1], 16),
    ];
    inits.extend(pb);
    inits.extend(pc);
    let g = graph(
        vec![
            node("Conv", "conv_a1", &["x", "wa1"], &["ca"]),
            node("Relu", "relu_a", &["ca"], &["ra"]),
            node("Conv", "conv_a2", &["ra", "wa2"], &["ya"]),
            node("Conv", "conv_b1", &["x", "wb1"], &["cb"]),
            bn_b,
            node("HardSwish", "hswish_b", &["nb"], &["hb"]),
            node("Conv", "conv_b2", &["hb", "wb2"], &["yb"]),
            node("Conv", "conv_c1", &["x", "wc1"], &["cc"]),
            bn_c,
            node("LeakyRelu", "leaky_c", &["nc"], &["lc"]),
            node("Conv", "conv_c2", &["lc", "wc2"], &["yc"]),
        ],
        inits,
        vec![f32_info("x", &[1, 2, 2, 2])],
        ["ya", "yb", "yc"].iter().map(|o| f32_info(o, &[1, 2, 2, 2])).collect(),
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, folded, after, _) = run(&model);
    insta::assert_snapshot!(diff);
    assert_eq!(after.to_string(), folded.to_string(), "nothing may change");
}

#[test]
fn ppocr_after_fold_and_equalize() {
    let m = onnx::load_model(&repo("models/ppocr_mobile_v2_cls.onnx")).unwrap();
    let want = run_eval(&m, "models/ppocr_mobile_v2_cls.eval.npz");
    let flat = |r: &[Vec<Vec<f32>>]| -> Vec<f32> { r.iter().flat_map(|s| s[0].iter().copied()).collect() };
    let absorb = |options: &str| {
        let mut after = m.clone();
        let mut ctx = Context::default();
        let specs = [
            PassSpec {
                name: "fold_batchnorm".into(),
                options: serde_yaml::Value::Null,
            },
            PassSpec {
                name: "equalize".into(),
                options: serde_yaml::Value::Null,
            },
            PassSpec {
                name: "absorb_bias".into(),
                options: serde_yaml::from_str(options).unwrap(),
            },
        ];
        run_pipeline(&mut after, &specs, &mut ctx, &DebugOptions::default()).unwrap();
        let notes = ctx.pass_reports[2].notes.clone();
        let absorbed = notes.iter().filter(|n| n.starts_with("absorbed ")).count();
        let got = run_eval(&after, "models/ppocr_mobile_v2_cls.eval.npz");
        (absorbed, max_relative_error(&flat(&got), &flat(&want)), notes)
    };
    // The default 6σ absorbs nothing here and keeps the function.
    let (absorbed, err, notes) = absorb("~");
    assert_eq!(absorbed, 0, "{notes:#?}");
    assert!(err <= 1e-4, "relative change {err:e}");
    // The paper's 3σ absorbs one channel and is not float-preserving, measured why: the absorbed
    // channel (Conv@7 channel 11, c = 0.65 from β = 1.98, γ = 0.45) is N(1.57, 1.05²) on the
    // eval data, not the BatchNorm's N(1.98, 0.45²): 14% of its pre-activations are below c (the
    // model expects 0.135%), which moves the output by up to 11% (SQNR 23.9 dB, top-1 unchanged).
    let (absorbed, err, notes) = absorb("{sigmas: 3}");
    assert!(absorbed > 0, "{notes:#?}");
    assert!(err > 1e-3 && err <= 0.15, "relative change {err:e}");
}
