//! Collecting activation statistics: the float model runs in tract over the calibration
//! samples, in parallel over one shared plan; each tensor is observed as tract produces it and
//! dropped after its last reader (`Runner::run_visiting`), so memory grows neither with the
//! number of samples nor with the number of tensors of a sample. Per-sample statistics are
//! merged in sample order as soon as a sample and all before it are done, so the result is the
//! same whatever the thread count. Statistics are keyed by tensor name, carry a fingerprint of
//! the graph, the weights and the data they were taken on, and can be saved, reused and merged.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tract_onnx::prelude::{DatumType, TValue, Tensor};

use crate::calib::observers::{Method, TensorStats};
use crate::calib::source::DataSource;
use crate::error::{Error, Result};
use crate::ir::tensor::Fnv64;
use crate::ir::Model;
use crate::runtime::memory::{run_in_order, Parallelism};
use crate::runtime::Runner;

/// Bumped when the file layout changes.
pub const STATS_FORMAT: u32 = 1;

/// What statistics were taken on. Equal fingerprints mean reusable statistics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The graph's structure: inputs, outputs, nodes and attributes (dump without constants).
    pub graph: String,
    /// Every constant's name, dtype, shape and content hash.
    pub weights: String,
    /// One entry per data shard: `<content hash>:<samples used>`.
    pub data: Vec<String>,
}

/// The fingerprint data entry of data-free statistics (`calib::datafree`).
pub const DATA_FREE: &str = "data-free";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CalibrationStats {
    pub format: u32,
    pub fingerprint: Fingerprint,
    pub samples: usize,
    /// Float tensors observed, by ONNX name.
    pub tensors: BTreeMap<String, TensorStats>,
}

/// Fingerprints of a model's graph structure and of its weights.
pub fn model_fingerprint(model: &Model) -> (String, String) {
    let (mut graph, mut weights) = (Fnv64::default(), Fnv64::default());
    for line in model.to_string().lines() {
        let h = if line.starts_with("const ") {
            &mut weights
        } else {
            &mut graph
        };
        h.write(line.as_bytes());
        h.write(b"\n");
    }
    (format!("{:016x}", graph.finish()), format!("{:016x}", weights.finish()))
}

