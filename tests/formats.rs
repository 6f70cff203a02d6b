//! The low-bit formats (issue 15): int4/uint4 weights packed two per byte, blocked weights, FP8
//! weights and activations, weight-only quantization, narrower integer ranges (`bits`), ternary
//! and binary weights; each written, re-read and checked against
//! the maths, verified end to end in tract, and the config errors for what cannot be written.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use onnxq::ir::tensor::Fp8;
use onnxq::proto::tensor_proto::DataType;
use onnxq::proto::{ModelProto, NodeProto, TensorProto};
use onnxq::quant::params::{self, QuantDtype, Scheme};

fn onnxq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onnxq")).args(args).output().unwrap()
}

/// x[1, 8] → MatMul(w1 [8, 8]) → Relu → MatMul(w2 [8, 4]) → y.
fn mlp() -> ModelProto {
    let w1 = conv_weight("w1", &[8, 8], 3);
    let w2 = conv_weight("w2", &[8, 4], 4);
    model(
        graph(
            vec![
                node("MatMul", "mm1", &["x", "w1"], &["h"]),
                node("Relu", "relu", &["h"], &["r"]),
                node("MatMul", "mm2", &["r", "w2"], &["y"]),
            ],
            vec![w1, w2],
            vec![f32_info("x", &[1, 8])],
            vec![f32_info("y", &[1, 4])],
        ),
        13,
    )
}

/// Writes the model, 16 calibration samples and the config; runs the main job with verify on
/// the same data; returns (dir guard, written model, report, stderr).
fn quantize(config: &str) -> (tempfile::TempDir, ModelProto, serde_json::Value, String) {
    let samples: Vec<tract_onnx::prelude::Tensor> = (0..16)
        .map(|i| tract_onnx::prelude::Tensor::from_shape::<f32>(&[1, 8], &seeded(8, 100 + i)).unwrap())
        .collect();
    let (dir, model, cfg) = job_folder(&mlp(), &samples, |data| format!("verify: {{data: {data}}}\n{config}"));
    let run = main_job(&model, &cfg, &[], None);
    let stderr = String::from_utf8_lossy(&run.stderr).to_string();
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    let out = dir.path().join("out.onnx");
    let written = onnxq::onnx::decode_model(&out, &std::fs::read(&out).unwrap()).unwrap();
    let report = serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap()).unwrap();
    (dir, written, report, stderr)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn initializer<'m>(m: &'m ModelProto, name: &str) -> &'m TensorProto {
    let g = m.graph.as_ref().unwrap();
    g.initializer
        .iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("no initializer {name}"))
}

fn dq_of<'m>(m: &'m ModelProto, weight: &str) -> &'m NodeProto {
    let g = m.graph.as_ref().unwrap();
    g.node
        .iter()
        .find(|n| n.op_type() == "DequantizeLinear" && n.input[0] == format!("{weight}::quantized"))
        .unwrap_or_else(|| panic!("no DequantizeLinear of {weight}"))
}

fn attr(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name() == name).map(|a| a.i())
}

fn opset(m: &ModelProto) -> i64 {
    m.opset_import
        .iter()
        .find(|o| o.domain().is_empty())
        .map(|o| o.version())
        .unwrap()
}

/// Nibbles of a packed 4-bit tensor, low nibble first, sign-extended for int4.
fn nibbles(t: &TensorProto, signed: bool) -> Vec<i32> {
    let raw = t.raw_data.as_ref().expect("4-bit data in raw_data");
    let n: i64 = t.dims.iter().product();
    (0..n as usize)
        .map(|i| {
            let v = ((raw[i / 2] >> ((i % 2) * 4)) & 0xF) as i32;
            if signed && v >= 8 {
                v - 16
            } else {
                v
            }
        })
        .collect()
}

fn output_sqnr(report: &serde_json::Value) -> f64 {
    report["verification"]["outputs"][0]["sqnr_db"].as_f64().unwrap()
}

