"""The loss knobs of the paper's ablations: OHEM's selection, gamma = 0 as alpha-balanced cross
entropy, the prior initialisation switched off, and the flags of `jobs.train` reaching the model
config. Pure tensors; no Ray."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

import retinanet
from retinanet.anchors import Anchors
from retinanet.losses import detection_losses
from retinanet.ohem import ohem_selection


def _anchors(size: int = 64) -> torch.Tensor:
    levels = [(size // s, size // s) for s in (8, 16, 32, 64, 128)]
    levels[-1] = (1, 1)
    generator = Anchors((8, 16, 32, 64, 128), (0.5, 1.0, 2.0))
    anchors, _ = generator((size, size), levels, torch.device("cpu"), torch.float32)
    return anchors


def _greedy_survivors(loss: torch.Tensor, anchors: torch.Tensor, valid: torch.Tensor, threshold: float) -> list[int]:
    """Textbook greedy NMS by loss, one anchor at a time: the reference for the batched code."""
    order = [int(i) for i in loss.argsort(descending=True, stable=True) if valid[i]]
    overlaps = (box_iou(anchors, anchors) > threshold).numpy()
    kept: list[int] = []
    for i in order:
        if not overlaps[i, kept].any():
            kept.append(i)
    return kept  # in decreasing loss


def _reference(loss, anchors, positive, valid, batch, threshold, ratio):
    picked = torch.zeros_like(positive)
    for b in range(loss.shape[0]):
        kept = _greedy_survivors(loss[b], anchors, valid[b], threshold)
        if ratio is None:
            chosen = kept[:batch]
        else:
            pos = [i for i in kept if positive[b, i]][: int(batch // (1 + ratio))]
            neg = [i for i in kept if not positive[b, i]][: int(ratio * max(len(pos), 1))]
            chosen = pos + neg
        picked[b, chosen] = True
    return picked


@pytest.mark.parametrize("ratio", [None, 3.0])
@pytest.mark.parametrize("threshold", [0.5, 0.7])
def test_ohem_keeps_the_highest_loss_nms_survivors(ratio, threshold):
    torch.manual_seed(0)
    anchors = _anchors()
    loss = torch.rand(3, anchors.shape[0])
    positive = torch.rand(3, anchors.shape[0]) < 0.08
    valid = torch.rand(3, anchors.shape[0]) < 0.95
    picked = ohem_selection(loss, anchors, positive, valid, batch=16, iou_threshold=threshold, ratio=ratio)
    expected = _reference(loss, anchors, positive & valid, valid, 16, threshold, ratio)
    assert torch.equal(picked, expected)
    assert not (picked & ~valid).any()
    if ratio is None:
        assert picked.sum(1).tolist() == [16, 16, 16]
    else:
        pos, neg = (picked & positive).sum(1), (picked & ~positive).sum(1)
        assert (pos <= 4).all() and (neg <= 3 * pos.clamp(min=1)).all() and (pos > 0).all()


def test_ohem_ratio_limits_negatives_when_positives_are_few():
    anchors = _anchors()
    loss = torch.linspace(1, 2, anchors.shape[0]).repeat(2, 1)
    positive = torch.zeros(2, anchors.shape[0], dtype=torch.bool)
    positive[0, 0] = True  # one low-loss positive in image 0, none in image 1
    valid = torch.ones_like(positive)
    picked = ohem_selection(loss, anchors, positive, valid, batch=64, iou_threshold=1.0, ratio=3.0)  # no suppression
    last = anchors.shape[0] - 1
    assert picked[0].nonzero().squeeze(1).tolist() == [0, last - 2, last - 1, last]  # the positive + 3 hardest
    assert picked[1].nonzero().squeeze(1).tolist() == [last - 2, last - 1, last]  # no positive: 3 negatives


def test_ohem_loss_averages_cross_entropy_over_the_kept_anchors():
    torch.manual_seed(1)
    cfg = retinanet.preset("tiny", num_classes=2, anchor_sizes=(8, 16, 32, 64, 128), cls_loss="ohem", ohem_batch=8)
    anchors = _anchors()
    logits = torch.randn(1, anchors.shape[0], 2)
    head = {"cls_logits": logits, "bbox_regression": torch.zeros(1, anchors.shape[0], 4), "objectness": None}
    targets = {"boxes": torch.tensor([[[8.0, 8.0, 30.0, 28.0]]]), "labels": torch.tensor([[1]]),
               "num_boxes": torch.tensor([1])}
    losses = detection_losses(head, anchors, targets, cfg, BoxCoder((1.0, 1.0, 1.0, 1.0)))
    from retinanet.matching import IGNORE, match_anchors
    matched = match_anchors(targets["boxes"], targets["num_boxes"], anchors)
    onehot = torch.zeros_like(logits)
    onehot[0, matched[0] >= 0, 1] = 1.0
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").sum(-1)
    picked = ohem_selection(ce, anchors, matched >= 0, matched != IGNORE, 8, 0.5)
    assert picked.sum() == 8
    assert torch.allclose(losses["classification"], ce[picked].mean())


def test_focal_gamma_zero_is_alpha_balanced_cross_entropy():
    torch.manual_seed(2)
    cfg = retinanet.preset("tiny", num_classes=3, anchor_sizes=(8, 16, 32, 64, 128), focal_gamma=0.0, focal_alpha=0.75)
    anchors = _anchors()
    logits = torch.randn(2, anchors.shape[0], 3)
    head = {"cls_logits": logits, "bbox_regression": torch.zeros(2, anchors.shape[0], 4), "objectness": None}
    targets = {"boxes": torch.tensor([[[8.0, 8.0, 30.0, 28.0]], [[20.0, 30.0, 50.0, 60.0]]]),
               "labels": torch.tensor([[2], [0]]), "num_boxes": torch.tensor([1, 1])}
    losses = detection_losses(head, anchors, targets, cfg, BoxCoder((1.0, 1.0, 1.0, 1.0)))
    from retinanet.matching import IGNORE, match_anchors
    matched = match_anchors(targets["boxes"], targets["num_boxes"], anchors)
    onehot = torch.zeros_like(logits)
    for b in range(2):
        onehot[b, matched[b] >= 0, int(targets["labels"][b, 0])] = 1.0
    weight = 0.75 * onehot + 0.25 * (1 - onehot)
    ce = F.binary_cross_entropy_with_logits(logits, onehot, weight=weight, reduction="none").sum(-1)
    expected = (ce * (matched != IGNORE)).sum() / (matched >= 0).sum()
    assert torch.allclose(losses["classification"], expected, rtol=1e-5)


@pytest.mark.parametrize("cls_loss", ["focal", "ohem"])
def test_prior_zero_gives_zero_bias_and_default_gives_the_paper_prior(cls_loss):
    head = retinanet.RetinaNet(retinanet.preset("tiny", num_classes=2, cls_loss=cls_loss, prior_prob=0.0)).head
    assert torch.count_nonzero(head.classification_head.cls_logits.bias) == 0
    head = retinanet.RetinaNet(retinanet.preset("tiny", num_classes=2, cls_loss=cls_loss)).head
    assert torch.allclose(head.classification_head.cls_logits.bias.sigmoid(), torch.tensor(0.01))
    with pytest.raises(ValueError, match="prior_prob"):
        retinanet.preset("tiny", prior_prob=1.0)


def test_train_flags_reach_the_model_config():
    from jobs import train
    from pipelines.training.init import model_setup

    options = train.resolve_options(["--data", "d", "--output", "o", "--cls-loss", "ohem", "--focal-gamma", "0",
                                     "--focal-alpha", "0.75", "--prior-prob", "0", "--ohem-batch", "256",
                                     "--ohem-nms", "0.7", "--ohem-ratio", "3"])
    cfg = retinanet.RetinaNetConfig.from_dict(model_setup(options, [{"id": 1, "name": "a"}])[0])
    assert (cfg.cls_loss, cfg.focal_gamma, cfg.focal_alpha, cfg.prior_prob) == ("ohem", 0.0, 0.75, 0.0)
    assert (cfg.ohem_batch, cfg.ohem_nms, cfg.ohem_ratio) == (256, 0.7, 3.0)
    default = retinanet.RetinaNetConfig.from_dict(
        model_setup(train.resolve_options(["--data", "d", "--output", "o"]), [{"id": 1, "name": "a"}])[0])
    assert (default.focal_gamma, default.focal_alpha, default.prior_prob, default.ohem_ratio) == (2.0, 0.25, 0.01, None)
    with pytest.raises(SystemExit) as exit_info:
        train.resolve_options(["--data", "d", "--output", "o", "--prior-prob", "1"])
    assert exit_info.value.code == 2
    assert math.isclose(retinanet.preset("tiny").ohem_nms, 0.5)
