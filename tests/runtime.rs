//! tract runs the shipped real models on their eval data and matches ONNX Runtime's outputs
//! (stored in models/*.eval.ort.npz); intermediate tensors come out by ONNX name; parallel runs
//! give the same results in the same order whatever the thread count.

mod common;

use common::{max_relative_error, repo};
use onnxq::calib::data::{Dataset, InputSpec};
use onnxq::onnx;
use onnxq::runtime::{to_f32_vec, Runner};
use tract_onnx::prelude::{DatumType, TValue};

fn run_eval(model: &str, extra: &[String]) -> (Vec<String>, Vec<Vec<Vec<f32>>>) {
    let m = onnx::load_model(&repo(&format!("models/{model}.onnx"))).unwrap();
    let data = Dataset::load(&repo(&format!("models/{model}.eval.npz"))).unwrap();
    let bound = data.bind(&InputSpec::of_graph(&m.graph)).unwrap();
    let runner = Runner::new(&m, &bound.sample_shapes(), extra).unwrap();
    let per_sample = runner
        .run_all(
            bound.samples,
            |i| bound.sample(i),
            |_, outs| outs.iter().map(|t| to_f32_vec(t)).collect(),
        )
        .unwrap();
    (runner.outputs.clone(), per_sample)
}

#[test]
fn tract_matches_onnx_runtime_on_shipped_models() {
    for model in ["ppocr_mobile_v2_cls", "crepe_tiny"] {
        let (names, samples) = run_eval(model, &[]);
        let reference = Dataset::load(&repo(&format!("models/{model}.eval.ort.npz"))).unwrap();
        for (o, name) in names.iter().enumerate() {
            let want = reference.arrays.iter().find(|a| &a.name == name).unwrap();
            let want: Vec<f32> = (0..want.shape[0])
                .flat_map(|i| to_f32_vec(&want.sample(i).unwrap()).unwrap())
                .collect();
            let got: Vec<f32> = samples.iter().flat_map(|s| s[o].iter().copied()).collect();
            let err = max_relative_error(&got, &want);
            assert!(
                err < 1e-5,
                "{model} output {name}: tract vs ONNX Runtime relative error {err:e}"
            );
        }
    }
}

