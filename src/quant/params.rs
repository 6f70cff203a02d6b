//! Scale / zero-point maths of ONNX QDQ quantization, as ONNX Runtime, TensorRT and OpenVINO
//! execute it.
//!
//! The runtime contract is the ONNX operator spec (QuantizeLinear / DequantizeLinear):
//!
//! ```text
//! q = saturate(round_half_to_even(x / scale) + zero_point)      saturate: the dtype's full range
//! x̂ = (q − zero_point) · scale
//! ```
//!
//! Choosing `scale` and `zero_point` for a real range [lo, hi] follows Jacob et al. 2018
//! ("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
//! Inference") and Nagel et al. 2021 ("A White Paper on Neural Network Quantization"), with the
//! integer ranges of ONNX Runtime's `quant_utils.get_qmin_qmax_for_qType`:
//!
//! - the range is first widened to contain 0, so that 0 (padding, ReLU) is exact;
//! - asymmetric: `scale = (hi − lo) / (qmax − qmin)`, `zero_point = round(qmin − lo / scale)`;
//! - symmetric, signed: `scale = amax / qmax`, `zero_point = 0`, with `amax = max(|lo|, |hi|)`
//!   and the narrow range (int8: −127..127) so that ±amax are both exact;
//! - symmetric, unsigned: `zero_point = (qmin + qmax + 1) / 2` (uint8: 128, uint16: 32768),
//!   `scale = amax / (qmax − zero_point)`: ±amax are both exact and the grid is the symmetric
//!   signed one shifted by the zero point;
//! - narrow range drops the signed minimum (int8: −127..127), reduce range uses ORT's 7-bit
//!   tables (int8 −64..64, uint8 0..127) for VNNI-less x86 kernels whose u8·s8 pair sums
//!   saturate int16;
//! - per-channel: one (scale, zero point) per slice along an axis, each from its own range;
//! - bias: int32 with `scale = s_in · s_w[c]`, zero point 0, so that the integer accumulator
//!   of Conv/Gemm can add it directly.
//!
//! Nothing here panics on any input, and no scale written is zero, negative, subnormal, NaN or
//! infinite.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::proto::tensor_proto::DataType;
use crate::proto::TensorProto;

/// Integer type of a quantized tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantDtype {
    Int8,
    Uint8,
    Int16,
    Uint16,
    /// 4-bit integers, two per byte (low nibble first); opset 21.
    Int4,
    Uint4,
    /// FP8 (OCP): 4 exponent bits, 3 mantissa bits, no infinity, max 448; opset 19.
    Float8e4m3fn,
    /// FP8 (OCP): 5 exponent bits, 2 mantissa bits, max 57344; opset 19.
    Float8e5m2,
    /// Weights only: {−α, 0, α} per channel (TWN, [`crate::quant::ternary`]), stored as int4.
    Ternary,
    /// Weights only: {−α, α} per channel (sign · mean|w|), stored as int4.
    Binary,
}

/// The dtypes a config can name, in the order error messages list them.
pub const DTYPE_NAMES: [&str; 10] = [
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int4",
    "uint4",
    "float8e4m3fn",
    "float8e5m2",
    "ternary",
    "binary",
];

impl QuantDtype {
    /// The TensorProto `DataType`.
    pub fn onnx_type(self) -> i32 {
        (match self {
            QuantDtype::Int8 => DataType::Int8,
            QuantDtype::Uint8 => DataType::Uint8,
            QuantDtype::Int16 => DataType::Int16,
            QuantDtype::Uint16 => DataType::Uint16,
            QuantDtype::Int4 | QuantDtype::Ternary | QuantDtype::Binary => DataType::Int4,
            QuantDtype::Uint4 => DataType::Uint4,
            QuantDtype::Float8e4m3fn => DataType::Float8e4m3fn,
            QuantDtype::Float8e5m2 => DataType::Float8e5m2,
        }) as i32
    }

    /// The inverse of [`QuantDtype::onnx_type`] (None for any other type; int4 data is int4,
    /// whatever rule chose its values).
    pub fn from_onnx_type(data_type: i32) -> Option<Self> {
        match DataType::try_from(data_type).ok()? {
            DataType::Int8 => Some(QuantDtype::Int8),
            DataType::Uint8 => Some(QuantDtype::Uint8),
            DataType::Int16 => Some(QuantDtype::Int16),
            DataType::Uint16 => Some(QuantDtype::Uint16),
            DataType::Int4 => Some(QuantDtype::Int4),
            DataType::Uint4 => Some(QuantDtype::Uint4),
            DataType::Float8e4m3fn => Some(QuantDtype::Float8e4m3fn),
            DataType::Float8e5m2 => Some(QuantDtype::Float8e5m2),
            _ => None,
        }
    }

    pub fn is_signed(self) -> bool {
        !matches!(self, QuantDtype::Uint8 | QuantDtype::Uint16 | QuantDtype::Uint4)
    }

    /// Ternary or binary: values set by a sign rule around one magnitude, not rounded onto a
    /// grid ([`crate::quant::ternary`]).
    pub fn is_ternary_or_binary(self) -> bool {
        matches!(self, QuantDtype::Ternary | QuantDtype::Binary)
    }

    /// The storage width (ternary and binary are stored as int4).
    pub fn bits(self) -> u32 {
        match self {
            QuantDtype::Int4 | QuantDtype::Uint4 | QuantDtype::Ternary | QuantDtype::Binary => 4,
            QuantDtype::Int8 | QuantDtype::Uint8 | QuantDtype::Float8e4m3fn | QuantDtype::Float8e5m2 => 8,
            QuantDtype::Int16 | QuantDtype::Uint16 => 16,
        }
    }

    /// The FP8 format, for the two FP8 dtypes (their values are codes, not integers).
    pub fn float8(self) -> Option<Fp8> {
        match self {
            QuantDtype::Float8e4m3fn => Some(Fp8::E4m3fn),
            QuantDtype::Float8e5m2 => Some(Fp8::E5m2),
            _ => None,
        }
    }

    /// Whether the type needs an opset above 13: 16- and 4-bit Q/DQ need 21, FP8 19.
    pub fn min_opset(self) -> i64 {
        match self {
            QuantDtype::Int8 | QuantDtype::Uint8 => 10,
            QuantDtype::Float8e4m3fn | QuantDtype::Float8e5m2 => 19,
            QuantDtype::Int16
            | QuantDtype::Uint16
            | QuantDtype::Int4
            | QuantDtype::Uint4
            | QuantDtype::Ternary
            | QuantDtype::Binary => 21,
        }
    }

    /// (qmin, qmax) of the dtype; with `narrow` the signed minimum is dropped (int8: −127..127).
    /// Narrow range only applies to signed types (an unsigned range has no lone extra value).
    pub fn range(self, narrow: bool) -> (i32, i32) {
        let n = narrow as i32;
        match self {
            QuantDtype::Int8 => (-128 + n, 127),
            QuantDtype::Uint8 => (0, 255),
            QuantDtype::Int16 => (-32768 + n, 32767),
            QuantDtype::Uint16 => (0, 65535),
            QuantDtype::Int4 => (-8 + n, 7),
            QuantDtype::Uint4 => (0, 15),
            // FP8: the largest finite magnitude (the codes are not a linear range).
            QuantDtype::Float8e4m3fn => (-448, 448),
            QuantDtype::Float8e5m2 => (-57344, 57344),
            QuantDtype::Ternary | QuantDtype::Binary => (-1, 1),
        }
    }

    /// ONNX Runtime's reduce_range table (`ONNX_INT_TYPE_REDUCED_RANGE`): one bit less of
    /// magnitude. Signed keeps ±2^(b−2) (int8 −64..64, not −64..63): |w| ≤ 64 already keeps
    /// 2·255·|w| within int16, and the symmetric range wastes nothing.
    pub fn reduced_range(self) -> (i32, i32) {
        match self {
            QuantDtype::Int8 => (-64, 64),
            QuantDtype::Uint8 => (0, 127),
            QuantDtype::Int16 => (-16384, 16384),
            QuantDtype::Uint16 => (0, 32767),
            QuantDtype::Int4 => (-4, 4),
            QuantDtype::Uint4 => (0, 7),
            QuantDtype::Float8e4m3fn | QuantDtype::Float8e5m2 | QuantDtype::Ternary | QuantDtype::Binary => {
                self.range(false)
            }
        }
    }

