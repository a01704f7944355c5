"""Export a detector's network to ONNX, checked against the eager model before it is written.

    python -m jobs.export --model URI|torchvision:NAME --output FILE.onnx [--opset 17]
        [--check-images URI] [--check-runtime onnxruntime|openvino] [--tolerance 1e-3]
        [--int8 CALIBRATION_URI [--calibration-images 64]]

The graph is the network only: normalized float32 images [batch, 3, height, width] in (dynamic
batch, height and width; height and width multiples of the model's size divisibility), class
logits [batch, anchors, classes] and box deltas [batch, anchors, 4] out (plus objectness logits
for Seesaw models), anchors ordered P3..P7, location-major. Anchors, decoding and NMS stay in
`retinanet.postprocess`, which `jobs.infer --model FILE.onnx` runs for every runtime. The file's
metadata (key "retinanet_ray") holds the model config, categories, normalization, size
divisibility and the identity of the source checkpoint.

Before writing, the exported graph runs on --check-images (default: 4 generated images) as one
batch and one by one, at the model's inference size, and its outputs and detections are
compared with the eager model's; a difference above --tolerance is an error (exit 1).

--int8 quantizes the checked graph after training (QDQ: int8 weights per channel, uint8
activations with ranges from --calibration-images images of the given shards folder or image
folder, ideally the training shards; `pipelines.inference.quantize`). The int8 graph's
differences from the eager model are reported, not gated: judge it by its AP on a validation
set (jobs.infer + jobs.evaluate), as quantization trades a little accuracy for speed.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pyarrow as pa

from jobs.cli import run
from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats import shards
from pipelines.formats.shards import IMAGE_SUFFIXES
from pipelines.images.transforms import preprocess_images_batch
from pipelines.inference import runtimes

CHECK_IMAGES = 4


def build_parser() -> argparse.ArgumentParser:
    from retinanet.export import DEFAULT_OPSET

    p = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="URI",
                   help="jobs.train's model.pt (any URI), a torchvision RetinaNet state dict file, or "
                        "torchvision:retinanet_resnet50_fpn[_v2]: what jobs.infer --model takes")
    p.add_argument("--output", required=True, metavar="URI", help="the .onnx file to write (any URI)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--check-images", metavar="URI",
                   help=f"folder/prefix of images to check the export on (the first {CHECK_IMAGES}); default: "
                        "generated shapes images")
    p.add_argument("--check-runtime", choices=("onnxruntime", "openvino"),
                   help="runtime that runs the check (default: onnxruntime where installed, else openvino)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest absolute difference of logits and box deltas allowed (default %(default)s)")
    p.add_argument("--int8", metavar="CALIBRATION_URI",
                   help="write an int8 (QDQ) graph calibrated on these images: a shards folder from jobs.prepare "
                        "(the training shards) or a folder/prefix of images")
    p.add_argument("--calibration-images", type=int, default=64,
                   help="images to calibrate activation ranges on (default %(default)s)")
    return p


def check_images(uri: str | None, count: int = CHECK_IMAGES, flag: str = "--check-images") -> list[bytes]:
    """Encoded images to check on: the first `count` of a folder (listed page by page, so a
    bucket of millions costs one page), or generated shapes."""
    if uri is None:
        from pipelines.formats.synth import class_probabilities, generate_image

        return [generate_image(i, seed=0, image_size=480, class_probs=class_probabilities(3))[0] for i in range(count)]
    files: list[str] = []
    for page in storage.iter_files(uri, IMAGE_SUFFIXES):
        files += page[:count - len(files)]
        if len(files) >= count:
            break
    if not files:
        raise UserError(f"{flag} {uri}: no {'/'.join(IMAGE_SUFFIXES)} files there")
    return [storage.read_bytes(f) for f in files]


def calibration_images(uri: str, count: int) -> list[bytes]:
    """The first `count` images of a shards folder (read a row batch at a time) or of an image folder."""
    import pyarrow.parquet as pq

    if shards.input_kind(uri) != "shards":
        return check_images(uri, count, flag="--int8")
    images: list[bytes] = []
    for shard in shards.shard_uris(uri, shards.read_manifest(uri)):
        fs, path = storage.arrow_filesystem(shard)
        with fs.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=count - len(images), columns=["image"]):
                images += batch.column(0).to_pylist()[:count - len(images)]
                if len(images) >= count:
                    return images
    return images


def decoded_rows(images: list[bytes], config) -> pa.Table:
    """Images resized as jobs.infer resizes them (the model's min/max size), as detector rows."""
    table = pa.table({"uri": [f"check-{i}" for i in range(len(images))], "image": pa.array(images, pa.binary()),
                      "error": pa.array([None] * len(images), pa.string())})
    rows = preprocess_images_batch(table, min_size=config.min_size, max_size=config.max_size)
    if rows["error"].null_count != rows.num_rows:
        raise UserError(f"--check-images: cannot decode {rows['error'].drop_null()[0]}")
    return rows


def compare(eager, exported, rows: pa.Table) -> dict:
    """Largest differences of the two detectors on `rows`: as one batch and one image at a time."""
    worst = {"outputs": 0.0, "boxes": 0.0, "scores": 0.0, "detections_differ": 0}
    batches = [rows] + [rows.slice(i, 1) for i in range(rows.num_rows)]
    for batch in batches:
        heights, widths = (batch[c].to_numpy().astype(np.int64) for c in ("height", "width"))
        images, _ = eager.network_input(batch["pixels"], heights, widths)
        ours, theirs = eager.network(images), exported.network(images)
        for name, value in ours.items():
            if value is not None:
                worst["outputs"] = max(worst["outputs"], float((value - theirs[name]).abs().max()))
        for a, b in zip(eager.detect(batch["pixels"], heights, widths),
                        exported.detect(batch["pixels"], heights, widths)):
            if a["labels"].shape != b["labels"].shape or not bool((a["labels"] == b["labels"]).all()):
                worst["detections_differ"] += 1
                continue
            if len(a["scores"]):
                worst["boxes"] = max(worst["boxes"], float((a["boxes"] - b["boxes"]).abs().max()))
                worst["scores"] = max(worst["scores"], float((a["scores"] - b["scores"]).abs().max()))
    return worst


def quantized(args, eager, data: bytes, rows: pa.Table, identity: str) -> bytes:
    """The int8 graph of `data`, calibrated on --int8's images, with its differences reported."""
    from pipelines.inference.detector import Detector
    from pipelines.inference.quantize import quantize_int8

    if args.calibration_images < 1:
        raise UserError(f"--calibration-images {args.calibration_images}: give at least 1")
    calibration = decoded_rows(calibration_images(args.int8, args.calibration_images), eager.config)
    batches = []
    for i in range(calibration.num_rows):
        one = calibration.slice(i, 1)
        sizes = (one[c].to_numpy().astype(np.int64) for c in ("height", "width"))
        images, _ = eager.network_input(one["pixels"], *sizes)
        batches.append(images.numpy())
    start = time.perf_counter()
    data = quantize_int8(data, batches, calibration=args.int8)
    worst = compare(eager, Detector(data, model_name=identity, runtime="onnxruntime"), rows)
    print(f"int8 ({len(batches)} calibration images, {time.perf_counter() - start:.1f} s): outputs differ by at most "
          f"{worst['outputs']:.2e}; {worst['detections_differ']} check image(s) with other detections (score the "
          "int8 file's AP on a validation set before bulk runs)", file=sys.stderr)
    return data


def main(argv: list[str] | None = None) -> int:
    import retinanet
    from jobs.infer import load_model
    from pipelines.inference.detector import Detector
    from retinanet.export import export_onnx, read_metadata

    args = build_parser().parse_args(argv)
    check_runtime = args.check_runtime or ("onnxruntime" if runtimes.module_installed("onnxruntime") else "openvino")
    try:
        runtimes.require_module("onnx", "jobs.export")
        runtimes.require_module(check_runtime, "the export check")
        if args.int8:
            runtimes.require_module("onnxruntime", "--int8 (ONNX Runtime's quantizer)")
    except runtimes.RuntimeUnavailable as exc:
        raise UserError(str(exc)) from None
    if not args.output.endswith(".onnx"):
        print(f"warning: --output {args.output}: ONNX files usually end in .onnx", file=sys.stderr)
    config, _, checkpoint, identity = load_model(args.model)
    eager = Detector(checkpoint, model_name=identity)
    model, _ = retinanet.load_checkpoint(checkpoint)
    start = time.perf_counter()
    data = export_onnx(model, source=identity, opset=args.opset)
    seconds = time.perf_counter() - start
    exported = Detector(data, model_name=identity, runtime=check_runtime)
    rows = decoded_rows(check_images(args.check_images), config)
    worst = compare(eager, exported, rows)
    print(f"check ({check_runtime}, {rows.num_rows} images as one batch and one by one): outputs differ by at most "
          f"{worst['outputs']:.2e}, boxes by {worst['boxes']:.2e} px, scores by {worst['scores']:.2e}; "
          f"{worst['detections_differ']} image(s) with other detections", file=sys.stderr)
    if worst["outputs"] > args.tolerance:
        print(f"error: the exported graph differs from the eager model by {worst['outputs']:.2e} > --tolerance "
              f"{args.tolerance}; nothing written", file=sys.stderr)
        return 1
    if args.int8:
        data = quantized(args, eager, data, rows, identity)
    storage.write_bytes_atomic(args.output, data)
    meta = read_metadata(data)
    print(f"exported {identity} -> {args.output} ({'int8, ' if args.int8 else ''}{len(data) / 2**20:.1f} MiB, "
          f"opset {args.opset}, {seconds:.1f} s; {len(meta['categories'])} classes, "
          f"outputs {', '.join(meta['outputs'])})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
