"""YOLO (Ultralytics layout: data.yaml, images/<split>/, labels/<split>/) -> the records of
`jobs.prepare`.

Labels are found where Ultralytics finds them: the image path with its last ``/images/``
replaced by ``/labels/`` and its extension by ``.txt``; an image without a label file has no
objects. Each label line is ``class cx cy w h`` normalized to [0, 1] (a segment line ``class
x1 y1 x2 y2 ...`` counts as its bounding box; with ``kpt_shape`` in data.yaml the first four
values are the box), turned into pixels with the decoded image's size and judged by the same
rules as COCO boxes (`coco.checked_xyxy`). The category id of a class is its index in
``names`` (0, 1, ...): the number the label files and a YOLO user already use; training maps
ids to labels and evaluation matches them as opaque keys, so id 0 is an ordinary id.
Label files are read and parsed inside the shard tasks (`YoloReader`), never on the driver.
"""
from __future__ import annotations

import math
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import yaml

from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats import shards
from pipelines.formats.coco import Issues, checked_xyxy
from pipelines.formats.shard_tasks import read_images


@dataclass
class DataYaml:
    root: str  # the dataset root (`path`), a URI
    names: list[str]  # class index -> name
    keypoints: bool  # a pose dataset: label lines are a box followed by keypoints
    splits: dict  # split name -> str or list of str, as written


def load_data_yaml(uri: str) -> DataYaml:
    """Read an Ultralytics data.yaml: `names` as a list or {index: name}, `path` relative to the
    yaml's folder (absent: that folder)."""
    try:
        data = yaml.safe_load(storage.read_bytes(uri))
    except yaml.YAMLError as exc:
        raise UserError(f"{uri}: not valid YAML ({str(exc).splitlines()[0]}); give a YOLO data.yaml") from None
    if not isinstance(data, dict) or "names" not in data:
        raise UserError(f"{uri}: no 'names'; give a YOLO data.yaml with the class names")
    names = data["names"]
    if isinstance(names, dict):
        try:
            names = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            raise UserError(f"{uri}: 'names' keys must be class indexes 0, 1, ...") from None
        if sorted(names) != list(range(len(names))):
            raise UserError(f"{uri}: 'names' indexes must be 0..{len(names) - 1} without gaps; fix 'names'")
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not names:
        raise UserError(f"{uri}: 'names' must be a non-empty list or {{index: name}}; fix data.yaml")
    folder = posixpath.dirname(storage.resolve(uri).path)
    root = _under(storage.resolve(uri), folder, str(data.get("path") or ""))
    splits = {k: v for k, v in data.items() if k in ("train", "val", "test") and v}
    return DataYaml(root=root, names=[str(n) for n in names], keypoints="kpt_shape" in data, splits=splits)


def _under(loc: storage.Location, folder: str, path: str) -> str:
    """`path` as a URI: itself when absolute (or a URI), else relative to `folder` of `loc`."""
    if "://" in path or (path.startswith("/") and loc.protocol == "file"):
        return path
    return loc.uri(posixpath.normpath(posixpath.join(folder, path)) if path else folder)


def split_sources(spec: DataYaml, split: str, yaml_uri: str) -> list[tuple[str, Callable[[], Iterator[list[str]]]]]:
    """The image sources of `split`: (base URI, a function listing pages of names under it)."""
    if split not in spec.splits:
        known = ", ".join(sorted(spec.splits)) or "none"
        raise UserError(f"{yaml_uri}: no split {split!r} (it lists: {known}); give --split one of them or --images")
    entries = spec.splits[split]
    root = storage.resolve(spec.root)
    sources = []
    for entry in entries if isinstance(entries, list) else [entries]:
        uri = _under(root, root.path, str(entry))
        sources.append(_list_file_source(uri) if uri.lower().endswith(".txt") else folder_source(uri))
    return sources


def folder_source(uri: str) -> tuple[str, Callable[[], Iterator[list[str]]]]:
    """Every image (.jpg/.jpeg/.png) under a folder, recursively, in sorted pages."""
    base = storage.resolve(uri).uri().rstrip("/") + "/"

    def pages() -> Iterator[list[str]]:
        for uris in storage.iter_files(uri, shards.IMAGE_SUFFIXES):
            yield [u[len(base):] for u in uris if u.startswith(base)]
    return uri, pages


