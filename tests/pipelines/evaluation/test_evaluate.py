"""jobs.evaluate and pipelines.evaluation.scoring: pycocotools' exact numbers however predictions are split.

Prediction files are written here with pyarrow in the schema of docs/design.md, so these tests need
neither Ray nor jobs.infer. pycocotools, run on a merged results json, is the reference.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import evaluate as job
from jobs.cli import run
from pipelines.evaluation import inputs, report, sharded
from pipelines.evaluation import scoring as ev
from pipelines.formats import shards

ROOT = Path(__file__).resolve().parents[3]
PUBLISHED = [0.5045806987249628, 0.6969727247299577, 0.5729816669904824, 0.5856257209410443,
             0.5193996948036719, 0.5013978986347466, 0.38681277964578054, 0.5936795762842003,
             0.595352982877607, 0.6398109626113442, 0.5664205978994309, 0.5642905982905982]
DETECTION = pa.struct([("x1", pa.float64()), ("y1", pa.float64()), ("x2", pa.float64()), ("y2", pa.float64()),
                       ("score", pa.float32()), ("category_id", pa.int32()), ("category", pa.string())])
SCHEMA = pa.schema([("image_id", pa.int64()), ("uri", pa.string()), ("width", pa.int32()),
                    ("height", pa.int32()), ("detections", pa.list_(DETECTION)), ("error", pa.string()),
                    ("model", pa.string())])
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}, {"id": 90, "name": "tooth|brush"}]


# ---------------------------------------------------------------- fixtures written with pyarrow

def prediction_rows(ground_truth: dict, results: list[dict], skip_images: tuple = ()) -> list[dict]:
    """One predictions row per ground-truth image (xywh results -> xyxy detections, json order kept)."""
    by_image = {}
    for r in results:
        x, y, w, h = r["bbox"]
        by_image.setdefault(r["image_id"], []).append(
            {"x1": x, "y1": y, "x2": x + w, "y2": y + h, "score": r["score"], "category_id": r["category_id"],
             "category": "c"})
    return [{"image_id": img["id"], "uri": f"s3://b/{img['id']}.jpg", "width": img["width"],
             "height": img["height"], "detections": by_image.get(img["id"], []), "error": None, "model": "m1"}
            for img in ground_truth["images"] if img["id"] not in skip_images]


def write_split(folder: Path, rows: list[dict], num_files: int | None, seed: int = 0) -> Path:
    """Rows shuffled, then written as `num_files` files (None: one file per image)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    np.random.default_rng(seed).shuffle(rows)
    chunks = np.array_split(np.arange(len(rows)), num_files or len(rows))
    for k, chunk in enumerate(chunks):
        write_rows(folder / f"part-{k:05d}.parquet", [rows[i] for i in chunk])
    return folder


