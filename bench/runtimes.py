"""Every runtime x precision side by side: the network alone, and jobs.infer end to end.

    .venv/bin/python bench/runtimes.py [--preset r50 --image-size 800 --batch-size 2 --repeats 3]
        [--e2e-images 16] [--model model.pt] [--skip-e2e] [--output bench/results/runtimes-cpu.json]

1. Network only (`Detector.network`: what each runtime runs, on the same normalized batch):
   ms per batch, images/s, speed-up over torch fp32 (what jobs.infer ran on CPUs before it had
   runtimes) and the largest difference of its logits and box deltas from torch fp32's. The
   rounds alternate the runtimes (this machine's speed drifts between minutes); the median counts.
2. End to end: `jobs.infer` on a local Ray (one detector actor holding every core, JPEGs of
   COCO size on local disk: decode -> network -> post-processing -> Parquet): images/s, CPU
   ms per image of the whole process tree, and how its detections agree with torch fp32's
   (images whose detections match in count and labels; largest box and score differences).

--model: a trained checkpoint (e.g. `make demo`'s out/demo/train/model.pt) for detections that
mean something; default a seeded untrained model of --preset whose class bias is raised so
that detections pass the score threshold (timing and agreement of the network still hold).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from infer import tree_cpu_seconds, write_images  # noqa: E402 - bench/infer.py, after the path set-up

PAIRS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]


def model_bytes(args) -> bytes:
    import torch

    import retinanet

    if args.model:
        return Path(args.model).read_bytes()
    torch.manual_seed(0)
    model = retinanet.build(args.preset, num_classes=80)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(-2.0)  # scores ~0.12: detections pass 0.05
    return retinanet.checkpoint_bytes(model)


def detectors(data: bytes, threads: int) -> dict:
    from pipelines.inference.detector import Detector
    from retinanet.export import export_onnx
    import retinanet

    onnx_bytes = export_onnx(retinanet.load_checkpoint(data)[0], source="bench")
    return {(rt, pr): Detector(data if rt == "torch" else onnx_bytes, model_name="bench", runtime=rt, precision=pr,
                               threads=threads) for rt, pr in PAIRS}


def network_only(args, data: bytes, rows) -> list[dict]:
    import torch

    dets = detectors(data, os.cpu_count() or 1)
    base = dets[("torch", "fp32")]
    heights, widths = (rows[c].to_numpy().astype(np.int64) for c in ("height", "width"))
    images, _ = base.network_input(rows["pixels"], heights, widths)
    reference = base.network(images)
    times = {pair: [] for pair in PAIRS}
    diffs = {}
    for pair, det in dets.items():  # warm-up (and one-time compilation), and the agreement
        out = det.network(images)
        diffs[pair] = max(float((out[k].float() - v).abs().max()) for k, v in reference.items() if v is not None)
    for _ in range(args.repeats):
        for pair, det in dets.items():
            start = time.perf_counter()
            with torch.inference_mode():
                det.network(images)
            times[pair].append(time.perf_counter() - start)
    base_ms = 1000 * statistics.median(times[("torch", "fp32")])
    out = []
    for (rt, pr), values in times.items():
        ms = 1000 * statistics.median(values)
        out.append({"runtime": rt, "precision": pr, "ms_per_batch": round(ms, 1),
                    "images_per_s": round(len(heights) * 1000 / ms, 3), "speedup": round(base_ms / ms, 2),
                    "max_abs_diff": diffs[(rt, pr)], "all_ms": [round(1000 * v, 1) for v in values],
                    "padded_shape": list(images.shape)})
    return out


def end_to_end(args, data: bytes, workdir: Path) -> list[dict]:
    import pyarrow as pa

    from jobs import infer
    from pipelines.ray_runtime import ensure_ray

    images = workdir / "images"
    write_images(images, args.e2e_images, 480, 640)
    model = workdir / "model.pt"
    model.write_bytes(data)
    ensure_ray(max(4, 2 * (os.cpu_count() or 1)))
    results, outputs = [], {}
    for rt, pr in PAIRS:
        out = workdir / f"out-{rt}-{pr}"
        argv = ["--model", str(model), "--input", str(images), "--output", str(out), "--num-actors", "1",
                "--cpus-per-actor", str(os.cpu_count() or 1), "--batch-size", str(args.batch_size),
                "--image-size", str(args.image_size), "--unit-size", str(args.e2e_images),
                "--runtime", rt, "--precision", pr]
        before, start = tree_cpu_seconds(), time.perf_counter()
        stats = infer.run_job(infer.build_parser().parse_args(argv))
        wall, cpu = time.perf_counter() - start, tree_cpu_seconds() - before
        outputs[(rt, pr)] = pa.concat_tables(pa.parquet.read_table(p) for p in sorted(out.glob("part-*.parquet")))
        results.append({"runtime": rt, "precision": pr, "images": stats.images, "wall_s": round(wall, 2),
                        "images_per_s": round(stats.images / wall, 3), "cpu_ms_per_image": round(1000 * cpu / stats.images, 1),
                        "pipeline_s": round(stats.seconds, 2), "first_unit_s": stats.first_row_seconds})
    reference = {r["uri"]: r["detections"] for r in outputs[("torch", "fp32")].to_pylist()}
    base = results[0]["images_per_s"]
    for result, pair in zip(results, PAIRS):
        result["speedup"] = round(result["images_per_s"] / base, 2)
        result.update(agreement(reference, {r["uri"]: r["detections"] for r in outputs[pair].to_pylist()}))
    return results


def agreement(reference: dict, other: dict) -> dict:
    same, boxes, scores, count = 0, 0.0, 0.0, 0
    for uri, want in reference.items():
        got = other[uri]
        count += len(want)
        if len(got) == len(want) and [d["category_id"] for d in got] == [d["category_id"] for d in want]:
            same += 1
            if want:
                a = np.array([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in want])
                b = np.array([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in got])
                boxes = max(boxes, float(np.abs(a - b).max()))
                scores = max(scores, max(abs(d["score"] - e["score"]) for d, e in zip(want, got)))
    return {"images_same_detections": same, "images": len(reference), "detections_per_image": count / len(reference),
            "max_box_diff_px": boxes, "max_score_diff": scores}


def provenance(args) -> dict:
    import onnxruntime
    import openvino
    import torch

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "*.py")),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "load_before": os.getloadavg()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="r50")
    p.add_argument("--model", help="a checkpoint to use instead of a seeded untrained --preset")
    p.add_argument("--image-size", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--e2e-images", type=int, default=16)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "runtimes-cpu.json"))
    args = p.parse_args()

    import pyarrow as pa

    from pipelines.images.transforms import preprocess_images_batch

    result = {"provenance": provenance(args), "preset": args.model or args.preset, "image_size": args.image_size,
              "batch_size": args.batch_size}
    data = model_bytes(args)
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        paths = write_images(Path(tmp) / "net", args.batch_size, 480, 640)
        table = pa.table({"uri": [str(p) for p in paths], "image": pa.array([p.read_bytes() for p in paths], pa.binary())})
        rows = preprocess_images_batch(table, min_size=args.image_size, max_size=round(args.image_size * 1333 / 800))
        result["network"] = network_only(args, data, rows)
        for r in result["network"]:
            print(f"network {r['runtime']:12s} {r['precision']}: {r['ms_per_batch']:8.1f} ms/batch "
                  f"{r['speedup']:.2f}x  max diff {r['max_abs_diff']:.2e}", flush=True)
        if not args.skip_e2e:
            result["end_to_end"] = end_to_end(args, data, Path(tmp))
            for r in result["end_to_end"]:
                print(f"jobs.infer {r['runtime']:12s} {r['precision']}: {r['images_per_s']:.3f} img/s "
                      f"{r['speedup']:.2f}x, {r['cpu_ms_per_image']:.0f} CPU ms/img; same detections "
                      f"{r['images_same_detections']}/{r['images']}, box diff {r['max_box_diff_px']:.2e} px", flush=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
