//! `gptq` after planning, on a seeded conv net with spatially correlated inputs (a 3×3 Conv, a
//! depthwise Conv and a MatMul, per-tensor int8 weights): lower output error than nearest
//! rounding on held-out data, the plan's grid (scales, zero points) unchanged, the same roundings
//! with 1 and 2 threads, notes for the layers it rounds and the one it skips; and the error
//! without calibration data. Then the pipeline end to end on the same net: plan passes in the
//! order listed, their dumps, `--stop-after` at a stage, and a graph pass listed too late.

mod common;

use common::*;
use onnxq::calib::source::DataSource;
use onnxq::calib::stats::{collect, collect_riding, CalibrationStats};
use onnxq::ir::Model;
use onnxq::passes::gptq;
use onnxq::passes::Context;
use onnxq::pipeline::{run_pipeline, DebugOptions, PassSpec};
use onnxq::quant::params::QuantDtype;
use onnxq::quant::plan::Plan;
use tract_onnx::prelude::Tensor;

const SHAPE: [usize; 4] = [1, 4, 16, 16];

/// x → Conv(3×3, 4→8) → Relu → depthwise Conv(3×3) → Relu, the Conv output also → Transpose(NHWC)
/// → MatMul(8→4) → y (its channels mix the same taps: correlated),
/// and a 1×1 Conv on the side whose 8×8 input is too small for its H (skipped).
fn net() -> Model {
    let g = graph(
        vec![
            with_attr(
                node("Conv", "conv", &["x", "w1", "b1"], &["c1"]),
                attr_ints("pads", &[1, 1, 1, 1]),
            ),
            node("Relu", "relu1", &["c1"], &["r1"]),
            with_attr(
                with_attr(
                    node("Conv", "depthwise", &["r1", "w2", "b2"], &["c2"]),
                    attr_int("group", 8),
                ),
                attr_ints("pads", &[1, 1, 1, 1]),
            ),
            node("Relu", "relu2", &["c2"], &["r2"]),
            with_attr(
                node("Transpose", "nhwc", &["c1"], &["t"]),
                attr_ints("perm", &[0, 2, 3, 1]),
            ),
            node("MatMul", "matmul", &["t", "w3"], &["y"]),
            with_attr(
                with_attr(
                    node("MaxPool", "pool", &["r2"], &["p"]),
                    attr_ints("kernel_shape", &[8, 8]),
                ),
                attr_ints("strides", &[8, 8]),
            ),
            node("Conv", "small", &["p", "w4"], &["z"]),
        ],
        vec![
            conv_weight("w1", &[8, 4, 3, 3], 31),
            tensor_f32("b1", &[8], &[0.05; 8]),
            conv_weight("w2", &[8, 1, 3, 3], 32),
            tensor_f32("b2", &[8], &[0.1; 8]),
            conv_weight("w3", &[8, 4], 33),
            conv_weight("w4", &[4, 8, 1, 1], 34),
        ],
        vec![f32_info("x", &[1, 4, 16, 16])],
        vec![f32_info("y", &[1, 16, 16, 4]), f32_info("z", &[1, 4, 2, 2])],
    );
    Model::from_proto(model(g, 17)).unwrap()
}

fn samples(n: usize, seed: u64) -> Vec<Tensor> {
    smooth_samples(SHAPE, n, seed)
}

fn per_tensor_plan(model: &Model, stats: &CalibrationStats) -> Plan {
    per_tensor_minmax_plan(model, stats, QuantDtype::Int8)
}

/// The plan, with `gptq`'s roundings when `rounding`, and its notes.
fn planned(model: &Model, source: &DataSource, stats: &CalibrationStats, rounding: bool) -> (Plan, Vec<String>) {
    let mut plan = per_tensor_plan(model, stats);
    let notes = if rounding {
        gptq::apply(model, &mut plan, source).unwrap()
    } else {
        vec![]
    };
    (plan, notes)
}

