//! `adaround`: learned weight rounding (Nagel et al., "Up or Down? Adaptive Rounding for
//! Post-Training Quantization", ICML 2020). Rounding each weight to its nearest grid point
//! minimises the weight error, not the layer's output error; AdaRound learns, for every weight of
//! a Conv, Gemm or MatMul the plan quantizes, whether it goes down or up, so that the layer's
//! output on its calibration inputs changes least.
//!
//! Maths. A weight `w` on the plan's grid (scale `s`, zero point `z`, integer range
//! `[qmin, qmax]`) has the soft value `w̃ = s·(clamp(⌊w/s⌋ + z + h(v), qmin, qmax) − z)` with the
//! rectified sigmoid `h(v) = clamp(σ(v)(ζ − γ) + γ, 0, 1)`, `ζ = 1.1`, `γ = −0.1`; `v` starts
//! where `h(v)` is the fractional part of `w/s` (so `w̃ = w`). For one output row (an output
//! channel's `d` weights, laid out as in gptq) and the Gram matrix `G = E[x xᵀ]` of the layer's
//! float input vectors `x` (Conv: the im2col patches of the row's group; Gemm/MatMul: the rows of
//! A) — the `H` gptq collects, divided by the number of vectors — the loss is
//!
//! `L(v) = (w̃ − w) G (w̃ − w)ᵀ + λ Σ (1 − |2h(v) − 1|^β)`,
//!
//! the expected squared output error `E‖(w̃ − w)·x‖²` plus a regulariser that pushes every `h`
//! to 0 or 1. Its gradient is closed-form: `∂L/∂w̃ = 2 (w̃ − w) G`, `∂w̃/∂h = s` (0 where the
//! clamp to the range holds the value), `∂h/∂v = (ζ − γ) σ(v)(1 − σ(v))` inside `(0, 1)` and 0
//! where `h` is clipped, and the regulariser's `−2λβ |2h − 1|^(β−1) sign(2h − 1)`. So an
//! iteration costs `d²` per row whatever the number of samples. Adam (β₁ 0.9, β₂ 0.999, a fixed
//! learning rate) runs `iterations` steps; the regulariser is off for the first `warmup`
//! fraction of them, then `β` falls linearly from `beta_start` to `beta_end` (the paper's
//! schedule: λ 0.01, 20% warm-up, β 20 → 2). At the end a weight goes up where `h(v) ≥ 0.5`.
//! Rows are independent: they are optimised in fixed blocks of [`ROWS_PER_TASK`] in parallel,
//! each block's arithmetic the same whichever thread runs it, so the result does not depend on
//! the thread count.
//!
//! What this does not do (the paper's further steps): the input is the float model's, not the
//! one with the earlier layers already quantized, and a Relu after the layer is not applied to
//! the reconstruction (that would need the samples, not only `G`).
//!
//! The grid is the plan's, as with gptq: scales and zero points are unchanged, only which of the
//! two neighbouring grid points each weight takes; the choice goes into `Plan::rounded`. The
//! layers, their statistics and what is skipped (FP8 weights, shared weights, too few input
//! vectors per column, more than 256 columns, ...) are gptq's ([`gptq::measure_layers`]); a
//! layer where the learned rounding does not lower the output error on the calibration data
//! keeps nearest rounding.

use rayon::prelude::*;
use tract_onnx::prelude::tract_ndarray::{linalg::general_mat_mul, Array2};

use super::gptq::{self, Target};
use super::{Context, Pass};
use crate::calib::source::DataSource;
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::quant::params::QuantizedTensor;
use crate::quant::plan::Plan;
use crate::runtime::Engine;

/// The rectified sigmoid's stretch: `h = clamp(σ(v)(ζ − γ) + γ, 0, 1)`.
const ZETA: f32 = 1.1;
const GAMMA: f32 = -0.1;
/// Rows optimised together (one matrix product per iteration): a fixed split, so the result
/// does not depend on the thread count.
const ROWS_PER_TASK: usize = 16;
const ADAM_BETA1: f32 = 0.9;
const ADAM_BETA2: f32 = 0.999;
const ADAM_EPSILON: f32 = 1e-8;

