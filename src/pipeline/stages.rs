//! The fixed stages of a quantizing pipeline, as passes of the plan phase: `calibrate`, `plan`,
//! `mixed_precision` or `guard`, `materialize`, `lint`, `verify` (in that order, with the config's
//! plan passes between `mixed_precision`/`guard` and `materialize`; see [`super::steps`]). Each reads what the steps before
//! it left in the [`Context`] and leaves its own result there.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::calib::config::CalibrationConfig;
use crate::calib::data::InputSpec;
use crate::calib::source::DataSource;
use crate::calib::stats::{self, CalibrationStats, Fingerprint};
use crate::error::{Error, Result};
use crate::ir::{BatchNormRecord, Model};
use crate::passes::gptq::LayerInputs;
use crate::passes::{Context, Pass, Phase};
use crate::quant::plan::{MatchKind, Overrides, PlanOptions};
use crate::verify::VerifyOptions;

use super::config::Config;
use super::JobFiles;

/// Samples below which calibration ranges are unreliable.
const FEW_SAMPLES: usize = 16;

/// Opens the calibration and held-out data, checks the overrides against the model, and takes the
/// activation statistics (from the data, reused from `--stats` when they match, or data-free from
/// the folded BatchNorms). Keeps the float model for `verify` and the `guard`.
pub struct Calibrate {
    config_path: PathBuf,
    stats_path: Option<PathBuf>,
    observe_every_tensor: bool,
    calibration: Option<CalibrationConfig>,
    verify_data: Option<PathBuf>,
    overrides: Overrides,
    keep_float_model: bool,
    engine: crate::runtime::Engine,
}

impl Calibrate {
    pub fn new(config: &Config, files: &JobFiles) -> Calibrate {
        Calibrate {
            config_path: files.config.clone(),
            stats_path: files.stats.clone(),
            observe_every_tensor: files.observe_every_tensor,
            calibration: config.calibration.clone(),
            verify_data: config.verify.as_ref().map(|v| v.data.clone()),
            overrides: config.overrides(),
            keep_float_model: config.verify.is_some() || config.guard_settings().is_some(),
            engine: config.engine,
        }
    }
}

impl Pass for Calibrate {
    fn name(&self) -> &'static str {
        "calibrate"
    }
    fn phase(&self) -> Phase {
        Phase::Plan
    }
    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        ctx.engine = self.engine;
        // What can fail fast first: overrides that match nothing, unreadable or mismatched data.
        check_overrides(&self.overrides, &self.config_path, model)?;
        let inputs = InputSpec::of_graph(&model.graph);
        ctx.calibration = self
            .calibration
            .as_ref()
            .map(|c| DataSource::open(c, &inputs))
            .transpose()?;
        ctx.verify_data = self
            .verify_data
            .as_ref()
            .map(|path| {
                // Held-out data: the same source kinds as calibration (plain .npz/.npy when data-free), all of it.
                let config = match &self.calibration {
                    Some(c) => CalibrationConfig {
                        data: crate::calib::config::DataPaths::One(path.clone()),
                        samples: None,
                        ..c.clone()
                    },
                    None => CalibrationConfig::of_file(path.clone()),
                };
                DataSource::open(&config, &inputs)
            })
            .transpose()?;
        // Control flow tract cannot run: calibrate on the Ifs' taken branches, the part before a Loop.
        let sources: Vec<&DataSource> = ctx.calibration.iter().chain(&ctx.verify_data).collect();
        ctx.control_flow = crate::calib::control_flow::ControlFlow::prepare(model, &sources)?;
        let mut notes = Vec::new();
        if let Some(cf) = &ctx.control_flow {
            if let Some(original) = ctx.original_model.as_mut() {
                *original = cf.apply(original)?;
            }
            for n in &cf.notes {
                eprintln!("onnxq: control flow: {n}");
            }
            notes.extend(cf.notes.iter().cloned());
        }
        let stats = match &ctx.calibration {
            Some(source) => {
                let runnable = crate::calib::control_flow::runnable(ctx.control_flow.as_ref(), model)?;
                // The layer statistics gptq or adaround fit to, in the same run of the model, when one asks next.
                let layer_inputs = ctx
                    .layer_inputs_follow_calibration
                    .then(|| LayerInputs::before_plan(&runnable, source))
                    .transpose()?;
                let (stats, measured) = calibration_stats(
                    &runnable,
                    source,
                    self.stats_path.as_deref(),
                    self.observe_every_tensor,
                    layer_inputs,
                    self.engine,
                )?;
                ctx.layer_inputs = measured;
                stats
            }
            None => self.data_free_stats(model, &ctx.batchnorm_records)?,
        };
        notes.push(format!("{} tensors on {} samples", stats.tensors.len(), stats.samples));
        ctx.stats = Some(stats);
        if self.keep_float_model {
            ctx.float_model = Some(model.clone());
        }
        Ok(notes)
    }
}

