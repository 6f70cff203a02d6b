//! Data-free activation ranges (Nagel et al., "Data-Free Quantization Through Weight Equalization
//! and Bias Correction", ICCV 2019, §4.3 uses the same model of a layer output): without any
//! calibration data, the BatchNorm a layer was folded with says its output channel `c` is about
//! `N(β_c, γ_c²)`, so the range `[β_c − n·|γ_c|, β_c + n·|γ_c|]` holds all but a `2·Q(n)` tail
//! (n = 6: 2·10⁻⁹, i.e. essentially never clipped; n = 3 would clip 0.27% of every channel, and
//! a per-tensor range is set by its widest channel anyway, so a generous n costs little
//! resolution while clipping is what hurts most).
//!
//! These ranges are carried forward by interval arithmetic, per channel (axis 1) where the op
//! keeps channels and as one interval for the whole tensor otherwise:
//! - monotone activations map the end points: Relu, Clip, LeakyRelu (α ≥ 0), HardSigmoid,
//!   Sigmoid, Tanh; HardSwish is monotone on either side of its minimum −0.375 at x = −1.5;
//! - ops whose output values are a subset of (or averages of) the input values keep the range:
//!   MaxPool, Identity, Dropout, nearest Resize, GlobalAveragePool, AveragePool (with padding it
//!   may average in zeros: 0 joins the range), GlobalMaxPool; Pad in constant mode joins its
//!   pad value (0 by default) to the range;
//! - layout changes keep the values but lose the channel axis: Reshape, Flatten, Transpose,
//!   Squeeze, Unsqueeze;
//! - Add, Sub, Mul of two ranged operands (a constant operand is ranged by its own min and max):
//!   interval sums, differences and products, per channel when both are per channel alike;
//!   Div by a constant whose range excludes 0 (HardSwish exported as `x·Clip(x + 3, 0, 6)/6`);
//! - bounded activations bound their output even without an input range: Sigmoid and
//!   HardSigmoid `[0, 1]`, Tanh `[−1, 1]`, Clip with both bounds (squeeze-excitation gates
//!   behind a Conv without BatchNorm);
//! - Concat: per channel along axis 1, the union otherwise.
//!
//! A tensor without a derivable range (graph inputs, outputs of layers without a folded
//! BatchNorm, ops not listed) is absent from the statistics, so the planner keeps it float.
//! The statistics are marked data-free: `samples = 0` and a fingerprint data entry `data-free`.

use std::collections::BTreeMap;

use crate::calib::observers::TensorStats;
use crate::calib::stats::{model_fingerprint, CalibrationStats, Fingerprint, STATS_FORMAT};
use crate::error::{Error, Result};
use crate::ir::tensor;
use crate::ir::BatchNormRecord;
use crate::ir::{Graph, Model, Node};

/// The number of standard deviations either side of β (module docs).
pub const DEFAULT_SIGMAS: f32 = 6.0;

/// Values a synthetic histogram is built from (uniform over the range).
const UNIFORM_POINTS: usize = 4096;

/// A range per channel (axis 1), or one for the whole tensor (length 1).
#[derive(Clone, Debug, PartialEq)]
pub struct Interval {
    pub lo: Vec<f64>,
    pub hi: Vec<f64>,
}

impl Interval {
    pub fn scalar(lo: f64, hi: f64) -> Interval {
        Interval {
            lo: vec![lo],
            hi: vec![hi],
        }
    }

    /// The whole tensor's range.
    pub fn hull(&self) -> (f64, f64) {
        (
            self.lo.iter().fold(f64::INFINITY, |a, &b| a.min(b)),
            self.hi.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b)),
        )
    }

    fn whole(&self) -> Interval {
        let (lo, hi) = self.hull();
        Interval::scalar(lo, hi)
    }

    /// Each channel's end points through `f`, monotone on the interval or with its extrema
    /// given by `f` on the end points and `inner` (points inside where f has an extremum).
    pub fn map(&self, f: impl Fn(f64) -> f64, inner: &[f64]) -> Interval {
        let mut out = self.clone();
        for (lo, hi) in out.lo.iter_mut().zip(out.hi.iter_mut()) {
            let mut values = vec![f(*lo), f(*hi)];
            values.extend(inner.iter().filter(|&&x| *lo < x && x < *hi).map(|&x| f(x)));
            *lo = values.iter().fold(f64::INFINITY, |a, &b| a.min(b));
            *hi = values.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        }
        out
    }

    /// Joins `v` to every channel's range.
    pub fn with(&self, v: f64) -> Interval {
        Interval {
            lo: self.lo.iter().map(|&l| l.min(v)).collect(),
            hi: self.hi.iter().map(|&h| h.max(v)).collect(),
        }
    }

    /// Channel by channel when both have as many channels (or one has one), else whole tensors.
    pub fn combine(&self, other: &Interval, op: impl Fn((f64, f64), (f64, f64)) -> (f64, f64)) -> Interval {
        let (a, b) = if self.lo.len() == other.lo.len() || self.lo.len() == 1 || other.lo.len() == 1 {
            (self.clone(), other.clone())
        } else {
            (self.whole(), other.whole())
        };
        let n = a.lo.len().max(b.lo.len());
        let at = |x: &Interval, i: usize| {
            let i = if x.lo.len() == 1 { 0 } else { i };
            (x.lo[i], x.hi[i])
        };
        let (lo, hi) = (0..n).map(|i| op(at(&a, i), at(&b, i))).unzip();
        Interval { lo, hi }
    }
}

