//! The accuracy guard, on by default: after planning, find the few layers whose int8
//! quantization costs the output the most and raise them (int16 activations, or float where int16
//! does not help or the target has no int16), within a budget.
//!
//! Measured, not guessed: on a few calibration samples, the output noise of the all-int8 plan,
//! then noise bisection (`quant::sensitivity`) down to units that carry at least `min_share` of
//! it. A unit is raised only when the additive noise model (`quant::mixed`) predicts that raising
//! it gains at least `min_gain_db` of output SQNR: a unit carrying a share s of the noise gains
//! −10·log₁₀(1 − s) dB at most, so only a unit with s ≥ 1 − 10^(−min_gain/10) (21% for 1 dB)
//! can be raised; the bisection stops splitting below that share. When the whole greedy order
//! does not measure better than all int8 (errors that cancel rather than add), each step is
//! measured on its own and kept only if it helps. Raw-signal front ends,
//! a LayerNorm or Softmax spelled out as primitive ops, attention score products: whatever the
//! cause, the test is what the layer does to the output. If the guarded plan does not measure
//! better than the all-int8 plan, nothing is raised. Every decision is in the report.
//!
//! The budget: at most `max_layers` of the quantized layers raised (a fraction).
//!
//! It runs after the plan passes (gptq, correct_bias), on what they made of the plan and the
//! model, against the float model before them: a layer's noise is then what it is in the written
//! model (on ppocr_v3_rec a layer measured before bias correction made 230% of the all-int8
//! noise and little after it). A layer raised to float gets the float model's constants back
//! ([`restore_float_layers`]): a bias corrected for its weight's rounding is wrong without it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::calib::stats::CalibrationStats;
use crate::error::Result;
use crate::ir::tensor::float_tensor;
use crate::ir::{Constant, ConstantOrigin, Model};
use crate::proto::tensor_proto::DataType;
use crate::quant::mixed::{assign, Goal, Instrument};
use crate::quant::plan::{node_key, Plan, Precision};
use crate::quant::probe::Probe;
use crate::quant::sensitivity::{Bisection, Unit};

/// The guard's settings (`guard:` in the config).
#[derive(Clone, Debug, Serialize)]
pub struct GuardSettings {
    /// Calibration samples it measures on.
    pub samples: usize,
    /// At most this fraction of the quantized layers raised.
    pub max_layers: f64,
    /// Only raise what gains at least this much output SQNR (predicted, then measured overall).
    pub min_gain_db: f64,
    /// Runs of the model at most for the bisection.
    pub max_runs: usize,
    /// What a layer may be raised to, in order of preference by cost.
    pub candidates: Vec<Precision>,
}

/// What the guard measured and did, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct GuardReport {
    pub settings: GuardSettings,
    pub all_int8_db: f64,
    /// The units measured, noisiest first.
    pub units: Vec<Unit>,
    /// Each raised layer with its precision and the measured reason.
    pub raised: Vec<GuardDecision>,
    /// The output SQNR with the raised layers, on the same samples.
    pub guarded_db: f64,
    /// Whether the raised layers were kept (false when the measurement showed no gain).
    pub kept: bool,
    pub verdict: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct GuardDecision {
    pub layer: String,
    pub precision: Precision,
    pub reason: String,
}

/// The guard's bisection: units down to the share that could gain `min_gain_db`.
pub fn bisection(settings: &GuardSettings) -> Bisection {
    Bisection {
        max_runs: settings.max_runs,
        min_share: 1.0 - 10f64.powf(-settings.min_gain_db / 10.0),
    }
}

