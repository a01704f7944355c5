"""The predictions Parquet of `jobs.infer`: schema, rows from detector outputs, part files, COCO json.

One row per input image (docs/design.md): ``image_id`` int64 (null for custom images), ``uri``,
``width``/``height`` int32 (original pixels, after EXIF orientation; null when the image could not
be read), ``detections`` list<struct<x1, y1, x2, y2 float64, score float32, category_id int32,
category string>> (null when the image could not be read, empty when nothing was found), ``error``
string (null when the image was read and detected), ``model`` string.

Rows are built column-wise from flat arrays (one detection per entry, a count per image), so a
batch of any size costs a handful of pyarrow calls rather than a Python loop over detections.
No torch and no Ray here: evaluation, visualization and DuckDB readers need neither.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage

DETECTION_TYPE = pa.struct([
    ("x1", pa.float64()), ("y1", pa.float64()), ("x2", pa.float64()), ("y2", pa.float64()),
    ("score", pa.float32()), ("category_id", pa.int32()), ("category", pa.string()),
])
PREDICTIONS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("uri", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("detections", pa.list_(DETECTION_TYPE)),
    ("error", pa.string()),
    ("model", pa.string()),
])
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
COCO_MAX_DETS = 100  # COCO's evaluation looks at the top 100 per image; more only bloats the json


def part_name(unit: int) -> str:
    """The output file of unit `unit`: fixed per unit, so a rerun finds (and skips) it."""
    return f"{PART_PREFIX}{unit:06d}{PART_SUFFIX}"


def unit_of(name: str) -> int | None:
    """The unit number of a part file name (or path), None for anything else."""
    base = name.rsplit("/", 1)[-1]
    if not (base.startswith(PART_PREFIX) and base.endswith(PART_SUFFIX)):
        return None
    digits = base[len(PART_PREFIX):-len(PART_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def detections_array(counts: np.ndarray, valid: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                     labels: np.ndarray, categories: list[dict]) -> pa.ListArray:
    """Flat detections (image-major) -> the ``detections`` column.

    counts [n] detections per image; valid [n] False where the image failed (null entry);
    boxes [d, 4] float64 xyxy in original pixels; scores [d]; labels [d] contiguous class index,
    mapped through `categories` (label order) to the dataset's category id and name.
    """
    ids = np.asarray([c["id"] for c in categories], np.int32)
    names = pa.array([str(c["name"]) for c in categories], pa.string())
    labels = np.asarray(labels, np.int64)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    fields = [pa.array(boxes[:, i]) for i in range(4)] + [
        pa.array(np.asarray(scores, np.float32)), pa.array(ids[labels]), names.take(pa.array(labels))]
    values = pa.StructArray.from_arrays(fields, fields=list(DETECTION_TYPE))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values, type=PREDICTIONS_SCHEMA.field("detections").type,
                                    mask=pa.array(~np.asarray(valid, bool)))


def to_parquet_bytes(table: pa.Table) -> bytes:
    """A table in the predictions schema as one Parquet file (zstd; `category` dictionary-encoded)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.select(PREDICTIONS_SCHEMA.names).cast(PREDICTIONS_SCHEMA), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_part(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.arrow_filesystem(uri)
    try:
        with fs.open_input_file(path) as handle:
            return pq.read_table(handle, columns=columns)
    except OSError as exc:
        raise storage.describe_error(uri, exc) from None


def coco_results_json(table: pa.Table, max_dets: int = COCO_MAX_DETS) -> tuple[str, int]:
    """COCO results entries (xywh, the top `max_dets` per image) of rows with an image id, as
    comma-separated JSON objects ("" when none) for `write_coco_json` to join, and their count."""
    table = table.filter(pc.is_valid(table["image_id"]))
    dets = pc.list_slice(table["detections"].combine_chunks(), 0, max_dets)
    flat = pc.list_flatten(dets)
    if len(flat) == 0:
        return "", 0
    rows = pc.list_parent_indices(dets).to_numpy()
    image_id = table["image_id"].to_numpy()[rows].tolist()
    x1, y1, x2, y2 = (pc.struct_field(flat, k).to_numpy() for k in ("x1", "y1", "x2", "y2"))
    bbox = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1).tolist()
    scores = pc.struct_field(flat, "score").to_numpy().astype(np.float64).tolist()
    cats = pc.struct_field(flat, "category_id").to_numpy().tolist()
    return ",".join(json.dumps({"image_id": i, "category_id": c, "bbox": b, "score": s})
                    for i, c, b, s in zip(image_id, cats, bbox, scores)), len(cats)


def write_coco_json(part_uris: list[str], destination: str) -> int:
    """Stream the COCO results of every part file into one json array; returns detections written.

    Parts are read one at a time, so memory holds one part, not the whole output. The file is
    written under a temporary name and renamed (local), or appears when its upload completes
    (object stores), so a reader never sees half a json.
    """
    loc = storage.resolve(destination)
    tmp = f"{loc.path}.tmp" if loc.protocol == "file" else loc.path
    count = 0
    try:
        if loc.protocol == "file":
            os.makedirs(os.path.dirname(loc.path) or ".", exist_ok=True)
        with loc.fs.open(tmp, "wb") as out:
            text = io.TextIOWrapper(out, encoding="utf-8")
            text.write("[")
            first = True
            for uri in part_uris:
                chunk, n = coco_results_json(read_part(uri, ["image_id", "detections"]))
                if n:
                    text.write(chunk if first else "," + chunk)
                    first = False
                    count += n
            text.write("]")
            text.flush()
            text.detach()
        if tmp != loc.path:
            loc.fs.mv(tmp, loc.path)
    except OSError as exc:
        raise storage.describe_error(destination, exc) from None
    return count
