//! K-means weight codebooks (`weights.codebook: {bits, per_channel}`): each weight (or each of
//! its output channels) keeps `k = 2^bits` float values, and every element stores only the
//! index of its value. No ONNX op looks a table up, but Gather does, so the weight is written as
//!
//! ```text
//! w::indices (uint4 for bits ≤ 4, else uint8; the weight's dims; raw_data)
//!   → Cast(to int32)                        (ONNX Runtime's Gather takes no uint8 indices)
//!   → Add(w::offsets)                       (per channel only: channel c reads entries c·k …)
//!   → Gather(w::codebook, axis 0)           (f32 [k], or [C·k] channel-major)
//!   = w::decoded, read where the float weight was
//! ```
//!
//! ONNX Runtime and OpenVINO fold the constant subgraph into a float weight when they load the
//! model, so the layer computes in float on the clustered values: the gain is the size on disk,
//! not the arithmetic. Activations keep their own Q/DQ; a bias stays float (a codebook has no
//! weight scale for an int32 bias).
//!
//! Maths: 1-D k-means, minimising `Σ (w − c_{a(w)})²` over the centroids `c` and assignment `a`
//! (weight sharing as in Han, Mao and Dally 2016, "Deep Compression"). Seeding is k-means++
//! (Arthur and Vassilvitskii 2007: each next centroid drawn with probability ∝ its squared
//! distance to the nearest one chosen), from a fixed xorshift64* seed. Then Lloyd's iterations on
//! the sorted values: with centroids sorted, each cluster is the run of values between the
//! midpoints of neighbouring centroids, found by binary search, and its mean comes from prefix
//! sums, so an iteration costs `O(k log n)`; they stop when no run boundary moves (Lloyd never
//! increases the error, so this terminates) or after [`MAX_LLOYD_ITERATIONS`]. All sums are f64
//! in element order and channels are independent, so the result does not depend on the thread
//! count. A group with at most `k` distinct values is stored exactly. Non-finite weights count
//! as 0. Unused entries (fewer distinct values than `k`) repeat the last centroid.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::proto::tensor_proto::DataType;
use crate::proto::TensorProto;
use crate::quant::params::weight_layout;

/// Lloyd's iterations stop here at the latest (they usually stop far earlier, when no boundary
/// moves).
pub const MAX_LLOYD_ITERATIONS: usize = 300;

/// The config's `weights.codebook`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodebookSpec {
    /// Index width: `2^bits` entries (2..=8).
    pub bits: u32,
    /// One table per output channel instead of one per weight.
    #[serde(default)]
    pub per_channel: bool,
}

impl CodebookSpec {
    pub fn entries(self) -> usize {
        1 << self.bits
    }

    /// The indices' storage type: uint4 up to 16 entries, uint8 above.
    pub fn index_type(self) -> DataType {
        if self.bits <= 4 {
            DataType::Uint4
        } else {
            DataType::Uint8
        }
    }

    /// Bytes on disk of `elements` indices and `tables` tables (with their int32 offsets when
    /// there is more than one).
    pub fn stored_bytes(self, elements: u64, tables: u64) -> u64 {
        let indices = match self.index_type() {
            DataType::Uint4 => elements.div_ceil(2),
            _ => elements,
        };
        let offsets = if tables > 1 { 4 * tables } else { 0 };
        indices + tables * self.entries() as u64 * 4 + offsets
    }

    /// The default-domain opset its Cast needs (uint4: 21).
    pub fn min_opset(self) -> i64 {
        if self.bits <= 4 {
            21
        } else {
            13
        }
    }
}

/// A weight clustered into a codebook.
#[derive(Clone, Debug)]
pub struct Codebook {
    pub spec: CodebookSpec,
    pub dims: Vec<i64>,
    /// The channel axis of per-channel tables (None: one table).
    pub axis: Option<usize>,
    /// `k` ascending values per table, table after table (channel-major).
    pub centroids: Vec<f32>,
    /// Each element's entry in its own table, in the weight's element order.
    pub indices: Vec<u8>,
    /// Element (o, c, j) of the weight is at (o·channels + c)·inner + j.
    layout: (usize, usize, usize),
}

