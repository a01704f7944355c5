"""COCO json + image files -> Parquet shards + manifest, read in parallel by Ray tasks.

Memory stays flat as the dataset grows: the driver holds only the validated records (no
image bytes) and keeps a bounded number of shard tasks in flight; each task reads its images
in row-group-sized chunks and holds at most one shard (<= ~256 MB) before publishing it.
Every image is checked by a full (reduced-scale) decode, so a corrupt file is caught here and
listed in the manifest instead of stopping a training run weeks later.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

from pipelines.formats import coco
from pipelines.formats import shards
from pipelines import storage
from pipelines.formats.coco import Issues
from pipelines.errors import UserError
from pipelines.images.pixel_limit import DEFAULT_MAX_PIXELS
from pipelines.images.transforms import ImageDecodeError, probe_image

DEFAULT_IMAGES_PER_SHARD = 1000
DEFAULT_MAX_SHARD_BYTES = 256 * 2**20


def _read_chunk(loc: storage.Location, records: list[dict], issues: Issues, max_pixels: int | None):
    """Fetch a chunk of images (concurrently on object stores) and check each one decodes."""
    paths = [loc.join(r["file_name"]).path for r in records]
    kept, images = [], []
    for rec, path, data in zip(records, paths, storage.read_many(loc, paths)):
        where = {"image_id": rec["image_id"], "file_name": rec["file_name"]}
        if isinstance(data, BaseException):
            issues.add("missing_image", f"{loc.uri(path)}: {type(data).__name__}", **where)
            continue
        try:
            width, height = probe_image(data, max_pixels)
        except ImageDecodeError as exc:
            issues.add("corrupt_image", f"{loc.uri(path)}: {exc}", **where)
            continue
        if (width, height) != (rec["width"], rec["height"]):
            issues.add("size_mismatch", f"file is {width}x{height}, json says {rec['width']}x{rec['height']}",
                       **where)
        kept.append(rec)
        images.append(data)
    return kept, images


def write_one_shard(images_uri: str, shard_uri: str, records: list[dict], strict: bool,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict:
    """Body of one Ray task: read, check and write one shard; returns its tally (never raises
    for bad input: a strict failure comes back as ``{"error": ...}`` for the driver to report)."""
    loc = storage.resolve(images_uri)
    issues = Issues(strict=strict)
    stats = {"num_images": 0, "num_annotations": 0, "num_crowd": 0, "num_empty_images": 0}

    def tables():
        for start in range(0, len(records), shards.ROW_GROUP_IMAGES):
            kept, images = _read_chunk(loc, records[start:start + shards.ROW_GROUP_IMAGES], issues, max_pixels)
            stats["num_images"] += len(kept)
            for rec in kept:
                stats["num_annotations"] += len(rec["boxes"])
                stats["num_crowd"] += sum(rec["iscrowd"])
                stats["num_empty_images"] += not rec["boxes"]
            yield shards.records_table(kept, images)

    try:
        num_bytes = shards.write_shard(shard_uri, tables())
    except UserError as exc:
        return {"error": str(exc)}
    return {**stats, "num_bytes": num_bytes, "issues": dict(issues.counts), "examples": issues.examples}


def prepare(
    images: str,
    annotations: str,
    output: str,
    *,
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_tasks: int | None = None,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> shards.Manifest:
    """Convert a COCO dataset into shards at `output`; starts a local Ray if none is running.

    Images above `max_pixels` (after JPEG draft reduction) are skipped as corrupt, naming their
    size; `max_tasks` caps the shard tasks in flight (default: follow the cluster as it grows).
    """
    for flag, value in (("--images-per-shard", images_per_shard), ("--max-pixels", max_pixels),
                        ("--max-tasks", max_tasks)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    issues = Issues(strict=strict)
    data = coco.load_annotations(annotations)
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
    storage.ensure_dir(output)
    out = storage.resolve(output)
    ranges = shards.plan_shards(present_sizes, images_per_shard, max_shard_bytes)
    progress(f"prepare: {len(present)} images -> {len(ranges)} shards at {output}")

    results = _run_tasks(images, out, present, ranges, strict, progress, max_pixels, max_tasks)
    manifest = shards.Manifest(
        categories=categories,
        source={"images": images, "annotations": annotations},
        shards=[{"file": shards.shard_name(i), "num_images": r["num_images"], "num_bytes": r["num_bytes"]}
                for i, r in enumerate(results)],
    )
    for r in results:
        for key in ("num_images", "num_annotations", "num_crowd", "num_empty_images"):
            setattr(manifest, key, getattr(manifest, key) + r[key])
        issues.merge(r["issues"], r["examples"])
    manifest.issues = dict(sorted(issues.counts.items()))
    manifest.issue_examples = issues.examples
    storage.write_bytes_atomic(out.join(shards.MANIFEST).uri(), manifest.to_json())
    _remove_stale_shards(out, len(results))
    return manifest


def _in_flight_limit(max_tasks: int | None) -> int:
    """Shard tasks to keep in flight now: the cluster's CPUs as they are at this moment (an
    autoscaler adds nodes during the run) plus a quarter queued, so that the autoscaler sees
    demand; never more than `max_tasks`."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(cpus + max(1, cpus // 4), max_tasks or cpus * 2))


def _run_tasks(images: str, out: storage.Location, records: list[dict], ranges, strict: bool, progress,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, max_tasks: int | None = None) -> list[dict]:
    """Run one Ray task per shard, about one per logical CPU of the cluster in flight, reporting progress.

    Not many more: a queued task makes Ray start another worker process (~100 MB) early, and
    each running task holds up to one shard. Peak memory is thus about (CPUs x shard) plus Ray's
    own processes, whatever the number of images. The count follows the cluster as it grows.
    """
    import ray

    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=1)(write_one_shard)
    results: list[dict | None] = [None] * len(ranges)
    pending: dict = {}
    next_shard, done_images, started = 0, 0, time.monotonic()
    try:
        while next_shard < len(ranges) or pending:
            limit = _in_flight_limit(max_tasks)
            while next_shard < len(ranges) and len(pending) < limit:
                start, stop = ranges[next_shard]
                uri = out.join(shards.shard_name(next_shard)).uri()
                pending[task.remote(images, uri, records[start:stop], strict, max_pixels)] = next_shard
                next_shard += 1
            [ready], _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready)
            result = ray.get(ready)
            if "error" in result:
                raise UserError(result["error"])
            results[index] = result
            done_images += ranges[index][1] - ranges[index][0]
            rate = done_images / max(time.monotonic() - started, 1e-9)
            progress(f"prepare: {sum(r is not None for r in results)}/{len(ranges)} shards, "
                     f"{done_images}/{len(records)} images, {rate:.0f} img/s")
    finally:
        for ref in pending:
            ray.cancel(ref)
    return results


def _remove_stale_shards(out: storage.Location, num_shards: int) -> None:
    """Delete shards a previous, larger run left behind (the new manifest no longer lists them)."""
    keep = {shards.shard_name(i) for i in range(num_shards)}
    try:
        names = [p.rsplit("/", 1)[-1] for p in out.fs.ls(out.path, detail=False)]
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith("shard-") and name.endswith(".parquet") and name not in keep:
            out.fs.rm(out.join(name).path)
