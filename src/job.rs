//! The commands that run a pipeline end to end: the main job, `onnxq calibrate` and
//! `onnxq sensitivity`. The CLI (src/main.rs) parses arguments and calls these.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::calib::data::InputSpec;
use crate::calib::source::DataSource;
use crate::calib::stats::{self, CalibrationStats, Fingerprint};
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::onnx::{self, SaveOptions};
use crate::pipeline::{self, config::Config, Context, DebugOptions};

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
    /// Store initializers of 1 KiB and more as external data.
    pub external_data: bool,
    /// Dump the graph before and after this pass ("all": every pass) into `dump_dir`.
    pub dump_after: Option<String>,
    pub dump_dir: Option<PathBuf>,
    /// Stop the pipeline after this pass.
    pub stop_after: Option<String>,
    /// Calibration statistics file: reused when it matches, written otherwise.
    pub stats: Option<PathBuf>,
    /// Print the plan and write nothing.
    pub dry_run: bool,
}

/// The main job: `onnxq MODEL --config quant.yaml` (see the README): passes, calibration (or
/// data-free ranges), plan, bias correction, mixed precision, Q/DQ, verification, report.
pub fn main_job(args: MainJob) -> Result<()> {
    let model_path = args.model;
    let config_path = args.config;
    // The config first: a bad config fails before any model or data is read.
    let config = Config::load(&config_path)?;
    // Without calibration data, fold_batchnorm's records give data-free ranges (checked after
    // the passes, once it is known whether any BatchNorm was folded).
    let data_free = config.quantize && config.calibration.is_none();
    if data_free && !config.pass_names().iter().any(|p| p == "fold_batchnorm") {
        return Err(Error::config(
            &config_path,
            "quantizing needs calibration data: set `calibration: {data: calib.npz}`, or run `fold_batchnorm` for data-free ranges from the BatchNorm statistics (or `quantize: false` to only run the passes)",
        ));
    }
    let passes = config.pass_names();
    if let Some(p) = passes.iter().find(|p| ["correct_bias", "gptq"].contains(&p.as_str())) {
        if !config.quantize {
            return Err(Error::config(
                &config_path,
                format!(
                    "`{p}` acts on the quantized weights, and `quantize: false` writes none: remove it or quantize"
                ),
            ));
        }
    }
    if passes.iter().any(|p| p == "gptq") && config.calibration.is_none() {
        return Err(Error::config(
            &config_path,
            "`gptq` fits the weight rounding to the layers' inputs: it needs `calibration: {data: …}` (it has no data-free mode)",
        ));
    }
    check_debug_flags(&config, &args.dump_after, &args.stop_after)?;
    let output = output_path(&model_path, args.output)?;

    let t0 = Instant::now();
    let mut model = onnx::load_model(&model_path)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;

    // With passes, the outputs are also compared with the model as loaded, so a pass that
    // changes the function (equalize's `relu6: as_relu`) shows in the figures; per-layer figures
    // compare with the model after the passes (equalisation rescales tensors channel by channel).
    let original = (config.quantize && config.verify.is_some() && !config.passes.is_empty()).then(|| model.clone());
    let t1 = Instant::now();
    let mut ctx = Context::default();
    let debug = DebugOptions {
        dump_dir: args
            .dump_after
            .as_ref()
            .map(|_| args.dump_dir.clone().unwrap_or_else(|| PathBuf::from("onnxq-dumps"))),
        dump_after: args.dump_after,
        stop_after: args.stop_after,
    };
    pipeline::run_pipeline(&mut model, &config.passes, &mut ctx, &debug).map_err(|e| match e {
        Error::Graph(m) => Error::model(&model_path, m),
        other => other,
    })?;
    let passes_ms = t1.elapsed().as_secs_f64() * 1e3;
    if data_free && ctx.batchnorm_records.is_empty() {
        return Err(Error::config(
            &config_path,
            "no calibration data, and fold_batchnorm folded no BatchNorm: data-free mode has no ranges to start from; set `calibration: {data: calib.npz}`",
        ));
    }

    let mut quantization = serde_json::Value::Null;
    let mut verification: Option<crate::verify::VerifyReport> = None;
    let mut calibrate_ms = 0.0;
    let mut against_original: Option<crate::verify::VerifyReport> = None;
    let float_model = config.quantize.then(|| model.clone());
    if let Some(float_model) = &float_model {
        check_overrides(&config, &config_path, &model)?;
        let inputs = InputSpec::of_graph(&model.graph);
        let source = config
            .calibration
            .as_ref()
            .map(|c| DataSource::open(c, &inputs))
            .transpose()?;
        // Held-out data: the same source kinds as calibration (plain .npz/.npy when data-free), all of it.
        let verify_data = verify_source(&config, &config_path, &inputs)?;
        let t = Instant::now();
        let stats = job_statistics(&model, source.as_ref(), args.stats.as_deref(), &config_path, &ctx)?;
        calibrate_ms = t.elapsed().as_secs_f64() * 1e3;
        let method = config
            .calibration
            .as_ref()
            .map_or(crate::calib::observers::Method::MinMax, |c| c.method());
        let as_model_error = |e: Error| match e {
            Error::Graph(m) => Error::model(&model_path, m),
            other => other,
        };
        let mut plan = build_plan(&config, &model, &stats).map_err(as_model_error)?;
        let t = Instant::now();
        let rounding = crate::passes::gptq::apply(&model, &mut plan, source.as_ref(), &ctx).map_err(as_model_error)?;
        for n in &rounding {
            eprintln!("  {n}");
        }
        if ctx.weight_rounding {
            eprintln!("onnxq: gptq took {:.1} s", t.elapsed().as_secs_f64());
        }
        let mut correction = Vec::new();
        if ctx.bias_correction.is_some() {
            correction =
                crate::passes::correct_bias::apply(&mut model, &plan, Some(&stats), &ctx).map_err(as_model_error)?;
            // Biases correct_bias created are quantized too; the weights and statistics are unchanged.
            let rounded = std::mem::take(&mut plan.rounded);
            plan = build_plan(&config, &model, &stats).map_err(as_model_error)?;
            plan.rounded = rounded;
            for n in &correction {
                eprintln!("  {n}");
            }
        }
        let mut mixed = None;
        if let (Some(goal), Some(source)) = (config.mixed_precision_goal(), &source) {
            let t = Instant::now();
            let samples = config.mixed_precision.as_ref().map_or(32, |m| m.samples);
            let probe = crate::verify::sensitivity::Probe::new(&model, source, samples)?;
            eprintln!(
                "onnxq: mixed precision: measuring {} layers on {} samples",
                plan.layers().len(),
                probe.samples()
            );
            let assignment = crate::quant::mixed::assign(&model, &plan, &stats, &probe, &goal)?;
            eprint!("{assignment}");
            eprintln!("onnxq: mixed precision took {:.1} s", t.elapsed().as_secs_f64());
            plan = plan.with_precisions(&assignment.raised.iter().cloned().collect());
            mixed = Some(assignment);
        }
        if args.dry_run {
            println!("{}", serde_json::to_string_pretty(&plan).expect("plan serialises"));
            eprintln!("onnxq: plan: {} (dry run: nothing written)", plan.summary());
            return Ok(());
        }
        let notes = crate::quant::materialize::materialize(&mut model, &plan).map_err(as_model_error)?;
        eprintln!(
            "onnxq: plan: {}{}",
            plan.summary(),
            if source.is_none() {
                " (data-free: ranges from BatchNorm statistics)"
            } else {
                ""
            }
        );
        for n in &notes {
            eprintln!("  {n}");
        }
        quantization = serde_json::json!({
            "target": config.target,
            "method": method,
            "data_free": source.is_none(),
            "weight_rounding": rounding,
            "bias_correction": correction,
            "calibration_samples": stats.samples,
            "plan": plan,
            "mixed_precision": mixed,
            "notes": notes,
        });
        if let (Some(v), Some(data)) = (&config.verify, &verify_data) {
            if source.as_ref().map(|s| s.fingerprints()).transpose()? == Some(data.fingerprints()?) {
                eprintln!("warning: verifying on the calibration data: the figures are optimistic; use held-out data");
            }
            let options = crate::verify::VerifyOptions {
                min_sqnr_db: v.min_sqnr_db,
                min_cosine: v.min_cosine,
                ..Default::default()
            };
            verification = Some(crate::verify::verify(float_model, &model, data, &options)?);
            if let Some(original) = &original {
                let options = crate::verify::VerifyOptions {
                    per_layer: false,
                    ..options
                };
                against_original = Some(crate::verify::verify(original, &model, data, &options)?);
            }
        }
    }

    let t2 = Instant::now();
    let options = SaveOptions {
        external_data_threshold: args.external_data.then_some(1024),
    };
    onnx::save_model(&model, &output, &options)?;
    let write_ms = t2.elapsed().as_secs_f64() * 1e3;

    eprintln!(
        "onnxq: wrote {} ({} nodes) in {:.0} ms: load {load_ms:.0} ms, passes {passes_ms:.0} ms, calibration {calibrate_ms:.0} ms, write {write_ms:.0} ms",
        output.display(),
        model.graph.nodes.node_count(),
        load_ms + passes_ms + calibrate_ms + write_ms
    );
    for r in &ctx.pass_reports {
        eprintln!("  {}: {} -> {} nodes", r.pass, r.nodes_before, r.nodes_after);
    }
    if let Some(v) = &verification {
        println!("{v}");
    }
    if let Some(v) = &against_original {
        println!("against the model as loaded, before the passes:\n{v}");
    }
    if let Some(report_path) = args.report {
        let report = serde_json::json!({
            "onnxq_version": env!("CARGO_PKG_VERSION"),
            "input": model_path,
            "config": config_path,
            "output": output,
            "quantize": config.quantize,
            "passes": ctx.pass_reports,
            "quantization": quantization,
            "verification": verification,
            "verification_against_original": against_original,
            "timings_ms": { "load": load_ms, "passes": passes_ms, "calibration": calibrate_ms, "write": write_ms },
        });
        let text = serde_json::to_string_pretty(&report).expect("report serialises");
        onnx::write_atomic(&report_path, text.as_bytes())?;
    }
    let failed: Vec<String> = verification
        .iter()
        .chain(&against_original)
        .flat_map(|v| v.failures().iter().map(|f| f.to_string()))
        .collect();
    if !failed.is_empty() {
        return Err(Error::Verification(failed.join("; ")));
    }
    Ok(())
}

