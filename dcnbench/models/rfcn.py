"""R-FCN (Dai et al. 2016) as used in paper section 2.3.

On the feature extraction network's 1024-d output: a 1×1 conv to k²(C+1) position-sensitive score
maps and one to 4k² class-agnostic box maps; k×k position-sensitive RoI pooling; average voting
over the k×k bins. Optionally deformable PS RoI pooling, whose offsets come from the features
beneath the score maps, (C+1) class-specific offset groups for the scores plus one group for boxes.
RPN on conv4, training and detection as :class:`RoIDetector`.
"""

from __future__ import annotations

import torchvision
from torch import Tensor, nn

from dcnbench.ops import DeformPSRoIPool, deform_ps_roi_pool

from .backbone import ResNetBackbone
from .faster_rcnn import RoIDetector


class RFCN(RoIDetector):
    def __init__(self, backbone: ResNetBackbone, num_classes: int, deformable_roi_pool: bool = False,
                 pool_size: int = 7, sampling_ratio: int = 4, gamma: float = 0.1, plain_roi_pool: str = "bilinear",
                 **kwargs) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        c, k2 = backbone.out_channels, pool_size * pool_size
        self.pool_size, self.sampling_ratio, self.gamma = pool_size, sampling_ratio, gamma
        self.plain_roi_pool = plain_roi_pool  # "quantized": the released code's PS RoI pooling, integer-pixel bins
        self.cls_maps = nn.Conv2d(c, k2 * (num_classes + 1), 1)
        self.box_maps = nn.Conv2d(c, k2 * 4, 1)
        for conv in (self.cls_maps, self.box_maps):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        if deformable_roi_pool:
            args = (pool_size, self.spatial_scale, sampling_ratio, gamma)
            self.cls_pool = DeformPSRoIPool(c, num_classes + 1, *args, offset_groups=num_classes + 1)
            self.box_pool = DeformPSRoIPool(c, 4, *args, offset_groups=1)
        else:
            self.cls_pool = self.box_pool = None

    def _pool(self, module: DeformPSRoIPool | None, maps: Tensor, feature: Tensor, rois: list[Tensor]) -> Tensor:
        if module is not None:
            return module(maps, feature, rois)
        if self.plain_roi_pool == "quantized":
            return torchvision.ops.ps_roi_pool(maps, rois, self.pool_size, self.spatial_scale)
        return deform_ps_roi_pool(maps, rois, None, self.pool_size, self.spatial_scale, self.sampling_ratio, self.gamma)

    def roi_head(self, feature: Tensor, rois: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-RoI (C+1) scores and 4 class-agnostic deltas, each the average vote of k×k bins."""
        scores = self._pool(self.cls_pool, self.cls_maps(feature), feature, rois)
        boxes = self._pool(self.box_pool, self.box_maps(feature), feature, rois)
        return scores.mean(dim=(2, 3)), boxes.mean(dim=(2, 3))
