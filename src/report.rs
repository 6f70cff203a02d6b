//! `--html REPORT.html`: the run's JSON report drawn as one self-contained page (no network, no
//! scripts, no fonts: inline SVG charts and CSS), to find which layer is to blame at a glance:
//! - the output figures and the verdict;
//! - per-layer SQNR along the graph (topological order) against the layer floor, the first
//!   drop below it and the worst layers marked, each linked to its row in the layer table;
//! - for the worst quantized tensors, the histogram of their calibration values with the
//!   chosen range and the share it clips;
//! - the accuracy guard's (or mixed precision's) sensitivity ranking and what it raised, the
//!   plan (what was quantized, what stayed float and why), the passes and the timings.
//!
//! `onnxq calibrate --html` draws the calibration alone (each tensor's observed span, the range
//! every method chooses, the histograms of the tensors the chosen method clips most), and
//! `onnxq sensitivity --html` its ranking.
//!
//! The page is a view of the same JSON `--report` writes (one source of truth), plus the
//! calibration histograms, which the JSON does not carry. Charts are drawn by plotters' SVG
//! backend; a chart never labels every layer (its axis has a few ticks, the marked layers are
//! listed under it), so a 400-layer model stays readable.

use std::fmt::Write as _;

use plotters::prelude::*;
use serde_json::Value;

use crate::calib::stats::CalibrationStats;
use crate::error::{Error, Result};

/// How many of the worst layers are marked on the chart and get a histogram.
const WORST: usize = 5;
/// Bars of a calibration histogram (the statistics' own bins are merged down to this).
const HISTOGRAM_BARS: usize = 80;
/// The top of the per-layer chart's SQNR axis.
const CHART_TOP_DB: f64 = 100.0;
/// Chart size in CSS pixels (the SVG scales with the page).
const CHART: (u32, u32) = (960, 320);

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page of a main-job (or `verify`) report.
pub fn render(report: &Value, stats: Option<&CalibrationStats>) -> Result<String> {
    let mut page = Page::default();
    let input = report["input"].as_str().unwrap_or("model");
    page.title = format!("onnxq report: {input}");
    page.summary(report);
    let verification = &report["verification"];
    let layers = Layer::all(verification);
    if !layers.is_empty() {
        let floor = verification["thresholds"]["layer_floor_db"].as_f64();
        let first_drop = verification["first_drop"].as_str();
        page.layer_chart(&layers, floor, first_drop)?;
        if let Some(stats) = stats {
            page.worst_histograms(&layers, report, stats)?;
        }
    }
    page.guard(&report["quantization"])?;
    page.plan(&report["quantization"]["plan"]);
    if !layers.is_empty() {
        page.layer_table(&layers, verification["thresholds"]["layer_floor_db"].as_f64());
    }
    page.passes(report);
    Ok(page.finish())
}

