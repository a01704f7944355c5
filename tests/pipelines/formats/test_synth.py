"""The synthetic shapes generator and `jobs.synth` (local and real S3)."""
from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import run
from jobs.synth import main
from pipelines import storage
from pipelines.formats.synth import SHAPES, class_probabilities, generate_image, shape_mask, write_synth

ROOT = Path(__file__).resolve().parents[3]


def load(root) -> dict:
    return json.loads(storage.read_bytes(f"{root}/annotations.json"))


def test_same_seed_same_bytes_other_seed_other_images():
    probs = class_probabilities(4)
    a = [generate_image(i, seed=3, image_size=96, class_probs=probs) for i in range(5)]
    b = [generate_image(i, seed=3, image_size=96, class_probs=probs) for i in range(5)]
    c = [generate_image(i, seed=4, image_size=96, class_probs=probs) for i in range(5)]
    assert a == b
    assert [x[0] for x in a] != [x[0] for x in c]


def test_shapes_are_distinct_masks():
    masks = {s: shape_mask(s, 40) for s in SHAPES if s != "bar"}
    for (s1, m1), (s2, m2) in itertools.combinations(masks.items(), 2):
        iou = (m1 & m2).sum() / (m1 | m2).sum()
        assert iou < 0.85, (s1, s2, iou)
    for name, mask in masks.items():  # shapes fill their square (the crescent's box comes from its mask)
        assert name == "crescent" or mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any(), name


def test_dataset_statistics(tmp_path):
    root = tmp_path / "s"
    write_synth(str(root), num_images=200, image_size=128, num_classes=5, seed=1, progress=lambda _: None)
    coco = load(root)
    assert [c["name"] for c in coco["categories"]] == list(SHAPES[:5])
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    empty = 200 - len(per_image)
    assert 5 <= empty <= 40, empty
    assert np.mean(list(per_image.values())) >= 2.5 and max(per_image.values()) >= 5
    sides = np.array([max(a["bbox"][2:]) for a in coco["annotations"]])
    assert sides.min() <= 14 and sides.max() >= 70 and sides.max() <= 91
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3, 4, 5}
    overlapping = 0
    by_image = {}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and 0 < a["area"] <= w * h
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    for boxes in by_image.values():
        for (x1, y1, w1, h1), (x2, y2, w2, h2) in itertools.combinations(boxes, 2):
            overlapping += min(x1 + w1, x2 + w2) > max(x1, x2) and min(y1 + h1, y2 + h2) > max(y1, y2)
    assert overlapping >= 10  # partial occlusion happens
    first = coco["images"][0]
    image = Image.open(root / "images" / first["file_name"])
    assert image.size == (128, 128) and image.format == "JPEG"


def test_long_tail_follows_the_ratio(tmp_path):
    probs = class_probabilities(5, 20.0)
    assert probs[0] / probs[-1] == pytest.approx(20.0) and np.all(np.diff(probs) < 0)
    assert np.allclose(class_probabilities(4, 1.0), 0.25)
    write_synth(str(tmp_path), num_images=300, image_size=64, num_classes=5, long_tail=20.0, seed=0,
                progress=lambda _: None)
    counts = Counter(a["category_id"] for a in load(tmp_path)["annotations"])
    assert counts[1] > counts[2] > counts[5] and counts[1] / max(counts[5], 1) > 8


def test_job_writes_to_s3(s3_bucket, capsys):
    assert main(["--output", f"{s3_bucket}/shapes", "--num-images", "12", "--image-size", "64",
                 "--num-classes", "2", "--seed", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    coco = load(f"{s3_bucket}/shapes")
    assert summary["images"] == 12 and summary["annotations"] == len(coco["annotations"])
    names = storage.list_files(f"{s3_bucket}/shapes/images", suffixes=[".jpg"])
    assert [n.rsplit("/", 1)[-1] for n in names] == [im["file_name"] for im in coco["images"]]
    data = storage.read_bytes(names[0])
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    probs = class_probabilities(2)
    assert data == generate_image(0, seed=5, image_size=64, class_probs=probs)[0]


@pytest.mark.parametrize("flags,message", [
    (["--num-classes", "101"], "--num-classes 101: must be 1..100"),
    (["--num-images", "0"], "--num-images 0: must be at least 1"),
    (["--image-size", "16"], "--image-size 16: must be at least 32"),
    (["--long-tail", "0.5"], "--long-tail 0.5: must be a head/tail ratio >= 1"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        run(main, ["--output", str(tmp_path / "x"), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jobs.synth", "--output", str(tmp_path), "--num-images", "3",
                             "--num-classes", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --num-classes 0")
