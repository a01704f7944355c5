"""Repeat-factor sampling (LVIS): factors, per-image counts, determinism."""
import numpy as np
import pyarrow as pa
import pytest

from pipelines.sampling import category_repeat_factors, image_repeat_counts, repeat_rows


def test_category_factors_follow_lvis_formula():
    factors = category_repeat_factors({1: 900, 2: 10, 3: 1, 4: 0}, num_images=1000, threshold=0.01)
    assert factors[1] == 1.0 and factors[2] == 1.0 and factors[4] == 1.0
    assert factors[3] == pytest.approx(np.sqrt(0.01 / 0.001))


def _table(n=2000):
    categories = [[1]] * (n // 2) + [[1, 3]] * (n // 4) + [[]] * (n // 4)
    return pa.table({"image_id": pa.array(np.arange(n), pa.int64()),
                     "category_id": pa.array(categories, pa.list_(pa.int32()))})


def test_counts_take_the_rarest_category_and_round_stochastically():
    table = _table()
    factors = {1: 1.0, 3: 2.5}
    counts = image_repeat_counts(table["category_id"], table["image_id"].to_numpy(), factors, seed=0, epoch=0)
    assert (counts[:1000] == 1).all() and (counts[1500:] == 1).all()
    rare = counts[1000:1500]
    assert set(rare.tolist()) == {2, 3}
    assert rare.mean() == pytest.approx(2.5, abs=0.1)


def test_deterministic_by_seed_and_epoch():
    table = _table()
    factors = {1: 1.0, 3: 2.5}
    a = repeat_rows(table, factors, seed=1, epoch=0)["image_id"].to_pylist()
    assert a == repeat_rows(table, factors, seed=1, epoch=0)["image_id"].to_pylist()
    assert a != repeat_rows(table, factors, seed=1, epoch=1)["image_id"].to_pylist()
    assert a != repeat_rows(table, factors, seed=2, epoch=0)["image_id"].to_pylist()
    assert sorted(set(a)) == list(range(2000)), "every image stays at least once"


def test_training_stream_repeats_rare_images(ray_local, tmp_path):
    from jobs import prepare
    from pipelines.datasets import detection_dataset
    from pipelines.synth import write_synth

    write_synth(str(tmp_path / "lt"), num_images=60, image_size=64, num_classes=4, long_tail=50, seed=5,
                progress=lambda line: None)
    assert prepare.main(["--images", str(tmp_path / "lt" / "images"), "--annotations",
                         str(tmp_path / "lt" / "annotations.json"), "--output", str(tmp_path / "shards")]) == 0
    plain, manifest = detection_dataset(str(tmp_path / "shards"), image_size=64, max_size=64, train=True)
    repeated, _ = detection_dataset(str(tmp_path / "shards"), image_size=64, max_size=64, train=True,
                                    repeat_factor_threshold=0.3)
    plain_ids = [int(i) for i in plain.select_columns(["image_id"]).to_pandas()["image_id"]]
    repeated_ids = [int(i) for i in repeated.select_columns(["image_id"]).to_pandas()["image_id"]]
    assert sorted(plain_ids) == sorted(set(plain_ids)) and len(plain_ids) == manifest.num_images - manifest.issues.get("corrupt_image", 0)
    assert set(repeated_ids) == set(plain_ids) and len(repeated_ids) > len(plain_ids)
