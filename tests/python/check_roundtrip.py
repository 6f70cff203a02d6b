"""Cross-checks onnxq's written models against the originals with the reference tools.

For each ORIGINAL:WRITTEN:DATA triple: onnx.checker.check_model(full_check=True) on the written
model, then both models in ONNX Runtime (CPU) on every sample of DATA (.npz in the shared
convention), asserting bit-identical outputs. With --openvino, also loads the written model in
OpenVINO. With --tract-outputs T.npz (from `onnxq run`), compares tract's outputs to ONNX
Runtime's (relative error).

Exit code 0 when everything holds, 1 otherwise. Needs: pip install onnx onnxruntime [openvino].
"""
import argparse
import sys

import numpy as np
import onnx
import onnxruntime as ort


def ort_outputs(path, data):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    n = len(data[names[0]])
    outs = [sess.run(None, {k: data[k][i] for k in names}) for i in range(n)]
    return [o.name for o in sess.get_outputs()], [np.stack([s[j] for s in outs]) for j in range(len(outs[0]))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("triples", nargs="+", help="ORIGINAL.onnx:WRITTEN.onnx:DATA.npz[:TRACT_OUT.npz]")
    ap.add_argument("--openvino", action="store_true")
    args = ap.parse_args()
    ok = True
    for triple in args.triples:
        parts = triple.split(":")
        original, written, data_path = parts[:3]
        tract_out = parts[3] if len(parts) > 3 else None
        onnx.checker.check_model(onnx.load(written), full_check=True)
        data = dict(np.load(data_path))
        names_a, a = ort_outputs(original, data)
        names_b, b = ort_outputs(written, data)
        identical = names_a == names_b and all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b))
        line = f"{written}: checker ok, ORT outputs {'bit-identical' if identical else 'DIFFER'} over {len(a[0])} samples"
        ok &= identical
        if args.openvino:
            import openvino as ov
            ov.Core().compile_model(written, "CPU")
            line += ", OpenVINO compiles it"
        if tract_out:
            t = np.load(tract_out)
            worst = 0.0
            for name, ref in zip(names_a, a):
                got = t[name].reshape(ref.shape).astype(np.float64)
                ref = ref.astype(np.float64)
                rel = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)
                worst = max(worst, rel)
            line += f", tract vs ORT max relative error {worst:.2e}"
            ok &= worst <= 1e-4
        print(line)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