impl Calibrate {
    /// Data-free mode: the ranges the BatchNorm records give.
    fn data_free_stats(&self, model: &Model, records: &[BatchNormRecord]) -> Result<CalibrationStats> {
        if let Some(stats_path) = &self.stats_path {
            return Err(Error::config(
                &self.config_path,
                format!(
                    "--stats {} holds calibration statistics, but the config has no `calibration:`: without data the ranges come from BatchNorm statistics (data-free mode); add `calibration: {{data: …}}` or drop --stats",
                    stats_path.display()
                ),
            ));
        }
        if records.is_empty() {
            return Err(Error::config(
                &self.config_path,
                "no calibration data, and fold_batchnorm folded no BatchNorm: data-free mode has no ranges to start from; set `calibration: {data: calib.npz}`",
            ));
        }
        let sigmas = crate::calib::datafree::DEFAULT_SIGMAS;
        eprintln!(
            "onnxq: data-free: activation ranges from {} folded BatchNorms (β ± {sigmas}·|γ|), no calibration data",
            records.len()
        );
        crate::calib::datafree::stats_from_batchnorm(model, records, sigmas)
    }
}

/// Statistics for `model` on `source`: reused from `stats_path` when it matches, else collected
/// (and saved there when a path is given), with `layer_inputs` measured in the same run when
/// given (not when the statistics are reused: gptq then measures them itself).
fn calibration_stats(
    model: &Model,
    source: &DataSource,
    stats_path: Option<&Path>,
    every_tensor: bool,
    layer_inputs: Option<LayerInputs>,
    engine: crate::runtime::Engine,
) -> Result<(CalibrationStats, Option<crate::passes::gptq::Measured>)> {
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
        return Ok((s, None));
    }
    let t = Instant::now();
    let candidates = crate::quant::rules::data_inputs_of_rules(&model.graph);
    let wanted = |t: &str| every_tensor || candidates.contains(t);
    let (s, measured) = match layer_inputs {
        Some(rider) => {
            let (s, sum) = stats::collect_riding(model, source, fingerprint.data.clone(), &wanted, &rider, engine)?;
            (s, Some(rider.measured(sum)?))
        }
        None => (
            stats::collect_observing(model, source, fingerprint.data.clone(), &wanted, engine)?,
            None,
        ),
    };
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "onnxq: calibrated {} tensors on {} samples in {secs:.2} s ({:.1} samples/s, {})",
        s.tensors.len(),
        s.samples,
        s.samples as f64 / secs.max(1e-9),
        engine.name()
    );
    if let Some(path) = stats_path {
        s.save(path)?;
        eprintln!("onnxq: wrote statistics to {}", path.display());
    }
    Ok((s, measured))
}

/// Every override must match something in the model: a typo would silently do nothing.
fn check_overrides(overrides: &Overrides, config_path: &Path, model: &Model) -> Result<()> {
    let g = &model.graph;
    for rule in &overrides.rules {
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

/// Builds the plan from the statistics: what gets Q/DQ with which parameters.
pub struct Plan {
    options: PlanOptions,
}

impl Plan {
    pub fn new(config: &Config) -> Plan {
        Plan {
            options: config.plan_options(),
        }
    }
}

impl Pass for Plan {
    fn name(&self) -> &'static str {
        "plan"
    }
    fn phase(&self) -> Phase {
        Phase::Plan
    }
    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        let stats = ctx
            .stats
            .as_ref()
            .ok_or_else(|| Error::internal("`plan` ran before `calibrate`"))?;
        let mut plan = crate::quant::plan::build_plan(model, stats, &self.options)?;
        let mut notes = Vec::new();
        if let Some(cf) = &ctx.control_flow {
            notes.extend(crate::quant::subgraphs::adapt(&mut plan, model, cf));
        }
        notes.insert(0, plan.summary());
        ctx.plan = Some(plan);
        ctx.plan_options = Some(self.options.clone());
        Ok(notes)
    }
}

