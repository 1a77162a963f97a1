"""mIoU, VOC/COCO detection mAP and effective dilation: perfect scores, hand-computed cases, thresholds."""

import math
import re

import numpy as np
import pytest
import torch

from dcnbench.data import SyntheticDataset
from dcnbench.evaluation import (
    PAPER_AREA_THRESHOLDS,
    DetectionEvaluator,
    DilationStats,
    SegmentationMetric,
    area_map_at,
    box_iou_np,
    categorize_areas,
    confusion_matrix,
    dilation_by_object,
    effective_dilation,
    object_area_map,
    record_offsets,
    tercile_area_ranges,
    tercile_thresholds,
    voc_ap,
)
from dcnbench.ops import DeformConv2d

# ---------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------


def test_miou_perfect_is_one():
    ds = SyntheticDataset(6, seed=0)
    metric = SegmentationMetric(7)
    for i in range(len(ds)):
        mask = ds[i][1]["mask"]
        metric.update(mask, mask)
    out = metric.compute()
    assert out["miou"] == 1.0 and out["pixel_acc"] == 1.0


def test_miou_hand_computed_with_ignore():
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 1]])  # the last pixel is ignored
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    metric = SegmentationMetric(3)
    metric.update(pred, target)
    out = metric.compute()
    # IoU: class 0: 2/(3+3-2)=1/2, class 1: 2/(2+3-2)=2/3, class 2: 1/(2+1-1)=1/2.
    torch.testing.assert_close(out["iou"], torch.tensor([0.5, 2 / 3, 0.5], dtype=torch.float64))
    assert out["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert out["pixel_acc"] == pytest.approx(5 / 7)


def test_miou_accumulates_skips_absent_classes_and_takes_logits():
    metric = SegmentationMetric(4)
    metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    metric.update(torch.tensor([1, 1]), torch.tensor([1, 0]))
    out = metric.compute()
    assert math.isnan(out["iou"][3]) and math.isnan(out["iou"][2])
    assert out["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # class 0: 1/(2+1-1), class 1: 2/(2+3-2)
    logits = torch.zeros(1, 4, 1, 2)
    logits[0, 2, 0, 0] = 1.0
    logits[0, 3, 0, 1] = 1.0
    assert confusion_matrix(logits, torch.tensor([[[2, 3]]]), 4).diag().tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([4]), torch.tensor([0]), 4)
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 4)


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True, "21"])
def test_segmentation_metric_needs_at_least_one_class(num_classes):
    """SegmentationMetric(C) counts a C x C confusion matrix: C must be an integer >= 1 (0 was
    accepted, and every update then failed on labels outside 0..-1)."""
    with pytest.raises(ValueError, match=rf"num_classes must be an integer >= 1 .*got {re.escape(repr(num_classes))}"):
        SegmentationMetric(num_classes)
    assert SegmentationMetric(1).cm.shape == (1, 1)


def _pred(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels)}


def _gt(boxes, labels, **extra):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels), **extra}


def test_detection_perfect_predictions_score_one():
    ds = SyntheticDataset(30, seed=2)
    ev = DetectionEvaluator(6, area_ranges="terciles")
    for i in range(len(ds)):
        t = ds[i][1]
        ev.update([_pred(t["boxes"].tolist(), [1.0] * len(t["labels"]), t["labels"].tolist())], [t])
    out = ev.compute()
    for key in ("mAP@0.5", "mAP@0.7", "coco_mAP", "coco_mAP@0.5", "coco_mAP@0.7", "coco_mAP@0.75",
                "coco_mAP_small", "coco_mAP_medium", "coco_mAP_large"):
        assert out[key] == pytest.approx(1.0), key


