"""Weights in and out: torchvision's COCO RetinaNets, and the project's own checkpoints.

A project checkpoint is one file readable with ``torch.load(..., weights_only=True)``: the model
state dict (torchvision-compatible keys), the config, the category table (label index -> dataset
category id and name), the step, metrics and versions.
"""
from __future__ import annotations

import io
import os
import re
from typing import BinaryIO

import torch
import torchvision

from retinanet.config import RetinaNetConfig
from retinanet.model import RetinaNet

CHECKPOINT_FORMAT = "retinanet-ray/1"
TORCHVISION_MODELS = ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2")


def torchvision_config(v2: bool, num_classes: int = 91, **overrides) -> RetinaNetConfig:
    """The architecture and inference settings of torchvision's RetinaNet (v1 or v2; 300 detections per image)."""
    values = dict(num_classes=num_classes, backbone="resnet50", fpn_channels=256, norm="frozen_bn",
                  size_divisible=32, anchor_sizes=(32, 64, 128, 256, 512), detections_per_img=300)
    if v2:
        values.update(p6_from="c5", head_norm="group", box_loss="giou")
    else:
        values.update(p6_from="p5", head_norm=None, box_loss="smooth_l1", smooth_l1_beta=0.0)
    return RetinaNetConfig(**{**values, **overrides})


def _coco_categories(num_classes: int) -> list[dict]:
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

    names = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    if num_classes != len(names):
        return [{"id": i, "name": f"class_{i}"} for i in range(num_classes)]
    return [{"id": i, "name": name} for i, name in enumerate(names)]


def _upgrade_keys(state: dict) -> dict:
    """Old torchvision layouts (hub checkpoints): head ``conv.{2i}`` -> ``conv.{i}.0`` and FPN
    ``inner_blocks.{i}.weight`` -> ``inner_blocks.{i}.0.weight``; BN counters dropped."""
    upgraded = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        m = re.match(r"(head\.(?:classification|regression)_head\.conv\.)(\d+)\.(weight|bias)$", key)
        if m:
            key = f"{m.group(1)}{int(m.group(2)) // 2}.0.{m.group(3)}"
        key = re.sub(r"(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\2", key)
        upgraded[key] = value
    return upgraded


def from_torchvision(source, bn_eps: float | None = None) -> RetinaNet:
    """A RetinaNet holding torchvision's weights, giving torchvision's detections.

    `source`: "retinanet_resnet50_fpn" or "retinanet_resnet50_fpn_v2" (downloads the COCO weights,
    only where internet exists), a path to a saved torchvision state dict, or a state dict. v1
    or v2 is read off the weights. `bn_eps` defaults to torchvision's: 0 for the COCO_V1 weights
    (named, or a hub file in the old key layout), 1e-5 otherwise.
    """
    old_layout = False
    if isinstance(source, str) and source in TORCHVISION_MODELS:
        from torchvision.models.detection import RetinaNet_ResNet50_FPN_V2_Weights, RetinaNet_ResNet50_FPN_Weights

        v2_name = source.endswith("_v2")
        weights = (RetinaNet_ResNet50_FPN_V2_Weights if v2_name else RetinaNet_ResNet50_FPN_Weights).COCO_V1
        state = weights.get_state_dict(progress=True, check_hash=True)
        old_layout = not v2_name
    elif isinstance(source, (str, os.PathLike)):
        state = torch.load(source, map_location="cpu", weights_only=True)
    elif isinstance(source, dict):
        state = source
    else:
        raise TypeError(f"from_torchvision: expected a model name, a path or a state dict, got {type(source).__name__}")
    old_layout = old_layout or "head.classification_head.conv.0.weight" in state
    state = _upgrade_keys(state)
    if "head.classification_head.cls_logits.weight" not in state:
        raise ValueError("not a torchvision RetinaNet state dict (no head.classification_head.cls_logits.weight)")
    v2 = state["backbone.fpn.extra_blocks.p6.weight"].shape[1] != state["backbone.fpn.extra_blocks.p6.weight"].shape[0]
    num_classes = state["head.classification_head.cls_logits.weight"].shape[0] // 9
    eps = bn_eps if bn_eps is not None else (0.0 if old_layout and not v2 else 1e-5)
    model = RetinaNet(torchvision_config(v2, num_classes, bn_eps=eps), categories=_coco_categories(num_classes))
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_checkpoint(model: RetinaNet, destination: str | os.PathLike | BinaryIO, *, step: int = 0,
                    metrics: dict | None = None, extra: dict | None = None) -> None:
    """Write the project checkpoint (see module docstring) to a path or a binary file object."""
    model = getattr(model, "module", model)  # unwrap DDP
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "categories": [dict(c) for c in model.categories],
        "step": int(step),
        "metrics": dict(metrics or {}),
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
        **(extra or {}),
    }
    torch.save(payload, destination)


