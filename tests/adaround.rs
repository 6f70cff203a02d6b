//! `adaround` on a seeded conv net with spatially correlated inputs (a 3×3 Conv followed by a
//! BatchNormalization and a Relu, a 1×1 Conv, a MatMul on the NHWC view): with the library API,
//! per-tensor int4 weights, a lower output error than nearest rounding on held-out data, every
//! chosen integer the floor or the ceiling of `w/s` on the plan's unchanged grid, and the same
//! roundings with 1 and 2 threads; then the `onnxq` binary end to end with
//! `passes: [fold_batchnorm, adaround]` (the written model closer to the float one than without
//! adaround, the same bytes with RAYON_NUM_THREADS=1 and 2), and a misspelt option refused.

mod common;

use common::*;
use onnxq::calib::source::DataSource;
use onnxq::calib::stats::{collect, CalibrationStats};
use onnxq::ir::Model;
use onnxq::passes::adaround;
use onnxq::quant::params::QuantDtype;
use onnxq::quant::plan::Plan;
use tract_onnx::prelude::Tensor;

const SHAPE: [usize; 4] = [1, 4, 16, 16];

/// x → Conv(3×3, 4→8) → BatchNormalization → Relu → Conv(1×1, 8→8) → Transpose(NHWC) →
/// MatMul(8→4) → y.
fn net() -> Model {
    let (bn, bn_params) = batchnorm_node(
        "bn",
        "c1",
        "n1",
        &[1.5, 0.8, 1.2, 0.6, 1.0, 1.3, 0.9, 1.1],
        &[0.1, -0.2, 0.05, 0.3, 0.0, -0.1, 0.2, 0.15],
        &[0.2, -0.1, 0.0, 0.4, 0.1, -0.3, 0.05, 0.2],
        &[1.2, 0.7, 1.0, 0.5, 0.9, 1.4, 0.8, 1.1],
    );
    let mut constants = vec![
        conv_weight("w1", &[8, 4, 3, 3], 41),
        tensor_f32("b1", &[8], &[0.05; 8]),
        conv_weight("w2", &[8, 8, 1, 1], 42),
        conv_weight("w3", &[8, 4], 43),
    ];
    constants.extend(bn_params);
    let g = graph(
        vec![
            with_attr(
                node("Conv", "conv", &["x", "w1", "b1"], &["c1"]),
                attr_ints("pads", &[1, 1, 1, 1]),
            ),
            bn,
            node("Relu", "relu", &["n1"], &["r1"]),
            node("Conv", "pointwise", &["r1", "w2"], &["c2"]),
            with_attr(
                node("Transpose", "nhwc", &["c2"], &["t"]),
                attr_ints("perm", &[0, 2, 3, 1]),
            ),
            node("MatMul", "matmul", &["t", "w3"], &["y"]),
        ],
        constants,
        vec![f32_info("x", &[1, 4, 16, 16])],
        vec![f32_info("y", &[1, 16, 16, 4])],
    );
    Model::from_proto(model(g, 17)).unwrap()
}

fn samples(n: usize, seed: u64) -> Vec<Tensor> {
    smooth_samples(SHAPE, n, seed)
}

/// Per-tensor int4 weights, minmax ranges.
fn int4_plan(model: &Model, stats: &CalibrationStats) -> Plan {
    per_tensor_minmax_plan(model, stats, QuantDtype::Int4)
}

fn setup(calibration: usize, seed: u64) -> (tempfile::TempDir, Model, DataSource, CalibrationStats) {
    let dir = tempfile::tempdir().unwrap();
    let calib = write_x_calibration(dir.path(), &samples(calibration, seed));
    let m = net();
    let source = calibration_source(&m, &calib);
    let stats = collect(&m, &source, source.fingerprints().unwrap()).unwrap();
    (dir, m, source, stats)
}