/// The pass's options (`passes: [{adaround: {iterations: 2000}}]`).
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Adam steps per layer.
    pub iterations: usize,
    /// Adam's (fixed) learning rate on `v`.
    pub learning_rate: f64,
    /// λ, the weight of the rounding regulariser.
    pub regularization: f64,
    /// Fraction of the iterations before the regulariser starts.
    pub warmup: f64,
    /// β of the regulariser when it starts, and at the last iteration.
    pub beta_start: f64,
    pub beta_end: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            iterations: 1000,
            learning_rate: 0.01,
            regularization: 0.01,
            warmup: 0.2,
            beta_start: 20.0,
            beta_end: 2.0,
        }
    }
}

impl Options {
    fn check(&self) -> std::result::Result<(), String> {
        let bad = |what: &str, v: f64| Err(format!("pass `adaround`: {what}, not {v}"));
        if self.iterations == 0 {
            return Err("pass `adaround`: iterations must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate must be a positive number", self.learning_rate);
        }
        if !(self.regularization.is_finite() && self.regularization >= 0.0) {
            return bad("regularization must be a number ≥ 0", self.regularization);
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return bad("warmup must be in [0, 1)", self.warmup);
        }
        if !(self.beta_end.is_finite() && self.beta_end >= 1.0) {
            return bad("beta_end must be a number ≥ 1", self.beta_end);
        }
        if !(self.beta_start.is_finite() && self.beta_start >= self.beta_end) {
            return bad("beta_start must be a number ≥ beta_end", self.beta_start);
        }
        Ok(())
    }

    /// The regulariser's β at iteration `t`, None during the warm-up.
    fn beta(&self, t: usize) -> Option<f32> {
        let warm = (self.warmup * self.iterations as f64) as usize;
        if t < warm {
            return None;
        }
        let progress = (t - warm) as f64 / (self.iterations - warm) as f64;
        Some((self.beta_end + (self.beta_start - self.beta_end) * (1.0 - progress)) as f32)
    }
}

#[derive(Default)]
pub struct AdaRound {
    options: Options,
}

impl Pass for AdaRound {
    fn name(&self) -> &'static str {
        "adaround"
    }

    fn phase(&self) -> super::Phase {
        super::Phase::Plan
    }

    fn requires(&self) -> &'static [super::Requirement] {
        &[super::Requirement::CalibrationData(
            "learns the weight rounding from the layers' inputs (it has no data-free mode)",
        )]
    }

    fn configure(&mut self, options: &serde_yaml::Value) -> std::result::Result<(), String> {
        let o: Options = super::parse_options("adaround", options)?;
        o.check()?;
        self.options = o;
        Ok(())
    }

    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        gptq::learn_from_layer_inputs(
            "adaround",
            "it learns the rounding from the layers' inputs",
            model,
            ctx,
            |model, plan, source, measured, engine| {
                apply_measured(model, plan, source, measured, &self.options, engine)
            },
        )
    }
}

/// Learns the rounding of every weight the plan quantizes that adaround applies to, from the
/// calibration data (module docs), and records it in `plan.rounded`. Returns one note per layer.
pub fn apply(model: &Model, plan: &mut Plan, source: &DataSource, options: &Options) -> Result<Vec<String>> {
    apply_measured(model, plan, source, None, options, Engine::Tract)
}

