"""jobs.visualize on hand-made predictions (known boxes) over real encoded images; no Ray needed."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jobs import visualize
from pipelines.formats import shards
from pipelines.formats.shards import Manifest
from pipelines.inference import predictions

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
CAT, DOG = (visualize.PALETTE[3], visualize.PALETTE[7])


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_predictions(path, rows: list[dict]) -> None:
    """rows: {uri, image_id, width, height, dets: [(x1, y1, x2, y2, score, label)] | None (error)}."""
    dets = [d for r in rows for d in (r["dets"] or [])]
    arr = np.array(dets, np.float64).reshape(-1, 6)
    table = pa.table({
        "image_id": pa.array([r["image_id"] for r in rows], pa.int64()),
        "uri": [r["uri"] for r in rows],
        "width": pa.array([r["width"] for r in rows], pa.int32()),
        "height": pa.array([r["height"] for r in rows], pa.int32()),
        "detections": predictions.detections_array(
            np.array([len(r["dets"] or []) for r in rows]), np.array([r["dets"] is not None for r in rows]),
            arr[:, :4], arr[:, 4], arr[:, 5].astype(np.int64), CATEGORIES),
        "error": [None if r["dets"] is not None else "cannot decode: empty file" for r in rows],
        "model": ["test"] * len(rows),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(predictions.to_parquet_bytes(table))


def gray(h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), 128, np.uint8)


def test_boxes_above_min_score_are_drawn_in_their_category_color(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "small.png").write_bytes(png(gray(100, 160)))
    (images / "wide.png").write_bytes(png(gray(1000, 4096)))
    (images / "broken.png").write_bytes(b"")
    write_predictions(tmp_path / "preds" / predictions.part_name(0), [
        {"uri": str(images / "broken.png"), "image_id": None, "width": None, "height": None, "dets": None},
        {"uri": str(images / "small.png"), "image_id": None, "width": 160, "height": 100,
         "dets": [(20, 30, 120, 90, 0.9, 0), (5, 5, 50, 25, 0.1, 1)]},
        {"uri": str(images / "wide.png"), "image_id": None, "width": 4096, "height": 1000,
         "dets": [(1000, 200, 3000, 800, 0.8, 1)]},
    ])
    assert visualize.main(["--predictions", str(tmp_path / "preds"), "--images", str(images),
                           "--output", str(tmp_path / "out"), "--min-score", "0.5"]) == 0
    assert "2 images" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000-small.png", "0001-wide.png"]
    small = np.asarray(Image.open(tmp_path / "out" / "0000-small.png").convert("RGB"))
    assert small.shape == (100, 160, 3)
    assert tuple(small[60, 20]) == CAT and tuple(small[90, 70]) == CAT  # left and bottom edges of the cat box
    assert tuple(small[15, 50]) == (128, 128, 128)  # the 0.1 dog is below --min-score: not drawn
    wide = np.asarray(Image.open(tmp_path / "out" / "0001-wide.png").convert("RGB"))
    assert wide.shape == (500, 2048, 3)  # scaled to 2048 px, boxes with it
    assert tuple(wide[250, 500]) == DOG and tuple(wide[250, 1000]) != DOG


def test_shards_input_finds_images_by_id_and_limit_stops_early(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    records = [{"image_id": i, "file_name": f"{i}.png", "width": 64, "height": 48, "boxes": [], "category_id": [],
                "iscrowd": [], "area": []} for i in (11, 12)]
    shards.write_shard(str(root / shards.shard_name(0)), [shards.records_table(records, [png(gray(48, 64))] * 2)])
    manifest = Manifest(categories=CATEGORIES, num_images=2, shards=[{"file": shards.shard_name(0), "num_images": 2,
                                                                      "num_bytes": 1}])
    (root / shards.MANIFEST).write_bytes(manifest.to_json())
    write_predictions(tmp_path / "preds" / predictions.part_name(0), [
        {"uri": f"/gone/{i}.png", "image_id": i, "width": 64, "height": 48, "dets": [(8, 8, 40, 40, 0.7, 1)]}
        for i in (12, 11)])
    assert visualize.main(["--predictions", str(tmp_path / "preds"), "--images", str(root),
                           "--output", str(tmp_path / "out"), "--limit", "1"]) == 0
    [drawn] = list((tmp_path / "out").iterdir())
    assert drawn.name == "0000-12.png"
    assert tuple(np.asarray(Image.open(drawn).convert("RGB"))[20, 8]) == DOG


def test_no_predictions_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as info:
        visualize.run(visualize.main, ["--predictions", str(tmp_path / "empty"), "--images", str(tmp_path),
                                       "--output", str(tmp_path / "out")])
    assert info.value.code == 2