/// Raises the precision of the layers that need it, from their measured sensitivity, until the
/// goal is reached or the budget spent (`quant::mixed`).
pub struct MixedPrecision {
    goal: crate::quant::mixed::Goal,
    samples: usize,
    engine: crate::runtime::Engine,
}

impl MixedPrecision {
    /// The stage, when the config asks for mixed precision.
    pub fn new(config: &Config) -> Option<MixedPrecision> {
        Some(MixedPrecision {
            goal: config.mixed_precision_goal()?,
            samples: config.mixed_precision.as_ref()?.samples,
            engine: config.engine,
        })
    }
}

impl Pass for MixedPrecision {
    fn name(&self) -> &'static str {
        "mixed_precision"
    }
    fn phase(&self) -> Phase {
        Phase::Plan
    }
    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        let (Some(source), Some(stats), Some(plan)) = (&ctx.calibration, &ctx.stats, &mut ctx.plan) else {
            return Err(Error::internal(
                "`mixed_precision` needs calibration data, statistics and a plan",
            ));
        };
        let started = Instant::now();
        let (model, plan_measured) = measurable(model, ctx.control_flow.as_ref(), plan)?;
        let (model, plan_measured) = (model.as_ref(), &plan_measured);
        let probe = crate::quant::probe::Probe::new(model, source, self.samples, self.engine)?;
        eprintln!(
            "onnxq: mixed precision: measuring {} layers on {} samples in {}",
            plan.layers().len(),
            probe.samples(),
            probe.engine().name()
        );
        let assignment = crate::quant::mixed::assign(
            model,
            plan_measured,
            stats,
            &probe,
            &self.goal,
            crate::quant::mixed::SEARCH_BISECTION,
            crate::quant::mixed::Instrument::Exact,
        )?;
        eprint!("{assignment}");
        eprintln!("onnxq: mixed precision took {:.1} s", started.elapsed().as_secs_f64());
        *plan = plan.with_precisions(&assignment.raised.iter().cloned().collect());
        let notes = vec![format!(
            "{} layers raised: {:.2} dB on the probe samples",
            assignment.raised.len(),
            assignment.final_db
        )];
        ctx.mixed_precision = Some(assignment);
        Ok(notes)
    }
}

/// What the precision stages measure: the part of the model tract runs (all of it, unless
/// control flow was cut: `calib::control_flow`), and the plan with the layers outside it left
/// float (pinned, so the search leaves them alone; their precision in the job's plan is untouched).
fn measurable<'m>(
    model: &'m Model,
    control_flow: Option<&crate::calib::control_flow::ControlFlow>,
    plan: &crate::quant::plan::Plan,
) -> Result<(std::borrow::Cow<'m, Model>, crate::quant::plan::Plan)> {
    let runnable = crate::calib::control_flow::runnable(control_flow, model)?;
    if matches!(runnable, std::borrow::Cow::Borrowed(_)) {
        return Ok((runnable, plan.clone()));
    }
    let present: std::collections::BTreeSet<String> = runnable
        .graph
        .nodes
        .node_weights()
        .map(crate::quant::plan::node_key)
        .collect();
    let inside = plan.layers().into_iter().filter(|l| present.contains(l)).collect();
    Ok((runnable, plan.restricted_to(&inside)))
}

/// Copies of the quantized weights the guard's measurement holds (`quant::switched`).
const GUARD_WEIGHT_COPIES: u64 = 5;

/// The accuracy guard (`quant::guard`): raises the few layers whose int8 quantization costs the
/// output the most, measured on a few calibration samples, within the configured budget.
pub struct Guard {
    settings: crate::quant::guard::GuardSettings,
    engine: crate::runtime::Engine,
}

