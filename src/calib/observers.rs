//! Streaming, mergeable statistics of one activation tensor, and the maths that turns them into
//! a clipping range `(lo, hi)` for quantization.
//!
//! # What is kept
//! Per tensor ([`TensorStats`]): the exact min and max, the value count, each sample's own
//! (min, max) (for EMA), per-channel (axis 1) min/max/sum/sum of squares, and a [`Histogram`].
//! Every part merges exactly, so samples can be observed on any thread and joined afterwards;
//! min, max, histogram and the EMA do not depend on the merge order at all (per-channel sums
//! only up to f64 rounding).
//!
//! # The histogram
//! Bins have width `w = 2^e` on a grid anchored at 0: bin `k` covers `[k·w, (k+1)·w)`, so
//! `k = floor(x / w)`. When values fall outside the window of at most [`HISTOGRAM_BINS`] bins the
//! width doubles (`e += 1`, `k -> floor(k / 2)`, adjacent bins merge). Because
//! `floor(floor(x / 2^e) / 2) = floor(x / 2^(e+1))`, and `e` starts at the fixed
//! [`MIN_EXPONENT`] and only grows when the values no longer fit, the histogram is a pure
//! function of the multiset of values: adding in one call or many, or merging in any order,
//! gives identical bins.
//!
//! # Range methods
//! All histogram methods work on |x|: the histogram folds exactly onto |x| (bin `k >= 0` and bin
//! `-1-k` both cover |x| in `[k·w, (k+1)·w)`). A method picks a threshold `T` on |x| and the range
//! is `lo = max(min, -T)`, `hi = min(max, T)` with the exact observed extremes, so a non-negative
//! tensor keeps its true minimum and a small negative tail (HardSwish: -0.375) is not widened.
//! `levels`, the number of quantization steps on the |x| side, is `2^(bits-1)` when the tensor has
//! negative values and `2^bits` when it is non-negative.
//!
//! - **minmax**: `(min, max)`.
//! - **ema**: the exponential moving average of the per-sample extremes, in sample order:
//!   `m_1 = x_1`, `m_n = m_{n-1} + c·(x_n − m_{n-1})` (c = 0.01 by convention), as in quantization-
//!   aware training (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
//!   Integer-Arithmetic-Only Inference"; TensorFlow's `MovingAverageQuantize`).
//! - **percentile**: the smallest bin edge `T` with `#{|x| <= T} >= p/100 · N`.
//! - **entropy**: TensorRT's calibration (Szymon Migacz, "8-bit Inference with TensorRT", GTC
//!   2017). The |x| histogram is coarsened by an integer factor to at most [`SEARCH_BINS`] (2048)
//!   bins, and bin 0 (where a Relu's exact zeros pile up) is levelled to bin 1's count, as in
//!   NVIDIA's pytorch-quantization: zero is exact at any threshold. For each `i` in `levels..=nbins`: `P` = bins `0..i` with the mass of all bins `>= i`
//!   added to bin `i-1` (outliers clipped onto the edge); `Q` = bins `0..i` without the outliers,
//!   split into `levels` contiguous groups as evenly as possible, each group's total spread
//!   uniformly over the bins where `P` is non-zero (as MXNet and ONNX Runtime do). Choose the `i`
//!   minimising `KL(P||Q) = Σ_{p>0} p̂·ln(p̂/q̂)` (normalised `p̂`, `q̂`); `T = i·W`. A `Q` bin
//!   that is zero where `P` is not (only the edge bin, when its whole group is empty) gets
//!   ε = 1e-4 counts, ONNX Runtime's smoothing constant; a candidate whose `Q` is entirely empty
//!   is skipped; ties go to the smallest `i`. As in TensorRT, `T` is never below
//!   `levels/nbins` of the |x| maximum, and a flat bulk costs no divergence at any grouping, so
//!   with 8 bits outliers far from a uniform bulk are kept; a peaked bulk (Gaussian, Laplace)
//!   gets them clipped.
//! - **mse**: the `T` minimising the expected squared error over the coarsened |x| histogram,
//!   `E(T) = Σ_bins n·(c − T)²` for bin centres `c > T` (clipping) plus `Σ n·Δ²/12` for `c <= T`
//!   (uniform rounding noise of step `Δ = T/levels`), searched over every bin upper edge from the
//!   first occupied bin, ties to the smallest `T` (MSE-optimal clipping, e.g. Banner et al. 2019,
//!   "Post-training 4-bit quantization of convolutional networks for rapid-deployment"; for a
//!   Laplace(b) tensor this gives their α* = 9.89b at 8 bits and 5.03b at 4 bits).
//! - **auto** (the default): per tensor, the range `[max(min, −T), min(max, T)]` over the same
//!   candidate `T`s with the least expected squared error on the tensor's own values, now on the
//!   signed histogram and the asymmetric grid activations get (`2^bits − 1` steps over
//!   `[lo, hi]`: clipped values cost `(x − bound)²`, kept ones `Δ²/12`), taken only when it
//!   lowers that error by at least [`AUTO_MIN_GAIN_DB`] against `(min, max)`; otherwise
//!   `(min, max)`. So a tensor whose range a few outliers stretch is clipped, one whose tail
//!   holds real signal is not.
//!
//! Degenerate inputs never give NaN or `lo > hi`: empty statistics give `(0, 0)` and a constant
//! tensor `(c, c)` for every method (the quantizer widens a zero-width range, not this module).

use serde::{Deserialize, Serialize};

/// Most bins a [`Histogram`] holds; past that its bins double in width.
pub const HISTOGRAM_BINS: usize = 8192;
/// Bins of the folded |x| histogram that entropy and MSE search (TensorRT's 2048).
pub const SEARCH_BINS: usize = 2048;
/// Exponent of an empty histogram: the finest bin width is 2^-40.
pub const MIN_EXPONENT: i32 = -40;
/// Bin indices stay below 2^52, exact in f64 and far from i64 overflow. Like the bin count this
/// limit is a property of the values alone, so it keeps the histogram order-independent.
const MAX_BIN_INDEX: f64 = (1u64 << 52) as f64;
/// Bounds the coarsening loop (f32::MAX needs about 77) even for a corrupted deserialised histogram.
const MAX_EXPONENT: i32 = 200;
/// KL search: a `Q` bin that is empty where `P` is not gets this many counts (ONNX Runtime's
/// smoothing epsilon, also in count units), so clipping onto an empty group costs
/// `p·ln(p/ε)` instead of infinity.
const KL_EPSILON: f64 = 1e-4;
pub const DEFAULT_EMA_CONSTANT: f64 = 0.01;
pub const DEFAULT_PERCENTILE: f64 = 99.99;
pub const DEFAULT_BITS: u32 = 8;

/// 2^n, exact for the exponents used here (no rounding: a power of two is a single bit).
fn pow2(n: i32) -> f64 {
    2f64.powi(n)
}

/// `floor(x · inv_width)` without a libm call: truncate, then step down for negative fractions.
#[inline(always)]
fn bin_index(x: f64, inv_width: f64) -> i64 {
    let t = x * inv_width;
    let k = t as i64;
    if (k as f64) > t {
        k - 1
    } else {
        k
    }
}

/// Whether [`simd::count_bins`] gives the bins `bin_index` would for values whose bins lie in
/// `[lo, hi]` at `exponent`: with a bin width of at most 1 the product `x · 2^-exponent` is an
/// exact f32 (a power-of-two scaling that cannot overflow when |bin| <= 2^24, nor lose bits to
/// underflow when scaling up), so its f32 floor is the f64 one; the slots and the per-way counts
/// fit in 32 bits.
fn f32_bins_are_exact(exponent: i32, lo: i64, hi: i64, values: usize) -> bool {
    const BOUND: i64 = 1 << 24;
    exponent <= 0 && lo >= -BOUND && hi <= BOUND && values <= u32::MAX as usize
}

