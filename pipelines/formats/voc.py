"""Pascal VOC (a folder of XML files plus JPEGImages/) -> the records of `jobs.prepare`.

The XML files are read and parsed inside the shard tasks (`VocReader`), a chunk at a time,
with the image they describe; the driver only lists their names. Each image is
``<images>/<xml stem><ext>`` (the extension of ``<filename>``, else ``.jpg``), as VOC's own
ImageSets ids name both files. Boxes are taken as written (xmin, ymin, xmax, ymax in pixels)
and judged by the same rules as COCO boxes (`coco.checked_xyxy`) against the decoded image's
size, which wins over ``<size>`` when they differ (counted as ``size_mismatch``). Objects
marked ``difficult`` are kept with ``iscrowd=True``, so that COCO evaluation ignores them as
VOC's own evaluation does, instead of counting them as missed.
"""
from __future__ import annotations

import math
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass

from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats import shards
from pipelines.formats.coco import Issues, checked_xyxy
from pipelines.formats.shard_tasks import read_images

SPLITS_FOLDER = ("ImageSets", "Main")  # beside the annotations folder: ImageSets/Main/<split>.txt


def default_images(annotations: str) -> str:
    """The JPEGImages folder beside the annotations folder (VOC's layout)."""
    return _sibling(annotations, "JPEGImages")


def _sibling(uri: str, *names: str) -> str:
    loc = storage.resolve(uri)
    parent = posixpath.dirname(loc.path.rstrip("/"))
    return loc.uri(posixpath.join(parent, *names))


def split_file(annotations: str, split: str) -> str:
    return _sibling(annotations, *SPLITS_FOLDER, f"{split}.txt")


def iter_stems(annotations: str, split: str | None, page: int = 1000) -> Iterator[list[str]]:
    """Pages of XML stems: the ImageSets list of `split`, or every .xml under the folder (sorted)."""
    if split:
        uri = split_file(annotations, split)
        if not storage.exists(uri):
            raise UserError(f"{uri}: not found; give a --split that ImageSets/Main has, or drop --split")
        lines = [line.split()[0] for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
        for start in range(0, len(lines), page):
            yield lines[start:start + page]
        return
    base = storage.resolve(annotations).uri().rstrip("/") + "/"
    for uris in storage.iter_files(annotations, [".xml"], page):
        yield [u[len(base):-4] for u in uris if u.startswith(base)]


def parse_xml(data: bytes) -> dict:
    """One VOC annotation: {"filename", "size": (w, h) or None, "objects": [(name, difficult, box)]}
    with box 4 floats or None when its bndbox is missing or not numeric; ValueError if no VOC XML."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"not XML ({exc})") from None
    if root.tag != "annotation":
        raise ValueError(f"root element is <{root.tag}>, not <annotation>")
    size = None
    try:
        width, height = int(float(root.findtext("size/width"))), int(float(root.findtext("size/height")))
        size = (width, height) if width > 0 and height > 0 else None
    except (TypeError, ValueError):
        pass
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "", "false", "False")
        try:
            box = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            box = box if all(math.isfinite(v) for v in box) else None
        except (TypeError, ValueError):
            box = None
        objects.append((name, difficult, box))
    return {"filename": (root.findtext("filename") or "").strip(), "size": size, "objects": objects}


def class_names(annotations: str, stems: list[str]) -> list[str]:
    """Body of a Ray task: the object names in these XML files (unreadable files skipped here;
    the shard tasks count them)."""
    loc = storage.resolve(annotations)
    names = set()
    for data in storage.read_many(loc, [loc.join(f"{s}.xml").path for s in stems]):
        if isinstance(data, BaseException):
            if storage.is_storage_fault(data):
                raise data
            continue
        try:
            names.update(name for name, _, _ in parse_xml(data)["objects"])
        except ValueError:
            continue
    return sorted(names)


def read_classes(uri: str) -> list[str]:
    """A --classes file: one class name per line (blank lines skipped), listed once each."""
    names = [line.strip() for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
    if not names:
        raise UserError(f"{uri}: no class names; give one class name per line")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{uri}: class {repeated[0]!r} listed twice; list each class once")
    return names


def image_name(stem: str, filename: str) -> str:
    ext = posixpath.splitext(filename)[1]
    return stem + (ext if ext.lower() in shards.IMAGE_SUFFIXES else ".jpg")


@dataclass
class VocReader:
    """Reads a chunk of (image_id, xml stem) entries into records; picklable, sent to each task."""

    annotations: str
    images: str
    category_ids: dict  # class name -> category id

    def read(self, entries: list, issues: Issues, max_pixels: int | None) -> tuple[list[dict], list[bytes]]:
        ann = storage.resolve(self.annotations)
        parsed = []
        for (image_id, stem), data in zip(entries, storage.read_many(ann, [ann.join(f"{s}.xml").path
                                                                          for _, s in entries])):
            where = {"image_id": image_id, "file_name": f"{stem}.xml"}
            try:
                if isinstance(data, BaseException):
                    if storage.is_storage_fault(data):
                        raise data
                    raise ValueError(f"{type(data).__name__}")
                doc = parse_xml(data)
            except ValueError as exc:
                issues.add("invalid_annotation_file", f"{ann.join(stem + '.xml').uri()}: {exc}", **where)
                continue
            parsed.append((image_id, image_name(stem, doc["filename"]), doc))
        wheres = [{"image_id": i, "file_name": name} for i, name, _ in parsed]
        got = read_images(storage.resolve(self.images), [name for _, name, _ in parsed], wheres, issues, max_pixels)
        records, images = [], []
        for (image_id, name, doc), where, image in zip(parsed, wheres, got):
            if image is None:
                continue
            data, width, height = image
            if doc["size"] is not None and doc["size"] != (width, height):
                issues.add("size_mismatch", f"file is {width}x{height}, xml says {doc['size'][0]}x{doc['size'][1]}; "
                           "the file's size is used", **where)
            records.append(self._record(image_id, name, width, height, doc["objects"], issues, where))
            images.append(data)
        return records, images

    def _record(self, image_id: int, name: str, width: int, height: int, objects: list, issues: Issues,
                where: dict) -> dict:
        rec = shards.new_record(image_id, name, width, height)
        for k, (cls, difficult, box) in enumerate(objects):
            at = {**where, "object": k}
            if cls not in self.category_ids:
                issues.add("unknown_category", f"class {cls!r} not in the classes", **at)
                continue
            if box is None:
                issues.add("invalid_box", "bndbox missing or not 4 finite numbers", **at)
                continue
            box = checked_xyxy(box, width, height, issues, at, "bndbox [" + ", ".join(f"{v:g}" for v in box) + "]")
            if box is None:
                continue
            shards.add_object(rec, box, self.category_ids[cls], difficult)
        return rec
