"""``build_model(cfg)``: every network of the paper (and its scaled CPU family) from a plain dict.

Config keys (all optional except ``task``; ``deformable_roi_pool`` and the keys from ``rpn_conv_channels``
on set the RPN or the detection heads: a task without that part refuses them, see ``TASK_KEYS``):

=====================  =============================================================================
task                   "deeplab" | "rpn" (class-aware RPN) | "faster_rcnn" | "rfcn" | "proposals" (Faster
                       R-CNN's RPN alone, on conv4: the fixed proposals of the paper's VOC ablations)
num_classes            C, the foreground classes (VOC: 20); heads output C+1 (background = 0)
backbone               "resnet101" (default), "resnet50", "resnet152" or "scaled"
blocks, width          scaled family: blocks per stage (default [1, 1, 2, 3]), stem width (16)
output_stride          16 (default) or 8 (res4 also at stride 1, dilation ``res4_dilation``, 2)
dilation               dilation of the res5 3×3 convs (2; Table 3: 4, 6, 8)
placement              Table 1 row: "none", "res5c", "res5b-c", "res5a-c" (default), "res5+res4b20-22",
                       or a list of block names ("res5c", "res4b22", ...)
offset_groups          offset groups of the deformable convs (1)
deformable_roi_pool    Faster R-CNN / R-FCN: deformable (PS) RoI pooling (False)
plain_roi_pool         Faster R-CNN / R-FCN without deformable pooling: "bilinear" (default: the deformable
                       op without offsets, S×S bilinear samples averaged) or "quantized" (the released
                       code's baselines: max RoI pooling, average PS RoI pooling over integer-pixel bins)
frozen_bn              FrozenBatchNorm2d (default for ResNet-50/101/152) or BatchNorm2d (scaled)
freeze_at              stages with fixed weights, counting the stem as 1 (0; paper tier: 2, conv1 and res2)
feature_channels       1×1 reduction after res5 (1024; 256 for Faster R-CNN; scaled: × width/64)
rpn_conv_channels      RPN 3×3 conv width (512; scaled: × width/64; 0 drops the conv)
anchor_sizes           (128, 256, 512); scaled: (16, 32, 64, 128)
aspect_ratios          (0.5, 1.0, 2.0)
rpn_batch_size         anchors sampled per image for the RPN loss (256)
rpn_ignore_cross_boundary  RPN training ignores anchors crossing the image border (True, Faster R-CNN)
rpn_pre_nms_top_n      Faster R-CNN / R-FCN / proposals: (train, test) proposals before NMS ((12000, 6000))
rpn_post_nms_top_n     Faster R-CNN / R-FCN / proposals: (train, test) proposals kept ((2000, 300); 300 as in
                       Table 4)
roi_batch_size         RoIs sampled per image for the detection head (128)
fc_channels            Faster R-CNN fc width (1024; scaled: × width/64)
pool_size              RoI pooling bins k (7)
sampling_ratio         samples per bin side in RoI pooling (4)
score_thresh, nms_thresh, detections_per_img   detection post-processing (0.05, 0.3, 100)
=====================  =============================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from dcnbench.errors import is_int, is_number

from .backbone import DEPTHS, ResNetBackbone
from .deeplab import DeepLab
from .faster_rcnn import PLAIN_ROI_POOLS, FasterRCNN
from .rfcn import RFCN
from .rpn import ClassAwareRPN, ProposalNetwork

TASKS = ("deeplab", "rpn", "faster_rcnn", "rfcn", "proposals")
KNOWN_KEYS = {
    "task", "num_classes", "backbone", "blocks", "width", "output_stride", "res4_dilation", "dilation", "placement",
    "offset_groups", "deformable_roi_pool", "frozen_bn", "freeze_at", "feature_channels", "rpn_conv_channels", "anchor_sizes",
    "aspect_ratios", "rpn_batch_size", "rpn_ignore_cross_boundary", "rpn_pre_nms_top_n", "rpn_post_nms_top_n",
    "roi_batch_size", "fc_channels", "pool_size", "sampling_ratio", "score_thresh", "nms_thresh", "detections_per_img",
    "plain_roi_pool",
}

# Keys only some tasks use (every other known key is the backbone's, which every task has): key -> those tasks.
# The class-aware RPN's anchors are its detections: it makes no proposals, so the RPN's top-n settings
# are the two-stage detectors' and the proposal network's, which detects nothing.
_DETECTORS, _ROI_TASKS = ("rpn", "faster_rcnn", "rfcn"), ("faster_rcnn", "rfcn")
TASK_KEYS = {
    **dict.fromkeys(("rpn_conv_channels", "anchor_sizes", "aspect_ratios", "rpn_batch_size",
                     "rpn_ignore_cross_boundary"), (*_DETECTORS, "proposals")),
    **dict.fromkeys(("score_thresh", "nms_thresh", "detections_per_img"), _DETECTORS),
    **dict.fromkeys(("rpn_pre_nms_top_n", "rpn_post_nms_top_n"), (*_ROI_TASKS, "proposals")),
    **dict.fromkeys(("deformable_roi_pool", "plain_roi_pool", "roi_batch_size", "pool_size", "sampling_ratio"),
                    _ROI_TASKS),
    "fc_channels": ("faster_rcnn",),
}


def check_task_keys(cfg: dict[str, Any], task: str) -> None:
    """ValueError naming the first key of ``cfg`` that ``task`` does not use (``TASK_KEYS``), and the
    tasks that use it: such a setting would be ignored silently."""
    for key in cfg:
        if key in TASK_KEYS and task not in TASK_KEYS[key]:
            raise ValueError(f"config {key!r} is used by the tasks {list(TASK_KEYS[key])} only, not by {task!r} "
                             f"(it would be ignored), got {key}={cfg[key]!r}")


_POSITIVE_INTS = ("num_classes", "width", "dilation", "res4_dilation", "offset_groups", "rpn_batch_size",
                  "roi_batch_size", "fc_channels", "pool_size", "sampling_ratio", "detections_per_img")
_NON_NEGATIVE_INTS = ("feature_channels", "rpn_conv_channels", "freeze_at")  # 0 drops the layer / freezes none
_POSITIVE_NUMBER_LISTS = ("anchor_sizes", "aspect_ratios")
_TRAIN_TEST_PAIRS = ("rpn_pre_nms_top_n", "rpn_post_nms_top_n")
_FRACTIONS = ("score_thresh", "nms_thresh")


def check_config(cfg: dict[str, Any]) -> None:
    """ValueError naming the first key whose value has the wrong type or range (module docstring)."""
    def fail(key, what):
        raise ValueError(f"config {key!r} must be {what}, got {cfg[key]!r}")

    for key in _POSITIVE_INTS:
        if key in cfg and not (is_int(cfg[key]) and cfg[key] >= 1):
            fail(key, "a positive integer")
    for key in _NON_NEGATIVE_INTS:
        if key in cfg and not (is_int(cfg[key]) and cfg[key] >= 0):
            fail(key, "an integer >= 0")
    for key in _POSITIVE_NUMBER_LISTS:
        v = cfg.get(key, [1])
        if isinstance(v, str) or not isinstance(v, Sequence) or not v or not all(is_number(x) and x > 0 for x in v):
            fail(key, "a non-empty list of positive numbers")
    for key in _TRAIN_TEST_PAIRS:
        v = cfg.get(key, [1, 1])
        if isinstance(v, str) or not isinstance(v, Sequence) or len(v) != 2 or not all(is_int(x) and x >= 1 for x in v):
            fail(key, "a (train, test) pair of positive integers")
    for key in _FRACTIONS:
        if key in cfg and not (is_number(cfg[key]) and 0 <= cfg[key] <= 1):
            fail(key, "a number in [0, 1]")
    if cfg.get("plain_roi_pool", "bilinear") not in PLAIN_ROI_POOLS:
        fail("plain_roi_pool", f"one of {PLAIN_ROI_POOLS}")
    placement = cfg.get("placement", "none")
    names = isinstance(placement, Sequence) and all(isinstance(n, str) for n in placement)
    if not isinstance(placement, str) and not names:
        fail("placement", "a Table 1 row name or a list of block names")


def build_backbone(cfg: dict[str, Any]) -> ResNetBackbone:
    """The feature extraction network a config asks for (see the module docstring)."""
    name = cfg.get("backbone", "resnet101")
    if name == "scaled":
        blocks, width, frozen = cfg.get("blocks", (1, 1, 2, 3)), cfg.get("width", 16), cfg.get("frozen_bn", False)
    elif name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) in DEPTHS:
        blocks, width, frozen = DEPTHS[int(name[6:])], 64, cfg.get("frozen_bn", True)
    else:
        raise ValueError(f"backbone must be 'scaled' or one of {[f'resnet{d}' for d in DEPTHS]}, got {name!r}")
    default_channels = 256 if cfg["task"] == "faster_rcnn" else 1024
    return ResNetBackbone(
        blocks=blocks, width=width, dilation=cfg.get("dilation", 2), output_stride=cfg.get("output_stride", 16),
        res4_dilation=cfg.get("res4_dilation", 2),
        out_channels=cfg.get("feature_channels", default_channels * width // 64),
        placement=cfg.get("placement", "res5a-c"), offset_groups=cfg.get("offset_groups", 1), frozen_bn=frozen,
        freeze_at=cfg.get("freeze_at", 0),
    )


def build_model(cfg: dict[str, Any]) -> nn.Module:
    """A DeepLab, ClassAwareRPN, FasterRCNN, RFCN or ProposalNetwork from a plain config dict (module docstring);
    unknown keys, keys the task does not use (``TASK_KEYS``) and values of the wrong type or range
    raise a ValueError naming the key."""
    unknown = set(cfg) - KNOWN_KEYS
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}")
    task = cfg.get("task")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_task_keys(cfg, task)
    check_config(cfg)
    backbone = build_backbone(cfg)
    num_classes = cfg.get("num_classes", 20)
    if task == "deeplab":
        return DeepLab(backbone, num_classes)
    scaled = cfg.get("backbone", "resnet101") == "scaled"
    ratio = backbone.width / 64
    rpn = {
        "conv_channels": cfg.get("rpn_conv_channels", int(512 * ratio)),
        "anchor_sizes": tuple(cfg.get("anchor_sizes", (16, 32, 64, 128) if scaled else (128, 256, 512))),
        "aspect_ratios": tuple(cfg.get("aspect_ratios", (0.5, 1.0, 2.0))),
        "batch_size_per_image": cfg.get("rpn_batch_size", 256),
        "ignore_cross_boundary": cfg.get("rpn_ignore_cross_boundary", True),
        "pre_nms_top_n": tuple(cfg.get("rpn_pre_nms_top_n", (12000, 6000))),
        "post_nms_top_n": tuple(cfg.get("rpn_post_nms_top_n", (2000, 300))),
    }
    post = {k: cfg[k] for k in ("score_thresh", "nms_thresh", "detections_per_img") if k in cfg}
    if task == "rpn":
        return ClassAwareRPN(backbone, num_classes, rpn, **post)
    if task == "proposals":
        return ProposalNetwork(backbone, num_classes, rpn)
    head = {
        "deformable_roi_pool": cfg.get("deformable_roi_pool", False),
        "plain_roi_pool": cfg.get("plain_roi_pool", "bilinear"), "pool_size": cfg.get("pool_size", 7),
        "sampling_ratio": cfg.get("sampling_ratio", 4), "rpn": rpn,
        "roi_batch_size": cfg.get("roi_batch_size", 128), **post,
    }
    if task == "faster_rcnn":
        return FasterRCNN(backbone, num_classes, representation=cfg.get("fc_channels", int(1024 * ratio)), **head)
    return RFCN(backbone, num_classes, **head)


def count_parameters(model: nn.Module) -> int:
    """Parameters as a checkpoint holds them: every ``nn.Parameter``, plus the affine scale and shift
    of each FrozenBatchNorm2d (parameters the paper's networks have but keep fixed; torchvision
    stores them as buffers). BatchNorm running statistics are not counted."""
    frozen = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, FrozenBatchNorm2d))
    return sum(p.numel() for p in model.parameters()) + frozen
