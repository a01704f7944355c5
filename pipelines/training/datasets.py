"""Ray Data datasets for training and validation.

`detection_dataset`: prepared shards (manifest.json) or a COCO layout (images/ +
annotations.json) -> streaming rows ready for `collate_detection_batch`, one epoch per dataset
for training (images in a seeded order per (seed, epoch)); decoded, resized and flipped in CPU
tasks.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.collate_fn import ArrowBatchCollateFn, NumpyBatchCollateFn

from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats import coco, shards
from pipelines.formats.annotations import train_image_counts
from pipelines.formats.shards import COCO_ANNOTATIONS, COCO_IMAGES, Manifest, input_kind, read_manifest
from pipelines.images.collate import arrow_columns, collate_detection_batch, collate_pixels
from pipelines.images.pixel_limit import DEFAULT_MAX_PIXELS
from pipelines.images.transforms import IMAGENET_MEAN, IMAGENET_STD, preprocess_batch
from pipelines.training.sampling import category_repeat_factors, drop_keys, repeat_rows
from pipelines.training.shuffle import WINDOW_BYTES, shuffled_epoch

log = logging.getLogger(__name__)

ROWS_PER_BLOCK = 64
DECODED_BLOCK_BYTES, MAX_BATCHES_PER_DECODE = 64 << 20, 8


class DetectionCollate(NumpyBatchCollateFn):
    """`collate_detection_batch` (float images, normalized on the CPU) as the collate class Ray
    2.60 prefers (plain functions are deprecated there):
    ``ds.iter_torch_batches(collate_fn=DetectionCollate())``."""

    def __init__(self, size_divisible: int = 128, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size_divisible, self.mean, self.std = size_divisible, tuple(mean), tuple(std)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        return collate_detection_batch(batch, self.size_divisible, self.mean, self.std)


class PixelCollate(ArrowBatchCollateFn):
    """`collate_pixels`: uint8 channels-last batches, normalized later by the trainer on its
    device (`pipelines.images.collate.normalize_images`); what the training loop iterates with.
    It takes the batch as Arrow, so the pixels are copied once, into the padded batch."""

    def __init__(self, size_divisible: int = 128):
        self.size_divisible = size_divisible

    def __call__(self, batch: pa.Table) -> dict:
        return collate_pixels(arrow_columns(batch), self.size_divisible)


def epoch_seed(seed: int, epoch: int) -> int:
    """One 32-bit seed per (seed, epoch): each epoch gets its own, reproducible image order."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def training_manifest(uri: str) -> Manifest:
    """The manifest of training data (shards, or a COCO layout read on the spot), without Ray:
    what a job needs to plan a run and check its input before starting Ray."""
    if training_input_kind(uri) == "shards":
        manifest = read_manifest(uri)
        if not manifest.shards:
            raise UserError(f"{uri}: the manifest lists no shards; rerun jobs.prepare")
        return manifest
    return coco_layout_records(uri)[1]


def detection_dataset(
    uri: str,
    *,
    image_size: float = 800,
    max_size: float = 1333,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    scale_jitter: tuple[float, float] | None = None,
    flip_prob: float = 0.5,
    batch_size: int = 16,
    repeat_factor_threshold: float | None = None,
    exclude_keys: np.ndarray | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    shuffle_window_bytes: int = WINDOW_BYTES,
) -> tuple[ray.data.Dataset, Manifest]:
    """Rows for `collate_detection_batch` from shards or a COCO layout, plus the dataset's manifest.

    For training the dataset is one epoch in an order fixed by (seed, epoch): shards are read in
    a seeded two-level shuffle (`pipelines.training.shuffle`: units of 64 images permuted over
    the whole dataset, dealt into windows of ~`shuffle_window_bytes` whose rows are permuted; a
    dataset smaller than a window is one permutation of all its images; nothing all-to-all), a
    COCO layout permutes its image list; new flips and jitter per (seed, epoch, image, copy).
    `scale_jitter=(lo, hi)` multiplies `image_size` by a factor drawn per image (training only);
    `max_size` stays the cap. `repeat_factor_threshold=t` (shards) repeats images of rare
    categories, LVIS's repeat-factor sampling (`pipelines.training.sampling`); the copies are
    shuffled within their window like any image. `exclude_keys` (`sampling.sample_keys` of rows
    already trained) leaves those rows out and keeps the others in the epoch's order: how a
    resumed epoch continues exactly.
    Rows carry ``copy`` so that a trainer can record its `sample_keys`. `max_pixels` bounds each
    decode (`pipelines.images.pixel_limit`); larger images are dropped and counted as undecodable.
    """
    kind = training_input_kind(uri)
    if kind == "shards":
        manifest = training_manifest(uri)
        columns = ["image_id", "image", "boxes", "category_id", "iscrowd"]
        if train:
            factors = None
            if repeat_factor_threshold:
                factors = category_repeat_factors(train_image_counts(uri), manifest.num_images, repeat_factor_threshold)
            ds = shuffled_epoch(shards.shard_uris(uri, manifest), manifest.shards, columns, seed=seed,
                                epoch_seed=epoch_seed(seed, epoch), epoch=epoch, factors=factors,
                                exclude_keys=exclude_keys, window_bytes=shuffle_window_bytes)
        else:
            ds = read_shards(shards.shard_uris(uri, manifest), columns)
    else:
        if train and repeat_factor_threshold:
            raise UserError(f"{uri}: repeat-factor sampling reads category counts from shards; run jobs.prepare")
        ds, manifest = coco_layout_dataset(uri, shuffle_seed=epoch_seed(seed, epoch) if train else None)
        if train:
            ds = ds.map_batches(repeat_rows, batch_format="pyarrow", fn_kwargs={"factors": None})
            if exclude_keys is not None and len(exclude_keys):
                ds = ds.map_batches(drop_keys, batch_format="pyarrow", fn_kwargs={"keys": np.unique(exclude_keys)})
    # Read tasks yield big blocks (up to ~128 MiB); cut them into blocks of whole batches so that
    # decoding spreads over every CPU instead of running in one task.
    rows = decode_block_rows(batch_size, image_size * (scale_jitter[1] if scale_jitter and train else 1), max_size)
    ds = ds.repartition(target_num_rows_per_block=rows).map_batches(
        preprocess_batch, batch_format="pyarrow", batch_size=rows,
        fn_kwargs={"category_ids": manifest.category_ids, "min_size": image_size, "max_size": max_size,
                   "train": train, "seed": seed, "epoch": epoch, "scale_jitter": scale_jitter,
                   "flip_prob": flip_prob, "max_pixels": max_pixels})
    if train:
        ds.context.execution_options.preserve_order = True  # the epoch's order, reproducibly
    return ds, manifest