impl Guard {
    /// The stage, when the guard runs (`Config::guard_settings`).
    pub fn new(config: &Config) -> Option<Guard> {
        Some(Guard {
            settings: config.guard_settings()?,
            engine: config.engine,
        })
    }
}

impl Pass for Guard {
    fn name(&self) -> &'static str {
        "guard"
    }
    fn phase(&self) -> Phase {
        Phase::Plan
    }
    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        let (Some(source), Some(stats), Some(plan), Some(float)) =
            (&ctx.calibration, &ctx.stats, &mut ctx.plan, &ctx.float_model)
        else {
            return Err(Error::internal(
                "`guard` needs calibration data, statistics, a plan and the float model",
            ));
        };
        if plan.layers().is_empty() {
            return Ok(vec!["no quantized layer to guard".into()]);
        }
        // Its switched model holds each quantized weight's quantization error as a float tensor
        // (IR), tract holds the weight and the error, and each sample in flight computes the
        // switched weight (two at once): about five times the weights.
        let weight_bytes: u64 = plan
            .weights
            .keys()
            .filter_map(|w| model.graph.constants.get(w))
            .map(|c| crate::ir::tensor::byte_size(&c.tensor))
            .sum();
        let needs = GUARD_WEIGHT_COPIES * weight_bytes;
        if let Some(limit) = crate::runtime::memory::limit() {
            let held = crate::runtime::memory::resident_bytes();
            if held + needs > limit {
                let note = format!(
                    "skipped: measuring needs about {} MiB ({GUARD_WEIGHT_COPIES}× the {} MiB of quantized weights) on top of the {} MiB held, over the memory budget of {} MiB (--max-memory)",
                    needs >> 20,
                    weight_bytes >> 20,
                    held >> 20,
                    limit >> 20
                );
                eprintln!("onnxq: guard: {note}");
                return Ok(vec![note]);
            }
        }
        let started = Instant::now();
        let (measured, plan_measured) = measurable(model, ctx.control_flow.as_ref(), plan)?;
        let reference = crate::calib::control_flow::runnable(ctx.control_flow.as_ref(), float)?;
        let probe =
            crate::quant::probe::Probe::against(&reference, &measured, source, self.settings.samples, self.engine)?;
        eprintln!(
            "onnxq: guard: measuring {} layers on {} samples in {}",
            plan_measured.layers().len(),
            probe.samples(),
            probe.engine().name()
        );
        // int16 Q/DQ need opset 21; the opset cannot be raised under inlined If branches.
        let mut settings = self.settings.clone();
        let inlined = ctx
            .control_flow
            .as_ref()
            .is_some_and(|cf| !cf.inlined.folded.is_empty());
        if inlined && measured.opset("").unwrap_or(0) < 21 {
            settings
                .candidates
                .retain(|&p| p != crate::quant::plan::Precision::Int16);
        }
        let (precisions, report) = crate::quant::guard::guard(&measured, &plan_measured, stats, &probe, &settings)?;
        // The measuring models go before the model is changed (they borrow it) and memory with them.
        drop(probe);
        drop(reference);
        drop(measured);
        eprintln!(
            "onnxq: guard: {} ({:.1} s)",
            report.verdict,
            started.elapsed().as_secs_f64()
        );
        for d in report.raised.iter().filter(|_| report.kept) {
            eprintln!("  {} → {}: {}", d.layer, d.precision.name(), d.reason);
        }
        *plan = plan.with_precisions(&precisions);
        let restored = crate::quant::guard::restore_float_layers(model, float, &precisions);
        let mut notes = vec![report.verdict.clone()];
        if !restored.is_empty() {
            notes.push(format!(
                "the float layers' constants the plan passes changed are the float model's again: {}",
                restored.join(", ")
            ));
        }
        ctx.guard = Some(report);
        Ok(notes)
    }
}

/// Turns the plan into QuantizeLinear/DequantizeLinear nodes (the only step that writes them).
pub struct Materialize;

