//! The commands that run the pipeline: the main job end to end, and `onnxq calibrate` and
//! `onnxq sensitivity`, the same pipeline stopped at their stage. The CLI (src/main.rs) parses
//! arguments and calls these.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::calib::config::MethodName;
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::onnx::{self, SaveOptions};
use crate::passes::{Context, Pass};
use crate::pipeline::{self, config::Config, DebugOptions, JobFiles};

/// What the main job is asked to do (the CLI's arguments).
#[derive(Debug, Clone)]
pub struct MainJob {
    /// The ONNX model to read (never modified).
    pub model: PathBuf,
    /// The YAML configuration.
    pub config: PathBuf,
    /// Where to write the model [default: ./<model stem>.onnxq.onnx].
    pub output: Option<PathBuf>,
    /// Write a JSON report of the run here.
    pub report: Option<PathBuf>,
    /// Write the report as a self-contained HTML page here (`report::render`).
    pub html: Option<PathBuf>,
    /// Store initializers of 1 KiB and more as external data.
    pub external_data: bool,
    /// Dump the graph (and statistics and plan) before and after this step ("all": every step)
    /// into `dump_dir`.
    pub dump_after: Option<String>,
    pub dump_dir: Option<PathBuf>,
    /// Stop the pipeline after this step; the model is written as it stands.
    pub stop_after: Option<String>,
    /// Calibration statistics file: reused when it matches, written otherwise.
    pub stats: Option<PathBuf>,
    /// Print the plan and write nothing.
    pub dry_run: bool,
    /// The engine to calibrate in, over the config's `engine:`.
    pub engine: Option<crate::runtime::Engine>,
}

