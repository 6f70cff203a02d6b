"""Output SQNR of a quantized model against its float original, measured in ONNX Runtime on
held-out data, plus the validity checks onnxq promises: onnx.checker (full_check) and loading in
OpenVINO. One line per quantized model.

    python bench/sqnr.py FLOAT.onnx QUANT.onnx [QUANT2.onnx ...] EVAL.npz [--openvino] [--json OUT.json]
SQNR = 10·log10(Σ f² / Σ (f − q)²) over all samples and elements of each output; top-1
agreement for outputs shaped like class scores ([1, C] per sample: argmax per sample; [N, C]:
argmax per row).

With --bootstrap, each float output's SQNR also gets its 90% interval over 2000 resamplings of
the eval samples (with replacement, fixed seed), and every model after the first the paired
interval of its difference from the first: on a few hundred samples a whole dB can be chance.

With --logits, a model whose outputs come out of a Softmax is also measured on the Softmax's
input (the logits): an output SQNR on probabilities is dominated by the few samples near a
decision boundary, where the Softmax is steepest.

With --mirror, every image input (4-D or more per sample: [N, 1, C, H, W]) is measured a second
time mirrored left to right (its last axis reversed): twice the held-out images, for top-1
agreement on small eval sets where a handful of near-ties decide it. Inputs that are not images
are refused.

Several quantized models of one float model share one float run. With --json, a model that fails
a check (checker, ONNX Runtime, OpenVINO) is recorded with the error instead of stopping the run,
and OUT.json gets per model and per output: SQNR, top-1 agreement, and for outputs with one vector
per sample (embeddings) the nearest-neighbour agreement (the eval sample whose vector is most
cosine-similar is the same in the float and the quantized outputs); bench/run.py reads it.

Task metrics (bench/task_metrics.py: decoded text, detected boxes, structure tokens, decisions,
each against the float model's) are measured for the models named in task_metrics.TASKS, chosen by
the float model's file stem or --task NAME (--task none: skip): the line gets "; task: ..." after
the outputs' figures, and the JSON record a "task" object ({metric: value}, primary metric first;
"task_error" when it could not be measured).
"""
import argparse
import json
import os
import re
import sys
import traceback

import numpy as np
import onnx
import onnxruntime as ort

import task_metrics


