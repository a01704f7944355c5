"""Seesaw Loss (Wang et al.) and the decoupled-objectness RetinaNet that uses it."""
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import retinanet
from retinanet import seesaw_loss


def test_hand_computed_case():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    labels = torch.tensor([0])
    counts = torch.tensor([100.0, 10.0, 1.0])
    # Class 0 is the head: mitigation (N_j/N_0)^0.8 for j = 1, 2; no compensation (sigma_j < sigma_0).
    s1, s2 = (10 / 100) ** 0.8, (1 / 100) ** 0.8
    z = [2.0, 1.0 + math.log(s1), 0.0 + math.log(s2)]
    expected = -(z[0] - math.log(sum(math.exp(v) for v in z)))
    assert seesaw_loss(logits, labels, counts).item() == pytest.approx(expected, rel=1e-6)

    # A tail-class sample whose label is the least likely class: only compensation applies.
    labels = torch.tensor([2])
    sigma = torch.softmax(logits, -1)[0].tolist()
    z = [2.0 + 2.0 * math.log(sigma[0] / sigma[2]), 1.0 + 2.0 * math.log(sigma[1] / sigma[2]), 0.0]
    expected = -(z[2] - math.log(sum(math.exp(v) for v in z)))
    assert seesaw_loss(logits, labels, counts).item() == pytest.approx(expected, rel=1e-6)


def test_sigma_clamped_to_eps():
    logits = torch.tensor([[20.0, -20.0]])
    counts = torch.ones(2)
    # sigma_label ~ 4e-18 is clamped to 0.5: C = (1 / 0.5)^2 = 4, log 4 added to the other logit.
    got = seesaw_loss(logits, torch.tensor([1]), counts, eps=0.5)
    expected = F.cross_entropy(torch.tensor([[20.0 + math.log(4.0), -20.0]]), torch.tensor([1]))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_equals_cross_entropy_when_p_and_q_are_zero():
    torch.manual_seed(0)
    logits, labels = torch.randn(50, 7), torch.randint(0, 7, (50,))
    counts = torch.randint(0, 1000, (7,)).float()
    torch.testing.assert_close(seesaw_loss(logits, labels, counts, p=0.0, q=0.0), F.cross_entropy(logits, labels))


def test_mitigation_shrinks_negative_gradient_on_tail_class():
    counts = torch.tensor([1000.0, 10.0, 500.0])  # class 1 is the tail
    logits = torch.tensor([[8.0, 0.0, 0.0]], requires_grad=True)  # head sample, confidently right
    seesaw_loss(logits, torch.tensor([0]), counts, p=0.8, q=2.0).backward()
    seesaw_grad = logits.grad[0, 1].item()
    logits.grad = None
    F.cross_entropy(logits, torch.tensor([0])).backward()
    ce_grad = logits.grad[0, 1].item()
    # d loss / d z_j = sigma_hat_j; exactly S_j * (Z / Z_hat) times the CE gradient.
    z = logits.detach()[0]
    s = torch.tensor([1.0, (10 / 1000) ** 0.8, (500 / 1000) ** 0.8])
    ratio = s[1] * z.exp().sum() / (s * z.exp()).sum()
    assert seesaw_grad / ce_grad == pytest.approx(ratio.item(), rel=1e-5)
    assert seesaw_grad / ce_grad == pytest.approx((10 / 1000) ** 0.8, rel=2e-3)


def test_seesaw_model_scores_and_counts():
    torch.manual_seed(0)
    model = retinanet.build("tiny", num_classes=3, cls_loss="seesaw").train()
    assert model.class_counts.tolist() == [0.0, 0.0, 0.0]
    images = torch.randn(2, 3, 128, 128)
    targets = {"boxes": torch.tensor([[[10.0, 10, 60, 60]], [[30, 30, 90, 100]]]), "labels": torch.tensor([[0], [2]]),
               "num_boxes": torch.tensor([1, 1])}
    losses = model(images, [[128, 128]] * 2, targets)
    assert set(losses) == {"objectness", "classification", "bbox_regression"}
    counts = model.class_counts.tolist()
    assert counts[0] > 0 and counts[1] == 0 and counts[2] > 0
    sum(losses.values()).backward()
    model.eval()
    detections = model(images, [[128, 128]] * 2)
    assert all(((d["scores"] > 0.05) & (d["scores"] <= 1)).all() for d in detections)
    # Checkpoints keep the counts.
    loaded, _ = retinanet.load_checkpoint(retinanet.checkpoint_bytes(model))
    assert loaded.class_counts.tolist() == counts


def test_cosine_logits_are_bounded_by_temperature():
    torch.manual_seed(0)
    model = retinanet.build("tiny", num_classes=4, cls_loss="seesaw", cosine_logits=True, cosine_temperature=5.0)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.zero_()
        logits, _ = model.head.classification_head([torch.randn(1, 64, 8, 8) * 50])
    assert logits.abs().max() <= 5.0 + 1e-4 and logits.abs().max() > 0.5


def _ddp_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = retinanet.build("tiny", num_classes=3, cls_loss="seesaw").train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(2):  # each worker sees different classes
        label = (rank + step) % 3
        targets = {"boxes": torch.tensor([[[10.0, 10, 60, 60]]]), "labels": torch.tensor([[label]]),
                   "num_boxes": torch.tensor([1])}
        loss = sum(ddp(torch.randn(1, 3, 128, 128), [[128, 128]], targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    (out_dir / f"rank-{rank}.json").write_text(json.dumps(model.class_counts.tolist()))
    dist.destroy_process_group()


def test_class_counts_summed_across_ddp_workers(tmp_path):
    """Workers are spawned (not forked) and report through files: forking the test process,
    which holds the session's Ray driver, once cost a later test its Ray connection."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, tmp_path), nprocs=2, join=True)
    results = {rank: json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)}
    assert results[0] == results[1]
    assert all(c > 0 for c in results[0]), "classes seen by either worker are counted on both"
