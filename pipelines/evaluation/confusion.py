"""A confusion matrix of detections at one IoU and one score threshold, with a background class.

Rows are ground-truth classes, columns predicted classes; the last row and column are
"background": a detection that matches no ground-truth box counts in the background row (a false
positive), a ground-truth box that no detection matches in the background column (a miss).

Matching is COCO's greedy rule (`greedy.match_groups`), in two passes per image, so that the
diagonal is exactly COCO's true positives at that IoU among the detections above the score:
1. each detection, by descending score, takes the best free box of its own class (IoU >= iou);
   one that lands on a crowd region is neither right nor wrong and leaves the matrix;
2. the detections still unmatched, again by descending score, take the best free box of any
   class: these are the class confusions (off the diagonal, never same-class by construction).
Whatever is left is background. The counts add over images, so any subset of prediction files
gives its part of the matrix.
"""
from __future__ import annotations

import io

import numpy as np

from pipelines.evaluation.errors import ann_images, taken_flag
from pipelines.evaluation.greedy import match_groups
from pipelines.evaluation.matching import GroundTruthColumns, rank_within_runs


def confusion_counts(gt: GroundTruthColumns, images: np.ndarray, image: np.ndarray, category: np.ndarray,
                     box: np.ndarray, score: np.ndarray, iou: float, min_score: float) -> tuple[np.ndarray, int]:
    """((K+1, K+1) int64 counts, detections on crowd regions) for the ground truth of `images`
    (image indexes, e.g. the rows of a few prediction files) and their detections, given in
    canonical order (image, then score descending) as indexes into gt.image_ids / category_ids."""
    k = gt.num_categories
    matrix = np.zeros((k + 1, k + 1), np.int64)
    keep = score >= min_score
    image, category, box = image[keep], category[keep], box[keep]
    ann = np.flatnonzero(np.isin(ann_images(gt), images))
    ann_image, ann_class, crowd = ann_images(gt)[ann], gt.ann_category[ann], gt.ann_crowd[ann]
    # pass 1: own class
    key = image.astype(np.int64) * k + category
    order = np.argsort(key, kind="stable")
    node_key = ann_image.astype(np.int64) * k + ann_class
    nodes = np.argsort(node_key, kind="stable")
    own = np.full(len(key), -1, np.int64)
    own[order] = match_groups(key[order], rank_within_runs(key[order]), box[order], node_key[nodes],
                              gt.ann_box[ann[nodes]], crowd[nodes], crowd[nodes], np.array([iou]))[:, 0]
    on_crowd = taken_flag(own, crowd[nodes])
    true_positive = (own >= 0) & ~on_crowd
    np.add.at(matrix, (category[true_positive], category[true_positive]), 1)
    # pass 2: the rest, against the non-crowd boxes still free, any class
    taken = np.zeros(len(ann), bool)
    taken[nodes[own[true_positive]]] = True
    rest = np.flatnonzero(own < 0)  # canonical order kept: image, then score
    free = np.flatnonzero(~taken & ~crowd)  # by image (annotations are grouped by image)
    other = match_groups(image[rest].astype(np.int64), rank_within_runs(image[rest]), box[rest],
                         ann_image[free].astype(np.int64), gt.ann_box[ann[free]], crowd[free], crowd[free],
                         np.array([iou]))[:, 0]
    confused = other >= 0
    np.add.at(matrix, (ann_class[free[other[confused]]], category[rest[confused]]), 1)
    taken[free[other[confused]]] = True
    np.add.at(matrix, (k, category[rest[~confused]]), 1)  # false positives: background row
    missed = ~taken & ~crowd
    np.add.at(matrix, (ann_class[missed], k), 1)  # misses: background column
    return matrix, int(on_crowd.sum())


def confusion_csv(matrix: np.ndarray, names: list[str]) -> str:
    """Rows: ground truth; columns: predicted; 'background' last in both."""
    labels = [*names, "background"]
    lines = ["ground_truth \\ predicted," + ",".join(_csv_cell(n) for n in labels)]
    lines += [_csv_cell(label) + "," + ",".join(str(int(v)) for v in row) for label, row in zip(labels, matrix)]
    return "\n".join(lines) + "\n"


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def confusion_png(matrix: np.ndarray, names: list[str], iou: float, min_score: float) -> bytes:
    """Row-normalized colours (share of each ground-truth class), counts written in the cells
    while they stay legible (up to 30 classes)."""
    from matplotlib.figure import Figure  # no pyplot: no global state

    labels = [*names, "background"]
    n = len(labels)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    side = min(24.0, 3.0 + 0.45 * n)
    fig = Figure(figsize=(side, side * 0.9), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    if n <= 30:
        for (r, c), value in np.ndenumerate(matrix):
            if value:
                ax.text(c, r, str(int(value)), ha="center", va="center", fontsize=8,
                        color="white" if shares[r, c] > 0.5 else "black")
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels, rotation=90, fontsize=8 if n <= 30 else 5)
    ax.set_yticks(ticks, labels, fontsize=8 if n <= 30 else 5)
    ax.set(xlabel="predicted", ylabel="ground truth",
           title=f"Confusion at IoU {iou:g}, score >= {min_score:g} (background: misses / false positives)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
