"""Ray Data readers: shards (local and S3), COCO layout, custom image folders, into the collate."""
from __future__ import annotations

import io
import json
import uuid

import boto3
import numpy as np
import pytest
from PIL import Image

from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats.prepare import prepare
from pipelines.images.transforms import preprocess_images_batch
from pipelines.training.datasets import DetectionCollate, PixelCollate, detection_dataset, read_manifest

pytestmark = pytest.mark.slow

IMAGE_SIZE = 96  # synth images are 128 px: every box scales by 0.75


@pytest.fixture(scope="module")
def s3_shards(ray_local, s3_server, synth_coco) -> str:
    """The session's synthetic set prepared into 8 shards in a bucket of this module."""
    bucket = f"shards-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    prepare(str(synth_coco / "images"), str(synth_coco / "annotations.json"), f"s3://{bucket}/shards",
            images_per_shard=3, progress=lambda _: None)
    return f"s3://{bucket}/shards"


def expected_targets(synth_coco, scale: float) -> dict[int, tuple[np.ndarray, list[int]]]:
    coco = json.loads((synth_coco / "annotations.json").read_text())
    out = {im["id"]: ([], []) for im in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        out[a["image_id"]][0].append([x * scale, y * scale, (x + w) * scale, (y + h) * scale])
        out[a["image_id"]][1].append(a["category_id"] - 1)  # ids 1..K -> 0..K-1
    return {k: (np.array(b, np.float32).reshape(-1, 4), c) for k, (b, c) in out.items()}


def collect(ds, batch_size: int = 5) -> dict[int, dict]:
    """image_id -> that image's collated tensors; fails if an image comes twice."""
    seen = {}
    for batch in ds.iter_torch_batches(batch_size=batch_size, collate_fn=DetectionCollate()):
        assert batch["images"].shape[2] % 128 == 0 and batch["images"].shape[3] % 128 == 0
        for i, image_id in enumerate(batch["image_id"].tolist()):
            assert image_id not in seen
            n = int(batch["num_boxes"][i])
            assert (batch["labels"][i, n:] == -1).all()
            seen[image_id] = {"boxes": batch["boxes"][i, :n].numpy(), "labels": batch["labels"][i, :n].tolist(),
                              "size": batch["image_sizes"][i].tolist(), "orig": batch["original_sizes"][i].tolist(),
                              "scale": float(batch["scale"][i])}
    return seen


def assert_targets(seen, synth_coco) -> None:
    expected = expected_targets(synth_coco, IMAGE_SIZE / 128)
    assert sorted(seen) == sorted(expected)  # every image exactly once
    for image_id, got in seen.items():
        boxes, labels = expected[image_id]
        np.testing.assert_allclose(got["boxes"], boxes, atol=1e-4)
        assert got["labels"] == labels
        assert got["size"] == [IMAGE_SIZE, IMAGE_SIZE] and got["orig"] == [128, 128] and got["scale"] == 0.75


def test_shards_on_s3_stream_into_collate(s3_shards, synth_coco):
    ds, manifest = detection_dataset(s3_shards, image_size=IMAGE_SIZE, max_size=1333, train=False)
    assert manifest.num_images == 24 and len(manifest.shards) == 8
    assert [c["name"] for c in manifest.categories] == ["circle", "square", "triangle"]
    assert_targets(collect(ds), synth_coco)


def test_coco_layout_reads_directly(ray_local, synth_coco):
    ds, manifest = detection_dataset(str(synth_coco), image_size=IMAGE_SIZE, max_size=1333, train=False)
    assert manifest.num_images == 24 and manifest.category_ids == [1, 2, 3]
    assert_targets(collect(ds, batch_size=7), synth_coco)


def _epoch_rows(uri, epoch, **kwargs):
    """One training epoch's rows in the dataset's order: (image_id, copy) keys and boxes."""
    ds, _ = detection_dataset(uri, image_size=IMAGE_SIZE, max_size=1333, train=True, seed=3, epoch=epoch,
                              batch_size=4, **kwargs)
    rows = ds.select_columns(["image_id", "copy", "boxes"]).take_all()
    return [(r["image_id"], r["copy"]) for r in rows], {(r["image_id"], r["copy"]): r["boxes"] for r in rows}


def test_epochs_shuffle_images_one_by_one_reproducibly(s3_shards, synth_coco):
    order0, boxes0 = _epoch_rows(s3_shards, 0)
    again0, again_boxes0 = _epoch_rows(s3_shards, 0)
    order1, boxes1 = _epoch_rows(s3_shards, 1)
    assert order0 == again0 and boxes0 == again_boxes0  # reproducible from (seed, epoch)
    assert sorted(order0) == sorted(order1) == [(i, 0) for i in range(1, 25)]  # complete
    assert order0 != order1 and boxes0 != boxes1  # another epoch: new order, new flips
    # not only shard order (3 images per shard here): batches of 4 are new groups of images
    batches = [{frozenset(i for i, _ in order[k:k + 4]) for k in range(0, 24, 4)} for order in (order0, order1)]
    assert not batches[0] & batches[1], "no batch of epoch 0 comes again in epoch 1"
    shard_runs = sum(abs(a[0] - b[0]) == 1 for a, b in zip(order0, order0[1:]))
    assert shard_runs < 8, "neighbours in the stream are not neighbours in the shards"
    expected = expected_targets(synth_coco, IMAGE_SIZE / 128)
    flipped = 0
    for (image_id, _), data in boxes0.items():
        got, (plain, _) = np.frombuffer(data, np.float32).reshape(-1, 4), expected[image_id]
        mirrored = np.stack([IMAGE_SIZE - plain[:, 2], plain[:, 1], IMAGE_SIZE - plain[:, 0], plain[:, 3]], 1)
        assert np.allclose(got, plain, atol=1e-4) or np.allclose(got, mirrored, atol=1e-4)
        flipped += len(plain) > 0 and not np.allclose(got, plain, atol=1e-4)
    assert flipped > 0


def test_resumed_epoch_keeps_its_order_without_trained_rows(s3_shards):
    """What a resumed epoch streams: the same epoch's order, minus exactly the rows already trained."""
    from pipelines.training.sampling import sample_keys

    order, _ = _epoch_rows(s3_shards, 2)
    trained = np.array(order[:10])
    rest, _ = _epoch_rows(s3_shards, 2, exclude_keys=sample_keys(trained[:, 0], trained[:, 1]))
    assert rest == order[10:]


def _image_folder_rows(uri: str):
    """A folder of images read as jobs.infer reads it: the plan's units of URIs, each read."""
    import pyarrow as pa

    from pipelines.inference.plan import input_units
    from pipelines.inference.units import read_uris

    kind, units = input_units(uri, None, 100)
    assert kind == "images"
    return pa.concat_tables([read_uris(unit, 0, len(unit["uris"])) for unit in units])


def test_custom_image_folder_on_s3(s3_bucket):
    def jpeg(color, size=(40, 30)):
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, format="JPEG")
        return buf.getvalue()

    files = {"a.jpg": jpeg((255, 0, 0)), "sub/deeper/B.JPG": jpeg((0, 255, 0), (30, 60)),
             "sub/c.png": jpeg((0, 0, 255)), "sub/broken.jpeg": b"not really a jpeg", "notes.txt": b"skip me"}
    for name, data in files.items():
        storage.write_bytes_atomic(f"{s3_bucket}/in/{name}", data)
    table = _image_folder_rows(f"{s3_bucket}/in")
    rows = sorted(table.to_pylist(), key=lambda r: r["uri"])
    assert [r["uri"] for r in rows] == sorted(f"{s3_bucket}/in/{n}" for n in files if n != "notes.txt")
    for row in rows:
        assert row["image"] == files[row["uri"].split("/in/", 1)[1]]
        assert row["image_id"] is None and row["error"] is None

    decoded = preprocess_images_batch(table, min_size=30, max_size=100)
    assert PixelCollate(32)(decoded)["pixels"].shape[0] == 4
    errors = {u.rsplit("/", 1)[-1]: e for u, e in zip(decoded["uri"].to_pylist(), decoded["error"].to_pylist())}
    assert errors["broken.jpeg"].startswith("cannot decode") and errors["a.jpg"] is None
    columns = (decoded[c].to_pylist() for c in ("uri", "height", "width"))
    sizes = {u.rsplit("/", 1)[-1]: (h, w) for u, h, w in zip(*columns)}
    assert sizes["B.JPG"] == (60, 30)


