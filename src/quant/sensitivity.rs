//! Which layers' quantization noise reaches the output: noise bisection over the layers in graph
//! order, the measurement behind mixed precision (`quant::mixed`), the accuracy guard
//! (`quant::guard`) and `onnxq sensitivity`.
//!
//! Quantization noise of different layers is close to independent, so the output noise of a
//! set of quantized layers is close to the sum of each layer's alone (the additive model of
//! HAWQ-style bit allocation, Dong et al., ICCV 2019, here measured rather than derived from
//! Hessians). Measuring every layer alone costs one run of the model per layer (and per
//! precision); instead, a unit (a run of consecutive layers in topological order, at first all of
//! them) is measured with only its layers quantized, and the noisiest unit is split in two halves,
//! each measured, until the units left carry less than `min_share` of the all-int8 noise each, are
//! single layers, or `max_runs` runs are spent. A layer that dominates is isolated in about
//! 2·log₂(layers) runs; where the noise is spread over many layers the search stops early with a
//! few groups, which is what an assignment needs there (raise a whole group). Each final unit of
//! at least `min_share` is then measured with its activations at int16, when that is a
//! candidate (the others are raised to int16 only by a budget, as if int16 removed nothing).
//!
//! A unit's share: its noise over the all-int8 noise, on the output where that share is largest
//! (outputs are compared each against its own signal).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::calib::stats::CalibrationStats;
use crate::error::Result;
use crate::ir::Model;
use crate::quant::plan::{float16_possible, node_key, Plan, Precision};
use crate::quant::probe::{Noise, Variants};

/// How far the bisection goes.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Bisection {
    /// Runs of the model at most for the int8 splits (one per split).
    pub max_runs: usize,
    /// Units carrying less than this share of the all-int8 noise are not split; 0: no
    /// bisection, every layer is measured alone.
    pub min_share: f64,
}

/// A run of consecutive layers (in topological order) measured together; one layer at best.
#[derive(Clone, Debug, Serialize)]
pub struct Unit {
    /// The first layer's key, or "first … last (n layers)" for a group.
    pub layer: String,
    /// The node of a single layer (empty for a group).
    pub node: String,
    /// The op type of a single layer, "group" otherwise.
    pub op_type: String,
    /// The layers' keys, in topological order.
    pub layers: Vec<String>,
    /// Weight elements the plan quantizes for these layers.
    pub weight_elements: u64,
    /// Activation elements per inference these layers read through Q/DQ.
    pub activation_elements: u64,
    /// Output SQNR with only these layers quantized (int8).
    pub only_this_int8_db: f64,
    /// Output SQNR with only these layers quantized, their activations in int16 (when a candidate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub only_this_int16_db: Option<f64>,
    /// The share of the all-int8 output noise these layers cause alone (worst output).
    pub share: f64,
    /// Why float16 is not offered for these layers, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_float16: Option<String>,
    #[serde(skip)]
    pub only_int8: Noise,
    #[serde(skip)]
    pub only_int16: Option<Noise>,
}

impl Unit {
    pub fn is_group(&self) -> bool {
        self.layers.len() > 1
    }
}

/// The weight and activation elements of each layer of a plan (per inference).
pub fn layer_sizes(model: &Model, plan: &Plan, stats: &CalibrationStats) -> BTreeMap<String, (u64, u64)> {
    let samples = stats.samples.max(1) as u64;
    let mut sizes: BTreeMap<String, (u64, u64)> = plan.layers().into_iter().map(|l| (l, (0, 0))).collect();
    for (w, q) in &plan.weights {
        let elements = model.graph.constants[w].tensor.dims.iter().product::<i64>().max(0) as u64;
        let readers: BTreeSet<&String> = q.consumers.iter().map(|(k, _)| k).collect();
        for k in readers {
            if let Some(s) = sizes.get_mut(k) {
                s.0 += elements;
            }
        }
    }
    for (t, a) in &plan.activations {
        let elements = stats.tensors.get(t).map_or(0, |s| s.count / samples);
        let readers: BTreeSet<&String> = a.consumers.iter().map(|(k, _)| k).collect();
        for k in readers {
            if let Some(s) = sizes.get_mut(k) {
                s.1 += elements;
            }
        }
    }
    sizes
}

/// The layers of `plan` among `searchable`, in topological order.
pub fn layers_in_order(model: &Model, plan: &Plan, searchable: &BTreeSet<String>) -> Result<Vec<String>> {
    let layers = plan.layers();
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for ix in model.graph.topological_order()? {
        let key = node_key(&model.graph.nodes[ix]);
        if layers.contains(&key) && searchable.contains(&key) && seen.insert(key.clone()) {
            order.push(key);
        }
    }
    Ok(order)
}

/// The share of `reference` that `noise` is, on the output where it is largest.
pub fn share_of(noise: &[f64], reference: &[f64]) -> f64 {
    noise
        .iter()
        .zip(reference)
        .map(|(&n, &r)| if r > 0.0 { n.max(0.0) / r } else { 0.0 })
        .fold(0.0, f64::max)
}

