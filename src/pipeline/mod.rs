//! The pass manager: a tiny `Pass` trait, one explicit registry of pass names (passes/mod.rs),
//! validation after every pass, dumps before/after on request, and stopping after a given pass
//! to bisect a pipeline.

pub mod config;

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::ir::Model;

/// What passes share and report. Later issues add the BatchNorm records, calibration statistics
/// and the quantization plan here, as explicit fields.
#[derive(Debug, Default)]
pub struct Context {
    /// One entry per pass run: what it changed, for the report.
    pub pass_reports: Vec<PassReport>,
    /// The BatchNormalization statistics `fold_batchnorm` folded away, keyed by the folded layer's
    /// output tensor, for bias absorption and analytical bias correction.
    pub batchnorm_records: Vec<crate::passes::BatchNormRecord>,
    /// Set by the `correct_bias` pass: bias correction is asked for, in this mode. It runs after
    /// planning (`passes::correct_bias::apply`), when the quantized weights are known.
    pub bias_correction: Option<crate::passes::BiasCorrectionMode>,
    /// Set by the `gptq` pass: weight roundings are chosen from calibration data after planning
    /// (`passes::gptq::apply`), before bias correction.
    pub weight_rounding: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PassReport {
    pub pass: String,
    /// One line per rewrite or per rejected candidate, with its reason.
    pub notes: Vec<String>,
    pub nodes_before: usize,
    pub nodes_after: usize,
}

pub trait Pass {
    fn name(&self) -> &'static str;
    /// Takes the pass's options from the config (`passes: [{name: {option: value}}]`). Passes
    /// without options refuse any.
    fn configure(&mut self, options: &serde_yaml::Value) -> std::result::Result<(), String> {
        match options {
            serde_yaml::Value::Null => Ok(()),
            _ => Err(format!("pass `{}` takes no options", self.name())),
        }
    }
    /// Rewrites the model. Returns notes for the report (what changed, what was left and why).
    /// A precondition that does not hold is an error, never a silent skip.
    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>>;
}

#[derive(Debug, Default, Clone)]
pub struct DebugOptions {
    /// Write `NN-pass.before.txt`, `NN-pass.after.txt` and `NN-pass.diff` into this folder.
    pub dump_dir: Option<PathBuf>,
    /// Which passes to dump: a pass name or "all".
    pub dump_after: Option<String>,
    /// Stop the pipeline after this pass.
    pub stop_after: Option<String>,
}

/// Unified diff of two dumps, for `--dump-after` and snapshot tests.
pub fn dump_diff(before: &str, after: &str) -> String {
    similar::TextDiff::from_lines(before, after)
        .unified_diff()
        .context_radius(1)
        .header("before", "after")
        .to_string()
}

/// Runs the passes in order, checking the graph after each; an error names the failing pass
/// and the passes that ran before it.
pub fn run_passes(model: &mut Model, names: &[String], ctx: &mut Context, debug: &DebugOptions) -> Result<()> {
    let specs: Vec<PassSpec> = names
        .iter()
        .map(|n| PassSpec {
            name: n.clone(),
            options: serde_yaml::Value::Null,
        })
        .collect();
    run_pipeline(model, &specs, ctx, debug)
}

/// A pass as the config names it, with its options (Null when none).
#[derive(Debug, Clone, PartialEq)]
pub struct PassSpec {
    pub name: String,
    pub options: serde_yaml::Value,
}

/// Builds a configured pass; errors name the pass and what is wrong with its options.
pub fn create_pass(spec: &PassSpec) -> std::result::Result<Box<dyn Pass>, String> {
    let mut pass = crate::passes::create(&spec.name).ok_or_else(|| format!("unknown pass `{}`", spec.name))?;
    pass.configure(&spec.options)?;
    Ok(pass)
}

/// Runs configured passes in order (see [`run_passes`]).
pub fn run_pipeline(model: &mut Model, specs: &[PassSpec], ctx: &mut Context, debug: &DebugOptions) -> Result<()> {
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    for (i, spec) in specs.iter().enumerate() {
        let name = &spec.name;
        let pass = create_pass(spec).map_err(Error::Usage)?;
        let wants_dump = debug.dump_after.as_deref().is_some_and(|d| d == "all" || d == name);
        let before = wants_dump.then(|| model.to_string());
        let nodes_before = model.graph.nodes.node_count();
        let context = |e: Error| {
            let earlier = if i == 0 {
                "none".to_string()
            } else {
                names[..i].join(", ")
            };
            Error::Graph(format!("pass `{name}` (after: {earlier}): {e}"))
        };
        let notes = pass.run(model, ctx).map_err(context)?;
        model.graph.rebuild_edges().map_err(context)?;
        model.graph.check().map_err(context)?;
        ctx.pass_reports.push(PassReport {
            pass: name.clone(),
            notes,
            nodes_before,
            nodes_after: model.graph.nodes.node_count(),
        });
        if let (Some(before), Some(dir)) = (before, debug.dump_dir.as_ref()) {
            let after = model.to_string();
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            let stem = format!("{:02}-{name}", i + 1);
            for (suffix, text) in [
                ("before.txt", before.clone()),
                ("after.txt", after.clone()),
                ("diff", dump_diff(&before, &after)),
            ] {
                let path = dir.join(format!("{stem}.{suffix}"));
                crate::onnx::write_atomic(&path, text.as_bytes())?;
            }
        }
        if debug.stop_after.as_deref() == Some(name.as_str()) {
            break;
        }
    }
    Ok(())
}
