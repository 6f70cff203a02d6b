"""ONNX Runtime's quantize_static on a model and its calibration data, timed: the peer onnxq is
measured against. Prints wall time of the quantize_static call (after quant_pre_process).

    python bench/ort_quantize.py MODEL.onnx CALIB.npz OUT.onnx --method Percentile --per-channel [--samples N]
Run it under `/usr/bin/time -v` for peak RSS.
"""
import argparse
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
        item = {k: v[self.i] for k, v in self.arrays.items()}
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        t0 = time.perf_counter()
        quant_pre_process(args.model, pre)
        t1 = time.perf_counter()
        quantize_static(
            pre,
            args.output,
            NpzReader(args.calib, args.samples),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=args.per_channel,
            calibrate_method=getattr(CalibrationMethod, args.method),
        )
        t2 = time.perf_counter()
    print(f"quant_pre_process {t1 - t0:.2f} s, quantize_static {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