def write_rows(path: Path, rows: list[dict], schema: pa.Schema = SCHEMA) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def make_dataset(seed: int = 0, num_images: int = 40) -> tuple[dict, list[dict]]:
    """Ground truth and results with COCO's quirks: non-contiguous ids, crowd regions, an `area`
    unlike the box area, an image without ground truth, one without detections, tied scores."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for i in range(num_images):
        image_id = 1000 + 7 * i
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        boxes = []
        for _ in range(0 if i == 0 else int(rng.integers(1, 6))):
            w, h = rng.uniform(8, 200, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            category = int(rng.choice([3, 17, 90]))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": float(w * h * rng.uniform(0.3, 1.0)),
                                "iscrowd": int(rng.random() < 0.1)})
            boxes.append((x, y, x + w, y + h, category))
        if i == 1:
            continue  # ground truth, no detections: all misses
        boxes += [(*rng.uniform(0, 300, 2), *rng.uniform(320, 480, 2), int(rng.choice([3, 17, 90])))
                  for _ in range(int(rng.integers(0, 4)))]
        for x1, y1, x2, y2, category in boxes:
            x1, y1, x2, y2 = np.array([x1, y1, x2, y2]) + rng.normal(0, 6, 4)
            score = float(np.float32(round(rng.random(), 1)))  # float32-exact, many ties
            results.append({"image_id": image_id, "category_id": category,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}, results


def pycocotools_run(tmp_path: Path, ground_truth: dict, results: list[dict]) -> tuple[list[float], list[str]]:
    """The reference: pycocotools on json files, exactly as its README runs it; stats and printout."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    (tmp_path / "res.json").write_text(json.dumps(results))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        gt = COCO(str(tmp_path / "gt.json"))
        evaluator = COCOeval(gt, gt.loadRes(str(tmp_path / "res.json")), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    lines = [line for line in printed.getvalue().splitlines() if line.startswith(" Average")]
    return [float(s) for s in evaluator.stats], lines


def pycocotools_stats(tmp_path: Path, ground_truth: dict, results: list[dict]) -> list[float]:
    return pycocotools_run(tmp_path, ground_truth, results)[0]


ENGINES = ("sharded", *ev.ENGINES)  # jobs.evaluate's default and the two COCO API paths


def stats_of(folder: Path, ground_truth: dict, engine: str = "faster-coco-eval") -> list[float]:
    if engine == "sharded":
        return list(sharded.score(str(folder), ground_truth, "coco", 100, workers=1).evaluation.stats.values())
    results = ev.to_coco_results(ev.read_predictions(str(folder)), ground_truth)
    return list(ev.evaluate(ground_truth, results, engine=engine).stats.values())


def dump_json(tmp_path: Path, ground_truth: dict) -> Path:
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(ground_truth))
    return path


def run_job(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run(job.main, argv)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.fixture(scope="module")
def dataset() -> tuple[dict, list[dict]]:
    return make_dataset()


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("num_files", [1, 7, None], ids=["1-file", "7-files", "file-per-image"])
def test_reference_stats_equal_published_however_split(tmp_path, shared_data, num_files):
    reference = shared_data / "coco_val2014_100"
    if not reference.is_dir():
        pytest.skip(f"{reference} absent")
    ground_truth = json.loads((reference / "instances_val2014_100.json").read_text())
    results = json.loads((reference / "instances_val2014_fakebbox100_results.json").read_text())
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), num_files, seed=num_files or 0)
    for engine in ENGINES:
        np.testing.assert_allclose(stats_of(folder, ground_truth, engine), PUBLISHED, rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_files", [1, 5, None], ids=["1-file", "5-files", "file-per-image"])
def test_generated_stats_equal_pycocotools_on_merged_json(tmp_path, dataset, num_files):
    ground_truth, results = dataset
    expected = pycocotools_stats(tmp_path, ground_truth, results)
    assert expected[0] > 0.1 and -1 not in expected  # a fixture that exercises every stat
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), num_files, seed=3)
    for engine in ENGINES:
        np.testing.assert_allclose(stats_of(folder, ground_truth, engine), expected, rtol=0, atol=1e-12)


def test_small_read_batches_give_the_same_results(tmp_path, dataset, monkeypatch):
    ground_truth, results = dataset
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 2)
    whole = ev.to_coco_results(ev.read_predictions(str(folder)), ground_truth)
    monkeypatch.setattr(inputs, "_BATCH_ROWS", 3)
    np.testing.assert_array_equal(ev.to_coco_results(ev.read_predictions(str(folder)), ground_truth), whole)


def test_coco_stats_takes_a_results_list_or_array_and_leaves_them_untouched(tmp_path, dataset):
    ground_truth, results = dataset
    before = copy.deepcopy((ground_truth, results))
    array = np.array([(r["image_id"], *r["bbox"], r["score"], r["category_id"]) for r in results])
    from_list, from_array = ev.coco_stats(ground_truth, results), ev.coco_stats(ground_truth, array)
    assert list(from_list) == list(ev.STAT_NAMES) and from_list == from_array
    assert (ground_truth, results) == before  # the training job reuses both every epoch
    assert list(from_list.values()) == pytest.approx(pycocotools_stats(tmp_path, ground_truth, results), abs=1e-12)


