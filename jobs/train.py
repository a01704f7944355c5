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
from pipelines.images.pixel_limit import DEFAULT_MAX_PIXELS

DEFAULTS = dict(preset="tiny", num_workers=2, use_gpu=False, batch_size=8, epochs=None, max_steps=None, lr=None,
                image_size=None, max_size=None, amp=None, init=None, checkpoint_every=100, keep=3, max_failures=0,
                val_data=None, seed=0, log_every=20, warmup_steps=None, weight_decay=1e-4, cls_loss="focal",
                num_cpus=None, name="retinanet", placement="PACK", scale_jitter=None, fail_at_step=None, debug_dir=None,
                repeat_factor_threshold=None, backbone_weights=None, norm=None, logger="tensorboard",
                max_pixels=DEFAULT_MAX_PIXELS, cpus_per_worker=None, shuffle_window_mb=256)
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
    p.add_argument("--init", help="fine-tune a whole detector: torchvision:retinanet_resnet50_fpn[_v2], a torchvision "
                   "state-dict URI or a checkpoint URI (its architecture is kept)")
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
    p.add_argument("--max-pixels", type=int, help=f"pixel limit of one decode, as in jobs.prepare and jobs.infer "
                   f"(default {DEFAULT_MAX_PIXELS}, fits the memory a decode declares); larger non-JPEG images are "
                   f"skipped and counted as undecodable, larger JPEGs decode reduced")
    p.add_argument("--shuffle-window-mb", type=_number(int, 1), help="each epoch's order: units of 64 images of all "
                   "shards permuted, then windows of this many MB of encoded images permuted inside, one read task "
                   "each (default 256; a dataset smaller than a window is permuted whole)")
    p.add_argument("--scale-jitter", type=float, nargs=2, metavar=("LO", "HI"), help="random image scale factor range")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default min(1000, steps / 10))")
    p.add_argument("--weight-decay", type=float, help="SGD weight decay (default 1e-4)")
    p.add_argument("--log-every", type=int, help="steps between metrics lines (default 20)")
    p.add_argument("--seed", type=int, help="seed for weights, file order and augmentation (default 0)")
    p.add_argument("--name", help="run name under --output; rerun with the same name to resume (default retinanet)")
    p.add_argument("--placement", choices=["PACK", "SPREAD", "STRICT_SPREAD"],
                   help="worker placement over nodes (default PACK; SPREAD puts workers on different nodes)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray instance (default: max(4, cores))")
    p.add_argument("--cpus-per-worker", type=_number(int, 0),
                   help="logical CPUs each training worker reserves, so that decode tasks never take the cores that "
                   "run its step (default 1; with --use-gpu 2: the loop, collate and host-to-device copies; Ray's own "
                   "default for a GPU worker is 0). On CPU it is also the worker's torch threads when given")
    # Initial weights and run records (issue 13)
    p.add_argument("--backbone-weights", help="ImageNet weights of the ResNet: a torchvision name (r50/r101 default "
                   "ResNet50_Weights.IMAGENET1K_V1 / ResNet101_...), a state-dict URI, or none")
    p.add_argument("--norm", choices=["frozen_bn", "bn", "sync_bn", "group_norm"],
                   help="backbone norm (default: the preset's; without pretrained weights sync_bn or group_norm)")
    p.add_argument("--logger", choices=["tensorboard", "mlflow", "none"],
                   help="rank 0's metrics logger besides metrics.jsonl (default tensorboard: events under --output)")
    p.add_argument("--fail-at-step", type=int, help=argparse.SUPPRESS)  # fault injection for tests
    p.add_argument("--debug-dir", help=argparse.SUPPRESS)  # per-rank image ids and parameter checksums
    return p


