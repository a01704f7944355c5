"""Predictions into flat numpy columns: jobs.infer's Parquet, or a COCO results json of another tool.

Reading is columnar: pyarrow flattens the `detections` lists of each record batch and numpy
converts them, so no Python object is made per detection; files are read by a few threads (object
stores are latency-bound and pyarrow releases the GIL). A COCO results json is one Python list by
nature (json.loads); it is converted to the same columns and dropped, so everything after reading
is the same for both inputs.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import UserError
from pipelines.evaluation.progress import Progress

_SCHEMA_HINT = "the predictions schema of docs/design.md, as written by jobs.infer"
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


_RESULTS_KEYS = ("image_id", "category_id", "bbox", "score")


@dataclass
class Predictions:
    """All rows of a predictions folder as flat numpy columns (no per-row Python objects).

    Rows are images (`row_*`, one entry per Parquet row); detections are flattened
    (`det_row` points each detection at its row), so a million detections cost ~50 MB.
    Boxes are COCO's x, y, w, h: a results json keeps its own widths bit for bit.
    """

    files: list[str]
    row_image_id: np.ndarray  # int64
    row_file: np.ndarray  # int32 index into `files`
    det_row: np.ndarray  # int64 index into the rows
    boxes: np.ndarray  # (n, 4) float64 x, y, w, h in original pixels
    scores: np.ndarray  # float64 (stored as float32 in Parquet)
    category_ids: np.ndarray  # int64
    errors: list[dict] = field(default_factory=list)  # rows with `error` set: file, image_id, uri, error
    models: list[str] = field(default_factory=list)  # distinct values of the `model` column
    kind: str = "parquet"  # or "json": a results json has rows only for images with detections

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


def read_predictions(uri: str, progress: Progress | None = None) -> Predictions:
    """Read predictions at `uri`: a COCO results json (`*.json`), or every Parquet file under it
    (a file, a folder or a bucket prefix, as jobs.infer writes them)."""
    if uri.rstrip("/").endswith(".json"):
        return read_results_json(uri)
    files = storage.list_files(uri, suffixes=[".parquet"])
    if not files:
        raise UserError(f"{uri}: no .parquet files found; give the --output of jobs.infer or a COCO results json")
    progress = progress or Progress(every_s=None)
    parts, detections = [], 0
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(files))) as pool:
        for part in pool.map(_read_file, files):
            parts.append(part)
            detections += len(part["scores"])
            progress.update("read", len(parts), len(files), "files", f"{detections} detections")
    columns = _concat(parts)
    return Predictions(
        files=files,
        row_image_id=columns.pop("image_id"),
        row_file=np.repeat(np.arange(len(files), dtype=np.int32), [len(p["image_id"]) for p in parts]),
        models=sorted(columns.pop("models")),
        **columns,
    )


def read_results_json(uri: str) -> Predictions:
    """A COCO results json ([{image_id, category_id, bbox: [x, y, w, h], score}, ...]) as columns,
    one row per image that has detections, detections in the file's order."""
    results = load_json(uri)
    if not isinstance(results, list):
        raise UserError(f"{uri}: not a COCO results list; give [{{image_id, category_id, bbox, score}}, ...] "
                        "or the Parquet output of jobs.infer")
    try:
        columns = list(zip(*[(r["image_id"], r["category_id"], *r["bbox"], r["score"]) for r in results]))
        array = np.array(columns, dtype=np.float64).T.reshape(-1, 7)
    except (KeyError, TypeError, ValueError):
        raise _results_entry_error(uri, results) from None
    if not np.isfinite(array).all():
        k = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise UserError(f"{uri}: entry {k} has a NaN or infinite value; every bbox and score must be finite")
    image_ids, det_row = np.unique(array[:, 0].astype(np.int64), return_inverse=True)
    return Predictions(files=[uri], row_image_id=image_ids, row_file=np.zeros(len(image_ids), np.int32),
                       det_row=det_row.astype(np.int64), boxes=np.ascontiguousarray(array[:, 2:6]),
                       scores=array[:, 6].copy(), category_ids=array[:, 1].astype(np.int64), kind="json")


def _results_entry_error(uri: str, results: list) -> UserError:
    """The first entry of a results list that is not {image_id, category_id, bbox: [4 numbers], score}."""
    for k, entry in enumerate(results):
        missing = [key for key in _RESULTS_KEYS if not isinstance(entry, dict) or key not in entry]
        if missing:
            return UserError(f"{uri}: entry {k} has no {', '.join(repr(m) for m in missing)}; a COCO results "
                             "entry is {image_id, category_id, bbox: [x, y, w, h], score}")
        values = [entry["image_id"], entry["category_id"], entry["score"]]
        bbox = entry["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values + list(bbox)):
            return UserError(f"{uri}: entry {k} is {json.dumps(entry)[:120]}; image_id, category_id and score must "
                             "be numbers and bbox four numbers [x, y, w, h]")
    return UserError(f"{uri}: not a COCO results list; give [{{image_id, category_id, bbox, score}}, ...]")


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
        "boxes": _xywh(*(values[k].astype(np.float64, copy=False) for k in ("x1", "y1", "x2", "y2"))),
        "scores": values["score"].astype(np.float64),
        "category_ids": values["category_id"].astype(np.int64, copy=False),
        "errors": errors,
        "models": models,
    }




def _xywh(x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray) -> np.ndarray:
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
