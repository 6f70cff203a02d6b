//! Hot kernels of calibration and quantization, timed with criterion (`cargo bench`; one group:
//! `cargo bench --bench kernels -- histogram`; bench/run.sh runs them too and tabulates criterion's
//! estimates from target/criterion). Kept to seconds: small sample counts and short
//! measurement windows. The end-to-end comparison with ONNX Runtime is bench/run.sh.
//!
//! - histogram: `Histogram::add` of one activation (into an empty histogram, and into one that
//!   already spans the range), `Histogram::merge` of two full-width histograms on different grids;
//! - tensor stats: `TensorStats::observe` of one [1, 64, 56, 56] activation (extremes, per-channel
//!   statistics and histogram: what calibration does per tensor per sample) and `merge`;
//! - thresholds: the KL (entropy) search, percentile and MSE over a full 8192-bin histogram;
//! - plan and Q/DQ: `build_plan` and `materialize` on the shipped ppocr_mobile_v2_cls model with
//!   statistics taken once, in the setup, on 8 of its shipped calibration samples.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use onnxq::calib::data::InputSpec;
use onnxq::calib::observers::{Histogram, TensorStats};
use onnxq::calib::source::DataSource;
use onnxq::calib::stats::collect;
use onnxq::pipeline::config::Config;
use onnxq::quant::materialize::materialize;
use onnxq::quant::plan::build_plan;

/// Seeded, roughly Gaussian values (sum of 4 uniforms) times `gain`, with a few outliers: the
/// shape of a real activation's distribution, long tail included.
fn activation(n: usize, seed: u64, gain: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    (0..n)
        .map(|i| {
            let v = (uniform() + uniform() + uniform() + uniform()) * 0.5 * gain;
            if i % 10_007 == 0 {
                v * 20.0
            } else {
                v
            }
        })
        .collect()
}

const SHAPE: [usize; 4] = [1, 64, 56, 56];

fn histogram(c: &mut Criterion) {
    let len: usize = SHAPE.iter().product();
    let values = activation(len, 1, 1.0);
    let mut g = c.benchmark_group("histogram_add");
    g.throughput(Throughput::Elements(len as u64));
    g.bench_function("add 200k values, empty histogram", |b| {
        b.iter(|| black_box(Histogram::from_values(black_box(&values))))
    });
    let warmed = Histogram::from_values(&activation(len, 2, 1.0));
    g.bench_function("add 200k values, warmed histogram", |b| {
        b.iter_batched_ref(|| warmed.clone(), |h| h.add(black_box(&values)), BatchSize::SmallInput)
    });
    g.finish();
    let mut g = c.benchmark_group("histogram_merge");
    // Two histograms on different grids: the merge re-bins one of them.
    let wide = Histogram::from_values(&activation(len, 3, 8.0));
    let narrow = Histogram::from_values(&activation(len, 4, 0.5));
    g.bench_function("merge wide into narrow (re-bin)", |b| {
        b.iter_batched_ref(|| narrow.clone(), |h| h.merge(black_box(&wide)), BatchSize::SmallInput)
    });
    let same = Histogram::from_values(&activation(len, 5, 1.0));
    g.bench_function("merge same grid", |b| {
        b.iter_batched_ref(|| warmed.clone(), |h| h.merge(black_box(&same)), BatchSize::SmallInput)
    });
    g.finish();
}

fn tensor_stats(c: &mut Criterion) {
    let len: usize = SHAPE.iter().product();
    let values = activation(len, 6, 1.0);
    let mut g = c.benchmark_group("tensor_stats_observe");
    g.throughput(Throughput::Elements(len as u64));
    g.bench_function("observe [1,64,56,56]", |b| {
        b.iter(|| {
            let mut s = TensorStats::new_empty();
            s.observe(0, black_box(&values), &SHAPE).unwrap();
            black_box(s)
        })
    });
    let mut acc = TensorStats::new_empty();
    for sample in 0..32 {
        acc.observe(sample, &activation(len, 100 + sample as u64, 1.0), &SHAPE)
            .unwrap();
    }
    let mut one = TensorStats::new_empty();
    one.observe(32, &values, &SHAPE).unwrap();
    g.finish();
    let mut g = c.benchmark_group("tensor_stats_merge");
    g.bench_function("merge one sample into 32", |b| {
        b.iter_batched_ref(|| acc.clone(), |s| s.merge(black_box(&one)), BatchSize::SmallInput)
    });
    g.finish();
}

fn thresholds(c: &mut Criterion) {
    // A histogram spanning the full 8192-bin window: the search coarsens it to 2048 bins.
    let mut h = Histogram::new();
    for seed in 0..8 {
        h.add(&activation(200_000, 200 + seed, 1.0 + seed as f32));
    }
    let mut g = c.benchmark_group("thresholds");
    g.bench_function("entropy (KL search, 128 levels)", |b| {
        b.iter(|| black_box(h.entropy_threshold(black_box(128))))
    });
    g.bench_function("entropy (KL search, 256 levels)", |b| {
        b.iter(|| black_box(h.entropy_threshold(black_box(256))))
    });
    g.bench_function("percentile 99.99", |b| {
        b.iter(|| black_box(h.percentile_threshold(black_box(99.99))))
    });
    g.bench_function("mse (256 levels)", |b| {
        b.iter(|| black_box(h.mse_threshold(black_box(256))))
    });
    g.finish();
}

fn plan_and_qdq(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_path = root.join("models/ppocr_mobile_v2_cls.onnx");
    let data = root.join("models/ppocr_mobile_v2_cls.calib.npz");
    let model = onnxq::onnx::load_model(&model_path).expect("shipped model");
    let config = Config::parse(
        &format!("calibration: {{data: {:?}, samples: 8}}\n", data.to_str().unwrap()),
        &root.join("bench.yaml"),
    )
    .expect("config");
    let calibration = config.calibration.as_ref().expect("calibration");
    let source = DataSource::open(calibration, &InputSpec::of_graph(&model.graph)).expect("data");
    let stats = collect(&model, &source, source.fingerprints().expect("data")).expect("calibration");
    // As the main job builds them (the `plan` stage).
    let options = config.plan_options();
    let plan = build_plan(&model, &stats, &options).expect("plan");
    let mut g = c.benchmark_group("plan_and_qdq");
    g.bench_function("build_plan ppocr_mobile_v2_cls", |b| {
        b.iter(|| black_box(build_plan(black_box(&model), &stats, &options).unwrap()))
    });
    g.bench_function("materialize ppocr_mobile_v2_cls", |b| {
        b.iter_batched_ref(
            || model.clone(),
            |m| black_box(materialize(m, black_box(&plan)).unwrap()),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args()
}

criterion_group! {
    name = kernels;
    config = config();
    targets = histogram, tensor_stats, thresholds, plan_and_qdq
}
criterion_main!(kernels);
