"""Semantic segmentation: mean intersection-over-union from a confusion matrix (ignore label 255).

``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` over all pixels of the evaluated set, accumulated in one
confusion matrix (rows ground truth, columns prediction); pixels labelled ``ignore_index`` do not
count.  mIoU averages the classes that occur in the ground truth or the predictions (a class absent
from both has no IoU and is left out), as in the VOC and Cityscapes protocols.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dcnbench.errors import is_int

__all__ = ["SegmentationMetric", "confusion_matrix", "miou_from_confusion"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(C, C) int64 counts, ``cm[t, p]`` = pixels of true class t predicted as p.

    ``pred``: class indices (any shape) or logits/scores (N, C, H, W) with ``target`` (N, H, W).
    Predictions outside ``0..C-1`` at valid pixels are an error; target values other than
    ``ignore_index`` must be in ``0..C-1``.
    """
    if pred.dim() == target.dim() + 1 and pred.shape[1] == num_classes and pred.is_floating_point():
        pred = pred.argmax(1)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target holds labels outside 0..{num_classes - 1} (other than {ignore_index})")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"pred holds labels outside 0..{num_classes - 1}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def miou_from_confusion(cm: Tensor) -> dict:
    """``{"miou", "iou" (C,) with NaN for absent classes, "pixel_acc", "mean_acc"}`` from a confusion matrix."""
    cm = cm.double()
    tp = cm.diag()
    gt = cm.sum(1)
    predicted = cm.sum(0)
    union = gt + predicted - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = cm.sum()
    return {
        "miou": float(iou.nanmean()) if (union > 0).any() else float("nan"),
        "iou": iou,
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_acc": float(acc.nanmean()) if (gt > 0).any() else float("nan"),
    }


class SegmentationMetric:
    """Accumulate a confusion matrix over batches, then :meth:`compute` mIoU.

    >>> metric = SegmentationMetric(21)
    >>> metric.update(logits_or_labels, masks)   # any number of times
    >>> metric.compute()["miou"]
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: tuple[str, ...] | None = None):
        if not (is_int(num_classes) and num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1 (the classes of the confusion matrix, background "
                             f"included), got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self.reset()

    def reset(self) -> None:
        self.cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.cm += confusion_matrix(pred.detach(), target.detach(), self.num_classes, self.ignore_index)

    def compute(self) -> dict:
        out = miou_from_confusion(self.cm)
        if self.class_names is not None:
            out["per_class"] = {n: float(v) for n, v in zip(self.class_names, out["iou"])}
        return out
