//! The pipeline: the steps a config runs, in one visible list ([`steps`]), and the pass manager
//! that runs them ([`run`]): validation after every step, dumps before/after on request, and
//! stopping after any step to bisect a pipeline.
//!
//! The steps, in order: the config's graph passes; then, when quantizing, the stages
//! `calibrate` and `plan`, `mixed_precision` (when configured), the config's plan passes in the
//! order listed, the accuracy `guard` (on by default with calibration data, unless
//! `mixed_precision` chose the precisions), `materialize`, `lint` (when the target has Q/DQ
//! rules) and `verify` (when configured). Passes and stages implement one trait
//! ([`crate::passes::Pass`]), so `--dump-after` and `--stop-after` work for each.

pub mod config;
pub mod stages;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::ir::Model;
use crate::passes::{Context, Pass, PassReport, Phase};
use config::Config;

/// What the job knows beyond the config: file paths of the command line.
#[derive(Debug, Default, Clone)]
pub struct JobFiles {
    /// The config file, for error messages.
    pub config: PathBuf,
    /// Calibration statistics file: reused when it matches, written otherwise.
    pub stats: Option<PathBuf>,
    /// Observe every float tensor (`onnxq calibrate`, whose report lists them all), not only
    /// those a plan can quantize.
    pub observe_every_tensor: bool,
}

/// The steps `config` runs, in order (module docs). The config was validated when loaded
/// (names, options, phase order, requirements), so building cannot fail.
pub fn steps(config: &Config, files: &JobFiles) -> Vec<Box<dyn Pass>> {
    let passes: Vec<Box<dyn Pass>> = config
        .passes
        .iter()
        .map(|spec| create_pass(spec).expect("validated when the config was loaded"))
        .collect();
    let (graph_passes, plan_passes): (Vec<_>, Vec<_>) = passes.into_iter().partition(|p| p.phase() == Phase::Graph);
    let mut steps = graph_passes;
    if config.quantize {
        steps.push(Box::new(stages::Calibrate::new(config, files)));
        steps.push(Box::new(stages::Plan::new(config)));
        // Mixed precision chooses before the plan passes: they then round and correct exactly
        // the weights that stay int8, as when the same precisions are pinned by overrides. The
        // guard measures after them: what it keeps int8 is what gets written (`quant::guard`).
        if let Some(stage) = stages::MixedPrecision::new(config) {
            steps.push(Box::new(stage));
        }
        steps.extend(plan_passes);
        if let Some(stage) = stages::Guard::new(config) {
            steps.push(Box::new(stage));
        }
        steps.push(Box::new(stages::Materialize));
        if let Some(stage) = stages::Lint::new(config) {
            steps.push(Box::new(stage));
        }
        if let Some(stage) = stages::Verify::new(config) {
            steps.push(Box::new(stage));
        }
    }
    steps
}

/// The names of `steps`, for messages and for checking `--dump-after`/`--stop-after`.
pub fn step_names(steps: &[Box<dyn Pass>]) -> Vec<&'static str> {
    steps.iter().map(|s| s.name()).collect()
}

/// `steps` up to and including the one named `last` (all of them when it is not there).
pub fn through(mut steps: Vec<Box<dyn Pass>>, last: &str) -> Vec<Box<dyn Pass>> {
    if let Some(i) = steps.iter().position(|s| s.name() == last) {
        steps.truncate(i + 1);
    }
    steps
}

/// `steps` before the first one named in `names` (all of them when none is there).
pub fn before(mut steps: Vec<Box<dyn Pass>>, names: &[&str]) -> Vec<Box<dyn Pass>> {
    if let Some(i) = steps.iter().position(|s| names.contains(&s.name())) {
        steps.truncate(i);
    }
    steps
}

#[derive(Debug, Default, Clone)]
pub struct DebugOptions {
    /// Write `NN-step.before.txt`, `NN-step.after.txt` and `NN-step.diff` into this folder.
    pub dump_dir: Option<PathBuf>,
    /// Which steps to dump: a pass or stage name, or "all".
    pub dump_after: Option<String>,
    /// Stop the pipeline after this step.
    pub stop_after: Option<String>,
}