thread_local! {
    /// [`simd::count_bins`]'s per-way counts, kept between calls (at most 128 KiB a thread).
    static SCRATCH: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The observation kernels compiled for AVX2, chosen at run time when the CPU has it (the
/// crate is built for baseline x86-64, SSE2). Each is the portable kernel's code, so the results
/// are bit-identical: the same lanes in the same order, no reassociation, no fused multiply-add.
#[cfg(target_arch = "x86_64")]
mod simd {
    /// Whether the CPU runs AVX2 (detected once, then a cached flag).
    #[inline]
    pub(super) fn avx2() -> bool {
        std::is_x86_feature_detected!("avx2")
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn extremes(values: &[f32]) -> (f32, f32, bool) {
        super::extremes_lanes(values)
    }

    /// [`super::slice_moments_lanes`] written out: its eight lanes are one f32 vector for the
    /// extremes and two f64 vectors each for the sums (the compiler's own vectorisation of it
    /// shuffled every lane). `min_ps(v, m)` is `v < m ? v : m` and `max_ps(v, m)` is
    /// `v > m ? v : m`, the portable comparisons exactly; the sums add the same values in the
    /// same order, and the lanes are reduced by the same code.
    #[target_feature(enable = "avx2")]
    pub(super) fn slice_moments(values: &[f32]) -> (f32, f32, f64, f64) {
        use std::arch::x86_64::*;
        const LANES: usize = 8;
        let chunks = values.chunks_exact(LANES);
        let rest = chunks.remainder();
        let (mut mins, mut maxs) = (_mm256_set1_ps(f32::INFINITY), _mm256_set1_ps(f32::NEG_INFINITY));
        let (mut sums_lo, mut sums_hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let (mut squares_lo, mut squares_hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        for chunk in chunks {
            // SAFETY: a chunk holds eight f32.
            let v = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
            mins = _mm256_min_ps(v, mins);
            maxs = _mm256_max_ps(v, maxs);
            let (lo, hi) = (
                _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
            );
            sums_lo = _mm256_add_pd(sums_lo, lo);
            sums_hi = _mm256_add_pd(sums_hi, hi);
            squares_lo = _mm256_add_pd(squares_lo, _mm256_mul_pd(lo, lo));
            squares_hi = _mm256_add_pd(squares_hi, _mm256_mul_pd(hi, hi));
        }
        let (mut min_lanes, mut max_lanes) = ([0f32; LANES], [0f32; LANES]);
        let (mut sum_lanes, mut square_lanes) = ([0f64; LANES], [0f64; LANES]);
        // SAFETY: each array holds the eight lanes stored into it.
        unsafe {
            _mm256_storeu_ps(min_lanes.as_mut_ptr(), mins);
            _mm256_storeu_ps(max_lanes.as_mut_ptr(), maxs);
            _mm256_storeu_pd(sum_lanes.as_mut_ptr(), sums_lo);
            _mm256_storeu_pd(sum_lanes.as_mut_ptr().add(4), sums_hi);
            _mm256_storeu_pd(square_lanes.as_mut_ptr(), squares_lo);
            _mm256_storeu_pd(square_lanes.as_mut_ptr().add(4), squares_hi);
        }
        super::finish_moments(rest, min_lanes, max_lanes, sum_lanes, square_lanes)
    }

    /// `floor(x · inv_width) − lo`, eight values at a time (the compiler scalarises a
    /// saturating float-to-int cast; `cvttps2dq` gives i32::MIN out of range, a skipped slot).
    #[target_feature(enable = "avx2")]
    fn bin_slots(values: &[f32], inv_width: f32, lo: i32, slots: &mut [u32]) {
        use std::arch::x86_64::*;
        let n = values.len().min(slots.len());
        let (scale, base) = (_mm256_set1_ps(inv_width), _mm256_set1_epi32(lo));
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, so eight values and eight slots from i are in bounds.
            unsafe {
                let x = _mm256_loadu_ps(values.as_ptr().add(i));
                let k = _mm256_cvttps_epi32(_mm256_floor_ps(_mm256_mul_ps(x, scale)));
                _mm256_storeu_si256(slots.as_mut_ptr().add(i).cast::<__m256i>(), _mm256_sub_epi32(k, base));
            }
            i += 8;
        }
        for (slot, &x) in slots[i..n].iter_mut().zip(&values[i..n]) {
            *slot = ((x * inv_width).floor() as i32).wrapping_sub(lo) as u32;
        }
    }

    /// Adds each value's bin `floor(x · inv_width)` to `counts` (bin `lo` first) and returns
    /// how many landed in it; see [`super::f32_bins_are_exact`] for when this equals the f64
    /// computation. Slots are computed a block at a time, then counted into four interleaved
    /// u32 histograms: runs of one bin (a Relu's zeros) would otherwise chain every increment
    /// through the same counter in memory.
    #[target_feature(enable = "avx2")]
    pub(super) fn count_bins(
        values: &[f32],
        inv_width: f32,
        lo: i32,
        counts: &mut [u64],
        scratch: &mut Vec<u32>,
    ) -> u64 {
        const BLOCK: usize = 512;
        let len = counts.len();
        scratch.clear();
        scratch.resize(4 * len, 0);
        let (first, second) = scratch.split_at_mut(2 * len);
        let (w0, w1) = first.split_at_mut(len);
        let (w2, w3) = second.split_at_mut(len);
        let bump = |way: &mut [u32], slot: u32| {
            if let Some(c) = way.get_mut(slot as usize) {
                *c += 1;
            }
        };
        let mut slots = [0u32; BLOCK];
        for chunk in values.chunks(BLOCK) {
            let slots = &mut slots[..chunk.len()];
            bin_slots(chunk, inv_width, lo, slots);
            let mut quads = slots.chunks_exact(4);
            for q in &mut quads {
                bump(w0, q[0]);
                bump(w1, q[1]);
                bump(w2, q[2]);
                bump(w3, q[3]);
            }
            for &slot in quads.remainder() {
                bump(w0, slot);
            }
        }
        let mut added = 0u64;
        for (j, c) in counts.iter_mut().enumerate() {
            let n = w0[j] as u64 + w1[j] as u64 + w2[j] as u64 + w3[j] as u64;
            *c += n;
            added += n;
        }
        added
    }
}

/// `floor(k / 2^shift)` for any shift (an arithmetic shift is a floor division).
fn shift_floor(k: i64, shift: i64) -> i64 {
    if shift <= 0 {
        k
    } else if shift >= 63 {
        if k < 0 {
            -1
        } else {
            0
        }
    } else {
        k >> shift
    }
}

/// Min and max of the finite values (None when there are none). The slow path, for input
/// known to hold a NaN or infinity.
fn finite_extremes(values: &[f32]) -> Option<(f32, f32)> {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in values.iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    (lo <= hi).then_some((lo, hi))
}

/// `(min, max, all finite)` in one pass. Independent lanes and plain comparisons (not
/// `f32::min`, whose NaN rules block SIMD) let it vectorise; the extremes are only meaningful
/// when everything is finite.
fn extremes(values: &[f32]) -> (f32, f32, bool) {
    #[cfg(target_arch = "x86_64")]
    if simd::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { simd::extremes(values) };
    }
    extremes_lanes(values)
}

#[inline(always)]
fn extremes_lanes(values: &[f32]) -> (f32, f32, bool) {
    const LANES: usize = 16;
    let mut mins = [f32::INFINITY; LANES];
    let mut maxs = [f32::NEG_INFINITY; LANES];
    let mut all_finite = true;
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for j in 0..LANES {
            let v = chunk[j];
            mins[j] = if v < mins[j] { v } else { mins[j] };
            maxs[j] = if v > maxs[j] { v } else { maxs[j] };
            all_finite &= v.abs() < f32::INFINITY;
        }
    }
    for &v in rest {
        mins[0] = if v < mins[0] { v } else { mins[0] };
        maxs[0] = if v > maxs[0] { v } else { maxs[0] };
        all_finite &= v.abs() < f32::INFINITY;
    }
    let lo = mins.iter().fold(f32::INFINITY, |a, &b| a.min(b));
    let hi = maxs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    (lo, hi, all_finite)
}

/// Min and max, or the first non-finite value with its index (located by a second pass, only
/// in that rare case).
fn scan_finite(values: &[f32]) -> Result<(f32, f32), (usize, f32)> {
    let (lo, hi, all_finite) = extremes(values);
    match all_finite {
        true => Ok((lo, hi)),
        false => first_non_finite(values).map_or(Ok((lo, hi)), Err),
    }
}

fn first_non_finite(values: &[f32]) -> Option<(usize, f32)> {
    values
        .iter()
        .position(|v| !v.is_finite())
        .map(|index| (index, values[index]))
}

/// A histogram on a power-of-two grid anchored at 0, exactly mergeable (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Bin width is 2^exponent; bin k covers [k·w, (k+1)·w). Grid anchored at 0.
    pub exponent: i32,
    /// Index (k) of counts[0].
    pub start: i64,
    /// Occupied span only: the first and last entries are non-zero. At most [`HISTOGRAM_BINS`].
    pub counts: Vec<u64>,
    pub total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            exponent: MIN_EXPONENT,
            start: 0,
            counts: Vec::new(),
            total: 0,
        }
    }

    pub fn from_values(values: &[f32]) -> Histogram {
        let mut h = Histogram::new();
        h.add(values);
        h
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    pub fn bin_width(&self) -> f64 {
        pow2(self.exponent)
    }

    /// Lower edge of the first occupied bin and upper edge of the last (None when empty).
    pub fn observed_range(&self) -> Option<(f64, f64)> {
        let end = self.end()?;
        let w = self.bin_width();
        Some((self.start as f64 * w, (end as f64 + 1.0) * w))
    }

    /// Index of the last bin.
    fn end(&self) -> Option<i64> {
        let len = i64::try_from(self.counts.len()).ok()?;
        (len > 0).then(|| self.start.saturating_add(len - 1))
    }

    /// First and last bin indices of the occupied span once brought to `exponent` (>= own).
    fn window_at(&self, exponent: i32) -> Option<(i64, i64)> {
        let shift = exponent as i64 - self.exponent as i64;
        let end = self.end()?;
        Some((shift_floor(self.start, shift), shift_floor(end, shift)))
    }

    /// Adds values. Non-finite values are skipped (callers reject them earlier). The result
    /// depends only on the multiset of values ever added, not on how they were batched.
    pub fn add(&mut self, values: &[f32]) {
        if values.is_empty() {
            return;
        }
        match extremes(values) {
            (min, max, true) => self.add_within(values, min, max, true),
            _ => {
                if let Some((min, max)) = finite_extremes(values) {
                    self.add_within(values, min, max, false);
                }
            }
        }
    }

    /// [`add`](Self::add) when the finite values' extremes are already known; `all_finite`
    /// skips the per-value check.
    fn add_within(&mut self, values: &[f32], min: f32, max: f32, all_finite: bool) {
        #[cfg(target_arch = "x86_64")]
        let fast = simd::avx2();
        #[cfg(not(target_arch = "x86_64"))]
        let fast = false;
        self.add_within_using(values, min, max, all_finite, fast)
    }

    /// [`add_within`](Self::add_within), counting with the AVX2 kernel when `fast` (which
    /// the caller has checked the CPU runs) and the bins allow it.
    fn add_within_using(&mut self, values: &[f32], min: f32, max: f32, all_finite: bool, fast: bool) {
        let exponent = self.exponent_to_fit(min, max);
        let inv_width = pow2(-exponent);
        let (batch_lo, batch_hi) = (bin_index(min as f64, inv_width), bin_index(max as f64, inv_width));
        let (lo, hi) = match self.window_at(exponent) {
            Some((a, b)) => (a.min(batch_lo), b.max(batch_hi)),
            None => (batch_lo, batch_hi),
        };
        self.rebin(exponent, lo, hi);
        // Slots are in range by construction (floor is monotone, lo/hi came from the extremes).
        let mut added = 0u64;
        #[cfg(target_arch = "x86_64")]
        if fast && all_finite && f32_bins_are_exact(exponent, lo, hi, values.len()) {
            let (inv_width, lo) = (inv_width as f32, lo as i32);
            let counts = &mut self.counts;
            let added = SCRATCH.with(|scratch| {
                // SAFETY: `fast` says the CPU has AVX2.
                unsafe { simd::count_bins(values, inv_width, lo, counts, &mut scratch.borrow_mut()) }
            });
            self.total = self.total.saturating_add(added);
            self.trim();
            return;
        }
        if all_finite {
            for &x in values {
                if let Some(c) = self
                    .counts
                    .get_mut(bin_index(x as f64, inv_width).wrapping_sub(lo) as usize)
                {
                    *c += 1;
                    added += 1;
                }
            }
        } else {
            for &x in values.iter().filter(|x| x.is_finite()) {
                if let Some(c) = self
                    .counts
                    .get_mut(bin_index(x as f64, inv_width).wrapping_sub(lo) as usize)
                {
                    *c += 1;
                    added += 1;
                }
            }
        }
        self.total = self.total.saturating_add(added);
        self.trim();
    }

    /// The smallest exponent (>= the current one) at which the current bins and values in
    /// `[min, max]` fit in [`HISTOGRAM_BINS`] bins with indices below [`MAX_BIN_INDEX`].
    fn exponent_to_fit(&self, min: f32, max: f32) -> i32 {
        let max_abs = (min as f64).abs().max((max as f64).abs());
        let mut e = self.exponent.max(MIN_EXPONENT);
        while e < MAX_EXPONENT {
            let inv_width = pow2(-e);
            if max_abs * inv_width <= MAX_BIN_INDEX {
                let (mut lo, mut hi) = (bin_index(min as f64, inv_width), bin_index(max as f64, inv_width));
                if let Some((a, b)) = self.window_at(e) {
                    lo = lo.min(a);
                    hi = hi.max(b);
                }
                if (hi as i128 - lo as i128) < HISTOGRAM_BINS as i128 {
                    return e;
                }
            }
            e += 1;
        }
        e
    }

    /// Moves the counts to `exponent` (>= current) and the window `[lo, hi]` (which must cover them).
    fn rebin(&mut self, exponent: i32, lo: i64, hi: i64) {
        let len = usize::try_from(hi as i128 - lo as i128 + 1)
            .unwrap_or(0)
            .min(HISTOGRAM_BINS);
        if exponent == self.exponent && lo == self.start && len == self.counts.len() {
            return;
        }
        let shift = exponent as i64 - self.exponent as i64;
        let mut counts = vec![0u64; len];
        for (j, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let k = shift_floor(self.start.saturating_add(j as i64), shift);
            if let Some(slot) = counts.get_mut(k.wrapping_sub(lo) as usize) {
                *slot += c;
            }
        }
        self.exponent = exponent;
        self.start = lo;
        self.counts = counts;
    }

    /// Drops empty bins at both ends so `counts` spans only occupied bins (smaller JSON).
    fn trim(&mut self) {
        let Some(first) = self.counts.iter().position(|&c| c != 0) else {
            *self = Histogram::new();
            return;
        };
        let last = self.counts.iter().rposition(|&c| c != 0).unwrap_or(first);
        self.counts.truncate(last + 1);
        self.counts.drain(..first);
        self.start = self.start.saturating_add(first as i64);
    }

    /// Adds another histogram's counts. Equals the histogram of the union of both value sets.
    pub fn merge(&mut self, other: &Histogram) {
        if other.is_empty() {
            return;
        }
        if self.is_empty() {
            *self = other.clone();
            self.trim();
            return;
        }
        let mut e = self.exponent.max(other.exponent);
        let (lo, hi) = loop {
            let (Some((a, b)), Some((c, d))) = (self.window_at(e), other.window_at(e)) else {
                return;
            };
            let (lo, hi) = (a.min(c), b.max(d));
            if (hi as i128 - lo as i128) < HISTOGRAM_BINS as i128 || e >= MAX_EXPONENT {
                break (lo, hi);
            }
            e += 1;
        };
        self.rebin(e, lo, hi);
        let shift = e as i64 - other.exponent as i64;
        for (j, &c) in other.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let k = shift_floor(other.start.saturating_add(j as i64), shift);
            if let Some(slot) = self.counts.get_mut(k.wrapping_sub(lo) as usize) {
                *slot += c;
            }
        }
        self.total = self.total.saturating_add(other.total);
        self.trim();
    }

    /// The |x| histogram at full resolution, sparse: `(k, count)` for |x| in `[k·w, (k+1)·w)`,
    /// ascending in `k`, non-zero counts only.
    pub fn folded_abs(&self) -> Vec<(u64, u64)> {
        let start = self.start as i128;
        let abs_of = |j: usize| -> u64 {
            let k = start + j as i128;
            (if k < 0 { -1 - k } else { k }) as u64
        };
        // counts[..split] are negative bins; their |x| index grows as j falls.
        let split = (-start).clamp(0, self.counts.len() as i128) as usize;
        let mut negative = (0..split).rev().filter(|&j| self.counts[j] != 0).peekable();
        let mut positive = (split..self.counts.len()).filter(|&j| self.counts[j] != 0).peekable();
        let mut folded = Vec::with_capacity(self.counts.len());
        loop {
            let (k, c) = match (negative.peek().copied(), positive.peek().copied()) {
                (None, None) => break,
                (Some(n), Some(p)) if abs_of(n) == abs_of(p) => {
                    negative.next();
                    positive.next();
                    (abs_of(n), self.counts[n] + self.counts[p])
                }
                (Some(n), Some(p)) if abs_of(n) < abs_of(p) => {
                    negative.next();
                    (abs_of(n), self.counts[n])
                }
                (Some(n), None) => {
                    negative.next();
                    (abs_of(n), self.counts[n])
                }
                (_, Some(p)) => {
                    positive.next();
                    (abs_of(p), self.counts[p])
                }
            };
            folded.push((k, c));
        }
        folded
    }

    /// The |x| histogram merged by an integer factor into at most [`SEARCH_BINS`] bins starting
    /// at 0, with its bin width (None when empty).
    pub fn search_bins(&self) -> Option<(Vec<u64>, f64)> {
        let folded = self.folded_abs();
        let max_index = folded.last()?.0;
        let factor = max_index / SEARCH_BINS as u64 + 1; // ceil((max_index + 1) / SEARCH_BINS)
        let mut bins = vec![0u64; (max_index / factor) as usize + 1];
        for (k, c) in folded {
            bins[(k / factor) as usize] += c;
        }
        Some((bins, factor as f64 * self.bin_width()))
    }

    /// The smallest bin upper edge `T` with at least `percentile`% of |x| at or below it (so at
    /// most the upper edge of the highest bin). The percentile is clamped to (0, 100] (NaN means
    /// 100); 0 for an empty histogram.
    pub fn percentile_threshold(&self, percentile: f64) -> f64 {
        let folded = self.folded_abs();
        let total: u64 = folded.iter().map(|&(_, c)| c).sum();
        let Some(&(last, _)) = folded.last() else { return 0.0 };
        let fraction = if percentile.is_nan() {
            1.0
        } else {
            (percentile / 100.0).clamp(0.0, 1.0)
        };
        // A 1e-12 relative tolerance so that 99.99% of 10 000 is 9 999 despite rounding.
        let wanted = total as f64 * fraction;
        let needed = ((wanted * (1.0 - 1e-12)).ceil() as u64).clamp(1, total);
        let mut cumulative = 0u64;
        for &(k, c) in &folded {
            cumulative += c;
            if cumulative >= needed {
                return (k as f64 + 1.0) * self.bin_width();
            }
        }
        (last as f64 + 1.0) * self.bin_width()
    }

    /// TensorRT's KL-divergence threshold on |x| for `levels` quantization steps (see the module
    /// docs). Ties go to the smallest threshold. Candidates whose `Q` would be empty (all mass
    /// clipped) are skipped. With no more bins than levels, or an empty histogram, it returns the
    /// upper edge of the highest bin (0 when empty).
    pub fn entropy_threshold(&self, levels: usize) -> f64 {
        let Some((mut bins, width)) = self.search_bins() else {
            return 0.0;
        };
        let nbins = bins.len();
        let levels = levels.max(1);
        if nbins <= levels {
            return nbins as f64 * width;
        }
        // The exact zeros of a post-Relu tensor (often half of it) all land in bin 0. Grouped
        // with the bins after it in Q, that spike costs so much divergence that the smallest
        // thresholds win, clipping the whole tensor (efficientnet_lite1: −1.5 dB, top-1 0).
        // Zero is exact at any threshold, so the spike carries no information about the choice:
        // it is levelled to bin 1's count, as NVIDIA's pytorch-quantization calibrator does.
        bins[0] = bins[1];
        // Prefix sums make each candidate O(levels): within a group every P-non-zero bin has the
        // same q, so Σ p·ln q = (group mass of P)·ln q.
        let mut count_prefix = vec![0f64; nbins + 1];
        let mut nonzero_prefix = vec![0usize; nbins + 1];
        let mut plogp_prefix = vec![0f64; nbins + 1];
        for (j, &c) in bins.iter().enumerate() {
            let c = c as f64;
            count_prefix[j + 1] = count_prefix[j] + c;
            nonzero_prefix[j + 1] = nonzero_prefix[j] + usize::from(c > 0.0);
            plogp_prefix[j + 1] = plogp_prefix[j] + x_ln_x(c);
        }
        let total = count_prefix[nbins];
        let mut best = (f64::INFINITY, nbins);
        for i in levels..=nbins {
            let Some(kl) = kl_of_candidate(&bins, &count_prefix, &nonzero_prefix, &plogp_prefix, total, i, levels)
            else {
                continue;
            };
            if kl < best.0 {
                best = (kl, i);
            }
        }
        best.1 as f64 * width
    }

    /// The threshold minimising [`mse_error`](Self::mse_error) over every bin upper edge of the
    /// search histogram from the first occupied bin on. Ties go to the smallest threshold.
    pub fn mse_threshold(&self, levels: usize) -> f64 {
        let Some((bins, width)) = self.search_bins() else {
            return 0.0;
        };
        let occupied = occupied_centres(&bins, width);
        let first = bins.iter().position(|&c| c != 0).unwrap_or(0);
        let mut best = (f64::INFINITY, bins.len());
        for edge in first + 1..=bins.len() {
            let error = clipping_error(&occupied, edge as f64 * width, levels);
            if error < best.0 {
                best = (error, edge);
            }
        }
        best.1 as f64 * width
    }

    /// Expected squared error (in value² × count) of clipping |x| at `threshold` and rounding
    /// with `levels` steps, over the search histogram's bin centres: `(c − T)²` above `T`,
    /// `(T/levels)²/12` below.
    pub fn mse_error(&self, threshold: f64, levels: usize) -> f64 {
        let Some((bins, width)) = self.search_bins() else {
            return 0.0;
        };
        clipping_error(&occupied_centres(&bins, width), threshold, levels)
    }
}

