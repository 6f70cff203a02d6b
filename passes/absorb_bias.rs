//! `absorb_bias`: high-bias absorption (Nagel et al., "Data-Free Quantization Through Weight
//! Equalization and Bias Correction", ICCV 2019, §4.2). Equalisation can leave a layer with large
//! biases, hence wide activation ranges; part of a bias that the following ReLU lets through
//! unchanged can be moved into the next layer's bias.
//!
//! Maths. For `y = W2 · relu(x) + b2` with `x = W1 · in + b1`, and per channel `c_i ≥ 0`:
//! `relu(x − c) = relu(x) − c` wherever `x ≥ c`, so with `b1 ← b1 − c` and `b2 ← b2 + W2·c`
//! (for output channel `o`: `Σ_i Σ_k W2[o, i, k]·c_i` over the input channels `i` of its group and
//! the kernel taps `k`; a depthwise layer 2 per channel; a Gemm: `C2 += (alpha2/beta2)·c·B2`, and
//! `C1 −= c/beta1`) the output is unchanged wherever `x ≥ c`. With the BatchNorm statistics of
//! layer 1 (its output modelled as `N(β_i, γ_i²)`, from the record `fold_batchnorm` left),
//! `c_i = max(0, β_i − n·|γ_i|)` with `n = 6` by default (option `sigmas`; the paper's 3 leaves
//! 0.135% of the normal below `c`, and real inputs stray further from the BatchNorm statistics
//! than that: see `DEFAULT_SIGMAS`): `x_i ≥ c_i` for all but ~1e-9 of that normal. Elsewhere (and
//! for inputs off the BN statistics) the output changes, by at most `W2·c` per output. Where layer
//! 2 reads its input zero-padded (its own pads, or a Pad(0) between), the padded taps would be
//! compensated for a `c` that is not there and border outputs would shift by their `W2·c`: such
//! pairs are skipped unless the option `padded: absorb` is set (the notes then say so).
//!
//! Pairs: layer 1 (Conv, Gemm) → exactly one Relu (a Clip with min 0 and no max counts), possibly
//! with Pad (constant 0, channel axis untouched; see padding above) and MaxPool (which commutes
//! with a per-channel shift) → layer 2; every intermediate with one
//! reader and not a graph output; weights and biases f32 constants no other node reads (a missing
//! bias is created as `<weight>::bias`). Same walk as `equalize` (see there). Layer 1 needs a
//! BatchNorm record keyed by its output tensor; without one the pair is skipped with the reason
//! (absorption from calibration statistics is not done here). After absorption the record's β
//! is lowered by `c`, so it keeps describing the layer output.
//!
//! Options: `padded: skip | absorb` (default skip), `sigmas` (default 6). Unknown options are
//! errors.

use super::equalize::{find_link, plural, Kind, Layer, LayerValues, Link, Rejected, Walk};
use super::rewritable::f32_tensor;
use super::{Context, Pass};
use crate::error::{Error, Result};
use crate::ir::dump::fmt_float;
use crate::ir::BatchNormRecord;
use crate::ir::{ops, tensor};
use crate::ir::{Constant, ConstantOrigin, Graph, Model};
use crate::proto::tensor_proto::DataType;
use crate::proto::TensorProto;

#[derive(Default)]
pub struct AbsorbBias {
    options: Options,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padded {
    /// Skip a layer 2 that reads its input zero-padded (float-preserving up to the 0.135% tail).
    #[default]
    Skip,
    /// Absorb anyway: its border outputs shift by the W2·c of the padded taps.
    Absorb,
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    pub padded: Padded,
    /// `c = max(0, β − sigmas·|γ|)`.
    pub sigmas: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            padded: Padded::Skip,
            sigmas: DEFAULT_SIGMAS,
        }
    }
}

/// The paper's 3σ leaves 0.135% of a normal below `c`, but BatchNorm statistics are population
/// estimates: on ppocr_mobile_v2_cls's eval data 3σ moves the float output by 39% (relative max,
/// 23 dB SQNR against the original), 6σ leaves it unchanged.
pub const DEFAULT_SIGMAS: f64 = 6.0;

/// A pair to absorb across, with the amounts.
struct Absorption {
    link: Link,
    /// `c_i`, per channel between the layers.
    c: Vec<f64>,
    /// The shift of layer 2's bias, per output channel (already divided by Gemm's beta).
    shift2: Vec<f64>,
    /// Whether layer 2's input is zero-padded (own pads or a Pad between).
    padded: bool,
    sigmas: f64,
}