impl Pass for Materialize {
    fn name(&self) -> &'static str {
        "materialize"
    }
    fn phase(&self) -> Phase {
        Phase::Plan
    }
    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        // Again: a plan pass may have re-planned (correct_bias does).
        if let (Some(cf), Some(plan)) = (&ctx.control_flow, ctx.plan.as_mut()) {
            crate::quant::subgraphs::adapt(plan, model, cf);
        }
        let plan = ctx
            .plan
            .as_ref()
            .ok_or_else(|| Error::internal("`materialize` ran before `plan`"))?;
        let notes = crate::quant::materialize::materialize(model, plan)?;
        eprintln!(
            "onnxq: plan: {}{}",
            plan.summary(),
            if ctx.calibration.is_none() {
                " (data-free: ranges from BatchNorm statistics)"
            } else {
                ""
            }
        );
        for n in &notes {
            eprintln!("  {n}");
        }
        Ok(notes)
    }
}

/// Checks the written Q/DQ against the target's rules (`crate::lint`): a broken rule here is a
/// bug in onnxq's plan, and stops the job (exit code 3) before anything is written.
pub struct Lint {
    target: crate::quant::rules::Target,
}

impl Lint {
    /// The stage, when the config's target has rules.
    pub fn new(config: &Config) -> Option<Lint> {
        crate::lint::has_rules(config.target).then_some(Lint { target: config.target })
    }
}

impl Pass for Lint {
    fn name(&self) -> &'static str {
        "lint"
    }
    fn phase(&self) -> Phase {
        Phase::Plan
    }
    fn run(&self, model: &mut Model, _ctx: &mut Context) -> Result<Vec<String>> {
        let findings = crate::lint::lint(model, self.target)?;
        if findings.is_empty() {
            return Ok(vec![format!(
                "no rule of target {} broken",
                crate::lint::target_name(self.target)
            )]);
        }
        let list: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
        Err(Error::Lint(format!(
            "the quantized model breaks {} rule(s) of target {} (a bug in onnxq's plan, please report it): {}",
            findings.len(),
            crate::lint::target_name(self.target),
            list.join("; ")
        )))
    }
}

/// Runs the float and the quantized model side by side on the held-out data (`verify:`), and
/// the model as loaded too when the job kept it.
pub struct Verify {
    options: VerifyOptions,
}

impl Verify {
    /// The stage, when the config has `verify:`.
    pub fn new(config: &Config) -> Option<Verify> {
        let v = config.verify.as_ref()?;
        Some(Verify {
            options: VerifyOptions {
                min_sqnr_db: v.min_sqnr_db,
                min_cosine: v.min_cosine,
                engine: config.engine,
                ..Default::default()
            },
        })
    }
}

impl Pass for Verify {
    fn name(&self) -> &'static str {
        "verify"
    }
    fn phase(&self) -> Phase {
        Phase::Plan
    }
    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        let (Some(data), Some(float)) = (&ctx.verify_data, &ctx.float_model) else {
            return Err(Error::internal(
                "`verify` needs the held-out data and the float model from `calibrate`",
            ));
        };
        if ctx.calibration.as_ref().map(|s| s.fingerprints()).transpose()? == Some(data.fingerprints()?) {
            eprintln!("warning: verifying on the calibration data: the figures are optimistic; use held-out data");
        }
        // With a Loop tract cannot run, what it runs of each model (calib::control_flow);
        // ONNX Runtime runs the whole models.
        let whole = self.options.engine == crate::runtime::Engine::Onnxruntime;
        let cf = ctx.control_flow.as_ref().filter(|_| !whole);
        let runnable = |m| crate::calib::control_flow::runnable(cf, m);
        let quantized = runnable(model)?;
        let verification = crate::verify::verify(&*runnable(float)?, &quantized, data, &self.options)?;
        let against_original = match &ctx.original_model {
            Some(original) => {
                let options = VerifyOptions {
                    per_layer: false,
                    ..self.options.clone()
                };
                Some(crate::verify::verify(
                    &*runnable(original)?,
                    &quantized,
                    data,
                    &options,
                )?)
            }
            None => None,
        };
        ctx.verification = Some(verification);
        let mut notes = Vec::new();
        if let Some(note) = ctx.control_flow.as_ref().and_then(|cf| cf.verification_note(whole)) {
            eprintln!("onnxq: control flow: {note}");
            notes.push(note);
        }
        if let Some(v) = against_original {
            ctx.verification_against_original = Some(v);
        }
        Ok(notes)
    }
}
