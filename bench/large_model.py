"""The synthetic large-weight model of BENCHMARKS.md ("Large weights"): a chain of MatMul + Relu
layers with SIZE x SIZE float32 weights stored as external data (11 layers of 8192 x 8192: 2.95 GB
of weights), deterministic for a given seed, with calibration and evaluation data and a config.

    bench/large_model.py generate [--size 8192] [--layers 11] [--out target/bench-data/large]
    bench/large_model.py measure --onnxq BIN [--out DIR]

`generate` writes DIR/large.onnx (+ large.onnx.data), DIR/calib.npz, DIR/eval.npz and DIR/quant.yaml
(`calibration.data` and `verify.data` set, the default passes). Weights are written one at a time,
so generating needs about one layer of memory.

`measure` runs the whole main job (`BIN DIR/large.onnx --config DIR/quant.yaml -o DIR/large.q.onnx`)
under `/usr/bin/time -v` (peak RSS = "Maximum resident set size", wall time), then checks the
written model with `onnx.checker.check_model(PATH, full_check=True)` (the path form, which works
past protobuf's 2 GiB limit) and measures its output SQNR in ONNX Runtime on the eval data
(bench/sqnr.py's comparison). It refuses to start when `free` reports less than twice the
weights available. Run it with the bench venv: target/bench-venv/bin/python bench/large_model.py ...
"""
import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

ROWS = 8  # rows per sample: the model input is [ROWS, SIZE]


def weight(rng, size):
    """He-initialised weight, so activations keep their scale through the Relus."""
    return (rng.standard_normal((size, size), dtype=np.float32) * np.float32(np.sqrt(2.0 / size))).astype(
        np.float32
    )


def generate(args):
    os.makedirs(args.out, exist_ok=True)
    model_path = os.path.join(args.out, "large.onnx")
    data_name = "large.onnx.data"
    rng = np.random.default_rng(args.seed)
    initializers, nodes = [], []
    offset = 0
    with open(os.path.join(args.out, data_name), "wb") as data:
        for layer in range(args.layers):
            w = weight(rng, args.size)
            raw = w.tobytes()
            pad = (-offset) % 64
            data.write(b"\0" * pad)
            offset += pad
            data.write(raw)
            t = TensorProto()
            t.name = f"w{layer}"
            t.data_type = TensorProto.FLOAT
            t.dims.extend(w.shape)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
            initializers.append(t)
            x = "x" if layer == 0 else f"r{layer - 1}"
            nodes.append(helper.make_node("MatMul", [x, f"w{layer}"], [f"m{layer}"], name=f"matmul{layer}"))
            out = "y" if layer == args.layers - 1 else f"r{layer}"
            nodes.append(helper.make_node("Relu", [f"m{layer}"], [out], name=f"relu{layer}"))
            del w, raw
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, args.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, args.size])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench/large_model.py")
    model.ir_version = 8
    with open(model_path, "wb") as f:
        f.write(model.SerializeToString())
    for name, count in (("calib", args.calibration_samples), ("eval", args.eval_samples)):
        x = rng.standard_normal((count, ROWS, args.size), dtype=np.float32)
        np.savez(os.path.join(args.out, f"{name}.npz"), x=x)
    with open(os.path.join(args.out, "quant.yaml"), "w") as f:
        f.write("# bench/large_model.py: the main job with verification\n")
        f.write("calibration: {data: calib.npz}\n")
        f.write("verify: {data: eval.npz}\n")
    print(
        f"wrote {model_path}: {args.layers} x MatMul {args.size}x{args.size} + Relu, "
        f"{offset / 1e9:.2f} GB of external data; calib.npz ({args.calibration_samples} samples), "
        f"eval.npz ({args.eval_samples}), quant.yaml"
    )


def available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(args):
    model = os.path.join(args.out, "large.onnx")
    weights = os.path.getsize(model + ".data")
    if available_bytes() < 2 * weights + (2 << 30):
        sys.exit(f"only {available_bytes() / 2**30:.1f} GiB available: not starting a job on {weights / 1e9:.2f} GB of weights")
    out = os.path.join(args.out, "large.q.onnx")
    cmd = [args.onnxq, model, "--config", os.path.join(args.out, "quant.yaml"), "-o", out]
    cmd += args.extra
    print("$", " ".join(cmd), flush=True)
    started = time.time()
    run = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.time() - started
    sys.stdout.write(run.stdout)
    sys.stderr.write(run.stderr)
    if run.returncode != 0:
        sys.exit(f"onnxq failed with exit code {run.returncode}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", run.stderr).group(1)) for k in ("User", "System"))
    print(f"main job: wall {wall:.1f} s, cpu {cpu:.1f} s, peak RSS {peak_kib / 1024:.0f} MiB ({peak_kib * 1024 / weights:.2f}x the weights)")
    onnx.checker.check_model(out, full_check=True)
    print(f"{out}: onnx.checker.check_model(path, full_check=True) ok")
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, os.path.join(here, "sqnr.py"), model, out, os.path.join(args.out, "eval.npz")], check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write the model, its data and config")
    g.add_argument("--size", type=int, default=8192)
    g.add_argument("--layers", type=int, default=11)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--calibration-samples", type=int, default=32)
    g.add_argument("--eval-samples", type=int, default=16)
    g.add_argument("--out", default="target/bench-data/large")
    m = sub.add_parser("measure", help="run the main job under /usr/bin/time -v and check its output")
    m.add_argument("--onnxq", required=True)
    m.add_argument("--out", default="target/bench-data/large")
    m.add_argument("extra", nargs="*", help="more onnxq arguments (after --)")
    args = p.parse_args()
    generate(args) if args.command == "generate" else measure(args)


if __name__ == "__main__":
    main()
