//! How many samples to run at once: as many as fit in the memory budget (`--max-memory`), at
//! most one per thread.
//!
//! The budget is the whole process's: what it holds already (its resident set when a stage
//! starts: the models, the data index, the statistics) plus, per sample in flight, the peak of
//! the tensors tract holds while running it. That peak is computed from the plan, not measured
//! (so the choice is the same on every run): the plan's order is walked, each node's outputs
//! counted from their facts (shape × element size, packed matmul inputs by their buffer size)
//! when they are made and dropped after their last reader, as tract does. It errs high (tract
//! reuses and skips some of those buffers): ppocr_v3_det at 960×960 is estimated at 273 MiB a
//! sample and takes about half (bench/verify_memory.md).
//!
//! The default budget is half the machine's memory (or of the cgroup's limit when lower): the
//! rest for the system and other processes.

use std::sync::atomic::{AtomicU64, Ordering};

use tract_onnx::prelude::{TypedFact, TypedModel};

use super::Runner;
use crate::error::{tract_error, Error, Result};

/// The budget set by `--max-memory` (0: not set, the default applies).
static LIMIT: AtomicU64 = AtomicU64::new(0);

/// Sets the process's memory budget in bytes (`--max-memory`).
pub fn set_limit(bytes: u64) {
    LIMIT.store(bytes, Ordering::Relaxed);
}

/// The memory budget in bytes: `--max-memory`, else half the machine's (or cgroup's) memory;
/// None when neither is known.
pub fn limit() -> Option<u64> {
    match LIMIT.load(Ordering::Relaxed) {
        0 => machine_memory().map(|m| m / 2),
        set => Some(set),
    }
}

/// Physical memory, or the cgroup (v2, then v1) limit when lower.
pub fn machine_memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    })?;
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok());
    Some(cgroup.map_or(total, |c| c.min(total)))
}

/// The process's resident set now (0 when unknown).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Parses a `--max-memory` value: bytes, or a number with K, M, G, T (powers of 1024; `KiB`,
/// `MB`, `GiB`, … spelled any case are the same).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || {
        Error::Usage(format!(
            "expected a size such as 2G, 512M or a number of bytes, not '{text}'"
        ))
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// How many samples to run at once, at most `threads`, when each costs `per_sample` bytes and
/// the process holds `held` already, under `limit`. At least 1 (one sample must run; whether
/// it fits is the caller's to say, see [`Parallelism::fits`]).
pub fn parallelism(limit: Option<u64>, held: u64, per_sample: u64, threads: usize) -> Parallelism {
    let threads = threads.max(1);
    let Some(limit) = limit else {
        return Parallelism {
            samples: threads,
            fits: true,
        };
    };
    let room = limit.saturating_sub(held);
    let fit = (room / per_sample.max(1)) as usize;
    Parallelism {
        samples: fit.clamp(1, threads),
        fits: fit >= 1,
    }
}

/// The chosen number of samples in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parallelism {
    pub samples: usize,
    /// Whether even one sample fits the budget (it runs anyway).
    pub fits: bool,
}

impl Parallelism {
    /// For a stage about to run samples costing `per_sample` bytes each, on the current rayon
    /// pool, under the process's budget.
    pub fn for_samples(per_sample: u64) -> Parallelism {
        parallelism(limit(), resident_bytes(), per_sample, rayon::current_num_threads())
    }

    /// What the progress line says: "2 samples at a time", with a note when over the budget.
    pub fn describe(&self) -> String {
        let n = self.samples;
        let mut s = format!("{n} sample{} at a time", if n == 1 { "" } else { "s" });
        if !self.fits {
            s.push_str(", over --max-memory");
        }
        s
    }
}

/// Runs `work` on a rayon pool of `threads` threads when that is fewer than the current pool's
/// (so its parallel loops run at most that many samples at once), else on the current pool.
pub fn on_threads<R: Send>(threads: usize, work: impl FnOnce() -> R + Send) -> Result<R> {
    if threads >= rayon::current_num_threads() {
        return Ok(work());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| Error::internal(format!("cannot start {threads} threads: {e}")))?;
    Ok(pool.install(work))
}