/// The page of an `onnxq calibrate` report: the ranges of the chosen method and of every other,
/// and the histograms of the tensors the chosen method clips most.
pub fn render_calibration(report: &Value, stats: &CalibrationStats) -> Result<String> {
    let mut page = Page::default();
    let model = report["model"].as_str().unwrap_or("model");
    page.title = format!("onnxq calibration: {model}");
    page.section("summary", "Summary");
    let method = report["method"]
        .as_str()
        .map_or_else(|| report["method"].to_string(), str::to_string);
    page.key_values(&[
        ("model", model.to_string()),
        ("config", report["config"].as_str().unwrap_or("").to_string()),
        ("statistics", report["stats"].as_str().unwrap_or("").to_string()),
        ("onnxq", report["onnxq_version"].as_str().unwrap_or("").to_string()),
        ("samples", report["samples"].to_string()),
        ("method", method),
    ]);
    let ranges: Vec<&Value> = report["ranges"]
        .as_array()
        .map(|r| r.iter().collect())
        .unwrap_or_default();
    let clipped = |r: &Value| r["clipped_values"].as_f64().unwrap_or(0.0);
    // Most clipped: the largest share of the observed span cut off (a long tail), then of the values.
    let span_cut = |r: &Value| r["clipped_range"].as_f64().unwrap_or(0.0);
    let mut most_clipped: Vec<&Value> = ranges.iter().copied().filter(|r| clipped(r) > 0.0).collect();
    most_clipped.sort_by(|a, b| {
        span_cut(b)
            .total_cmp(&span_cut(a))
            .then(clipped(b).total_cmp(&clipped(a)))
    });
    page.para(&format!(
        "The chosen method clips values of {} of the {} tensors.",
        most_clipped.len(),
        ranges.len()
    ));
    let anchor = |t: &str| format!("tensor-{}", ranges.iter().position(|r| r["tensor"] == t).unwrap_or(0));
    let shown: Vec<(String, f64, f64, String)> = most_clipped
        .iter()
        .filter(|r| r["tensor"].as_str().is_some_and(|t| stats.tensors.contains_key(t)))
        .take(WORST)
        .map(|r| {
            let t = r["tensor"].as_str().unwrap_or("");
            let caption = format!(
                "(<a href=\"#{}\">its row</a>; {:.1}% of the observed span cut off)",
                anchor(t),
                span_cut(r) * 100.0
            );
            (
                t.to_string(),
                r["chosen"][0].as_f64().unwrap_or(0.0),
                r["chosen"][1].as_f64().unwrap_or(0.0),
                caption,
            )
        })
        .collect();
    page.histograms("Calibration histograms of the most clipped tensors", &shown, stats)?;
    page.section("ranges", "Ranges per tensor");
    let by_method = report["ranges_by_method"].as_object();
    let methods: Vec<&String> = by_method.map(|m| m.keys().collect()).unwrap_or_default();
    let pair = |v: &Value| {
        format!(
            "[{}, {}]",
            num(v[0].as_f64().unwrap_or(0.0)),
            num(v[1].as_f64().unwrap_or(0.0))
        )
    };
    let rows: Vec<_> = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let t = r["tensor"].as_str().unwrap_or("");
            let mut cells = vec![
                t.to_string(),
                pair(&r["observed"]),
                pair(&r["chosen"]),
                format!("{:.3}%", clipped(r) * 100.0),
            ];
            for m in &methods {
                let range = by_method
                    .and_then(|b| b[m.as_str()].as_array())
                    .and_then(|rs| rs.iter().find(|x| x["tensor"] == t))
                    .map_or(String::new(), |x| pair(&x["chosen"]));
                cells.push(range);
            }
            (Some(format!("tensor-{i}")), false, cells)
        })
        .collect();
    let mut headers = vec!["tensor", "observed", "chosen", "values clipped"];
    headers.extend(methods.iter().map(|m| m.as_str()));
    page.table("num", &headers, &rows);
    Ok(page.finish())
}

/// The page of an `onnxq sensitivity` report: the ranking as a chart and a table.
pub fn render_sensitivity(report: &Value) -> Result<String> {
    let mut page = Page::default();
    let model = report["model"].as_str().unwrap_or("model");
    page.title = format!("onnxq sensitivity: {model}");
    page.section("summary", "Summary");
    let outputs: Vec<&str> = report["outputs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    page.key_values(&[
        ("model", model.to_string()),
        ("config", report["config"].as_str().unwrap_or("").to_string()),
        ("onnxq", report["onnxq_version"].as_str().unwrap_or("").to_string()),
        ("samples", report["samples"].to_string()),
        ("outputs compared", outputs.join(", ")),
        ("all layers int8", fmt_db(db_of(&report["all_int8_db"]))),
    ]);
    let verdict = format!(
        "With every layer int8 the output is at {} on {} calibration samples; the layers (or groups) whose noise reaches the output, noisiest first:",
        fmt_db(db_of(&report["all_int8_db"])),
        report["samples"]
    );
    page.ranking("Sensitivity ranking", &verdict, &report["layers"], &Value::Null)?;
    Ok(page.finish())
}