def with_logits(path, logits):
    """The model's bytes, with the input of its last Softmax added as a first output, when
    `logits` (--logits) is set and the model has a Softmax; else the path."""
    if not logits:
        return path
    model = onnx.load(path)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    if not softmax:
        return path
    logits = softmax[-1].input[0]
    model.graph.output.insert(0, onnx.helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


SESSION_CONFIG = []  # --session-config KEY=VALUE entries, applied to every session
GRAPH_OPTIMIZATION = None  # --graph-optimization: None (ORT's default, all) or a level name


def run(path, data, logits=False):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in SESSION_CONFIG:
        opts.add_session_config_entry(key, value)
    if GRAPH_OPTIMIZATION is not None:
        opts.graph_optimization_level = GRAPH_OPTIMIZATION
    sess = ort.InferenceSession(with_logits(path, logits), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    n = len(data[names[0]])
    outs = [sess.run(None, {k: np.asarray(data[k][i]) for k in names}) for i in range(n)]
    return [o.name for o in sess.get_outputs()], [np.stack([s[j] for s in outs]) for j in range(len(outs[0]))]


def neighbour_agreement(f, q):
    """Fraction of samples whose nearest other sample (cosine) is the same in f and q."""

    def nearest(x):
        x = x.reshape(len(x), -1).astype(np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argmax(sim, axis=1)

    return float(np.mean(nearest(f) == nearest(q)))


def compare(names, ref, got):
    """Per output metrics and the text of sqnr.py's line."""
    outputs, parts = [], []
    for name, f, q in zip(names, ref, got):
        if not np.issubdtype(f.dtype, np.floating):
            equal = float(np.mean(f == q))
            outputs.append({"name": name, "float": False, "equal": equal})
            parts.append(f"{name}: equal {equal:.3f}")
            continue
        f64, q64 = f.astype(np.float64), q.astype(np.float64)
        noise = np.sum((f64 - q64) ** 2)
        sqnr = float("inf") if noise == 0 else float(10 * np.log10(np.sum(f64**2) / noise))
        entry = {"name": name, "float": True, "sqnr_db": sqnr}
        text = f"{name}: SQNR {sqnr:.2f} dB"
        per_sample = f.shape[1:]
        squeezed = [d for d in per_sample if d != 1]
        if f.ndim >= 2 and per_sample[-1] >= 2 and (len(squeezed) == 1 or len(per_sample) == 2):
            agree = float(np.mean(np.argmax(f, axis=-1) == np.argmax(q, axis=-1)))
            entry["top1"] = agree
            text += f", top-1 agreement {agree:.3f}"
        if len(squeezed) == 1 and len(f) >= 2:
            entry["neighbours"] = neighbour_agreement(f, q)
        outputs.append(entry)
        parts.append(text)
    return outputs, parts


BOOTSTRAP_RESAMPLES = 2000


def per_sample_energies(ref, got):
    """{output name: (signal, noise) per sample} for the float outputs."""
    energies = {}
    for i, (f, q) in enumerate(zip(ref, got)):
        if np.issubdtype(f.dtype, np.floating):
            f64, q64 = f.astype(np.float64).reshape(len(f), -1), q.astype(np.float64).reshape(len(q), -1)
            energies[i] = (np.sum(f64**2, axis=1), np.sum((f64 - q64) ** 2, axis=1))
    return energies


def bootstrap_text(names, energies, first, resamples):
    """'NAME 90% [a, b]' per float output, and the paired difference from the first model's."""
    parts = []
    for i, (signal, noise) in energies.items():
        db = 10 * np.log10(signal[resamples].sum(axis=1) / np.maximum(noise[resamples].sum(axis=1), 1e-300))
        text = f"{names[i]} 90% [{np.percentile(db, 5):.2f}, {np.percentile(db, 95):.2f}]"
        if first is not None:
            s0, n0 = first[i]
            db0 = 10 * np.log10(s0[resamples].sum(axis=1) / np.maximum(n0[resamples].sum(axis=1), 1e-300))
            diff = db - db0
            text += f", minus the first model's: 90% [{np.percentile(diff, 5):+.2f}, {np.percentile(diff, 95):+.2f}]"
        parts.append(text)
    return "; ".join(parts)


def tensorrt_rules(quant):
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in quant.graph.initializer}
    producer = {o: n.op_type for n in quant.graph.node for o in n.output}
    qdq = [n for n in quant.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    nonzero = [n.name for n in qdq if len(n.input) > 2 and np.any(inits.get(n.input[2], 0) != 0)]
    weighted = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    on_outputs = [n.name for n in qdq if n.op_type == "QuantizeLinear" and producer.get(n.input[0]) in weighted]
    assert not nonzero, f"non-zero zero points: {nonzero[:5]}"
    assert not on_outputs, f"Q/DQ on outputs of weighted ops: {on_outputs[:5]}"
    return f"; TensorRT rules hold ({len(qdq)} Q/DQ nodes, all zero points 0, none on weighted outputs)"


def summary(e):
    """One line for an exception; OpenVINO's multi-line messages reduced to the transformation,
    the op type and the reason (no source locations; node names carry counters that differ from
    run to run)."""
    text = str(e)
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("Exception from")]
    if lines and len(lines) < len(text.splitlines()):  # OpenVINO's format
        op = re.search(r"node:? '?(opset\d+::\w+)", text)
        transformation = re.match(r"^\[(\w+)\]", lines[0])
        reason = re.sub(r" failed at \S+:\d+:", " failed:", lines[-1])
        text = "".join(
            [f"[{transformation.group(1)}] " if transformation else "", f"{op.group(1)}: " if op else "", reason]
        )
    return " ".join(f"{type(e).__name__}: {text}".split())[:240]


def check(path, args, data, reference):
    """Checks and measures one quantized model: (line, worst float-output SQNR, JSON record).
    With --json a failure is recorded (`error`: checker or ONNX Runtime, no SQNR; `openvino_error`:
    the SQNR stands) instead of raised."""
    record = {"model": path}
    stage = "onnx.checker"
    try:
        quant = onnx.load(path)
        onnx.checker.check_model(quant, full_check=True)
        trt = tensorrt_rules(quant) if args.tensorrt_rules else ""
        stage = "ONNX Runtime"
        names, ref = reference()
        _, got = run(path, data, args.logits)
    except Exception as e:  # noqa: BLE001 - recorded with --json, re-raised otherwise
        if not args.json:
            raise
        record["error"] = f"{stage}: {summary(e)}"
        traceback.print_exc()
        return f"{path}: FAILED {record['error']}", None, record
    outputs, parts = compare(names, ref, got)
    record["outputs"] = outputs
    if args.task:
        try:
            record["task"] = task_metrics.evaluate(args.task, names, ref, got)
            parts.append("task: " + task_metrics.text(record["task"]))
        except Exception as e:  # noqa: BLE001 - recorded with --json, re-raised otherwise
            if not args.json:
                raise
            record["task_error"] = summary(e)
            parts.append(f"task: FAILED {record['task_error']}")
    line = f"{path}: checker ok; " + "; ".join(parts) + trt
    if args.bootstrap:
        energies = per_sample_energies(ref, got)
        n = len(next(iter(energies.values()))[0]) if energies else 0
        resamples = np.random.default_rng(0).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
        line += "; bootstrap " + bootstrap_text(names, energies, args.first_energies, resamples)
        if args.first_energies is None:
            args.first_energies = energies
    if args.openvino:
        import openvino as ov

        try:
            ov.Core().compile_model(path, "CPU")
            line += "; OpenVINO compiles it"
            record["openvino"] = True
        except Exception as e:  # noqa: BLE001
            if not args.json:
                raise
            record["openvino_error"] = f"OpenVINO: {summary(e)}"
            line += f"; FAILED {record['openvino_error']}"
    floats = [o["sqnr_db"] for o in outputs if o["float"]]
    worst = min(floats) if floats else float("inf")
    return line, worst, record


def main():
    global GRAPH_OPTIMIZATION
    ap = argparse.ArgumentParser()
    ap.add_argument("float_model")
    ap.add_argument("quant_models", nargs="+", metavar="quant_model")
    ap.add_argument("data")
    ap.add_argument("--openvino", action="store_true")
    ap.add_argument("--session-config", action="append", default=[], metavar="KEY=VALUE",
                    help="an ONNX Runtime session config entry for every session, e.g. "
                    "session.disable_quant_qdq=1 or session.qdq_matmulnbits_accuracy_level=1")
    ap.add_argument("--graph-optimization", choices=["disable", "basic", "extended"],
                    help="ONNX Runtime's graph optimization level (default: ORT's, all); basic for FP8 QDQ "
                    "models, which ORT 1.31's extended fusions compute wrongly")
    ap.add_argument("--tensorrt-rules", action="store_true", help="also check TensorRT's placement rules")
    ap.add_argument("--min-sqnr", type=float, help="exit 1 when a float output's SQNR is below this (dB)")
    ap.add_argument("--bootstrap", action="store_true", help="90%% intervals, and paired differences from the first model")
    ap.add_argument("--logits", action="store_true", help="also measure the input of the last Softmax")
    ap.add_argument("--json", help="write per-model results here; a failing model is recorded, not fatal")
    ap.add_argument("--mirror", action="store_true", help="also the eval images mirrored left to right")
    ap.add_argument("--task", help="task metrics of this model of task_metrics.TASKS (default: the float "
                    "model's file stem, when listed); none: skip")
    args = ap.parse_args()
    SESSION_CONFIG.extend(tuple(e.split("=", 1)) for e in args.session_config)
    if args.graph_optimization:
        GRAPH_OPTIMIZATION = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[args.graph_optimization]
    args.first_energies = None
    if args.task is None:
        stem = os.path.splitext(os.path.basename(args.float_model))[0]
        args.task = stem if stem in task_metrics.TASKS else None
    elif args.task == "none":
        args.task = None
    elif args.task not in task_metrics.TASKS:
        sys.exit(f"--task {args.task}: not in task_metrics.TASKS ({', '.join(task_metrics.TASKS)})")
    data = dict(np.load(args.data))
    if args.mirror:
        inputs = {k: v for k, v in data.items() if not k.startswith("_")}
        flat = [k for k, v in inputs.items() if v.ndim < 5]
        if flat:
            sys.exit(f"--mirror: inputs {flat} are not images ([N, 1, C, H, W])")
        data = {k: np.concatenate([v, v[..., ::-1]]) for k, v in inputs.items()}
    cache = {}

    def reference():
        if "ref" not in cache:
            cache["ref"] = run(args.float_model, data, args.logits)
        return cache["ref"]

    status, records = 0, []
    for path in args.quant_models:
        line, worst, record = check(path, args, data, reference)
        records.append(record)
        print(line, flush=True)
        if args.min_sqnr is not None and (worst is None or worst < args.min_sqnr):
            if worst is not None:
                print(f"FAILED: output SQNR {worst:.2f} dB is below {args.min_sqnr} dB")
            status = 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
