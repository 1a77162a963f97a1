"""The one training and evaluation path of every cell, for all four tasks.

``run_cell(config, log, checkpoint)`` builds the data and the model a cell's config asks for,
trains with SGD (offset branches at their learning-rate multipliers, the paper's step at 2/3 of the
iterations), evaluates on the validation split and returns the metrics (percent):

- deeplab: ``miou``;
- rpn / faster / rfcn: ``map50``, ``map70`` (VOC-style), ``map_coco`` (mAP@[0.5:0.95]) and
  ``ap_small``, ``ap_medium``, ``ap_large`` (COCOeval);
- with ``eval.effective_dilation``: ``effdil_<layer>_<cat>_{mean,std}`` for every deformable layer
  of res5 and cat in small / medium / large / background (Table 2).

Same config, seed and thread count give the same metrics (fixed seeds, no data-loader workers).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dcnbench.data.datasets import SyntheticDataset, build_dataset
from dcnbench.data.synthetic import SynthConfig
from dcnbench.data.transforms import collate_detection, collate_segmentation, paper_transforms
from dcnbench.evaluation.segmentation import SegmentationMetric
from dcnbench.models.backbone import load_backbone_weights
from dcnbench.models.build import build_model
from dcnbench.ops import backend_for, offset_param_groups

MODEL_TASK = {"deeplab": "deeplab", "rpn": "rpn", "faster": "faster_rcnn", "rfcn": "rfcn"}
REAL_SPLITS = {  # dataset source -> (train split, validation split)
    "voc_seg": ("train_aug", "val"),
    "cityscapes": ("train", "val"),
    "voc_det": ("07+12", "07test"),
    "coco": ("train2017", "val2017"),
}


def build_data(task: str, data: dict) -> tuple[Dataset, Dataset, int]:
    """(train set, validation set, number of foreground classes) for a cell's data config."""
    source = data.get("source", "synthetic")
    if source == "synthetic":
        synth = SynthConfig(size=data["size"], num_classes=data["classes"], min_size=data["min_object"],
                            max_size=data["max_object"])
        kind = "voc_seg" if task == "deeplab" else "detection"
        train = SyntheticDataset(data["num_train"], synth, data.get("seed", 0),
                                 paper_transforms(kind, train=True, shorter_side=0), cache=True)
        val = SyntheticDataset(data["num_val"], synth, data.get("seed", 0),
                               paper_transforms(kind, train=False, shorter_side=0), start=data["num_train"], cache=True)
        return train, val, synth.num_classes
    if source not in REAL_SPLITS:
        raise ValueError(f"data.source must be 'synthetic' or one of {sorted(REAL_SPLITS)}, got {source!r}")
    if not data.get("root"):
        raise ValueError(f"data.source {source!r} needs the dataset root: pass --data-root")
    train_split, val_split = REAL_SPLITS[source]
    side = data.get("shorter_side")
    train = build_dataset(source, data["root"], train_split, train=True, shorter_side=side)
    val = build_dataset(source, data["root"], val_split, train=False, shorter_side=side)
    # Foreground classes C (heads predict C+1); Cityscapes' 19 train ids 0..18 fill all C+1 maps.
    num_classes = {"voc_seg": 20, "voc_det": 20, "cityscapes": 18, "coco": 80}[source]
    return train, val, num_classes


def _loader(dataset: Dataset, task: str, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    collate = collate_segmentation if task == "deeplab" else collate_detection
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator,
                      drop_last=shuffle, num_workers=0)


def _forever(loader: DataLoader):
    while True:
        yield from loader


def lr_factor(iteration: int, iters: int, warmup_iters: int) -> float:
    """Linear warmup from 1/3, then 1 until 2/3 of the iterations and 0.1 after (paper section 4.1)."""
    if iteration < warmup_iters:
        return 1 / 3 + (2 / 3) * iteration / warmup_iters
    return 1.0 if iteration < math.ceil(2 * iters / 3) else 0.1


def train_loss(model: nn.Module, task: str, batch) -> Tensor:
    if task == "deeplab":
        images, masks = batch
        return model.loss(model(images), masks)
    images, targets = batch
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    return sum(model(images, targets).values())


def train(model: nn.Module, task: str, dataset: Dataset, cfg: dict, seed: int, log: TextIO) -> None:
    """SGD for ``cfg['iters']`` iterations of ``cfg['batch_size']`` images."""
    groups = offset_param_groups(model, cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    optimizer = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg.get("momentum", 0.9))
    base_lrs = [g["lr"] for g in groups]
    batches = _forever(_loader(dataset, task, cfg["batch_size"], True, seed))
    model.train()
    start = time.perf_counter()
    log_every = max(1, cfg["iters"] // 20)
    for iteration in range(cfg["iters"]):
        factor = lr_factor(iteration, cfg["iters"], cfg.get("warmup_iters", 0))
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        loss = train_loss(model, task, next(batches))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at iteration {iteration}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if iteration % log_every == 0 or iteration == cfg["iters"] - 1:
            log.write(f"iter {iteration:6d}  loss {loss.item():.4f}  lr {cfg['lr'] * factor:.2e}  "
                      f"{time.perf_counter() - start:.1f} s\n")
            log.flush()


@torch.no_grad()
def evaluate(model: nn.Module, task: str, dataset: Dataset, num_classes: int, cfg: dict) -> dict:
    model.eval()
    loader = _loader(dataset, task, cfg.get("batch_size", 1), False, 0)
    if task == "deeplab":
        metric = SegmentationMetric(num_classes + 1)
        for images, masks in loader:
            metric.update(model(images).argmax(1), masks)
        return {"miou": 100 * metric.compute()["miou"]}
    from dcnbench.evaluation.detection import evaluate_detections

    detections, targets = [], []
    for images, batch_targets in loader:
        detections += model(images)
        targets += batch_targets
    return evaluate_detections(detections, targets, num_classes)


def run_cell(config: dict, log: TextIO, checkpoint: Path | None = None) -> dict:
    """Train and evaluate one cell; save its weights to ``checkpoint`` (and the config beside it)."""
    task, seed = config["task"], config["seed"]
    torch.manual_seed(seed)
    train_set, val_set, num_classes = build_data(task, config["data"])
    model_cfg = {k: v for k, v in config["model"].items() if k != "weights"}
    model = build_model({**model_cfg, "task": MODEL_TASK[task], "num_classes": num_classes})
    if config["model"].get("weights"):
        load_backbone_weights(model, config["model"]["weights"])
    log.write(f"config {json.dumps(config, sort_keys=True)}\n")
    log.write(f"train {len(train_set)} / val {len(val_set)} images, {sum(p.numel() for p in model.parameters())} params\n")
    train(model, task, train_set, config["train"], seed, log)
    metrics = evaluate(model, task, val_set, num_classes, config["eval"])
    if config["eval"].get("effective_dilation"):
        from .dilation import effective_dilation_metrics

        metrics.update(effective_dilation_metrics(model, val_set, config["eval"]))
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), checkpoint)
        checkpoint.with_suffix(".json").write_text(json.dumps(config, indent=1, sort_keys=True))
    log.write(f"metrics {json.dumps(metrics)}\n")
    probe = next(model.parameters())
    return {**metrics, "device": str(probe.device), "backend": backend_for(probe)}