# ---------------------------------------------------------------- COCO semantics

def test_empty_predictions_score_zero(tmp_path, dataset):
    ground_truth, _ = dataset
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, []), 3)
    write_rows(folder / "zero-rows.parquet", [])
    predictions = ev.read_predictions(str(folder))
    assert predictions.num_rows == len(ground_truth["images"]) and len(predictions.scores) == 0
    for engine in ENGINES:
        assert stats_of(folder, ground_truth, engine) == [0.0] * 12


def test_images_without_a_row_or_with_an_error_count_as_misses(tmp_path, dataset, capsys):
    ground_truth, results = dataset
    missing, failed = ground_truth["images"][5]["id"], ground_truth["images"][6]["id"]
    rows = prediction_rows(ground_truth, results, skip_images=(missing,))
    for row in rows:
        if row["image_id"] == failed:
            row.update(detections=None, error="corrupt JPEG")
    folder = write_split(tmp_path / "pred", rows, 4)
    kept = [r for r in results if r["image_id"] not in (missing, failed)]
    expected = pycocotools_stats(tmp_path, ground_truth, kept)
    assert expected[8] < pycocotools_stats(tmp_path, ground_truth, results)[8]  # the misses lower AR100
    code, out, _ = run_job(["--predictions", str(folder), "--annotations", str(tmp_path / "gt.json"),
                            "--output", str(tmp_path / "out")], capsys)
    assert code == 0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(saved["stats"].values()) == pytest.approx(expected, abs=1e-12)
    assert saved["images"] == {"ground_truth": 40, "rows": 39, "rows_with_error": 1, "without_row": 1}
    assert saved["errors"][0]["image_id"] == failed and saved["errors"][0]["error"] == "corrupt JPEG"
    assert "1 row(s) with error" in out and "1 ground-truth image(s) have no prediction row" in out


def _one_image_ground_truth(annotations: list[dict]) -> dict:
    return {"images": [{"id": 1, "width": 640, "height": 480}], "categories": CATEGORIES,
            "annotations": [dict(a, id=k, image_id=1) for k, a in enumerate(annotations, start=1)]}


def test_detections_inside_a_crowd_region_are_ignored_not_false_positives(tmp_path):
    gt = _one_image_ground_truth([
        {"category_id": 3, "bbox": [10, 10, 100, 100], "area": 10000, "iscrowd": 0},
        {"category_id": 3, "bbox": [200, 100, 300, 300], "area": 90000, "iscrowd": 1}])
    in_crowd = [{"image_id": 1, "category_id": 3, "bbox": [210 + 40 * k, 120, 30, 30], "score": 0.9}
                for k in range(5)]
    results = in_crowd + [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 100, 100], "score": 0.5}]
    folder = write_split(tmp_path / "pred", prediction_rows(gt, results), 1)
    assert stats_of(folder, gt)[:3] == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)
    not_crowd = copy.deepcopy(gt)
    not_crowd["annotations"][1]["iscrowd"] = 0
    assert stats_of(folder, not_crowd)[0] < 0.5  # the same boxes are false positives without the flag
    for engine in ENGINES:
        assert stats_of(folder, gt, engine) == pytest.approx(pycocotools_stats(tmp_path, gt, results), abs=1e-12)


