"""LVIS's federated protocol: jobs.evaluate against lvis-api (the `lvis` package, test-only reference).

Predictions over the real LVIS v1 val ground truth of `lvis_val_100` (jittered true boxes plus
false positives on present, negative, not-exhaustive and unverified categories, one image with
more than 300 detections), written as several shuffled Parquet files, must give lvis-api's numbers.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.evaluation import scoring as ev
from tests.pipelines.evaluation.test_evaluate import prediction_rows, run_job, write_split


@pytest.fixture(scope="module")
def lvis_ground_truth(shared_data) -> tuple[Path, dict]:
    path = shared_data / "lvis_val_100" / "lvis_val_100.json"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    return path, json.loads(path.read_text())


def lvis_results(ground_truth: dict, seed: int = 0) -> list[dict]:
    """Detections that exercise every federated rule, with float32-exact scores and ties."""
    rng = np.random.default_rng(seed)
    all_categories = np.array([c["id"] for c in ground_truth["categories"]])
    rare = {c["id"] for c in ground_truth["categories"] if c["frequency"] == "r"}
    by_image: dict[int, list[dict]] = {}
    for a in ground_truth["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    results = []

    def add(image: dict, category: int, box: list[float]) -> None:
        score = float(np.float32(round(rng.random(), 2)))
        results.append({"image_id": image["id"], "category_id": int(category), "bbox": box, "score": score})

    for n, image in enumerate(ground_truth["images"]):
        w, h = image["width"], image["height"]
        anns = by_image.get(image["id"], [])
        for a in anns:  # true positives, jittered
            if a["category_id"] in rare or rng.random() < 0.85:
                x, y, bw, bh = np.array(a["bbox"]) + rng.normal(0, 0.08, 4) * np.r_[a["bbox"][2:], a["bbox"][2:]]
                add(image, a["category_id"], [float(x), float(y), float(max(bw, 1)), float(max(bh, 1))])
        present = sorted({a["category_id"] for a in anns})
        groups = [present, image.get("neg_category_ids", []), image.get("not_exhaustive_category_ids", []),
                  np.setdiff1d(all_categories, present + image.get("neg_category_ids", []))]
        extra = 400 if n == 3 else 6  # one image over LVIS's 300 detections
        for category_group in groups:
            for category in rng.choice(category_group, min(extra, 3 * len(category_group)) if len(category_group)
                                       else 0):
                bw, bh = rng.uniform(4, w / 2), rng.uniform(4, h / 2)
                add(image, category, [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), float(bw),
                                      float(bh)])
    return results


def lvis_api_run(gt_path: Path, results: list[dict]) -> tuple[dict[str, float], list[str]]:
    """The reference: lvis-api exactly as its README runs it (LVISResults keeps the top 300 per image);
    its results and printed lines."""
    if not hasattr(np, "float"):
        np.float = float  # lvis-api 0.5.3's eval.py still uses the alias numpy removed
    lvis = pytest.importorskip("lvis")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        gt = lvis.LVIS(str(gt_path))
        evaluator = lvis.LVISEval(gt, lvis.LVISResults(gt, copy.deepcopy(results)), "bbox")
        evaluator.run()
        evaluator.print_results()
    lines = [line for line in printed.getvalue().splitlines() if line.startswith(" Average")]
    return {k: float(v) for k, v in evaluator.get_results().items()}, lines


@pytest.fixture(scope="module")
def reference(lvis_ground_truth):
    path, ground_truth = lvis_ground_truth
    results = lvis_results(ground_truth)
    return results, *lvis_api_run(path, results)


def test_fixture_exercises_every_federated_rule(lvis_ground_truth, reference):
    _, ground_truth = lvis_ground_truth
    results, expected, _ = reference
    per_image = np.unique([r["image_id"] for r in results], return_counts=True)[1]
    assert per_image.max() > 300
    assert all(expected[k] > 0.05 for k in ("AP", "APr", "APc", "APf", "AR@300"))
    assert ev.detect_protocol(ground_truth) == "lvis"


def test_lvis_stats_equal_lvis_api_from_shuffled_parquet_files(tmp_path, lvis_ground_truth, reference, capsys):
    path, ground_truth = lvis_ground_truth
    results, expected, printout = reference
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 5, seed=11)
    code, out, _ = run_job(["--predictions", str(folder), "--annotations", str(path), "--output",
                            str(tmp_path / "out")], capsys)
    assert code == 0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["protocol"] == "lvis" and saved["detections"]["max_dets"] == 300
    assert list(saved["stats"]) == list(expected)
    np.testing.assert_allclose(list(saved["stats"].values()), list(expected.values()), rtol=0, atol=1e-12)
    assert len(printout) == 13 and out.splitlines()[1:14] == printout  # lvis-api's lines, verbatim
    rows = saved["per_category"]
    assert [r["frequency"] for r in rows] == sorted((r["frequency"] for r in rows),
                                                    key=["rare", "common", "frequent"].index)
    for short, name in (("APr", "rare"), ("APc", "common"), ("APf", "frequent")):
        assert saved["frequency"][f"AP_{name}"] == pytest.approx(expected[short], abs=1e-12)
        group = [r["AP"] for r in rows if r["frequency"] == name and r["AP"] is not None]
        assert np.mean(group) == pytest.approx(expected[short], abs=1e-12)  # the group's AP is their mean
    assert saved["frequency"]["categories"] == {"rare": 454, "common": 461, "frequent": 315, "unseen": 0}


def test_coco_protocol_on_request_and_lvis_needs_its_engine(tmp_path, lvis_ground_truth, reference, capsys):
    path, ground_truth = lvis_ground_truth
    results, expected, _ = reference
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 2)
    code, out, _ = run_job(["--predictions", str(folder), "--annotations", str(path), "--protocol", "coco"], capsys)
    assert code == 0 and "maxDets=100 ]" in out and "catIds" not in out
    code, _, err = run_job(["--predictions", str(folder), "--annotations", str(path), "--engine", "pycocotools"],
                           capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--engine pycocotools" in err
    coco_gt = dict(ground_truth, categories=[{"id": c["id"], "name": c["name"]} for c in ground_truth["categories"]],
                   images=[{k: v for k, v in i.items() if "category_ids" not in k} for i in ground_truth["images"]])
    assert ev.detect_protocol(coco_gt) == "coco"
    (tmp_path / "coco.json").write_text(json.dumps(coco_gt))
    code, _, err = run_job(["--predictions", str(folder), "--annotations", str(tmp_path / "coco.json"),
                            "--protocol", "lvis"], capsys)
    assert code == 2 and "frequency" in err and len(err.strip().splitlines()) == 1