/// Runs `run(i)` for every sample `0..total`, at most `parallel` at once, and hands each
/// result to `merge` in sample order, whatever the thread count. On errors the first in sample
/// order is returned (a sample's, or `merge`'s on an earlier one).
pub fn run_samples<R: Send>(
    total: usize,
    parallel: usize,
    run: impl Fn(usize) -> Result<R> + Sync,
    mut merge: impl FnMut(usize, R) -> Result<()>,
) -> Result<()> {
    use rayon::prelude::*;
    let parallel = parallel.max(1);
    // Chunks bound what is held to a few small results per sample.
    let chunk = (parallel * 4).max(16);
    let mut start = 0;
    while start < total {
        let end = (start + chunk).min(total);
        let results = on_threads(parallel, || {
            (start..end).into_par_iter().map(&run).collect::<Vec<Result<R>>>()
        })?;
        for (offset, result) in results.into_iter().enumerate() {
            merge(start + offset, result?)?;
        }
        start = end;
    }
    Ok(())
}

/// Runs `run(i)` for every sample `0..total`, at most `parallel` at once, and hands each
/// result to `merge` in sample order as soon as it and all before it are done: workers take
/// the samples in order, and one that would start more than two samples per worker ahead of
/// the next to merge waits, so at most that many results are held (for results as large as a
/// layer's statistics, where [`run_samples`]'s chunks would hold 16). Whatever the thread count
/// `merge` sees the same results in the same order. On errors the samples started run to their
/// end and the first error in sample order is returned (a sample's, or `merge`'s on it).
pub fn run_in_order<R: Send>(
    total: usize,
    parallel: usize,
    run: impl Fn(usize) -> Result<R> + Sync,
    merge: impl FnMut(usize, R) -> Result<()> + Send,
) -> Result<()> {
    use std::collections::BTreeMap;
    use std::sync::{Condvar, Mutex};
    struct Shared<R, M> {
        /// The next sample to hand out, and the next to merge.
        next: usize,
        next_to_merge: usize,
        /// Samples done but not merged yet, by index.
        done: BTreeMap<usize, R>,
        merge: M,
        /// The first failing sample and its error.
        failed: Option<(usize, Error)>,
    }
    on_threads(parallel.max(1), || {
        let workers = rayon::current_num_threads().max(1);
        let ahead = 2 * workers;
        let shared = Mutex::new(Shared {
            next: 0,
            next_to_merge: 0,
            done: BTreeMap::new(),
            merge,
            failed: None,
        });
        let advanced = Condvar::new();
        let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
        let worker = || loop {
            let index = {
                let mut s = lock();
                while s.failed.is_none() && s.next < total && s.next >= s.next_to_merge + ahead {
                    s = advanced.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                if s.failed.is_some() || s.next >= total {
                    return;
                }
                s.next += 1;
                s.next - 1
            };
            let result = run(index);
            let mut s = lock();
            match result {
                Ok(r) => {
                    s.done.insert(index, r);
                    loop {
                        let at = s.next_to_merge;
                        let Some(r) = s.done.remove(&at) else { break };
                        if let Err(e) = (s.merge)(at, r) {
                            if s.failed.as_ref().is_none_or(|(first, _)| at < *first) {
                                s.failed = Some((at, e));
                            }
                            break;
                        }
                        s.next_to_merge += 1;
                    }
                }
                Err(e) => {
                    if s.failed.as_ref().is_none_or(|(first, _)| index < *first) {
                        s.failed = Some((index, e));
                    }
                }
            }
            drop(s);
            advanced.notify_all();
        };
        rayon::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|_| worker());
            }
        });
        let s = shared.into_inner().unwrap_or_else(|e| e.into_inner());
        match s.failed {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    })?
}

impl Runner {
    /// The peak bytes of tensors tract holds while running one sample node by node
    /// (`run_visiting`, `start`), from the plan: each node's outputs from when it runs until
    /// its last reader has. Inputs count; constants (the model's weights, held once for all
    /// samples) do not.
    pub fn sample_bytes(&self) -> Result<u64> {
        let plan = &self.visiting()?.plan;
        let model = plan.model();
        let order = plan.order_without_consts();
        let mut readers_left = vec![0usize; model.nodes().len()];
        for &n in order {
            for i in &model.node(n).inputs {
                readers_left[i.node] += 1;
            }
        }
        let bytes = |node: usize| output_bytes(model, node);
        let (mut live, mut peak) = (0u64, 0u64);
        for &n in order {
            live += bytes(n)?;
            peak = peak.max(live);
            for i in &model.node(n).inputs {
                readers_left[i.node] -= 1;
                if readers_left[i.node] == 0 && order.contains(&i.node) {
                    live -= bytes(i.node)?;
                }
            }
            if readers_left[n] == 0 {
                live -= bytes(n)?;
            }
        }
        Ok(peak)
    }

