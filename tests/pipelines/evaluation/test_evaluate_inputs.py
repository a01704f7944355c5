"""jobs.evaluate's other inputs and outputs: a COCO results json instead of Parquet, and progress lines.

The json of another tool and jobs.infer's Parquet of the same detections must give the same report;
the json alone must give pycocotools' numbers exactly (its boxes are used as written, x, y, w, h).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.pipelines.evaluation.test_evaluate import (
    dump_json,
    make_dataset,
    prediction_rows,
    pycocotools_stats,
    run_job,
    write_split,
)


@pytest.fixture(scope="module")
def dataset() -> tuple[dict, list[dict]]:
    return make_dataset(seed=5)


def test_results_json_gives_the_parquet_report_and_pycocotools_stats(tmp_path, dataset, capsys):
    ground_truth, results = dataset
    annotations = dump_json(tmp_path, ground_truth)
    shuffled = [results[k] for k in np.random.default_rng(1).permutation(len(results))]
    by_image = sorted(shuffled, key=lambda r: r["image_id"])  # per-image order kept, like the Parquet rows
    (tmp_path / "results.json").write_text(json.dumps(shuffled))
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, by_image), 4)
    reports = {}
    for name, source in (("json", tmp_path / "results.json"), ("parquet", folder)):
        code, out, err = run_job(["--predictions", str(source), "--annotations", str(annotations),
                                  "--output", str(tmp_path / name)], capsys)
        assert code == 0, err
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    from_json, from_parquet = reports["json"], reports["parquet"]
    assert from_json["input"] == "json" and from_parquet["input"] == "parquet"
    assert from_json["detections"] == from_parquet["detections"]
    # the json's own x, y, w, h: pycocotools' numbers exactly; Parquet's x2 - x1 may differ in the last bit
    assert list(from_json["stats"].values()) == pytest.approx(pycocotools_stats(tmp_path, ground_truth, shuffled),
                                                              abs=1e-12)
    assert from_json["stats"] == pytest.approx(from_parquet["stats"], abs=1e-12)
    assert len(from_json["per_category"]) == len(from_parquet["per_category"])
    for a, b in zip(from_json["per_category"], from_parquet["per_category"]):
        assert a == pytest.approx(b, abs=1e-12)
    assert from_json["images"]["without_detections"] == 1 and from_json["images"]["rows"] == 39


@pytest.mark.parametrize("case", ["not-a-list", "no-bbox", "bbox-of-3", "nan-score", "unknown-category"])
def test_bad_results_json_exits_2_with_one_line(tmp_path, dataset, capsys, case):
    ground_truth, results = dataset
    entry = dict(results[0])
    bad = {"not-a-list": {"annotations": results}, "no-bbox": [{k: v for k, v in entry.items() if k != "bbox"}],
           "bbox-of-3": [dict(entry, bbox=entry["bbox"][:3])], "nan-score": [dict(entry, score=float("nan"))],
           "unknown-category": [dict(entry, category_id=5)]}[case]
    (tmp_path / "res.json").write_text(json.dumps(bad))
    code, _, err = run_job(["--predictions", str(tmp_path / "res.json"), "--annotations",
                            str(dump_json(tmp_path, ground_truth))], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "res.json" in err


def test_progress_lines_go_to_stderr_and_leave_the_summary_alone(tmp_path, dataset, capsys):
    ground_truth, results = dataset
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 3)
    argv = ["--predictions", str(folder), "--annotations", str(dump_json(tmp_path, ground_truth))]
    _, quiet_out, quiet_err = run_job(argv, capsys)
    code, out, err = run_job(argv + ["--progress", "0"], capsys)
    assert code == 0 and out == quiet_out and quiet_err == ""
    lines = err.splitlines()
    assert len(lines) == 1  # three small files: one task, scored in this process
    assert lines[-1].startswith(f"evaluate: scored 3/3 files, 40 images, {len(results)} detections (")
    code, out, err = run_job(argv + ["--progress", "0", "--engine", "faster-coco-eval"], capsys)
    assert code == 0 and out == quiet_out
    lines = err.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "evaluate: read 1/3 files", "evaluate: read 2/3 files", "evaluate: read 3/3 files",
        "evaluate: scoring 0/40 images", "evaluate: scoring 40/40 images (" + lines[-1].split(" (")[1]]