    /// Short name (`i8`, `u8`, `i16`, `u16`, `ternary`), as in dumps.
    pub fn name(self) -> &'static str {
        match self {
            QuantDtype::Ternary => "ternary",
            QuantDtype::Binary => "binary",
            _ => crate::ir::tensor::dtype_name(self.onnx_type()),
        }
    }
}

impl std::fmt::Display for QuantDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub use crate::ir::tensor::Fp8;

/// Everything that decides parameters for one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scheme {
    pub dtype: QuantDtype,
    /// Range symmetric around 0: zero point 0 (signed) or the midpoint (unsigned).
    #[serde(default)]
    pub symmetric: bool,
    /// Signed only: drop the minimum (int8 −127..127). Implied by `symmetric` for signed types.
    #[serde(default)]
    pub narrow_range: bool,
    /// One bit less, as ORT's reduce_range (int8 −64..64, uint8 0..127), for x86 kernels
    /// without VNNI whose u8·s8 pair sums saturate int16. Overrides `narrow_range`.
    #[serde(default)]
    pub reduce_range: bool,
    /// An integer range of this many bits inside the dtype's storage (`weights.bits`,
    /// `activations.bits`): int8 storage with 7 bits is −63..63 symmetric (narrow, as the full
    /// width), −64..63 asymmetric, uint8 0..127. None, or the dtype's width: its full range.
    /// Integer dtypes only (the config refuses it with FP8, ternary and binary, and with
    /// reduce_range).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
}

impl Scheme {
    /// The integer range parameters are computed for, and weights are clamped to.
    /// Runtime QuantizeLinear still saturates to the dtype's full range ([`quantize`]): an
    /// activation beyond its calibrated range can reach the storage bounds even with `bits`.
    pub fn qrange(&self) -> (i32, i32) {
        // Symmetric signed: −qmax..qmax, so that −amax is exact as well (ORT does the same).
        let narrow = self.narrow_range || (self.symmetric && self.dtype.is_signed());
        if self.reduce_range {
            return self.dtype.reduced_range();
        }
        let integer = self.dtype.float8().is_none() && !self.dtype.is_ternary_or_binary();
        match self.bits.filter(|&b| integer && (1..self.dtype.bits()).contains(&b)) {
            Some(b) if self.dtype.is_signed() => (-(1 << (b - 1)) + narrow as i32, (1 << (b - 1)) - 1),
            Some(b) => (0, (1 << b) - 1),
            None => self.dtype.range(narrow),
        }
    }
}

/// Scale and zero point of one tensor or one channel.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: i32,
}

impl QParams {
    /// Usable by a runtime: a finite, normal, positive scale.
    pub fn is_valid(&self) -> bool {
        self.scale.is_finite() && self.scale >= f32::MIN_POSITIVE
    }
}

/// Minimum width of a range, applied before computing the scale: a zero-width range (an
/// all-zero tensor) or a narrower one is widened to `[lo, lo + MIN_RANGE]`, as ORT's
/// `min_real_range`. Fixed rather than relative: after 0 is included, only ranges within
/// 1e-5 of 0 are affected, so a constant `c` still lies inside its (widened) range and
/// round-trips within scale/2, while scales stay ≥ 1e-5 / 65535 ≈ 1.5e-10 — far from f32
/// underflow even in a bias scale `s_in · s_w` (≥ 2e-20), and large enough that the bias of
/// a layer fed by an all-zero tensor usually still fits int32.
pub const MIN_RANGE: f32 = 1e-5;

/// Round half to even, as ONNX QuantizeLinear (and IEEE `nearbyint` under default rounding).
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// The f32 scale actually stored: never 0, subnormal, NaN or infinite. Subnormal scales
/// (ranges below ~1e-36) become the smallest normal f32 — unreachable from ranges floored at
/// MIN_RANGE, but kept so no caller can write a scale that runtimes flush to zero.
fn stored_scale(scale: f64) -> f32 {
    let s = scale as f32;
    if s.is_infinite() {
        f32::MAX
    } else if s >= f32::MIN_POSITIVE {
        s
    } else {
        f32::MIN_POSITIVE // also NaN and ≤ 0
    }
}

/// The caller guarantees finite bounds; still, NaN counts as 0 and ±inf as ±f32::MAX/2, so the
/// width (≤ f32::MAX) and hence the scale stay finite.
fn sanitize(x: f32) -> f64 {
    const LIMIT: f64 = f32::MAX as f64 / 2.0;
    if x.is_nan() {
        0.0
    } else {
        (x as f64).clamp(-LIMIT, LIMIT)
    }
}

/// Parameters for a range [lo, hi] (from calibration or weights).
///
/// The range is widened to contain 0 and to be at least [`MIN_RANGE`] wide; an inverted range
/// (empty statistics, lo = +inf, hi = −inf) thus becomes [0, MIN_RANGE].
pub fn params_for_range(lo: f32, hi: f32, scheme: &Scheme) -> QParams {
    let lo = sanitize(lo).min(0.0);
    let mut hi = sanitize(hi).max(0.0);
    if hi - lo < MIN_RANGE as f64 {
        hi = lo + MIN_RANGE as f64;
    }
    if let Some(f) = scheme.dtype.float8() {
        // FP8: amax onto the format's largest value, zero point 0 (its grid is symmetric).
        return QParams {
            scale: stored_scale(hi.max(-lo) / f.max() as f64),
            zero_point: 0,
        };
    }
    let (qmin, qmax) = scheme.qrange();
    if scheme.symmetric {
        let amax = hi.max(-lo);
        if scheme.dtype.is_signed() {
            return QParams {
                scale: stored_scale(amax / qmax as f64),
                zero_point: 0,
            };
        }
        // Midpoint, rounded up: 128 / 64 / 32768, the values ORT's kernels expect; −amax then
        // maps to qmin + 1, +amax to qmax.
        let zero_point = (qmin + qmax + 1) / 2;
        return QParams {
            scale: stored_scale(amax / (qmax - zero_point) as f64),
            zero_point,
        };
    }
    let scale = stored_scale((hi - lo) / (qmax - qmin) as f64);
    // With the scale as stored, so that lo quantizes to qmin in the runtime's own arithmetic.
    let zp = round_half_even(qmin as f64 - lo / scale as f64).clamp(qmin as f64, qmax as f64);
    QParams {
        scale,
        zero_point: zp as i32,
    }
}

/// ONNX QuantizeLinear, in f32 as runtimes compute it: `x / scale` in f32, rounded half to
/// even, plus the zero point, saturated to the dtype's FULL range (the spec's, whatever the
/// scheme's narrow or reduced range). NaN quantizes to the zero point.
///
/// FP8 types give the code (0..=255) of `x / scale` rounded to nearest even, saturated.
pub fn quantize(x: f32, p: QParams, dtype: QuantDtype) -> i32 {
    if let Some(f) = dtype.float8() {
        return f.encode(x / p.scale) as i32;
    }
    let (qmin, qmax) = dtype.range(false);
    let r = (x / p.scale).round_ties_even();
    if r.is_nan() {
        return p.zero_point.clamp(qmin, qmax);
    }
    (r as f64 + p.zero_point as f64).clamp(qmin as f64, qmax as f64) as i32
}

/// ONNX DequantizeLinear: `(q − zero_point) · scale` in f32.
pub fn dequantize(q: i32, p: QParams) -> f32 {
    (q as i64 - p.zero_point as i64) as f32 * p.scale
}

/// [`dequantize`] for any dtype: an FP8 `q` is a code, its value times the scale (zero point 0).
pub fn dequantize_as(q: i32, p: QParams, dtype: QuantDtype) -> f32 {
    match dtype.float8() {
        Some(f) => f.decode(q as u8) * p.scale,
        None => dequantize(q, p),
    }
}