def test_label_errors_name_predictions_or_targets():
    ev = DetectionEvaluator(2, coco=False)
    gt = _gt([[0, 0, 10, 10]], [1])
    with pytest.raises(ValueError, match=r"predictions\[1\]\['labels'\] must be in 1..2, got 0"):
        ev.update([_pred([], [], []), _pred([[0, 0, 10, 10]], [0.9], [0])], [gt, gt])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must be in 1..2, got 3"):
        ev.update([_pred([], [], [])], [_gt([[0, 0, 10, 10]], [3])])


def test_voc_ap_hand_computed():
    # g1, g2 in one image; detections by score: hit g1, miss, hit g2 -> P = 1, 1/2, 2/3; R = 1/2, 1/2, 1.
    gt = _gt([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])
    dets = _pred([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [1, 1, 1])
    ev = DetectionEvaluator(1, coco=False)
    ev.update([dets], [gt])
    assert ev.compute()["mAP@0.5"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    ev07 = DetectionEvaluator(1, coco=False, use_07_metric=True)
    ev07.update([dets], [gt])
    assert ev07.compute()["mAP@0.5"] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(5 / 6)


def test_duplicates_difficult_and_missing_classes():
    gt = _gt([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2], difficult=torch.tensor([False, True]))
    # class 1: a hit then a duplicate (FP): P = 1, 1/2 at R = 1, 1 -> AP 1; but ranked the other way round:
    dets = _pred([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], [0.5, 0.9, 0.8], [1, 1, 2])
    ev = DetectionEvaluator(3, coco=False)
    ev.update([dets], [gt])
    out = ev.compute()
    aps = out["ap_per_class"]["0.5"]
    assert aps[0] == pytest.approx(1.0)  # the duplicate ranks after the hit
    assert math.isnan(aps[1]) and math.isnan(aps[2])  # only-difficult and absent classes: no AP
    assert out["mAP@0.5"] == pytest.approx(1.0)
    # A false positive ranked first halves the precision at full recall.
    ev.reset()
    ev.update([_pred([[40, 40, 50, 50], [0, 0, 10, 10]], [0.9, 0.5], [1, 1])], [_gt([[0, 0, 10, 10]], [1])])
    assert ev.compute()["mAP@0.5"] == pytest.approx(0.5)


def test_crowd_regions_follow_cocoeval_in_voc_style_ap():
    """VOC-style AP treats COCO crowd boxes as COCOeval does: a detection inside a crowd region
    (intersection over the detection's area >= threshold) counts neither way, and a crowd box
    never takes a detection from an ordinary box it overlaps a little less (both cases scored
    0.5 and 0.0 when crowd boxes were matched by IoU like difficult ones)."""
    crowd = torch.tensor([False, True])
    cases = [
        # a hit, and a higher-scored detection inside the crowd region (IoU with it only 0.005)
        ([[10, 10, 50, 50], [100, 100, 110, 110]], [0.5, 0.9], [[10, 10, 50, 50], [60, 60, 200, 200]]),
        # a detection with IoU 0.907 with its object and 0.911 with a crowd box around it
        ([[0, 0, 105, 105]], [0.9], [[0, 0, 100, 100], [0, 0, 110, 110]]),
    ]
    for det_boxes, scores, gt_boxes in cases:
        ev = DetectionEvaluator(1)
        ev.update([_pred(det_boxes, scores, [1] * len(scores))], [_gt(gt_boxes, [1, 1], iscrowd=crowd)])
        out = ev.compute()
        assert out["mAP@0.5"] == pytest.approx(1.0)
        assert out["coco_mAP@0.5"] == pytest.approx(1.0)
    # Outside every crowd region a detection that matches nothing stays a false positive.
    ev = DetectionEvaluator(1, coco=False)
    ev.update([_pred([[300, 300, 310, 310], [10, 10, 50, 50]], [0.9, 0.5], [1, 1])],
              [_gt([[10, 10, 50, 50], [60, 60, 200, 200]], [1, 1], iscrowd=crowd)])
    assert ev.compute()["mAP@0.5"] == pytest.approx(0.5)


@pytest.mark.parametrize("width,shift,threshold", [(30.0, 10.0, 0.5), (34.0, 6.0, 0.7)])
def test_shifted_box_drops_exactly_at_the_iou_threshold(width, shift, threshold):
    # IoU of a box shifted by d along its width w: (w - d) / (w + d): exactly 0.5 at 30/10, 0.7 at 34/6.
    assert box_iou_np([[shift, 0, width + shift, 10]], [[0, 0, width, 10]])[0, 0] == threshold
    gt = _gt([[0, 0, width, 10]], [1])
    key = f"mAP@{threshold:g}"
    outs = []
    for d, expected in ((shift, 1.0), (shift + 1e-3, 0.0)):
        ev = DetectionEvaluator(1)
        ev.update([_pred([[d, 0, width + d, 10]], [1.0], [1])], [gt])
        outs.append(ev.compute())
        assert outs[-1][key] == pytest.approx(expected)
        assert outs[-1]["coco_" + key] == pytest.approx(expected)
    # COCO averages 10 thresholds: at IoU exactly 0.7 the box passes 0.5..0.7 (5 of 10), just
    # below it 0.5..0.65 (4 of 10).
    if threshold == 0.7:
        assert [out["coco_mAP"] for out in outs] == [pytest.approx(0.5), pytest.approx(0.4)]
        assert all(out["coco_mAP@0.5"] == pytest.approx(1.0) for out in outs)


def test_coco_area_ranges():
    small, large = [0, 0, 10, 10], [0, 0, 120, 120]
    gts = [_gt([small], [1]), _gt([large], [1])]
    preds = [_pred([small], [1.0], [1]), _pred([], [], [])]  # the large object is missed
    ev = DetectionEvaluator(1)
    ev.update(preds, gts)
    out = ev.compute()
    assert out["coco_mAP_small"] == pytest.approx(1.0) and out["coco_mAP_large"] == pytest.approx(0.0)
    assert math.isnan(out["coco_mAP_medium"])
    # Mask areas (not box areas) decide the range when the targets carry them.
    gts[1]["areas"] = torch.tensor([2000.0])
    ev = DetectionEvaluator(1)
    ev.update(preds, gts)
    out = ev.compute()
    assert out["coco_mAP_medium"] == pytest.approx(0.0) and math.isnan(out["coco_mAP_large"])
    assert tercile_area_ranges([1, 2, 3, 4, 5, 6])["medium"] == pytest.approx((8 / 3, 13 / 3))


@pytest.mark.parametrize("area_ranges", ["bogus", {"small": (0, 32**2), "medium": (32**2, 96**2)},
                                         {"small": (0, 1), "medium": (1, 2), "large": (3, 2)},
                                         {"small": (0, 1), "medium": (1, 2), "large": "big"}])
def test_unknown_area_ranges_are_refused_when_the_evaluator_is_made(area_ranges):
    """Not after a whole evaluation's predictions were accumulated (a dict without a size class
    failed with a KeyError inside compute())."""
    with pytest.raises(ValueError, match="area_ranges must be 'coco', 'terciles' or {small, medium, large: "):
        DetectionEvaluator(6, area_ranges=area_ranges)
    DetectionEvaluator(6, area_ranges={"small": [0, 1], "medium": (1, 2), "large": (2, 1e10)})  # lists, as TOML gives



@pytest.mark.parametrize("kwargs,message", [
    ({"num_classes": 0}, "num_classes must be an integer >= 1 \\(the foreground classes C\\), got 0"),
    ({"iou_thresholds": (1.5,)}, r"iou_thresholds must be a non-empty sequence of numbers in \(0, 1\], got \(1.5,\)"),
    ({"iou_thresholds": (0.5, 0.0)}, r"iou_thresholds must be .* in \(0, 1\], got \(0.5, 0.0\)"),
    ({"iou_thresholds": (float("nan"),)}, r"iou_thresholds must be .* got \(nan,\)"),
    ({"iou_thresholds": ()}, r"iou_thresholds must be a non-empty sequence .* got \(\)"),
    ({"iou_thresholds": "0.5"}, r"iou_thresholds must be .* got '0.5'"),
])
def test_detection_evaluator_refuses_a_bad_class_count_or_iou_threshold(kwargs, message):
    """C >= 1 and IoU thresholds in (0, 1]: a threshold of 1.5 matched nothing and reported mAP 0 as
    a result; 0 counted every overlapping detection as a hit."""
    with pytest.raises(ValueError, match=message):
        DetectionEvaluator(**{"num_classes": 3, **kwargs})
    assert DetectionEvaluator(3, iou_thresholds=[1, 0.25]).iou_thresholds == (1.0, 0.25)


def test_boxes_of_another_shape_are_refused_naming_the_entry():
    """Boxes are (M, 4) (or empty): a (1, 3) prediction was numpy's 'cannot reshape array of size 3
    into shape (4)', and a (4, 3) one was silently read as three boxes."""
    ev = DetectionEvaluator(2, coco=False)
    gt = _gt([[0, 0, 10, 10]], [1])
    for shape in [(1, 3), (4, 3), (4,)]:
        bad = {"boxes": torch.zeros(shape), "scores": torch.zeros(1), "labels": torch.ones(1, dtype=torch.long)}
        with pytest.raises(ValueError, match=rf"predictions\[1\]\['boxes'\] must be \(M, 4\) boxes x1, y1, x2, y2, "
                                             rf"got shape {re.escape(str(shape))}"):
            ev.update([_pred([], [], []), bad], [gt, gt])
        with pytest.raises(ValueError, match=rf"targets\[0\]\['boxes'\] must be \(M, 4\) .* got shape {re.escape(str(shape))}"):
            ev.update([_pred([], [], [])], [{**gt, "boxes": torch.zeros(shape)}])
    assert not ev.gts  # nothing of a refused batch was stored
    ev.update([{"boxes": [], "scores": [], "labels": []}], [gt])  # no detections: any empty shape
    assert ev.dets[0]["boxes"].shape == (0, 4)



# ---------------------------------------------------------------------------------------------
# Effective dilation
# ---------------------------------------------------------------------------------------------


def _grid(kh=3, kw=3, d=1):
    ys, xs = torch.meshgrid(torch.arange(kh) * d, torch.arange(kw) * d, indexing="ij")
    return torch.stack([ys, xs], -1).reshape(-1, 2).float()  # (taps, 2) dy, dx


def test_effective_dilation_hand_cases():
    assert torch.equal(effective_dilation(torch.zeros(2, 18, 4, 5), 3), torch.full((2, 4, 5), 3.0))
    # Offsets that scale the grid by s about its corner: sampling positions s * d * (i, j).
    grid = _grid(d=2)
    offset = (grid * 1.5).reshape(1, 18, 1, 1)  # positions 2.5 * grid -> effective dilation 5
    assert effective_dilation(offset, 2).item() == pytest.approx(5.0)
    # A common translation does not change it.
    assert effective_dilation(torch.full((1, 18, 1, 1), 7.0), 2).item() == pytest.approx(2.0)
    # Move the centre tap by (0, 1): its four neighbour distances become 2, 0, sqrt2, sqrt2 (was 1 each).
    offset = torch.zeros(1, 18, 1, 1)
    offset[0, 2 * 4 + 1] = 1.0
    expected = (8 * 1 + 2 + 0 + 2 * math.sqrt(2)) / 12
    assert effective_dilation(offset, 1).item() == pytest.approx(expected)
    # Offset groups average; rectangular kernels count kh(kw-1) + (kh-1)kw pairs.
    two = torch.cat([torch.zeros(1, 18, 1, 1), (_grid() * 1.0).reshape(1, 18, 1, 1)], dim=1)
    assert effective_dilation(two, 1).item() == pytest.approx(1.5)
    assert effective_dilation(torch.zeros(1, 2 * 6, 1, 1), (1, 4), kernel=(2, 3)).item() == pytest.approx((3 * 1 + 4 * 4) / 7)


def test_effective_dilation_needs_a_4d_offset():
    """Offsets are (N, 2*G*kh*kw, H, W): a 3-D one was 'not enough values to unpack'; now a ValueError
    naming offset and its shape."""
    with pytest.raises(ValueError, match=r"offset must be 4-D, got shape \(18, 4, 4\)"):
        effective_dilation(torch.zeros(18, 4, 4), 2)
    with pytest.raises(ValueError, match=r"offset must be 4-D, got shape \(1, 1, 18, 4, 4\)"):
        effective_dilation(torch.zeros(1, 1, 18, 4, 4), 2)
    with pytest.raises(TypeError, match="offset must be a torch.Tensor, got ndarray"):
        effective_dilation(np.zeros((1, 18, 4, 4)), 2)


def test_object_area_map_and_categories():
    amap = object_area_map(torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 4.0, 6.0]]), (10, 10))
    assert amap[0, 0] == 64 and amap[3, 3] == 8 and amap[9, 9] == 0  # smallest covering box wins
    cats = categorize_areas(torch.tensor([0.0, 5.0, 96.0**2, 224.0**2 + 1]), PAPER_AREA_THRESHOLDS)
    assert cats.tolist() == [3, 0, 1, 2]
    assert tercile_thresholds([10, 20, 30, 40, 50, 60, 70, 80, 90]) == pytest.approx((36.6666667, 63.333333))


