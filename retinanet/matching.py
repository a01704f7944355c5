"""Anchor-to-ground-truth matching, batched over the images of a batch.

Same rule as torchvision's `Matcher(0.5, 0.4, allow_low_quality_matches=True)`: IoU >= 0.5 is
foreground, < 0.4 background, in between ignored; each ground-truth box also keeps the anchors
it overlaps most (low-quality matches). Targets arrive padded to M boxes per image with a count,
so the whole batch is one [B, M, A] IoU tensor instead of a Python loop over images.
"""
from __future__ import annotations

import torch
from torchvision.ops import box_iou

BACKGROUND = -1
IGNORE = -2


def match_anchors(gt_boxes: torch.Tensor, num_boxes: torch.Tensor, anchors: torch.Tensor,
                  fg_iou: float = 0.5, bg_iou: float = 0.4,
                  allow_low_quality_matches: bool = True) -> torch.Tensor:
    """Matched ground-truth index per anchor, [B, A] int64: >= 0 box index, -1 background, -2 ignored.

    gt_boxes: [B, M, 4] xyxy (rows >= num_boxes[b] are padding); anchors: [A, 4].
    """
    batch, max_boxes, _ = gt_boxes.shape
    if max_boxes == 0:
        return torch.full((batch, anchors.shape[0]), BACKGROUND, dtype=torch.int64, device=anchors.device)
    valid = torch.arange(max_boxes, device=gt_boxes.device)[None, :] < num_boxes[:, None]  # [B, M]
    iou = box_iou(gt_boxes.reshape(-1, 4).to(anchors.dtype), anchors).view(batch, max_boxes, -1)
    iou = iou.masked_fill(~valid[..., None], -1.0)  # padding never wins

    best_iou, best_gt = iou.max(dim=1)  # [B, A]
    matched = best_gt.masked_fill(best_iou < fg_iou, IGNORE)
    matched = matched.masked_fill(best_iou < bg_iou, BACKGROUND)
    if allow_low_quality_matches:
        # Anchors that are some box's best match keep their best box (torchvision's rule), so
        # that small or oddly shaped boxes still get positives. A box overlapping no anchor at
        # all (IoU 0 everywhere) gets none, rather than turning every anchor positive.
        best_per_gt = iou.max(dim=2, keepdim=True).values  # [B, M, 1]
        low_quality = ((iou == best_per_gt) & (best_per_gt > 0)).any(dim=1)  # [B, A]
        matched = torch.where(low_quality, best_gt, matched)
    return matched