/// One row of the verification's per-layer comparison.
struct Layer {
    index: usize,
    name: String,
    op: String,
    /// None when the layer is identical to the float one (infinite SQNR).
    sqnr_db: Option<f64>,
    cosine: Option<f64>,
    max_abs_err: Option<f64>,
}

impl Layer {
    fn all(verification: &Value) -> Vec<Layer> {
        let Some(rows) = verification["layers"].as_array() else {
            return Vec::new();
        };
        rows.iter()
            .enumerate()
            .map(|(index, r)| Layer {
                index,
                name: r["name"].as_str().unwrap_or("").to_string(),
                op: r["op_type"].as_str().unwrap_or("").to_string(),
                sqnr_db: db_of(&r["sqnr_db"]),
                cosine: r["cosine"].as_f64(),
                max_abs_err: r["max_abs_err"].as_f64(),
            })
            .collect()
    }

    fn anchor(&self) -> String {
        format!("layer-{}", self.index)
    }
}

/// The worst layers by SQNR, worst first (ties in graph order).
fn worst(layers: &[Layer]) -> Vec<&Layer> {
    let mut measured: Vec<&Layer> = layers.iter().filter(|l| l.sqnr_db.is_some()).collect();
    measured.sort_by(|a, b| {
        a.sqnr_db
            .partial_cmp(&b.sqnr_db)
            .expect("finite")
            .then(a.index.cmp(&b.index))
    });
    measured.truncate(WORST);
    measured
}

fn chart_error(e: impl std::fmt::Display) -> Error {
    Error::internal(format!("drawing a report chart: {e}"))
}

/// Four significant digits, in exponent form outside [10⁻³, 10⁵).
fn num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if (1e-3..1e5).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
        format!("{v:.decimals$}")
    } else {
        format!("{v:.3e}")
    }
}

/// A JSON SQNR, None for identical tensors (written as ±f64::MAX: JSON has no infinity, see
/// `verify`).
fn db_of(v: &Value) -> Option<f64> {
    v.as_f64().filter(|v| v.abs() < f64::MAX)
}

fn fmt_db(v: Option<f64>) -> String {
    v.map_or("identical".into(), |v| format!("{v:.2} dB"))
}

#[derive(Default)]
struct Page {
    title: String,
    body: String,
    /// (id, title) of each section, for the navigation line.
    sections: Vec<(String, String)>,
}

impl Page {
    fn section(&mut self, id: &str, title: &str) {
        self.sections.push((id.to_string(), title.to_string()));
        let _ = writeln!(self.body, "<h2 id=\"{}\">{}</h2>", escape(id), escape(title));
    }

    /// A two-column table of the non-empty values.
    fn key_values(&mut self, rows: &[(&str, String)]) {
        let table: Vec<_> = rows
            .iter()
            .filter(|(_, v)| !v.is_empty() && v != "null")
            .map(|(k, v)| (None, false, vec![k.to_string(), v.clone()]))
            .collect();
        self.table("kv", &["", ""], &table);
    }

    fn para(&mut self, text: &str) {
        let _ = writeln!(self.body, "<p>{}</p>", escape(text));
    }

    /// A table; cells are escaped text unless they start with `<a ` (a link this module made).
    fn table(&mut self, class: &str, headers: &[&str], rows: &[(Option<String>, bool, Vec<String>)]) {
        let _ = write!(self.body, "<table class=\"{class}\"><thead><tr>");
        for h in headers {
            let _ = write!(self.body, "<th>{}</th>", escape(h));
        }
        self.body.push_str("</tr></thead><tbody>\n");
        for (id, bad, cells) in rows {
            let id = id
                .as_ref()
                .map_or(String::new(), |id| format!(" id=\"{}\"", escape(id)));
            let class = if *bad { " class=\"bad\"" } else { "" };
            let _ = write!(self.body, "<tr{id}{class}>");
            for c in cells {
                let _ = write!(self.body, "<td>{}</td>", escape(c));
            }
            self.body.push_str("</tr>\n");
        }
        self.body.push_str("</tbody></table>\n");
    }