pub fn add(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0 + b.0, a.1 + b.1)
}

pub fn sub(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0 - b.1, a.1 - b.0)
}

pub fn mul(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    let p = [a.0 * b.0, a.0 * b.1, a.1 * b.0, a.1 * b.1];
    (
        p.iter().fold(f64::INFINITY, |m, &v| m.min(v)),
        p.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v)),
    )
}

/// `[β − n·|γ|, β + n·|γ|]` per channel.
pub fn batchnorm_interval(record: &BatchNormRecord, sigmas: f64) -> Interval {
    let (lo, hi) = record
        .beta
        .iter()
        .zip(&record.gamma)
        .map(|(&b, &g)| {
            let half = sigmas * (g as f64).abs();
            (b as f64 - half, b as f64 + half)
        })
        .unzip();
    Interval { lo, hi }
}

/// The range of a constant operand: its own min and max.
fn constant_interval(graph: &Graph, name: &str) -> Option<Interval> {
    if graph.inputs.iter().any(|i| i.name() == name) {
        return None;
    }
    let v = tensor::values_f64(&graph.constants.get(name)?.tensor)?;
    if v.is_empty() || v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let lo = v.iter().fold(f64::INFINITY, |a, &b| a.min(b));
    let hi = v.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    Some(Interval::scalar(lo, hi))
}

fn hard_swish(x: f64) -> f64 {
    x * (x / 6.0 + 0.5).clamp(0.0, 1.0)
}

