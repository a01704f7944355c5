"""Synthetic shapes in COCO layout: the embedded demo and test data.

Made so that a tiny RetinaNet learns it in minutes on a CPU yet still exercises a detector:
each class is a distinct shape (circle, square, triangle, ...) in its own colour family, at
sizes from ~10 to ~90 px per 128 px of image (log-uniform, so every FPN level gets work),
several per image with partial occlusion (a later object may hide at most 40% of an earlier
one), about 1 image in 10 empty, on a noisy gradient background. Boxes are exact: each shape
is drawn through a mask and its box is the mask's extent. Everything is a pure function of
(seed, image index), so any image can be regenerated alone and output is byte-identical for a
seed. ``long_tail=R`` makes class k appear with probability proportional to (k+1)^-a, with a
chosen so that the most frequent class is R times the least frequent. Beyond ten classes a class
is a (shape, colour) pair, up to 100, so that class count can approach COCO's 80.
"""
from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

from pipelines import storage
from pipelines.errors import UserError

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "tee", "diamond", "crescent", "bar")
PALETTE = ((230, 60, 50), (40, 110, 235), (50, 185, 60), (245, 205, 30), (165, 60, 225),
           (20, 205, 215), (250, 130, 20), (245, 80, 175), (255, 255, 255), (15, 15, 15))
MIN_OBJECT, MAX_OBJECT = 10 / 128, 90 / 128  # object size range as a fraction of the image side
MAX_OBJECTS, EMPTY_FRACTION, MAX_HIDDEN = 6, 0.1, 0.4
MAX_CLASSES = len(SHAPES) * len(PALETTE)