def test_readers_name_the_fix_for_bad_uris(tmp_path, s3_server):
    with pytest.raises(UserError, match="no manifest; run `python -m jobs.prepare"):
        read_manifest(str(tmp_path))
    with pytest.raises(UserError, match="neither a shards folder"):
        detection_dataset(str(tmp_path), image_size=64, max_size=64, train=True)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(UserError, match="no .jpg/.jpeg/.png files"):
        _image_folder_rows(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        _image_folder_rows("s3://no-such-bucket-yy/images")


def _shard_rows(width: int, height: int, n: int = 6):
    import pyarrow as pa

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 100, 50)).save(buf, format="PNG")
    return pa.table({"image_id": pa.array(range(1, n + 1), pa.int64()), "image": pa.array([buf.getvalue()] * n),
                     "boxes": pa.array([[[1.0, 2.0, 30.0, 20.0]]] * n, pa.list_(pa.list_(pa.float32()))),
                     "category_id": pa.array([[1]] * n, pa.list_(pa.int32())),
                     "iscrowd": pa.array([[False]] * n, pa.list_(pa.bool_()))})


def test_scale_jitter_keeps_the_max_size_cap():
    """detectron2's ResizeShortestEdge: the jitter draws the shorter side; the longer side stays capped."""
    from pipelines.images.transforms import preprocess_batch

    rows = preprocess_batch(_shard_rows(400, 100, n=20), category_ids=[1], min_size=100, max_size=200, train=True,
                            scale_jitter=(0.8, 1.2))
    assert set(rows["width"].tolist()) == {200}, "a 4:1 image: the cap decides, whatever the jitter (was 160-240)"
    square = preprocess_batch(_shard_rows(100, 100, n=20), category_ids=[1], min_size=100, max_size=110, train=True,
                              scale_jitter=(0.8, 1.2))
    assert max(square["height"]) == 110 and min(square["height"]) < 100