/// Measures units of the `searchable` layers by noise bisection (module header), then each
/// final unit at int16 when `with_int16`, on the probe's samples, with one compiled model for
/// every variant (`quant::switched`). Shares are of the noise of all `searchable` layers at int8,
/// measured the same way (or `plan_noise`, the noise of `plan` on `variants` when the caller
/// has it, when every layer is searchable). Units come back noisiest first (ties by first
/// layer: deterministic).
#[allow(clippy::too_many_arguments)]
pub fn measure_units(
    model: &Model,
    plan: &Plan,
    stats: &CalibrationStats,
    variants: &Variants,
    searchable: &BTreeSet<String>,
    with_int16: bool,
    bisection: Bisection,
    plan_noise: Option<&Noise>,
) -> Result<Vec<Unit>> {
    let order = layers_in_order(model, plan, searchable)?;
    if order.is_empty() {
        return Ok(vec![]);
    }
    let started = std::time::Instant::now();
    let probe = variants.probe;
    let only = |layers: &[String]| plan.restricted_to(&layers.iter().cloned().collect());
    let all_int8 = match plan_noise {
        Some(n) if order.len() == plan.layers().len() => n.clone(),
        _ => crate::quant::probe::sum_samples(&variants.sample_noise(&only(&order))?),
    };
    let all_int8 = &all_int8;
    let done: Vec<(Vec<String>, Noise)> = if bisection.min_share <= 0.0 {
        // Every layer alone: no noise inferred by subtraction (mixed precision's search, where
        // noise that does not add up would mislead the whole assignment).
        let plans: Vec<Plan> = order.iter().map(|l| only(std::slice::from_ref(l))).collect();
        let noises = variants.noises(&plans, "sensitivity, every layer alone")?;
        order.into_iter().map(|l| vec![l]).zip(noises).collect()
    } else {
        let mut runs = 1;
        bisect(order, all_int8.clone(), all_int8, bisection, |half| {
            runs += 1;
            let noise = crate::quant::probe::sum_samples(&variants.sample_noise(&only(half))?);
            eprintln!(
                "onnxq: sensitivity: {runs} runs, {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(noise)
        })?
    };
    let int16: Vec<Option<Noise>> = if with_int16 {
        // Only units that carry enough noise to be worth raising, measured together.
        let worth: Vec<usize> = (0..done.len())
            .filter(|&i| share_of(&done[i].1, all_int8) >= bisection.min_share)
            .collect();
        let plans: Vec<Plan> = worth
            .iter()
            .map(|&i| {
                let layers = &done[i].0;
                only(layers).with_precisions(&layers.iter().map(|l| (l.clone(), Precision::Int16)).collect())
            })
            .collect();
        let mut noises = variants.noises(&plans, "sensitivity at int16")?.into_iter();
        let mut int16 = vec![None; done.len()];
        for i in worth {
            int16[i] = noises.next();
        }
        int16
    } else {
        vec![None; done.len()]
    };
    let sizes = layer_sizes(model, plan, stats);
    let nodes: BTreeMap<String, &crate::ir::Node> =
        model.graph.nodes.node_weights().map(|n| (node_key(n), n)).collect();
    let mut units: Vec<Unit> = done
        .into_iter()
        .zip(int16)
        .map(|((layers, only_int8), only_int16)| {
            let (weights, activations) = layers
                .iter()
                .map(|l| sizes.get(l).copied().unwrap_or_default())
                .fold((0, 0), |(w, a), (lw, la)| (w + lw, a + la));
            let no_float16 = layers
                .iter()
                .find_map(|l| float16_possible(model, plan, l).err().map(|e| format!("{l}: {e}")));
            let single = layers.len() == 1;
            let node = nodes.get(&layers[0]);
            Unit {
                layer: if single {
                    layers[0].clone()
                } else {
                    format!("{} … {} ({} layers)", layers[0], layers[layers.len() - 1], layers.len())
                },
                node: if single {
                    node.map(|n| n.name.clone()).unwrap_or_default()
                } else {
                    String::new()
                },
                op_type: if single {
                    node.map(|n| n.op_type.clone()).unwrap_or_default()
                } else {
                    "group".into()
                },
                weight_elements: weights,
                activation_elements: activations,
                only_this_int8_db: probe.sqnr_db(&only_int8),
                only_this_int16_db: only_int16.as_ref().map(|n| probe.sqnr_db(n)),
                share: share_of(&only_int8, all_int8),
                no_float16,
                layers,
                only_int8,
                only_int16,
            }
        })
        .collect();
    units.sort_by(|a, b| b.share.total_cmp(&a.share).then_with(|| a.layers[0].cmp(&b.layers[0])));
    Ok(units)
}

/// The bisection itself (module header): `measure` gives the noise of a unit's first half.
/// Returns the final units with their int8 noise.
fn bisect(
    order: Vec<String>,
    root_noise: Noise,
    all_int8: &[f64],
    bisection: Bisection,
    mut measure: impl FnMut(&[String]) -> Result<Noise>,
) -> Result<Vec<(Vec<String>, Noise)>> {
    let mut open: Vec<(Vec<String>, Noise)> = vec![(order, root_noise)];
    let mut done: Vec<(Vec<String>, Noise)> = Vec::new();
    let mut runs = 0;
    // The noisiest open unit first (ties by first layer: deterministic).
    while let Some(i) = (0..open.len()).max_by(|&a, &b| {
        share_of(&open[a].1, all_int8)
            .total_cmp(&share_of(&open[b].1, all_int8))
            .then_with(|| open[b].0[0].cmp(&open[a].0[0]))
    }) {
        let (layers, noise) = open.swap_remove(i);
        if share_of(&noise, all_int8) < bisection.min_share || runs >= bisection.max_runs {
            // The noisiest is not worth splitting, or no runs are left: neither are the others.
            done.push((layers, noise));
            done.append(&mut open);
            break;
        }
        if layers.len() == 1 {
            done.push((layers, noise));
            continue;
        }
        let (a, b) = layers.split_at(layers.len() / 2);
        let first = measure(a)?;
        runs += 1;
        let second: Noise = noise.iter().zip(&first).map(|(n, f)| (n - f).max(0.0)).collect();
        open.push((a.to_vec(), first));
        open.push((b.to_vec(), second));
    }
    Ok(done)
}

/// The ranked unit table (the `limit` noisiest units; 0: all).
pub fn write_units(f: &mut impl std::fmt::Write, units: &[Unit], limit: usize) -> std::fmt::Result {
    writeln!(
        f,
        "  {:<56} {:<12} {:>10} {:>11} {:>7}",
        "layer or group (noisiest first)", "op", "only int8", "only int16", "share"
    )?;
    let shown = if limit == 0 {
        units.len()
    } else {
        limit.min(units.len())
    };
    for u in &units[..shown] {
        let chars: Vec<char> = u.layer.chars().collect();
        let name: String = if chars.len() > 56 {
            std::iter::once('…')
                .chain(chars[chars.len() - 55..].iter().copied())
                .collect()
        } else {
            u.layer.clone()
        };
        writeln!(
            f,
            "  {:<56} {:<12} {:>7.2} dB {:>11} {:>6.1}%",
            name,
            u.op_type,
            u.only_this_int8_db,
            u.only_this_int16_db.map_or("-".into(), |d| format!("{d:.2} dB")),
            u.share * 100.0
        )?;
    }
    if shown < units.len() {
        writeln!(f, "  … {} more in the report", units.len() - shown)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("l{i:02}")).collect()
    }

    /// Additive noise: a unit's noise is the sum of its layers'.
    fn additive(noise: &[f64]) -> impl Fn(&[String]) -> Noise + '_ {
        move |layers| vec![layers.iter().map(|l| noise[l[1..].parse::<usize>().unwrap()]).sum()]
    }

    #[test]
    fn one_dominant_layer_is_isolated_in_about_log2_runs() {
        let mut noise = vec![0.001; 64];
        noise[37] = 1.0;
        let total: f64 = noise.iter().sum();
        let of = additive(&noise);
        let mut runs = 0;
        let units = bisect(
            names(64),
            vec![total],
            &[total],
            Bisection {
                max_runs: 40,
                min_share: 0.1,
            },
            |h| {
                runs += 1;
                Ok(of(h))
            },
        )
        .unwrap();
        assert_eq!(runs, 6, "6 splits of 64 layers");
        // 6 splits leave 7 units; the dominant layer is one of them alone.
        assert_eq!(units.len(), 7);
        assert!(
            units.iter().any(|(l, n)| l == &["l37"] && (n[0] - 1.0).abs() < 1e-9),
            "{units:?}"
        );
        // Every layer is in exactly one unit.
        let mut all: Vec<String> = units.iter().flat_map(|(l, _)| l.clone()).collect();
        all.sort();
        assert_eq!(all, names(64));
    }

    #[test]
    fn spread_noise_stops_at_groups_and_the_budget_holds() {
        let noise = vec![1.0; 64];
        let of = additive(&noise);
        // Each of 8 groups of 8 carries 12.5%: below a 20% share nothing is split further.
        let units = bisect(
            names(64),
            vec![64.0],
            &[64.0],
            Bisection {
                max_runs: 100,
                min_share: 0.2,
            },
            |h| Ok(of(h)),
        )
        .unwrap();
        assert_eq!(units.len(), 8, "{units:?}");
        assert!(units.iter().all(|(l, _)| l.len() == 8));
        // Two runs allow two splits.
        let mut runs = 0;
        let units = bisect(
            names(64),
            vec![64.0],
            &[64.0],
            Bisection {
                max_runs: 2,
                min_share: 0.0,
            },
            |h| {
                runs += 1;
                Ok(of(h))
            },
        )
        .unwrap();
        assert_eq!((runs, units.len()), (2, 3));
    }

    #[test]
    fn a_share_is_taken_on_the_output_where_it_is_largest() {
        assert_eq!(share_of(&[1.0, 3.0], &[10.0, 4.0]), 0.75);
        // A negative noise (never measured, but predicted) counts as none; an output without noise
        // in the reference counts as no share.
        assert_eq!(share_of(&[-1.0, 2.0], &[10.0, 0.0]), 0.0);
    }
}
