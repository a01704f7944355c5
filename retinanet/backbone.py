"""ResNet + FPN producing P3-P7, built from torchvision parts so that state-dict keys match
torchvision's RetinaNet (``backbone.body.*``, ``backbone.fpn.*``).

P6 comes from C5 as in the paper and torchvision v2, or from P5 as in torchvision v1
(``LastLevelP6P7`` picks P5 exactly when its input width equals the FPN width).
"""
from __future__ import annotations

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
    # sync_bn is built as BatchNorm2d; the training job converts it once DDP is set up.
    return partial(nn.BatchNorm2d, eps=cfg.bn_eps)


def build_backbone(cfg: RetinaNetConfig, weights_path: str | None = None) -> BackboneWithFPN:
    """ResNet body + FPN with P3-P7 outputs of `cfg.fpn_channels` channels.

    `weights_path` optionally loads ImageNet weights for the ResNet body (a torchvision
    ``resnet*.pth`` state dict); then the frozen layers follow `cfg.trainable_layers`.
    """
    body = _RESNETS[cfg.backbone](weights=None, norm_layer=_norm_layer(cfg))
    if weights_path is not None:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        body.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
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