    fn summary(&mut self, report: &Value) {
        self.section("summary", "Summary");
        let q = &report["quantization"];
        let mut rows = vec![
            ("input", report["input"].as_str().unwrap_or("").to_string()),
            ("output", report["output"].as_str().unwrap_or("").to_string()),
            ("config", report["config"].as_str().unwrap_or("").to_string()),
            ("onnxq", report["onnxq_version"].as_str().unwrap_or("").to_string()),
        ];
        if let Some(t) = q["target"].as_str() {
            rows.push(("target", t.to_string()));
        }
        if let Some(n) = q["calibration_samples"].as_u64() {
            rows.push(("calibration samples", n.to_string()));
        }
        if let Some(plan) = q["plan"].as_object() {
            let count = |k: &str| plan.get(k).and_then(Value::as_object).map_or(0, |m| m.len());
            rows.push((
                "quantized",
                format!(
                    "{} activations, {} weights, {} int32 biases; {} tensors kept float",
                    count("activations"),
                    count("weights"),
                    count("biases"),
                    count("kept_float")
                ),
            ));
        }
        self.key_values(&rows);
        let v = &report["verification"];
        if let Some(outputs) = v["outputs"].as_array() {
            let passed = v["passed"].as_bool().unwrap_or(false);
            self.para(&format!(
                "Verification on {} samples: {}.",
                v["samples"].as_u64().unwrap_or(0),
                if passed { "passed" } else { "FAILED" }
            ));
            let rows: Vec<_> = outputs
                .iter()
                .map(|o| {
                    let top1 = o["top1_agreement"]
                        .as_f64()
                        .map_or(String::new(), |t| format!("{t:.3}"));
                    (
                        None,
                        false,
                        vec![
                            o["name"].as_str().unwrap_or("").to_string(),
                            fmt_db(db_of(&o["sqnr_db"])),
                            o["cosine"].as_f64().map_or(String::new(), |c| format!("{c:.6}")),
                            o["max_abs_err"].as_f64().map_or(String::new(), num),
                            top1,
                        ],
                    )
                })
                .collect();
            self.table(
                "num",
                &["output", "SQNR", "cosine", "max |error|", "top-1 agreement"],
                &rows,
            );
            for f in v["failures"].as_array().into_iter().flatten() {
                self.para(&format!("failure: {}", f.as_str().unwrap_or(&f.to_string())));
            }
        } else {
            self.para("No verification ran (add `verify: {data: …}` to the config to compare per layer).");
        }
    }