#[test]
fn fp8_rounds_to_nearest_even_and_saturates() {
    let e4 = Fp8::E4m3fn;
    // 1 = 0.0111.000, 2 = 0.1000.000, −0.5 = 1.0110.000, 448 = 0.1111.110 (the largest).
    assert_eq!(e4.encode(1.0), 0x38);
    assert_eq!(e4.encode(2.0), 0x40);
    assert_eq!(e4.encode(-0.5), 0xB0);
    assert_eq!(e4.encode(448.0), 0x7E);
    assert_eq!(e4.encode(500.0), 0x7E, "saturates");
    assert_eq!(e4.encode(f32::INFINITY), 0x7E);
    assert_eq!(e4.encode(-1e9), 0xFE);
    // Ties: 1.0625 lies halfway between 1 (mantissa 000) and 1.125 (001): the even one.
    assert_eq!(e4.decode(e4.encode(1.0625)), 1.0);
    assert_eq!(e4.decode(e4.encode(1.1875)), 1.25);
    assert_eq!(e4.decode(e4.encode(1.07)), 1.125);
    // Subnormals: 2^-9 is the smallest, half of it ties to 0.
    assert_eq!(e4.decode(e4.encode(2f32.powi(-9))), 2f32.powi(-9));
    assert_eq!(e4.decode(e4.encode(2f32.powi(-10))), 0.0);
    assert!(e4.decode(0x7F).is_nan());
    let e5 = Fp8::E5m2;
    assert_eq!(e5.encode(57344.0), 0x7B);
    assert_eq!(e5.encode(60000.0), 0x7B, "saturates");
    assert_eq!(e5.decode(e5.encode(1.125)), 1.0, "tie to even (1.0 and 1.25)");
    assert_eq!(e5.decode(e5.encode(1.375)), 1.5);
    // Every finite code decodes and encodes back to itself.
    for f in [e4, e5] {
        for code in 0u8..=255 {
            let v = f.decode(code);
            if v.is_finite() && v != 0.0 {
                assert_eq!(f.encode(v), code, "{f:?} {code:#x} = {v}");
            }
        }
    }
    // The weight path: amax / 448 as the scale, codes as values.
    let scheme = Scheme {
        dtype: QuantDtype::Float8e4m3fn,
        symmetric: true,
        narrow_range: false,
        reduce_range: false,
        bits: None,
    };
    let q = params::quantize_weights(&[448.0, 1.0, -0.5, 2.0], &[4], None, &scheme).unwrap();
    assert_eq!(q.params[0].scale, 1.0);
    assert_eq!(q.values, [0x7E, 0x38, 0xB0, 0x40]);
    assert_eq!(q.dequantized(), [448.0, 1.0, -0.5, 2.0]);
}

#[test]
fn int4_packs_low_nibble_first_and_blocks_have_their_own_scales() {
    assert_eq!(params::pack(&[-8, 7, -1], QuantDtype::Int4), [0x78, 0x0F]);
    assert_eq!(params::pack(&[1, 15, 20], QuantDtype::Uint4), [0xF1, 0x0F]);
    let s4 = Scheme {
        dtype: QuantDtype::Int4,
        symmetric: true,
        narrow_range: true,
        reduce_range: false,
        bits: None,
    };
    // [4, 2] in blocks of 2 along axis 0: block (k, j) is rows 2k, 2k+1 of column j.
    let w = [0.7, -7.0, -0.35, 1.0, 14.0, 0.1, 2.0, -0.2];
    let q = params::quantize_weights_blocked(&w, &[4, 2], Some(0), Some(2), &s4).unwrap();
    assert_eq!(q.param_dims(), [2, 2]);
    let scales: Vec<f32> = q.params.iter().map(|p| p.scale).collect();
    assert_eq!(scales, [0.7 / 7.0, 7.0 / 7.0, 14.0 / 7.0, 0.2 / 7.0]);
    assert_eq!(q.values, [7, -7, -4, 1, 7, 4, 1, -7]);
    let (data, scale, _) = q.to_protos("d", "s", "z");
    assert_eq!(data.data_type, Some(DataType::Int4 as i32));
    assert_eq!(nibbles(&data, true), q.values);
    assert_eq!(scale.dims, [2, 2]);
}

