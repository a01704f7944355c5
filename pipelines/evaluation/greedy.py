"""COCOeval's greedy matching at any IoU thresholds, over any grouping of detections.

`matching.match` reproduces COCOeval for its fixed lanes (IoU 0.50:0.95 x four area ranges).
Error analysis needs other questions of the same rule: IoU 0.1, and a detection of class k
compared with the boxes of *other* classes (ignored there, as COCO's `analyze()` does), one
evaluation per class; a confusion matrix needs matches across classes within an image. So here the
thresholds are a parameter and the ground truth is given as *nodes*: one per (group, ground-truth
box) that a group may match, each with its own `ignored` flag and its own "taken" state, so that
the per-class evaluations of `analyze()` share one vectorized pass instead of K passes.

The rule (pycocotools evaluateImg): detections in each group in rank order (score descending);
each takes, among the nodes of its group not yet taken (crowd regions never count as taken) with
IoU >= threshold, a non-ignored one if any, the highest IoU among those, the last of equal IoUs.
One vectorized step per rank: a rank's detections are in different groups, so independent.
"""
from __future__ import annotations

import numpy as np

from pipelines.evaluation.matching import _bbox_iou, _ranges

UNMATCHED = -1


def match_groups(det_key: np.ndarray, det_rank: np.ndarray, det_box: np.ndarray, node_key: np.ndarray,
                 node_box: np.ndarray, node_crowd: np.ndarray, node_ignored: np.ndarray,
                 thresholds: np.ndarray) -> np.ndarray:
    """The node each detection takes at each threshold, (D, T) int64, UNMATCHED where none.

    det_key / node_key: the group of each detection / node; `node_key` sorted ascending, nodes of
    a group in annotation order (ties in IoU go to the last). det_rank: position of the detection
    in its group by score. Boxes are COCO x, y, w, h; IoUs as pycocotools computes them.
    """
    thresholds = np.minimum(np.asarray(thresholds, np.float64), 1 - 1e-10)
    chosen_node = np.full((len(det_key), len(thresholds)), UNMATCHED, np.int64)
    first = np.searchsorted(node_key, det_key, side="left")
    count = np.searchsorted(node_key, det_key, side="right") - first
    has_nodes = np.flatnonzero(count)
    if not len(has_nodes):
        return chosen_node
    cand_det = np.repeat(has_nodes, count[has_nodes])
    cand_node = _ranges(first[has_nodes], first[has_nodes] + count[has_nodes])
    iou = _bbox_iou(det_box[cand_det], node_box[cand_node], node_crowd[cand_node])
    by_rank = np.argsort(det_rank[cand_det], kind="stable")  # a detection's candidates stay contiguous
    cand_det, cand_node, iou = cand_det[by_rank], cand_node[by_rank], iou[by_rank]
    steps = np.searchsorted(det_rank[cand_det], np.arange(int(det_rank.max()) + 2))
    taken = np.zeros((len(node_key), len(thresholds)), bool)
    for r in range(len(steps) - 1):
        if steps[r] == steps[r + 1]:
            continue
        rows = slice(steps[r], steps[r + 1])
        d, g, v = cand_det[rows], cand_node[rows], iou[rows]
        valid = (v[:, None] >= thresholds) & (~taken[g] | node_crowd[g][:, None])
        new_det = np.r_[True, d[1:] != d[:-1]]
        seg, seg_of = np.flatnonzero(new_det), np.cumsum(new_det) - 1
        preferred = np.where(valid, ~node_ignored[g][:, None], -1).astype(np.int8)
        valid &= preferred == np.maximum.reduceat(preferred, seg, axis=0)[seg_of]
        best = np.maximum.reduceat(np.where(valid, v[:, None], -1.0), seg, axis=0)
        valid &= v[:, None] == best[seg_of]
        chosen = np.maximum.reduceat(np.where(valid, g[:, None], UNMATCHED), seg, axis=0)
        seg_index, lane = np.nonzero(chosen >= 0)
        winner = chosen[seg_index, lane]
        chosen_node[d[seg[seg_index]], lane] = winner
        taken[winner, lane] = True
    return chosen_node

