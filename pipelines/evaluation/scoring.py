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
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import UserError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
ENGINES = ("faster-coco-eval", "pycocotools")
_SCHEMA_HINT = "the predictions schema of DESIGN.md, as written by jobs.infer"
_DETECTION_FIELDS = {  # name -> (type check, expected type in messages)
    "x1": (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "float64"),
    "y1": (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "float64"),
    "x2": (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "float64"),
    "y2": (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "float64"),
    "score": (pa.types.is_floating, "float32"),
    "category_id": (pa.types.is_integer, "int32"),
}
_BATCH_ROWS = 16_384  # Parquet rows decoded at a time: memory stays bounded whatever the file size
_READ_THREADS = 8  # files in flight: object stores are latency-bound, pyarrow releases the GIL


@dataclass
class Predictions:
    """All rows of a predictions folder as flat numpy columns (no per-row Python objects).

    Rows are images (`row_*`, one entry per Parquet row); detections are flattened
    (`det_row` points each detection at its row), so a million detections cost ~50 MB.
    """

    files: list[str]
    row_image_id: np.ndarray  # int64
    row_file: np.ndarray  # int32 index into `files`
    det_row: np.ndarray  # int64 index into the rows
    boxes: np.ndarray  # (n, 4) float64 x1, y1, x2, y2 in original pixels
    scores: np.ndarray  # float64 (stored as float32)
    category_ids: np.ndarray  # int64
    errors: list[dict] = field(default_factory=list)  # rows with `error` set: file, image_id, uri, error
    models: list[str] = field(default_factory=list)  # distinct values of the `model` column

    @property
    def num_rows(self) -> int:
        return len(self.row_image_id)


def load_json(uri: str) -> object:
    """A JSON document from any URI; a malformed one is a user error naming it."""
    try:
        return json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{uri}: not valid JSON ({str(exc).splitlines()[0]})") from None


def load_ground_truth(uri: str) -> dict:
    """Read a COCO annotations json and check the keys evaluation relies on."""
    data = load_json(uri)
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"{uri}: missing COCO key(s) {', '.join(missing)}; give a COCO instances json")
    return data


def read_predictions(uri: str) -> Predictions:
    """Read every Parquet file under `uri` (a file, a folder or a bucket prefix)."""
    files = storage.list_files(uri, suffixes=[".parquet"])
    if not files:
        raise UserError(f"{uri}: no .parquet files found; give the --output of jobs.infer")
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(files))) as pool:
        parts = list(pool.map(_read_file, files))
    columns = _concat(parts)
    return Predictions(
        files=files,
        row_image_id=columns.pop("image_id"),
        row_file=np.repeat(np.arange(len(files), dtype=np.int32), [len(p["image_id"]) for p in parts]),
        models=sorted(columns.pop("models")),
        **columns,
    )


def _read_file(uri: str) -> dict:
    fs, path = storage.arrow_filesystem(uri)
    try:
        handle = fs.open_input_file(path)
    except OSError as exc:
        raise storage.describe_error(uri, exc) from None
    with handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{uri}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        _check_schema(parquet.schema_arrow, uri)
        columns = [c for c in ("image_id", "detections", "error", "uri", "model") if c in parquet.schema_arrow.names]
        batches = [_read_batch(b, uri) for b in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns)]
        if not batches:  # a file with no rows still contributes typed, empty columns
            schema = pa.schema([parquet.schema_arrow.field(c) for c in columns])
            batches = [_read_batch(pa.RecordBatch.from_pylist([], schema=schema), uri)]
    return _concat(batches)


def _concat(parts: list[dict]) -> dict:
    """Join the columns of consecutive row ranges (batches of a file, files of a folder)."""
    row_offsets = np.cumsum([0] + [len(p["image_id"]) for p in parts[:-1]])
    return {
        "image_id": np.concatenate([p["image_id"] for p in parts]),
        "det_row": np.concatenate([p["det_row"] + offset for p, offset in zip(parts, row_offsets)]),
        "boxes": np.concatenate([p["boxes"] for p in parts]),
        "scores": np.concatenate([p["scores"] for p in parts]),
        "category_ids": np.concatenate([p["category_ids"] for p in parts]),
        "errors": [e for p in parts for e in p["errors"]],
        "models": set().union(*(p["models"] for p in parts)),
    }


def _check_schema(schema: pa.Schema, uri: str) -> None:
    """Fail on the first column that differs from the predictions schema, naming it."""

    def wrong(column: str, found: object, expected: str) -> UserError:
        return UserError(f"{uri}: column '{column}' is {found}, expected {expected} ({_SCHEMA_HINT})")

    for name in ("image_id", "detections"):
        if name not in schema.names:
            raise UserError(f"{uri}: column '{name}' is missing; expected {_SCHEMA_HINT}")
    if not pa.types.is_integer(schema.field("image_id").type):
        raise wrong("image_id", schema.field("image_id").type, "int64")
    det_type = schema.field("detections").type
    expected = "list<struct<x1, y1, x2, y2: float64, score: float32, category_id: int32, category: string>>"
    if not (pa.types.is_list(det_type) or pa.types.is_large_list(det_type)) or not pa.types.is_struct(
        det_type.value_type
    ):
        raise wrong("detections", det_type, expected)
    struct = det_type.value_type
    for name, (accepts, expected_type) in _DETECTION_FIELDS.items():
        if struct.get_field_index(name) < 0:
            raise UserError(f"{uri}: column 'detections.{name}' is missing; expected {expected}")
        if not accepts(struct.field(name).type):
            raise wrong(f"detections.{name}", struct.field(name).type, expected_type)
    for name in ("error", "uri", "model"):
        if name in schema.names:
            t = schema.field(name).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
                raise wrong(name, t, "string")