def test_area_map_is_sampled_at_the_receptive_field_centres():
    """Cell (r, c) of a stride-4 map reads pixel (4r, 4c) (clamped to the image), not the middle of
    its 4x4 footprint: an object covering pixels 4..5 is under cell 1's filter centre only."""
    big = torch.zeros(32, 30)
    big[4:6, 4:6] = 5.0
    small = area_map_at(big, (8, 8), stride=4)
    assert small[1, 1] == 5 and small.sum() == 5
    big[31, 29] = 7.0  # the last cell's centre (28, 28) is inside; a 9th row/column clamps to the border
    assert area_map_at(big, (9, 9), stride=4)[8, 8] == 7
    with pytest.raises(ValueError, match="stride"):
        area_map_at(big, (8, 8), stride=0)


def test_filter_centre_of_a_resnet_output_cell_is_stride_times_its_index():
    """The model fact area_map_at relies on: in the stride-16 backbone, output cell i depends on the
    input pixels symmetric about pixel 16 i. Made linear (ReLU -> identity, max -> average pooling of
    the same geometry, positive weights) so that the gradient's support is the whole receptive field."""
    from torch import nn

    from dcnbench.models.backbone import ResNetBackbone

    net = ResNetBackbone(blocks=(1, 1, 1, 1), width=8, out_channels=16).double().eval()
    for name, module in list(net.named_modules()):
        parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
        if isinstance(module, nn.ReLU):
            setattr(parent, name.rpartition(".")[2], nn.Identity())
        elif isinstance(module, nn.MaxPool2d):
            setattr(parent, name.rpartition(".")[2], nn.AvgPool2d(3, 2, 1))
        elif isinstance(module, nn.Conv2d):
            module.weight.data.abs_().add_(0.01)
    image = torch.ones(1, 3, 512, 512, dtype=torch.float64, requires_grad=True)
    out = net(image)[1]
    assert out.shape[-2:] == (32, 32)
    out[0, :, 16, 17].sum().backward()
    rows, cols = torch.nonzero(image.grad[0].sum(0), as_tuple=True)
    assert rows.min() > 0 and cols.max() < 511  # the receptive field is not clipped by the border
    assert (rows.min() + rows.max()) / 2 == 16 * 16 and (cols.min() + cols.max()) / 2 == 16 * 17


