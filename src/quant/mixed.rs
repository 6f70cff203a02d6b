//! Mixed precision: per-layer sensitivity and a precision assignment under a target or budget.
//!
//! A layer is an op the plan quantizes (keyed by its first output). Its candidates are int8
//! (W8A8, the plan as built), int16 (A16W8: 16-bit activations, 8-bit weights), float16 and float.
//!
//! Sensitivity, measured in tract on calibration samples (`quant::probe`, `quant::sensitivity`):
//! units of layers (for the search every layer alone; for the guard, units found by noise
//! bisection), each with the output noise when only its layers are quantized (at int8, and at
//! int16 when it is a candidate), on one compiled model for every variant (`quant::switched`).
//! Units are measured on the first `RANKING_SAMPLES` probe samples: ranking needs fewer samples
//! than the target's confidence bound. Quantization noise of
//! different layers is close to independent, so the noise of an assignment is predicted as
//! k·Σᵤ nᵤ(pᵤ), with nᵤ the measured only-this-unit noise at pᵤ (0 for float16 and float) and
//! k = N / Σᵤ nᵤ(int8) matching the measured all-int8 noise N.
//!
//! Assignment: greedy, the upgrade (unit, precision) that removes the most predicted noise per
//! unit of cost first (ties by first layer: deterministic), as long as the budget allows; this
//! orders the upgrades. With a target, the target must hold for a 90% lower confidence bound of
//! the measured SQNR (bootstrap over the samples); the first prefix measured is where the
//! prediction clears the target, then bisection on the order finds the shortest prefix that
//! reaches it (at most `MAX_ROUNDS` measurements). Cost: the bytes a layer moves per inference, weights plus
//! the activations it reads, at the candidate's widths (int8 1+1, int16 1+2, float16 2+2,
//! float 4+4 bytes per weight + activation element).
//!
//! The approach is the layer-wise noise analysis users do by hand (TensorRT issue 3352), with the
//! additive-noise bit allocation of HAWQ-style methods (Dong et al., ICCV 2019) but measured
//! rather than derived from Hessians.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::calib::stats::CalibrationStats;
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::quant::plan::{node_key, Plan, Precision};
use crate::quant::probe::{worst_sqnr_db, Noise, Probe};
use crate::quant::sensitivity::{measure_units, Bisection, Unit};

/// Measurements of the search at most (the first is the all-int8 model's).
pub const MAX_ROUNDS: usize = 10;

/// Probe samples the bisection ranks the layers on (the rounds measure on all of them).
pub const RANKING_SAMPLES: usize = 8;

/// The measurement of a mixed-precision search: every layer alone (`min_share` 0), each one run
/// of the switched model. Bisection (as the guard uses it) infers half of its units' noise by
/// subtraction, and where noise does not add up (ppocr_v3_rec: one layer alone makes twice the
/// all-int8 noise) that misleads a whole assignment.
pub const SEARCH_BISECTION: Bisection = Bisection {
    max_runs: usize::MAX,
    min_share: 0.0,
};

/// What the search aims for; at least one of the three is set.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Goal {
    /// Raise layers until the output SQNR (worst output, on the probe samples) reaches this.
    pub target_sqnr_db: Option<f64>,
    /// At most this fraction of the layers in float16 or float.
    pub max_float_fraction: Option<f64>,
    /// At most this many MB (10⁶ bytes) of weights in the whole model.
    pub max_size_mb: Option<f64>,
    /// At most this fraction of the layers raised above int8, rounded up (the accuracy guard's
    /// budget).
    pub max_raised_fraction: Option<f64>,
    /// Only upgrades that each gain at least this much predicted SQNR (the guard's rule: raise
    /// what is catastrophic, not what is merely worst).
    pub min_step_gain_db: Option<f64>,
    /// Precisions a layer may be raised to, besides int8.
    pub candidates: Vec<Precision>,
}