/// The output range of node `n`, from the ranges known so far; None when not derivable.
pub fn propagate(graph: &Graph, n: &Node, known: &BTreeMap<String, Interval>) -> Option<Interval> {
    if !n.is_default_domain() {
        return None;
    }
    let operand = |slot: usize| -> Option<Interval> {
        let name = n.inputs.get(slot).filter(|s| !s.is_empty())?;
        known.get(name).cloned().or_else(|| constant_interval(graph, name))
    };
    // The data input must be an activation with a range, not a constant.
    let x = n.inputs.first().and_then(|i| known.get(i)).cloned();
    // Bounded activations bound their output even when their input has no range.
    let bounded = |lo: f64, hi: f64, f: &dyn Fn(f64) -> f64| match &x {
        Some(x) => x.map(f, &[]),
        None => Interval::scalar(lo, hi),
    };
    match n.op_type.as_str() {
        "Relu" => Some(x?.map(|v| v.max(0.0), &[])),
        "Clip" => {
            let lo = graph.clip_bound(n, 1, "min").ok()?.unwrap_or(f64::NEG_INFINITY);
            let hi = graph.clip_bound(n, 2, "max").ok()?.unwrap_or(f64::INFINITY);
            if x.is_none() && !(lo.is_finite() && hi.is_finite()) {
                return None;
            }
            Some(bounded(lo, hi, &|v: f64| v.max(lo).min(hi)))
        }
        "LeakyRelu" => {
            let alpha = n.attr_float("alpha").unwrap_or(0.01) as f64;
            (alpha >= 0.0).then_some(())?;
            Some(x?.map(|v| if v >= 0.0 { v } else { alpha * v }, &[]))
        }
        "HardSigmoid" => {
            let (alpha, beta) = (
                n.attr_float("alpha").unwrap_or(0.2) as f64,
                n.attr_float("beta").unwrap_or(0.5) as f64,
            );
            Some(bounded(0.0, 1.0, &|v: f64| (alpha * v + beta).clamp(0.0, 1.0)))
        }
        "HardSwish" => Some(x?.map(hard_swish, &[-1.5])),
        "Sigmoid" => Some(bounded(0.0, 1.0, &|v: f64| 1.0 / (1.0 + (-v).exp()))),
        "Tanh" => Some(bounded(-1.0, 1.0, &f64::tanh)),
        "MaxPool" | "GlobalMaxPool" | "GlobalAveragePool" | "Identity" | "Dropout" => x,
        "AveragePool" => {
            let padded = n.attribute("pads").is_some_and(|a| a.ints.iter().any(|&p| p != 0))
                || n.attribute("auto_pad")
                    .is_some_and(|a| !matches!(a.s(), b"NOTSET" | b"VALID" | b""));
            x.map(|x| if padded { x.with(0.0) } else { x })
        }
        "Resize" | "Upsample" => {
            let nearest = n.attribute("mode").is_none_or(|a| a.s() == b"nearest");
            nearest.then_some(x?)
        }
        "Pad" => {
            let mode = n.attribute("mode").map_or(b"constant".to_vec(), |a| a.s().to_vec());
            if mode != b"constant" {
                return x;
            }
            let value = match n.inputs.get(2).filter(|s| !s.is_empty()) {
                Some(name) => graph.constant_scalar(name)?,
                None => n.attr_float("value").unwrap_or(0.0) as f64,
            };
            Some(x?.with(value))
        }
        "Reshape" | "Flatten" | "Transpose" | "Squeeze" | "Unsqueeze" => Some(x?.whole()),
        "Add" | "Sub" | "Mul" => {
            let (a, b) = (operand(0)?, operand(1)?);
            // Both constant: not an activation.
            if !n.inputs.iter().any(|i| known.contains_key(i)) {
                return None;
            }
            let op = match n.op_type.as_str() {
                "Add" => add,
                "Sub" => sub,
                _ => mul,
            };
            Some(a.combine(&b, op))
        }
        // By a constant that excludes 0 (HardSwish exported as x·Clip(x + 3, 0, 6) / 6).
        "Div" => {
            let name = n.inputs.get(1)?;
            let d = constant_interval(graph, name).filter(|_| !known.contains_key(name))?;
            let (lo, hi) = d.hull();
            (lo > 0.0 || hi < 0.0).then_some(())?;
            Some(x?.combine(&Interval::scalar(1.0 / hi, 1.0 / lo), mul))
        }
        "Concat" => {
            let parts: Vec<Interval> = n.inputs.iter().map(|i| known.get(i).cloned()).collect::<Option<_>>()?;
            let axis = n.attribute("axis").map_or(1, |a| a.i());
            if axis == 1 && parts.iter().all(|p| p.lo.len() > 1) {
                Some(Interval {
                    lo: parts.iter().flat_map(|p| p.lo.clone()).collect(),
                    hi: parts.iter().flat_map(|p| p.hi.clone()).collect(),
                })
            } else {
                let hulls: Vec<(f64, f64)> = parts.iter().map(Interval::hull).collect();
                Some(Interval::scalar(
                    hulls.iter().fold(f64::INFINITY, |a, h| a.min(h.0)),
                    hulls.iter().fold(f64::NEG_INFINITY, |a, h| a.max(h.1)),
                ))
            }
        }
        _ => None,
    }
}

/// Statistics holding exactly `[lo, hi]` for every calibration method: `UNIFORM_POINTS` values
/// evenly spread over the range (so the histogram is uniform), as one sample.
pub fn uniform_stats(lo: f32, hi: f32) -> Result<TensorStats> {
    if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
        return Err(Error::Graph(format!(
            "data-free range [{lo}, {hi}] is not a finite interval"
        )));
    }
    let step = (hi as f64 - lo as f64) / (UNIFORM_POINTS - 1) as f64;
    let mut values: Vec<f32> = (0..UNIFORM_POINTS)
        .map(|i| (lo as f64 + step * i as f64) as f32)
        .collect();
    // The end points exactly (f32 rounding of the last step could miss `hi`).
    values[0] = lo;
    values[UNIFORM_POINTS - 1] = hi;
    let mut s = TensorStats::default();
    s.observe(0, &values, &[UNIFORM_POINTS])
        .map_err(|e| Error::Graph(format!("data-free range [{lo}, {hi}]: {e}")))?;
    // Not the tensor's shape.
    s.sample_shape = None;
    Ok(s)
}