def _config_argv(parser: argparse.ArgumentParser, loaded: dict, source: str) -> list[str]:
    """--config YAML values as the flags they stand for, so the flags' own parser types and checks them."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    unknown = sorted(set(loaded) - set(actions) - {"config"})
    if unknown:
        raise UserError(f"{source}: unknown options {unknown}; use the flag names with '_' (see --help)")
    argv = []
    for key, value in loaded.items():
        action = actions[key]
        if value is None:
            continue
        if action.nargs == 0:  # a switch such as --use-gpu
            if not isinstance(value, bool):
                raise UserError(f"{source}: {key} must be true or false, got {value!r}")
            argv += [action.option_strings[0]] if value else []
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [action.option_strings[0], *(str(v) for v in values)]
    return argv


def _parse_config(loaded: dict, source: str) -> dict:
    parser = build_parser()

    def error(message: str):
        raise UserError(f"{source}: {message}")

    parser.error = error
    return {k: v for k, v in vars(parser.parse_args(_config_argv(parser, loaded, source))).items() if v is not None}


def resolve_options(argv: list[str] | None) -> dict:
    """Defaults < --config YAML (typed and checked by the flags' parser) < flags."""
    import yaml

    args = vars(build_parser().parse_args(argv))
    options = dict(DEFAULTS)
    if args.get("config"):
        try:
            loaded = yaml.safe_load(storage.read_bytes(args["config"])) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{args['config']}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{args['config']}: expected a mapping of option names to values")
        from_file = _parse_config(loaded, args["config"])
        if args.get("epochs") is not None or args.get("max_steps") is not None:
            from_file.pop("epochs", None), from_file.pop("max_steps", None)  # the command line's run length wins
        options.update(from_file)
    options.update({k: v for k, v in args.items() if v is not None and k != "config"})
    for required in ("data", "output"):
        if not options.get(required):
            raise UserError(f"--{required} is required (on the command line or in --config)")
    if options["epochs"] is None and options["max_steps"] is None:
        options["epochs"] = 1
    return options


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


def plan_epochs(options: dict, num_images: int) -> tuple[list[int], int]:
    """(images planned in each epoch, total steps).

    Every epoch holds all images once, or with repeat-factor sampling its exact repeated size
    (`sampling.epoch_sizes`, drawn per (seed, epoch)); a rank trains (size // workers) // batch
    steps of it. --epochs counts such epochs (a fraction of the next one at the end);
    --max-steps stays as given. An epoch with missing or undecodable images ends early when
    its data ends, so the run then takes a few more epochs to its planned step.
    """
    import math

    import numpy as np

    workers, batch = options["num_workers"], options["batch_size"]
    plain_steps = (num_images // workers) // batch
    if plain_steps < 1:
        raise UserError(f"{options['data']}: {num_images} images are fewer than one global batch "
                        f"({workers} workers x {batch}); lower --batch-size or --num-workers")
    wanted = math.ceil(options["epochs"]) + 1 if options["epochs"] else options["max_steps"] // plain_steps + 2
    wanted = min(wanted, 1000)  # sizes for logging; later epochs reuse the last one
    sizes = np.full(wanted, num_images, np.int64)
    if options["repeat_factor_threshold"]:
        from pipelines.evaluation.report import category_image_pairs, train_image_counts
        from pipelines.training.sampling import category_repeat_factors, epoch_sizes

        factors = category_repeat_factors(train_image_counts(options["data"]), num_images,
                                          options["repeat_factor_threshold"])
        sizes = epoch_sizes(category_image_pairs(options["data"]), num_images, factors, options["seed"], range(wanted))
    steps = (sizes // workers) // batch
    if options["max_steps"]:
        return sizes.tolist(), options["max_steps"]
    whole = int(options["epochs"])
    total = int(steps[:whole].sum()) + int(round((options["epochs"] - whole) * steps[whole]))
    return sizes.tolist(), max(1, total)


def worker_resources(options: dict) -> dict[str, float]:
    """What each Ray Train worker reserves besides its GPU (which `use_gpu` adds): the CPUs of
    --cpus-per-worker. Ray Data's decode tasks take only the CPUs nobody reserved, so on a GPU
    node they use the cores left over and never the ones that feed the GPU."""
    cpus = options["cpus_per_worker"]
    if cpus is None:
        cpus = 2 if options["use_gpu"] else 1
    return {"CPU": cpus}


def main(argv: list[str] | None = None) -> int:
    options = resolve_options(argv)
    from jobs.train_init import model_setup
    from jobs.train_records import check_logger, join_metrics, save_config
    from pipelines.formats.shards import check_shards
    from pipelines.training.datasets import training_input_kind, training_manifest

    # Everything a user can get wrong is checked here, before Ray starts.
    kinds = {data: training_input_kind(data) for data in filter(None, (options["data"], options["val_data"]))}
    check_logger(options["logger"])
    manifest = training_manifest(options["data"])
    if kinds[options["data"]] == "shards":
        check_shards(options["data"], manifest)
    categories = manifest.categories
    model, backbone_weights = model_setup(options, categories)
    epoch_sizes, max_steps = plan_epochs(options, manifest.num_images)
    workers, batch = options["num_workers"], options["batch_size"]
    output = storage.resolve(options["output"])
    storage.ensure_dir(output.uri())
    cfg = {
        **options, "model": model, "categories": categories, "backbone_weights": backbone_weights,
        "image_size": model["min_size"], "max_steps": max_steps, "epoch_sizes": epoch_sizes,
        "lr": options["lr"] or 0.01 * workers * batch / 16,
        "warmup_steps": options["warmup_steps"] if options["warmup_steps"] is not None else min(1000, max_steps // 10),
        "threads_per_worker": options["cpus_per_worker"] or max(1, (os.cpu_count() or 1) // workers),
        "output": output.uri(),
    }
    config_uri = save_config(output.uri(), cfg)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.train_loop import train_loop
    from pipelines.ray_runtime import ensure_ray
    from pipelines.training.datasets import detection_dataset

    ensure_ray(options["num_cpus"])
    datasets = {}
    if options["val_data"]:
        datasets["val"], _ = detection_dataset(options["val_data"], image_size=model["min_size"],
                                               max_size=model["max_size"], train=False,
                                               max_pixels=options["max_pixels"])
    print(f"training {options['preset'] if not options['init'] else options['init']} on {manifest.num_images} images "
          f"({len(categories)} classes): {workers} workers x {batch} images, {max_steps} steps "
          f"({(epoch_sizes[0] // workers) // batch}/epoch), lr {cfg['lr']:.4g}; config {config_uri}", flush=True)
    arrow_fs, arrow_path = storage.arrow_filesystem(output.uri())
    trainer = TorchTrainer(
        train_loop, train_loop_config=cfg, datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=options["use_gpu"],
                                     resources_per_worker=worker_resources(options),
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
    metrics_uri = join_metrics(output.uri())
    plot_loss_curve(metrics_uri, output.join("loss_curve.png").uri())
    lines = [json.loads(line) for line in storage.read_bytes(metrics_uri).decode().splitlines() if line]
    last = [r for r in lines if "loss" in r][-1] if any("loss" in r for r in lines) else {}
    val = [r for r in lines if "val_AP" in r][-1:]
    print(f"done: step {max(r.get('step', 0) for r in lines)}, loss {last.get('loss', float('nan')):.4f}"
          + (f", val AP {val[0]['val_AP']:.3f} AP50 {val[0]['val_AP50']:.3f}" if val else "")
          + f"; model {output.join('model.pt').uri()}, checkpoints {result.path}", flush=True)
    return 0


if __name__ == "__main__":
    run(main)
