"""Detection metrics: VOC-style mAP at IoU 0.5 / 0.7 and COCO mAP@[0.5:0.95] (pycocotools COCOeval).

One path for synthetic and real data: :class:`DetectionEvaluator` takes the targets the loaders
yield (``boxes`` xyxy, ``labels`` 1..C, optional ``areas``, ``difficult``, ``iscrowd``) and the
model's predictions (``boxes``, ``scores``, ``labels``), and computes both metrics from the same
accumulated data.

Conventions: boxes are continuous xyxy pixel coordinates (pixel i spans [i, i+1)), so IoU has no
"+1" term; IoU is computed in float64 and a match needs ``IoU >= threshold`` (as the VOC devkit
and COCOeval do).  VOC-style AP follows the VOC devkit: detections sorted by score, each matched
to the ground truth box of highest IoU, a second hit on a matched box is a false positive, hits on
difficult boxes count neither way; crowd boxes (COCO) are left out of that matching and, as in
COCOeval, a detection that matched nothing else but lies in a crowd region (its intersection with
the crowd box covers ``threshold`` of the detection's area) counts neither way; AP is the area under the monotone precision/recall
curve (``use_07_metric=True``: the 11-point VOC 2007 variant).  Classes without ground truth are
left out of the mean.  For COCOeval, difficult boxes are passed as crowd (ignore) regions, the
IoU thresholds are rounded to two decimals (so 0.7 is exactly 0.7), and ``area`` is the target's
``areas`` (mask area for COCO and synthetic data, box area for VOC), else the box area.

Targets whose ``"size"`` differs from their ``"orig_size"`` (the loaders' resized images) are
evaluated in the original image's pixels: their boxes, areas and the image's predicted boxes are
scaled back, so COCO's small / medium / large refer to the annotated image (IoU does not change).
"""

from __future__ import annotations

import contextlib
import io
from typing import Mapping, Sequence

import numpy as np
from torch import Tensor

from dcnbench.errors import is_int, is_number

__all__ = [
    "COCO_AREA_RANGES",
    "DetectionEvaluator",
    "box_iou_np",
    "check_area_ranges",
    "tercile_area_ranges",
    "voc_ap",
]

COCO_AREA_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}


def _intersections(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xyxy boxes ``a`` (A, 4) and ``b`` (B, 4) as float64, and their (A, B) intersection areas."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return a, b, np.clip(iw, 0, None) * np.clip(ih, 0, None)


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, B) IoU of xyxy boxes, float64, no +1 convention."""
    a, b, inter = _intersections(a, b)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_coverage_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, B) fraction of each box of ``a`` that lies inside each box of ``b`` (COCO's IoU
    with a crowd box: intersection over the detection's area), float64."""
    a, b, inter = _intersections(a, b)
    area_a = _area(a)[:, None]
    return np.where(area_a > 0, inter / np.where(area_a > 0, area_a, 1.0), 0.0)


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """Average precision from a recall/precision curve (points in detection order)."""
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.linspace(0.0, 1.0, 11):
            above = precision[recall >= t]
            ap += (above.max() if above.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    step = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def tercile_area_ranges(areas: Sequence[float] | np.ndarray) -> dict[str, tuple[float, float]]:
    """small / medium / large area ranges splitting ``areas`` into three equal-count groups."""
    areas = np.asarray(areas, dtype=np.float64)
    if areas.size == 0:
        raise ValueError("no object areas to split into terciles")
    q1, q2 = np.quantile(areas, [1.0 / 3.0, 2.0 / 3.0])
    return {"small": (0.0, float(q1)), "medium": (float(q1), float(q2)), "large": (float(q2), 1e10)}


def check_area_ranges(area_ranges: object, name: str = "area_ranges") -> None:
    """ValueError (naming the setting ``name``) unless ``area_ranges`` is ``"coco"``, ``"terciles"``
    or a dict giving each of small, medium and large a (lo, hi) range of areas in px², 0 <= lo < hi."""
    if isinstance(area_ranges, str) and area_ranges in ("coco", "terciles"):
        return
    if isinstance(area_ranges, Mapping) and set(area_ranges) == {"small", "medium", "large"}:
        def is_range(r):
            return (isinstance(r, Sequence) and not isinstance(r, str) and len(r) == 2
                    and all(is_number(v) for v in r) and 0 <= r[0] < r[1])
        if all(is_range(r) for r in area_ranges.values()):
            return
    raise ValueError(f"{name} must be 'coco', 'terciles' or {{small, medium, large: (lo, hi)}} with "
                     f"0 <= lo < hi (px²), got {area_ranges!r}")


def _np(x, dtype=None, shape=None) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x if x is not None else [], dtype=dtype)
    return x.reshape(shape) if shape is not None else x


