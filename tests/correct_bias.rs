//! `correct_bias` after planning: the dump diff and notes on a small graph (a corrected Conv that
//! gets a bias, and the layers it must not touch: a graph-input layer in analytical mode, a
//! MatMul, a Gemm with transA), errors on bad modes, the expected output error of a seeded conv
//! net with per-tensor int8 weights in tract with and without correction (both modes), and
//! data-free mode on the shipped ppocr model.

mod common;

use std::path::Path;

use common::*;
use onnxq::calib::datafree::stats_from_batchnorm;
use onnxq::calib::observers::Method;
use onnxq::calib::stats::{collect, CalibrationStats};
use onnxq::ir::Model;
use onnxq::passes::correct_bias;
use onnxq::passes::BiasCorrectionMode::{Analytical, Empirical};
use onnxq::passes::Context;
use onnxq::pipeline::{dump_diff, run_pipeline, DebugOptions, PassSpec};
use onnxq::quant::materialize::materialize;
use onnxq::quant::plan::{build_plan, Overrides, Plan, PlanOptions};
use onnxq::quant::rules::Target;
use onnxq::runtime::{to_f32_vec, Runner};
use tract_onnx::prelude::{DatumType, IntoTValue, Tensor};

fn spec(name: &str, options: &str) -> PassSpec {
    PassSpec {
        name: name.into(),
        options: serde_yaml::from_str(options).unwrap(),
    }
}

/// Runs the passes; returns the model and the context.
fn passes(model: &Model, specs: &[PassSpec]) -> (Model, Context) {
    let mut m = model.clone();
    let mut ctx = Context::default();
    run_pipeline(&mut m, specs, &mut ctx, &DebugOptions::default()).unwrap();
    (m, ctx)
}

/// Generic target, int8 per-tensor weights.
fn per_tensor_options() -> PlanOptions {
    let mut rules = Target::Generic.rules();
    rules.per_channel_weights = false;
    PlanOptions {
        target: Target::Generic,
        rules,
        method: Method::MinMax,
        overrides: Overrides::default(),
    }
}

/// What the main job does: plan, then the `correct_bias` plan pass with `options` when given
/// (it corrects, then re-plans so created biases get quantized), then materialise. Returns the
/// quantized model, the plan and the pass's notes.
fn quantize(
    model: &Model,
    ctx: Context,
    stats: &CalibrationStats,
    options: Option<&str>,
) -> (Model, Plan, Vec<String>) {
    let options_plan = per_tensor_options();
    let mut m = model.clone();
    let mut ctx = Context {
        plan: Some(build_plan(&m, stats, &options_plan).unwrap()),
        stats: Some(stats.clone()),
        plan_options: Some(options_plan),
        pass_reports: vec![],
        ..ctx
    };
    let mut notes = vec![];
    if let Some(options) = options {
        run_pipeline(
            &mut m,
            &[spec("correct_bias", options)],
            &mut ctx,
            &DebugOptions::default(),
        )
        .unwrap();
        notes = ctx.pass_reports[0].notes.clone();
    }
    let plan = ctx.plan.unwrap();
    let mut q = m.clone();
    materialize(&mut q, &plan).unwrap();
    (q, plan, notes)
}

// ---------------------------------------------------------------------------------------------
// The rewrite, and where it must not fire

/// Conv → BN → Relu → Conv (no bias); MatMul with a constant weight; Gemm with transA = 1.
fn small_graph() -> Model {
    let (bn, params) = batchnorm_node(
        "bn",
        "c1",
        "n1",
        &[0.5, 1.0, 0.25],
        &[1.0, 0.5, -0.5],
        &[0.0; 3],
        &[1.0; 3],
    );
    let mut inits = vec![
        conv_weight("w1", &[3, 2, 1, 1], 1),
        conv_weight("w2", &[2, 3, 1, 1], 2),
        conv_weight("M", &[3, 2], 3),
        conv_weight("G", &[3, 2], 4),
        tensor_f32("gc", &[2], &[0.5, -0.5]),
    ];
    inits.extend(params);
    let g = graph(
        vec![
            node("Conv", "conv1", &["x", "w1"], &["c1"]),
            bn,
            node("Relu", "relu", &["n1"], &["r"]),
            node("Conv", "conv2", &["r", "w2"], &["y1"]),
            node("MatMul", "matmul", &["v", "M"], &["y2"]),
            with_attr(
                node("Gemm", "gemm_t", &["u", "G", "gc"], &["y3"]),
                attr_int("transA", 1),
            ),
        ],
        inits,
        vec![
            f32_info("x", &[1, 2, 4, 4]),
            f32_info("v", &[2, 3]),
            f32_info("u", &[3, 2]),
        ],
        vec![
            f32_info("y1", &[1, 2, 4, 4]),
            f32_info("y2", &[2, 2]),
            f32_info("y3", &[2, 2]),
        ],
    );
    Model::from_proto(model(g, 17)).unwrap()
}

