"""Table 2's measurement on a trained model: effective dilation of its res5 deformable filters,
by the size of the ground-truth object under each filter centre."""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.utils.data import DataLoader

from dcnbench.evaluation.detection import boxes_array, scale_to_original
from dcnbench.evaluation.dilation import DilationStats, effective_dilation, object_area_map, record_offsets
from dcnbench.models.backbone import block_name

_RES5_BLOCK = re.compile(r"(?:^|\.)layer4\.(\d+)\.")


def res5_layer_name(module_name: str, num_blocks: int) -> str | None:
    """``backbone.layer4.2.conv2`` -> ``res5c``; None outside res5."""
    match = _RES5_BLOCK.search(module_name)
    return block_name("res5", int(match.group(1)), num_blocks) if match else None


@torch.no_grad()
def dilation_stats(model: nn.Module, loader: DataLoader, device: torch.device | None = None) -> DilationStats:
    """The res5 effective dilations over a loader's images (their backbone's forward, on ``device``,
    default the CPU; the heads do not run: with fixed proposals they would need them). A
    batch's images of different sizes run as one group per size (a padded batch would count its
    padding as background). Object areas are in the annotated image's pixels (a target's
    ``orig_size`` over its ``size``), as the detection evaluator's size classes: an object keeps its
    bucket whatever the resizing."""
    model.eval()
    num_blocks = len(model.backbone.layer4)
    stats = DilationStats()
    with record_offsets(model) as records:
        for images, targets in loader:
            groups: dict[tuple[int, int], list[int]] = {}
            for i, image in enumerate(images):
                groups.setdefault(tuple(image.shape[-2:]), []).append(i)
            for size, members in groups.items():
                batch = torch.stack([images[i] for i in members])
                model.backbone(batch.to(device) if device is not None else batch)  # res5's offsets are all it needs
                areas = [_annotated_areas(targets[i]) for i in members]
                area_maps = torch.stack([object_area_map(targets[i]["boxes"], size, a) for i, a in zip(members, areas)])
                for name, (offset, dilation, kernel) in records.items():
                    layer = res5_layer_name(name, num_blocks)
                    if layer is not None:
                        stats.update(layer, effective_dilation(offset, dilation, kernel), area_maps, torch.cat(areas),
                                     stride=model.backbone.output_stride)
    return stats


def _annotated_areas(target: dict) -> torch.Tensor:
    """(M,) areas of a target's boxes in the annotated image's pixels."""
    boxes = torch.from_numpy(boxes_array(target["boxes"], "target['boxes']"))
    sx, sy = scale_to_original(target)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * (sx * sy)


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
