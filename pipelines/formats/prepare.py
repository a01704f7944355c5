"""An annotated image set (COCO json, VOC XML or YOLO labels) -> Parquet shards + manifest,
read in parallel by Ray tasks.

Memory stays flat as the dataset grows: the driver holds no image bytes, keeps a bounded number
of shard tasks in flight and, for VOC and YOLO, only the names of those shards (the listing is
streamed; the annotation files are parsed inside the tasks, see `listing`). A COCO json is one
file: it is parsed on the driver, which keeps the validated records (never the raw json). Each
task reads its images in row-group-sized chunks and holds at most one shard (<= ~256 MB) before
publishing it. Every image is checked by a full (reduced-scale) decode, so a corrupt file is
caught here and listed in the manifest instead of stopping a training run weeks later.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats import coco, listing, shards
from pipelines.formats.coco import Issues
from pipelines.formats.shard_tasks import read_images, run_shard_tasks
from pipelines.images.pixel_limit import DEFAULT_MAX_PIXELS

DEFAULT_IMAGES_PER_SHARD = 1000
DEFAULT_MAX_SHARD_BYTES = 256 * 2**20
FORMATS = ("coco", "voc", "yolo")
_DETECTED = {".json": "coco", ".yaml": "yolo", ".yml": "yolo", ".xml": "voc"}


def detect_format(annotations: str) -> str:
    """The format of `annotations`: a .json file is COCO, a .yaml file YOLO, a folder of .xml
    files VOC; anything else (or a folder with several kinds) is a user error asking for --format."""
    suffix = "." + annotations.rstrip("/").rsplit(".", 1)[-1].lower() if "." in annotations else ""
    if suffix in (".json", ".yaml", ".yml"):
        return _DETECTED[suffix]
    if not storage.exists(annotations):
        raise UserError(f"{annotations}: not found; check --annotations")
    kinds, loc = set(), storage.resolve(annotations)
    if loc.fs.isdir(loc.path):
        for page in storage.iter_files(annotations, tuple(_DETECTED)):
            kinds.update(_DETECTED["." + u.rsplit(".", 1)[-1].lower()] for u in page)
            if page:
                break
    if kinds == {"voc"}:
        return "voc"
    found = f"it holds {', '.join(sorted(kinds))} annotation files" if kinds else "no .json, .yaml or folder of .xml"
    raise UserError(f"{annotations}: cannot tell its format ({found}); give --format coco, voc or yolo")


@dataclass
class CocoReader:
    """Reads a chunk of validated COCO records: their images, checked against the json sizes."""

    images: str

    def read(self, entries: list, issues: Issues, max_pixels: int | None) -> tuple[list[dict], list[bytes]]:
        wheres = [{"image_id": r["image_id"], "file_name": r["file_name"]} for r in entries]
        got = read_images(storage.resolve(self.images), [r["file_name"] for r in entries], wheres, issues, max_pixels)
        kept, images = [], []
        for rec, where, image in zip(entries, wheres, got):
            if image is None:
                continue
            if image[1:] != (rec["width"], rec["height"]):
                issues.add("size_mismatch", f"file is {image[1]}x{image[2]}, json says {rec['width']}x{rec['height']}",
                           **where)
            kept.append(rec)
            images.append(image[0])
        return kept, images


def coco_plan(images: str, annotations: str, issues: Issues, images_per_shard: int,
              max_shard_bytes: int) -> listing.Plan:
    """COCO: validate the json on the driver, drop entries whose file is not listed, and cut the
    rest into shards by count and bytes (one listing gives every size)."""
    data = coco.load_annotations(annotations, required=("annotations", "categories"))
    categories = coco.categories_of(data, annotations)
    records = coco.image_records(data, issues)
    del data  # the raw json is the largest thing the driver ever holds
    sizes = storage.file_sizes(images)
    present, present_sizes = [], []
    for rec in records:
        size = sizes.get(rec["file_name"])
        if size is None:
            issues.add("missing_image", f"{storage.resolve(images).join(rec['file_name']).uri()} not found",
                       image_id=rec["image_id"], file_name=rec["file_name"])
        else:
            present.append(rec)
            present_sizes.append(size)
    del sizes, records
    if not present:
        raise UserError(f"{annotations}: no image entry with its file in {images} ({issues.summary()}); "
                        "check that --images is the folder the json's file_name values are relative to")
    ranges = shards.plan_shards(present_sizes, images_per_shard, max_shard_bytes)
    reader = CocoReader(images)
    return listing.Plan(categories=categories, shards=((present[a:b], reader) for a, b in ranges),
                        num_shards=len(ranges), num_images=len(present),
                        source={"format": "coco", "images": images, "annotations": annotations})


def prepare(
    images: str | None,
    annotations: str,
    output: str,
    *,
    format: str | None = None,
    split: str | None = None,
    classes: str | None = None,
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_tasks: int | None = None,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> shards.Manifest:
    """Convert a COCO, VOC or YOLO dataset into shards at `output`; starts a local Ray if none
    is running. `format` defaults to what `detect_format` finds.

    Images above `max_pixels` (after JPEG draft reduction) are skipped as corrupt, naming their
    size; `max_tasks` caps the tasks in flight (default: follow the cluster as it grows). No
    usable image at all is a user error, not an empty dataset.
    """
    for flag, value in (("--images-per-shard", images_per_shard), ("--max-pixels", max_pixels),
                        ("--max-tasks", max_tasks)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    fmt = format or detect_format(annotations)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown; give coco, voc or yolo")
    if classes and fmt != "voc":
        raise UserError(f"--classes is for VOC input; {fmt} files name their classes themselves: drop --classes")
    issues = Issues(strict=strict)
    if fmt == "coco":
        if not images:
            raise UserError("--images is required for COCO input: the folder the json's file_name values are "
                            "relative to")
        if split:
            raise UserError("--split is for VOC and YOLO input; give the COCO json of that split instead")
        plan = coco_plan(images, annotations, issues, images_per_shard, max_shard_bytes)
    elif fmt == "voc":
        plan = listing.voc_plan(annotations, images, split, classes, images_per_shard, max_tasks)
    else:
        plan = listing.yolo_plan(annotations, images, split, images_per_shard)
    storage.ensure_dir(output)
    out = storage.resolve(output)
    progress(f"prepare: {plan.num_images} images -> {plan.num_shards} shards at {output}")

    results = run_shard_tasks(out, plan.shards, plan.num_shards, plan.num_images, strict, max_pixels,
                              max_shard_bytes, max_tasks, progress)
    manifest = shards.Manifest(categories=plan.categories, source=plan.source,
                               shards=[f for r in results for f in r["files"]])
    for r in results:
        for key in ("num_images", "num_annotations", "num_crowd", "num_empty_images"):
            setattr(manifest, key, getattr(manifest, key) + r[key])
        issues.merge(r["issues"], r["examples"])
    if not manifest.num_images:
        raise UserError(f"{annotations}: none of its {plan.num_images} images is usable ({issues.summary()}); "
                        f"check that the images are at {plan.source['images']} and decode")
    manifest.issues = dict(sorted(issues.counts.items()))
    manifest.issue_examples = issues.examples
    storage.write_bytes_atomic(out.join(shards.MANIFEST).uri(), manifest.to_json())
    _remove_stale_shards(out, {f["file"] for f in manifest.shards})
    return manifest


def _remove_stale_shards(out: storage.Location, keep: set[str]) -> None:
    """Delete shards a previous, larger run left behind (the new manifest no longer lists them)."""
    try:
        names = [p.rsplit("/", 1)[-1] for p in out.fs.ls(out.path, detail=False)]
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith("shard-") and name.endswith(".parquet") and name not in keep:
            out.fs.rm(out.join(name).path)