/// `--dump-after` and `--stop-after` must name a pass the config runs (`--dump-after all` too).
fn check_debug_flags(config: &Config, dump_after: &Option<String>, stop_after: &Option<String>) -> Result<()> {
    for (flag, value) in [("--dump-after", dump_after), ("--stop-after", stop_after)] {
        if let Some(pass) = value {
            if (pass != "all" || flag != "--dump-after") && !config.pass_names().contains(pass) {
                let runs = if config.passes.is_empty() {
                    "it runs no passes".to_string()
                } else {
                    format!("it runs: {}", config.pass_names().join(", "))
                };
                return Err(Error::Usage(format!(
                    "{flag} {pass}: the config does not run that pass ({runs})"
                )));
            }
        }
    }
    Ok(())
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

/// The held-out data of `verify:`, opened like the calibration data (plain .npz/.npy when
/// data-free), all of it.
fn verify_source(config: &Config, config_path: &Path, inputs: &[InputSpec]) -> Result<Option<DataSource>> {
    Ok(match &config.verify {
        Some(v) => {
            let data = crate::pipeline::config::DataPaths::One(v.data.clone());
            let cfg = match &config.calibration {
                Some(c) => crate::pipeline::config::CalibrationConfig {
                    data,
                    samples: None,
                    ..c.clone()
                },
                None => {
                    let mut m = serde_yaml::Mapping::new();
                    m.insert(
                        "data".into(),
                        serde_yaml::to_value(&data.paths()[0]).expect("a path serialises"),
                    );
                    serde_yaml::from_value(serde_yaml::Value::Mapping(m))
                        .map_err(|e| Error::config(config_path, e.to_string()))?
                }
            };
            Some(DataSource::open(&cfg, inputs)?)
        }
        None => None,
    })
}

/// Calibration statistics from the data (reused from `stats_path` when it matches), or in
/// data-free mode the ranges the BatchNorm records give.
fn job_statistics(
    model: &Model,
    source: Option<&DataSource>,
    stats_path: Option<&Path>,
    config_path: &Path,
    ctx: &Context,
) -> Result<CalibrationStats> {
    Ok(match source {
        Some(source) => calibration_stats(model, source, stats_path)?,
        None => {
            if let Some(stats_path) = stats_path {
                return Err(Error::config(
                        config_path,
                        format!(
                            "--stats {} holds calibration statistics, but the config has no `calibration:`: without data the ranges come from BatchNorm statistics (data-free mode); add `calibration: {{data: …}}` or drop --stats",
                            stats_path.display()
                        ),
                    ));
            }
            let sigmas = crate::calib::datafree::DEFAULT_SIGMAS;
            eprintln!(
                "onnxq: data-free: activation ranges from {} folded BatchNorms (β ± {sigmas}·|γ|), no calibration data",
                ctx.batchnorm_records.len()
            );
            crate::calib::datafree::stats_from_batchnorm(model, &ctx.batchnorm_records, sigmas)?
        }
    })
}

pub fn build_plan(config: &Config, model: &Model, stats: &CalibrationStats) -> Result<crate::quant::plan::Plan> {
    let options = crate::quant::plan::PlanOptions {
        target: config.target,
        rules: config.target_rules(),
        // Data-free statistics give one range whatever the method.
        method: config
            .calibration
            .as_ref()
            .map_or(crate::calib::observers::Method::MinMax, |c| c.method()),
        overrides: config.overrides(),
    };
    crate::quant::plan::build_plan(model, stats, &options)
}

/// `onnxq sensitivity`: the ranked per-layer table, on the terminal and as JSON.
pub fn sensitivity(
    model_path: &Path,
    config_path: &Path,
    stats_path: Option<&Path>,
    report: Option<&Path>,
) -> Result<()> {
    let config = Config::load(config_path)?;
    let calibration = config.calibration.clone().ok_or_else(|| {
        Error::config(
            config_path,
            "has no `calibration:` section: sensitivity runs on calibration data",
        )
    })?;
    let started = Instant::now();
    let mut model = onnx::load_model(model_path)?;
    let as_model_error = |e: Error| match e {
        Error::Graph(m) => Error::model(model_path, m),
        other => other,
    };
    let mut ctx = Context::default();
    pipeline::run_pipeline(&mut model, &config.passes, &mut ctx, &DebugOptions::default()).map_err(as_model_error)?;
    check_overrides(&config, config_path, &model)?;
    let source = DataSource::open(&calibration, &InputSpec::of_graph(&model.graph))?;
    let stats = calibration_stats(&model, &source, stats_path)?;
    let plan = build_plan(&config, &model, &stats).map_err(as_model_error)?;
    let samples = config.mixed_precision.as_ref().map_or(32, |m| m.samples);
    let probe = crate::verify::sensitivity::Probe::new(&model, &source, samples)?;
    let with_int16 = config.target != crate::quant::rules::Target::Tensorrt;
    eprintln!(
        "onnxq: measuring {} layers on {} samples ({} variants)",
        plan.layers().len(),
        probe.samples(),
        plan.layers().len() * if with_int16 { 3 } else { 2 } + 1
    );
    let all_int8 = probe.noise(&plan)?;
    let layers = crate::quant::mixed::measure_sensitivity(&model, &plan, &stats, &probe, with_int16, &all_int8)?;
    let mut table = String::new();
    crate::quant::mixed::write_sensitivity(&mut table, &layers, 0).expect("writing to a String");
    println!(
        "all layers int8: {:.2} dB output SQNR on {} calibration samples",
        probe.sqnr_db(&all_int8),
        probe.samples()
    );
    print!("{table}");
    eprintln!("onnxq: sensitivity took {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = report {
        let report = serde_json::json!({
            "onnxq_version": env!("CARGO_PKG_VERSION"),
            "model": model_path,
            "config": config_path,
            "samples": probe.samples(),
            "outputs": probe.output_names,
            "all_int8_db": probe.sqnr_db(&all_int8),
            "layers": layers,
        });
        onnx::write_atomic(
            path,
            serde_json::to_string_pretty(&report)
                .expect("report serialises")
                .as_bytes(),
        )?;
    }
    Ok(())
}

/// Every override must match something in the model: a typo would silently do nothing.
pub fn check_overrides(config: &Config, config_path: &Path, model: &Model) -> Result<()> {
    use crate::quant::plan::MatchKind;
    let g = &model.graph;
    for rule in &config.overrides().rules {
        let re = &rule.regex;
        let hit = match rule.kind {
            MatchKind::Tensor => {
                g.constants.keys().any(|t| re.is_match(t))
                    || g.inputs.iter().any(|i| re.is_match(i.name()))
                    || g.nodes.node_weights().any(|n| n.outputs.iter().any(|o| re.is_match(o)))
            }
            MatchKind::Node => g.nodes.node_weights().any(|n| re.is_match(&n.name)),
            MatchKind::OpType => g.nodes.node_weights().any(|n| re.is_match(&n.op_type)),
        };
        if !hit {
            return Err(Error::config(
                config_path,
                format!(
                    "override {:?} `{}` matches nothing in the model",
                    rule.kind, rule.pattern
                ),
            ));
        }
    }
    Ok(())
}

/// Statistics for `model` on `source`: reused from `stats_path` when it matches, else collected
/// (and saved there when a path is given).
pub fn calibration_stats(model: &Model, source: &DataSource, stats_path: Option<&Path>) -> Result<CalibrationStats> {
    if source.len() < FEW_SAMPLES {
        eprintln!(
            "warning: calibrating on {} samples; ranges from fewer than {FEW_SAMPLES} are unreliable",
            source.len()
        );
    }
    let (graph, weights) = stats::model_fingerprint(model);
    let fingerprint = Fingerprint {
        graph,
        weights,
        data: source.fingerprints()?,
    };
    if let Some(path) = stats_path.filter(|p| p.exists()) {
        let s = CalibrationStats::load(path)?;
        s.check_fingerprint(&fingerprint, path)?;
        eprintln!(
            "onnxq: reusing statistics from {} ({} samples)",
            path.display(),
            s.samples
        );
        return Ok(s);
    }
    let t = Instant::now();
    let s = stats::collect(model, source, fingerprint.data.clone())?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "onnxq: calibrated {} tensors on {} samples in {secs:.2} s ({:.1} samples/s)",
        s.tensors.len(),
        s.samples,
        s.samples as f64 / secs.max(1e-9)
    );
    if let Some(path) = stats_path {
        s.save(path)?;
        eprintln!("onnxq: wrote statistics to {}", path.display());
    }
    Ok(s)
}