impl Pass for AbsorbBias {
    fn name(&self) -> &'static str {
        "absorb_bias"
    }

    fn configure(&mut self, options: &serde_yaml::Value) -> std::result::Result<(), String> {
        self.options = super::parse_options("absorb_bias", options)?;
        if !(self.options.sigmas.is_finite() && self.options.sigmas >= 0.0) {
            return Err(format!(
                "pass `absorb_bias`: sigmas must be a non-negative number, not {}",
                self.options.sigmas
            ));
        }
        Ok(())
    }

    fn run(&self, model: &mut Model, ctx: &mut Context) -> Result<Vec<String>> {
        let graph = &mut model.graph;
        let (found, rejected) = find_absorptions(
            graph,
            &ctx.batchnorm_records,
            self.options.padded == Padded::Absorb,
            self.options.sigmas,
        )?;
        let some = found.iter().filter(|a| a.c.iter().any(|&c| c > 0.0)).count();
        let mut notes = vec![format!(
            "{} with bias absorbed ({} with nothing to absorb), {} skipped",
            plural(some, "pair"),
            found.len() - some,
            plural(rejected.len(), "layer")
        )];
        for a in found {
            notes.push(apply_absorption(graph, a, &mut ctx.batchnorm_records)?);
        }
        notes.extend(
            rejected
                .into_iter()
                .map(|(l, r)| format!("no absorption from {l}: {r}")),
        );
        graph.rebuild_edges()?;
        Ok(notes)
    }
}

/// Pairs to absorb across, in topological order, and the layers skipped with the reason.
fn find_absorptions(
    graph: &Graph,
    records: &[BatchNormRecord],
    allow_padded: bool,
    sigmas: f64,
) -> Result<(Vec<Absorption>, Vec<Rejected>)> {
    let mut found = Vec::new();
    let mut rejected = Vec::new();
    for ix in graph.topological_order()? {
        let link = match find_link(graph, ix, Walk::Absorb) {
            None => continue,
            Some(Err(reason)) => {
                rejected.push((graph.nodes[ix].label(), reason));
                continue;
            }
            Some(Ok(link)) => link,
        };
        match check_absorption(graph, link, records, allow_padded, sigmas) {
            Ok(a) => found.push(a),
            Err(reason) => rejected.push((graph.nodes[ix].label(), reason)),
        }
    }
    Ok((found, rejected))
}

fn check_absorption(
    graph: &Graph,
    link: Link,
    records: &[BatchNormRecord],
    allow_padded: bool,
    sigmas: f64,
) -> std::result::Result<Absorption, String> {
    let out = &link.from.output;
    let Some(record) = records.iter().find(|r| &r.output == out) else {
        return Err(format!(
            "no BatchNorm record for '{out}' (no BatchNormalization was folded into it; absorption from calibration statistics is not done here)"
        ));
    };
    let channels = link.from.layout.out_channels();
    if record.gamma.len() != channels || record.beta.len() != channels {
        return Err(format!(
            "the BatchNorm record of '{out}' has {} channels, not {channels}",
            record.beta.len()
        ));
    }
    if link.from.beta == 0.0 || link.to.beta == 0.0 {
        return Err("a Gemm has beta = 0".into());
    }
    let c = compute_absorption(&record.gamma, &record.beta, sigmas);
    let w2 = LayerValues::load(graph, &link.to)?;
    let factor = link.to.alpha / link.to.beta;
    let shift2 = compute_bias_shift(&w2, &c).into_iter().map(|v| v * factor).collect();
    let own_pads =
        matches!(link.to.layout.kind, Kind::Conv { .. }) && ops::Conv::view(&graph.nodes[link.to.node])?.is_padded();
    let pad_between = link.through_nodes.iter().any(|&n| graph.nodes[n].op_type == "Pad");
    if (own_pads || pad_between) && !allow_padded {
        return Err(format!(
            "{} reads its input zero-padded, where the absorbed c is missing: border outputs would shift (option `padded: absorb` accepts that)",
            link.to.label
        ));
    }
    Ok(Absorption {
        padded: own_pads || pad_between,
        link,
        c,
        shift2,
        sigmas,
    })
}

/// `c_i = max(0, β_i − n·|γ_i|)`.
pub fn compute_absorption(gamma: &[f32], beta: &[f32], sigmas: f64) -> Vec<f64> {
    gamma
        .iter()
        .zip(beta)
        .map(|(&g, &b)| (b as f64 - sigmas * (g as f64).abs()).max(0.0))
        .collect()
}

/// `Σ` over the input channels and taps of each output channel `o` of `W2·c`.
pub fn compute_bias_shift(w2: &LayerValues, c: &[f64]) -> Vec<f64> {
    let mut shift = vec![0f64; w2.layout.out_channels()];
    for (w, (o, i)) in w2.w.iter().zip(w2.layout.channels()) {
        shift[o] += w * c[i];
    }
    shift
}