def test_area_ranges_come_from_the_ground_truth_area_not_the_box(tmp_path):
    gt = _one_image_ground_truth([{"category_id": 17, "bbox": [50, 50, 20, 20], "area": 5000.0, "iscrowd": 0}])
    results = [{"image_id": 1, "category_id": 17, "bbox": [50, 50, 20, 20], "score": 0.8}]
    stats = dict(zip(ev.STAT_NAMES, stats_of(write_split(tmp_path / "pred", prediction_rows(gt, results), 1), gt)))
    assert (stats["APs"], stats["APm"], stats["APl"]) == pytest.approx((-1, 1, -1), abs=1e-12)  # 20x20 is medium
    assert list(stats.values()) == pytest.approx(pycocotools_stats(tmp_path, gt, results), abs=1e-12)


def test_non_contiguous_category_ids_in_the_per_category_table(tmp_path):
    gt = _one_image_ground_truth([{"category_id": 90, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},
                                  {"category_id": 17, "bbox": [100, 100, 50, 50], "area": 2500, "iscrowd": 0}])
    results = [{"image_id": 1, "category_id": 90, "bbox": [10, 10, 50, 50], "score": 0.7}]
    results_array = ev.to_coco_results(
        ev.read_predictions(str(write_split(tmp_path / "pred", prediction_rows(gt, results), 1))), gt)
    rows = report.per_category(ev.evaluate(gt, results_array), gt, results_array)
    assert [(r["category_id"], r["name"], r["instances"], r["detections"], r["AP"]) for r in rows] == [
        (3, "cat", 0, 0, None), (17, "dog", 1, 0, 0.0), (90, "tooth|brush", 1, 1, 1.0)]
    markdown = report.category_markdown(rows).splitlines()
    assert markdown[2] == "| 3 | cat | 0 | 0 | - | - | - |" and "tooth\\|brush" in markdown[4]
    assert report.category_csv(rows).splitlines()[1] == "3,cat,0,0,,,"


def test_top_max_dets_per_image_by_score_in_canonical_order(tmp_path):
    gt = _one_image_ground_truth([])
    gt["images"].append({"id": 2, "width": 640, "height": 480})
    scores = [0.25, 0.5, 0.75, 0.5, 0.125]
    results = [{"image_id": image_id, "category_id": 3, "bbox": [k, k, 10, 10], "score": s}
               for image_id in (2, 1) for k, s in enumerate(scores)]
    folder = write_split(tmp_path / "pred", prediction_rows(gt, results), None)
    kept = ev.to_coco_results(ev.read_predictions(str(folder)), gt, max_dets=3)
    assert kept[:, 0].tolist() == [1, 1, 1, 2, 2, 2]
    assert kept[:3, 5].tolist() == [0.75, 0.5, 0.5] and kept[:3, 1].tolist() == [2, 1, 3]  # ties keep row order


# ---------------------------------------------------------------- the job and its report