def _list_file_source(uri: str) -> tuple[str, Callable[[], Iterator[list[str]]]]:
    """A list file of image paths relative to its own folder (``./images/a.jpg``), as autosplit writes."""
    loc = storage.resolve(uri)
    base = loc.uri(posixpath.dirname(loc.path))

    def pages(page: int = 1000) -> Iterator[list[str]]:
        lines = [line.strip() for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
        absolute = next((line for line in lines if line.startswith("/") or "://" in line), None)
        if absolute:
            raise UserError(f"{uri}: {absolute} is absolute; list images relative to the list file (./images/...)")
        names = [posixpath.normpath(line) for line in lines]
        for start in range(0, len(names), page):
            yield names[start:start + page]
    return base, pages


def label_path(image_path: str) -> str:
    """Where Ultralytics looks for an image's labels: last /images/ -> /labels/, extension -> .txt."""
    head, sep, tail = image_path.rpartition("/images/")
    path = f"{head}/labels/{tail}" if sep else image_path
    return path.rsplit(".", 1)[0] + ".txt"


def parse_line(values: list[str], keypoints: bool) -> tuple[float, list[float]] | None:
    """(class, normalized xyxy) of one label line, or None when it is not a box or segment."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return None
    cls, coords = numbers[0], numbers[1:]
    if keypoints and len(coords) >= 4 or len(coords) == 4:
        cx, cy, w, h = coords[:4]
        return cls, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    if len(coords) >= 6 and len(coords) % 2 == 0:
        xs, ys = coords[0::2], coords[1::2]
        return cls, [min(xs), min(ys), max(xs), max(ys)]
    return None


@dataclass
class YoloReader:
    """Reads a chunk of (image_id, image name) entries into records; picklable, sent to each task."""

    images: str
    num_classes: int
    keypoints: bool = False

    def read(self, entries: list, issues: Issues, max_pixels: int | None) -> tuple[list[dict], list[bytes]]:
        loc = storage.resolve(self.images)
        wheres = [{"image_id": i, "file_name": name} for i, name in entries]
        got = read_images(loc, [name for _, name in entries], wheres, issues, max_pixels)
        found = [(entry, where, image) for entry, where, image in zip(entries, wheres, got) if image is not None]
        paths = [label_path(loc.join(name).path) for (_, name), _, _ in found]
        records, images = [], []
        for ((image_id, name), where, (data, width, height)), path, text in zip(
                found, paths, storage.read_many(loc, paths)):
            if isinstance(text, BaseException):
                if storage.is_storage_fault(text):
                    raise text
                text = b""  # no label file: an image without objects
            try:
                lines = text.decode().splitlines()
            except UnicodeDecodeError as exc:
                issues.add("invalid_annotation_file", f"{loc.uri(path)}: not text ({exc})", **where)
                continue
            records.append(self._record(image_id, name, width, height, lines, issues, where))
            images.append(data)
        return records, images

    def _record(self, image_id: int, name: str, width: int, height: int, lines: list[str], issues: Issues,
                where: dict) -> dict:
        rec = shards.new_record(image_id, name, width, height)
        for k, line in enumerate(lines, start=1):
            values = line.split()
            if not values:
                continue
            at = {**where, "line": k}
            parsed = parse_line(values, self.keypoints)
            if parsed is None or not all(math.isfinite(v) for v in (parsed[0], *parsed[1])):
                issues.add("invalid_box", f"line {line.strip()[:80]!r} is not 'class cx cy w h' or a segment", **at)
                continue
            cls, (x1, y1, x2, y2) = parsed
            if cls != int(cls) or not 0 <= cls < self.num_classes:
                issues.add("unknown_category", f"class id {values[0]} not in names (0..{self.num_classes - 1})", **at)
                continue
            box = checked_xyxy([x1 * width, y1 * height, x2 * width, y2 * height], width, height, issues, at,
                               f"line {line.strip()[:80]!r}")
            if box is None:
                continue
            shards.add_object(rec, box, int(cls), False)
        return rec
