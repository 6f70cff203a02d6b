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

#[test]
fn the_html_report_is_self_contained_escaped_and_shows_every_layer_of_the_json_one() {
    let samples: Vec<tract_onnx::prelude::Tensor> = (0..12)
        .map(|i| tract_onnx::prelude::Tensor::from_shape::<f32>(&[1, 4], &seeded(4, 50 + i)).unwrap())
        .collect();
    let (dir, model, config) = job_folder(&mlp(), &samples, |data| format!("verify: {{data: {data}}}\n"));
    let html = dir.path().join("report.html");
    main_job_ok(&model, &config, &["--html", html.to_str().unwrap()], None);
    let json = dir.path().join("report.json");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let page = std::fs::read_to_string(&html).unwrap();

    assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
    // Self-contained: no scripts, no external resources (the SVG namespace is a name, not a fetch).
    for banned in ["<script", "<link", "<img", "src=", "url(", "@import"] {
        assert!(!page.contains(banned), "{banned}");
    }
    let without_ns = page.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    assert!(!without_ns.contains("http://") && !without_ns.contains("https://"));
    // Balanced parts.
    for tag in ["svg", "table", "figure", "h2", "tr"] {
        assert_eq!(
            page.matches(&format!("<{tag}")).count(),
            page.matches(&format!("</{tag}>")).count(),
            "<{tag}>"
        );
    }
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
