"""RetinaNet with focal loss (Lin et al.), batched end to end, torchvision-compatible weights.

Pure PyTorch + torchvision: imports nothing from Ray, `pipelines` or `jobs`.
"""
from retinanet.config import PRESETS, RetinaNetConfig, preset
from retinanet.losses import seesaw_loss
from retinanet.model import RetinaNet
from retinanet.weights import checkpoint_bytes, from_torchvision, load_checkpoint, save_checkpoint, torchvision_config


def build(preset_name: str = "tiny", categories: list[dict] | None = None, **overrides) -> RetinaNet:
    """A fresh model from a preset; `categories` (label order) also sets num_classes."""
    if categories is not None:
        overrides.setdefault("num_classes", len(categories))
    return RetinaNet(preset(preset_name, **overrides), categories=categories)


__all__ = ["PRESETS", "RetinaNet", "RetinaNetConfig", "build", "checkpoint_bytes", "from_torchvision",
           "load_checkpoint", "preset", "save_checkpoint", "seesaw_loss", "torchvision_config"]
