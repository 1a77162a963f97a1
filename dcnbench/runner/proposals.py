"""Fixed region proposals for the detector ablations (paper section 4.1).

"To facilitate the ablation experiments on VOC, we follow [36] and utilize pre-trained and fixed RPN
proposals for the training of Faster R-CNN and R-FCN, without feature sharing between the region
proposal and the object detection networks. The RPN network is trained separately as in the first
stage of the procedure in [44]."

A Faster R-CNN or R-FCN cell with ``train.fixed_proposals = true`` gets its proposals here. Its RPN
stage (:func:`stage_config`) is a :class:`~dcnbench.models.rpn.ProposalNetwork`, the backbone to
conv4 and a 2-way RPN without deformable layers, built from the cell's data, backbone and RPN
settings and trained with the cell's schedule and seed through the one training path. Nothing of the
detector's own head, placement, dilation or RoI pooling enters it, so every detector cell of a seed
(each placement and pooling, Faster R-CNN and R-FCN alike) pools the same proposals: the ablation
compares detection networks, not proposal quality.

The stage runs once per (stage config, seed) and is cached in ``<cache_dir>/rpn_<hash>_seed<N>/``:
the RPN's weights (``rpn.pt`` and its config ``rpn.json``), its training log (``rpn.log``) and
``proposals.pt`` with every training image's proposals (the RPN's train top-n, 2,000 at the paper's
settings) and every validation image's (test top-n, 300), computed on the unflipped images at their
input size and stored in the images' original pixel coordinates. The folder is locked while the stage
runs, so parallel cells of one seed train it once. :class:`WithProposals` hands them to the detector
as each target's ``"proposals"``, attached before the dataset's transforms, which resize and mirror
them with the image: a flipped training image gets mirrored proposals, as Fast R-CNN's flipped roidb.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dcnbench.data.transforms import Compose, RandomHorizontalFlip
from dcnbench.evaluation.detection import scale_to_original
from dcnbench.models.build import TASK_KEYS, build_model

from . import distributed as dist
from .experiment import Cell
from .results import folder_lock
from .train import WEIGHTS_KEYS, _loader, _to, load_weights, model_settings, save_checkpoint, train

# The stage's model: the cell's backbone to conv4 (its depth, widths, strides, BatchNorm, frozen stages,
# weights) and RPN settings. Without the detector's keys and without the res5-only ones (placement,
# dilation, offset groups, reduction width), which leave conv4 and the RPN as they are.
_NOT_STAGE_KEYS = {"placement", "dilation", "offset_groups", "feature_channels"}


def stage_config(config: dict) -> dict:
    """The RPN stage of a detector cell's ``config``: task ``"proposals"``, the cell's data, train
    schedule and seed, and its model settings that shape conv4 and the RPN (placement ``"none"``)."""
    model = {k: v for k, v in config["model"].items()
             if k in WEIGHTS_KEYS or (k not in _NOT_STAGE_KEYS and "proposals" in TASK_KEYS.get(k, ("proposals",)))}
    train_cfg = {k: v for k, v in config["train"].items() if k != "fixed_proposals"}
    return {"task": "proposals", "data": config["data"], "model": {**model, "placement": "none"}, "train": train_cfg,
            "eval": {"batch_size": config["eval"].get("batch_size", 1)}, "seed": config["seed"]}


def stage_folder(config: dict, cache_dir: Path) -> Path:
    """``cache_dir/rpn_<hash>_seed<N>``: the stage's config hash, as a cell's (all but the seed, the
    weights file by its SHA-256 and not its path)."""
    stage = stage_config(config)
    cell = Cell(0, "", stage["task"], "rpn", stage["seed"], stage)
    return cache_dir / f"rpn_{cell.config_hash}_seed{cell.seed}"


def fixed_proposals(config: dict, train_set: Dataset, val_set: Dataset, num_classes: int, cache_dir: Path,
                    log: TextIO) -> dict[str, list[Tensor]]:
    """``{"train": [...], "val": [...]}``: one (P, 4) float32 tensor of proposals per image of each
    set, in original image pixels; the cached stage's, or its RPN trained now (module docstring).
    Under torchrun every rank trains and proposes its shard; rank 0 writes and locks the cache."""
    folder = stage_folder(config, cache_dir)
    path = folder / "proposals.pt"
    if dist.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder) if dist.is_main() else contextlib.nullcontext():
        cached = dist.broadcast(path.is_file())
        if cached:
            log.write(f"proposals: {path} (its RPN trained before)\n")
        else:
            log.write(f"proposals: training the RPN stage, log in {folder / 'rpn.log'}\n")
            log.flush()
            boxes = _run_stage(stage_config(config), train_set, val_set, num_classes, folder)
            if dist.is_main():
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                torch.save(boxes, tmp)
                os.replace(tmp, path)
        dist.barrier()
    boxes = torch.load(path, map_location="cpu", weights_only=True)
    for split, dataset in (("train", train_set), ("val", val_set)):
        if len(boxes.get(split, ())) != len(dataset):
            raise ValueError(f"{path} holds {len(boxes.get(split, ()))} {split} proposal sets for a {split} set of "
                             f"{len(dataset)} images: delete the folder to train the RPN stage again")
    return boxes


def _run_stage(stage: dict, train_set: Dataset, val_set: Dataset, num_classes: int,
               folder: Path) -> dict[str, list[Tensor]]:
    """Train the stage's RPN (log and checkpoint in ``folder``), then propose for both sets."""
    torch.manual_seed(stage["seed"])
    model = build_model({**model_settings(stage), "task": "proposals", "num_classes": num_classes})
    load_weights(model, stage)
    model.to(dist.device())
    with open(folder / "rpn.log", "w") if dist.is_main() else open(os.devnull, "w") as log:
        train(model, "proposals", train_set, stage["train"], stage["seed"], log)
    if dist.is_main():
        save_checkpoint(model, stage, folder / "rpn.pt")
    batch = stage["eval"]["batch_size"]
    return {"train": _propose(model, unflipped(train_set), batch, for_training=True),
            "val": _propose(model, val_set, batch, for_training=False)}


