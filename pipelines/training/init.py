"""Where a training run's weights start: ImageNet backbones, or a whole detector to fine-tune.

The driver resolves and checks everything here before Ray starts (a weights file that does not
exist, weights that cannot be downloaded, frozen BatchNorm without pretrained statistics are
user errors in one line); each worker then builds the same model with `initial_model`.

- `--backbone-weights NAME|URI|none`: a torchvision weights enum name (downloaded by torchvision
  where the cluster has internet) or a torchvision ResNet state dict on any storage. r50/r101
  default to ImageNet weights with frozen BN and the stem and layer1 frozen, as the paper does.
- `--init torchvision:retinanet_resnet50_fpn[_v2]` or a URI (a torchvision RetinaNet state dict
  or a retinanet-ray checkpoint): the model takes the donor's exact architecture and every one
  of its tensors (the class logits stay new only when the class count differs).
"""
from __future__ import annotations

import io
import socket

import torch

import retinanet
from pipelines import storage
from pipelines.errors import UserError
from pipelines.training.config import LOSS_OPTIONS, TrainConfig
from retinanet import weights as model_weights

TORCHVISION_PREFIX = "torchvision:"
NO_WEIGHTS = "none"


def _download_error(what: str, url: str, exc: Exception) -> UserError:
    return UserError(f"{what}: cannot download {url} ({type(exc).__name__}: {str(exc).strip()[:120]}); where there "
                     f"is no internet, copy that file to storage the job can read and pass its URI instead")


def _fetch_named(name: str, what: str) -> dict:
    """Download named torchvision weights into the hub cache (or find them there)."""
    try:
        enum = model_weights.named_weights(name)
    except ValueError as exc:
        raise UserError(f"{what}: {exc}") from None
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except OSError as exc:  # URLError, timeouts, a bad hash
        raise _download_error(what, enum.url, exc) from None
    except RuntimeError as exc:  # check_hash mismatch
        raise _download_error(what, enum.url, exc) from None
    finally:
        socket.setdefaulttimeout(saved)


def _read_state(uri: str, what: str) -> dict:
    if not storage.exists(uri):
        raise UserError(f"{what}: {uri} not found; give a state-dict file (local path or s3://...)")
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{what}: {uri} is not a torch state dict ({type(exc).__name__})") from None


def backbone_state(spec: str) -> dict:
    """State dict of --backbone-weights `spec` (an enum name or a URI)."""
    what = f"--backbone-weights {spec}"
    return _fetch_named(spec, what) if model_weights.is_weights_name(spec) else _read_state(spec, what)


def donor_model(init: str) -> retinanet.RetinaNet:
    """The model --init names, with its own architecture and weights."""
    what = f"--init {init}"
    if init.startswith(TORCHVISION_PREFIX):
        name = init.removeprefix(TORCHVISION_PREFIX)
        if name not in model_weights.TORCHVISION_MODELS:
            raise UserError(f"{what}: expected torchvision:{' or torchvision:'.join(model_weights.TORCHVISION_MODELS)}")
        from torchvision.models.detection import RetinaNet_ResNet50_FPN_V2_Weights, RetinaNet_ResNet50_FPN_Weights

        enum = (RetinaNet_ResNet50_FPN_V2_Weights if name.endswith("_v2") else RetinaNet_ResNet50_FPN_Weights).COCO_V1
        _fetch_named(f"{type(enum).__name__}.{enum.name}", what)  # into the cache, or a one-line error
        return model_weights.from_torchvision(name)
    try:
        return model_weights.load_checkpoint(_read_state(init, what))[0]
    except ValueError as exc:
        raise UserError(f"{what}: {exc}") from None


def training_overrides(cfg: TrainConfig, categories: list[dict]) -> dict:
    """Model config fields the run sets whatever its starting weights: classes, losses, input size."""
    overrides = {"num_classes": len(categories), "cls_loss": cfg.cls_loss}
    overrides.update({k: getattr(cfg, k) for k in LOSS_OPTIONS if getattr(cfg, k) is not None})
    if cfg.image_size:
        overrides["min_size"] = cfg.image_size
        overrides["max_size"] = cfg.max_size or int(round(cfg.image_size * 1333 / 800))
    return overrides


def model_setup(cfg: TrainConfig, categories: list[dict]) -> tuple[dict, str | None]:
    """(model config as a dict, --backbone-weights to load or None), checked as a user would be told.

    Runs on the driver; downloads or reads the weights once, so a missing file or no internet
    fails here, before Ray starts.
    """
    overrides = training_overrides(cfg, categories)
    if cfg.init:
        if cfg.norm or cfg.backbone_weights:
            raise UserError("--init brings its own backbone and norm; drop --backbone-weights/--norm")
        try:
            model = model_weights.fine_tune_config(donor_model(cfg.init).config, **overrides)
        except ValueError as exc:
            raise UserError(f"--init {cfg.init}: {exc}") from None
        return model.to_dict(), None
    if cfg.norm:
        overrides["norm"] = cfg.norm
    model = retinanet.preset(cfg.preset, **overrides)
    spec = cfg.backbone_weights
    if spec is None and model.norm == "frozen_bn":
        spec = model_weights.IMAGENET_WEIGHTS[model.backbone]  # the paper: ImageNet-pretrained, BN frozen
    if spec in (None, NO_WEIGHTS):
        if model.norm == "frozen_bn":
            raise UserError(f"--preset {cfg.preset}: frozen BatchNorm needs pretrained statistics; pass "
                            f"--backbone-weights {model_weights.IMAGENET_WEIGHTS[model.backbone]} (or a state-dict "
                            f"file), or train from scratch with --norm sync_bn or --norm group_norm (all layers "
                            f"trainable)")
        return model.replace(trainable_layers=5).to_dict(), None  # from scratch: nothing stays frozen
    try:
        retinanet.RetinaNet(model, backbone_weights=backbone_state(spec))  # fails now on a file that does not fit
    except ValueError as exc:
        raise UserError(f"--backbone-weights {spec}: {exc}") from None
    return model.to_dict(), spec


def initial_model(cfg: TrainConfig) -> retinanet.RetinaNet:
    """The model a worker starts from (before any checkpoint of the run is loaded)."""
    config = retinanet.RetinaNetConfig.from_dict(cfg.model)
    if cfg.init:
        model = retinanet.RetinaNet(config, categories=cfg.categories)
        model_weights.transfer_weights(donor_model(cfg.init), model)
        return model
    weights = backbone_state(cfg.backbone_weights) if cfg.backbone_weights else None
    return retinanet.RetinaNet(config, categories=cfg.categories, backbone_weights=weights)