impl DebugOptions {
    /// `--dump-after` and `--stop-after` must name a step the config runs (`--dump-after all` too).
    pub fn check(&self, steps: &[Box<dyn Pass>]) -> Result<()> {
        let names = step_names(steps);
        for (flag, value) in [("--dump-after", &self.dump_after), ("--stop-after", &self.stop_after)] {
            if let Some(step) = value {
                if (step != "all" || flag != "--dump-after") && !names.contains(&step.as_str()) {
                    let runs = if names.is_empty() {
                        "it runs no passes".to_string()
                    } else {
                        format!("it runs: {}", names.join(", "))
                    };
                    return Err(Error::Usage(format!(
                        "{flag} {step}: the config does not run that pass or stage ({runs})"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Unified diff of two dumps, for `--dump-after` and snapshot tests.
pub fn dump_diff(before: &str, after: &str) -> String {
    similar::TextDiff::from_lines(before, after)
        .unified_diff()
        .context_radius(1)
        .header("before", "after")
        .to_string()
}

/// A pass as the config names it, with its options (Null when none).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
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

/// Runs the steps in order, checking the graph after each; an error names the failing step and
/// the steps that ran before it. Stops after `debug.stop_after`.
pub fn run(model: &mut Model, steps: &[Box<dyn Pass>], ctx: &mut Context, debug: &DebugOptions) -> Result<()> {
    let names = step_names(steps);
    ctx.layer_inputs_follow_calibration = layer_inputs_follow_calibration(&names, debug.stop_after.as_deref());
    for (i, step) in steps.iter().enumerate() {
        let name = step.name();
        let wants_dump = debug.dump_after.as_deref().is_some_and(|d| d == "all" || d == name);
        let before = wants_dump.then(|| dump_text(model, ctx));
        let nodes_before = model.graph.nodes.node_count();
        let kind = if crate::passes::NAMES.contains(&name) {
            "pass"
        } else {
            "stage"
        };
        let context = |e: Error| match e {
            Error::Graph(m) => {
                let earlier = if i == 0 {
                    "none".to_string()
                } else {
                    names[..i].join(", ")
                };
                Error::Graph(format!("{kind} `{name}` (after: {earlier}): {m}"))
            }
            Error::Internal(m) => Error::Internal(format!("{kind} `{name}`: {m}")),
            other => other,
        };
        // The model was checked when loaded: a graph a step leaves inconsistent is onnxq's bug.
        let broke = |e: Error| Error::internal(format!("{kind} `{name}` left an inconsistent graph: {e}"));
        let started = std::time::Instant::now();
        let notes = step.run(model, ctx).map_err(context)?;
        model.graph.rebuild_edges().map_err(broke)?;
        model.graph.check().map_err(broke)?;
        // A plan pass's notes are what it did to the plan: worth seeing (a stage prints its own).
        if kind == "pass" && step.phase() == Phase::Plan {
            for n in &notes {
                eprintln!("  {n}");
            }
        }
        ctx.pass_reports.push(PassReport {
            pass: name.to_string(),
            notes,
            nodes_before,
            nodes_after: model.graph.nodes.node_count(),
            ms: started.elapsed().as_secs_f64() * 1e3,
        });
        if let (Some(before), Some(dir)) = (before, debug.dump_dir.as_ref()) {
            write_dump(dir, &format!("{:02}-{name}", i + 1), &before, &dump_text(model, ctx))?;
        }
        if debug.stop_after.as_deref() == Some(name) {
            break;
        }
    }
    Ok(())
}

/// Whether a pass that fits roundings to the layers' inputs (`passes::MEASURES_LAYER_INPUTS`:
/// gptq, adaround) is the first pass after `calibrate` among the steps that run (`names`, up to
/// `stop_after`), not counting the passes that change only scales
/// (`passes::CHANGES_ONLY_SCALES`: easyquant): the stages between them (plan, mixed precision)
/// change only the plan, so the float model that pass measures is the one calibration runs.
fn layer_inputs_follow_calibration(names: &[&str], stop_after: Option<&str>) -> bool {
    let end = stop_after
        .and_then(|s| names.iter().position(|n| *n == s))
        .map_or(names.len(), |i| i + 1);
    let names = &names[..end];
    let Some(calibrate) = names.iter().position(|n| *n == "calibrate") else {
        return false;
    };
    names[calibrate + 1..]
        .iter()
        .find(|n| crate::passes::NAMES.contains(n) && !crate::passes::CHANGES_ONLY_SCALES.contains(n))
        .is_some_and(|n| crate::passes::MEASURES_LAYER_INPUTS.contains(n))
}

/// The graph dump followed by what the stages produced so far (statistics, plan).
fn dump_text(model: &Model, ctx: &Context) -> String {
    format!("{model}{}", ctx.dump())
}

fn write_dump(dir: &Path, stem: &str, before: &str, after: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (suffix, text) in [
        ("before.txt", before),
        ("after.txt", after),
        ("diff", &dump_diff(before, after)),
    ] {
        crate::onnx::write_atomic(&dir.join(format!("{stem}.{suffix}")), text.as_bytes())?;
    }
    Ok(())
}

/// Runs configured passes in order (see [`run`]); for tests and tools that run passes alone.
pub fn run_pipeline(model: &mut Model, specs: &[PassSpec], ctx: &mut Context, debug: &DebugOptions) -> Result<()> {
    let steps = specs
        .iter()
        .map(create_pass)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(Error::Usage)?;
    run(model, &steps, ctx, debug)
}

/// Runs the named passes, without options, in order (see [`run`]).
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
