"""Online hard example mining (OHEM, Shrivastava et al.) for a dense detector: the baseline that
focal loss is measured against in the paper's Table 1d.

Per image, every non-ignored anchor is scored by its classification cross-entropy; greedy NMS
over the anchor boxes, in order of decreasing loss, drops near-duplicates; the `batch` survivors
with the highest loss are kept (optionally with at most `ratio` negatives per kept positive,
"OHEM 1:3"). The loss is then averaged over the kept anchors only: easy anchors get no gradient
at all, where focal loss merely down-weights them.

Batched over the images except for the NMS itself (one call per image): one top-k, then NMS on
a loss-sorted prefix of each image's anchors. Greedy NMS decides each box from the boxes before
it only, so NMS on a prefix keeps exactly the survivors that NMS on all anchors would keep within
that prefix; the prefix doubles until it holds enough survivors for every image (usually at once),
which keeps the quadratic NMS off the tens of thousands of anchors of a real image.
"""
from __future__ import annotations

import torch
from torchvision.ops import nms


def _rank(score: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Per row, each member's rank by decreasing score (0 = highest); non-members rank last."""
    key = score.masked_fill(~member, float("-inf"))
    order = key.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank.masked_fill(~member, order.shape[1])


def _nms_survivors(score: torch.Tensor, anchors: torch.Tensor, valid: torch.Tensor, prefix: int,
                   iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, A] bool survivors of greedy NMS by score, [B, A] bool anchors considered): NMS runs on
    each image's top-`prefix` valid anchors.

    One `nms` call per image of the batch: on CPU, `batched_nms` over the batch (the image as
    the group) runs the same per-group passes plus a mask over the whole batch for each image.
    """
    top, order = score.masked_fill(~valid, float("-inf")).topk(prefix, dim=1)  # sorted, decreasing
    candidate = torch.isfinite(top)
    survived = torch.zeros_like(candidate)
    for b in range(score.shape[0]):
        count = int(candidate[b].sum())  # candidates come first: the scores are sorted
        keep = nms(anchors[order[b, :count]], top[b, :count], iou_threshold)
        survived[b, keep] = True
    empty = torch.zeros_like(valid)
    return empty.scatter(1, order, survived), empty.scatter(1, order, candidate)


def ohem_selection(loss: torch.Tensor, anchors: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor,
                   batch: int = 128, iou_threshold: float = 0.5, ratio: float | None = None) -> torch.Tensor:
    """The anchors OHEM trains on, [B, A] bool.

    loss: [B, A] per-anchor cross-entropy; anchors: [A, 4] xyxy; positive / valid: [B, A] bool
    (valid = not ignored by matching). Without `ratio`: the `batch` highest-loss NMS survivors
    of each image. With `ratio` r: up to batch // (1 + r) highest-loss positive survivors and
    up to r negatives per kept positive (r when the image has none), highest loss first.
    """
    score = loss.detach().float()
    valid = valid & torch.isfinite(score)
    positive, negative = positive & valid, valid & ~positive
    num_anchors = score.shape[1]
    pos_quota = batch if ratio is None else max(1, int(batch // (1 + ratio)))
    prefix = 4 * batch
    if ratio is not None:  # start where each image's prefix reaches its pos_quota-th positive by loss
        positive_ranks = _rank(score, valid).masked_fill(~positive, num_anchors).sort(dim=1).values
        wanted = positive.sum(1).clamp(max=pos_quota)
        reach = positive_ranks.gather(1, (wanted - 1).clamp(min=0)[:, None]).squeeze(1) + 1
        prefix = max(prefix, int(reach.masked_fill(wanted == 0, 0).max()))
    prefix = min(num_anchors, prefix)
    while True:
        survived, in_prefix = _nms_survivors(score, anchors, valid, prefix, iou_threshold)
        if prefix == num_anchors:
            break
        # Enough when every image has its quota of survivors, or no anchor of the kind lies beyond the prefix.
        if ratio is None:
            enough = ((survived.sum(1) >= batch) | (valid & ~in_prefix).sum(1).eq(0)).all()
        else:
            pos_ok = ((survived & positive).sum(1) >= pos_quota) | (positive & ~in_prefix).sum(1).eq(0)
            neg_ok = ((survived & negative).sum(1) >= ratio * pos_quota) | (negative & ~in_prefix).sum(1).eq(0)
            enough = (pos_ok & neg_ok).all()
        if enough:
            break
        prefix = min(num_anchors, 2 * prefix)
    if ratio is None:
        return survived & (_rank(score, survived) < batch)
    kept_pos = survived & positive
    num_pos = kept_pos.sum(1).clamp(max=pos_quota)
    neg_quota = (ratio * num_pos.clamp(min=1).to(score)).floor().long()
    kept_pos &= _rank(score, kept_pos) < num_pos[:, None]
    kept_neg = survived & negative
    return kept_pos | (kept_neg & (_rank(score, kept_neg) < neg_quota[:, None]))
