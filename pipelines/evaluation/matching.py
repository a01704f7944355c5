"""Per-image matching of detections to ground truth, as numpy arrays, for any subset of images.

COCOeval's (and lvis-api's) per-image step is independent across images: for each (image,
category) it sorts detections by score, matches each greedily to the best free ground truth at
every IoU threshold, and marks what is ignored (crowd regions, boxes outside an area range, LVIS's
not-exhaustive categories). This module does exactly that for a whole shard of images at once:
one vectorized step per detection rank (all (image, category) pairs advance together), with IoUs
computed as pycocotools' `bbIou` computes them (bit for bit). Its output is what accumulation
needs and nothing more: per area range, each detection's category, image index, rank in its
(image, category) list, score and matched / ignored bits per IoU threshold.

Selection rule reproduced (pycocotools evaluateImg, lvis-api evaluate_img): among the ground truth
of the pair not yet taken (crowd regions never count as taken) with IoU >= threshold, prefer
non-ignored ones; among those the highest IoU; among equal IoUs the last in annotation order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# pycocotools' / lvis-api's defaults: IoU 0.50:0.05:0.95, areas all/small/medium/large
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
AREA_RANGES = ((0, 1e5 ** 2), (0, 32 ** 2), (32 ** 2, 96 ** 2), (96 ** 2, 1e5 ** 2))


@dataclass
class GroundTruthColumns:
    """Ground truth as flat arrays, annotations grouped by image (CSR), for matching and counting.

    Images are COCOeval's `imgIds` (sorted ids) and categories its `catIds` (sorted ids); both are
    referred to by index. Within an image, annotations keep the json's order (ties in matching
    depend on it). LVIS's per-image category lists are (image index * K + category index) keys.
    """

    protocol: str  # "coco" or "lvis"
    image_ids: np.ndarray  # int64, sorted
    category_ids: np.ndarray  # int64, sorted
    image_start: np.ndarray  # int64 (num_images + 1): annotations of image i are image_start[i]:image_start[i+1]
    ann_category: np.ndarray  # int64 category index
    ann_box: np.ndarray  # (n, 4) float64 x, y, w, h
    ann_area: np.ndarray  # float64 (the json's `area`)
    ann_crowd: np.ndarray  # bool (COCO iscrowd; always False for LVIS, as lvis-api treats it)
    negative_keys: np.ndarray  # int64 sorted: (image, category) verified absent (LVIS)
    not_exhaustive_keys: np.ndarray  # int64 sorted (LVIS)

    @property
    def num_categories(self) -> int:
        return len(self.category_ids)

    def ignored(self) -> np.ndarray:
        """(n, A): an annotation is ignored in an area range when crowd or outside it."""
        lo, hi = np.array(AREA_RANGES).T
        return self.ann_crowd[:, None] | (self.ann_area[:, None] < lo) | (self.ann_area[:, None] > hi)

    def positives(self) -> np.ndarray:
        """(K, A) non-ignored annotations per category and area range (COCOeval's npig)."""
        counts = np.zeros((self.num_categories, len(AREA_RANGES)), np.int64)
        np.add.at(counts, self.ann_category, ~self.ignored())
        return counts


def ground_truth_columns(ground_truth: dict, protocol: str) -> GroundTruthColumns:
    """Build the columns from a COCO / LVIS json dict (one pass over its lists)."""
    image_ids = np.unique(np.array([i["id"] for i in ground_truth["images"]], dtype=np.int64))
    category_ids = np.unique(np.array([c["id"] for c in ground_truth["categories"]], dtype=np.int64))
    anns = ground_truth["annotations"]
    image = _index_of(image_ids, np.array([a["image_id"] for a in anns], dtype=np.int64))
    category = _index_of(category_ids, np.array([a["category_id"] for a in anns], dtype=np.int64))
    # by image, json order within; annotations of unlisted images or categories are never scored (COCOeval)
    order = np.flatnonzero((image >= 0) & (category >= 0))
    order = order[np.argsort(image[order], kind="stable")]
    box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    area = np.array([a["area"] for a in anns], dtype=np.float64)
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    if protocol == "lvis":
        crowd[:] = False
    k = len(category_ids)

    def keys(field: str) -> np.ndarray:
        pairs = [(i["id"], c) for i in ground_truth["images"] for c in i.get(field, [])]
        ids = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        image, category = _index_of(image_ids, ids[:, 0]), _index_of(category_ids, ids[:, 1])
        known = (image >= 0) & (category >= 0)
        return np.unique(image[known] * k + category[known])

    lvis = protocol == "lvis"
    return GroundTruthColumns(
        protocol=protocol, image_ids=image_ids, category_ids=category_ids,
        image_start=np.searchsorted(image[order], np.arange(len(image_ids) + 1)),
        ann_category=category[order], ann_box=box[order], ann_area=area[order], ann_crowd=crowd[order],
        negative_keys=keys("neg_category_ids") if lvis else np.zeros(0, np.int64),
        not_exhaustive_keys=keys("not_exhaustive_category_ids") if lvis else np.zeros(0, np.int64))


@dataclass
class Matches:
    """Per area range a: the detections that count there (not ignored at every threshold)."""

    category: list[np.ndarray]  # int32 category index
    image: list[np.ndarray]  # int32 image index
    rank: list[np.ndarray]  # int32 position in its (image, category) list, by score
    score: list[np.ndarray]  # float64
    matched: list[np.ndarray]  # uint16 bit t: matched at IoU threshold t
    ignored: list[np.ndarray]  # uint16 bit t: ignored at IoU threshold t


def match(gt: GroundTruthColumns, det_image: np.ndarray, det_category: np.ndarray, det_box: np.ndarray,
          det_score: np.ndarray, max_dets: int) -> Matches:
    """Match one shard's detections (canonical order: image, then score descending, stable).

    `det_image` / `det_category` are indexes into gt.image_ids / gt.category_ids. Each (image,
    category) list keeps its first `max_dets` (COCO 100; LVIS caps per image beforehand).
    """
    k = gt.num_categories
    key = det_image.astype(np.int64) * k + det_category
    lvis = gt.protocol == "lvis"
    # ground truth of the shard's images, grouped by (image, category), json order within
    images = np.unique(det_image)
    starts, ends = gt.image_start[images], gt.image_start[images + 1]
    ann = _ranges(starts, ends)
    ann_key = np.repeat(images.astype(np.int64), ends - starts) * k + gt.ann_category[ann]
    by_key = np.argsort(ann_key, kind="stable")
    ann, ann_key = ann[by_key], ann_key[by_key]
    if lvis:  # federated: only categories present on the image or verified absent are evaluated there
        keep = _isin_sorted(key, np.unique(ann_key)) | _isin_sorted(key, gt.negative_keys)
        det_image, det_category, det_box, det_score, key = (x[keep] for x in (det_image, det_category, det_box,
                                                                               det_score, key))
    order = np.argsort(key, kind="stable")
    rank = rank_within_runs(key[order])
    order, rank = order[rank < max_dets], rank[rank < max_dets]
    det_image, det_category, det_box, det_score, key = (x[order] for x in (det_image, det_category, det_box,
                                                                           det_score, key))
    lanes = len(AREA_RANGES) * len(IOU_THRESHOLDS)
    matched = np.zeros((len(key), lanes), bool)
    ignored = np.zeros((len(key), lanes), bool)
    ann_ignored = np.repeat(gt.ignored()[ann], len(IOU_THRESHOLDS), axis=1)  # (g, lanes)
    _greedy_match(gt, key, rank, det_box, ann, ann_key, ann_ignored, matched, ignored)
    area = det_box[:, 2] * det_box[:, 3]
    lo, hi = np.array(AREA_RANGES).T
    outside = np.repeat((area[:, None] < lo) | (area[:, None] > hi), len(IOU_THRESHOLDS), axis=1)
    if lvis:  # unmatched detections of a not-exhaustively labelled category are not false positives
        outside |= _isin_sorted(key, gt.not_exhaustive_keys)[:, None]
    ignored |= ~matched & outside
    return _per_area(det_category, det_image, rank, det_score, matched, ignored)


def _greedy_match(gt, key, rank, det_box, ann, ann_key, ann_ignored, matched, ignored) -> None:
    """COCOeval's greedy matching, every (image, category) pair and lane (area range x IoU) at once,
    one detection rank at a time (a rank's detections are in different pairs, so independent)."""
    first = np.searchsorted(ann_key, key, side="left")
    count = np.searchsorted(ann_key, key, side="right") - first
    has_gt = np.flatnonzero(count)
    if not len(has_gt):
        return
    cand_det = np.repeat(has_gt, count[has_gt])
    cand_ann = _ranges(first[has_gt], first[has_gt] + count[has_gt])  # positions in `ann`
    iou = _bbox_iou(det_box[cand_det], gt.ann_box[ann[cand_ann]], gt.ann_crowd[ann[cand_ann]])
    by_rank = np.argsort(rank[cand_det], kind="stable")
    cand_det, cand_ann, iou = cand_det[by_rank], cand_ann[by_rank], iou[by_rank]
    steps = np.searchsorted(rank[cand_det], np.arange(rank.max() + 2))
    thresholds = np.tile(np.minimum(IOU_THRESHOLDS, 1 - 1e-10), len(AREA_RANGES))
    taken = np.zeros((len(ann), len(thresholds)), bool)
    crowd = gt.ann_crowd[ann]
    for r in range(len(steps) - 1):
        rows = slice(steps[r], steps[r + 1])
        if steps[r] == steps[r + 1]:
            continue
        d, g, v = cand_det[rows], cand_ann[rows], iou[rows]
        valid = (v[:, None] >= thresholds) & (~taken[g] | crowd[g][:, None])
        seg = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])  # candidates of one detection are contiguous
        seg_of = np.cumsum(np.r_[True, d[1:] != d[:-1]]) - 1
        preferred = np.where(valid, ~ann_ignored[g], -1).astype(np.int8)
        valid &= preferred == np.maximum.reduceat(preferred, seg, axis=0)[seg_of]
        best_iou = np.maximum.reduceat(np.where(valid, v[:, None], -1.0), seg, axis=0)
        valid &= v[:, None] == best_iou[seg_of]
        chosen = np.maximum.reduceat(np.where(valid, g[:, None], -1), seg, axis=0)  # last of equal IoUs
        det_of_seg, lane = np.nonzero(chosen >= 0)
        winner = chosen[det_of_seg, lane]
        dets = d[seg[det_of_seg]]
        matched[dets, lane] = True
        ignored[dets, lane] = ann_ignored[winner, lane]
        taken[winner, lane] = True


