"""The paper's networks (section 2.3): ResNet feature extractor with deformable placement by name,
DeepLab, class-aware RPN, Faster R-CNN (light head) and R-FCN; ``build_model(cfg)`` builds any of them."""

from .backbone import PLACEMENTS, ResNetBackbone, deformable_layers, load_backbone_weights
from .build import TASKS, build_backbone, build_model, count_parameters
from .deeplab import DeepLab
from .faster_rcnn import FasterRCNN
from .rfcn import RFCN
from .rpn import RPN, ClassAwareRPN

__all__ = [
    "PLACEMENTS", "RFCN", "RPN", "TASKS", "ClassAwareRPN", "DeepLab", "FasterRCNN", "ResNetBackbone",
    "build_backbone", "build_model", "count_parameters", "deformable_layers", "load_backbone_weights",
]
