//! Builders for small hand-made ONNX models, and paths of the shipped ones.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use onnxq::proto::attribute_proto::AttributeType;
use onnxq::proto::tensor_proto::DataType;
use onnxq::proto::tensor_shape_proto::{dimension, Dimension};
use onnxq::proto::type_proto::{self, Value};
use onnxq::proto::*;

pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn with_attr(mut n: NodeProto, a: AttributeProto) -> NodeProto {
    n.attribute.push(a);
    n
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

pub fn attr_graph(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    }
}

pub fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    }
}

pub fn tensor_f32(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn seeded(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `n` seeded samples of `shape` (N, C, H, W), smooth in space (3×3 box blur of uniform noise,
/// plus a per-channel offset): neighbouring taps are strongly correlated, as in images.
pub fn smooth_samples(shape: [usize; 4], n: usize, seed: u64) -> Vec<tract_onnx::prelude::Tensor> {
    let (c, h, w) = (shape[1], shape[2], shape[3]);
    (0..n)
        .map(|i| {
            let noise = seeded(c * h * w, seed * 1000 + i as u64);
            let mut v = vec![0f32; c * h * w];
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let mut s = 0.0;
                        for yy in y.saturating_sub(1)..(y + 2).min(h) {
                            for xx in x.saturating_sub(1)..(x + 2).min(w) {
                                s += noise[(ch * h + yy) * w + xx];
                            }
                        }
                        v[(ch * h + y) * w + x] = s / 3.0 + 0.25 * ch as f32;
                    }
                }
            }
            tract_onnx::prelude::Tensor::from_shape(&shape, &v).unwrap()
        })
        .collect()
}

/// A seeded weight whose output channel `c` (axis 0) is scaled by `(c + 1) / channels`: every
/// channel has its own range, so per-channel scales differ visibly, and with one per-tensor scale
/// the small channels lose the most.
pub fn conv_weight(name: &str, dims: &[i64], seed: u64) -> TensorProto {
    let n: i64 = dims.iter().product();
    let per_channel = (n / dims[0]) as usize;
    let v: Vec<f32> = seeded(n as usize, seed)
        .into_iter()
        .enumerate()
        .map(|(i, v)| v * ((i / per_channel) as f32 + 1.0) / dims[0] as f32)
        .collect();
    tensor_f32(name, dims, &v)
}

/// BatchNormalization `name` over `x` with the given statistics, as constants
/// `<name>.{scale,B,mean,var}`.
pub fn batchnorm_node(
    name: &str,
    x: &str,
    y: &str,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
) -> (NodeProto, Vec<TensorProto>) {
    let c = gamma.len() as i64;
    let params = vec![
        tensor_f32(&format!("{name}.scale"), &[c], gamma),
        tensor_f32(&format!("{name}.B"), &[c], beta),
        tensor_f32(&format!("{name}.mean"), &[c], mean),
        tensor_f32(&format!("{name}.var"), &[c], var),
    ];
    let ins: Vec<String> = ["scale", "B", "mean", "var"]
        .iter()
        .map(|p| format!("{name}.{p}"))
        .collect();
    let mut inputs = vec![x];
    inputs.extend(ins.iter().map(String::as_str));
    (node("BatchNormalization", name, &inputs, &[y]), params)
}

/// x [1, 2, 4, 4] → Conv `conv1` (`w1` [3, 2, 1, 1]) → c1 → the BatchNorm `bn` (reading c1,
/// writing n1) → `activation` (op, name, output) → Conv `conv2` (`w2` [2, 3, 1, 1]) → y, opset 17.
pub fn conv_bn_act_conv(
    bn: (NodeProto, Vec<TensorProto>),
    activation: (&str, &str, &str),
    w1: TensorProto,
    w2: TensorProto,
) -> onnxq::ir::Model {
    let (op, name, output) = activation;
    let mut inits = vec![w1, w2];
    inits.extend(bn.1);
    let g = graph(
        vec![
            node("Conv", "conv1", &["x", "w1"], &["c1"]),
            bn.0,
            node(op, name, &["n1"], &[output]),
            node("Conv", "conv2", &[output, "w2"], &["y"]),
        ],
        inits,
        vec![f32_info("x", &[1, 2, 4, 4])],
        vec![f32_info("y", &[1, 2, 4, 4])],
    );
    onnxq::ir::Model::from_proto(model(g, 17)).unwrap()
}

/// A float32 value info with static dims.
pub fn f32_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    value_info(name, DataType::Float, dims)
}