#[test]
fn int4_per_channel_weights_are_written_packed_at_opset_21() {
    let (_dir, m, report, _) = quantize("weights: {dtype: int4}\n");
    assert_eq!(opset(&m), 21);
    assert!(m.ir_version() <= 10, "IR {}", m.ir_version());
    let float = mlp();
    for w in ["w1", "w2"] {
        let q = initializer(&m, &format!("{w}::quantized"));
        assert_eq!(q.data_type, Some(DataType::Int4 as i32));
        assert!(q.int32_data.is_empty());
        let scales = onnxq::ir::tensor::values_f32(initializer(&m, &format!("{w}::scale"))).unwrap();
        let dq = dq_of(&m, w);
        assert_eq!(attr(dq, "axis"), Some(1), "MatMul weights per output column");
        let original = onnxq::ir::tensor::values_f32(initializer(&float, w)).unwrap();
        let cols = scales.len();
        for (i, (&v, &x)) in nibbles(q, true).iter().zip(&original).enumerate() {
            let s = scales[i % cols];
            assert!((-7..=7).contains(&v));
            assert!((v as f32 * s - x).abs() <= s / 2.0 * 1.0001, "{w}[{i}]: {x} → {v}·{s}");
        }
    }
    // The guard stepped aside, and said why.
    assert!(report["quantization"]["guard_off"].as_str().unwrap().contains("int4"));
    assert!(output_sqnr(&report) > 10.0, "{}", output_sqnr(&report));
}

#[test]
fn blocked_weights_carry_block_size_and_block_shaped_scales() {
    let (_dir, m, report, _) =
        quantize("weights: {dtype: uint4, symmetric: false, granularity: per_block, block_size: 4}\n");
    let dq = dq_of(&m, "w1");
    assert_eq!(attr(dq, "block_size"), Some(4));
    assert_eq!(attr(dq, "axis"), Some(0), "MatMul weights blocked along K");
    assert_eq!(initializer(&m, "w1::scale").dims, [2, 8]);
    let zp = initializer(&m, "w1::zero_point");
    assert_eq!(
        (zp.dims.clone(), zp.data_type),
        (vec![2, 8], Some(DataType::Uint4 as i32))
    );
    // Each block's scale is its own range over 15 steps.
    let float = mlp();
    let w = onnxq::ir::tensor::values_f32(initializer(&float, "w1")).unwrap();
    let scales = onnxq::ir::tensor::values_f32(initializer(&m, "w1::scale")).unwrap();
    let (lo, hi) = (0..4).fold((0f32, 0f32), |(l, h), r| (l.min(w[r * 8]), h.max(w[r * 8])));
    assert!(
        (scales[0] - (hi - lo) / 15.0).abs() <= 1e-7,
        "{} vs {}",
        scales[0],
        (hi - lo) / 15.0
    );
    assert_eq!(opset(&m), 21);
    assert!(output_sqnr(&report) > 15.0, "{}", output_sqnr(&report));
}

#[test]
fn fp8_weights_and_activations_are_written_in_raw_data_and_verified_exactly() {
    for (dtype, code) in [
        ("float8e4m3fn", DataType::Float8e4m3fn),
        ("float8e5m2", DataType::Float8e5m2),
    ] {
        let (_dir, m, report, _) = quantize(&format!(
            "weights: {{dtype: float8e4m3fn}}\nactivations: {{dtype: {dtype}}}\n"
        ));
        assert_eq!(opset(&m), 19);
        let q = initializer(&m, "w1::quantized");
        assert_eq!(q.data_type, Some(DataType::Float8e4m3fn as i32));
        assert!(q.int32_data.is_empty() && q.raw_data.as_ref().unwrap().len() == 64);
        // amax / 448.
        let w = onnxq::ir::tensor::values_f32(initializer(&mlp(), "w1")).unwrap();
        let scales = onnxq::ir::tensor::values_f32(initializer(&m, "w1::scale")).unwrap();
        let amax0 = (0..8).map(|r| w[r * 8].abs()).fold(0f32, f32::max);
        assert_eq!(scales[0], (amax0 as f64 / 448.0) as f32);
        let zp = initializer(&m, "x::zero_point");
        assert_eq!(zp.data_type, Some(code as i32));
        assert_eq!(zp.raw_data.as_deref(), Some(&[0u8][..]));
        let sqnr = output_sqnr(&report);
        assert!(sqnr > 15.0 && sqnr.is_finite(), "{dtype}: {sqnr}");
    }
}