    fn layer_chart(&mut self, layers: &[Layer], floor: Option<f64>, first_drop: Option<&str>) -> Result<()> {
        self.section("layers-chart", "Per-layer SQNR along the graph");
        let values: Vec<f64> = layers.iter().filter_map(|l| l.sqnr_db).collect();
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        let lo = (lo.min(floor.unwrap_or(lo)) - 2.0).floor();
        // Near-identical layers can measure thousands of dB: the chart stops at CHART_TOP_DB
        // and draws them at its top.
        let hi = (hi.min(CHART_TOP_DB) + 2.0).ceil().max(lo + 1.0);
        let worst = worst(layers);
        let drop = first_drop.and_then(|d| layers.iter().find(|l| l.name == d));
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, CHART).into_drawing_area();
            root.fill(&WHITE).map_err(chart_error)?;
            let mut chart = ChartBuilder::on(&root)
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(52)
                .build_cartesian_2d(0f64..(layers.len().max(2) - 1) as f64, lo..hi)
                .map_err(chart_error)?;
            chart
                .configure_mesh()
                .x_desc("layer (graph order)")
                .y_desc("SQNR (dB)")
                .x_labels(10)
                .y_labels(8)
                .label_style(("sans-serif", 13))
                .axis_desc_style(("sans-serif", 14))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(chart_error)?;
            // Identical layers (no error) are drawn at the top of the chart.
            let points: Vec<(f64, f64)> = layers
                .iter()
                .map(|l| (l.index as f64, l.sqnr_db.unwrap_or(hi).min(hi)))
                .collect();
            chart
                .draw_series(LineSeries::new(points, &RGBColor(31, 119, 180)))
                .map_err(chart_error)?
                .label("layer SQNR")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RGBColor(31, 119, 180)));
            if let Some(f) = floor {
                chart
                    .draw_series(LineSeries::new(
                        vec![(0.0, f), ((layers.len().max(2) - 1) as f64, f)],
                        RGBColor(150, 150, 150).stroke_width(1),
                    ))
                    .map_err(chart_error)?
                    .label(format!("floor {f} dB"))
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RGBColor(150, 150, 150)));
            }
            chart
                .draw_series(
                    worst
                        .iter()
                        .map(|l| Circle::new((l.index as f64, l.sqnr_db.expect("measured").min(hi)), 4, RED.filled())),
                )
                .map_err(chart_error)?
                .label("worst layers")
                .legend(|(x, y)| Circle::new((x + 8, y), 4, RED.filled()));
            if let Some(d) = drop {
                chart
                    .draw_series(std::iter::once(TriangleMarker::new(
                        (d.index as f64, d.sqnr_db.unwrap_or(hi).min(hi)),
                        7,
                        RGBColor(255, 127, 14).filled(),
                    )))
                    .map_err(chart_error)?
                    .label("first drop below the floor")
                    .legend(|(x, y)| TriangleMarker::new((x + 8, y), 6, RGBColor(255, 127, 14).filled()));
            }
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 13))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(chart_error)?;
            root.present().map_err(chart_error)?;
        }
        let _ = writeln!(self.body, "<figure>{svg}</figure>");
        let link = |l: &Layer| {
            format!(
                "<a href=\"#{}\">#{} {} ({}, {})</a>",
                l.anchor(),
                l.index,
                escape(&l.name),
                escape(&l.op),
                fmt_db(l.sqnr_db)
            )
        };
        self.body.push_str("<ul class=\"marks\">");
        if let Some(d) = drop {
            let _ = write!(self.body, "<li>first drop below the floor: {}</li>", link(d));
        }
        for l in &worst {
            let _ = write!(self.body, "<li>worst: {}</li>", link(l));
        }
        self.body.push_str("</ul>\n");
        Ok(())
    }

    /// The histograms of the quantized tensors read by the worst layers.
    fn worst_histograms(&mut self, layers: &[Layer], report: &Value, stats: &CalibrationStats) -> Result<()> {
        let activations = &report["quantization"]["plan"]["activations"];
        // Each quantized tensor with the worst of the layers that read it (or of its own
        // layer): where its quantization shows.
        let mut candidates: Vec<(&str, &Layer)> = activations
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(t, a)| stats.tensors.contains_key(*t) && a["range"].is_array())
            .filter_map(|(t, a)| {
                let readers = a["consumers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c[0].as_str());
                let worst_reader = readers
                    .chain(std::iter::once(t.as_str()))
                    .filter_map(|r| layers.iter().find(|l| l.name == r && l.sqnr_db.is_some()))
                    .min_by(|a, b| a.sqnr_db.partial_cmp(&b.sqnr_db).expect("finite"))?;
                Some((t.as_str(), worst_reader))
            })
            .collect();
        candidates.sort_by(|a, b| {
            a.1.sqnr_db
                .partial_cmp(&b.1.sqnr_db)
                .expect("finite")
                .then(a.1.index.cmp(&b.1.index))
                .then(a.0.cmp(b.0))
        });
        // A tensor passed on unchanged (Identity, a copy) has the same statistics: shown once.
        let mut seen = Vec::new();
        let shown: Vec<(&Layer, &str)> = candidates
            .into_iter()
            .filter(|(t, _)| {
                let s = &stats.tensors[*t];
                let key = (s.min.to_bits(), s.max.to_bits(), s.count, s.histogram.counts.clone());
                let new = !seen.contains(&key);
                seen.push(key);
                new
            })
            .take(WORST)
            .map(|(t, l)| (l, t))
            .collect();
        let shown: Vec<(String, f64, f64, String)> = shown
            .into_iter()
            .map(|(layer, t)| {
                let range = &activations[t]["range"];
                let caption = format!(
                    "(its worst layer <a href=\"#{}\">#{}</a> {}, {})",
                    layer.anchor(),
                    layer.index,
                    escape(&layer.name),
                    fmt_db(layer.sqnr_db)
                );
                (
                    t.to_string(),
                    range[0].as_f64().unwrap_or(0.0),
                    range[1].as_f64().unwrap_or(0.0),
                    caption,
                )
            })
            .collect();
        self.histograms("Calibration histograms of the worst quantized tensors", &shown, stats)
    }

    /// A section with the calibration histogram of each `(tensor, lo, hi, caption)`: the range
    /// chosen, the share it clips; `caption` is HTML this module made.
    fn histograms(
        &mut self,
        title: &str,
        shown: &[(String, f64, f64, String)],
        stats: &CalibrationStats,
    ) -> Result<()> {
        if shown.is_empty() {
            return Ok(());
        }
        self.section("histograms", title);
        self.para("Counts on a log scale; the shaded band is the range chosen, values outside it are clipped.");
        for (tensor, lo, hi, caption) in shown {
            let s = &stats.tensors[tensor];
            let clipped = s.clipped_fraction(*lo as f32, *hi as f32);
            let Some(bars) = bars(&s.histogram) else { continue };
            let svg = histogram_svg(&bars, *lo, *hi)?;
            let _ = writeln!(
                self.body,
                "<h3>{} <small>{caption} range [{}, {}], clips {:.3}% of the values; observed [{}, {}]</small></h3><figure>{svg}</figure>",
                escape(tensor),
                num(*lo),
                num(*hi),
                clipped * 100.0,
                num(s.min as f64),
                num(s.max as f64)
            );
        }
        Ok(())
    }

    fn guard(&mut self, q: &Value) -> Result<()> {
        let (title, g) = if q["mixed_precision"].is_object() {
            ("Mixed precision", &q["mixed_precision"])
        } else if q["guard"].is_object() {
            ("Accuracy guard", &q["guard"])
        } else {
            return Ok(());
        };
        let units = if g["units"].is_array() {
            &g["units"]
        } else {
            &g["sensitivity"]
        };
        self.ranking(title, g["verdict"].as_str().unwrap_or(""), units, &g["raised"])
    }

    /// A sensitivity ranking (`units`: noisiest first) as a chart and a table, and the layers
    /// `raised` with why.
    fn ranking(&mut self, title: &str, verdict: &str, units: &Value, raised: &Value) -> Result<()> {
        self.section("sensitivity", title);
        if !verdict.is_empty() {
            self.para(verdict);
        }
        let units: Vec<&Value> = units.as_array().map(|u| u.iter().collect()).unwrap_or_default();
        if !units.is_empty() {
            let shown: Vec<(String, f64)> = units
                .iter()
                .take(20)
                .map(|u| {
                    (
                        u["layer"].as_str().unwrap_or("").to_string(),
                        u["share"].as_f64().unwrap_or(0.0),
                    )
                })
                .collect();
            let svg = share_svg(&shown)?;
            let _ = writeln!(self.body, "<figure>{svg}</figure>");
            let rows: Vec<_> = units
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    (
                        None,
                        false,
                        vec![
                            (i + 1).to_string(),
                            u["layer"].as_str().unwrap_or("").to_string(),
                            u["op_type"].as_str().unwrap_or("").to_string(),
                            format!("{:.1}%", u["share"].as_f64().unwrap_or(0.0) * 100.0),
                            fmt_db(db_of(&u["only_this_int8_db"])),
                            if u["only_this_int16_db"].is_number() {
                                fmt_db(db_of(&u["only_this_int16_db"]))
                            } else {
                                String::new()
                            },
                        ],
                    )
                })
                .collect();
            self.table(
                "num",
                &[
                    "rank",
                    "layer or group",
                    "op",
                    "share of the all-int8 noise",
                    "only it int8",
                    "only it int16",
                ],
                &rows,
            );
        }
        let raised: Vec<_> = raised
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    None,
                    false,
                    vec![
                        r["layer"].as_str().unwrap_or("").to_string(),
                        r["precision"].as_str().unwrap_or("").to_string(),
                        r["reason"].as_str().unwrap_or("").to_string(),
                    ],
                )
            })
            .collect();
        if !raised.is_empty() {
            self.para("Raised:");
            self.table("text", &["layer", "precision", "why"], &raised);
        }
        Ok(())
    }

    fn plan(&mut self, plan: &Value) {
        let Some(kept) = plan["kept_float"].as_object() else {
            return;
        };
        self.section("plan", "The plan: what stayed float and why");
        let rows: Vec<_> = kept
            .iter()
            .map(|(t, why)| (None, false, vec![t.clone(), why.as_str().unwrap_or("").to_string()]))
            .collect();
        if rows.is_empty() {
            self.para("Every float tensor the target quantizes was quantized.");
        } else {
            self.table("text", &["tensor", "why"], &rows);
        }
        if let Some(p) = plan["precisions"].as_object().filter(|p| !p.is_empty()) {
            let rows: Vec<_> = p
                .iter()
                .map(|(l, v)| (None, false, vec![l.clone(), v.as_str().unwrap_or("").to_string()]))
                .collect();
            self.para("Layers at another precision than the plan's:");
            self.table("text", &["layer", "precision"], &rows);
        }
    }

    fn layer_table(&mut self, layers: &[Layer], floor: Option<f64>) {
        self.section("layers", "Per-layer comparison");
        let rows: Vec<_> = layers
            .iter()
            .map(|l| {
                let bad = matches!((l.sqnr_db, floor), (Some(v), Some(f)) if v < f);
                (
                    Some(l.anchor()),
                    bad,
                    vec![
                        l.index.to_string(),
                        l.name.clone(),
                        l.op.clone(),
                        fmt_db(l.sqnr_db),
                        l.cosine.map_or(String::new(), |c| format!("{c:.6}")),
                        l.max_abs_err.map_or(String::new(), num),
                    ],
                )
            })
            .collect();
        self.table(
            "num",
            &["#", "layer output", "op", "SQNR", "cosine", "max |error|"],
            &rows,
        );
    }

    fn passes(&mut self, report: &Value) {
        self.section("passes", "Passes and timings");
        let rows: Vec<_> = report["passes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    None,
                    false,
                    vec![
                        p["pass"].as_str().unwrap_or("").to_string(),
                        format!("{:.0} ms", p["ms"].as_f64().unwrap_or(0.0)),
                        format!("{} → {}", p["nodes_before"], p["nodes_after"]),
                        p["notes"]
                            .as_array()
                            .and_then(|n| n.first())
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    ],
                )
            })
            .collect();
        self.table("text", &["step", "time", "nodes", "first note"], &rows);
        if let Some(t) = report["timings_ms"].as_object() {
            let parts: Vec<String> = t
                .iter()
                .map(|(k, v)| format!("{k} {:.0} ms", v.as_f64().unwrap_or(0.0)))
                .collect();
            self.para(&format!("Timings: {}.", parts.join(", ")));
        }
    }

    fn finish(self) -> String {
        let nav: Vec<String> = self
            .sections
            .iter()
            .map(|(id, title)| format!("<a href=\"#{}\">{}</a>", escape(id), escape(&title.to_lowercase())))
            .collect();
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>{STYLE}</style></head>\n<body><h1>{}</h1>\n<nav>{}</nav>\n{}</body></html>\n",
            escape(&self.title),
            escape(&self.title),
            nav.join(" · "),
            self.body
        )
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}\
h1{font-size:1.4em;word-break:break-all}h2{margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1em}\
small{font-weight:normal;color:#555}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}\
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;word-break:break-all}th{word-break:normal}\
table.num{display:block;overflow-x:auto;max-width:100%}\
table.num td:not(:nth-child(2)){white-space:nowrap}tr.bad{background:#fde8e8}tr:target{background:#fff3c4}\
figure{margin:0}svg{max-width:100%;height:auto}td:nth-child(2){min-width:12em}ul.marks{font-size:.9em}";

/// The histogram merged down to at most [`HISTOGRAM_BARS`] bars over its observed span:
/// `(left edge, width, count)`.
fn bars(h: &crate::calib::observers::Histogram) -> Option<Vec<(f64, f64, u64)>> {
    if h.counts.is_empty() {
        return None;
    }
    let w = h.bin_width();
    let per_bar = h.counts.len().div_ceil(HISTOGRAM_BARS);
    Some(
        h.counts
            .chunks(per_bar)
            .enumerate()
            .map(|(i, c)| {
                let left = (h.start + (i * per_bar) as i64) as f64 * w;
                (left, w * c.len() as f64, c.iter().sum())
            })
            .collect(),
    )
}

fn histogram_svg(bars: &[(f64, f64, u64)], lo: f64, hi: f64) -> Result<String> {
    let x0 = bars.first().map_or(0.0, |b| b.0).min(lo);
    let x1 = bars.last().map_or(1.0, |b| b.0 + b.1).max(hi);
    let top = bars.iter().map(|b| b.2).max().unwrap_or(1).max(1) as f64;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (CHART.0, 220)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(52)
            .build_cartesian_2d(x0..x1, (0.5f64..top * 2.0).log_scale())
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .x_labels(10)
            .y_labels(5)
            .y_desc("count")
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 14))
            .light_line_style(RGBColor(240, 240, 240))
            .draw()
            .map_err(chart_error)?;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(lo, 0.5), (hi, top * 2.0)],
                RGBColor(44, 160, 44).mix(0.12).filled(),
            )))
            .map_err(chart_error)?;
        chart
            .draw_series(bars.iter().filter(|b| b.2 > 0).map(|&(left, width, count)| {
                let inside = left + width > lo && left < hi;
                let color = if inside { RGBColor(31, 119, 180) } else { RED };
                Rectangle::new([(left, 0.5), (left + width, count as f64)], color.filled())
            }))
            .map_err(chart_error)?;
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