def _read_batch(batch: pa.RecordBatch, uri: str) -> dict:
    """One record batch -> flat numpy columns, with nulls where values are needed rejected."""
    image_id = batch.column("image_id")
    if image_id.null_count:
        raise UserError(
            f"{uri}: column 'image_id' has {image_id.null_count} null value(s); predictions of custom images "
            "(no COCO image id) cannot be scored against COCO annotations"
        )
    detections = batch.column("detections")
    lengths = pc.fill_null(pc.list_value_length(detections), 0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(detections)
    if flat.null_count:
        raise UserError(f"{uri}: column 'detections' holds {flat.null_count} null detection(s)")
    values = {}
    for name in _DETECTION_FIELDS:
        column = pc.struct_field(flat, name)
        if column.null_count:
            raise UserError(f"{uri}: column 'detections.{name}' has {column.null_count} null value(s)")
        values[name] = column.to_numpy(zero_copy_only=False)
        bad = np.count_nonzero(~np.isfinite(values[name])) if values[name].dtype.kind == "f" else 0
        if bad:
            raise UserError(f"{uri}: column 'detections.{name}' has {bad} NaN or infinite value(s)")
    errors, models = [], set()
    if "error" in batch.schema.names and batch.column("error").null_count < batch.num_rows:
        failed = batch.select([c for c in ("image_id", "uri", "error") if c in batch.schema.names])
        errors = [dict(row, file=uri) for row in failed.filter(pc.is_valid(batch.column("error"))).to_pylist()]
    if "model" in batch.schema.names:
        models = set(pc.unique(batch.column("model")).drop_null().to_pylist())
    return {
        "image_id": image_id.to_numpy(zero_copy_only=False).astype(np.int64, copy=False),
        "det_row": np.repeat(np.arange(batch.num_rows, dtype=np.int64), lengths),
        "boxes": np.stack([values[k].astype(np.float64, copy=False) for k in ("x1", "y1", "x2", "y2")], axis=1),
        "scores": values["score"].astype(np.float64),
        "category_ids": values["category_id"].astype(np.int64, copy=False),
        "errors": errors,
        "models": models,
    }


def to_coco_results(predictions: Predictions, ground_truth: dict, max_dets: int = 100) -> np.ndarray:
    """COCO results as an (n, 7) array [image_id, x, y, w, h, score, category_id].

    Checks the predictions against the ground truth first (image ids, category ids, one row per
    image). Detections are ordered by image id then descending score, stably, so ties keep their
    order inside a row and the result does not depend on how rows were split into files; pycocotools
    sorts the same way (mergesort), so the AP equals that of the merged results json.
    Only the top `max_dets` per image are kept.
    """
    _check_against_ground_truth(predictions, ground_truth)
    image_id = predictions.row_image_id[predictions.det_row]
    order = np.lexsort((-predictions.scores, image_id))
    order = order[_rank_within_runs(image_id[order]) < max_dets]
    x1, y1, x2, y2 = predictions.boxes[order].T
    return np.column_stack(
        [image_id[order], x1, y1, x2 - x1, y2 - y1, predictions.scores[order], predictions.category_ids[order]]
    ).astype(np.float64, copy=False)


def _rank_within_runs(sorted_keys: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal consecutive keys."""
    n = len(sorted_keys)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if n else np.zeros(0, np.int64)
    return np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))


def _check_against_ground_truth(predictions: Predictions, ground_truth: dict) -> None:
    """Predictions that cannot belong to these annotations are user errors, named by file and column."""
    files, rows = predictions.files, predictions.row_image_id
    gt_images = np.array([img["id"] for img in ground_truth["images"]], dtype=np.int64)
    unknown = np.flatnonzero(~np.isin(rows, gt_images))
    if len(unknown):
        first = unknown[0]
        raise UserError(
            f"{files[predictions.row_file[first]]}: column 'image_id' has value {rows[first]}, absent from the "
            f"annotations ({len(unknown)} row(s) in all); predictions and --annotations must be of one image set"
        )
    ids, counts = np.unique(rows, return_counts=True)
    if (counts > 1).any():
        dup = ids[np.argmax(counts > 1)]
        where = sorted({files[i] for i in predictions.row_file[rows == dup]})
        also = f" (also in {', '.join(where[1:])})" if len(where) > 1 else ""
        raise UserError(
            f"{where[0]}: column 'image_id' has value {dup} in {counts.max()} rows{also}; each image must be "
            "predicted once: remove stale or duplicated prediction files"
        )
    gt_categories = np.array([c["id"] for c in ground_truth["categories"]], dtype=np.int64)
    bad = np.flatnonzero(~np.isin(predictions.category_ids, gt_categories))
    if len(bad):
        first = bad[0]
        raise UserError(
            f"{files[predictions.row_file[predictions.det_row[first]]]}: column 'detections.category_id' has "
            f"value {predictions.category_ids[first]}, not a category of the annotations (known: "
            f"{_id_list(gt_categories)}); use the dataset's own category ids"
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


def evaluate(ground_truth: dict, results: np.ndarray | list[dict], engine: str = "faster-coco-eval") -> Evaluation:
    """COCOeval for bounding boxes with default parameters, over every ground-truth image.

    `results` is an (n, 7) array as from `to_coco_results` or a COCO results list of dicts.
    Images without detections count as misses (COCOeval's image ids come from the ground truth).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
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
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    params = evaluator.params
    return Evaluation(
        stats={name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats[:12])},
        precision=np.asarray(evaluator.eval["precision"]),
        category_ids=[int(c) for c in params.catIds],
        iou_thresholds=np.asarray(params.iouThrs),
        recall_thresholds=np.asarray(params.recThrs),
    )


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