def test_collate_uses_the_models_mean_and_std():
    from pipelines.images.transforms import preprocess_batch

    rows = preprocess_batch(_shard_rows(32, 32, n=2), category_ids=[1], min_size=32, max_size=32, train=False)
    default = DetectionCollate(32)(rows)["images"]
    own = DetectionCollate(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))(rows)["images"]
    expected = (np.array([200, 100, 50]) / 255 - 0.5) / np.array([0.5, 0.25, 1.0])
    np.testing.assert_allclose(own[0, :, 5, 5].numpy(), expected, rtol=1e-5)
    assert not np.allclose(default[0, :, 5, 5].numpy(), expected)


def test_training_decode_honours_the_pixel_limit_and_the_flag_reaches_it():
    """jobs.train shares --max-pixels with prepare and infer: a PNG above it is dropped, not decoded."""
    import pyarrow as pa

    from jobs import train
    from pipelines.images.pixel_limit import DEFAULT_MAX_PIXELS
    from pipelines.images.transforms import preprocess_batch

    rows = pa.concat_tables([_shard_rows(64, 64, n=2), _shard_rows(16, 16, n=2)])
    kept = preprocess_batch(rows, category_ids=[1], min_size=16, max_size=64, train=False, max_pixels=1000)
    assert kept["orig_width"].tolist() == [16, 16], "the 64x64 PNGs (4096 px) are above a 1000-pixel limit"
    assert len(preprocess_batch(rows, category_ids=[1], min_size=16, max_size=64, train=False)["pixels"]) == 4
    assert train.resolve_options(["--data", "d", "--output", "o", "--max-pixels", "1000"]).max_pixels == 1000
    assert train.resolve_options(["--data", "d", "--output", "o"]).max_pixels == DEFAULT_MAX_PIXELS


def test_training_workers_reserve_the_cpus_of_their_step():
    """Decode tasks take only unreserved CPUs: a GPU worker keeps 2 by default (Ray's default is 0)."""
    from jobs import train

    def resources(*flags):
        return train.resolve_options(["--data", "d", "--output", "o", *flags]).worker_resources()

    assert resources() == {"CPU": 1}
    assert resources("--use-gpu") == {"CPU": 2}
    assert resources("--use-gpu", "--cpus-per-worker", "6") == {"CPU": 6}
    assert resources("--use-gpu", "--cpus-per-worker", "0") == {"CPU": 0}
    with pytest.raises(SystemExit):
        resources("--cpus-per-worker", "-1")
