"""Where the AP goes: COCO's error-analysis breakdown and the AP of each image alone.

COCO's `analyze()` (cocoapi, after Hoiem et al.) asks, per class, how precision at each recall
would change if one kind of error were forgiven, and plots the answers as stacked areas:

    C75  PR at IoU 0.75                  C50  PR at IoU 0.50
    Loc  PR at IoU 0.10 (localization errors forgiven, duplicates still false positives)
    Sim  detections on a box of another class of the same supercategory ignored (IoU 0.10)
    Oth  detections on a box of any other class ignored (IoU 0.10)
    BG   every false positive forgiven: precision 1 wherever Oth reaches that recall
    FN   every miss forgiven: precision 1 at every recall

COCO runs COCOeval once per class for Sim and Oth (class-agnostic, the other classes' boxes marked
`ignore`). Here one vectorized matching pass covers every class: a detection's group is (image,
its class) and its candidates are every box of the image, ignored unless of its class
(`greedy.match_groups`), so the K evaluations share arrays. The same pass at COCO's ten IoU
thresholds gives per-category AP (area all, 100 detections) and, per (image, class), the AP of
each image alone, as COCOeval with `imgIds=[image]` computes it: classes without ground truth in
the image do not count there, as COCO marks them -1.

Map/merge: `match_stages` runs on any subset of images (a few prediction files); `merge` and
`stage_precision` combine the compact per-detection results, sorted as pycocotools sorts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.evaluation.accumulate import RECALL_THRESHOLDS, _curves
from pipelines.evaluation.greedy import match_groups
from pipelines.evaluation.matching import AREA_RANGES, IOU_THRESHOLDS, GroundTruthColumns, _ranges, rank_within_runs

STAGES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
LOC_IOU = 0.1
MAX_DETS = 100  # COCOeval's per (image, class) list, and analyze()'s maxDets
_COCO_LANES = len(IOU_THRESHOLDS)  # lanes 0-9: IoU 0.50:0.95; 10: Loc; 11: Sim; 12: Oth
_LOC, _SIM, _OTH = _COCO_LANES, _COCO_LANES + 1, _COCO_LANES + 2
_STAGE_LANES = (int(np.argmin(np.abs(IOU_THRESHOLDS - 0.75))), 0, _LOC, _SIM, _OTH)


@dataclass
class StageMatches:
    """Per detection scored (top 100 per image and class): what accumulation needs, ~20 bytes."""

    category: np.ndarray  # int32 category index
    image: np.ndarray  # int32 image index
    rank: np.ndarray  # int32 position in its (image, class) list by score
    score: np.ndarray  # float64
    tp: np.ndarray  # uint16 bit per lane: a true positive there
    counted: np.ndarray  # uint16 bit per lane: not ignored there (a false positive where not tp)


def ann_images(gt: GroundTruthColumns) -> np.ndarray:
    """Image index of each annotation (they are grouped by image)."""
    return np.repeat(np.arange(len(gt.image_ids)), np.diff(gt.image_start))


def match_stages(gt: GroundTruthColumns, image: np.ndarray, category: np.ndarray, box: np.ndarray,
                 score: np.ndarray, supercategory: np.ndarray | None) -> StageMatches:
    """Match detections given in canonical order (image, then score descending) for every lane.

    image / category: indexes into gt.image_ids / gt.category_ids; box: COCO x, y, w, h.
    supercategory: a code per category index (None: no supercategories, Sim is Loc).
    """
    k = gt.num_categories
    key = image.astype(np.int64) * k + category
    order = np.argsort(key, kind="stable")
    rank = rank_within_runs(key[order])
    order, rank = order[rank < MAX_DETS], rank[rank < MAX_DETS]
    key, box, score = key[order], box[order], score[order]
    ann_ignored = gt.ignored()[:, 0]  # area "all": crowd regions (and areas outside 0..1e10)
    ann_key = ann_images(gt).astype(np.int64) * k + gt.ann_category
    nodes = np.argsort(ann_key, kind="stable")
    coco = match_groups(key, rank, box, ann_key[nodes], gt.ann_box[nodes], gt.ann_crowd[nodes],
                        ann_ignored[nodes], np.r_[IOU_THRESHOLDS, LOC_IOU])
    coco_ignored = taken_flag(coco, ann_ignored[nodes])
    sim = _confusions_forgiven(gt, key, rank, box, ann_ignored, supercategory) if supercategory is not None else None
    oth = _confusions_forgiven(gt, key, rank, box, ann_ignored, None)
    if sim is None:
        sim = (coco[:, _LOC:_LOC + 1], coco_ignored[:, _LOC:_LOC + 1])
    matched = np.concatenate([coco >= 0, sim[0] >= 0, oth[0] >= 0], axis=1)
    ignored = np.concatenate([coco_ignored, sim[1], oth[1]], axis=1)
    area = box[:, 2] * box[:, 3]
    ignored |= ~matched & ((area < AREA_RANGES[0][0]) | (area > AREA_RANGES[0][1]))[:, None]
    bits = (1 << np.arange(matched.shape[1])).astype(np.uint16)
    return StageMatches(category=(key % k).astype(np.int32), image=(key // k).astype(np.int32),
                        rank=rank.astype(np.int32), score=score,
                        tp=((matched & ~ignored) * bits).sum(axis=1).astype(np.uint16),
                        counted=((~ignored) * bits).sum(axis=1).astype(np.uint16))


def _confusions_forgiven(gt: GroundTruthColumns, key: np.ndarray, rank: np.ndarray, box: np.ndarray,
                         ann_ignored: np.ndarray, supercategory: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Matches at IoU 0.1 against every box of the image (supercategory given: only boxes of the
    detection's supercategory), other classes' boxes ignored: (node, ignored) per detection."""
    k = gt.num_categories
    groups = np.unique(key)
    images, classes = groups // k, groups % k
    starts, ends = gt.image_start[images], gt.image_start[images + 1]
    node_ann = _ranges(starts, ends)  # per group, the image's annotations in json order
    node_key = np.repeat(groups, ends - starts)
    node_class = np.repeat(classes, ends - starts)
    if supercategory is not None:
        same = supercategory[gt.ann_category[node_ann]] == supercategory[node_class]
        node_ann, node_key, node_class = node_ann[same], node_key[same], node_class[same]
    node_ignored = ann_ignored[node_ann] | (gt.ann_category[node_ann] != node_class)
    node = match_groups(key, rank, box, node_key, gt.ann_box[node_ann], gt.ann_crowd[node_ann], node_ignored,
                        np.array([LOC_IOU]))
    return node, taken_flag(node, node_ignored)


