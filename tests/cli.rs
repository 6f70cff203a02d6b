//! The command line end to end: exit codes, one-line errors naming the file, no panics, atomic
//! output, the input never modified, byte-identical output across runs and thread counts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use onnxq::proto::tensor_proto::DataType;

fn onnxq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onnxq")).args(args).output().unwrap()
}

fn onnxq_env(args: &[&str], key: &str, value: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onnxq"))
        .args(args)
        .env(key, value)
        .output()
        .unwrap()
}

/// Asserts a failure with `code`, a single `error:` line on stderr that contains every needle,
/// and no panic.
fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "expected {n:?} in: {stderr}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("q.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

const ROUNDTRIP: &str = "quantize: false\npasses: [eliminate_identity]\n";

#[test]
fn bad_model_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), ROUNDTRIP);
    let out = dir.path().join("out.onnx");
    let original = std::fs::read(repo("models/ppocr_mobile_v2_cls.onnx")).unwrap();

    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &original[..original.len() / 2]).unwrap();
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"this is not a protobuf at all, just text\n").unwrap();
    let missing = dir.path().join("missing.onnx");

    let cases: [(&Path, &str); 5] = [
        (&empty, "is empty"),
        (&truncated, "not a valid ONNX protobuf"),
        (&garbage, "not"),
        (dir.path(), "is a directory"),
        (&missing, "No such file"),
    ];
    for (path, needle) in cases {
        let o = onnxq(&[s(path), "--config", s(&cfg), "-o", s(&out)]);
        assert_fails(&o, 2, &[s(path), needle]);
        let o = onnxq(&["inspect", s(path)]);
        assert_fails(&o, 2, &[s(path), needle]);
        assert!(!out.exists(), "no output may be written for a bad model");
    }
}

fn tiny(op: &str, opset: i64) -> onnxq::proto::ModelProto {
    model(
        graph(
            vec![node(op, "n0", &["x"], &["y"])],
            vec![],
            vec![value_info("x", DataType::Float, &[1, 4])],
            vec![value_info("y", DataType::Float, &[1, 4])],
        ),
        opset,
    )
}

#[test]
fn unsupported_ops_and_opsets_are_clear_errors() {
    let cases = [
        (tiny("Frobnicate", 17), "node 'n0': unknown op 'Frobnicate'"),
        (tiny("Relu", 99), "opset ai.onnx 99 is not supported"),
        (
            tiny("LayerNormalization", 11),
            "node 'n0': LayerNormalization exists from opset 17 on",
        ),
    ];
    for (m, needle) in cases {
        let (_dir, path) = write_temp(&m, "m.onnx");
        assert_fails(&onnxq(&["inspect", s(&path)]), 2, &[s(&path), needle]);
    }
    // A node of a custom domain the model does not import.
    let mut m = tiny("Relu", 17);
    m.graph.as_mut().unwrap().node[0].domain = Some("com.example".into());
    let (_dir, path) = write_temp(&m, "m.onnx");
    assert_fails(&onnxq(&["inspect", s(&path)]), 2, &["com.example", "does not import"]);
    // Imported, it passes through (and inspect says tract cannot run it).
    m.opset_import.push(onnxq::proto::OperatorSetIdProto {
        domain: Some("com.example".into()),
        version: Some(1),
    });
    let (_dir, path) = write_temp(&m, "m.onnx");
    let o = onnxq(&["inspect", s(&path)]);
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("com.example.Relu is outside the ONNX standard"), "{text}");
}

