"""COCO AP on the validation set after each epoch of `jobs.train` (rank 0 only; the set is
small and not split). Ground truth comes from its annotations.json, or is rebuilt from its
shards."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import ray.train
import torch

from pipelines import storage
from pipelines.evaluation import scoring as evaluation
from pipelines.formats import shards
from pipelines.training.datasets import DetectionCollate


def ground_truth(uri: str, manifest_categories: list[dict]) -> dict:
    """COCO ground truth of a validation set: its annotations.json, or rebuilt from its shards."""
    root = storage.resolve(uri)
    coco_json = root.join("annotations.json").uri()
    if storage.exists(coco_json):
        return evaluation.load_ground_truth(coco_json)
    manifest = shards.read_manifest(uri)
    fs, _ = storage.arrow_filesystem(uri)
    columns = ["image_id", "width", "height", "boxes", "category_id", "iscrowd", "area"]
    images, annotations = [], []
    for shard_uri in shards.shard_uris(uri, manifest):
        table = pq.read_table(storage.resolve(shard_uri).path, filesystem=fs, columns=columns).to_pylist()
        for row in table:
            images.append({"id": row["image_id"], "width": row["width"], "height": row["height"]})
            for box, cat, crowd, area in zip(row["boxes"], row["category_id"], row["iscrowd"], row["area"]):
                annotations.append({"id": len(annotations) + 1, "image_id": row["image_id"], "category_id": cat,
                                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                    "area": area, "iscrowd": int(crowd)})
    return {"images": images, "annotations": annotations, "categories": manifest_categories}


def detections_array(detections: list[dict], batch: dict, category_ids: torch.Tensor) -> np.ndarray:
    """Detections of a collated batch -> COCO results rows (image_id, x, y, w, h, score, category_id)
    in original pixels."""
    counts = [len(d["scores"]) for d in detections]
    if not sum(counts):
        return np.zeros((0, 7))
    boxes = torch.cat([d["boxes"] for d in detections]).cpu().double()
    scale = batch["scale"].double().repeat_interleave(torch.tensor(counts))
    boxes = boxes / scale[:, None]
    image_ids = batch["image_id"].cpu().repeat_interleave(torch.tensor(counts)).double()
    labels = torch.cat([d["labels"] for d in detections]).cpu()
    return torch.stack([image_ids, boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1],
                        torch.cat([d["scores"] for d in detections]).cpu().double(),
                        category_ids[labels].double()], dim=1).numpy()


def validate(model, cfg: dict, device) -> dict[str, float]:
    """COCO AP on the whole validation set (rank 0 only; the set is small and not split)."""
    model.eval()
    category_ids = torch.tensor([c["id"] for c in cfg["categories"]])
    rows = []
    with torch.inference_mode():
        for batch in ray.train.get_dataset_shard("val").iter_torch_batches(
                batch_size=cfg["batch_size"], collate_fn=DetectionCollate(cfg["model"]["size_divisible"], cfg["model"]["image_mean"],
                                                                         cfg["model"]["image_std"])):
            detections = model(batch["images"].to(device), batch["image_sizes"])
            rows.append(detections_array(detections, batch, category_ids))
    model.train()
    results = np.concatenate(rows) if rows else np.zeros((0, 7))
    return evaluation.coco_stats(ground_truth(cfg["val_data"], cfg["categories"]), results)