/// An `ints` attribute.
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// A tensor value info; a dim < 0 is symbolic ("n").
pub fn value_info(name: &str, elem: DataType, dims: &[i64]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| Dimension {
            value: Some(if d >= 0 {
                dimension::Value::DimValue(d)
            } else {
                dimension::Value::DimParam("n".into())
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn graph(
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
) -> GraphProto {
    GraphProto {
        name: Some("test".into()),
        node: nodes,
        initializer: initializers,
        input: inputs,
        output: outputs,
        ..Default::default()
    }
}

pub fn model(graph: GraphProto, opset: i64) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        producer_name: Some("onnxq-tests".into()),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

pub fn encode(m: &ModelProto) -> Vec<u8> {
    use prost::Message;
    m.encode_to_vec()
}

/// Writes a model into a fresh temporary folder and returns (folder guard, path).
pub fn write_temp(m: &ModelProto, file: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    std::fs::write(&path, encode(m)).unwrap();
    (dir, path)
}

/// The outputs on seeded inputs in [-1, 1), for a model with one f32 input of shape `shape`.
pub fn outputs(model: &onnxq::ir::Model, shape: &[usize]) -> Vec<Vec<f32>> {
    use tract_onnx::prelude::{IntoTValue, Tensor};
    let input = model.graph.runtime_inputs().next().unwrap().name().to_string();
    let runner = onnxq::runtime::Runner::new(
        model,
        &[(input, tract_onnx::prelude::DatumType::F32, shape.to_vec())],
        &[],
    )
    .unwrap();
    let n = shape.iter().product();
    let x = Tensor::from_shape::<f32>(shape, &seeded(n, 42)).unwrap();
    runner
        .run(vec![x.into_tvalue()])
        .unwrap()
        .iter()
        .map(|t| onnxq::runtime::to_f32_vec(t).unwrap())
        .collect()
}

/// max |got − want| / max |want|.
pub fn max_relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-12);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((*g as f64 - *w as f64).abs()))
        / scale
}

/// Runs a model on every sample of a shipped data file: per sample, per output, the values.
pub fn run_eval(m: &onnxq::ir::Model, data: &str) -> Vec<Vec<Vec<f32>>> {
    use onnxq::calib::data::{Dataset, InputSpec};
    let data = Dataset::load(&repo(data)).unwrap();
    let bound = data.bind(&InputSpec::of_graph(&m.graph)).unwrap();
    let runner = onnxq::runtime::Runner::new(m, &bound.sample_shapes(), &[]).unwrap();
    runner
        .run_all(
            bound.samples,
            |i| bound.sample(i),
            |_, outs| outs.iter().map(|t| onnxq::runtime::to_f32_vec(t)).collect(),
        )
        .unwrap()
}

/// A float-preserving rewrite: every output within 1e-5 relative on seeded inputs, and not all
/// zeros (which would make the check weak).
pub fn assert_same_outputs(before: &onnxq::ir::Model, after: &onnxq::ir::Model, shape: &[usize]) {
    let (want, got) = (outputs(before, shape), outputs(after, shape));
    assert_eq!(want.len(), got.len());
    for (o, (g, w)) in got.iter().zip(&want).enumerate() {
        let err = max_relative_error(g, w);
        assert!(err <= 1e-5, "output {o}: relative error {err:e}");
        assert!(w.iter().any(|v| *v != 0.0), "output {o} is all zeros: a weak check");
    }
}

/// Writes `data` as the samples of input `x` in `dir/calib.npz`.
pub fn write_x_calibration(dir: &Path, data: &[tract_onnx::prelude::Tensor]) -> PathBuf {
    let p = dir.join("calib.npz");
    onnxq::calib::data::write_npz(&p, &[("x".to_string(), data.to_vec())]).unwrap();
    p
}

/// The data source `calibration: {data: <data>}` opens for `model`.
pub fn calibration_source(model: &onnxq::ir::Model, data: &Path) -> onnxq::calib::source::DataSource {
    let yaml = format!("calibration: {{data: {:?}}}\n", data.to_str().unwrap());
    let config = onnxq::pipeline::config::Config::parse(&yaml, Path::new("q.yaml")).unwrap();
    onnxq::calib::source::DataSource::open(
        config.calibration.as_ref().unwrap(),
        &onnxq::calib::data::InputSpec::of_graph(&model.graph),
    )
    .unwrap()
}

/// The steps a main-job report lists, in the order they ran.
pub fn step_names(report: &serde_json::Value) -> Vec<String> {
    report["passes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pass"].as_str().unwrap().to_string())
        .collect()
}

/// A per-tensor minmax plan of `model` with weights of `dtype` (the generic target otherwise).
pub fn per_tensor_minmax_plan(
    model: &onnxq::ir::Model,
    stats: &onnxq::calib::stats::CalibrationStats,
    dtype: onnxq::quant::params::QuantDtype,
) -> onnxq::quant::plan::Plan {
    minmax_plan(model, stats, |rules| {
        rules.per_channel_weights = false;
        rules.weights.dtype = dtype;
    })
}

