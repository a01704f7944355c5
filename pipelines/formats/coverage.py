"""Anchor coverage: how many boxes the model's anchors can match as positives, before training.

RetinaNet's matcher (retinanet.matching) makes an anchor a positive at IoU >= fg_iou (0.5); a box
whose best anchor is below that is only kept by the low-quality rule (its best anchors become
positives anyway: IoU in [bg_iou, fg_iou) or lower) and trains poorly, and a box with IoU 0 to
every anchor gets nothing. Which boxes those are depends on the preset's anchors and on the
input size, so they are computed on the real anchors (`retinanet.anchors.Anchors`) of the real
feature grid (`retinanet.postprocess.feature_grid_sizes`) of each resized, padded image.

Exact and fast: for anchors of one size, IoU falls as the anchor's centre moves away from the
box's in x or in y, so the best anchor of each level and cell shape sits at the grid position
nearest the box's centre. Each box is therefore compared with 4 positions x 9 shapes x 5 levels
= 180 anchors instead of all of them (~240k at 800 px), boxes grouped by padded image shape and
processed in chunks; `best_anchor_iou(..., exhaustive=True)` checks against every anchor.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.ops import box_iou

from pipelines.formats import inspect
from retinanet.anchors import Anchors
from retinanet.config import RetinaNetConfig
from retinanet.postprocess import feature_grid_sizes

WARN_SHARE = 0.20  # coverage_warning speaks when more boxes than this have no anchor at IoU >= fg_iou
_CHUNK = 16_384  # boxes per IoU batch: 180 candidates each, ~50 MB of float32


def padded_shape(height: float, width: float, size_divisible: int) -> tuple[int, int]:
    """A single image's padded batch shape, as pipelines.images.collate pads it."""
    return (int(-(-max(int(height), 1) // size_divisible) * size_divisible),
            int(-(-max(int(width), 1) // size_divisible) * size_divisible))


def best_anchor_iou(boxes: np.ndarray, padded: tuple[int, int], config: RetinaNetConfig,
                    exhaustive: bool = False) -> np.ndarray:
    """Best IoU with any anchor of a padded image shape, per xyxy box (resized pixels)."""
    generator = Anchors(config.anchor_sizes, config.aspect_ratios)
    grids = feature_grid_sizes(*padded, num_levels=len(config.anchor_sizes))
    anchors, per_level = generator(tuple(padded), grids, torch.device("cpu"), torch.float32)
    anchors = anchors.double()
    boxes_t = torch.as_tensor(np.asarray(boxes, np.float64).reshape(-1, 4))
    best = torch.zeros(len(boxes_t), dtype=torch.float64)
    if exhaustive:
        for start in range(0, len(boxes_t), 256):
            best[start:start + 256] = box_iou(boxes_t[start:start + 256], anchors).max(dim=1).values
        return best.numpy()
    cells = generator.num_per_location
    offsets = np.cumsum([0] + per_level[:-1])
    for start in range(0, len(boxes_t), _CHUNK):
        chunk = boxes_t[start:start + _CHUNK]
        cx, cy = (chunk[:, 0] + chunk[:, 2]) / 2, (chunk[:, 1] + chunk[:, 3]) / 2
        index = []
        for (gh, gw), offset in zip(grids, offsets):
            stride_y, stride_x = padded[0] // gh, padded[1] // gw
            xs = torch.floor(cx / stride_x).long()[:, None] + torch.tensor([0, 1])
            ys = torch.floor(cy / stride_y).long()[:, None] + torch.tensor([0, 1])
            xs, ys = xs.clamp(0, gw - 1), ys.clamp(0, gh - 1)
            position = (ys[:, :, None] * gw + xs[:, None, :]).reshape(len(chunk), 4)
            index.append((offset + position[:, :, None] * cells + torch.arange(cells)).reshape(len(chunk), -1))
        candidates = anchors[torch.cat(index, dim=1)]  # (n, 180, 4)
        best[start:start + len(chunk)] = _elementwise_iou(chunk[:, None, :], candidates).max(dim=1).values
    return best.numpy()


def _elementwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of broadcast xyxy boxes, box_iou's formula."""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def coverage_of_sample(sample: dict, config: RetinaNetConfig, num_classes: int) -> dict:
    """Coverage of a box sample (pipelines.formats.inspect): overall and per category index."""
    boxes, shapes = inspect.resized_boxes(sample, config.min_size, config.max_size)
    best = np.zeros(len(boxes))
    padded = np.array([padded_shape(h, w, config.size_divisible) for h, w in shapes.tolist()], np.int64).reshape(-1, 2)
    groups, inverse = np.unique(padded, axis=0, return_inverse=True)
    for g, shape in enumerate(groups.tolist()):
        members = np.flatnonzero(inverse.ravel() == g)
        best[members] = best_anchor_iou(boxes[members], tuple(shape), config)
    category = sample["category"].astype(np.int64)
    scale = np.sqrt(np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0))
    low = best < config.fg_iou
    per_class = [_shares(best[category == k], config) for k in range(num_classes)]
    smallest, largest = config.anchor_sizes[0], config.anchor_sizes[-1] * 2 ** (2 / 3)
    aspect = (boxes[:, 3] - boxes[:, 1]) / np.maximum(boxes[:, 2] - boxes[:, 0], 1e-9)
    return {
        **_shares(best, config),
        "best_iou_percentiles": {f"p{p}": round(float(v), 3) for p, v in zip(
            inspect.PERCENTILES, np.percentile(best, inspect.PERCENTILES))} if len(best) else None,
        "below_fg_by_reason": {  # why boxes without a positive anchor miss one
            "smaller_than_smallest_anchor": int((low & (scale < smallest)).sum()),
            "larger_than_largest_anchor": int((low & (scale > largest)).sum()),
            "other_shape_or_position": int((low & (scale >= smallest) & (scale <= largest)).sum()),
        },
        "below_fg_median_sqrt_area": round(float(np.median(scale[low])), 2) if low.any() else None,
        "below_fg_median_aspect": round(float(np.median(aspect[low])), 3) if low.any() else None,
        "per_class": per_class,
    }


def _shares(best: np.ndarray, config: RetinaNetConfig) -> dict:
    n = len(best)
    counts = {"positive": int((best >= config.fg_iou).sum()),
              "low_quality_ignore_band": int(((best >= config.bg_iou) & (best < config.fg_iou)).sum()),
              "low_quality_below_bg": int(((best > 0) & (best < config.bg_iou)).sum()),
              "no_anchor": int((best <= 0).sum())}
    return {"boxes": n, **counts, "share_below_fg": round((n - counts["positive"]) / n, 4) if n else None,
            "share_no_anchor": round(counts["no_anchor"] / n, 4) if n else None}


def anchor_coverage(manifest_uri: str, config: RetinaNetConfig, sample: int = inspect.DEFAULT_SAMPLE,
                    seed: int = 0, max_shards: int | None = None) -> dict:
    """Anchor coverage of the dataset at `manifest_uri` for `config` (anchors, min/max size):
    shares of boxes whose best anchor IoU is >= fg_iou, only a low-quality match, or none."""
    scanned = inspect.scan(manifest_uri, sample=sample, seed=seed, max_shards=max_shards)
    return coverage_report(scanned, config)


def coverage_report(scanned: inspect.Scan, config: RetinaNetConfig) -> dict:
    result = coverage_of_sample(scanned.sample, config, len(scanned.categories))
    for row, cat in zip(result["per_class"], scanned.categories):
        row.update(category_id=cat["id"], name=cat["name"])
    result.update(
        image_size=config.min_size, max_size=config.max_size, anchor_sizes=list(config.anchor_sizes),
        aspect_ratios=list(config.aspect_ratios), fg_iou=config.fg_iou, bg_iou=config.bg_iou,
        sampled=scanned.sampled, sample_size=len(scanned.sample["key"]), total_boxes=scanned.num_boxes,
        note=(f"coverage over a seeded sample of {len(scanned.sample['key'])} of {scanned.num_boxes} boxes"
              if scanned.sampled else "coverage over every non-crowd box"))
    return result


def coverage_warning(result: dict, threshold: float = WARN_SHARE) -> str | None:
    """One line when more than `threshold` of the boxes have no anchor at IoU >= fg_iou, naming
    the fix (jobs.train's --image-size, or the preset's anchors), else None."""
    share = result.get("share_below_fg")
    if share is None or share <= threshold:
        return None
    reasons = result["below_fg_by_reason"]
    size, anchors = result["image_size"], result["anchor_sizes"]
    head = (f"anchor coverage: {share:.0%} of boxes have no anchor with IoU >= {result['fg_iou']} at --image-size "
            f"{size} (anchors {anchors[0]}-{anchors[-1]} px)")
    dominant = max(reasons, key=reasons.get)
    median = result.get("below_fg_median_sqrt_area") or 0
    if dominant == "smaller_than_smallest_anchor" and median > 0:
        target = _round_to(size * anchors[0] / median, 32)
        return (f"{head}, mostly smaller than the smallest anchor (median {median:.0f} px): train with a larger "
                f"--image-size (about {target})"
                + (" or the tiny preset (anchors from 16 px)" if anchors[0] > 16 else ""))
    if dominant == "larger_than_largest_anchor" and median > 0:
        target = _round_to(size * anchors[-1] * 2 ** (2 / 3) / median, 32)
        return (f"{head}, mostly larger than the largest anchor (median {median:.0f} px): train with a smaller "
                f"--image-size (about {target}) or a preset with larger anchors (r50/r101 go to 512 px)")
    return (f"{head}, mostly boxes of other shapes (median height/width {result.get('below_fg_median_aspect')}; "
            f"anchor aspect ratios {result['aspect_ratios']}): jobs.train has no flag for anchor shapes "
            "(RetinaNetConfig.aspect_ratios / anchor_sizes in retinanet/config.py); try another --image-size")


def _round_to(value: float, step: int) -> int:
    return max(step, int(math.ceil(value / step) * step))
