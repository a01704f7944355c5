"""Scoring detections against COCO ground truth with pycocotools' exact numbers.

Predictions arrive as many Parquet files (one per unit of inference work, in any order), and COCO
AP must not depend on how they were split. So reading is columnar (pyarrow flattens the
`detections` lists, numpy converts boxes and keeps the top-k per image), every detection is put in
one canonical order (by image id, then by score, stable), and the scoring itself is delegated:
faster-coco-eval by default (its C++ evaluate/accumulate reproduce pycocotools to ~1e-16, several
times faster), pycocotools on request (`engine="pycocotools"`) to cross-check.

The only per-detection Python step is `_result_annotations`: the COCO API's data model is one
dict per detection, so that list is built once, in one comprehension over plain Python lists.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np

from pipelines.errors import UserError
from pipelines.evaluation.accumulate import lvis_summary
from pipelines.evaluation.inputs import Predictions, load_ground_truth, load_json, read_predictions  # noqa: F401
from pipelines.evaluation.matching import IOU_THRESHOLDS, rank_within_runs

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
ENGINES = ("faster-coco-eval", "pycocotools")  # single-process COCO API engines; jobs.evaluate's default is
# "sharded" (pipelines.evaluation.sharded: same numbers, parallel, no Python object per detection)
PROTOCOLS = ("coco", "lvis")
DEFAULT_MAX_DETS = {"coco": 100, "lvis": 300}
FREQUENCIES = {"r": "rare", "c": "common", "f": "frequent"}  # LVIS categories' `frequency` field


def detect_protocol(ground_truth: dict) -> str:
    """'lvis' for LVIS's federated ground truth (categories with `frequency`, images listing
    `neg_category_ids` / `not_exhaustive_category_ids`), 'coco' otherwise."""
    categories, images = ground_truth["categories"], ground_truth["images"]
    federated = any("neg_category_ids" in i or "not_exhaustive_category_ids" in i for i in images[:1000])
    return "lvis" if federated or (categories and all("frequency" in c for c in categories)) else "coco"
def to_coco_results(predictions: Predictions, ground_truth: dict, max_dets: int = 100) -> np.ndarray:
    """COCO results as an (n, 7) array [image_id, x, y, w, h, score, category_id].

    Checks the predictions against the ground truth first (image ids, category ids, one row per
    image), then keeps the top `max_dets` per image in `canonical_order`.
    """
    gt_images = np.array([img["id"] for img in ground_truth["images"]], dtype=np.int64)
    gt_categories = np.array([c["id"] for c in ground_truth["categories"]], dtype=np.int64)
    check_rows(predictions, gt_images, gt_categories)
    image_id, order = canonical_order(predictions, max_dets)
    return np.column_stack(
        [image_id, predictions.boxes[order], predictions.scores[order], predictions.category_ids[order]]
    ).astype(np.float64, copy=False)


def canonical_order(predictions: Predictions, max_dets: int) -> tuple[np.ndarray, np.ndarray]:
    """(image id, index) of the detections kept, by image id then descending score, stably.

    Ties keep their order inside a row, so the result does not depend on how rows were split into
    files; pycocotools and lvis-api sort the same way (mergesort; Python's stable sort), so the AP
    equals that of the merged results json. Only the top `max_dets` per image are kept (LVIS's
    LVISResults cap, and COCO's top 100).
    """
    image_id = predictions.row_image_id[predictions.det_row]
    order = np.lexsort((-predictions.scores, image_id))
    order = order[rank_within_runs(image_id[order]) < max_dets]
    return image_id[order], order


def check_rows(predictions: Predictions, gt_images: np.ndarray, gt_categories: np.ndarray) -> None:
    """Predictions that cannot belong to these annotations are user errors, named by file and column."""
    files, rows = predictions.files, predictions.row_image_id
    unknown = np.flatnonzero(~np.isin(rows, gt_images))
    if len(unknown):
        first = unknown[0]
        raise UserError(
            f"{files[predictions.row_file[first]]}: column 'image_id' has value {rows[first]}, absent from the "
            f"annotations ({len(unknown)} row(s) in all); predictions and --annotations must be of one image set"
        )
    check_unique_rows(rows, predictions.row_file, files)
    bad = np.flatnonzero(~np.isin(predictions.category_ids, gt_categories))
    if len(bad):
        first = bad[0]
        raise UserError(
            f"{files[predictions.row_file[predictions.det_row[first]]]}: column 'detections.category_id' has "
            f"value {predictions.category_ids[first]}, not a category of the annotations (known: "
            f"{_id_list(gt_categories)}); use the dataset's own category ids"
        )


def check_unique_rows(rows: np.ndarray, row_file: np.ndarray, files: list[str]) -> None:
    """Each image predicted once: a second row (a stale or duplicated file) is a user error."""
    ids, counts = np.unique(rows, return_counts=True)
    if (counts > 1).any():
        dup = ids[np.argmax(counts > 1)]
        where = sorted({files[i] for i in row_file[rows == dup]})
        also = f" (also in {', '.join(where[1:])})" if len(where) > 1 else ""
        raise UserError(
            f"{where[0]}: column 'image_id' has value {dup} in {counts.max()} rows{also}; each image must be "
            "predicted once: remove stale or duplicated prediction files"
        )


def _id_list(ids: np.ndarray, limit: int = 12) -> str:
    ids = np.sort(ids)
    text = ", ".join(str(i) for i in ids[:limit])
    return text + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


@dataclass
class Evaluation:
    """What COCOeval produced, kept as arrays for reports (per-category AP, PR curves)."""

    stats: dict[str, float]
    precision: np.ndarray  # [iou, recall, category, area, max_dets], -1 where a category has no ground truth
    category_ids: list[int]  # order of the category axis
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    protocol: str = "coco"
    max_dets: int = 100  # the largest of COCOeval's maxDets (LVIS: 300)


def evaluate(ground_truth: dict, results: np.ndarray | list[dict], engine: str = "faster-coco-eval",
             protocol: str = "coco", max_dets: int | None = None) -> Evaluation:
    """COCOeval for bounding boxes over every ground-truth image, by COCO's or LVIS's protocol.

    `results` is an (n, 7) array as from `to_coco_results` or a COCO results list of dicts.
    Images without detections count as misses (COCOeval's image ids come from the ground truth).
    LVIS (faster-coco-eval's `lvis_style`, which reproduces lvis-api): one `max_dets` (300) per
    image and category, detections of categories an image neither has nor lists in
    `neg_category_ids` dropped, unmatched ones of `not_exhaustive_category_ids` ignored, and
    APr/APc/APf over the categories' `frequency`. Keeping the top `max_dets` per image across
    categories (lvis-api's LVISResults) is `to_coco_results`' job.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    max_dets = max_dets or DEFAULT_MAX_DETS[protocol]
    if protocol == "lvis":
        check_lvis(ground_truth, engine)
    if engine == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    annotations = _result_annotations(_as_results_array(results))
    # COCOeval writes an "ignore" flag into each ground-truth dict: give it copies, not the caller's.
    ground_truth = dict(ground_truth, annotations=[dict(a) for a in ground_truth["annotations"]])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; we print our own summary
        gt = _coco(COCO, ground_truth)
        dt = _coco(COCO, {"images": ground_truth["images"], "categories": ground_truth["categories"],
                          "annotations": annotations})
        evaluator = COCOeval(gt, dt, "bbox", **({"lvis_style": True} if protocol == "lvis" else {}))
        if protocol == "lvis":
            evaluator.params.maxDets = [max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
        if protocol == "coco":
            evaluator.summarize()
    params = evaluator.params
    precision = np.asarray(evaluator.eval["precision"])
    if protocol == "lvis":
        stats = lvis_summary(precision, np.asarray(evaluator.eval["recall"]), evaluator.freq_groups, max_dets)
    else:
        stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats[:12])}
    return Evaluation(stats=stats, precision=precision, category_ids=[int(c) for c in params.catIds],
                      iou_thresholds=np.asarray(params.iouThrs), recall_thresholds=np.asarray(params.recThrs),
                      protocol=protocol, max_dets=int(params.maxDets[-1]))


def curves_to_evaluation(precision: np.ndarray, recall: np.ndarray, ground_truth: dict, category_ids: np.ndarray,
                         protocol: str, max_dets: list[int]) -> Evaluation:
    """An Evaluation from accumulated curves (pycocotools' layout), with COCO's or LVIS's stats."""
    from pipelines.evaluation.accumulate import RECALL_THRESHOLDS, coco_summary

    if protocol == "lvis":
        frequency = {c["id"]: c["frequency"] for c in ground_truth["categories"]}
        groups = [[k for k, c in enumerate(category_ids.tolist()) if frequency[c] == f] for f in FREQUENCIES]
        stats = lvis_summary(precision, recall, groups, max_dets[-1])
    else:
        stats = dict(zip(STAT_NAMES, coco_summary(precision, recall)))
    return Evaluation(stats=stats, precision=precision, category_ids=category_ids.tolist(),
                      iou_thresholds=IOU_THRESHOLDS, recall_thresholds=RECALL_THRESHOLDS, protocol=protocol,
                      max_dets=max_dets[-1])


def check_lvis(ground_truth: dict, engine: str) -> None:
    if engine == "pycocotools":
        raise UserError(f"--engine {engine}: has no LVIS protocol; use --engine sharded or faster-coco-eval (both "
                        "reproduce lvis-api) or --protocol coco")
    unknown = [c.get("id") for c in ground_truth["categories"] if c.get("frequency") not in FREQUENCIES]
    if unknown:
        raise UserError(f"--annotations: category {unknown[0]} has no LVIS 'frequency' (r, c or f) "
                        f"({len(unknown)} in all); give LVIS ground truth or use --protocol coco")


def coco_stats(ground_truth: dict, results: np.ndarray | list[dict]) -> dict[str, float]:
    """The 12 COCO bbox stats (AP, AP50, ..., ARl) of `results` against a COCO ground-truth dict."""
    return evaluate(ground_truth, results).stats


def _as_results_array(results: np.ndarray | list[dict]) -> np.ndarray:
    if isinstance(results, np.ndarray):
        array = results.astype(np.float64, copy=False).reshape(-1, 7) if results.size else np.zeros((0, 7))
        if array.shape[1] != 7:
            raise ValueError("results array must have 7 columns: image_id, x, y, w, h, score, category_id")
        return array
    return np.array(
        [(r["image_id"], *r["bbox"], r["score"], r["category_id"]) for r in results], dtype=np.float64
    ).reshape(-1, 7)


def _result_annotations(results: np.ndarray) -> list[dict]:
    """Result dicts exactly as COCO.loadRes makes them for boxes (area = w * h, iscrowd 0)."""
    columns = [results[:, 0].astype(np.int64).tolist(), results[:, 6].astype(np.int64).tolist(),
               results[:, 1:5].tolist(), results[:, 5].tolist(), (results[:, 3] * results[:, 4]).tolist()]
    return [
        {"id": k, "image_id": i, "category_id": c, "bbox": b, "score": s, "area": a, "iscrowd": 0}
        for k, (i, c, b, s, a) in enumerate(zip(*columns), start=1)
    ]


def _coco(coco_class, dataset: dict):
    """A COCO API object over a dict already in memory (pycocotools' constructor only reads files)."""
    coco = coco_class()
    coco.dataset = dataset
    coco.createIndex()
    return coco
