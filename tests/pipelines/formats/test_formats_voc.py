"""`jobs.prepare` on Pascal VOC input: the real BCCD set matches its COCO conversion, and every
malformed file is counted (or refused with --strict) as COCO input's faults are."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from test_prepare import assert_matches_json, png, read_shards

from jobs.cli import run
from jobs.prepare import main

pytestmark = pytest.mark.slow


def bccd(shared_data: Path) -> Path:
    return shared_data / "bccd"


def test_bccd_gives_the_boxes_of_its_coco_conversion(ray_local, shared_data, tmp_path, capsys):
    voc = bccd(shared_data) / "BCCD"
    assert main(["--annotations", str(voc / "Annotations"), "--output", str(tmp_path / "out"),
                 "--images-per-shard", "100"]) == 0  # images default to JPEGImages beside the annotations
    rows, manifest = read_shards(str(tmp_path / "out"))
    coco = json.loads((bccd(shared_data) / "annotations" / "instances_all.json").read_text())
    assert manifest.num_images == len(rows) == 364 and manifest.num_annotations == 4886
    assert manifest.issues == {"degenerate_box": 2}  # BloodImage_00338 and 00343 have a zero-size box
    assert manifest.categories == [{"id": 1, "name": "Platelets"}, {"id": 2, "name": "RBC"}, {"id": 3, "name": "WBC"}]
    assert manifest.source["format"] == "voc" and manifest.source["image_ids"] == "file_number"
    names = {c["id"]: c["name"] for c in coco["categories"]}
    mine = {c["id"]: c["name"] for c in manifest.categories}
    assert Counter(mine[c] for r in rows for c in r["category_id"]) == Counter(
        names[a["category_id"]] for a in coco["annotations"])
    to_json_ids = {k: next(i for i, n in names.items() if n == name) for k, name in mine.items()}
    for row in rows:
        row["category_id"] = [to_json_ids[c] for c in row["category_id"]]
    assert_matches_json(rows, coco)  # same image ids (the file numbers), boxes, order
    assert [s["num_images"] for s in manifest.shards] == [100, 100, 100, 64]
    assert "degenerate_box: bndbox [504, 337, 504, 337] has w=0 h=0" in capsys.readouterr().err


def test_bccd_split_with_classes_file(ray_local, shared_data, tmp_path):
    voc = bccd(shared_data) / "BCCD"
    (tmp_path / "classes.txt").write_text("RBC\nWBC\nPlatelets\n")  # the ids of the COCO conversion
    assert main(["--annotations", str(voc / "Annotations"), "--images", str(voc / "JPEGImages"), "--split", "val",
                 "--classes", str(tmp_path / "classes.txt"), "--output", str(tmp_path / "out")]) == 0
    rows, manifest = read_shards(str(tmp_path / "out"))
    assert_matches_json(rows, json.loads((bccd(shared_data) / "annotations" / "instances_val.json").read_text()))
    assert manifest.categories == [{"id": 1, "name": "RBC"}, {"id": 2, "name": "WBC"}, {"id": 3, "name": "Platelets"}]


def xml(filename: str, objects: list, size=(100, 80)) -> str:
    """A VOC annotation; each object is (name, (xmin, ymin, xmax, ymax) or None, difficult)."""
    parts = [f"<annotation><filename>{filename}</filename>"]
    if size:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, box, difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult>")
        if box is not None:
            parts.append("<bndbox>" + "".join(f"<{k}>{v}</{k}>" for k, v in zip(
                ("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox>")
        parts.append("</object>")
    return "".join(parts) + "</annotation>"


@pytest.fixture
def bad_voc(tmp_path) -> Path:
    """A VOC folder with one of every fault prepare must count, and names without numbers."""
    ann, images = tmp_path / "VOC" / "Annotations", tmp_path / "VOC" / "JPEGImages"
    ann.mkdir(parents=True)
    images.mkdir()
    for name in ("ok", "sized", "broken", "gone"):
        (images / f"{name}.png").write_bytes(png(100, 80))
    (images / "sized.png").write_bytes(png(50, 40))
    (images / "corrupt.png").write_bytes(png(100, 80)[:60])
    (ann / "ok.xml").write_text(xml("ok.png", [
        ("cat", (10, 10, 30, 30), False),  # fine
        ("dog", (90, 70, 130, 110), True),  # difficult, partly outside -> clipped, iscrowd
        ("cat", (200, 10, 210, 20), False),  # wholly outside
        ("cat", (5, 5, 5, 15), False),  # degenerate
        ("cat", None, False),  # no bndbox
        ("bird", (1, 1, 5, 5), False),  # not in --classes
    ]))
    (ann / "sized.xml").write_text(xml("sized.png", [("cat", (40, 30, 60, 50), False)]))  # real size 50x40 wins
    (ann / "broken.xml").write_text("<annotation><object>")
    (ann / "missing.xml").write_text(xml("missing.png", [("cat", (1, 1, 5, 5), False)]))
    (ann / "corrupt.xml").write_text(xml("corrupt.png", []))
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    return tmp_path


def test_bad_voc_is_counted_listed_and_skipped(ray_local, bad_voc):
    assert main(["--annotations", str(bad_voc / "VOC" / "Annotations"), "--classes", str(bad_voc / "classes.txt"),
                 "--output", str(bad_voc / "out")]) == 0
    rows, manifest = read_shards(str(bad_voc / "out"))
    assert manifest.issues == {"box_clipped": 2, "box_outside_image": 1, "corrupt_image": 1, "degenerate_box": 1,
                               "invalid_annotation_file": 1, "invalid_box": 1, "missing_image": 1,
                               "size_mismatch": 1, "unknown_category": 1}
    assert manifest.source["image_ids"] == "listing_order"  # no digits in the names
    by_name = {r["file_name"]: r for r in rows}
    assert sorted(by_name) == ["ok.png", "sized.png"]
    assert [r["image_id"] for r in rows] == [3, 4]  # broken, corrupt, missing, ok, sized: positions in the listing
    ok, sized = by_name["ok.png"], by_name["sized.png"]
    assert ok["boxes"] == [[10, 10, 30, 30], [90, 70, 100, 80]] and ok["category_id"] == [1, 2]
    assert ok["iscrowd"] == [False, True]  # difficult: kept, ignored by COCO evaluation
    assert (sized["width"], sized["height"]) == (50, 40) and sized["boxes"] == [[40, 30, 50, 40]]
    broken = next(e for e in manifest.issue_examples if e["kind"] == "invalid_annotation_file")
    assert broken["file_name"] == "broken.xml" and "not XML" in broken["detail"]


@pytest.mark.parametrize("kind,keep", [
    ("invalid_annotation_file", "broken"), ("missing_image", "missing"), ("size_mismatch", "sized"),
    ("box_outside_image", "ok"),
])
def test_strict_voc_fails_on_the_first_problem(ray_local, bad_voc, capsys, kind, keep):
    ann = bad_voc / "VOC" / "Annotations"
    for path in ann.glob("*.xml"):
        if path.stem != keep:
            path.unlink()
    if keep == "ok":
        (ann / "ok.xml").write_text(xml("ok.png", [("cat", (200, 10, 210, 20), False)]))
    with pytest.raises(SystemExit) as info:
        run(main, ["--annotations", str(ann), "--classes", str(bad_voc / "classes.txt"),
                   "--output", str(bad_voc / "strict"), "--strict"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {kind} (")
    assert not (bad_voc / "strict" / "manifest.json").exists()


@pytest.mark.parametrize("case,message", [
    ("no_xml", "no VOC .xml files; give the folder of VOC annotation files"),
    ("no_split", "ImageSets/Main/nosuch.txt: not found; give a --split"),
    ("none_usable", "none of its 1 images is usable (missing_image=1); check that the images are at"),
    ("classes_twice", "class 'cat' listed twice"),
])
def test_voc_user_errors_exit_2(ray_local, bad_voc, capsys, case, message):
    ann = bad_voc / "VOC" / "Annotations"
    args = ["--annotations", str(ann), "--output", str(bad_voc / "out"), "--format", "voc"]
    if case == "no_xml":
        for path in ann.glob("*.xml"):
            path.unlink()
    elif case == "no_split":
        args += ["--split", "nosuch"]
    elif case == "none_usable":
        for path in ann.glob("*.xml"):
            if path.stem != "missing":
                path.unlink()
    else:
        (bad_voc / "classes.txt").write_text("cat\ndog\ncat\n")
        args += ["--classes", str(bad_voc / "classes.txt")]
    with pytest.raises(SystemExit) as info:
        run(main, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and message in err[-1] and err[-1].startswith("error: ")


def test_a_shard_past_the_byte_cap_is_written_in_parts(ray_local, shared_data, tmp_path):
    """VOC shards are cut by count (a lazy listing has no sizes); one whose images outgrow
    --max-shard-mb is written as several files, each within the cap, and a rerun removes them."""
    ann = bccd(shared_data) / "BCCD" / "Annotations"
    args = ["--annotations", str(ann), "--output", str(tmp_path / "out"), "--images-per-shard", "1000"]
    assert main([*args, "--max-shard-mb", "3"]) == 0
    rows, manifest = read_shards(str(tmp_path / "out"))
    files = [s["file"] for s in manifest.shards]
    assert len(files) > 2 and files[:2] == ["shard-00000.parquet", "shard-00000-01.parquet"]
    assert len(rows) == sum(s["num_images"] for s in manifest.shards) == 364
    assert all(s["num_images"] % 64 == 0 for s in manifest.shards[:-1])  # whole row groups per part
    assert max(s["num_bytes"] for s in manifest.shards) < 3.2 * 2**20
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "shard-00000.parquet"]
