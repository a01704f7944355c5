"""Train RetinaNet with synchronized SGD (DDP) on Ray Train, streaming data with Ray Data.

    python -m jobs.train --data URI --output URI [--preset tiny|r50|r101] [--num-workers N] ...

Each worker reads its own `streaming_split` of the shards (decode/resize/flip on CPU tasks).
Checkpoints go to --output on any storage, the last --keep of them kept; rerunning the same
command resumes from the last one, and a failed worker group restarts from it
(--max-failures). Results: --output/model.pt (loads with `retinanet.load_checkpoint` and
`jobs.infer`), metrics.jsonl (one line per logging step), loss_curve.png.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

from jobs.cli import run
from pipelines import storage
from pipelines.errors import UserError

DEFAULTS = dict(preset="tiny", num_workers=2, use_gpu=False, batch_size=8, epochs=None, max_steps=None, lr=None,
                image_size=None, max_size=None, amp=None, init=None, checkpoint_every=100, keep=3, max_failures=0,
                val_data=None, seed=0, log_every=20, warmup_steps=None, weight_decay=1e-4, cls_loss="focal",
                num_cpus=None, name="retinanet", placement="PACK", scale_jitter=None, fail_at_step=None, debug_dir=None,
                repeat_factor_threshold=None)
# Loss knobs for the paper's ablations (bench/ablation.py); None keeps the preset's value.
LOSS_OPTIONS = ("focal_gamma", "focal_alpha", "prior_prob", "ohem_batch", "ohem_nms", "ohem_ratio")
DEFAULTS.update(dict.fromkeys(LOSS_OPTIONS))


def _number(kind: type, low: float, high: float = float("inf"), low_open: bool = False, high_open: bool = False):
    """An argparse type: `kind` within [low, high] (open ends where asked); argparse exits 2 otherwise."""
    def parse(text: str):
        value = kind(text)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None)
    p.add_argument("--data", help="training data: a shards folder from jobs.prepare, or a COCO layout (URI)")
    p.add_argument("--val-data", help="validation data (same forms); COCO AP on it after each epoch")
    p.add_argument("--output", help="where checkpoints, model.pt, metrics.jsonl and loss_curve.png go (URI)")
    p.add_argument("--config", help="YAML file with any of these options (flags override it)")
    p.add_argument("--preset", choices=["tiny", "r50", "r101"], help="model preset (default tiny)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers, each one DDP rank (default 2)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, NCCL, channels_last")
    p.add_argument("--batch-size", type=int, help="images per worker per step (default 8)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="run length in passes over the data")
    length.add_argument("--max-steps", type=int, help="run length in optimizer steps")
    p.add_argument("--lr", type=float, help="base learning rate (default 0.01 x global batch / 16)")
    p.add_argument("--image-size", type=int, help="shorter side after resize (default: the preset's, 800 for r50)")
    p.add_argument("--max-size", type=int, help="longer side at most (default image size x 1333/800)")
    p.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], help="mixed precision on GPU (bf16)")
    p.add_argument("--init", help="initial weights: torchvision:retinanet_resnet50_fpn[_v2] or a checkpoint URI")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 100)")
    p.add_argument("--keep", type=int, help="checkpoints kept (default 3)")
    p.add_argument("--max-failures", type=int, help="worker-group restarts from the last checkpoint (default 0)")
    p.add_argument("--cls-loss", choices=["focal", "seesaw", "ohem"],
                   help="classification loss (seesaw: long-tailed data; ohem: the paper's hard-mining baseline)")
    p.add_argument("--focal-gamma", type=_number(float, 0), help="focal loss gamma (default 2; 0 = alpha-balanced CE)")
    p.add_argument("--focal-alpha", type=_number(float, 0, 1), help="focal loss alpha (default 0.25)")
    p.add_argument("--prior-prob", type=_number(float, 0, 1, high_open=True),
                   help="prior for the class-logit bias (default 0.01; 0 = zero bias)")
    p.add_argument("--ohem-batch", type=_number(int, 1), help="--cls-loss ohem: anchors kept per image (default 128)")
    p.add_argument("--ohem-nms", type=_number(float, 0, 1, low_open=True),
                   help="--cls-loss ohem: IoU of the NMS by loss (default 0.5)")
    p.add_argument("--ohem-ratio", type=_number(float, 0, low_open=True),
                   help="--cls-loss ohem: negatives per positive (3 = OHEM 1:3; default: none)")
    p.add_argument("--repeat-factor-threshold", type=float,
                   help="LVIS repeat-factor sampling for long-tailed data, t (e.g. 0.001); off by default")
    p.add_argument("--scale-jitter", type=float, nargs=2, metavar=("LO", "HI"), help="random image scale factor range")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default min(1000, steps / 10))")
    p.add_argument("--weight-decay", type=float, help="SGD weight decay (default 1e-4)")
    p.add_argument("--log-every", type=int, help="steps between metrics lines (default 20)")
    p.add_argument("--seed", type=int, help="seed for weights, file order and augmentation (default 0)")
    p.add_argument("--name", help="run name under --output; rerun with the same name to resume (default retinanet)")
    p.add_argument("--placement", choices=["PACK", "SPREAD", "STRICT_SPREAD"],
                   help="worker placement over nodes (default PACK; SPREAD puts workers on different nodes)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray instance (default: max(4, cores))")
    p.add_argument("--fail-at-step", type=int, help=argparse.SUPPRESS)  # fault injection for tests
    p.add_argument("--debug-dir", help=argparse.SUPPRESS)  # per-rank image ids and parameter checksums
    return p


def resolve_options(argv: list[str] | None) -> dict:
    """Defaults < --config YAML < flags."""
    import yaml

    args = vars(build_parser().parse_args(argv))
    options = dict(DEFAULTS)
    if args.get("config"):
        loaded = yaml.safe_load(storage.read_bytes(args["config"])) or {}
        unknown = set(loaded) - set(DEFAULTS) - {"data", "output"}
        if unknown:
            raise UserError(f"{args['config']}: unknown options {sorted(unknown)}; use the flag names with '_'")
        options.update(loaded)
    options.update({k: v for k, v in args.items() if v is not None and k != "config"})
    for required in ("data", "output"):
        if not options.get(required):
            raise UserError(f"--{required} is required (on the command line or in --config)")
    if options["epochs"] is None and options["max_steps"] is None:
        options["epochs"] = 1
    return options


def model_config(options: dict, categories: list[dict]) -> dict:
    import retinanet

    overrides = {"num_classes": len(categories), "cls_loss": options["cls_loss"]}
    overrides.update({k: options[k] for k in LOSS_OPTIONS if options.get(k) is not None})
    if options["image_size"]:
        overrides["min_size"] = options["image_size"]
        overrides["max_size"] = options["max_size"] or int(round(options["image_size"] * 1333 / 800))
    if options["init"] and options["preset"] != "tiny":
        overrides["norm"] = "frozen_bn"  # pretrained: frozen BN and stem, as torchvision does
    return retinanet.preset(options["preset"], **overrides).to_dict()


def plot_loss_curve(metrics_uri: str, png_uri: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in storage.read_bytes(metrics_uri).decode().splitlines() if line]
    records = [r for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "classification", "bbox_regression", "objectness"):
        if any(key in r for r in records):
            ax.plot([r["step"] for r in records if key in r], [r[key] for r in records if key in r], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes_atomic(png_uri, buffer.getvalue())


def repeated_schedule(options: dict, num_images: int, plain_steps: int, plain_max_steps: int) -> tuple[int, int]:
    """(steps per epoch, total steps) when repeat-factor sampling lengthens every epoch.

    Each epoch's length is known exactly up front (`sampling.epoch_sizes`); an epoch has as
    many steps as the shortest planned one gives, so no rank runs out of data mid-epoch.
    --epochs counts repeated epochs; --max-steps stays as given.
    """
    from pipelines.evaluation.report import category_image_pairs, train_image_counts
    from pipelines.training.sampling import category_repeat_factors, epoch_sizes

    pairs = category_image_pairs(options["data"])
    factors = category_repeat_factors(train_image_counts(options["data"]), num_images,
                                      options["repeat_factor_threshold"])
    epochs = -(-plain_max_steps // plain_steps) + 2  # epochs are never shorter than without repeats
    global_batch = options["num_workers"] * options["batch_size"]
    steps = int(epoch_sizes(pairs, num_images, factors, options["seed"], range(epochs)).min()) // global_batch
    return steps, options["max_steps"] or max(1, int(round(options["epochs"] * steps)))


def main(argv: list[str] | None = None) -> int:
    options = resolve_options(argv)
    import ray
    import retinanet
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.train_loop import train_loop
    from pipelines.training.datasets import detection_dataset, training_input_kind
    from pipelines.ray_runtime import ensure_ray

    for data in filter(None, (options["data"], options["val_data"])):
        training_input_kind(data)  # a wrong path fails here, before Ray starts
    output = storage.resolve(options["output"])
    storage.ensure_dir(output.uri())
    ensure_ray(options["num_cpus"])
    workers, batch = options["num_workers"], options["batch_size"]
    min_size = options["image_size"] or retinanet.preset(options["preset"]).min_size
    max_size = options["max_size"] or int(round(min_size * 1333 / 800))
    train_ds, manifest = detection_dataset(options["data"], image_size=min_size, max_size=max_size, train=True,
                                           seed=options["seed"], scale_jitter=options["scale_jitter"],
                                           repeat_factor_threshold=options["repeat_factor_threshold"])
    steps_per_epoch = manifest.num_images // (workers * batch)
    if steps_per_epoch < 1:
        raise UserError(f"{options['data']}: {manifest.num_images} images are fewer than one global batch "
                        f"({workers} workers x {batch}); lower --batch-size or --num-workers")
    max_steps = options["max_steps"] or max(1, int(round(options["epochs"] * steps_per_epoch)))
    if options["repeat_factor_threshold"]:
        steps_per_epoch, max_steps = repeated_schedule(options, manifest.num_images, steps_per_epoch, max_steps)
    datasets = {"train": train_ds}
    if options["val_data"]:
        datasets["val"], _ = detection_dataset(options["val_data"], image_size=min_size, max_size=max_size, train=False)

    categories = manifest.categories
    cfg = {
        **options, "model": model_config(options, categories), "categories": categories,
        "image_size": min_size, "max_steps": max_steps, "steps_per_epoch": steps_per_epoch,
        "lr": options["lr"] or 0.01 * workers * batch / 16,
        "warmup_steps": options["warmup_steps"] if options["warmup_steps"] is not None else min(1000, max_steps // 10),
        "threads_per_worker": max(1, (os.cpu_count() or 1) // workers), "output": output.uri(),
    }
    print(f"training {options['preset']} on {manifest.num_images} images ({len(categories)} classes): "
          f"{workers} workers x {batch} images, {max_steps} steps ({steps_per_epoch}/epoch), lr {cfg['lr']:.4g}",
          flush=True)
    arrow_fs, arrow_path = storage.arrow_filesystem(output.uri())
    trainer = TorchTrainer(
        train_loop, train_loop_config=cfg, datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=options["use_gpu"],
                                     resources_per_worker=None if options["use_gpu"] else {"CPU": 1},
                                     placement_strategy=options["placement"]),
        run_config=RunConfig(name=options["name"], storage_path=arrow_path, storage_filesystem=arrow_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=options["keep"]),
                             failure_config=FailureConfig(max_failures=options["max_failures"])),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - report the worker's own error in one line
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        print(f"error: training failed: {type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}",
              file=sys.stderr)
        return 1
    metrics_uri = output.join("metrics.jsonl").uri()
    plot_loss_curve(metrics_uri, output.join("loss_curve.png").uri())
    last = json.loads(storage.read_bytes(metrics_uri).decode().splitlines()[-1])
    print(f"done: step {last.get('step')}, loss {last.get('loss', float('nan')):.4f}"
          + (f", val AP {last['val_AP']:.3f} AP50 {last['val_AP50']:.3f}" if "val_AP" in last else "")
          + f"; model {output.join('model.pt').uri()}, checkpoints {result.path}", flush=True)
    return 0


if __name__ == "__main__":
    run(main)
