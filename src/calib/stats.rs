//! Collecting activation statistics: the float model runs over the calibration samples in the
//! chosen engine. In tract (the default) samples run in parallel over one shared plan, and each
//! tensor is observed as tract produces it and dropped after its last reader
//! (`Runner::run_visiting`), so memory grows neither with the number of samples nor with the
//! number of tensors of a sample; ONNX Runtime returns a sample's observed tensors together
//! (`runtime::onnxruntime`). Per-sample statistics are
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
use crate::runtime::memory::run_in_order;
use crate::runtime::{Engine, EngineRunner};

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

/// Work that rides along calibration's run of the float model instead of running the model
/// again: it reads some of each sample's tensors as tract produces them, reduces them to the
/// sample's `Share`, and adds the shares to its `Sum` in sample order (so the sum does not depend
/// on the thread count). gptq's layer statistics are one (`passes::gptq::LayerInputs`);
/// [`ride`] runs one without the statistics.
pub trait Rider: Sync {
    /// What one sample contributes.
    type Share: Send;
    /// What the samples' shares add up to.
    type Sum;
    /// The tensors it reads, by ONNX name (graph inputs or node outputs).
    fn tensors(&self) -> Vec<String>;
    /// An empty share for sample `sample`, before its tensors are shown.
    fn start(&self, sample: usize) -> Self::Share;
    /// Shows it one of the tensors it asked for (other tensors are not shown).
    fn visit(&self, share: &mut Self::Share, name: &str, tensor: &Tensor) -> Result<()>;
    /// The sum of no sample.
    fn empty(&self) -> Self::Sum;
    /// Adds the next sample's share, in sample order.
    fn absorb(&self, sum: &mut Self::Sum, share: Self::Share) -> Result<()>;
}

/// The rider of a calibration run nothing rides along.
impl Rider for () {
    type Share = ();
    type Sum = ();
    fn tensors(&self) -> Vec<String> {
        Vec::new()
    }
    fn start(&self, _: usize) {}
    fn visit(&self, _: &mut (), _: &str, _: &Tensor) -> Result<()> {
        Ok(())
    }
    fn empty(&self) {}
    fn absorb(&self, _: &mut (), _: ()) -> Result<()> {
        Ok(())
    }
}