    /// The bytes of every tensor `run` returns for one sample (what holding them all costs).
    pub fn returned_bytes(&self) -> Result<u64> {
        let mut sum = 0u64;
        for outlet in self.model.output_outlets().map_err(tract_error)? {
            sum += fact_bytes(self.model.outlet_fact(*outlet).map_err(tract_error)?)?;
        }
        Ok(sum)
    }

    /// The bytes a [`super::Recording`] holds: every node's outputs of one sample.
    pub fn recording_bytes(&self) -> Result<u64> {
        let mut sum = 0u64;
        for &n in self.plan.order_without_consts() {
            sum += output_bytes(&self.model, n)?;
        }
        Ok(sum)
    }
}

/// The bytes of a tensor of `fact` (its shape × element size, packed inputs by their buffer).
fn fact_bytes(fact: &TypedFact) -> Result<u64> {
    Ok(fact.mem_size().to_i64().map_err(|e| tract_error(e.into()))?.max(0) as u64)
}

/// The bytes of every output of `node`.
fn output_bytes(model: &TypedModel, node: usize) -> Result<u64> {
    let mut sum = 0u64;
    for o in &model.node(node).outputs {
        sum += fact_bytes(&o.fact)?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1500").unwrap(), 1500);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4 gb").unwrap(), 4 << 30);
        for bad in ["", "G", "-1G", "2X", "0", "1e3", "2G2"] {
            assert!(matches!(parse_size(bad), Err(Error::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn samples_merge_in_order_whatever_the_thread_count() {
        let slow = |i: usize| -> Result<usize> {
            std::thread::sleep(std::time::Duration::from_millis(((7 * i) % 5) as u64));
            Ok(i * i)
        };
        for parallel in [1, 2, 3, 8] {
            let mut seen = Vec::new();
            run_in_order(23, parallel, slow, |i, r| {
                seen.push((i, r));
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, (0..23).map(|i| (i, i * i)).collect::<Vec<_>>(), "{parallel}");
        }
        // The first error in sample order wins: a sample's, or the merge's.
        let failing = |i: usize| -> Result<usize> {
            std::thread::sleep(std::time::Duration::from_millis(if i == 6 { 20 } else { 0 }));
            match i {
                6 | 9 => Err(Error::Runtime(format!("sample {i}"))),
                _ => Ok(i),
            }
        };
        for parallel in [1, 2, 4] {
            let err = run_in_order(20, parallel, failing, |_, _| Ok(())).unwrap_err();
            assert_eq!(err.to_string(), Error::Runtime("sample 6".into()).to_string());
            let err = run_in_order(20, parallel, failing, |i, _| match i {
                3 => Err(Error::Runtime("merge 3".into())),
                _ => Ok(()),
            })
            .unwrap_err();
            assert_eq!(err.to_string(), Error::Runtime("merge 3".into()).to_string());
        }
        run_in_order(0, 2, failing, |_, _| Ok(())).unwrap();
    }

    #[test]
    fn parallelism_fits_the_budget() {
        let gib = 1u64 << 30;
        // 10 GiB, 2 held, 3 per sample: 2 fit.
        assert_eq!(parallelism(Some(10 * gib), 2 * gib, 3 * gib, 8).samples, 2);
        // Capped by the threads.
        assert_eq!(parallelism(Some(100 * gib), 0, gib, 4).samples, 4);
        // None fits: one runs anyway, and says so.
        let p = parallelism(Some(gib), gib, gib, 4);
        assert_eq!(
            p,
            Parallelism {
                samples: 1,
                fits: false
            }
        );
        assert!(p.describe().contains("over --max-memory"));
        // No budget known: the threads.
        assert_eq!(parallelism(None, 0, u64::MAX, 3).samples, 3);
    }
}
