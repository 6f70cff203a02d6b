"""Makes the small data files in models/ from ../shared/data (run from the repo root):
the first 8 samples of each model's calib and eval sets, and ONNX Runtime's outputs on the eval
subset (the reference tract is compared against in tests/runtime.rs).

    python tests/python/make_test_data.py ../shared
"""
import sys

import numpy as np
import onnxruntime as ort

SHARED = sys.argv[1] if len(sys.argv) > 1 else "../shared"
SAMPLES = 8

for model in ["ppocr_mobile_v2_cls", "crepe_tiny"]:
    for split in ["calib", "eval"]:
        src = np.load(f"{SHARED}/data/{model}/{split}.npz")
        np.savez_compressed(f"models/{model}.{split}.npz", **{k: src[k][:SAMPLES] for k in src.files})
    data = np.load(f"models/{model}.eval.npz")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(f"models/{model}.onnx", opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    runs = [sess.run(None, {n: data[n][i] for n in names}) for i in range(SAMPLES)]
    outputs = {o.name: np.stack([r[j] for r in runs]) for j, o in enumerate(sess.get_outputs())}
    np.savez_compressed(f"models/{model}.eval.ort.npz", **outputs)
    print(model, {k: v.shape for k, v in outputs.items()}, "onnxruntime", ort.__version__)
