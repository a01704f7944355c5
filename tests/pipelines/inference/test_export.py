"""Exported networks and the runtimes that run them: ONNX export, ONNX Runtime, OpenVINO, bf16.

The exported graph must give the eager model's outputs for any batch and image size, under every
fp32 runtime the same detections as torch fp32 on real photos (COCO128 where ../shared/data is
present), in bf16 the same COCO AP within 0.005 and in int8 at most 0.01 less, scored by
pycocotools on a trained model.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import retinanet
from jobs import export as export_job
from jobs import infer
from jobs.cli import run
from pipelines.images.transforms import preprocess_images_batch
from pipelines.inference import runtimes
from pipelines.inference.detector import Detector
from retinanet.export import export_onnx, read_metadata
from retinanet.postprocess import feature_grid_sizes

pytestmark = pytest.mark.slow

FP32_RUNTIMES = ("onnxruntime", "openvino")
TRAIN_SIZE, TRAIN_STEPS = 64, 120
# fp32 runtimes against torch fp32: the same network in another kernel order (outputs agree to
# ~1e-5), so boxes agree to well under a hundredth of a pixel and scores to 1e-4.
BOX_ATOL, SCORE_ATOL = 1e-2, 1e-4
needs_bf16 = pytest.mark.skipif(not runtimes.cpu_has_bf16(), reason="this CPU has no bf16 instructions")


def exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as info:
        run(main, argv)
    return info.value.code


def photos(shared: Path | None, count: int) -> list[bytes]:
    """COCO128 photos where the shared data is there, else generated scenes of mixed sizes."""
    folder = shared / "coco128" / "train2017" if shared else None
    if folder and folder.is_dir():
        return [p.read_bytes() for p in sorted(folder.glob("*.jpg"))[:count]]
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        small = rng.integers(0, 256, (12 + i, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((160 + 16 * i, 120), Image.Resampling.BILINEAR).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def decoded(images: list[bytes], size: int) -> pa.Table:
    table = pa.table({"uri": [str(i) for i in range(len(images))], "image": pa.array(images, pa.binary())})
    return preprocess_images_batch(table, min_size=size, max_size=round(size * 1333 / 800))


def detect_all(detector: Detector, rows: pa.Table, batch: int) -> list[dict]:
    out = []
    for start in range(0, rows.num_rows, batch):
        part = rows.slice(start, batch)
        heights, widths = (part[c].to_numpy().astype(np.int64) for c in ("height", "width"))
        out += detector.detect(part["pixels"], heights, widths)
    return out


def assert_same_detections(got: list[dict], want: list[dict], share: float = 0.99) -> None:
    """Per image: as many detections, and at least `share` of torch's each with a partner of the
    same label within BOX_ATOL px and SCORE_ATOL. Order-free, and a share rather than all: among
    hundreds of detections of nearly equal score, a rounding difference can swap two ranks at the
    per-image cut or in NMS, replacing one detection by its neighbour."""
    assert sum(len(w["scores"]) for w in want) > 0, "nothing to compare"
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g["scores"]) == len(w["scores"]), i
        if not len(w["scores"]):
            continue
        close = (((w["boxes"][:, None] - g["boxes"][None]).abs().amax(-1) <= BOX_ATOL)
                 & ((w["scores"][:, None] - g["scores"][None]).abs() <= SCORE_ATOL)
                 & (w["labels"][:, None] == g["labels"][None]))
        matched = float(close.any(1).float().mean())
        assert matched >= share, (i, matched)


# ---------------------------------------------------------------------------------- fixtures
def train_tiny(root: Path) -> Path:
    """The tiny preset trained in-process on synthetic shapes (TRAIN_STEPS steps of 8 at 64 px)."""
    from pipelines.formats.synth import write_synth

    write_synth(str(root / "train"), num_images=TRAIN_STEPS * 8, image_size=TRAIN_SIZE, num_classes=3, seed=1,
                progress=lambda _: None)
    gt = json.loads((root / "train" / "annotations.json").read_text())
    categories = [{"id": c["id"], "name": c["name"]} for c in gt["categories"]]
    label = {c["id"]: i for i, c in enumerate(categories)}
    boxes: dict[int, list] = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        boxes[a["image_id"]].append((x, y, x + w, y + h, label[a["category_id"]]))
    torch.manual_seed(0)
    model = retinanet.build("tiny", categories=categories, min_size=TRAIN_SIZE, max_size=TRAIN_SIZE)
    cfg, pad = model.config, -(-TRAIN_SIZE // model.config.size_divisible) * model.config.size_divisible
    mean, std = torch.tensor(cfg.image_mean).view(3, 1, 1), torch.tensor(cfg.image_std).view(3, 1, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    for step in range(TRAIN_STEPS):
        batch = gt["images"][step * 8:(step + 1) * 8]
        images = torch.zeros(len(batch), 3, pad, pad)
        most = max(1, max(len(boxes[im["id"]]) for im in batch))
        target_boxes, labels = torch.zeros(len(batch), most, 4), torch.zeros(len(batch), most, dtype=torch.int64)
        for k, im in enumerate(batch):
            pixels = np.asarray(Image.open(root / "train" / "images" / im["file_name"]).convert("RGB"))
            chw = torch.from_numpy(pixels.copy()).permute(2, 0, 1) / 255
            images[k, :, :TRAIN_SIZE, :TRAIN_SIZE] = (chw - mean) / std
            for j, (*box, cls) in enumerate(boxes[im["id"]]):
                target_boxes[k, j], labels[k, j] = torch.tensor(box), cls
        for group in optimizer.param_groups:
            group["lr"] = 0.01 * min(1.0, (step + 1) / 20) * (0.1 if step >= 0.8 * TRAIN_STEPS else 1.0)
        losses = model(images, torch.tensor([[TRAIN_SIZE, TRAIN_SIZE]] * len(batch)),
                       {"boxes": target_boxes, "labels": labels,
                        "num_boxes": torch.tensor([len(boxes[im["id"]]) for im in batch])})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    path = root / "model.pt"
    retinanet.save_checkpoint(model.eval(), path, step=TRAIN_STEPS)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def r50_torchvision(tmp_path_factory) -> Path:
    """torchvision's RetinaNet R50-FPN architecture (random weights: nothing downloads here),
    class bias raised so that detections pass the score threshold."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    torch.manual_seed(1)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5).eval()
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.fill_(-1.5)
    path = tmp_path_factory.mktemp("r50") / "tv.pt"
    torch.save(tv.state_dict(), path)
    return path