#[test]
fn intermediate_tensors_are_exposed_by_onnx_name() {
    let m = onnx::load_model(&repo("models/crepe_tiny.onnx")).unwrap();
    let conv = m.graph.nodes.node_weights().find(|n| n.op_type == "Conv").unwrap();
    let relu = m.graph.nodes.node_weights().find(|n| n.op_type == "Relu").unwrap();
    let wanted = vec![conv.outputs[0].clone(), relu.outputs[0].clone()];
    let (names, samples) = run_eval("crepe_tiny", &wanted);
    assert_eq!(&names[1..], wanted.as_slice());
    for s in &samples {
        // conv1 has 128 channels; ReLU output is non-negative and not all zero.
        assert_eq!(s[1].len() % 128, 0);
        assert!(s[2].iter().all(|v| *v >= 0.0) && s[2].iter().any(|v| *v > 0.0));
    }
    // Asking for intermediates does not change the model's outputs.
    let (_, plain) = run_eval("crepe_tiny", &[]);
    for (a, b) in samples.iter().zip(&plain) {
        assert_eq!(a[0], b[0]);
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (_, serial) = one.install(|| run_eval("ppocr_mobile_v2_cls", &[]));
    let (_, parallel) = run_eval("ppocr_mobile_v2_cls", &[]);
    assert_eq!(serial, parallel);
    assert_eq!(serial.len(), 8);
}

#[test]
fn a_round_trip_leaves_tract_outputs_bit_identical() {
    let m = onnx::load_model(&repo("models/ppocr_mobile_v2_cls.onnx")).unwrap();
    let bytes = onnx::model_bytes(&m).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = dir.path().join("rt.onnx");
    std::fs::write(&written, bytes).unwrap();
    let back = onnx::load_model(&written).unwrap();
    let data = Dataset::load(&repo("models/ppocr_mobile_v2_cls.eval.npz")).unwrap();
    let bound = data.bind(&InputSpec::of_graph(&m.graph)).unwrap();
    let run = |model| {
        let r = Runner::new(model, &bound.sample_shapes(), &[]).unwrap();
        r.run_all(bound.samples, |i| bound.sample(i), |_, o| to_f32_vec(&o[0]))
            .unwrap()
    };
    assert_eq!(run(&m), run(&back));
}

/// Every node output of a shipped model, in topological order.
fn every_node_output(m: &onnxq::ir::Model) -> Vec<String> {
    let order = m.graph.topological_order().unwrap();
    order
        .into_iter()
        .flat_map(|ix| m.graph.nodes[ix].outputs.clone())
        .filter(|o| !o.is_empty())
        .collect()
}

/// `run_visiting` shows the fed inputs first, in order, then every tensor `run` returns exactly
/// once, with bit-identical values; a visitor failing on every returned tensor gets the error of
/// the first one in `outputs` order, as when they were visited in that order.
fn assert_visits_match_run(what: &str, runner: &Runner, inputs: &[String], sample: impl Fn() -> Vec<TValue>) {
    use onnxq::error::Error;
    let returned = runner.run(sample()).unwrap();
    let mut seen: Vec<(String, Vec<f32>)> = Vec::new();
    runner
        .run_visiting(sample(), |name, t| {
            seen.push((name.to_string(), to_f32_vec(t)?));
            Ok(())
        })
        .unwrap();
    let (fed, rest) = seen.split_at(inputs.len());
    assert_eq!(
        fed.iter().map(|s| &s.0).collect::<Vec<_>>(),
        inputs.iter().collect::<Vec<_>>()
    );
    assert_eq!(rest.len(), runner.outputs.len(), "{what}");
    for (name, value) in runner.outputs.iter().zip(&returned) {
        let shown: Vec<&Vec<f32>> = rest.iter().filter(|s| &s.0 == name).map(|s| &s.1).collect();
        assert_eq!(shown.len(), 1, "{what}: {name} shown {} times", shown.len());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(shown[0]), bits(&to_f32_vec(value).unwrap()), "{what}: {name}");
    }
    let err = runner
        .run_visiting(sample(), |name, _| {
            if inputs.iter().any(|n| n == name) {
                Ok(())
            } else {
                Err(Error::Runtime(format!("refused {name}")))
            }
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        Error::Runtime(format!("refused {}", runner.outputs[0])).to_string()
    );
}

#[test]
fn visiting_shows_each_input_and_each_returned_tensor_once_with_the_values_run_returns() {
    for model in ["ppocr_mobile_v2_cls", "crepe_tiny"] {
        let m = onnx::load_model(&repo(&format!("models/{model}.onnx"))).unwrap();
        let data = Dataset::load(&repo(&format!("models/{model}.eval.npz"))).unwrap();
        let bound = data.bind(&InputSpec::of_graph(&m.graph)).unwrap();
        let runner = Runner::new(&m, &bound.sample_shapes(), &every_node_output(&m)).unwrap();
        let inputs: Vec<String> = bound.sample_shapes().into_iter().map(|(n, _, _)| n).collect();
        for i in 0..2 {
            assert_visits_match_run(model, &runner, &inputs, || bound.sample(i).unwrap());
        }
    }
}

#[test]
fn visiting_shows_folded_constants_shared_outlets_dead_ends_and_read_graph_outputs() {
    use common::{f32_info, graph, model, node, seeded, tensor_f32};
    use tract_onnx::prelude::{IntoTValue, Tensor};
    // c folds to a constant; b is a itself once Identity is gone; dead is read by nothing; y is
    // a graph output that z reads.
    let g = graph(
        vec![
            node("Add", "fold", &["k1", "k2"], &["c"]),
            node("Relu", "relu", &["x"], &["a"]),
            node("Identity", "copy", &["a"], &["b"]),
            node("Add", "add", &["b", "c"], &["d"]),
            node("Sigmoid", "dead_end", &["x"], &["dead"]),
            node("Mul", "mul", &["d", "x"], &["y"]),
            node("Abs", "abs", &["y"], &["z"]),
        ],
        vec![
            tensor_f32("k1", &[1, 2, 1, 1], &[0.5, -1.0]),
            tensor_f32("k2", &[1, 2, 1, 1], &[0.25, 2.0]),
        ],
        vec![f32_info("x", &[1, 2, 4, 4])],
        vec![f32_info("y", &[1, 2, 4, 4]), f32_info("z", &[1, 2, 4, 4])],
    );
    let m = onnxq::ir::Model::from_proto(model(g, 17)).unwrap();
    let shape = vec![1usize, 2, 4, 4];
    let extra = every_node_output(&m);
    let runner = Runner::new(&m, &[("x".into(), DatumType::F32, shape.clone())], &extra).unwrap();
    assert_eq!(runner.outputs.len(), 7);
    let sample = || vec![Tensor::from_shape::<f32>(&shape, &seeded(32, 7)).unwrap().into_tvalue()];
    assert_visits_match_run("hand-made", &runner, &["x".to_string()], sample);
}

#[test]
fn tensor_ranks_come_from_tracts_analysis_without_value_infos() {
    use common::*;
    let g = graph(
        vec![
            node("Conv", "conv", &["x", "w"], &["c"]),
            node("Flatten", "flatten", &["c"], &["f"]),
            node("ReduceSum", "sum", &["f"], &["y"]),
        ],
        vec![conv_weight("w", &[3, 2, 1, 1], 1)],
        vec![f32_info("x", &[1, 2, 4, 4])],
        vec![f32_info("y", &[1, 1])],
    );
    let m = onnxq::ir::Model::from_proto(model(g, 13)).unwrap();
    assert!(m.graph.value_info.is_empty());
    let ranks = onnxq::runtime::tensor_ranks(&m, &[("x".into(), DatumType::F32, vec![1, 2, 4, 4])]).unwrap();
    assert_eq!((ranks["x"], ranks["c"], ranks["f"], ranks["y"]), (4, 4, 2, 2));
}

/// x → Conv → Relu → (× y) → Add(·, Relu) and Relu → Sigmoid: with y changed, a run reusing a
/// recorded one computes again only what y reaches, and returns what a whole run returns.
#[test]
fn a_run_reusing_a_recorded_one_recomputes_only_what_the_changed_input_reaches() {
    use common::{conv_weight, f32_info, graph, model, node, write_temp};
    use tract_onnx::prelude::{IntoTValue, Tensor};
    let g = graph(
        vec![
            node("Conv", "conv", &["x", "w"], &["c"]),
            node("Relu", "relu", &["c"], &["r"]),
            node("Mul", "mul", &["r", "y"], &["m"]),
            node("Add", "add", &["m", "r"], &["out"]),
            node("Sigmoid", "sigmoid", &["r"], &["side"]),
        ],
        vec![conv_weight("w", &[4, 3, 3, 3], 7)],
        vec![f32_info("x", &[1, 3, 8, 8]), f32_info("y", &[1])],
        vec![f32_info("out", &[1, 4, 6, 6]), f32_info("side", &[1, 4, 6, 6])],
    );
    let (_dir, path) = write_temp(&model(g, 13), "two_inputs.onnx");
    let m = onnx::load_model(&path).unwrap();
    let shapes = vec![
        ("x".to_string(), DatumType::F32, vec![1, 3, 8, 8]),
        ("y".to_string(), DatumType::F32, vec![1]),
    ];
    let runner = Runner::new(&m, &shapes, &[]).unwrap();
    let x = Tensor::from_shape(&[1, 3, 8, 8], &common::seeded(192, 3))
        .unwrap()
        .into_tvalue();
    let y = |v: f32| Tensor::from_shape(&[1], &[v]).unwrap().into_tvalue();
    let (recorded_outputs, recording) = runner.run_recording(vec![x.clone(), y(1.0)]).unwrap();
    let whole = runner.run(vec![x.clone(), y(1.0)]).unwrap();
    assert_eq!(recorded_outputs, whole, "recording changes nothing");

    let dependent = runner.dependents(&[1]).unwrap();
    let count = dependent.iter().filter(|&&d| d).count();
    assert!(count >= 2, "y and what it multiplies reach the output: {count} nodes");
    assert!(
        count < dependent.len() - 2,
        "the conv and relu do not depend on y: {count} of {}",
        dependent.len()
    );
    let reused = runner
        .run_reusing(vec![x.clone(), y(-2.5)], &recording, &dependent)
        .unwrap();
    let whole = runner.run(vec![x.clone(), y(-2.5)]).unwrap();
    assert_eq!(reused, whole, "bit for bit what a whole run returns");
    assert_ne!(reused[0], recorded_outputs[0], "the changed input reached the output");
    assert_eq!(reused[1], recorded_outputs[1], "the side output does not depend on y");
    // Reusing leaves the recording as it was.
    let again = runner.run_reusing(vec![x, y(1.0)], &recording, &dependent).unwrap();
    assert_eq!(again, recorded_outputs);
}