def test_job_writes_report_tables_and_curves_and_prints_pycocotools_lines(tmp_path, dataset, capsys):
    ground_truth, results = dataset
    expected, printout = pycocotools_run(tmp_path, ground_truth, results)
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 3)
    code, out, _ = run_job(["--predictions", str(folder), "--annotations", str(tmp_path / "gt.json"),
                            "--output", str(tmp_path / "out")], capsys)
    assert code == 0
    assert len(printout) == 12 and report.summary_lines(dict(zip(ev.STAT_NAMES, expected))) == printout
    assert out.splitlines()[1:13] == printout
    out_dir = tmp_path / "out"
    saved = json.loads((out_dir / "report.json").read_text())
    assert list(saved["stats"].values()) == pytest.approx(expected, abs=1e-12)
    assert saved["files"] == 3 and saved["models"] == ["m1"] and saved["detections"]["read"] == len(results)
    csv_rows = (out_dir / "per_category_ap.csv").read_text().splitlines()
    assert csv_rows[0] == "category_id,name,instances,detections,AP,AP50,AP75" and len(csv_rows) == 4
    per_category_ap = [r["AP"] for r in saved["per_category"]]
    assert np.mean(per_category_ap) == pytest.approx(expected[0], abs=1e-12)  # COCO AP is their mean
    for name in ("pr_curve_iou50.png", "pr_curve_iou75.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rare_common_frequent_ap_from_a_training_json_and_from_shards(tmp_path, dataset, capsys):
    ground_truth, results = dataset
    counts = {3: 4, 17: 40, 90: 400}  # rare, common, frequent
    train = {"images": [], "categories": CATEGORIES, "annotations": [
        {"id": k, "image_id": i, "category_id": c} for k, (c, i) in enumerate(
            ((c, i) for c, n in counts.items() for i in range(n) for _ in range(2)), start=1)]}
    (tmp_path / "train.json").write_text(json.dumps(train))
    assert report.train_image_counts(str(tmp_path / "train.json")) == counts
    lvis = {"categories": [dict(c, image_count=counts[c["id"]]) for c in CATEGORIES]}
    (tmp_path / "lvis.json").write_text(json.dumps(lvis))
    assert report.train_image_counts(str(tmp_path / "lvis.json")) == counts
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    table = pa.table({"image_id": pa.array(range(400), pa.int64()), "category_id": pa.array(
        [[c for c, n in counts.items() if i < n] * 2 for i in range(400)], pa.list_(pa.int32()))})
    pq.write_table(table, shard_dir / "shard-00000.parquet")
    (shard_dir / shards.MANIFEST).write_bytes(shards.Manifest(
        categories=CATEGORIES, num_images=400, shards=[{"file": "shard-00000.parquet", "num_images": 400,
                                                        "num_bytes": 1}]).to_json())
    assert report.train_image_counts(str(shard_dir)) == counts

    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 2)
    code, out, _ = run_job(["--predictions", str(folder), "--annotations", str(dump_json(tmp_path, ground_truth)),
                            "--output", str(tmp_path / "out"), "--train-manifest", str(shard_dir)], capsys)
    assert code == 0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    by_group = {r["frequency"]: r["AP"] for r in saved["per_category"]}
    assert saved["frequency"]["AP_rare"] == pytest.approx(by_group["rare"], abs=1e-12)
    assert saved["frequency"]["AP_common"] == pytest.approx(by_group["common"], abs=1e-12)
    assert saved["frequency"]["AP_frequent"] == pytest.approx(by_group["frequent"], abs=1e-12)
    assert "by training frequency: AP_rare=" in out


def test_job_reads_and_writes_s3(tmp_path, dataset, capsys, s3_bucket):
    from pipelines import storage

    ground_truth, results = dataset
    expected = pycocotools_stats(tmp_path, ground_truth, results)
    for path in write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 3).iterdir():
        storage.write_bytes_atomic(f"{s3_bucket}/run/pred/{path.name}", path.read_bytes())
    storage.write_bytes_atomic(f"{s3_bucket}/gt.json", json.dumps(ground_truth).encode())
    code, _, err = run_job(["--predictions", f"{s3_bucket}/run/pred", "--annotations", f"{s3_bucket}/gt.json",
                            "--output", f"{s3_bucket}/run/eval"], capsys)
    assert code == 0, err
    saved = json.loads(storage.read_bytes(f"{s3_bucket}/run/eval/report.json"))
    assert saved["files"] == 3 and list(saved["stats"].values()) == pytest.approx(expected, abs=1e-12)
    assert storage.list_files(f"{s3_bucket}/run/eval", suffixes=[".png"]) == [
        f"{s3_bucket}/run/eval/pr_curve_iou50.png", f"{s3_bucket}/run/eval/pr_curve_iou75.png"]


# ---------------------------------------------------------------- user errors: exit 2, one line

def _bad_schema(column: str, arrow_type: pa.DataType) -> pa.Schema:
    if column.startswith("detections."):
        fields = [pa.field(f.name, arrow_type if f.name == column.split(".")[1] else f.type) for f in DETECTION]
        return SCHEMA.set(SCHEMA.get_field_index("detections"), pa.field("detections", pa.list_(pa.struct(fields))))
    return SCHEMA.set(SCHEMA.get_field_index(column), pa.field(column, arrow_type))


