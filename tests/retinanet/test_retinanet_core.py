"""Matching, losses, errors and a small overfit run of the tiny preset (no Ray)."""
import math

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou, sigmoid_focal_loss

import retinanet
from retinanet.matching import BACKGROUND, IGNORE, match_anchors


def _anchors(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 4
    return torch.cat([xy, xy + wh], dim=1)


def test_batched_matching_equals_torchvision_per_image():
    anchors = _anchors()
    boxes = torch.zeros(3, 4, 4)
    boxes[0, :3] = _anchors(3, seed=1)
    boxes[1, :1] = torch.tensor([30.0, 30, 90, 70])
    num_boxes = torch.tensor([3, 1, 0])
    matched = match_anchors(boxes, num_boxes, anchors)
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    for b in range(2):
        assert torch.equal(matched[b], matcher(box_iou(boxes[b, : num_boxes[b]], anchors)))
    assert (matched[2] == BACKGROUND).all(), "an image without boxes is all background"


def test_matching_edge_cases():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20], [100, 100, 140, 140], [0, 0, 9, 9]])
    tiny = torch.tensor([[[1.0, 1, 3, 3]]])  # IoU far below 0.5 with every anchor
    matched = match_anchors(tiny, torch.tensor([1]), anchors)
    assert matched[0].tolist() == [BACKGROUND, BACKGROUND, BACKGROUND, 0], "best anchor kept as low-quality match"
    big = torch.tensor([[[0.0, 0, 10, 10]]])  # several anchors over 0.5 and one in between
    assert match_anchors(big, torch.tensor([1]), anchors)[0].tolist() == [0, BACKGROUND, BACKGROUND, 0]
    mid = torch.tensor([[[0.0, 0, 14, 14]]])  # 0.51 with the 10px anchor? no: IoU 100/196 = 0.51
    assert match_anchors(mid, torch.tensor([1]), anchors)[0, 0] == 0
    between = torch.tensor([[[0.0, 0, 15, 15]], [[0.0, 0, 15, 15]]])  # IoU 0.44 and 0.5625
    out = match_anchors(between, torch.tensor([1, 1]), anchors[:2])
    assert out[0].tolist() == [IGNORE, 0]
    no_boxes = match_anchors(torch.zeros(2, 0, 4), torch.tensor([0, 0]), anchors)
    assert no_boxes.shape == (2, 4) and (no_boxes == BACKGROUND).all()
    outside = torch.tensor([[[500.0, 500, 510, 510]]])  # overlaps nothing: no anchor becomes positive
    assert (match_anchors(outside, torch.tensor([1]), anchors) == BACKGROUND).all()


def _tiny(num_classes=3, **overrides):
    torch.manual_seed(0)
    return retinanet.build("tiny", num_classes=num_classes, **overrides)


def _batch():
    images = torch.randn(2, 3, 128, 128)
    targets = {"boxes": torch.tensor([[[10.0, 10, 50, 60], [0, 0, 0, 0]], [[20, 30, 100, 90], [5, 5, 30, 30]]]),
               "labels": torch.tensor([[0, -1], [1, 2]]), "num_boxes": torch.tensor([1, 2]),
               "image_id": torch.tensor([11, 12])}
    return images, [[128, 128], [128, 128]], targets


def test_focal_loss_equals_torchvision_op_normalized_by_batch_positives():
    model = _tiny().train()
    images, sizes, targets = _batch()
    captured = {}
    model.head.register_forward_hook(lambda m, i, o: captured.update(o))
    losses = model(images, sizes, targets)
    grids = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    anchors, _ = model.anchors((128, 128), grids, torch.device("cpu"), torch.float32)
    matched = match_anchors(targets["boxes"], targets["num_boxes"], anchors)
    logits = captured["cls_logits"].detach()
    onehot = torch.zeros_like(logits)
    pos = matched >= 0
    onehot[pos] = torch.nn.functional.one_hot(targets["labels"].gather(1, matched.clamp(min=0))[pos], 3).float()
    keep = matched != IGNORE
    expected = sigmoid_focal_loss(logits[keep], onehot[keep], reduction="sum") / pos.sum()
    torch.testing.assert_close(losses["classification"].detach(), expected)
    assert pos[0].any() and pos[1].any()


def test_images_without_boxes_train():
    model = _tiny().train()
    images, sizes, _ = _batch()
    empty = {"boxes": torch.zeros(2, 0, 4), "labels": torch.zeros(2, 0, dtype=torch.long),
             "num_boxes": torch.zeros(2, dtype=torch.long)}
    losses = model(images, sizes, empty)
    assert losses["bbox_regression"].item() == 0.0 and losses["classification"].item() > 0
    sum(losses.values()).backward()


def test_degenerate_box_names_image_and_box():
    model = _tiny().train()
    images, sizes, targets = _batch()
    targets["boxes"][1, 1] = torch.tensor([30.0, 5, 30, 40])  # x2 == x1
    with pytest.raises(ValueError, match=r"image_id 12: box 1 \[30.0, 5.0, 30.0, 40.0\]"):
        model(images, sizes, targets)


def test_bad_tensors_give_clear_errors():
    model = _tiny()
    with pytest.raises(ValueError, match="float tensor"):
        model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), [[64, 64]] * 2)
    with pytest.raises(ValueError, match="image_sizes"):
        model(torch.zeros(2, 3, 64, 64), [[64, 64]])
    with pytest.raises(ValueError, match="3 channels"):
        model.predict([torch.zeros(1, 64, 64)])
    with pytest.raises(ValueError, match="needs targets"):
        model.train()(torch.zeros(1, 3, 64, 64), [[64, 64]])


def test_non_finite_loss_raises():
    model = _tiny().train()
    images, sizes, targets = _batch()
    images[0, 0, 0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        model(images, sizes, targets)


def _shapes_batch(n, size=128, seed=0):
    """Bright squares (class 0) and bars (class 1) on dark noise, with their boxes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 0.2
    boxes = torch.zeros(n, 2, 4)
    labels = torch.zeros(n, 2, dtype=torch.long)
    for i in range(n):
        x, y = torch.randint(0, size - 48, (2,), generator=g).tolist()
        images[i, :, y:y + 40, x:x + 40] = 1.0
        boxes[i, 0] = torch.tensor([x, y, x + 40, y + 40])
        x2, y2 = torch.randint(0, size - 24, (2,), generator=g).tolist()
        images[i, 1, y2:y2 + 12, x2:x2 + 20] = 0.9
        boxes[i, 1] = torch.tensor([x2, y2, x2 + 20, y2 + 12])
        labels[i, 1] = 1
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (images - mean) / std, {"boxes": boxes, "labels": labels, "num_boxes": torch.full((n,), 2)}


def test_tiny_model_overfits_a_few_images():
    torch.manual_seed(0)
    model = retinanet.build("tiny", num_classes=2).train()
    images, targets = _shapes_batch(4)
    sizes = [[128, 128]] * 4
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9,
                                weight_decay=1e-4)
    first = None
    for _ in range(50):
        losses = model(images, sizes, targets)
        loss = sum(losses.values())
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first, (first, loss.item())
    model.eval()
    detections = model(images, sizes)
    for b, det in enumerate(detections):
        for m in range(2):
            same_class = det["labels"] == targets["labels"][b, m]
            ious = box_iou(targets["boxes"][b, m][None], det["boxes"][same_class & (det["scores"] > 0.3)])
            assert ious.numel() and ious.max() > 0.5, f"image {b} box {m} not found"
