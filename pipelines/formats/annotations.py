"""What a dataset's annotations say without its images: training images per category, and
COCO ground truth rebuilt from prepared shards.

Both read only the annotation columns of the shards (never the image bytes), so they cost a
fraction of a pass over the data: repeat-factor sampling and the evaluation report's frequency
groups need the counts, validation during training needs the ground truth of a set that may
exist only as shards.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats import shards

GROUND_TRUTH_COLUMNS = ["image_id", "width", "height", "boxes", "category_id", "iscrowd", "area"]


def train_image_counts(uri: str) -> dict[int, int]:
    """Training images per category id, from whatever describes the training set at `uri`.

    Accepted: a COCO annotations json (distinct images per category), a json whose categories
    carry `image_count` (the LVIS convention), or the shards folder / `manifest.json` of
    jobs.prepare (its shards' `category_id` column is read; image bytes are not).
    """
    if uri.rstrip("/").endswith(".json") and not uri.rstrip("/").endswith(shards.MANIFEST):
        data = _load_json(uri)
        categories = data.get("categories") if isinstance(data, dict) else None
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            pairs = [(a["category_id"], a["image_id"]) for a in data["annotations"]]
            return _images_per_category(np.array(pairs, dtype=np.int64).reshape(-1, 2))
        if isinstance(categories, list) and categories and all("image_count" in c for c in categories):
            return {int(c["id"]): int(c["image_count"]) for c in categories}
        raise UserError(f"{uri}: no per-category training image counts; give the training COCO json, "
                        "a json whose categories carry 'image_count', or the jobs.prepare output folder")
    return _images_per_category(category_image_pairs(uri))


def category_image_pairs(uri: str) -> np.ndarray:
    """(category_id, image_id) of every annotation in the jobs.prepare output at `uri`."""
    manifest = shards.read_manifest(uri)
    pairs = [_category_image_pairs(shard) for shard in shards.shard_uris(uri, manifest)]
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)


def shards_ground_truth(uri: str, categories: list[dict]) -> dict:
    """COCO ground truth (images, annotations, `categories`) of the jobs.prepare output at `uri`:
    boxes back to COCO's xywh, annotation ids 1, 2, ... in shard order."""
    manifest = shards.read_manifest(uri)
    fs, _ = storage.arrow_filesystem(uri)
    images, annotations = [], []
    for shard_uri in shards.shard_uris(uri, manifest):
        table = pq.read_table(storage.resolve(shard_uri).path, filesystem=fs, columns=GROUND_TRUTH_COLUMNS).to_pylist()
        for row in table:
            images.append({"id": row["image_id"], "width": row["width"], "height": row["height"]})
            for box, cat, crowd, area in zip(row["boxes"], row["category_id"], row["iscrowd"], row["area"]):
                annotations.append({"id": len(annotations) + 1, "image_id": row["image_id"], "category_id": cat,
                                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                    "area": area, "iscrowd": int(crowd)})
    return {"images": images, "annotations": annotations, "categories": categories}


def _load_json(uri: str) -> object:
    try:
        return json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{uri}: not valid JSON ({str(exc).splitlines()[0]})") from None


def _category_image_pairs(shard_uri: str) -> np.ndarray:
    """(category_id, image_id) of every annotation in one shard, from two columns only."""
    fs, path = storage.arrow_filesystem(shard_uri)
    try:
        table = pq.read_table(path, filesystem=fs, columns=["image_id", "category_id"])
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{shard_uri}: cannot read columns image_id, category_id ({str(exc).splitlines()[0]}); "
                        "rerun jobs.prepare") from None
    cats = table.column("category_id").combine_chunks()
    rows = pc.list_parent_indices(cats).to_numpy()
    image_ids = table.column("image_id").to_numpy()[rows]
    return np.stack([pc.list_flatten(cats).to_numpy(zero_copy_only=False).astype(np.int64), image_ids], axis=1)


def _images_per_category(pairs: np.ndarray) -> dict[int, int]:
    """Distinct images per category from (category_id, image_id) pairs."""
    ids, counts = np.unique(np.unique(pairs, axis=0)[:, 0], return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))