#[test]
fn adaround_rounds_up_or_down_on_the_plans_grid_with_a_lower_output_error() {
    let (_dir, m, source, stats) = setup(32, 1);
    let eval = samples(32, 2);
    let nearest = int4_plan(&m, &stats);
    let mut rounded = int4_plan(&m, &stats);
    let notes = adaround::apply(&m, &mut rounded, &source, &adaround::Options::default()).unwrap();
    println!("{notes:#?}");
    assert!(notes[0].starts_with("adaround: 3 weights rounded"), "{notes:#?}");
    for layer in ["Conv 'conv'", "Conv 'pointwise'", "MatMul 'matmul'"] {
        assert!(
            notes.iter().any(|n| n.starts_with(&format!("rounded {layer}"))),
            "{layer} not rounded: {notes:#?}"
        );
    }
    assert_eq!(rounded.rounded.len(), 3);
    for (w, r) in &rounded.rounded {
        let ours = rounded.quantized_weight(&m.graph, w).unwrap();
        let near = nearest.quantized_weight(&m.graph, w).unwrap();
        assert_eq!(ours.params, near.params, "{w}: the grid changed");
        assert_eq!(ours.values, r.values, "{w}");
        assert_ne!(ours.values, near.values, "{w}: nothing changed");
        let float = onnxq::ir::tensor::values_f32(&m.graph.constants[w].tensor).unwrap();
        let (qmin, qmax) = (-7, 7);
        for (i, (&q, &x)) in ours.values.iter().zip(&float).enumerate() {
            let p = ours.params_of(i);
            let floor = (x / p.scale).floor() as i32 + p.zero_point;
            assert!(
                q == floor.clamp(qmin, qmax) || q == (floor + 1).clamp(qmin, qmax),
                "{w}[{i}]: {q}, w/s = {}",
                x / p.scale
            );
        }
    }
    let (e_nearest, e_ours) = (
        plan_output_mse(&m, &nearest, &eval),
        plan_output_mse(&m, &rounded, &eval),
    );
    println!("held-out output mse: nearest {e_nearest:.4e}, adaround {e_ours:.4e}");
    assert!(
        e_ours < 0.8 * e_nearest,
        "nearest {e_nearest:.4e}, adaround {e_ours:.4e}"
    );
}

#[test]
fn adaround_is_the_same_on_one_thread_and_two() {
    let (_dir, m, source, stats) = setup(12, 3);
    let options = adaround::Options {
        iterations: 300,
        ..adaround::Options::default()
    };
    let with = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut plan = int4_plan(&m, &stats);
            let notes = adaround::apply(&m, &mut plan, &source, &options).unwrap();
            (plan, notes)
        })
    };
    let (one, two) = (with(1), with(2));
    assert!(!one.0.rounded.is_empty());
    assert_eq!(one.1, two.1);
    for (w, r) in &one.0.rounded {
        assert_eq!(r.values, two.0.rounded[w].values, "{w}");
    }
}

// ---------------------------------------------------------------------------------------------
// The `onnxq` binary end to end.

/// A folder with the net as `model.onnx`, 16 calibration samples, and `q.yaml` with int4
/// per-tensor weights running `passes`.
fn job_dir(passes: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    job_folder(&net().to_proto().unwrap(), &samples(16, 5), |_| {
        format!("weights: {{dtype: int4, granularity: per_tensor}}\nguard: false\npasses: {passes}\n")
    })
}

fn job(model: &std::path::Path, config: &std::path::Path, threads: &str) -> std::process::Output {
    main_job(model, config, &[], Some(threads))
}

/// Runs the job; the written model's bytes and the report.
fn run_job(model: &std::path::Path, config: &std::path::Path, threads: &str) -> (Vec<u8>, serde_json::Value) {
    main_job_ok(model, config, &[], Some(threads))
}

#[test]
fn fold_batchnorm_then_adaround_end_to_end() {
    let eval = samples(16, 6);
    let float = net();
    let (_d1, model, config) = job_dir("[fold_batchnorm, adaround]");
    let (ours, report) = run_job(&model, &config, "2");
    assert_eq!(
        step_names(&report),
        ["fold_batchnorm", "calibrate", "plan", "adaround", "materialize"]
    );
    let notes: Vec<&str> = report["passes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pass"] == "adaround")
        .unwrap()["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert!(notes[0].starts_with("adaround: 3 weights rounded"), "{notes:#?}");
    // Right after calibration: its layer inputs measured in calibration's run of the model.
    assert!(
        notes[1].starts_with("layer inputs of 3 layers from calibration's run of the model, 0"),
        "{notes:#?}"
    );
    let (same, _) = run_job(&model, &config, "1");
    assert_eq!(ours, same, "RAYON_NUM_THREADS=1 and 2 write different models");

    let (_d2, model, config) = job_dir("[fold_batchnorm]");
    let (nearest, _) = run_job(&model, &config, "2");
    let load = |bytes: &[u8]| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, bytes).unwrap();
        onnxq::onnx::load_model(&path).unwrap()
    };
    let (e_ours, e_nearest) = (
        qdq_output_mse(&float, &load(&ours), &eval),
        qdq_output_mse(&float, &load(&nearest), &eval),
    );
    println!("held-out output mse: nearest {e_nearest:.4e}, adaround {e_ours:.4e}");
    assert!(
        e_ours < 0.9 * e_nearest,
        "nearest {e_nearest:.4e}, adaround {e_ours:.4e}"
    );
}

#[test]
fn a_misspelt_option_is_refused_with_a_suggestion() {
    let (_dir, model, config) = job_dir("[fold_batchnorm, {adaround: {iteration: 10}}]");
    let o = job(&model, &config, "1");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unknown field `iteration`") && stderr.contains("did you mean `iterations`?"),
        "{stderr}"
    );
    let (_dir, model, config) = job_dir("[{adaround: {warmup: 2}}]");
    let o = job(&model, &config, "1");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("warmup must be in [0, 1)"), "{stderr}");
}
