"""What a shards folder holds, read before training on it: classes, box sizes, a box sample.

Only the annotation columns are read (`width`, `height`, `boxes`, `category_id`, `iscrowd`),
never the image bytes, a few shards at a time by threads (object stores are latency-bound,
pyarrow releases the GIL). Counts are exact; box sizes and anchor coverage
(`pipelines.formats.coverage`) use a seeded uniform sample of at most `sample` non-crowd boxes,
drawn as the `sample` smallest of one random key per box (bottom-k sampling), so memory stays
bounded by the sample whatever the dataset's size and the result does not depend on read order.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats import shards
from pipelines.images.transforms import resized_shape

COLUMNS = ["width", "height", "boxes", "category_id", "iscrowd"]
DEFAULT_SAMPLE = 200_000
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
_READ_THREADS = 8
_SAMPLE_FIELDS = ("key", "category", "x1", "y1", "x2", "y2", "image_w", "image_h")


@dataclass
class Scan:
    """Exact counts over the whole dataset plus the box sample (non-crowd boxes only)."""

    categories: list[dict]
    num_images: int = 0
    num_boxes: int = 0  # non-crowd boxes of known categories
    num_crowd: int = 0
    num_unknown_category: int = 0
    num_empty_images: int = 0
    boxes_per_class: np.ndarray = None  # (K,) non-crowd boxes
    crowd_per_class: np.ndarray = None
    images_per_class: np.ndarray = None  # images with at least one (non-crowd) box of the class
    sample: dict = field(default_factory=dict)  # _SAMPLE_FIELDS -> arrays, boxes in original pixels
    sample_limit: int = DEFAULT_SAMPLE

    @property
    def sampled(self) -> bool:
        return self.num_boxes > len(self.sample.get("key", ()))


def scan(uri: str, sample: int = DEFAULT_SAMPLE, seed: int = 0, max_shards: int | None = None) -> Scan:
    """Read the annotation columns of every shard at `uri` (a jobs.prepare folder or its manifest),
    or of `max_shards` of them spread evenly over the list (a quick look before training)."""
    if sample < 1:
        raise UserError(f"--sample {sample}: give a number of boxes >= 1")
    manifest = shards.read_manifest(uri)
    shards.check_shards(uri, manifest)
    category_ids = np.array(manifest.category_ids, np.int64)
    k = len(category_ids)
    result = Scan(categories=manifest.categories, boxes_per_class=np.zeros(k, np.int64),
                  crowd_per_class=np.zeros(k, np.int64), images_per_class=np.zeros(k, np.int64),
                  sample={f: np.zeros(0) for f in _SAMPLE_FIELDS}, sample_limit=sample)
    uris = shards.shard_uris(uri, manifest)
    if max_shards is not None and len(uris) > max_shards:
        uris = [uris[i] for i in np.linspace(0, len(uris) - 1, max_shards).round().astype(int)]
    with ThreadPoolExecutor(max_workers=max(1, min(_READ_THREADS, len(uris)))) as pool:
        for part in pool.map(lambda a: _scan_shard(*a, category_ids, sample, seed), enumerate(uris)):
            for name in ("num_images", "num_boxes", "num_crowd", "num_unknown_category", "num_empty_images"):
                setattr(result, name, getattr(result, name) + part[name])
            for name in ("boxes_per_class", "crowd_per_class", "images_per_class"):
                getattr(result, name).__iadd__(part[name])
            result.sample = _smallest({f: np.r_[result.sample[f], part["sample"][f]] for f in _SAMPLE_FIELDS}, sample)
    return result


def _scan_shard(index: int, uri: str, category_ids: np.ndarray, sample: int, seed: int) -> dict:
    fs, path = storage.arrow_filesystem(uri)
    try:
        table = pq.read_table(path, filesystem=fs, columns=COLUMNS)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{uri}: cannot read columns {', '.join(COLUMNS)} ({str(exc).splitlines()[0]}); "
                        "rerun jobs.prepare") from None
    k = len(category_ids)
    boxes = table.column("boxes").combine_chunks()
    row = pc.list_parent_indices(boxes).to_numpy()
    coords = pc.list_flatten(pc.list_flatten(boxes)).to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, 4)
    cats = pc.list_flatten(table.column("category_id").combine_chunks()).to_numpy(zero_copy_only=False)
    crowd = pc.list_flatten(table.column("iscrowd").combine_chunks()).to_numpy(zero_copy_only=False).astype(bool)
    pos = np.minimum(np.searchsorted(category_ids, cats), max(k - 1, 0))
    known = (category_ids[pos] == cats) if k else np.zeros(len(cats), bool)
    plain = known & ~crowd
    width = table.column("width").to_numpy().astype(np.int64)
    height = table.column("height").to_numpy().astype(np.int64)
    pairs = np.unique(row[plain].astype(np.int64) * max(k, 1) + pos[plain])
    keys = np.random.default_rng([seed, index]).random(len(cats))[plain]
    part_sample = {"key": keys, "category": pos[plain].astype(np.float64), "x1": coords[plain, 0],
                   "y1": coords[plain, 1], "x2": coords[plain, 2], "y2": coords[plain, 3],
                   "image_w": width[row[plain]].astype(np.float64), "image_h": height[row[plain]].astype(np.float64)}
    return {
        "num_images": table.num_rows, "num_boxes": int(plain.sum()), "num_crowd": int((known & crowd).sum()),
        "num_unknown_category": int((~known).sum()),
        "num_empty_images": int(table.num_rows - len(np.unique(row[plain]))),
        "boxes_per_class": np.bincount(pos[plain], minlength=k), "crowd_per_class": np.bincount(
            pos[known & crowd], minlength=k), "images_per_class": np.bincount(pairs % max(k, 1), minlength=k),
        "sample": _smallest(part_sample, sample),
    }


def _smallest(columns: dict, count: int) -> dict:
    """The rows of the `count` smallest keys, in key order (a uniform sample without replacement)."""
    keys = columns["key"]
    if len(keys) > count:
        order = np.argpartition(keys, count - 1)[:count]
        columns = {f: v[order] for f, v in columns.items()}
    order = np.argsort(columns["key"], kind="stable")
    return {f: v[order] for f, v in columns.items()}


def resize_factors(image_h: np.ndarray, image_w: np.ndarray, min_size: float, max_size: float) -> tuple:
    """(resized h, resized w) per image, as `transforms.resized_shape` computes them for training."""
    sizes = {(int(h), int(w)): resized_shape(int(h), int(w), min_size, max_size)
             for h, w in set(zip(image_h.tolist(), image_w.tolist()))}  # distinct shapes are few
    shape = np.array([sizes[(int(h), int(w))] for h, w in zip(image_h.tolist(), image_w.tolist())],
                     np.float64).reshape(-1, 2)
    return shape[:, 0], shape[:, 1]


def resized_boxes(sample: dict, min_size: float, max_size: float) -> tuple[np.ndarray, np.ndarray]:
    """(boxes xyxy in resized pixels (n, 4), resized image (h, w) (n, 2)) of the sample."""
    new_h, new_w = resize_factors(sample["image_h"], sample["image_w"], min_size, max_size)
    sx, sy = new_w / np.maximum(sample["image_w"], 1), new_h / np.maximum(sample["image_h"], 1)
    boxes = np.stack([sample["x1"] * sx, sample["y1"] * sy, sample["x2"] * sx, sample["y2"] * sy], axis=1)
    return boxes, np.stack([new_h, new_w], axis=1)


def size_percentiles(boxes: np.ndarray) -> dict:
    """Width, height, area and sqrt(area) percentiles of xyxy boxes."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    values = {"width": w, "height": h, "area": w * h, "sqrt_area": np.sqrt(np.maximum(w * h, 0))}
    if not len(boxes):
        return {name: None for name in values}
    return {name: {f"p{p}": round(float(v), 2) for p, v in zip(PERCENTILES, np.percentile(x, PERCENTILES))}
            for name, x in values.items()}


def class_table(result: Scan) -> list[dict]:
    """One row per category: images, boxes, crowd boxes, share of all boxes."""
    total = max(result.num_boxes, 1)
    return [{"category_id": c["id"], "name": c["name"], "images": int(i), "boxes": int(b), "crowd": int(cr),
             "share": round(float(b) / total, 4)}
            for c, i, b, cr in zip(result.categories, result.images_per_class, result.boxes_per_class,
                                   result.crowd_per_class)]
