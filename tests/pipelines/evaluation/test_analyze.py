"""jobs.analyze and pipelines.evaluation.{confusion,errors,analysis} on hand-made cases with known
answers, cross-checked against pycocotools where COCO defines the number."""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from jobs import analyze as analyze_job
from pipelines.errors import UserError
from pipelines.evaluation import analysis, errors

CATS = [{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 2, "name": "dog", "supercategory": "animal"},
        {"id": 3, "name": "car", "supercategory": "vehicle"}]


def _gt(images: int, boxes: list[tuple[int, int, list[float]]], categories=CATS) -> dict:
    """COCO ground truth: `boxes` as (image_id, category_id, [x, y, w, h])."""
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate(boxes)]
    imgs = [{"id": i, "file_name": f"{i:03d}.png", "width": 100, "height": 100} for i in range(1, images + 1)]
    return {"images": imgs, "annotations": anns, "categories": categories}


def _write(tmp_path, gt: dict, dets: list[tuple[int, int, list[float], float]]) -> tuple[str, str]:
    gt_uri, det_uri = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_uri.write_text(json.dumps(gt))
    det_uri.write_text(json.dumps([{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in dets]))
    return str(gt_uri), str(det_uri)


def test_confusion_matrix_known_counts(tmp_path):
    # image 1: a cat found, a dog called a car, a car missed, a cat where nothing is; a low score ignored
    gt = _gt(2, [(1, 1, [0, 0, 20, 20]), (1, 2, [40, 0, 20, 20]), (1, 3, [0, 50, 30, 30]), (2, 2, [10, 10, 30, 30])])
    dets = [(1, 1, [1, 1, 20, 20], 0.9), (1, 3, [40, 0, 20, 21], 0.8), (1, 1, [70, 70, 10, 10], 0.7),
            (1, 2, [0, 50, 30, 30], 0.1),  # below --score: not in the matrix
            (2, 2, [10, 10, 30, 30], 0.95)]
    gt_uri, det_uri = _write(tmp_path, gt, dets)
    result = analysis.analyze(det_uri, json.loads(open(gt_uri).read()), iou=0.5, min_score=0.3)
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = 1  # cat -> cat
    expected[1, 1] = 1  # dog -> dog (image 2)
    expected[1, 2] = 1  # dog predicted as car
    expected[2, 3] = 1  # car missed: background column
    expected[3, 0] = 1  # a cat on nothing: background row
    np.testing.assert_array_equal(result.confusion, expected)


def test_confusion_prefers_own_class_and_counts_images_without_rows(tmp_path):
    # a higher-scoring car on the cat's box must not steal it from the cat detection (pass 1 first)
    gt = _gt(2, [(1, 1, [0, 0, 20, 20]), (2, 3, [0, 0, 20, 20])])
    dets = [(1, 3, [0, 0, 20, 20], 0.9), (1, 1, [0, 0, 20, 19], 0.5)]
    gt_uri, det_uri = _write(tmp_path, gt, dets)
    result = analysis.analyze(det_uri, json.loads(open(gt_uri).read()), iou=0.5, min_score=0.3)
    assert result.confusion[0, 0] == 1 and result.confusion[3, 2] == 1  # the car is a false positive
    assert result.confusion[2, 3] == 1  # image 2 has no detections at all: its car is missed
    assert result.confusion.sum() == 3


def _stages(tmp_path, gt, dets):
    gt_uri, det_uri = _write(tmp_path, gt, dets)
    result = analysis.analyze(det_uri, json.loads(open(gt_uri).read()), iou=0.5, min_score=0.0)
    overall, per_class = errors.stage_ap(result.stages)
    return overall, per_class, result


def test_error_analysis_localization_only(tmp_path):
    # every detection overlaps its box at IoU 0.25: wrong at 0.5 and 0.75, right at 0.1
    gt = _gt(2, [(1, 1, [0, 0, 40, 40]), (2, 1, [0, 0, 40, 40])], CATS[:1])
    dets = [(1, 1, [20, 20, 40, 40], 0.9), (2, 1, [20, 20, 40, 40], 0.8)]
    overall, _, _ = _stages(tmp_path, gt, dets)
    assert overall["C75"] == 0 and overall["C50"] == 0
    assert overall["Loc"] == pytest.approx(1.0) and overall["Sim"] == overall["Oth"] == overall["Loc"]
    assert overall["BG"] == 1.0 and overall["FN"] == 1.0


def test_error_analysis_similar_and_other_confusions(tmp_path):
    # a dog detection on a cat (same supercategory) and a car detection on a cat (other supercategory),
    # each scoring above a correct detection of its own class
    gt = _gt(3, [(1, 1, [0, 0, 30, 30]), (2, 2, [0, 0, 30, 30]), (3, 3, [0, 0, 30, 30]), (1, 1, [50, 50, 30, 30])])
    dets = [(1, 2, [0, 0, 30, 30], 0.9), (2, 2, [0, 0, 30, 30], 0.5), (1, 3, [50, 50, 30, 30], 0.9),
            (3, 3, [0, 0, 30, 30], 0.5), (1, 1, [0, 0, 30, 30], 0.4), (1, 1, [50, 50, 30, 30], 0.3)]
    overall, per_class, result = _stages(tmp_path, gt, dets)
    dog, car = per_class[1], per_class[2]
    assert dog[1] == pytest.approx(0.5) and car[1] == pytest.approx(0.5)  # C50: a false positive first
    assert dog[3] == pytest.approx(1.0)  # Sim: the dog-on-cat confusion is forgiven
    assert car[3] == pytest.approx(0.5) and car[4] == pytest.approx(1.0)  # car-on-cat only at Oth
    assert per_class[0][1] == pytest.approx(1.0)  # the cats themselves are found
    assert result.supercategories


def test_error_analysis_without_supercategories_sim_is_loc(tmp_path):
    plain = [{"id": c["id"], "name": c["name"]} for c in CATS]
    gt = _gt(2, [(1, 1, [0, 0, 30, 30]), (2, 2, [0, 0, 30, 30])], plain)
    dets = [(1, 2, [0, 0, 30, 30], 0.9), (2, 2, [0, 0, 30, 30], 0.5)]
    overall, per_class, result = _stages(tmp_path, gt, dets)
    assert not result.supercategories
    assert per_class[1][3] == per_class[1][2] and per_class[1][4] == pytest.approx(1.0)


def test_image_ap_ordering_and_best_worst(tmp_path):
    gt = _gt(4, [(1, 1, [0, 0, 40, 40]), (2, 1, [0, 0, 40, 40]), (3, 1, [0, 0, 40, 40])], CATS[:1])
    # image 1 exact (AP 1); image 2 at IoU 0.6 (right at 0.50, 0.55, 0.60: AP 0.3); image 3 nothing; 4 no gt
    side = 40 * np.sqrt(0.6)  # a box inside the ground truth with IoU exactly 0.6
    dets = [(1, 1, [0, 0, 40, 40], 0.9), (2, 1, [0, 0, side, side], 0.9), (4, 1, [0, 0, 10, 10], 0.9)]
    _, _, result = _stages(tmp_path, gt, dets)
    ap = dict(zip(result.gt.image_ids.tolist(), result.image_ap.tolist()))
    assert ap[1] == pytest.approx(1.0) and ap[2] == pytest.approx(0.3) and ap[3] == 0.0 and np.isnan(ap[4])
    best, worst = analysis.best_and_worst(result.gt, result.image_ap, 2)
    assert best == [1, 2] and worst == [3, 2]


def test_matches_pycocotools_on_real_results(shared_data):
    """C75/C50/AP per category and per-image AP equal COCOeval's on the reference results."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    folder = shared_data / "coco_val2014_100"
    gt = json.loads((folder / "instances_val2014_100.json").read_text())
    result = analysis.analyze(str(folder / "instances_val2014_fakebbox100_results.json"), gt, 0.5, 0.3)
    overall, _ = errors.stage_ap(result.stages)
    assert overall["C50"] == pytest.approx(0.6969727247299577, abs=1e-12)
    assert overall["C75"] == pytest.approx(0.5729816669904824, abs=1e-12)
    assert result.evaluation.stats["AP"] == pytest.approx(0.5045806987249628, abs=1e-12)
    results = json.loads((folder / "instances_val2014_fakebbox100_results.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        for k in (0, 5, 17, 42):
            image_id = int(result.gt.image_ids[k])
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.params.imgIds = [image_id]
            ev.evaluate(), ev.accumulate(), ev.summarize()
            assert result.image_ap[k] == pytest.approx(ev.stats[0], abs=1e-12)


def test_job_writes_tables_figures_and_images(tmp_path, capsys):
    gt = _gt(3, [(1, 1, [0, 0, 40, 40]), (2, 2, [10, 10, 40, 40]), (3, 3, [20, 20, 30, 30])])
    dets = [(1, 1, [0, 0, 40, 40], 0.9), (2, 3, [10, 10, 40, 40], 0.8), (3, 3, [50, 50, 30, 30], 0.6)]
    gt_uri, det_uri = _write(tmp_path, gt, dets)
    images = tmp_path / "images"
    images.mkdir()
    for img in gt["images"]:
        Image.new("RGB", (100, 100), (90, 90, 90)).save(images / img["file_name"])
    out = tmp_path / "out"
    assert analyze_job.main(["--predictions", det_uri, "--annotations", gt_uri, "--output", str(out),
                             "--images", str(images), "--best-worst", "1", "--progress", "0"]) == 0
    for name in ("per_category_ap.csv", "confusion_matrix.csv", "confusion_matrix.png", "error_analysis.csv",
                 "error_analysis.png", "image_ap.csv", "report.json"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.reader((out / "confusion_matrix.csv").read_text().splitlines()))
    assert rows[0][1:] == ["cat", "dog", "car", "background"]
    assert rows[2][1:] == ["0", "0", "1", "0"]  # the dog, predicted as a car
    assert [p.name.split("-")[1] for p in (out / "best").iterdir()] == ["ap1.000"]
    assert [p.name.split("-")[1] for p in (out / "worst").iterdir()] == ["ap0.000"]
    report = json.loads((out / "report.json").read_text())
    assert report["confusion"]["confused"] == 1 and report["error_analysis"]["stages"]["FN"] == 1.0
    assert "C50=" in capsys.readouterr().out


def test_job_refuses_best_worst_without_images(tmp_path):
    gt_uri, det_uri = _write(tmp_path, _gt(1, [(1, 1, [0, 0, 10, 10])]), [])
    with pytest.raises(UserError, match="--images"):
        analyze_job.main(["--predictions", det_uri, "--annotations", gt_uri, "--output", str(tmp_path / "o"),
                          "--best-worst", "2"])
