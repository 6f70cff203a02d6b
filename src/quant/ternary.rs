//! Ternary and binary weights: each output channel (or the whole tensor, per-tensor) becomes
//! one magnitude α times a sign code, written as an int4 DequantizeLinear with scale α and zero
//! point 0.
//!
//! ```text
//! ternary (TWN)   Δ = 0.7 · mean|w|          q = +1 if w > Δ, −1 if w < −Δ, else 0
//!                 α = mean of |w| over |w| > Δ
//! binary          α = mean|w|                q = −1 if w < 0, else +1   (sign(0) = +1)
//! ŵ = α · q
//! ```
//!
//! Ternary: Li, Zhang and Liu 2016, "Ternary Weight Networks" (Δ* ≈ 0.7·E|w| approximates the
//! threshold minimising ‖w − αq‖² for normal or uniform weights; α is then the exact
//! least-squares magnitude for that support). Binary: Rastegari et al. 2016, "XNOR-Net", whose
//! optimal scale for `sign(w)` is the mean absolute value (the binary-weight network's α).
//!
//! Means are taken in f64, channel by channel in element order (deterministic, rayon over
//! channels only). Non-finite weights count as 0. A channel with no magnitude (all zeros, or
//! no weight above Δ) gets the scale [`MIN_RANGE`]: ternary writes it as zeros (exact), binary
//! as ±MIN_RANGE (the format has no 0).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::quant::params::{weight_layout, QParams, QuantDtype, QuantizedTensor, MIN_RANGE};

/// TWN's threshold factor: Δ = 0.7 · mean|w|.
pub const TWN_THRESHOLD: f64 = 0.7;

/// One channel's codes and magnitude α (f64).
fn channel_levels(values: &[f64], dtype: QuantDtype) -> (Vec<i32>, f64) {
    let n = values.len().max(1) as f64;
    let mean_abs = values.iter().map(|v| v.abs()).sum::<f64>() / n;
    match dtype {
        QuantDtype::Binary => {
            let codes = values.iter().map(|&v| if v < 0.0 { -1 } else { 1 }).collect();
            (codes, mean_abs)
        }
        _ => {
            let delta = TWN_THRESHOLD * mean_abs;
            let codes: Vec<i32> = values
                .iter()
                .map(|&v| {
                    if v > delta {
                        1
                    } else if v < -delta {
                        -1
                    } else {
                        0
                    }
                })
                .collect();
            let (sum, count) = values
                .iter()
                .zip(&codes)
                .filter(|(_, &c)| c != 0)
                .fold((0.0, 0usize), |(s, k), (v, _)| (s + v.abs(), k + 1));
            (codes, if count == 0 { 0.0 } else { sum / count as f64 })
        }
    }
}

/// The stored scale: α as f32, or [`MIN_RANGE`] when α is not a normal positive f32.
fn stored_alpha(alpha: f64) -> f32 {
    let a = alpha as f32;
    if a.is_finite() && a >= f32::MIN_POSITIVE {
        a
    } else {
        MIN_RANGE
    }
}

