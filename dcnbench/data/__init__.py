"""Datasets for the paper's experiments: the synthetic benchmark (default, no download) and loaders
for PASCAL VOC, Cityscapes and COCO in their standard layouts, plus the paper's transforms.

Generator: :class:`SynthConfig`, :func:`generate_sample`, :func:`write_synthetic`.
Loaders: :class:`VOCSegmentation`, :class:`VOCDetection`, :class:`CityscapesSegmentation`,
:class:`CocoDetection`, :class:`SyntheticDataset`, :func:`build_dataset`.
Transforms: :func:`paper_transforms` and friends in :mod:`dcnbench.data.transforms`.
"""

from .datasets import (
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    VOC_DET_TEST,
    VOC_DET_TRAIN,
    CityscapesSegmentation,
    CocoDetection,
    DatasetNotFoundError,
    SyntheticDataset,
    VOCDetection,
    VOCSegmentation,
    build_dataset,
    build_train_aug_list,
)
from .synthetic import SHAPE_NAMES, SynthConfig, generate_sample, generate_samples, write_synthetic
from .transforms import (
    Compose,
    Normalize,
    RandomHorizontalFlip,
    ResizeShorterSide,
    collate_detection,
    collate_segmentation,
    paper_transforms,
)

__all__ = [
    "CITYSCAPES_CLASSES",
    "SHAPE_NAMES",
    "VOC_CLASSES",
    "VOC_DET_TEST",
    "VOC_DET_TRAIN",
    "CityscapesSegmentation",
    "CocoDetection",
    "Compose",
    "DatasetNotFoundError",
    "Normalize",
    "RandomHorizontalFlip",
    "ResizeShorterSide",
    "SynthConfig",
    "SyntheticDataset",
    "VOCDetection",
    "VOCSegmentation",
    "build_dataset",
    "build_train_aug_list",
    "collate_detection",
    "collate_segmentation",
    "generate_sample",
    "generate_samples",
    "paper_transforms",
    "write_synthetic",
]