/// Names of the tensors to observe: graph inputs and node outputs that `wanted` accepts.
fn observed_names(model: &Model, wanted: &dyn Fn(&str) -> bool) -> Vec<String> {
    let g = &model.graph;
    let mut names: Vec<String> = g.runtime_inputs().map(|i| i.name().to_string()).collect();
    if let Ok(order) = g.topological_order() {
        for ix in order {
            names.extend(g.nodes[ix].outputs.iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    names.retain(|n| wanted(n));
    names
}

/// The values of a float32 tensor, borrowed when possible (None for every other type).
fn float_values(t: &Tensor) -> Result<Option<std::borrow::Cow<'_, [f32]>>> {
    use std::borrow::Cow;
    match t.datum_type() {
        DatumType::F32 => match t.as_plain_ram().and_then(|v| v.as_slice::<f32>().ok()) {
            Some(s) => Ok(Some(Cow::Borrowed(s))),
            None => Ok(Some(Cow::Owned(crate::runtime::to_f32_vec(t)?))),
        },
        // f16/f64 tensors are not quantized (their Q/DQ would need scales of their own type).
        _ => Ok(None),
    }
}

/// Observes one sample: runs it and returns the statistics of each float tensor (by index
/// into `names`), dropping the tensors as it goes.
fn observe_sample(
    runner: &Runner,
    source: &DataSource,
    slots: &HashMap<&str, usize>,
    index: usize,
) -> Result<Vec<Option<TensorStats>>> {
    let inputs: Vec<TValue> = source.sample(index)?;
    let mut stats: Vec<Option<TensorStats>> = vec![None; slots.len()];
    let mut observe = |name: &str, t: &Tensor| -> Result<()> {
        let Some(&slot) = slots.get(name) else { return Ok(()) };
        let Some(values) = float_values(t)? else { return Ok(()) };
        let mut s = TensorStats::default();
        s.observe(index as u32, &values, t.shape()).map_err(|e| {
            Error::data(
                source.sample_label(index),
                format!("activation '{name}' has a non-finite value ({e}); calibration needs finite activations"),
            )
        })?;
        stats[slot] = Some(s);
        Ok(())
    };
    runner.run_visiting(inputs, &mut observe)?;
    Ok(stats)
}

/// Observes samples `0..total`, at most `parallel` at once, and merges their statistics in
/// sample order as each and all before it are done ([`run_in_order`]: at most two samples per
/// worker held besides the merged ones; the result does not depend on which thread ran what;
/// on errors, the first failing sample's error).
fn observe_all(
    total: usize,
    parallel: usize,
    observe: impl Fn(usize) -> Result<Vec<Option<TensorStats>>> + Sync,
    merged_one: impl Fn(usize) + Sync,
) -> Result<Vec<Option<TensorStats>>> {
    let mut merged: Option<Vec<Option<TensorStats>>> = None;
    run_in_order(total, parallel, observe, |at, sample| {
        match merged.as_mut() {
            None => merged = Some(sample),
            Some(merged) => {
                for (acc, st) in merged.iter_mut().zip(sample) {
                    match (acc.as_mut(), st) {
                        (Some(a), Some(st)) => a.merge(&st),
                        (None, Some(st)) => *acc = Some(st),
                        _ => {}
                    }
                }
            }
        }
        merged_one(at);
        Ok(())
    })?;
    Ok(merged.unwrap_or_default())
}

/// Runs the model over every sample and gathers the statistics of every float tensor.
pub fn collect(model: &Model, source: &DataSource, data_fingerprints: Vec<String>) -> Result<CalibrationStats> {
    collect_observing(model, source, data_fingerprints, &|_| true)
}

/// [`collect`] for the tensors `wanted` accepts only: observing a tensor costs more than
/// computing it, so the job observes only what the plan can quantize.
pub fn collect_observing(
    model: &Model,
    source: &DataSource,
    data_fingerprints: Vec<String>,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<CalibrationStats> {
    let names = observed_names(model, wanted);
    let slots: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    // Inputs are observed from the fed values; the runner returns every node output.
    let inputs: Vec<String> = source.sample_shapes()?.into_iter().map(|(n, _, _)| n).collect();
    let node_outputs: Vec<String> = names.iter().filter(|n| !inputs.contains(n)).cloned().collect();
    let runner = Runner::new(model, &source.sample_shapes()?, &node_outputs)?;
    let total = source.len();
    let parallel = Parallelism::for_samples(runner.sample_bytes()?);
    let progress = Progress::new("calibrating", total as u64, &parallel.describe());
    let merged = observe_all(
        total,
        parallel.samples,
        |i| observe_sample(&runner, source, &slots, i),
        |_| progress.advance(1),
    )?;
    progress.finish();
    let (graph, weights) = model_fingerprint(model);
    let tensors = names
        .into_iter()
        .zip(merged)
        .filter_map(|(n, s)| s.map(|s| (n, s)))
        .collect();
    Ok(CalibrationStats {
        format: STATS_FORMAT,
        fingerprint: Fingerprint {
            graph,
            weights,
            data: data_fingerprints,
        },
        samples: total,
        tensors,
    })
}

impl CalibrationStats {
    pub fn load(path: &Path) -> Result<CalibrationStats> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let stats: CalibrationStats = serde_json::from_slice(&bytes)
            .map_err(|e| Error::data(path, format!("not an onnxq statistics file: {e}")))?;
        if stats.format != STATS_FORMAT {
            return Err(Error::data(
                path,
                format!(
                    "statistics format {} but this onnxq reads format {STATS_FORMAT}: recalibrate",
                    stats.format
                ),
            ));
        }
        Ok(stats)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec(self).map_err(|e| Error::data(path, e.to_string()))?;
        crate::onnx::write_atomic(path, &text)
    }

    /// Errs, saying what changed, unless these statistics were taken on `expected`.
    pub fn check_fingerprint(&self, expected: &Fingerprint, path: &Path) -> Result<()> {
        let mut changed = Vec::new();
        if self.fingerprint.graph != expected.graph {
            changed.push("the graph (nodes, attributes, inputs or outputs)");
        }
        if self.fingerprint.weights != expected.weights {
            changed.push("the weights");
        }
        if self.fingerprint.data != expected.data {
            changed.push("the calibration data (files, their contents or the sample count)");
        }
        if changed.is_empty() {
            return Ok(());
        }
        Err(Error::data(
            path,
            format!(
                "statistics were taken on a different model or data: {} changed; delete the file or choose another --stats to recalibrate",
                changed.join(" and ")
            ),
        ))
    }

    /// Joins statistics taken on disjoint shards of the data, in the given order (sample
    /// indices of later shards follow the earlier ones).
    pub fn merge_shards(parts: Vec<(std::path::PathBuf, CalibrationStats)>) -> Result<CalibrationStats> {
        let mut iter = parts.into_iter();
        let (first_path, mut acc) = iter
            .next()
            .ok_or_else(|| Error::Usage("merge needs at least one statistics file".into()))?;
        for (path, mut part) in iter {
            let same_model =
                part.fingerprint.graph == acc.fingerprint.graph && part.fingerprint.weights == acc.fingerprint.weights;
            if !same_model {
                return Err(Error::data(
                    &path,
                    format!("taken on a different graph or weights than {}", first_path.display()),
                ));
            }
            if let Some(d) = part.fingerprint.data.iter().find(|d| acc.fingerprint.data.contains(d)) {
                return Err(Error::data(
                    &path,
                    format!("shares data shard {d} with the files before it: shards must be disjoint"),
                ));
            }
            let offset = acc.samples as u32;
            for (name, mut s) in std::mem::take(&mut part.tensors) {
                s.shift_samples(offset);
                match acc.tensors.get_mut(&name) {
                    Some(a) => a.merge(&s),
                    None => {
                        acc.tensors.insert(name, s);
                    }
                }
            }
            acc.samples += part.samples;
            acc.fingerprint.data.extend(part.fingerprint.data);
        }
        Ok(acc)
    }

    /// Whether these statistics come from BatchNorm records rather than data (`calib::datafree`).
    pub fn is_data_free(&self) -> bool {
        self.samples == 0 && self.fingerprint.data == [DATA_FREE]
    }

    /// Per tensor: the observed range, the range `method` chooses and how much it clips.
    pub fn ranges(&self, method: &Method) -> Vec<TensorRange> {
        self.tensors
            .iter()
            .map(|(name, s)| {
                let (lo, hi) = s.range(method);
                TensorRange {
                    tensor: name.clone(),
                    observed: (s.min, s.max),
                    chosen: (lo, hi),
                    clipped_values: s.clipped_fraction(lo, hi),
                    clipped_range: s.clipped_range_fraction(lo, hi),
                }
            })
            .collect()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorRange {
    pub tensor: String,
    pub observed: (f32, f32),
    pub chosen: (f32, f32),
    /// Fraction of observed values outside the chosen range.
    pub clipped_values: f64,
    /// Fraction of the observed range outside the chosen range.
    pub clipped_range: f64,
}

/// A progress bar with samples/s and ETA on a terminal; a log line every 10% otherwise.
pub(crate) struct Progress {
    label: &'static str,
    detail: String,
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: std::sync::atomic::AtomicU64,
    started: Instant,
}

impl Progress {
    /// `detail` follows the figures (how many samples run at once).
    pub(crate) fn new(label: &'static str, total: u64, detail: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(&format!(
                "{label} {{bar:30}} {{pos}}/{{len}} samples  {{per_sec}}  ETA {{eta}}  ({detail})"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress {
            label,
            detail: detail.to_string(),
            bar,
            total,
            done: 0.into(),
            started: Instant::now(),
        }
    }

    pub(crate) fn advance(&self, n: u64) {
        use std::sync::atomic::Ordering;
        let before = self.done.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        match &self.bar {
            Some(bar) => bar.inc(n),
            None => {
                let step = (self.total / 10).max(1);
                if after / step != before / step || after == self.total {
                    let secs = self.started.elapsed().as_secs_f64();
                    eprintln!(
                        "{}: {after}/{} samples, {:.1} samples/s ({})",
                        self.label,
                        self.total,
                        after as f64 / secs.max(1e-9),
                        self.detail
                    );
                }
            }
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sample i's statistics of two tensors; the second is missing on odd samples. Samples
    /// take different times, so they finish out of order.
    fn sample(i: usize) -> Result<Vec<Option<TensorStats>>> {
        std::thread::sleep(std::time::Duration::from_millis(((7 * i) % 5) as u64));
        let values: Vec<f32> = (0..24).map(|k| ((k * 31 + i * 17) % 23) as f32 * 0.37 - 3.1).collect();
        let mut a = TensorStats::default();
        a.observe(i as u32, &values, &[1, 2, 3, 4]).unwrap();
        let b = i.is_multiple_of(2).then(|| {
            let mut b = TensorStats::default();
            b.observe(i as u32, &values[..6], &[6]).unwrap();
            b
        });
        Ok(vec![Some(a), b])
    }

    fn json(stats: &[Option<TensorStats>]) -> String {
        serde_json::to_string(stats).unwrap()
    }

    #[test]
    fn samples_merge_in_sample_order_whatever_the_thread_count() {
        let mut want: Vec<Option<TensorStats>> = vec![None, None];
        for i in 0..23 {
            for (acc, s) in want.iter_mut().zip(sample(i).unwrap()) {
                match (acc.as_mut(), s) {
                    (Some(a), Some(s)) => a.merge(&s),
                    (None, Some(s)) => *acc = Some(s),
                    _ => {}
                }
            }
        }
        for threads in [1, 2, 3, 5] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let done = std::sync::Mutex::new(Vec::new());
            let got = pool
                .install(|| observe_all(23, threads, sample, |i| done.lock().unwrap().push(i)))
                .unwrap();
            assert_eq!(json(&got), json(&want), "{threads} threads");
            assert_eq!(done.into_inner().unwrap(), (0..23).collect::<Vec<_>>());
        }
        assert!(observe_all(0, 1, sample, |_| {}).unwrap().is_empty());
    }

    #[test]
    fn the_first_failing_sample_is_reported_whatever_the_thread_count() {
        let failing = |i: usize| {
            if i == 6 || i == 9 || i == 14 {
                std::thread::sleep(std::time::Duration::from_millis(if i == 6 { 20 } else { 0 }));
                return Err(Error::Runtime(format!("sample {i}")));
            }
            sample(i)
        };
        for threads in [1, 2, 4] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let err = pool.install(|| observe_all(20, threads, failing, |_| {})).unwrap_err();
            assert_eq!(
                err.to_string(),
                Error::Runtime("sample 6".into()).to_string(),
                "{threads} threads"
            );
        }
    }
}
