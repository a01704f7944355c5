"""Every runtime x precision side by side: the network alone, and jobs.infer end to end.

    .venv/bin/python bench/runtimes.py [--preset r50 --image-size 800 --batch-size 2 --repeats 3]
        [--e2e-images 16 | --e2e-input COCO_LAYOUT --coco-json GT] [--model model.pt]
        [--int8-calibration SHARDS] [--skip-e2e] [--output bench/results/runtimes-cpu-r50.json]

1. Network only (`Detector.network`: what each runtime runs, on the same normalized batch):
   ms per batch, images/s, speed-up over torch fp32 (what jobs.infer ran on CPUs before it had
   runtimes) and the largest difference of its logits and box deltas from torch fp32's. The
   rounds alternate the runtimes (this machine's speed drifts between minutes); the median counts.
2. End to end: `jobs.infer` on a local Ray (one detector actor holding every core, JPEGs of
   COCO size on local disk: decode -> network -> post-processing -> Parquet): images/s, CPU
   ms per image, and how its detections agree with torch fp32's (the share matched at IoU 0.99
   with the same class; images whose detections match one to one).

--model: a trained checkpoint (e.g. `make demo`'s model) for detections that mean something,
and --coco-json GT to score each end-to-end run with pycocotools. Default: a seeded untrained
model of --preset with the focal-loss prior bias (scores ~0.01: post-processing is light and
the network dominates, as for a confident trained model; its detections are too few to
compare, so its agreement is the network outputs' difference).

End-to-end rates: `whole` over the job (Ray start excepted: one local Ray serves every run;
actor start, model load, export and compilation included) and `steady` after the first unit
(the images after it over the time after it). CPU ms per image: the machine's busy CPU time
over the job (/proc/stat; run on a quiet machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from infer import write_images  # noqa: E402 - bench/infer.py, after the path set-up
from proctree import machine_busy_seconds  # noqa: E402
from provenance import provenance  # noqa: E402

PAIRS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]
INT8_PAIRS = [("onnxruntime", "int8"), ("openvino", "int8")]  # with --int8-calibration: the QDQ file, fp32 around it


def model_files(args, data: bytes, workdir: Path) -> dict[str, Path]:
    """The checkpoint, its fp32 export and (with --int8-calibration) its int8 export, as files."""
    from jobs import export as export_job

    files = {"checkpoint": workdir / "model.pt", "fp32": workdir / "model.onnx", "int8": workdir / "int8.onnx"}
    files["checkpoint"].write_bytes(data)
    assert export_job.main(["--model", str(files["checkpoint"]), "--output", str(files["fp32"])]) == 0
    if args.int8_calibration:
        assert export_job.main(["--model", str(files["checkpoint"]), "--output", str(files["int8"]),
                                "--int8", args.int8_calibration, "--calibration-images", "64"]) == 0
    return files


def pairs(args) -> list[tuple[str, str]]:
    return PAIRS + (INT8_PAIRS if args.int8_calibration else [])


def variant(files: dict[str, Path], runtime: str, precision: str) -> tuple[Path, str]:
    """(model file, precision flag) of a row: torch runs the checkpoint, the others an export."""
    if precision == "int8":
        return files["int8"], "fp32"
    return files["checkpoint" if runtime == "torch" else "fp32"], precision


def model_bytes(args) -> bytes:
    import torch

    import retinanet

    if args.model:
        return Path(args.model).read_bytes()
    torch.manual_seed(0)
    return retinanet.checkpoint_bytes(retinanet.build(args.preset, num_classes=80))


def detectors(args, files: dict[str, Path], threads: int) -> dict:
    from pipelines.inference.detector import Detector

    out = {}
    for rt, pr in pairs(args):
        path, precision = variant(files, rt, pr)
        out[(rt, pr)] = Detector(path.read_bytes(), model_name="bench", runtime=rt, precision=precision,
                                 threads=threads)
    return out


def network_only(args, files: dict[str, Path], rows) -> list[dict]:
    import torch

    dets = detectors(args, files, os.cpu_count() or 1)
    base = dets[("torch", "fp32")]
    heights, widths = (rows[c].to_numpy().astype(np.int64) for c in ("height", "width"))
    images, _ = base.network_input(rows["pixels"], heights, widths)
    reference = base.network(images)
    times = {pair: [] for pair in pairs(args)}
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


def end_to_end(args, files: dict[str, Path], workdir: Path) -> list[dict]:
    import pyarrow as pa

    from jobs import infer
    from pipelines.ray_runtime import ensure_ray

    images = Path(args.e2e_input) if args.e2e_input else workdir / "images"
    if not args.e2e_input:
        write_images(images, args.e2e_images, 480, 640)
    ensure_ray(max(4, 2 * (os.cpu_count() or 1)))
    results, outputs = [], {}
    for rt, pr in pairs(args):
        out = workdir / f"out-{rt}-{pr}"
        model, precision = variant(files, rt, pr)
        argv = ["--model", str(model), "--input", str(images), "--output", str(out), "--num-actors", "1",
                "--cpus-per-actor", str(os.cpu_count() or 1), "--batch-size", str(args.batch_size),
                "--image-size", str(args.image_size), "--unit-size", str(args.unit_size),
                "--runtime", rt, "--precision", precision]
        if args.coco_json:
            argv += ["--coco-json", str(out / "results.json")]
        before, start = machine_busy_seconds(), time.perf_counter()
        stats = infer.run_job(infer.build_parser().parse_args(argv))
        wall, cpu = time.perf_counter() - start, machine_busy_seconds() - before
        outputs[(rt, pr)] = pa.concat_tables(pa.parquet.read_table(p) for p in sorted(out.glob("part-*.parquet")))
        steady = (stats.images - args.unit_size) / (stats.seconds - stats.first_row_seconds)
        results.append({"runtime": rt, "precision": pr, "images": stats.images, "wall_s": round(wall, 2),
                        "images_per_s": round(stats.images / wall, 3), "steady_images_per_s": round(steady, 3),
                        "cpu_ms_per_image": round(1000 * cpu / stats.images, 1),
                        "pipeline_s": round(stats.seconds, 2), "first_unit_s": round(stats.first_row_seconds, 2)})
        if args.coco_json:
            results[-1]["coco_ap"] = coco_ap(args.coco_json, out / "results.json")
    reference = {r["uri"]: r["detections"] for r in outputs[("torch", "fp32")].to_pylist()}
    base, base_steady = results[0]["images_per_s"], results[0]["steady_images_per_s"]
    for result, pair in zip(results, pairs(args)):
        result["speedup"] = round(result["images_per_s"] / base, 2)
        result["steady_speedup"] = round(result["steady_images_per_s"] / base_steady, 2)
        result.update(agreement(reference, {r["uri"]: r["detections"] for r in outputs[pair].to_pylist()}))
    return results


def coco_ap(annotations: str, results: Path) -> float:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(annotations)
        evaluation = COCOeval(gt, gt.loadRes(json.loads(results.read_text())), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return round(float(evaluation.stats[0]), 4)


def agreement(reference: dict, other: dict) -> dict:
    """How one run's detections agree with torch fp32's: the share of reference detections with a
    detection of the same class at IoU >= 0.99 (order-free: near-equal scores may swap ranks),
    the largest score difference among those, and images whose detections match one to one."""
    import torch
    from torchvision.ops import box_iou

    total, matched, score_diff, same_images = 0, 0, 0.0, 0
    for uri, want in reference.items():
        got = other[uri]
        total += len(want)
        key = lambda dets: [(d["category_id"], round(d["x1"], 1), round(d["y1"], 1)) for d in dets]  # noqa: E731
        same_images += key(got) == key(want)
        if not want or not got:
            continue
        box = lambda dets: torch.tensor([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in dets])  # noqa: E731
        label = lambda dets: torch.tensor([d["category_id"] for d in dets])  # noqa: E731
        iou = box_iou(box(want), box(got)) * (label(want)[:, None] == label(got)[None, :])
        best, index = iou.max(1)
        hit = best >= 0.99
        matched += int(hit.sum())
        if hit.any():
            scores = torch.tensor([d["score"] for d in want]), torch.tensor([d["score"] for d in got])
            score_diff = max(score_diff, float((scores[0][hit] - scores[1][index[hit]]).abs().max()))
    return {"detections": total, "matched_at_iou_0.99": round(matched / total, 4) if total else None,
            "max_score_diff": score_diff, "images_same_detections": same_images, "images": len(reference)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="r50")
    p.add_argument("--model", help="a checkpoint to use instead of a seeded untrained --preset")
    p.add_argument("--image-size", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--e2e-images", type=int, default=16)
    p.add_argument("--e2e-input", help="images (or a COCO layout) for the end-to-end runs instead of generated JPEGs")
    p.add_argument("--coco-json", help="ground truth of --e2e-input: each run's COCO AP by pycocotools")
    p.add_argument("--unit-size", type=int, default=4)
    p.add_argument("--int8-calibration", metavar="URI",
                   help="also the int8 export (jobs.export --int8 URI: training shards or images) under both runtimes")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "runtimes-cpu.json"))
    args = p.parse_args()

    import pyarrow as pa

    from pipelines.images.transforms import preprocess_images_batch

    result = {"provenance": provenance(), "preset": args.model or args.preset, "image_size": args.image_size,
              "batch_size": args.batch_size}
    data = model_bytes(args)
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        files = model_files(args, data, Path(tmp))
        paths = write_images(Path(tmp) / "net", args.batch_size, 480, 640)
        table = pa.table({"uri": [str(p) for p in paths],
                          "image": pa.array([p.read_bytes() for p in paths], pa.binary())})
        rows = preprocess_images_batch(table, min_size=args.image_size, max_size=round(args.image_size * 1333 / 800))
        result["network"] = network_only(args, files, rows)
        for r in result["network"]:
            print(f"network {r['runtime']:12s} {r['precision']}: {r['ms_per_batch']:8.1f} ms/batch "
                  f"{r['speedup']:.2f}x  max diff {r['max_abs_diff']:.2e}", flush=True)
        if not args.skip_e2e:
            result["end_to_end"] = end_to_end(args, files, Path(tmp))
            for r in result["end_to_end"]:
                print(f"jobs.infer {r['runtime']:12s} {r['precision']}: {r['images_per_s']:.3f} img/s "
                      f"{r['speedup']:.2f}x, steady {r['steady_images_per_s']:.3f} {r['steady_speedup']:.2f}x, "
                      f"{r['cpu_ms_per_image']:.0f} CPU ms/img, AP {r.get('coco_ap')}; {r['detections']} detections, "
                      f"matched {r['matched_at_iou_0.99']}, images alike {r['images_same_detections']}/{r['images']}",
                      flush=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