def class_look(cls: int) -> tuple[str, tuple[int, int, int]]:
    """(shape, colour) of class `cls`: the first ten are one shape each in its own colour; class
    10j + k is shape k in the colour j places further along the palette, so every pair is distinct."""
    shape = cls % len(SHAPES)
    return SHAPES[shape], PALETTE[(shape + cls // len(SHAPES)) % len(PALETTE)]


def class_name(cls: int) -> str:
    shape, _ = class_look(cls)
    return shape if cls < len(SHAPES) else f"{shape}-{cls // len(SHAPES)}"


def class_probabilities(num_classes: int, long_tail: float = 1.0) -> np.ndarray:
    """Power-law class frequencies with head/tail ratio `long_tail` (1 = uniform)."""
    exponent = math.log(long_tail) / math.log(num_classes) if num_classes > 1 else 0.0
    weights = np.arange(1, num_classes + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices in the unit square for the polygon shapes."""
    if shape == "triangle":
        return [(0.5, 0), (1, 1), (0, 1)]
    if shape == "diamond":
        return [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    if shape == "tee":
        a, b = 1 / 3, 2 / 3
        return [(0, 0), (1, 0), (1, a), (b, a), (b, 1), (a, 1), (a, a), (0, a)]
    if shape == "cross":
        a, b = 1 / 3, 2 / 3
        return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    if shape == "star":
        pts = [(math.cos(math.pi / 2 + k * math.pi / 5) * (1 if k % 2 == 0 else 0.45),
                -math.sin(math.pi / 2 + k * math.pi / 5) * (1 if k % 2 == 0 else 0.45)) for k in range(10)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in pts]
    raise ValueError(shape)


def shape_mask(shape: str, size: int) -> np.ndarray:
    """A boolean mask of `shape` filling a size x size square (bar: size x size/3)."""
    height = max(3, size // 3) if shape == "bar" else size
    img = Image.new("L", (size, height), 0)
    draw = ImageDraw.Draw(img)
    box = (0, 0, size - 1, height - 1)
    if shape in ("square", "bar"):
        draw.rectangle(box, fill=255)
    elif shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, outline=255, width=max(2, size // 5))
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        shift = 0.4 * size
        draw.ellipse((shift, -0.1 * size, size - 1 + shift, 0.9 * size), fill=0)
    else:
        draw.polygon([(x * (size - 1), y * (height - 1)) for x, y in _polygon(shape)], fill=255)
    return np.asarray(img) > 0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(60, 190) + rng.uniform(-12, 12, size=3)  # near-gray: no class colour
    ramp = np.linspace(-1, 1, size)
    gradient = rng.uniform(-25, 25) * ramp[None, :, None] + rng.uniform(-25, 25) * ramp[:, None, None]
    noise = rng.normal(0, 6, size=(size, size, 3))
    return np.clip(base + gradient + noise, 0, 255)


def generate_image(index: int, *, seed: int, image_size: int, class_probs: np.ndarray,
                   object_scale: int | None = None):
    """Image `index` of the set `seed`: (JPEG bytes, [(class index, [x, y, w, h], visible area)]).
    Object sizes follow `object_scale` px (default: the image side), so a larger canvas at a fixed
    scale holds the same objects among more background."""
    rng = np.random.default_rng([seed, index])
    canvas = _background(rng, image_size)
    owner = np.full((image_size, image_size), -1, np.int16)  # which object shows at each pixel
    objects = []  # (class, x, y, mask)
    visible: list[int] = []  # pixels of each object still showing
    count = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_OBJECTS + 1))
    scale = object_scale or image_size
    lo, hi = math.log(MIN_OBJECT * scale), math.log(MAX_OBJECT * scale)
    for _ in range(count):
        cls = int(rng.choice(len(class_probs), p=class_probs))
        for _attempt in range(20):
            mask = shape_mask(class_look(cls)[0], max(3, int(round(math.exp(rng.uniform(lo, hi))))))
            h, w = mask.shape
            x, y = int(rng.integers(0, image_size - w + 1)), int(rng.integers(0, image_size - h + 1))
            covered = owner[y:y + h, x:x + w][mask]
            hidden = np.bincount(covered[covered >= 0], minlength=len(objects))
            if all(visible[j] - hidden[j] >= (1 - MAX_HIDDEN) * objects[j][3].sum() for j in range(len(objects))):
                break
        else:
            continue  # no room left for this object without hiding others too much
        colour = np.clip(np.asarray(class_look(cls)[1]) + rng.uniform(-20, 20, size=3), 0, 255)
        canvas[y:y + h, x:x + w][mask] = colour
        owner[y:y + h, x:x + w][mask] = len(objects)
        visible = [v - int(c) for v, c in zip(visible, hidden)] + [int(mask.sum())]
        objects.append((cls, x, y, mask))
    buf = io.BytesIO()
    Image.fromarray(canvas.astype(np.uint8)).save(buf, format="JPEG", quality=92)
    anns = []
    for j, (cls, x, y, mask) in enumerate(objects):
        rows, cols = np.nonzero(mask)
        box = [x + int(cols.min()), y + int(rows.min()), int(cols.max() - cols.min() + 1),
               int(rows.max() - rows.min() + 1)]
        anns.append((cls, box, visible[j]))
    return buf.getvalue(), anns


def check_args(num_images: int, image_size: int, num_classes: int, long_tail: float) -> None:
    if num_images < 1:
        raise UserError(f"--num-images {num_images}: must be at least 1")
    if image_size < 32:
        raise UserError(f"--image-size {image_size}: must be at least 32 pixels")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise UserError(f"--num-classes {num_classes}: must be 1..{MAX_CLASSES} (shapes {', '.join(SHAPES)}; "
                        f"beyond {len(SHAPES)}, shape and colour pairs)")
    if not (long_tail >= 1 and math.isfinite(long_tail)):
        raise UserError(f"--long-tail {long_tail}: must be a head/tail ratio >= 1 (1 = balanced)")


def write_synth(
    output: str,
    *,
    num_images: int,
    image_size: int = 128,
    num_classes: int = 3,
    long_tail: float = 1.0,
    seed: int = 0,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict:
    """Write ``images/NNNNNN.jpg`` and ``annotations.json`` under `output`; returns the counts."""
    check_args(num_images, image_size, num_classes, long_tail)
    storage.ensure_dir(output)
    out = storage.resolve(output)
    probs = class_probabilities(num_classes, long_tail)
    images, annotations = [], []
    chunk = 256

    def save(item):
        name, data = item
        storage.write_bytes_atomic(out.join("images", name).uri(), data)

    with ThreadPoolExecutor(max_workers=8) as pool:  # uploads overlap with drawing
        for start in range(0, num_images, chunk):
            batch = []
            for index in range(start, min(start + chunk, num_images)):
                data, anns = generate_image(index, seed=seed, image_size=image_size, class_probs=probs)
                image_id, name = index + 1, f"{index + 1:06d}.jpg"
                batch.append((name, data))
                images.append({"id": image_id, "file_name": name, "width": image_size, "height": image_size})
                for cls, box, area in anns:
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                        "bbox": box, "area": area, "iscrowd": 0})
            list(pool.map(save, batch))
            progress(f"synth: {min(start + chunk, num_images)}/{num_images} images")
    categories = [{"id": k + 1, "name": class_name(k), "supercategory": "shape"} for k in range(num_classes)]
    coco = {"info": {"description": "synthetic shapes", "seed": seed, "long_tail": long_tail},
            "images": images, "annotations": annotations, "categories": categories}
    storage.write_bytes_atomic(out.join("annotations.json").uri(), json.dumps(coco).encode())
    return {"images": num_images, "annotations": len(annotations),
            "empty_images": num_images - len({a["image_id"] for a in annotations})}
