"""Anchors for P3-P7: 3 scales x 3 aspect ratios per location, in torchvision's order and rounding.

torchvision's `AnchorGenerator` builds the cell anchors and grids; we keep its exact arithmetic
(including stride = padded size // feature size) so torchvision checkpoints line up, but build
the anchors once per padded batch shape instead of once per image.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator


def anchor_sizes(base_sizes: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """Per level: base x {2^0, 2^(1/3), 2^(2/3)}, truncated to int as torchvision does."""
    return tuple((s, int(s * 2 ** (1.0 / 3)), int(s * 2 ** (2.0 / 3))) for s in base_sizes)


class Anchors(nn.Module):
    """Anchor boxes [A, 4] (xyxy, padded-image pixels) for a padded batch shape, cached."""

    def __init__(self, base_sizes: tuple[int, ...], aspect_ratios: tuple[float, ...]):
        super().__init__()
        self.generator = AnchorGenerator(anchor_sizes(base_sizes), (tuple(aspect_ratios),) * len(base_sizes))
        self._cache: dict[tuple, tuple[torch.Tensor, list[int]]] = {}

    @property
    def num_per_location(self) -> int:
        return self.generator.num_anchors_per_location()[0]

    def forward(self, image_shape: tuple[int, int], grid_sizes: list[tuple[int, int]],
                device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
        """All anchors concatenated over levels, and the number of anchors per level."""
        key = (tuple(image_shape), tuple(map(tuple, grid_sizes)), device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            self.generator.set_cell_anchors(dtype, device)
            strides = [[torch.tensor(image_shape[0] // g[0], device=device),
                        torch.tensor(image_shape[1] // g[1], device=device)] for g in grid_sizes]
            per_level = self.generator.grid_anchors([list(g) for g in grid_sizes], strides)
            cached = (torch.cat(per_level).to(dtype), [len(a) for a in per_level])
            if len(self._cache) > 32:
                self._cache.clear()
            self._cache[key] = cached
        return cached