/// (outer, channels, inner) of a weight's `values` of shape `dims` split along `axis` (one
/// channel when None), or an error when the values do not fill the shape or the axis is not one.
pub(crate) fn weight_layout(values: &[f32], dims: &[i64], axis: Option<usize>) -> Result<(usize, usize, usize)> {
    let count = dims.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    });
    if count != Some(values.len()) {
        return Err(Error::Graph(format!(
            "weight of shape {dims:?} has {} values",
            values.len()
        )));
    }
    match axis {
        None => Ok((1, 1, values.len())),
        Some(a) => channel_layout(dims, a).ok_or_else(|| {
            Error::Graph(format!(
                "per-channel axis {a} is out of range for weight of shape {dims:?}"
            ))
        }),
    }
}

/// (outer, channels, inner) of a tensor split along `axis`; element i is in channel
/// `(i / inner) % channels`.
pub(crate) fn channel_layout(dims: &[i64], axis: usize) -> Option<(usize, usize, usize)> {
    let size = |ds: &[i64]| {
        ds.iter().try_fold(1usize, |acc, &d| {
            usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
    };
    let channels = usize::try_from(*dims.get(axis)?).ok()?;
    Some((size(&dims[..axis])?, channels, size(&dims[axis + 1..])?))
}

/// A quantized weight: values as i32 (to be packed by dtype), and per-tensor (len 1) or
/// per-channel (len = channels) parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedTensor {
    pub dims: Vec<i64>,
    pub values: Vec<i32>,
    pub params: Vec<QParams>,
    pub axis: Option<usize>,
    /// Blocked along `axis` (ONNX 21's `block_size`): `params` has the weight's shape with that
    /// axis `ceil(d / block)` long, in row-major order.
    pub block_size: Option<usize>,
    pub dtype: QuantDtype,
}

/// Below this many elements rayon's task overhead outweighs the work.
const PAR_MIN_LEN: usize = 1 << 14;

/// `Σ (dequantize(quantize(v).clamp(qmin, qmax)) − v)²` over the finite values, bit for bit, in
/// a form the compiler vectorises (80 candidates × every weight: this loop was most of a
/// per-tensor model's planning time). Round half to even by the 1.5·2^23 trick, exact for
/// |x| ≤ 2^22; larger quotients clamp to the range either way. `r + zp` and `q − zp` are exact
/// integers in f32.
fn squared_rounding_error(values: &[f32], p: QParams, (qmin, qmax): (i32, i32)) -> f64 {
    const ROUND: f32 = 12_582_912.0;
    const LIMIT: f32 = 4_194_304.0;
    let (scale, zp) = (p.scale, p.zero_point as f32);
    let (lo, hi) = (qmin as f32, qmax as f32);
    values
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| {
            let x = (v / scale).clamp(-LIMIT, LIMIT);
            let q = (((x + ROUND) - ROUND) + zp).clamp(lo, hi);
            let d = ((q - zp) * scale) as f64 - v as f64;
            d * d
        })
        .sum()
}

/// Shrink factors tried for a per-tensor weight range: 1.00, 0.99, …, 0.21.
const SHRINK_STEPS: usize = 80;

/// Parameters of a per-tensor weight: its [lo, hi] shrunk by the factor f ∈ {1.00, 0.99, …,
/// 0.21} that minimises Σ (w − dq(q(w)))² (the first, widest, on ties).
///
/// Why: one scale serves every output channel, so min/max lets the widest channel (after
/// BatchNorm folding, often 10–30× the median) set a step that rounds the narrow ones to a few
/// levels. Clipping a few large weights for a finer step everywhere lowers the total error; the
/// same least-squares grid search as Banner et al., "Post training 4-bit quantization of
/// convolutional networks for rapid-deployment" (NeurIPS 2019) and NNCF/PPQ use. Per-channel
/// ranges keep min/max: measured, the search changed per-channel output SQNR by −0.3 to +0.4 dB.
fn least_squares_params(values: &[f32], lo: f32, hi: f32, scheme: &Scheme) -> QParams {
    let squared_error = |p: QParams| squared_rounding_error(values, p, scheme.qrange());
    let candidates: Vec<(QParams, f64)> = (0..SHRINK_STEPS)
        .into_par_iter()
        .map(|k| {
            let f = 1.0 - k as f32 / 100.0;
            let p = params_for_range(lo * f, hi * f, scheme);
            (p, squared_error(p))
        })
        .collect();
    let mut best = candidates[0];
    for &c in &candidates[1..] {
        if c.1 < best.1 {
            best = c;
        }
    }
    best.0
}

/// Quantizes a weight: per-tensor when `axis` is None, else per-channel along `axis` (Conv
/// weights axis 0, ConvTranspose 1, Gemm by transB, MatMul the last axis). Each channel's
/// [min, max] goes through [`params_for_range`], a per-tensor range through
/// [`least_squares_params`]; values are quantized as QuantizeLinear would
/// and clamped to the scheme's range (f32 rounding could otherwise step one past a narrow or
/// reduced bound).
pub fn quantize_weights(values: &[f32], dims: &[i64], axis: Option<usize>, scheme: &Scheme) -> Result<QuantizedTensor> {
    quantize_weights_blocked(values, dims, axis, None, scheme)
}

/// [`quantize_weights`], or with `block` blocked along `axis` (ONNX 21's `block_size`): one
/// (scale, zero point) per run of `block` consecutive elements along the axis, each from its
/// own [min, max], the parameters shaped as the weight with that axis `ceil(d / block)` long.
/// FP8 weights take amax-based scales (no least-squares search: its grid is not uniform).
pub fn quantize_weights_blocked(
    values: &[f32],
    dims: &[i64],
    axis: Option<usize>,
    block: Option<usize>,
    scheme: &Scheme,
) -> Result<QuantizedTensor> {
    let count = channel_layout(dims, 0).map(|(_, c, inner)| c.checked_mul(inner));
    let count = if dims.is_empty() { Some(Some(1)) } else { count };
    if count != Some(Some(values.len())) {
        return Err(Error::Graph(format!(
            "weight of shape {dims:?} has {} values",
            values.len()
        )));
    }
    if scheme.dtype.is_ternary_or_binary() {
        if block.is_some() {
            return Err(Error::internal(format!("{} weights are not blocked", scheme.dtype)));
        }
        return crate::quant::ternary::quantize(values, dims, axis, scheme.dtype);
    }
    if block == Some(0) || (block.is_some() && axis.is_none()) {
        return Err(Error::internal(format!(
            "block size {block:?} along axis {axis:?} for weight of shape {dims:?}"
        )));
    }
    let (qmin, qmax) = scheme.qrange();
    let minmax = |acc: (f32, f32), &v: &f32| (acc.0.min(v), acc.1.max(v)); // f32::min/max skip NaN
    let merge = |a: (f32, f32), b: (f32, f32)| (a.0.min(b.0), a.1.max(b.1));

    let params = match axis {
        None => {
            let (lo, hi) = values
                .par_iter()
                .with_min_len(PAR_MIN_LEN)
                .fold(|| (0.0, 0.0), minmax)
                .reduce(|| (0.0, 0.0), merge);
            if scheme.dtype.float8().is_some() {
                vec![params_for_range(lo, hi, scheme)]
            } else {
                vec![least_squares_params(values, lo, hi, scheme)]
            }
        }
        Some(axis) => {
            let (outer, channels, inner) = channel_layout(dims, axis).ok_or_else(|| {
                Error::Graph(format!(
                    "per-channel axis {axis} is out of range for weight of shape {dims:?}"
                ))
            })?;
            match block {
                None => (0..channels)
                    .into_par_iter()
                    .map(|c| {
                        let (lo, hi) = (0..outer)
                            .map(|o| &values[(o * channels + c) * inner..][..inner])
                            .fold((0.0, 0.0), |acc, slice| {
                                merge(acc, slice.iter().fold((0.0, 0.0), minmax))
                            });
                        params_for_range(lo, hi, scheme)
                    })
                    .collect(),
                Some(b) => {
                    // Parameter (o, k, j) covers elements (o, k·b .. (k+1)·b, j).
                    let blocks = channels.div_ceil(b);
                    (0..outer * blocks * inner)
                        .into_par_iter()
                        .map(|p| {
                            let (o, k, j) = (p / (blocks * inner), (p / inner) % blocks, p % inner);
                            let (lo, hi) = (k * b..((k + 1) * b).min(channels))
                                .map(|c| values[(o * channels + c) * inner + j])
                                .fold((0.0f32, 0.0f32), |acc, v| (acc.0.min(v), acc.1.max(v)));
                            params_for_range(lo, hi, scheme)
                        })
                        .collect()
                }
            }
        }
    };
    let mut q = QuantizedTensor {
        dims: dims.to_vec(),
        values: vec![],
        params,
        axis,
        block_size: block,
        dtype: scheme.dtype,
    };
    let fp8 = scheme.dtype.float8().is_some();
    q.values = values
        .par_iter()
        .with_min_len(PAR_MIN_LEN)
        .enumerate()
        .map(|(i, &v)| {
            let code = quantize(v, q.params_of(i), scheme.dtype);
            if fp8 {
                code
            } else {
                code.clamp(qmin, qmax)
            }
        })
        .collect();
    Ok(q)
}

