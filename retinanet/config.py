"""RetinaNet configuration: plain values with the paper's defaults, and named presets.

Defaults follow "Focal Loss for Dense Object Detection" (Lin et al., 2017): ResNet-FPN P3-P7,
9 anchors per location (3 scales x 3 aspect ratios), IoU 0.5/0.4 matching, prior pi = 0.01,
gamma = 2, alpha = 0.25, loss normalized by the positives, inference at score 0.05, top-1000
per level, NMS 0.5, 100 detections per image.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class RetinaNetConfig:
    num_classes: int = 80
    # Backbone + FPN
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    fpn_channels: int = 256
    p6_from: str = "c5"  # "c5" (paper, torchvision v2) or "p5" (torchvision v1)
    norm: str = "frozen_bn"  # frozen_bn (pretrained) | bn | sync_bn | group_norm (from scratch)
    bn_eps: float = 1e-5  # torchvision's COCO_V1 weights run their frozen BN with eps = 0
    trainable_layers: int = 3  # of conv1/layer1..layer4, counted from layer4 (torchvision's rule)
    # Head
    head_convs: int = 4
    head_norm: str | None = None  # None (paper, torchvision v1) or "group" (torchvision v2)
    prior_prob: float = 0.01
    # Anchors: base sizes for P3..P7, each x {2^0, 2^(1/3), 2^(2/3)} x aspect ratios
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # Matching
    fg_iou: float = 0.5
    bg_iou: float = 0.4
    allow_low_quality_matches: bool = True
    # Losses
    cls_loss: str = "focal"  # focal | seesaw (decoupled objectness + Seesaw over classes) | ohem
    focal_alpha: float = 0.25  # alpha-balanced CE is focal_gamma = 0 (paper's best alpha there: 0.75)
    focal_gamma: float = 2.0
    # OHEM (paper, Table 1d; best: 128 anchors per image, NMS 0.5, no ratio): per image the
    # anchors with the highest cross-entropy after NMS over the anchor boxes by loss.
    ohem_batch: int = 128  # anchors kept per image
    ohem_nms: float = 0.5  # IoU threshold of the NMS by loss
    ohem_ratio: float | None = None  # negatives per positive (3 = "OHEM 1:3"); None: highest loss only
    box_loss: str = "smooth_l1"  # smooth_l1 (beta = 0 is L1, torchvision v1) | giou (v2)
    smooth_l1_beta: float = 0.11
    seesaw_p: float = 0.8
    seesaw_q: float = 2.0
    seesaw_eps: float = 1e-2
    cosine_logits: bool = False  # normalized-linear class logits (seesaw only)
    cosine_temperature: float = 20.0
    # Inference
    score_thresh: float = 0.05
    topk_candidates: int = 1000
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    # Input
    min_size: int = 800
    max_size: int = 1333
    size_divisible: int = 128  # P7 has stride 128; torchvision pads to 32
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    extra: dict = field(default_factory=dict)  # free-form metadata, kept in checkpoints

    def __post_init__(self) -> None:
        choices = {
            "backbone": ("resnet18", "resnet34", "resnet50", "resnet101"),
            "p6_from": ("c5", "p5"),
            "norm": ("frozen_bn", "bn", "sync_bn", "group_norm"),
            "head_norm": (None, "group"),
            "cls_loss": ("focal", "seesaw", "ohem"),
            "box_loss": ("smooth_l1", "giou"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"RetinaNetConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if not 0 <= self.prior_prob < 1:
            raise ValueError(f"RetinaNetConfig.prior_prob must be in [0, 1) (0: zero bias), got {self.prior_prob}")
        if self.focal_gamma < 0 or not 0 <= self.focal_alpha <= 1:
            raise ValueError(f"RetinaNetConfig needs focal_gamma >= 0 and 0 <= focal_alpha <= 1, "
                             f"got {self.focal_gamma}, {self.focal_alpha}")
        if self.ohem_batch < 1 or not 0 < self.ohem_nms <= 1 or (self.ohem_ratio is not None and self.ohem_ratio <= 0):
            raise ValueError(f"RetinaNetConfig needs ohem_batch >= 1, 0 < ohem_nms <= 1, ohem_ratio > 0 or None; "
                             f"got {self.ohem_batch}, {self.ohem_nms}, {self.ohem_ratio}")
        if self.num_classes < 1:
            raise ValueError(f"RetinaNetConfig.num_classes must be >= 1, got {self.num_classes}")
        if len(self.anchor_sizes) != 5:
            raise ValueError("RetinaNetConfig.anchor_sizes needs 5 base sizes, one per level P3-P7")
        if not 0 <= self.trainable_layers <= 5:
            raise ValueError(f"RetinaNetConfig.trainable_layers must be in [0, 5], got {self.trainable_layers}")
        self.anchor_sizes = tuple(int(s) for s in self.anchor_sizes)
        self.aspect_ratios = tuple(float(r) for r in self.aspect_ratios)
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)

    @property
    def num_anchors(self) -> int:
        return 3 * len(self.aspect_ratios)

    def to_dict(self) -> dict:
        """Plain types only, so that checkpoints load with torch.load(weights_only=True)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RetinaNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown RetinaNetConfig fields: {sorted(unknown)}")
        return cls(**values)

    def replace(self, **changes) -> RetinaNetConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict] = {
    # CPUs and tests: ResNet-18, 64-channel FPN and heads with GroupNorm, anchors for small images.
    "tiny": dict(
        backbone="resnet18", fpn_channels=64, head_norm="group", norm="bn", trainable_layers=5,
        anchor_sizes=(16, 32, 64, 128, 256), min_size=128, max_size=213,
    ),
    # The paper's models.
    "r50": dict(backbone="resnet50"),
    "r101": dict(backbone="resnet101"),
}


def preset(name: str, **overrides) -> RetinaNetConfig:
    """A named preset (tiny | r50 | r101) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return RetinaNetConfig(**{**PRESETS[name], **overrides})