#[test]
fn analytical_rewrite_and_where_it_must_not_fire() {
    let (folded, ctx) = passes(&small_graph(), &[spec("fold_batchnorm", "~")]);
    let stats = stats_from_batchnorm(&folded, &ctx.batchnorm_records, 6.0).unwrap();
    let plan = build_plan(&folded, &stats, &per_tensor_options()).unwrap();
    let mut after = folded.clone();
    let notes = correct_bias::apply(&mut after, &plan, Some(&stats), Analytical, &ctx.batchnorm_records).unwrap();
    let mut text = dump_diff(&folded.to_string(), &after.to_string());
    text.push_str("--- notes\n");
    for n in &notes {
        text.push_str(n);
        text.push('\n');
    }
    insta::assert_snapshot!(text);
    // conv2's new bias is −Δb with Δb = (W̃2 − W2)·E[relu(N(β, γ²))], recomputed here by hand.
    let w2 = to_values(&folded, "w2");
    let e: Vec<f64> = [(1.0, 0.5), (0.5, 1.0), (-0.5, 0.25)]
        .iter()
        .map(|&(b, g)| correct_bias::clipped_normal_mean(b, g, 0.0, f64::INFINITY))
        .collect();
    assert_corrected_by_hand(&after, &w2, &e, 1e-6);
}

/// conv2's new bias is −Δb with Δb = (W̃2 − W2)·E[x], W̃2 per-tensor int8 of `w2` [2, 3, 1, 1]
/// and `e` the expected input per channel.
fn assert_corrected_by_hand(after: &Model, w2: &[f32], e: &[f64], tolerance: f64) {
    let scale = w2.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
    let conv2 = after.graph.nodes.node_weights().find(|n| n.name == "conv2").unwrap();
    let bias = to_values(after, &conv2.inputs[2]);
    for o in 0..2 {
        let delta: f64 = (0..3)
            .map(|c| {
                let w = w2[o * 3 + c];
                let q = ((w / scale) as f64).round_ties_even() as f32 * scale;
                (q as f64 - w as f64) * e[c]
            })
            .sum();
        assert!(
            (bias[o] as f64 + delta).abs() < tolerance,
            "channel {o}: {} vs {}",
            bias[o],
            -delta
        );
    }
}

/// The BatchNorm before the HardSwish in the two tests below: z ~ N(β, γ²) per channel with
/// (β, γ) = (1, 0.5), (0.5, 2), (−0.5, 0.25).
fn hardswish_bn() -> (onnxq::proto::NodeProto, Vec<onnxq::proto::TensorProto>) {
    batchnorm_node(
        "bn",
        "c1",
        "n1",
        &[0.5, 2.0, 0.25],
        &[1.0, 0.5, -0.5],
        &[0.0; 3],
        &[1.0; 3],
    )
}

