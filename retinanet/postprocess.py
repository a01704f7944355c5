"""Detections from head outputs, batched over images.

Per level: the top-k candidates (default 1000) of each image, kept when their score passes the
threshold (0.05); then decode, clip to the image, class-wise NMS (0.5) and the best N per image.
torchvision does the same per image and per level in Python loops; here top-k, thresholding,
decoding and clipping are each one tensor operation over the whole batch, and NMS is one call
per image (see `classwise_nms`).
"""
from __future__ import annotations

import math

import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms

from retinanet.anchors import Anchors
from retinanet.config import RetinaNetConfig


def box_coder() -> BoxCoder:
    """The paper's (and torchvision's) box coding: unit weights, log-size deltas clipped at 1000/16."""
    return BoxCoder((1.0, 1.0, 1.0, 1.0), bbox_xform_clip=math.log(1000.0 / 16))


def feature_grid_sizes(height: int, width: int, num_levels: int = 5) -> list[tuple[int, int]]:
    """(h, w) of P3..P7 for a padded input of height x width.

    Every stride-2 layer of the ResNet (3x3 or 7x7 with "same" padding, the 3x3 max pool, the
    1x1 shortcuts) and of P6/P7 maps n to ceil(n / 2), so P3 is three halvings of the input and
    each next level one more. A runtime that only returns the concatenated head outputs (an
    exported graph) gets its anchors from these.
    """
    sizes, h, w = [], height, width
    for level in range(2 + num_levels):
        h, w = -(-h // 2), -(-w // 2)
        if level >= 2:
            sizes.append((h, w))
    return sizes


class DetectionDecoder:
    """Head outputs of any runtime (torch, ONNX Runtime, OpenVINO) -> detections: the anchors
    of the padded batch shape, box decoding, thresholds and NMS. Holds no weights."""

    def __init__(self, cfg: RetinaNetConfig):
        self.config = cfg
        self.anchors = Anchors(cfg.anchor_sizes, cfg.aspect_ratios)
        self.box_coder = box_coder()

    def __call__(self, head_outputs: dict, padded_shape: tuple[int, int],
                 image_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        device = head_outputs["bbox_regression"].device
        anchors, level_sizes = self.anchors(tuple(padded_shape), feature_grid_sizes(*padded_shape), device,
                                            torch.float32)
        return postprocess_detections(head_outputs, anchors, level_sizes, image_sizes, self.config, self.box_coder)


def classwise_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, image_index: torch.Tensor,
                  num_images: int, iou_threshold: float) -> torch.Tensor:
    """Indices kept by NMS within each (image, class), sorted by image then decreasing score.

    One `batched_nms` call per image: torchvision then picks the fastest strategy for the device
    (per-class passes on CPU, coordinate offsets on GPU). A single call over the whole batch
    would make its per-class passes scan every image's boxes: quadratic in the batch size.
    """
    keep, start = [], 0
    for count in torch.bincount(image_index, minlength=num_images).tolist():  # rows arrive grouped by image
        if count:
            window = slice(start, start + count)
            keep.append(batched_nms(boxes[window], scores[window], labels[window], iou_threshold) + start)
        start += count
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.int64, device=boxes.device)


def class_scores(cls_logits: torch.Tensor, objectness: torch.Tensor | None) -> torch.Tensor:
    """Per-anchor class probabilities [B, A, C]: sigmoid, or objectness x softmax (seesaw)."""
    if objectness is None:
        return cls_logits.float().sigmoid()
    return objectness.float().sigmoid()[..., None] * cls_logits.float().softmax(dim=-1)


def _ranking(head_outputs: dict) -> tuple[torch.Tensor, bool]:
    """What to take the top-k of: raw logits when the score is their sigmoid (same order, and
    the sigmoid then runs on the k winners only), else the scores themselves."""
    if head_outputs.get("objectness") is None:
        return head_outputs["cls_logits"].float(), True
    return class_scores(head_outputs["cls_logits"], head_outputs["objectness"]), False


def postprocess_detections(head_outputs: dict, anchors: torch.Tensor, level_sizes: list[int],
                           image_sizes: torch.Tensor, cfg: RetinaNetConfig,
                           box_coder: BoxCoder) -> list[dict[str, torch.Tensor]]:
    """One dict per image with `boxes` [N, 4] (xyxy, resized-image pixels), `scores`, `labels`."""
    scores, are_logits = _ranking(head_outputs)
    deltas = head_outputs["bbox_regression"].float()
    batch, _, num_classes = scores.shape

    top_scores, top_anchors, top_labels = [], [], []
    start = 0
    for size in level_sizes:  # 5 pyramid levels, each one batched top-k
        level = scores[:, start:start + size].reshape(batch, -1)
        values, index = level.topk(min(cfg.topk_candidates, level.shape[1]), dim=1)
        top_scores.append(values)
        top_anchors.append(index // num_classes + start)
        top_labels.append(index % num_classes)
        start += size
    top_scores, top_anchors, top_labels = (torch.cat(t, dim=1) for t in (top_scores, top_anchors, top_labels))
    if are_logits:
        top_scores = top_scores.sigmoid()

    image_index, slot = (top_scores > cfg.score_thresh).nonzero(as_tuple=True)
    kept_scores = top_scores[image_index, slot]
    kept_labels = top_labels[image_index, slot]
    kept_anchors = top_anchors[image_index, slot]
    boxes = box_coder.decode_single(deltas[image_index, kept_anchors], anchors[kept_anchors].to(deltas))
    sizes = image_sizes.to(boxes.device)[image_index].to(boxes.dtype)  # (h, w)
    boxes = torch.stack([boxes[:, 0].clamp(min=0).minimum(sizes[:, 1]),
                         boxes[:, 1].clamp(min=0).minimum(sizes[:, 0]),
                         boxes[:, 2].clamp(min=0).minimum(sizes[:, 1]),
                         boxes[:, 3].clamp(min=0).minimum(sizes[:, 0])], dim=1)

    keep = classwise_nms(boxes, kept_scores, kept_labels, image_index, batch, cfg.nms_thresh)
    kept_images = image_index[keep]
    counts = torch.bincount(kept_images, minlength=batch)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(keep), device=keep.device) - first[kept_images]
    keep = keep[rank < cfg.detections_per_img]
    per_image = counts.clamp(max=cfg.detections_per_img).tolist()
    return [{"boxes": b, "scores": s, "labels": labels} for b, s, labels in zip(
        boxes[keep].split(per_image), kept_scores[keep].split(per_image), kept_labels[keep].split(per_image))]