#[test]
fn weight_only_writes_no_activation_qdq() {
    let (_dir, m, report, stderr) = quantize("weights: {dtype: int4}\nactivations: {dtype: float}\n");
    let g = m.graph.as_ref().unwrap();
    assert!(!g.node.iter().any(|n| n.op_type() == "QuantizeLinear"), "{stderr}");
    assert_eq!(g.node.iter().filter(|n| n.op_type() == "DequantizeLinear").count(), 2);
    assert!(output_sqnr(&report) > 12.0, "{}", output_sqnr(&report));
    assert!(stderr.contains("guard: off"), "{stderr}");
}

/// Column `c` of a row-major [rows, cols] MatMul weight (its output channel), in f64.
fn column(w: &[f32], cols: usize, c: usize) -> Vec<f64> {
    w.iter().skip(c).step_by(cols).map(|&v| v as f64).collect()
}

#[test]
fn narrower_integer_ranges_set_the_scales_and_bound_the_values() {
    // int8 storage: weights 5 bits symmetric (−15..15), activations 7 bits of uint8 (0..127).
    let (_dir, m, report, _) = quantize("weights: {bits: 5}\nactivations: {bits: 7}\n");
    let float = mlp();
    for w in ["w1", "w2"] {
        let q = initializer(&m, &format!("{w}::quantized"));
        assert_eq!(q.data_type, Some(DataType::Int8 as i32));
        let values: Vec<i8> = q.raw_data.as_ref().unwrap().iter().map(|&b| b as i8).collect();
        assert!(values.iter().all(|v| (-15..=15).contains(v)), "{w}: {values:?}");
        assert!(
            values.iter().any(|&v| v.abs() == 15),
            "{w}: the range is used to its end"
        );
        let scales = onnxq::ir::tensor::values_f32(initializer(&m, &format!("{w}::scale"))).unwrap();
        let original = onnxq::ir::tensor::values_f32(initializer(&float, w)).unwrap();
        // gptq may choose other grid points, never other scales: amax / 15 per column.
        for (c, &s) in scales.iter().enumerate() {
            let amax = column(&original, scales.len(), c)
                .iter()
                .fold(0f64, |a, v| a.max(v.abs()));
            assert_eq!(s, (amax / 15.0) as f32, "{w} column {c}");
        }
    }
    // The input's scale spreads the same calibrated range over 127 steps instead of 255.
    let x_scale = |m: &ModelProto| onnxq::ir::tensor::values_f32(initializer(m, "x::scale")).unwrap()[0];
    let (_dir8, m8, _, _) = quantize("guard: false\n");
    let ratio = x_scale(&m) as f64 / x_scale(&m8) as f64;
    assert!((ratio - 255.0 / 127.0).abs() < 1e-5, "{ratio}");
    let zp = initializer(&m, "x::zero_point").raw_data.as_ref().unwrap()[0];
    assert!(zp <= 127, "zero point {zp} inside 0..127");
    let sqnr = output_sqnr(&report);
    assert!(sqnr > 15.0 && sqnr.is_finite(), "{sqnr}");
}