/// [`apply`], with the layer statistics calibration's run measured when it did (`measured`).
pub fn apply_measured(
    model: &Model,
    plan: &mut Plan,
    source: &DataSource,
    measured: Option<gptq::Measured>,
    options: &Options,
    engine: Engine,
) -> Result<Vec<String>> {
    options.check().map_err(Error::Graph)?;
    let layers = gptq::measure_layers(model, plan, source, measured, "adaround", engine)?;
    let mut notes = layers.skipped.clone();
    let mut rounded = Vec::new();
    let total = layers.measured.len();
    let started = std::time::Instant::now();
    for (k, (t, gram)) in layers.measured.iter().enumerate() {
        let (weights, nearest, qrange) = gptq::layer_weights(&model.graph, plan, t)?;
        let (values, note) = round_layer(t, gram, &weights, &nearest, qrange, options);
        match values {
            Some(values) => {
                gptq::record_rounding(plan, t, values);
                rounded.push(note);
            }
            None => notes.push(note),
        }
        let step = total.div_ceil(10).max(1);
        if (k + 1) % step == 0 || k + 1 == total {
            eprintln!(
                "adaround: {}/{total} layers, {:.1} s ({} iterations each)",
                k + 1,
                started.elapsed().as_secs_f64(),
                options.iterations
            );
        }
    }
    let mut out = vec![
        format!(
            "adaround: {} weights rounded, {} kept nearest rounding",
            rounded.len(),
            notes.len()
        ),
        layers.provenance("adaround"),
    ];
    out.extend(rounded);
    out.extend(notes);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// the optimisation

/// One weight on its grid.
#[derive(Clone, Copy, Debug)]
struct Element {
    w: f32,
    scale: f32,
    zero_point: i32,
    /// `⌊w/s⌋ + z`, the grid point below (or, when not `free`, the only value it can take).
    low: i32,
    /// Whether both `low` and `low + 1` are in the range (else the value is `low`, clamped).
    free: bool,
    /// `w/s − ⌊w/s⌋`.
    fraction: f32,
}

impl Element {
    fn new(w: f32, scale: f32, zero_point: i32, nearest: i32, (qmin, qmax): (i32, i32)) -> Element {
        let x = w / scale;
        if !x.is_finite() {
            return Element {
                w,
                scale,
                zero_point,
                low: nearest,
                free: false,
                fraction: 0.0,
            };
        }
        let floor = x.floor();
        let low = (floor as f64 + zero_point as f64).clamp(i32::MIN as f64, i32::MAX as f64) as i32;
        let free = low >= qmin && low < qmax;
        Element {
            w,
            scale,
            zero_point,
            low: if free { low } else { low.clamp(qmin, qmax) },
            free,
            fraction: x - floor,
        }
    }

    /// `w̃ − w` for the soft value `h` (ignored when not free).
    fn delta(&self, h: f32) -> f32 {
        let q = if self.free {
            self.low as f32 + h
        } else {
            self.low as f32
        };
        self.scale * (q - self.zero_point as f32) - self.w
    }
}

/// `h(v)` and `∂h/∂v`.
fn rectified_sigmoid(v: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-v).exp());
    let raw = s * (ZETA - GAMMA) + GAMMA;
    if raw <= 0.0 {
        (0.0, 0.0)
    } else if raw >= 1.0 {
        (1.0, 0.0)
    } else {
        (raw, (ZETA - GAMMA) * s * (1.0 - s))
    }
}

