"""Batch inference on Ray Data, exactly once: units of work, decode tasks, detector actors, parts.

Exactly once without a transactional store: the sorted input list is cut into fixed units of
work (N images of a folder listing or a COCO file, or N rows of one shard), and unit k always
becomes the file ``part-k.parquet``, written in one atomic put once all of its rows exist. A rerun
lists the output once and skips every unit whose part is there, so killing the driver at any
moment loses at most the units in flight, never duplicates one. `_infer_plan.json` records what
the units were cut from (input fingerprint, unit size, model, options): a rerun with another
input or model fails instead of mixing two runs in one folder.

Pipeline: unit specs -> CPU tasks that read a unit and decode+resize it in chunks (bad files
become rows with ``error``) -> an actor pool holding the model (one GPU per actor with
--use-gpu) -> prediction rows, tagged (unit, index) -> the driver, which only groups these small
rows by unit and writes each part when it is complete. Ray Data's streaming executor bounds what
is in flight, so memory does not grow with the number of images; a retried task can repeat rows,
which the (unit, index) tags drop.

`Detector` imports no Ray: a GPU box without Ray runs the same batch code (bench/infer.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.inference import predictions
from pipelines.formats import shards
from pipelines import storage
from pipelines.formats.shards import COCO_ANNOTATIONS, COCO_IMAGES, IMAGE_SUFFIXES
from pipelines.errors import UserError
from pipelines.images.transforms import preprocess_images_batch

log = logging.getLogger(__name__)

PLAN_FILE = "_infer_plan.json"  # leading "_": Parquet/Hive readers skip it
DECODE_CHUNK = 16  # images per yield: Ray Data cuts a unit's pixels into blocks of its target size
MAX_IMAGE_PIXELS = 300_000_000  # PIL's bomb guard (89M) would reject a 10000x10000 photo
# What a decode task may hold (a chunk of resized images plus one full-size decode). Declaring it
# also keeps Ray Data from fusing decoding into the detector actors (it fuses only stages with
# equal resources), which would leave a GPU idle while its actor decodes.
DECODE_MEMORY = 1024**3
# Detector calls in flight per GPU actor: while one waits on the GPU, the next one's CPU work
# (canvas fill, host-to-device copy, building rows) runs, instead of leaving the GPU idle.
CALLS_PER_GPU = 2


# ------------------------------------------------------------------------------------ units
@dataclass
class InputPlan:
    """The units of work of an input, in unit order, and what identifies that input."""

    uri: str
    kind: str  # "images" (folder/prefix), "coco" (images/ + annotations.json) or "shards"
    units: list[dict]  # images/coco: {unit, uris, image_ids}; shards: {unit, shard, start, stop, images}
    num_images: int
    fingerprint: str  # sha256 of every input's identity, in order

    @property
    def has_image_ids(self) -> bool:
        return self.kind != "images"


def unit_size_of(spec: dict) -> int:
    return spec["stop"] - spec["start"] if "shard" in spec else len(spec["uris"])


def plan_input(uri: str, unit_size: int) -> InputPlan:
    """Cut an input (shards folder, COCO layout, or folder/prefix of images) into units."""
    kind = shards.input_kind(uri)
    digest = hashlib.sha256()
    units: list[dict] = []
    if kind == "shards":
        manifest = shards.read_manifest(uri)
        if not manifest.shards:
            raise UserError(f"{uri}: the manifest lists no shards; rerun jobs.prepare")
        shard_uris = shards.shard_uris(uri, manifest)
        present = storage.file_sizes(storage.resolve(shard_uris[0]).uri().rsplit("/", 1)[0])
        images = manifest.source.get("images", "")
        for info, shard in zip(manifest.shards, shard_uris):
            if info["file"] not in present:
                raise UserError(f"{shard}: listed in the manifest but missing; rerun jobs.prepare")
            digest.update(f"{info['file']}\t{info['num_images']}\t{info['num_bytes']}\n".encode())
            for start in range(0, info["num_images"], unit_size):
                units.append({"unit": len(units), "shard": shard, "images": images, "start": start,
                              "stop": min(start + unit_size, info["num_images"])})
        num_images = sum(s["num_images"] for s in manifest.shards)
    else:
        if kind == "coco":
            uris, ids = _coco_inputs(uri)
        else:
            uris, ids = storage.list_files(uri, suffixes=IMAGE_SUFFIXES), []
        if not uris:
            raise UserError(f"{uri}: no {'/'.join(IMAGE_SUFFIXES)} files found; check the folder or prefix")
        digest.update("\n".join(uris).encode())
        digest.update(json.dumps(ids).encode())
        for k, start in enumerate(range(0, len(uris), unit_size)):
            units.append({"unit": k, "uris": uris[start:start + unit_size], "image_ids": ids[start:start + unit_size]})
        num_images = len(uris)
    if num_images == 0:
        raise UserError(f"{uri}: the input holds no images")
    return InputPlan(uri, kind, units, num_images, digest.hexdigest())


def _coco_inputs(uri: str) -> tuple[list[str], list[int]]:
    """(image URIs, image ids) of a COCO layout, sorted by image id; annotations are not needed."""
    from pipelines.formats import coco

    root = storage.resolve(uri)
    issues = coco.Issues()
    records = sorted(coco.image_records(coco.load_annotations(root.join(COCO_ANNOTATIONS).uri()), issues),
                     key=lambda r: r["image_id"])
    dropped = {k: n for k, n in issues.counts.items() if k in ("invalid_image_entry", "duplicate_image_id")}
    if dropped:  # annotation problems do not matter here, image entries do
        log.warning("%s: image entries skipped: %s", uri, dropped)
    images = root.join(COCO_IMAGES)
    return [images.join(r["file_name"]).uri() for r in records], [r["image_id"] for r in records]


# ------------------------------------------------------------------------------ run identity
def check_plan(output: str, record: dict) -> None:
    """Record what this output holds on the first run; refuse a rerun that would mix another."""
    loc = storage.resolve(output)
    loc.fs.invalidate_cache()  # another process (the killed run) may have written here
    uri = loc.join(PLAN_FILE).uri()
    if not storage.exists(uri):
        storage.write_bytes_atomic(uri, json.dumps(record, indent=1, sort_keys=True).encode())
        return
    try:
        earlier = json.loads(storage.read_bytes(uri))
    except ValueError:
        raise UserError(f"{uri}: unreadable; delete it (and the parts beside it) or use a new --output") from None
    changed = sorted(k for k in set(record) | set(earlier) if record.get(k) != earlier.get(k))
    if changed:
        what = ", ".join(f"{k}: {earlier.get(k)!r} then, {record.get(k)!r} now" for k in changed)
        raise UserError(f"{output}: holds part of a run with other settings ({what}); rerun with the same "
                        "command to resume, or use a new --output")


def pending_units(plan: InputPlan, output: str) -> tuple[list[dict], int]:
    """Units without a part file (one listing of the output), and the count already done."""
    loc = storage.resolve(output)
    loc.fs.invalidate_cache()
    done = set()
    if loc.fs.exists(loc.path):
        done = {predictions.unit_of(p) for p in storage.list_files(output, suffixes=[predictions.PART_SUFFIX])}
        if loc.protocol == "file":  # temporaries of atomic writes a killed run left behind
            for path in loc.fs.find(loc.path):
                if ".parquet.tmp-" in path:
                    loc.fs.rm(path)
    pending = [u for u in plan.units if u["unit"] not in done]
    return pending, len(plan.units) - len(pending)


# ---------------------------------------------------------------------------- read + decode
def unit_rows(spec: dict, chunk: int = DECODE_CHUNK) -> Iterator[pa.Table]:
    """Rows ``uri``, ``image`` (encoded), ``image_id``, ``error``, ``unit``, ``index`` of one unit,
    `chunk` at a time; an unreadable file is a row with ``error`` set."""
    if "shard" in spec:
        yield from _shard_rows(spec, chunk)
        return
    uris, ids = spec["uris"], spec["image_ids"]
    loc = storage.resolve(uris[0])
    for start in range(0, len(uris), chunk):
        part = uris[start:start + chunk]
        fetched = storage.read_many(loc, [storage.resolve(u).path for u in part])
        yield _rows(spec["unit"], start, part, [None if isinstance(d, Exception) else d for d in fetched],
                    pa.array(ids[start:start + chunk] or [None] * len(part), pa.int64()),
                    [f"cannot read: {type(d).__name__}: {d}"[:300] if isinstance(d, Exception) else None
                     for d in fetched])


def _shard_rows(spec: dict, chunk: int) -> Iterator[pa.Table]:
    """Rows [start, stop) of a shard, reading only the row groups that hold them."""
    start, stop = spec["start"], spec["stop"]
    images = storage.resolve(spec["images"]) if spec["images"] else None
    fs, path = storage.arrow_filesystem(spec["shard"])
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        groups, first, row = [], None, 0
        for g in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            if row < stop and row + n > start:
                groups.append(g)
                first = row if first is None else first
            row += n
        position = first or 0
        for batch in parquet.iter_batches(batch_size=chunk, row_groups=groups,
                                          columns=["image_id", "file_name", "image"]):
            lo, hi = max(start - position, 0), min(stop - position, batch.num_rows)
            first_index = position + lo - start
            position += batch.num_rows
            if hi <= lo:
                continue
            batch = batch.slice(lo, hi - lo)
            names = batch.column("file_name").to_pylist()
            uris = [images.join(n).uri() for n in names] if images else names
            yield _rows(spec["unit"], first_index, uris, batch.column("image"), batch.column("image_id"),
                        [None] * len(names))


def _rows(unit: int, first_index: int, uris, images, image_ids, errors) -> pa.Table:
    n = len(uris)
    return pa.table({
        "uri": pa.array(uris, pa.string()), "image": pa.array(images, pa.binary()),
        "image_id": pa.array(image_ids, pa.int64()), "error": pa.array(errors, pa.string()),
        "unit": pa.array(np.full(n, unit, np.int64)), "index": pa.array(np.arange(first_index, first_index + n, dtype=np.int32)),
    })


@contextlib.contextmanager
def _max_image_pixels(limit: int):
    from PIL import Image

    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode_units(batch: pa.Table, *, min_size: float, max_size: float, chunk: int = DECODE_CHUNK,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[pa.Table]:
    """Ray Data task (generator): unit specs -> decoded, resized rows, `chunk` images per yield.

    JPEGs decode at reduced DCT scale and everything is resized at once (`load_resized`), so a
    10000x10000 photo costs its reduced decode, not 300 MB of pixels per stage.
    """
    for spec in batch.to_pylist():
        for rows in unit_rows(spec, chunk):
            with _max_image_pixels(max_pixels):
                decoded = preprocess_images_batch(rows, min_size=min_size, max_size=max_size)
            yield decoded


# ---------------------------------------------------------------------------------- detector
def _binary_buffers(column) -> tuple[np.ndarray, np.ndarray]:
    """(bytes as uint8, offsets as int64) of a binary column, without copying each value."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    _, offsets, data = arr.buffers()
    offsets = np.frombuffer(offsets, width)[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    return (np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)), offsets