def _bbox_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' bbIou, elementwise over pairs, in the same float64 operations."""
    w = np.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - np.maximum(d[:, 0], g[:, 0])
    h = np.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - np.maximum(d[:, 1], g[:, 1])
    inter = w * h
    det_area = d[:, 2] * d[:, 3]
    union = np.where(crowd, det_area, det_area + g[:, 2] * g[:, 3] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def _per_area(category, image, rank, score, matched, ignored) -> Matches:
    t = len(IOU_THRESHOLDS)
    bits = (1 << np.arange(t)).astype(np.uint16)
    out = Matches([], [], [], [], [], [])
    for a in range(len(AREA_RANGES)):
        m, ig = matched[:, a * t:(a + 1) * t], ignored[:, a * t:(a + 1) * t]
        counts = ~ig.all(axis=1)  # ignored at every threshold: no effect on COCOeval's curves
        out.category.append(category[counts].astype(np.int32))
        out.image.append(image[counts].astype(np.int32))
        out.rank.append(rank[counts].astype(np.int32))
        out.score.append(score[counts])
        out.matched.append((m[counts] * bits).sum(axis=1).astype(np.uint16))
        out.ignored.append((ig[counts] * bits).sum(axis=1).astype(np.uint16))
    return out


def _index_of(sorted_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Position of each value in `sorted_ids`, -1 where absent."""
    if not len(sorted_ids):
        return np.full(len(values), -1)
    pos = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == values, pos, -1)


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for each (s, e), without a Python loop."""
    lengths = ends - starts
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.int64)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + np.arange(total) - offsets


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values


def rank_within_runs(sorted_keys: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal consecutive keys."""
    n = len(sorted_keys)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if n else np.zeros(0, np.int64)
    return np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
