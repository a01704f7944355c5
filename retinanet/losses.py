"""RetinaNet losses, batched over images: sigmoid focal loss over all non-ignored anchors, a box
loss on positives, both normalized by the number of positive anchors in the whole batch (and
across DDP workers), as in the paper. With ``cls_loss="seesaw"``: focal loss on a decoupled
objectness logit and Seesaw Loss (Wang et al.) over the classes of positive anchors. With
``cls_loss="ohem"``: cross entropy on the anchors picked by online hard example mining (see
`retinanet.ohem`), averaged over them: the paper's Table 1d baseline. Focal loss with gamma = 0
is the alpha-balanced cross entropy of its Table 1a.
"""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from retinanet.config import RetinaNetConfig
from retinanet.matching import IGNORE, match_anchors
from retinanet.ohem import ohem_selection


def is_distributed() -> bool:
    """In a process group of two or more (the losses' collectives and the training engine's)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _LastNormalizer(threading.local):
    positives, normalizer, latest = 0.0, 1.0, 0.0


_LAST = _LastNormalizer()


def last_normalizer() -> tuple[float, float]:
    """(positives per worker, the normalizer: the same clamped to >= 1) of this thread's last
    `detection_losses` call.

    Gradient accumulation needs it: a step of several micro-batches is normalized by the
    positives of all of them (the paper's normalizer over the whole global batch), which the
    training engine gets by re-weighting each micro-batch's loss by its own normalizer.
    """
    return _LAST.positives, _LAST.normalizer


def positives_normalizer(num_pos: torch.Tensor) -> torch.Tensor:
    """Positives per worker, averaged over DDP workers and clamped to >= 1.

    DDP averages gradients over workers, so dividing each worker's loss sum by the mean count
    makes the step equal to (sum over all workers) / (positives in the global batch).
    """
    num_pos = num_pos.detach().float()
    if is_distributed():
        num_pos = num_pos.clone()
        dist.all_reduce(num_pos)
        num_pos = num_pos / dist.get_world_size()
    _LAST.latest = float(num_pos)
    return num_pos.clamp(min=1.0)


def seesaw_loss(logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor,
                p: float = 0.8, q: float = 2.0, eps: float = 1e-2) -> torch.Tensor:
    """Mean over samples of -log(softmax of the Seesaw-adjusted logits at the label).

    For a sample of class i, every other class j has its logit raised by log(S_ij), with
    S_ij = M_ij * C_ij: mitigation M_ij = (N_j / N_i)^p when N_j < N_i (counts clamped to >= 1)
    and compensation C_ij = (sigma_j / sigma_i)^q when sigma_j > sigma_i (sigma = the detached
    softmax, sigma_i clamped to >= eps); 1 otherwise. p = q = 0 is softmax cross-entropy.
    """
    if logits.numel() == 0:
        return logits.sum() * 0.0
    logits = logits.float()
    counts = class_counts.to(logits).clamp(min=1.0)
    log_ratio = counts.log()[None, :] - counts.log()[:, None]  # [i, j] = log(N_j / N_i)
    log_mitigation = p * log_ratio.clamp(max=0.0)[labels]  # [N, C]
    sigma = logits.detach().softmax(dim=-1)
    sigma_label = sigma.gather(1, labels[:, None]).clamp(min=eps)
    log_compensation = q * (sigma / sigma_label).log().clamp(min=0.0)
    others = 1.0 - F.one_hot(labels, logits.shape[-1]).to(logits)
    return F.cross_entropy(logits + (log_mitigation + log_compensation) * others, labels)


def check_targets(boxes: torch.Tensor, labels: torch.Tensor, num_boxes: torch.Tensor,
                  num_classes: int, image_ids: torch.Tensor | None = None) -> None:
    """Reject degenerate or non-finite boxes and out-of-range labels, naming image and box."""
    if (boxes.dim() != 3 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:2]
            or num_boxes.shape != boxes.shape[:1]):
        raise ValueError(f"targets must be boxes [B, M, 4], labels [B, M], num_boxes [B]; got "
                         f"{tuple(boxes.shape)}, {tuple(labels.shape)}, {tuple(num_boxes.shape)}")
    valid = torch.arange(boxes.shape[1], device=boxes.device)[None, :] < num_boxes[:, None]
    bad = valid & ((boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1])
                   | ~torch.isfinite(boxes).all(-1) | (labels < 0) | (labels >= num_classes))
    if bad.any():
        b, m = (int(i) for i in bad.nonzero()[0])
        image = f"image_id {int(image_ids[b])}" if image_ids is not None else f"image {b} of the batch"
        raise ValueError(f"{image}: box {m} {boxes[b, m].tolist()} with label {int(labels[b, m])} is "
                         f"degenerate, non-finite or out of range (need x2 > x1, y2 > y1, 0 <= label < {num_classes})")


def detection_losses(head_outputs: dict, anchors: torch.Tensor, targets: dict, cfg: RetinaNetConfig,
                     box_coder: BoxCoder, class_counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The training losses for a batch: {"classification", "bbox_regression"[, "objectness"]}."""
    boxes, labels, num_boxes = targets["boxes"], targets["labels"].long(), targets["num_boxes"].long()
    check_targets(boxes, labels, num_boxes, cfg.num_classes, targets.get("image_id"))
    cls_logits = head_outputs["cls_logits"].float()
    deltas = head_outputs["bbox_regression"].float()
    boxes = boxes.to(deltas)

    matched = match_anchors(boxes, num_boxes, anchors, cfg.fg_iou, cfg.bg_iou, cfg.allow_low_quality_matches)
    positive = matched >= 0
    counted = (matched != IGNORE).to(cls_logits)
    gt_index = matched.clamp(min=0)
    if boxes.shape[1] == 0:  # no image of the batch has a box
        gt_labels = torch.zeros_like(matched)
        gt_boxes = torch.zeros(*matched.shape, 4, device=deltas.device, dtype=deltas.dtype)
    else:
        gt_labels = labels.gather(1, gt_index).clamp(min=0)
        gt_boxes = boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))
    normalizer = positives_normalizer(positive.sum())
    # (OHEM's classification term has its own normalizer: not re-weighted exactly)
    _LAST.positives, _LAST.normalizer = _LAST.latest, float(normalizer)

    losses = {}
    if cfg.cls_loss in ("focal", "ohem"):
        onehot = torch.zeros_like(cls_logits).scatter_(-1, gt_labels[..., None], positive[..., None].to(cls_logits))
    if cfg.cls_loss == "focal":
        focal = sigmoid_focal_loss(cls_logits, onehot, cfg.focal_alpha, cfg.focal_gamma, reduction="none")
        losses["classification"] = (focal.sum(-1) * counted).sum() / normalizer
    elif cfg.cls_loss == "ohem":
        cross_entropy = F.binary_cross_entropy_with_logits(cls_logits, onehot, reduction="none").sum(-1)  # [B, A]
        hard = ohem_selection(cross_entropy, anchors, positive, matched != IGNORE, cfg.ohem_batch, cfg.ohem_nms,
                              cfg.ohem_ratio)
        # Averaged over the kept anchors (all workers' mean count, as for the positives).
        losses["classification"] = (cross_entropy * hard).sum() / positives_normalizer(hard.sum())
    else:
        objectness = head_outputs["objectness"].float()
        focal = sigmoid_focal_loss(objectness, positive.to(objectness), cfg.focal_alpha, cfg.focal_gamma,
                                   reduction="none")
        losses["objectness"] = (focal * counted).sum() / normalizer
        pos_labels = gt_labels[positive]
        if class_counts is not None:
            update = torch.bincount(pos_labels, minlength=cfg.num_classes).to(class_counts)
            if is_distributed():
                dist.all_reduce(update)
            class_counts += update
        counts = class_counts if class_counts is not None else torch.ones(cfg.num_classes, device=cls_logits.device)
        per_sample = seesaw_loss(cls_logits[positive], pos_labels, counts, cfg.seesaw_p, cfg.seesaw_q, cfg.seesaw_eps)
        losses["classification"] = per_sample * positive.sum() / normalizer

    pos_anchors = anchors[None].expand_as(deltas)[positive]
    pos_deltas, pos_gt = deltas[positive], gt_boxes[positive]
    if cfg.box_loss == "giou":
        decoded = box_coder.decode_single(pos_deltas, pos_anchors)
        box_loss = generalized_box_iou_loss(decoded, pos_gt, reduction="sum")
    else:
        target = box_coder.encode_single(pos_gt, pos_anchors)
        if cfg.smooth_l1_beta > 0:
            box_loss = F.smooth_l1_loss(pos_deltas, target, beta=cfg.smooth_l1_beta, reduction="sum")
        else:
            box_loss = F.l1_loss(pos_deltas, target, reduction="sum")
    losses["bbox_regression"] = box_loss / normalizer

    total = sum(losses.values())
    if not torch.isfinite(total):
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise FloatingPointError(f"non-finite loss ({parts}); lower the learning rate or check the data")
    return losses
