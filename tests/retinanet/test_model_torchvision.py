"""retinanet/ against torchvision's RetinaNet with the same weights: anchors, losses, detections."""
import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from retinanet import checkpoint_bytes, from_torchvision, load_checkpoint
from retinanet.anchors import Anchors, anchor_sizes

BUILDERS = {"v1": retinanet_resnet50_fpn, "v2": retinanet_resnet50_fpn_v2}


@pytest.fixture(scope="module", params=["v1", "v2"])
def twins(request):
    """A torchvision RetinaNet with random weights (scores pushed over 0.05) and ours loaded from it."""
    torch.manual_seed(0)
    tv = BUILDERS[request.param](weights=None, weights_backbone=None, num_classes=5, min_size=256, max_size=400)
    with torch.no_grad():
        tv.head.classification_head.cls_logits.weight.normal_(0, 0.05)
        tv.head.classification_head.cls_logits.bias.fill_(-2.0)
    ours = from_torchvision(tv.state_dict())
    assert ours.config.p6_from == ("c5" if request.param == "v2" else "p5")
    return request.param, tv.eval(), ours


@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (800, 1216), (224, 320), (100, 150)])
def test_anchors_equal_torchvision(shape):
    generator = AnchorGenerator(anchor_sizes((32, 64, 128, 256, 512)), ((0.5, 1.0, 2.0),) * 5)
    grid_sizes = [(-(-shape[0] // s), -(-shape[1] // s)) for s in (8, 16, 32, 64, 128)]
    features = [torch.zeros(1, 1, *g) for g in grid_sizes]
    expected = torch.cat(generator(ImageList(torch.zeros(1, 3, *shape), [shape]), features)[0].split(
        [g[0] * g[1] * 9 for g in grid_sizes]))
    anchors = Anchors((32, 64, 128, 256, 512), (0.5, 1.0, 2.0))
    ours, per_level = anchors(shape, grid_sizes, torch.device("cpu"), torch.float32)
    assert per_level == [g[0] * g[1] * 9 for g in grid_sizes]
    assert torch.equal(ours, expected)


def test_anchor_sizes_follow_torchvision_rounding():
    assert anchor_sizes((32,))[0] == (32, 40, 50)
    assert anchor_sizes((16,))[0] == (16, 20, 25)


def test_predict_equals_torchvision(twins):
    version, tv, ours = twins
    torch.manual_seed(1)
    images = [torch.rand(3, 200, 300), torch.rand(3, 256, 256), torch.rand(3, 311, 190)]
    assert tv.detections_per_img == ours.config.detections_per_img == 300
    with torch.no_grad():
        expected = tv(images)
    got = ours.predict(images, min_size=256, max_size=400)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) > 50, "the test needs detections over the score threshold"
        assert torch.equal(e["labels"], g["labels"])
        torch.testing.assert_close(g["scores"], e["scores"], rtol=0, atol=1e-6)
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=0, atol=1e-4)


def test_predict_accepts_uint8_like_float(twins):
    _, _, ours = twins
    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8)
    a = ours.predict([image], min_size=128, max_size=200)[0]
    b = ours.predict([image.float() / 255], min_size=128, max_size=200)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and len(a["boxes"]) > 0


def test_losses_equal_torchvision_at_batch_one(twins):
    version, tv, ours = twins
    tv.train()
    for m in tv.modules():  # ours freezes BN; torchvision built without weights trains it
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    tv.transform.min_size, tv.transform.max_size = (256,), 256  # scale 1: same input for both
    images = [torch.rand(3, 256, 256)]
    targets = [{"boxes": torch.tensor([[10.0, 20, 100, 120], [50, 50, 200, 90], [3, 3, 9, 7]]),
                "labels": torch.tensor([1, 3, 4])}]
    expected = tv(images, targets)
    batch, prepared = tv.transform(images, targets)
    ours.train()
    got = ours(batch.tensors, batch.image_sizes, {"boxes": prepared[0]["boxes"][None],
                                                  "labels": prepared[0]["labels"][None],
                                                  "num_boxes": torch.tensor([3])})
    ours.eval()
    tv.eval()
    for key in ("classification", "bbox_regression"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_keeps_detections(twins, tmp_path):
    _, _, ours = twins
    blob = checkpoint_bytes(ours, step=7, metrics={"AP": 0.1})
    loaded, payload = load_checkpoint(blob)
    assert payload["step"] == 7 and payload["categories"] == ours.categories
    assert loaded.config == ours.config
    image = [torch.rand(3, 160, 200)]
    a, b = ours.predict(image, min_size=160, max_size=256)[0], loaded.predict(image, min_size=160, max_size=256)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_torchvision_state_dict_file_loads(twins, tmp_path):
    _, tv, ours = twins
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    loaded = from_torchvision(str(path))
    model, payload = load_checkpoint(str(path))
    assert payload["format"] == "torchvision"
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.categories[1]["name"] == "class_1"  # 5 classes: not COCO's table