/// The main job: `onnxq MODEL --config quant.yaml` (see the README): the pipeline's steps
/// (`pipeline::steps`: graph passes, calibrate, plan, plan passes, mixed precision, Q/DQ,
/// verification), then the model and the report are written.
pub fn main_job(args: MainJob) -> Result<()> {
    // The config first: a bad config fails before any model or data is read.
    let mut config = Config::load(&args.config)?;
    if let Some(engine) = args.engine {
        config.engine = engine;
    }
    let providers = config.engine.start(&config.providers)?;
    let files = JobFiles {
        config: args.config.clone(),
        stats: args.stats.clone(),
        observe_every_tensor: false,
    };
    let mut steps = pipeline::steps(&config, &files);
    if args.dry_run {
        steps = pipeline::before(steps, &["materialize"]);
    }
    let debug = DebugOptions {
        dump_dir: args
            .dump_after
            .as_ref()
            .map(|_| args.dump_dir.clone().unwrap_or_else(|| PathBuf::from("onnxq-dumps"))),
        dump_after: args.dump_after,
        stop_after: args.stop_after,
    };
    debug.check(&steps)?;
    let output = output_path(&args.model, args.output)?;

    let t0 = Instant::now();
    let mut model = onnx::load_model(&args.model)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    check_opset_reachable(&config, &model).map_err(|e| as_model_error(&args.model, e))?;
    if let Some(why) = &config.guard_off {
        eprintln!("onnxq: guard: {why}");
    }
    let mut ctx = Context::default();
    // With passes, the outputs are also compared with the model as loaded, so a pass that
    // changes the function (equalize's `relu6: as_relu`) shows in the figures; per-layer figures
    // compare with the model after the passes (equalisation rescales tensors channel by channel).
    if config.quantize && config.verify.is_some() && !config.passes.is_empty() {
        ctx.original_model = Some(model.clone());
    }
    let t1 = Instant::now();
    pipeline::run(&mut model, &steps, &mut ctx, &debug).map_err(|e| as_model_error(&args.model, e))?;
    // The Ifs calibration inlined come back with both branches (calib::control_flow).
    if let Some(cf) = &ctx.control_flow {
        model = cf.restore(&model).map_err(|e| as_model_error(&args.model, e))?;
    }
    let steps_ms = t1.elapsed().as_secs_f64() * 1e3;

    let print_defaults = || {
        if config.defaults.is_some() {
            eprintln!("onnxq: no `passes:` in the config, so the default passes ran (`passes: []` for none):");
            for line in config.describe_defaults() {
                eprintln!("  {line}");
            }
        }
    };
    if args.dry_run {
        print_defaults();
        for r in &ctx.pass_reports {
            eprintln!(
                "  {}: {}",
                r.pass,
                r.notes.first().map(String::as_str).unwrap_or("done")
            );
        }
        match &ctx.plan {
            Some(plan) => {
                println!("{}", serde_json::to_string_pretty(plan).expect("plan serialises"));
                eprintln!("onnxq: plan: {} (dry run: nothing written)", plan.summary());
            }
            None => eprintln!("onnxq: nothing to plan (dry run: nothing written)"),
        }
        return Ok(());
    }
    let t2 = Instant::now();
    let options = SaveOptions {
        external_data_threshold: args.external_data.then_some(1024),
    };
    onnx::save_model(&model, &output, &options)?;
    let write_ms = t2.elapsed().as_secs_f64() * 1e3;

    eprintln!(
        "onnxq: wrote {} ({} nodes) in {:.0} ms: load {load_ms:.0} ms, {} {steps_ms:.0} ms, write {write_ms:.0} ms",
        output.display(),
        model.graph.nodes.node_count(),
        load_ms + steps_ms + write_ms,
        pipeline::step_names(&steps).join(" + "),
    );
    for r in &ctx.pass_reports {
        eprintln!(
            "  {}: {} -> {} nodes, {:.0} ms",
            r.pass, r.nodes_before, r.nodes_after, r.ms
        );
    }
    print_defaults();
    if let Some(v) = &ctx.verification {
        println!("{v}");
    }
    if let Some(v) = &ctx.verification_against_original {
        println!("against the model as loaded, before the passes:\n{v}");
    }
    if args.report.is_some() || args.html.is_some() {
        let quantization = ctx.plan.as_ref().map(|plan| {
            serde_json::json!({
                "target": config.target,
                "engine": config.engine,
                "engine_providers": providers,
                "method": ctx.plan_options.as_ref().map(|o| &o.method),
                "data_free": ctx.calibration.is_none(),
                "calibration_samples": ctx.stats.as_ref().map(|s| s.samples),
                "plan": plan,
                "mixed_precision": ctx.mixed_precision,
                "guard": ctx.guard,
                "guard_off": config.guard_off,
            })
        });
        let report = serde_json::json!({
            "onnxq_version": env!("CARGO_PKG_VERSION"),
            "input": args.model,
            "config": args.config,
            "output": output,
            "quantize": config.quantize,
            "default_passes": config.defaults,
            "passes": ctx.pass_reports,
            "quantization": quantization,
            "verification": ctx.verification,
            "verification_against_original": ctx.verification_against_original,
            "control_flow": ctx.control_flow.as_ref().map(|cf| cf.report()),
            "timings_ms": { "load": load_ms, "steps": steps_ms, "write": write_ms },
        });
        if let Some(path) = &args.report {
            let text = serde_json::to_string_pretty(&report).expect("report serialises");
            onnx::write_atomic(path, text.as_bytes())?;
        }
        if let Some(path) = &args.html {
            let page = crate::report::render(&report, ctx.stats.as_ref())?;
            onnx::write_atomic(path, page.as_bytes())?;
        }
    }
    let failed: Vec<String> = ctx
        .verification
        .iter()
        .chain(&ctx.verification_against_original)
        .flat_map(|v| v.failures().iter().map(|f| f.to_string()))
        .collect();
    if !failed.is_empty() {
        return Err(Error::Verification(failed.join("; ")));
    }
    Ok(())
}