/// The generic target's plan with min/max ranges, its rules changed by `edit`.
pub fn minmax_plan(
    model: &onnxq::ir::Model,
    stats: &onnxq::calib::stats::CalibrationStats,
    edit: impl FnOnce(&mut onnxq::quant::rules::TargetRules),
) -> onnxq::quant::plan::Plan {
    use onnxq::quant::plan::{build_plan, Overrides, PlanOptions};
    use onnxq::quant::rules::Target;
    let mut rules = Target::Generic.rules();
    edit(&mut rules);
    let options = PlanOptions {
        target: Target::Generic,
        rules,
        method: onnxq::calib::observers::Method::MinMax,
        overrides: Overrides::default(),
    };
    build_plan(model, stats, &options).unwrap()
}

/// Mean squared error of output `y` of `quantized` (a QDQ model, run lowered) against `float`
/// on `eval`, the samples of input `x`.
pub fn qdq_output_mse(
    float: &onnxq::ir::Model,
    quantized: &onnxq::ir::Model,
    eval: &[tract_onnx::prelude::Tensor],
) -> f64 {
    use tract_onnx::prelude::{DatumType, IntoTValue};
    let lowered = onnxq::verify::lower::lower_all_qdq(quantized).unwrap();
    let run = |m: &onnxq::ir::Model| -> Vec<Vec<f32>> {
        let shape = eval[0].shape().to_vec();
        let runner = onnxq::runtime::Runner::new(m, &[("x".into(), DatumType::F32, shape)], &[]).unwrap();
        let y = runner.outputs.iter().position(|o| o == "y").unwrap();
        eval.iter()
            .map(|x| onnxq::runtime::to_f32_vec(&runner.run(vec![x.clone().into_tvalue()]).unwrap()[y]).unwrap())
            .collect()
    };
    let (want, got) = (run(float), run(&lowered));
    let (mut sq, mut n) = (0f64, 0usize);
    for (w, g) in want.iter().zip(&got) {
        for (a, b) in w.iter().zip(g) {
            sq += (*a as f64 - *b as f64).powi(2);
            n += 1;
        }
    }
    sq / n as f64
}

/// `qdq_output_mse` of the model `plan` quantizes.
pub fn plan_output_mse(
    float: &onnxq::ir::Model,
    plan: &onnxq::quant::plan::Plan,
    eval: &[tract_onnx::prelude::Tensor],
) -> f64 {
    let mut q = float.clone();
    onnxq::quant::materialize::materialize(&mut q, plan).unwrap();
    qdq_output_mse(float, &q, eval)
}

/// A folder for a run of the `onnxq` binary: `m` as `model.onnx`, `samples` as the calibration
/// data of input `x`, and `q.yaml`: `calibration: {data: …}` then `config(data)`, given the
/// samples' path quoted (for `verify: {data: …}`). Returns (folder guard, model, config).
pub fn job_folder(
    m: &ModelProto,
    samples: &[tract_onnx::prelude::Tensor],
    config: impl FnOnce(&str) -> String,
) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.onnx");
    std::fs::write(&model, encode(m)).unwrap();
    let data = format!("{:?}", write_x_calibration(dir.path(), samples).to_str().unwrap());
    let path = dir.path().join("q.yaml");
    std::fs::write(&path, format!("calibration: {{data: {data}}}\n{}", config(&data))).unwrap();
    (dir, model, path)
}

/// The `onnxq` main job on `model` with `config`, writing `out.onnx` and `report.json` beside
/// the config, with `extra` arguments and `threads` worker threads when given.
pub fn main_job(model: &Path, config: &Path, extra: &[&str], threads: Option<&str>) -> std::process::Output {
    let dir = config.parent().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_onnxq"));
    command
        .args([model.to_str().unwrap(), "--config", config.to_str().unwrap()])
        .args(["-o", dir.join("out.onnx").to_str().unwrap()])
        .args(["--report", dir.join("report.json").to_str().unwrap()])
        .args(extra);
    if let Some(threads) = threads {
        command.env("RAYON_NUM_THREADS", threads);
    }
    command.output().unwrap()
}

/// `main_job`, required to succeed: the written model's bytes and the report.
pub fn main_job_ok(model: &Path, config: &Path, extra: &[&str], threads: Option<&str>) -> (Vec<u8>, serde_json::Value) {
    let o = main_job(model, config, extra, threads);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = config.parent().unwrap();
    let report = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    (std::fs::read(dir.join("out.onnx")).unwrap(), report)
}