impl QuantizedTensor {
    /// The index into `params` of element `i` (flat index), if the layout is consistent.
    fn param_index(&self, i: usize) -> Option<usize> {
        let Some(axis) = self.axis else {
            return (!self.params.is_empty()).then_some(0);
        };
        let (_, channels, inner) = channel_layout(&self.dims, axis)?;
        if channels == 0 || inner == 0 {
            return None;
        }
        let index = match self.block_size {
            None => (i / inner) % channels,
            Some(b) => {
                let blocks = channels.div_ceil(b.max(1));
                let (o, c, j) = (i / (channels * inner), (i / inner) % channels, i % inner);
                (o * blocks + c / b.max(1)) * inner + j
            }
        };
        (index < self.params.len()).then_some(index)
    }

    /// The parameters element `i` (flat index) is quantized with.
    pub fn params_of(&self, i: usize) -> QParams {
        self.param_index(i)
            .map(|k| self.params[k])
            .or(self.params.first().copied())
            .unwrap_or(QParams {
                scale: 1.0,
                zero_point: 0,
            })
    }

    /// The dims of the scale and zero point: [] per-tensor, [C] per-channel, the weight's dims
    /// with the axis `ceil(d / block)` long when blocked.
    pub fn param_dims(&self) -> Vec<i64> {
        match (self.axis, self.block_size) {
            (None, _) => vec![],
            (Some(_), None) => vec![self.params.len() as i64],
            (Some(a), Some(b)) => {
                let mut dims = self.dims.clone();
                if let Some(d) = dims.get_mut(a) {
                    *d = (*d as u64).div_ceil(b as u64) as i64;
                }
                dims
            }
        }
    }

    /// The TensorProtos a DequantizeLinear needs: data in the dtype (raw little-endian bytes,
    /// 4-bit types packed two per byte), scale (f32, shaped by [`QuantizedTensor::param_dims`])
    /// and zero point (the dtype, same shape).
    pub fn to_protos(
        &self,
        data_name: &str,
        scale_name: &str,
        zero_point_name: &str,
    ) -> (TensorProto, TensorProto, TensorProto) {
        let param_dims = self.param_dims();
        let scales: Vec<f32> = self.params.iter().map(|p| p.scale).collect();
        let zero_points: Vec<i32> = self.params.iter().map(|p| p.zero_point).collect();
        (
            raw_tensor(
                data_name,
                self.dims.clone(),
                self.dtype.onnx_type(),
                pack(&self.values, self.dtype),
            ),
            raw_tensor(
                scale_name,
                param_dims.clone(),
                DataType::Float as i32,
                f32_bytes(&scales),
            ),
            raw_tensor(
                zero_point_name,
                param_dims,
                self.dtype.onnx_type(),
                pack(&zero_points, self.dtype),
            ),
        )
    }

    /// The dequantized values (what the quantized model computes with), for error measurement
    /// and bias correction. A hand-built, inconsistent tensor falls back to its first
    /// parameters (or scale 1, zero point 0 without any) rather than panicking.
    pub fn dequantized(&self) -> Vec<f32> {
        self.values
            .par_iter()
            .with_min_len(PAR_MIN_LEN)
            .enumerate()
            .map(|(i, &q)| dequantize_as(q, self.params_of(i), self.dtype))
            .collect()
    }
}

/// Packs integer values into the dtype's little-endian bytes (values outside the dtype's range
/// saturate rather than wrap).
///
/// 4-bit types go two per byte, the first element in the low nibble (ONNX's order, odd counts
/// padded with 0); FP8 values are codes, one byte each.
pub fn pack(values: &[i32], dtype: QuantDtype) -> Vec<u8> {
    if dtype.float8().is_some() {
        return values.iter().map(|&v| v as u8).collect();
    }
    let (qmin, qmax) = dtype.range(false);
    if dtype.bits() == 4 {
        return values
            .chunks(2)
            .map(|pair| {
                let nibble = |v: i32| (v.clamp(qmin, qmax) as u8) & 0x0F;
                nibble(pair[0]) | pair.get(1).map_or(0, |&v| nibble(v) << 4)
            })
            .collect();
    }
    let mut out = Vec::with_capacity(values.len() * dtype.bits() as usize / 8);
    for &v in values {
        let v = v.clamp(qmin, qmax);
        match dtype {
            QuantDtype::Int8 => out.push(v as i8 as u8),
            QuantDtype::Uint8 => out.push(v as u8),
            QuantDtype::Int16 => out.extend((v as i16).to_le_bytes()),
            QuantDtype::Uint16 => out.extend((v as u16).to_le_bytes()),
            QuantDtype::Int4
            | QuantDtype::Uint4
            | QuantDtype::Float8e4m3fn
            | QuantDtype::Float8e5m2
            | QuantDtype::Ternary
            | QuantDtype::Binary => {
                unreachable!("packed above")
            }
        }
    }
    out
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn raw_tensor(name: &str, dims: Vec<i64>, data_type: i32, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims,
        data_type: Some(data_type),
        raw_data: Some(raw.into()),
        ..Default::default()
    }
}

/// Scale and zero-point TensorProtos of an activation Q/DQ pair: scalar f32 scale and scalar
/// zero point of `dtype`.
pub fn scalar_params_protos(
    p: QParams,
    dtype: QuantDtype,
    scale_name: &str,
    zero_point_name: &str,
) -> (TensorProto, TensorProto) {
    (
        raw_tensor(scale_name, vec![], DataType::Float as i32, f32_bytes(&[p.scale])),
        raw_tensor(zero_point_name, vec![], dtype.onnx_type(), pack(&[p.zero_point], dtype)),
    )
}

/// Outcome of quantizing a bias.
#[derive(Clone, Debug, PartialEq)]
pub enum BiasQuantization {
    /// int32 values with scale `s_in · s_w` (per-tensor: 1 scale; per-channel: one per value),
    /// zero point 0.
    Int32 { values: Vec<i32>, scales: Vec<f32> },
    /// Would overflow int32 (or the scale underflows): keep the bias float.
    KeepFloat { reason: String },
}

