//! The ONNX Runtime engine (`engine: onnxruntime`, `--engine`). Without the library: the clear
//! errors, whichever way it was (not) provided. With it (the `#[ignore]`d tests, which CI runs
//! with `ORT_DYLIB_PATH` set to the library of its venv): calibration in ONNX Runtime gives the
//! ranges tract gives, the same whatever the thread count, and the main job runs end to end.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use onnxq::calib::data::InputSpec;
use onnxq::calib::source::DataSource;
use onnxq::calib::stats::{collect_observing, CalibrationStats};
use onnxq::pipeline::config::Config;
use onnxq::quant::probe::Probe;
use onnxq::runtime::Engine;

const MODEL: &str = "models/ppocr_mobile_v2_cls.onnx";
const CALIB: &str = "models/ppocr_mobile_v2_cls.calib.npz";

fn onnxq(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_onnxq"));
    command.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

/// The main job on crepe_tiny with the config at `cfg`, writing `model` and `report`.
fn quantize_crepe(cfg: &str, model: &Path, report: &Path) -> Output {
    onnxq(
        &[
            "models/crepe_tiny.onnx",
            "--config",
            cfg,
            "-o",
            model.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
        &[],
    )
}

fn config(dir: &Path, extra: &str) -> String {
    config_for(dir, CALIB, extra)
}

fn config_for(dir: &Path, calib: &str, extra: &str) -> String {
    let path = dir.join("q.yaml");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join(calib);
    std::fs::write(
        &path,
        format!("calibration: {{data: {:?}}}\n{extra}", data.to_str().unwrap()),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_library_path_that_is_no_file_is_a_usage_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out_model = dir.path().join("out.onnx");
    let out = onnxq(
        &[
            MODEL,
            "--config",
            &config(dir.path(), ""),
            "-o",
            out_model.to_str().unwrap(),
            "--engine",
            "onnxruntime",
        ],
        &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ORT_DYLIB_PATH is /nonexistent/libonnxruntime.so, which is not a file"),
        "{err}"
    );
    assert!(!out_model.exists(), "nothing is written when the engine cannot load");
}

#[test]
fn without_the_library_the_error_names_both_ways_to_provide_it() {
    let dir = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    // No ORT_DYLIB_PATH and no python3 on PATH: the config asks for the engine.
    let out = onnxq(
        &[
            MODEL,
            "--config",
            &config(dir.path(), "engine: onnxruntime\n"),
            "-o",
            dir.path().join("o.onnx").to_str().unwrap(),
        ],
        &[("ORT_DYLIB_PATH", ""), ("PATH", empty.path().to_str().unwrap())],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("set ORT_DYLIB_PATH"), "{err}");
    assert!(err.contains("pip install onnxruntime"), "{err}");
    assert!(err.contains("python3 cannot be run"), "{err}");
}

#[test]
fn an_unknown_engine_is_a_config_error_listing_the_engines() {
    let dir = tempfile::tempdir().unwrap();
    let out = onnxq(&[MODEL, "--config", &config(dir.path(), "engine: onnx_runtime\n")], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("onnx_runtime") && err.contains("onnxruntime"), "{err}");
}

fn calibrate(engine: Engine) -> CalibrationStats {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = onnxq::onnx::load_model(&root.join(MODEL)).unwrap();
    let yaml = format!("calibration: {{data: {:?}}}\n", root.join(CALIB).to_str().unwrap());
    let config = Config::parse(&yaml, Path::new("q.yaml")).unwrap();
    let source = DataSource::open(config.calibration.as_ref().unwrap(), &InputSpec::of_graph(&model.graph)).unwrap();
    collect_observing(&model, &source, source.fingerprints().unwrap(), &|_| true, engine).unwrap()
}

fn on_threads<R: Send>(threads: usize, work: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(work)
}

#[test]
#[ignore = "needs the ONNX Runtime library: ORT_DYLIB_PATH or python3's onnxruntime package (CI runs it)"]
fn calibration_in_onnxruntime_gives_tract_s_ranges() {
    let tract = calibrate(Engine::Tract);
    let ort = calibrate(Engine::Onnxruntime);
    assert_eq!(ort.samples, tract.samples);
    let names = |s: &CalibrationStats| s.tensors.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&ort), names(&tract), "the same tensors observed");
    assert!(tract.tensors.len() > 20);
    let mut worst = 0f64;
    for (name, t) in &tract.tensors {
        let o = &ort.tensors[name];
        let scale = (t.max.abs().max(t.min.abs()) as f64).max(1e-6);
        let gap = ((o.min - t.min).abs().max((o.max - t.max).abs()) as f64) / scale;
        worst = worst.max(gap);
        assert!(
            gap <= 1e-5,
            "'{name}': tract [{}, {}], onnxruntime [{}, {}]",
            t.min,
            t.max,
            o.min,
            o.max
        );
        assert_eq!(o.count, t.count, "'{name}'");
    }
    eprintln!("largest range gap relative to the range: {worst:.2e}");
}

#[test]
#[ignore = "needs the ONNX Runtime library: ORT_DYLIB_PATH or python3's onnxruntime package (CI runs it)"]
fn calibration_in_onnxruntime_is_the_same_whatever_the_thread_count() {
    let one = on_threads(1, || calibrate(Engine::Onnxruntime));
    let two = on_threads(2, || calibrate(Engine::Onnxruntime));
    assert_eq!(
        serde_json::to_string(&one).unwrap(),
        serde_json::to_string(&two).unwrap()
    );
}

#[test]
#[ignore = "needs the ONNX Runtime library: ORT_DYLIB_PATH or python3's onnxruntime package (CI runs it)"]
fn the_main_job_calibrates_in_onnxruntime_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (out_model, report) = (dir.path().join("o.onnx"), dir.path().join("r.json"));
    let args = |engine: &str| {
        // crepe_tiny: ppocr_mobile_v2_cls's saturated two-class softmax moves by whole dBs when
        // its scales move in the 7th digit (40.5 vs 28.6 dB with min/max ranges 1e-6 apart).
        let eval = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/crepe_tiny.eval.npz");
        let mut a = vec![
            "models/crepe_tiny.onnx".to_string(),
            "--config".into(),
            config_for(
                dir.path(),
                "models/crepe_tiny.calib.npz",
                &format!("verify: {{data: {eval:?}}}\n"),
            ),
            "-o".into(),
            out_model.to_str().unwrap().into(),
            "--report".into(),
            report.to_str().unwrap().into(),
        ];
        if !engine.is_empty() {
            a.extend(["--engine".into(), engine.into()]);
        }
        a
    };
    let run = |engine: &str| {
        let a = args(engine);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = onnxq(&a, &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        (
            String::from_utf8_lossy(&out.stderr).to_string(),
            report,
            std::fs::read(&out_model).unwrap(),
        )
    };
    let (err, ort_report, ort_bytes) = run("onnxruntime");
    assert!(err.contains("samples/s, onnxruntime)"), "{err}");
    assert!(
        err.contains("samples in onnxruntime"),
        "the guard measures in it too: {err}"
    );
    assert_eq!(ort_report["quantization"]["engine"], "onnxruntime");
    let (_, tract_report, tract_bytes) = run("");
    assert_eq!(tract_report["quantization"]["engine"], "tract");
    // Calibrated on the same ranges, the two models verify (in tract) within 0.1 dB.
    let sqnr = |r: &serde_json::Value| r["verification"]["outputs"][0]["sqnr_db"].as_f64().unwrap();
    let (a, b) = (sqnr(&ort_report), sqnr(&tract_report));
    assert!(
        a > 15.0 && (a - b).abs() < 0.1,
        "onnxruntime-calibrated {a} dB, tract-calibrated {b} dB"
    );
    assert!(!ort_bytes.is_empty() && !tract_bytes.is_empty());
}

#[test]
#[ignore = "needs the ONNX Runtime library: ORT_DYLIB_PATH or python3's onnxruntime package (CI runs it)"]
fn verification_in_onnxruntime_runs_the_written_model_and_agrees_with_tract_s() {
    let dir = tempfile::tempdir().unwrap();
    let (quant, tract_report, ort_report) = (
        dir.path().join("q.onnx"),
        dir.path().join("t.json"),
        dir.path().join("o.json"),
    );
    let eval = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/crepe_tiny.eval.npz");
    let cfg = config_for(
        dir.path(),
        "models/crepe_tiny.calib.npz",
        &format!("verify: {{data: {eval:?}}}\nguard: false\n"),
    );
    let out = quantize_crepe(&cfg, &quant, &tract_report);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = onnxq(
        &[
            "verify",
            "models/crepe_tiny.onnx",
            quant.to_str().unwrap(),
            "--data",
            eval.to_str().unwrap(),
            "--engine",
            "onnxruntime",
            "--report",
            ort_report.to_str().unwrap(),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("in onnxruntime: passed"), "{stdout}");
    let read = |p: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let (t, o) = (read(&tract_report)["verification"].clone(), read(&ort_report));
    assert_eq!(o["engine"], "onnxruntime");
    assert_eq!(t["engine"], "tract");
    assert_eq!(
        o["lowering"].as_array().unwrap().len(),
        0,
        "ONNX Runtime runs the Q/DQ as written"
    );
    let sqnr = |v: &serde_json::Value| v["outputs"][0]["sqnr_db"].as_f64().unwrap();
    // The same model measured by two engines whose int8 kernels round differently.
    assert!(
        (sqnr(&t) - sqnr(&o)).abs() < 1.0,
        "tract {} dB, onnxruntime {} dB",
        sqnr(&t),
        sqnr(&o)
    );
    // Layer by layer where ONNX Runtime keeps the tensors: the same layers as tract's, less
    // those its fusions remove (named in the note), at about the same figures.
    let layers = |v: &serde_json::Value| -> std::collections::BTreeMap<String, f64> {
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| Some((l["name"].as_str()?.to_string(), l["sqnr_db"].as_f64()?)))
            .collect()
    };
    let (tl, ol) = (layers(&t), layers(&o));
    let note = o["layers_note"].as_str().unwrap_or("");
    assert!(
        ol.len() * 2 >= tl.len() && !ol.is_empty(),
        "{} of {} layers: {note}",
        ol.len(),
        tl.len()
    );
    let mut gaps: Vec<f64> = ol
        .iter()
        .map(|(name, db)| (db - tl.get(name).unwrap_or_else(|| panic!("'{name}' not among tract's"))).abs())
        .collect();
    gaps.sort_by(f64::total_cmp);
    let median = gaps[gaps.len() / 2];
    eprintln!(
        "{} of {} layers compared in ONNX Runtime, |Δ SQNR| against tract's: median {median:.3} dB, largest {:.3} dB; {note}",
        ol.len(),
        tl.len(),
        gaps[gaps.len() - 1]
    );
    assert!(median < 1.0, "median gap {median} dB");
    if ol.len() < tl.len() {
        assert!(note.contains("fusions remove their tensors"), "{note}");
    }
}

#[test]
#[ignore = "needs the ONNX Runtime library: ORT_DYLIB_PATH or python3's onnxruntime package (CI runs it)"]
fn the_guard_s_probe_in_onnxruntime_measures_what_onnxruntime_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = onnxq::onnx::load_model(&root.join("models/crepe_tiny.onnx")).unwrap();
    let calib = root.join("models/crepe_tiny.calib.npz");
    let yaml = format!("calibration: {{data: {:?}}}\n", calib.to_str().unwrap());
    let config = Config::parse(&yaml, Path::new("q.yaml")).unwrap();
    let source = DataSource::open(config.calibration.as_ref().unwrap(), &InputSpec::of_graph(&model.graph)).unwrap();
    let stats = collect_observing(
        &model,
        &source,
        source.fingerprints().unwrap(),
        &|_| true,
        Engine::Tract,
    )
    .unwrap();
    let plan = common::minmax_plan(&model, &stats, |_| {});
    let in_ort = Probe::new(&model, &source, 4, Engine::Onnxruntime).unwrap();
    assert_eq!(in_ort.engine(), Engine::Onnxruntime);
    // The written Q/DQ model, run as it is by ONNX Runtime's kernels.
    let written = in_ort.sqnr_db(&in_ort.noise(&plan).unwrap());
    // The switched model (float fake-quant) in ONNX Runtime: every layer on, and every one off.
    let none = plan.restricted_to(&Default::default());
    let switched = in_ort
        .variants(&plan)
        .unwrap()
        .noises(&[plan.clone(), none], "test")
        .unwrap();
    let (all_on, all_off) = (in_ort.sqnr_db(&switched[0]), in_ort.sqnr_db(&switched[1]));
    assert!(written > 20.0, "{written} dB");
    assert!(
        (all_on - written).abs() < 0.05,
        "switched model {all_on} dB, written model {written} dB in ONNX Runtime"
    );
    assert!(
        all_off > 100.0,
        "every switch off computes the float model: {all_off} dB"
    );
    // tract measures the same model within its float arithmetic's reach.
    let in_tract = Probe::new(&model, &source, 4, Engine::Tract).unwrap();
    let tract = in_tract.sqnr_db(&in_tract.noise(&plan).unwrap());
    eprintln!("written {written} dB, switched {all_on} dB (off: {all_off} dB) in ONNX Runtime; tract {tract} dB");
    assert!(
        (tract - written).abs() < 0.5,
        "tract {tract} dB, ONNX Runtime {written} dB"
    );
}

