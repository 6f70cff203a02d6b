//! Comparison metrics of a quantized signal `q` against its float reference `f`, as pure
//! functions, and the per-sample sums that let them be computed streaming: each sample is reduced
//! to a handful of f64 sums, and the sums are combined in sample order (deterministic whatever
//! the thread count).
//!
//! Definitions:
//! - SQNR (dB) = 10·log10(Σf² / Σ(f−q)²) over every element of every sample, accumulated in f64.
//!   +∞ when the two are identical (Σ(f−q)² = 0, including all-zero signals); −∞ when the
//!   reference is all zeros but the quantized signal is not; NaN when either holds a NaN.
//! - Cosine similarity: per sample over the flattened tensor, f·q / (‖f‖·‖q‖), then the mean
//!   over samples (each sample weighs the same, whatever its magnitude); the minimum over samples
//!   is kept too. Two all-zero vectors have cosine 1, one all-zero vector against a non-zero one 0.
//! - Max absolute error: max |f−q| over every element of every sample.
//! - Top-1 agreement: for outputs that look like class scores (see [`class_rows`]), the fraction of
//!   rows whose argmax (first maximum on ties) is the same in both.

/// SQNR in dB from the accumulated Σf² (`signal`) and Σ(f−q)² (`noise`).
pub fn sqnr_from_sums(signal: f64, noise: f64) -> f64 {
    if signal.is_nan() || noise.is_nan() {
        f64::NAN
    } else if noise == 0.0 {
        f64::INFINITY
    } else if signal == 0.0 {
        f64::NEG_INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

/// SQNR in dB of `q` against the reference `f` (same length).
pub fn sqnr_db(f: &[f32], q: &[f32]) -> f64 {
    let (mut signal, mut noise) = (0f64, 0f64);
    for (&a, &b) in f.iter().zip(q) {
        let (a, b) = (a as f64, b as f64);
        signal += a * a;
        noise += (a - b) * (a - b);
    }
    sqnr_from_sums(signal, noise)
}

/// Cosine from the sums f·q, ‖f‖² and ‖q‖².
pub fn cosine_from_sums(fq: f64, ff: f64, qq: f64) -> f64 {
    if fq.is_nan() || ff.is_nan() || qq.is_nan() {
        return f64::NAN;
    }
    match (ff == 0.0, qq == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        // sqrt of each separately: ff·qq can overflow for large tensors.
        _ => (fq / (ff.sqrt() * qq.sqrt())).clamp(-1.0, 1.0),
    }
}

/// Cosine similarity of two vectors (flattened tensors).
pub fn cosine(f: &[f32], q: &[f32]) -> f64 {
    let (mut fq, mut ff, mut qq) = (0f64, 0f64, 0f64);
    for (&a, &b) in f.iter().zip(q) {
        let (a, b) = (a as f64, b as f64);
        fq += a * b;
        ff += a * a;
        qq += b * b;
    }
    cosine_from_sums(fq, ff, qq)
}

/// max |f − q| (NaN if any difference is NaN).
pub fn max_abs_error(f: &[f32], q: &[f32]) -> f64 {
    let mut m = 0f64;
    for (&a, &b) in f.iter().zip(q) {
        let d = (a as f64 - b as f64).abs();
        if d.is_nan() {
            return f64::NAN;
        }
        m = m.max(d);
    }
    m
}

/// Whether a per-sample output shape looks like class scores, and how: after dropping leading
/// 1s, `[C]` is one row of C classes and `[N, C]` is N rows (e.g. per-frame scores), C ≥ 2.
/// Returns (rows, classes); None for anything else (scalars, `[1]`, rank ≥ 3 after dropping).
pub fn class_rows(shape: &[usize]) -> Option<(usize, usize)> {
    let first = shape.iter().position(|&d| d != 1).unwrap_or(shape.len());
    match &shape[first..] {
        [c] if *c >= 2 => Some((1, *c)),
        [n, c] if *c >= 2 && *n >= 1 => Some((*n, *c)),
        _ => None,
    }
}

/// Index of the first maximum (NaNs are skipped; None for an empty or all-NaN slice).
pub fn argmax(v: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in v.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i)
}

/// Rows of class scores whose argmax agrees, and the number of rows, for one sample of shape
/// `shape` (None when the shape does not look like class scores, see [`class_rows`]).
pub fn top1_matches(f: &[f32], q: &[f32], shape: &[usize]) -> Option<(usize, usize)> {
    let (rows, classes) = class_rows(shape)?;
    if f.len() != rows * classes || q.len() != f.len() {
        return None;
    }
    let agree = f
        .chunks_exact(classes)
        .zip(q.chunks_exact(classes))
        .filter(|(a, b)| argmax(a).is_some() && argmax(a) == argmax(b))
        .count();
    Some((agree, rows))
}

/// Fraction of samples (rows) whose top-1 class agrees; `samples` are (f, q, per-sample shape).
pub fn top1_agreement(samples: &[(&[f32], &[f32], &[usize])]) -> Option<f64> {
    let (mut agree, mut rows) = (0usize, 0usize);
    for (f, q, shape) in samples {
        let (a, r) = top1_matches(f, q, shape)?;
        agree += a;
        rows += r;
    }
    (rows > 0).then(|| agree as f64 / rows as f64)
}

/// One sample of one float tensor reduced to sums.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FloatSums {
    /// Σf²
    pub ff: f64,
    /// Σq²
    pub qq: f64,
    /// Σf·q
    pub fq: f64,
    /// Σ(f−q)²
    pub ee: f64,
    /// Σ|f−q|
    pub abs: f64,
    /// max |f−q|
    pub max_abs: f64,
    pub elements: u64,
    /// (rows agreeing, rows) when the tensor looks like class scores.
    pub top1: Option<(usize, usize)>,
}

