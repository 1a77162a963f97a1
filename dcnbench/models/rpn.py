"""Region proposal network (Ren et al. 2015) with a (C+1)-way classifier, and the paper's
*class-aware RPN* detector built on it (section 2.3: "the 2-class convolutional classifier is
replaced by a (C+1)-class convolutional classifier ... a simplified version of SSD").

``RPN(num_classes=1)`` is the usual object/not-object RPN (2-way softmax, as in the original), used
by Faster R-CNN and R-FCN on top of conv4; ``RPN(num_classes=C)`` is the class-aware one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from .backbone import ResNetBackbone
from .common import Targets, box_dtype, check_targets, detect, grid_anchors, match, to_batch


class RPN(nn.Module):
    """RPN head, anchors, training targets/losses and proposal generation on one feature map.

    Head: 3×3 conv (``conv_channels``; 0 drops it) + ReLU, then 1×1 convs to A·(C+1) class logits
    and A·4 box deltas, A = len(anchor_sizes) · len(aspect_ratios).
    """

    def __init__(
        self,
        in_channels: int,
        stride: int,
        num_classes: int = 1,
        conv_channels: int = 512,
        anchor_sizes: Sequence[float] = (128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: tuple[int, int] = (12000, 6000),
        post_nms_top_n: tuple[int, int] = (2000, 300),
        nms_thresh: float = 0.7,
        min_size: float = 1e-3,
        ignore_cross_boundary: bool = True,
    ) -> None:
        super().__init__()
        self.stride, self.num_classes = stride, num_classes
        self.anchor_sizes, self.aspect_ratios = tuple(anchor_sizes), tuple(aspect_ratios)
        self.num_anchors = len(self.anchor_sizes) * len(self.aspect_ratios)
        self.conv = (nn.Sequential(nn.Conv2d(in_channels, conv_channels, 3, padding=1), nn.ReLU(inplace=True))
                     if conv_channels else nn.Identity())
        head_in = conv_channels or in_channels
        self.cls_logits = nn.Conv2d(head_in, self.num_anchors * (num_classes + 1), 1)
        self.bbox_pred = nn.Conv2d(head_in, self.num_anchors * 4, 1)
        for layer in [*self.conv.modules(), self.cls_logits, self.bbox_pred]:
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n, self.post_nms_top_n = pre_nms_top_n, post_nms_top_n
        self.nms_thresh, self.min_size = nms_thresh, min_size
        self.ignore_cross_boundary = ignore_cross_boundary

    def head(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """feature (N, C_in, H, W) -> logits (N, H*W*A, C+1), deltas (N, H*W*A, 4), anchor order as grid_anchors."""
        n, _, h, w = feature.shape
        x = self.conv(feature)
        logits = self.cls_logits(x).reshape(n, self.num_anchors, self.num_classes + 1, h, w)
        deltas = self.bbox_pred(x).reshape(n, self.num_anchors, 4, h, w)
        return (logits.permute(0, 3, 4, 1, 2).reshape(n, -1, self.num_classes + 1),
                deltas.permute(0, 3, 4, 1, 2).reshape(n, -1, 4))

    def anchors(self, feature: Tensor) -> Tensor:
        """(H*W*A, 4) anchors of ``feature``'s grid, in float32 at least (``box_dtype``)."""
        return grid_anchors(self.anchor_sizes, self.aspect_ratios, tuple(feature.shape[-2:]), self.stride,
                            feature.device, box_dtype(feature))

    def loss(self, logits: Tensor, deltas: Tensor, anchors: Tensor, targets: Targets,
             image_sizes: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
        """Cross entropy over sampled anchors ((C+1)-way; label = matched class, or 1 when
        num_classes == 1) and smooth-L1 on the positives' deltas, normalized by the sample count.

        With ``ignore_cross_boundary`` (Faster R-CNN's rule) anchors crossing the border of their
        image (``image_sizes``: (H, W) per image, padding excluded) are neither matched nor
        sampled: each ground truth's best-IoU positive is its best anchor inside the image. An
        anchor shape that crosses the border at every position (e.g. 181×90 on a 128 px image) is
        then never trained, yet still scored at test time."""
        labels, reg_targets, sampled = [], [], []
        for tgt, (height, width) in zip(targets, image_sizes):
            gt_boxes = tgt["boxes"].to(anchors)
            inside = None
            if self.ignore_cross_boundary:
                inside = ((anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= width)
                          & (anchors[:, 3] <= height))
            idx, lab = match(self.matcher, gt_boxes, tgt["labels"].to(anchors.device), anchors, inside)
            if self.num_classes == 1:
                lab = (idx >= 0).long()
            state = torch.where(idx >= 0, 1, torch.where(idx == Matcher.BELOW_LOW_THRESHOLD, 0, -1))
            if inside is not None:
                state = torch.where(inside, state, -1)
            pos, neg = self.sampler([state])
            sampled.append((pos[0] | neg[0]).bool())
            labels.append(lab)
            matched = gt_boxes[idx.clamp(min=0)] if gt_boxes.numel() else anchors
            reg_targets.append(self.box_coder.encode_single(matched, anchors))
        sampled, labels, reg_targets = torch.stack(sampled), torch.stack(labels), torch.stack(reg_targets)
        count = max(int(sampled.sum()), 1)
        cls_loss = F.cross_entropy(logits[sampled], labels[sampled], reduction="sum") / count
        pos = sampled & (labels > 0)
        box_loss = F.smooth_l1_loss(deltas[pos], reg_targets[pos], beta=1 / 9, reduction="sum") / count
        return {"loss_rpn_cls": cls_loss, "loss_rpn_box": box_loss}

    @torch.no_grad()
    def proposals(self, logits: Tensor, deltas: Tensor, anchors: Tensor,
                  image_sizes: Sequence[tuple[int, int]], for_training: bool | None = None) -> list[Tensor]:
        """Top objectness (1 - P(background)) anchors, decoded, clipped to their image's (H, W),
        NMS'd: per image (P, 4). Objectness is computed in float32 at least (float64 stays).
        ``for_training`` picks the (train, test) top-n settings, default by ``self.training``."""
        mode = 0 if (self.training if for_training is None else for_training) else 1
        pre, post = self.pre_nms_top_n[mode], self.post_nms_top_n[mode]
        objectness = 1 - F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)[..., 0]
        out = []
        for obj, d, size in zip(objectness, deltas, image_sizes):
            top = obj.topk(min(pre, obj.numel())).indices
            decoded = self.box_coder.decode_single(d[top].detach().to(anchors.dtype), anchors[top])
            boxes = clip_boxes_to_image(decoded, size)
            scores = obj[top]
            keep = remove_small_boxes(boxes, self.min_size)
            boxes, scores = boxes[keep], scores[keep]
            keep = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.long), self.nms_thresh)[:post]
            out.append(boxes[keep])
        return out