#[test]
fn gptq_rounds_on_the_plans_grid_with_a_lower_output_error() {
    let dir = tempfile::tempdir().unwrap();
    let calib = write_x_calibration(dir.path(), &samples(32, 1));
    let eval = samples(32, 2);
    let m = net();
    let source = calibration_source(&m, &calib);
    let stats = collect(&m, &source, source.fingerprints().unwrap()).unwrap();

    let (nearest, none) = planned(&m, &source, &stats, false);
    assert!(none.is_empty() && nearest.rounded.is_empty());
    let (rounded, notes) = planned(&m, &source, &stats, true);
    println!("{notes:#?}");
    for layer in ["Conv 'conv'", "Conv 'depthwise'", "MatMul 'matmul'"] {
        assert!(
            notes.iter().any(|n| n.starts_with(&format!("rounded {layer}"))),
            "{layer} not rounded: {notes:#?}"
        );
    }
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("nearest rounding Conv 'small'") && n.contains("fewer than the 100 per column")),
        "{notes:#?}"
    );
    assert_eq!(rounded.rounded.len(), 3);

    // The grid is the plan's: same scales and zero points, integers within one step of nearest.
    for (w, r) in &rounded.rounded {
        let ours = rounded.quantized_weight(&m.graph, w).unwrap();
        let near = nearest.quantized_weight(&m.graph, w).unwrap();
        assert_eq!(ours.params, near.params, "{w}");
        assert_eq!(ours.values, r.values, "{w}");
        assert_ne!(ours.values, near.values, "{w}: nothing changed");
        let steps = ours
            .values
            .iter()
            .zip(&near.values)
            .map(|(a, b)| (a - b).abs())
            .max()
            .unwrap();
        assert!(steps <= 3, "{w}: {steps} steps from nearest");
    }

    // Held-out data: the output error is lower.
    let (e_nearest, e_gptq) = (
        plan_output_mse(&m, &nearest, &eval),
        plan_output_mse(&m, &rounded, &eval),
    );
    println!("output mse: nearest {e_nearest:.3e}, gptq {e_gptq:.3e}");
    assert!(e_gptq < 0.9 * e_nearest, "nearest {e_nearest:.3e}, gptq {e_gptq:.3e}");
}

#[test]
fn gptq_is_the_same_on_one_thread_and_two() {
    let dir = tempfile::tempdir().unwrap();
    let calib = write_x_calibration(dir.path(), &samples(12, 3));
    let m = net();
    let source = calibration_source(&m, &calib);
    let stats = collect(&m, &source, source.fingerprints().unwrap()).unwrap();
    let with = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| planned(&m, &source, &stats, true))
    };
    let (one, two) = (with(1), with(2));
    assert!(!one.0.rounded.is_empty());
    assert_eq!(one.1, two.1);
    for (w, r) in &one.0.rounded {
        assert_eq!(r.values, two.0.rounded[w].values, "{w}");
    }
}

