"""The one training and evaluation path of every cell, for all four tasks.

``run_cell(config, log, checkpoint)`` builds the data and the model a cell's config asks for,
trains with SGD (offset branches at their learning-rate multipliers, the paper's step at 2/3 of the
iterations), evaluates on the validation split and returns the metrics (percent):

- deeplab: ``miou``;
- rpn / faster / rfcn: ``map50``, ``map70`` (VOC-style), ``map_coco`` (mAP@[0.5:0.95]) and
  ``ap_small``, ``ap_medium``, ``ap_large`` (COCOeval);
- with ``eval.effective_dilation``: ``effdil_<layer>_<cat>_{mean,std}`` for every deformable layer
  of res5 and cat in small / medium / large / background (Table 2), objects bucketed by area
  terciles, or at the paper's 96² and 224² px with ``eval.dilation_buckets = "paper"``.

Same config, seed and thread count give the same metrics (fixed seeds, no data-loader workers).

Under ``torchrun`` (a process group initialised, see :mod:`.distributed`) the same functions run
data-parallel: DistributedDataParallel, ``batch_size`` is the global batch split evenly over the
ranks (DistributedSampler, per-image seeded flips), evaluation on rank shards reduced across ranks
(confusion matrices summed, detections gathered to rank 0), checkpoints written by rank 0 only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from dcnbench.data.datasets import SyntheticDataset, build_dataset
from dcnbench.errors import is_int, is_number
from dcnbench.data.synthetic import SynthConfig
from dcnbench.data.transforms import collate_detection, collate_segmentation, paper_transforms
from dcnbench.evaluation.detection import DetectionEvaluator, check_area_ranges
from dcnbench.evaluation.dilation import DilationStats
from dcnbench.evaluation.segmentation import SegmentationMetric
from dcnbench.models.backbone import load_backbone_weights
from dcnbench.models.build import build_model, check_config, check_task_keys
from dcnbench.ops import backend_for, offset_param_groups

from . import distributed as dist
from .dilation import check_dilation_buckets, dilation_metrics, dilation_stats

MODEL_TASK = {"deeplab": "deeplab", "rpn": "rpn", "faster": "faster_rcnn", "rfcn": "rfcn", "proposals": "proposals"}
REAL_SPLITS = {  # dataset source -> (train split, validation split)
    "voc_seg": ("train_aug", "val"),
    "cityscapes": ("train", "val"),
    "voc_det": ("07+12", "07test"),
    "coco": ("train2017", "val2017"),
}


WEIGHTS_KEYS = ("weights", "weights_sha256")  # a cell's backbone weights file and its digest (ablate --weights)


def model_settings(config: dict) -> dict:
    """The ``build_model`` settings of a cell's ``config``: its model section without the weights
    file and its digest, which :func:`run_cell` loads and checks separately."""
    return {k: v for k, v in config["model"].items() if k not in WEIGHTS_KEYS}


def definition(config: dict) -> dict:
    """A cell's ``config`` as the experiment files define it: without the seed and the local inputs a
    sweep is given (the dataset root, the weights file and its digest)."""
    out = {k: v for k, v in config.items() if k != "seed"}
    out["data"] = {k: v for k, v in config["data"].items() if k != "root"}
    out["model"] = model_settings(config)
    return out


def config_digest(payload: dict) -> str:
    """12 hex digits of SHA-1 over ``payload`` as sorted-key JSON (the cells' config hashes)."""
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_settings(config: dict) -> None:
    """ValueError naming the first model, train or eval setting of a cell's ``config`` whose value
    :func:`run_cell` would reject or misread: :func:`expand_cells` calls it, so a typo in an
    experiment file fails when the table is loaded, not after a cell has trained (the evaluation
    settings are read last), or a synthetic training set smaller than one batch. The other data
    settings are checked when the data is built, before training."""
    rules = (
        ("train", "iters", "a positive integer", lambda v: is_int(v) and v >= 1),
        ("train", "batch_size", "a positive integer", lambda v: is_int(v) and v >= 1),
        ("train", "lr", "a positive number", lambda v: is_number(v) and v > 0),
        ("train", "momentum", "a number in [0, 1)", lambda v: is_number(v) and 0 <= v < 1),
        ("train", "weight_decay", "a number >= 0", lambda v: is_number(v) and v >= 0),
        ("train", "warmup_iters", "an integer >= 0", lambda v: is_int(v) and v >= 0),
        ("eval", "batch_size", "a positive integer", lambda v: is_int(v) and v >= 1),
        ("eval", "effective_dilation", "true or false", lambda v: isinstance(v, bool)),
        ("eval", "voc07_metric", "true or false", lambda v: isinstance(v, bool)),
        ("train", "fixed_proposals", "true or false", lambda v: isinstance(v, bool)),
    )
    for section, key, what, ok in rules:
        if key in config[section] and not ok(config[section][key]):
            raise ValueError(f"{section}.{key} must be {what}, got {config[section][key]!r}")
    if config["train"].get("fixed_proposals") and config["task"] not in ("faster", "rfcn"):
        raise ValueError(f"train.fixed_proposals is for the two-stage detectors (faster, rfcn), not {config['task']!r}, "
                         f"which make no proposals")
    try:
        check_task_keys(model_settings(config), MODEL_TASK[config["task"]])
        check_config(model_settings(config))
    except ValueError as exc:
        raise ValueError(f"model {exc}") from exc
    check_area_ranges(config["eval"].get("area_ranges", "terciles"), name="eval.area_ranges")
    check_dilation_buckets(config["eval"].get("dilation_buckets", "terciles"))
    num_train, batch = config["data"].get("num_train"), config["train"].get("batch_size", 1)
    if config["data"].get("source", "synthetic") == "synthetic" and is_int(num_train) and num_train < batch:
        raise ValueError(f"data.num_train ({num_train}) must be at least train.batch_size ({batch}): incomplete "
                         f"batches are dropped, so none would train")


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
    sizes = {"shorter_side": data.get("shorter_side"), "max_side": data.get("max_side")}
    train = build_dataset(source, data["root"], train_split, train=True, **sizes)
    val = build_dataset(source, data["root"], val_split, train=False, **sizes)
    return train, val, train.num_classes  # C, as every loader counts it (heads predict C+1)


def _loader(dataset: Dataset, task: str, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Batches of ``dataset``: DeepLab training stacks images and masks (``collate_segmentation``); every
    other use keeps lists of images and target dicts (``collate_detection``)."""
    collate = collate_segmentation if task == "deeplab" and shuffle else collate_detection
    if dist.is_distributed():
        if not shuffle:  # evaluation: this rank's shard, no padding
            return DataLoader(Subset(dataset, dist.shard(len(dataset))), batch_size=batch_size, collate_fn=collate)
        # Training: rank r's k-th batch and the others' together are the k-th global batch.
        dataset = dist.SeededAugmentation(dataset, seed)
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(dataset, batch_size=dist.per_rank_batch(batch_size), sampler=sampler, collate_fn=collate,
                          drop_last=True, num_workers=0)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator,
                      drop_last=shuffle, num_workers=0)


def _forever(loader: DataLoader):
    """The loader's batches, pass after pass; ValueError when a pass yields none (fewer training
    images than a batch, whose incomplete batch is dropped: the loop spun forever)."""
    epoch = 0
    while True:
        if isinstance(loader.sampler, DistributedSampler):  # a new shuffle and new flips per pass
            loader.sampler.set_epoch(epoch)
            loader.dataset.epoch = epoch
        batches = 0
        for batch in loader:
            batches += 1
            yield batch
        if batches == 0:
            raise ValueError(f"the training set ({len(loader.dataset)} images) is smaller than one batch "
                             f"(train.batch_size {loader.batch_size * dist.world_size()}): no batch to train on")
        epoch += 1


def _to(batch, device: torch.device):
    """Tensors of a (nested) batch on ``device``; unchanged on the CPU."""
    if device.type == "cpu":
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def lr_factor(iteration: int, iters: int, warmup_iters: int) -> float:
    """Linear warmup from 1/3, then 1 until 2/3 of the iterations and 0.1 after (paper section 4.1)."""
    if iteration < warmup_iters:
        return 1 / 3 + (2 / 3) * iteration / warmup_iters
    return 1.0 if iteration < math.ceil(2 * iters / 3) else 0.1


def _fixed_proposals(targets: list[dict]) -> dict:
    """``{"proposals": [...]}`` when the targets carry fixed proposals (:mod:`.proposals`), else ``{}``:
    the keyword arguments of a detector's call."""
    return {"proposals": [t["proposals"] for t in targets]} if targets and "proposals" in targets[0] else {}


def train_loss(model: nn.Module, task: str, batch, forward: nn.Module | None = None) -> Tensor:
    """The batch's training loss; ``forward`` is the module to call (the DDP wrapper), default ``model``."""
    forward = forward or model
    if task == "deeplab":
        images, masks = batch
        return model.loss(forward(images), masks)
    images, targets = batch
    boxes = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    return sum(forward(images, boxes, **_fixed_proposals(targets)).values())


def train(model: nn.Module, task: str, dataset: Dataset, cfg: dict, seed: int, log: TextIO) -> None:
    """SGD for ``cfg['iters']`` iterations of ``cfg['batch_size']`` images (the global batch)."""
    groups = offset_param_groups(model, cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    optimizer = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg.get("momentum", 0.9))
    base_lrs = [g["lr"] for g in groups]
    batches = _forever(_loader(dataset, task, cfg["batch_size"], True, seed))
    device, forward = dist.device(), model
    if dist.is_distributed():  # detection heads may leave some parameters without a gradient
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=task != "deeplab")
    model.train()
    start = time.perf_counter()
    log_every = max(1, cfg["iters"] // 20)
    for iteration in range(cfg["iters"]):
        factor = lr_factor(iteration, cfg["iters"], cfg.get("warmup_iters", 0))
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        loss = train_loss(model, task, _to(next(batches), device), forward)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at iteration {iteration}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if iteration % log_every == 0 or iteration == cfg["iters"] - 1:
            mean_loss = dist.all_reduce_sum(loss.detach()) / dist.world_size()  # over ranks
            log.write(f"iter {iteration:6d}  loss {mean_loss.item():.4f}  lr {cfg['lr'] * factor:.2e}  "
                      f"{time.perf_counter() - start:.1f} s\n")
            log.flush()
    # DDP hands rank 0's buffers to every rank at the start of each forward, so the last forward left
    # each rank its own BatchNorm statistics: evaluate every shard with rank 0's (the checkpoint's).
    dist.broadcast_buffers(model)


@torch.no_grad()
def evaluate(model: nn.Module, task: str, dataset: Dataset, num_classes: int, cfg: dict) -> dict:
    """Validation metrics; distributed: each rank evaluates its shard, every rank gets the result."""
    model.eval()
    device, cpu = dist.device(), torch.device("cpu")
    loader = _loader(dataset, task, cfg.get("batch_size", 1), False, 0)
    if task == "deeplab":
        metric = SegmentationMetric(num_classes + 1)
        for images, targets in loader:
            logits = model(_to(collate_segmentation(list(zip(images, targets)))[0], device)).cpu()
            for logit, image, target in zip(logits, images, targets):
                metric.update(*_at_label_size(logit, tuple(image.shape[-2:]), target))
        metric.cm = dist.all_reduce_sum(metric.cm)
        return {"miou": 100 * metric.compute()["miou"]}
    predictions, targets = [], []
    for images, batch_targets in loader:
        detections = model(_to(images, device), **_to(_fixed_proposals(batch_targets), device))
        predictions += [{k: v.to(cpu) for k, v in p.items()} for p in detections]
        targets += batch_targets
    if dist.is_distributed():  # all images, in dataset order, on rank 0
        predictions, targets = dist.unshard(dist.gather(predictions)), dist.unshard(dist.gather(targets))
    metrics = {}
    if dist.is_main():
        # Size classes: area terciles on synthetic data (mostly COCO-"small" objects), else COCO's.
        # VOC 2007 test is scored with its 11-point AP (voc07_metric), as the released detectors do.
        evaluator = DetectionEvaluator(num_classes, (0.5, 0.7), area_ranges=cfg.get("area_ranges", "terciles"),
                                       use_07_metric=cfg.get("voc07_metric", False))
        evaluator.update(predictions, targets)
        result = evaluator.compute()
        metrics = {"map50": 100 * result["mAP@0.5"], "map70": 100 * result["mAP@0.7"],
                   "map_coco": 100 * result["coco_mAP"], "ap_small": 100 * result["coco_mAP_small"],
                   "ap_medium": 100 * result["coco_mAP_medium"], "ap_large": 100 * result["coco_mAP_large"]}
    return dist.broadcast(metrics)


def _at_label_size(logit: Tensor, size: tuple[int, int], target: dict) -> tuple[Tensor, Tensor]:
    """(1, H, W) predicted labels and (1, H, W) ground truth at the resolution of the label file
    (``orig_mask``; the paper's protocol): ``logit`` (C+1, h', w') of a padded batch is cropped to its
    image's ``size`` and, where the loader resized the image, bilinearly resized to the label's."""
    truth = target.get("orig_mask", target["mask"])
    logit = logit[:, : size[0], : size[1]]
    if tuple(truth.shape[-2:]) != size:
        logit = F.interpolate(logit[None], size=tuple(truth.shape[-2:]), mode="bilinear", align_corners=False)[0]
    return logit.argmax(0)[None], truth[None]


def save_checkpoint(model: nn.Module, config: dict, path: Path) -> None:
    """The weights to ``path`` and the config to ``path`` with ``.json``, each written to a temporary
    sibling and ``os.replace``-d: a run killed while saving leaves no truncated file under either name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = f".{os.getpid()}.tmp"  # this process's own: two writers never rename each other's file
    weights, settings = path.with_name(path.name + tmp), path.with_name(path.stem + ".json" + tmp)
    torch.save(model.state_dict(), weights)
    settings.write_text(json.dumps(config, indent=1, sort_keys=True))
    os.replace(weights, path)
    os.replace(settings, path.with_suffix(".json"))


def load_weights(model: nn.Module, config: dict) -> None:
    """The backbone weights file of a cell's ``config`` (if any) into ``model``; ValueError when the
    file's SHA-256 is no longer the one the sweep recorded."""
    if config["model"].get("weights"):
        expected = config["model"].get("weights_sha256")
        if expected and file_sha256(config["model"]["weights"]) != expected:
            raise ValueError(f"{config['model']['weights']} changed since the sweep started (its SHA-256 is no "
                             f"longer {expected[:12]}...): rerun to train with the new file")
        load_backbone_weights(model, config["model"]["weights"])


def run_cell(config: dict, log: TextIO, checkpoint: Path | None = None, proposals_dir: Path | None = None) -> dict:
    """Train and evaluate one cell; save its weights to ``checkpoint`` (and the config beside it).
    A cell with ``train.fixed_proposals`` first gets its RPN stage's proposals, cached in
    ``proposals_dir`` (:mod:`.proposals`)."""
    check_settings(config)
    task, seed = config["task"], config["seed"]
    torch.manual_seed(seed)
    train_set, val_set, num_classes = build_data(task, config["data"])
    if config["train"].get("fixed_proposals"):
        from .proposals import WithProposals, fixed_proposals  # it trains through this module

        if proposals_dir is None:
            raise ValueError("train.fixed_proposals needs a folder for the RPN stage: pass proposals_dir")
        boxes = fixed_proposals(config, train_set, val_set, num_classes, proposals_dir, log)
        train_set, val_set = WithProposals(train_set, boxes["train"]), WithProposals(val_set, boxes["val"])
        torch.manual_seed(seed)  # the detector starts from the same state whether the stage ran now or before
    model = build_model({**model_settings(config), "task": MODEL_TASK[task], "num_classes": num_classes})
    load_weights(model, config)
    model.to(dist.device())
    log.write(f"config {json.dumps(config, sort_keys=True)}\n")
    log.write(f"train {len(train_set)} / val {len(val_set)} images, {sum(p.numel() for p in model.parameters())} params\n")
    train(model, task, train_set, config["train"], seed, log)
    if checkpoint is not None and dist.is_main():  # saved before evaluating: a failure there keeps the training
        save_checkpoint(model, config, checkpoint)
    metrics = evaluate(model, task, val_set, num_classes, config["eval"])
    if config["eval"].get("effective_dilation"):
        loader = _loader(val_set, task, config["eval"].get("batch_size", 1), False, 0)
        stats = DilationStats.merged(dist.gather(dilation_stats(model, loader, dist.device())))
        buckets = config["eval"].get("dilation_buckets", "terciles")
        metrics.update(dist.broadcast(dilation_metrics(stats, buckets) if dist.is_main() else {}))
    log.write(f"metrics {json.dumps(metrics)}\n")
    probe = next(model.parameters())
    device = str(probe.device) + (f" x{dist.world_size()}" if dist.is_distributed() else "")
    return {**metrics, "device": device, "backend": backend_for(probe)}