/// A horizontal bar per unit: its share of the all-int8 output noise (labels are its rank; the
/// table under the chart names them).
fn share_svg(units: &[(String, f64)]) -> Result<String> {
    let top = units.iter().map(|u| u.1).fold(0.0, f64::max).max(1e-9);
    let mut svg = String::new();
    {
        let height = 40 + 16 * units.len() as u32;
        let root = SVGBackend::with_string(&mut svg, (CHART.0, height)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(28)
            .y_label_area_size(10)
            .build_cartesian_2d(0f64..top * 100.0 * 1.1, 0f64..units.len() as f64)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .x_desc("share of the all-int8 output noise (%)")
            .x_label_style(("sans-serif", 13))
            .disable_y_mesh()
            .disable_y_axis()
            .draw()
            .map_err(chart_error)?;
        for (i, u) in units.iter().enumerate() {
            // The noisiest at the top, numbered by rank as in the table.
            let row = (units.len() - 1 - i) as f64;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.0, row + 0.15), (u.1 * 100.0, row + 0.85)],
                    RGBColor(31, 119, 180).filled(),
                )))
                .map_err(chart_error)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{}", i + 1),
                    (u.1 * 100.0 + top * 0.5, row + 0.8),
                    ("sans-serif", 12),
                )))
                .map_err(chart_error)?;
        }
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identical_tensor_reads_identical_not_a_308_digit_number() {
        // verify writes +∞ as f64::MAX (JSON has no infinity).
        let identical = serde_json::json!(f64::MAX);
        assert_eq!(fmt_db(db_of(&identical)), "identical");
        assert_eq!(fmt_db(db_of(&serde_json::json!(21.625))), "21.62 dB");
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&#39;");
    }
}