/// Clusters `values` (a weight of shape `dims`) into `2^bits` values per channel along `axis`,
/// or for the whole tensor when `axis` is None.
pub fn cluster(values: &[f32], dims: &[i64], axis: Option<usize>, spec: CodebookSpec) -> Result<Codebook> {
    if !(2..=8).contains(&spec.bits) {
        return Err(Error::internal(format!("a codebook of {} bits", spec.bits)));
    }
    let layout = weight_layout(values, dims, axis)?;
    let (outer, channels, inner) = layout;
    let k = spec.entries();
    let tables: Vec<(Vec<f32>, Vec<u8>)> = (0..channels)
        .into_par_iter()
        .map(|c| {
            let group: Vec<f64> = (0..outer)
                .flat_map(|o| values[(o * channels + c) * inner..][..inner].iter())
                .map(|&v| if v.is_finite() { v as f64 } else { 0.0 })
                .collect();
            let centroids = kmeans(&group, k);
            let indices = assign(&group, &centroids);
            (centroids, indices)
        })
        .collect();
    let mut indices = vec![0u8; values.len()];
    for (c, (_, table_indices)) in tables.iter().enumerate() {
        for (i, &index) in table_indices.iter().enumerate() {
            let (o, j) = (i / inner.max(1), i % inner.max(1));
            indices[(o * channels + c) * inner + j] = index;
        }
    }
    Ok(Codebook {
        spec,
        dims: dims.to_vec(),
        axis,
        centroids: tables.iter().flat_map(|(t, _)| t.iter().copied()).collect(),
        indices,
        layout,
    })
}

/// `k` ascending centroids of `values` (k-means++ then Lloyd), as f32.
fn kmeans(values: &[f64], k: usize) -> Vec<f32> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut distinct = sorted.clone();
    distinct.dedup();
    let centroids = if distinct.len() <= k {
        distinct
    } else {
        lloyd(&sorted, seed(&sorted, k))
    };
    let mut table: Vec<f32> = centroids.iter().map(|&c| c as f32).collect();
    table.sort_by(f32::total_cmp);
    table.dedup();
    let last = *table.last().unwrap_or(&0.0);
    table.resize(k, last);
    table
}

/// k-means++ seeding on sorted values, from a fixed seed; the centroids come back ascending.
fn seed(sorted: &[f64], k: usize) -> Vec<f64> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut uniform = move || {
        // xorshift64*: a fixed, portable sequence; 53 bits → [0, 1).
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    };
    let n = sorted.len();
    let first = sorted[((uniform() * n as f64) as usize).min(n - 1)];
    let mut centroids = vec![first];
    let mut nearest: Vec<f64> = sorted.iter().map(|&v| (v - first) * (v - first)).collect();
    while centroids.len() < k {
        let total: f64 = nearest.iter().sum();
        if total <= 0.0 {
            break;
        }
        let target = uniform() * total;
        let mut acc = 0.0;
        // The first value whose cumulative weight passes the target; a value already chosen has
        // weight 0 and is never drawn.
        let mut pick = n - 1;
        for (i, &d) in nearest.iter().enumerate() {
            acc += d;
            if acc > target && d > 0.0 {
                pick = i;
                break;
            }
        }
        if nearest[pick] == 0.0 {
            // Rounding left the target past the last positive weight.
            pick = nearest.iter().rposition(|&d| d > 0.0).unwrap_or(pick);
        }
        let c = sorted[pick];
        centroids.push(c);
        for (d, &v) in nearest.iter_mut().zip(sorted) {
            *d = d.min((v - c) * (v - c));
        }
    }
    centroids.sort_by(f64::total_cmp);
    centroids
}

/// Lloyd's iterations on sorted values from ascending centroids (see the module documentation).
fn lloyd(sorted: &[f64], mut centroids: Vec<f64>) -> Vec<f64> {
    let mut prefix = Vec::with_capacity(sorted.len() + 1);
    prefix.push(0.0);
    for &v in sorted {
        prefix.push(prefix.last().unwrap() + v);
    }
    let mut bounds: Vec<usize> = Vec::new();
    for _ in 0..MAX_LLOYD_ITERATIONS {
        // Cluster j holds sorted[start_j..start_{j+1}]: the values nearer to c_j than to c_{j+1}.
        let mut starts = vec![0];
        for pair in centroids.windows(2) {
            let mid = 0.5 * (pair[0] + pair[1]);
            starts.push(sorted.partition_point(|&v| v < mid));
        }
        starts.push(sorted.len());
        if starts == bounds {
            break;
        }
        for (j, c) in centroids.iter_mut().enumerate() {
            let (a, b) = (starts[j], starts[j + 1]);
            if b > a {
                *c = (prefix[b] - prefix[a]) / (b - a) as f64;
            }
        }
        // Means of contiguous runs stay ascending; an empty run's centroid stays between them.
        centroids.sort_by(f64::total_cmp);
        bounds = starts;
    }
    centroids
}

