"""`jobs.prepare` on a real local Ray and a real S3 endpoint: nothing lost, bad input never silent."""
from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import run
from jobs.prepare import main
from pipelines import storage
from pipelines.formats.shards import SHARD_SCHEMA, read_manifest, shard_uris
from pipelines.formats.synth import write_synth
from tests.support.paths import SHARED_DATA

pytestmark = pytest.mark.slow


def read_shards(uri: str) -> tuple[list[dict], object]:
    """All rows of a shards folder (via pyarrow on the same file system Ray reads)."""
    manifest = read_manifest(uri)
    fs, _ = storage.arrow_filesystem(uri)
    rows = []
    for shard in shard_uris(uri, manifest):
        table = pq.read_table(storage.resolve(shard).path, filesystem=fs)
        assert table.schema.equals(SHARD_SCHEMA)
        rows += table.to_pylist()
    return rows, manifest


def assert_matches_json(rows: list[dict], coco: dict) -> None:
    assert Counter(r["image_id"] for r in rows) == Counter(im["id"] for im in coco["images"])  # each once
    anns = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    for row in rows:
        expected = anns.get(row["image_id"], [])
        x, y, w, h = (np.array([a["bbox"][i] for a in expected], np.float32).reshape(-1) for i in range(4))
        np.testing.assert_allclose(np.array(row["boxes"], np.float32).reshape(-1, 4),
                                   np.stack([x, y, x + w, y + h], axis=1), rtol=1e-6)
        assert row["category_id"] == [a["category_id"] for a in expected]
        assert row["iscrowd"] == [bool(a["iscrowd"]) for a in expected]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_synth_to_shards_round_trip(ray_local, tmp_path, s3_bucket, capsys, where):
    base = str(tmp_path) if where == "local" else s3_bucket
    write_synth(f"{base}/synth", num_images=25, image_size=64, num_classes=3, seed=2, progress=lambda _: None)
    args = ["--images", f"{base}/synth/images", "--annotations", f"{base}/synth/annotations.json",
            "--output", f"{base}/shards", "--images-per-shard", "10"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["shards"] == 3 and "prepare: 3/3 shards, 25/25 images" in err
    coco = json.loads(storage.read_bytes(f"{base}/synth/annotations.json"))
    rows, manifest = read_shards(f"{base}/shards")
    assert_matches_json(rows, coco)
    assert manifest.categories == [{"id": c["id"], "name": c["name"]} for c in coco["categories"]]
    assert manifest.num_images == 25 and manifest.num_annotations == len(coco["annotations"])
    assert [s["num_images"] for s in manifest.shards] == [10, 10, 5] and manifest.issues == {}
    assert manifest.num_empty_images == sum(not r["boxes"] for r in rows) > 0
    original = storage.read_bytes(f"{base}/synth/images/{rows[0]['file_name']}")
    assert rows[0]["image"] == original  # encoded bytes, untouched

    # A rerun with bigger shards replaces the output instead of adding to it.
    assert main([*args[:-1], "100"]) == 0
    assert [u.rsplit("/", 1)[-1] for u in storage.list_files(f"{base}/shards")] == [
        "manifest.json", "shard-00000.parquet"]
    assert_matches_json(read_shards(f"{base}/shards")[0], coco)


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def bad_coco(tmp_path):
    """A COCO set with one of every input problem jobs.prepare must count."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("ok.png", "empty.png", "dup.png", "sized.png"):
        (images / name).write_bytes(png(100, 80))
    (images / "sized.png").write_bytes(png(50, 40))
    (images / "corrupt.png").write_bytes(png(100, 80)[:60])
    img = lambda i, name: {"id": i, "file_name": name, "width": 100, "height": 80}  # noqa: E731
    ann = lambda i, bbox, cat=1, image=1: {"id": i, "image_id": image, "category_id": cat,  # noqa: E731
                                           "bbox": bbox, "area": 1.0, "iscrowd": 0}
    coco = {
        "categories": [{"id": 1, "name": "thing"}, {"id": 7, "name": "other"}],
        "images": [img(1, "ok.png"), img(2, "empty.png"), img(3, "missing.png"), img(4, "corrupt.png"),
                   img(1, "dup.png"), img(5, "sized.png")],
        "annotations": [
            ann(1, [10, 10, 20, 20]),  # fine
            ann(2, [5, 5, 0, 10]),  # degenerate
            ann(3, [90, 70, 30, 30], cat=7),  # partly outside -> clipped to [90, 70, 100, 80]
            ann(4, [200, 10, 5, 5]),  # wholly outside
            ann(5, [1, 1, 5, 5], cat=3),  # unknown category
            ann(5, [2, 2, 5, 5]),  # duplicate annotation id
            ann(6, [1, 1, 5, 5], image=99),  # unknown image
            ann(7, [1, 1, 5, 5], image=3),  # on the missing image
        ],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    return tmp_path


def test_bad_input_is_counted_listed_and_skipped(ray_local, bad_coco, capsys):
    args = ["--images", str(bad_coco / "images"), "--annotations", str(bad_coco / "annotations.json"),
            "--output", str(bad_coco / "out")]
    assert main(args) == 0
    rows, manifest = read_shards(str(bad_coco / "out"))
    assert manifest.issues == {"box_clipped": 1, "box_outside_image": 1, "corrupt_image": 1, "degenerate_box": 1,
                               "duplicate_annotation_id": 1, "duplicate_image_id": 1, "missing_image": 1,
                               "size_mismatch": 1, "unknown_category": 1, "unknown_image_id": 1}
    assert {e["kind"] for e in manifest.issue_examples} == set(manifest.issues)
    corrupt = next(e for e in manifest.issue_examples if e["kind"] == "corrupt_image")
    assert corrupt["file_name"] == "corrupt.png" and corrupt["image_id"] == 4
    by_id = {r["image_id"]: r for r in rows}
    assert sorted(by_id) == [1, 2, 5]  # empty and size-mismatched images kept, bad files dropped
    assert by_id[1]["file_name"] == "ok.png" and by_id[2]["boxes"] == []
    assert by_id[1]["boxes"] == [[10, 10, 30, 30], [90, 70, 100, 80]] and by_id[1]["category_id"] == [1, 7]
    err = capsys.readouterr().err
    assert "issues: box_clipped=1, box_outside_image=1, corrupt_image=1" in err and "missing.png" in err


@pytest.mark.parametrize("kind,image_idx,ann_idx", [
    ("degenerate_box", [0], [0, 1]), ("box_clipped", [0], [0, 2]), ("box_outside_image", [0], [0, 3]),
    ("unknown_category", [0], [0, 4]), ("unknown_image_id", [0], [0, 6]), ("duplicate_annotation_id", [0], [0, 0]),
    ("missing_image", [0, 2], [0]), ("corrupt_image", [0, 3], [0]), ("duplicate_image_id", [0, 4], [0]),
    ("size_mismatch", [0, 5], [0]),
])
def test_strict_fails_on_the_first_problem(ray_local, bad_coco, capsys, kind, image_idx, ann_idx):
    """--strict with exactly one problem in the input: exit 2, one line naming it."""
    coco = json.loads((bad_coco / "annotations.json").read_text())
    coco["images"] = [coco["images"][i] for i in image_idx]
    coco["annotations"] = [coco["annotations"][i] for i in ann_idx]
    (bad_coco / "one.json").write_text(json.dumps(coco))
    with pytest.raises(SystemExit) as info:
        run(main, ["--images", str(bad_coco / "images"), "--annotations", str(bad_coco / "one.json"),
                   "--output", str(bad_coco / "strict"), "--strict"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {kind} (") and "--strict" in err
    assert not (bad_coco / "strict" / "manifest.json").exists()


@pytest.mark.parametrize("case,message", [
    ("no_json", "annotations.json: not found; check the path"),
    ("bad_json", "not valid JSON"),
    ("not_coco", "no 'images' list"),
    ("no_images", "nowhere: not found"),
    ("shard_size", "--images-per-shard 0: must be at least 1"),
])
def test_user_errors_exit_2(tmp_path, capsys, case, message):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "ok.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    annotations = {"no_json": "annotations.json", "bad_json": "bad.json", "not_coco": "list.json"}.get(case, "ok.json")
    args = ["--images", str(tmp_path / ("nowhere" if case == "no_images" else "")),
            "--annotations", str(tmp_path / annotations), "--output", str(tmp_path / "out")]
    if case == "shard_size":
        args += ["--images-per-shard", "0"]
    with pytest.raises(SystemExit) as info:
        run(main, args)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_missing_output_bucket_exits_2(s3_server, synth_coco, capsys):
    with pytest.raises(SystemExit) as info:
        run(main, ["--images", str(synth_coco / "images"), "--annotations", str(synth_coco / "annotations.json"),
                   "--output", "s3://no-such-bucket-zz/shards"])
    assert info.value.code == 2
    assert "s3://no-such-bucket-zz/shards: not found" in capsys.readouterr().err


def test_coco128_keeps_everything(ray_local, shared_data, tmp_path):
    src = shared_data / "coco128"
    annotations = src / "annotations" / "instances_train2017.json"
    assert main(["--images", str(src / "train2017"), "--annotations", str(annotations),
                 "--output", str(tmp_path / "coco128"), "--images-per-shard", "50"]) == 0
    rows, manifest = read_shards(str(tmp_path / "coco128"))
    coco = json.loads(annotations.read_text())
    assert manifest.num_images == len(rows) == 128 and manifest.num_empty_images == 2
    assert manifest.num_crowd == 10 and sum(sum(r["iscrowd"]) for r in rows) == 10
    assert [c["id"] for c in manifest.categories] == sorted(c["id"] for c in coco["categories"])
    assert max(c["id"] for c in manifest.categories) == 90 and len(manifest.categories) == 80
    assert {c for r in rows for c in r["category_id"]} == {a["category_id"] for a in coco["annotations"]}
    assert sum(len(r["boxes"]) for r in rows) + sum(manifest.issues.get(k, 0) for k in (
        "degenerate_box", "box_outside_image")) == len(coco["annotations"])


def test_coco_json_without_annotations_and_categories_exits_2(tmp_path, capsys):
    (tmp_path / "images.json").write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(SystemExit) as info:
        run(main, ["--images", str(tmp_path), "--annotations", str(tmp_path / "images.json"),
                   "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert "images.json: missing COCO key(s) 'annotations', 'categories'" in err


def test_coco_without_a_usable_image_exits_2(ray_local, bad_coco, capsys):
    coco = json.loads((bad_coco / "annotations.json").read_text())
    coco["images"] = [coco["images"][3]]  # corrupt.png only
    (bad_coco / "corrupt.json").write_text(json.dumps(coco))
    with pytest.raises(SystemExit) as info:
        run(main, ["--images", str(bad_coco / "images"), "--annotations", str(bad_coco / "corrupt.json"),
                   "--output", str(bad_coco / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and "corrupt.json: none of its 1 images is usable (corrupt_image=1" in err
    assert not (bad_coco / "out" / "manifest.json").exists()


@pytest.mark.parametrize("layout,message", [
    ("labels", "labels: cannot tell its format (no .json, .yaml or folder of .xml); give --format coco, voc or yolo"),
    ("mixed", "mixed: cannot tell its format (it holds coco, voc annotation files); give --format"),
    ("list.txt", "list.txt: cannot tell its format"),
])
def test_format_detection_refuses_what_it_cannot_tell(tmp_path, capsys, layout, message):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.xml").write_text("<annotation/>")
    (tmp_path / "mixed" / "b.json").write_text("{}")
    (tmp_path / "list.txt").write_text("a\n")
    with pytest.raises(SystemExit) as info:
        run(main, ["--images", str(tmp_path), "--annotations", str(tmp_path / layout),
                   "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_format_is_detected_from_the_annotations():
    from pipelines.formats.prepare import detect_format

    assert detect_format("s3://b/coco/instances_train2017.json") == "coco"
    assert detect_format("data/data.yaml") == "yolo" and detect_format("data/coco8.YML") == "yolo"
    voc = SHARED_DATA / "bccd" / "BCCD" / "Annotations"
    if voc.is_dir():
        assert detect_format(str(voc)) == "voc"