#[test]
fn gptq_without_calibration_data_is_an_error() {
    let mut m = net();
    let mut ctx = Context {
        plan: Some(Plan::default()),
        ..Context::default()
    };
    let specs = [PassSpec {
        name: "gptq".into(),
        options: serde_yaml::Value::Null,
    }];
    let e = run_pipeline(&mut m, &specs, &mut ctx, &DebugOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("gptq needs calibration data"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The pipeline end to end (the `onnxq` binary): plan passes run in the order listed, dump what
// they change, and `--stop-after` stops the job at any step.

/// A folder with the net as `model.onnx`, 16 calibration samples, and `q.yaml` running `passes`.
fn job_dir(passes: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    job_folder(&net().to_proto().unwrap(), &samples(16, 5), |_| {
        format!(
            "weights: {{granularity: per_tensor}}
passes: {passes}
"
        )
    })
}

fn run_job(model: &std::path::Path, config: &std::path::Path, extra: &[&str]) -> (Vec<u8>, serde_json::Value) {
    main_job_ok(model, config, extra, None)
}

#[test]
fn plan_passes_run_in_the_order_listed() {
    let (_d1, model, config) = job_dir("[gptq, correct_bias]");
    let (gptq_first, gptq_report) = run_job(&model, &config, &[]);
    assert_eq!(
        step_names(&gptq_report),
        ["calibrate", "plan", "gptq", "correct_bias", "guard", "materialize"]
    );
    let (_d2, model, config) = job_dir("[correct_bias, gptq]");
    let (bias_first, report) = run_job(&model, &config, &[]);
    assert_eq!(
        step_names(&report),
        ["calibrate", "plan", "correct_bias", "gptq", "guard", "materialize"]
    );
    // Right after calibration (the stages between change only the plan) gptq's layer inputs
    // are measured in calibration's run of the model; after correct_bias, which changes the
    // biases the later layers' inputs depend on, by a run of its own.
    assert_eq!(layer_inputs_note(&gptq_report), Some((4, 0)), "{gptq_report:#}");
    assert_eq!(layer_inputs_note(&report), Some((0, 4)), "{report:#}");
    // Corrected before the rounding is chosen, the biases remove nearest rounding's shift, not
    // gptq's: another model.
    assert_ne!(gptq_first, bias_first);
    let (again, _) = run_job(&model, &config, &[]);
    assert_eq!(again, bias_first, "the same config gives the same bytes");
}

/// gptq's note on where its layer inputs came from: (layers from calibration's run, from its own).
fn layer_inputs_note(report: &serde_json::Value) -> Option<(usize, usize)> {
    let gptq = report["passes"].as_array()?.iter().find(|p| p["pass"] == "gptq")?;
    let note = gptq["notes"]
        .as_array()?
        .iter()
        .filter_map(|n| n.as_str())
        .find(|n| n.starts_with("layer inputs of "))?;
    let numbers: Vec<usize> = note.split(' ').filter_map(|w| w.parse().ok()).collect();
    Some((numbers[0], numbers[1]))
}

#[test]
fn gptq_measured_in_calibrations_run_writes_the_same_model_as_its_own_run() {
    // With the statistics reused from a file, calibration does not run the model, and gptq
    // measures its layer inputs itself: the same sums, so the same bytes.
    let (dir, model, config) = job_dir("[gptq, correct_bias]");
    let stats = dir.path().join("stats.json");
    let stats = stats.to_str().unwrap();
    let (ridden, report) = run_job(&model, &config, &["--stats", stats]);
    assert_eq!(layer_inputs_note(&report), Some((4, 0)), "{report:#}");
    let (own, report) = run_job(&model, &config, &["--stats", stats]);
    assert_eq!(layer_inputs_note(&report), Some((0, 4)), "{report:#}");
    assert_eq!(ridden, own);
}

#[test]
fn gptq_uses_what_calibration_measured_not_the_data_again() {
    // Layer inputs measured on one data set, handed to gptq with another: the roundings are
    // those of the first set, so gptq did not run the model over the data it was given.
    let dir = tempfile::tempdir().unwrap();
    let m = net();
    let first = calibration_source(&m, &write_x_calibration(dir.path(), &samples(16, 7)));
    let other_dir = tempfile::tempdir().unwrap();
    let other = calibration_source(&m, &write_x_calibration(other_dir.path(), &samples(16, 8)));
    let stats = collect(&m, &first, first.fingerprints().unwrap()).unwrap();
    let rider = gptq::LayerInputs::before_plan(&m, &first).unwrap();
    let (ridden_stats, sum) = collect_riding(
        &m,
        &first,
        first.fingerprints().unwrap(),
        &|_| true,
        &rider,
        onnxq::runtime::Engine::Tract,
    )
    .unwrap();
    assert_eq!(
        serde_json::to_string(&ridden_stats).unwrap(),
        serde_json::to_string(&stats).unwrap(),
        "riding changes no statistic"
    );
    let measured = rider.measured(sum).unwrap();
    let round = |source: &DataSource, measured| {
        let mut plan = per_tensor_plan(&m, &stats);
        let notes = gptq::apply_measured(&m, &mut plan, source, measured, onnxq::runtime::Engine::Tract).unwrap();
        let rounded: Vec<(String, Vec<i32>)> = plan
            .rounded
            .keys()
            .map(|w| (w.clone(), plan.quantized_weight(&m.graph, w).unwrap().values))
            .collect();
        (rounded, notes)
    };
    let (on_first, notes_first) = round(&first, None);
    let (on_other, _) = round(&other, None);
    let (given, notes_given) = round(&other, Some(measured));
    assert_ne!(on_first, on_other, "the two data sets round differently");
    assert_eq!(given, on_first);
    assert_eq!(notes_given[0], notes_first[0]);
    assert_eq!(notes_given[2..], notes_first[2..]);
    assert!(
        notes_given[1].starts_with("layer inputs of 4 layers from calibration's run of the model, 0"),
        "{notes_given:?}"
    );
}

#[test]
fn a_plan_pass_dumps_what_it_changed() {
    let (dir, model, config) = job_dir("[gptq, correct_bias]");
    let dumps = dir.path().join("dumps");
    run_job(
        &model,
        &config,
        &["--dump-after", "all", "--dump-dir", dumps.to_str().unwrap()],
    );
    let diff = |stem: &str| std::fs::read_to_string(dumps.join(format!("{stem}.diff"))).unwrap();
    let changed = |d: &str| {
        d.lines()
            .filter(|l| (l.starts_with('+') || l.starts_with('-')) && !l.starts_with("+++") && !l.starts_with("---"))
            .count()
    };
    // gptq changes only the plan (which weights it rounded), correct_bias the biases and the
    // plan; calibrate adds the statistics, plan the plan, materialize the Q/DQ nodes (the guard,
    // step 5, on by default, may raise layers or not).
    let gptq = diff("03-gptq");
    assert!(gptq.contains("+  \"rounded\": {"), "{gptq}");
    let correct = diff("04-correct_bias");
    assert!(
        correct.lines().any(|l| l.starts_with("+const") && l.contains(" b1: ")),
        "{correct}"
    );
    assert!(changed(&diff("01-calibrate")) > 0 && diff("01-calibrate").contains("+stats x:"));
    assert!(diff("02-plan").contains("+# plan"));
    assert!(diff("06-materialize").contains("QuantizeLinear"));
}

#[test]
fn stop_after_a_step_writes_the_model_as_it_stands() {
    let (dir, model, config) = job_dir("[gptq, correct_bias]");
    let (_, report) = run_job(&model, &config, &["--stop-after", "calibrate"]);
    assert_eq!(step_names(&report), ["calibrate"]);
    assert!(report["quantization"].is_null());
    let written = onnxq::onnx::load_model(&dir.path().join("out.onnx")).unwrap();
    assert!(written
        .graph
        .nodes
        .node_weights()
        .all(|n| n.op_type != "QuantizeLinear"));
    let (_, report) = run_job(&model, &config, &["--stop-after", "gptq"]);
    assert_eq!(step_names(&report), ["calibrate", "plan", "gptq"]);
    assert!(!report["quantization"]["plan"].is_null());
}

#[test]
fn a_graph_pass_after_a_plan_pass_is_a_config_error() {
    let (dir, model, config) = job_dir("[gptq, fold_batchnorm]");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_onnxq"))
        .args([
            model.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "-o",
            dir.path().join("out.onnx").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`fold_batchnorm` rewrites the float graph") && stderr.contains("listed after `gptq`"),
        "{stderr}"
    );
    assert!(!dir.path().join("out.onnx").exists());
}

/// A plan pass needs only the trait: here one written outside the crate, spliced into the
/// pipeline a config describes, keeps the first weight of the plan float.
struct KeepFirstWeightFloat;

impl onnxq::passes::Pass for KeepFirstWeightFloat {
    fn name(&self) -> &'static str {
        "keep_first_weight_float"
    }
    fn phase(&self) -> onnxq::passes::Phase {
        onnxq::passes::Phase::Plan
    }
    fn run(&self, _model: &mut Model, ctx: &mut Context) -> onnxq::Result<Vec<String>> {
        let plan = ctx.plan.as_mut().expect("a plan pass runs after `plan`");
        let weight = plan.weights.keys().next().cloned().expect("the net has weights");
        plan.weights.remove(&weight);
        plan.kept_float
            .insert(weight.clone(), "kept float by a test pass".into());
        Ok(vec![format!("kept {weight} float")])
    }
}

#[test]
fn a_plan_pass_plugs_into_the_step_list() {
    let (dir, model_path, config_path) = job_dir("[gptq]");
    let config = onnxq::pipeline::config::Config::load(&config_path).unwrap();
    let files = onnxq::pipeline::JobFiles {
        config: config_path.clone(),
        stats: None,
        ..Default::default()
    };
    let mut steps = onnxq::pipeline::steps(&config, &files);
    let at = steps.iter().position(|s| s.name() == "materialize").unwrap();
    steps.insert(at, Box::new(KeepFirstWeightFloat));
    assert_eq!(
        onnxq::pipeline::step_names(&steps),
        [
            "calibrate",
            "plan",
            "gptq",
            "guard",
            "keep_first_weight_float",
            "materialize"
        ]
    );
    let mut model = onnxq::onnx::load_model(&model_path).unwrap();
    let mut ctx = Context::default();
    onnxq::pipeline::run(&mut model, &steps, &mut ctx, &DebugOptions::default()).unwrap();
    let kept = &ctx.pass_reports[4].notes[0];
    assert_eq!(kept, "kept w1 float");
    // w1 is read as float by its Conv; the other weights go through DequantizeLinear.
    let conv = model.graph.nodes.node_weights().find(|n| n.name == "conv").unwrap();
    assert_eq!(conv.inputs[1], "w1");
    let depthwise = model
        .graph
        .nodes
        .node_weights()
        .find(|n| n.name == "depthwise")
        .unwrap();
    assert_ne!(depthwise.inputs[1], "w2");
    drop(dir);
}