/// Runs the guard on `plan`; returns the precisions to apply (empty when nothing is raised).
pub fn guard(
    model: &Model,
    plan: &Plan,
    stats: &CalibrationStats,
    probe: &Probe,
    settings: &GuardSettings,
) -> Result<(BTreeMap<String, Precision>, GuardReport)> {
    let goal = Goal {
        max_raised_fraction: Some(settings.max_layers),
        min_step_gain_db: Some(settings.min_gain_db),
        candidates: settings.candidates.clone(),
        ..Goal::default()
    };
    let a = assign(
        model,
        plan,
        stats,
        probe,
        &goal,
        bisection(settings),
        Instrument::Switched,
    )?;
    let unit_of = |layer: &str| a.sensitivity.iter().find(|u| u.layers.iter().any(|l| l == layer));
    let gained = a.final_db - a.all_int8_db;
    let kept = !a.raised.is_empty() && gained > 0.0;
    let verdict = if a.raised.is_empty() && a.rounds.len() > 1 {
        format!(
            "nothing raised: none of the {} upgrades the noise model picked measured better than all int8 ({:.2} dB)",
            a.rounds.len() - 1,
            a.all_int8_db
        )
    } else if a.raised.is_empty() {
        let top = a.sensitivity.first().map_or(0.0, |u| u.share);
        format!(
            "nothing raised: no layer or group carries enough of the output noise to gain {} dB (the noisiest {:.0}%)",
            settings.min_gain_db,
            top * 100.0
        )
    } else if kept {
        format!(
            "{} layers raised: {:.2} → {:.2} dB on {} samples",
            a.raised.len(),
            a.all_int8_db,
            a.final_db,
            a.samples
        )
    } else {
        format!(
            "raising {} layers measured {:.2} dB against {:.2} dB all int8: not kept",
            a.raised.len(),
            a.final_db,
            a.all_int8_db
        )
    };
    let raised: Vec<GuardDecision> = a
        .raised
        .iter()
        .map(|(layer, p)| {
            let reason = unit_of(layer).map_or_else(String::new, |u| {
                let int16 = u
                    .only_this_int16_db
                    .map_or(String::new(), |d| format!(", {d:.2} dB with int16 activations"));
                let what = if u.is_group() {
                    format!("its group {}", u.layer)
                } else {
                    "it".to_string()
                };
                format!(
                    "with only {what} quantized the output is at {:.2} dB ({:.0}% of the all-int8 noise){int16}",
                    u.only_this_int8_db,
                    u.share * 100.0
                )
            });
            GuardDecision {
                layer: layer.clone(),
                precision: *p,
                reason,
            }
        })
        .collect();
    let precisions = if kept {
        a.raised.iter().cloned().collect()
    } else {
        BTreeMap::new()
    };
    Ok((
        precisions,
        GuardReport {
            settings: settings.clone(),
            all_int8_db: a.all_int8_db,
            units: a.sensitivity,
            raised,
            guarded_db: a.final_db,
            kept,
            verdict,
        },
    ))
}

/// Gives the layers `precisions` puts in float or float16 the constants of `float` back where
/// the plan passes changed them (a corrected bias); a constant `float` does not have (a bias a
/// plan pass created) becomes zeros. Returns the constants restored.
pub fn restore_float_layers(model: &mut Model, float: &Model, precisions: &BTreeMap<String, Precision>) -> Vec<String> {
    let in_float = |p: Option<&Precision>| matches!(p, Some(Precision::Float | Precision::Float16));
    let inputs: Vec<String> = model
        .graph
        .nodes
        .node_weights()
        .filter(|n| in_float(precisions.get(&node_key(n))))
        .flat_map(|n| n.inputs.iter().cloned())
        .collect();
    let mut restored = Vec::new();
    for name in inputs {
        let Some(current) = model.graph.constants.get(&name) else {
            continue;
        };
        let original = match float.graph.constants.get(&name) {
            Some(c) if c.tensor == current.tensor => continue,
            Some(c) => c.clone(),
            None => {
                let elements = current.tensor.dims.iter().product::<i64>().max(0) as usize;
                let mut zeros = float_tensor(
                    DataType::Float as i32,
                    current.tensor.dims.clone(),
                    &vec![0.0; elements],
                );
                zeros.name = Some(name.clone());
                Constant {
                    tensor: zeros,
                    origin: ConstantOrigin::Created,
                }
            }
        };
        model.graph.constants.insert(name.clone(), original);
        restored.push(name);
    }
    restored.sort();
    restored.dedup();
    restored
}
