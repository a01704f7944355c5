"""The network as ONNX: images in, class logits and box deltas out, with dynamic batch and size.

Only backbone, FPN and the two subnets go into the graph. Anchors, decoding, thresholds and NMS
stay in `retinanet.postprocess` for every runtime, so that one post-processing serves torch,
ONNX Runtime, OpenVINO and a TensorRT engine alike, and the graph holds no op that TensorRT
needs a plugin for (NonMaxSuppression, TopK over a data-dependent count).

The file carries what inference needs in its metadata (`METADATA_KEY`, one JSON string): the
model config, the category table, the input normalization, the size divisibility and the
identity of the checkpoint it came from, so that `--model FILE.onnx` needs nothing else.
"""
from __future__ import annotations

import io
import json
import warnings

import torch
import torchvision
from torch import nn

from retinanet.config import RetinaNetConfig

METADATA_KEY = "retinanet_ray"
EXPORT_FORMAT = "retinanet-ray-onnx/1"
INPUT_NAME = "images"
DEFAULT_OPSET = 17


def output_names(cfg: RetinaNetConfig) -> list[str]:
    """[B, N, C] class logits, [B, N, 4] box deltas, and with Seesaw [B, N] objectness logits;
    N runs over P3..P7, location-major, in the anchors' order (`feature_grid_sizes`)."""
    return ["cls_logits", "bbox_regression"] + (["objectness"] if cfg.cls_loss == "seesaw" else [])


class ExportedNetwork(nn.Module):
    """`RetinaNet.network` with tuple outputs in `output_names` order (what tracing needs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.network(images)
        return tuple(out[name] for name in output_names(self.model.config))


def export_metadata(model, source: str) -> dict:
    cfg = model.config
    return {
        "format": EXPORT_FORMAT,
        "source": source,  # the identity of the checkpoint, as jobs.infer writes it in `model`
        "config": cfg.to_dict(),
        "categories": [dict(c) for c in model.categories],
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "scale": 1 / 255,
                  "mean": list(cfg.image_mean), "std": list(cfg.image_std), "size_divisible": cfg.size_divisible},
        "outputs": output_names(cfg),
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
    }


def export_onnx(model, source: str, opset: int = DEFAULT_OPSET) -> bytes:
    """The ONNX file (bytes) of `model`'s network, metadata included. Dynamic axes: batch,
    height and width of the input; batch and anchors of every output."""
    import onnx

    model = getattr(model, "module", model)
    size = model.config.size_divisible * 2
    sample = torch.zeros(1, 3, size, size + model.config.size_divisible)
    names = output_names(model.config)
    dynamic = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, **{n: {0: "batch", 1: "anchors"} for n in names}}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape arithmetic that the dynamic axes cover
        # The TorchScript-based exporter: deterministic, no extra dependency, and what TensorRT's
        # and OpenVINO's ONNX front ends have read for years.
        torch.onnx.export(ExportedNetwork(model).eval(), (sample,), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=names, dynamic_axes=dynamic,
                          do_constant_folding=True)
    proto = onnx.load_model_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(export_metadata(model, source))
    proto.producer_name = "retinanet-ray"
    return proto.SerializeToString()


def read_metadata(data: bytes) -> dict:
    """The metadata of an exported file; ValueError when it is not ONNX or not one of ours."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"not an ONNX file ({type(exc).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"an ONNX file without the {METADATA_KEY!r} metadata that jobs.export writes "
                         f"(producer {proto.producer_name or 'unknown'!r})")
    meta = json.loads(props[METADATA_KEY])
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"exported as {meta.get('format')!r}; this version reads {EXPORT_FORMAT!r}")
    return meta


def is_onnx(data: bytes) -> bool:
    """An ONNX ModelProto starts with its ir_version field (tag 0x08); a checkpoint is a zip
    (torch.save) or a pickle (0x80)."""
    return data[:1] == b"\x08"
