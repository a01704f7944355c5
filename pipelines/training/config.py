"""The options of a training run, typed, with their defaults in one place.

`TrainConfig` is what every part of the training engine reads: the driver builds it from the
flags and an optional `--config` YAML file, fills in what follows from the data and the model
(`resolved`), saves it beside the run (config.yaml) and hands it to every worker. Its field
defaults are the only defaults: the flags take theirs from it and their help shows them.

A YAML file's values go through the flags' own parser (`lr: 1e-3` is a number, `preset: r18` a
bad choice), before Ray starts; precedence is defaults < file < flags.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, fields

from pipelines import storage
from pipelines.errors import UserError
from pipelines.images.pixel_limit import DEFAULT_MAX_PIXELS
from retinanet.config import RetinaNetConfig

# Loss knobs for the paper's ablations (bench/ablation.py); None keeps the preset's value.
LOSS_OPTIONS = ("focal_gamma", "focal_alpha", "prior_prob", "ohem_batch", "ohem_nms", "ohem_ratio")


@dataclass
class TrainConfig:
    """A run's options (the flags, named with '_') and, below them, what the driver resolves."""

    data: str | None = None
    output: str | None = None
    val_data: str | None = None
    preset: str = "tiny"
    num_workers: int = 2  # with --num-workers MIN:MAX, MAX (min_workers below holds MIN)
    use_gpu: bool = False
    batch_size: int = 8
    global_batch: int | None = None  # resolved: batch_size x num_workers (the most workers) when not given
    epochs: float | None = None  # neither epochs nor max_steps given: 1 epoch
    max_steps: int | None = None  # resolved: the run's total steps
    lr: float | None = None  # resolved: 0.01 x global batch / 16 when not given
    image_size: int | None = None  # resolved: the model's min_size
    max_size: int | None = None
    amp: str | None = None
    init: str | None = None
    checkpoint_every: int = 100
    keep: int = 3
    max_failures: int = 0
    cls_loss: str = "focal"
    focal_gamma: float | None = None
    focal_alpha: float | None = None
    prior_prob: float | None = None
    ohem_batch: int | None = None
    ohem_nms: float | None = None
    ohem_ratio: float | None = None
    repeat_factor_threshold: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    shuffle_window_mb: int = 256
    scale_jitter: list[float] | None = None
    warmup_steps: int | None = None  # resolved: min(1000, steps / 10) when not given
    weight_decay: float = 1e-4
    log_every: int = 20
    seed: int = 0
    name: str = "retinanet"
    placement: str = "PACK"
    num_cpus: int | None = None
    cpus_per_worker: int | None = None
    backbone_weights: str | None = None  # resolved: the weights to load, or None
    norm: str | None = None
    logger: str = "tensorboard"
    elastic_check_s: float = 60.0  # Ray Train's elastic_resize_monitor_interval_s
    fail_at_step: int | None = None  # pipelines.training.test_hooks
    slow_steps: float | None = None  # pipelines.training.test_hooks
    debug_dir: str | None = None  # pipelines.training.test_hooks
    min_workers: int | None = None  # from --num-workers MIN:MAX; None: a fixed group of num_workers
    # Resolved on the driver before the workers start; never flags.
    model: dict | None = None  # RetinaNetConfig.to_dict()
    categories: list[dict] | None = None
    epoch_sizes: list[int] | None = None  # images planned in each epoch (pipelines.training.epochs)
    threads_per_worker: int | None = None

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def scaling_workers(self) -> int | tuple[int, int]:
        """What Ray Train's `ScalingConfig(num_workers=...)` gets: N, or the elastic (MIN, MAX)."""
        return self.num_workers if self.min_workers is None else (self.min_workers, self.num_workers)

    def world_sizes(self) -> range:
        """Every world size the run may train at."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)

    def accumulation(self, world: int) -> int:
        """Micro-batches of --batch-size each rank sums into one optimizer step at `world`
        workers, so that every step trains --global-batch images at any world size (and the
        schedule's steps mean the same)."""
        return (self.global_batch or self.batch_size * self.num_workers) // (world * self.batch_size)

    def check_global_batch(self) -> None:
        """The rule: --global-batch is a multiple of batch-size x W for every W in [MIN, MAX],
        so no world size the group may shrink or grow to trains a different number of images
        per step (refused before Ray starts otherwise)."""
        if self.global_batch < 1 or self.batch_size < 1:
            raise UserError(f"--global-batch {self.global_batch} and --batch-size {self.batch_size} must be >= 1")
        bad = [w for w in self.world_sizes() if self.global_batch % (w * self.batch_size)]
        if bad:
            given = "" if self.global_batch != self.batch_size * self.num_workers else " (batch size x MAX)"
            need = self.batch_size
            for w in self.world_sizes():
                need = _lcm(need, w * self.batch_size)
            raise UserError(f"--global-batch {self.global_batch}{given} is not a multiple of --batch-size "
                            f"{self.batch_size} x {bad[0]} workers (every world size of --num-workers must divide it); "
                            f"use a multiple of {need}")

    def resolved(self, *, model: dict, categories: list[dict], backbone_weights: str | None,
                 epoch_sizes: list[int], max_steps: int) -> TrainConfig:
        """The config the workers run: the model, the epoch plan, and the defaults that follow from them."""
        values = self.to_dict()
        global_batch = self.global_batch or self.batch_size * self.num_workers
        values.update(global_batch=global_batch,
            model=model, categories=categories, backbone_weights=backbone_weights, image_size=model["min_size"],
            max_steps=max_steps, epoch_sizes=epoch_sizes, lr=self.lr or 0.01 * global_batch / 16,
            warmup_steps=self.warmup_steps if self.warmup_steps is not None else min(1000, max_steps // 10),
            threads_per_worker=self.cpus_per_worker or max(1, (os.cpu_count() or 1) // self.num_workers),
            output=storage.resolve(self.output).uri())
        return TrainConfig(**values)

    def worker_resources(self) -> dict[str, float]:
        """What each Ray Train worker reserves besides its GPU (which `use_gpu` adds): the CPUs of
        --cpus-per-worker. Ray Data's decode tasks take only the CPUs nobody reserved, so on a GPU
        node they use the cores left over and never the ones that feed the GPU."""
        cpus = self.cpus_per_worker
        if cpus is None:
            cpus = 2 if self.use_gpu else 1
        return {"CPU": cpus}


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def _workers(text: str) -> int | tuple[int, int]:
    """--num-workers: N (a fixed group) or MIN:MAX (elastic: Ray starts at MIN, grows to MAX)."""
    low, sep, high = text.partition(":")
    try:
        values = (int(low), int(high)) if sep else (int(low),)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or MIN:MAX") from None
    if min(values) < 1 or values[0] > values[-1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 <= MIN <= MAX")
    return values[0] if len(values) == 1 or values[0] == values[1] else values


DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
MODEL = RetinaNetConfig()  # the loss knobs' defaults, shown in their help


def _number(kind: type, low: float, high: float = float("inf"), low_open: bool = False, high_open: bool = False):
    """An argparse type: `kind` within [low, high] (open ends where asked); argparse exits 2 otherwise."""
    def parse(text: str):
        value = kind(text)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {interval}")
        return value
    return parse


def build_parser(prog: str = "python -m jobs.train", description: str | None = None) -> argparse.ArgumentParser:
    """The flags of `TrainConfig` (defaults taken from it) and --config."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="training data: a shards folder from jobs.prepare, or a COCO layout (URI)")
    p.add_argument("--val-data", help="validation data (same forms); COCO AP on it after each epoch")
    p.add_argument("--output", help="where checkpoints, model.pt, metrics.jsonl and loss_curve.png go (URI)")
    p.add_argument("--config", help="YAML file with any of these options (flags override it)")
    p.add_argument("--preset", choices=["tiny", "r50", "r101"], help="model preset (default %(default)s)")
    p.add_argument("--num-workers", type=_workers, help="Ray Train workers, each one DDP rank (default %(default)s); "
                   "MIN:MAX: elastic, starts with MIN available and restarts from the last checkpoint with fewer or "
                   "more workers as nodes go and come")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL, channels_last")
    p.add_argument("--batch-size", type=int, help="images per worker per micro-batch (default %(default)s)")
    p.add_argument("--global-batch", type=int, help="images per optimizer step over all workers (default batch size "
                   "x workers, x MAX when elastic); each rank sums its gradients over global / (workers x batch) "
                   "micro-batches, so a step means the same at any world size")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="run length in passes over the data (default 1)")
    length.add_argument("--max-steps", type=int, help="run length in optimizer steps")
    p.add_argument("--lr", type=float, help="base learning rate (default 0.01 x global batch / 16)")
    p.add_argument("--image-size", type=int, help="shorter side after resize (default: the preset's, 800 for r50)")
    p.add_argument("--max-size", type=int, help="longer side at most (default image size x 1333/800)")
    p.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], help="mixed precision on GPU (bf16)")
    p.add_argument("--init", help="fine-tune a whole detector: torchvision:retinanet_resnet50_fpn[_v2], a torchvision "
                   "state-dict URI or a checkpoint URI (its architecture is kept)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default %(default)s)")
    p.add_argument("--keep", type=int, help="checkpoints kept (default %(default)s)")
    p.add_argument("--max-failures", type=int, help="worker-group restarts from the last checkpoint (default "
                   "%(default)s); a lost node is one failure, a growth of an elastic group none")
    p.add_argument("--elastic-check-s", type=_number(float, 0), help="elastic groups: seconds between looks for room "
                   "to grow (a growth restarts the group from its last checkpoint; default %(default)s)")
    p.add_argument("--cls-loss", choices=["focal", "seesaw", "ohem"], help="classification loss (default %(default)s; "
                   "seesaw: long-tailed data; ohem: the paper's hard-mining baseline)")
    p.add_argument("--focal-gamma", type=_number(float, 0),
                   help=f"focal loss gamma (default {MODEL.focal_gamma:g}; 0 = alpha-balanced CE)")
    p.add_argument("--focal-alpha", type=_number(float, 0, 1), help=f"focal loss alpha (default {MODEL.focal_alpha:g})")
    p.add_argument("--prior-prob", type=_number(float, 0, 1, high_open=True),
                   help=f"prior for the class-logit bias (default {MODEL.prior_prob:g}; 0 = zero bias)")
    p.add_argument("--ohem-batch", type=_number(int, 1),
                   help=f"--cls-loss ohem: anchors kept per image (default {MODEL.ohem_batch})")
    p.add_argument("--ohem-nms", type=_number(float, 0, 1, low_open=True),
                   help=f"--cls-loss ohem: IoU of the NMS by loss (default {MODEL.ohem_nms:g})")
    p.add_argument("--ohem-ratio", type=_number(float, 0, low_open=True),
                   help="--cls-loss ohem: negatives per positive (3 = OHEM 1:3; default: none)")
    p.add_argument("--repeat-factor-threshold", type=float,
                   help="LVIS repeat-factor sampling for long-tailed data, t (e.g. 0.001); off by default")
    p.add_argument("--max-pixels", type=int, help="pixel limit of one decode, as in jobs.prepare and jobs.infer "
                   "(default %(default)s, fits the memory a decode declares); larger non-JPEG images are skipped and "
                   "counted as undecodable, larger JPEGs decode reduced")
    p.add_argument("--shuffle-window-mb", type=_number(int, 1), help="each epoch's order: units of 64 images of all "
                   "shards permuted, then windows of this many MB of encoded images permuted inside, one read task "
                   "each (default %(default)s; a dataset smaller than a window is permuted whole)")
    p.add_argument("--scale-jitter", type=float, nargs=2, metavar=("LO", "HI"), help="random image scale factor range")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default min(1000, steps / 10))")
    p.add_argument("--weight-decay", type=float, help="SGD weight decay (default %(default)s)")
    p.add_argument("--log-every", type=int, help="steps between metrics lines (default %(default)s)")
    p.add_argument("--seed", type=int, help="seed for weights, file order and augmentation (default %(default)s)")
    p.add_argument("--name", help="run name under --output; rerun with the same name to resume (default %(default)s)")
    p.add_argument("--placement", choices=["PACK", "SPREAD", "STRICT_SPREAD"],
                   help="worker placement over nodes (default %(default)s; SPREAD puts workers on different nodes)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray instance (default: max(4, cores))")
    p.add_argument("--cpus-per-worker", type=_number(int, 0),
                   help="logical CPUs each training worker reserves, so that decode tasks never take the cores that "
                   "run its step (default 1; with --use-gpu 2: the loop, collate and host-to-device copies; Ray's own "
                   "default for a GPU worker is 0). On CPU it is also the worker's torch threads when given")
    p.add_argument("--backbone-weights", help="ImageNet weights of the ResNet: a torchvision name (r50/r101 default "
                   "ResNet50_Weights.IMAGENET1K_V1 / ResNet101_...), a state-dict URI, or none")
    p.add_argument("--norm", choices=["frozen_bn", "bn", "sync_bn", "group_norm"],
                   help="backbone norm (default: the preset's; without pretrained weights sync_bn or group_norm)")
    p.add_argument("--logger", choices=["tensorboard", "mlflow", "none"],
                   help="rank 0's metrics logger besides metrics.jsonl (default %(default)s: events under --output)")
    p.add_argument("--fail-at-step", type=int, help=argparse.SUPPRESS)  # pipelines.training.test_hooks
    p.add_argument("--slow-steps", type=float, help=argparse.SUPPRESS)  # pipelines.training.test_hooks
    p.add_argument("--debug-dir", help=argparse.SUPPRESS)  # pipelines.training.test_hooks
    p.set_defaults(**{a.dest: DEFAULTS[a.dest] for a in p._actions if a.dest in DEFAULTS})
    return p


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    """The options `argv` sets, without the defaults: argparse fills in a default only where the
    namespace lacks the attribute, so a namespace of placeholders tells given from default."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    return {k: v for k, v in vars(parser.parse_args(argv, namespace)).items() if v is not unset and v is not None}


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


def _from_file(uri: str) -> dict:
    """The options a --config YAML file sets, typed and checked by the flags' parser."""
    import yaml

    try:
        loaded = yaml.safe_load(storage.read_bytes(uri)) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{uri}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{uri}: expected a mapping of option names to values")
    parser = build_parser()

    def error(message: str):
        raise UserError(f"{uri}: {message}")

    parser.error = error
    return _given(parser, _config_argv(parser, loaded, uri))


def resolve_options(argv: list[str] | None, parser: argparse.ArgumentParser | None = None) -> TrainConfig:
    """Defaults < --config YAML (typed and checked by the flags' parser) < flags."""
    given = _given(parser or build_parser(), argv)
    options = dict(DEFAULTS)
    if given.get("config"):
        from_file = _from_file(given["config"])
        if "epochs" in given or "max_steps" in given:
            from_file.pop("epochs", None), from_file.pop("max_steps", None)  # the command line's run length wins
        options.update(from_file)
    options.update(given)
    options.pop("config", None)
    for required in ("data", "output"):
        if not options.get(required):
            raise UserError(f"--{required} is required (on the command line or in --config)")
    if options["epochs"] is None and options["max_steps"] is None:
        options["epochs"] = 1
    if isinstance(options["num_workers"], tuple):
        options["min_workers"], options["num_workers"] = options["num_workers"]
    cfg = TrainConfig(**options)
    if cfg.global_batch is None:
        cfg.global_batch = cfg.batch_size * cfg.num_workers
    cfg.check_global_batch()
    return cfg
