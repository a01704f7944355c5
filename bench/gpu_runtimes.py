"""GPU figures of the runtimes jobs.infer has there, and the export on the GPU machine's torch.

Run by bench/gpu.sh (torch and torchvision only; no ONNX Runtime or TensorRT on that machine):
(1) `Detector` with the torch runtime on one GPU, R50-FPN at 800 px, batch 8: the network, and
    network + post-processing, in fp32, bf16 and fp16 (autocast + channels_last), images/s and
    the largest logit difference from fp32;
(2) `retinanet.export.export_onnx` of that model on this torch (exports break between versions:
    this is the check on the GPU image's torch), seconds and size; with the `onnx` package absent
    the graph is exported without the metadata step and only its size is reported.
Writes bench/results/runtimes-gpu.json (or --output) naming the device, with the run's
provenance. `--dry-run`: tiny preset at 128 px on whatever device there is, once; it writes only
to an --output given, since its figures are no results.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import retinanet  # noqa: E402
from pipelines.inference.detector import Detector  # noqa: E402

from provenance import provenance  # noqa: E402  (bench/provenance.py)


def timed(fn, device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--output", help="JSON to write (default: bench/results/runtimes-gpu.json; with --dry-run, "
                   "nothing)")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    preset, size, batch, repeats = ("tiny", 128, 2, 1) if args.dry_run else ("r50", 800, 8, 10)
    torch.manual_seed(0)
    model = retinanet.build(preset, num_classes=80)
    data = retinanet.checkpoint_bytes(model)
    rng = np.random.default_rng(0)
    h, w = size, round(size * 4 / 3)
    pixels = pa.array([rng.integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes() for _ in range(batch)], pa.binary())
    heights, widths = np.full(batch, h, np.int64), np.full(batch, w, np.int64)
    precisions = ["fp32", "bf16", "fp16"] if gpu else ["fp32"]
    rows, reference = [], None
    for precision in precisions:
        det = Detector(data, model_name="bench", use_gpu=gpu, runtime="torch", precision=precision)
        images, _ = det.network_input(pixels, heights, widths)
        out = det.network(images)["cls_logits"].float()
        reference = out if reference is None else reference
        network = timed(lambda det=det, images=images: det.network(images), device, repeats)
        whole = timed(lambda det=det: det.detect(pixels, heights, widths), device, repeats)
        rows.append({"precision": precision, "network_images_per_s": round(batch / network, 1),
                     "detect_images_per_s": round(batch / whole, 1),
                     "max_logit_diff_vs_fp32": float((out - reference).abs().max())})
        print(f"{precision}: network {batch / network:.1f} img/s, with post-processing {batch / whole:.1f} img/s",
              flush=True)
    start = time.perf_counter()
    if importlib.util.find_spec("onnx") is not None:
        from retinanet.export import export_onnx

        exported = export_onnx(model, source="bench")
    else:
        from retinanet.export import ExportedNetwork, output_names

        buffer = io.BytesIO()
        sample = torch.zeros(1, 3, 256, 384)
        names = output_names(model.config)
        torch.onnx.export(ExportedNetwork(model).eval(), (sample,), buffer, dynamo=False, opset_version=17,
                          input_names=["images"], output_names=names,
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}})
        exported = buffer.getvalue()
    export = {"seconds": round(time.perf_counter() - start, 2), "mib": round(len(exported) / 2**20, 1),
              "metadata": importlib.util.find_spec("onnx") is not None}
    print(f"export on torch {torch.__version__}: {export}", flush=True)
    result = {"provenance": provenance(),
              "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu",
              "torch": torch.__version__, "preset": preset, "image_size": size, "batch": batch,
              "date": time.strftime("%Y-%m-%d %H:%M %Z"), "runtimes": rows, "export": export}
    output = args.output or (None if args.dry_run else str(ROOT / "bench" / "results" / "runtimes-gpu.json"))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1) + "\n")
        print(f"-> {output}")


if __name__ == "__main__":
    main()