#[test]
fn ternary_and_binary_weights_are_int4_sign_codes_times_their_channel_magnitude() {
    let float = mlp();
    for dtype in ["ternary", "binary"] {
        // No passes: the written weights are the rule applied to the model's own weights.
        let (_dir, m, report, stderr) = quantize(&format!("weights: {{dtype: {dtype}}}\npasses: []\n"));
        assert_eq!(opset(&m), 21, "{stderr}");
        for w in ["w1", "w2"] {
            let q = initializer(&m, &format!("{w}::quantized"));
            assert_eq!(q.data_type, Some(DataType::Int4 as i32));
            let zp = initializer(&m, &format!("{w}::zero_point"));
            assert_eq!(zp.data_type, Some(DataType::Int4 as i32));
            assert!(nibbles(zp, true).iter().all(|&z| z == 0));
            assert_eq!(attr(dq_of(&m, w), "axis"), Some(1), "per output column");
            let codes = nibbles(q, true);
            let scales = onnxq::ir::tensor::values_f32(initializer(&m, &format!("{w}::scale"))).unwrap();
            let original = onnxq::ir::tensor::values_f32(initializer(&float, w)).unwrap();
            let cols = scales.len();
            for (c, &scale) in scales.iter().enumerate() {
                let col = column(&original, cols, c);
                let mean_abs = col.iter().map(|v| v.abs()).sum::<f64>() / col.len() as f64;
                let delta = 0.7 * mean_abs;
                let (alpha, expected): (f64, Vec<i32>) = if dtype == "binary" {
                    (mean_abs, col.iter().map(|&v| if v < 0.0 { -1 } else { 1 }).collect())
                } else {
                    let above: Vec<f64> = col.iter().filter(|v| v.abs() > delta).map(|v| v.abs()).collect();
                    let codes = col.iter().map(|&v| (v > delta) as i32 - (v < -delta) as i32).collect();
                    (above.iter().sum::<f64>() / above.len() as f64, codes)
                };
                let written: Vec<i32> = codes.iter().skip(c).step_by(cols).copied().collect();
                assert_eq!(written, expected, "{dtype} {w} column {c}");
                assert!(
                    (scale as f64 - alpha).abs() <= alpha * 1e-6,
                    "{dtype} {w}[{c}]: {scale} vs {alpha}"
                );
                // The dequantized weight is ±α (or 0).
                for (&q, &x) in written.iter().zip(&col) {
                    let dq = q as f32 * scale;
                    let want = if q == 0 { 0.0 } else { (x.signum() * alpha) as f32 };
                    assert!(
                        (dq - want).abs() <= want.abs() * 1e-6,
                        "{dtype} {w}: {x} → {dq}, want {want}"
                    );
                }
            }
            let allowed: &[i32] = if dtype == "binary" { &[-1, 1] } else { &[-1, 0, 1] };
            assert!(codes.iter().all(|v| allowed.contains(v)), "{dtype} {w}: {codes:?}");
            if dtype == "ternary" {
                assert!(
                    codes.contains(&0) && codes.contains(&1) && codes.contains(&-1),
                    "{codes:?}"
                );
            }
        }
        // Activations stay int8 (the default uint8 Q/DQ on the input).
        let x_zp = initializer(&m, "x::zero_point");
        assert_eq!(x_zp.data_type, Some(DataType::Uint8 as i32));
        assert!(report["quantization"]["guard_off"].as_str().unwrap().contains(dtype));
        let sqnr = output_sqnr(&report);
        assert!(sqnr.is_finite() && sqnr > 0.0, "{dtype}: {sqnr}");
    }
}

/// The table and per-element indices of a codebook weight as written (uint4 or uint8 indices,
/// int32 per-channel offsets), decoded the way the Gather computes it.
fn decoded_codebook(m: &ModelProto, w: &str) -> (Vec<f32>, Vec<usize>, Vec<f32>) {
    let table = onnxq::ir::tensor::values_f32(initializer(m, &format!("{w}::codebook"))).unwrap();
    let indices = initializer(m, &format!("{w}::indices"));
    let idx: Vec<usize> = if indices.data_type == Some(DataType::Uint4 as i32) {
        nibbles(indices, false).iter().map(|&v| v as usize).collect()
    } else {
        assert_eq!(indices.data_type, Some(DataType::Uint8 as i32));
        indices.raw_data.as_ref().unwrap().iter().map(|&v| v as usize).collect()
    };
    let g = m.graph.as_ref().unwrap();
    let gather = g
        .node
        .iter()
        .find(|n| n.op_type() == "Gather" && n.input[0] == format!("{w}::codebook"))
        .unwrap_or_else(|| panic!("no Gather of {w}'s codebook"));
    assert_eq!(gather.output[0], format!("{w}::decoded"));
    let offsets: Vec<usize> = match g.initializer.iter().find(|t| t.name() == format!("{w}::offsets")) {
        Some(o) => o
            .raw_data
            .as_ref()
            .unwrap()
            .chunks(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as usize)
            .collect(),
        None => vec![0],
    };
    // MatMul weights [K, N]: the channel (and so the offset) is the column.
    let cols = offsets.len();
    let entries: Vec<usize> = idx
        .iter()
        .enumerate()
        .map(|(i, &k)| k + offsets[if cols > 1 { i % cols } else { 0 }])
        .collect();
    let values = entries.iter().map(|&e| table[e]).collect();
    (table, entries, values)
}