def test_dilation_by_object_and_stats_table():
    eff = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # (1, 1, 4): four cells
    area = torch.tensor([[[10.0, 50.0, 90.0, 0.0]]])
    df = dilation_by_object(eff, area, thresholds=(20.0, 60.0), stride=1)
    assert df.loc["small", "mean"] == 1 and df.loc["medium", "mean"] == 2
    assert df.loc["large", "mean"] == 3 and df.loc["background", "mean"] == 4
    assert df["count"].tolist() == [1, 1, 1, 1]
    stats = DilationStats()
    stats.update("res5a", eff, area, object_areas=[10.0, 50.0, 90.0], stride=1)
    stats.update("res5a", eff + 2, area, object_areas=[10.0, 50.0, 90.0], stride=1)
    long = stats.summary()
    row = long[(long.layer == "res5a") & (long.category == "small")].iloc[0]
    assert row["mean"] == 2.0 and row["std"] == 1.0 and row["count"] == 2
    table = stats.table()
    assert table.loc["res5a", "background"] == "5.0 ± 1.0"


def test_table2_buckets_are_terciles_or_the_papers_sizes_and_the_paper_tier_uses_the_papers():
    """The same cells fall in other buckets at the paper's 96² / 224² px than at the objects'
    terciles; the paper tier's Table 2 runs ask for the paper's (the caption's split)."""
    from dcnbench.runner.experiment import expand_cells, load_experiment
    from dcnbench.runner.dilation import dilation_metrics

    eff = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    area = torch.tensor([[[50.0**2, 150.0**2, 300.0**2, 0.0]]])
    stats = DilationStats()
    stats.update("res5a", eff, area, object_areas=[10.0, 20.0, 30.0], stride=1)  # terciles far below the areas
    paper, terciles = dilation_metrics(stats, "paper"), dilation_metrics(stats, "terciles")
    assert [paper[f"effdil_res5a_{c}_mean"] for c in ("small", "medium", "large")] == [1.0, 2.0, 3.0]
    assert terciles["effdil_res5a_large_mean"] == 2.0  # all three cells are above the upper tercile
    with pytest.raises(ValueError, match="dilation_buckets"):
        dilation_metrics(stats, "thirds")
    (cell,) = expand_cells(load_experiment(2), "paper", ["rfcn"])
    assert cell.config["eval"]["dilation_buckets"] == "paper"