class ClassAwareRPN(nn.Module):
    """The paper's class-aware RPN: an RPN with a (C+1)-way classifier on the feature extraction
    network's output, whose anchors, classified and regressed, are the detections.

    forward(images, targets=None): training -> {"loss_rpn_cls", "loss_rpn_box"}; eval -> detections.
    Images and targets as for :class:`~dcnbench.models.faster_rcnn.RoIDetector`.
    """

    def __init__(self, backbone: ResNetBackbone, num_classes: int, rpn: dict | None = None,
                 score_thresh: float = 0.05, nms_thresh: float = 0.3, detections_per_img: int = 100,
                 pre_nms_top_n: int = 6000) -> None:
        super().__init__()
        self.backbone, self.num_classes = backbone, num_classes
        self.rpn = RPN(backbone.out_channels, backbone.output_stride, num_classes=num_classes, **(rpn or {}))
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.pre_nms_top_n = detections_per_img, pre_nms_top_n

    def forward_raw(self, images: Tensor | list[Tensor]) -> dict:
        """Network forward: per-anchor class logits (N, K, C+1), deltas (N, K, 4), anchors (K, 4)
        and each image's (H, W) (a list of differently sized images is padded, see ``to_batch``)."""
        images, sizes = to_batch(images)
        _, feature = self.backbone(images)
        logits, deltas = self.rpn.head(feature)
        return {"logits": logits, "deltas": deltas, "anchors": self.rpn.anchors(feature), "image_sizes": sizes}

    def postprocess(self, raw: dict) -> list[dict[str, Tensor]]:
        """Softmax, decoding and per-class NMS of every anchor."""
        n = raw["logits"].shape[0]
        return detect(raw["logits"].flatten(0, 1), raw["deltas"].flatten(0, 1), [raw["anchors"]] * n,
                      raw["image_sizes"], self.rpn.box_coder, self.score_thresh, self.nms_thresh,
                      self.detections_per_img, self.pre_nms_top_n)

    def forward(self, images: Tensor | list[Tensor], targets: Targets | None = None):
        if self.training:
            check_targets(targets, images, self.num_classes)
        raw = self.forward_raw(images)
        if self.training:
            return self.rpn.loss(raw["logits"], raw["deltas"], raw["anchors"], targets, raw["image_sizes"])
        return self.postprocess(raw)


class ProposalNetwork(nn.Module):
    """Faster R-CNN's RPN trained on its own (the first stage of Ren et al.'s 4-step training): the
    backbone to conv4 and a 2-way :class:`RPN`, without feature sharing. The paper's VOC detector
    ablations (section 4.1) train it first and give Faster R-CNN and R-FCN its proposals, fixed.

    forward(images, targets=None, for_training=None): training -> {"loss_rpn_cls", "loss_rpn_box"};
    eval -> per-image (P, 4) proposals, with the RPN's train top-n settings when ``for_training``
    (the proposals a detector trains on) and its test settings otherwise. Images and targets as for
    :class:`~dcnbench.models.faster_rcnn.RoIDetector`; res5 and the reduction conv are built (the
    backbone's weights file fills them) but never run.
    """

    def __init__(self, backbone: ResNetBackbone, num_classes: int, rpn: dict | None = None) -> None:
        super().__init__()
        self.backbone, self.num_classes = backbone, num_classes  # C: the training labels are checked in 1..C
        self.rpn = RPN(backbone.conv4_channels, backbone.output_stride, num_classes=1, **(rpn or {}))

    def forward(self, images: Tensor | list[Tensor], targets: Targets | None = None, for_training: bool | None = None):
        if self.training:
            check_targets(targets, images, self.num_classes)
        images, sizes = to_batch(images)
        c4 = self.backbone.conv4(images)
        logits, deltas = self.rpn.head(c4)
        anchors = self.rpn.anchors(c4)
        if self.training:
            return self.rpn.loss(logits, deltas, anchors, targets, sizes)
        return self.rpn.proposals(logits, deltas, anchors, sizes, for_training)