#[test]
fn bad_configs_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo("models/crepe_tiny.onnx");
    let out = dir.path().join("out.onnx");
    let cases = [
        (
            "quantize: false\npases: []\n",
            vec!["unknown field `pases`", "did you mean `passes`?"],
        ),
        (
            "quantize: false\npasses: [eliminate_identiy]\n",
            vec!["unknown pass `eliminate_identiy`", "did you mean `eliminate_identity`?"],
        ),
        ("quantize: false\npasses: [\n", vec!["q.yaml"]),
        ("quantize: maybe\n", vec!["q.yaml", "quantize"]),
        // Passes that act on quantized weights would do nothing.
        (
            "quantize: false\npasses: [correct_bias]\n",
            vec!["`correct_bias` acts on the quantized weights", "quantize: false"],
        ),
        (
            "quantize: false\npasses: [gptq]\n",
            vec!["`gptq` acts on the quantized weights"],
        ),
        // gptq has no data-free mode.
        (
            "passes: [fold_batchnorm, gptq]\n",
            vec!["`gptq`", "needs `calibration: {data: …}`"],
        ),
    ];
    for (text, needles) in cases {
        let cfg = config(dir.path(), text);
        let mut needles = needles.clone();
        needles.push(s(&cfg));
        assert_fails(&onnxq(&[s(&model), "--config", s(&cfg), "-o", s(&out)]), 1, &needles);
        assert!(!out.exists());
    }
    // --stats without calibration data (data-free mode) would be silently ignored: refused.
    let cfg = config(dir.path(), "passes: [fold_batchnorm]\n");
    let stats = dir.path().join("stats.json");
    assert_fails(
        &onnxq(&[
            s(&repo("models/ppocr_mobile_v2_cls.onnx")),
            "--config",
            s(&cfg),
            "--stats",
            s(&stats),
            "-o",
            s(&out),
        ]),
        1,
        &["--stats", "no `calibration:`", "data-free", s(&cfg)],
    );
    assert!(!out.exists() && !stats.exists());
    let missing = dir.path().join("nope.yaml");
    assert_fails(&onnxq(&[s(&model), "--config", s(&missing)]), 1, &[s(&missing)]);
    // Missing --config, unknown flag: usage errors, exit 1.
    assert_eq!(onnxq(&[s(&model)]).status.code(), Some(1));
    assert_eq!(
        onnxq(&[s(&model), "--config", "x", "--frobnicate"]).status.code(),
        Some(1)
    );
}

#[test]
fn bad_data_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo("models/crepe_tiny.onnx");
    let ppocr_data = repo("models/ppocr_mobile_v2_cls.eval.npz");
    // ppocr's data for crepe: the array is named for another model's input.
    assert_fails(
        &onnxq(&["run", s(&model), "--data", s(&ppocr_data)]),
        2,
        &[s(&ppocr_data), "no array for model input 'frames'"],
    );

    // Right name, wrong dtype / wrong shape: write .npz files with the library's writer.
    use tract_onnx::prelude::Tensor;
    let write = |name: &str, t: Tensor| {
        let p = dir.path().join(name);
        onnxq::calib::data::write_npz(&p, &[("frames".to_string(), vec![t])]).unwrap();
        p
    };
    let wrong_dtype = write(
        "i64.npz",
        Tensor::from_shape::<i64>(&[4, 1024], &vec![0; 4096]).unwrap(),
    );
    assert_fails(
        &onnxq(&["run", s(&model), "--data", s(&wrong_dtype)]),
        2,
        &[s(&wrong_dtype), "is I64 but model input 'frames' is f32"],
    );
    let wrong_shape = write(
        "shape.npz",
        Tensor::from_shape::<f32>(&[4, 1000], &vec![0.0; 4000]).unwrap(),
    );
    assert_fails(
        &onnxq(&["run", s(&model), "--data", s(&wrong_shape)]),
        2,
        &[s(&wrong_shape), "does not fit model input 'frames'"],
    );
    let not_npz = dir.path().join("x.npz");
    std::fs::write(&not_npz, b"garbage").unwrap();
    assert_fails(
        &onnxq(&["run", s(&model), "--data", s(&not_npz)]),
        2,
        &[s(&not_npz), "not a readable .npz"],
    );
}

