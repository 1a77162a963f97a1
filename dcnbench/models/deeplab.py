"""DeepLab as in paper section 2.3: a 1×1 conv to C+1 score maps on the feature extraction
network's output, bilinear upsampling to the input size (each cell on its receptive field's centre),
per-pixel softmax."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import ResNetBackbone
from .common import to_batch


class DeepLab(nn.Module):
    """forward(images (N, 3, H, W)) -> logits (N, C+1, H, W) (train and eval alike);
    ``loss(logits, mask)`` is per-pixel cross entropy ignoring label 255; ``postprocess(logits)``
    gives the (N, H, W) label map."""

    ignore_index = 255

    def __init__(self, backbone: ResNetBackbone, num_classes: int) -> None:
        super().__init__()
        self.backbone, self.num_classes = backbone, num_classes
        self.score = nn.Conv2d(backbone.out_channels, num_classes + 1, 1)
        nn.init.normal_(self.score.weight, std=0.01)
        nn.init.zeros_(self.score.bias)

    def forward_raw(self, images: Tensor | list[Tensor]) -> Tensor:
        """Logits at the batch's size (a list of differently sized images is padded, see ``to_batch``)."""
        images, _ = to_batch(images)
        _, feature = self.backbone(images)
        return upsample_cells(self.score(feature), images.shape[-2:], self.backbone.output_stride)

    def forward(self, images: Tensor, targets=None) -> Tensor:
        return self.forward_raw(images)

    def loss(self, logits: Tensor, mask: Tensor) -> Tensor:
        """logits (N, C+1, H, W), mask (N, H, W) int labels 0..C, 255 ignored (another shape or label
        is a ValueError naming mask); a mask that is all 255 gives a zero loss (still differentiable)
        instead of NaN."""
        expected = (logits.shape[0], *logits.shape[2:])
        if mask.shape != expected:
            raise ValueError(f"mask must be {expected} (logits {tuple(logits.shape)} without the class axis), "
                             f"got shape {tuple(mask.shape)}")
        top = logits.shape[1] - 1
        bad = mask[(mask != self.ignore_index) & ((mask < 0) | (mask > top))]
        if bad.numel():
            raise ValueError(f"mask labels must be in 0..{top} or {self.ignore_index} (ignored), got {bad[0].item()}")
        if not (mask != self.ignore_index).any():
            return 0 * logits.sum()
        return F.cross_entropy(logits, mask.long(), ignore_index=self.ignore_index)

    @staticmethod
    def postprocess(logits: Tensor) -> Tensor:
        """Per-pixel softmax and arg-max: (N, H, W) labels."""
        return logits.softmax(1).argmax(1)


def upsample_cells(scores: Tensor, size: tuple[int, int], stride: int) -> Tensor:
    """Bilinear upsampling of (N, K, h, w) cell scores to (N, K, *size) pixels that puts cell (i, j)
    on pixel (stride*i, stride*j), the centre of its receptive field; pixels past the last cell take
    its value. (``F.interpolate(..., align_corners=False)`` to ``size`` would put the cell at
    stride*i + (stride - 1)/2, 7.5 px off at stride 16, and so does the released code's fixed
    bilinear deconvolution, kernel 32, stride 16, cropped at offset 8; this follows our backbone,
    whose cell centres a test measures at stride*i.)"""
    height, width = size
    rows, cols = (-(-(n - 1) // stride) + 1 for n in (height, width))  # cells reaching the last pixel
    pad_rows, pad_cols = max(0, rows - scores.shape[-2]), max(0, cols - scores.shape[-1])
    if pad_rows or pad_cols:
        scores = F.pad(scores, (0, pad_cols, 0, pad_rows), mode="replicate")
    h, w = scores.shape[-2:]
    up = F.interpolate(scores, size=((h - 1) * stride + 1, (w - 1) * stride + 1), mode="bilinear", align_corners=True)
    return up[..., :height, :width]