def _user_error_cases(good_rows: list[dict]) -> dict:
    row = dict(good_rows[0])
    as_strings = [dict(r, detections=[dict(d, score=str(d["score"])) for d in r["detections"]]) for r in good_rows[:2]]
    return {  # name -> (rows of the bad file, its schema, the column its message must name)
        "unknown-image": ([dict(row, image_id=999_999)], SCHEMA, "image_id"),
        "null-image-id": ([dict(row, image_id=None)], SCHEMA, "image_id"),
        "duplicate-image": ([row], SCHEMA, "image_id"),
        "unknown-category": ([dict(row, detections=[dict(row["detections"][0], category_id=5)])], SCHEMA,
                             "detections.category_id"),
        "nan-coordinate": ([dict(row, detections=[dict(row["detections"][0], x1=float("nan"))])], SCHEMA,
                           "detections.x1"),
        "missing-column": ([{"image_id": 1}], pa.schema([("image_id", pa.int64())]), "detections"),
        "image-id-as-string": ([dict(row, image_id="1000")], _bad_schema("image_id", pa.string()), "image_id"),
        "score-as-string": (as_strings, _bad_schema("detections.score", pa.string()), "detections.score"),
        "missing-box-field": ([], pa.schema([("image_id", pa.int64()), ("detections", pa.list_(pa.struct(
            [f for f in DETECTION if f.name != "y2"])))]), "detections.y2"),
    }


@pytest.mark.parametrize("case", ["unknown-image", "null-image-id", "duplicate-image", "unknown-category",
                                  "nan-coordinate", "missing-column", "image-id-as-string", "score-as-string",
                                  "missing-box-field"])
def test_bad_predictions_exit_2_with_one_line_naming_file_and_column(tmp_path, dataset, capsys, case):
    ground_truth, results = dataset
    good = prediction_rows(ground_truth, results)[2:]  # rows 0 and 1 have no detections
    rows, schema, column = _user_error_cases(good)[case]
    folder = write_split(tmp_path / "pred", good if case == "duplicate-image" else good[1:], 3)
    write_rows(folder / "zz-bad.parquet", rows, schema)
    code, _, err = run_job(["--predictions", str(folder), "--annotations", str(dump_json(tmp_path, ground_truth))],
                           capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "zz-bad.parquet" in err and f"column '{column}'" in err


@pytest.mark.parametrize("case", ["not-parquet", "no-files", "missing-annotations", "annotations-not-coco",
                                  "max-dets"])
def test_bad_inputs_exit_2_with_one_line_naming_them(tmp_path, dataset, capsys, case):
    ground_truth, results = dataset
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 2)
    annotations, extra, named = dump_json(tmp_path, ground_truth), [], None
    if case == "not-parquet":
        (folder / "broken.parquet").write_bytes(b"not parquet at all")
        named = "broken.parquet"
    elif case == "no-files":
        folder, named = tmp_path / "empty", "empty"
        folder.mkdir()
    elif case == "missing-annotations":
        annotations, named = tmp_path / "nope.json", "nope.json"
    elif case == "annotations-not-coco":
        annotations.write_text(json.dumps({"images": []}))
        named = "annotations"
    else:
        extra, named = ["--max-dets", "0"], "--max-dets"
    code, _, err = run_job(["--predictions", str(folder), "--annotations", str(annotations), *extra], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and named in err


def test_module_entrypoint_exit_codes(tmp_path, dataset):
    ground_truth, results = dataset
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 2)
    command = [sys.executable, "-m", "jobs.evaluate", "--predictions", str(folder), "--annotations"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ok = subprocess.run(command + [str(dump_json(tmp_path, ground_truth))], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = " in ok.stdout
    bad = subprocess.run(command + [str(tmp_path / "missing.json")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.json" in bad.stderr
