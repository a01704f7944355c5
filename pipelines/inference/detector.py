"""The detector actor's model: decoded rows -> prediction rows in original pixels. No Ray needed:
a GPU box without Ray runs the same batch code (bench/infer.py)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.images.collate import binary_views, normalize_images, padded_size
from pipelines.inference import predictions, runtimes


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

    def network_input(self, pixels, heights: np.ndarray, widths: np.ndarray):
        """Resized HxWx3 uint8 images (a binary column) -> (normalized padded batch, sizes [B, 2]).

        Pads into one uint8 canvas and normalizes on the device: the host copies a quarter of
        the bytes of a float batch and does no arithmetic per pixel.
        """
        import torch

        canvas = np.zeros((len(heights), *padded_size(heights, widths, self.config.size_divisible), 3), np.uint8)
        for i, (view, h, w) in enumerate(zip(binary_views(pixels), heights.tolist(), widths.tolist())):
            canvas[i, :h, :w] = view.reshape(h, w, 3)  # one copy per image: sizes differ
        sizes = torch.from_numpy(np.stack([heights, widths], 1).astype(np.int64))
        with torch.inference_mode():
            # NCHW for ONNX graphs and torch fp32 on CPUs; channels_last where the runtime wants it.
            images = normalize_images(torch.from_numpy(canvas).to(self.device, non_blocking=True), sizes,
                                      self.config.image_mean, self.config.image_std, self.channels_last)
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
            scale = np.repeat(ratio, per_image, 0)
            boxes = np.concatenate([d["boxes"].numpy() for d in dets]).astype(np.float64) * scale
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