def boxes_array(x, name: str) -> np.ndarray:
    """``x`` as a float64 (M, 4) array (an empty one of any shape: no boxes); another shape raises naming ``name``."""
    arr = _np(x, np.float64)
    if arr.size and (arr.ndim != 2 or arr.shape[1] != 4):
        raise ValueError(f"{name} must be (M, 4) boxes x1, y1, x2, y2, got shape {arr.shape}")
    return arr.reshape(-1, 4)


def scale_to_original(target: Mapping) -> tuple[float, float]:
    """(sx, sy) taking a target's boxes from its image (``"size"``) back to the file (``"orig_size"``)."""
    if "size" not in target or "orig_size" not in target:
        return 1.0, 1.0
    (h, w), (oh, ow) = (_np(target[k], np.float64, (2,)) for k in ("size", "orig_size"))
    return float(ow / w), float(oh / h)


class DetectionEvaluator:
    """Accumulate predictions and ground truth, then :meth:`compute` VOC and COCO metrics.

    ``area_ranges``: ``"coco"`` (32², 96² thresholds), ``"terciles"`` (equal thirds of the
    accumulated ground-truth areas; for the synthetic set, whose objects are mostly COCO-"small")
    or a dict ``{"small": (lo, hi), "medium": ..., "large": ...}``.
    """

    def __init__(
        self,
        num_classes: int,
        iou_thresholds: Sequence[float] = (0.5, 0.7),
        use_07_metric: bool = False,
        area_ranges: str | Mapping[str, tuple[float, float]] = "coco",
        coco: bool = True,
        max_dets: int = 100,
        class_names: Sequence[str] | None = None,
    ):
        check_area_ranges(area_ranges)
        if not (is_int(num_classes) and num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1 (the foreground classes C), got {num_classes!r}")
        thresholds = np.asarray(iou_thresholds)
        if (thresholds.ndim != 1 or not thresholds.size or thresholds.dtype.kind not in "iuf"
                or not ((thresholds > 0) & (thresholds <= 1)).all()):  # NaN fails too
            raise ValueError(f"iou_thresholds must be a non-empty sequence of numbers in (0, 1], "
                             f"got {iou_thresholds!r}")
        self.num_classes = num_classes
        self.iou_thresholds = tuple(float(t) for t in thresholds)
        self.use_07_metric = use_07_metric
        self.area_ranges = area_ranges
        self.coco = coco
        self.max_dets = max_dets
        self.class_names = tuple(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        self.gts: list[dict] = []
        self.dets: list[dict] = []
        self.image_ids: list = []

    def update(self, predictions: Sequence[Mapping], targets: Sequence[Mapping]) -> None:
        """One entry per image: predictions hold boxes (K, 4) / scores (K,) / labels (K,), targets the
        loader's dict.  An ``image_id`` seen before is an error (each image must count once)."""
        if len(predictions) != len(targets):
            raise ValueError(f"predictions and targets must have one entry per image, got {len(predictions)} "
                             f"and {len(targets)}")
        seen = set(self.image_ids) - {None}
        gts, dets, ids = [], [], []  # stored only once every image is valid
        for i, (pred, tgt) in enumerate(zip(predictions, targets)):
            image_id = tgt.get("image_id")
            image_id = image_id.item() if isinstance(image_id, Tensor) else image_id
            if image_id is not None:
                if image_id in seen:
                    raise ValueError(f"targets[{i}]['image_id'] = {image_id} was already evaluated")
                seen.add(image_id)
            sx, sy = scale_to_original(tgt)
            boxes = boxes_array(tgt["boxes"], f"targets[{i}]['boxes']") * [sx, sy, sx, sy]
            k = len(boxes)
            gt = {
                "boxes": boxes,
                "labels": _np(tgt["labels"], np.int64, (-1,)),
                "difficult": _np(tgt.get("difficult", np.zeros(k)), bool, (-1,)),
                "iscrowd": _np(tgt.get("iscrowd", np.zeros(k)), bool, (-1,)),
                "areas": _np(tgt["areas"], np.float64, (-1,)) * (sx * sy) if "areas" in tgt else
                (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            }
            det = {
                "boxes": boxes_array(pred["boxes"], f"predictions[{i}]['boxes']") * [sx, sy, sx, sy],
                "scores": _np(pred["scores"], np.float64, (-1,)),
                "labels": _np(pred["labels"], np.int64, (-1,)),
            }
            for name, fields in (("targets", gt), ("predictions", det)):
                for key, arr in fields.items():
                    if len(arr) != len(fields["boxes"]):
                        raise ValueError(f"{name}[{i}]: {len(fields['boxes'])} boxes but {key} has shape "
                                         f"{tuple(arr.shape)}")
                arr = fields["labels"]
                bad = arr[(arr < 1) | (arr > self.num_classes)]
                if bad.size:
                    raise ValueError(f"{name}[{i}]['labels'] must be in 1..{self.num_classes}, got {bad[0]}")
            gts.append(gt)
            dets.append(det)
            ids.append(image_id)  # None where the target has no image_id
        self.gts += gts
        self.dets += dets
        self.image_ids += ids

    # -- VOC ----------------------------------------------------------------------------------

    def voc_ap_per_class(self, iou_threshold: float) -> np.ndarray:
        """(C,) VOC-style AP per class (NaN where a class has no non-difficult ground truth)."""
        aps = np.full(self.num_classes, np.nan)
        for c in range(1, self.num_classes + 1):
            gt_boxes, gt_difficult, crowd_boxes, matched = [], [], [], []
            npos = 0
            for gt in self.gts:
                sel = (gt["labels"] == c) & ~gt["iscrowd"]
                gt_boxes.append(gt["boxes"][sel])
                gt_difficult.append(gt["difficult"][sel])
                crowd_boxes.append(gt["boxes"][(gt["labels"] == c) & gt["iscrowd"]])
                matched.append(np.zeros(int(sel.sum()), dtype=bool))
                npos += int((~gt["difficult"][sel]).sum())
            img_idx, scores, boxes = [], [], []
            for i, det in enumerate(self.dets):
                sel = det["labels"] == c
                img_idx.append(np.full(int(sel.sum()), i))
                scores.append(det["scores"][sel])
                boxes.append(det["boxes"][sel])
            img_idx = np.concatenate(img_idx) if img_idx else np.zeros(0, int)
            scores = np.concatenate(scores) if scores else np.zeros(0)
            boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
            if npos == 0:
                continue
            order = np.argsort(-scores, kind="stable")
            tp = np.zeros(len(order))
            fp = np.zeros(len(order))
            for rank, d in enumerate(order):
                i = img_idx[d]
                if len(gt_boxes[i]):
                    ious = box_iou_np(boxes[d], gt_boxes[i])[0]
                    j = int(np.argmax(ious))
                    if ious[j] >= iou_threshold:
                        if gt_difficult[i][j]:
                            continue
                        if not matched[i][j]:
                            tp[rank] = 1
                            matched[i][j] = True
                            continue
                if len(crowd_boxes[i]) and box_coverage_np(boxes[d], crowd_boxes[i]).max() >= iou_threshold:
                    continue
                fp[rank] = 1
            ctp, cfp = np.cumsum(tp), np.cumsum(fp)
            recall = ctp / npos
            precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
            aps[c - 1] = voc_ap(recall, precision, self.use_07_metric)
        return aps

    # -- COCO ---------------------------------------------------------------------------------

    def _area_ranges(self) -> dict[str, tuple[float, float]]:
        if isinstance(self.area_ranges, Mapping):
            return dict(self.area_ranges)
        if self.area_ranges == "coco":
            return dict(COCO_AREA_RANGES)
        # "terciles" (checked in __init__)
        areas = np.concatenate([g["areas"][~(g["iscrowd"] | g["difficult"])] for g in self.gts] or [np.zeros(0)])
        return tercile_area_ranges(areas)

    def coco_metrics(self) -> dict[str, float]:
        """COCOeval bbox metrics: mAP@[0.5:0.95], @0.5, @0.7, @0.75 and by small/medium/large."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        images = [{"id": i + 1} for i in range(len(self.gts))]
        categories = [{"id": c} for c in range(1, self.num_classes + 1)]
        gt_anns, dt_anns = [], []
        for i, (gt, det) in enumerate(zip(self.gts, self.dets), start=1):
            for box, label, area, crowd in zip(gt["boxes"], gt["labels"], gt["areas"], gt["iscrowd"] | gt["difficult"]):
                x1, y1, x2, y2 = box.tolist()
                gt_anns.append({"id": len(gt_anns) + 1, "image_id": i, "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(area), "iscrowd": int(crowd)})
            for box, label, score in zip(det["boxes"], det["labels"], det["scores"]):
                x1, y1, x2, y2 = box.tolist()
                dt_anns.append({"id": len(dt_anns) + 1, "image_id": i, "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "score": float(score), "iscrowd": 0})
        ranges = self._area_ranges()
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt, coco_dt = COCO(), COCO()
            coco_gt.dataset = {"images": images, "categories": categories, "annotations": gt_anns}
            coco_dt.dataset = {"images": images, "categories": categories, "annotations": dt_anns}
            coco_gt.createIndex()
            coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
            ev.params.iouThrs = np.round(ev.params.iouThrs, 2)
            ev.params.maxDets = [1, 10, self.max_dets]
            ev.params.areaRng = [[0.0, 1e10]] + [list(ranges[k]) for k in ("small", "medium", "large")]
            ev.params.areaRngLbl = ["all", "small", "medium", "large"]
            ev.evaluate()
            ev.accumulate()
        precision = ev.eval["precision"]  # (T, R, K, A, M)

        def mean_ap(t_index=slice(None), area=0) -> float:
            p = precision[t_index, :, :, area, -1]
            p = p[p > -1]
            return float(p.mean()) if p.size else float("nan")

        def t_idx(value: float) -> int:
            return int(np.argmin(np.abs(ev.params.iouThrs - value)))

        return {
            "coco_mAP": mean_ap(),
            "coco_mAP@0.5": mean_ap(t_idx(0.5)),
            "coco_mAP@0.7": mean_ap(t_idx(0.7)),
            "coco_mAP@0.75": mean_ap(t_idx(0.75)),
            "coco_mAP_small": mean_ap(area=1),
            "coco_mAP_medium": mean_ap(area=2),
            "coco_mAP_large": mean_ap(area=3),
        }

    # -- both ---------------------------------------------------------------------------------

    def compute(self) -> dict:
        """``{"mAP@0.5", "mAP@0.7", ... (VOC-style), "coco_mAP", "coco_mAP@0.5", ..., "ap_per_class"}``."""
        out: dict = {}
        per_class = {}
        for t in self.iou_thresholds:
            aps = self.voc_ap_per_class(t)
            out[f"mAP@{t:g}"] = float(np.nanmean(aps)) if np.isfinite(aps).any() else float("nan")
            per_class[f"{t:g}"] = aps
        if self.coco:
            out.update(self.coco_metrics())
            out["area_ranges"] = self._area_ranges()
        if self.class_names is not None:
            per_class = {t: dict(zip(self.class_names, aps.tolist())) for t, aps in per_class.items()}
        out["ap_per_class"] = per_class
        return out