@torch.no_grad()
def _propose(model: nn.Module, dataset: Dataset, batch_size: int, for_training: bool) -> list[Tensor]:
    """Per image of ``dataset``, in order: the model's proposals in the image's original pixels."""
    model.eval()
    out = []
    for images, targets in _loader(dataset, "proposals", batch_size, False, 0):
        for boxes, target in zip(model(_to(images, dist.device()), for_training=for_training), targets):
            sx, sy = scale_to_original(target)
            out.append(boxes.cpu().float() * torch.tensor([sx, sy, sx, sy]))
    return dist.unshard(dist.gather(out)) if dist.is_distributed() else out


def _with_transforms(dataset: Dataset, transforms) -> Dataset:
    """A shallow copy of ``dataset`` (images, annotations and cache shared) with other ``transforms``."""
    view = copy.copy(dataset)
    view.transforms = transforms
    return view


def unflipped(dataset: Dataset) -> Dataset:
    """``dataset`` without its random horizontal flip: the same resize and normalisation."""
    steps = dataset.transforms.transforms if isinstance(dataset.transforms, Compose) else [dataset.transforms]
    return _with_transforms(dataset, Compose([t for t in steps if t is not None and not isinstance(t, RandomHorizontalFlip)]))


class WithProposals(Dataset):
    """``dataset``'s items with ``target["proposals"]``, the (P, 4) boxes ``proposals[index]`` in the
    image's original pixels, added before the dataset's transforms (which resize and flip them)."""

    def __init__(self, dataset: Dataset, proposals: list[Tensor]) -> None:
        if len(proposals) != len(dataset):
            raise ValueError(f"got {len(proposals)} proposal sets for a dataset of {len(dataset)} images")
        self.dataset, self.proposals = _with_transforms(dataset, None), proposals
        self.transforms = dataset.transforms

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image, target = self.dataset[index]
        target["proposals"] = self.proposals[index].clone()
        return self.transforms(image, target) if self.transforms is not None else (image, target)