/// The result of the search, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct Assignment {
    pub samples: usize,
    pub goal: Goal,
    pub all_int8_db: f64,
    /// Samples the units were ranked on, and the runs the bisection made.
    pub ranking_samples: usize,
    /// Units of layers (single layers where the noise concentrates), noisiest first.
    pub sensitivity: Vec<Unit>,
    /// The precision of every layer not at int8, in the order they were raised.
    pub raised: Vec<(String, Precision)>,
    /// Each measurement of the search: layers raised, predicted and measured SQNR.
    pub rounds: Vec<Round>,
    /// The measured SQNR of the final assignment on the probe samples, and its 90% lower
    /// confidence bound (what the target is checked against).
    pub final_db: f64,
    pub final_lower_bound_db: f64,
    pub reached: bool,
    /// Weight bytes of the model with this assignment, and the share of layers in float16/float.
    pub weight_bytes: u64,
    pub float_fraction: f64,
    /// The assignment as `overrides:` entries the user can pin.
    pub overrides_yaml: String,
    /// Layers pinned by the config's overrides (never changed by the search).
    pub pinned: BTreeMap<String, Precision>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Round {
    pub raised: usize,
    pub predicted_db: f64,
    pub measured_db: f64,
    /// 90% lower confidence bound of the measured SQNR (bootstrap over the samples).
    pub lower_bound_db: f64,
}

/// Bytes per weight and per activation element at a precision.
fn widths(p: Precision) -> (u64, u64) {
    match p {
        Precision::Int8 => (1, 1),
        Precision::Int16 => (1, 2),
        Precision::Float16 => (2, 2),
        Precision::Float => (4, 4),
    }
}

/// Bytes a layer moves per inference at precision `p` (its cost unit).
pub fn layer_cost(weight_elements: u64, activation_elements: u64, p: Precision) -> u64 {
    let (w, a) = widths(p);
    weight_elements * w + activation_elements * a
}

/// Bytes of every float constant of the model once the plan's weights are int8.
fn base_weight_bytes(model: &Model, plan: &Plan) -> u64 {
    model
        .graph
        .constants
        .iter()
        .map(|(name, c)| {
            let elements = c.tensor.dims.iter().product::<i64>().max(0) as u64;
            if plan.weights.contains_key(name) {
                elements
            } else {
                crate::ir::tensor::byte_size(&c.tensor)
            }
        })
        .sum()
}

/// The greedy state: each searchable unit's precision and the predicted noise.
struct Search<'a> {
    units: &'a [Unit],
    precision: Vec<Precision>,
    candidates: Vec<Vec<Precision>>,
    /// Per output: measured / predicted noise.
    correction: Vec<f64>,
    signal: &'a [f64],
    weight_bytes: u64,
    /// Layers in float16 or float, and layers above int8.
    floats: usize,
    raised_layers: usize,
    total_layers: usize,
    /// Every layer above int8, in the order raised (a unit's layers together).
    raised: Vec<(String, Precision)>,
}

