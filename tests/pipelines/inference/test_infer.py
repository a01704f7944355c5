"""jobs.infer end to end on local Ray (the session's, 4 CPUs) with real images, on moto S3 and local disk.

Every run uses --image-size 64, so every resized image fits one 128x128 canvas: detections then
do not depend on which images share a batch (GroupNorm sees the same padding), and images with
equal pixels must get equal detections whatever their encoding.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import retinanet
from jobs import infer
from jobs.cli import run
from pipelines import storage
from pipelines.inference import predictions
from pipelines.inference.plan import PLAN_FILE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]


# ------------------------------------------------------------------------------------ helpers
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def scene(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random picture (JPEG-friendly, no score ties between anchors)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def tiny_checkpoint(path: Path, categories=CATEGORIES, logit_bias: float = 0.0) -> Path:
    """An untrained tiny model whose class logits start at `logit_bias` (0: scores ~0.5, so detections)."""
    torch.manual_seed(0)
    model = retinanet.build("tiny", categories=categories)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(logit_bias)
    path.write_bytes(retinanet.checkpoint_bytes(model, step=7))
    return path


def put(uri: str, data: bytes) -> None:
    storage.write_bytes_atomic(uri, data)


def parts_of(uri: str) -> list[str]:
    """The part files of an output (not the plan files beside them)."""
    storage.resolve(uri).fs.invalidate_cache()  # another process may have written them
    return [f for f in storage.list_files(uri, suffixes=[".parquet"]) if predictions.unit_of(f) is not None]


def read_output(uri: str) -> pa.Table:
    files = parts_of(uri)
    return pa.concat_tables([predictions.read_part(f) for f in files])


def by_uri(table: pa.Table) -> dict[str, dict]:
    return {row["uri"]: row for row in table.to_pylist()}


def exit_code(argv) -> int:
    with pytest.raises(SystemExit) as info:
        run(infer.main, argv)
    return info.value.code


def same_detections(a: list[dict], b: list[dict]) -> bool:
    key = lambda d: (d["x1"], d["y1"], d["x2"], d["y2"], d["score"], d["category_id"])  # noqa: E731
    return len(a) > 0 and [key(d) for d in a] == [key(d) for d in b]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


# -------------------------------------------------------------- every kind of file, on moto S3
BAD = ("bad/corrupt.jpg", "bad/truncated.jpg", "bad/zero.png", "bad/not-an-image.jpg")


def write_inputs(prefix: str) -> dict[str, tuple[int, int]]:
    """Good images of every kind and the bad ones; returns {uri: (width, height) as displayed}."""
    sizes = {}

    def add(name, data, wh):
        put(f"{prefix}/{name}", data)
        sizes[f"{prefix}/{name}"] = wh

    for i, (h, w) in enumerate([(96, 128), (80, 120), (64, 64), (128, 96)]):
        add(f"good/rgb-{i}.jpg", encode(Image.fromarray(scene(h, w, i)), "JPEG", quality=90), (w, h))
    gray = scene(72, 100, 10)[:, :, 0]
    add("modes/gray.png", encode(Image.fromarray(gray, "L"), "PNG"), (100, 72))
    add("modes/gray16.png", encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), (100, 72))
    add("modes/gray-as-rgb.png", encode(Image.fromarray(np.repeat(gray[:, :, None], 3, 2)), "PNG"), (100, 72))
    add("modes/cmyk.jpg", encode(Image.fromarray(scene(60, 90, 11)).convert("CMYK"), "JPEG"), (90, 60))
    rgba = np.dstack([scene(70, 70, 12), np.full((70, 70), 128, np.uint8)])
    add("modes/rgba.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"), (70, 70))
    stored = scene(48, 80, 13)  # landscape as stored; EXIF 6 = "rotate 90 clockwise to display"
    exif = Image.Exif()
    exif[0x0112] = 6
    add("exif/rotated.png", encode(Image.fromarray(stored), "PNG", exif=exif.tobytes()), (48, 80))
    add("exif/upright.png", encode(Image.fromarray(np.ascontiguousarray(np.rot90(stored, -1))), "PNG"), (48, 80))
    add("huge/10000.jpg", encode(Image.new("RGB", (10000, 10000), (120, 60, 30)), "JPEG", quality=50), (10000, 10000))
    add("huge/10000.png", encode(Image.new("RGB", (10000, 10000), (30, 60, 120)), "PNG", compress_level=1),
        (10000, 10000))
    jpeg = encode(Image.fromarray(scene(96, 128, 20)), "JPEG")
    for name, data in zip(BAD, (jpeg[:20] + os.urandom(2000), jpeg[: len(jpeg) // 2], b"", b"just some text\n")):
        add(name, data, None)
    put(f"{prefix}/notes.txt", b"not an input: wrong suffix")
    return sizes


@pytest.fixture(scope="module")
def s3_run(ray_local, s3_server, checkpoint, tmp_path_factory):
    import boto3

    bucket = f"infer-{os.getpid()}-{int(time.time())}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    sizes = write_inputs(f"s3://{bucket}/in")
    put(f"s3://{bucket}/model.pt", checkpoint.read_bytes())
    argv = ["--model", f"s3://{bucket}/model.pt", "--input", f"s3://{bucket}/in", "--output", f"s3://{bucket}/out",
            "--num-actors", "2", "--batch-size", "4", "--unit-size", "4", "--image-size", "64"]
    return {"argv": argv, "sizes": sizes, "input": f"s3://{bucket}/in/", "output": f"s3://{bucket}/out"}


def test_one_row_per_input_errors_only_on_bad_files(s3_run, capsys):
    assert infer.main(s3_run["argv"]) == 0
    summary = capsys.readouterr().out
    assert "done: 17 images (5 errors)" in summary and s3_run["output"] in summary
    storage.resolve(s3_run["output"]).fs.invalidate_cache()  # the workers wrote the parts
    files = [f for f in storage.list_files(s3_run["output"]) if "/_infer_units-" not in f]
    assert [f.rsplit("/", 1)[1] for f in files] == [PLAN_FILE] + [predictions.part_name(u) for u in range(5)]
    assert all(pq.read_schema(io.BytesIO(storage.read_bytes(f))) == predictions.PREDICTIONS_SCHEMA
               for f in files[1:])
    table = read_output(s3_run["output"])
    rows = by_uri(table)
    assert table.num_rows == len(rows) == len(s3_run["sizes"]) == 17  # each input once, notes.txt not an input
    assert set(rows) == set(s3_run["sizes"])
    failed = {u for u, r in rows.items() if r["error"] is not None}
    # A 100-megapixel PNG is above the default pixel limit: refused naming its size, never decoded.
    huge_png = s3_run["input"] + "huge/10000.png"
    assert failed == {s3_run["input"] + name for name in BAD} | {huge_png}
    assert "10000x10000 = 100.0 megapixels, above the pixel limit" in rows[huge_png]["error"]
    failed.discard(huge_png)
    assert "empty file" in rows[s3_run["input"] + "bad/zero.png"]["error"]
    assert "truncated" in rows[s3_run["input"] + "bad/truncated.jpg"]["error"]
    assert all(rows[u]["error"].startswith("cannot decode: ") for u in failed)
    for uri, row in rows.items():
        assert row["image_id"] is None and row["model"].startswith(s3_run["argv"][1] + "@sha256:")
        if uri in failed or uri == huge_png:
            assert row["detections"] is None and row["width"] is None and row["height"] is None
            continue
        assert (row["width"], row["height"]) == s3_run["sizes"][uri], uri
        dets = row["detections"]
        assert 0 < len(dets) <= 100, uri
        boxes = np.array([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in dets])
        assert ((boxes >= 0).all() and (boxes[:, [0, 2]] <= row["width"]).all()
                and (boxes[:, [1, 3]] <= row["height"]).all())
        assert all(d["score"] >= 0.05 and {"id": d["category_id"], "name": d["category"]} in CATEGORIES for d in dets)
        assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    prefix = s3_run["input"]
    # One picture, three encodings (8-bit gray, 16-bit gray, RGB): one set of detections.
    assert same_detections(rows[prefix + "modes/gray.png"]["detections"],
                           rows[prefix + "modes/gray16.png"]["detections"])
    assert same_detections(rows[prefix + "modes/gray.png"]["detections"],
                           rows[prefix + "modes/gray-as-rgb.png"]["detections"])
    # EXIF orientation applied: the rotated file is detected exactly like its upright twin.
    assert same_detections(rows[prefix + "exif/rotated.png"]["detections"],
                           rows[prefix + "exif/upright.png"]["detections"])
    # A 10000 x 10000 JPEG (drafted): boxes back in its own pixels, far beyond the 64 px it was detected at.
    assert max(d["x2"] for d in rows[prefix + "huge/10000.jpg"]["detections"]) > 1000


def test_rerun_skips_finished_parts_and_refuses_other_settings(s3_run, capsys):
    storage.resolve(s3_run["output"]).fs.invalidate_cache()
    before = {f: storage.resolve(f).fs.info(storage.resolve(f).path)["ETag"]
              for f in storage.list_files(s3_run["output"])}
    assert any("/_infer_units-" in f for f in before)
    assert infer.main(s3_run["argv"]) == 0
    assert "0 to run" in capsys.readouterr().out
    storage.resolve(s3_run["output"]).fs.invalidate_cache()
    after = {f: storage.resolve(f).fs.info(storage.resolve(f).path)["ETag"]
             for f in storage.list_files(s3_run["output"])}
    assert after == before
    assert exit_code(s3_run["argv"] + ["--score-threshold", "0.3"]) == 2
    assert "score_thresh" in capsys.readouterr().err


# --------------------------------------------------------------------- kill the driver, rerun
def test_sigkill_mid_run_then_rerun_is_exactly_once_on_s3(ray_local, s3_server, checkpoint, tmp_path):
    import boto3

    bucket = f"kill-{os.getpid()}-{int(time.time())}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    inputs = [f"s3://{bucket}/in/{i:02d}.jpg" for i in range(24)]
    for i, uri in enumerate(inputs):
        put(uri, encode(Image.fromarray(scene(48, 64, 100 + i)), "JPEG"))
    argv = ["--model", str(checkpoint), "--input", f"s3://{bucket}/in", "--output", f"s3://{bucket}/out",
            "--num-actors", "1", "--batch-size", "2", "--unit-size", "2", "--image-size", "64"]
    # The driver joins the session's Ray as a second job (as `ray job submit` would run it).
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    log = (tmp_path / "driver.log").open("wb")
    driver = subprocess.Popen([sys.executable, "-m", "jobs.infer", *argv, "--debug-sleep", "0.5"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    def parts():
        storage.resolve(f"s3://{bucket}").fs.invalidate_cache()  # another process writes them
        return parts_of(f"s3://{bucket}/out") if storage.exists(f"s3://{bucket}/out") else []

    try:
        deadline = time.monotonic() + 240
        while not parts() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)  # Ray ends a dead driver's tasks and actors
        driver.wait(timeout=30)
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # anything of that session still alive
    survivors = {f: storage.resolve(f).fs.info(storage.resolve(f).path)["ETag"] for f in parts()}
    assert 0 < len(survivors) < 12

    assert infer.main(argv) == 0
    table = read_output(f"s3://{bucket}/out")
    assert table.num_rows == 24 and sorted(table["uri"].to_pylist()) == inputs  # none twice, none missing
    assert table["error"].null_count == 24
    assert len(parts()) == 12
    assert all(storage.resolve(f).fs.info(storage.resolve(f).path)["ETag"] == etag for f, etag in survivors.items())


# ------------------------------------------------------------- torchvision weights vs predict
def test_torchvision_state_dict_file_matches_predict(tmp_path):
    """The job's own stages (load_model, decode_units, Detector; Ray only carries their rows) give
    `retinanet.predict`'s boxes in original pixels: at scale 1 directly, and for an image twice
    the size as predict on the same PIL-resized pixels, scaled by 2."""
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.models.detection import retinanet_resnet50_fpn

    from pipelines.inference.detector import Detector
    from pipelines.inference.units import decoded_chunks

    torch.manual_seed(1)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5).eval()
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.fill_(-1.0)  # scores ~0.27: detections pass 0.05
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    pictures = {"a.png": scene(96, 128, 1), "b.png": scene(96, 128, 2), "double.png": scene(192, 256, 3)}
    for name, pixels in pictures.items():
        Image.fromarray(pixels).save(tmp_path / name)
    _, _, checkpoint, identity = infer.load_model(str(tmp_path / "tv.pt"))
    spec = {"unit": 0, "uris": [str(tmp_path / n) for n in pictures], "image_ids": None}
    with ThreadPoolExecutor(2) as pool:
        decoded = pa.concat_tables(decoded_chunks(spec, 2, pool, 1, min_size=96, max_size=160))
    rows = by_uri(Detector(checkpoint, model_name=identity, max_detections=100)(decoded))

    model = retinanet.from_torchvision(str(tmp_path / "tv.pt"))
    model.config = model.config.replace(detections_per_img=100)  # jobs.infer's --max-detections default
    half = np.asarray(Image.fromarray(pictures["double.png"]).resize((128, 96), Image.Resampling.BILINEAR))
    inputs = [torch.from_numpy(p.copy()).permute(2, 0, 1) for p in (pictures["a.png"], pictures["b.png"], half)]
    expected = model.predict(inputs, min_size=96, max_size=160)
    for name, want, factor in zip(pictures, expected, (1, 1, 2)):
        row = rows[str(tmp_path / name)]
        assert (row["width"], row["height"], row["model"]) == (128 * factor, 96 * factor, identity)
        got = row["detections"]
        assert len(got) == len(want["scores"]) > 10, name
        boxes = np.array([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in got])
        np.testing.assert_allclose(boxes, want["boxes"].double().numpy() * factor, atol=1e-3)
        np.testing.assert_allclose([d["score"] for d in got], want["scores"].numpy(), atol=1e-5)
        assert [d["category_id"] for d in got] == want["labels"].tolist()


# ------------------------------------------------- shards in, COCO json and DuckDB out, evaluate
@pytest.fixture(scope="module")
def shards_run(ray_local, synth_coco, tmp_path_factory):
    from pipelines.formats.prepare import prepare

    root = tmp_path_factory.mktemp("shards_run")
    manifest = prepare(str(synth_coco / "images"), str(synth_coco / "annotations.json"), str(root / "shards"),
                       images_per_shard=10, progress=lambda _: None)
    model = tiny_checkpoint(root / "model.pt", categories=manifest.categories)
    assert infer.main(["--model", str(model), "--input", str(root / "shards"), "--output", str(root / "out"),
                       "--num-actors", "1", "--batch-size", "4", "--unit-size", "4", "--image-size", "64",
                       "--coco-json", str(root / "results.json")]) == 0
    return root


def test_shards_input_keeps_image_ids_and_writes_coco_json(shards_run, synth_coco):
    from pycocotools.coco import COCO

    gt = json.loads((synth_coco / "annotations.json").read_text())
    table = read_output(str(shards_run / "out"))
    # 3 shards of 10, 10, 4 images in units of 4 -> 3 + 3 + 1 parts
    parts = sorted(p.name for p in (shards_run / "out").glob("*.parquet"))
    assert parts == [predictions.part_name(u) for u in range(7)]
    assert sorted(table["image_id"].to_pylist()) == sorted(im["id"] for im in gt["images"])
    assert table["error"].null_count == table.num_rows
    names = {im["id"]: im["file_name"] for im in gt["images"]}
    assert all(r["uri"].endswith("/images/" + names[r["image_id"]])
               for r in table.select(["uri", "image_id"]).to_pylist())
    flat = pc.list_flatten(table["detections"])
    assert set(pc.struct_field(flat, "category_id").to_pylist()) <= {c["id"] for c in gt["categories"]}

    results = json.loads((shards_run / "results.json").read_text())
    assert len(results) == len(flat)  # at most 100 per image were kept, COCO keeps 100
    with __import__("contextlib").redirect_stdout(io.StringIO()):
        loaded = COCO(str(synth_coco / "annotations.json")).loadRes(results)
    first = table.filter(pc.equal(table["image_id"], results[0]["image_id"]))["detections"][0][0].as_py()
    assert results[0]["bbox"] == [first["x1"], first["y1"], first["x2"] - first["x1"], first["y2"] - first["y1"]]
    assert len(loaded.getAnnIds()) == len(results)


def test_evaluate_scores_the_output(shards_run, synth_coco, capsys):
    from jobs import evaluate

    argv = ["--predictions", str(shards_run / "out"), "--annotations", str(synth_coco / "annotations.json")]
    assert evaluate.main(argv) == 0
    assert "24 prediction rows" in capsys.readouterr().out


README_PER_CATEGORY = """
SELECT d.category, count(*) AS detections, count(DISTINCT uri) AS images
FROM (SELECT uri, unnest(detections) AS d FROM read_parquet('{out}/*.parquet'))
WHERE d.score >= {score}
GROUP BY d.category ORDER BY detections DESC, d.category
"""
README_NO_DETECTION = """
SELECT uri, error FROM read_parquet('{out}/*.parquet')
WHERE error IS NOT NULL OR len(list_filter(detections, lambda d: d.score >= {score})) = 0
ORDER BY uri
"""


def test_readme_duckdb_queries_on_a_real_output(shards_run):
    import duckdb

    table = read_output(str(shards_run / "out"))
    flat = pc.list_flatten(table["detections"])
    scores = pc.struct_field(flat, "score").to_numpy()
    score = float(np.round(np.quantile(scores, 0.995), 4))  # some images have none above it
    out = str(shards_run / "out")
    per_category = duckdb.sql(README_PER_CATEGORY.format(out=out, score=score)).fetchall()
    cats = np.array(pc.struct_field(flat, "category").to_pylist())
    rows = pc.list_parent_indices(table["detections"]).to_numpy()
    keep = scores >= np.float32(score)
    expected = {c: (int((cats[keep] == c).sum()), len(set(rows[keep & (cats == c)]))) for c in set(cats[keep])}
    assert {c: (n, m) for c, n, m in per_category} == expected and expected
    none = duckdb.sql(README_NO_DETECTION.format(out=out, score=score)).fetchall()
    assert 0 < len(none) == table.num_rows - len(set(rows[keep])) < table.num_rows


# --------------------------------------------------------------------------------- user errors
def test_user_errors_exit_2_before_ray_starts(checkpoint, tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(scene(32, 32, 0)).save(images / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    good = ["--input", str(images), "--output", str(tmp_path / "out")]
    cases = [
        ["--model", str(tmp_path / "missing.pt"), *good],
        ["--model", str(tmp_path / "junk.pt"), *good],
        ["--model", "torchvision:resnet9000", *good],
        ["--model", str(checkpoint), "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out")],
        ["--model", str(checkpoint), "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")],
        ["--model", str(checkpoint), *good, "--coco-json", str(tmp_path / "r.json")],
        ["--model", str(checkpoint), *good, "--batch-size", "0"],
        ["--model", str(checkpoint), *good, "--num-actors", "3:2"],
        ["--model", str(checkpoint), *good, "--num-actors", "2", "--max-actors", "3"],
        ["--model", str(checkpoint), *good, "--min-actors", "4", "--max-actors", "3"],
        ["--model", str(checkpoint), *good, "--num-actors", "two"],
        ["--model", str(checkpoint), *good, "--max-error-fraction", "1.5"],
    ]
    for argv in cases:
        assert exit_code(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
    # No internet (forced: every request goes to a closed port): a clear line, not a traceback.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    assert exit_code(["--model", "torchvision:retinanet_resnet50_fpn_v2", *good]) == 2
    assert "cannot download" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- real images
def test_coco128_gives_128_rows_with_their_sizes(ray_local, shared_data, checkpoint, tmp_path):
    coco = json.loads((shared_data / "coco128/annotations/instances_train2017.json").read_text())
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in coco["images"]}
    assert infer.main(["--model", str(checkpoint), "--input", str(shared_data / "coco128/train2017"),
                       "--output", str(tmp_path / "out"), "--num-actors", "1", "--batch-size", "16",
                       "--unit-size", "64", "--image-size", "64"]) == 0
    table = read_output(str(tmp_path / "out"))
    assert table.num_rows == 128 and table["error"].null_count == 128
    assert {Path(r["uri"]).name: (r["width"], r["height"]) for r in table.to_pylist()} == sizes
