//! `easyquant`: the search on small layers whose optimum is known by hand (weights and inputs
//! exactly on the grid of one factor), the same plan with 1 and 2 threads, a seeded conv net
//! with outliers in its input where the searched scales raise the output cosine over the
//! plan's on held-out data, and the `onnxq` binary end to end (same bytes with 1 and 2 threads;
//! bad options refused, an unknown one with the closest valid name).

mod common;

use common::*;
use onnxq::calib::source::DataSource;
use onnxq::calib::stats::{collect, CalibrationStats};
use onnxq::ir::Model;
use onnxq::passes::easyquant::{self, Options, Problem, Search};
use onnxq::quant::params::{QParams, QuantDtype};
use onnxq::quant::plan::Plan;
use tract_onnx::prelude::tract_ndarray::Array2;
use tract_onnx::prelude::Tensor;

/// Factors 0.5, 0.6, …, 2.0 (16 steps), 1 at index 5.
fn tenths() -> (Vec<f32>, usize) {
    let (f, one) = Options {
        steps: 16,
        low: 0.5,
        high: 2.0,
        ..Options::default()
    }
    .factors();
    assert_eq!(f.len(), 16);
    assert_eq!(one, 5);
    (f, one)
}

fn p(scale: f32) -> QParams {
    QParams { scale, zero_point: 0 }
}

#[test]
fn each_channel_takes_the_scale_that_puts_its_weights_on_the_grid() {
    // Row 0 = [1.0, 0.3]: w̃ ∝ w only for a step s with round(1/s) : round(0.3/s) = 10 : 3 (the
    // coarsest ratio), s ∈ [0.0952, 0.105]: with S = 0.125 the factor 0.8 alone (0.4 would be
    // 20 : 6, below 0.5). Row 1 = [0.7, −0.3] needs 7 : −3, s ∈ [0.0933, 0.1077]: with
    // S = 0.1/0.7 the factor 0.7 alone. Float inputs: the cosine of a row is then exactly 1 at
    // that factor and below it at every other.
    let (factors, one) = tenths();
    let x = Array2::from_shape_vec((2, 5), vec![1.0, -0.5, 0.25, 2.0, 0.1, 0.3, 1.5, -1.0, 0.2, 0.9]).unwrap();
    let problem = Problem {
        weights: vec![Array2::from_shape_vec((2, 2), vec![1.0, 0.3, 0.7, -0.3]).unwrap()],
        inputs: vec![x],
        bias: vec![0.0, 0.0],
        alpha: 1.0,
        weight_params: vec![p(0.125), p(0.1 / 0.7)],
        weight_dtype: QuantDtype::Int8,
        weight_range: (-127, 127),
        input: None,
        search_input: false,
    };
    let choice = easyquant::search(&problem, &factors, one, 3, false, Search::Both);
    // The weights are exact there: removing their mean shift changes nothing.
    assert_eq!(
        easyquant::search(&problem, &factors, one, 3, true, Search::Both).weight,
        choice.weight
    );
    assert_eq!(
        choice.weight.iter().map(|&k| factors[k]).collect::<Vec<_>>(),
        [0.8, 0.7],
        "{choice:?}"
    );
    assert_eq!(choice.input, one);
    assert!(choice.cosine > 1.0 - 1e-9, "{choice:?}");
    assert!(choice.cosine_plan < choice.cosine - 1e-6, "{choice:?}");
    // A second round changes nothing: the search stops there.
    assert_eq!(choice.rounds, 2, "{choice:?}");
}

#[test]
fn the_input_takes_the_scale_that_puts_its_values_on_the_grid() {
    // Inputs 0.1·{1, 2, 3, 7} (uint8, zero point 0) are exact only for steps s with
    // round(0.1/s) : … : round(0.7/s) = 1 : 2 : 3 : 7, s ∈ [0.0934, 0.1077]: with S = 0.125 the
    // factor 0.8 alone. One weight: its scale does not move the cosine (ỹ ∝ x̃ whatever it is).
    let (factors, one) = tenths();
    let values: Vec<f32> = [1.0f32, 2.0, 3.0, 7.0].iter().map(|k| k * 0.1).collect();
    let problem = Problem {
        weights: vec![Array2::from_shape_vec((1, 1), vec![0.9]).unwrap()],
        inputs: vec![Array2::from_shape_vec((1, 4), values).unwrap()],
        bias: vec![0.0],
        alpha: 1.0,
        weight_params: vec![p(0.9 / 127.0)],
        weight_dtype: QuantDtype::Int8,
        weight_range: (-127, 127),
        input: Some((p(0.125), QuantDtype::Uint8)),
        search_input: true,
    };
    let choice = easyquant::search(&problem, &factors, one, 3, false, Search::Both);
    assert_eq!(factors[choice.input], 0.8, "{choice:?}");
    assert!(choice.cosine > 1.0 - 1e-9, "{choice:?}");
    assert!(choice.cosine_plan < 0.999, "{choice:?}");
    // Not searched: the plan's scale stays, and so does the cosine.
    let fixed = easyquant::search(
        &Problem {
            search_input: false,
            ..problem
        },
        &factors,
        one,
        3,
        false,
        Search::Both,
    );
    assert_eq!(fixed.input, one);
    assert!((fixed.cosine - choice.cosine_plan).abs() < 1e-12, "{fixed:?}");
}

