"""COCO json -> one validated record per image, with every problem counted.

Why a separate pass: bad annotations must never be silent and never stop a long run
half-way. Each problem is either fixed (box clipped to the image) or the offending entry is
dropped, and recorded in an `Issues` tally that `jobs.prepare` writes into the manifest and
its summary; with ``strict=True`` the first problem raises a `UserError` naming it instead.
The box rules (`checked_xyxy`) and the tally are shared by every input format (VOC, YOLO),
so that one box is judged the same whichever file it came from.

A record is a plain dict in the shard row layout of docs/design.md minus the image bytes:
``image_id``, ``file_name``, ``width``, ``height``, ``boxes`` (xyxy, original pixels),
``category_id``, ``iscrowd``, ``area``.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats import shards

MAX_EXAMPLES_PER_KIND = 20  # the manifest lists this many examples of each problem
# A box crossing the image border by less than this (pixels) is clipped without counting it: the
# rounding of normalized coordinates (YOLO's 6 decimals) or of float json values, not a fault.
EDGE_TOLERANCE = 0.01

# What each problem kind means and what happened to the entry.
ISSUE_KINDS = {
    "invalid_image_entry": "image entry without a valid id/file_name/width/height: image dropped",
    "duplicate_image_id": "image id seen before: later entry dropped",
    "duplicate_annotation_id": "annotation id seen before: later entry dropped",
    "unknown_image_id": "annotation for an image id not in images: annotation dropped",
    "unknown_category": "category_id (VOC: class name, YOLO: class id) not in categories: annotation dropped",
    "invalid_box": "bbox is not 4 finite numbers (or a malformed VOC/YOLO object): annotation dropped",
    "degenerate_box": "bbox with zero or negative width/height: annotation dropped",
    "box_outside_image": "bbox wholly outside the image: annotation dropped",
    "box_clipped": "bbox partly outside the image: clipped to it",
    "missing_image": "image file not found: image dropped",
    "corrupt_image": "image file does not decode: image dropped",
    "size_mismatch": "decoded size differs from the annotated width/height: image kept (VOC: at its decoded size)",
    "invalid_annotation_file": "VOC xml or YOLO label file missing or unreadable: image dropped",
}


@dataclass
class Issues:
    """Counts and a few examples of every input problem; raises at once when strict."""

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def add(self, kind: str, detail: str, **where) -> None:
        assert kind in ISSUE_KINDS, kind
        if self.strict:
            ids = ", ".join(f"{k}={v}" for k, v in where.items())
            raise UserError(f"{kind} ({ids}): {detail}; fix the input or drop --strict to skip such entries")
        self.counts[kind] += 1
        if self.counts[kind] <= MAX_EXAMPLES_PER_KIND:
            self.examples.append({"kind": kind, **where, "detail": detail})

    def merge(self, counts: dict, examples: list) -> None:
        """Fold in the tally of a worker (examples beyond the per-kind cap are discarded)."""
        seen = Counter(self.counts)
        self.counts.update(counts)
        for ex in examples:
            seen[ex["kind"]] += 1
            if seen[ex["kind"]] <= MAX_EXAMPLES_PER_KIND:
                self.examples.append(ex)

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"


def load_annotations(uri: str, required: tuple[str, ...] = ()) -> dict:
    """Read and structurally check a COCO json; structural problems are user errors.

    `required` names keys besides 'images' that must be present: a json without
    'annotations' and 'categories' is an image list, not a training set (jobs.prepare).
    """
    try:
        coco = json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{uri}: not valid JSON ({exc}); give a COCO annotations file") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise UserError(f"{uri}: no 'images' list; give a COCO annotations file")
    missing = [key for key in required if key not in coco]
    if missing:
        raise UserError(f"{uri}: missing COCO key(s) {', '.join(repr(k) for k in missing)}; give a COCO instances "
                        "json (images, annotations, categories)")
    for key in ("annotations", "categories"):
        if not isinstance(coco.setdefault(key, []), list):
            raise UserError(f"{uri}: '{key}' is not a list; give a COCO annotations file")
    return coco


def categories_of(coco: dict, uri: str = "annotations") -> list[dict]:
    """Categories as [{"id", "name"}] sorted by id; malformed or repeated ids are user errors."""
    cats = {}
    for c in coco["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
            raise UserError(f"{uri}: category {c!r} has no integer id; fix the categories list")
        if c["id"] in cats:
            raise UserError(f"{uri}: category id {c['id']} listed twice; fix the categories list")
        cats[c["id"]] = {"id": c["id"], "name": str(c.get("name", c["id"]))}
    return [cats[k] for k in sorted(cats)]


def _valid_image_entry(img) -> bool:
    return (isinstance(img, dict) and isinstance(img.get("id"), int) and isinstance(img.get("file_name"), str)
            and img["file_name"] != "" and all(isinstance(img.get(k), (int, float)) and img[k] > 0
                                               for k in ("width", "height")))


def image_records(coco: dict, issues: Issues) -> list[dict]:
    """One record per valid image (in json order), annotations validated and converted to xyxy."""
    records, by_id = [], {}
    for img in coco["images"]:
        if not _valid_image_entry(img):
            issues.add("invalid_image_entry", f"entry {str(img)[:80]}", image_id=(img or {}).get("id")
                       if isinstance(img, dict) else None)
            continue
        if img["id"] in by_id:
            issues.add("duplicate_image_id", f"{img['file_name']} repeats id {img['id']}",
                       image_id=img["id"], file_name=img["file_name"])
            continue
        rec = shards.new_record(img["id"], img["file_name"], img["width"], img["height"])
        by_id[img["id"]] = rec
        records.append(rec)

    known_cats = {c["id"] for c in categories_of(coco)}
    seen_ann = set()
    for ann in coco["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = {"annotation_id": ann_id, "image_id": ann.get("image_id") if isinstance(ann, dict) else None}
        if ann_id is not None and ann_id in seen_ann:
            issues.add("duplicate_annotation_id", f"annotation id {ann_id} repeats", **where)
            continue
        seen_ann.add(ann_id)
        rec = by_id.get(where["image_id"])
        if rec is None:
            issues.add("unknown_image_id", f"image_id {where['image_id']} not in images", **where)
            continue
        if ann.get("category_id") not in known_cats:
            issues.add("unknown_category", f"category_id {ann.get('category_id')} not in categories", **where)
            continue
        box = _checked_box(ann.get("bbox"), rec["width"], rec["height"], issues, where)
        if box is None:
            continue
        area = ann.get("area")
        ok_area = isinstance(area, (int, float)) and math.isfinite(area)
        shards.add_object(rec, box, ann["category_id"], ann.get("iscrowd", 0), area if ok_area else None)
    return records


def _checked_box(bbox, width: int, height: int, issues: Issues, where: dict) -> list[float] | None:
    """COCO xywh -> xyxy clipped to the image, or None (recorded) when unusable."""
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        issues.add("invalid_box", f"bbox {bbox!r}", **where)
        return None
    x, y, w, h = (float(v) for v in bbox)
    return checked_xyxy([x, y, x + w, y + h], width, height, issues, where, f"bbox {list(bbox)}")


def checked_xyxy(box: list[float], width: int, height: int, issues: Issues, where: dict,
                 shown: str) -> list[float] | None:
    """A finite xyxy box in pixels -> clipped to the image, or None (recorded) when unusable.

    The one set of box rules of every input format; `shown` is how the box reads in its source
    (``bbox [x, y, w, h]``, ``bndbox [...]``, a YOLO line), for the issue examples.
    """
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        issues.add("degenerate_box", f"{shown} has w={x2 - x1:g} h={y2 - y1:g}", **where)
        return None
    if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
        issues.add("box_outside_image", f"{shown} outside {width}x{height}", **where)
        return None
    clipped = [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))]
    if max(abs(a - b) for a, b in zip(clipped, box)) >= EDGE_TOLERANCE:
        issues.add("box_clipped", f"{shown} clipped to {width}x{height}", **where)
    return clipped