impl Search<'_> {
    fn residual(&self, i: usize, p: Precision) -> &[f64] {
        let u = &self.units[i];
        match p {
            Precision::Int8 => &u.only_int8,
            Precision::Int16 => u.only_int16.as_deref().unwrap_or(&u.only_int8),
            Precision::Float16 | Precision::Float => &[],
        }
    }

    /// Σ of the units' noise, uncorrected, with one unit optionally changed.
    fn summed(&self, change: Option<(usize, Precision)>) -> Noise {
        let mut n = vec![0.0; self.correction.len()];
        for i in 0..self.units.len() {
            let p = match change {
                Some((j, p)) if j == i => p,
                _ => self.precision[i],
            };
            for (n, r) in n.iter_mut().zip(self.residual(i, p)) {
                *n += r;
            }
        }
        n
    }

    fn predicted(&self, change: Option<(usize, Precision)>) -> Noise {
        self.summed(change)
            .iter()
            .zip(&self.correction)
            .map(|(n, k)| n * k)
            .collect()
    }

    /// Sets the correction so that the prediction for the current state equals `measured`.
    fn calibrate(&mut self, measured: &[f64]) {
        let summed = self.summed(None);
        for ((k, s), m) in self.correction.iter_mut().zip(&summed).zip(measured) {
            if *s > 0.0 {
                *k = m / s;
            }
        }
    }

    /// Takes the best affordable upgrade; false when none is left or none helps enough.
    fn step(&mut self, goal: &Goal) -> bool {
        let now = worst_sqnr_db(self.signal, &self.predicted(None));
        let mut best: Option<(f64, usize, Precision)> = None;
        for i in 0..self.units.len() {
            let u = &self.units[i];
            let n = u.layers.len();
            let from = self.precision[i];
            for &p in self.candidates[i].iter().filter(|&&p| p > from) {
                let extra_bytes = widths(p).0.saturating_sub(widths(from).0) * u.weight_elements;
                if let Some(mb) = goal.max_size_mb {
                    // Upgrades that add no weight bytes (int16) fit whatever the size.
                    if extra_bytes > 0 && (self.weight_bytes + extra_bytes) as f64 > mb * 1e6 {
                        continue;
                    }
                }
                let becomes_float = p >= Precision::Float16 && from < Precision::Float16;
                if let Some(f) = goal.max_float_fraction {
                    if becomes_float && (self.floats + n) as f64 > f * self.total_layers as f64 {
                        continue;
                    }
                }
                if let Some(f) = goal.max_raised_fraction {
                    // Rounded up: a small model may still raise one layer.
                    let limit = (f * self.total_layers as f64).ceil();
                    if from == Precision::Int8 && (self.raised_layers + n) as f64 > limit {
                        continue;
                    }
                }
                let benefit = worst_sqnr_db(self.signal, &self.predicted(Some((i, p)))) - now;
                if benefit <= goal.min_step_gain_db.unwrap_or(1e-9) {
                    continue;
                }
                let cost = (layer_cost(u.weight_elements, u.activation_elements, p)
                    - layer_cost(u.weight_elements, u.activation_elements, from))
                .max(1) as f64;
                let ratio = benefit / cost;
                if best.is_none_or(|(r, _, _)| ratio > r) {
                    best = Some((ratio, i, p));
                }
            }
        }
        let Some((_, i, p)) = best else { return false };
        let from = self.precision[i];
        let u = &self.units[i];
        self.weight_bytes += widths(p).0.saturating_sub(widths(from).0) * u.weight_elements;
        if p >= Precision::Float16 && from < Precision::Float16 {
            self.floats += u.layers.len();
        }
        if from == Precision::Int8 {
            self.raised_layers += u.layers.len();
        }
        self.precision[i] = p;
        self.raised.retain(|(k, _)| !u.layers.contains(k));
        self.raised.extend(u.layers.iter().map(|l| (l.clone(), p)));
        true
    }
}

/// How the search's rounds are measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Instrument {
    /// Each round's plan materialised, lowered and compiled: what the written model computes.
    Exact,
    /// Every round by the one compiled model of `quant::switched` (approximate: see there):
    /// cheap, for the guard, whose rounds only decide whether to keep what it raised.
    Switched,
}