fn x_ln_x(x: f64) -> f64 {
    if x > 0.0 {
        x * x.ln()
    } else {
        0.0
    }
}

/// KL(P||Q) for clipping after `i` bins (None when Q is empty). Uses
/// `Σ p̂ ln(p̂/q̂) = (Σ p ln p − Σ p ln q) / ΣP + ln(ΣQ / ΣP)`.
fn kl_of_candidate(
    bins: &[u64],
    count_prefix: &[f64],
    nonzero_prefix: &[usize],
    plogp_prefix: &[f64],
    total: f64,
    i: usize,
    levels: usize,
) -> Option<f64> {
    let kept = count_prefix[i];
    if kept <= 0.0 {
        return None;
    }
    let outliers = total - kept;
    let edge_bin = bins[i - 1] as f64;
    let p_ln_p = plogp_prefix[i - 1] + x_ln_x(edge_bin + outliers);
    let (mut p_ln_q, mut q_total) = (0.0, kept);
    for g in 0..levels {
        let (s, e) = (g * i / levels, (g + 1) * i / levels);
        let q_mass = count_prefix[e] - count_prefix[s];
        let mut p_mass = q_mass;
        let mut nonzero = nonzero_prefix[e] - nonzero_prefix[s];
        if g + 1 == levels && outliers > 0.0 {
            p_mass += outliers;
            nonzero += usize::from(edge_bin == 0.0);
        }
        if p_mass <= 0.0 {
            continue;
        }
        if q_mass > 0.0 {
            p_ln_q += p_mass * (q_mass / nonzero as f64).ln();
        } else {
            // Only clipped outliers in an empty last group: smooth that one bin.
            p_ln_q += p_mass * KL_EPSILON.ln();
            q_total += KL_EPSILON;
        }
    }
    Some((p_ln_p - p_ln_q) / total + (q_total / total).ln())
}

/// `(centre, count)` of the non-empty bins.
/// `auto` clips only when that lowers a tensor's expected squared error by at least this much:
/// the error it sees is the tensor's own, and clipping also costs what that error misses (a
/// detector's rare strong responses, the peaks a Sigmoid or Softmax turns into decisions).
/// Measured on the shared models (bench/quantize_all.sh, default passes, ONNX Runtime on eval):
/// clipping every tensor at its MSE optimum loses 2–3 dB on ppocr_v3_det's head; clipping only
/// where it gains 1 dB keeps that and gains 11 dB on ddddocr_det (see the README).
pub const AUTO_MIN_GAIN_DB: f64 = 1.0;

/// Expected squared error of quantizing a tensor to `[lo, hi]` with `2^bits − 1` steps (the
/// asymmetric grid onnxq's activations use), over the signed histogram's bin centres: values
/// outside are clipped onto the bound, values inside get uniform rounding noise `Δ²/12`. Prefix
/// sums make each range O(log bins).
struct RangeError {
    centres: Vec<f64>,
    /// Prefix sums of count, count·x and count·x² (index i: the first i centres).
    n: Vec<f64>,
    x: Vec<f64>,
    x2: Vec<f64>,
    steps: f64,
}

