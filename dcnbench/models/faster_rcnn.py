"""Faster R-CNN with the light head of paper section 2.3.

RPN on conv4 (as in Ren et al. / He et al.); 7×7 RoI pooling on the feature extraction network's
256-d output (plain, or deformable with its offset fc at lr ×0.01 — ``DeformRoIPool``); two fc of
1024; (C+1)-way classification and class-specific box regression.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher

from dcnbench.ops import DeformRoIPool, deform_roi_pool

from .backbone import ResNetBackbone
from .common import Targets, check_proposals, check_targets, detect, fast_rcnn_loss, sample_rois, to_batch
from .rpn import RPN


class RoIDetector(nn.Module):
    """What Faster R-CNN and R-FCN share: backbone, RPN on conv4, RoI sampling, detection.

    Subclasses implement ``roi_head(feature, rois) -> (class_logits (K, C+1), box_regression)``.
    forward(images, targets=None, proposals=None): training -> loss dict (RPN and head losses);
    eval -> detections. ``images``: (N, 3, H, W), or a list of (3, H, W) that may differ in size
    (``to_batch``). Training targets are checked first (``check_targets``); an image without boxes
    trains only as background. ``proposals`` (per-image (P, 4) boxes) replaces the RPN's, as in the
    paper's VOC ablations with fixed proposals.
    """

    def __init__(self, backbone: ResNetBackbone, num_classes: int, rpn: dict | None = None,
                 roi_batch_size: int = 128, roi_positive_fraction: float = 0.25, fg_iou_thresh: float = 0.5,
                 score_thresh: float = 0.05, nms_thresh: float = 0.3, detections_per_img: int = 100) -> None:
        super().__init__()
        self.backbone, self.num_classes = backbone, num_classes
        self.rpn = RPN(backbone.conv4_channels, backbone.output_stride, num_classes=1, **(rpn or {}))
        self.spatial_scale = 1.0 / backbone.output_stride
        self.box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
        self.matcher = Matcher(fg_iou_thresh, fg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(roi_batch_size, roi_positive_fraction)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    def roi_head(self, feature: Tensor, rois: list[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward_raw(self, images: Tensor | list[Tensor], targets: Targets | None = None,
                    proposals: list[Tensor] | None = None) -> dict:
        """Network forward (proposal generation included): per-RoI logits and box regression.
        A list of differently sized images is padded (``to_batch``); ``image_sizes`` keeps each (H, W)."""
        images, sizes = to_batch(images)
        if proposals is not None:
            check_proposals(proposals, len(sizes))
        c4, feature = self.backbone(images)
        losses = {}
        if proposals is None:
            logits, deltas = self.rpn.head(c4)
            anchors = self.rpn.anchors(c4)
            proposals = self.rpn.proposals(logits, deltas, anchors, sizes)
            if self.training:
                losses.update(self.rpn.loss(logits, deltas, anchors, targets, sizes))
        labels = reg_targets = None
        if self.training:
            proposals, labels, reg_targets = sample_rois(proposals, targets, self.matcher, self.sampler, self.box_coder)
        class_logits, box_regression = self.roi_head(feature, proposals)
        return {"class_logits": class_logits, "box_regression": box_regression, "proposals": proposals,
                "labels": labels, "regression_targets": reg_targets, "losses": losses, "image_sizes": sizes}

    def postprocess(self, raw: dict) -> list[dict[str, Tensor]]:
        """Softmax, box decoding, per-class NMS."""
        return detect(raw["class_logits"], raw["box_regression"], raw["proposals"], raw["image_sizes"],
                      self.box_coder, self.score_thresh, self.nms_thresh, self.detections_per_img)

    def forward(self, images: Tensor | list[Tensor], targets: Targets | None = None,
                proposals: list[Tensor] | None = None):
        if self.training:
            check_targets(targets, images, self.num_classes)
        raw = self.forward_raw(images, targets, proposals)
        if not self.training:
            return self.postprocess(raw)
        cls_loss, box_loss = fast_rcnn_loss(raw["class_logits"], raw["box_regression"], raw["labels"],
                                            raw["regression_targets"])
        return {**raw["losses"], "loss_cls": cls_loss, "loss_box": box_loss}


PLAIN_ROI_POOLS = ("bilinear", "quantized")


class FasterRCNN(RoIDetector):
    """Faster R-CNN, light head: RoI pooling (k×k) -> fc 1024 -> fc 1024 -> cls (C+1), box 4(C+1).

    Without deformable pooling, ``plain_roi_pool`` "bilinear" averages S×S bilinear samples per bin
    (the deformable op without offsets); "quantized" is the released code's baseline, max pooling
    over integer-pixel bins (``torchvision.ops.roi_pool``)."""

    def __init__(self, backbone: ResNetBackbone, num_classes: int, deformable_roi_pool: bool = False,
                 pool_size: int = 7, sampling_ratio: int = 4, gamma: float = 0.1, representation: int = 1024,
                 plain_roi_pool: str = "bilinear", **kwargs) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        c = backbone.out_channels
        self.pool_size, self.sampling_ratio, self.gamma = pool_size, sampling_ratio, gamma
        self.plain_roi_pool = plain_roi_pool
        self.roi_pool = (DeformRoIPool(c, pool_size, self.spatial_scale, sampling_ratio, gamma)
                         if deformable_roi_pool else None)
        self.fc6 = nn.Linear(c * pool_size * pool_size, representation)
        self.fc7 = nn.Linear(representation, representation)
        self.cls_score = nn.Linear(representation, num_classes + 1)
        self.bbox_pred = nn.Linear(representation, 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def roi_head(self, feature: Tensor, rois: list[Tensor]) -> tuple[Tensor, Tensor]:
        if self.roi_pool is not None:
            pooled = self.roi_pool(feature, rois)
        elif self.plain_roi_pool == "quantized":
            pooled = torchvision.ops.roi_pool(feature, rois, self.pool_size, self.spatial_scale)
        else:
            pooled = deform_roi_pool(feature, rois, None, self.pool_size, self.spatial_scale, self.sampling_ratio, self.gamma)
        x = torch.relu(self.fc6(pooled.flatten(1)))
        x = torch.relu(self.fc7(x))
        return self.cls_score(x), self.bbox_pred(x)