def test_record_offsets_from_deformable_layers():
    layer = DeformConv2d(3, 4, 3, padding=2, dilation=2)
    torch.nn.init.normal_(layer.offset_conv.weight, std=0.1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), layer)
    x = torch.randn(2, 3, 9, 9)
    with record_offsets(model) as rec:
        model(x)
    assert list(rec) == ["1"]
    offset, dilation, kernel = rec["1"]
    torch.testing.assert_close(offset, layer.offsets(model[0](x))[0])
    eff = effective_dilation(offset, dilation, kernel)
    assert eff.shape == (2, 9, 9) and not torch.allclose(eff, torch.full_like(eff, 2.0))
    model(x)  # hooks are gone after the block
    assert len(layer._forward_pre_hooks) == 0


def test_object_area_map_refuses_boxes_that_are_not_m_by_4():
    """A (4, 3) boxes tensor was read as three boxes (reshape(-1, 4)), as the evaluator did before it
    checked; the same check now names the argument. No boxes (empty) is an empty map."""
    from dcnbench.evaluation.dilation import object_area_map

    with pytest.raises(ValueError, match=r"boxes must be \(M, 4\) boxes x1, y1, x2, y2, got shape \(4, 3\)"):
        object_area_map(torch.zeros(4, 3), (8, 8))
    assert object_area_map(torch.zeros(0, 4), (4, 4)).sum() == 0
