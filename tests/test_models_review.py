"""Review of the networks: RPN matching with cross-boundary anchors, fixed-proposal checks, empty RoI
batches, box precision under autocast, config checks, and loading a torchvision ResNet-101."""

import pickle
import re

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from dcnbench.models import build_model, load_backbone_weights
from dcnbench.models.build import TASK_KEYS
from dcnbench.models.common import grid_anchors
from dcnbench.models.rpn import RPN
from dcnbench.ops import DeformConv2d

TINY = {"backbone": "scaled", "blocks": [1, 1, 1, 3], "width": 8, "num_classes": 3,
        "anchor_sizes": [16, 32], "rpn_post_nms_top_n": [64, 32], "roi_batch_size": 32, "rpn_batch_size": 64}


def tiny(task, **kw):
    """The tiny network of ``task``, with the settings of TINY and ``kw`` that it uses (build_model
    refuses the RPN's and the detection heads' settings for a task without that part)."""
    cfg = {**TINY, **kw}
    return build_model({k: v for k, v in cfg.items() if task in TASK_KEYS.get(k, (task,))} | {"task": task})


def one_box():
    return {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2])}


def no_boxes():
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}


def test_rpn_ignoring_cross_boundary_anchors_still_gives_each_box_its_best_inside_anchor():
    """py-faster-rcnn matches only the anchors inside the image: a box whose best anchor crosses the
    border gets its best inside anchor as positive (here IoU 0.55 < 0.7, so only the best-match rule
    gives it one). Matching all anchors and then ignoring the crossing ones left it no positive."""
    rpn = RPN(4, 16, anchor_sizes=(16, 32), aspect_ratios=(0.5, 1.0, 2.0), ignore_cross_boundary=True)
    feature = torch.randn(1, 4, 4, 4)
    anchors = rpn.anchors(feature)
    gt = one_box()["boxes"]
    inside = (anchors[:, :2] >= 0).all(1) & (anchors[:, 2:] <= 64).all(1)
    iou = box_iou(gt, anchors)[0]
    assert not inside[iou.argmax()] and iou[inside].max() < 0.7  # the premise of the case
    logits, deltas = rpn.head(feature)
    losses = rpn.loss(logits, deltas, anchors, [one_box()], [(64, 64)])
    assert losses["loss_rpn_box"].item() > 0  # a positive anchor was sampled


def test_fixed_proposals_are_checked_against_the_batch():
    model = tiny("rfcn").eval()
    images = torch.randn(2, 3, 64, 64)
    box = torch.tensor([[0.0, 0.0, 30.0, 30.0]])
    with pytest.raises(ValueError, match="got 1 proposal sets for a batch of 2 images"):
        model(images, proposals=[box])
    with pytest.raises(ValueError, match=r"proposals must be a list of \(P, 4\) boxes, one per image, got torch.float32"
                                         r" of shape \(1, 5\)"):
        model(images, proposals=torch.tensor([[0, 0.0, 0.0, 30.0, 30.0]]))
    with pytest.raises(ValueError, match=r"proposals\[1\] must be a floating-point \(P, 4\) tensor .* torch.int64"):
        model(images, proposals=[box, box.long()])


@pytest.mark.parametrize("task", ["faster_rcnn", "rfcn"])
def test_a_batch_without_any_roi_trains_with_zero_head_loss(task):
    """No proposals and no ground truth: nothing to sample; the head losses are 0 (not a crash, not NaN)."""
    model = tiny(task).train()
    losses = model(torch.randn(2, 3, 64, 64), [no_boxes(), no_boxes()], proposals=[torch.zeros(0, 4)] * 2)
    assert losses["loss_cls"].item() == 0 and losses["loss_box"].item() == 0
    sum(losses.values()).backward()


@pytest.mark.parametrize("task", ["rpn", "faster_rcnn", "rfcn"])
def test_boxes_keep_float32_precision_under_bfloat16_autocast(task):
    """Under autocast the features are bfloat16 (a step of 4 px at 600 px); anchors, proposals and
    detections are computed in float32 all the same."""
    torch.manual_seed(0)
    model = tiny(task, anchor_sizes=[128, 256]).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw = model.forward_raw(torch.randn(1, 3, 400, 608))
        detections = model.postprocess(raw)
    if task == "rpn":
        exact = grid_anchors((128, 256), (0.5, 1.0, 2.0), (25, 38), 16)
        assert raw["anchors"].dtype == torch.float32 and torch.equal(raw["anchors"], exact)
    else:
        assert all(p.dtype == torch.float32 for p in raw["proposals"])
    assert all(d["boxes"].dtype == d["scores"].dtype == torch.float32 for d in detections)


@pytest.mark.parametrize("key,value,message", [
    ("num_classes", 0, "a positive integer"),
    ("num_classes", 2.5, "a positive integer"),
    ("rpn_post_nms_top_n", 300, r"a \(train, test\) pair of positive integers"),
    ("aspect_ratios", [0.0, 1.0], "a non-empty list of positive numbers"),
    ("anchor_sizes", [], "a non-empty list of positive numbers"),
    ("feature_channels", -1, "an integer >= 0"),
    ("pool_size", 0, "a positive integer"),
    ("nms_thresh", 3, r"a number in \[0, 1\]"),
    ("placement", None, "a Table 1 row name or a list of block names"),
    ("freeze_at", -1, "an integer >= 0"),
])
def test_build_model_names_a_bad_config_value(key, value, message):
    with pytest.raises(ValueError, match=rf"config '{key}' must be {message}, got {re.escape(repr(value))}"):
        tiny("rfcn", **{key: value})


