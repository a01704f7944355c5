"""Analysis after evaluation: per-category AP, a confusion matrix, COCO's error breakdown and the
best and worst images, in one pass over the prediction files.

The prediction files are read a few at a time (`sharded.plan_tasks`' groups, column-wise as
jobs.evaluate reads them); each group is matched on its own (every image is in one row, so in one
group) and leaves behind only what adds up: its share of the confusion matrix, ~20 bytes per
detection for the error breakdown (`errors.StageMatches`), one AP per image, and the detections of
the images that are at the moment among the best or worst `keep_images`. Memory therefore grows
with the detections scored (top 100 per image), not with the files' bytes: ~2 GB at 100M
detections.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.errors import UserError
from pipelines.evaluation import confusion, errors, inputs, sharded
from pipelines.evaluation.accumulate import RECALL_THRESHOLDS
from pipelines.evaluation.matching import IOU_THRESHOLDS, GroundTruthColumns, ground_truth_columns
from pipelines.evaluation.progress import Progress
from pipelines.evaluation.scoring import STAT_NAMES, Evaluation, canonical_order, check_rows, check_unique_rows


@dataclass
class Analysis:
    gt: GroundTruthColumns
    evaluation: Evaluation  # per-category COCO AP (area all, 100 detections), for pipelines.evaluation.report
    stages: np.ndarray  # [7, R, K] precision per error stage (errors.STAGES)
    confusion: np.ndarray  # (K+1, K+1) counts, background last
    on_crowd: int  # detections above the score that landed on crowd regions (not in the matrix)
    image_ap: np.ndarray  # per gt image (gt.image_ids order), NaN for images without ground truth
    has_row: np.ndarray  # bool per gt image: a prediction row exists
    detections_per_category: dict[int, int]
    kept: dict[int, list[dict]] = field(default_factory=dict)  # image id -> detections, best/worst only
    files: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    supercategories: bool = True


def supercategory_codes(ground_truth: dict, category_ids: np.ndarray) -> np.ndarray | None:
    """A code per category index from the categories' `supercategory`; None when no category
    has one (then Sim equals Loc: there is nothing to tell similar classes apart by)."""
    names = {c["id"]: c.get("supercategory") for c in ground_truth["categories"]}
    values = [names.get(int(c)) for c in category_ids]
    if all(v in (None, "") for v in values):
        return None
    labels = sorted({str(v) for v in values})
    return np.array([labels.index(str(v)) for v in values], np.int64)


def read_groups(uri: str):
    """(files, iterator of (file indexes, Predictions)) a few files at a time; a results json is one group."""
    if uri.rstrip("/").endswith(".json"):
        predictions = inputs.read_results_json(uri)
        return predictions.files, iter([(np.zeros(1, np.int32), predictions)])
    files = sharded.list_prediction_files(uri)

    def groups():
        for task in sharded.plan_tasks(sharded.file_sizes(files)):
            parts = [inputs._read_file(files[i]) for i in task]
            columns = inputs._concat(parts)
            yield np.asarray(task, np.int32), inputs.Predictions(
                files=[files[i] for i in task], row_image_id=columns["image_id"],
                row_file=np.repeat(np.arange(len(task), dtype=np.int32), [len(p["image_id"]) for p in parts]),
                det_row=columns["det_row"], boxes=columns["boxes"], scores=columns["scores"],
                category_ids=columns["category_ids"], errors=columns["errors"], models=sorted(columns["models"]))
    return files, groups()


def analyze(predictions_uri: str, ground_truth: dict, iou: float, min_score: float, keep_images: int = 0,
            progress: Progress | None = None) -> Analysis:
    """Everything jobs.analyze reports, for the predictions at `predictions_uri` (jobs.infer's
    Parquet or a COCO results json) against a COCO ground-truth dict."""
    if not 0 < iou <= 1:
        raise UserError(f"--iou {iou}: give an IoU in (0, 1]")
    if not 0 <= min_score <= 1:
        raise UserError(f"--score {min_score}: give a score in [0, 1]")
    progress = progress or Progress(every_s=None)
    gt = ground_truth_columns(ground_truth, "coco")
    supercategory = supercategory_codes(ground_truth, gt.category_ids)
    k, n = gt.num_categories, len(gt.image_ids)
    files, groups = read_groups(predictions_uri)
    matrix, on_crowd = np.zeros((k + 1, k + 1), np.int64), 0
    image_ap, has_row = np.full(n, np.nan), np.zeros(n, bool)
    per_category = np.zeros(k, np.int64)
    names = {c["id"]: c.get("name", str(c["id"])) for c in ground_truth["categories"]}
    parts, kept, row_ids, row_files, row_errors, read = [], {}, [], [], [], 0
    for file_index, predictions in groups:
        check_rows(predictions, gt.image_ids, gt.category_ids)
        image_id, order = canonical_order(predictions, errors.MAX_DETS)
        image = np.searchsorted(gt.image_ids, image_id)
        category = np.searchsorted(gt.category_ids, predictions.category_ids[order])
        box, score = predictions.boxes[order], predictions.scores[order]
        rows = np.unique(np.searchsorted(gt.image_ids, predictions.row_image_id))
        has_row[rows] = True
        matches = errors.match_stages(gt, image, category, box, score, supercategory)
        parts.append(matches)
        image_ap[rows] = errors.images_ap(gt, matches, rows)
        counts, crowd = confusion.confusion_counts(gt, rows, image, category, box, score, iou, min_score)
        matrix += counts
        on_crowd += crowd
        per_category += np.bincount(category, minlength=k)
        if keep_images:  # best and worst among those kept so far and this group's: the rest can never be
            candidates = np.r_[np.searchsorted(gt.image_ids, np.array(list(kept), np.int64)), rows]
            best, worst = best_and_worst(gt, image_ap, keep_images, candidates)
            kept = {i: d for i, d in kept.items() if i in best or i in worst}
            kept.update(_detections_of(gt, names, image, category, box, score, [*best, *worst], kept))
        row_ids.append(predictions.row_image_id)
        row_files.append(file_index[predictions.row_file])
        row_errors += predictions.errors
        read += len(file_index)
        progress.update("analyzed", min(read, len(files)), len(files), "files", f"{int(has_row.sum())} images")
    if row_ids:
        check_unique_rows(np.concatenate(row_ids), np.concatenate(row_files), files)
    _add_images_without_rows(gt, has_row, matrix, image_ap)
    merged = errors.merge(parts) if parts else errors.merge([errors.match_stages(
        gt, *(np.zeros(0, np.int64),) * 2, np.zeros((0, 4)), np.zeros(0), supercategory)])
    coco, stages = errors.stage_precision(merged, gt.positives()[:, 0])
    best, worst = best_and_worst(gt, image_ap, keep_images)
    kept = {i: kept.get(i, []) for i in [*best, *worst]}
    return Analysis(gt=gt, evaluation=_evaluation(coco, gt), stages=stages, confusion=matrix, on_crowd=on_crowd,
                    image_ap=image_ap, has_row=has_row, kept=kept, files=files, errors=row_errors,
                    detections_per_category=dict(zip(gt.category_ids.tolist(), per_category.tolist())),
                    supercategories=supercategory is not None)


def _add_images_without_rows(gt: GroundTruthColumns, has_row: np.ndarray, matrix: np.ndarray,
                             image_ap: np.ndarray) -> None:
    """An image no prediction row covers: all its boxes are misses and its AP is 0 (if it has any)."""
    missing = np.flatnonzero(~has_row)
    ann = np.flatnonzero(np.isin(errors.ann_images(gt), missing) & ~gt.ann_crowd)
    np.add.at(matrix, (gt.ann_category[ann], gt.num_categories), 1)
    positives = np.bincount(errors.ann_images(gt)[~gt.ignored()[:, 0]], minlength=len(gt.image_ids))
    image_ap[missing[positives[missing] > 0]] = 0.0


def best_and_worst(gt: GroundTruthColumns, image_ap: np.ndarray, count: int,
                   among: np.ndarray | None = None) -> tuple[list[int], list[int]]:
    """Image ids of the `count` best and the `count` worst images with ground truth (ties: lower
    id first); the two lists overlap when there are fewer than 2 x count such images."""
    scored = np.arange(len(image_ap)) if among is None else np.unique(among)
    scored = scored[~np.isnan(image_ap[scored])]
    ids, ap = gt.image_ids[scored], image_ap[scored]
    return ids[np.lexsort((ids, -ap))][:count].tolist(), ids[np.lexsort((ids, ap))][:count].tolist()


def _detections_of(gt: GroundTruthColumns, names: dict, image, category, box, score, wanted: list[int],
                   kept: dict) -> dict:
    """Detections (jobs.visualize's dicts) of the `wanted` image ids not yet kept."""
    out = {}
    for image_id in wanted:
        if image_id in kept or image_id in out:
            continue
        sel = np.flatnonzero(image == np.searchsorted(gt.image_ids, image_id))
        out[image_id] = [{"x1": b[0], "y1": b[1], "x2": b[0] + b[2], "y2": b[1] + b[3], "score": s,
                          "category_id": int(gt.category_ids[c]), "category": names[int(gt.category_ids[c])]}
                         for b, s, c in zip(box[sel].tolist(), score[sel].tolist(), category[sel].tolist())]
    return out


def _evaluation(coco: np.ndarray, gt: GroundTruthColumns) -> Evaluation:
    """COCO's per-category curves (area all, 100 detections) in the layout the report reads."""
    precision = coco[:, :, :, None, None]
    stats = dict.fromkeys(STAT_NAMES, -1.0)
    for name, lanes in (("AP", slice(None)), ("AP50", [0]), ("AP75", [5])):
        values = coco[lanes]
        values = values[values > -1]
        stats[name] = float(values.mean()) if values.size else -1.0
    return Evaluation(stats=stats, precision=precision, category_ids=gt.category_ids.tolist(),
                      iou_thresholds=IOU_THRESHOLDS, recall_thresholds=RECALL_THRESHOLDS, max_dets=errors.MAX_DETS)
