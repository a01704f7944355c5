"""Repeat-factor sampling (LVIS): factors, per-image counts, determinism."""
import numpy as np
import pyarrow as pa
import pytest

from pipelines.training.sampling import category_repeat_factors, epoch_sizes, image_repeat_counts, repeat_rows

pytestmark = pytest.mark.slow


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


def test_epoch_sizes_are_what_repeat_rows_yields():
    table = _table()
    factors = {1: 1.0, 3: 2.5}
    lists = table["category_id"].combine_chunks()
    pairs = np.stack([pa.compute.list_flatten(lists).to_numpy().astype(np.int64),
                      table["image_id"].to_numpy()[pa.compute.list_parent_indices(lists).to_numpy()]], axis=1)
    sizes = epoch_sizes(pairs, table.num_rows, factors, seed=3, epochs=range(4))
    assert sizes.tolist() == [repeat_rows(table, factors, seed=3, epoch=e).num_rows for e in range(4)]
    assert len(set(sizes.tolist())) > 1, "each epoch draws its own coins"


@pytest.fixture(scope="module")
def long_tail_shards(ray_local, tmp_path_factory):
    from jobs import prepare
    from pipelines.formats.synth import write_synth

    root = tmp_path_factory.mktemp("long_tail")
    write_synth(str(root / "lt"), num_images=60, image_size=64, num_classes=4, long_tail=50, seed=5,
                progress=lambda line: None)
    assert prepare.main(["--images", str(root / "lt" / "images"), "--annotations",
                         str(root / "lt" / "annotations.json"), "--output", str(root / "shards")]) == 0
    return str(root / "shards")


def test_training_stream_repeats_rare_images(long_tail_shards):
    from pipelines.formats.annotations import category_image_pairs, train_image_counts
    from pipelines.training.datasets import detection_dataset

    plain, manifest = detection_dataset(long_tail_shards, image_size=64, max_size=64, train=True)
    plain_ids = [int(i) for i in plain.select_columns(["image_id"]).to_pandas()["image_id"]]
    assert sorted(plain_ids) == sorted(set(plain_ids)) and len(plain_ids) == manifest.num_images
    factors = category_repeat_factors(train_image_counts(long_tail_shards), manifest.num_images, 0.3)
    planned = epoch_sizes(category_image_pairs(long_tail_shards), manifest.num_images, factors, 0, range(2))
    epochs = []
    for epoch in range(2):
        repeated, _ = detection_dataset(long_tail_shards, image_size=64, max_size=64, train=True, epoch=epoch,
                                        repeat_factor_threshold=0.3)
        rows = repeated.select_columns(["image_id", "copy", "boxes"]).take_all()
        epochs.append(rows)
        ids = [r["image_id"] for r in rows]
        assert set(ids) == set(plain_ids) and len(ids) == planned[epoch] > len(plain_ids)  # as jobs.train plans it
        assert len({(r["image_id"], r["copy"]) for r in rows}) == len(rows), "each copy has its own key"
    assert [r["image_id"] for r in epochs[0]] != [r["image_id"] for r in epochs[1]]
    # copies are spread over the epoch, each with its own flip
    rows = epochs[0]
    positions = {}
    for position, r in enumerate(rows):
        positions.setdefault(r["image_id"], []).append(position)
    gaps = [b - a for p in positions.values() if len(p) > 1 for a, b in zip(p, p[1:])]
    assert len(gaps) >= 5 and np.median(gaps) > len(rows) / 10, (gaps, len(rows))
    assert sum(g == 1 for g in gaps) <= len(gaps) // 5, "copies do not sit next to each other"
    boxes = {}
    for r in rows:
        boxes.setdefault(r["image_id"], set()).add(r["boxes"])
    assert sum(len(b) > 1 for i, b in boxes.items() if len(positions[i]) > 1) > 0, "copies differ in flip"


def test_seesaw_training_with_repeat_factor_sampling(long_tail_shards, tmp_path):
    """jobs.train plans its epochs from the repeated stream and keeps Seesaw's class counts."""
    import json

    import retinanet
    from jobs import train
    from pipelines.formats.annotations import category_image_pairs, train_image_counts

    output = tmp_path / "run"
    assert train.main(["--data", long_tail_shards, "--output", str(output), "--cls-loss", "seesaw",
                       "--repeat-factor-threshold", "0.3", "--epochs", "2", "--num-workers", "1",
                       "--batch-size", "8", "--image-size", "64", "--log-every", "100", "--logger", "none"]) == 0
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    epoch_ends = [m for m in metrics if m.get("event") == "epoch_end"]
    factors = category_repeat_factors(train_image_counts(long_tail_shards), 60, 0.3)
    planned = epoch_sizes(category_image_pairs(long_tail_shards), 60, factors, 0, range(2))
    assert [m["epoch"] for m in epoch_ends] == [0, 1]
    assert [m["planned_images"] for m in epoch_ends] == planned.tolist()
    assert [m["step"] for m in epoch_ends] == np.cumsum(planned // 8).tolist()
    assert epoch_ends[0]["step"] > 60 // 8, "epochs hold the repeated images"
    model, _ = retinanet.load_checkpoint(str(output / "model.pt"))
    assert model.config.cls_loss == "seesaw" and float(model.class_counts.sum()) > 0
