//! The `onnxq` command line. Exit codes: 0 ok, 1 usage or config error, 2 bad model or data,
//! 3 verification failed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Parser, Subcommand};
use tract_onnx::prelude::IntoTensor;

use onnxq::calib::data::{write_npz, Dataset, InputSpec};
use onnxq::calib::source::DataSource;
use onnxq::calib::stats::{self, CalibrationStats, Fingerprint};
use onnxq::error::{Error, Result};
use onnxq::ir::Model;
use onnxq::onnx::{self, SaveOptions};
use onnxq::pipeline::{self, config::Config, Context, DebugOptions};

#[derive(Parser, Debug)]
#[command(
    name = "onnxq",
    version,
    about = "Post-training quantization compiler for ONNX models",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Exit codes: 0 ok, 1 usage or config error, 2 bad model or data, 3 verification failed."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    main: MainArgs,
}

/// The main job: `onnxq MODEL --config quant.yaml`.
#[derive(clap::Args, Debug)]
struct MainArgs {
    /// The ONNX model to read (never modified).
    #[arg(required = true)]
    model: Option<PathBuf>,
    /// The YAML configuration (see README "Configuration").
    #[arg(short, long, required = true)]
    config: Option<PathBuf>,
    /// Where to write the model [default: ./<model stem>.onnxq.onnx].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Write a JSON report of the run here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Store initializers of 1 KiB and more in `<output>.data` beside the model (done anyway
    /// when the model would exceed protobuf's 2 GiB limit).
    #[arg(long)]
    external_data: bool,
    /// Dump the graph before and after this pass ("all" for every pass) into --dump-dir.
    #[arg(long, value_name = "PASS|all")]
    dump_after: Option<String>,
    /// Folder for --dump-after files [default: ./onnxq-dumps].
    #[arg(long, value_name = "DIR")]
    dump_dir: Option<PathBuf>,
    /// Stop the pipeline after this pass (to bisect a misbehaving pipeline).
    #[arg(long, value_name = "PASS")]
    stop_after: Option<String>,
    /// Calibration statistics file: reused when it matches the model and data, written otherwise.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Print the quantization plan (what gets Q/DQ, with which parameters, what stays float and
    /// why) and write nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show opsets, inputs and outputs, op histogram, parameters, weighted nodes and anything
    /// onnxq cannot handle.
    Inspect {
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the stable text dump of a model's graph (the format of snapshots and --dump-after).
    Dump { model: PathBuf },
    /// Run a model in tract on every sample of a .npz/.npy and write the outputs as .npz.
    Run {
        model: PathBuf,
        /// Input data: arrays named after model inputs, leading sample axis.
        #[arg(long)]
        data: PathBuf,
        /// Where to write the outputs (.npz, arrays named after model outputs).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Also return these intermediate tensors, by ONNX name.
        #[arg(long = "tensor", value_name = "NAME")]
        tensors: Vec<String>,
    },
    /// Calibrate: run the configured passes, then the float model over the calibration data,
    /// and write (or reuse) activation statistics.
    Calibrate {
        model: PathBuf,
        /// The YAML configuration; its `calibration:` section says which data and method.
        #[arg(short, long)]
        config: PathBuf,
        /// Statistics file: written after calibrating, reused when it exists and matches the
        /// model and data (a mismatch is an error that says what changed).
        #[arg(long)]
        stats: PathBuf,
        /// Write a JSON report: per tensor, the range each method chooses and what it clips.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Run a float model and a quantized (QDQ) model side by side in tract on held-out data:
    /// per output SQNR, cosine, max abs error, top-1 agreement; per layer SQNR and the first
    /// layer where it drops. Works for any QDQ model, ONNX Runtime's included.
    Verify {
        float: PathBuf,
        quantized: PathBuf,
        /// Held-out data: arrays named after the model inputs, leading sample axis.
        #[arg(long)]
        data: PathBuf,
        /// Fail with exit code 3 when an output's SQNR is below this (dB).
        #[arg(long)]
        min_sqnr_db: Option<f64>,
        /// Fail with exit code 3 when an output's cosine similarity is below this.
        #[arg(long)]
        min_cosine: Option<f64>,
        /// Write the full report as JSON (written even when verification fails).
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Per-layer sensitivity: for each layer the plan quantizes, the output SQNR with only that
    /// layer quantized (int8, and int16 activations) and with every layer but that one, measured
    /// in tract on calibration samples; ranked, most sensitive first.
    Sensitivity {
        model: PathBuf,
        /// The YAML configuration (passes, calibration, target, overrides, mixed_precision.samples).
        #[arg(short, long)]
        config: PathBuf,
        /// Calibration statistics file, reused when it matches (as for the main job).
        #[arg(long)]
        stats: Option<PathBuf>,
        /// Write the table as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Print a commented starter configuration for a model.
    Init { model: PathBuf },
    /// Join statistics taken on disjoint shards of the data (in sample order).
    MergeStats {
        /// Statistics files, in the order of their shards.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// List the passes the config's `passes:` list can name.
    Passes,
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = dispatch(cli) {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Inspect { model, json }) => {
            let m = onnx::load_model(&model)?;
            let inspection = onnxq::inspect::inspect(&m);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&inspection).expect("inspection serialises")
                );
            } else {
                println!("{}", model.display());
                print!("{inspection}");
            }
            Ok(())
        }
        Some(Command::Dump { model }) => {
            let m = onnx::load_model(&model)?;
            print!("{m}");
            Ok(())
        }
        Some(Command::Run {
            model,
            data,
            output,
            tensors,
        }) => run_model(&model, &data, output.as_deref(), &tensors),
        Some(Command::Calibrate {
            model,
            config,
            stats,
            report,
        }) => calibrate(&model, &config, &stats, report.as_deref()),
        Some(Command::MergeStats { inputs, output }) => {
            let parts = inputs
                .iter()
                .map(|p| CalibrationStats::load(p).map(|s| (p.clone(), s)))
                .collect::<Result<Vec<_>>>()?;
            let merged = CalibrationStats::merge_shards(parts)?;
            merged.save(&output)?;
            eprintln!(
                "onnxq: wrote {} ({} samples, {} tensors)",
                output.display(),
                merged.samples,
                merged.tensors.len()
            );
            Ok(())
        }
        Some(Command::Verify {
            float,
            quantized,
            data,
            min_sqnr_db,
            min_cosine,
            report,
        }) => {
            let float_model = onnx::load_model(&float)?;
            let quant_model = onnx::load_model(&quantized)?;
            let data_config = onnxq::pipeline::config::CalibrationConfig {
                data: onnxq::pipeline::config::DataPaths::One(data),
                samples: None,
                method: Default::default(),
                ema_constant: 0.01,
                percentile: 99.99,
                bits: 8,
                images: None,
                input: None,
            };
            let source = DataSource::open(&data_config, &InputSpec::of_graph(&float_model.graph))?;
            let options = onnxq::verify::VerifyOptions {
                min_sqnr_db,
                min_cosine,
                ..Default::default()
            };
            let result = onnxq::verify::verify(&float_model, &quant_model, &source, &options)?;
            println!("{result}");
            if let Some(path) = report {
                let text = serde_json::to_string_pretty(&result).expect("report serialises");
                onnx::write_atomic(&path, text.as_bytes())?;
            }
            match result.to_error() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
        Some(Command::Sensitivity {
            model,
            config,
            stats,
            report,
        }) => sensitivity(&model, &config, stats.as_deref(), report.as_deref()),
        Some(Command::Init { model }) => {
            let m = onnx::load_model(&model)?;
            print!("{}", starter_config(&model, &m));
            Ok(())
        }
        Some(Command::Passes) => {
            for name in onnxq::passes::NAMES {
                println!("{name}");
            }
            Ok(())
        }
        None => main_job(cli.main),
    }
}

fn main_job(args: MainArgs) -> Result<()> {
    let model_path = args.model.expect("clap requires MODEL");
    let config_path = args.config.expect("clap requires --config");
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
    for (flag, value) in [("--dump-after", &args.dump_after), ("--stop-after", &args.stop_after)] {
        if let Some(pass) = value {
            if !(pass == "all" && flag == "--dump-after") && !config.pass_names().contains(pass) {
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
    let output = match args.output {
        Some(o) => o,
        None => {
            let stem = model_path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "model".into());
            PathBuf::from(format!("{stem}.onnxq.onnx"))
        }
    };
    if same_file(&model_path, &output) {
        return Err(Error::Usage(format!(
            "{}: the output would overwrite the input model; choose another -o",
            output.display()
        )));
    }

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
    let mut verification: Option<onnxq::verify::VerifyReport> = None;
    let mut calibrate_ms = 0.0;
    let mut against_original: Option<onnxq::verify::VerifyReport> = None;
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
        let verify_data = match &config.verify {
            Some(v) => {
                let data = onnxq::pipeline::config::DataPaths::One(v.data.clone());
                let cfg = match &config.calibration {
                    Some(c) => onnxq::pipeline::config::CalibrationConfig {
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
                            .map_err(|e| Error::config(&config_path, e.to_string()))?
                    }
                };
                Some(DataSource::open(&cfg, &inputs)?)
            }
            None => None,
        };
        let t = Instant::now();
        let stats = match &source {
            Some(source) => calibration_stats(&model, source, args.stats.as_deref())?,
            None => {
                let sigmas = onnxq::calib::datafree::DEFAULT_SIGMAS;
                eprintln!(
                    "onnxq: data-free: activation ranges from {} folded BatchNorms (β ± {sigmas}·|γ|), no calibration data",
                    ctx.batchnorm_records.len()
                );
                onnxq::calib::datafree::stats_from_batchnorm(&model, &ctx.batchnorm_records, sigmas)?
            }
        };
        calibrate_ms = t.elapsed().as_secs_f64() * 1e3;
        let method = config
            .calibration
            .as_ref()
            .map_or(onnxq::calib::observers::Method::MinMax, |c| c.method());
        let as_model_error = |e: Error| match e {
            Error::Graph(m) => Error::model(&model_path, m),
            other => other,
        };
        let mut plan = build_plan(&config, &model, &stats).map_err(as_model_error)?;
        let mut correction = Vec::new();
        if ctx.bias_correction.is_some() {
            correction =
                onnxq::passes::correct_bias::apply(&mut model, &plan, Some(&stats), &ctx).map_err(as_model_error)?;
            // Biases correct_bias created are quantized too; the weights and statistics are unchanged.
            plan = build_plan(&config, &model, &stats).map_err(as_model_error)?;
            for n in &correction {
                eprintln!("  {n}");
            }
        }
        let mut mixed = None;
        if let (Some(goal), Some(source)) = (config.mixed_precision_goal(), &source) {
            let t = Instant::now();
            let samples = config.mixed_precision.as_ref().map_or(32, |m| m.samples);
            let probe = onnxq::verify::sensitivity::Probe::new(&model, source, samples)?;
            eprintln!(
                "onnxq: mixed precision: measuring {} layers on {} samples",
                plan.layers().len(),
                probe.samples()
            );
            let assignment = onnxq::quant::mixed::assign(&model, &plan, &stats, &probe, &goal)?;
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
        let notes = onnxq::quant::materialize::materialize(&mut model, &plan).map_err(as_model_error)?;
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
            let options = onnxq::verify::VerifyOptions {
                min_sqnr_db: v.min_sqnr_db,
                min_cosine: v.min_cosine,
                ..Default::default()
            };
            verification = Some(onnxq::verify::verify(float_model, &model, data, &options)?);
            if let Some(original) = &original {
                let options = onnxq::verify::VerifyOptions {
                    per_layer: false,
                    ..options
                };
                against_original = Some(onnxq::verify::verify(original, &model, data, &options)?);
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

fn build_plan(config: &Config, model: &Model, stats: &CalibrationStats) -> Result<onnxq::quant::plan::Plan> {
    let options = onnxq::quant::plan::PlanOptions {
        target: config.target,
        rules: config.target_rules(),
        // Data-free statistics give one range whatever the method.
        method: config
            .calibration
            .as_ref()
            .map_or(onnxq::calib::observers::Method::MinMax, |c| c.method()),
        overrides: config.overrides(),
    };
    onnxq::quant::plan::build_plan(model, stats, &options)
}

/// `onnxq sensitivity`: the ranked per-layer table, on the terminal and as JSON.
fn sensitivity(model_path: &Path, config_path: &Path, stats_path: Option<&Path>, report: Option<&Path>) -> Result<()> {
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
    let probe = onnxq::verify::sensitivity::Probe::new(&model, &source, samples)?;
    let with_int16 = config.target != onnxq::quant::rules::Target::Tensorrt;
    eprintln!(
        "onnxq: measuring {} layers on {} samples ({} variants)",
        plan.layers().len(),
        probe.samples(),
        plan.layers().len() * if with_int16 { 3 } else { 2 } + 1
    );
    let all_int8 = probe.noise(&plan)?;
    let layers = onnxq::quant::mixed::measure_sensitivity(&model, &plan, &stats, &probe, with_int16, &all_int8)?;
    let mut table = String::new();
    onnxq::quant::mixed::write_sensitivity(&mut table, &layers, 0).expect("writing to a String");
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

/// A commented starter config: what a user edits first, with this model's facts filled in.
fn starter_config(path: &Path, model: &Model) -> String {
    let inputs: Vec<String> = InputSpec::of_graph(&model.graph)
        .iter()
        .map(|i| format!("{}: {}", i.name, i.describe()))
        .collect();
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let weighted = onnxq::inspect::inspect(model).weighted_nodes.len();
    format!(
        "# onnxq configuration for {file}
# inputs: {inputs}
# {weighted} nodes carry weights; default-domain opset {opset}.
# Every key is optional but calibration.data; run `onnxq {file} --config this.yaml --dry-run` to see the plan.

# Backend the model is for: generic (accurate plain QDQ all runtimes load), tensorrt, openvino, onnxruntime.
target: generic

calibration:
  # .npz with arrays named after the inputs above and a leading sample axis (or a list of shards,
  # or a folder of images with `images:` preprocessing). 32 to 512 samples is typical.
  data: {stem}.calib.npz
  # minmax (default), ema, percentile, entropy, mse
  method: minmax

# weights: {{dtype: int8, granularity: per_channel, symmetric: true}}
# activations: {{dtype: uint8, symmetric: false}}

# Keep parts float: by tensor, node or op_type (regular expressions matching the whole name);
# pin a layer's precision (int8, int16 = A16W8, float16, float) by node or op_type.
# overrides:
#   - {{op_type: Softmax, exclude: true}}
#   - {{node: 'conv1', precision: float16}}

# Raise the most sensitive layers until the output SQNR reaches a target (and/or within a budget:
# max_float_fraction, max_size_mb); `onnxq sensitivity` shows the per-layer ranking.
# mixed_precision:
#   target_sqnr_db: 30

# Prove the result on held-out data; a threshold not met exits with code 3.
verify:
  data: {stem}.eval.npz
  # min_sqnr_db: 20
",
        file = path.display(),
        inputs = inputs.join(", "),
        opset = model.opset("").unwrap_or(0),
    )
}

/// Every override must match something in the model: a typo would silently do nothing.
fn check_overrides(config: &Config, config_path: &Path, model: &Model) -> Result<()> {
    use onnxq::quant::plan::MatchKind;
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
fn calibration_stats(model: &Model, source: &DataSource, stats_path: Option<&Path>) -> Result<CalibrationStats> {
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
const FEW_SAMPLES: usize = 16;

fn calibrate(model_path: &Path, config_path: &Path, stats_path: &Path, report: Option<&Path>) -> Result<()> {
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
        use onnxq::calib::observers::Method;
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

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn run_model(model_path: &Path, data_path: &Path, output: Option<&Path>, tensors: &[String]) -> Result<()> {
    let model: Model = onnx::load_model(model_path)?;
    let dataset = Dataset::load(data_path)?;
    let bound = dataset.bind(&InputSpec::of_graph(&model.graph))?;
    let runner = onnxq::runtime::Runner::new(&model, &bound.sample_shapes(), tensors)
        .map_err(|e| Error::model(model_path, e.to_string()))?;
    let t = Instant::now();
    let results = runner.run_all(
        bound.samples,
        |i| bound.sample(i),
        |_, outs| Ok(outs.into_iter().map(|v| v.into_tensor()).collect::<Vec<_>>()),
    )?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "onnxq: ran {} samples in {:.2} s ({:.1} samples/s)",
        bound.samples,
        secs,
        bound.samples as f64 / secs
    );
    let mut columns: Vec<(String, Vec<tract_onnx::prelude::Tensor>)> =
        runner.outputs.iter().map(|n| (n.clone(), Vec::new())).collect();
    for sample in results {
        for (col, t) in columns.iter_mut().zip(sample) {
            col.1.push(t);
        }
    }
    for (name, samples) in &columns {
        let first = &samples[0];
        println!(
            "{name}: {:?} {:?} x {} samples",
            first.datum_type(),
            first.shape(),
            samples.len()
        );
    }
    if let Some(out) = output {
        write_npz(out, &columns)?;
    }
    Ok(())
}