impl FloatSums {
    pub fn of(f: &[f32], q: &[f32], shape: &[usize]) -> FloatSums {
        let mut s = FloatSums {
            elements: f.len() as u64,
            top1: top1_matches(f, q, shape),
            ..Default::default()
        };
        for (&a, &b) in f.iter().zip(q) {
            let (a, b) = (a as f64, b as f64);
            let d = a - b;
            s.ff += a * a;
            s.qq += b * b;
            s.fq += a * b;
            s.ee += d * d;
            s.abs += d.abs();
            // NaN-propagating max: a NaN difference makes the max NaN.
            s.max_abs = if d.is_nan() || s.max_abs.is_nan() {
                f64::NAN
            } else {
                s.max_abs.max(d.abs())
            };
        }
        s
    }

    pub fn cosine(&self) -> f64 {
        cosine_from_sums(self.fq, self.ff, self.qq)
    }
}

/// Running totals of a float tensor over samples, combined in sample order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FloatTotals {
    pub samples: usize,
    pub elements: u64,
    pub ff: f64,
    pub ee: f64,
    pub abs: f64,
    pub max_abs: f64,
    pub cosine_sum: f64,
    pub cosine_min: f64,
    /// Rows agreeing and rows, while every sample so far looked like class scores.
    pub top1: Option<(usize, usize)>,
}

impl FloatTotals {
    pub fn add(&mut self, s: &FloatSums) {
        let cos = s.cosine();
        self.top1 = match (self.samples, self.top1, s.top1) {
            (0, _, t) => t,
            (_, Some((a, r)), Some((a2, r2))) => Some((a + a2, r + r2)),
            _ => None,
        };
        self.cosine_min = if self.samples == 0 {
            cos
        } else if cos.is_nan() || self.cosine_min.is_nan() {
            f64::NAN
        } else {
            self.cosine_min.min(cos)
        };
        self.samples += 1;
        self.elements += s.elements;
        self.ff += s.ff;
        self.ee += s.ee;
        self.abs += s.abs;
        self.cosine_sum += cos;
        self.max_abs = if s.max_abs.is_nan() || self.max_abs.is_nan() {
            f64::NAN
        } else {
            self.max_abs.max(s.max_abs)
        };
    }

    pub fn sqnr_db(&self) -> f64 {
        sqnr_from_sums(self.ff, self.ee)
    }

    /// Mean of the per-sample cosines.
    pub fn cosine_mean(&self) -> f64 {
        if self.samples == 0 {
            f64::NAN
        } else {
            self.cosine_sum / self.samples as f64
        }
    }

    pub fn mean_abs(&self) -> f64 {
        if self.elements == 0 {
            0.0
        } else {
            self.abs / self.elements as f64
        }
    }

    pub fn top1_agreement(&self) -> Option<f64> {
        self.top1.filter(|&(_, r)| r > 0).map(|(a, r)| a as f64 / r as f64)
    }
}

/// Running totals of an integer tensor: exact equality, element by element.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IntegerTotals {
    pub samples: usize,
    pub elements: u64,
    pub equal: u64,
    /// Samples whose every element is equal.
    pub samples_equal: usize,
}

impl IntegerTotals {
    pub fn add(&mut self, equal: u64, elements: u64) {
        self.samples += 1;
        self.elements += elements;
        self.equal += equal;
        self.samples_equal += (equal == elements) as usize;
    }

