"""ResNet + FPN producing P3-P7, built from torchvision parts so that state-dict keys match
torchvision's RetinaNet (``backbone.body.*``, ``backbone.fpn.*``).

P6 comes from C5 as in the paper and torchvision v2, or from P5 as in torchvision v1
(``LastLevelP6P7`` picks P5 exactly when its input width equals the FPN width).
"""
from __future__ import annotations

import os
from functools import partial

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from retinanet.config import RetinaNetConfig

_RESNETS = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}
# Stems and stages in the order torchvision unfreezes them (counting from the top).
_STAGES = ["layer4", "layer3", "layer2", "layer1", "conv1"]


def _norm_layer(cfg: RetinaNetConfig):
    if cfg.norm == "frozen_bn":
        return partial(misc_ops.FrozenBatchNorm2d, eps=cfg.bn_eps)
    if cfg.norm == "group_norm":
        return partial(nn.GroupNorm, 32, eps=cfg.bn_eps)
    # sync_bn is built as BatchNorm2d; the training job converts it once DDP is set up.
    return partial(nn.BatchNorm2d, eps=cfg.bn_eps)


def load_body_weights(body: nn.Module, weights: str | os.PathLike | dict) -> None:
    """A torchvision ImageNet ResNet state dict (or its file) into the body, every tensor but `fc`.

    Strict: a file of another depth or norm fails here, naming the tensors, instead of
    training on half-loaded weights.
    """
    state = weights if isinstance(weights, dict) else torch.load(weights, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    expected = {k for k in body.state_dict() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    misfits = sorted(expected ^ set(state)) + sorted(k for k in expected & set(state)
                                                     if body.state_dict()[k].shape != state[k].shape)
    if misfits:
        raise ValueError(f"backbone weights do not fit this ResNet ({len(misfits)} tensors missing, extra or "
                         f"of another shape: {', '.join(misfits[:6])}{' ...' if len(misfits) > 6 else ''})")
    body.load_state_dict(state, strict=False)


def build_backbone(cfg: RetinaNetConfig, weights: str | os.PathLike | dict | None = None) -> BackboneWithFPN:
    """ResNet body + FPN with P3-P7 outputs of `cfg.fpn_channels` channels.

    `weights` optionally loads ImageNet weights for the ResNet body (a torchvision
    ``resnet*.pth`` state dict or its path); the frozen layers follow `cfg.trainable_layers`.
    """
    body = _RESNETS[cfg.backbone](weights=None, norm_layer=_norm_layer(cfg))
    if weights is not None:
        load_body_weights(body, weights)
    trainable = _STAGES[: cfg.trainable_layers] + (["bn1"] if cfg.trainable_layers == 5 else [])
    for name, parameter in body.named_parameters():
        if not any(name.startswith(stage) for stage in trainable):
            parameter.requires_grad_(False)

    c3 = body.inplanes // 4  # layer2 width: 128 (basic blocks) or 512 (bottlenecks)
    in_channels = [c3, c3 * 2, c3 * 4]
    p6_in = cfg.fpn_channels if cfg.p6_from == "p5" else in_channels[-1]
    if cfg.p6_from == "c5" and p6_in == cfg.fpn_channels:
        raise ValueError("p6_from='c5' needs fpn_channels different from the C5 width")
    return BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=in_channels,
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelP6P7(p6_in, cfg.fpn_channels),
    )
