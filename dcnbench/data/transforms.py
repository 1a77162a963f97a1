"""Joint image/target transforms, as in the paper (Sec. 4.1), and batch collation.

Every transform is a callable ``(image, target) -> (image, target)`` where ``image`` is a float
tensor (3, H, W) and ``target`` a dict that may hold ``"mask"`` (H, W) long with 255 = ignore,
``"boxes"`` (K, 4) float xyxy in pixels, ``"areas"`` (K,) and ``"proposals"`` (P, 4) float xyxy
(fixed region proposals, see :mod:`dcnbench.runner.proposals`).  Masks are resized by nearest
neighbour, boxes, proposals and areas scaled and flipped with the image, and ``"size"`` (H, W)
follows the image (``"orig_size"`` keeps the file's, so the evaluator can map boxes and areas back to it).

Paper settings: images resized to a shorter side of 360 px (PASCAL VOC segmentation), 1024 px
(Cityscapes) or 600 px (detection), and horizontally flipped at random in training; see
:func:`paper_transforms`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAPER_MAX_SIDE",
    "PAPER_SHORTER_SIDE",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "ResizeShorterSide",
    "collate_detection",
    "collate_segmentation",
    "hflip",
    "paper_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAPER_SHORTER_SIDE = {"voc_seg": 360, "cityscapes": 1024, "detection": 600}
PAPER_MAX_SIDE = {"detection": 1000}  # the cited detectors' cap on the longer side (Faster R-CNN, R-FCN)
BOX_KEYS = ("boxes", "proposals")  # target entries of (K, 4) xyxy pixel boxes that follow the image

Transform = Callable[[Tensor, dict], tuple[Tensor, dict]]


class Compose:
    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class ResizeShorterSide:
    """Scale so the shorter side is ``size`` px (and the longer at most ``max_size``, if given)."""

    def __init__(self, size: int, max_size: int | None = None):
        self.size = int(size)
        self.max_size = max_size

    def __repr__(self) -> str:
        return f"ResizeShorterSide({self.size}, max_size={self.max_size})"

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        scale = self.size / min(h, w)
        if self.max_size is not None and max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        h, w = image.shape[-2:]
        nh, nw = self.output_size(h, w)
        if (nh, nw) == (h, w):
            return image, target
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h)[0]
        target = dict(target)
        if "mask" in target:
            mask = target["mask"][None, None].float()
            target["mask"] = F.interpolate(mask, size=(nh, nw), mode="nearest-exact")[0, 0].long()
        sx, sy = nw / w, nh / h
        for key in BOX_KEYS:
            if key in target:
                target[key] = target[key] * torch.tensor([sx, sy, sx, sy], dtype=target[key].dtype)
        if "areas" in target:
            target["areas"] = target["areas"] * (sx * sy)
        if "size" in target:
            target["size"] = torch.tensor([nh, nw])
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        self.p = p
        self.generator = generator

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if torch.rand((), generator=self.generator).item() >= self.p:
            return image, target
        return hflip(image, target)


def hflip(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Mirror left-right: image, mask, boxes and proposals (x1' = W - x2, x2' = W - x1)."""
    w = image.shape[-1]
    target = dict(target)
    if "mask" in target:
        target["mask"] = target["mask"].flip(-1)
    for key in BOX_KEYS:
        if key in target:
            b = target[key]
            target[key] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    return image.flip(-1), target


class Normalize:
    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        return (image - self.mean.to(image)) / self.std.to(image), target


def paper_transforms(kind: str, train: bool, normalize: bool = True, shorter_side: int | None = None,
                     max_side: int | None = None) -> Compose:
    """The paper's preprocessing: resize to the shorter side, flip in training, optional normalisation.

    ``kind`` is ``"voc_seg"`` (360 px), ``"cityscapes"`` (1024 px) or ``"detection"`` (600 px);
    ``shorter_side`` overrides the size (``0`` keeps the native size, e.g. for synthetic data); at the
    paper's size detection images keep their longer side at most 1000 px (``PAPER_MAX_SIDE``), as in
    the cited detectors; ``max_side`` sets that cap explicitly.
    """
    if kind not in PAPER_SHORTER_SIDE:
        raise ValueError(f"kind must be one of {sorted(PAPER_SHORTER_SIDE)}")
    side = PAPER_SHORTER_SIDE[kind] if shorter_side is None else shorter_side
    steps: list[Transform] = []
    if side:
        if max_side is None and shorter_side is None:
            max_side = PAPER_MAX_SIDE.get(kind)
        steps.append(ResizeShorterSide(side, max_side))
    if train:
        steps.append(RandomHorizontalFlip(0.5))
    if normalize:
        steps.append(Normalize())
    return Compose(steps)


def collate_detection(batch: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Detection batches stay lists: images may differ in size, and the detectors (like torchvision's)
    take such a list, zero-padding it bottom/right and clipping each image's boxes to its own size."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def collate_segmentation(batch: Sequence[tuple[Tensor, dict]], ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """Stack images (zero-padded bottom/right to the largest) and masks (padded with ``ignore_index``)."""
    h = max(img.shape[-2] for img, _ in batch)
    w = max(img.shape[-1] for img, _ in batch)
    images = batch[0][0].new_zeros((len(batch), batch[0][0].shape[0], h, w))
    masks = torch.full((len(batch), h, w), ignore_index, dtype=torch.long)
    for i, (img, target) in enumerate(batch):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
        m = target["mask"]
        masks[i, : m.shape[-2], : m.shape[-1]] = m
    return images, masks
