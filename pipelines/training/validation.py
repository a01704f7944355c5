"""COCO AP on the validation set after each epoch (rank 0 only; the set is small and not split).
Ground truth comes from its annotations.json, or is rebuilt from its shards."""
from __future__ import annotations

import numpy as np
import ray.train
import torch

from pipelines import storage
from pipelines.evaluation import scoring as evaluation
from pipelines.formats.annotations import shards_ground_truth
from pipelines.training.config import TrainConfig
from pipelines.training.datasets import DetectionCollate


def ground_truth(uri: str, categories: list[dict]) -> dict:
    """COCO ground truth of a validation set: its annotations.json, or rebuilt from its shards."""
    coco_json = storage.resolve(uri).join("annotations.json").uri()
    if storage.exists(coco_json):
        return evaluation.load_ground_truth(coco_json)
    return shards_ground_truth(uri, categories)


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


def validate(model, cfg: TrainConfig, device) -> dict[str, float]:
    """COCO AP on the whole validation set."""
    model.eval()
    category_ids = torch.tensor([c["id"] for c in cfg.categories])
    collate = DetectionCollate(cfg.model["size_divisible"], cfg.model["image_mean"], cfg.model["image_std"])
    rows = []
    with torch.inference_mode():
        for batch in ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=cfg.batch_size,
                                                                           collate_fn=collate):
            detections = model(batch["images"].to(device), batch["image_sizes"])
            rows.append(detections_array(detections, batch, category_ids))
    model.train()
    results = np.concatenate(rows) if rows else np.zeros((0, 7))
    return evaluation.coco_stats(ground_truth(cfg.val_data, cfg.categories), results)
