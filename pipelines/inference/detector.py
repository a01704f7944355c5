"""The detector actor's model: decoded rows -> prediction rows in original pixels. No Ray needed:
a GPU box without Ray runs the same batch code (bench/infer.py)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.inference import predictions, runtimes


def _binary_buffers(column) -> tuple[np.ndarray, np.ndarray]:
    """(bytes as uint8, offsets as int64) of a binary column, without copying each value."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    _, offsets, data = arr.buffers()
    offsets = np.frombuffer(offsets, width)[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    return (np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)), offsets


class Detector:
    """The network, loaded once per Ray Data actor: decoded rows -> prediction rows (original pixels).

    `checkpoint` is a checkpoint's or an exported ONNX file's bytes, or an ObjectRef to them (put
    once by the driver, so actors never download weights themselves). `runtime` and `precision`
    pick where the network runs (`pipelines.inference.runtimes`); post-processing is the same
    batched torch code for all of them.
    """

    def __init__(self, checkpoint, *, model_name: str, score_thresh: float | None = None,
                 max_detections: int | None = None, use_gpu: bool = False, runtime: str = "torch",
                 precision: str = "fp32", threads: int | None = None):
        import torch

        from retinanet.postprocess import DetectionDecoder

        if not isinstance(checkpoint, (bytes, bytearray)):
            import ray

            checkpoint = ray.get(checkpoint)
        network = runtimes.load_network(bytes(checkpoint), runtime, precision, use_gpu=use_gpu, threads=threads)
        overrides = {"score_thresh": score_thresh, "detections_per_img": max_detections}
        self.config = network.config.replace(**{k: v for k, v in overrides.items() if v is not None})
        self.network, self.channels_last = network.run, network.channels_last
        self.decoder = DetectionDecoder(self.config)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if use_gpu:
            torch.backends.cudnn.benchmark = True
        self.categories, self.model_name = network.categories, model_name
        self.mean = torch.tensor(self.config.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.config.image_std, device=self.device).view(1, 3, 1, 1)

    def network_input(self, pixels, heights: np.ndarray, widths: np.ndarray):
        """Resized HxWx3 uint8 images (a binary column) -> (normalized padded batch, sizes [B, 2]).

        Pads into one uint8 canvas and normalizes on the device: the host copies a quarter of
        the bytes of a float batch and does no arithmetic per pixel.
        """
        import torch

        data, offsets = _binary_buffers(pixels)
        div = self.config.size_divisible
        pad_h, pad_w = (int(-(-max(int(s.max()), 1) // div) * div) for s in (heights, widths))
        canvas = np.zeros((len(heights), pad_h, pad_w, 3), np.uint8)
        for i, (h, w) in enumerate(zip(heights.tolist(), widths.tolist())):  # one copy per image
            canvas[i, :h, :w] = data[offsets[i]:offsets[i + 1]].reshape(h, w, 3)
        sizes = torch.from_numpy(np.stack([heights, widths], 1).astype(np.int64))
        with torch.inference_mode():
            images = torch.from_numpy(canvas).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            if not self.channels_last:
                images = images.contiguous()  # NCHW: ONNX graphs, and torch fp32 on CPUs
            images = images.float().div_(255.0).sub_(self.mean).div_(self.std)
            inside = (torch.arange(pad_h, device=self.device)[None, :, None] < sizes[:, :1, None].to(self.device)) & (
                torch.arange(pad_w, device=self.device)[None, None, :] < sizes[:, 1:, None].to(self.device))
            images.mul_(inside[:, None])
        return images, sizes

    def detect(self, pixels, heights: np.ndarray, widths: np.ndarray) -> list[dict]:
        """Resized HxWx3 uint8 images (a binary column) -> detections in resized pixels (CPU tensors)."""
        import torch

        images, sizes = self.network_input(pixels, heights, widths)
        with torch.inference_mode():
            out = self.decoder(self.network(images), tuple(images.shape[-2:]), sizes)
        return [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in d.items()} for d in out]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Decoded rows (`preprocess_images_batch` + unit/index) -> predictions schema + unit/index."""
        n = batch.num_rows
        valid = pc.is_null(batch["error"]).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(valid)
        counts = np.zeros(n, np.int64)
        boxes, scores, labels = np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros(0, np.int64)
        if len(rows):
            sub = batch.take(pa.array(rows))
            col = lambda name: sub[name].to_numpy().astype(np.int64)  # noqa: E731
            heights, widths = col("height"), col("width")
            dets = self.detect(sub["pixels"], heights, widths)
            per_image = np.array([len(d["scores"]) for d in dets], np.int64)
            counts[rows] = per_image
            ratio = np.stack([col("orig_width") / widths, col("orig_height") / heights] * 2, 1)  # x, y, x, y
            boxes = np.concatenate([d["boxes"].numpy() for d in dets]).astype(np.float64) * np.repeat(ratio, per_image, 0)
            scores = np.concatenate([d["scores"].numpy() for d in dets])
            labels = np.concatenate([d["labels"].numpy() for d in dets])
        size_mask = pa.array(~valid)
        return pa.table({
            "unit": batch["unit"], "index": batch["index"], "image_id": batch["image_id"], "uri": batch["uri"],
            "width": pc.if_else(size_mask, None, batch["orig_width"].cast(pa.int32())),
            "height": pc.if_else(size_mask, None, batch["orig_height"].cast(pa.int32())),
            "detections": predictions.detections_array(counts, valid, boxes, scores, labels, self.categories),
            "error": batch["error"],
            "model": pa.array([self.model_name] * n, pa.string()),
        })