/// Activation statistics without data (module docs): every folded layer's output from its
/// BatchNorm record with `sigmas` standard deviations, propagated forward in topological order.
pub fn stats_from_batchnorm(model: &Model, records: &[BatchNormRecord], sigmas: f32) -> Result<CalibrationStats> {
    if !(sigmas.is_finite() && sigmas > 0.0) {
        return Err(Error::Usage(format!(
            "data-free ranges need a positive number of standard deviations, not {sigmas}"
        )));
    }
    let graph = &model.graph;
    let mut known: BTreeMap<String, Interval> = BTreeMap::new();
    for ix in graph.topological_order()? {
        let n = &graph.nodes[ix];
        let Some(out) = n.outputs.first().filter(|o| !o.is_empty()) else {
            continue;
        };
        let range = match records.iter().find(|r| &r.output == out) {
            Some(r) => Some(batchnorm_interval(r, sigmas as f64)),
            None => propagate(graph, n, &known),
        };
        if let Some(r) = range.filter(|r| r.lo.iter().chain(&r.hi).all(|v| v.is_finite())) {
            known.insert(out.clone(), r);
        }
    }
    let mut tensors = BTreeMap::new();
    for (name, interval) in &known {
        let (lo, hi) = interval.hull();
        tensors.insert(name.clone(), uniform_stats(lo as f32, hi as f32)?);
    }
    let (graph_fp, weights_fp) = model_fingerprint(model);
    Ok(CalibrationStats {
        format: STATS_FORMAT,
        fingerprint: Fingerprint {
            graph: graph_fp,
            weights: weights_fp,
            data: vec![crate::calib::stats::DATA_FREE.to_string()],
        },
        samples: 0,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::observers::Method;

    #[test]
    fn interval_arithmetic() {
        assert_eq!(add((1.0, 2.0), (-3.0, 5.0)), (-2.0, 7.0));
        assert_eq!(sub((1.0, 2.0), (-3.0, 5.0)), (-4.0, 5.0));
        assert_eq!(mul((-1.0, 2.0), (-3.0, 5.0)), (-6.0, 10.0));
        // Per channel against a scalar, then per channel against per channel.
        let a = Interval {
            lo: vec![-1.0, 0.0],
            hi: vec![1.0, 4.0],
        };
        let s = Interval::scalar(2.0, 3.0);
        assert_eq!(
            a.combine(&s, mul),
            Interval {
                lo: vec![-3.0, 0.0],
                hi: vec![3.0, 12.0]
            }
        );
        assert_eq!(
            a.combine(&a, add),
            Interval {
                lo: vec![-2.0, 0.0],
                hi: vec![2.0, 8.0]
            }
        );
        // Channel counts that disagree: whole tensors, [−1, 4] + [0, 1].
        let three = Interval {
            lo: vec![0.0; 3],
            hi: vec![1.0; 3],
        };
        assert_eq!(a.combine(&three, add), Interval::scalar(-1.0, 5.0));
    }

    #[test]
    fn activations_map_end_points_and_extrema() {
        let x = Interval {
            lo: vec![-4.0, 1.0],
            hi: vec![-2.0, 8.0],
        };
        // Relu6 as Clip(0, 6).
        let relu6 = x.map(|v| v.clamp(0.0, 6.0), &[]);
        assert_eq!(relu6.lo, [0.0, 1.0]);
        assert_eq!(relu6.hi, [0.0, 6.0]);
        // HardSwish on [−4, −2] contains its minimum at −1.5? No: f(−4) = 0, f(−2) = −2·(1/6) =
        // −1/3. On [−2, 1]: f(−1.5) = −0.375 is the minimum, f(1) = 2/3 the maximum.
        let h = x.map(hard_swish, &[-1.5]);
        assert!((h.lo[0] + 1.0 / 3.0).abs() < 1e-12 && h.hi[0] == 0.0, "{h:?}");
        let y = Interval::scalar(-2.0, 1.0).map(hard_swish, &[-1.5]);
        assert!(
            (y.lo[0] + 0.375).abs() < 1e-12 && (y.hi[0] - 2.0 / 3.0).abs() < 1e-12,
            "{y:?}"
        );
        // Zero padding joins 0.
        assert_eq!(Interval::scalar(1.0, 2.0).with(0.0), Interval::scalar(0.0, 2.0));
    }

    #[test]
    fn batchnorm_range_and_uniform_stats() {
        let r = BatchNormRecord {
            output: "y".into(),
            weight: "w".into(),
            gamma: vec![0.5, -1.0],
            beta: vec![1.0, 0.0],
            mean: vec![0.0; 2],
            var: vec![1.0; 2],
            epsilon: 1e-5,
        };
        // β ± 6|γ|: [−2, 4] and [−6, 6].
        let i = batchnorm_interval(&r, 6.0);
        assert_eq!(i.lo, [-2.0, -6.0]);
        assert_eq!(i.hi, [4.0, 6.0]);
        let s = uniform_stats(-2.0, 6.0).unwrap();
        for method in [
            Method::MinMax,
            Method::Ema { constant: 0.01 },
            Method::Percentile { percentile: 100.0 },
        ] {
            assert_eq!(s.range(&method), (-2.0, 6.0), "{method:?}");
        }
        // Percentile 99 of a uniform |x| on [0, 6] (|x| ≤ 2 twice as dense): about 5.92.
        let (lo, hi) = s.range(&Method::Percentile { percentile: 99.0 });
        assert_eq!(lo, -2.0);
        assert!((hi - 5.92).abs() < 0.02, "{hi}");
        assert!(uniform_stats(1.0, f32::NAN).is_err());
    }
}