def _randomized_torchvision_resnet101():
    """torchvision's ResNet-101 with random BatchNorm statistics and affines (so a mis-mapped BN
    tensor would show), in eval mode."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet101(weights=None).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.2, 0.6)
            m.bias.data.uniform_(-0.1, 0.1)
    return net


def test_load_backbone_weights_from_a_torchvision_resnet101(tmp_path):
    """Every tensor of a torchvision ResNet-101 state dict (fc excluded) lands in the backbone,
    deformable blocks included; conv4 then equals torchvision's layer3 output (zero offsets)."""
    tv = _randomized_torchvision_resnet101()
    path = tmp_path / "resnet101.pth"
    torch.save(tv.state_dict(), path)
    model = build_model({"task": "rfcn", "placement": "res5+res4b20-22", "deformable_roi_pool": True,
                         "num_classes": 20}).eval()
    reduce_before = model.backbone.reduce[0].weight.clone()
    load_backbone_weights(model, str(path))
    own = model.backbone.state_dict()
    loaded = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.") and "num_batches" not in k}
    assert all(torch.equal(own[k], v) for k, v in loaded.items())
    deform = [m for m in model.backbone.modules() if isinstance(m, DeformConv2d)]
    assert len(deform) == 6 and not any(m.offset_conv.weight.any() for m in deform)
    assert torch.equal(model.backbone.reduce[0].weight, reduce_before)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        c4, _ = model.backbone(x)
        ref = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
    torch.testing.assert_close(c4, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_load_backbone_weights_names_a_file_it_cannot_read(tmp_path):
    model = tiny("deeplab")
    for name, write in [("notes.pth", lambda f: f.write_text("not a checkpoint")),
                        ("empty.pth", lambda f: f.write_bytes(b"")),
                        ("module.pth", lambda f: torch.save(nn.Linear(2, 2), f))]:
        path = tmp_path / name
        write(path)
        with pytest.raises(ValueError, match=f"{path}: not a weights-only PyTorch checkpoint: torch.load"):
            load_backbone_weights(model, str(path))
    with pytest.raises(ValueError, match="a whole model\\? save its state_dict\\(\\) instead") as err:
        load_backbone_weights(model, str(tmp_path / "module.pth"))
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    # A missing file (or a directory) is a ValueError naming the path too, as the README says (it was
    # the bare FileNotFoundError that the callers' `except (ValueError, TypeError)` let through).
    for path, reason in [(tmp_path / "missing.pth", "No such file or directory"), (tmp_path, "Is a directory")]:
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: cannot read the weights file \({reason}\)") as err:
            load_backbone_weights(model, str(path))
        assert isinstance(err.value.__cause__, OSError)
    int_keys = tmp_path / "int_keys.pth"
    torch.save({0: torch.zeros(1)}, int_keys)
    with pytest.raises(TypeError, match=f"{int_keys}: expected a state dict .* keys are not strings: \\[0\\]"):
        load_backbone_weights(model, str(int_keys))


def test_the_runner_trains_the_roi_offset_fc_at_one_hundredth_of_the_lr(monkeypatch):
    """Paper 2.3: the deformable RoI pooling offset fc learns at 0.01 x the base lr, the offset convs
    at 1 x, at every step of the runner's schedule (warmup, then the step down)."""
    import io

    from dcnbench.data import SynthConfig, SyntheticDataset
    from dcnbench.data.transforms import paper_transforms
    from dcnbench.runner import train as runner

    steps = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            steps.append([(g["lr"], {id(p) for p in g["params"]}) for g in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(runner.torch.optim, "SGD", RecordingSGD)
    model = tiny("faster_rcnn", placement="res5b-c", deformable_roi_pool=True)
    data = SyntheticDataset(2, SynthConfig(size=64, num_classes=3, min_size=8, max_size=40), 0,
                            paper_transforms("detection", train=True, shorter_side=0))
    runner.train(model, "faster_rcnn", data, {"iters": 3, "batch_size": 2, "lr": 0.02, "warmup_iters": 1}, 0,
                 io.StringIO())
    fc, conv = model.roi_pool.offset_fc.weight, model.backbone.layer4[1].conv2.offset_conv.weight
    base = model.backbone.conv1.weight
    assert len(steps) == 3
    for groups in steps:
        lr_of = {name: next(lr for lr, ids in groups if id(p) in ids) for name, p in
                 [("fc", fc), ("conv", conv), ("base", base)]}
        assert lr_of["fc"] == pytest.approx(0.01 * lr_of["base"]) and lr_of["conv"] == lr_of["base"]
    assert steps[0][0][0] < steps[1][0][0] and steps[2][0][0] == pytest.approx(0.002)  # warmup; x0.1 at 2/3


def test_a_box_no_inside_anchor_overlaps_gets_no_positive_and_makes_no_false_ones():
    """Low-quality matching takes each ground truth's best-IoU boxes, ties included; a box that no
    candidate overlaps (best IoU 0) would make every zero-IoU candidate positive. It is left out."""
    from torchvision.models.detection._utils import Matcher

    from dcnbench.models.common import match

    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    anchors = torch.tensor([[-8.0, -8.0, 24.0, 24.0], [8.0, 8.0, 40.0, 40.0], [40.0, 40.0, 72.0, 72.0]])
    gt = torch.tensor([[0.0, 0.0, 4.0, 4.0], [40.0, 40.0, 70.0, 70.0]])
    inside = torch.tensor([False, True, True])
    idx, labels = match(matcher, gt, torch.tensor([3, 5]), anchors, inside)
    assert idx.tolist() == [Matcher.BELOW_LOW_THRESHOLD, Matcher.BELOW_LOW_THRESHOLD, 1]
    assert labels.tolist() == [0, 0, 5]
    idx, _ = match(matcher, gt[:1], torch.tensor([3]), anchors, inside)  # no ground truth reachable
    assert (idx == Matcher.BELOW_LOW_THRESHOLD).all()
