//! The `onnxq` command line. Exit codes: 0 ok, 1 usage or config error, 2 bad model or data,
//! 3 verification failed, 4 internal error (a bug in onnxq).

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Parser, Subcommand};
use tract_onnx::prelude::IntoTensor;

use onnxq::calib::data::{write_npz, Dataset, InputSpec};
use onnxq::calib::source::DataSource;
use onnxq::calib::stats::CalibrationStats;
use onnxq::error::{Error, Result};
use onnxq::ir::Model;
use onnxq::onnx;

/// glibc's malloc keeps freed tensors' memory resident (its mmap threshold rises to the size of
/// the tensors freed, then they come from fragmenting heaps): ppocr_v3_det at 960×960 verified
/// one sample at a time peaked at 1.0 GB with it, at 0.4 GB with mimalloc, for the same time
/// (bench/verify_memory.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "onnxq",
    version,
    about = "Post-training quantization compiler for ONNX models",
    subcommand_negates_reqs = true,
    after_help = "Exit codes: 0 ok, 1 usage or config error, 2 bad model or data, 3 verification failed, 4 internal error (a bug in onnxq)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Memory budget of the whole process (e.g. 4G, 512M, or bytes): calibration, verification
    /// and the other sample loops run as many samples at once as fit, at most one per core
    /// [default: half the machine's memory].
    #[arg(long, global = true, value_name = "SIZE", value_parser = parse_max_memory)]
    max_memory: Option<u64>,
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
    /// Write the report as one self-contained HTML page here: per-layer SQNR along the graph,
    /// the worst tensors' calibration histograms, the guard's ranking, the plan.
    #[arg(long, value_name = "REPORT.html")]
    html: Option<PathBuf>,
    /// Store initializers of 1 KiB and more in `<output>.data` beside the model (done anyway
    /// when the model would exceed protobuf's 2 GiB limit).
    #[arg(long)]
    external_data: bool,
    /// Dump the graph (and the statistics and plan, once they exist) before and after this pass
    /// or stage (calibrate, plan, mixed_precision, materialize, lint, verify; "all" for every step)
    /// into --dump-dir.
    #[arg(long, value_name = "STEP|all")]
    dump_after: Option<String>,
    /// Folder for --dump-after files [default: ./onnxq-dumps].
    #[arg(long, value_name = "DIR")]
    dump_dir: Option<PathBuf>,
    /// Stop the pipeline after this pass or stage and write the model as it stands, with the
    /// report so far (to bisect a misbehaving pipeline).
    #[arg(long, value_name = "STEP")]
    stop_after: Option<String>,
    /// Calibration statistics file: reused when it matches the model and data, written otherwise.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Print the quantization plan (what gets Q/DQ, with which parameters, what stays float and
    /// why) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// The engine calibration and verification run the models in [default: the config's
    /// `engine:`, else tract]; onnxruntime loads ONNX Runtime from ORT_DYLIB_PATH or python3's
    /// onnxruntime package, and verifies the written model as it is.
    #[arg(long, value_enum)]
    engine: Option<onnxq::runtime::Engine>,
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
        /// Write the report as one self-contained HTML page: every tensor's ranges, the
        /// histograms of the most clipped ones.
        #[arg(long, value_name = "REPORT.html")]
        html: Option<PathBuf>,
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
        /// Write the report as one self-contained HTML page (written even when verification fails).
        #[arg(long, value_name = "REPORT.html")]
        html: Option<PathBuf>,
        /// The engine both models run in: tract (Q/DQ lowered to exact float arithmetic) or
        /// onnxruntime (the written model as it is; per layer where its fusions keep the tensors).
        #[arg(long, value_enum, default_value = "tract")]
        engine: onnxq::runtime::Engine,
    },
    /// Per-layer sensitivity: for each layer the plan quantizes, the output SQNR with only that
    /// layer quantized (int8, and int16 activations) and with every layer but that one, measured
    /// in the config's engine (tract unless `engine:` says otherwise) on calibration samples;
    /// ranked, most sensitive first.
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
        /// Write the ranking as one self-contained HTML page (a chart and the table).
        #[arg(long, value_name = "REPORT.html")]
        html: Option<PathBuf>,
    },
    /// Check a QDQ model (onnxq's or another tool's) against a target backend's Q/DQ rules;
    /// each finding names the node, the rule and the fix. Exit code 3 when a rule is broken.
    Lint {
        model: PathBuf,
        /// The backend: tensorrt (rules), onnxruntime (which layers run as integer kernels).
        #[arg(long)]
        target: String,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
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
    // Rust ignores SIGPIPE, so printing to a closed pipe (`| head`) would panic in `println!`.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to the default at start-up, before any thread runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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

fn parse_max_memory(text: &str) -> std::result::Result<u64, String> {
    onnxq::runtime::memory::parse_size(text).map_err(|e| match e {
        Error::Usage(m) => m,
        other => other.to_string(),
    })
}

/// Whether any of the main job's own arguments was given (`--max-memory`, global, is not one).
fn main_args_given(m: &MainArgs) -> bool {
    let paths = [
        &m.model,
        &m.config,
        &m.output,
        &m.report,
        &m.html,
        &m.dump_dir,
        &m.stats,
    ];
    paths.iter().any(|p| p.is_some())
        || m.dump_after.is_some()
        || m.stop_after.is_some()
        || m.external_data
        || m.dry_run
}

fn dispatch(cli: Cli) -> Result<()> {
    if let Some(bytes) = cli.max_memory {
        onnxq::runtime::memory::set_limit(bytes);
    }
    // `--max-memory` may come before a subcommand, so clap does not refuse the main job's
    // arguments there (`args_conflicts_with_subcommands` would refuse it too): done here.
    if cli.command.is_some() && main_args_given(&cli.main) {
        return Err(Error::Usage(
            "the main job's arguments (MODEL, --config, --output, ...) cannot be used with a subcommand; put the subcommand first".into(),
        ));
    }
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
            html,
        }) => onnxq::job::calibrate(&model, &config, &stats, report.as_deref(), html.as_deref()),
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
            html,
            engine,
        }) => {
            engine.check_available()?;
            let float_model = onnx::load_model(&float)?;
            let quant_model = onnx::load_model(&quantized)?;
            let data_config = onnxq::calib::config::CalibrationConfig::of_file(data);
            let source = DataSource::open(&data_config, &InputSpec::of_graph(&float_model.graph))?;
            let options = onnxq::verify::VerifyOptions {
                min_sqnr_db,
                min_cosine,
                engine,
                ..Default::default()
            };
            let result = onnxq::verify::verify(&float_model, &quant_model, &source, &options)?;
            println!("{result}");
            if let Some(path) = report {
                let text = serde_json::to_string_pretty(&result).expect("report serialises");
                onnx::write_atomic(&path, text.as_bytes())?;
            }
            if let Some(path) = html {
                let page = serde_json::json!({
                    "input": float,
                    "output": quantized,
                    "onnxq_version": env!("CARGO_PKG_VERSION"),
                    "verification": result,
                });
                onnx::write_atomic(&path, onnxq::report::render(&page, None)?.as_bytes())?;
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
            html,
        }) => onnxq::job::sensitivity(&model, &config, stats.as_deref(), report.as_deref(), html.as_deref()),
        Some(Command::Lint { model, target, json }) => {
            let target: onnxq::quant::rules::Target = serde_yaml::from_value(serde_yaml::Value::String(target.clone()))
                .map_err(|_| {
                    Error::Usage(format!(
                        "--target {target}: not a target (generic, tensorrt, openvino, onnxruntime)"
                    ))
                })?;
            let m = onnx::load_model(&model)?;
            let findings = onnxq::lint::lint(&m, target)?;
            let layers = if target == onnxq::quant::rules::Target::Onnxruntime {
                onnxq::lint::integer_layers(&m)?
            } else {
                vec![]
            };
            if json {
                let layers: Vec<serde_json::Value> = layers
                    .iter()
                    .map(|(node, v)| serde_json::json!({"node": node, "integer_kernel": v.is_ok(), "reason": v.as_ref().err()}))
                    .collect();
                let report = serde_json::json!({"target": target, "findings": findings, "layers": layers});
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("lint report serialises")
                );
            } else {
                for f in &findings {
                    println!("{f}");
                }
                for (node, v) in &layers {
                    match v {
                        Ok(()) => println!("{node}: runs as an integer kernel"),
                        Err(reason) => println!("{node}: runs in float: {reason}"),
                    }
                }
            }
            let name = onnxq::lint::target_name(target);
            if !layers.is_empty() {
                let integer = layers.iter().filter(|(_, v)| v.is_ok()).count();
                eprintln!(
                    "onnxq: {integer} of {} layers run as integer kernels in {name}",
                    layers.len()
                );
            }
            match findings.len() {
                0 if onnxq::lint::has_rules(target) => {
                    eprintln!("onnxq: {}: no rule of target {name} broken", model.display());
                    Ok(())
                }
                0 => Ok(()),
                n => Err(Error::Lint(format!(
                    "{}: {n} rule(s) of target {name} broken",
                    model.display()
                ))),
            }
        }
        Some(Command::Init { model }) => {
            let m = onnx::load_model(&model)?;
            print!("{}", starter_config(&model, &m));
            Ok(())
        }
        Some(Command::Passes) => {
            println!(
                "The pipeline: graph passes, calibrate, plan, mixed_precision, plan passes, materialize, lint, verify.\n"
            );
            for name in onnxq::passes::NAMES {
                let (what, options) = onnxq::passes::describe(name).unwrap_or(("", "none"));
                let phase = match onnxq::passes::create(name).map(|p| p.phase()) {
                    Some(onnxq::passes::Phase::Plan) => "plan pass",
                    _ => "graph pass",
                };
                println!("{name} ({phase})\n    {what}\n    options: {options}");
            }
            Ok(())
        }
        None => {
            let m = cli.main;
            onnxq::job::main_job(onnxq::job::MainJob {
                model: m.model.expect("clap requires MODEL"),
                config: m.config.expect("clap requires --config"),
                output: m.output,
                report: m.report,
                html: m.html,
                external_data: m.external_data,
                dump_after: m.dump_after,
                dump_dir: m.dump_dir,
                stop_after: m.stop_after,
                stats: m.stats,
                dry_run: m.dry_run,
                engine: m.engine,
            })
        }
    }
}