/// Quantizes a bias to int32 with scale `s_in · s_w[c]` and zero point 0, the layout integer
/// Conv/Gemm kernels add straight into their int32 accumulators.
///
/// `weight_scales` has 1 (per-tensor) or `bias.len()` (per-channel) entries. The bias scale is
/// the f32 product (what runtimes compare against `s_in · s_w` when fusing); the division and
/// rounding (half to even) are in f64. When any |q| > 2^31 − 1, the scale is 0, subnormal or
/// not finite, or a bias value is not finite, the bias stays float: an int32 accumulator cannot
/// hold it, and a float bias is always correct (TensorRT keeps bias float anyway).
pub fn quantize_bias(bias: &[f32], input_scale: f32, weight_scales: &[f32]) -> BiasQuantization {
    if weight_scales.len() != 1 && weight_scales.len() != bias.len() {
        return BiasQuantization::KeepFloat {
            reason: format!("{} weight scales for {} bias values", weight_scales.len(), bias.len()),
        };
    }
    let scales: Vec<f32> = weight_scales
        .iter()
        .map(|&w| ((input_scale as f64) * (w as f64)) as f32)
        .collect();
    for (c, &s) in scales.iter().enumerate() {
        if !(s.is_finite() && s >= f32::MIN_POSITIVE) {
            let w = weight_scales[c];
            return BiasQuantization::KeepFloat {
                reason: format!("channel {c}: bias scale {input_scale:e} · {w:e} = {s:e} is not a normal positive f32"),
            };
        }
    }
    let mut values = Vec::with_capacity(bias.len());
    for (c, &b) in bias.iter().enumerate() {
        let s = scales[if scales.len() == 1 { 0 } else { c }];
        let q = round_half_even(b as f64 / s as f64);
        if q.is_nan() || q.abs() > i32::MAX as f64 {
            return BiasQuantization::KeepFloat {
                reason: format!("channel {c}: bias {b:e} / scale {s:e} = {q:e} does not fit int32"),
            };
        }
        values.push(q as i32);
    }
    BiasQuantization::Int32 { values, scales }
}