#[test]
fn codebook_weights_are_kmeans_tables_read_through_a_gather() {
    let float = mlp();
    // w1 is [8, 8], w2 [8, 4]: at 5 bits w1 is a uint8 codebook and w2 stays float.
    for (bits, per_channel) in [(3u32, false), (2, true), (5, false)] {
        let (_dir, m, report, stderr) = quantize(&format!(
            "weights: {{codebook: {{bits: {bits}, per_channel: {per_channel}}}}}\npasses: []\n"
        ));
        assert_eq!(opset(&m), if bits <= 4 { 21 } else { 13 }, "{stderr}");
        let k = 1usize << bits;
        for w in ["w1", "w2"] {
            let original = onnxq::ir::tensor::values_f32(initializer(&float, w)).unwrap();
            let cols = if per_channel { original.len() / 8 } else { 1 };
            // Tables of 4-byte entries, 4- or 8-bit indices, int32 offsets per channel.
            let index_bytes = if bits <= 4 { original.len() / 2 } else { original.len() };
            let stored = cols * k * 4 + index_bytes + if per_channel { 4 * cols } else { 0 };
            if stored >= 4 * original.len() {
                initializer(&m, w);
                let why = report["quantization"]["plan"]["kept_float"][w].as_str().unwrap();
                assert!(why.contains("no smaller than the float weight"), "{w}: {why}");
                continue;
            }
            let (table, entries, decoded) = decoded_codebook(&m, w);
            assert_eq!(table.len(), k * cols, "{w}");
            assert!(
                !m.graph.as_ref().unwrap().initializer.iter().any(|t| t.name() == w),
                "the float weight goes"
            );
            // k-means: every weight reads the entry of its own table nearest to it, and every
            // used entry is the mean of the weights reading it (Lloyd's fixed point).
            for (i, (&x, &e)) in original.iter().zip(&entries).enumerate() {
                let c = if per_channel { i % cols } else { 0 };
                let own = &table[c * k..(c + 1) * k];
                let best = own.iter().map(|&t| (t - x).abs()).fold(f32::INFINITY, f32::min);
                assert!((decoded[i] - x).abs() <= best + 1e-6, "{w}[{i}]: {x} → {}", decoded[i]);
                assert!(e / k == c, "{w}[{i}] reads another channel's table");
            }
            for (e, &entry) in table.iter().enumerate() {
                let members: Vec<f64> = original
                    .iter()
                    .zip(&entries)
                    .filter(|(_, &f)| f == e)
                    .map(|(&x, _)| x as f64)
                    .collect();
                if !members.is_empty() {
                    let mean = members.iter().sum::<f64>() / members.len() as f64;
                    assert!(
                        (entry as f64 - mean).abs() <= 1e-5 * (1.0 + mean.abs()),
                        "{w} entry {e}: {entry} vs {mean}"
                    );
                }
            }
        }
        let notes = report["passes"].to_string();
        assert!(notes.contains("weight SQNR") && notes.contains("on disk"), "{notes}");
        assert!(report["quantization"]["guard_off"]
            .as_str()
            .unwrap()
            .contains("weights.codebook"));
        let sqnr = output_sqnr(&report);
        assert!(sqnr.is_finite() && sqnr > 5.0, "{bits} bits: {sqnr} dB");
    }
}