impl RangeError {
    fn new(h: &Histogram, bits: u32) -> RangeError {
        let w = h.bin_width();
        let occupied: Vec<(f64, f64)> = h
            .counts
            .iter()
            .enumerate()
            .filter(|&(_, &c)| c != 0)
            .map(|(j, &c)| (((h.start + j as i64) as f64 + 0.5) * w, c as f64))
            .collect();
        let mut e = RangeError {
            centres: occupied.iter().map(|&(c, _)| c).collect(),
            n: vec![0.0],
            x: vec![0.0],
            x2: vec![0.0],
            steps: (2f64.powi(bits.clamp(1, 31) as i32) - 1.0).max(1.0),
        };
        for &(c, n) in &occupied {
            e.n.push(e.n.last().unwrap() + n);
            e.x.push(e.x.last().unwrap() + n * c);
            e.x2.push(e.x2.last().unwrap() + n * c * c);
        }
        e
    }

    fn of(&self, lo: f64, hi: f64) -> f64 {
        let below = self.centres.partition_point(|&c| c < lo);
        let above = self.centres.partition_point(|&c| c <= hi);
        let total = self.centres.len();
        // Σ n·(c − b)² = Σ n·c² − 2b·Σ n·c + b²·Σ n over a prefix or suffix.
        let spread = |from: usize, to: usize, b: f64| {
            let (n, x, x2) = (
                self.n[to] - self.n[from],
                self.x[to] - self.x[from],
                self.x2[to] - self.x2[from],
            );
            (x2 - 2.0 * b * x + b * b * n).max(0.0)
        };
        let step = (hi - lo) / self.steps;
        spread(0, below, lo) + spread(above, total, hi) + (self.n[above] - self.n[below]) * step * step / 12.0
    }
}

fn occupied_centres(bins: &[u64], width: f64) -> Vec<(f64, f64)> {
    bins.iter()
        .enumerate()
        .filter(|&(_, &c)| c != 0)
        .map(|(j, &c)| ((j as f64 + 0.5) * width, c as f64))
        .collect()
}

fn clipping_error(occupied: &[(f64, f64)], threshold: f64, levels: usize) -> f64 {
    let step = threshold / levels.max(1) as f64;
    let rounding = step * step / 12.0;
    occupied
        .iter()
        .map(|&(centre, count)| {
            count
                * if centre > threshold {
                    (centre - threshold).powi(2)
                } else {
                    rounding
                }
        })
        .sum()
}

/// Why an observation was refused. The statistics are unchanged when `observe` errs.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ObserveError {
    /// `index` is the flat (row-major) index of the first NaN or infinity.
    #[error("value {value} at flat index {index}")]
    NonFinite { index: usize, value: f32 },
    #[error("{values} values do not fill shape {shape:?}")]
    ShapeMismatch { values: usize, shape: Vec<usize> },
    /// Earlier samples had `expected` channels on axis 1 (None: rank < 2), this one `found`.
    #[error("axis-1 channel count changed from {expected:?} to {found:?} between samples")]
    ChannelMismatch {
        expected: Option<usize>,
        found: Option<usize>,
    },
}

/// Min, max, sum and sum of squares (f64); independent lanes. Kept out of line: inlined into
/// `observe` its lanes spilled to the stack (measured ~15% slower).
#[inline(never)]
fn slice_moments(values: &[f32]) -> (f32, f32, f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if simd::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { simd::slice_moments(values) };
    }
    slice_moments_lanes(values)
}

#[inline(always)]
fn slice_moments_lanes(values: &[f32]) -> (f32, f32, f64, f64) {
    const LANES: usize = 8;
    let (mut mins, mut maxs) = ([f32::INFINITY; LANES], [f32::NEG_INFINITY; LANES]);
    let (mut sums, mut squares) = ([0f64; LANES], [0f64; LANES]);
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    let mut step = |j: usize, v: f32| {
        mins[j] = if v < mins[j] { v } else { mins[j] };
        maxs[j] = if v > maxs[j] { v } else { maxs[j] };
        let v = v as f64;
        sums[j] += v;
        squares[j] += v * v;
    };
    for chunk in chunks {
        for (j, &v) in chunk.iter().enumerate() {
            step(j, v);
        }
    }
    finish_moments(rest, mins, maxs, sums, squares)
}

/// The end of [`slice_moments_lanes`] (shared with its AVX2 build): the values left over after
/// the last whole group of lanes go to lane 0, then the lanes are reduced.
#[inline(always)]
fn finish_moments(
    rest: &[f32],
    mut mins: [f32; 8],
    mut maxs: [f32; 8],
    mut sums: [f64; 8],
    mut squares: [f64; 8],
) -> (f32, f32, f64, f64) {
    for &v in rest {
        mins[0] = if v < mins[0] { v } else { mins[0] };
        maxs[0] = if v > maxs[0] { v } else { maxs[0] };
        let v = v as f64;
        sums[0] += v;
        squares[0] += v * v;
    }
    (
        mins.iter().fold(f32::INFINITY, |a, &b| a.min(b)),
        maxs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
        sums.iter().sum(),
        squares.iter().sum(),
    )
}

/// Per-channel statistics along axis 1 (for rank >= 2 tensors).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelStats {
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
    /// Values seen per channel (the same for every channel).
    pub count_per_channel: u64,
}

impl ChannelStats {
    fn new(channels: usize) -> ChannelStats {
        ChannelStats {
            min: vec![f32::INFINITY; channels],
            max: vec![f32::NEG_INFINITY; channels],
            sum: vec![0.0; channels],
            sum_sq: vec![0.0; channels],
            count_per_channel: 0,
        }
    }

    /// Channel count (the shortest vector, should a hand-edited file disagree with itself).
    pub fn channels(&self) -> usize {
        self.min
            .len()
            .min(self.max.len())
            .min(self.sum.len())
            .min(self.sum_sq.len())
    }

    /// Row-major `values` of `shape` (rank >= 2, non-empty, `shape[1]` == channels).
    fn observe(&mut self, values: &[f32], shape: &[usize]) {
        let channels = self.channels();
        let inner: usize = shape[2..].iter().product();
        if channels == 0 || inner == 0 {
            return;
        }
        if inner == 1 {
            // [N, C]: one value per channel per row; update the channel vectors row by row.
            let (mins, maxs) = (&mut self.min[..channels], &mut self.max[..channels]);
            let (sums, squares) = (&mut self.sum[..channels], &mut self.sum_sq[..channels]);
            for row in values.chunks_exact(channels) {
                let lanes = row
                    .iter()
                    .zip(mins.iter_mut())
                    .zip(maxs.iter_mut())
                    .zip(sums.iter_mut());
                for ((((&v, lo), hi), sum), square) in lanes.zip(squares.iter_mut()) {
                    *lo = if v < *lo { v } else { *lo };
                    *hi = if v > *hi { v } else { *hi };
                    *sum += v as f64;
                    *square += v as f64 * v as f64;
                }
            }
        } else {
            for block in values.chunks_exact(channels * inner) {
                for (ch, slice) in block.chunks_exact(inner).enumerate() {
                    let (lo, hi, sum, sum_sq) = slice_moments(slice);
                    self.min[ch] = self.min[ch].min(lo);
                    self.max[ch] = self.max[ch].max(hi);
                    self.sum[ch] += sum;
                    self.sum_sq[ch] += sum_sq;
                }
            }
        }
        self.count_per_channel += (values.len() / channels) as u64;
    }

    fn merge(&mut self, other: &ChannelStats) {
        for ch in 0..self.channels().min(other.channels()) {
            self.min[ch] = self.min[ch].min(other.min[ch]);
            self.max[ch] = self.max[ch].max(other.max[ch]);
            self.sum[ch] += other.sum[ch];
            self.sum_sq[ch] += other.sum_sq[ch];
        }
        self.count_per_channel += other.count_per_channel;
    }

    /// Per-channel means (0 before any value).
    pub fn mean(&self) -> Vec<f64> {
        let n = self.count_per_channel.max(1) as f64;
        self.sum.iter().map(|s| s / n).collect()
    }

    /// Per-channel population variances, never negative.
    pub fn variance(&self) -> Vec<f64> {
        let n = self.count_per_channel.max(1) as f64;
        self.sum
            .iter()
            .zip(&self.sum_sq)
            .map(|(s, s2)| (s2 / n - (s / n).powi(2)).max(0.0))
            .collect()
    }
}

/// How a tensor's range is chosen from its statistics (module docs give the maths).
/// Serialised with a `method` tag: `{method: entropy, bits: 8}`; parameters default to 0.01,
/// 99.99 and 8 bits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Method {
    MinMax,
    Ema {
        #[serde(default = "default_ema_constant")]
        constant: f64,
    },
    Percentile {
        #[serde(default = "default_percentile")]
        percentile: f64,
    },
    Entropy {
        #[serde(default = "default_bits")]
        bits: u32,
    },
    Mse {
        #[serde(default = "default_bits")]
        bits: u32,
    },
    Auto {
        #[serde(default = "default_bits")]
        bits: u32,
    },
}

/// The methods' parameter defaults, for serde (here and in the `calibration:` config).
pub(crate) fn default_ema_constant() -> f64 {
    DEFAULT_EMA_CONSTANT
}
pub(crate) fn default_percentile() -> f64 {
    DEFAULT_PERCENTILE
}
pub(crate) fn default_bits() -> u32 {
    DEFAULT_BITS
}

/// Everything observed of one tensor over the calibration samples.
///
/// Empty statistics (`count == 0`) have `min = max = 0` (no infinities: they do not survive JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TensorStats {
    /// Exact extremes over all samples.
    pub min: f32,
    pub max: f32,
    /// Number of values observed.
    pub count: u64,
    /// `(sample index, min, max)` of each sample, sorted by sample index, one entry per sample
    /// (a sample observed twice keeps its overall extremes). Feeds the EMA.
    pub sample_extremes: Vec<(u32, f32, f32)>,
    pub histogram: Histogram,
    /// Per-channel along axis 1 for rank >= 2 tensors.
    pub channels: Option<ChannelStats>,
    /// The shape of each sample's tensor when every sample agrees (None otherwise): bias
    /// correction needs the spatial size to weigh the taps that read zero padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_shape: Option<Vec<usize>>,
}

/// Adds one sample's extremes to a list sorted by sample index, joining a repeated sample.
fn insert_extremes(list: &mut Vec<(u32, f32, f32)>, entry: (u32, f32, f32)) {
    match list.binary_search_by_key(&entry.0, |e| e.0) {
        Ok(i) => {
            list[i].1 = list[i].1.min(entry.1);
            list[i].2 = list[i].2.max(entry.2);
        }
        Err(i) => list.insert(i, entry),
    }
}

impl TensorStats {
    pub fn new_empty() -> TensorStats {
        TensorStats::default()
    }