/// The TensorProtos of a quantized bias's DequantizeLinear: int32 data of shape [len], f32
/// scale and int32 zero points (all 0), shape [] for one scale or [C] for per-channel (then the
/// DequantizeLinear needs axis 0). Errors on KeepFloat or a length mismatch (caller bugs).
pub fn bias_protos(
    bias: &BiasQuantization,
    len: usize,
    data_name: &str,
    scale_name: &str,
    zero_point_name: &str,
) -> Result<(TensorProto, TensorProto, TensorProto)> {
    let BiasQuantization::Int32 { values, scales } = bias else {
        return Err(Error::Graph(format!("bias '{data_name}' was not quantized")));
    };
    if values.len() != len || (scales.len() != 1 && scales.len() != len) {
        return Err(Error::Graph(format!(
            "bias '{data_name}': {} values and {} scales for length {len}",
            values.len(),
            scales.len()
        )));
    }
    let param_dims = if scales.len() == 1 {
        vec![]
    } else {
        vec![scales.len() as i64]
    };
    let i32_bytes = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    Ok((
        raw_tensor(data_name, vec![len as i64], DataType::Int32 as i32, i32_bytes(values)),
        raw_tensor(
            scale_name,
            param_dims.clone(),
            DataType::Float as i32,
            f32_bytes(scales),
        ),
        raw_tensor(
            zero_point_name,
            param_dims,
            DataType::Int32 as i32,
            i32_bytes(&vec![0; scales.len()]),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::tensor::{values_f32, values_i128};

    fn scheme(dtype: QuantDtype, symmetric: bool) -> Scheme {
        Scheme {
            dtype,
            symmetric,
            narrow_range: false,
            reduce_range: false,
            bits: None,
        }
    }

    fn f32_of(x: f64) -> f32 {
        x as f32
    }

    #[test]
    fn squared_rounding_error_is_quantize_then_dequantize() {
        let reference = |values: &[f32], p: QParams, scheme: &Scheme| -> f64 {
            let (qmin, qmax) = scheme.qrange();
            values
                .iter()
                .filter(|v| v.is_finite())
                .map(|&v| {
                    let d = dequantize(quantize(v, p, scheme.dtype).clamp(qmin, qmax), p) as f64 - v as f64;
                    d * d
                })
                .sum()
        };
        let mut values: Vec<f32> = (0..4000).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        // Exact half steps, huge and tiny values, non-finite ones (skipped).
        values.extend((-300..300).map(|k| (k as f32 + 0.5) * 0.02));
        values.extend([1e10, -1e10, 3e7, -3e7, 1e-30, f32::NAN, f32::INFINITY, 0.0, -0.0]);
        for (dtype, symmetric) in [
            (QuantDtype::Int8, true),
            (QuantDtype::Int8, false),
            (QuantDtype::Uint8, false),
            (QuantDtype::Uint8, true),
            (QuantDtype::Int16, true),
        ] {
            let s = scheme(dtype, symmetric);
            for (lo, hi) in [(-3.0, 3.0), (-1.0, 2.5), (-0.02, 0.03), (-2.0, 0.0)] {
                let p = params_for_range(lo, hi, &s);
                let fast = squared_rounding_error(&values, p, s.qrange());
                assert_eq!(
                    fast.to_bits(),
                    reference(&values, p, &s).to_bits(),
                    "{dtype:?} {symmetric} [{lo}, {hi}]"
                );
            }
        }
    }

    #[test]
    fn round_half_even_ties() {
        assert_eq!(round_half_even(0.5), 0.0);
        assert_eq!(round_half_even(1.5), 2.0);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(-0.5), 0.0); // −0 == 0
        assert_eq!(round_half_even(-1.5), -2.0);
        assert_eq!(round_half_even(-2.5), -2.0);
        assert_eq!(round_half_even(2.6), 3.0);
    }

    #[test]
    fn quantize_like_quantize_linear() {
        let p = QParams {
            scale: 0.5,
            zero_point: 0,
        };
        assert_eq!(quantize(0.25, p, QuantDtype::Int8), 0); // 0.5 → 0
        assert_eq!(quantize(0.75, p, QuantDtype::Int8), 2); // 1.5 → 2
        assert_eq!(quantize(-0.75, p, QuantDtype::Int8), -2);
        assert_eq!(quantize(1.25, p, QuantDtype::Int8), 2); // 2.5 → 2
        assert_eq!(quantize(100.0, p, QuantDtype::Int8), 127);
        assert_eq!(quantize(-100.0, p, QuantDtype::Int8), -128); // full range, not narrow
        assert_eq!(quantize(f32::INFINITY, p, QuantDtype::Int16), 32767);
        let u = QParams {
            scale: 0.5,
            zero_point: 128,
        };
        assert_eq!(quantize(-1.0, u, QuantDtype::Uint8), 126);
        assert_eq!(quantize(1.0, u, QuantDtype::Uint8), 130);
        assert_eq!(quantize(1000.0, u, QuantDtype::Uint8), 255);
        assert_eq!(quantize(-1000.0, u, QuantDtype::Uint8), 0);
        assert_eq!(quantize(f32::NAN, u, QuantDtype::Uint8), 128);
        assert_eq!(
            quantize(
                1.0,
                QParams {
                    scale: 0.0,
                    zero_point: 3
                },
                QuantDtype::Uint16
            ),
            65535
        );
        assert_eq!(dequantize(126, u), -1.0);
        assert_eq!(
            dequantize(
                i32::MIN,
                QParams {
                    scale: 1.0,
                    zero_point: i32::MAX
                }
            ),
            -(2f32.powi(32))
        );
    }

    #[test]
    fn dtype_ranges() {
        assert_eq!(QuantDtype::Int8.range(false), (-128, 127));
        assert_eq!(QuantDtype::Int8.range(true), (-127, 127));
        assert_eq!(QuantDtype::Uint8.range(true), (0, 255));
        assert_eq!(QuantDtype::Int16.range(true), (-32767, 32767));
        assert_eq!(QuantDtype::Uint16.range(false), (0, 65535));
        assert_eq!(QuantDtype::Int8.reduced_range(), (-64, 64));
        assert_eq!(QuantDtype::Uint8.reduced_range(), (0, 127));
        assert_eq!(QuantDtype::Int8.onnx_type(), DataType::Int8 as i32);
        assert_eq!(
            QuantDtype::from_onnx_type(DataType::Uint16 as i32),
            Some(QuantDtype::Uint16)
        );
        assert_eq!(QuantDtype::from_onnx_type(DataType::Float as i32), None);
        assert_eq!(QuantDtype::Int16.bits(), 16);
        assert!(!QuantDtype::Uint8.is_signed());
        assert_eq!(scheme(QuantDtype::Int8, true).qrange(), (-127, 127));
        assert_eq!(scheme(QuantDtype::Int8, false).qrange(), (-128, 127));
        let json = serde_json::to_string(&scheme(QuantDtype::Uint16, false)).unwrap();
        assert!(json.contains("\"uint16\""), "{json}");
        let back: Scheme = serde_json::from_str(r#"{"dtype":"int8","symmetric":true}"#).unwrap();
        assert_eq!(back, scheme(QuantDtype::Int8, true));
    }

    #[test]
    fn bits_narrow_the_integer_range_inside_the_dtype() {
        let with_bits = |dtype, symmetric, bits| Scheme {
            bits: Some(bits),
            ..scheme(dtype, symmetric)
        };
        // int8 storage, 7 bits: symmetric drops the minimum as the full width does.
        assert_eq!(with_bits(QuantDtype::Int8, true, 7).qrange(), (-63, 63));
        assert_eq!(with_bits(QuantDtype::Int8, false, 7).qrange(), (-64, 63));
        assert_eq!(with_bits(QuantDtype::Uint8, false, 7).qrange(), (0, 127));
        assert_eq!(with_bits(QuantDtype::Int16, true, 12).qrange(), (-2047, 2047));
        assert_eq!(with_bits(QuantDtype::Int4, true, 2).qrange(), (-1, 1));
        // The dtype's own width (or more, which the config refuses) is its full range.
        assert_eq!(with_bits(QuantDtype::Int8, true, 8).qrange(), (-127, 127));
        assert_eq!(with_bits(QuantDtype::Int4, false, 9).qrange(), (-8, 7));
        // Scales follow: symmetric 7-bit [−2, 1] is 2/63; symmetric uint8 in 7 bits has zp 64.
        let p = params_for_range(-2.0, 1.0, &with_bits(QuantDtype::Int8, true, 7));
        assert_eq!(
            p,
            QParams {
                scale: f32_of(2.0 / 63.0),
                zero_point: 0
            }
        );
        let p = params_for_range(-2.0, 1.0, &with_bits(QuantDtype::Uint8, true, 7));
        assert_eq!(
            p,
            QParams {
                scale: f32_of(2.0 / 63.0),
                zero_point: 64
            }
        );
        // Weights are clamped to the narrower range.
        let q = quantize_weights(&[-1.0, 0.5, 1.0], &[3], None, &with_bits(QuantDtype::Int8, true, 5)).unwrap();
        assert!(q.values.iter().all(|v| (-15..=15).contains(v)), "{:?}", q.values);
        assert_eq!(q.values.iter().map(|v| v.abs()).max(), Some(15));
        // Unset: unchanged (and not serialised, so plans print as before).
        let json = serde_json::to_string(&scheme(QuantDtype::Int8, true)).unwrap();
        assert!(!json.contains("bits"), "{json}");
    }

    #[test]
    fn asymmetric_uint8() {
        // [−1, 3]: scale 4/255; zp = round(1 / (4/255)) = round(63.75) = 64.
        let p = params_for_range(-1.0, 3.0, &scheme(QuantDtype::Uint8, false));
        assert_eq!(
            p,
            QParams {
                scale: f32_of(4.0 / 255.0),
                zero_point: 64
            }
        );
        // [0.5, 2] is widened to [0, 2].
        let p = params_for_range(0.5, 2.0, &scheme(QuantDtype::Uint8, false));
        assert_eq!(
            p,
            QParams {
                scale: f32_of(2.0 / 255.0),
                zero_point: 0
            }
        );
        // All negative [−2, −1] → [−2, 0]: zp at the top.
        let p = params_for_range(-2.0, -1.0, &scheme(QuantDtype::Uint8, false));
        assert_eq!(
            p,
            QParams {
                scale: f32_of(2.0 / 255.0),
                zero_point: 255
            }
        );
        // Asymmetric int8 [−1, 3]: zp = round(−128 + 63.75) = −64.
        let p = params_for_range(-1.0, 3.0, &scheme(QuantDtype::Int8, false));
        assert_eq!(
            p,
            QParams {
                scale: f32_of(4.0 / 255.0),
                zero_point: -64
            }
        );
        // Narrow int8 [−1, 4]: scale 5/254, zp = round(−127 + 50.8) = −76.
        let narrow = Scheme {
            narrow_range: true,
            ..scheme(QuantDtype::Int8, false)
        };
        assert_eq!(
            params_for_range(-1.0, 4.0, &narrow),
            QParams {
                scale: f32_of(5.0 / 254.0),
                zero_point: -76
            }
        );
        // The ends land on qmin / qmax in the runtime's arithmetic.
        let p = params_for_range(-1.0, 3.0, &scheme(QuantDtype::Uint8, false));
        assert_eq!(quantize(-1.0, p, QuantDtype::Uint8), 0);
        assert_eq!(quantize(3.0, p, QuantDtype::Uint8), 255);
        assert_eq!(quantize(0.0, p, QuantDtype::Uint8), 64);
    }

    #[test]
    fn symmetric_and_reduced() {
        // Symmetric int8 [−2, 1]: amax 2, scale 2/127, zp 0; narrow changes nothing.
        let p = params_for_range(-2.0, 1.0, &scheme(QuantDtype::Int8, true));
        assert_eq!(
            p,
            QParams {
                scale: f32_of(2.0 / 127.0),
                zero_point: 0
            }
        );
        let narrow = Scheme {
            narrow_range: true,
            ..scheme(QuantDtype::Int8, true)
        };
        assert_eq!(params_for_range(-2.0, 1.0, &narrow), p);
        assert_eq!(quantize(-2.0, p, QuantDtype::Int8), -127);
        // Reduce range int8 (ORT: −64..64): scale 2/64.
        let reduced = Scheme {
            reduce_range: true,
            ..scheme(QuantDtype::Int8, true)
        };
        assert_eq!(reduced.qrange(), (-64, 64));
        assert_eq!(
            params_for_range(-2.0, 1.0, &reduced),
            QParams {
                scale: 2.0 / 64.0,
                zero_point: 0
            }
        );
        // Reduce range uint8 asymmetric [−1, 3]: 0..127, scale 4/127, zp round(31.75) = 32.
        let reduced_u8 = Scheme {
            reduce_range: true,
            ..scheme(QuantDtype::Uint8, false)
        };
        assert_eq!(
            params_for_range(-1.0, 3.0, &reduced_u8),
            QParams {
                scale: f32_of(4.0 / 127.0),
                zero_point: 32
            }
        );
        // Symmetric uint8: zp 128, scale amax/127, both ends exact.
        let p = params_for_range(-2.0, 1.0, &scheme(QuantDtype::Uint8, true));
        assert_eq!(
            p,
            QParams {
                scale: f32_of(2.0 / 127.0),
                zero_point: 128
            }
        );
        assert_eq!(quantize(2.0, p, QuantDtype::Uint8), 255);
        assert_eq!(quantize(-2.0, p, QuantDtype::Uint8), 1);
        let reduced_su8 = Scheme {
            reduce_range: true,
            ..scheme(QuantDtype::Uint8, true)
        };
        assert_eq!(
            params_for_range(-2.0, 1.0, &reduced_su8),
            QParams {
                scale: f32_of(2.0 / 63.0),
                zero_point: 64
            }
        );
    }

    #[test]
    fn sixteen_bit() {
        let p = params_for_range(-3.0, 1.0, &scheme(QuantDtype::Int16, true));
        assert_eq!(
            p,
            QParams {
                scale: f32_of(3.0 / 32767.0),
                zero_point: 0
            }
        );
        // uint16 [−1, 3]: scale 4/65535, zp = round(65535/4) = round(16383.75) = 16384.
        let p = params_for_range(-1.0, 3.0, &scheme(QuantDtype::Uint16, false));
        assert_eq!(
            p,
            QParams {
                scale: f32_of(4.0 / 65535.0),
                zero_point: 16384
            }
        );
        let p = params_for_range(-1.0, 3.0, &scheme(QuantDtype::Uint16, true));
        assert_eq!(
            p,
            QParams {
                scale: f32_of(3.0 / 32767.0),
                zero_point: 32768
            }
        );
    }

    #[test]
    fn degenerate_ranges() {
        for s in [
            scheme(QuantDtype::Uint8, false),
            scheme(QuantDtype::Int8, true),
            scheme(QuantDtype::Uint16, true),
            scheme(QuantDtype::Int16, false),
        ] {
            // Constant 3.0: finite positive scale, 3.0 round-trips within scale/2.
            let p = params_for_range(3.0, 3.0, &s);
            assert!(p.is_valid(), "{p:?}");
            let back = dequantize(quantize(3.0, p, s.dtype), p);
            assert!((back - 3.0).abs() <= p.scale / 2.0, "{s:?} {p:?} {back}");
            // All zero: widened to MIN_RANGE, 0 exact.
            let p = params_for_range(0.0, 0.0, &s);
            assert!(p.is_valid(), "{p:?}");
            assert_eq!(dequantize(quantize(0.0, p, s.dtype), p), 0.0);
            // Tiny constant: still inside the widened range.
            let p = params_for_range(1e-7, 1e-7, &s);
            let back = dequantize(quantize(1e-7, p, s.dtype), p);
            assert!((back - 1e-7).abs() <= p.scale / 2.0, "{s:?} {p:?} {back}");
            // Garbage bounds never give a bad scale.
            for (lo, hi) in [
                (f32::NAN, f32::NAN),
                (f32::NEG_INFINITY, f32::INFINITY),
                (f32::INFINITY, f32::NEG_INFINITY),
                (-f32::MAX, f32::MAX),
                (-1e-40, 1e-40),
                (5.0, -5.0),
            ] {
                let p = params_for_range(lo, hi, &s);
                assert!(p.is_valid(), "{lo} {hi} {p:?}");
                let (qmin, qmax) = s.qrange();
                assert!((qmin..=qmax).contains(&p.zero_point), "{lo} {hi} {p:?}");
            }
        }
        let p = params_for_range(0.0, 0.0, &scheme(QuantDtype::Uint8, false));
        assert_eq!(
            p,
            QParams {
                scale: f32_of(MIN_RANGE as f64 / 255.0),
                zero_point: 0
            }
        );
        // Empty statistics (lo = +inf, hi = −inf) mean nothing observed: [0, MIN_RANGE].
        assert_eq!(
            params_for_range(f32::INFINITY, f32::NEG_INFINITY, &scheme(QuantDtype::Uint8, false)),
            p
        );
        assert_eq!(stored_scale(0.0), f32::MIN_POSITIVE);
        assert_eq!(stored_scale(1e-40), f32::MIN_POSITIVE);
        assert_eq!(stored_scale(f64::NAN), f32::MIN_POSITIVE);
        assert_eq!(stored_scale(1e300), f32::MAX);
    }

    fn assert_within_half_step(q: &QuantizedTensor, original: &[f32], channel_of: impl Fn(usize) -> usize) {
        let deq = q.dequantized();
        assert_eq!(deq.len(), original.len());
        for (i, (&d, &x)) in deq.iter().zip(original).enumerate() {
            let s = q.params[channel_of(i)].scale;
            assert!((d - x).abs() <= s / 2.0, "element {i}: {x} → {d} (scale {s})");
        }
    }

    #[test]
    fn per_channel_weights() {
        let s8 = scheme(QuantDtype::Int8, true);
        // [2, 3] on axis 0: channel 0 amax 1, channel 1 amax 0.4.
        let w = [-1.0, 0.3, 0.6, 0.1, -0.3, 0.4];
        let q = quantize_weights(&w, &[2, 3], Some(0), &s8).unwrap();
        let scales = [f32_of(1.0 / 127.0), f32_of(0.4f32 as f64 / 127.0)];
        assert_eq!(q.params.iter().map(|p| p.scale).collect::<Vec<_>>(), scales);
        assert!(q.params.iter().all(|p| p.zero_point == 0));
        // 0.3·127 = 38.1, 0.6·127 = 76.2; 0.1/0.4·127 = 31.75, −95.25, 127.
        assert_eq!(q.values, [-127, 38, 76, 32, -95, 127]);
        assert_within_half_step(&q, &w, |i| i / 3);

        // The same channels as columns of a [3, 2] tensor, axis 1.
        let wt = [-1.0, 0.1, 0.3, -0.3, 0.6, 0.4];
        let qt = quantize_weights(&wt, &[3, 2], Some(1), &s8).unwrap();
        assert_eq!(qt.params, q.params);
        assert_eq!(qt.values, [-127, 32, 38, -95, 76, 127]);
        assert_within_half_step(&qt, &wt, |i| i % 2);

        // Per-tensor: one scale 1/127.
        let qp = quantize_weights(&w, &[2, 3], None, &s8).unwrap();
        assert_eq!(
            qp.params,
            [QParams {
                scale: f32_of(1.0 / 127.0),
                zero_point: 0
            }]
        );
        assert_eq!(qp.values, [-127, 38, 76, 13, -38, 51]);
        assert_within_half_step(&qp, &w, |_| 0);

        // Asymmetric uint8 per channel: channel 1 [−0.3, 0.4] → scale 0.7/255, zp round(109.28...) = 109.
        let u8a = scheme(QuantDtype::Uint8, false);
        let qa = quantize_weights(&w, &[2, 3], Some(0), &u8a).unwrap();
        assert_eq!(qa.params[1].zero_point, 109);
        assert_eq!(qa.values[4], 0);
        assert_eq!(qa.values[5], 255);
        assert_within_half_step(&qa, &w, |i| i / 3);

        // Middle axis of a [2, 2, 2] tensor.
        let w3 = [1.0, 2.0, -4.0, 8.0, 0.5, -1.0, 2.0, 3.0];
        let q3 = quantize_weights(&w3, &[2, 2, 2], Some(1), &s8).unwrap();
        assert_eq!(q3.params[0].scale, f32_of(2.0 / 127.0));
        assert_eq!(q3.params[1].scale, f32_of(8.0 / 127.0));
        assert_within_half_step(&q3, &w3, |i| (i / 2) % 2);
    }

    #[test]
    fn per_tensor_range_minimises_squared_error() {
        let s8 = scheme(QuantDtype::Int8, true);
        let squared_error = |q: &QuantizedTensor, w: &[f32]| -> f64 {
            q.dequantized()
                .iter()
                .zip(w)
                .map(|(&d, &x)| ((d - x) as f64).powi(2))
                .sum()
        };
        // Laplace-distributed weights (the inverse CDF on a regular grid): the largest of 10⁵
        // sits at 11.5 b, where 8 bits lose more to coarse steps than clipping costs.
        let n = 100_000;
        let w: Vec<f32> = (0..n)
            .map(|i| {
                let u = (i as f64 + 0.5) / n as f64 * 2.0 - 1.0;
                (-u.signum() * (1.0 - u.abs()).ln()) as f32
            })
            .collect();
        let q = quantize_weights(&w, &[n as i64], None, &s8).unwrap();
        let (lo, hi) = w.iter().fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
        let minmax = params_for_range(lo, hi, &s8);
        let q_minmax = QuantizedTensor {
            values: w
                .iter()
                .map(|&v| quantize(v, minmax, QuantDtype::Int8).clamp(-127, 127))
                .collect(),
            params: vec![minmax],
            ..q.clone()
        };
        assert!(
            q.params[0].scale < 0.9 * minmax.scale,
            "{:?} vs {minmax:?}",
            q.params[0]
        );
        assert!(
            squared_error(&q, &w) < 0.9 * squared_error(&q_minmax, &w),
            "{} vs {}",
            squared_error(&q, &w),
            squared_error(&q_minmax, &w)
        );
        // The widest weights are clipped, never wrapped.
        assert_eq!(q.values.iter().max(), Some(&127));
        assert_eq!(q.values.iter().min(), Some(&-127));
        // Evenly spread weights keep their min/max range: shrinking only clips.
        let even: Vec<f32> = (0..=254).map(|i| (i as f32 - 127.0) / 127.0).collect();
        let qe = quantize_weights(&even, &[255], None, &s8).unwrap();
        assert_eq!(qe.params[0], params_for_range(-1.0, 1.0, &s8));
        assert_within_half_step(&qe, &even, |_| 0);
    }

    #[test]
    fn weight_errors_and_edges() {
        let s8 = scheme(QuantDtype::Int8, true);
        assert!(quantize_weights(&[1.0, 2.0], &[3], None, &s8).is_err());
        assert!(quantize_weights(&[1.0, 2.0], &[2], Some(1), &s8).is_err());
        assert!(quantize_weights(&[1.0], &[-1], None, &s8).is_err());
        let scalar = quantize_weights(&[0.5], &[], None, &s8).unwrap();
        assert_eq!(scalar.values, [127]);
        let empty = quantize_weights(&[], &[0, 3], Some(0), &s8).unwrap();
        assert!(empty.params.is_empty() && empty.values.is_empty());
        // NaN weights neither panic nor poison the scale.
        let nan = quantize_weights(&[f32::NAN, 1.0], &[2], None, &s8).unwrap();
        assert_eq!(nan.values, [0, 127]);
        // Reduced range weights never exceed 64 in magnitude.
        let reduced = Scheme {
            reduce_range: true,
            ..scheme(QuantDtype::Int8, false)
        };
        let r = quantize_weights(&[-1.0, 0.3, 1.0], &[3], None, &reduced).unwrap();
        assert!(r.values.iter().all(|v| (-64..=64).contains(v)), "{:?}", r.values);
        // Reduced uint8 [−15.75, 47.75]: scale 63.5/127 = 0.5 exactly, zp = round(31.5) = 32, and
        // 47.75 → round(95.5) + 32 = 128, one past 0..127: clamped.
        let reduced_u8 = Scheme {
            reduce_range: true,
            ..scheme(QuantDtype::Uint8, false)
        };
        let r = quantize_weights(&[-15.75, 47.75], &[2], None, &reduced_u8).unwrap();
        assert_eq!(
            r.params,
            [QParams {
                scale: 0.5,
                zero_point: 32
            }]
        );
        assert_eq!(r.values, [0, 127]);
        // A hand-built inconsistent tensor dequantizes without panicking.
        let broken = QuantizedTensor {
            dims: vec![5],
            values: vec![1, 2],
            params: vec![],
            axis: Some(3),
            block_size: None,
            dtype: QuantDtype::Int8,
        };
        assert_eq!(broken.dequantized(), [1.0, 2.0]);
    }

    #[test]
    fn large_weight_parallel_path() {
        let n = 3 * PAR_MIN_LEN + 7;
        let w: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32 - 500.0) / 100.0).collect();
        let q = quantize_weights(&w, &[n as i64], None, &scheme(QuantDtype::Uint8, false)).unwrap();
        assert_eq!(q.params[0].scale, f32_of(((499.0f32 / 100.0) as f64 + 5.0) / 255.0));
        assert_within_half_step(&q, &w, |_| 0);
    }

    #[test]
    fn bias() {
        match quantize_bias(&[1.0, -0.5], 0.1, &[0.01, 0.02]) {
            BiasQuantization::Int32 { values, scales } => {
                assert_eq!(values, [1000, -250]);
                assert_eq!(scales, [0.1f32 * 0.01f32, 0.1f32 * 0.02f32]);
            }
            other => panic!("{other:?}"),
        }
        // Per-tensor weight scale: one bias scale for all values.
        match quantize_bias(&[0.5, 0.25], 0.5, &[0.5]) {
            BiasQuantization::Int32 { values, scales } => {
                assert_eq!(values, [2, 1]);
                assert_eq!(scales, [0.25]);
            }
            other => panic!("{other:?}"),
        }
        let overflow = quantize_bias(&[0.0, 1e9], 1e-3, &[1e-3, 1e-3]);
        let BiasQuantization::KeepFloat { reason } = overflow else {
            panic!("{overflow:?}")
        };
        assert!(reason.contains("channel 1") && reason.contains("1e9"), "{reason}");
        let underflow = quantize_bias(&[1.0], 1e-30, &[1e-20]);
        assert!(matches!(underflow, BiasQuantization::KeepFloat { .. }), "{underflow:?}");
        assert!(matches!(
            quantize_bias(&[f32::NAN], 1.0, &[1.0]),
            BiasQuantization::KeepFloat { .. }
        ));
        assert!(matches!(
            quantize_bias(&[1.0, 2.0, 3.0], 1.0, &[1.0, 1.0]),
            BiasQuantization::KeepFloat { .. }
        ));

        let q = quantize_bias(&[1.0, -0.5], 0.1, &[0.01, 0.02]);
        let (data, scale, zp) = bias_protos(&q, 2, "b::q", "b::s", "b::zp").unwrap();
        assert_eq!(data.dims, [2]);
        assert_eq!(data.data_type, Some(DataType::Int32 as i32));
        assert_eq!(values_i128(&data).unwrap(), [1000, -250]);
        assert_eq!(scale.dims, [2]);
        assert_eq!(zp.dims, [2]);
        assert_eq!(values_i128(&zp).unwrap(), [0, 0]);
        assert!(bias_protos(&q, 3, "b::q", "b::s", "b::zp").is_err());
        assert!(bias_protos(&underflow, 1, "b::q", "b::s", "b::zp").is_err());
        let one = quantize_bias(&[0.5, 0.25], 0.5, &[0.5]);
        let (_, scale, zp) = bias_protos(&one, 2, "b::q", "b::s", "b::zp").unwrap();
        assert!(scale.dims.is_empty() && zp.dims.is_empty());
    }

    #[test]
    fn protos() {
        let t = QuantizedTensor {
            dims: vec![2, 2],
            values: vec![-1, 127, -128, 5],
            params: vec![
                QParams {
                    scale: 0.5,
                    zero_point: 0,
                },
                QParams {
                    scale: 0.25,
                    zero_point: -1,
                },
            ],
            axis: Some(0),
            block_size: None,
            dtype: QuantDtype::Int8,
        };
        let (data, scale, zp) = t.to_protos("w::q", "w::s", "w::zp");
        assert_eq!(data.name.as_deref(), Some("w::q"));
        assert_eq!(data.dims, [2, 2]);
        assert_eq!(data.data_type, Some(DataType::Int8 as i32));
        assert_eq!(data.raw_data.as_deref(), Some(&[0xFF, 0x7F, 0x80, 0x05][..]));
        assert_eq!(scale.dims, [2]);
        assert_eq!(scale.data_type, Some(DataType::Float as i32));
        assert_eq!(values_f32(&scale).unwrap(), [0.5, 0.25]);
        assert_eq!(zp.dims, [2]);
        assert_eq!(zp.data_type, Some(DataType::Int8 as i32));
        assert_eq!(zp.raw_data.as_deref(), Some(&[0x00, 0xFF][..]));
        assert_eq!(t.dequantized(), [-0.5, 63.5, -31.75, 1.5]);

        let u = QuantizedTensor {
            dims: vec![2],
            values: vec![1, 258],
            params: vec![QParams {
                scale: 2.0,
                zero_point: 32768,
            }],
            axis: None,
            block_size: None,
            dtype: QuantDtype::Uint16,
        };
        let (data, scale, zp) = u.to_protos("u::q", "u::s", "u::zp");
        assert_eq!(data.data_type, Some(DataType::Uint16 as i32));
        assert_eq!(data.raw_data.as_deref(), Some(&[1, 0, 2, 1][..]));
        assert!(scale.dims.is_empty() && zp.dims.is_empty());
        assert_eq!(zp.data_type, Some(DataType::Uint16 as i32));
        assert_eq!(zp.raw_data.as_deref(), Some(&[0x00, 0x80][..]));
        assert_eq!(pack(&[-40000, 40000], QuantDtype::Int16), [0x00, 0x80, 0xFF, 0x7F]);

        let (s, z) = scalar_params_protos(
            QParams {
                scale: 0.1,
                zero_point: 200,
            },
            QuantDtype::Uint8,
            "a::s",
            "a::zp",
        );
        assert!(s.dims.is_empty() && z.dims.is_empty());
        assert_eq!(s.raw_data.as_deref(), Some(&0.1f32.to_le_bytes()[..]));
        assert_eq!(z.data_type, Some(DataType::Uint8 as i32));
        assert_eq!(z.raw_data.as_deref(), Some(&[200][..]));
        assert_eq!(z.name.as_deref(), Some("a::zp"));
    }
}