/// fold_batchnorm, equalize through the HardSwish (its channel scales in constant `scale`), then
/// analytical correction: conv2's input channel c is hswish(s_c·z)/s_c with z the folded,
/// rescaled N(β_c/s_c, (γ_c/s_c)²), whose mean is E[hswish(N(β_c, γ_c²))]/s_c.
fn assert_corrected_through_hardswish(m: &Model, scale: &str) {
    let specs = [
        spec("fold_batchnorm", "~"),
        spec("equalize", "{hardswish: per_channel}"),
    ];
    let (float, ctx) = passes(m, &specs);
    let s = to_values(&float, scale);
    assert!(
        s.iter().any(|s| (s - 1.0).abs() > 0.1),
        "equalisation moved something: {s:?}"
    );
    let stats = stats_from_batchnorm(&float, &ctx.batchnorm_records, 6.0).unwrap();
    let plan = build_plan(&float, &stats, &per_tensor_options()).unwrap();
    let mut after = float.clone();
    let notes = correct_bias::apply(&mut after, &plan, Some(&stats), Analytical, &ctx.batchnorm_records).unwrap();
    assert!(
        notes.iter().any(|n| n.starts_with("corrected Conv 'conv2'")),
        "{notes:#?}"
    );
    let hswish = |x: f64| x * (x / 6.0 + 0.5).clamp(0.0, 1.0);
    let e: Vec<f64> = [(1.0, 0.5), (0.5, 2.0), (-0.5, 0.25)]
        .iter()
        .zip(&s)
        .map(|(&(b, g), &s)| correct_bias::normal_expectation(hswish, b, g) / s as f64)
        .collect();
    assert_corrected_by_hand(&after, &to_values(&float, "w2"), &e, 1e-5);
}

#[test]
fn analytical_correction_through_equalize_s_hardswish_op() {
    // conv1 → BatchNorm → HardSwish → conv2; equalize rewrites the HardSwish to x·HardSigmoid(s·x).
    let m = conv_bn_act_conv(
        hardswish_bn(),
        ("HardSwish", "hswish", "h"),
        conv_weight("w1", &[3, 2, 1, 1], 1),
        conv_weight("w2", &[2, 3, 1, 1], 2),
    );
    assert_corrected_through_hardswish(&m, "hswish::channel_scale");
}

#[test]
fn analytical_correction_through_an_exported_hardswish_ending_in_a_sixth() {
    // conv1 → BatchNorm → Mul(Mul(n1, Clip(Add(3, n1), 0, 6)), 1/6) → conv2 (the Add's operands
    // swapped, the last step a Mul): equalize makes the Add read s·n1.
    let (bn, params) = hardswish_bn();
    let mut inits = vec![
        conv_weight("w1", &[3, 2, 1, 1], 1),
        conv_weight("w2", &[2, 3, 1, 1], 2),
        tensor_f32("three", &[], &[3.0]),
        tensor_f32("zero", &[], &[0.0]),
        tensor_f32("six", &[], &[6.0]),
        tensor_f32("sixth", &[], &[1.0 / 6.0]),
    ];
    inits.extend(params);
    let g = graph(
        vec![
            node("Conv", "conv1", &["x", "w1"], &["c1"]),
            bn,
            node("Add", "add", &["three", "n1"], &["a"]),
            node("Clip", "clip", &["a", "zero", "six"], &["g"]),
            node("Mul", "mul", &["n1", "g"], &["m"]),
            node("Mul", "by_six", &["m", "sixth"], &["h"]),
            node("Conv", "conv2", &["h", "w2"], &["y"]),
        ],
        inits,
        vec![f32_info("x", &[1, 2, 4, 4])],
        vec![f32_info("y", &[1, 2, 4, 4])],
    );
    assert_corrected_through_hardswish(&Model::from_proto(model(g, 17)).unwrap(), "add::channel_scale");
}

fn to_values(m: &Model, name: &str) -> Vec<f32> {
    onnxq::ir::tensor::values_f32(&m.graph.constants[name].tensor).unwrap()
}

