"""jobs.inspect and pipelines.formats.{inspect,coverage}: anchor coverage on boxes whose answer is
known, and the whole report on a real shards folder written by jobs.prepare."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs import inspect as inspect_job
from pipelines.errors import UserError
from pipelines.formats import coverage, inspect
from retinanet.anchors import Anchors
from retinanet.config import preset
from retinanet.postprocess import feature_grid_sizes

pytestmark = pytest.mark.slow


def _anchors(cfg, shape):
    return Anchors(cfg.anchor_sizes, cfg.aspect_ratios)(shape, feature_grid_sizes(*shape), torch.device("cpu"),
                                                       torch.float32)[0].numpy().astype(np.float64)


def _sample(boxes: np.ndarray, size: int, category=None) -> dict:
    n = len(boxes)
    return {"key": np.arange(n, dtype=np.float64), "category": np.zeros(n) if category is None else category,
            "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3],
            "image_w": np.full(n, float(size)), "image_h": np.full(n, float(size))}


def test_best_iou_exact_anchor_tiny_box_and_exhaustive_agree():
    cfg = preset("r50", min_size=512, max_size=512)
    anchors = _anchors(cfg, (512, 512))
    inside = anchors[(anchors[:, :2] >= 0).all(axis=1) & (anchors[:, 2:] <= 512).all(axis=1)]
    picked = inside[np.random.default_rng(0).choice(len(inside), 50, replace=False)]
    np.testing.assert_allclose(coverage.best_anchor_iou(picked, (512, 512), cfg), 1.0)
    tiny = np.array([[254.0, 254.0, 258.0, 258.0]])  # 4x4 px centred on a P3 anchor of 32x32
    # the best is a 46x22 P3 anchor (32 px at aspect 0.5, rounded as torchvision rounds): IoU 16 / 1012
    assert coverage.best_anchor_iou(tiny, (512, 512), cfg)[0] == pytest.approx(16 / (46 * 22))
    rng = np.random.default_rng(1)
    xy, wh = rng.uniform(0, 400, (300, 2)), np.exp(rng.uniform(np.log(3), np.log(400), (300, 2)))
    boxes = np.c_[xy, np.minimum(xy + wh, 512)]
    np.testing.assert_array_equal(coverage.best_anchor_iou(boxes, (512, 512), cfg),
                                  coverage.best_anchor_iou(boxes, (512, 512), cfg, exhaustive=True))


def test_coverage_shares_and_warning_direction():
    cfg = preset("r50", min_size=512, max_size=512)
    anchors = _anchors(cfg, (512, 512))
    exact = anchors[(anchors[:, :2] >= 0).all(axis=1) & (anchors[:, 2:] <= 512).all(axis=1)][::500][:30]
    tiny = np.array([[x, x, x + 4, x + 4] for x in np.linspace(10, 400, 10)])
    sample = _sample(np.r_[exact, tiny], 512, np.r_[np.zeros(len(exact)), np.ones(10)])
    result = coverage.coverage_of_sample(sample, cfg, 2)
    assert result["positive"] == len(exact) and result["low_quality_below_bg"] == 10
    assert result["share_below_fg"] == pytest.approx(10 / (len(exact) + 10), abs=1e-4)
    assert result["per_class"][0]["share_below_fg"] == 0 and result["per_class"][1]["share_below_fg"] == 1
    assert result["below_fg_by_reason"]["smaller_than_smallest_anchor"] == 10
    result.update(image_size=512, anchor_sizes=list(cfg.anchor_sizes), aspect_ratios=list(cfg.aspect_ratios),
                  fg_iou=0.5)
    warning = coverage.coverage_warning(result)
    assert warning.count("\n") == 0 and "larger --image-size" in warning and "tiny preset" in warning
    assert coverage.coverage_warning(dict(result, share_below_fg=0.1)) is None


def test_large_boxes_ask_for_a_smaller_image_size():
    cfg = preset("tiny", min_size=800, max_size=800)  # anchors up to 256 x 2^(2/3) = 406 px
    sample = _sample(np.array([[0.0, 0.0, 799.0, 799.0]] * 5), 800)
    result = coverage.coverage_of_sample(sample, cfg, 1)
    result.update(image_size=800, anchor_sizes=list(cfg.anchor_sizes), aspect_ratios=list(cfg.aspect_ratios),
                  fg_iou=0.5)
    assert result["below_fg_by_reason"]["larger_than_largest_anchor"] == 5
    assert "smaller --image-size" in coverage.coverage_warning(result)


@pytest.fixture(scope="module")
def synth_shards(synth_coco, ray_local, tmp_path_factory):
    from pipelines.formats.prepare import prepare

    out = tmp_path_factory.mktemp("inspect_shards")
    prepare(str(synth_coco / "images"), str(synth_coco / "annotations.json"), str(out), images_per_shard=10,
            progress=lambda line: None)
    return out


def test_inspect_real_shards(synth_shards, synth_coco, tmp_path, capsys):
    coco = json.loads((synth_coco / "annotations.json").read_text())
    report_uri = tmp_path / "report.json"
    assert inspect_job.main([str(synth_shards), "--output", str(report_uri)]) == 0
    report = json.loads(report_uri.read_text())
    assert report["images"] == len(coco["images"]) and report["boxes"] == len(coco["annotations"])
    for row in report["classes"]:
        anns = [a for a in coco["annotations"] if a["category_id"] == row["category_id"]]
        assert row["boxes"] == len(anns) and row["images"] == len({a["image_id"] for a in anns})
    cov = report["anchor_coverage"]
    assert cov["boxes"] == report["boxes"] and not cov["sampled"]
    assert cov["positive"] + cov["low_quality_ignore_band"] + cov["low_quality_below_bg"] + cov["no_anchor"] == \
        cov["boxes"]
    side = np.sqrt([a["bbox"][2] * a["bbox"][3] for a in coco["annotations"]])
    assert report["box_sizes"]["original_pixels"]["sqrt_area"]["p50"] == pytest.approx(np.median(side), rel=1e-3)
    assert "anchor coverage at --image-size 128" in capsys.readouterr().out
    # a larger input scales the boxes and changes coverage; a sample says so
    big = inspect_job.inspect_data(str(synth_shards), inspect_job.model_config("tiny", 256, None), 10, 0)
    assert big["anchor_coverage"]["image_size"] == 256 and big["anchor_coverage"]["max_size"] == 426
    assert big["box_sizes"]["sampled"] and big["box_sizes"]["sample_size"] == 10
    assert "sample of 10" in big["anchor_coverage"]["note"]
    assert big["box_sizes"]["resized_pixels"]["width"]["p50"] > big["box_sizes"]["original_pixels"]["width"]["p50"]


def test_sample_is_seeded_and_order_free(synth_shards):
    a = inspect.scan(str(synth_shards), sample=15, seed=3)
    b = inspect.scan(str(synth_shards), sample=15, seed=3)
    np.testing.assert_array_equal(a.sample["x1"], b.sample["x1"])
    assert len(a.sample["key"]) == 15 and a.num_boxes > 15


def test_library_call_and_errors(synth_shards, tmp_path):
    result = coverage.anchor_coverage(str(synth_shards / "manifest.json"), preset("tiny"))
    assert result["boxes"] > 0 and result["per_class"][0]["name"]
    with pytest.raises(UserError, match="no manifest"):
        inspect.scan(str(tmp_path))
    with pytest.raises(UserError, match="--sample"):
        inspect.scan(str(synth_shards), sample=0)


def test_training_warns_in_one_line_from_a_few_shards(synth_shards, capsys):
    from jobs import train

    few = inspect.scan(str(synth_shards), max_shards=2)
    assert 0 < few.num_images <= 20  # 2 of the 3 shards of 10, 10 and 4 images
    # 64 px: the synthetic objects (down to a few px) fall below the tiny preset's 16 px anchors
    train.warn_anchor_coverage(str(synth_shards), preset("tiny", min_size=64, max_size=107).to_dict())
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: anchor coverage:") and "--image-size" in err and len(err.splitlines()) == 1
    train.warn_anchor_coverage(str(synth_shards), preset("r50", min_size=800, max_size=1333).to_dict())
    assert capsys.readouterr().err == ""
