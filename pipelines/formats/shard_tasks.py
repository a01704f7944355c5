"""The Ray side of `jobs.prepare`: one task per shard reads, checks and writes its images.

Every input format comes here the same way: a shard's *entries* (COCO: validated records;
VOC and YOLO: (image_id, name) pairs whose annotation files the task itself reads and parses)
plus a *reader* that turns a chunk of entries into records and encoded images. So the parsing
of per-image annotation files happens in the tasks, on the cluster, never on the driver, and
the driver's only per-image cost is the entries of the shards in flight.

Memory per task stays under one shard: a shard whose images outgrow `max_bytes` (VOC and YOLO
shards are cut by count, since a lazy listing has no sizes) is written as several part files.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats import shards
from pipelines.formats.coco import Issues
from pipelines.images.transforms import ImageDecodeError, probe_image


class Reader(Protocol):
    def read(self, entries: list, issues: Issues, max_pixels: int | None) -> tuple[list[dict], list[bytes]]:
        """Records (the shard row layout minus the image) and their encoded bytes, problems counted."""


def read_images(loc: storage.Location, names: list[str], wheres: list[dict], issues: Issues,
                max_pixels: int | None) -> list[tuple[bytes, int, int] | None]:
    """Fetch images (concurrently on object stores) and check each one decodes: (bytes, width,
    height) per name, None (counted as missing or corrupt) where it does not."""
    paths = [loc.join(name).path for name in names]
    out = []
    for path, where, data in zip(paths, wheres, storage.read_many(loc, paths)):
        if isinstance(data, BaseException):
            issues.add("missing_image", f"{loc.uri(path)}: {type(data).__name__}", **where)
            out.append(None)
            continue
        try:
            width, height = probe_image(data, max_pixels)
        except ImageDecodeError as exc:
            issues.add("corrupt_image", f"{loc.uri(path)}: {exc}", **where)
            out.append(None)
            continue
        out.append((data, width, height))
    return out


def part_name(index: int, part: int) -> str:
    """Shard `index`'s file for part `part`: the plain shard name for the first part."""
    return shards.shard_name(index) if part == 0 else f"shard-{index:05d}-{part:02d}.parquet"


def write_one_shard(out_uri: str, index: int, entries: list, reader: Reader, strict: bool,
                    max_pixels: int | None, max_bytes: int) -> dict:
    """Body of one Ray task: read, check and write shard `index`; returns its tally (never raises
    for bad input: a strict failure comes back as ``{"error": ...}`` for the driver to report)."""
    out = storage.resolve(out_uri)
    issues = Issues(strict=strict)
    stats = {"num_images": 0, "num_annotations": 0, "num_crowd": 0, "num_empty_images": 0}

    def tables() -> Iterator:
        for start in range(0, len(entries), shards.ROW_GROUP_IMAGES):
            records, images = reader.read(entries[start:start + shards.ROW_GROUP_IMAGES], issues, max_pixels)
            for rec in records:
                stats["num_annotations"] += len(rec["boxes"])
                stats["num_crowd"] += sum(rec["iscrowd"])
                stats["num_empty_images"] += not rec["boxes"]
            yield shards.records_table(records, images)

    files = []
    try:
        chunks = tables()
        pending = next(chunks, None)

        def one_part():  # the chunks up to max_bytes of images (at least one), looking one ahead
            nonlocal pending
            size, rows = 0, 0
            while pending is not None and (rows == 0 or size + pending["image"].nbytes <= max_bytes):
                size, rows = size + pending["image"].nbytes, rows + pending.num_rows
                yield pending
                pending = next(chunks, None)
            files[-1]["num_images"] = rows

        while not files or pending is not None:
            files.append({"file": part_name(index, len(files)), "num_images": 0, "num_bytes": 0})
            files[-1]["num_bytes"] = shards.write_shard(out.join(files[-1]["file"]).uri(), one_part())
    except UserError as exc:
        return {"error": str(exc)}
    stats["num_images"] = sum(f["num_images"] for f in files)
    return {**stats, "files": files, "num_entries": len(entries), "issues": dict(issues.counts),
            "examples": issues.examples}


def in_flight_limit(max_tasks: int | None) -> int:
    """Tasks to keep in flight now: the cluster's CPUs as they are at this moment (an autoscaler
    adds nodes during the run) plus a quarter queued, so that the autoscaler sees demand; never
    more than `max_tasks`.

    Not many more: a queued task makes Ray start another worker process (~100 MB) early, and
    each running shard task holds up to one shard. Peak memory is thus about (CPUs x shard) plus
    Ray's own processes, whatever the number of images.
    """
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(cpus + max(1, cpus // 4), max_tasks or cpus * 2))


def bounded_map(fn: Callable, calls: Iterable[tuple], max_tasks: int | None = None) -> Iterator[tuple[int, object]]:
    """Run `fn(*args)` as a Ray task (1 CPU) for each args of `calls`, yielding (position, result)
    as they finish; `calls` is drawn lazily, only as tasks finish, so a listing feeding it is
    read no faster than the cluster works through it."""
    import ray

    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=1)(fn)
    calls = enumerate(calls)
    pending: dict = {}
    exhausted = False
    try:
        while True:
            limit = in_flight_limit(max_tasks)
            while not exhausted and len(pending) < limit:
                nxt = next(calls, None)
                if nxt is None:
                    exhausted = True
                    break
                pending[task.remote(*nxt[1])] = nxt[0]
            if not pending:
                return
            [ready], _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(ready), ray.get(ready)
    finally:
        for ref in pending:
            ray.cancel(ref)


def run_shard_tasks(out: storage.Location, shard_entries: Iterable[tuple[list, Reader]], num_shards: int,
                    num_entries: int, strict: bool, max_pixels: int | None, max_bytes: int,
                    max_tasks: int | None, progress: Callable[[str], None]) -> list[dict]:
    """Write every shard of `shard_entries` (drawn lazily), reporting progress; results in shard order."""
    calls = ((out.uri(), i, entries, reader, strict, max_pixels, max_bytes)
             for i, (entries, reader) in enumerate(shard_entries))
    results: dict[int, dict] = {}
    done, started = 0, time.monotonic()
    for index, result in bounded_map(write_one_shard, calls, max_tasks):
        if "error" in result:
            raise UserError(result["error"])
        results[index] = result
        done += result["num_entries"]
        rate = done / max(time.monotonic() - started, 1e-9)
        progress(f"prepare: {len(results)}/{num_shards} shards, {done}/{num_entries} images, {rate:.0f} img/s")
    return [results[i] for i in range(len(results))]