# -------------------------------------------------------------------------------------- tests
def test_grid_sizes_are_the_backbones_for_any_size():
    for preset, sizes in (("tiny", [(64, 64), (97, 131), (128, 200)]), ("r50", [(65, 33)])):
        model = retinanet.build(preset, num_classes=2).eval()
        for h, w in sizes:
            with torch.no_grad():
                features = model.backbone(torch.zeros(1, 3, h, w))
            assert feature_grid_sizes(h, w) == [tuple(f.shape[-2:]) for f in features.values()], (preset, h, w)


def test_one_exported_file_serves_any_batch_and_size_and_keeps_its_metadata():
    torch.manual_seed(0)
    model = retinanet.build("tiny", categories=[{"id": 7, "name": "a"}, {"id": 9, "name": "b"}],
                            cls_loss="seesaw").eval()  # seesaw: the third output, objectness
    data = export_onnx(model, source="run/model.pt@sha256:abc")
    meta = read_metadata(data)
    assert meta["source"] == "run/model.pt@sha256:abc" and meta["categories"] == model.categories
    assert retinanet.RetinaNetConfig.from_dict(meta["config"]) == model.config
    assert meta["input"]["mean"] == list(model.config.image_mean) and meta["input"]["size_divisible"] == 128
    assert meta["outputs"] == ["cls_logits", "bbox_regression", "objectness"]
    networks = {rt: runtimes.load_network(data, rt, "fp32") for rt in FP32_RUNTIMES}
    for shape in [(1, 3, 128, 128), (4, 3, 128, 256), (4, 3, 256, 128), (1, 3, 256, 384)]:
        images = torch.randn(shape)
        with torch.no_grad():
            want = model.network(images)
        for rt, network in networks.items():
            got = network.run(images)
            for name in meta["outputs"]:
                assert got[name].shape == want[name].shape, (rt, shape, name)
                assert float((got[name] - want[name]).abs().max()) < 1e-4, (rt, shape, name)


@pytest.mark.parametrize("model_name", ["trained", "r50_torchvision"])
def test_fp32_runtimes_give_torch_detections_on_real_images(model_name, request, tmp_path):
    shared = Path(__file__).resolve().parents[4] / "shared" / "data"
    model_path = request.getfixturevalue(model_name)
    _, _, checkpoint, identity = infer.load_model(str(model_path))
    size = TRAIN_SIZE * 2 if model_name == "trained" else 160
    rows = decoded(photos(shared if shared.is_dir() else None, 6), size)
    want = detect_all(Detector(checkpoint, model_name=identity), rows, 3)
    onnx_path = tmp_path / "model.onnx"
    assert export_job.main(["--model", str(model_path), "--output", str(onnx_path)]) == 0
    for rt in FP32_RUNTIMES:
        got = detect_all(Detector(onnx_path.read_bytes(), model_name=identity, runtime=rt), rows, 3)
        assert_same_detections(got, want)