// ---------------------------------------------------------------------------------------------
// A seeded net.

const SHAPE: [usize; 4] = [1, 4, 16, 16];

/// x → Conv(3×3, 4→8) → Relu → Conv(1×1, 8→8) → y.
fn net() -> Model {
    let g = graph(
        vec![
            with_attr(
                node("Conv", "conv", &["x", "w1", "b1"], &["c1"]),
                attr_ints("pads", &[1, 1, 1, 1]),
            ),
            node("Relu", "relu", &["c1"], &["r1"]),
            node("Conv", "pointwise", &["r1", "w2", "b2"], &["y"]),
        ],
        vec![
            conv_weight("w1", &[8, 4, 3, 3], 41),
            tensor_f32("b1", &[8], &[0.05, -0.1, 0.2, 0.0, 0.1, -0.05, 0.15, 0.3]),
            conv_weight("w2", &[8, 8, 1, 1], 42),
            tensor_f32("b2", &[8], &[0.01; 8]),
        ],
        vec![f32_info("x", &[1, 4, 16, 16])],
        vec![f32_info("y", &[1, 8, 16, 16])],
    );
    Model::from_proto(model(g, 17)).unwrap()
}

/// Smooth samples with a rare spike (one pixel of one channel at +12) that sets the minmax range.
fn samples(n: usize, seed: u64) -> Vec<Tensor> {
    smooth_samples(SHAPE, n, seed)
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let mut v = onnxq::runtime::to_f32_vec(&t).unwrap();
            let at = (i * 97 + seed as usize * 13) % v.len();
            v[at] = 12.0;
            Tensor::from_shape(&SHAPE, &v).unwrap()
        })
        .collect()
}

fn setup(calibration: usize, seed: u64) -> (tempfile::TempDir, Model, DataSource, CalibrationStats) {
    let dir = tempfile::tempdir().unwrap();
    let calib = write_x_calibration(dir.path(), &samples(calibration, seed));
    let m = net();
    let source = calibration_source(&m, &calib);
    let stats = collect(&m, &source, source.fingerprints().unwrap()).unwrap();
    (dir, m, source, stats)
}

/// Per-channel weights of `bits` bits in int8, uint8 activations of `bits` bits, minmax ranges.
fn plan(model: &Model, stats: &CalibrationStats, bits: u32) -> Plan {
    minmax_plan(model, stats, |rules| {
        rules.weights.bits = Some(bits);
        rules.activations.bits = Some(bits);
    })
}

/// The cosine of output `y` of the model `plan` quantizes with the float one's, over `eval`.
fn output_cosine(float: &Model, plan: &Plan, eval: &[Tensor]) -> f64 {
    use tract_onnx::prelude::{DatumType, IntoTValue};
    let mut q = float.clone();
    onnxq::quant::materialize::materialize(&mut q, plan).unwrap();
    let lowered = onnxq::verify::lower::lower_all_qdq(&q).unwrap();
    let run = |m: &Model| -> Vec<Vec<f32>> {
        let runner = onnxq::runtime::Runner::new(m, &[("x".into(), DatumType::F32, SHAPE.to_vec())], &[]).unwrap();
        eval.iter()
            .map(|x| onnxq::runtime::to_f32_vec(&runner.run(vec![x.clone().into_tvalue()]).unwrap()[0]).unwrap())
            .collect()
    };
    let (want, got) = (run(float), run(&lowered));
    let (mut dot, mut a, mut b) = (0f64, 0f64, 0f64);
    for (w, g) in want.iter().zip(&got) {
        for (&u, &v) in w.iter().zip(g) {
            dot += u as f64 * v as f64;
            a += u as f64 * u as f64;
            b += v as f64 * v as f64;
        }
    }
    dot / (a * b).sqrt()
}