/// Samples below which calibration ranges are unreliable.
pub const FEW_SAMPLES: usize = 16;

pub fn calibrate(model_path: &Path, config_path: &Path, stats_path: &Path, report: Option<&Path>) -> Result<()> {
    let config = Config::load(config_path)?;
    let calibration = config
        .calibration
        .clone()
        .ok_or_else(|| Error::config(config_path, "has no `calibration:` section (data, method, ...)"))?;
    let started = Instant::now();
    let mut model = onnx::load_model(model_path)?;
    let mut ctx = Context::default();
    pipeline::run_pipeline(&mut model, &config.passes, &mut ctx, &DebugOptions::default()).map_err(|e| match e {
        Error::Graph(m) => Error::model(model_path, m),
        other => other,
    })?;
    let source = DataSource::open(&calibration, &InputSpec::of_graph(&model.graph))?;
    let collected = calibration_stats(&model, &source, Some(stats_path))?;
    let method = calibration.method();
    let ranges = collected.ranges(&method);
    let clipping = ranges.iter().filter(|r| r.clipped_values > 0.0).count();
    eprintln!(
        "onnxq: method {:?}: {clipping} of {} tensors clipped; total {:.2} s",
        method,
        ranges.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(report_path) = report {
        use crate::calib::observers::Method;
        let methods = [
            ("minmax", Method::MinMax),
            (
                "ema",
                Method::Ema {
                    constant: calibration.ema_constant,
                },
            ),
            (
                "percentile",
                Method::Percentile {
                    percentile: calibration.percentile,
                },
            ),
            ("entropy", Method::Entropy { bits: calibration.bits }),
            ("mse", Method::Mse { bits: calibration.bits }),
        ];
        let all: serde_json::Map<String, serde_json::Value> = methods
            .iter()
            .map(|(name, m)| {
                (
                    name.to_string(),
                    serde_json::to_value(collected.ranges(m)).expect("ranges serialise"),
                )
            })
            .collect();
        let report = serde_json::json!({
            "onnxq_version": env!("CARGO_PKG_VERSION"),
            "model": model_path,
            "config": config_path,
            "stats": stats_path,
            "samples": collected.samples,
            "method": calibration.method,
            "ranges": ranges,
            "ranges_by_method": all,
        });
        onnx::write_atomic(
            report_path,
            serde_json::to_string_pretty(&report)
                .expect("report serialises")
                .as_bytes(),
        )?;
    }
    Ok(())
}

pub fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
