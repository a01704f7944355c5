"""COCOeval's accumulate() over matches merged from any number of shards, with its exact numbers.

pycocotools (and lvis-api) concatenate, per category and area range, every image's detections in
image order, each image's list sorted by score, then sort all by score stably (mergesort). So the
order of a detection is (score descending, image index, rank within its image's list): a lexsort
on those keys gives that order whichever shard the detection came from, and the rest (cumulative
true/false positives, interpolated precision at 101 recall points) repeats pycocotools' float64
operations one for one. Detections ignored at every threshold are left out by the matcher: they
repeat the previous point of the curve and change no value.
"""
from __future__ import annotations

import numpy as np

from pipelines.evaluation.matching import AREA_RANGES, IOU_THRESHOLDS, Matches

RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


def merge(parts: list[Matches]) -> Matches:
    """Concatenate the matches of many shards (order does not matter: accumulate sorts)."""
    fields = ("category", "image", "rank", "score", "matched", "ignored")
    return Matches(*([np.concatenate([getattr(p, f)[a] for p in parts]) for a in range(len(AREA_RANGES))]
                     for f in fields))


def accumulate(matches: Matches, positives: np.ndarray, max_dets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """precision [T, R, K, A, M] and recall [T, K, A, M], -1 where a category has no positives.

    `positives` is (K, A) non-ignored ground truth (npig); `max_dets` COCO's [1, 10, 100] or LVIS's [300].
    """
    t_count, r_count, (k_count, a_count), m_count = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), positives.shape, \
        len(max_dets)
    precision = -np.ones((t_count, r_count, k_count, a_count, m_count))
    recall = -np.ones((t_count, k_count, a_count, m_count))
    bits = (1 << np.arange(t_count)).astype(np.uint16)
    for a in range(a_count):
        category, score = matches.category[a], matches.score[a]
        order = np.lexsort((matches.rank[a], matches.image[a], -score, category))
        category, rank = category[order], matches.rank[a][order]
        matched = (matches.matched[a][order][:, None] & bits) != 0
        counted = (matches.ignored[a][order][:, None] & bits) == 0
        bounds = np.searchsorted(category, np.arange(k_count + 1))
        for k in np.flatnonzero(positives[:, a]):
            rows = slice(bounds[k], bounds[k + 1])
            for m, max_det in enumerate(max_dets):
                keep = rank[rows] < max_det
                tps = (matched[rows][keep] & counted[rows][keep]).T
                fps = (~matched[rows][keep] & counted[rows][keep]).T
                precision[:, :, k, a, m], recall[:, k, a, m] = _curves(tps, fps, positives[k, a])
    return precision, recall


def _curves(tps: np.ndarray, fps: np.ndarray, npig: int) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools' per-threshold precision at the recall points and final recall, vectorized over T."""
    tp_sum = np.cumsum(tps, axis=1).astype(dtype=float)
    fp_sum = np.cumsum(fps, axis=1).astype(dtype=float)
    nd = tp_sum.shape[1]
    q = np.zeros((len(tp_sum), len(RECALL_THRESHOLDS)))
    recall = np.zeros(len(tp_sum))
    if not nd:
        return q, recall
    rc = tp_sum / npig
    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision envelope, right to left
    for t in range(len(tp_sum)):
        inds = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
        inside = inds < nd
        q[t, inside] = pr[t, inds[inside]]
    return q, rc[:, -1]


def coco_summary(precision: np.ndarray, recall: np.ndarray) -> list[float]:
    """pycocotools' summarize(): the 12 stats, as means over entries > -1 of the same slices."""
    last = precision.shape[-1] - 1
    p = precision[..., last]
    return [_mean(p[:, :, :, 0]), _mean(p[_at(0.5)][:, :, :, 0]), _mean(p[_at(0.75)][:, :, :, 0]),
            *(_mean(p[:, :, :, a]) for a in (1, 2, 3)), *(_mean(recall[:, :, 0, m]) for m in range(recall.shape[-1])),
            *(_mean(recall[:, :, a, last]) for a in (1, 2, 3))]


def lvis_summary(precision: np.ndarray, recall: np.ndarray, frequency_groups: list[list[int]],
                 max_dets: int) -> dict[str, float]:
    """lvis-api's summarize(): the same means over the same slices, in the same element order,
    under its names (rare / common / frequent groups are category indexes)."""
    p, r = precision[..., 0], recall[..., 0]  # one max_dets
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
             f"AR@{max_dets}", f"ARs@{max_dets}", f"ARm@{max_dets}", f"ARl@{max_dets}")
    values = [_mean(p[:, :, :, 0]), _mean(p[_at(0.5)][:, :, :, 0]), _mean(p[_at(0.75)][:, :, :, 0]),
              *(_mean(p[:, :, :, a]) for a in (1, 2, 3)), *(_mean(p[:, :, group, 0]) for group in frequency_groups),
              *(_mean(r[:, :, a]) for a in (0, 1, 2, 3))]
    return dict(zip(names, values))


def _mean(values: np.ndarray) -> float:
    """COCOeval's average: over entries > -1 (-1 marks categories without ground truth), else -1."""
    values = values[values > -1]
    return float(np.mean(values)) if values.size else -1.0


def _at(iou: float) -> np.ndarray:
    return np.flatnonzero(iou == IOU_THRESHOLDS)