/// Observes one sample: runs it and returns the statistics of each float tensor (by index
/// into `names`), and the rider's share, dropping the tensors as it goes.
fn observe_sample<R: Rider>(
    runner: &EngineRunner,
    source: &DataSource,
    slots: &HashMap<&str, usize>,
    rider: (&R, &std::collections::HashSet<String>),
    index: usize,
) -> Result<(Vec<Option<TensorStats>>, R::Share)> {
    let inputs: Vec<TValue> = source.sample(index)?;
    let mut stats: Vec<Option<TensorStats>> = vec![None; slots.len()];
    let (rider, rides) = rider;
    let mut share = rider.start(index);
    let mut observe = |name: &str, t: &Tensor| -> Result<()> {
        if rides.contains(name) {
            rider.visit(&mut share, name, t)?;
        }
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
    Ok((stats, share))
}

/// Observes samples `0..total`, at most `parallel` at once, and merges their statistics (and
/// hands their riders' shares to `absorb`) in sample order as each and all before it are done
/// ([`run_in_order`]: at most two samples per worker held besides the merged ones; the result
/// does not depend on which thread ran what; on errors, the first failing sample's error).
fn observe_all<S: Send>(
    total: usize,
    parallel: usize,
    observe: impl Fn(usize) -> Result<(Vec<Option<TensorStats>>, S)> + Sync,
    mut absorb: impl FnMut(S) -> Result<()> + Send,
    merged_one: impl Fn(usize) + Sync,
) -> Result<Vec<Option<TensorStats>>> {
    let mut merged: Option<Vec<Option<TensorStats>>> = None;
    run_in_order(total, parallel, observe, |at, (sample, share)| {
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
        absorb(share)?;
        merged_one(at);
        Ok(())
    })?;
    Ok(merged.unwrap_or_default())
}

/// Runs the float model (`runner`, which returns every tensor `rider` reads) over samples
/// `samples` for `rider` alone, at most `parallel` at once, and adds their shares to `sum` in
/// sample order, advancing `progress` by one a sample.
pub(crate) fn ride<R: Rider>(
    runner: &EngineRunner,
    source: &DataSource,
    rider: &R,
    samples: std::ops::Range<usize>,
    parallel: usize,
    sum: &mut R::Sum,
    progress: &Progress,
) -> Result<()>
where
    R::Sum: Send,
{
    let rides: std::collections::HashSet<String> = rider.tensors().into_iter().collect();
    let first = samples.start;
    run_in_order(
        samples.len(),
        parallel,
        |i| {
            let mut share = rider.start(first + i);
            runner.run_visiting(source.sample(first + i)?, |name, t| match rides.contains(name) {
                true => rider.visit(&mut share, name, t),
                false => Ok(()),
            })?;
            progress.advance(1);
            Ok(share)
        },
        |_, share| rider.absorb(sum, share),
    )
}

/// Runs the model over every sample and gathers the statistics of every float tensor.
pub fn collect(model: &Model, source: &DataSource, data_fingerprints: Vec<String>) -> Result<CalibrationStats> {
    collect_observing(model, source, data_fingerprints, &|_| true, Engine::Tract)
}

/// [`collect`] for the tensors `wanted` accepts only: observing a tensor costs more than
/// computing it, so the job observes only what the plan can quantize.
pub fn collect_observing(
    model: &Model,
    source: &DataSource,
    data_fingerprints: Vec<String>,
    wanted: &dyn Fn(&str) -> bool,
    engine: Engine,
) -> Result<CalibrationStats> {
    Ok(collect_riding(model, source, data_fingerprints, wanted, &(), engine)?.0)
}

/// [`collect_observing`], with `rider` reading the tensors it asks for in the same run of the
/// model; returns the statistics and the rider's sum.
pub fn collect_riding<R: Rider>(
    model: &Model,
    source: &DataSource,
    data_fingerprints: Vec<String>,
    wanted: &dyn Fn(&str) -> bool,
    rider: &R,
    engine: Engine,
) -> Result<(CalibrationStats, R::Sum)>
where
    R::Sum: Send,
{
    let names = observed_names(model, wanted);
    let slots: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let rides: std::collections::HashSet<String> = rider.tensors().into_iter().collect();
    // Inputs are observed from the fed values; the runner returns every node output.
    let inputs: Vec<String> = source.sample_shapes()?.into_iter().map(|(n, _, _)| n).collect();
    let mut node_outputs: Vec<String> = names.iter().filter(|n| !inputs.contains(n)).cloned().collect();
    node_outputs.extend(
        rider
            .tensors()
            .into_iter()
            .filter(|n| !inputs.contains(n) && !slots.contains_key(n.as_str())),
    );
    let runner = EngineRunner::new(engine, model, &source.sample_shapes()?, &node_outputs)?;
    let total = source.len();
    let parallel = runner.parallelism()?;
    let progress = Progress::new("calibrating", total as u64, &runner.progress_detail(&parallel));
    let mut sum = rider.empty();
    let merged = observe_all(
        total,
        parallel.samples,
        |i| observe_sample(&runner, source, &slots, (rider, &rides), i),
        |share| rider.absorb(&mut sum, share),
        |_| progress.advance(1),
    )?;
    progress.finish();
    let (graph, weights) = model_fingerprint(model);
    let tensors = names
        .into_iter()
        .zip(merged)
        .filter_map(|(n, s)| s.map(|s| (n, s)))
        .collect();
    let stats = CalibrationStats {
        format: STATS_FORMAT,
        fingerprint: Fingerprint {
            graph,
            weights,
            data: data_fingerprints,
        },
        samples: total,
        tensors,
    };
    Ok((stats, sum))
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
    fn sample(i: usize) -> Result<(Vec<Option<TensorStats>>, usize)> {
        std::thread::sleep(std::time::Duration::from_millis(((7 * i) % 5) as u64));
        let values: Vec<f32> = (0..24).map(|k| ((k * 31 + i * 17) % 23) as f32 * 0.37 - 3.1).collect();
        let mut a = TensorStats::default();
        a.observe(i as u32, &values, &[1, 2, 3, 4]).unwrap();
        let b = i.is_multiple_of(2).then(|| {
            let mut b = TensorStats::default();
            b.observe(i as u32, &values[..6], &[6]).unwrap();
            b
        });
        Ok((vec![Some(a), b], i))
    }

    fn json(stats: &[Option<TensorStats>]) -> String {
        serde_json::to_string(stats).unwrap()
    }

    #[test]
    fn samples_merge_in_sample_order_whatever_the_thread_count() {
        let mut want: Vec<Option<TensorStats>> = vec![None, None];
        for i in 0..23 {
            for (acc, s) in want.iter_mut().zip(sample(i).unwrap().0) {
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
            let mut shares = Vec::new();
            let got = pool
                .install(|| {
                    observe_all(
                        23,
                        threads,
                        sample,
                        |share| {
                            shares.push(share);
                            Ok(())
                        },
                        |i| done.lock().unwrap().push(i),
                    )
                })
                .unwrap();
            assert_eq!(json(&got), json(&want), "{threads} threads");
            assert_eq!(done.into_inner().unwrap(), (0..23).collect::<Vec<_>>());
            // The riders' shares are absorbed in sample order too.
            assert_eq!(shares, (0..23).collect::<Vec<_>>(), "{threads} threads");
        }
        assert!(observe_all(0, 1, sample, |_| Ok(()), |_| {}).unwrap().is_empty());
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
            let err = pool
                .install(|| observe_all(20, threads, failing, |_| Ok(()), |_| {}))
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                Error::Runtime("sample 6".into()).to_string(),
                "{threads} threads"
            );
        }
    }
}
