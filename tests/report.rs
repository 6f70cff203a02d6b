//! `--html`: the main job's report as one self-contained page; checked part by part against the
//! JSON report of the same run.

mod common;

use common::*;

/// x [1, 4] → MatMul w1 → `h<&>` (a name HTML must escape) → Relu → MatMul w2 → y.
fn mlp() -> onnxq::proto::ModelProto {
    model(
        graph(
            vec![
                node("MatMul", "mm1", &["x", "w1"], &["h<&>"]),
                node("Relu", "relu", &["h<&>"], &["r"]),
                node("MatMul", "mm2", &["r", "w2"], &["y"]),
            ],
            vec![conv_weight("w1", &[4, 8], 3), conv_weight("w2", &[8, 3], 4)],
            vec![f32_info("x", &[1, 4])],
            vec![f32_info("y", &[1, 3])],
        ),
        13,
    )
}

/// A whole page, with no scripts or external resources, its parts balanced, every in-page
/// link pointing at an anchor it has.
fn assert_self_contained_and_balanced(page: &str) {
    assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
    // Self-contained: no scripts, no external resources (the SVG namespace is a name, not a fetch).
    for banned in ["<script", "<link", "<img", "src=", "url(", "@import"] {
        assert!(!page.contains(banned), "{banned}");
    }
    let without_ns = page.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    assert!(!without_ns.contains("http://") && !without_ns.contains("https://"));
    for tag in ["svg", "table", "figure", "h2", "tr"] {
        assert_eq!(
            page.matches(&format!("<{tag}")).count(),
            page.matches(&format!("</{tag}>")).count(),
            "<{tag}>"
        );
    }
    for link in page.split("href=\"#").skip(1) {
        let id = &link[..link.find('"').unwrap()];
        assert!(
            page.contains(&format!("id=\"{id}\"")),
            "a link to #{id}, which the page does not have"
        );
    }
}

/// 12 seeded samples of the mlp's input.
fn mlp_samples() -> Vec<tract_onnx::prelude::Tensor> {
    (0..12)
        .map(|i| tract_onnx::prelude::Tensor::from_shape::<f32>(&[1, 4], &seeded(4, 50 + i)).unwrap())
        .collect()
}

#[test]
fn the_html_report_is_self_contained_escaped_and_shows_every_layer_of_the_json_one() {
    let (dir, model, config) = job_folder(&mlp(), &mlp_samples(), |data| format!("verify: {{data: {data}}}\n"));
    let html = dir.path().join("report.html");
    main_job_ok(&model, &config, &["--html", html.to_str().unwrap()], None);
    let json = dir.path().join("report.json");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let page = std::fs::read_to_string(&html).unwrap();

    assert_self_contained_and_balanced(&page);
    // The user's names are text, never markup.
    assert!(page.contains("h&lt;&amp;&gt;"));
    assert!(!page.contains("h<&>"));
    // Charts: the per-layer line chart, at least one calibration histogram.
    assert!(page.matches("<svg").count() >= 2, "charts");
    assert!(page.contains("Per-layer SQNR along the graph"));
    assert!(page.contains("Calibration histograms"));
    // Every layer of the JSON report has its row and anchor, and every link points at one.
    let layers = report["verification"]["layers"].as_array().unwrap();
    assert!(!layers.is_empty());
    for (i, l) in layers.iter().enumerate() {
        assert!(page.contains(&format!("<tr id=\"layer-{i}\"")), "row of layer {i}");
        let name = onnxq::report::escape(l["name"].as_str().unwrap());
        assert!(page.contains(&format!("<td>{name}</td>")), "{name}");
    }
    for link in page.split("href=\"#layer-").skip(1) {
        let id: usize = link[..link.find('"').unwrap()].parse().unwrap();
        assert!(id < layers.len());
    }
    // The output figure is the JSON's.
    let sqnr = report["verification"]["outputs"][0]["sqnr_db"].as_f64().unwrap();
    assert!(page.contains(&format!("{sqnr:.2} dB")), "{sqnr}");
}

/// Runs `onnxq sensitivity` on the mlp: (JSON report, page).
fn sensitivity_pages() -> (serde_json::Value, String) {
    let (dir, model, config) = job_folder(&mlp(), &mlp_samples(), |_| String::new());
    let (json, html) = (dir.path().join("r.json"), dir.path().join("r.html"));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_onnxq"))
        .args([
            "sensitivity",
            model.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ])
        .args(["--report", json.to_str().unwrap(), "--html", html.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", String::from_utf8_lossy(&run.stderr));
    let report = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (report, std::fs::read_to_string(&html).unwrap())
}

#[test]
fn the_calibration_page_has_every_tensors_ranges_and_the_most_clipped_histograms() {
    // The shipped classifier with its shipped calibration config (percentile 99.99, 8 samples).
    let dir = tempfile::tempdir().unwrap();
    let (json, html) = (dir.path().join("r.json"), dir.path().join("r.html"));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_onnxq"))
        .arg("calibrate")
        .arg(repo("models/ppocr_mobile_v2_cls.onnx"))
        .arg("--config")
        .arg(repo("models/ppocr_calibrate.yaml"))
        .args(["--stats", dir.path().join("stats.json").to_str().unwrap()])
        .args(["--report", json.to_str().unwrap(), "--html", html.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", String::from_utf8_lossy(&run.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let page = std::fs::read_to_string(&html).unwrap();
    assert_self_contained_and_balanced(&page);
    // Every tensor of the JSON has its row, with the range each method chose.
    let ranges = report["ranges"].as_array().unwrap();
    assert!(!ranges.is_empty());
    for (i, r) in ranges.iter().enumerate() {
        let name = onnxq::report::escape(r["tensor"].as_str().unwrap());
        assert!(
            page.contains(&format!("<tr id=\"tensor-{i}\"><td>{name}</td>")),
            "row of {name}"
        );
    }
    for method in report["ranges_by_method"].as_object().unwrap().keys() {
        assert!(page.contains(&format!("<th>{method}</th>")), "{method}");
    }
    // Histograms only of tensors the chosen range clips, five of them.
    let clipped: Vec<&str> = ranges
        .iter()
        .filter(|r| r["clipped_values"].as_f64().unwrap() > 0.0)
        .map(|r| r["tensor"].as_str().unwrap())
        .collect();
    assert!(!clipped.is_empty(), "a weak check: nothing clipped");
    let histograms = page.matches("<h3>").count();
    assert_eq!(histograms, clipped.len().min(5), "{clipped:?}");
    assert_eq!(histograms, 5);
    for name in ranges.iter().map(|r| r["tensor"].as_str().unwrap()) {
        let shown = page.contains(&format!("<h3>{} <small>", onnxq::report::escape(name)));
        assert!(
            !shown || clipped.contains(&name),
            "{name} clips nothing but has a histogram"
        );
    }
}

#[test]
fn the_sensitivity_page_ranks_every_layer_of_the_json() {
    let (report, page) = sensitivity_pages();
    assert_self_contained_and_balanced(&page);
    assert!(page.contains("Sensitivity ranking"));
    let layers = report["layers"].as_array().unwrap();
    assert!(!layers.is_empty());
    for (rank, unit) in layers.iter().enumerate() {
        let name = onnxq::report::escape(unit["layer"].as_str().unwrap());
        assert!(
            page.contains(&format!("<td>{}</td><td>{name}</td>", rank + 1)),
            "rank {} {name}",
            rank + 1
        );
    }
    let all_int8 = report["all_int8_db"].as_f64().unwrap();
    assert!(page.contains(&format!("{all_int8:.2} dB")), "{all_int8}");
}
