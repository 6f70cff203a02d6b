#!/usr/bin/env python3
"""ppocr_v3_det data at 960x960 for the memory benchmark (bench/verify_memory.md).

The shared data is 416x416; the detector takes any size (sides divisible by 32). Each sample
is resized bilinearly with numpy (align-corners off, as cv2.resize) and the sets are cut or
tiled to 8, 32 and 128 samples (tiling repeats the samples in order).

    python3 bench/det_960_data.py [--shared ../shared] [--out target/bench-data/det960]

writes OUT/{calib,eval}_{8,32,128}.npz (array `x`, float32[N, 1, 3, 960, 960]) and the
416x416 sets cut or tiled the same way as OUT/{calib,eval}_416_{8,32,128}.npz.
"""
import argparse
import os

import numpy as np


def resize_bilinear(x, size):
    """x: [..., H, W] -> [..., size, size], half-pixel centres."""
    h, w = x.shape[-2:]

    def coords(n_in, n_out):
        c = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        c = np.clip(c, 0, n_in - 1)
        lo = np.floor(c).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (c - lo).astype(np.float32)

    y0, y1, fy = coords(h, size)
    x0, x1, fx = coords(w, size)
    rows = x[..., y0, :] * (1 - fy)[:, None] + x[..., y1, :] * fy[:, None]
    return (rows[..., x0] * (1 - fx) + rows[..., x1] * fx).astype(np.float32)


def cut_or_tile(x, n):
    reps = -(-n // len(x))
    return np.concatenate([x] * reps)[:n]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shared", default="../shared")
    p.add_argument("--out", default="target/bench-data/det960")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for split in ("calib", "eval"):
        x = np.load(os.path.join(a.shared, "data/ppocr_v3_det", f"{split}.npz"))["x"]
        big = np.stack([resize_bilinear(s, 960) for s in x])
        for n in (8, 32, 128):
            np.savez(os.path.join(a.out, f"{split}_{n}.npz"), x=cut_or_tile(big, n))
            np.savez(os.path.join(a.out, f"{split}_416_{n}.npz"), x=cut_or_tile(x, n))
            print(f"{split} {n}: {big.shape[1:]} and {x.shape[1:]}")


if __name__ == "__main__":
    main()