    /// Observes one sample's tensor: `values` row-major of `shape`. Checks everything first, so
    /// on error (a NaN or infinity, a shape that does not match, a channel count different from
    /// earlier samples) the statistics are unchanged. A tensor with no values changes nothing.
    pub fn observe(&mut self, sample: u32, values: &[f32], shape: &[usize]) -> Result<(), ObserveError> {
        let expected_len = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if expected_len != Some(values.len()) {
            return Err(ObserveError::ShapeMismatch {
                values: values.len(),
                shape: shape.to_vec(),
            });
        }
        let found = (shape.len() >= 2).then(|| shape[1]);
        if self.count > 0 {
            let expected = self.channels.as_ref().map(ChannelStats::channels);
            if expected != found {
                return Err(ObserveError::ChannelMismatch { expected, found });
            }
        }
        if values.is_empty() {
            return Ok(());
        }
        let non_finite = |(index, value)| ObserveError::NonFinite { index, value };
        // Rank >= 2: the per-channel pass also yields the extremes and, through the sums (a NaN
        // or infinity makes them non-finite; finite f32 values cannot overflow f64), the
        // finiteness check: one pass over memory instead of two.
        let (min, max, sample_channels) = match found {
            Some(channels) => {
                let mut sample_channels = ChannelStats::new(channels);
                sample_channels.observe(values, shape);
                if !sample_channels
                    .sum
                    .iter()
                    .chain(&sample_channels.sum_sq)
                    .all(|s| s.is_finite())
                {
                    if let Some(bad) = first_non_finite(values) {
                        return Err(non_finite(bad));
                    }
                }
                let min = sample_channels.min.iter().fold(f32::INFINITY, |a, &b| a.min(b));
                let max = sample_channels.max.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                (min, max, Some(sample_channels))
            }
            None => {
                let (min, max) = scan_finite(values).map_err(non_finite)?;
                (min, max, None)
            }
        };
        if self.count == 0 {
            *self = TensorStats::default();
            self.sample_shape = Some(shape.to_vec());
        } else if self.sample_shape.as_deref() != Some(shape) {
            self.sample_shape = None;
        }

        self.histogram.add_within(values, min, max, true);
        match (&mut self.channels, sample_channels) {
            (Some(mine), Some(sample)) => mine.merge(&sample),
            (mine, sample) => *mine = sample,
        }
        if self.count == 0 {
            (self.min, self.max) = (min, max);
        } else {
            (self.min, self.max) = (self.min.min(min), self.max.max(max));
        }
        self.count = self.count.saturating_add(values.len() as u64);
        insert_extremes(&mut self.sample_extremes, (sample, min, max));
        Ok(())
    }