/// The default passes, one comment line each, as a config with calibration data resolves them.
fn default_passes_comment() -> String {
    let config = onnxq::pipeline::config::Config::parse("calibration: {data: calib.npz}", Path::new("starter.yaml"))
        .expect("the starter config parses");
    config
        .describe_defaults()
        .iter()
        .map(|l| format!("#   {l}"))
        .collect::<Vec<_>>()
        .join("\n")
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
  # auto (default: per tensor, clip where the measured error says it pays), minmax, ema,
  # percentile, entropy, mse
  method: auto

# weights: {{dtype: int8, granularity: per_channel, symmetric: true}}
# activations: {{dtype: uint8, symmetric: false}}

# Passes (`onnxq passes` lists them): graph passes rewrite the float model before calibration;
# plan passes (gptq, correct_bias) then change the plan, in the order listed. Without `passes:`
# the defaults run (`--dry-run` says what each did on this model; `passes: []` runs none):
{defaults}

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
        defaults = default_passes_comment(),
        inputs = inputs.join(", "),
        opset = model.opset("").unwrap_or(0),
    )
}

fn run_model(model_path: &Path, data_path: &Path, output: Option<&Path>, tensors: &[String]) -> Result<()> {
    let model: Model = onnx::load_model(model_path)?;
    let dataset = Dataset::load(data_path)?;
    let bound = dataset.bind(&InputSpec::of_graph(&model.graph))?;
    let runner = onnxq::runtime::Runner::new(&model, &bound.sample_shapes(), tensors)
        .map_err(|e| Error::model(model_path, e.to_string()))?;
    let t = Instant::now();
    // As many samples at once as the memory budget fits: each holds its run's tensors and
    // keeps its outputs.
    let per_sample = runner.sample_bytes()? + runner.returned_bytes()?;
    let parallel = onnxq::runtime::memory::Parallelism::for_samples(per_sample);
    let results = onnxq::runtime::memory::on_threads(parallel.samples, || {
        runner.run_all(
            bound.samples,
            |i| bound.sample(i),
            |_, outs| Ok(outs.into_iter().map(|v| v.into_tensor()).collect::<Vec<_>>()),
        )
    })??;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "onnxq: ran {} samples in {:.2} s ({:.1} samples/s, {})",
        bound.samples,
        secs,
        bound.samples as f64 / secs,
        parallel.describe()
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
