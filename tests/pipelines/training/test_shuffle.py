"""The training epoch's two-level shuffle: units of shards permuted, windows permuted inside,
nothing all-to-all; complete, reproducible, resumable, and exact about which rows it reads."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.formats.prepare import prepare
from pipelines.formats.shards import read_manifest, shard_uris
from pipelines.training.datasets import detection_dataset
from pipelines.training.sampling import sample_keys
from pipelines.training.shuffle import UNIT_ROWS, EpochOrder, read_rows

pytestmark = pytest.mark.slow


def test_units_cover_every_row_once_in_a_seeded_order_and_windows_hold_their_bytes():
    rows, sizes = (130, 0, 64, 5), (1300, 0, 6400, 50)  # 10, -, 100, 10 bytes per row
    order = EpochOrder(("a", "b", "c", "d"), rows, sizes, seed=1, window_bytes=1000)
    units = order.units()
    covered = sorted((s, r) for s, start, end in units.tolist() for r in range(start, end))
    assert covered == [(s, r) for s, n in enumerate(rows) for r in range(n)]
    assert sorted(map(tuple, units.tolist())) == [(0, 0, 64), (0, 64, 128), (0, 128, 130), (2, 0, 64), (3, 0, 5)]
    assert np.array_equal(units, EpochOrder(("a", "b", "c", "d"), rows, sizes, seed=1).units())
    assert any(not np.array_equal(units, EpochOrder(("a", "b", "c", "d"), rows, sizes, seed=s).units())
               for s in range(2, 6))
    bounds = order.window_bounds(units)
    per_row = np.array([10, 0, 100, 10])
    unit_bytes = [(e - s) * per_row[k] for k, s, e in units.tolist()]
    window_bytes = [sum(unit_bytes[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == len(units) and np.all(np.diff(bounds) > 0)
    # less than window_bytes before a window's last unit: at most one unit more than the limit
    assert all(sum(unit_bytes[a:b - 1]) < 1000 for a, b in zip(bounds, bounds[1:]))
    assert max(window_bytes) <= order.max_window_bytes() <= 1000 + 64 * 100
    assert sum(window_bytes) == 1300 + 6400 + 50


def test_read_rows_takes_ranges_across_irregular_row_groups(tmp_path):
    path = tmp_path / "shard.parquet"
    with pq.ParquetWriter(path, pa.schema([("image_id", pa.int64())])) as writer:
        for start in range(0, 150, 50):  # row groups of 50, not of UNIT_ROWS
            writer.write_table(pa.table({"image_id": pa.array(range(start, start + 50), pa.int64())}))
    ranges = np.array([[128, 150], [0, UNIT_ROWS], [64, 70]])
    got = read_rows(str(path), ranges, ["image_id"])["image_id"].to_pylist()
    assert got == [*range(128, 150), *range(0, 64), *range(64, 70)]
    with pytest.raises(ValueError, match="manifest"):
        read_rows(str(path), np.array([[140, 160]]), ["image_id"])


@pytest.fixture(scope="module")
def small_shards(ray_local, synth_coco, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shuffle") / "shards"
    prepare(str(synth_coco / "images"), str(synth_coco / "annotations.json"), str(out), images_per_shard=3,
            progress=lambda _: None)
    return str(out)


def _epoch(uri, window_bytes, epoch=0, exclude_keys=None):
    ds, _ = detection_dataset(uri, image_size=64, max_size=64, train=True, seed=5, epoch=epoch, batch_size=4,
                              shuffle_window_bytes=window_bytes, exclude_keys=exclude_keys)
    ds = ds.select_columns(["image_id", "copy"])
    rows = ds.take_all()
    return [(r["image_id"], r["copy"]) for r in rows], ds.stats()


def test_epoch_streams_window_by_window_without_an_all_to_all(small_shards):
    manifest = read_manifest(small_shards)
    uris = shard_uris(small_shards, manifest)
    window = sum(s["num_bytes"] for s in manifest.shards) // 3
    from pipelines.training.datasets import epoch_seed

    order = EpochOrder.of_shards(uris, manifest.shards, epoch_seed(5, 0), window)
    units = order.units()
    bounds = order.window_bounds(units)
    assert len(bounds) - 1 >= 3
    ids = [pq.read_table(u, columns=["image_id"])["image_id"].to_pylist() for u in uris]

    rows, stats = _epoch(small_shards, window)
    again, _ = _epoch(small_shards, window)
    other, _ = _epoch(small_shards, window, epoch=1)
    assert rows == again and rows != other
    assert sorted(rows) == sorted((i, 0) for shard in ids for i in shard)
    position = 0
    for a, b in zip(bounds, bounds[1:]):  # each window's images, in a permuted order of their own
        expected = sorted(i for s, start, end in units[a:b].tolist() for i in ids[s][start:end])
        assert sorted(i for i, _ in rows[position:position + len(expected)]) == expected
        position += len(expected)
    assert "read_window" in stats and "Shuffle" not in stats, stats

    trained = np.array(rows[:10])  # a resumed epoch: the same order without the trained rows
    rest, _ = _epoch(small_shards, window, exclude_keys=sample_keys(trained[:, 0], trained[:, 1]))
    assert rest == rows[10:]