    /// Joins statistics of other samples (any order gives the same min, max, histogram and EMA).
    /// If the two disagree on the axis-1 channel count the per-channel statistics are dropped
    /// (they no longer describe one layout); `observe` reports that case as an error instead.
    pub fn merge(&mut self, other: &TensorStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        (self.min, self.max) = (self.min.min(other.min), self.max.max(other.max));
        self.count = self.count.saturating_add(other.count);
        if self.sample_shape != other.sample_shape {
            self.sample_shape = None;
        }
        self.histogram.merge(&other.histogram);
        self.channels = match (self.channels.take(), &other.channels) {
            (Some(mut mine), Some(theirs)) if mine.channels() == theirs.channels() => {
                mine.merge(theirs);
                Some(mine)
            }
            _ => None,
        };
        let mut joined: Vec<(u32, f32, f32)> =
            Vec::with_capacity(self.sample_extremes.len() + other.sample_extremes.len());
        let (mut a, mut b) = (
            self.sample_extremes.iter().peekable(),
            other.sample_extremes.iter().peekable(),
        );
        loop {
            let next = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(x), Some(y)) if x.0 <= y.0 => a.next(),
                (Some(_), None) => a.next(),
                _ => b.next(),
            };
            if let Some(&entry) = next {
                match joined.last_mut() {
                    Some(last) if last.0 == entry.0 => *last = (entry.0, last.1.min(entry.1), last.2.max(entry.2)),
                    _ => joined.push(entry),
                }
            }
        }
        self.sample_extremes = joined;
    }

    /// Adds `offset` to every sample index (statistics of a later data shard). Saturates at
    /// u32::MAX, where samples would be joined.
    pub fn shift_samples(&mut self, offset: u32) {
        let shifted = std::mem::take(&mut self.sample_extremes);
        for (sample, lo, hi) in shifted {
            insert_extremes(&mut self.sample_extremes, (sample.saturating_add(offset), lo, hi));
        }
    }

    /// Quantization steps on the |x| side: `2^(bits-1)` with negative values, `2^bits` without.
    pub fn levels(&self, bits: u32) -> usize {
        let exponent = if self.min < 0.0 { bits.max(1) - 1 } else { bits };
        if exponent >= usize::BITS - 1 {
            usize::MAX
        } else {
            1usize << exponent
        }
    }

    /// The moving average of per-sample extremes in sample-index order: the first sample sets
    /// `(m_min, m_max)`, each next one does `m += c·(x − m)`. `constant` is clamped to [0, 1]
    /// (NaN means 0.01). The result stays within the observed `[min, max]`.
    pub fn ema_range(&self, constant: f64) -> (f32, f32) {
        if self.count == 0 {
            return (0.0, 0.0);
        }
        let c = if constant.is_nan() {
            DEFAULT_EMA_CONSTANT
        } else {
            constant.clamp(0.0, 1.0)
        };
        let mut samples = self.sample_extremes.iter();
        let Some(&(_, first_min, first_max)) = samples.next() else {
            return self.observed();
        };
        let (mut lo, mut hi) = (first_min as f64, first_max as f64);
        for &(_, sample_min, sample_max) in samples {
            lo += c * (sample_min as f64 - lo);
            hi += c * (sample_max as f64 - hi);
        }
        let (lo, hi) = (
            (lo as f32).max(self.min).min(self.max),
            (hi as f32).max(self.min).min(self.max),
        );
        if lo <= hi {
            (lo, hi)
        } else {
            (hi, lo)
        }
    }

    /// The clipping range `method` chooses. Empty statistics give `(0, 0)`; a constant tensor
    /// `(c, c)` for every method (widening a zero-width range is the quantizer's job). Always
    /// finite with `lo <= hi`, inside the observed `[min, max]`.
    pub fn range(&self, method: &Method) -> (f32, f32) {
        if self.count == 0 || !(self.min.is_finite() && self.max.is_finite()) {
            return (0.0, 0.0);
        }
        if self.min >= self.max {
            return self.observed();
        }
        match *method {
            Method::MinMax => (self.min, self.max),
            Method::Ema { constant } => self.ema_range(constant),
            Method::Percentile { percentile } => self.clip_at(self.histogram.percentile_threshold(percentile)),
            Method::Entropy { bits } => self.clip_at(self.histogram.entropy_threshold(self.levels(bits))),
            Method::Mse { bits } => self.clip_at(self.histogram.mse_threshold(self.levels(bits))),
            Method::Auto { bits } => self.auto_range(bits),
        }
    }

    /// `auto`: the clipping range with the least expected squared error on this tensor's own
    /// values (module docs), when it beats `(min, max)` by at least [`AUTO_MIN_GAIN_DB`];
    /// `(min, max)` otherwise.
    fn auto_range(&self, bits: u32) -> (f32, f32) {
        let Some((bins, width)) = self.histogram.search_bins() else {
            return self.observed();
        };
        let error = RangeError::new(&self.histogram, bits);
        let observed = self.observed();
        let unclipped = error.of(observed.0 as f64, observed.1 as f64);
        let first = bins.iter().position(|&c| c != 0).unwrap_or(0);
        let mut best = (unclipped, observed);
        for edge in first + 1..=bins.len() {
            let range = self.clip_at(edge as f64 * width);
            let e = error.of(range.0 as f64, range.1 as f64);
            if e < best.0 {
                best = (e, range);
            }
        }
        if best.0 > 0.0 && 10.0 * (unclipped / best.0).log10() >= AUTO_MIN_GAIN_DB {
            best.1
        } else {
            observed
        }
    }

    /// `(min, max)` ordered (they only disagree in hand-edited statistics).
    fn observed(&self) -> (f32, f32) {
        (self.min.min(self.max), self.max.max(self.min))
    }

    /// `[max(min, -T), min(max, T)]`, with T rounded outwards to f32 so a threshold just above
    /// a value never rounds onto it. Falls back to `(min, max)` if that would be empty.
    fn clip_at(&self, threshold: f64) -> (f32, f32) {
        if !(threshold > 0.0 && threshold.is_finite()) {
            return self.observed();
        }
        let mut t = threshold as f32;
        if (t as f64) < threshold {
            t = t.next_up();
        }
        let (lo, hi) = (self.min.max(-t), self.max.min(t));
        if lo < hi && lo.is_finite() && hi.is_finite() {
            (lo, hi)
        } else {
            self.observed()
        }
    }

    /// Estimated fraction of observed values outside `[lo, hi]`, from the histogram: bins wholly
    /// outside count fully, a bin holding a bound counts in proportion (values assumed uniform
    /// in the bin, the edge bins narrowed to the exact min/max). A NaN bound is no bound.
    pub fn clipped_fraction(&self, lo: f32, hi: f32) -> f64 {
        let total: u64 = self.histogram.counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let lo = if lo.is_nan() { f64::NEG_INFINITY } else { lo as f64 };
        let hi = if hi.is_nan() { f64::INFINITY } else { hi as f64 };
        let (min, max) = (self.min as f64, self.max as f64);
        let w = self.histogram.bin_width();
        let mut clipped = 0.0;
        for (j, &count) in self.histogram.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let k = (self.histogram.start as i128 + j as i128) as f64;
            let (a, b) = ((k * w).max(min), ((k + 1.0) * w).min(max));
            let outside = if b <= a {
                // The bin's overlap with [min, max] is a single point.
                if a < lo || a > hi {
                    1.0
                } else {
                    0.0
                }
            } else {
                let below = ((lo - a) / (b - a)).clamp(0.0, 1.0);
                let above = ((b - hi) / (b - a)).clamp(0.0, 1.0);
                (below + above).min(1.0)
            };
            clipped += count as f64 * outside;
        }
        (clipped / total as f64).clamp(0.0, 1.0)
    }

    /// Fraction of the observed range `[min, max]` outside `[lo, hi]`: `1 − (hi − lo)/(max − min)`
    /// with `[lo, hi]` first intersected with `[min, max]`; 0 for a constant tensor.
    pub fn clipped_range_fraction(&self, lo: f32, hi: f32) -> f64 {
        let (min, max) = (self.min as f64, self.max as f64);
        if !(max - min).is_finite() || max <= min {
            return 0.0;
        }
        let kept = ((hi as f64).min(max) - (lo as f64).max(min)).max(0.0);
        let kept = if kept.is_nan() { max - min } else { kept };
        (1.0 - kept / (max - min)).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    /// The AVX2 kernels give what the portable code gives, bit for bit: the histogram of
    /// values spread over many scales, with runs of zeros, subnormals, negative values a bin
    /// below zero, and windows far from zero that take the f64 path.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_kernels_match_the_portable_ones() {
        if !simd::avx2() {
            return;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let scales = [1e-30f32, 1e-6, 0.01, 1.0, 37.0, 3000.0, 1e6];
        for case in 0..60 {
            let n = [1usize, 3, 7, 513, 5000, 40_000][case % 6];
            let scale = scales[case % scales.len()];
            let offset = if case % 5 == 4 { 1e5 } else { 0.0 };
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    let r = next();
                    match r % 7 {
                        0 if r & 8 == 0 => 0.0,
                        0 => -0.0,
                        1 => -1e-45,
                        2 => f32::from_bits((r >> 40) as u32 & 0x007f_ffff),
                        _ => offset + scale * ((r >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 0.7) as f32,
                    }
                })
                .collect();
            let (min, max, finite) = extremes_lanes(&values);
            // SAFETY: AVX2 was checked above.
            assert_eq!(unsafe { simd::extremes(&values) }, (min, max, finite));
            let moments = slice_moments_lanes(&values);
            // SAFETY: as above.
            let fast_moments = unsafe { simd::slice_moments(&values) };
            assert_eq!(fast_moments.0.to_bits(), moments.0.to_bits());
            assert_eq!(fast_moments.1.to_bits(), moments.1.to_bits());
            assert_eq!(fast_moments.2.to_bits(), moments.2.to_bits(), "case {case}");
            assert_eq!(fast_moments.3.to_bits(), moments.3.to_bits(), "case {case}");
            // Two batches, so the second lands in a window that already has counts.
            let half = n / 2;
            let (mut portable, mut fast) = (Histogram::new(), Histogram::new());
            for part in [&values[..half], &values[half..]] {
                if part.is_empty() {
                    continue;
                }
                let (lo, hi, _) = extremes_lanes(part);
                portable.add_within_using(part, lo, hi, true, false);
                fast.add_within_using(part, lo, hi, true, true);
            }
            assert_eq!(fast, portable, "case {case}");
        }
    }

    use super::*;

    /// Knuth's MMIX LCG: deterministic test data without a rand crate.
    struct Lcg(u64);
    impl Lcg {
        fn next_u64(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0
        }
        /// Uniform in [0, 1).
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn below(&mut self, n: usize) -> usize {
            ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
        }
        /// Box–Muller.
        fn gaussian(&mut self) -> f64 {
            let u1 = self.uniform().max(1e-300);
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
        }
    }

    /// Both signs, magnitudes from 1e-6 to 1e6, some exact zeros.
    fn mixed_scales(rng: &mut Lcg, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                if rng.below(20) == 0 {
                    return 0.0;
                }
                let magnitude = 10f64.powf(rng.uniform() * 12.0 - 6.0);
                (if rng.below(2) == 0 { magnitude } else { -magnitude }) as f32
            })
            .collect()
    }

    fn stats_of(samples: &[&[f32]]) -> TensorStats {
        let mut s = TensorStats::default();
        for (i, values) in samples.iter().enumerate() {
            s.observe(i as u32, values, &[values.len()]).unwrap();
        }
        s
    }

    #[test]
    fn merged_histograms_equal_the_histogram_of_the_union() {
        for seed in 0..8 {
            let mut rng = Lcg(seed);
            let values = mixed_scales(&mut rng, 600);
            let union = Histogram::from_values(&values);
            assert_eq!(union.total, 600);
            assert!(union.counts.len() <= HISTOGRAM_BINS);
            assert!(
                union.exponent > MIN_EXPONENT,
                "values up to 1e6 must have coarsened the grid"
            );

            // Random (non-contiguous) assignment to parts, merged in a random order.
            let parts_n = 2 + rng.below(5);
            let mut parts = vec![Vec::new(); parts_n];
            for &v in &values {
                parts[rng.below(parts_n)].push(v);
            }
            let mut hists: Vec<Histogram> = parts.iter().map(|p| Histogram::from_values(p)).collect();
            let mut merged = Histogram::new();
            while !hists.is_empty() {
                merged.merge(&hists.remove(rng.below(hists.len())));
            }
            assert_eq!(merged, union, "seed {seed}");

            // Parts at very different exponents: small magnitudes vs large ones.
            let (small, large): (Vec<f32>, Vec<f32>) = values.iter().partition(|v| v.abs() < 1e-2);
            let (hs, hl) = (Histogram::from_values(&small), Histogram::from_values(&large));
            assert!(hs.exponent < hl.exponent);
            let mut a = hs.clone();
            a.merge(&hl);
            let mut b = hl.clone();
            b.merge(&hs);
            assert_eq!(a, union);
            assert_eq!(b, union);
        }
    }

    #[test]
    fn add_in_one_call_equals_add_in_many_calls() {
        for seed in 0..8 {
            let mut rng = Lcg(100 + seed);
            let values = mixed_scales(&mut rng, 700);
            let whole = Histogram::from_values(&values);
            let mut pieces = Histogram::new();
            let mut at = 0;
            while at < values.len() {
                let len = 1 + rng.below(60);
                let end = (at + len).min(values.len());
                pieces.add(&values[at..end]);
                at = end;
            }
            assert_eq!(pieces, whole, "seed {seed}");
            // Ascending order forces a coarsening at nearly every call.
            let mut sorted = values.clone();
            sorted.sort_by(|a, b| a.abs().total_cmp(&b.abs()));
            let mut one_by_one = Histogram::new();
            for v in &sorted {
                one_by_one.add(std::slice::from_ref(v));
            }
            assert_eq!(one_by_one, whole, "seed {seed}");
        }
    }

    #[test]
    fn index_limit_keeps_order_independence() {
        // One distinct huge value fits in one bin at any exponent; only the 2^52 index limit
        // raises the exponent, and it too depends on the values alone.
        let big = [1e30f32, 1e30, 1e30f32.next_up()];
        let small = [3.0f32, -1e-30, 0.0];
        let all: Vec<f32> = big.iter().chain(&small).copied().collect();
        let union = Histogram::from_values(&all);
        let alone = Histogram::from_values(&big[..1]);
        assert!(alone.exponent > MIN_EXPONENT && alone.start.unsigned_abs() <= 1 << 52);
        for (a, b) in [(&big[..], &small[..]), (&small[..], &big[..]), (&all[..2], &all[2..])] {
            let mut merged = Histogram::from_values(a);
            merged.merge(&Histogram::from_values(b));
            assert_eq!(merged, union);
            let mut added = Histogram::from_values(a);
            added.add(b);
            assert_eq!(added, union);
        }
    }

    #[test]
    fn coarsening_keeps_counts_in_the_right_bins() {
        let mut h = Histogram::from_values(&[0.0, 0.25, 0.5, 0.75, 0.999]);
        // 0.999 · 2^13 = 8183.8: 8184 bins fit at w = 2^-13, 16368 would not at 2^-14.
        assert_eq!((h.exponent, h.start, h.counts.len(), h.total), (-13, 0, 8184, 5));
        assert_eq!(
            (
                h.counts[0],
                h.counts[2048],
                h.counts[4096],
                h.counts[6144],
                h.counts[8183]
            ),
            (1, 1, 1, 1, 1)
        );
        h.add(&[1000.0]);
        // 1000 · 8 = 8000 fits at w = 1/8; at 1/16 it would need 16001 bins.
        assert_eq!((h.exponent, h.start, h.counts.len(), h.total), (-3, 0, 8001, 6));
        for (bin, expected) in [(0, 1), (1, 0), (2, 1), (4, 1), (6, 1), (7, 1), (8, 0), (8000, 1)] {
            assert_eq!(h.counts[bin], expected, "bin {bin}");
        }
        assert_eq!(h.counts.iter().sum::<u64>(), 6);
    }

    #[test]
    fn negative_values_and_zero_bins() {
        let h = Histogram::from_values(&[-1.0, -0.0, 0.5]);
        // Span 1.5/w + 1 bins: w = 2^-12 gives 6145.
        assert_eq!((h.exponent, h.start, h.counts.len()), (-12, -4096, 6145));
        assert_eq!((h.counts[0], h.counts[4096], h.counts[6144]), (1, 1, 1));
        // |−1| lands in |x| bin 4095, whose upper edge is 1.0.
        assert_eq!(h.folded_abs(), vec![(0, 1), (2048, 1), (4095, 1)]);
        assert_eq!(h.percentile_threshold(100.0), 1.0);
        assert_eq!(h.observed_range(), Some((-1.0, 0.5 + 1.0 / 4096.0)));
        assert_eq!(Histogram::from_values(&[]), Histogram::new());
        assert_eq!(Histogram::from_values(&[f32::NAN, f32::INFINITY]), Histogram::new());
    }

    #[test]
    fn percentile_on_a_spike_with_one_outlier() {
        let mut values = vec![1.0f32; 9999];
        values.push(100.0);
        let s = stats_of(&[&values]);
        let h = &s.histogram;
        // Span 99/w + 1 <= 8192 gives w = 1/64.
        assert_eq!(h.bin_width(), 1.0 / 64.0);
        let t = h.percentile_threshold(99.99);
        assert!(t > 1.0 && t <= 1.0 + h.bin_width(), "{t}");
        let t = h.percentile_threshold(100.0);
        assert!(t >= 100.0 && t <= 100.0 + h.bin_width(), "{t}");
        assert_eq!(s.range(&Method::Percentile { percentile: 99.99 }), (1.0, 1.015625));
        assert_eq!(s.range(&Method::Percentile { percentile: 100.0 }), (1.0, 100.0));
        // 99.9% of 1000 is 999.0000000000001 in f64: still 999 values, not 1000.
        let mut values = vec![1.0f32; 999];
        values.push(100.0);
        let t = Histogram::from_values(&values).percentile_threshold(99.9);
        assert!(t > 1.0 && t < 1.1, "{t}");
        // Out-of-range percentiles are clamped, never NaN.
        assert_eq!(h.percentile_threshold(f64::NAN), h.percentile_threshold(100.0));
        assert_eq!(h.percentile_threshold(-5.0), 1.015625);
    }

    #[test]
    fn percentile_keeps_a_small_negative_tail() {
        // HardSwish-like: min −0.375, long positive side.
        let mut values: Vec<f32> = (0..10000).map(|i| i as f32 / 1000.0).collect();
        values.extend([-0.375f32; 50]);
        let s = stats_of(&[&values]);
        let (lo, hi) = s.range(&Method::Percentile { percentile: 99.0 });
        assert_eq!(lo, -0.375);
        assert!((hi - 9.9).abs() < 0.01, "{hi}");
    }

    /// The KL of candidate `i` straight from the definition: explicit P and Q arrays.
    fn naive_kl(bins: &[u64], i: usize, levels: usize) -> Option<f64> {
        let mut p: Vec<f64> = bins[..i].iter().map(|&c| c as f64).collect();
        let outliers: f64 = bins[i..].iter().map(|&c| c as f64).sum();
        p[i - 1] += outliers;
        let mut q = vec![0.0; i];
        for g in 0..levels {
            let (s, e) = (g * i / levels, (g + 1) * i / levels);
            let mass: f64 = bins[s..e].iter().map(|&c| c as f64).sum();
            let nonzero = p[s..e].iter().filter(|&&x| x > 0.0).count();
            for j in s..e {
                if p[j] > 0.0 {
                    q[j] = mass / nonzero as f64;
                }
            }
        }
        if q.iter().sum::<f64>() == 0.0 {
            return None;
        }
        for j in 0..i {
            if p[j] > 0.0 && q[j] == 0.0 {
                q[j] = KL_EPSILON;
            }
        }
        let (sp, sq) = (p.iter().sum::<f64>(), q.iter().sum::<f64>());
        Some(
            p.iter()
                .zip(&q)
                .filter(|(p, _)| **p > 0.0)
                .map(|(p, q)| (p / sp) * ((p / sp) / (q / sq)).ln())
                .sum(),
        )
    }

    #[test]
    fn fast_kl_matches_the_definition() {
        let mut rng = Lcg(7);
        for case in 0..6 {
            let n = 40 + rng.below(60);
            let bins: Vec<u64> = (0..n)
                .map(|_| if rng.below(3) == 0 { 0 } else { rng.below(1000) as u64 })
                .collect();
            let bins: Vec<u64> = if case == 0 {
                [vec![5; 10], vec![0; 30], vec![3]].concat()
            } else {
                bins
            };
            let n = bins.len();
            let mut count_prefix = vec![0f64; n + 1];
            let mut nonzero_prefix = vec![0usize; n + 1];
            let mut plogp_prefix = vec![0f64; n + 1];
            for (j, &c) in bins.iter().enumerate() {
                count_prefix[j + 1] = count_prefix[j] + c as f64;
                nonzero_prefix[j + 1] = nonzero_prefix[j] + usize::from(c > 0);
                plogp_prefix[j + 1] = plogp_prefix[j] + x_ln_x(c as f64);
            }
            for levels in [1, 3, 8] {
                for i in levels..=n {
                    let fast = kl_of_candidate(
                        &bins,
                        &count_prefix,
                        &nonzero_prefix,
                        &plogp_prefix,
                        count_prefix[n],
                        i,
                        levels,
                    );
                    let slow = naive_kl(&bins, i, levels);
                    match (fast, slow) {
                        (Some(f), Some(s)) => assert!((f - s).abs() < 1e-9 * (1.0 + s.abs()), "i {i}: {f} vs {s}"),
                        (f, s) => assert_eq!(f.is_some(), s.is_some(), "i {i}"),
                    }
                }
            }
        }
    }

    fn gaussian_with_outliers(seed: u64) -> Vec<f32> {
        let mut rng = Lcg(seed);
        let mut values: Vec<f32> = (0..200_000).map(|_| rng.gaussian() as f32).collect();
        values.extend([50.0, -50.0, 49.0, 48.5, -47.0]);
        values
    }

    #[test]
    fn entropy_clips_outliers_off_a_gaussian_bulk() {
        let s = stats_of(&[&gaussian_with_outliers(1)]);
        let t = s.histogram.entropy_threshold(s.levels(8));
        // 2048 search bins over |x| <= 50 with 128 levels: the smallest candidate is ~4.
        assert!(t > 3.0 && t < 10.0, "T = {t}");
        let (lo, hi) = s.range(&Method::Entropy { bits: 8 });
        assert!(lo > -10.0 && hi < 10.0 && lo < -3.0 && hi > 3.0, "{lo} {hi}");
        assert!(s.clipped_fraction(lo, hi) < 1e-3);
        assert!(s.clipped_range_fraction(lo, hi) > 0.8);
    }

    #[test]
    fn entropy_keeps_the_whole_of_a_uniform_distribution() {
        let mut rng = Lcg(3);
        let values: Vec<f32> = (0..200_000).map(|_| rng.uniform() as f32).collect();
        let s = stats_of(&[&values]);
        assert_eq!(s.levels(8), 256);
        let t = s.histogram.entropy_threshold(256);
        assert!((t - 1.0).abs() < 0.01, "T = {t}");
        let (lo, hi) = s.range(&Method::Entropy { bits: 8 });
        assert_eq!((lo, hi), (s.min, s.max));
    }

    fn uniform_bulk_with_outliers() -> TensorStats {
        let mut rng = Lcg(4);
        let mut values: Vec<f32> = (0..200_000).map(|_| rng.uniform() as f32).collect();
        values.extend([50.0f32; 5]);
        stats_of(&[&values])
    }

    #[test]
    fn entropy_on_a_uniform_bulk_with_outliers() {
        let s = uniform_bulk_with_outliers();
        let (_, width) = s.histogram.search_bins().unwrap();
        // 4 bits (16 levels): clips at the end of the bulk.
        let t = s.histogram.entropy_threshold(s.levels(4));
        assert!((t - 1.0).abs() <= width, "T = {t}");
        assert_eq!(s.range(&Method::Entropy { bits: 4 }), (s.min, 1.0));
        // 8 bits (256 levels): every candidate is >= 256 search bins = 8, and a flat bulk is
        // reproduced exactly by Q at any grouping, so keeping the outliers costs no divergence
        // while clipping them does: TensorRT's KL keeps the full range here.
        assert_eq!(s.histogram.entropy_threshold(s.levels(8)), 50.0 + width);
    }

    #[test]
    fn mse_keeps_a_uniform_distribution() {
        let mut rng = Lcg(5);
        let values: Vec<f32> = (0..200_000).map(|_| rng.uniform() as f32).collect();
        let s = stats_of(&[&values]);
        let t = s.histogram.mse_threshold(256);
        // Optimum of  N·δ³/3 + N·(T/256)²/12  is 1.6e-3 below the max.
        assert!(t > 0.995 && t <= 1.0 + s.histogram.bin_width() * 4.0, "T = {t}");
        assert!(s.range(&Method::Mse { bits: 8 }).1 > 0.995);
    }

    #[test]
    fn mse_clips_outliers_when_rounding_noise_outweighs_them() {
        let s = uniform_bulk_with_outliers();
        let (_, width) = s.histogram.search_bins().unwrap();
        // 4 bits, 16 levels: 2·5·(50 − T) = N·T/(6·16²) gives T = 500/(10 + N/1536) ≈ 3.57.
        let t = s.histogram.mse_threshold(s.levels(4));
        assert!((t - 500.0 / (10.0 + 200_005.0 / 1536.0)).abs() <= width, "T = {t}");
        // 8 bits, 256 levels: rounding noise is 16x smaller, so the outliers are only trimmed:
        // T = 500/(10 + N/393216) ≈ 47.6, nowhere near the bulk.
        let t = s.histogram.mse_threshold(s.levels(8));
        assert!((t - 500.0 / (10.0 + 200_005.0 / 393_216.0)).abs() <= width, "T = {t}");

        let s = stats_of(&[&gaussian_with_outliers(2)]);
        let t = s.histogram.mse_threshold(s.levels(4));
        assert!(t > 1.5 && t < 5.0, "T = {t}");
        // 8 bits, 128 levels: all five outliers clipped, 2·Σ(x − T) = N·T/(6·128²) gives T ≈ 40.6.
        let t = s.histogram.mse_threshold(s.levels(8));
        assert!((t - 489.0 / (10.0 + 200_005.0 / 98_304.0)).abs() < 0.1, "T = {t}");
    }

    #[test]
    fn entropy_clips_a_heavy_tail() {
        // Cauchy: |x| max in the tens of thousands, half the mass within ±1.
        let mut rng = Lcg(6);
        let values: Vec<f32> = (0..100_000)
            .map(|_| (std::f64::consts::PI * (rng.uniform() - 0.5)).tan() as f32)
            .collect();
        let s = stats_of(&[&values]);
        let abs_max = s.min.abs().max(s.max.abs()) as f64;
        assert!(abs_max > 1e3);
        let (lo, hi) = s.range(&Method::Entropy { bits: 8 });
        assert!(hi as f64 <= abs_max / 10.0 && lo as f64 >= -abs_max / 10.0, "{lo} {hi}");
        assert!(hi > 1.0 && lo < -1.0, "{lo} {hi}");
        let clipped = s.clipped_fraction(lo, hi);
        assert!(clipped > 0.0 && clipped < 0.05, "{clipped}");
    }

    #[test]
    fn mse_matches_the_laplace_optimum_of_banner_et_al() {
        // Laplace(b = 1): E(α) = 2e^(−α) + α²/(3·4^M); Banner et al. give α* = 9.89 (M = 8)
        // and 5.03 (M = 4). Its max over 10^6 samples is about ln(10^6) ≈ 13.8.
        let mut rng = Lcg(8);
        let values: Vec<f32> = (0..1_000_000)
            .map(|_| {
                let u = rng.uniform().max(1e-300);
                (if u < 0.5 {
                    (2.0 * u).ln()
                } else {
                    -(2.0 * (1.0 - u)).max(1e-300).ln()
                }) as f32
            })
            .collect();
        let s = stats_of(&[&values]);
        assert!(s.max > 11.0 && s.min < -11.0);
        let t = s.histogram.mse_threshold(s.levels(8));
        assert!((t - 9.89).abs() < 0.6, "T = {t}");
        let t = s.histogram.mse_threshold(s.levels(4));
        assert!((t - 5.03).abs() < 0.2, "T = {t}");
        let (lo, hi) = s.range(&Method::Mse { bits: 4 });
        assert!((lo + 5.03).abs() < 0.2 && (hi - 5.03).abs() < 0.2, "{lo} {hi}");
    }

    #[test]
    fn mse_error_by_hand() {
        let h = Histogram::from_values(&[1.0, 1.0, 1.0, 3.0]);
        // w = 2^-11; |x| index 6144 coarsened by 4 -> search width 1/512; centres 1 + 1/1024, 3 + 1/1024.
        let (bins, width) = h.search_bins().unwrap();
        assert_eq!((bins.len(), width), (1537, 1.0 / 512.0));
        let (c1, c3) = (1.0 + 1.0 / 1024.0, 3.0 + 1.0 / 1024.0);
        // T = 2, 4 levels: step 0.5, three values rounded, one clipped by c3 − 2.
        let expected = 3.0 * 0.25 / 12.0 + (c3 - 2.0f64).powi(2);
        assert!((h.mse_error(2.0, 4) - expected).abs() < 1e-12);
        // T = 0.5: all clipped.
        let expected = 3.0 * (c1 - 0.5f64).powi(2) + (c3 - 0.5f64).powi(2);
        assert!((h.mse_error(0.5, 4) - expected).abs() < 1e-12);
        // d/dT [3·(T/4)²/12 + (c3 − T)²] = 0  =>  T = 64·c3/65.
        let t = h.mse_threshold(4);
        assert!((t - 64.0 * c3 / 65.0).abs() <= width, "T = {t}");
    }

    #[test]
    fn ema_follows_the_recurrence_in_sample_order_whatever_the_merge_order() {
        let samples: [(u32, [f32; 2]); 4] = [(0, [-1.0, 2.0]), (1, [-3.0, 4.0]), (2, [0.0, 1.0]), (3, [-2.0, 8.0])];
        let single = |i: usize| {
            let mut s = TensorStats::default();
            s.observe(samples[i].0, &samples[i].1, &[2]).unwrap();
            s
        };
        let mut in_order = TensorStats::default();
        for i in 0..4 {
            in_order.merge(&single(i));
        }
        // c = 0.5: min −1, −2, −1, −1.5; max 2, 3, 2, 5.
        assert_eq!(in_order.ema_range(0.5), (-1.5, 5.0));
        // c = 0.01: min −1, −1.02, −1.0098, −1.019702; max 2, 2.02, 2.0098, 2.069702.
        let (lo, hi) = in_order.ema_range(0.01);
        assert!(
            (lo as f64 + 1.019702).abs() < 1e-6 && (hi as f64 - 2.069702).abs() < 1e-6,
            "{lo} {hi}"
        );

        let mut shuffled = single(2);
        let mut pair = single(3);
        pair.merge(&single(0));
        shuffled.merge(&pair);
        shuffled.merge(&single(1));
        assert_eq!(shuffled, in_order);
        assert_eq!(
            shuffled.sample_extremes.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        assert_eq!(shuffled.range(&Method::Ema { constant: 0.5 }), (-1.5, 5.0));

        // Observing out of order directly, too.
        let mut direct = TensorStats::default();
        for i in [3, 1, 0, 2] {
            direct.observe(samples[i].0, &samples[i].1, &[2]).unwrap();
        }
        assert_eq!(direct.ema_range(0.5), (-1.5, 5.0));

        // Shifting sample indices (a later shard) keeps the order.
        let mut later = single(0);
        later.shift_samples(10);
        assert_eq!(later.sample_extremes, vec![(10, -1.0, 2.0)]);
    }

    #[test]
    fn per_channel_statistics_by_hand() {
        let mut s = TensorStats::default();
        // [1, 2, 2, 2]: channel 0 = 1, 2, 3, 4; channel 1 = −1, 0, 5, 0.5.
        s.observe(0, &[1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 5.0, 0.5], &[1, 2, 2, 2])
            .unwrap();
        let ch = s.channels.as_ref().unwrap();
        assert_eq!((ch.min.clone(), ch.max.clone()), (vec![1.0, -1.0], vec![4.0, 5.0]));
        assert_eq!(ch.mean(), vec![2.5, 1.125]);
        assert_eq!(ch.sum_sq, vec![30.0, 26.25]);
        assert_eq!(ch.count_per_channel, 4);
        assert_eq!((s.min, s.max, s.count), (-1.0, 5.0, 8));

        // [2, 2, 1, 1]: batch of two; channel 0 gets 10 and 30, channel 1 gets 20 and 40.
        s.observe(1, &[10.0, 20.0, 30.0, 40.0], &[2, 2, 1, 1]).unwrap();
        let ch = s.channels.as_ref().unwrap();
        assert_eq!((ch.min.clone(), ch.max.clone()), (vec![1.0, -1.0], vec![30.0, 40.0]));
        assert_eq!(ch.mean(), vec![50.0 / 6.0, 64.5 / 6.0]);
        assert_eq!(ch.count_per_channel, 6);

        let before = s.clone();
        let err = s.observe(2, &[1.0, 2.0, 3.0], &[1, 3]).unwrap_err();
        assert_eq!(
            err,
            ObserveError::ChannelMismatch {
                expected: Some(2),
                found: Some(3)
            }
        );
        let err = s.observe(2, &[1.0, 2.0], &[2]).unwrap_err();
        assert_eq!(
            err,
            ObserveError::ChannelMismatch {
                expected: Some(2),
                found: None
            }
        );
        let err = s.observe(2, &[1.0, 2.0], &[1, 3]).unwrap_err();
        assert!(matches!(err, ObserveError::ShapeMismatch { values: 2, .. }));
        assert_eq!(s, before);

        // Rank 1: no channels.
        let flat = stats_of(&[&[1.0, 2.0]]);
        assert_eq!(flat.channels, None);
    }

    #[test]
    fn non_finite_values_are_refused_and_change_nothing() {
        let mut s = stats_of(&[&[1.0, -2.0, 3.0]]);
        let before = s.clone();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            // Long enough to go through the vectorised lanes.
            let mut values = vec![0.5f32; 40];
            values[21] = bad;
            values[33] = f32::NAN;
            match s.observe(1, &values, &[40]) {
                Err(ObserveError::NonFinite { index, value }) => {
                    assert_eq!(index, 21);
                    assert_eq!(value.to_bits(), bad.to_bits());
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(s, before);
        }
        let mut empty = TensorStats::default();
        assert!(empty.observe(0, &[f32::NAN], &[1]).is_err());
        assert_eq!(empty, TensorStats::default());
    }

    fn all_methods() -> Vec<Method> {
        let mut methods = vec![
            Method::MinMax,
            Method::Ema { constant: 0.01 },
            Method::Ema { constant: 1.0 },
            Method::Ema { constant: f64::NAN },
            Method::Percentile { percentile: 99.99 },
            Method::Percentile { percentile: 100.0 },
            Method::Percentile { percentile: 0.001 },
            Method::Percentile { percentile: 0.0 },
        ];
        for bits in [0, 1, 2, 4, 8, 16, 64] {
            methods.push(Method::Entropy { bits });
            methods.push(Method::Mse { bits });
        }
        methods
    }

    #[test]
    fn constant_and_empty_tensors() {
        for c in [2.5f32, 0.0, -7.0, 1e-30, f32::MAX] {
            let s = stats_of(&[&[c; 100], &[c; 3]]);
            for m in all_methods() {
                assert_eq!(s.range(&m), (c, c), "{m:?} on {c}");
            }
            assert_eq!(s.ema_range(0.01), (c, c));
            assert_eq!(s.clipped_fraction(c, c), 0.0);
            assert_eq!(s.clipped_range_fraction(c, c), 0.0);
        }
        let empty = TensorStats::default();
        for m in all_methods() {
            assert_eq!(empty.range(&m), (0.0, 0.0));
        }
        assert_eq!(
            (empty.clipped_fraction(0.0, 1.0), empty.clipped_range_fraction(0.0, 1.0)),
            (0.0, 0.0)
        );
        let mut s = TensorStats::default();
        s.observe(0, &[], &[0, 3]).unwrap();
        assert_eq!(s, TensorStats::default());
    }

    #[test]
    fn every_method_gives_an_ordered_finite_range_on_random_data() {
        for seed in 0..24 {
            let mut rng = Lcg(1000 + seed);
            let n = 1 + rng.below(3000);
            let kind = seed % 8;
            let scale = [1.0, 1e-30, 1e30, 1e-3, 1e3, 1.0, 1.0, 1.0][kind as usize];
            let sample = |rng: &mut Lcg| -> f32 {
                let x = match kind {
                    0..=2 => rng.gaussian(),
                    3 => rng.uniform(),                     // non-negative
                    4 => rng.uniform() * 4.0 - 0.375,       // small negative tail
                    5 => rng.gaussian().powi(5),            // heavy tail
                    6 => -rng.uniform(),                    // non-positive
                    _ => (rng.below(3) as f64 - 1.0) * 0.5, // three spikes
                };
                (x * scale) as f32
            };
            let mut s = TensorStats::default();
            for sample_index in 0..1 + rng.below(4) {
                let values: Vec<f32> = (0..n).map(|_| sample(&mut rng)).collect();
                s.observe(sample_index as u32, &values, &[n]).unwrap();
            }
            for m in all_methods() {
                let (lo, hi) = s.range(&m);
                assert!(
                    lo.is_finite() && hi.is_finite() && lo <= hi,
                    "seed {seed} {m:?}: {lo} {hi}"
                );
                assert!(
                    lo >= s.min && hi <= s.max,
                    "seed {seed} {m:?}: {lo} {hi} outside {} {}",
                    s.min,
                    s.max
                );
                if s.min < s.max && !matches!(m, Method::Ema { .. }) {
                    assert!(lo < hi, "seed {seed} {m:?}: zero-width {lo} {hi}");
                }
                let (f, r) = (s.clipped_fraction(lo, hi), s.clipped_range_fraction(lo, hi));
                assert!(
                    (0.0..=1.0).contains(&f) && (0.0..=1.0).contains(&r),
                    "seed {seed} {m:?}: {f} {r}"
                );
            }
        }
    }

    #[test]
    fn extreme_magnitudes_do_not_break_the_histogram() {
        let values = [f32::MAX, -f32::MAX, 1e-45, -1e-45, 0.0, f32::MIN_POSITIVE];
        let s = stats_of(&[&values]);
        assert_eq!(s.histogram.total, 6);
        assert!(s.histogram.counts.len() <= HISTOGRAM_BINS);
        for m in all_methods() {
            let (lo, hi) = s.range(&m);
            assert!(lo.is_finite() && hi.is_finite() && lo <= hi, "{m:?}");
        }
        let tiny = Histogram::from_values(&[1e-45, 2e-45]);
        assert_eq!(
            (tiny.exponent, tiny.start, tiny.counts.clone()),
            (MIN_EXPONENT, 0, vec![2])
        );
    }

    #[test]
    fn clipped_fractions_by_hand() {
        // 1000 evenly spaced values in (0, 1).
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 + 0.5) / 1000.0).collect();
        let s = stats_of(&[&values]);
        assert!((s.clipped_fraction(0.0, 0.5) - 0.5).abs() < 2e-3);
        assert!((s.clipped_fraction(0.25, 0.75) - 0.5).abs() < 2e-3);
        assert_eq!(s.clipped_fraction(s.min, s.max), 0.0);
        // A bound inside an occupied bin clips that bin in proportion. {0, 0.25, 0.5, 1}: w = 2^-12;
        // lo halves 0.25's bin, the bin of 0 is wholly below; hi halves 0.5's bin, 1.0 is above.
        let s4 = stats_of(&[&[0.0, 0.25, 0.5, 1.0]]);
        assert_eq!(s4.histogram.bin_width(), 1.0 / 4096.0);
        assert_eq!(s4.clipped_fraction(0.25 + 1.0 / 8192.0, 1.0), 1.5 / 4.0);
        assert_eq!(s4.clipped_fraction(0.0, 0.5 + 1.0 / 8192.0), 1.5 / 4.0);
        assert_eq!(s4.clipped_fraction(0.0, 1.0), 0.0);
        assert_eq!(s.clipped_fraction(2.0, 3.0), 1.0);
        assert_eq!(s.clipped_range_fraction(s.min, s.max), 0.0);
        assert!((s.clipped_range_fraction(0.0, 0.5) - (1.0 - 0.4995 / 0.999)).abs() < 1e-6);
        assert_eq!(s.clipped_range_fraction(-10.0, 10.0), 0.0);
        assert_eq!(s.clipped_range_fraction(5.0, 6.0), 1.0);
    }

    #[test]
    fn method_reads_from_yaml_and_json() {
        let yaml = |s: &str| serde_yaml::from_str::<Method>(s).unwrap();
        assert_eq!(yaml("method: minmax"), Method::MinMax);
        assert_eq!(yaml("method: ema"), Method::Ema { constant: 0.01 });
        assert_eq!(yaml("method: ema\nconstant: 0.1"), Method::Ema { constant: 0.1 });
        assert_eq!(yaml("method: percentile"), Method::Percentile { percentile: 99.99 });
        assert_eq!(yaml("method: entropy\nbits: 4"), Method::Entropy { bits: 4 });
        assert_eq!(yaml("method: mse"), Method::Mse { bits: 8 });
        assert!(serde_yaml::from_str::<Method>("method: kl").is_err());
        for m in all_methods()
            .into_iter()
            .filter(|m| !matches!(m, Method::Ema { constant } if constant.is_nan()))
        {
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<Method>(&json).unwrap(), m, "{json}");
        }
    }

    #[test]
    fn statistics_survive_json() {
        let mut s = TensorStats::default();
        s.observe(0, &[1.0, -2.0, 3.5, 0.25], &[1, 2, 2]).unwrap();
        s.observe(5, &[4.0, 0.0, -1.0, 2.0], &[1, 2, 2]).unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<TensorStats>(&json).unwrap(), s);
        let empty = serde_json::to_string(&TensorStats::default()).unwrap();
        assert_eq!(
            serde_json::from_str::<TensorStats>(&empty).unwrap(),
            TensorStats::default()
        );
    }

    #[test]
    fn sample_shape_is_kept_while_samples_agree() {
        let mut s = TensorStats::default();
        s.observe(0, &[1.0; 8], &[1, 2, 2, 2]).unwrap();
        s.observe(1, &[2.0; 8], &[1, 2, 2, 2]).unwrap();
        assert_eq!(s.sample_shape.as_deref(), Some(&[1usize, 2, 2, 2][..]));
        let mut other = TensorStats::default();
        other.observe(2, &[3.0; 12], &[1, 2, 3, 2]).unwrap();
        let mut joined = s.clone();
        joined.merge(&other);
        assert_eq!(joined.sample_shape, None);
        // Observing a different size directly forgets it too.
        s.observe(3, &[0.0; 4], &[1, 2, 1, 2]).unwrap();
        assert_eq!(s.sample_shape, None);
    }
}