/// Finds an assignment for `goal`: measures the all-int8 model and the units' sensitivity,
/// then raises units greedily and measures the result (see the module header). `plan` carries
/// the pinned precisions of the overrides; those layers are left alone.
pub fn assign(
    model: &Model,
    plan: &Plan,
    stats: &CalibrationStats,
    probe: &Probe,
    goal: &Goal,
    bisection: Bisection,
    instrument: Instrument,
) -> Result<Assignment> {
    if goal.target_sqnr_db.is_none()
        && goal.max_float_fraction.is_none()
        && goal.max_size_mb.is_none()
        && goal.max_raised_fraction.is_none()
    {
        return Err(Error::Usage(
            "mixed_precision needs target_sqnr_db, max_float_fraction or max_size_mb".into(),
        ));
    }
    let pinned = plan.precisions.clone();
    // Rank on the first samples (all of them when they are few).
    let first;
    let ranking: &Probe = if probe.samples() <= RANKING_SAMPLES {
        probe
    } else {
        first = probe.first(RANKING_SAMPLES);
        &first
    };
    let ranking_variants = ranking.variants(plan)?;
    let all_variants = match instrument {
        Instrument::Switched if !std::ptr::eq(ranking, probe) => Some(probe.variants(plan)?),
        _ => None,
    };
    // Exact: the search's rounds skip the float16 rounding of activations (its noise is far
    // below int8's, and tract's cast to float16 dominated them); the chosen plan is measured
    // with it below.
    let measure_samples = |p: &Plan| match instrument {
        Instrument::Exact => probe.sample_noise_unrounded(p),
        Instrument::Switched => all_variants.as_ref().unwrap_or(&ranking_variants).sample_noise(p),
    };
    let all_int8_samples = measure_samples(plan)?;
    let all_int8 = crate::quant::probe::sum_samples(&all_int8_samples);
    let all_int8_db = probe.sqnr_db(&all_int8);
    let with_int16 = goal.candidates.contains(&Precision::Int16);
    let searchable = Plan {
        precisions: BTreeMap::new(),
        ..plan.clone()
    };
    // The all-int8 noise on the ranking samples is their share of the sums.
    let ranking_all_int8 = crate::quant::probe::sum_samples(&all_int8_samples[..ranking.samples()]);
    let free: BTreeSet<String> = plan.layers().into_iter().filter(|l| !pinned.contains_key(l)).collect();
    let sensitivity = measure_units(
        model,
        plan,
        stats,
        &ranking_variants,
        &free,
        with_int16,
        bisection,
        matches!(instrument, Instrument::Switched).then_some(&ranking_all_int8),
    )?;
    let candidates = sensitivity
        .iter()
        .map(|u| {
            goal.candidates
                .iter()
                .copied()
                .filter(|&p| p != Precision::Int8 && (p != Precision::Float16 || u.no_float16.is_none()))
                .collect()
        })
        .collect();
    let total_layers = plan.layers().len();
    let mut search = Search {
        units: &sensitivity,
        precision: vec![Precision::Int8; sensitivity.len()],
        candidates,
        correction: vec![1.0; all_int8.len()],
        signal: &ranking.signal,
        weight_bytes: base_weight_bytes(model, &searchable),
        floats: pinned.values().filter(|&&p| p >= Precision::Float16).count(),
        raised_layers: pinned.len(),
        total_layers,
        raised: vec![],
    };
    search.calibrate(&ranking_all_int8);
    let base_weight_bytes = search.weight_bytes;
    // The whole greedy order, each step's state after it.
    struct Step {
        /// Every layer raised so far.
        raised: Vec<(String, Precision)>,
        predicted_db: f64,
        weight_bytes: u64,
    }
    let mut steps: Vec<Step> = Vec::new();
    while search.step(goal) {
        steps.push(Step {
            raised: search.raised.clone(),
            predicted_db: worst_sqnr_db(&ranking.signal, &search.predicted(None)),
            weight_bytes: search.weight_bytes,
        });
    }
    let prefix = |k: usize| -> Vec<(String, Precision)> {
        if k == 0 {
            vec![]
        } else {
            steps[k - 1].raised.clone()
        }
    };
    let all_int8_lower_db = probe.sqnr_lower_db(&all_int8_samples);
    let mut measured: BTreeMap<usize, (f64, f64)> = BTreeMap::new();
    measured.insert(0, (all_int8_db, all_int8_lower_db));
    let mut rounds = vec![Round {
        raised: 0,
        predicted_db: all_int8_db,
        measured_db: all_int8_db,
        lower_bound_db: all_int8_lower_db,
    }];
    let mut measure = |k: usize, rounds: &mut Vec<Round>| -> Result<(f64, f64)> {
        if let Some(&m) = measured.get(&k) {
            return Ok(m);
        }
        let raised = prefix(k);
        let m = probe.figures(&measure_samples(
            &plan.with_precisions(&raised.iter().cloned().collect()),
        )?);
        eprintln!(
            "onnxq: mixed precision: {} layers raised: {:.2} dB measured (predicted {:.2} dB)",
            raised.len(),
            m.0,
            steps[k - 1].predicted_db
        );
        rounds.push(Round {
            raised: raised.len(),
            predicted_db: steps[k - 1].predicted_db,
            measured_db: m.0,
            lower_bound_db: m.1,
        });
        measured.insert(k, m);
        Ok(m)
    };
    // The target holds for the lower confidence bound. The first guess is where the prediction
    // clears the target by the all-int8 model's gap between mean and bound; then bisection on
    // the greedy order finds the shortest prefix that reaches it.
    let chosen = match goal.target_sqnr_db {
        None => steps.len(),
        Some(t) if all_int8_lower_db >= t => 0,
        Some(t) => {
            let gap = (all_int8_db - all_int8_lower_db).max(0.0);
            let guess = steps
                .iter()
                .position(|s| s.predicted_db >= t + gap)
                .map_or(steps.len(), |i| i + 1);
            let (mut lo, mut hi) = (0, steps.len());
            if measure(guess, &mut rounds)?.1 >= t {
                hi = guess;
            } else {
                lo = guess;
            }
            // The end of the order (everything the budget allows) is measured only if bisection
            // gets there: it is assumed to reach the target until then.
            while hi > lo + 1 && rounds.len() < MAX_ROUNDS {
                let mid = (lo + hi) / 2;
                if measure(mid, &mut rounds)?.1 >= t {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            hi
        }
    };
    let (mut measured_db, mut lower_db) = measure(chosen, &mut rounds)?;
    let mut raised = prefix(chosen);
    let mut weight_bytes = if chosen == 0 {
        base_weight_bytes
    } else {
        steps[chosen - 1].weight_bytes
    };
    // With a minimum gain per step (the guard) and the whole order not measuring better than
    // all int8 (noise that does not add up: a layer whose error cancels another's), each step
    // is tried on its own, measured, and kept only if it measures better than what was kept.
    if goal.min_step_gain_db.is_some() && !steps.is_empty() && measured_db <= all_int8_db {
        let sizes = crate::quant::sensitivity::layer_sizes(model, plan, stats);
        let mut kept: Vec<(String, Precision)> = Vec::new();
        let (mut kept_db, mut kept_lower_db) = (all_int8_db, all_int8_lower_db);
        let mut before: BTreeMap<String, Precision> = BTreeMap::new();
        for Step {
            raised: cumulative,
            predicted_db,
            ..
        } in &steps
        {
            let now: BTreeMap<String, Precision> = cumulative.iter().cloned().collect();
            let step: Vec<(String, Precision)> = now
                .iter()
                .filter(|(l, p)| before.get(*l) != Some(p))
                .map(|(l, p)| (l.clone(), *p))
                .collect();
            before = now;
            let mut trial = kept.clone();
            trial.retain(|(l, _)| !step.iter().any(|(s, _)| s == l));
            trial.extend(step);
            let (db, lower_db) = probe.figures(&measure_samples(
                &plan.with_precisions(&trial.iter().cloned().collect()),
            )?);
            rounds.push(Round {
                raised: trial.len(),
                predicted_db: *predicted_db,
                measured_db: db,
                lower_bound_db: lower_db,
            });
            if db > kept_db {
                (kept, kept_db, kept_lower_db) = (trial, db, lower_db);
            }
        }
        weight_bytes = base_weight_bytes
            + kept
                .iter()
                .map(|(l, p)| (widths(*p).0 - 1) * sizes.get(l).map_or(0, |s| s.0))
                .sum::<u64>();
        (raised, measured_db, lower_db) = (kept, kept_db, kept_lower_db);
    }
    if matches!(instrument, Instrument::Exact) && raised.iter().any(|(_, p)| *p == Precision::Float16) {
        // The chosen plan exactly; should the rounding cost the target, the next steps exactly.
        let mut k = chosen;
        loop {
            (measured_db, lower_db) =
                probe.figures(&probe.sample_noise(&plan.with_precisions(&raised.iter().cloned().collect()))?);
            eprintln!(
                "onnxq: mixed precision: {} layers raised: {measured_db:.2} dB with float16 rounding",
                raised.len()
            );
            if goal.target_sqnr_db.is_none_or(|t| lower_db >= t) || k >= steps.len() {
                break;
            }
            k += 1;
            raised = prefix(k);
            weight_bytes = steps[k - 1].weight_bytes;
        }
    }
    let reached = goal.target_sqnr_db.is_none_or(|t| lower_db >= t);
    let final_plan = plan.with_precisions(&raised.iter().cloned().collect());
    let float_fraction = final_plan
        .precisions
        .values()
        .filter(|&&p| p >= Precision::Float16)
        .count() as f64
        / total_layers.max(1) as f64;
    let overrides_yaml = overrides_yaml(model, &raised);
    Ok(Assignment {
        samples: probe.samples(),
        ranking_samples: ranking.samples(),
        goal: goal.clone(),
        all_int8_db,
        raised,
        rounds,
        final_db: measured_db,
        final_lower_bound_db: lower_db,
        reached,
        weight_bytes,
        float_fraction,
        overrides_yaml,
        pinned,
        sensitivity,
    })
}

/// `overrides:` entries that pin an assignment: by node name, or by layer key when unnamed.
pub fn overrides_yaml(model: &Model, raised: &[(String, Precision)]) -> String {
    let names: BTreeMap<String, String> = model
        .graph
        .nodes
        .node_weights()
        .map(|n| (node_key(n), n.name.clone()))
        .collect();
    let mut sorted = raised.to_vec();
    sorted.sort();
    let mut s = String::from("overrides:\n");
    for (layer, p) in sorted {
        let name = names.get(&layer).filter(|n| !n.is_empty()).unwrap_or(&layer);
        s.push_str(&format!(
            "  - {{node: '{}', precision: {}}}\n",
            regex::escape(name).replace('\'', "''"),
            p.name()
        ));
    }
    s
}

impl std::fmt::Display for Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "mixed precision on {} calibration samples (ranked on {}): all int8 {:.2} dB",
            self.samples, self.ranking_samples, self.all_int8_db
        )?;
        crate::quant::sensitivity::write_units(f, &self.sensitivity, 12)?;
        let layers: usize = self.sensitivity.iter().map(|u| u.layers.len()).sum::<usize>() + self.pinned.len();
        writeln!(f, "raised {} of {layers} layers:", self.raised.len())?;
        for (layer, p) in &self.raised {
            writeln!(f, "  {:<48} {}", layer, p.name())?;
        }
        for (layer, p) in &self.pinned {
            writeln!(f, "  {:<48} {} (pinned by overrides)", layer, p.name())?;
        }
        for (i, r) in self.rounds.iter().enumerate() {
            writeln!(
                f,
                "  measurement {}: {} layers raised, predicted {:.2} dB, measured {:.2} dB (90% lower bound {:.2} dB)",
                i, r.raised, r.predicted_db, r.measured_db, r.lower_bound_db
            )?;
        }
        if let Some(mb) = self.goal.max_size_mb {
            if self.weight_bytes as f64 > mb * 1e6 {
                writeln!(
                    f,
                    "  note: the weights take {:.2} MB with every layer at int8, above max_size_mb {mb}",
                    self.weight_bytes as f64 / 1e6
                )?;
            }
        }
        let verdict = match self.goal.target_sqnr_db {
            Some(t) if self.reached => format!("target {t} dB reached"),
            Some(t) => format!("target {t} dB NOT reached (no affordable upgrade left)"),
            None => "budget spent".into(),
        };
        writeln!(
            f,
            "final: {:.2} dB on the calibration samples, at least {:.2} dB with 90% confidence ({verdict}); weights {:.2} MB; {:.0}% of layers in float16/float",
            self.final_db,
            self.final_lower_bound_db,
            self.weight_bytes as f64 / 1e6,
            self.float_fraction * 100.0
        )?;
        write!(f, "pin it with:\n{}", self.overrides_yaml)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, weights: u64, only_int8: f64, only_int16: f64) -> Unit {
        Unit {
            layer: name.into(),
            node: name.into(),
            op_type: "Conv".into(),
            layers: vec![name.into()],
            weight_elements: weights,
            activation_elements: 100,
            only_this_int8_db: 0.0,
            only_this_int16_db: None,
            share: 0.0,
            no_float16: None,
            only_int8: vec![only_int8],
            only_int16: Some(vec![only_int16]),
        }
    }

    fn search<'a>(layers: &'a [Unit], signal: &'a [f64], candidates: &[Precision]) -> Search<'a> {
        let mut s = Search {
            units: layers,
            precision: vec![Precision::Int8; layers.len()],
            candidates: vec![candidates.to_vec(); layers.len()],
            correction: vec![1.0],
            signal,
            weight_bytes: 0,
            floats: 0,
            raised_layers: 0,
            total_layers: layers.len(),
            raised: vec![],
        };
        // Measured all-int8 noise twice the sum of the layers' own: k = 2.
        let sum: f64 = layers.iter().map(|l| l.only_int8[0]).sum();
        s.calibrate(&[2.0 * sum]);
        s
    }

    #[test]
    fn costs_are_bytes_moved_at_each_width() {
        assert_eq!(layer_cost(1000, 10, Precision::Int8), 1010);
        assert_eq!(layer_cost(1000, 10, Precision::Int16), 1020);
        assert_eq!(layer_cost(1000, 10, Precision::Float16), 2020);
        assert_eq!(layer_cost(1000, 10, Precision::Float), 4040);
    }

    #[test]
    fn the_noisiest_layer_per_byte_goes_first_and_predictions_scale() {
        // Signal 1: noise 0.01 is 20 dB. "a" is noisy and cheap, "b" quiet, "c" noisy but big.
        let layers = [
            layer("a", 100, 0.004, 0.0001),
            layer("b", 100, 0.0005, 0.0),
            layer("c", 10_000, 0.004, 0.0039),
        ];
        let signal = [1.0];
        let mut s = search(
            &layers,
            &signal,
            &[Precision::Int16, Precision::Float16, Precision::Float],
        );
        let before = worst_sqnr_db(&signal, &s.predicted(None));
        assert!((before - 10.0 * (1.0 / (2.0 * 0.0085f64)).log10()).abs() < 1e-9);
        assert!(s.step(&Goal::default()));
        // int16 on "a" removes 97% of its noise for 100 extra bytes: best per byte.
        assert_eq!(s.raised, [("a".to_string(), Precision::Int16)]);
        assert!(s.step(&Goal::default()));
        // Next per byte: int16 on "b" (all of its noise) beats 10 000 extra bytes for "c".
        assert_eq!(s.raised[1], ("b".to_string(), Precision::Int16));
        let after = worst_sqnr_db(&signal, &s.predicted(None));
        assert!(after > before + 2.0, "{before} -> {after}");
    }

    #[test]
    fn the_guard_rule_takes_only_big_gains_within_its_layer_budget() {
        // "a" carries most of the noise, "b" and "c" little each.
        let layers = [
            layer("a", 100, 0.006, 0.0),
            layer("b", 100, 0.0005, 0.0),
            layer("c", 100, 0.0005, 0.0),
        ];
        let signal = [1.0];
        let goal = Goal {
            min_step_gain_db: Some(4.0),
            max_raised_fraction: Some(0.5),
            ..Goal::default()
        };
        let mut s = search(&layers, &signal, &[Precision::Int16, Precision::Float]);
        while s.step(&goal) {}
        // Raising "a" gains 10·log10(7/1) = 8.5 dB; "b" or "c" then 3 dB each, under 4.
        assert_eq!(s.raised, [("a".to_string(), Precision::Int16)]);
        // A budget of 10% of 3 layers still allows one (rounded up), not two.
        let goal = Goal {
            min_step_gain_db: Some(0.01),
            max_raised_fraction: Some(0.1),
            ..Goal::default()
        };
        let mut s = search(&layers, &signal, &[Precision::Int16]);
        while s.step(&goal) {}
        assert_eq!(s.raised.len(), 1, "{:?}", s.raised);
    }

    #[test]
    fn budgets_are_respected() {
        let layers = [layer("a", 100, 0.004, 0.004), layer("b", 100, 0.004, 0.004)];
        let signal = [1.0];
        // int16 helps nothing here; float16 is the only useful move, and no float layer is allowed.
        let goal = Goal {
            max_float_fraction: Some(0.0),
            ..Goal::default()
        };
        let mut s = search(&layers, &signal, &[Precision::Int16, Precision::Float16]);
        assert!(!s.step(&goal), "{:?}", s.raised);
        // Half the layers may be float: exactly one moves.
        let goal = Goal {
            max_float_fraction: Some(0.5),
            ..Goal::default()
        };
        while s.step(&goal) {}
        assert_eq!(s.raised.len(), 1);
        // A weight budget of 250 bytes takes one float16 layer (100 → 200 bytes) at most.
        let mut s = search(&layers, &signal, &[Precision::Float16]);
        s.weight_bytes = 200;
        let goal = Goal {
            max_size_mb: Some(250e-6 + 50e-6),
            ..Goal::default()
        };
        while s.step(&goal) {}
        assert_eq!(s.raised.len(), 1, "{:?}", s.raised);
        // int16 adds no weight bytes: it fits a size budget the int8 model already exceeds.
        let layers = [layer("a", 100, 0.004, 0.0001)];
        let mut s = search(&layers, &signal, &[Precision::Int16, Precision::Float16]);
        s.weight_bytes = 1000;
        let goal = Goal {
            max_size_mb: Some(500e-6),
            ..Goal::default()
        };
        assert!(s.step(&goal));
        assert_eq!(s.raised, [("a".to_string(), Precision::Int16)]);
        assert!(!s.step(&goal), "float16 would add bytes: {:?}", s.raised);
    }
}
