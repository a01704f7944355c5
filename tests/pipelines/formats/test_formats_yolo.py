"""`jobs.prepare` on YOLO (Ultralytics layout) input: a YOLO copy of BCCD gives the boxes of its
COCO json, class index 0 works through evaluation, and malformed labels are counted or refused."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_prepare import png, read_shards

from jobs.cli import run
from jobs.prepare import main
from pipelines.evaluation.scoring import coco_stats
from pipelines.formats.annotations import shards_ground_truth

pytestmark = pytest.mark.slow


@pytest.fixture
def bccd_yolo(shared_data, tmp_path) -> tuple[Path, dict]:
    """BCCD in the Ultralytics layout, made from its COCO json (images linked, labels written)."""
    src = shared_data / "bccd"
    coco = json.loads((src / "annotations" / "instances_all.json").read_text())
    root = tmp_path / "bccd-yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    by_image: dict = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for img in coco["images"]:
        os.symlink(src / "BCCD" / "JPEGImages" / img["file_name"], root / "images" / "train" / img["file_name"])
        w, h = img["width"], img["height"]
        lines = [f"{a['category_id'] - 1} {(x + bw / 2) / w:.8f} {(y + bh / 2) / h:.8f} {bw / w:.8f} {bh / h:.8f}"
                 for a in by_image.get(img["id"], []) for x, y, bw, bh in [a["bbox"]]]
        (root / "labels" / "train" / img["file_name"].replace(".jpg", ".txt")).write_text("\n".join(lines) + "\n")
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/train\nnames: {json.dumps(names)}\n")
    return root, coco


def test_bccd_copy_gives_the_json_boxes(ray_local, bccd_yolo, tmp_path):
    root, coco = bccd_yolo
    assert main(["--annotations", str(root / "data.yaml"), "--split", "train", "--output", str(tmp_path / "out"),
                 "--images-per-shard", "150"]) == 0
    rows, manifest = read_shards(str(tmp_path / "out"))
    assert manifest.categories == [{"id": 0, "name": "RBC"}, {"id": 1, "name": "WBC"}, {"id": 2, "name": "Platelets"}]
    assert manifest.num_images == 364 and manifest.num_annotations == len(coco["annotations"]) == 4886
    assert manifest.issues == {} and manifest.source["image_ids"] == "file_number"
    expected: dict = {}
    for a in coco["annotations"]:
        expected.setdefault(a["image_id"], []).append(a)
    assert sorted(r["image_id"] for r in rows) == sorted(i["id"] for i in coco["images"])
    worst = 0.0
    for row in rows:
        anns = expected.get(row["image_id"], [])
        want = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        worst = max(worst, float(np.abs(np.array(row["boxes"]).reshape(-1, 4) - want).max(initial=0)))
        assert row["category_id"] == [a["category_id"] - 1 for a in anns]
    assert worst < 1e-3

    # Class index 0 is an ordinary category id end to end: ground truth rebuilt from the shards,
    # scored against itself, is perfect for every class.
    gt = shards_ground_truth(str(tmp_path / "out"), manifest.categories)
    results = np.array([[a["image_id"], *a["bbox"], 1.0, a["category_id"]] for a in gt["annotations"]])
    stats = coco_stats(gt, results)
    assert stats["AP"] == pytest.approx(1.0) and {a["category_id"] for a in gt["annotations"]} == {0, 1, 2}


def test_images_folder_given_directly(ray_local, bccd_yolo, tmp_path):
    root, _ = bccd_yolo
    for path in sorted((root / "images" / "train").iterdir())[20:]:
        path.unlink()
    assert main(["--annotations", str(root / "data.yaml"), "--images", str(root / "images" / "train"),
                 "--output", str(tmp_path / "out")]) == 0  # .yaml: YOLO, detected
    rows, manifest = read_shards(str(tmp_path / "out"))
    assert manifest.num_images == 20 and manifest.source["format"] == "yolo"


@pytest.fixture
def bad_yolo(tmp_path) -> Path:
    """A YOLO set with one of every label fault, a segment line, an unlabelled image, and a list
    file naming an image that is not there."""
    images, labels = tmp_path / "set" / "images" / "train", tmp_path / "set" / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for name in ("a", "b", "c"):
        (images / f"{name}.png").write_bytes(png(100, 80))
    (images / "c.png").write_bytes(png(100, 80)[:60])
    (labels / "a.txt").write_text("\n".join([
        "0 0.5 0.5 0.2 0.25",  # fine: [40, 30, 60, 50]
        "1 0.1 0.2 0.3 0.2 0.2 0.5",  # segment -> its box [10, 16, 30, 40]
        "3 0.5 0.5 0.1 0.1",  # class out of range
        "0 1.5 0.5 0.2 0.2",  # wholly outside
        "1 0.95 0.5 0.2 0.2",  # partly outside -> clipped
        "0 0.5 0.5 0 0.1",  # degenerate
        "0 0.5 0.5 0.1",  # malformed
        "",
    ]))
    # b.png has no label file: an image without objects
    (tmp_path / "set" / "train.txt").write_text("./images/train/a.png\n./images/train/b.png\n"
                                                "./images/train/c.png\n./images/train/gone.png\n")
    (tmp_path / "set" / "data.yaml").write_text("train: train.txt\nnames:\n  0: person\n  1: car\n  2: tree\n")
    return tmp_path


def test_bad_yolo_is_counted_listed_and_skipped(ray_local, bad_yolo):
    assert main(["--annotations", str(bad_yolo / "set" / "data.yaml"), "--split", "train",
                 "--output", str(bad_yolo / "out")]) == 0
    rows, manifest = read_shards(str(bad_yolo / "out"))
    assert manifest.issues == {"box_clipped": 1, "box_outside_image": 1, "corrupt_image": 1, "degenerate_box": 1,
                               "invalid_box": 1, "missing_image": 1, "unknown_category": 1}
    assert manifest.categories == [{"id": 0, "name": "person"}, {"id": 1, "name": "car"}, {"id": 2, "name": "tree"}]
    a, b = rows
    assert (a["file_name"], b["file_name"]) == ("images/train/a.png", "images/train/b.png")
    np.testing.assert_allclose(a["boxes"], [[40, 30, 60, 50], [10, 16, 30, 40], [85, 32, 100, 48]], atol=1e-4)
    assert a["category_id"] == [0, 1, 1] and b["boxes"] == [] and manifest.num_empty_images == 1
    unknown = next(e for e in manifest.issue_examples if e["kind"] == "unknown_category")
    assert unknown["line"] == 3 and "class id 3 not in names (0..2)" in unknown["detail"]


@pytest.mark.parametrize("line,kind", [
    ("3 0.5 0.5 0.1 0.1", "unknown_category"), ("0 1.5 0.5 0.2 0.2", "box_outside_image"),
    ("0 0.5 0.5 0.1", "invalid_box"),
])
def test_strict_yolo_fails_on_the_first_problem(ray_local, bad_yolo, capsys, line, kind):
    (bad_yolo / "set" / "labels" / "train" / "a.txt").write_text(line + "\n")
    (bad_yolo / "set" / "images" / "train" / "c.png").unlink()  # the only other fault
    with pytest.raises(SystemExit) as info:
        run(main, ["--annotations", str(bad_yolo / "set" / "data.yaml"), "--images",
                   str(bad_yolo / "set" / "images" / "train"), "--output", str(bad_yolo / "strict"), "--strict",
                   "--max-tasks", "1"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {kind} (")


@pytest.mark.parametrize("case,message", [
    ("both", "give either --images (a split's image folder) or --split (train)"),
    ("no_split", "no split 'val' (it lists: train)"),
    ("no_names", "no 'names'; give a YOLO data.yaml"),
    ("gap", "'names' indexes must be 0..1 without gaps"),
    ("empty", "no images (.jpg, .jpeg, .png); give a split's image folder"),
    ("none_usable", "none of its 1 images is usable (corrupt_image=1)"),
])
def test_yolo_user_errors_exit_2(ray_local, bad_yolo, capsys, case, message):
    root = bad_yolo / "set"
    images = root / "images" / "train"
    args = ["--annotations", str(root / "data.yaml"), "--output", str(bad_yolo / "out")]
    args += {"both": ["--split", "train", "--images", str(images)], "no_split": ["--split", "val"],
             "empty": ["--images", str(bad_yolo)],
             "none_usable": ["--images", str(images)]}.get(case, ["--split", "train"])
    if case == "no_names":
        (root / "data.yaml").write_text("train: train.txt\n")
    elif case == "gap":
        (root / "data.yaml").write_text("train: train.txt\nnames: {0: a, 2: b}\n")
    elif case == "empty":
        (bad_yolo / "nothing").mkdir()
        args[-1] = str(bad_yolo / "nothing")
    elif case == "none_usable":
        for name in ("a.png", "b.png"):
            (images / name).unlink()
    with pytest.raises(SystemExit) as info:
        run(main, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and message in err[-1] and err[-1].startswith("error: ")
