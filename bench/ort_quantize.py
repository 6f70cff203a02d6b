"""ONNX Runtime's quantize_static on a model and its calibration data, timed: the peer onnxq is
measured against. Prints wall time of quant_pre_process and of the quantize_static call.

    python bench/ort_quantize.py MODEL.onnx CALIB.npz OUT.onnx --method Percentile --per-channel \
        [--samples N] [--pre-process always|auto|never] [--json TIMES.json]
Run it under `/usr/bin/time -v` for peak RSS.

--pre-process: `always` (default) runs ORT's recommended quant_pre_process (symbolic shape
inference + onnx optimisation) and fails when it fails; `auto` falls back to quantizing the
original model when quant_pre_process raises (what a user does when it fails, e.g. the
AssertionError of its symbolic shape inference on ppocr_mobile_v2_cls), and says so; `never`
skips it. --json writes what happened (pre-processing status and both timings) for bench/run.py.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process


class NpzReader(CalibrationDataReader):
    def __init__(self, path, samples):
        data = np.load(path)
        self.arrays = {k: data[k] for k in data.files if not k.startswith("_")}
        n = len(next(iter(self.arrays.values())))
        self.n = min(n, samples) if samples else n
        self.i = 0

    def get_next(self):
        if self.i >= self.n:
            return None
        # np.asarray: a scalar input (silero_vad_v5's `sr`) comes out of the sample axis as a numpy
        # scalar, which ONNX Runtime refuses ("Unable to handle object of type numpy.int64").
        item = {k: np.asarray(v[self.i]) for k, v in self.arrays.items()}
        self.i += 1
        return item


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("output")
    ap.add_argument("--method", default="MinMax", choices=["MinMax", "Entropy", "Percentile", "Distribution"])
    ap.add_argument("--per-channel", action="store_true")
    ap.add_argument("--samples", type=int, default=0)
    ap.add_argument("--pre-process", default="always", choices=["always", "auto", "never"])
    ap.add_argument("--json", help="write the pre-processing status and timings here")
    args = ap.parse_args()
    info = {"pre_process": "skipped", "pre_process_s": 0.0}
    for name in ("model", "calib", "output", "json"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    with tempfile.TemporaryDirectory() as tmp:
        # ORT leaves files in the working directory (sym_shape_infer_temp.onnx and <uuid>.data
        # external data when quant_pre_process fails on a large model): keep them in tmp.
        os.chdir(tmp)
        source = args.model
        t0 = time.perf_counter()
        if args.pre_process != "never":
            pre = os.path.join(tmp, "pre.onnx")
            try:
                quant_pre_process(args.model, pre)
                source = pre
                info["pre_process"] = "ok"
            except Exception as e:  # noqa: BLE001 - any failure of the pre-processing step
                if args.pre_process == "always":
                    raise
                where = e.__traceback__
                while where.tb_next is not None:
                    where = where.tb_next
                reason = f"{type(e).__name__} {str(e)[:80]}".strip()
                info["pre_process"] = f"failed ({reason} in {where.tb_frame.f_code.co_name})"
                print(f"quant_pre_process failed: {reason}; quantizing the original model")
        t1 = time.perf_counter()
        info["pre_process_s"] = t1 - t0
        quantize_static(
            source,
            args.output,
            NpzReader(args.calib, args.samples),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=args.per_channel,
            calibrate_method=getattr(CalibrationMethod, args.method),
        )
        t2 = time.perf_counter()
    info["quantize_static_s"] = t2 - t1
    print(f"quant_pre_process {t1 - t0:.2f} s, quantize_static {t2 - t1:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    main()
