"""int8 post-training quantization of an exported network, calibrated on the user's own images.

ONNX Runtime's static quantizer writes a QDQ graph (QuantizeLinear/DequantizeLinear pairs around
each quantized op): weights int8 per output channel, activations uint8 with ranges observed on
calibration batches. The same file runs under ONNX Runtime (VNNI int8 kernels) and OpenVINO
(which fuses QDQ into int8 convolutions), and TensorRT reads QDQ as explicit quantization. The
project's metadata is carried over with a `quantization` entry, so jobs.infer needs nothing else.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# The last convolution of each subnet stays float: its outputs are the logits and deltas that
# thresholds and box decoding read directly, and quantizing them costs the most accuracy for
# the least time (two of ~70 convolutions).
FLOAT_OUTPUT_CONVS = ("cls_logits", "bbox_reg", "objectness")


def quantize_int8(onnx_bytes: bytes, batches: Iterable[np.ndarray], calibration: str) -> bytes:
    """The QDQ int8 graph of `onnx_bytes`, activation ranges from `batches` (normalized NCHW
    float32, as `Detector.network_input` makes them); `calibration` names them in the metadata."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from retinanet.export import METADATA_KEY

    batches = [np.ascontiguousarray(b, np.float32) for b in batches]
    if not batches:
        raise ValueError("int8 calibration needs at least one batch of images")

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(batches)

        def get_next(self):
            batch = next(self.remaining, None)
            return None if batch is None else {"images": batch}

    source = onnx.load_model_from_string(onnx_bytes)
    meta = json.loads({p.key: p.value for p in source.metadata_props}[METADATA_KEY])
    with tempfile.TemporaryDirectory(prefix="retinanet-int8-") as tmp:
        fp32, prepared, int8 = (str(Path(tmp) / name) for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        Path(fp32).write_bytes(onnx_bytes)
        quant_pre_process(fp32, prepared, skip_symbolic_shape=True)  # folds and infers shapes
        excluded = [n.name for n in onnx.load(prepared, load_external_data=False).graph.node
                    if n.op_type == "Conv" and any(f"/{name}/" in n.name for name in FLOAT_OUTPUT_CONVS)]
        quantize_static(prepared, int8, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)
        model = onnx.load(int8)
    meta["quantization"] = {"type": "int8", "format": "QDQ", "weights": "int8 per channel",
                            "activations": "uint8 per tensor, MinMax", "calibration": calibration,
                            "calibration_images": int(sum(len(b) for b in batches)), "float_convs": excluded}
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    return model.SerializeToString()