def checkpoint_bytes(model: RetinaNet, **kwargs) -> bytes:
    buffer = io.BytesIO()
    save_checkpoint(model, buffer, **kwargs)
    return buffer.getvalue()


def load_checkpoint(source: str | os.PathLike | BinaryIO | bytes | dict, map_location="cpu") -> tuple[RetinaNet, dict]:
    """A project checkpoint or a torchvision RetinaNet state dict -> (model in eval mode, payload)."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    payload = source if isinstance(source, dict) else torch.load(source, map_location=map_location, weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        if "head.classification_head.cls_logits.weight" in payload:
            model = from_torchvision(payload)
            return model, {"format": "torchvision", "step": 0, "categories": model.categories}
        raise ValueError(f"not a retinanet-ray checkpoint (format {payload.get('format')!r}) "
                         "nor a torchvision state dict")
    model = RetinaNet(RetinaNetConfig.from_dict(payload["config"]), categories=payload["categories"])
    model.load_state_dict(payload["model"], strict=True)
    return model.eval(), payload


# ------------------------------------------------------------------ pretrained weights for training
# The ImageNet weights torchvision's detectors start from (the paper: ImageNet-pretrained ResNets).
IMAGENET_WEIGHTS = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1", "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
                    "resnet50": "ResNet50_Weights.IMAGENET1K_V1", "resnet101": "ResNet101_Weights.IMAGENET1K_V1"}


def is_weights_name(name: str) -> bool:
    """'ResNet50_Weights.IMAGENET1K_V1'-style names (a torchvision weights enum), as opposed to files."""
    return bool(re.fullmatch(r"\w+_Weights\.\w+", name))


def named_weights(name: str):
    """The torchvision weights enum called `name`; ValueError naming the expected form otherwise."""
    try:
        return torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise ValueError(f"unknown torchvision weights {name!r}; "
                         f"expected e.g. {IMAGENET_WEIGHTS['resnet50']}") from None


def fine_tune_config(donor: RetinaNetConfig, **changes) -> RetinaNetConfig:
    """The donor's architecture (backbone, P6 source, norms, BN eps, anchors) with `changes`
    to what training may change: class count, losses, input sizes."""
    architecture = {"backbone", "fpn_channels", "p6_from", "norm", "bn_eps", "head_convs", "head_norm",
                    "anchor_sizes", "aspect_ratios", "image_mean", "image_std"}
    clash = sorted(k for k in changes if k in architecture and changes[k] != getattr(donor, k))
    if clash:
        raise ValueError(f"fine-tuning keeps the initial model's architecture; cannot change {clash}")
    return donor.replace(**changes)


def transfer_weights(donor: RetinaNet, model: RetinaNet) -> list[str]:
    """Copy every tensor of `donor` into `model`; returns the names left new.

    Only the class logits may stay new (when the class counts differ), and with the seesaw
    loss its objectness layer and class counts; any other tensor that does not transfer is an
    error listing them all, never a silent partial load.
    """
    source, target = donor.state_dict(), model.state_dict()
    shared = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    new = sorted(set(target) - set(shared))
    unused = sorted(set(source) - set(shared))
    may_differ = ("head.classification_head.cls_logits.", "head.classification_head.objectness.", "class_counts")
    refused = [k for k in new + unused if not k.startswith(may_differ)]
    if refused:
        raise ValueError(f"{len(refused)} tensors of the initial weights do not transfer: {', '.join(refused[:12])}"
                         + (" ..." if len(refused) > 12 else ""))
    model.load_state_dict(shared, strict=False)
    return new
