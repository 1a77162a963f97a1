"""Pieces the detection heads share: batching, anchors, target checks, matching, RoI sampling,
Fast R-CNN loss, post-processing.

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


def image_sizes(images: Tensor | Sequence[Tensor]) -> list[tuple[int, int]]:
    """(H, W) of every image of an (N, 3, H, W) tensor or a list of (3, H, W) tensors (RGB: the
    backbone's first conv takes 3 channels)."""
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        return [tuple(images.shape[-2:])] * images.shape[0]
    if len(images) == 0 or any(im.dim() != 3 or im.shape[0] != 3 for im in images):
        raise ValueError(f"images in a list must be (3, H, W) tensors, got shapes {[tuple(im.shape) for im in images]}")
    return [tuple(im.shape[-2:]) for im in images]


def to_batch(images: Tensor | Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    """(batch (N, 3, H, W), per-image (H, W)) of a tensor, or of a list of images zero-padded
    bottom/right to the largest height and width (as torchvision's detectors batch them; the
    padding moves no pixel, so boxes stay valid)."""
    sizes = image_sizes(images)
    if isinstance(images, Tensor):
        return images, sizes
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for pad, im in zip(batch, images):
        pad[:, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch, sizes


def _describe(x) -> str:
    return f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def check_targets(targets: Targets | None, images: Tensor | Sequence[Tensor], num_classes: int) -> None:
    """Training targets: one dict per image of ``images`` with finite ``boxes`` (M, 4) x1 <= x2,
    y1 <= y2 and integer ``labels`` (M,) in 1..C."""
    if targets is None:
        raise ValueError("targets are required in training mode")
    if not isinstance(targets, (list, tuple)):
        raise ValueError(f"targets must be a list of dicts, one per image, got {type(targets).__name__}")
    num_images = len(image_sizes(images))
    if len(targets) != num_images:
        raise ValueError(f"got {len(targets)} targets for a batch of {num_images} images")
    for i, tgt in enumerate(targets):
        missing = [k for k in ("boxes", "labels") if k not in tgt]
        if missing:
            raise ValueError(f"targets[{i}] has no {missing}")
        boxes, labels = tgt["boxes"], tgt["labels"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be an (M, 4) tensor, got {_describe(boxes)}")
        if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1] or labels.is_floating_point():
            raise ValueError(f"targets[{i}]['labels'] must be an integer tensor of shape ({boxes.shape[0]},) "
                             f"like its boxes, got {_describe(labels)}")
        bad = labels[(labels < 1) | (labels > num_classes)]
        if bad.numel():
            raise ValueError(f"targets[{i}]['labels'] must be in 1..{num_classes} (0 is background), "
                             f"got {int(bad[0])}")
        # Stated as what is valid, so that NaN (every comparison false) fails too.
        valid = torch.isfinite(boxes).all(1) & (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
        if not bool(valid.all()):
            raise ValueError(f"targets[{i}]['boxes'] must be finite (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2, "
                             f"got {boxes[~valid][0].tolist()}")


def box_dtype(x: Tensor) -> torch.dtype:
    """The dtype box arithmetic on ``x`` uses: float32 at least (float64 stays). Under autocast the
    network's outputs may be bfloat16, whose step is 4 px at 600 px."""
    return torch.promote_types(x.dtype, torch.float32)


def check_proposals(proposals, num_images: int) -> None:
    """Fixed proposals: a list of one (P, 4) floating-point xyxy tensor per image."""
    if not isinstance(proposals, (list, tuple)):
        raise ValueError(f"proposals must be a list of (P, 4) boxes, one per image, got {_describe(proposals)}")
    if len(proposals) != num_images:
        raise ValueError(f"got {len(proposals)} proposal sets for a batch of {num_images} images")
    for i, p in enumerate(proposals):
        if not isinstance(p, Tensor) or p.dim() != 2 or p.shape[1] != 4 or not p.is_floating_point():
            raise ValueError(f"proposals[{i}] must be a floating-point (P, 4) tensor of x1, y1, x2, y2, "
                             f"got {_describe(p)}")


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


def match(matcher: Matcher, gt_boxes: Tensor, gt_labels: Tensor, boxes: Tensor,
          candidates: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(matched ground-truth index or a negative ``Matcher`` code, matched label or 0) per box;
    every box is background in an image without ground truth. ``candidates`` (bool per box) limits
    the matching to those boxes: the others get IoU -1, so each ground truth's best (low-quality)
    match is its best candidate, as py-faster-rcnn matches only the anchors inside the image. A ground
    truth that overlaps no candidate is left out: its "best" match would be every box tied at IoU 0."""
    background = torch.full((boxes.shape[0],), Matcher.BELOW_LOW_THRESHOLD, dtype=torch.long, device=boxes.device)
    if gt_boxes.numel() == 0:
        return background, torch.zeros_like(background)
    quality = box_iou(gt_boxes, boxes)
    if candidates is not None:
        quality = quality.masked_fill(~candidates, -1.0)
    reachable = torch.where(quality.max(dim=1).values > 0)[0]
    if reachable.numel() == 0:
        return background, torch.zeros_like(background)
    idx = matcher(quality[reachable])
    idx = torch.where(idx >= 0, reachable[idx.clamp(min=0)], idx)
    return idx, torch.where(idx >= 0, gt_labels[idx.clamp(min=0)], torch.zeros_like(idx))


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
        idx, lab = match(matcher, gt_boxes, gt_labels, props)
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
    if labels.numel() == 0:  # no RoI sampled (no proposals and no ground truth): zero, still differentiable
        zero = 0 * (class_logits.sum() + box_regression.sum())
        return zero, zero
    cls_loss = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    k = box_regression.shape[0]
    box_regression = box_regression.reshape(k, -1, 4)
    cols = labels[pos] if box_regression.shape[1] > 1 else torch.zeros_like(pos)
    box_loss = F.smooth_l1_loss(box_regression[pos, cols], regression_targets[pos], beta=1 / 9, reduction="sum")
    return cls_loss, box_loss / max(labels.numel(), 1)


def detect(
    class_logits: Tensor, box_regression: Tensor, boxes: list[Tensor], image_sizes: Sequence[tuple[int, int]],
    box_coder: BoxCoder, score_thresh: float, nms_thresh: float, detections_per_img: int,
    pre_nms_top_n: int | None = None,
) -> list[dict[str, Tensor]]:
    """Softmax, box decoding, per-class NMS (torchvision.ops.batched_nms) per image.

    class_logits (K, C+1); box_regression (K, 4(C+1)) class-specific or (K, 4) class-agnostic;
    boxes: per-image reference boxes (proposals or anchors), K in all; detections are clipped to
    their image's (H, W) in ``image_sizes``.
    """
    num_classes = class_logits.shape[1]
    counts = [b.shape[0] for b in boxes]
    scores_all = F.softmax(class_logits.to(box_dtype(class_logits)), -1).split(counts)
    deltas_all = box_regression.to(box_dtype(box_regression)).split(counts)
    out = []
    for scores, deltas, ref, size in zip(scores_all, deltas_all, boxes, image_sizes):
        k = ref.shape[0]
        per = deltas.shape[1] // 4  # 1: class-agnostic, C+1: class-specific
        decoded = clip_boxes_to_image(box_coder.decode_single(deltas, ref).reshape(k, per, 4), size)
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