/// Adds `delta` to a layer's bias, creating `<weight>::bias` when it has none.
fn add_to_bias(graph: &mut Graph, layer: &Layer, delta: &[f64]) -> Result<()> {
    let bias = graph.nodes[layer.node].inputs.get(2).filter(|b| !b.is_empty()).cloned();
    match bias {
        Some(b) => {
            let t = &graph.constants[&b].tensor;
            let old = tensor::values_f64(t).ok_or_else(|| Error::Graph(format!("bias '{b}' unreadable")))?;
            let new: Vec<f64> = old.iter().zip(delta).map(|(a, d)| a + d).collect();
            let t = f32_tensor(t, &new);
            graph.set_constant(&b, t)?;
        }
        None => {
            let name = graph.fresh_name(&format!("{}::bias", layer.weight));
            let proto = TensorProto {
                name: Some(name.clone()),
                dims: vec![delta.len() as i64],
                data_type: Some(DataType::Float as i32),
                ..Default::default()
            };
            let tensor = f32_tensor(&proto, delta);
            graph.constants.insert(
                name.clone(),
                Constant {
                    tensor,
                    origin: ConstantOrigin::Created,
                },
            );
            let n = &mut graph.nodes[layer.node];
            n.inputs.resize(n.inputs.len().max(3), String::new());
            n.inputs[2] = name;
        }
    }
    Ok(())
}

fn apply_absorption(graph: &mut Graph, a: Absorption, records: &mut [BatchNormRecord]) -> Result<String> {
    let from = &a.link.from;
    let to = &a.link.to;
    let absorbed = a.c.iter().filter(|&&c| c > 0.0).count();
    let max_c = a.c.iter().fold(0f64, |m, &c| m.max(c));
    if absorbed > 0 {
        let minus: Vec<f64> = a.c.iter().map(|c| -c / from.beta).collect();
        add_to_bias(graph, from, &minus)?;
        add_to_bias(graph, to, &a.shift2)?;
        for r in records.iter_mut().filter(|r| r.output == from.output) {
            for (b, c) in r.beta.iter_mut().zip(&a.c) {
                *b = (*b as f64 - c) as f32;
            }
        }
    }
    let via = a.link.through.join(", ");
    let kind = match to.layout.kind {
        Kind::Conv { group } if group > 1 && group == to.layout.in_channels() => "depthwise ",
        _ => "",
    };
    let change = if absorbed == 0 {
        format!("nothing to absorb (every β − {}|γ| ≤ 0)", fmt_float(a.sigmas))
    } else {
        format!(
            "max c {}; exact where the pre-activation ≥ c (β − {}|γ|), elsewhere outputs of {} change by up to W2·c{}",
            fmt_float(max_c),
            fmt_float(a.sigmas),
            to.label,
            if a.padded {
                ", and at its zero-padded borders by the W2·c of the padded taps"
            } else {
                ""
            }
        )
    };
    let verb = if absorbed == 0 {
        "nothing absorbed from"
    } else {
        "absorbed"
    };
    Ok(format!(
        "{verb} {} → {kind}{} (via {via}): {absorbed} of {} channels with c > 0, {change}",
        from.label,
        to.label,
        a.c.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::super::equalize::Layout;
    use super::*;

    #[test]
    fn absorption_amounts() {
        // β − 3|γ|: 5 − 3 = 2; 1 − 3 < 0 → 0; γ negative counts by its size: 10 − 6 = 4.
        assert_eq!(
            compute_absorption(&[1.0, 1.0, -2.0], &[5.0, 1.0, 10.0], 3.0),
            [2.0, 0.0, 4.0]
        );
    }

    #[test]
    fn bias_shift_sums_over_inputs_and_taps() {
        // Conv W [2, 2, 1, 2]: o = 0 taps [1, 2] on input 0 and [3, 4] on input 1.
        let w = LayerValues {
            layout: Layout {
                kind: Kind::Conv { group: 1 },
                dims: vec![2, 2, 1, 2],
            },
            w: vec![1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 0.0, 1.0],
            b: None,
        };
        // c = [1, 10]: o0 = (1 + 2)·1 + (3 + 4)·10 = 73; o1 = (−1)·1 + 1·10 = 9.
        assert_eq!(compute_bias_shift(&w, &[1.0, 10.0]), [73.0, 9.0]);
        // Depthwise W [2, 1, 1, 2]: per channel.
        let dw = LayerValues {
            layout: Layout {
                kind: Kind::Conv { group: 2 },
                dims: vec![2, 1, 1, 2],
            },
            w: vec![1.0, 2.0, 3.0, 4.0],
            b: None,
        };
        assert_eq!(compute_bias_shift(&dw, &[1.0, 10.0]), [3.0, 70.0]);
        // Gemm B [K = 2, N = 1] and transposed.
        let g = LayerValues {
            layout: Layout {
                kind: Kind::Gemm { trans_b: false },
                dims: vec![2, 1],
            },
            w: vec![2.0, 3.0],
            b: None,
        };
        assert_eq!(compute_bias_shift(&g, &[1.0, 10.0]), [32.0]);
    }
}
