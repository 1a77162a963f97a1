"""Metrics: mIoU (segmentation), VOC/COCO mAP (detection) and effective dilation (Table 2)."""

from .detection import COCO_AREA_RANGES, DetectionEvaluator, box_iou_np, tercile_area_ranges, voc_ap
from .dilation import (
    PAPER_AREA_THRESHOLDS,
    DilationStats,
    area_map_at,
    categorize_areas,
    dilation_by_object,
    effective_dilation,
    object_area_map,
    record_offsets,
    tercile_thresholds,
)
from .segmentation import SegmentationMetric, confusion_matrix, miou_from_confusion

__all__ = [
    "COCO_AREA_RANGES",
    "PAPER_AREA_THRESHOLDS",
    "DetectionEvaluator",
    "DilationStats",
    "SegmentationMetric",
    "area_map_at",
    "box_iou_np",
    "categorize_areas",
    "confusion_matrix",
    "dilation_by_object",
    "effective_dilation",
    "miou_from_confusion",
    "object_area_map",
    "record_offsets",
    "tercile_area_ranges",
    "tercile_thresholds",
    "voc_ap",
]