#[test]
fn an_override_pins_one_layer_to_a_codebook_and_another_back_to_the_grid() {
    // The grid for all but mm2, a codebook for mm2 only.
    let (_dir, m, _report, stderr) = quantize("overrides: [{node: mm2, codebook: {bits: 3}}]\npasses: []\n");
    assert_eq!(opset(&m), 21, "{stderr}");
    dq_of(&m, "w1");
    let (table, _, _) = decoded_codebook(&m, "w2");
    assert_eq!(table.len(), 8);
    // A codebook for all but mm1, which an override's dtype puts back on an int8 grid.
    let (_dir, m, _report, stderr) =
        quantize("weights: {codebook: {bits: 3}}\noverrides: [{node: mm1, dtype: int8}]\npasses: []\n");
    assert_eq!(opset(&m), 21, "{stderr}");
    assert_eq!(initializer(&m, "w1::quantized").data_type, Some(DataType::Int8 as i32));
    decoded_codebook(&m, "w2");
}

fn config_error(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cfg: PathBuf = dir.path().join("q.yaml");
    std::fs::write(&cfg, config).unwrap();
    let out = onnxq(&["no-such-model.onnx", "--config", s(&cfg)]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn formats_that_cannot_be_written_are_config_errors() {
    let data = "calibration: {data: d.npz}\n";
    for (config, needle) in [
        ("target: tensorrt\nactivations: {dtype: int4}\n", "no int4 activations"),
        ("target: tensorrt\nweights: {dtype: int4}\n", "weight-only"),
        ("target: tensorrt\nactivations: {dtype: float8e5m2}\n", "float8e4m3fn"),
        (
            "target: tensorrt\nweights: {dtype: uint4}\nactivations: {dtype: float}\n",
            "signed",
        ),
        ("weights: {dtype: int3}\n", "did you mean `int4`?"),
        ("activations: {dtype: flaot}\n", "did you mean `float`?"),
        ("activations: {block_size: 32}\n", "constant weights only"),
        ("weights: {granularity: per_block}\n", "needs `weights.block_size`"),
        ("weights: {block_size: 32}\n", "with `weights.granularity: per_block`"),
        ("weights: {granularity: per_block, block_size: 0}\n", "must be positive"),
        (
            "weights: {dtype: int16, granularity: per_block, block_size: 32}\n",
            "int8, int4 and uint4",
        ),
        ("weights: {dtype: float8e4m3fn, symmetric: false}\n", "no zero point"),
        ("activations: {dtype: float8e5m2, reduce_range: true}\n", "has none"),
        (
            "weights: {dtype: int4}\nmixed_precision: {target_sqnr_db: 30}\n",
            "integer-grid fake quantizer",
        ),
        ("weights: {bits: 1}\n", "in 2..16"),
        ("activations: {bits: 17}\n", "in 2..16"),
        ("weights: {dtype: int4, bits: 5}\n", "do not fit int4"),
        ("weights: {bits: 9}\n", "do not fit int8"),
        ("weights: {dtype: float8e4m3fn, bits: 4}\n", "float8e4m3fn has none"),
        ("weights: {dtype: ternary, bits: 2}\n", "ternary has none"),
        ("activations: {dtype: float, bits: 7}\n", "nothing to act on"),
        ("weights: {bits: 7, reduce_range: true}\n", "keep one"),
        ("activations: {dtype: ternary}\n", "weight format"),
        ("weights: {dtype: binary, symmetric: false}\n", "zero point is 0"),
        ("weights: {dtype: ternary, reduce_range: true}\n", "no integer range"),
        (
            "weights: {dtype: ternary, granularity: per_block, block_size: 32}\n",
            "int8, int4 and uint4",
        ),
        ("target: tensorrt\nweights: {dtype: ternary}\n", "no ternary weights"),
        (
            "overrides: [{tensor: w.*, dtype: binary}]\n",
            "match the layer with `node:` or `op_type:`",
        ),
        (
            "weights: {bits: 7}\nmixed_precision: {target_sqnr_db: 30}\n",
            "weights.bits: 7",
        ),
        (
            "weights: {dtype: binary}\nmixed_precision: {target_sqnr_db: 30}\n",
            "weights.dtype: binary",
        ),
        ("weights: {codebook: {bits: 9}}\n", "in 2..8"),
        (
            "weights: {codebook: {bits: 4, per_chanel: true}}\n",
            "did you mean `per_channel`?",
        ),
        ("weights: {dtype: int4, codebook: {bits: 4}}\n", "keep one"),
        (
            "weights: {granularity: per_channel, codebook: {bits: 4}}\n",
            "per_channel: true",
        ),
        (
            "target: tensorrt\nweights: {codebook: {bits: 4}}\n",
            "no codebook weights",
        ),
        ("overrides: [{node: a, codebook: {bits: 1}}]\n", "in 2..8"),
        ("overrides: [{node: a, dtype: int4, codebook: {bits: 4}}]\n", "keep one"),
        (
            "overrides: [{tensor: w.*, codebook: {bits: 4}}]\n",
            "match the layer with `node:`",
        ),
        (
            "target: tensorrt\noverrides: [{node: a, codebook: {bits: 4}}]\n",
            "no codebook weights",
        ),
        (
            "weights: {codebook: {bits: 4}}\nmixed_precision: {target_sqnr_db: 30}\n",
            "weights.codebook",
        ),
    ] {
        let err = config_error(&format!("{data}{config}"));
        assert!(err.contains(needle), "{config}: expected {needle:?} in {err}");
    }
}

#[test]
fn sensitivity_refuses_formats_its_fake_quantizer_does_not_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("q.yaml");
    std::fs::write(&cfg, "calibration: {data: d.npz}\nweights: {dtype: ternary}\n").unwrap();
    let out = onnxq(&["sensitivity", "no-such-model.onnx", "--config", s(&cfg)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not model weights.dtype: ternary"), "{stderr}");
}

#[test]
fn fp8_activation_lowering_is_the_fp8_rounding_bit_for_bit() {
    // x[1, 4096] → QuantizeLinear(fp8) → DequantizeLinear → y, lowered for tract, against the
    // Rust FP8 rounding on values spanning subnormals to beyond the saturation bound.
    let n = 4096;
    for (code, f) in [(DataType::Float8e4m3fn, Fp8::E4m3fn), (DataType::Float8e5m2, Fp8::E5m2)] {
        let scale = 0.37f32;
        let zp = TensorProto {
            name: Some("zp".into()),
            data_type: Some(code as i32),
            raw_data: Some(vec![0u8].into()),
            ..Default::default()
        };
        let m = model(
            graph(
                vec![
                    node("QuantizeLinear", "q", &["x", "s", "zp"], &["xq"]),
                    node("DequantizeLinear", "dq", &["xq", "s", "zp"], &["y"]),
                ],
                vec![tensor_f32("s", &[], &[scale]), zp],
                vec![f32_info("x", &[1, n as i64])],
                vec![f32_info("y", &[1, n as i64])],
            ),
            19,
        );
        let (_dir, path) = write_temp(&m, "q.onnx");
        let loaded = onnxq::onnx::load_model(&path).unwrap();
        let lowered = onnxq::verify::lower::lower_for_tract(&loaded).unwrap();
        // `outputs` feeds seeded values in [-1, 1); spread them over 2^-20 .. 2^20 · scale.
        let base = seeded(n, 42);
        let x: Vec<f32> = base
            .iter()
            .enumerate()
            .map(|(i, &v)| v * 2f32.powi((i % 41) as i32 - 20) * f.max() / 448.0)
            .collect();
        use tract_onnx::prelude::{IntoTValue, Tensor};
        let runner = onnxq::runtime::Runner::new(
            &lowered,
            &[("x".into(), tract_onnx::prelude::DatumType::F32, vec![1, n])],
            &[],
        )
        .unwrap();
        let got = onnxq::runtime::to_f32_vec(
            &runner
                .run(vec![Tensor::from_shape::<f32>(&[1, n], &x).unwrap().into_tvalue()])
                .unwrap()[0],
        )
        .unwrap();
        for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
            let want = f.decode(f.encode(v / scale)) * scale;
            assert_eq!(
                g.to_bits() & 0x7FFF_FFFF,
                want.to_bits() & 0x7FFF_FFFF,
                "{f:?} x[{i}] = {v}: {g} vs {want}"
            );
        }
    }
}
