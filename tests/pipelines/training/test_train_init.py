"""Where training starts: ImageNet backbones and torchvision detectors to fine-tune (no Ray here).

The job's own option path is used (`resolve_options` -> `model_setup` on the driver ->
`initial_model` on a worker); weights come from seeded files in tmp, never from the internet.
"""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from torchvision.models import resnet50
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

import retinanet
from jobs import train
from pipelines.errors import UserError
from pipelines.training.datasets import training_manifest
from pipelines.training.init import initial_model, model_setup
from retinanet.weights import transfer_weights


def _setup(synth_coco, tmp_path, *flags):
    options = train.resolve_options(["--data", str(synth_coco), "--output", str(tmp_path / "out"), *flags])
    categories = training_manifest(str(synth_coco)).categories
    model, weights = model_setup(options, categories)
    return dataclasses.replace(options, model=model, categories=categories, backbone_weights=weights)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    torch.manual_seed(11)
    reference = resnet50(weights=None)
    with torch.no_grad():  # BN statistics that are not the 0/1 defaults, so a skipped load shows
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet50-seeded.pth"
    torch.save(reference.state_dict(), path)
    return path


def test_frozen_bn_without_pretrained_weights_is_refused(synth_coco, tmp_path):
    with pytest.raises(UserError, match="frozen BatchNorm needs pretrained.*--norm sync_bn or --norm group_norm"):
        _setup(synth_coco, tmp_path, "--preset", "r50", "--backbone-weights", "none")
    cfg = _setup(synth_coco, tmp_path, "--preset", "r50", "--backbone-weights", "none", "--norm", "group_norm")
    assert cfg.model["norm"] == "group_norm" and cfg.model["trainable_layers"] == 5
    model = initial_model(cfg)
    assert all(p.requires_grad for p in model.parameters()), "from scratch: every layer trains"


def test_backbone_weights_file_equals_torchvision_resnet(synth_coco, tmp_path, resnet50_file):
    cfg = _setup(synth_coco, tmp_path, "--preset", "r50", "--backbone-weights", str(resnet50_file))
    assert cfg.model["norm"] == "frozen_bn" and cfg.backbone_weights == str(resnet50_file)
    ours = initial_model(cfg).backbone.body
    reference = resnet50(weights=None)
    reference.load_state_dict(torch.load(resnet50_file, weights_only=True))
    expected = {k: v for k, v in reference.state_dict().items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    got = ours.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        want = reference.eval()
        x_ref = x
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            x_ref = getattr(want, name)(x_ref)
        torch.testing.assert_close(ours.eval()(x)["2"], x_ref, rtol=1e-3, atol=1e-3)  # frozen BN folds differently
    # the paper's freezing: stem and layer1 fixed, layer2-4 trained
    trainable = {n.split(".")[0] for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}


def test_unreachable_named_weights_fail_in_one_line_before_ray(synth_coco, tmp_path):
    """r50 defaults to ImageNet weights; with no internet the job names the fix and starts nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(TORCH_HOME=str(tmp_path / "torch"), HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--data", str(synth_coco),
                        "--output", str(tmp_path / "out"), "--preset", "r50"],
                       capture_output=True, text=True, timeout=300, env=env)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(errors) == 1 and "ResNet50_Weights.IMAGENET1K_V1" in errors[0] and "cannot download" in errors[0]
    assert "pass its URI" in errors[0]
    assert not (tmp_path / "out").exists(), "nothing was started or written"


@pytest.fixture(scope="module")
def torchvision_v2(tmp_path_factory):
    """A seeded torchvision RetinaNet v2 (3 classes, the synthetic set's count), scores pushed over 0.05."""
    torch.manual_seed(5)
    tv = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128)
    with torch.no_grad():
        tv.head.classification_head.cls_logits.weight.normal_(0, 0.05)
        tv.head.classification_head.cls_logits.bias.fill_(-2.0)
    path = tmp_path_factory.mktemp("tv") / "retinanet_v2.pth"
    torch.save(tv.state_dict(), path)
    return tv.eval(), path


def test_fine_tune_from_torchvision_file_gives_its_detections(synth_coco, tmp_path, torchvision_v2):
    tv, path = torchvision_v2
    cfg = _setup(synth_coco, tmp_path, "--init", str(path), "--image-size", "128", "--max-size", "128")
    assert cfg.model["p6_from"] == "c5" and cfg.model["head_norm"] == "group"
    assert cfg.model["norm"] == "frozen_bn" and cfg.model["num_classes"] == 3
    ours = initial_model(cfg).eval()
    torch.manual_seed(2)
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    with torch.no_grad():
        expected = tv(images)
    got = ours.predict(images)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) > 20, "the test needs detections over the score threshold"
        assert torch.equal(e["labels"], g["labels"])
        torch.testing.assert_close(g["scores"], e["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=0, atol=1e-3)


def test_only_class_logits_may_stay_new(torchvision_v2):
    tv, _ = torchvision_v2
    donor = retinanet.from_torchvision(tv.state_dict())
    other_classes = retinanet.RetinaNet(donor.config.replace(num_classes=7))
    assert transfer_weights(donor, other_classes) == ["head.classification_head.cls_logits.bias",
                                                      "head.classification_head.cls_logits.weight"]
    torch.testing.assert_close(other_classes.head.regression_head.bbox_reg.weight,
                               donor.head.regression_head.bbox_reg.weight)
    without_group_norm = retinanet.RetinaNet(donor.config.replace(head_norm=None))
    with pytest.raises(ValueError,
                       match=r"24 tensors .* do not transfer: .*head\.classification_head\.conv\.0\.1\.weight"):
        transfer_weights(donor, without_group_norm)


def test_v1_donor_keeps_p6_from_p5(synth_coco, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "v1.pth"
    torch.save(retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5).state_dict(), path)
    cfg = _setup(synth_coco, tmp_path, "--init", str(path))
    assert cfg.model["p6_from"] == "p5" and cfg.model["head_norm"] is None and cfg.model["num_classes"] == 3
    model = initial_model(cfg)
    assert model.backbone.fpn.extra_blocks.p6.weight.shape[1] == 256  # from P5, not C5 (2048)
    with pytest.raises(UserError, match="--init brings its own backbone"):
        _setup(synth_coco, tmp_path, "--init", str(path), "--norm", "sync_bn")
