"""Table 2's measurement on a trained model: effective dilation of its res5 deformable filters,
by the size of the ground-truth object under each filter centre."""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.utils.data import DataLoader

from dcnbench.evaluation.dilation import DilationStats, effective_dilation, object_area_map, record_offsets
from dcnbench.models.backbone import block_name

_RES5_BLOCK = re.compile(r"(?:^|\.)layer4\.(\d+)\.")


def res5_layer_name(module_name: str, num_blocks: int) -> str | None:
    """``backbone.layer4.2.conv2`` -> ``res5c``; None outside res5."""
    match = _RES5_BLOCK.search(module_name)
    return block_name("res5", int(match.group(1)), num_blocks) if match else None


@torch.no_grad()
def dilation_stats(model: nn.Module, loader: DataLoader, device: torch.device | None = None) -> DilationStats:
    """The res5 effective dilations over a loader's images (run on ``device``, default the CPU); every
    batch must hold images of one size."""
    model.eval()
    num_blocks = len(model.backbone.layer4)
    stats = DilationStats()
    with record_offsets(model) as records:
        for images, targets in loader:
            sizes = {tuple(image.shape[-2:]) for image in images}
            if len(sizes) != 1:  # a padded batch would count its padding as background
                raise ValueError(f"dilation_stats needs batches of one image size, got {sorted(sizes)}")
            model([image.to(device) for image in images] if device is not None else images)
            (size,) = sizes
            area_maps = torch.stack([object_area_map(t["boxes"], size) for t in targets])
            boxes = torch.cat([t["boxes"] for t in targets])
            object_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            for name, (offset, dilation, kernel) in records.items():
                layer = res5_layer_name(name, num_blocks)
                if layer is not None:
                    stats.update(layer, effective_dilation(offset, dilation, kernel), area_maps, object_areas,
                                 stride=model.backbone.output_stride)
    return stats


def check_dilation_buckets(buckets: object) -> None:
    """ValueError unless ``buckets`` is ``"terciles"`` or ``"paper"`` (see :func:`dilation_metrics`)."""
    if not isinstance(buckets, str) or buckets not in ("terciles", "paper"):
        raise ValueError(f"eval.dilation_buckets must be 'terciles' or 'paper', got {buckets!r}")


def dilation_metrics(stats: DilationStats, buckets: str = "terciles") -> dict:
    """``effdil_<layer>_<cat>_{mean,std}`` of accumulated dilations, objects bucketed by area:
    ``"terciles"`` (equal thirds of the objects) or ``"paper"`` (Table 2's 96² and 224² px)."""
    check_dilation_buckets(buckets)
    metrics = {}
    for row in stats.summary(buckets).itertuples():
        metrics[f"effdil_{row.layer}_{row.category}_mean"] = float(row.mean)
        metrics[f"effdil_{row.layer}_{row.category}_std"] = float(row.std)
    return metrics