#[test]
fn main_job_writes_atomically_and_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), ROUNDTRIP);
    let input = dir.path().join("in.onnx");
    std::fs::copy(repo("models/ppocr_mobile_v2_cls.onnx"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let a = dir.path().join("a.onnx");
    let b = dir.path().join("b.onnx");
    let report = dir.path().join("report.json");
    let o = onnxq(&[s(&input), "--config", s(&cfg), "-o", s(&a), "--report", s(&report)]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let o = onnxq_env(&[s(&input), "--config", s(&cfg), "-o", s(&b)], "RAYON_NUM_THREADS", "1");
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "same input and config must give the same bytes"
    );
    assert_eq!(
        std::fs::read(&input).unwrap(),
        before,
        "the input model must not change"
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with(".tmp")),
        "temporary files left behind: {names:?}"
    );

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["passes"][0]["pass"], "eliminate_identity");
    assert_eq!(
        report["passes"][0]["nodes_before"].as_u64().unwrap(),
        report["passes"][0]["nodes_after"].as_u64().unwrap() + 1
    );

    // Writing over the input is refused; writing into a missing folder fails cleanly.
    assert_fails(
        &onnxq(&[s(&input), "--config", s(&cfg), "-o", s(&input)]),
        1,
        &["overwrite the input"],
    );
    let nowhere = dir.path().join("no/such/dir/out.onnx");
    assert_fails(
        &onnxq(&[s(&input), "--config", s(&cfg), "-o", s(&nowhere)]),
        2,
        &["no/such/dir"],
    );
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn dump_after_and_stop_after_help_bisect() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), ROUNDTRIP);
    let dumps = dir.path().join("dumps");
    let out = dir.path().join("out.onnx");
    let model = repo("models/ppocr_mobile_v2_cls.onnx");
    let o = onnxq(&[
        s(&model),
        "--config",
        s(&cfg),
        "-o",
        s(&out),
        "--dump-after",
        "all",
        "--dump-dir",
        s(&dumps),
        "--stop-after",
        "eliminate_identity",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let diff = std::fs::read_to_string(dumps.join("01-eliminate_identity.diff")).unwrap();
    assert!(
        diff.contains("-node   Identity@0 = Identity(softmax_0.tmp_0)"),
        "{diff}"
    );
    assert!(
        dumps.join("01-eliminate_identity.before.txt").exists()
            && dumps.join("01-eliminate_identity.after.txt").exists()
    );
    assert_fails(
        &onnxq(&[s(&model), "--config", s(&cfg), "--stop-after", "fold_batchnorm"]),
        1,
        &["does not run that pass"],
    );
}

#[test]
fn passes_lists_every_pass_with_its_options() {
    let out = onnxq(&["passes"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for name in onnxq::passes::NAMES {
        let phase = match *name {
            "easyquant" | "gptq" | "adaround" | "correct_bias" => "plan pass",
            _ => "graph pass",
        };
        let line = format!("{name} ({phase})");
        assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
    }
    assert!(text.contains("hardswish: keep|per_channel (keep)"), "{text}");
    assert_eq!(text.matches("options: ").count(), onnxq::passes::NAMES.len(), "{text}");
}

#[test]
fn inspect_reports_what_the_model_is_made_of() {
    let o = onnxq(&["inspect", s(&repo("models/ppocr_mobile_v2_cls.onnx"))]);
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "opsets       ai.onnx 11",
        "input        x: f32[-1,3,?,?]",
        "BatchNormalization",
        "weighted nodes (",
        "limitations  none",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let o = onnxq(&["inspect", "--json", s(&repo("models/crepe_tiny.onnx"))]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["opsets"][0][1], 17);
    let conv_count = json["op_histogram"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e[0] == "Conv")
        .unwrap()[1]
        .as_u64();
    assert_eq!(conv_count, Some(6));
    assert_eq!(json["weighted_nodes"].as_array().unwrap().len(), 13);
}

#[cfg(unix)]
#[test]
fn outputs_are_ordinary_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), ROUNDTRIP);
    let out = dir.path().join("out.onnx");
    let o = onnxq(&[s(&repo("models/crepe_tiny.onnx")), "--config", s(&cfg), "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o644);
}

#[test]
fn max_memory_bounds_the_samples_at_once_not_the_figures() {
    let dir = tempfile::tempdir().unwrap();
    let float = repo("models/ppocr_mobile_v2_cls.onnx");
    let eval = repo("models/ppocr_mobile_v2_cls.eval.npz");
    let report = |name: &str, extra: &[&str]| {
        let path = dir.path().join(name);
        let mut args = vec!["verify", s(&float), s(&float), "--data", s(&eval), "--report", s(&path)];
        args.extend_from_slice(extra);
        let o = onnxq_env(&args, "RAYON_NUM_THREADS", "2");
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(0), "{stderr}");
        (std::fs::read(&path).unwrap(), stderr)
    };
    let (roomy, said) = report("a.json", &["--max-memory", "64G"]);
    assert!(said.contains("(2 samples at a time)"), "{said}");
    // One byte fits no sample: one runs at a time, and the progress line says so.
    let (tight, said) = report("b.json", &["--max-memory", "1"]);
    assert!(said.contains("(1 sample at a time, over --max-memory)"), "{said}");
    assert_eq!(roomy, tight);
    // The flag is global: before the subcommand too.
    let path = dir.path().join("c.json");
    let args = [
        "--max-memory",
        "1",
        "verify",
        s(&float),
        s(&float),
        "--data",
        s(&eval),
        "--report",
        s(&path),
    ];
    let o = onnxq_env(&args, "RAYON_NUM_THREADS", "2");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("(1 sample at a time, over --max-memory)"), "{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), tight);
    // The main job's own arguments still do not mix with a subcommand.
    let o = onnxq(&["-c", "x.yaml", "verify", s(&float), s(&float), "--data", s(&eval)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with a subcommand"));

    for bad in ["2X", "0", "1.5.2G", "lots"] {
        let o = onnxq(&["verify", s(&float), s(&float), "--data", s(&eval), "--max-memory", bad]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{bad}: {stderr}");
        assert!(
            stderr.contains("--max-memory") && stderr.contains("expected a size"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// An external-data model is quantized and verified exactly as the same model inline: its large
/// weights stay on disk (read when a pass asks for them, handed to tract from the file), and the
/// written model, inline or with `--external-data`, is the same byte for byte.
#[test]
fn external_data_models_quantize_like_inline_ones() {
    use onnxq::onnx::{self, SaveOptions};
    let dir = tempfile::tempdir().unwrap();
    let inline = repo("models/crepe_tiny.onnx");
    let external = dir.path().join("crepe_external.onnx");
    let options = SaveOptions {
        external_data_threshold: Some(1024),
    };
    onnx::save_model(&onnx::load_model(&inline).unwrap(), &external, &options).unwrap();
    let loaded = onnx::load_model(&external).unwrap();
    let large: Vec<_> = loaded
        .graph
        .constants
        .values()
        .filter(|c| onnxq::ir::tensor::byte_size(&c.tensor) >= 1024)
        .collect();
    assert!(large.len() > 5, "crepe_tiny should have large initializers");
    assert!(
        large
            .iter()
            .all(|c| onnxq::ir::tensor::on_disk(&c.tensor).is_some() && c.tensor.raw_data.is_none()),
        "the large weights of an external-data model should stay on disk"
    );
    let cfg = config(
        dir.path(),
        &format!(
            "calibration: {{data: {:?}, samples: 8}}\nverify: {{data: {:?}}}\n",
            s(&repo("models/crepe_tiny.calib.npz")),
            s(&repo("models/crepe_tiny.eval.npz"))
        ),
    );
    let run = |input: &Path, out: &Path, extra: &[&str]| {
        let report = out.with_extension("json");
        let mut args = vec![s(input), "--config", s(&cfg), "-o", s(out), "--report", s(&report)];
        args.extend(extra);
        let o = onnxq(&args);
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        (std::fs::read(out).unwrap(), report["verification"].clone())
    };
    for (extra, folder) in [
        (&[][..], "inline_output"),
        (&["--external-data"][..], "external_output"),
    ] {
        let (a, b) = (dir.path().join(folder).join("a"), dir.path().join(folder).join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let (from_inline, verified_inline) = run(&inline, &a.join("q.onnx"), extra);
        let (from_external, verified_external) = run(&external, &b.join("q.onnx"), extra);
        assert!(from_inline == from_external, "{folder}: the written models differ");
        assert_eq!(verified_inline, verified_external, "{folder}: the verifications differ");
        assert!(verified_inline["outputs"][0]["sqnr_db"].as_f64().unwrap() > 10.0);
        let data = |d: &Path| std::fs::read(d.join("q.onnx.data")).ok();
        assert_eq!(data(&a), data(&b), "{folder}: the data files differ");
        assert_eq!(data(&a).is_some(), !extra.is_empty());
    }
}

#[cfg(unix)]
#[test]
fn printing_to_a_closed_pipe_ends_quietly_not_in_a_panic() {
    // `onnxq dump M | head`: the reader is gone before onnxq writes.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_onnxq"))
        .args(["dump", repo("models/crepe_tiny.onnx").to_str().unwrap()])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    // Ended by SIGPIPE, as `cat` is, not by an exit code of its own.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}