#[test]
fn easyquant_raises_the_output_cosine_over_the_plans_scales() {
    let (_dir, m, source, stats) = setup(24, 1);
    let eval = samples(16, 2);
    let before = plan(&m, &stats, 5);
    let mut after = before.clone();
    let notes = easyquant::apply(&m, &mut after, &source, &Options::default()).unwrap();
    println!("{notes:#?}");
    assert!(
        notes[0].starts_with("easyquant: scales searched on 2 layers"),
        "{notes:#?}"
    );
    // The spike sets the range of x: the first conv's input scale shrinks.
    let (x_before, x_after) = (before.activations["x"].params, after.activations["x"].params);
    assert!(x_after.scale < x_before.scale, "{x_before:?} → {x_after:?}");
    assert_eq!(x_after.zero_point, x_before.zero_point);
    assert!(!after.scaled.is_empty(), "no weight scale changed: {notes:#?}");
    let (c_before, c_after) = (output_cosine(&m, &before, &eval), output_cosine(&m, &after, &eval));
    println!("held-out output cosine: plan {c_before:.6}, easyquant {c_after:.6}");
    assert!(
        1.0 - c_after < 0.8 * (1.0 - c_before),
        "plan {c_before:.6}, easyquant {c_after:.6}"
    );
}

#[test]
fn easyquant_is_the_same_on_one_thread_and_two() {
    let (_dir, m, source, stats) = setup(12, 3);
    let with = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut plan = plan(&m, &stats, 6);
            let notes = easyquant::apply(&m, &mut plan, &source, &Options::default()).unwrap();
            (plan, notes)
        })
    };
    let (one, two) = (with(1), with(2));
    assert!(!one.0.scaled.is_empty());
    assert_eq!(one.1, two.1);
    for (w, s) in &one.0.scaled {
        assert_eq!(s.params, two.0.scaled[w].params, "{w}");
    }
    for (t, a) in &one.0.activations {
        assert_eq!(a.params, two.0.activations[t].params, "{t}");
    }
}

// ---------------------------------------------------------------------------------------------
// The `onnxq` binary end to end.

fn job_dir(passes: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    job_folder(&net().to_proto().unwrap(), &samples(16, 5), |_| {
        format!("weights: {{bits: 6}}\nactivations: {{bits: 6}}\nguard: false\npasses: {passes}\n")
    })
}

#[test]
fn easyquant_before_gptq_end_to_end() {
    let (_d, model, config) = job_dir("[easyquant, gptq, correct_bias]");
    let (ours, report) = main_job_ok(&model, &config, &[], Some("2"));
    assert_eq!(
        step_names(&report),
        ["calibrate", "plan", "easyquant", "gptq", "correct_bias", "materialize"]
    );
    let notes = |pass: &str| -> Vec<String> {
        report["passes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pass"] == pass)
            .unwrap()["notes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n.as_str().map(String::from))
            .collect()
    };
    let eq = notes("easyquant");
    assert!(eq[0].starts_with("easyquant: scales searched on 2 layers"), "{eq:#?}");
    // easyquant changes only scales: gptq still takes its layer inputs from calibration's run.
    let gptq = notes("gptq");
    assert!(
        gptq[1].starts_with("layer inputs of 2 layers from calibration's run of the model, 0"),
        "{gptq:#?}"
    );
    let (same, _) = main_job_ok(&model, &config, &[], Some("1"));
    assert_eq!(ours, same, "RAYON_NUM_THREADS=1 and 2 write different models");
}

#[test]
fn bad_options_are_refused() {
    for (passes, message) in [
        ("[{easyquant: {round: 2}}]", "did you mean `rounds`?"),
        ("[{easyquant: {step: 2}}]", "did you mean `steps`?"),
        ("[{easyquant: {low: 1.5}}]", "low must be in (0, 1]"),
        ("[{easyquant: {high: 0.8}}]", "high must be at least 1"),
        ("[{easyquant: {rounds: 0}}]", "rounds must be at least 1"),
    ] {
        let (_dir, model, config) = job_dir(passes);
        let o = main_job(&model, &config, &[], Some("1"));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{passes}: {stderr}");
        assert!(stderr.contains(message), "{passes}: {stderr}");
    }
}