/// The `v` where `h(v) = fraction` (fraction in [0, 1)).
fn initial_v(fraction: f32) -> f32 {
    let s = ((fraction - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1.0 - 1e-6);
    (s / (1.0 - s)).ln()
}

/// A block of rows sharing one `G`: `rows × d` elements, row-major.
struct Block {
    elements: Vec<Element>,
    rows: usize,
    columns: usize,
}

impl Block {
    /// The gradient of the loss at `v` into `grad` (β: the regulariser's, None when off);
    /// `delta` and `product` are scratch of `rows × d`.
    fn gradient(
        &self,
        v: &[f32],
        g: &Array2<f32>,
        beta: Option<f32>,
        lambda: f32,
        delta: &mut Array2<f32>,
        product: &mut Array2<f32>,
        grad: &mut [f32],
    ) {
        let d = delta.as_slice_mut().expect("a standard layout");
        let mut slope = vec![0f32; v.len()];
        let mut hs = vec![0f32; v.len()];
        for (i, e) in self.elements.iter().enumerate() {
            let (h, dh) = if e.free { rectified_sigmoid(v[i]) } else { (0.0, 0.0) };
            d[i] = e.delta(h);
            hs[i] = h;
            slope[i] = dh;
        }
        // ∂/∂w̃ of the reconstruction: 2 (w̃ − w) G (G symmetric).
        general_mat_mul(2.0, &*delta, g, 0.0, product);
        let p = product.as_slice().expect("a standard layout");
        for (i, e) in self.elements.iter().enumerate() {
            if !e.free || slope[i] == 0.0 {
                grad[i] = 0.0;
                continue;
            }
            let mut dh = p[i] * e.scale;
            if let Some(beta) = beta {
                let u = 2.0 * hs[i] - 1.0;
                if u != 0.0 {
                    dh -= lambda * 2.0 * beta * u.abs().powf(beta - 1.0) * u.signum();
                }
            }
            grad[i] = dh * slope[i];
        }
    }

    /// The loss at `v` (for the gradient test).
    #[cfg(test)]
    fn loss(&self, v: &[f32], g: &Array2<f32>, beta: Option<f32>, lambda: f32) -> f64 {
        let hs: Vec<f32> = self
            .elements
            .iter()
            .zip(v)
            .map(|(e, &v)| if e.free { rectified_sigmoid(v).0 } else { 0.0 })
            .collect();
        let delta: Vec<f64> = self.elements.iter().zip(&hs).map(|(e, &h)| e.delta(h) as f64).collect();
        let mut loss = 0.0;
        for r in 0..self.rows {
            let row = &delta[r * self.columns..][..self.columns];
            for i in 0..self.columns {
                for j in 0..self.columns {
                    loss += row[i] * g[[i, j]] as f64 * row[j];
                }
            }
        }
        if let Some(beta) = beta {
            for (e, &h) in self.elements.iter().zip(&hs) {
                if e.free {
                    loss += lambda as f64 * (1.0 - ((2.0 * h as f64 - 1.0).abs()).powf(beta as f64));
                }
            }
        }
        loss
    }

    /// Runs Adam on `v` and returns each element's integer: `low + 1` where `h(v) ≥ 0.5`.
    fn optimise(&self, g: &Array2<f32>, options: &Options) -> Vec<i32> {
        let n = self.elements.len();
        let mut v: Vec<f32> = self.elements.iter().map(|e| initial_v(e.fraction)).collect();
        let (mut m, mut s, mut grad) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let mut delta = Array2::<f32>::zeros((self.rows, self.columns));
        let mut product = Array2::<f32>::zeros((self.rows, self.columns));
        let (lr, lambda) = (options.learning_rate as f32, options.regularization as f32);
        let (mut decay1, mut decay2) = (1f32, 1f32);
        for t in 0..options.iterations {
            self.gradient(&v, g, options.beta(t), lambda, &mut delta, &mut product, &mut grad);
            decay1 *= ADAM_BETA1;
            decay2 *= ADAM_BETA2;
            let (c1, c2) = (1.0 - decay1, 1.0 - decay2);
            for i in 0..n {
                if !self.elements[i].free {
                    continue;
                }
                m[i] = ADAM_BETA1 * m[i] + (1.0 - ADAM_BETA1) * grad[i];
                s[i] = ADAM_BETA2 * s[i] + (1.0 - ADAM_BETA2) * grad[i] * grad[i];
                v[i] -= lr * (m[i] / c1) / ((s[i] / c2).sqrt() + ADAM_EPSILON);
            }
        }
        self.elements
            .iter()
            .zip(&v)
            .map(|(e, &v)| {
                if e.free && rectified_sigmoid(v).0 >= 0.5 {
                    e.low + 1
                } else {
                    e.low
                }
            })
            .collect()
    }
}

/// Result of one layer: the chosen integers (None: keep nearest) and the note.
fn round_layer(
    t: &Target,
    gram: &gptq::Gram,
    weights: &[f32],
    nearest: &QuantizedTensor,
    qrange: (i32, i32),
    options: &Options,
) -> (Option<Vec<i32>>, String) {
    let vectors = gram.rows.max(1) as f64;
    // G = E[x xᵀ] per group, in f32 for the iterations.
    let mean: Vec<Array2<f32>> = gram
        .per_group
        .iter()
        .map(|h| h.mapv(|x| (x / vectors) as f32))
        .collect();
    if mean.iter().any(|g| g.iter().any(|x| !x.is_finite())) {
        return (
            None,
            format!(
                "nearest rounding {}: the Gram matrix of its inputs is not finite",
                t.label
            ),
        );
    }
    // Fixed blocks of rows within each group.
    let tasks: Vec<(usize, usize, usize)> = (0..t.groups)
        .flat_map(|g| {
            (0..t.rows_per_group)
                .step_by(ROWS_PER_TASK)
                .map(move |r| (g, r, (r + ROWS_PER_TASK).min(t.rows_per_group)))
        })
        .collect();
    type TaskResult = (Vec<usize>, Vec<i32>, f64, f64);
    let results: Vec<TaskResult> = tasks
        .par_iter()
        .map(|&(g, start, end)| {
            let mut index = Vec::with_capacity((end - start) * t.columns);
            for r in start..end {
                let row = g * t.rows_per_group + r;
                index.extend((0..t.columns).map(|c| t.flat_index(row, c)));
            }
            let elements: Vec<Element> = index
                .iter()
                .map(|&i| {
                    let p = nearest.params_of(i);
                    Element::new(weights[i], p.scale, p.zero_point, nearest.values[i], qrange)
                })
                .collect();
            let block = Block {
                elements,
                rows: end - start,
                columns: t.columns,
            };
            let chosen = block.optimise(&mean[g], options);
            // Output errors of nearest and of the chosen rounding, on H (f64), as gptq measures.
            let h = &gram.per_group[g];
            let (mut near, mut ours) = (0.0, 0.0);
            for r in 0..block.rows {
                let at = r * t.columns..(r + 1) * t.columns;
                let error = |q: &dyn Fn(usize) -> i32| -> f64 {
                    let delta: Vec<f64> = index[at.clone()]
                        .iter()
                        .enumerate()
                        .map(|(k, &i)| {
                            let p = nearest.params_of(i);
                            crate::quant::params::dequantize(q(at.start + k), p) as f64 - weights[i] as f64
                        })
                        .collect();
                    gptq::output_error(&delta, h)
                };
                near += error(&|k| nearest.values[index[k]]);
                ours += error(&|k| chosen[k]);
            }
            (index, chosen, near, ours)
        })
        .collect();
    let (mut error_nearest, mut error_ours) = (0.0, 0.0);
    let mut values = nearest.values.clone();
    for (index, chosen, near, ours) in results {
        error_nearest += near;
        error_ours += ours;
        for (i, q) in index.into_iter().zip(chosen) {
            values[i] = q;
        }
    }
    if error_ours >= error_nearest {
        return (
            None,
            format!(
                "nearest rounding {}: AdaRound did not lower the output error on the calibration data",
                t.label
            ),
        );
    }
    let ratio = if error_nearest > 0.0 {
        error_ours / error_nearest
    } else {
        0.0
    };
    (
        Some(values),
        format!(
            "rounded {} ({} columns, {} input vectors): output error {:.3}× nearest rounding's",
            t.label, t.columns, gram.rows, ratio
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A correlated `G` (`x` = a shared factor plus a little noise per column, so neighbouring
    /// columns are nearly equal inputs) and weights off the grid, seeded.
    fn problem(rows: usize, columns: usize, seed: u64) -> (Array2<f32>, Vec<f32>) {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) as f32
        };
        let samples = 400;
        let mut x = Array2::<f32>::zeros((samples, columns));
        for s in 0..samples {
            let shared = next() * 2.0 - 1.0;
            for c in 0..columns {
                x[[s, c]] = shared + 0.1 * (next() * 2.0 - 1.0) + 0.05 * c as f32;
            }
        }
        let g = x.t().dot(&x).mapv(|v| v / samples as f32);
        let w: Vec<f32> = (0..rows * columns).map(|_| (next() * 2.0 - 1.0) * 0.5).collect();
        (g, w)
    }

    fn block(w: &[f32], scale: f32, rows: usize, columns: usize, qrange: (i32, i32)) -> Block {
        let elements = w
            .iter()
            .map(|&w| {
                let nearest = (w / scale).round_ties_even() as i32;
                Element::new(w, scale, 0, nearest, qrange)
            })
            .collect();
        Block {
            elements,
            rows,
            columns,
        }
    }

    fn error(values: &[i32], w: &[f32], scale: f32, g: &Array2<f32>, columns: usize) -> f64 {
        let mut e = 0.0;
        for (row_q, row_w) in values.chunks(columns).zip(w.chunks(columns)) {
            let d: Vec<f64> = row_q
                .iter()
                .zip(row_w)
                .map(|(&q, &w)| (q as f32 * scale - w) as f64)
                .collect();
            for i in 0..columns {
                for j in 0..columns {
                    e += d[i] * g[[i, j]] as f64 * d[j];
                }
            }
        }
        e
    }

    #[test]
    fn adaround_lowers_the_output_error_with_floor_or_ceiling_only() {
        let (rows, columns, scale, qrange) = (6, 12, 0.1f32, (-7, 7));
        let (g, w) = problem(rows, columns, 5);
        let b = block(&w, scale, rows, columns, qrange);
        let ours = b.optimise(&g, &Options::default());
        let nearest: Vec<i32> = w.iter().map(|&w| (w / scale).round_ties_even() as i32).collect();
        for (&q, &w) in ours.iter().zip(&w) {
            let floor = (w / scale).floor() as i32;
            assert!(q == floor || q == floor + 1, "{q} for w/s = {}", w / scale);
        }
        let (e_near, e_ours) = (
            error(&nearest, &w, scale, &g, columns),
            error(&ours, &w, scale, &g, columns),
        );
        assert_ne!(ours, nearest, "nothing changed");
        assert!(e_ours < 0.5 * e_near, "adaround {e_ours:.4e}, nearest {e_near:.4e}");
    }

    #[test]
    fn the_range_bounds_the_choice() {
        // w/s = 7.4 with qmax 7: only 7; w/s = -8.6 with qmin -7: only -7.
        let e = Element::new(0.74, 0.1, 0, 7, (-7, 7));
        assert!(!e.free && e.low == 7);
        let e = Element::new(-0.86, 0.1, 0, -7, (-7, 7));
        assert!(!e.free && e.low == -7);
        let e = Element::new(0.66, 0.1, 0, 7, (-7, 7));
        assert!(e.free && e.low == 6 && (e.fraction - 0.6).abs() < 1e-4);
        // With a zero point, the grid point below is ⌊w/s⌋ + z.
        let e = Element::new(0.25, 0.1, 128, 130, (0, 255));
        assert!(e.free && e.low == 130 && (e.delta(0.5) - 0.0).abs() < 1e-6);
    }

    #[test]
    fn the_initial_soft_weight_is_the_float_weight() {
        for f in [0.0f32, 0.1, 0.5, 0.93] {
            let (h, _) = rectified_sigmoid(initial_v(f));
            assert!((h - f).abs() < 1e-5, "{f}: {h}");
        }
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let (rows, columns, scale) = (2, 5, 0.1f32);
        let (g, w) = problem(rows, columns, 9);
        let b = block(&w, scale, rows, columns, (-7, 7));
        // Away from the clipped ends of h so that the loss is smooth around each v.
        let v: Vec<f32> = (0..rows * columns).map(|i| -1.5 + 0.3 * i as f32).collect();
        for beta in [None, Some(3.0f32)] {
            let mut grad = vec![0f32; v.len()];
            let mut delta = Array2::zeros((rows, columns));
            let mut product = Array2::zeros((rows, columns));
            b.gradient(&v, &g, beta, 0.01, &mut delta, &mut product, &mut grad);
            for i in 0..v.len() {
                let step = 1e-2f32;
                let (mut up, mut down) = (v.clone(), v.clone());
                up[i] += step;
                down[i] -= step;
                let numeric = (b.loss(&up, &g, beta, 0.01) - b.loss(&down, &g, beta, 0.01)) / (2.0 * step as f64);
                let tolerance = 1e-3 * numeric.abs().max(1e-3) + 2e-5;
                assert!(
                    (grad[i] as f64 - numeric).abs() < tolerance.max(0.02 * numeric.abs()),
                    "{beta:?} element {i}: closed form {}, finite differences {numeric}",
                    grad[i]
                );
            }
            assert!(grad.iter().any(|&x| x != 0.0));
        }
    }

    #[test]
    fn options_are_checked() {
        let mut pass = AdaRound::default();
        let bad = |yaml: &str, want: &str| {
            let mut pass = AdaRound::default();
            let e = pass.configure(&serde_yaml::from_str(yaml).unwrap()).unwrap_err();
            assert!(e.contains(want), "{yaml}: {e}");
        };
        bad("{iterations: 0}", "iterations must be at least 1");
        bad("{learning_rate: -1}", "learning_rate must be a positive number");
        bad("{warmup: 1.0}", "warmup must be in [0, 1)");
        bad("{beta_start: 1.5}", "beta_start must be a number ≥ beta_end");
        bad("{iteration: 10}", "unknown field `iteration`");
        pass.configure(&serde_yaml::from_str("{iterations: 10, learning_rate: 0.1}").unwrap())
            .unwrap();
        assert_eq!(pass.options.iterations, 10);
        assert_eq!(pass.options.regularization, 0.01);
        let o = Options::default();
        assert_eq!(o.beta(0), None);
        assert_eq!(o.beta(199), None);
        assert_eq!(o.beta(200), Some(20.0));
        assert!((o.beta(999).unwrap() - 2.0225).abs() < 1e-4);
    }
}
