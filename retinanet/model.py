"""The RetinaNet module: backbone + FPN, anchors, the two subnets, losses and post-processing.

`forward` works on a normalized, padded batch (what the data pipeline's collate produces) and
returns losses in training, detections in eval. `predict` is the convenience path for a list of
raw images of any sizes: it resizes, normalizes and pads exactly like torchvision's
`GeneralizedRCNNTransform` and maps boxes back to each input's own pixels.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from retinanet.anchors import Anchors
from retinanet.backbone import build_backbone
from retinanet.config import RetinaNetConfig
from retinanet.head import RetinaNetHead
from retinanet.losses import detection_losses
from retinanet.postprocess import box_coder, feature_grid_sizes, postprocess_detections


class RetinaNet(nn.Module):
    def __init__(self, cfg: RetinaNetConfig, categories: list[dict] | None = None,
                 backbone_weights=None):
        super().__init__()
        self.config = cfg
        self.backbone = build_backbone(cfg, backbone_weights)
        self.anchors = Anchors(cfg.anchor_sizes, cfg.aspect_ratios)
        self.head = RetinaNetHead(cfg)
        self.box_coder = box_coder()
        if cfg.cls_loss == "seesaw":
            # Cumulative positive-anchor counts per class; a buffer so checkpoints keep them.
            self.register_buffer("class_counts", torch.zeros(cfg.num_classes, dtype=torch.float64))
        else:
            self.class_counts = None
        self.categories = categories or [{"id": i, "name": f"class_{i}"} for i in range(cfg.num_classes)]
        if len(self.categories) != cfg.num_classes:
            raise ValueError(f"{len(self.categories)} categories for a {cfg.num_classes}-class model")

    def forward(self, images: torch.Tensor, image_sizes, targets: dict | None = None):
        """images: [B, 3, H, W] normalized and padded; image_sizes: [B, 2] (h, w) before padding.

        targets (training): {"boxes": [B, M, 4] xyxy, "labels": [B, M], "num_boxes": [B]} with
        optional "image_id" [B] for error messages; rows past num_boxes are padding.
        """
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor [B, 3, H, W], got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        image_sizes = torch.as_tensor(image_sizes, dtype=torch.int64)
        if image_sizes.shape != (images.shape[0], 2):
            raise ValueError(f"image_sizes must be [B, 2] = [{images.shape[0]}, 2], got {tuple(image_sizes.shape)}")
        outputs = self.network(images)
        anchors, level_sizes = self.anchors(tuple(images.shape[-2:]), feature_grid_sizes(*images.shape[-2:]),
                                            images.device, torch.float32)
        if self.training:
            if targets is None:
                raise ValueError("training forward needs targets (boxes, labels, num_boxes)")
            return detection_losses(outputs, anchors, targets, self.config, self.box_coder, self.class_counts)
        return postprocess_detections(outputs, anchors, level_sizes, image_sizes, self.config, self.box_coder)

    def network(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Backbone, FPN and both subnets on a normalized batch: the part that every runtime
        runs and `retinanet.export` exports (anchors, decoding and NMS stay outside)."""
        return self.head(list(self.backbone(images).values()))

    def transform(self, min_size: int | None = None, max_size: int | None = None) -> GeneralizedRCNNTransform:
        cfg = self.config
        return GeneralizedRCNNTransform(min_size or cfg.min_size, max_size or cfg.max_size, list(cfg.image_mean),
                                        list(cfg.image_std), size_divisible=cfg.size_divisible)

    @torch.inference_mode()
    def predict(self, images: list[torch.Tensor], min_size: int | None = None,
                max_size: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Detect objects in CHW images (uint8 0-255 or float 0-1) of any sizes.

        Returns per image `boxes` [N, 4] xyxy in that image's pixels, `scores`, `labels`
        (contiguous class index; `self.categories[label]` names it).
        """
        device = next(self.parameters()).device
        prepared = []
        for i, image in enumerate(images):
            if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
                raise ValueError(f"image {i}: expected a CHW tensor with 3 channels, got "
                                 f"{tuple(image.shape) if torch.is_tensor(image) else type(image).__name__}")
            image = image.to(device)
            prepared.append(image.float() / 255.0 if image.dtype == torch.uint8 else image.float())
        if not prepared:
            return []
        was_training = self.training
        self.eval()
        try:
            transform = self.transform(min_size, max_size).eval()
            batch, _ = transform(prepared)
            detections = self.forward(batch.tensors, batch.image_sizes)
            return transform.postprocess(detections, batch.image_sizes, [tuple(im.shape[-2:]) for im in prepared])
        finally:
            self.train(was_training)