/// Each value's nearest entry of an ascending table (ties to the lower entry).
fn assign(values: &[f64], table: &[f32]) -> Vec<u8> {
    let mids: Vec<f64> = table.windows(2).map(|p| 0.5 * (p[0] as f64 + p[1] as f64)).collect();
    values.iter().map(|&v| mids.partition_point(|&m| m < v) as u8).collect()
}

impl Codebook {
    /// The weight as the model computes it: each element's table entry.
    pub fn dequantized(&self) -> Vec<f32> {
        let (_, channels, inner) = self.layout;
        let k = self.spec.entries();
        self.indices
            .iter()
            .enumerate()
            .map(|(i, &index)| {
                let c = if self.axis.is_some() {
                    (i / inner.max(1)) % channels
                } else {
                    0
                };
                self.centroids[c * k + index as usize]
            })
            .collect()
    }

    /// The weight's SQNR, `10·log10(Σw² / Σ(w − ŵ)²)` (infinite when exact).
    pub fn sqnr_db(&self, original: &[f32]) -> f64 {
        let (mut signal, mut noise) = (0.0f64, 0.0f64);
        for (&w, q) in original.iter().zip(self.dequantized()) {
            let w = if w.is_finite() { w as f64 } else { 0.0 };
            signal += w * w;
            noise += (w - q as f64) * (w - q as f64);
        }
        if noise == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (signal / noise).log10()
        }
    }

    /// Bytes of the stored indices, tables and offsets.
    pub fn stored_bytes(&self) -> u64 {
        let tables = if self.axis.is_some() { self.layout.1 } else { 1 };
        self.spec.stored_bytes(self.indices.len() as u64, tables as u64)
    }

    /// The indices (packed two per byte for uint4, low nibble first), the table, and the
    /// per-channel offsets `c·k` (int32, shaped to broadcast along the axis), when per channel.
    pub fn to_protos(
        &self,
        indices: &str,
        table: &str,
        offsets: &str,
    ) -> (TensorProto, TensorProto, Option<TensorProto>) {
        let raw = match self.spec.index_type() {
            DataType::Uint4 => self
                .indices
                .chunks(2)
                .map(|p| (p[0] & 0x0f) | (p.get(1).copied().unwrap_or(0) << 4))
                .collect(),
            _ => self.indices.clone(),
        };
        let tensor = |name: &str, dims: Vec<i64>, data_type: DataType, raw: Vec<u8>| TensorProto {
            name: Some(name.to_string()),
            dims,
            data_type: Some(data_type as i32),
            raw_data: Some(raw.into()),
            ..Default::default()
        };
        let indices = tensor(indices, self.dims.clone(), self.spec.index_type(), raw);
        let table = tensor(
            table,
            vec![self.centroids.len() as i64],
            DataType::Float,
            self.centroids.iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        let offsets = self.axis.map(|a| {
            let channels = self.layout.1;
            let mut dims = vec![1i64; self.dims.len()];
            dims[a] = channels as i64;
            let k = self.spec.entries() as i32;
            let raw = (0..channels as i32).flat_map(|c| (c * k).to_le_bytes()).collect();
            tensor(offsets, dims, DataType::Int32, raw)
        });
        (indices, table, offsets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(bits: u32, per_channel: bool) -> CodebookSpec {
        CodebookSpec { bits, per_channel }
    }

    #[test]
    fn few_distinct_values_are_stored_exactly() {
        let w = [0.5, -1.0, 0.5, 2.0, -1.0, 2.0];
        let c = cluster(&w, &[6], None, spec(2, false)).unwrap();
        assert_eq!(c.dequantized(), w);
        assert_eq!(c.centroids, [-1.0, 0.5, 2.0, 2.0]);
        assert!(c.sqnr_db(&w).is_infinite());
    }

    #[test]
    fn two_separated_groups_get_their_means() {
        // k = 4 over five clusters of values: the optimum merges the two closest, 10 and 11.
        let w = [-20.0, -20.2, 0.0, 0.2, 10.0, 10.2, 11.0, 11.2, 40.0, 40.2];
        let c = cluster(&w, &[10], None, spec(2, false)).unwrap();
        let expected = [-20.1f32, 0.1, 10.6, 40.1];
        for (got, want) in c.centroids.iter().zip(expected) {
            assert!((got - want).abs() < 1e-4, "{:?}", c.centroids);
        }
        assert_eq!(c.indices, [0, 0, 1, 1, 2, 2, 2, 2, 3, 3]);
    }

    #[test]
    fn lloyd_lowers_the_error_of_the_seeding_and_never_raises_it() {
        let w: Vec<f32> = (0..500).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0).powi(3)).collect();
        let values: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        let error = |table: &[f64]| -> f64 {
            let t: Vec<f32> = table.iter().map(|&c| c as f32).collect();
            values
                .iter()
                .zip(assign(&values, &t))
                .map(|(&v, i)| (v - t[i as usize] as f64).powi(2))
                .sum()
        };
        let seeded = seed(&sorted, 8);
        let refined = lloyd(&sorted, seeded.clone());
        assert!(
            error(&refined) < error(&seeded),
            "{} vs {}",
            error(&refined),
            error(&seeded)
        );
        // A fixed point: one more iteration moves nothing.
        assert_eq!(lloyd(&sorted, refined.clone()), refined);
    }

    #[test]
    fn per_channel_tables_follow_the_axis_and_offsets_index_them() {
        // [2, 3] with channels on axis 1: columns {1, 3}, {−1, 5}, {0, 0}.
        let w = [1.0, -1.0, 0.0, 3.0, 5.0, 0.0];
        let c = cluster(&w, &[2, 3], Some(1), spec(2, true)).unwrap();
        assert_eq!(c.dequantized(), w);
        assert_eq!(c.centroids.len(), 3 * 4);
        let (_, _, offsets) = c.to_protos("i", "t", "o");
        let offsets = offsets.unwrap();
        assert_eq!(offsets.dims, [1, 3]);
        let raw = offsets.raw_data.unwrap();
        let values: Vec<i32> = raw
            .chunks(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(values, [0, 4, 8]);
    }

    #[test]
    fn more_bits_never_lose_accuracy_and_sizes_count_packed_indices() {
        let w: Vec<f32> = (0..1000)
            .map(|i| ((i as f32) * 0.731).sin() * (1.0 + (i % 7) as f32))
            .collect();
        let mut last = f64::NEG_INFINITY;
        for bits in 2..=8 {
            let c = cluster(&w, &[1000], None, spec(bits, false)).unwrap();
            let db = c.sqnr_db(&w);
            assert!(db >= last - 1e-9, "{bits} bits: {db} dB after {last} dB");
            last = db;
            let indices = if bits <= 4 { 500 } else { 1000 };
            assert_eq!(c.stored_bytes(), (indices + 4 * (1 << bits)) as u64);
        }
        // 256 entries for 1000 values of ~7 magnitudes: well above 40 dB.
        assert!(last > 40.0, "{last}");
    }

    #[test]
    fn uint4_indices_pack_low_nibble_first() {
        let w = [0.0, 1.0, 2.0];
        let c = cluster(&w, &[3], None, spec(2, false)).unwrap();
        let (indices, _, offsets) = c.to_protos("i", "t", "o");
        assert!(offsets.is_none());
        assert_eq!(indices.data_type, Some(DataType::Uint4 as i32));
        assert_eq!(indices.raw_data.unwrap().to_vec(), [0x10, 0x02]);
    }

    #[test]
    fn non_finite_weights_count_as_zero_and_the_result_is_deterministic() {
        let w: Vec<f32> = (0..300)
            .map(|i| if i == 7 { f32::NAN } else { (i as f32 * 0.37).cos() })
            .collect();
        let a = cluster(&w, &[300], None, spec(3, false)).unwrap();
        let b = cluster(&w, &[300], None, spec(3, false)).unwrap();
        assert_eq!(a.centroids, b.centroids);
        assert_eq!(a.indices, b.indices);
        assert!(a.dequantized().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn per_channel_tables_do_not_depend_on_the_thread_count() {
        let w: Vec<f32> = (0..64 * 50)
            .map(|i| ((i as f32) * 0.173).sin() * (1 + i % 64) as f32)
            .collect();
        let run = || cluster(&w, &[50, 64], Some(1), spec(4, true)).unwrap();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let serial = one.install(run);
        let parallel = run();
        assert_eq!(serial.centroids, parallel.centroids);
        assert_eq!(serial.indices, parallel.indices);
    }
}
