"""The two RetinaNet subnets (classification and box regression), not shared between them,
shared across pyramid levels. Parameter names match torchvision's RetinaNetHead.

With the seesaw classification loss the classification subnet also ends in one objectness
logit per anchor (``objectness``), decoupled from the C class logits.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from retinanet.config import RetinaNetConfig


def _tower(channels: int, depth: int, norm: str | None) -> nn.Sequential:
    norm_layer = partial(nn.GroupNorm, 32) if norm == "group" else None
    tower = nn.Sequential(*[Conv2dNormActivation(channels, channels, norm_layer=norm_layer) for _ in range(depth)])
    for layer in tower.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0.0)
    return tower


def _flatten_levels(outputs: list[torch.Tensor], width: int) -> torch.Tensor:
    """[B, A*K, H, W] per level -> [B, sum(H*W*A), K], location-major like the anchors."""
    flat = []
    for out in outputs:
        b, _, h, w = out.shape
        flat.append(out.view(b, -1, width, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, width))
    return torch.cat(flat, dim=1)


class ClassificationHead(nn.Module):
    def __init__(self, cfg: RetinaNetConfig):
        super().__init__()
        c, a = cfg.fpn_channels, cfg.num_anchors
        self.num_classes = cfg.num_classes
        self.conv = _tower(c, cfg.head_convs, cfg.head_norm)
        self.cls_logits = nn.Conv2d(c, a * cfg.num_classes, kernel_size=3, padding=1)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        # prior_prob 0 means no prior: zero bias, as in the paper's ablation of the initialisation.
        prior_bias = -math.log((1 - cfg.prior_prob) / cfg.prior_prob) if cfg.prior_prob > 0 else 0.0
        self.cosine = cfg.cosine_logits and cfg.cls_loss == "seesaw"
        self.temperature = cfg.cosine_temperature
        if cfg.cls_loss == "seesaw":
            # Objectness carries the focal-loss prior; class logits start uniform.
            nn.init.constant_(self.cls_logits.bias, 0.0)
            self.objectness = nn.Conv2d(c, a, kernel_size=3, padding=1)
            nn.init.normal_(self.objectness.weight, std=0.01)
            nn.init.constant_(self.objectness.bias, prior_bias)
        else:
            nn.init.constant_(self.cls_logits.bias, prior_bias)
            self.objectness = None

    def _class_logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cosine:
            return self.cls_logits(x)
        # Normalized-linear logits: cosine between the feature (per 3x3 window) and each class
        # weight, times a temperature, so that rare classes' weight norms cannot shrink their scores.
        weight = F.normalize(self.cls_logits.weight.flatten(1), dim=1).view_as(self.cls_logits.weight)
        window_norm = F.conv2d(x.pow(2).sum(1, keepdim=True), torch.ones_like(weight[:1, :1]), padding=1)
        cosine = F.conv2d(x, weight, padding=1) / window_norm.clamp_min(1e-12).sqrt()
        return self.temperature * cosine + self.cls_logits.bias[None, :, None, None]

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        towers = [self.conv(f) for f in features]
        logits = _flatten_levels([self._class_logits(t) for t in towers], self.num_classes)
        if self.objectness is None:
            return logits, None
        return logits, _flatten_levels([self.objectness(t) for t in towers], 1).squeeze(-1)


class RegressionHead(nn.Module):
    def __init__(self, cfg: RetinaNetConfig):
        super().__init__()
        c, a = cfg.fpn_channels, cfg.num_anchors
        self.conv = _tower(c, cfg.head_convs, cfg.head_norm)
        self.bbox_reg = nn.Conv2d(c, a * 4, kernel_size=3, padding=1)
        nn.init.normal_(self.bbox_reg.weight, std=0.01)
        nn.init.zeros_(self.bbox_reg.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return _flatten_levels([self.bbox_reg(self.conv(f)) for f in features], 4)


class RetinaNetHead(nn.Module):
    def __init__(self, cfg: RetinaNetConfig):
        super().__init__()
        self.classification_head = ClassificationHead(cfg)
        self.regression_head = RegressionHead(cfg)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor | None]:
        cls_logits, objectness = self.classification_head(features)
        return {"cls_logits": cls_logits, "objectness": objectness,
                "bbox_regression": self.regression_head(features)}
