"""Plans of formats with one annotation file per image (VOC, YOLO): listed lazily, twice.

Nothing here holds a record, or the whole listing, on the driver. A first pass streams the
listing (pages of ~1,000 names) to count the images and to decide their ids, keeping 8 bytes
per image; for VOC without --classes, Ray tasks read the XML files of each page for their
class names (the category ids must be fixed before any shard is written). A second pass
streams the listing again and cuts it into shards of `images_per_shard` names, drawn only as
the shard tasks finish: the driver holds the names of the shards in flight, nothing more.
Listing twice costs one LIST request per 1,000 files (on object stores) per pass.

Image ids: the number made of the digits in each file name (``BloodImage_00042`` -> 42,
``2008_000123`` -> 2008000123) when every name has digits and those numbers are unique (ids
then match a COCO conversion of the same set); otherwise the position in the listing
(0, 1, ...), which a rerun on the same files reproduces.
"""
from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pipelines.errors import UserError
from pipelines.formats import voc, yolo
from pipelines.formats.shard_tasks import Reader, bounded_map

_DIGITS = re.compile(r"\d+")
Pages = Callable[[], Iterator[list[str]]]  # a fresh listing, in pages of names


@dataclass
class Plan:
    """What prepare writes: categories, the shards' (entries, reader) drawn lazily, and counts."""

    categories: list[dict]
    shards: Iterable[tuple[list, Reader]]
    num_shards: int
    num_images: int
    source: dict


def name_number(name: str) -> int:
    """The digits of a file name's stem as one number, or -1 when it has none (or too many)."""
    digits = "".join(_DIGITS.findall(posixpath.splitext(posixpath.basename(name))[0]))
    return int(digits) if digits and len(digits) <= 18 else -1


def _first_pass(listings: list[Pages], empty: str, scan: Callable[[Iterator[list[str]]], None] | None = None):
    """(images per listing, ids by file number?) in one streaming pass; `scan`, when given,
    consumes the pages as they come (VOC's class names). No image at all is a user error."""
    counts, numbers = [0] * len(listings), []

    def each_page() -> Iterator[list[str]]:
        for i, pages in enumerate(listings):
            for page in pages():
                counts[i] += len(page)
                numbers.append(np.fromiter((name_number(n) for n in page), np.int64, len(page)))
                yield page

    if scan:
        scan(each_page())
    else:
        for _ in each_page():
            pass
    if not sum(counts):
        raise UserError(empty)
    ids = np.concatenate(numbers)
    return counts, bool((ids >= 0).all()) and len(np.unique(ids)) == len(ids)


def _shards(sources: list[tuple[Reader, Pages]], per_shard: int, by_number: bool) -> Iterator[tuple[list, Reader]]:
    """Second pass: (entries, reader) per shard, entries being (image_id, name); shards never
    span two sources."""
    row = 0
    for reader, pages in sources:
        entries: list = []
        for page in pages():
            for name in page:
                entries.append((name_number(name) if by_number else row, name))
                row += 1
                if len(entries) == per_shard:
                    yield entries, reader
                    entries = []
        if entries:
            yield entries, reader


def _plan(sources: list[tuple[Reader, Pages]], counts: list[int], by_number: bool, categories: list[dict],
          per_shard: int, source: dict) -> Plan:
    return Plan(categories=categories, shards=_shards(sources, per_shard, by_number),
                num_shards=sum(-(-c // per_shard) for c in counts), num_images=sum(counts),
                source={**source, "image_ids": "file_number" if by_number else "listing_order"})


def voc_plan(annotations: str, images: str | None, split: str | None, classes: str | None,
             per_shard: int, max_tasks: int | None) -> Plan:
    """VOC: XML files under `annotations` (or those of ImageSets/Main/<split>.txt), images in
    `images` (default: JPEGImages beside the annotations folder). Category ids are 1, 2, ...
    in the order of --classes, or of the sorted class names found in the XML files."""
    images = images or voc.default_images(annotations)
    pages = lambda: voc.iter_stems(annotations, split)  # noqa: E731
    names = voc.read_classes(classes) if classes else None
    found: set = set()

    def scan(listing: Iterator[list[str]]) -> None:  # class names from Ray tasks, a few pages in flight
        for _, page_names in bounded_map(voc.class_names, ((annotations, page) for page in listing), max_tasks):
            found.update(page_names)

    empty = (f"{annotations}: no VOC .xml files" + (f" listed in {voc.split_file(annotations, split)}" if split else "")
             + "; give the folder of VOC annotation files (Annotations/) as --annotations")
    counts, by_number = _first_pass([pages], empty, None if names else scan)
    if names is None:
        names = sorted(found)
        if not names:
            raise UserError(f"{annotations}: no <object> with a <name> in any xml; give VOC annotations with objects")
    category_ids = {name: k for k, name in enumerate(names, start=1)}
    source = {"format": "voc", "images": images, "annotations": annotations, "split": split, "classes": classes}
    return _plan([(voc.VocReader(annotations, images, category_ids), pages)], counts, by_number,
                 [{"id": k, "name": name} for name, k in category_ids.items()], per_shard, source)


def yolo_plan(data_yaml: str, images: str | None, split: str | None, per_shard: int) -> Plan:
    """YOLO: class names from `data_yaml`, images of one split: the folder `images`, or the
    split `split` of the yaml (one or more folders or list files)."""
    spec = yolo.load_data_yaml(data_yaml)
    if bool(images) == bool(split):
        raise UserError(f"{data_yaml}: give either --images (a split's image folder) or --split "
                        f"({', '.join(sorted(spec.splits)) or 'train, val'}) for a YOLO dataset")
    listed = [yolo.folder_source(images)] if images else yolo.split_sources(spec, split, data_yaml)
    where = images or ", ".join(base for base, _ in listed)
    empty = f"{where}: no images (.jpg, .jpeg, .png); give a split's image folder as --images, or --split"
    counts, by_number = _first_pass([pages for _, pages in listed], empty)
    sources = [(yolo.YoloReader(base, len(spec.names), spec.keypoints), pages) for base, pages in listed]
    return _plan(sources, counts, by_number, [{"id": k, "name": n} for k, n in enumerate(spec.names)], per_shard,
                 {"format": "yolo", "images": images or where, "annotations": data_yaml, "split": split})