/// A graph error names the model it happened on.
/// Before any work: the opset the configured types need (FP8 19, 4-bit and blocks 21) must be
/// one this model can be converted to (tried on a copy of the graph).
fn check_opset_reachable(config: &Config, model: &crate::ir::Model) -> Result<()> {
    let Some((needed, key)) = config.required_opset().filter(|_| config.quantize) else {
        return Ok(());
    };
    let current = model.opset("").unwrap_or(1);
    if current >= needed {
        return Ok(());
    }
    // Calibration inlines the If branches the data takes; the ones it does not take keep the
    // model's opset, which onnxq does not convert (yet).
    if model.graph.nodes.node_weights().any(|n| n.op_type == "If") {
        return Err(Error::Graph(format!(
            "`{key}` needs opset {needed}, and this model is at opset {current} with If nodes, whose branches onnxq cannot raise to another opset yet: choose a format of opset {current} or less (e.g. int8, or an 8-bit codebook), or convert the model to opset {needed} first"
        )));
    }
    let mut trial = model.clone();
    crate::onnx::opset::upgrade_opset(&mut trial, needed)
        .map(|_| ())
        .map_err(|e| {
            Error::Graph(format!(
                "`{key}` needs opset {needed}, and the model's cannot be raised to it: {e}"
            ))
        })
}

fn as_model_error(model_path: &Path, e: Error) -> Error {
    match e {
        Error::Graph(m) => Error::model(model_path, m),
        other => other,
    }
}

/// `-o`, or `<model stem>.onnxq.onnx`; never the input model itself.
fn output_path(model_path: &Path, output: Option<PathBuf>) -> Result<PathBuf> {
    let output = match output {
        Some(o) => o,
        None => {
            let stem = model_path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "model".into());
            PathBuf::from(format!("{stem}.onnxq.onnx"))
        }
    };
    if same_file(model_path, &output) {
        return Err(Error::Usage(format!(
            "{}: the output would overwrite the input model; choose another -o",
            output.display()
        )));
    }
    Ok(output)
}

/// Loads the model and runs `steps` on it, for the commands that stop part-way.
fn run_steps(model_path: &Path, steps: &[Box<dyn Pass>]) -> Result<(Model, Context)> {
    let mut model = onnx::load_model(model_path)?;
    let mut ctx = Context::default();
    pipeline::run(&mut model, steps, &mut ctx, &DebugOptions::default()).map_err(|e| as_model_error(model_path, e))?;
    Ok((model, ctx))
}

/// `onnxq sensitivity`: the pipeline up to mixed precision, then the ranked per-layer table, on
/// the terminal and as JSON.
pub fn sensitivity(
    model_path: &Path,
    config_path: &Path,
    stats_path: Option<&Path>,
    report: Option<&Path>,
    html: Option<&Path>,
) -> Result<()> {
    let config = Config::load(config_path)?;
    config.engine.start(&config.providers)?;
    if config.calibration.is_none() || !config.quantize {
        return Err(Error::config(
            config_path,
            "sensitivity measures the quantized layers on calibration data: it needs a `calibration:` section and `quantize: true`",
        ));
    }
    let used = config.low_bit_formats();
    if !used.is_empty() {
        return Err(Error::config(
            config_path,
            format!(
                "sensitivity measures layers with an integer-grid fake quantizer, which does not model {}",
                used.join(", ")
            ),
        ));
    }
    let files = JobFiles {
        config: config_path.to_path_buf(),
        stats: stats_path.map(Path::to_path_buf),
        observe_every_tensor: false,
    };
    let steps = pipeline::before(pipeline::steps(&config, &files), &["mixed_precision", "materialize"]);
    let started = Instant::now();
    let (model, ctx) = run_steps(model_path, &steps)?;
    let (Some(source), Some(stats), Some(plan)) = (&ctx.calibration, &ctx.stats, &ctx.plan) else {
        return Err(Error::internal("sensitivity ran without calibration data or plan"));
    };
    let samples = config
        .mixed_precision
        .as_ref()
        .map_or(crate::pipeline::config::DEFAULT_MIXED_SAMPLES, |m| m.samples);
    let probe = crate::quant::probe::Probe::new(
        &model,
        source,
        samples.min(crate::quant::mixed::RANKING_SAMPLES),
        config.engine,
    )?;
    let with_int16 = config.target != crate::quant::rules::Target::Tensorrt;
    eprintln!(
        "onnxq: measuring {} layers on {} samples (noise bisection, at most {} runs)",
        plan.layers().len(),
        probe.samples(),
        crate::quant::mixed::SEARCH_BISECTION.max_runs
    );
    let all_int8 = probe.noise(plan)?;
    let layers = crate::quant::sensitivity::measure_units(
        &model,
        plan,
        stats,
        &probe.variants(plan)?,
        &plan.layers(),
        with_int16,
        crate::quant::mixed::SEARCH_BISECTION,
        None,
    )?;
    let mut table = String::new();
    crate::quant::sensitivity::write_units(&mut table, &layers, 0).expect("writing to a String");
    println!(
        "all layers int8: {:.2} dB output SQNR on {} calibration samples",
        probe.sqnr_db(&all_int8),
        probe.samples()
    );
    print!("{table}");
    eprintln!("onnxq: sensitivity took {:.1} s", started.elapsed().as_secs_f64());
    let report_json = serde_json::json!({
        "onnxq_version": env!("CARGO_PKG_VERSION"),
        "model": model_path,
        "config": config_path,
        "samples": probe.samples(),
        "outputs": probe.output_names,
        "all_int8_db": probe.sqnr_db(&all_int8),
        "layers": layers,
    });
    if let Some(path) = report {
        let text = serde_json::to_string_pretty(&report_json).expect("report serialises");
        onnx::write_atomic(path, text.as_bytes())?;
    }
    if let Some(path) = html {
        onnx::write_atomic(path, crate::report::render_sensitivity(&report_json)?.as_bytes())?;
    }
    Ok(())
}

