//! Each pass run alone on small graphs: a snapshot of the unified diff of the dump before and
//! after (cases where it fires and where it must not, with the reason), and a numeric check in
//! tract that the outputs are unchanged.

mod common;

use common::*;
use onnxq::ir::Model;
use onnxq::passes::Context;
use onnxq::pipeline::{dump_diff, run_passes, DebugOptions};
use onnxq::proto::tensor_proto::DataType;

/// Runs one pass; returns the dump diff with the pass's notes appended, and the model after.
fn run_one(pass: &str, model: Model) -> (String, Model) {
    let mut after = model.clone();
    let mut ctx = Context::default();
    run_passes(&mut after, &[pass.to_string()], &mut ctx, &DebugOptions::default()).unwrap();
    let mut text = dump_diff(&model.to_string(), &after.to_string());
    text.push_str("--- notes\n");
    for n in &ctx.pass_reports[0].notes {
        text.push_str(n);
        text.push('\n');
    }
    (text, after)
}

fn f32_info(name: &str) -> onnxq::proto::ValueInfoProto {
    value_info(name, DataType::Float, &[1, 4])
}

#[test]
fn eliminate_identity_inside_the_graph() {
    let g = graph(
        vec![
            node("Relu", "relu", &["x"], &["a"]),
            node("Identity", "copy", &["a"], &["b"]),
            node("Neg", "neg", &["b"], &["c"]),
            node("Add", "add", &["b", "c"], &["y"]),
        ],
        vec![],
        vec![f32_info("x")],
        vec![f32_info("y")],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after) = run_one("eliminate_identity", model.clone());
    insta::assert_snapshot!(diff);
    assert_eq!(outputs(&model, &[1, 4]), outputs(&after, &[1, 4]));
}

#[test]
fn eliminate_identity_keeps_the_graph_output_name() {
    let g = graph(
        vec![
            node("Relu", "relu", &["x"], &["a"]),
            node("Sigmoid", "sig", &["a"], &["z"]),
            node("Identity", "copy", &["a"], &["y"]),
        ],
        vec![],
        vec![f32_info("x")],
        vec![f32_info("y"), f32_info("z")],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after) = run_one("eliminate_identity", model.clone());
    insta::assert_snapshot!(diff);
    let names: Vec<&str> = after.graph.outputs.iter().map(|o| o.name()).collect();
    assert_eq!(names, ["y", "z"]);
    assert_eq!(outputs(&model, &[1, 4]), outputs(&after, &[1, 4]));
}

#[test]
fn eliminate_identity_must_not_fire() {
    // An input copied to an output, a constant copied to an output, two outputs that would
    // merge, and a copy read inside a subgraph: all four stay, each with its reason.
    let then_branch = graph(
        vec![node("Neg", "inner", &["s"], &["t"])],
        vec![],
        vec![],
        vec![f32_info("t")],
    );
    let else_branch = graph(
        vec![node("Abs", "inner2", &["s"], &["e"])],
        vec![],
        vec![],
        vec![f32_info("e")],
    );
    let mut iff = node("If", "branch", &["cond"], &["w"]);
    iff.attribute.push(attr_graph("then_branch", then_branch));
    iff.attribute.push(attr_graph("else_branch", else_branch));
    let g = graph(
        vec![
            node("Identity", "pass_input", &["x"], &["y"]),
            node("Identity", "pass_const", &["k"], &["kc"]),
            node("Relu", "relu", &["x"], &["r"]),
            node("Identity", "merge", &["r"], &["r2"]),
            node("Identity", "captured", &["x"], &["s"]),
            iff,
        ],
        vec![tensor_f32("k", &[1, 4], &[1.0, 2.0, 3.0, 4.0])],
        vec![f32_info("x"), value_info("cond", DataType::Bool, &[])],
        vec![
            f32_info("y"),
            f32_info("kc"),
            f32_info("r"),
            f32_info("r2"),
            f32_info("w"),
        ],
    );
    let model = Model::from_proto(model(g, 17)).unwrap();
    let (diff, after) = run_one("eliminate_identity", model.clone());
    insta::assert_snapshot!(diff);
    assert_eq!(after.to_string(), model.to_string(), "nothing may change");
}

/// A pass that leaves a node reading a tensor nobody writes: the kind of bug a new pass can have.
struct BreaksTheGraph;

impl onnxq::passes::Pass for BreaksTheGraph {
    fn name(&self) -> &'static str {
        "breaks_the_graph"
    }
    fn run(&self, model: &mut Model, _ctx: &mut Context) -> onnxq::Result<Vec<String>> {
        let n = onnxq::ir::Node::new("dangling", "Relu", vec!["nowhere".into()], "z", 0);
        model.graph.nodes.add_node(n);
        Ok(vec![])
    }
}

#[test]
fn a_graph_a_step_leaves_inconsistent_is_an_internal_error() {
    let g = graph(
        vec![node("Relu", "relu", &["x"], &["y"])],
        vec![],
        vec![f32_info("x")],
        vec![f32_info("y")],
    );
    let mut m = Model::from_proto(model(g, 17)).unwrap();
    let steps: Vec<Box<dyn onnxq::passes::Pass>> = vec![Box::new(BreaksTheGraph)];
    let e = onnxq::pipeline::run(&mut m, &steps, &mut Context::default(), &DebugOptions::default()).unwrap_err();
    assert_eq!(e.exit_code(), 4, "{e}");
    let text = e.to_string();
    assert!(
        text.starts_with("internal error: stage `breaks_the_graph` left an inconsistent graph")
            && text.ends_with("(this is a bug in onnxq, please report it with the command and model)"),
        "{text}"
    );
}
