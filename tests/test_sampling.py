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