class Detector:
    """The model, loaded once per Ray Data actor: decoded rows -> prediction rows (original pixels).

    `checkpoint` is the checkpoint's bytes or an ObjectRef to them (put once by the driver, so
    actors never download weights themselves).
    """

    def __init__(self, checkpoint, *, model_name: str, score_thresh: float | None = None,
                 max_detections: int | None = None, use_gpu: bool = False, amp: str | None = None,
                 threads: int | None = None, debug_sleep: float = 0.0):
        import torch

        import retinanet

        if not isinstance(checkpoint, (bytes, bytearray)):
            import ray

            checkpoint = ray.get(checkpoint)
        model, _ = retinanet.load_checkpoint(bytes(checkpoint))
        overrides = {"score_thresh": score_thresh, "detections_per_img": max_detections}
        model.config = model.config.replace(**{k: v for k, v in overrides.items() if v is not None})
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if threads and not use_gpu:
            torch.set_num_threads(threads)
        model = model.to(self.device).eval()
        if use_gpu:
            model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.model, self.categories, self.model_name = model, model.categories, model_name
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if use_gpu else None
        self.mean = torch.tensor(model.config.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(model.config.image_std, device=self.device).view(1, 3, 1, 1)
        self.debug_sleep = debug_sleep

    def detect(self, pixels, heights: np.ndarray, widths: np.ndarray) -> list[dict]:
        """Resized HxWx3 uint8 images (a binary column) -> detections in resized pixels (CPU tensors).

        Pads into one uint8 canvas and normalizes on the device: the host copies a quarter of
        the bytes of a float batch and does no arithmetic per pixel.
        """
        import torch

        data, offsets = _binary_buffers(pixels)
        div = self.model.config.size_divisible
        pad_h, pad_w = (int(-(-max(int(s.max()), 1) // div) * div) for s in (heights, widths))
        canvas = np.zeros((len(heights), pad_h, pad_w, 3), np.uint8)
        for i, (h, w) in enumerate(zip(heights.tolist(), widths.tolist())):  # one copy per image
            canvas[i, :h, :w] = data[offsets[i]:offsets[i + 1]].reshape(h, w, 3)
        sizes = torch.from_numpy(np.stack([heights, widths], 1).astype(np.int64))
        with torch.inference_mode():
            images = torch.from_numpy(canvas).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            if self.device.type == "cpu":
                images = images.contiguous()  # channels_last only pays off on GPUs
            images = images.float().div_(255.0).sub_(self.mean).div_(self.std)
            inside = (torch.arange(pad_h, device=self.device)[None, :, None] < sizes[:, :1, None].to(self.device)) & (
                torch.arange(pad_w, device=self.device)[None, None, :] < sizes[:, 1:, None].to(self.device))
            images.mul_(inside[:, None])
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out = self.model(images, sizes)
        return [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in d.items()} for d in out]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Decoded rows (`preprocess_images_batch` + unit/index) -> predictions schema + unit/index."""
        n = batch.num_rows
        valid = pc.is_null(batch["error"]).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(valid)
        counts = np.zeros(n, np.int64)
        boxes, scores, labels = np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros(0, np.int64)
        if len(rows):
            sub = batch.take(pa.array(rows))
            col = lambda name: sub[name].to_numpy().astype(np.int64)  # noqa: E731
            heights, widths = col("height"), col("width")
            dets = self.detect(sub["pixels"], heights, widths)
            per_image = np.array([len(d["scores"]) for d in dets], np.int64)
            counts[rows] = per_image
            ratio = np.stack([col("orig_width") / widths, col("orig_height") / heights] * 2, 1)  # x, y, x, y
            boxes = np.concatenate([d["boxes"].numpy() for d in dets]).astype(np.float64) * np.repeat(ratio, per_image, 0)
            scores = np.concatenate([d["scores"].numpy() for d in dets])
            labels = np.concatenate([d["labels"].numpy() for d in dets])
        if self.debug_sleep:
            time.sleep(self.debug_sleep)
        size_mask = pa.array(~valid)
        return pa.table({
            "unit": batch["unit"], "index": batch["index"], "image_id": batch["image_id"], "uri": batch["uri"],
            "width": pc.if_else(size_mask, None, batch["orig_width"].cast(pa.int32())),
            "height": pc.if_else(size_mask, None, batch["orig_height"].cast(pa.int32())),
            "detections": predictions.detections_array(counts, valid, boxes, scores, labels, self.categories),
            "error": batch["error"],
            "model": pa.array([self.model_name] * n, pa.string()),
        })


# ------------------------------------------------------------------------------ the run
@dataclass
class InferenceOptions:
    """How to run the detector; the model-facing values also go into the plan record."""

    batch_size: int = 16
    min_actors: int = 1
    max_actors: int = 1
    use_gpu: bool = False
    cpus_per_actor: int = 1
    score_thresh: float | None = None
    max_detections: int | None = None
    min_size: int = 800
    max_size: int = 1333
    amp: str | None = None
    debug_sleep: float = 0.0  # per detector batch; lets tests kill a run mid-way

    def results_key(self) -> dict:
        """The options that change the rows (a rerun must match them to resume)."""
        return {k: v for k, v in asdict(self).items()
                if k in ("score_thresh", "max_detections", "min_size", "max_size", "amp")}


@dataclass
class RunStats:
    images: int
    errors: int
    parts: int
    seconds: float  # pipeline start to last part written
    first_row_seconds: float | None  # pipeline start to the first prediction rows (actor start-up, warm-up)


def run_inference(pending: list[dict], output: str, checkpoint, model_name: str, options: InferenceOptions) -> RunStats:
    """Run the pending units through decode tasks and the detector pool; write their parts."""
    import ray

    start = time.perf_counter()
    first = None
    writer = predictions.PartWriter(output, {u["unit"]: unit_size_of(u) for u in pending})
    if pending:
        o = options
        ref = checkpoint if isinstance(checkpoint, ray.ObjectRef) else ray.put(checkpoint)
        calls = CALLS_PER_GPU if o.use_gpu else 1  # on CPU torch's threads already use every core
        sizes = {"size": o.min_actors} if o.min_actors == o.max_actors else {"min_size": o.min_actors,
                                                                              "max_size": o.max_actors}
        pool = ray.data.ActorPoolStrategy(**sizes, max_concurrent_calls_per_actor=calls,
                                          enable_true_multi_threading=calls > 1)
        ds = ray.data.from_items(pending, override_num_blocks=len(pending))
        ds = ds.map_batches(decode_units, batch_size=1, batch_format="pyarrow", memory=DECODE_MEMORY,
                            fn_kwargs={"min_size": o.min_size, "max_size": o.max_size})
        ds = ds.map_batches(
            Detector, batch_size=o.batch_size, batch_format="pyarrow", compute=pool,
            num_gpus=1 if o.use_gpu else 0, num_cpus=o.cpus_per_actor,
            fn_constructor_kwargs={"checkpoint": ref, "model_name": model_name, "score_thresh": o.score_thresh,
                                   "max_detections": o.max_detections, "use_gpu": o.use_gpu, "amp": o.amp,
                                   "threads": o.cpus_per_actor, "debug_sleep": o.debug_sleep})
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            first = first if first is not None else time.perf_counter() - start
            writer.add(batch)
        writer.finish()
    return RunStats(writer.images, writer.errors, writer.parts, time.perf_counter() - start, first)