def taken_flag(node: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """flags[node] where a node was taken, False where none (UNMATCHED)."""
    if not len(flags):
        return np.zeros(node.shape, bool)
    return np.where(node >= 0, flags[np.maximum(node, 0)], False)


def merge(parts: list[StageMatches]) -> StageMatches:
    fields = ("category", "image", "rank", "score", "tp", "counted")
    return StageMatches(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def _lanes(bits: np.ndarray, lanes) -> np.ndarray:
    return (bits[:, None] >> np.asarray(lanes, np.uint16)) & 1 == 1


def stage_precision(matches: StageMatches, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coco [10, R, K], stages [7, R, K]): interpolated precision per recall threshold, -1 for a
    class without ground truth. `positives`: non-ignored ground truth per class (area all)."""
    k_count, r_count = len(positives), len(RECALL_THRESHOLDS)
    coco = -np.ones((_COCO_LANES, r_count, k_count))
    stages = -np.ones((len(STAGES), r_count, k_count))
    order = np.lexsort((matches.rank, matches.image, -matches.score, matches.category))
    category = matches.category[order]
    bounds = np.searchsorted(category, np.arange(k_count + 1))
    lanes = list(range(_COCO_LANES)) + list(_STAGE_LANES[2:])
    for k in np.flatnonzero(positives):
        rows = order[bounds[k]:bounds[k + 1]]
        tp, counted = _lanes(matches.tp[rows], lanes), _lanes(matches.counted[rows], lanes)
        q, _ = _curves(tp.T, (counted & ~tp).T, positives[k])
        coco[:, :, k] = q[:_COCO_LANES]
        stages[:5, :, k] = np.concatenate([q[[_STAGE_LANES[0], _STAGE_LANES[1]]], q[_COCO_LANES:]])
        stages[5, :, k] = stages[4, :, k] > 0
        stages[6, :, k] = 1.0
    return coco, stages


def stage_ap(stages: np.ndarray) -> tuple[dict[str, float | None], np.ndarray]:
    """Overall AP per stage (mean over classes with ground truth) and per class [K, 7] (NaN: none)."""
    per_class = stages.mean(axis=1).T  # [K, 7]
    per_class[(stages < 0).all(axis=(0, 1))] = np.nan
    has = ~np.isnan(per_class[:, 0])
    overall = {name: (float(per_class[has, s].mean()) if has.any() else None) for s, name in enumerate(STAGES)}
    return overall, per_class


def images_ap(gt: GroundTruthColumns, matches: StageMatches, images: np.ndarray) -> np.ndarray:
    """AP of each of `images` alone (COCOeval with imgIds=[image], area all, IoU 0.50:0.95); NaN
    for an image without (non-crowd) ground truth. `matches` may hold other images too."""
    k = gt.num_categories
    ann_ok = ~gt.ignored()[:, 0]
    pair_key, npig = np.unique(ann_images(gt)[ann_ok].astype(np.int64) * k + gt.ann_category[ann_ok],
                               return_counts=True)  # (image, class) pairs with positives
    pair_image = pair_key // k
    wanted = np.isin(pair_image, images)
    pair_key, npig, pair_image = pair_key[wanted], npig[wanted], pair_image[wanted]
    ap_sum = np.zeros(len(pair_key))
    det_key = matches.image.astype(np.int64) * k + matches.category
    pos = np.minimum(np.searchsorted(pair_key, det_key), max(len(pair_key) - 1, 0))
    keep = np.flatnonzero((pair_key[pos] == det_key) if len(pair_key) else np.zeros(len(det_key), bool))
    keep = keep[np.lexsort((matches.rank[keep], det_key[keep]))]
    pair = pos[keep]
    if len(keep):
        first = np.r_[True, pair[1:] != pair[:-1]]
        start = np.flatnonzero(first)
        seg = np.cumsum(first) - 1
        tp = _lanes(matches.tp[keep], range(_COCO_LANES)).astype(np.float64)
        fp = (_lanes(matches.counted[keep], range(_COCO_LANES)) & (tp == 0)).astype(np.float64)
        tp_sum = np.cumsum(tp, axis=0)
        fp_sum = np.cumsum(fp, axis=0)
        tp_sum -= np.repeat(tp_sum[start] - tp[start], np.diff(np.r_[start, len(keep)]), axis=0)
        fp_sum -= np.repeat(fp_sum[start] - fp[start], np.diff(np.r_[start, len(keep)]), axis=0)
        rc = tp_sum / npig[pair][:, None]
        pr = _suffix_max(tp_sum / (fp_sum + tp_sum + np.spacing(1)), seg)
        reached = np.searchsorted(RECALL_THRESHOLDS, rc.ravel(), side="right").reshape(rc.shape)
        before = np.where(first[:, None], 0, np.roll(reached, 1, axis=0))
        weight = (pr * (reached - before)).sum(axis=1)  # recall thresholds each row serves, all lanes
        ap_sum = np.bincount(pair, weights=weight, minlength=len(pair_key))
    per_pair = ap_sum / (len(RECALL_THRESHOLDS) * _COCO_LANES)
    out = np.full(len(images), np.nan)
    index = np.searchsorted(images, pair_image)  # `images` sorted
    total = np.bincount(index, weights=per_pair, minlength=len(images))
    count = np.bincount(index, minlength=len(images))
    np.divide(total, count, out=out, where=count > 0)
    return out


def _suffix_max(values: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """max(values[i:end of i's segment]) per row and column, exactly: precision's envelope.

    Values are replaced by their ranks, offset per segment in integers, so one running maximum
    over the reversed rows never crosses a segment boundary and no float is altered."""
    out = np.empty_like(values)
    offset = (seg.max() - seg).astype(np.int64)[::-1]
    for t in range(values.shape[1]):
        unique, code = np.unique(values[:, t], return_inverse=True)
        coded = code.astype(np.int64)[::-1] + offset * len(unique)
        out[:, t] = unique[(np.maximum.accumulate(coded) - offset * len(unique))[::-1]]
    return out


_STAGE_COLORS = ((.97, .97, .97), (.85, .85, .85), (.31, .51, .74), (.75, .31, .30), (.36, .90, .38), (.50, .39, .64),
                 (1, .6, 0))


def breakdown_csv(stages: np.ndarray, categories: list[dict]) -> str:
    """One row per class (and 'all' first): AP at each stage; empty cells for classes without
    ground truth. `categories` in the category-index order: {"id", "name", "supercategory"?}."""
    overall, per_class = stage_ap(stages)
    lines = ["category_id,name,supercategory," + ",".join(STAGES)]
    lines.append("all,all,," + ",".join("" if overall[s] is None else repr(overall[s]) for s in STAGES))
    for cat, row in zip(categories, per_class):
        cells = ["" if np.isnan(v) else repr(float(v)) for v in row]
        name, sup = (str(cat.get(f, "") or "").replace(",", " ") for f in ("name", "supercategory"))
        lines.append(f"{cat['id']},{name},{sup}," + ",".join(cells))
    return "\n".join(lines) + "\n"


def breakdown_png(stages: np.ndarray, title: str) -> bytes:
    """COCO analyze()'s figure: precision vs recall, each stage's gain over the previous one as a
    stacked area, the legend giving each stage's AP (mean over classes with ground truth)."""
    import io

    from matplotlib.figure import Figure

    has = ~(stages < 0).all(axis=(0, 1))
    curves = stages[:, :, has].mean(axis=2) if has.any() else np.zeros(stages.shape[:2])
    overall, _ = stage_ap(stages)
    fig = Figure(figsize=(7, 5.5), dpi=100)
    ax = fig.subplots()
    gains = np.vstack([curves[:1], np.diff(curves, axis=0)])
    labels = [f"[{'-' if overall[s] is None else f'{overall[s]:.3f}'}] {s}" for s in STAGES]
    ax.stackplot(RECALL_THRESHOLDS, np.clip(gains, 0, None), labels=labels, colors=_STAGE_COLORS,
                 edgecolor="0.3", linewidth=0.4)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="recall", ylabel="precision", title=title)
    ax.legend(loc="lower left", fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