def _coco_ap(annotations: Path, results: Path) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        evaluation = COCOeval(gt, gt.loadRes(json.loads(results.read_text())), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


@needs_bf16
def test_bf16_and_int8_keep_coco_ap_through_the_whole_job(ray_local, trained, tmp_path, capsys):
    from pipelines.formats.synth import write_synth

    write_synth(str(tmp_path / "val"), num_images=100, image_size=TRAIN_SIZE, num_classes=3, seed=99,
                progress=lambda _: None)
    onnx_path, int8_path = tmp_path / "model.onnx", tmp_path / "int8.onnx"
    assert export_job.main(["--model", str(trained), "--output", str(onnx_path)]) == 0
    assert export_job.main(["--model", str(trained), "--output", str(int8_path), "--calibration-images", "32",
                            "--int8", str(trained.parent / "train" / "images")]) == 0
    assert read_metadata(int8_path.read_bytes())["quantization"]["calibration_images"] == 32
    ap = {}
    for name, model, flags in [("torch fp32", trained, ["--runtime", "torch"]),
                               ("openvino bf16", onnx_path, ["--precision", "bf16"]),
                               ("torch bf16", trained, ["--runtime", "torch", "--precision", "bf16"]),
                               ("onnxruntime int8", int8_path, [])]:
        out = tmp_path / name.replace(" ", "-")
        assert infer.main(["--model", str(model), "--input", str(tmp_path / "val"), "--output", str(out),
                           "--unit-size", "50", "--coco-json", str(out / "results.json"), *flags]) == 0
        ap[name] = _coco_ap(tmp_path / "val" / "annotations.json", out / "results.json")
    printed = capsys.readouterr().out
    assert "openvino bf16" in printed and "torch bf16" in printed  # what ran, as the job says
    assert ap["torch fp32"] > 0.01, ap  # a model that detects: the comparison means something
    for name in ("openvino bf16", "torch bf16"):
        assert abs(ap[name] - ap["torch fp32"]) <= 0.005, ap
    assert ap["onnxruntime int8"] >= ap["torch fp32"] - 0.01, ap  # at most 1 AP point lost


def test_an_exported_file_is_a_model_for_jobs_infer(ray_local, trained, tmp_path):
    import pyarrow.parquet as pq

    images = tmp_path / "images"
    images.mkdir()
    for i, data in enumerate(photos(None, 3)):
        (images / f"{i}.jpg").write_bytes(data)
    onnx_path = tmp_path / "exported.onnx"
    assert export_job.main(["--model", str(trained), "--output", str(onnx_path)]) == 0
    assert infer.main(["--model", str(onnx_path), "--input", str(images), "--output", str(tmp_path / "out")]) == 0
    table = pq.read_table(next((tmp_path / "out").glob("part-*.parquet")))
    assert table.num_rows == 3 and table["error"].null_count == 3
    model = table["model"][0].as_py()
    assert model.startswith(f"{onnx_path}@sha256:") and f"(exported from {trained}@sha256:" in model


def test_bad_models_and_runtimes_exit_2_with_one_line(trained, tmp_path, capsys):
    import onnx

    plain = tmp_path / "plain.onnx"  # an ONNX file that jobs.export did not write
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    plain.write_bytes(onnx.helper.make_model(graph).SerializeToString())
    exported = tmp_path / "model.onnx"
    exported.write_bytes(export_onnx(retinanet.load_checkpoint(str(trained))[0], source="x"))
    base = ["--input", str(tmp_path), "--output", str(tmp_path / "out")]
    cases = [
        (["--model", str(plain), *base], "without the 'retinanet_ray' metadata"),
        (["--model", str(exported), "--runtime", "torch", *base], "runs under --runtime onnxruntime or openvino"),
        (["--model", str(trained), "--runtime", "onnxruntime", "--precision", "bf16", *base], "fp32 only"),
        (["--model", str(trained), "--precision", "fp16", *base], "fp16 runs on GPUs only"),
        (["--model", str(trained), "--runtime", "openvino", "--use-gpu", *base], "runs on CPUs here"),
        (["--model", str(trained), "--amp", "bf16", "--precision", "fp32", *base], "give one of them"),
    ]
    for argv, message in cases:
        assert exit_code(infer.main, argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(runtimes.RuntimeUnavailable, match="pip install 'tensorrt_runtime_x'"):
        runtimes.require_module("tensorrt_runtime_x", "runtime tensorrt_runtime_x")


def test_export_refuses_a_graph_that_differs_from_the_eager_model(trained, tmp_path, capsys):
    out = tmp_path / "strict.onnx"
    assert export_job.main(["--model", str(trained), "--output", str(out), "--tolerance", "0"]) == 1
    assert "nothing written" in capsys.readouterr().err and not out.exists()
    assert export_job.main(["--model", str(trained), "--output", str(out), "--check-runtime", "openvino"]) == 0
    assert "outputs differ by at most" in capsys.readouterr().err and out.stat().st_size > 1e6
