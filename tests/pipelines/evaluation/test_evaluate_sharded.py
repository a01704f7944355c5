"""The sharded engine: files scored in parallel as numpy arrays, merged into pycocotools' and
lvis-api's exact numbers, whatever the split, in local processes or Ray tasks.

`task_bytes=1` makes every file its own task, so small fixtures still go through worker
processes (or Ray tasks) and the merge.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.evaluation import matching, sharded
from pipelines.evaluation import scoring as ev
from tests.pipelines.evaluation.test_evaluate import (
    PUBLISHED,
    make_dataset,
    prediction_rows,
    pycocotools_stats,
    write_split,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coco_reference(shared_data):
    folder = shared_data / "coco_val2014_100"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    ground_truth = json.loads((folder / "instances_val2014_100.json").read_text())
    results = json.loads((folder / "instances_val2014_fakebbox100_results.json").read_text())
    return ground_truth, results


def test_one_seven_and_one_file_per_image_give_identical_stats(tmp_path, coco_reference):
    ground_truth, results = coco_reference
    outcomes = []
    for num_files in (1, 7, None):
        folder = write_split(tmp_path / f"pred-{num_files}", prediction_rows(ground_truth, results), num_files,
                             seed=num_files or 0)
        outcomes.append(sharded.score(str(folder), ground_truth, "coco", 100, workers=2, executor="local",
                                      task_bytes=1))
    first = outcomes[0].evaluation
    assert list(first.stats.values()) == pytest.approx(PUBLISHED, abs=1e-12)
    for other in outcomes[1:]:
        assert other.evaluation.stats == first.stats  # identical, not merely close
        np.testing.assert_array_equal(other.evaluation.precision, first.precision)
        assert other.detections_per_category == outcomes[0].detections_per_category
    assert len(outcomes[2].files) == 100 and sorted(outcomes[2].row_image_id) == sorted(outcomes[0].row_image_id)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generated_crowds_ties_and_empty_images_equal_pycocotools(tmp_path, seed):
    ground_truth, results = make_dataset(seed=seed, num_images=50)
    expected = pycocotools_stats(tmp_path, ground_truth, results)
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 3, seed=seed)
    outcome = sharded.score(str(folder), ground_truth, "coco", 100, workers=1, task_bytes=1)
    assert list(outcome.evaluation.stats.values()) == pytest.approx(expected, abs=1e-12)


def test_matching_of_one_pair_follows_cocoeval_rules():
    """A crowd region absorbs several detections, an ignored (crowd) match never beats a regular one,
    and of two equal IoUs the later ground truth wins."""
    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
              {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
              {"id": 3, "image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 1}]}
    columns = matching.ground_truth_columns(gt, "coco")
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [55, 55, 10, 10], [60, 60, 10, 10]], float)
    m = matching.match(columns, np.zeros(5, int), np.zeros(5, int), boxes, np.array([.9, .8, .7, .6, .5]), 100)
    every = (1 << len(matching.IOU_THRESHOLDS)) - 1
    all_area = 0
    assert m.rank[all_area].tolist() == [0, 1, 2]  # detections inside the crowd region are ignored everywhere
    assert m.matched[all_area].tolist() == [every, every, 0]  # two true positives, then a false positive
    assert m.ignored[all_area].tolist() == [0, 0, 0]
    assert columns.positives()[0].tolist() == [2, 2, 0, 0]  # npig: crowd never counts


def test_lvis_many_files_in_processes_equal_lvis_api(tmp_path, shared_data):
    from tests.pipelines.evaluation.test_evaluate_lvis import lvis_api_run, lvis_results

    path = shared_data / "lvis_val_100" / "lvis_val_100.json"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    ground_truth = json.loads(path.read_text())
    results = lvis_results(ground_truth, seed=3)
    expected, _ = lvis_api_run(path, results)
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 9, seed=2)
    outcome = sharded.score(str(folder), ground_truth, "lvis", 300, workers=2, executor="local", task_bytes=1)
    assert list(outcome.evaluation.stats) == list(expected)
    np.testing.assert_allclose(list(outcome.evaluation.stats.values()), list(expected.values()), rtol=0, atol=1e-12)
    via_api = ev.evaluate(ground_truth, ev.to_coco_results(ev.read_predictions(str(folder)), ground_truth, 300),
                          protocol="lvis")
    assert via_api.stats == pytest.approx(outcome.evaluation.stats, abs=1e-12)


def test_ray_tasks_give_the_same_numbers(tmp_path, coco_reference, ray_local):
    ground_truth, results = coco_reference
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 5, seed=4)
    local = sharded.score(str(folder), ground_truth, "coco", 100, workers=1, task_bytes=1)
    on_ray = sharded.score(str(folder), ground_truth, "coco", 100, workers=2, executor="ray", task_bytes=1)
    assert on_ray.evaluation.stats == local.evaluation.stats
    assert list(on_ray.evaluation.stats.values()) == pytest.approx(PUBLISHED, abs=1e-12)
    assert on_ray.detections_read == len(results) and len(on_ray.row_image_id) == 100


def test_an_image_in_two_files_is_a_user_error_across_tasks(tmp_path, coco_reference):
    from pipelines.errors import UserError

    ground_truth, results = coco_reference
    rows = prediction_rows(ground_truth, results)
    folder = write_split(tmp_path / "pred", rows, 4)
    write_split(tmp_path / "extra", rows[:1], 1)
    (tmp_path / "extra" / "part-00000.parquet").rename(folder / "zz-stale.parquet")
    with pytest.raises(UserError, match=r"zz-stale\.parquet.*column 'image_id'|column 'image_id'.*zz-stale"):
        sharded.score(str(folder), ground_truth, "coco", 100, workers=2, executor="local", task_bytes=1)


def test_annotations_of_unlisted_images_or_categories_are_not_scored(tmp_path):
    ground_truth, results = make_dataset(seed=7, num_images=20)
    stray = dict(ground_truth["annotations"][0], id=10_000, image_id=999_999)
    odd = dict(ground_truth["annotations"][1], id=10_001, category_id=55)
    ground_truth["annotations"] += [stray, odd]
    expected = pycocotools_stats(tmp_path, ground_truth, results)
    folder = write_split(tmp_path / "pred", prediction_rows(ground_truth, results), 2)
    outcome = sharded.score(str(folder), ground_truth, "coco", 100, workers=1)
    assert list(outcome.evaluation.stats.values()) == pytest.approx(expected, abs=1e-12)