/// `onnxq calibrate`: the pipeline through `calibrate` (statistics saved to `stats_path`), then
/// the ranges every method gives.
pub fn calibrate(
    model_path: &Path,
    config_path: &Path,
    stats_path: &Path,
    report: Option<&Path>,
    html: Option<&Path>,
) -> Result<()> {
    let config = Config::load(config_path)?;
    config.engine.start(&config.providers)?;
    let calibration = config
        .calibration
        .clone()
        .ok_or_else(|| Error::config(config_path, "has no `calibration:` section (data, method, ...)"))?;
    if !config.quantize {
        return Err(Error::config(
            config_path,
            "has `quantize: false`: calibration statistics are taken for quantizing; remove it",
        ));
    }
    let files = JobFiles {
        config: config_path.to_path_buf(),
        stats: Some(stats_path.to_path_buf()),
        observe_every_tensor: true,
    };
    let steps = pipeline::through(pipeline::steps(&config, &files), "calibrate");
    let started = Instant::now();
    let (_, ctx) = run_steps(model_path, &steps)?;
    let collected = ctx
        .stats
        .ok_or_else(|| Error::internal("`calibrate` left no statistics"))?;
    let method = calibration.method();
    let ranges = collected.ranges(&method);
    let clipping = ranges.iter().filter(|r| r.clipped_values > 0.0).count();
    eprintln!(
        "onnxq: method {:?}: {clipping} of {} tensors clipped; total {:.2} s",
        method,
        ranges.len(),
        started.elapsed().as_secs_f64()
    );
    if report.is_some() || html.is_some() {
        let all: serde_json::Map<String, serde_json::Value> = MethodName::ALL
            .iter()
            .map(|&name| {
                (
                    name.as_str().to_string(),
                    serde_json::to_value(collected.ranges(&calibration.method_named(name))).expect("ranges serialise"),
                )
            })
            .collect();
        let report_json = serde_json::json!({
            "onnxq_version": env!("CARGO_PKG_VERSION"),
            "model": model_path,
            "config": config_path,
            "stats": stats_path,
            "samples": collected.samples,
            "method": calibration.method,
            "ranges": ranges,
            "ranges_by_method": all,
        });
        if let Some(path) = report {
            let text = serde_json::to_string_pretty(&report_json).expect("report serialises");
            onnx::write_atomic(path, text.as_bytes())?;
        }
        if let Some(path) = html {
            onnx::write_atomic(
                path,
                crate::report::render_calibration(&report_json, &collected)?.as_bytes(),
            )?;
        }
    }
    Ok(())
}

pub fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
