"""The large cases of issue 18, side by side with ONNX Runtime's quantize_static in one run.

For each case onnxq's main job runs twice, calibration only (`calibration.data` set, the default
passes and the accuracy guard: what the job does without `verify:`) and the whole job with
`verify:` (held-out data), and ONNX Runtime's MinMax `quantize_static` once (bench/ort_quantize.py
--method MinMax --per-channel --pre-process auto: QDQ, int8, per-channel weights like onnxq's
default), the three alternating (rotated by one each repetition), each its own process under
`/usr/bin/time` (bench/run.py's `measure`: peak RSS, user + system CPU, wall). Reports the
medians, onnxq/ORT ratios, and the output SQNR of each model in ONNX Runtime on the eval data
(bench/sqnr.py, worst float output). The cases:

    det416    ppocr_v3_det on its shared data (416x416, 32 calibration samples)
    det960    ppocr_v3_det at 960x960 (bench/det_960_data.py: the shared sets resized, 32 samples)
    ddddocr   ddddocr_det on its shared data (416x416, 24 samples)
    slanet    slanet_en on its shared data (488x488, 32 samples; tract runs the part before its Loop)
    wide2048  the synthetic 11 x MatMul 2048x2048 model (bench/large_model.py, 0.18 GB of weights)
    wide8192  the same at 8192x8192 (2.95 GB of weights, external data), onnxq only: not in
              --cases by default (minutes a run, 6 GB); ORT would need ~18 GB

Data the cases need is generated into --data when missing. Prints markdown (progress on
stderr), writes it and the raw runs (results.json) to --out; --update FILE replaces the part of
FILE between `<!-- bench/large_cases.py: begin -->` and `<!-- bench/large_cases.py: end -->`.

    target/bench-venv/bin/python bench/large_cases.py --onnxq target/release/onnxq [--reps 1]
        [--cases det416,det960,ddddocr,slanet,wide2048] [--update BENCHMARKS.md]
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (bench/run.py: measure, median, fmt, ratio, log, loadavg, environment)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BEGIN, END = "<!-- bench/large_cases.py: begin -->", "<!-- bench/large_cases.py: end -->"
DEFAULT_CASES = "det416,det960,ddddocr,slanet,wide2048"
MODES = ["onnxq calibration", "onnxq with verify", "ORT MinMax"]


def cases(args):
    """name -> (description, model, calibration data, eval data, run ORT too, data maker)."""
    shared = lambda m: (  # noqa: E731
        os.path.join(args.shared, "models", m + ".onnx"),
        os.path.join(args.shared, "data", m, "calib.npz"),
        os.path.join(args.shared, "data", m, "eval.npz"),
    )
    det960 = os.path.join(args.data, "det960")
    wide = lambda size: os.path.join(args.data, f"large-{size}")  # noqa: E731
    py = sys.executable

    def synthetic(size, weights, with_ort):
        folder = wide(size)
        files = [os.path.join(folder, f) for f in ("large.onnx", "calib.npz", "eval.npz")]
        maker = [py, os.path.join(HERE, "large_model.py"), "generate", "--size", str(size), "--out", folder]
        return (f"synthetic 11 × MatMul {size}², {weights}, 32 samples", *files, with_ort, maker)

    return {
        "det416": ("ppocr_v3_det, 416×416, 32 samples", *shared("ppocr_v3_det"), True, None),
        "det960": (
            "ppocr_v3_det, 960×960, 32 samples",
            os.path.join(args.shared, "models", "ppocr_v3_det.onnx"),
            os.path.join(det960, "calib_32.npz"),
            os.path.join(det960, "eval_32.npz"),
            True,
            [py, os.path.join(HERE, "det_960_data.py"), "--shared", args.shared, "--out", det960],
        ),
        "ddddocr": ("ddddocr_det, 416×416, 24 samples", *shared("ddddocr_det"), True, None),
        "slanet": ("slanet_en, 488×488, 32 samples", *shared("slanet_en"), True, None),
        "wide2048": synthetic(2048, "0.18 GB", True),
        "wide8192": synthetic(8192, "2.95 GB (external data)", False),
    }


def command(args, mode, model, calib, evaldata, out, cfg):
    if mode == "ORT MinMax":
        return [sys.executable, os.path.join(HERE, "ort_quantize.py"), model, calib, out, "--method", "MinMax",
                "--per-channel", "--pre-process", "auto"]
    with open(cfg, "w") as f:
        f.write(f"calibration:\n  data: {json.dumps(os.path.abspath(calib))}\n")
        if mode == "onnxq with verify":
            f.write(f"verify:\n  data: {json.dumps(os.path.abspath(evaldata))}\n")
    return [args.onnxq, model, "--config", cfg, "-o", out]


def sqnr(model, outputs, evaldata, log_path):
    """bench/sqnr.py's worst float output SQNR of each model in ONNX Runtime: {path: dB or error}."""
    j = log_path + ".json"
    with open(log_path, "w") as out:
        rc = subprocess.call([sys.executable, os.path.join(HERE, "sqnr.py"), model, *outputs, evaldata, "--json", j],
                             stdout=out, stderr=subprocess.STDOUT)
    if rc != 0 or not os.path.exists(j):
        return {p: bench.last_error_line(log_path) or f"exit code {rc}" for p in outputs}
    got = {}
    for r in json.load(open(j)):
        worst, error = bench.quality(r, "")
        got[r["model"]] = error if worst is None else worst
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.join(REPO, "..", "shared"))
    ap.add_argument("--onnxq", default=os.environ.get("ONNXQ", os.path.join(REPO, "target/release/onnxq")))
    ap.add_argument("--data", default=os.path.join(REPO, "target/bench-data"), help="where generated data goes")
    ap.add_argument("--out", default=os.path.join(REPO, "target/bench-large"))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, of: {', '.join(cases(ap.parse_args([])))}")
    ap.add_argument("--update", help="replace the part of this file between the markers with the output")
    args = ap.parse_args()
    args.shared, args.onnxq, args.data = map(os.path.abspath, (args.shared, args.onnxq, args.data))
    if not os.access(args.onnxq, os.X_OK):
        sys.exit(f"bench/large_cases.py: no onnxq binary at {args.onnxq}")
    known = cases(args)
    chosen = args.cases.split(",")
    for c in chosen:
        if c not in known:
            sys.exit(f"bench/large_cases.py: unknown case {c!r} (known: {', '.join(known)})")
    for d in ("models", "logs", "cfg"):
        os.makedirs(os.path.join(args.out, d), exist_ok=True)
    started = time.time()
    env_text = bench.environment(args)
    results = []
    for name in chosen:
        desc, model, calib, evaldata, with_ort, maker = known[name]
        if maker and not all(map(os.path.exists, (model, calib, evaldata))):
            bench.log(f"{name}: generating its data: {' '.join(maker)}")
            subprocess.run(maker, check=True, stdout=sys.stderr)
        modes = MODES if with_ort else MODES[:2]
        rec = {"case": name, "description": desc, "modes": {}}
        for m in modes:
            stem = f"{name}.{m.split()[0].lower()}.{m.split()[-1].lower()}"
            rec["modes"][m] = {
                "runs": [],
                "output": os.path.join(args.out, "models", stem + ".onnx"),
                "log": os.path.join(args.out, "logs", stem + ".log"),
                "cfg": os.path.join(args.out, "cfg", stem + ".yaml"),
            }
        for rep in range(args.reps):
            order = modes[rep % len(modes):] + modes[: rep % len(modes)]
            for m in order:
                t = rec["modes"][m]
                cmd = command(args, m, model, calib, evaldata, t["output"], t["cfg"])
                r = bench.measure(cmd, t["log"], args.timeout)
                if r["ok"] and not os.path.exists(t["output"]):
                    r.update(ok=False, error="exited 0 but wrote no model")
                r["load"] = bench.loadavg()
                t["runs"].append(r)
                status = f"{r['mb']:.0f} MiB, cpu {r['cpu']:.1f} s, wall {r['secs']:.1f} s"
                bench.log(f"  [{name} rep {rep + 1}] {m}: {status}" + ("" if r["ok"] else f" FAILED: {r['error']}"))
        outputs = [t["output"] for t in rec["modes"].values() if os.path.exists(t["output"])]
        quality = sqnr(model, outputs, evaldata, os.path.join(args.out, "logs", f"{name}.sqnr.log")) if outputs else {}
        for t in rec["modes"].values():
            t["sqnr"] = quality.get(t["output"])
        results.append(rec)

    rows = [
        "| case | run | peak RSS MiB | CPU s | wall s | peak / ORT's | CPU / ORT's | output SQNR (ORT, eval) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rec in results:
        ort = rec["modes"].get("ORT MinMax")
        for m, t in rec["modes"].items():
            ok = [r for r in t["runs"] if r["ok"]]
            if not ok:
                err = t["runs"][0].get("error", "failed") if t["runs"] else "not run"
                rows.append(f"| {rec['description']} | {m} | failed: {err} | | | | | |")
                continue
            mb, cpu, wall = (bench.median(t["runs"], k) for k in ("mb", "cpu", "secs"))
            vs = lambda k: bench.fmt(bench.ratio(bench.median(t["runs"], k), bench.median(ort["runs"], k))) if ort and m != "ORT MinMax" else ""  # noqa: E731
            q = t.get("sqnr")
            q = f"{q:.2f} dB" if isinstance(q, float) else (q or "—")
            rows.append(f"| {rec['description']} | {m} | {mb:.0f} | {cpu:.1f} | {wall:.1f} | {vs('mb')} | {vs('cpu')} | {q} |")
    elapsed = time.time() - started
    text = "\n".join([
        env_text,
        "",
        f"Command: `bench/large_cases.py --reps {args.reps} --cases {args.cases}`",
        "",
        f"Whole process (`/usr/bin/time`: peak RSS = maximum resident set, CPU = user + system), median of "
        f"{args.reps} run{'s' if args.reps > 1 else ''} per row, the rows of a case alternating. onnxq's "
        "calibration run is the main job without `verify:` (calibration, the default passes, the guard, Q/DQ, "
        "write); with verify it also runs the float and quantized models side by side on the eval data, layer "
        "by layer. ORT: `quant_pre_process` (or the original model when it fails) and MinMax `quantize_static`, "
        "per-channel, the whole Python process.",
        "",
        "\n".join(rows),
        "",
        f"Harness wall time: {elapsed / 60:.1f} min; load average after the run: {bench.loadavg()}.",
    ]) + "\n"
    print(text, end="")
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    if args.update:
        bench.update_between(args.update, BEGIN, END, text)


if __name__ == "__main__":
    main()
