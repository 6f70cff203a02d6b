"""Output SQNR of a quantized model against its float original, measured in ONNX Runtime on
held-out data, plus the validity checks onnxq promises: onnx.checker (full_check) and loading in
OpenVINO. One line per quantized model.

    python bench/sqnr.py FLOAT.onnx QUANT.onnx EVAL.npz [--openvino]
SQNR = 10·log10(Σ f² / Σ (f − q)²) over all samples and elements of each output; top-1
agreement for outputs shaped like class scores ([1, C] per sample: argmax per sample; [N, C]:
argmax per row).
"""
import argparse
import sys

import numpy as np
import onnx
import onnxruntime as ort


def run(path, data):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    n = len(data[names[0]])
    outs = [sess.run(None, {k: data[k][i] for k in names}) for i in range(n)]
    return [o.name for o in sess.get_outputs()], [np.stack([s[j] for s in outs]) for j in range(len(outs[0]))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("float_model")
    ap.add_argument("quant_model")
    ap.add_argument("data")
    ap.add_argument("--openvino", action="store_true")
    ap.add_argument("--tensorrt-rules", action="store_true", help="also check TensorRT's placement rules")
    ap.add_argument("--min-sqnr", type=float, help="exit 1 when a float output's SQNR is below this (dB)")
    args = ap.parse_args()
    quant = onnx.load(args.quant_model)
    onnx.checker.check_model(quant, full_check=True)
    trt = ""
    if args.tensorrt_rules:
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in quant.graph.initializer}
        producer = {o: n.op_type for n in quant.graph.node for o in n.output}
        qdq = [n for n in quant.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        nonzero = [n.name for n in qdq if len(n.input) > 2 and np.any(inits.get(n.input[2], 0) != 0)]
        weighted = ("Conv", "ConvTranspose", "Gemm", "MatMul")
        on_outputs = [n.name for n in qdq if n.op_type == "QuantizeLinear" and producer.get(n.input[0]) in weighted]
        assert not nonzero, f"non-zero zero points: {nonzero[:5]}"
        assert not on_outputs, f"Q/DQ on outputs of weighted ops: {on_outputs[:5]}"
        trt = f"; TensorRT rules hold ({len(qdq)} Q/DQ nodes, all zero points 0, none on weighted outputs)"
    data = dict(np.load(args.data))
    names, ref = run(args.float_model, data)
    _, got = run(args.quant_model, data)
    parts = []
    worst = float("inf")
    for name, f, q in zip(names, ref, got):
        if not np.issubdtype(f.dtype, np.floating):
            parts.append(f"{name}: equal {np.mean(f == q):.3f}")
            continue
        f64, q64 = f.astype(np.float64), q.astype(np.float64)
        noise = np.sum((f64 - q64) ** 2)
        sqnr = float("inf") if noise == 0 else 10 * np.log10(np.sum(f64**2) / noise)
        worst = min(worst, sqnr)
        text = f"{name}: SQNR {sqnr:.2f} dB"
        per_sample = f.shape[1:]
        squeezed = [d for d in per_sample if d != 1]
        if f.ndim >= 2 and per_sample[-1] >= 2 and (len(squeezed) == 1 or len(per_sample) == 2):
            agree = np.mean(np.argmax(f, axis=-1) == np.argmax(q, axis=-1))
            text += f", top-1 agreement {agree:.3f}"
        parts.append(text)
    line = f"{args.quant_model}: checker ok; " + "; ".join(parts) + trt
    if args.openvino:
        import openvino as ov

        ov.Core().compile_model(args.quant_model, "CPU")
        line += "; OpenVINO compiles it"
    print(line)
    if args.min_sqnr is not None and worst < args.min_sqnr:
        print(f"FAILED: output SQNR {worst:.2f} dB is below {args.min_sqnr} dB")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
