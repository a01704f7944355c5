"""The on-storage dataset format: Parquet shards of encoded images plus `manifest.json`.

One row per image (docs/design.md): ``image_id`` int64, ``file_name`` string, ``width``/``height``
int32, ``image`` binary (the original encoded bytes: decoding happens on the training side,
so shards stay small and the original is never lost), ``boxes`` list<list<float32>> xyxy in
original pixels, ``category_id`` list<int32>, ``iscrowd`` list<bool>, ``area`` list<float32>.

The manifest is written last, after every shard it lists, so a reader that finds a manifest
finds complete shards; shard names are deterministic, so a rerun overwrites instead of adding.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import UserError

MANIFEST = "manifest.json"
# The other inputs jobs accept: a COCO layout (images/ + annotations.json) and plain image files.
COCO_ANNOTATIONS, COCO_IMAGES = "annotations.json", "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FORMAT_VERSION = 1
ROW_GROUP_IMAGES = 64  # small row groups let readers stream a shard instead of loading it whole

SHARD_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("image", pa.binary()),
    ("boxes", pa.list_(pa.list_(pa.float32()))),
    ("category_id", pa.list_(pa.int32())),
    ("iscrowd", pa.list_(pa.bool_())),
    ("area", pa.list_(pa.float32())),
])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


@dataclass
class Manifest:
    """What a shards folder holds; `categories` ([{"id", "name"}]) is sorted by id."""

    categories: list[dict]
    num_images: int = 0
    num_annotations: int = 0
    num_crowd: int = 0
    num_empty_images: int = 0
    shards: list[dict] = field(default_factory=list)  # [{"file", "num_images", "num_bytes"}]
    source: dict = field(default_factory=dict)  # {"images": uri, "annotations": uri}
    issues: dict = field(default_factory=dict)  # kind -> count
    issue_examples: list[dict] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def category_ids(self) -> list[int]:
        return [c["id"] for c in self.categories]

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()


def input_kind(uri: str) -> str:
    """"shards" (jobs.prepare output), "coco" (a COCO layout) or "images" (anything else)."""
    if str(uri).rstrip("/").endswith(MANIFEST) or storage.exists(manifest_uri(uri)):
        return "shards"
    if storage.exists(storage.resolve(uri).join(COCO_ANNOTATIONS).uri()):
        return "coco"
    return "images"


def manifest_uri(uri: str) -> str:
    """The manifest of a shards folder (or `uri` itself when it names the manifest)."""
    uri = str(uri)
    return uri if uri.rstrip("/").endswith(MANIFEST) else storage.resolve(uri).join(MANIFEST).uri()


def read_manifest(uri: str) -> Manifest:
    """Read `manifest.json` of a shards folder written by `jobs.prepare`."""
    path = manifest_uri(uri)
    if not storage.exists(path):
        raise UserError(f"{path}: no manifest; run `python -m jobs.prepare --output {uri}` first")
    try:
        data = json.loads(storage.read_bytes(path))
        return Manifest(**data)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: not a manifest written by jobs.prepare ({exc}); rerun jobs.prepare") from None


def shard_uris(uri: str, manifest: Manifest) -> list[str]:
    folder = storage.resolve(uri[: -len(MANIFEST)] if uri.rstrip("/").endswith(MANIFEST) else uri)
    return [folder.join(s["file"]).uri() for s in manifest.shards]


def check_shards(uri: str, manifest: Manifest) -> None:
    """A UserError naming the shards `manifest` lists that the folder lacks (one listing), so
    that a job says so before it starts Ray instead of failing inside a read task."""
    folder = uri[: -len(MANIFEST)] if uri.rstrip("/").endswith(MANIFEST) else uri
    present = storage.file_sizes(folder)
    missing = [s["file"] for s in manifest.shards if s["file"] not in present]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(f"{folder}: {len(missing)} of the {len(manifest.shards)} shards in {MANIFEST} are missing "
                        f"({shown}); restore them or rerun jobs.prepare")


def plan_shards(sizes: list[int], images_per_shard: int, max_bytes: int) -> list[tuple[int, int]]:
    """Split images (in order) into [start, stop) ranges of at most N images or ~max_bytes."""
    ranges, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= images_per_shard or total + size > max_bytes):
            ranges.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def new_record(image_id: int, file_name: str, width: int, height: int) -> dict:
    """A record of one image in the row layout (minus the image bytes), without objects yet."""
    return {"image_id": image_id, "file_name": file_name, "width": int(width), "height": int(height),
            "boxes": [], "category_id": [], "iscrowd": [], "area": []}


def add_object(record: dict, box: list[float], category_id: int, iscrowd: bool, area: float | None = None) -> None:
    """Append one checked xyxy box; `area` defaults to the box's own (formats without masks)."""
    record["boxes"].append(box)
    record["category_id"].append(int(category_id))
    record["iscrowd"].append(bool(iscrowd))
    record["area"].append((box[2] - box[0]) * (box[3] - box[1]) if area is None else float(area))


def records_table(records: list[dict], images: list[bytes]) -> pa.Table:
    """Validated records plus their encoded bytes -> a table in the shard schema."""
    columns = {name: [r[name] for r in records] for name in SHARD_SCHEMA.names if name != "image"}
    columns["image"] = images
    return pa.table({name: columns[name] for name in SHARD_SCHEMA.names}, schema=SHARD_SCHEMA)


def write_shard(uri: str, tables) -> int:
    """Write an iterable of shard-schema tables as one Parquet file, atomically; returns bytes.

    The file is assembled in memory (bounded by the shard size cap) and then published in one
    atomic write, so a killed run never leaves a half-written shard behind.
    """
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, SHARD_SCHEMA, compression="zstd") as writer:
        for table in tables:
            writer.write_table(table, row_group_size=ROW_GROUP_IMAGES)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes_atomic(uri, data)
    return len(data)
