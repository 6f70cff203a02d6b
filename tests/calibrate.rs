//! `onnxq calibrate` end to end on a shipped real model: statistics written, reused when the
//! fingerprint matches, refused with the reason when it does not, identical whatever the thread
//! count, mergeable across shards; non-finite activations and image folders.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use onnxq::calib::observers::Method;
use onnxq::calib::stats::CalibrationStats;
use onnxq::proto::tensor_proto::DataType;
use tract_onnx::prelude::Tensor;

fn onnxq(args: &[&str], threads: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_onnxq"));
    c.args(args);
    if let Some(t) = threads {
        c.env("RAYON_NUM_THREADS", t);
    }
    c.output().unwrap()
}

fn ok(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The first `n` samples of crepe_tiny's shipped calibration data, from `skip` on.
fn crepe_shard(dir: &Path, name: &str, skip: usize, n: usize) -> PathBuf {
    let data = onnxq::calib::data::Dataset::load(&repo("models/crepe_tiny.calib.npz")).unwrap();
    let frames = data.arrays.iter().find(|a| a.name == "frames").unwrap();
    let samples: Vec<Tensor> = (skip..skip + n).map(|i| frames.sample(i).unwrap()).collect();
    let p = dir.join(name);
    onnxq::calib::data::write_npz(&p, &[("frames".to_string(), samples)]).unwrap();
    p
}

#[test]
fn statistics_are_written_reused_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let calib = repo("models/crepe_tiny.calib.npz");
    let cfg = config(
        dir.path(),
        "q.yaml",
        &format!("calibration: {{data: {}, method: percentile}}\n", s(&calib)),
    );
    let model = repo("models/crepe_tiny.onnx");
    let stats = dir.path().join("stats.json");
    let report = dir.path().join("report.json");
    let first = ok(&onnxq(
        &[
            "calibrate",
            s(&model),
            "--config",
            s(&cfg),
            "--stats",
            s(&stats),
            "--report",
            s(&report),
        ],
        None,
    ));
    assert!(first.contains("calibrated") && first.contains("8 samples"), "{first}");
    assert!(first.contains("warning: calibrating on 8 samples"), "{first}");

    let st = CalibrationStats::load(&stats).unwrap();
    assert_eq!(st.samples, 8);
    let conv1 = &st.tensors["/conv1/Conv_output_0"];
    assert!(conv1.min < 0.0 && conv1.max > 0.0 && conv1.count > 0);
    assert_eq!(
        conv1.channels.as_ref().unwrap().min.len(),
        128,
        "per-channel statistics along axis 1"
    );
    let relu = &st.tensors["/Relu_output_0"];
    assert!(relu.min >= 0.0);
    assert!(
        !st.tensors.contains_key("/Cast_output_0"),
        "integer tensors are not observed"
    );

    // The report has the range of each method, and percentile clips something somewhere.
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    for m in ["minmax", "ema", "percentile", "entropy", "mse"] {
        assert_eq!(r["ranges_by_method"][m].as_array().unwrap().len(), st.tensors.len());
    }
    assert!(r["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["clipped_values"].as_f64().unwrap() > 0.0));

    // Second run: reused, not recomputed.
    let again = ok(&onnxq(
        &["calibrate", s(&model), "--config", s(&cfg), "--stats", s(&stats)],
        None,
    ));
    assert!(again.contains("reusing statistics"), "{again}");

    // Other data: refused, naming what changed.
    let shard = crepe_shard(dir.path(), "few.npz", 0, 4);
    let cfg2 = config(
        dir.path(),
        "q2.yaml",
        &format!("calibration: {{data: {}}}\n", s(&shard)),
    );
    let o = onnxq(
        &["calibrate", s(&model), "--config", s(&cfg2), "--stats", s(&stats)],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("the calibration data") && !err.contains("the weights"),
        "{err}"
    );
    // Other weights (a pass changes the graph): refused too.
    let cfg3 = config(
        dir.path(),
        "q3.yaml",
        &format!("passes: [eliminate_identity]\ncalibration: {{data: {}}}\n", s(&shard)),
    );
    let o = onnxq(
        &[
            "calibrate",
            s(&repo("models/ppocr_mobile_v2_cls.onnx")),
            "--config",
            s(&cfg3),
            "--stats",
            s(&stats),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn statistics_do_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let calib = repo("models/crepe_tiny.calib.npz");
    let cfg = config(dir.path(), "q.yaml", &format!("calibration: {{data: {}}}\n", s(&calib)));
    let model = repo("models/crepe_tiny.onnx");
    let one = dir.path().join("one.json");
    let many = dir.path().join("many.json");
    ok(&onnxq(
        &["calibrate", s(&model), "--config", s(&cfg), "--stats", s(&one)],
        Some("1"),
    ));
    ok(&onnxq(
        &["calibrate", s(&model), "--config", s(&cfg), "--stats", s(&many)],
        Some("3"),
    ));
    assert_eq!(std::fs::read(&one).unwrap(), std::fs::read(&many).unwrap());
}

#[test]
fn shards_merge_into_the_statistics_of_the_whole() {
    let dir = tempfile::tempdir().unwrap();
    let a = crepe_shard(dir.path(), "a.npz", 0, 4);
    let b = crepe_shard(dir.path(), "b.npz", 4, 4);
    let model = repo("models/crepe_tiny.onnx");
    let (sa, sb, sab, merged) = (
        dir.path().join("a.json"),
        dir.path().join("b.json"),
        dir.path().join("ab.json"),
        dir.path().join("merged.json"),
    );
    for (data, stats) in [(&a, &sa), (&b, &sb)] {
        let cfg = config(dir.path(), "q.yaml", &format!("calibration: {{data: {}}}\n", s(data)));
        ok(&onnxq(
            &["calibrate", s(&model), "--config", s(&cfg), "--stats", s(stats)],
            None,
        ));
    }
    let both = config(
        dir.path(),
        "both.yaml",
        &format!("calibration: {{data: [{}, {}]}}\n", s(&a), s(&b)),
    );
    ok(&onnxq(
        &["calibrate", s(&model), "--config", s(&both), "--stats", s(&sab)],
        None,
    ));
    ok(&onnxq(&["merge-stats", s(&sa), s(&sb), "-o", s(&merged)], None));

    let whole = CalibrationStats::load(&sab).unwrap();
    let joined = CalibrationStats::load(&merged).unwrap();
    assert_eq!(whole.fingerprint, joined.fingerprint);
    assert_eq!(whole.samples, joined.samples);
    for m in [
        Method::MinMax,
        Method::Ema { constant: 0.01 },
        Method::Percentile { percentile: 99.9 },
        Method::Entropy { bits: 8 },
        Method::Mse { bits: 8 },
    ] {
        let (w, j) = (whole.ranges(&m), joined.ranges(&m));
        for (w, j) in w.iter().zip(&j) {
            assert_eq!((w.tensor.as_str(), w.chosen), (j.tensor.as_str(), j.chosen), "{m:?}");
        }
    }
    for (name, w) in &whole.tensors {
        assert_eq!(w.histogram, joined.tensors[name].histogram, "{name}");
    }
    // The merged file is reusable for a config that names both shards.
    let again = ok(&onnxq(
        &["calibrate", s(&model), "--config", s(&both), "--stats", s(&merged)],
        None,
    ));
    assert!(again.contains("reusing"), "{again}");
    // A shard twice is refused.
    let o = onnxq(&["merge-stats", s(&sa), s(&sa), "-o", s(&merged)], None);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn a_non_finite_activation_names_the_tensor_and_the_sample() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(
        graph(
            vec![
                node("Sqrt", "root", &["x"], &["r"]),
                node("Relu", "relu", &["r"], &["y"]),
            ],
            vec![],
            vec![value_info("x", DataType::Float, &[1, 4])],
            vec![value_info("y", DataType::Float, &[1, 4])],
        ),
        17,
    );
    let path = dir.path().join("m.onnx");
    std::fs::write(&path, encode(&m)).unwrap();
    let good = Tensor::from_shape::<f32>(&[1, 4], &[1.0, 4.0, 9.0, 16.0]).unwrap();
    let bad = Tensor::from_shape::<f32>(&[1, 4], &[1.0, -4.0, 9.0, 16.0]).unwrap();
    let data = dir.path().join("d.npz");
    onnxq::calib::data::write_npz(&data, &[("x".to_string(), vec![good.clone(), good, bad])]).unwrap();
    let cfg = config(dir.path(), "q.yaml", &format!("calibration: {{data: {}}}\n", s(&data)));
    let o = onnxq(
        &[
            "calibrate",
            s(&path),
            "--config",
            s(&cfg),
            "--stats",
            s(&dir.path().join("st.json")),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("sample 2") && err.contains("activation 'r'") && err.contains("NaN"),
        "{err}"
    );
    assert!(!dir.path().join("st.json").exists());
}

#[test]
fn a_folder_of_images_calibrates_with_declared_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for (i, (w, h)) in [(40u32, 30u32), (32, 48), (64, 64)].iter().enumerate() {
        let img = image::RgbImage::from_fn(*w, *h, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 3) as u8, (i * 80) as u8])
        });
        img.save(images.join(format!("img{i}.png"))).unwrap();
    }
    let conv_w = seeded(4 * 3 * 3 * 3, 3);
    let m = model(
        graph(
            vec![
                node("Conv", "conv", &["x", "w"], &["c"]),
                node("Relu", "relu", &["c"], &["y"]),
            ],
            vec![tensor_f32("w", &[4, 3, 3, 3], &conv_w)],
            vec![value_info("x", DataType::Float, &[1, 3, 16, 16])],
            vec![value_info("y", DataType::Float, &[1, 4, 14, 14])],
        ),
        17,
    );
    let path = dir.path().join("m.onnx");
    std::fs::write(&path, encode(&m)).unwrap();
    let stats = dir.path().join("st.json");
    // Without a resize the sizes differ: a clear error.
    let cfg = config(
        dir.path(),
        "q.yaml",
        &format!("calibration:\n  data: {}\n  images: {{}}\n", s(&images)),
    );
    let o = onnxq(
        &["calibrate", s(&path), "--config", s(&cfg), "--stats", s(&stats)],
        None,
    );
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = config(
        dir.path(),
        "q.yaml",
        &format!("calibration:\n  data: {}\n  images: {{resize: {{short_side: 20}}, center_crop: [16, 16], scale: 0.0039215686, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}\n", s(&images)),
    );
    ok(&onnxq(
        &["calibrate", s(&path), "--config", s(&cfg), "--stats", s(&stats)],
        None,
    ));
    let st = CalibrationStats::load(&stats).unwrap();
    assert_eq!(st.samples, 3);
    let x = &st.tensors["x"];
    assert!(
        x.min >= -2.0 - 1e-6 && x.max <= 2.0 + 1e-6,
        "normalised pixels in [-2, 2]: {} {}",
        x.min,
        x.max
    );
    assert!(st.tensors["y"].min >= 0.0);
}