/// Ternary or binary weights (`dtype` [`QuantDtype::Ternary`] or [`QuantDtype::Binary`]):
/// one α per channel along `axis`, or one for the tensor when `axis` is None.
pub fn quantize(values: &[f32], dims: &[i64], axis: Option<usize>, dtype: QuantDtype) -> Result<QuantizedTensor> {
    if !dtype.is_ternary_or_binary() {
        return Err(Error::internal(format!("{dtype} weights are not ternary or binary")));
    }
    let finite = |v: f32| if v.is_finite() { v as f64 } else { 0.0 };
    let (outer, channels, inner) = weight_layout(values, dims, axis)?;
    // Element (o, c, j) is at (o·channels + c)·inner + j.
    let per_channel: Vec<(Vec<i32>, f64)> = (0..channels)
        .into_par_iter()
        .map(|c| {
            let slice: Vec<f64> = (0..outer)
                .flat_map(|o| values[(o * channels + c) * inner..][..inner].iter().map(|&v| finite(v)))
                .collect();
            channel_levels(&slice, dtype)
        })
        .collect();
    let mut codes = vec![0; values.len()];
    for (c, (channel_codes, _)) in per_channel.iter().enumerate() {
        for (k, &code) in channel_codes.iter().enumerate() {
            let (o, j) = (k / inner.max(1), k % inner.max(1));
            codes[(o * channels + c) * inner + j] = code;
        }
    }
    Ok(QuantizedTensor {
        dims: dims.to_vec(),
        values: codes,
        params: per_channel
            .iter()
            .map(|&(_, alpha)| QParams {
                scale: stored_alpha(alpha),
                zero_point: 0,
            })
            .collect(),
        axis,
        block_size: None,
        dtype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ternary_thresholds_at_seven_tenths_of_the_mean_magnitude() {
        // Channel [0.1, −0.9, 0.5, 0.3]: mean|w| = 0.45, Δ = 0.315; above it −0.9 and 0.5, α = 0.7.
        let q = quantize(&[0.1, -0.9, 0.5, 0.3], &[4], None, QuantDtype::Ternary).unwrap();
        assert_eq!(q.values, [0, -1, 1, 0]);
        assert_eq!(
            q.params,
            [QParams {
                scale: 0.7,
                zero_point: 0
            }]
        );
        assert_eq!(q.dequantized(), [0.0, -0.7, 0.7, 0.0]);
        // Only |w| above Δ counts (TWN's |w| > Δ): mean 1.0, Δ 0.7, and 0.7 is not above it.
        let q = quantize(&[0.7, -1.3, 0.0, 2.0], &[4], None, QuantDtype::Ternary).unwrap();
        assert_eq!(q.values, [0, -1, 0, 1]);
        assert_eq!(q.params[0].scale, 1.65);
    }

    #[test]
    fn binary_scales_the_signs_by_the_mean_magnitude() {
        let q = quantize(&[0.5, -1.5, 0.0, 2.0], &[4], None, QuantDtype::Binary).unwrap();
        assert_eq!(q.values, [1, -1, 1, 1], "sign(0) = +1");
        assert_eq!(q.params[0].scale, 1.0);
        assert_eq!(q.dequantized(), [1.0, -1.0, 1.0, 1.0]);
    }

    #[test]
    fn channels_along_any_axis_have_their_own_magnitude() {
        // [2, 3] per column (axis 1): columns [1, −3], [0.2, 0.2], [0, 0].
        let w = [1.0, 0.2, 0.0, -3.0, 0.2, 0.0];
        let t = quantize(&w, &[2, 3], Some(1), QuantDtype::Ternary).unwrap();
        // Column 0: mean 2, Δ 1.4: only −3 (α 3). Column 1: mean 0.2, Δ 0.14: both (α 0.2).
        assert_eq!(t.values, [0, 1, 0, -1, 1, 0]);
        let scales: Vec<f32> = t.params.iter().map(|p| p.scale).collect();
        assert_eq!(scales, [3.0, 0.2, MIN_RANGE], "an all-zero column gets MIN_RANGE");
        assert_eq!(t.dequantized(), [0.0, 0.2, 0.0, -3.0, 0.2, 0.0]);
        // The same columns as rows of the transpose, axis 0.
        let wt = [1.0, -3.0, 0.2, 0.2, 0.0, 0.0];
        let r = quantize(&wt, &[3, 2], Some(0), QuantDtype::Ternary).unwrap();
        assert_eq!(r.params, t.params);
        assert_eq!(r.values, [0, -1, 1, 1, 0, 0]);
        let b = quantize(&w, &[2, 3], Some(1), QuantDtype::Binary).unwrap();
        let scales: Vec<f32> = b.params.iter().map(|p| p.scale).collect();
        assert_eq!(scales, [2.0, 0.2, MIN_RANGE]);
        assert_eq!(b.values, [1, 1, 1, -1, 1, 1]);
    }

    #[test]
    fn bad_input_is_an_error_or_counts_as_zero() {
        assert!(quantize(&[1.0, 2.0], &[3], Some(0), QuantDtype::Ternary).is_err());
        assert!(quantize(&[1.0, 2.0], &[2], Some(1), QuantDtype::Binary).is_err());
        assert!(quantize(&[1.0], &[1], None, QuantDtype::Int4).is_err());
        assert!(quantize(&[1.0, 2.0], &[3], None, QuantDtype::Ternary).is_err());
        let q = quantize(&[f32::NAN, f32::INFINITY, 1.0, -1.0], &[4], None, QuantDtype::Ternary).unwrap();
        // NaN and inf count as 0: mean 0.5, Δ 0.35, α 1.
        assert_eq!(q.values, [0, 0, 1, -1]);
        assert_eq!(q.params[0].scale, 1.0);
        let empty = quantize(&[], &[0, 3], Some(1), QuantDtype::Binary).unwrap();
        assert!(empty.values.is_empty() && empty.params.iter().all(|p| p.is_valid()));
    }
}