#[test]
#[ignore = "needs the ONNX Runtime library: ORT_DYLIB_PATH or python3's onnxruntime package (CI runs it)"]
fn a_provider_the_library_lacks_is_said_and_cpu_runs_when_listed() {
    // CI's and this machine's onnxruntime wheel is the CPU build: it has no CUDA provider.
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let out_model = dir.path().join("o.onnx");
    let run = |providers: &str| {
        let cfg = config_for(
            dir.path(),
            "models/crepe_tiny.calib.npz",
            &format!("engine: {{onnxruntime: {{providers: {providers}}}}}\nguard: false\npasses: []\n"),
        );
        quantize_crepe(&cfg, &out_model, &report)
    };
    let out = run("[cuda]");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cuda: this ONNX Runtime") && err.contains("onnxruntime-gpu") && err.contains("add `cpu`"),
        "{err}"
    );
    assert!(!out_model.exists(), "nothing written");
    let out = run("[cuda, cpu]");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("not using cuda") && err.contains("running on cpu"),
        "{err}"
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["quantization"]["engine"], "onnxruntime");
    assert_eq!(report["quantization"]["engine_providers"], serde_json::json!(["cpu"]));
}

#[test]
#[ignore = "needs the ONNX Runtime library: ORT_DYLIB_PATH or python3's onnxruntime package (CI runs it)"]
fn easyquant_gathers_its_layer_inputs_in_the_job_s_engine() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let eval = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/crepe_tiny.eval.npz");
    let run = |engine: &str| {
        let cfg = config_for(
            dir.path(),
            "models/crepe_tiny.calib.npz",
            &format!("engine: {engine}\npasses: [{{easyquant: {{rounds: 1, samples: 2, steps: 10}}}}]\nguard: false\nverify: {{data: {eval:?}}}\n"),
        );
        let out_model = dir.path().join(format!("{engine}.onnx"));
        let out = quantize_crepe(&cfg, &out_model, &report);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        (err, report["verification"]["outputs"][0]["sqnr_db"].as_f64().unwrap())
    };
    let (err, ort) = run("onnxruntime");
    assert!(
        err.lines()
            .any(|l| l.starts_with("easyquant: gathering layer inputs") && l.contains("(onnxruntime,")),
        "{err}"
    );
    let (err, tract) = run("tract");
    assert!(
        err.lines()
            .any(|l| l.starts_with("easyquant: gathering layer inputs") && l.contains("(tract,")),
        "{err}"
    );
    eprintln!("easyquant on crepe_tiny: {ort} dB gathering in onnxruntime, {tract} dB in tract (verified in tract)");
    assert!(
        ort > 15.0 && (ort - tract).abs() < 0.5,
        "onnxruntime {ort} dB, tract {tract} dB"
    );
}