def decode_block_rows(batch_size: int, image_size: float, max_size: float) -> int:
    """Rows per decode task: whole batches, up to `MAX_BATCHES_PER_DECODE` of them while their
    decoded pixels (at most image_size x max_size each) stay under `DECODED_BLOCK_BYTES`.
    Every task costs the split coordinator its scheduling: over an epoch's first 11 s at 128 px
    it used 2.4 CPU-s with one batch per task and 1.1 with eight (2 workers, 960 images)."""
    batch_bytes = batch_size * 3 * min(image_size, max_size) * max_size
    return batch_size * int(max(1, min(MAX_BATCHES_PER_DECODE, DECODED_BLOCK_BYTES // max(batch_bytes, 1))))


def training_input_kind(uri: str) -> str:
    """"shards" or "coco"; anything else is a UserError (checked before a job starts Ray)."""
    kind = input_kind(uri)
    if kind == "images":
        raise UserError(f"{uri}: neither a shards folder (manifest.json) nor a COCO layout "
                        f"({COCO_IMAGES}/ + {COCO_ANNOTATIONS}); run jobs.prepare or jobs.synth")
    return kind


def read_shards(uris: list[str], columns: list[str]) -> ray.data.Dataset:
    """The rows of prepared shards in their order, one read task per shard (blocks of at most
    `DataContext.target_max_block_size`, as `ray.data.read_parquet` makes them).

    We know the files from the manifest. `read_parquet` lists them and reads every footer in a
    pool of new actors on each execution, i.e. each epoch: measured on 2 cores with 512-image
    epochs, those actors' start-up and footer reads cost ~2 CPU ms per image, a sixth of all
    the input's CPU.
    """
    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=len(uris))
    return ds.map_batches(_read_shard, batch_size=1, batch_format="pyarrow", fn_kwargs={"columns": columns})


def _read_shard(batch: pa.Table, columns: list[str]) -> pa.Table:
    fs, path = storage.arrow_filesystem(batch["uri"][0].as_py())
    return pq.read_table(path, filesystem=fs, columns=columns)


def coco_layout_records(uri: str) -> tuple[list[dict], Manifest]:
    """Validated image records of a COCO layout and its manifest (annotations checked as in
    `jobs.prepare`; problems skipped and logged)."""
    root = storage.resolve(uri)
    annotations = root.join(COCO_ANNOTATIONS).uri()
    issues = coco.Issues()
    data = coco.load_annotations(annotations)
    categories = coco.categories_of(data, annotations)
    records = coco.image_records(data, issues)
    del data
    if issues.counts:
        log.warning("%s: skipped or fixed input problems: %s", annotations, issues.summary())
    if not records:
        raise UserError(f"{annotations}: no images listed; give a COCO file with images")
    manifest = Manifest(
        categories=categories, num_images=len(records),
        num_annotations=sum(len(r["boxes"]) for r in records),
        num_crowd=sum(sum(r["iscrowd"]) for r in records),
        num_empty_images=sum(not r["boxes"] for r in records),
        source={"images": root.join(COCO_IMAGES).uri(), "annotations": annotations},
        issues=dict(issues.counts), issue_examples=issues.examples)
    return records, manifest


def coco_layout_dataset(uri: str, shuffle_seed: int | None = None) -> tuple[ray.data.Dataset, Manifest]:
    """Shard-schema rows straight from ``images/`` + ``annotations.json`` (no prepare step),
    in an order permuted by `shuffle_seed`; images are read in parallel tasks, a missing file
    is logged and skipped."""
    records, manifest = coco_layout_records(uri)
    if shuffle_seed is not None:
        records = [records[i] for i in np.random.default_rng(shuffle_seed).permutation(len(records))]
    ds = ray.data.from_items(records, override_num_blocks=_num_blocks(len(records)))
    ds = ds.map_batches(_attach_images, batch_format="pyarrow", batch_size=ROWS_PER_BLOCK,
                        fn_kwargs={"images_uri": manifest.source["images"]})
    return ds, manifest


def _attach_images(batch: pa.Table, images_uri: str) -> pa.Table:
    loc = storage.resolve(images_uri)
    records = batch.to_pylist()
    fetched = storage.read_many(loc, [loc.join(r["file_name"]).path for r in records])
    kept, images = [], []
    for rec, data in zip(records, fetched):
        if isinstance(data, Exception):
            log.warning("skipping image_id %s: cannot read %s (%s)", rec["image_id"], rec["file_name"],
                        type(data).__name__)
            continue
        kept.append(rec)
        images.append(data)
    return shards.records_table(kept, images)


def _num_blocks(num_rows: int) -> int:
    return max(1, min(-(-num_rows // ROWS_PER_BLOCK), 10_000))