    pub fn equal_fraction(&self) -> f64 {
        if self.elements == 0 {
            1.0
        } else {
            self.equal as f64 / self.elements as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqnr_of_hand_computed_vectors() {
        // Σf² = 1 + 4 + 9 = 14, Σ(f−q)² = 1.
        let s = sqnr_db(&[1.0, 2.0, 3.0], &[1.0, 2.0, 2.0]);
        assert!((s - 10.0 * 14f64.log10()).abs() < 1e-12, "{s}");
        assert!((s - 11.4613).abs() < 1e-4, "{s}");
        // Noise of 10% amplitude on every element: 20 dB.
        let f = [3.0f32, -4.0];
        let q = [3.3f32, -4.4];
        assert!((sqnr_db(&f, &q) - 20.0).abs() < 1e-5);
    }

    #[test]
    fn sqnr_edge_cases() {
        assert_eq!(sqnr_db(&[1.0, -2.0], &[1.0, -2.0]), f64::INFINITY);
        assert_eq!(sqnr_db(&[0.0, 0.0], &[0.0, 0.0]), f64::INFINITY);
        assert_eq!(sqnr_db(&[0.0, 0.0], &[0.0, 1.0]), f64::NEG_INFINITY);
        assert!(sqnr_db(&[1.0, 2.0], &[f32::NAN, 2.0]).is_nan());
        assert_eq!(sqnr_db(&[], &[]), f64::INFINITY);
    }

    #[test]
    fn sqnr_accumulates_over_all_samples_not_per_sample_mean() {
        // Sample 1: Σf² = 100, noise 1; sample 2: Σf² = 1, noise 1. Global = 10·log10(101/2).
        let mut t = FloatTotals::default();
        t.add(&FloatSums::of(&[10.0], &[11.0], &[1]));
        t.add(&FloatSums::of(&[1.0], &[0.0], &[1]));
        assert!((t.sqnr_db() - 10.0 * (101f64 / 2.0).log10()).abs() < 1e-12);
        assert_eq!(t.max_abs, 1.0);
        assert_eq!(t.mean_abs(), 1.0);
    }

    #[test]
    fn cosine_of_hand_computed_vectors() {
        // f·q = 1 + 4 + 6 = 11, ‖f‖ = √14, ‖q‖ = √9 = 3.
        let c = cosine(&[1.0, 2.0, 3.0], &[1.0, 2.0, 2.0]);
        assert!((c - 11.0 / (14f64.sqrt() * 3.0)).abs() < 1e-12, "{c}");
        assert!((cosine(&[1.0, 0.0], &[0.0, 5.0])).abs() < 1e-12);
        assert!((cosine(&[1.0, 2.0], &[-2.0, -4.0]) + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[0.0, 0.0]), 1.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    #[test]
    fn cosine_is_the_mean_of_per_sample_cosines() {
        let mut t = FloatTotals::default();
        t.add(&FloatSums::of(&[1.0, 0.0], &[1.0, 0.0], &[2])); // 1
        t.add(&FloatSums::of(&[1.0, 0.0], &[0.0, 1.0], &[2])); // 0
        assert_eq!(t.cosine_mean(), 0.5);
        assert_eq!(t.cosine_min, 0.0);
    }

    #[test]
    fn max_abs_error_of_hand_computed_vectors() {
        assert_eq!(max_abs_error(&[1.0, 2.0, 3.0], &[1.0, 2.5, 2.0]), 1.0);
        assert_eq!(max_abs_error(&[-1.0], &[2.0]), 3.0);
        assert!(max_abs_error(&[1.0], &[f32::NAN]).is_nan());
    }

    #[test]
    fn class_score_shapes() {
        assert_eq!(class_rows(&[1, 1000]), Some((1, 1000)));
        assert_eq!(class_rows(&[1, 2]), Some((1, 2)));
        assert_eq!(class_rows(&[4]), Some((1, 4)));
        assert_eq!(class_rows(&[1, 4, 360]), Some((4, 360)));
        assert_eq!(class_rows(&[4, 360]), Some((4, 360)));
        assert_eq!(class_rows(&[1, 1]), None);
        assert_eq!(class_rows(&[]), None);
        assert_eq!(class_rows(&[1, 3, 8, 8]), None);
        assert_eq!(class_rows(&[5, 1]), None);
    }

    #[test]
    fn top1_agreement_of_hand_made_scores() {
        let f1 = [0.1f32, 0.7, 0.2];
        let q1 = [0.1f32, 0.6, 0.3]; // argmax 1 = 1
        let f2 = [0.5f32, 0.4, 0.1];
        let q2 = [0.4f32, 0.5, 0.1]; // argmax 0 ≠ 1
        let shape = [1usize, 3];
        let a = top1_agreement(&[(&f1, &q1, &shape), (&f2, &q2, &shape)]).unwrap();
        assert_eq!(a, 0.5);
        // Per-row agreement for [N, C] samples: 2 frames of 2 classes, one agrees.
        let rows = [2usize, 2];
        let f = [1.0f32, 0.0, 0.0, 1.0];
        let q = [1.0f32, 0.0, 1.0, 0.0];
        assert_eq!(top1_matches(&f, &q, &rows), Some((1, 2)));
        assert_eq!(top1_agreement(&[(&f, &q, &rows)]), Some(0.5));
        // Ties: the first maximum wins on both sides.
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, 1.0]), Some(1));
        // Not class scores.
        assert_eq!(top1_agreement(&[(&f, &q, &[2usize, 1, 2][..])]), None);
    }

    #[test]
    fn totals_drop_top1_when_a_sample_is_not_class_scores() {
        let mut t = FloatTotals::default();
        t.add(&FloatSums::of(&[1.0, 0.0], &[1.0, 0.0], &[2]));
        assert_eq!(t.top1_agreement(), Some(1.0));
        t.add(&FloatSums::of(&[1.0], &[1.0], &[1]));
        assert_eq!(t.top1_agreement(), None);
    }

    #[test]
    fn integer_equality() {
        let mut t = IntegerTotals::default();
        t.add(3, 4);
        t.add(4, 4);
        assert_eq!(t.equal_fraction(), 7.0 / 8.0);
        assert_eq!(t.samples_equal, 1);
    }
}
