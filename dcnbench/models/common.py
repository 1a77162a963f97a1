"""Pieces the detection heads share: batching, anchors, RoI sampling, Fast R-CNN loss, post-processing.

Box conventions: boxes are (x1, y1, x2, y2) in input-image pixels; targets are a list (one per
image) of ``{"boxes": (M, 4) float, "labels": (M,) int64 in 1..C}``; label 0 is background.
Detections are a list of ``{"boxes": (D, 4), "scores": (D,), "labels": (D,) in 1..C}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

Targets = list[dict[str, Tensor]]


def to_batch(images: Tensor | Sequence[Tensor]) -> Tensor:
    """(N, 3, H, W) tensor, or a list of same-size (3, H, W) tensors stacked into one."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        return images
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in a list must share one size (resize or pad first), got {sorted(shapes)}")
    return torch.stack(list(images))


def grid_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], feature_hw: tuple[int, int],
                 stride: int, device=None, dtype=torch.float32) -> Tensor:
    """Anchors of every feature-map cell, (H*W*A, 4), ordered (row, column, anchor).

    A = len(sizes) * len(aspect_ratios); anchor a has area size² and height/width = ratio, centred
    on the cell's top-left image pixel (cell * stride) as torchvision's AnchorGenerator does.
    """
    scales = torch.as_tensor(sizes, dtype=dtype, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
    h_ratio = ratios.sqrt()
    ws = (scales[None, :] / h_ratio[:, None]).reshape(-1)
    hs = (scales[None, :] * h_ratio[:, None]).reshape(-1)
    base = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
    fh, fw = feature_hw
    ys = torch.arange(fh, device=device, dtype=dtype) * stride
    xs = torch.arange(fw, device=device, dtype=dtype) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)


def sample_rois(
    proposals: list[Tensor], targets: Targets, matcher: Matcher, sampler: BalancedPositiveNegativeSampler,
    box_coder: BoxCoder,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Fast R-CNN RoI sampling: add the ground-truth boxes to the proposals, match by IoU, sample.

    Returns (per-image sampled RoIs, labels (K,) in 0..C, regression targets (K, 4)).
    """
    rois, labels, reg = [], [], []
    for props, tgt in zip(proposals, targets):
        gt_boxes, gt_labels = tgt["boxes"].to(props), tgt["labels"].to(props.device)
        props = torch.cat([props, gt_boxes])
        if gt_boxes.numel() == 0:
            idx = torch.full((props.shape[0],), -1, dtype=torch.long, device=props.device)
        else:
            idx = matcher(box_iou(gt_boxes, props))
        lab = torch.where(idx >= 0, gt_labels[idx.clamp(min=0)], torch.zeros_like(idx))
        lab[idx == Matcher.BETWEEN_THRESHOLDS] = -1
        pos, neg = sampler([torch.where(lab > 0, 1, torch.where(lab == 0, 0, -1))])
        keep = torch.where((pos[0] | neg[0]).bool())[0]
        matched = gt_boxes[idx[keep].clamp(min=0)] if gt_boxes.numel() else props[keep]
        rois.append(props[keep])
        labels.append(lab[keep])
        reg.append(box_coder.encode_single(matched, props[keep]))
    return rois, torch.cat(labels), torch.cat(reg)


def fast_rcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor) -> tuple[Tensor, Tensor]:
    """(C+1)-way cross entropy + smooth-L1 on the foreground RoIs' boxes (class-specific when
    box_regression is (K, 4(C+1)), class-agnostic when (K, 4)), averaged over all sampled RoIs."""
    cls_loss = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    k = box_regression.shape[0]
    box_regression = box_regression.reshape(k, -1, 4)
    cols = labels[pos] if box_regression.shape[1] > 1 else torch.zeros_like(pos)
    box_loss = F.smooth_l1_loss(box_regression[pos, cols], regression_targets[pos], beta=1 / 9, reduction="sum")
    return cls_loss, box_loss / max(labels.numel(), 1)


def detect(
    class_logits: Tensor, box_regression: Tensor, boxes: list[Tensor], image_size: tuple[int, int],
    box_coder: BoxCoder, score_thresh: float, nms_thresh: float, detections_per_img: int,
    pre_nms_top_n: int | None = None,
) -> list[dict[str, Tensor]]:
    """Softmax, box decoding, per-class NMS (torchvision.ops.batched_nms) per image.

    class_logits (K, C+1); box_regression (K, 4(C+1)) class-specific or (K, 4) class-agnostic;
    boxes: per-image reference boxes (proposals or anchors), K in all.
    """
    num_classes = class_logits.shape[1]
    counts = [b.shape[0] for b in boxes]
    scores_all = F.softmax(class_logits, -1).split(counts)
    deltas_all = box_regression.split(counts)
    out = []
    for scores, deltas, ref in zip(scores_all, deltas_all, boxes):
        k = ref.shape[0]
        per = deltas.shape[1] // 4  # 1: class-agnostic, C+1: class-specific
        decoded = clip_boxes_to_image(box_coder.decode_single(deltas, ref).reshape(k, per, 4), image_size)
        decoded = decoded.expand(k, num_classes, 4)[:, 1:] if decoded.shape[1] == 1 else decoded[:, 1:]
        fg = scores[:, 1:]
        labels = torch.arange(1, num_classes, device=fg.device).expand_as(fg)
        b, s, lab = decoded.reshape(-1, 4), fg.reshape(-1), labels.reshape(-1)
        keep = torch.where(s > score_thresh)[0]
        if pre_nms_top_n is not None and keep.numel() > pre_nms_top_n:
            keep = keep[s[keep].topk(pre_nms_top_n).indices]
        b, s, lab = b[keep], s[keep], lab[keep]
        keep = remove_small_boxes(b, 1e-2)
        b, s, lab = b[keep], s[keep], lab[keep]
        keep = batched_nms(b, s, lab, nms_thresh)[:detections_per_img]
        out.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
    return out
