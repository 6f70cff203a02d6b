"""Cross-checks models whose opset onnxq upgraded against the originals with the reference tools.

For each ORIGINAL:UPGRADED:DATA triple: onnx.checker.check_model(full_check=True) on the upgraded
model (strict shape and type inference at the new opset), then both models in ONNX Runtime (CPU,
graph optimisations off) on every sample of DATA (.npz in the shared convention: arrays named
after the model inputs with a leading sample axis; `_`-prefixed arrays ignored), asserting
outputs equal within a relative tolerance (max |upgraded - original| / max |original|).

Producing upgraded models: `ONNXQ_WRITE_UPGRADED=/tmp/upgraded cargo test --test opset` keeps
the ones the integration test makes (`<model>.opset<N>.onnx`), e.g.

    python tests/python/check_opset_upgrade.py \\
        models/ppocr_mobile_v2_cls.onnx:/tmp/upgraded/ppocr_mobile_v2_cls.opset13.onnx:models/ppocr_mobile_v2_cls.eval.npz

Exit code 0 when everything holds, 1 otherwise. Needs: pip install onnx onnxruntime numpy.
"""
import argparse
import sys

import numpy as np
import onnx
import onnxruntime as ort


def default_opset(model):
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def ort_outputs(path, data):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in data]
    if missing:
        raise SystemExit(f"{path}: the data has no array for input(s) {missing}")
    n = len(data[names[0]])
    outs = [sess.run(None, {k: data[k][i] for k in names}) for i in range(n)]
    return [o.name for o in sess.get_outputs()], [np.stack([s[j] for s in outs]) for j in range(len(outs[0]))]


def relative_error(got, want):
    got = got.astype(np.float64)
    want = want.astype(np.float64)
    if got.shape != want.shape:
        return float("inf")
    if got.size == 0:
        return 0.0
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def check(original, upgraded, data_path, tolerance):
    m = onnx.load(upgraded)
    onnx.checker.check_model(m, full_check=True)
    before = default_opset(onnx.load(original, load_external_data=False))
    data = {k: v for k, v in np.load(data_path).items() if not k.startswith("_")}
    names_a, a = ort_outputs(original, data)
    names_b, b = ort_outputs(upgraded, data)
    if names_a != names_b:
        return False, f"{upgraded}: outputs {names_b} differ from the original's {names_a}"
    worst = max((relative_error(y, x) for x, y in zip(a, b)), default=0.0)
    ok = worst <= tolerance
    line = (
        f"{upgraded}: opset {before} -> {default_opset(m)}, IR {m.ir_version}, checker (full) ok, "
        f"ORT max relative error {worst:.2e} over {len(a[0]) if a else 0} samples"
        f"{'' if ok else f' > {tolerance:.0e}: DIFFER'}"
    )
    return ok, line


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("triples", nargs="+", help="ORIGINAL.onnx:UPGRADED.onnx:DATA.npz")
    ap.add_argument("--tolerance", type=float, default=1e-6, help="max relative error (default 1e-6)")
    args = ap.parse_args()
    ok = True
    for triple in args.triples:
        original, upgraded, data_path = triple.split(":")
        try:
            good, line = check(original, upgraded, data_path, args.tolerance)
        except Exception as e:  # checker or runtime failure: report it, keep going
            good, line = False, f"{upgraded}: FAILED: {type(e).__name__}: {e}"
        ok &= good
        print(line)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