#[test]
fn bad_modes_are_errors() {
    // Unknown option value: a configuration error naming the pass.
    let err = onnxq::pipeline::create_pass(&spec("correct_bias", "{mode: sometimes}"))
        .err()
        .unwrap();
    assert!(err.contains("correct_bias"), "{err}");
    // Empirical without data: an error, not a silent switch.
    let (folded, ctx) = passes(&small_graph(), &[spec("fold_batchnorm", "~")]);
    let stats = stats_from_batchnorm(&folded, &ctx.batchnorm_records, 6.0).unwrap();
    let plan = build_plan(&folded, &stats, &per_tensor_options()).unwrap();
    let err = correct_bias::apply(
        &mut folded.clone(),
        &plan,
        Some(&stats),
        Empirical,
        &ctx.batchnorm_records,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("mode empirical needs statistics from calibration data"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// The expected output error of a small conv net

const SHAPE: [usize; 4] = [1, 4, 8, 8];

/// x → Conv(3×3) → BN → Relu → Conv(1×1, no bias) → BN → Clip(0, 6) → Conv(3×3) → y, with BN
/// running statistics `moments` (per BN: mean, var), so that the BN outputs really are about
/// `N(β, γ²)` on the data, as the analytical mode assumes.
fn conv_net(moments: &[(Vec<f32>, Vec<f32>)]) -> Model {
    let gamma1: Vec<f32> = (0..8).map(|c| 0.5 + 0.125 * c as f32).collect();
    let beta1: Vec<f32> = (0..8).map(|c| 0.25 * c as f32 - 0.5).collect();
    let gamma2: Vec<f32> = (0..8).map(|c| 1.5 - 0.125 * c as f32).collect();
    let beta2: Vec<f32> = (0..8).map(|c| 0.3 * c as f32).collect();
    let (bn1, p1) = batchnorm_node("bn1", "c1", "n1", &gamma1, &beta1, &moments[0].0, &moments[0].1);
    let (bn2, p2) = batchnorm_node("bn2", "c2", "n2", &gamma2, &beta2, &moments[1].0, &moments[1].1);
    let mut inits = vec![
        conv_weight("w1", &[8, 4, 3, 3], 21),
        tensor_f32("b1", &[8], &[0.1; 8]),
        conv_weight("w2", &[8, 8, 1, 1], 22),
        conv_weight("w3", &[4, 8, 3, 3], 23),
        tensor_f32("b3", &[4], &[0.0; 4]),
        tensor_f32("lo", &[], &[0.0]),
        tensor_f32("hi", &[], &[6.0]),
    ];
    inits.extend(p1);
    inits.extend(p2);
    let pads = || attr_ints("pads", &[1, 1, 1, 1]);
    let g = graph(
        vec![
            with_attr(node("Conv", "conv1", &["x", "w1", "b1"], &["c1"]), pads()),
            bn1,
            node("Relu", "relu", &["n1"], &["r1"]),
            node("Conv", "conv2", &["r1", "w2"], &["c2"]),
            bn2,
            node("Clip", "relu6", &["n2", "lo", "hi"], &["r2"]),
            with_attr(node("Conv", "conv3", &["r2", "w3", "b3"], &["y"]), pads()),
        ],
        inits,
        vec![f32_info("x", &[1, 4, 8, 8])],
        vec![f32_info("y", &[1, 4, 8, 8])],
    );
    Model::from_proto(model(g, 17)).unwrap()
}

/// `n` seeded samples, uniform in [−1, 1) plus a per-channel offset (non-zero input means).
fn samples(n: usize, seed: u64) -> Vec<Tensor> {
    let len: usize = SHAPE.iter().product();
    (0..n)
        .map(|i| {
            let v: Vec<f32> = seeded(len, seed * 1000 + i as u64)
                .iter()
                .enumerate()
                .map(|(e, v)| v + 0.5 * (e / 64) as f32)
                .collect();
            Tensor::from_shape(&SHAPE, &v).unwrap()
        })
        .collect()
}

/// Per sample, the values of `names` (graph outputs and intermediates).
fn run(model: &Model, data: &[Tensor], names: &[&str]) -> Vec<Vec<Vec<f32>>> {
    let extra: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let runner = Runner::new(model, &[("x".into(), DatumType::F32, SHAPE.to_vec())], &extra).unwrap();
    data.iter()
        .map(|x| {
            let out = runner.run(vec![x.clone().into_tvalue()]).unwrap();
            names
                .iter()
                .map(|n| to_f32_vec(&out[runner.outputs.iter().position(|o| o == n).unwrap()]).unwrap())
                .collect()
        })
        .collect()
}

/// Per-channel mean and population variance of an NCHW tensor over samples and pixels.
fn moments(values: &[Vec<f32>], channels: usize) -> (Vec<f32>, Vec<f32>) {
    let mut sum = vec![0f64; channels];
    let mut sq = vec![0f64; channels];
    let mut count = 0usize;
    for v in values {
        let inner = v.len() / channels;
        for (e, x) in v.iter().enumerate() {
            sum[e / inner] += *x as f64;
            sq[e / inner] += (*x as f64).powi(2);
        }
        count += inner;
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / count as f64).collect();
    let var = sq
        .iter()
        .zip(&mean)
        .map(|(s, m)| (s / count as f64 - m * m) as f32)
        .collect();
    (mean.iter().map(|&m| m as f32).collect(), var)
}

/// The net with BN statistics measured on `data`, layer by layer.
fn calibrated_net(data: &[Tensor]) -> Model {
    let mut m = vec![(vec![0.0; 8], vec![1.0; 8]), (vec![0.0; 8], vec![1.0; 8])];
    let c1: Vec<Vec<f32>> = run(&conv_net(&m), data, &["c1"])
        .into_iter()
        .map(|mut s| s.remove(0))
        .collect();
    m[0] = moments(&c1, 8);
    let c2: Vec<Vec<f32>> = run(&conv_net(&m), data, &["c2"])
        .into_iter()
        .map(|mut s| s.remove(0))
        .collect();
    m[1] = moments(&c2, 8);
    conv_net(&m)
}

fn calibrate(model: &Model, data: &Path) -> CalibrationStats {
    let source = calibration_source(model, data);
    collect(model, &source, source.fingerprints().unwrap()).unwrap()
}

/// (mean over output channels of |E[y_q − y_f]|, mean squared error) on `eval`.
fn output_error(float: &Model, quant: &Model, eval: &[Tensor]) -> (f64, f64) {
    let lowered = onnxq::verify::lower::lower_all_qdq(quant).unwrap();
    let want = run(float, eval, &["y"]);
    let got = run(&lowered, eval, &["y"]);
    let channels = SHAPE[1];
    let mut bias = vec![0f64; channels];
    let (mut sq, mut count) = (0f64, 0usize);
    for (w, g) in want.iter().zip(&got) {
        let inner = w[0].len() / channels;
        for (e, (a, b)) in w[0].iter().zip(&g[0]).enumerate() {
            let d = *b as f64 - *a as f64;
            bias[e / inner] += d;
            sq += d * d;
        }
        count += inner;
    }
    let mean_abs_bias = bias.iter().map(|b| (b / count as f64).abs()).sum::<f64>() / channels as f64;
    (mean_abs_bias, sq / (count * channels) as f64)
}

#[test]
fn correction_lowers_the_expected_output_error_of_a_conv_net() {
    let calib = samples(32, 1);
    let eval = samples(32, 2);
    let dir = tempfile::tempdir().unwrap();
    let calib_path = write_x_calibration(dir.path(), &calib);
    let net = calibrated_net(&calib);

    let mut errors = Vec::new();
    for mode in [None, Some("empirical"), Some("analytical")] {
        let (folded, ctx) = passes(&net, &[spec("fold_batchnorm", "~")]);
        let stats = calibrate(&folded, &calib_path);
        let options = mode.map(|mode| format!("{{mode: {mode}}}"));
        let (quant, _, notes) = quantize(&folded, ctx, &stats, options.as_deref());
        let corrected = notes.iter().filter(|n| n.starts_with("corrected")).count();
        match mode {
            None => assert!(notes.is_empty()),
            // Empirical: all three convs; analytical: conv1 reads the graph input (no record).
            Some("empirical") => assert_eq!(corrected, 3, "{notes:#?}"),
            _ => {
                assert_eq!(corrected, 2, "{notes:#?}");
                assert!(
                    notes.iter().any(|n| n.contains("not corrected Conv 'conv1'")),
                    "{notes:#?}"
                );
            }
        }
        let (bias, mse) = output_error(&folded, &quant, &eval);
        eprintln!("{mode:?}: mean |E[error]| per channel {bias:.5}, mse {mse:.6}");
        errors.push((bias, mse));
    }
    let (none, empirical, analytical) = (errors[0], errors[1], errors[2]);
    // The systematic (mean) error is what bias correction removes; held-out data.
    assert!(empirical.0 < 0.5 * none.0, "empirical {empirical:?} vs none {none:?}");
    assert!(analytical.0 < none.0, "analytical {analytical:?} vs none {none:?}");
    assert!(empirical.1 < none.1 && analytical.1 < none.1, "{errors:?}");
}

// ---------------------------------------------------------------------------------------------
// Data-free mode on the shipped ppocr model

#[test]
fn analytical_correction_sees_through_equalised_hardswishes() {
    // equalize's per-channel HardSwish (the Add reads s·x) is hswish(s·z)/s: the same layers are
    // corrected as without the rewrite, by amounts of the same size.
    let m = onnxq::onnx::load_model(&repo("models/ppocr_mobile_v2_cls.onnx")).unwrap();
    let corrections = |equalize: &str| {
        let specs = [spec("fold_batchnorm", "~"), spec("equalize", equalize)];
        let (float, ctx) = passes(&m, &specs);
        let stats = stats_from_batchnorm(&float, &ctx.batchnorm_records, 6.0).unwrap();
        let (_, _, notes) = quantize(&float, ctx, &stats, Some("{mode: analytical}"));
        notes
    };
    let (plain, per_channel) = (corrections("~"), corrections("{hardswish: per_channel}"));
    let corrected = |notes: &[String]| notes.iter().filter(|n| n.starts_with("corrected")).count();
    println!(
        "{} corrected plain, {} through equalised HardSwishes",
        corrected(&plain),
        corrected(&per_channel)
    );
    assert!(corrected(&per_channel) >= corrected(&plain), "{per_channel:#?}");
    assert!(
        !per_channel.iter().any(|n| n.contains("not a HardSwish")),
        "{per_channel:#?}"
    );
}

#[test]
fn data_free_ppocr_quantizes_most_convs() {
    let m = onnxq::onnx::load_model(&repo("models/ppocr_mobile_v2_cls.onnx")).unwrap();
    let specs = [
        spec("fold_batchnorm", "~"),
        spec("equalize", "~"),
        spec("absorb_bias", "~"),
    ];
    let (float, ctx) = passes(&m, &specs);
    let stats = stats_from_batchnorm(&float, &ctx.batchnorm_records, 6.0).unwrap();
    assert_eq!(stats.samples, 0);
    assert_eq!(stats.fingerprint.data, ["data-free"]);
    let (quant, plan, notes) = quantize(&float, ctx, &stats, Some("~"));
    // Auto mode without data is analytical.
    assert!(notes[0].starts_with("bias correction (mode analytical)"), "{notes:#?}");
    // Through Relu and the exported HardSwish (x·Clip(x + 3, 0, 6)/6); the squeeze-excitation
    // convs (after a GlobalAveragePool or a Conv without BatchNorm) are skipped with the reason.
    let corrected = notes.iter().filter(|n| n.starts_with("corrected")).count();
    assert!(corrected >= 15, "{notes:#?}");
    assert!(
        notes.iter().any(|n| n.contains("comes through GlobalAveragePool")),
        "{notes:#?}"
    );
    // Most convs get their activation input quantized (not the first, which reads the image).
    let convs: Vec<&onnxq::ir::Node> = float
        .graph
        .nodes
        .node_weights()
        .filter(|n| n.op_type == "Conv")
        .collect();
    let quantized = convs
        .iter()
        .filter(|n| plan.activations.contains_key(&n.inputs[0]))
        .count();
    println!(
        "data-free ppocr: {quantized} of {} convs with a quantized input; {}",
        convs.len(),
        plan.summary()
    );
    assert!(quantized * 3 >= convs.len() * 2, "{quantized} of {}", convs.len());
    assert!(convs.iter().all(|n| plan.weights.contains_key(&n.inputs[1])));
    // It runs in tract and stays close to the float model on the eval data.
    let lowered = onnxq::verify::lower::lower_all_qdq(&quant).unwrap();
    let want = run_eval(&float, "models/ppocr_mobile_v2_cls.eval.npz");
    let got = run_eval(&lowered, "models/ppocr_mobile_v2_cls.eval.npz");
    let (mut signal, mut noise, mut agree) = (0f64, 0f64, 0usize);
    for (w, g) in want.iter().zip(&got) {
        for (a, b) in w[0].iter().zip(&g[0]) {
            signal += (*a as f64).powi(2);
            noise += (*a as f64 - *b as f64).powi(2);
        }
        let argmax = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
        agree += (argmax(&w[0]) == argmax(&g[0])) as usize;
    }
    let sqnr = 10.0 * (signal / noise).log10();
    println!(
        "data-free ppocr: output SQNR {sqnr:.2} dB, top-1 agreement {agree}/{}",
        want.len()
    );
    // 14.1 dB on these 8 samples (18.4 dB on the 128 of ../shared's eval set); float would be ∞,
    // a broken range or correction gives a few dB.
    assert!(sqnr > 12.0, "{sqnr}");
}
