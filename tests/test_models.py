"""The paper's networks: output shapes, deformable placement, zero-offset twins, weights, param counts."""

import re

import pytest
import torch
from torch import nn

from dcnbench.models import (
    PLACEMENTS, ResNetBackbone, build_model, count_parameters, deformable_layers, load_backbone_weights,
)
from dcnbench.models.backbone import DEPTHS
from dcnbench.models.build import TASK_KEYS
from dcnbench.models.rpn import RPN
from dcnbench.ops import DeformConv2d, DeformPSRoIPool, DeformRoIPool, use_backend

TINY = {"backbone": "scaled", "blocks": [1, 1, 1, 3], "width": 8, "num_classes": 3,
        "anchor_sizes": [16, 32], "rpn_post_nms_top_n": [64, 32], "roi_batch_size": 32, "rpn_batch_size": 64}
SIZE = 64
TASKS = ["deeplab", "rpn", "faster_rcnn", "rfcn"]


def tiny(task, **kw):
    """The tiny network of ``task``, with the settings of TINY and ``kw`` that it uses (build_model
    refuses the RPN's and the detection heads' settings for a task without that part)."""
    cfg = {**TINY, **kw}
    return build_model({k: v for k, v in cfg.items() if task in TASK_KEYS.get(k, (task,))} | {"task": task})


def targets(n=2):
    return [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 28.0, 60.0, 58.0]]),
             "labels": torch.tensor([1, 3])} for _ in range(n)]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("placement", ["none", "res5a-c"])
def test_eval_output_shapes(task, placement):
    model = tiny(task, placement=placement, deformable_roi_pool=placement != "none").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, SIZE, SIZE + 16))
    if task == "deeplab":
        assert out.shape == (2, 4, SIZE, SIZE + 16)
        return
    assert len(out) == 2
    for det in out:
        d = det["boxes"].shape[0]
        assert det["boxes"].shape == (d, 4) and det["scores"].shape == (d,) and det["labels"].shape == (d,)
        assert d <= 100
        if d:
            assert det["labels"].min() >= 1 and det["labels"].max() <= 3
            assert (det["boxes"][:, 2] <= SIZE + 16).all() and (det["boxes"][:, 3] <= SIZE).all()


@pytest.mark.parametrize("task", TASKS)
def test_training_losses_are_finite_and_reach_offsets(task):
    model = tiny(task, placement="res5a-c", deformable_roi_pool=True).train()
    images = torch.randn(2, 3, SIZE, SIZE)
    with use_backend("reference"):
        if task == "deeplab":
            mask = torch.randint(0, 4, (2, SIZE, SIZE))
            mask[:, :4] = 255
            losses = {"loss": model.loss(model(images), mask)}
        else:
            losses = model(images, targets())
        expected = {"deeplab": {"loss"}, "rpn": {"loss_rpn_cls", "loss_rpn_box"},
                    "faster_rcnn": {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}}
        assert set(losses) == expected.get(task, expected["faster_rcnn"])
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
    grads = [m.offset_conv.weight.grad for m in model.modules() if isinstance(m, DeformConv2d)]
    assert len(grads) == 3 and all(g is not None for g in grads)


@pytest.mark.parametrize("freeze_at,fixed", [(0, []), (1, ["conv1"]), (2, ["conv1", "layer1"])])
def test_freeze_at_fixes_exactly_the_stem_and_the_stages_before_it(freeze_at, fixed):
    """freeze_at=2 (paper tier, the released code's FIXED_PARAMS) fixes conv1 and res2 and nothing
    else: a training step gives them no gradient and the optimizer never sees them, while res3-res5,
    the offsets and the head train."""
    from dcnbench.ops import offset_param_groups

    model = tiny("deeplab", placement="res5a-c", frozen_bn=True, freeze_at=freeze_at).train()
    with use_backend("reference"):
        model.loss(model(torch.randn(2, 3, SIZE, SIZE)), torch.randint(0, 4, (2, SIZE, SIZE))).backward()
    optimized = {id(p) for g in offset_param_groups(model, lr=1.0) for p in g["params"]}
    for name, param in model.named_parameters():
        is_fixed = name.split(".")[1] in fixed
        assert param.requires_grad != is_fixed and (param.grad is None) == is_fixed, name
        assert (id(param) in optimized) != is_fixed, name


def test_freeze_at_beyond_res5_or_with_trained_batchnorm_is_refused():
    with pytest.raises(ValueError, match=r"freeze_at must be in 0..5 \(stem, res2, ..., res5\), got 6"):
        ResNetBackbone(blocks=(1, 1, 1, 1), width=8, freeze_at=6)
    with pytest.raises(ValueError, match=r"freeze_at=2 needs frozen_bn=True"):
        ResNetBackbone(blocks=(1, 1, 1, 1), width=8, frozen_bn=False, freeze_at=2)


@pytest.mark.parametrize("freeze_at,placement,blocks", [(5, "res5c", "['res5c']"),
                                                         (4, "res5+res4b20-22", "['res4b20', 'res4b21', 'res4b22']")])
def test_freeze_at_refuses_to_fix_a_deformable_block(freeze_at, placement, blocks):
    """A deformable block in a fixed stage would keep its zero offsets forever: a plain conv in disguise."""
    with pytest.raises(ValueError, match=rf"freeze_at={freeze_at} fixes the stages of the deformable blocks "
                                         rf"{re.escape(blocks)}"):
        ResNetBackbone(blocks=DEPTHS[101], width=8, placement=placement, freeze_at=freeze_at)
    ResNetBackbone(blocks=(1, 1, 1, 3), width=8, placement="res5a-c", freeze_at=4)  # res5 trains: fine


@pytest.mark.parametrize("stride,size", [(16, (40, 60)), (16, (33, 49)), (8, (17, 30)), (16, (1, 1))])
def test_deeplab_upsampling_puts_each_cell_on_its_receptive_field_centre(stride, size):
    """Cell (i, j) of the score map is the logit at pixel (stride*i, stride*j), where the backbone
    centres its filter (test_metrics: the centre of output cell i is pixel 16 i); pixels between
    cells interpolate bilinearly, pixels past the last cell take its value."""
    from dcnbench.models.deeplab import upsample_cells

    h, w = (-(-n // stride) for n in size)  # the backbone's map: ceil(size / stride) cells
    scores = torch.randn(2, 3, h, w, dtype=torch.float64)
    up = upsample_cells(scores, size, stride)
    assert up.shape == (2, 3, *size)
    cells = up[..., ::stride, ::stride]
    assert torch.equal(cells, scores[..., :cells.shape[-2], :cells.shape[-1]])
    if h > 1 and w > 1 and size[0] > stride // 2 and size[1] > stride // 2:
        midway = up[..., stride // 2, stride // 2]
        assert torch.allclose(midway, scores[..., :2, :2].mean((-2, -1)))
    past_rows, past_cols = up[..., (h - 1) * stride + 1:, ::stride], up[..., ::stride, (w - 1) * stride + 1:]
    assert torch.equal(past_rows, scores[..., -1:, :].expand_as(past_rows))
    assert torch.equal(past_cols, scores[..., :, -1:].expand_as(past_cols))


@pytest.mark.parametrize("output_stride", [16, 8])
def test_deeplab_output_at_a_cell_centre_is_its_score(output_stride):
    """The model's logits at pixel (s*i, s*j) are exactly the 1x1 score conv's output at cell (i, j)."""
    model = tiny("deeplab", placement="none", output_stride=output_stride).eval()
    images = torch.randn(1, 3, SIZE, SIZE + 16)
    with torch.no_grad():
        scores = model.score(model.backbone(images)[1])
        logits = model(images)
    s = output_stride
    assert torch.allclose(logits[..., ::s, ::s], scores[..., :-(-SIZE // s), :-(-(SIZE + 16) // s)], atol=1e-6)


def test_deeplab_loss_ignores_255():
    model = tiny("deeplab", placement="none")
    logits = torch.randn(1, 4, 8, 8)
    mask = torch.full((1, 8, 8), 255)
    mask[0, 0, 0] = 2
    expected = nn.functional.cross_entropy(logits[:, :, 0, 0], torch.tensor([2]))
    torch.testing.assert_close(model.loss(logits, mask), expected)


RESNET101_BLOCKS = {
    "none": [],
    "res5c": ["layer4.2"],
    "res5b-c": ["layer4.1", "layer4.2"],
    "res5a-c": ["layer4.0", "layer4.1", "layer4.2"],
    "res5+res4b20-22": ["layer3.20", "layer3.21", "layer3.22", "layer4.0", "layer4.1", "layer4.2"],
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_placement_touches_exactly_the_named_resnet101_layers(placement):
    # ResNet-101's depth (res4 has res4a, res4b1 ... res4b22) at a narrow width, so it builds fast.
    net = ResNetBackbone(DEPTHS[101], width=4, placement=placement, out_channels=8, dilation=2)
    assert deformable_layers(net) == [f"{b}.conv2" for b in RESNET101_BLOCKS[placement]]
    assert net.deformable_blocks == {
        "none": [], "res5c": ["res5c"], "res5b-c": ["res5b", "res5c"], "res5a-c": ["res5a", "res5b", "res5c"],
        "res5+res4b20-22": ["res4b20", "res4b21", "res4b22", "res5a", "res5b", "res5c"],
    }[placement]
    # Only 3x3 convs are replaced: every other conv is still an nn.Conv2d.
    deform = {n for n, m in net.named_modules() if isinstance(m, DeformConv2d)}
    convs3 = {n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, DeformConv2d)) and m.kernel_size == (3, 3)}
    assert deform <= convs3


@pytest.mark.parametrize("dilation", [2, 4, 6, 8])
def test_res5_stride_one_dilation_and_offset_convs(dilation):
    net = ResNetBackbone((1, 1, 1, 3), width=4, placement="res5b-c", dilation=dilation, offset_groups=2, out_channels=0)
    for i, block in enumerate(net.layer4):
        conv = block.conv2
        assert conv.stride == (1, 1) and conv.dilation == (dilation, dilation) and conv.padding == (dilation, dilation)
        if i == 0:
            assert type(conv) is nn.Conv2d
        else:
            off = conv.offset_conv
            assert isinstance(conv, DeformConv2d) and conv.offset_groups == 2
            assert off.kernel_size == (3, 3) and off.dilation == (dilation, dilation) and off.padding == (dilation, dilation)
            assert off.out_channels == 2 * 2 * 9 and not off.weight.any() and not off.bias.any()
    assert net.layer3[0].conv2.dilation == (1, 1)
    c4, c5 = net(torch.randn(1, 3, 64, 96))
    assert c4.shape[-2:] == c5.shape[-2:] == (4, 6)  # output stride 16


def test_output_stride_8():
    net = ResNetBackbone((1, 1, 1, 2), width=4, output_stride=8, out_channels=12)
    c4, f = net(torch.randn(1, 3, 64, 64))
    assert c4.shape == (1, 64, 8, 8) and f.shape == (1, 12, 8, 8)
    assert net.layer3[0].conv2.dilation == (2, 2)


def test_placement_errors():
    with pytest.raises(ValueError, match="res4"):
        ResNetBackbone((1, 1, 2, 3), width=4, placement="res5+res4b20-22")
    with pytest.raises(ValueError, match="placement must be one of"):
        ResNetBackbone((1, 1, 2, 3), width=4, placement="res5")
    net = ResNetBackbone((1, 1, 2, 3), width=4, placement=["res4b", "res5a"])
    assert deformable_layers(net) == ["layer3.1.conv2", "layer4.0.conv2"]


@pytest.mark.parametrize("task", TASKS)
def test_zero_offset_deformable_equals_plain_twin(task):
    torch.manual_seed(0)
    plain = tiny(task, placement="none").eval()
    deform = tiny(task, placement="res5a-c", deformable_roi_pool=True).eval()
    missing, unexpected = deform.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("offset" in k for k in missing)
    kinds = (DeformRoIPool,) if task == "faster_rcnn" else (DeformPSRoIPool,) if task == "rfcn" else ()
    assert all(any(isinstance(m, k) for m in deform.modules()) for k in kinds)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = plain.forward_raw(x), deform.forward_raw(x)
    if task == "deeplab":
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        return
    for key in ("logits", "deltas", "class_logits", "box_regression"):
        if key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    if "proposals" in a:
        for pa, pb in zip(a["proposals"], b["proposals"]):
            torch.testing.assert_close(pb, pa)


def _torchvision_resnet50_state(tmp_path, extra=None, drop=None):
    import torchvision

    state = torchvision.models.resnet50(weights=None).state_dict()  # ImageNet key names, fc included
    state.update(extra or {})
    for k in drop or []:
        del state[k]
    path = tmp_path / "r50.pth"
    torch.save(state, path)
    return path, state


def test_load_backbone_weights_from_torchvision_keys(tmp_path):
    path, state = _torchvision_resnet50_state(tmp_path)
    model = build_model({"task": "rfcn", "backbone": "resnet50", "placement": "res5a-c", "num_classes": 2,
                         "deformable_roi_pool": True})
    load_backbone_weights(model, str(path))
    own = model.backbone.state_dict()
    torch.testing.assert_close(own["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])  # deformable conv
    torch.testing.assert_close(own["layer1.0.bn1.running_var"], state["layer1.0.bn1.running_var"])
    torch.testing.assert_close(own["conv1.weight"], state["conv1.weight"])
    assert not own["layer4.1.conv2.offset_conv.weight"].any()


def test_load_backbone_weights_strict_key_check(tmp_path):
    model = build_model({"task": "deeplab", "backbone": "resnet50", "placement": "none"})
    path, _ = _torchvision_resnet50_state(tmp_path, drop=["layer2.0.conv1.weight"], extra={"head.extra": torch.zeros(1)})
    with pytest.raises(ValueError) as err:
        load_backbone_weights(model, str(path))
    message = str(err.value)
    assert message.startswith(str(path)) and "\n  missing (1): ['layer2.0.conv1.weight']" in message
    assert "\n  unexpected (1): ['head.extra']" in message
    with pytest.raises(ValueError, match="missing"):
        load_backbone_weights(tiny("deeplab"), str(path))


def test_load_backbone_weights_rejects_a_file_without_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(TypeError, match=f"{path}: expected a state dict .* holds a Tensor"):
        load_backbone_weights(tiny("deeplab"), str(path))


# Reconciled with the paper in README "Reproduction notes — Table 4"; VOC, 20 classes + background.
PINNED = {
    ("deeplab", "none"): 44_619_861,
    ("deeplab", "res5a-c"): 44_868_747,
    ("rpn", "none"): 49_432_865,
    ("rpn", "res5a-c"): 49_681_751,
    ("faster_rcnn", "none"): 61_774_815,
    ("faster_rcnn", "res5a-c"): 63_253_111,
    ("rfcn", "none"): 50_600_767,
    ("rfcn", "res5a-c"): 53_059_553,
}


@pytest.mark.parametrize("task,placement", list(PINNED))
def test_table4_parameter_counts_are_pinned(task, placement):
    with torch.device("meta"):
        roi_pool = {"deformable_roi_pool": placement != "none"} if task in ("faster_rcnn", "rfcn") else {}
        model = build_model({"task": task, "placement": placement, "num_classes": 20, **roi_pool})
    assert count_parameters(model) == PINNED[task, placement]


def test_parameter_count_parts():
    with torch.device("meta"):
        plain = build_model({"task": "deeplab", "placement": "none"})
        deform = build_model({"task": "deeplab", "placement": "res5a-c"})
        deform4 = build_model({"task": "deeplab", "placement": "res5a-c", "offset_groups": 4})
    # torchvision's ResNet-101 without its fc, + the 1x1 conv to 1024, + the 1x1 score conv.
    assert count_parameters(plain.backbone) - sum(p.numel() for p in plain.backbone.reduce.parameters()) == 42_500_160
    # Three 3x3 offset convs on 512 channels: 2*9 outputs (18*512*9 + 18 each), 72 with 4 groups.
    assert count_parameters(deform) - count_parameters(plain) == 3 * (18 * 512 * 9 + 18)
    assert count_parameters(deform4) - count_parameters(plain) == 3 * (72 * 512 * 9 + 72)


def test_build_model_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown config keys"):
        build_model({"task": "deeplab", "placment": "none"})
    with pytest.raises(ValueError, match="task must be"):
        build_model({"task": "segment"})


@pytest.mark.parametrize("task,key,value,users", [
    ("rpn", "deformable_roi_pool", True, ["faster_rcnn", "rfcn"]),
    ("deeplab", "deformable_roi_pool", True, ["faster_rcnn", "rfcn"]),
    ("deeplab", "rpn_pre_nms_top_n", [100, 50], ["faster_rcnn", "rfcn", "proposals"]),
    # the class-aware RPN makes no proposals
    ("rpn", "rpn_post_nms_top_n", [100, 50], ["faster_rcnn", "rfcn", "proposals"]),
    ("deeplab", "anchor_sizes", [16, 32], ["rpn", "faster_rcnn", "rfcn", "proposals"]),
    ("deeplab", "score_thresh", 0.1, ["rpn", "faster_rcnn", "rfcn"]),
    ("proposals", "score_thresh", 0.1, ["rpn", "faster_rcnn", "rfcn"]),  # the proposal network detects nothing
    ("rpn", "roi_batch_size", 32, ["faster_rcnn", "rfcn"]),
    ("rfcn", "fc_channels", 64, ["faster_rcnn"]),
])
def test_build_model_refuses_a_key_the_task_does_not_use(task, key, value, users):
    """A setting of a part the task's network lacks (the RoI head's, the RPN's) is a ValueError naming
    the key and the tasks that use it: it built the same network as without it, silently."""
    cfg = {"task": task, "backbone": "scaled", "blocks": [1, 1, 1, 3], "width": 8, "num_classes": 3}
    build_model(cfg)
    with pytest.raises(ValueError, match=rf"config '{key}' is used by the tasks {re.escape(str(users))} only, "
                                         rf"not by '{task}' \(it would be ignored\), got {key}={re.escape(repr(value))}"):
        build_model({**cfg, key: value})
    for user in users:  # the tasks that use it take it
        build_model({**cfg, "task": user, key: value})


def test_offset_param_groups_follow_the_paper_learning_rates():
    from dcnbench.ops import offset_param_groups

    model = tiny("faster_rcnn", placement="res5b-c", deformable_roi_pool=True)
    groups = offset_param_groups(model, lr=1.0)
    by_lr = {}
    for g in groups:
        by_lr[g["lr"]] = by_lr.get(g["lr"], 0) + sum(p.numel() for p in g["params"])
    roi_fc = model.roi_pool.offset_fc
    convs = [b.conv2.offset_conv for b in model.backbone.layer4[1:]]
    assert by_lr[0.01] == roi_fc.weight.numel() + roi_fc.bias.numel()
    assert by_lr[1.0] == count_parameters(model) - by_lr[0.01]
    assert all(any(p is c.weight for g in groups if g["lr"] == 1.0 for p in g["params"]) for c in convs)


@pytest.mark.parametrize("ignore", [True, False])
def test_rpn_cross_boundary_anchors_are_trained_only_when_not_ignored(ignore):
    """One anchor shape (181x90) that crosses a 64 px image at every position: Faster R-CNN's rule
    leaves it out of the loss (nothing sampled, zero loss); sampling all anchors trains it."""
    rpn = RPN(4, 8, anchor_sizes=(128,), aspect_ratios=(0.5,), ignore_cross_boundary=ignore)
    feature = torch.randn(1, 4, 8, 8)
    logits, deltas = rpn.head(feature)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    losses = rpn.loss(logits, deltas, rpn.anchors(feature), targets, [(64, 64)])
    assert (losses["loss_rpn_cls"].item() == 0) == ignore


@pytest.mark.parametrize("task", ["faster_rcnn", "rfcn"])
def test_an_image_without_boxes_trains_as_background(task):
    torch.manual_seed(0)
    model = tiny(task).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = model(torch.randn(1, 3, SIZE, SIZE), [empty])
    assert losses["loss_box"].item() == 0 and losses["loss_rpn_box"].item() == 0
    assert losses["loss_cls"].item() > 0 and losses["loss_rpn_cls"].item() > 0
    losses = model(torch.randn(2, 3, SIZE, SIZE), [targets(1)[0], empty])
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box"].item() > 0
    sum(losses.values()).backward()


@pytest.mark.parametrize("task", ["rpn", "faster_rcnn", "rfcn"])
def test_detectors_run_in_float64(task):
    torch.manual_seed(0)
    model = tiny(task, deformable_roi_pool=True).double()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        detections = model.eval()(x)
    assert all(d["boxes"].dtype == d["scores"].dtype == torch.float64 for d in detections)
    assert sum(len(d["boxes"]) for d in detections) > 0
    tgts = [{"boxes": t["boxes"].double(), "labels": t["labels"]} for t in targets()]
    losses = model.train()(x, tgts)
    assert all(v.dtype == torch.float64 and torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("task", ["rpn", "faster_rcnn", "rfcn"])
def test_training_targets_are_checked_up_front(task):
    model = tiny(task).train()
    images = torch.randn(2, 3, SIZE, SIZE)

    def fails(tgts, message):
        with pytest.raises(ValueError, match=message):
            model(images, tgts)

    fails(None, "targets are required")
    fails(targets(1), r"got 1 targets for a batch of 2 images")
    fails(targets(1)[0], r"targets must be a list of dicts, one per image, got dict")
    bad = targets()
    bad[1]["labels"] = torch.tensor([1, 7])
    fails(bad, r"targets\[1\]\['labels'\] must be in 1..3 \(0 is background\), got 7")
    bad[1]["labels"] = torch.tensor([0, 2])
    fails(bad, r"targets\[1\]\['labels'\] must be in 1..3 \(0 is background\), got 0")
    bad[1]["labels"] = torch.tensor([1.0, 2.0])
    fails(bad, r"targets\[1\]\['labels'\] must be an integer tensor of shape \(2,\) like its boxes, got torch.float32")
    bad[1]["labels"] = torch.tensor([1])
    fails(bad, r"targets\[1\]\['labels'\] must be an integer tensor of shape \(2,\)")
    bad = targets()
    bad[1]["boxes"] = bad[1]["boxes"][:, [2, 1, 0, 3]]  # x1 and x2 swapped
    fails(bad, r"targets\[1\]\['boxes'\] must be finite \(x1, y1, x2, y2\) with x1 <= x2 and y1 <= y2, got \[")
    for value in (float("nan"), float("inf")):  # a NaN box trained the image as background, silently
        bad = targets()
        bad[1]["boxes"][0, 0] = value
        fails(bad, rf"targets\[1\]\['boxes'\] must be finite .* got \[{value}, ")
    bad = targets()
    bad[0]["boxes"] = torch.zeros(4)
    fails(bad, r"targets\[0\]\['boxes'\] must be an \(M, 4\) tensor, got torch.float32 of shape \(4,\)")
    del bad[0]["boxes"]
    fails(bad, r"targets\[0\] has no \['boxes'\]")


@pytest.mark.parametrize("task", ["rpn", "faster_rcnn", "rfcn"])
def test_detectors_take_a_list_of_differently_sized_images(task):
    from dcnbench.models.common import to_batch

    torch.manual_seed(0)
    model = tiny(task)
    small, large = torch.randn(3, 48, 40), torch.randn(3, SIZE, SIZE + 16)
    batch, sizes = to_batch([small, large])
    assert batch.shape == (2, 3, SIZE, SIZE + 16) and sizes == [(48, 40), (SIZE, SIZE + 16)]
    assert torch.equal(batch[0, :, :48, :40], small) and not batch[0, :, 48:].any() and not batch[0, :, :, 40:].any()
    tgts = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2])}, targets(1)[0]]
    losses = model.train()([small, large], tgts)
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        detections = model.eval()([small, large])
        # A list of same-size images is the stacked tensor, exactly.
        same = model([large, large])
        stacked = model(torch.stack([large, large]))
    for det, (h, w) in zip(detections, sizes):  # clipped to the image's own size, not the padded one
        assert len(det["boxes"]) and (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()
    assert (detections[0]["boxes"][:, 2] == 40).any() or (detections[0]["boxes"][:, 3] == 48).any()
    for a, b in zip(same, stacked):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_deeplab_loss_is_zero_when_every_pixel_is_ignored():
    model = tiny("deeplab", placement="none")
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = model.loss(logits, torch.full((2, 8, 8), 255))
    assert loss.item() == 0 and loss.grad_fn is not None
    loss.backward()
    assert not logits.grad.any()


def test_block_names_follow_msra():
    """ResNet-50 letters every block (res4a ... res4f); ResNet-101 numbers res3/res4 (res4b1 ... b22);
    the scaled family of the experiments letters its short stages."""
    names = ResNetBackbone(DEPTHS[50], width=4, out_channels=0).stage_block_names()
    assert names == {"res2": ["res2a", "res2b", "res2c"], "res3": ["res3a", "res3b", "res3c", "res3d"],
                     "res4": [f"res4{c}" for c in "abcdef"], "res5": ["res5a", "res5b", "res5c"]}
    names = ResNetBackbone(DEPTHS[101], width=4, out_channels=0).stage_block_names()
    assert names["res3"] == ["res3a", "res3b1", "res3b2", "res3b3"]
    assert names["res4"] == ["res4a"] + [f"res4b{i}" for i in range(1, 23)]
    names = ResNetBackbone((1, 1, 3, 3), width=4, out_channels=0).stage_block_names()
    assert names == {"res2": ["res2a"], "res3": ["res3a"], "res4": ["res4a", "res4b", "res4c"],
                     "res5": ["res5a", "res5b", "res5c"]}
    net = ResNetBackbone(DEPTHS[50], width=4, out_channels=0, placement="res5+res4b20-22")
    assert net.deformable_blocks == ["res4d", "res4e", "res4f", "res5a", "res5b", "res5c"]


@pytest.mark.parametrize("task", TASKS)
def test_images_of_another_channel_count_are_refused_naming_images(task):
    """Every task takes RGB images, (N, 3, H, W) or a list of (3, H, W): another channel count is a
    ValueError naming images, the expected shape and the one given (not the first conv's RuntimeError),
    in training and in evaluation."""
    model = tiny(task)
    tgts = targets(1)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        for images, message in [(torch.rand(1, 1, SIZE, SIZE), r"images must be \(N, 3, H, W\), got shape \(1, 1, 64, 64\)"),
                                (torch.rand(1, 4, SIZE, SIZE), r"images must be \(N, 3, H, W\), got shape \(1, 4, 64, 64\)"),
                                ([torch.rand(1, SIZE, SIZE)], r"images in a list must be \(3, H, W\) tensors, got shapes \[\(1, 64, 64\)\]"),
                                ([torch.rand(3, SIZE, SIZE), torch.rand(4, SIZE, SIZE)], r"got shapes \[\(3, 64, 64\), \(4, 64, 64\)\]")]:
            with pytest.raises(ValueError, match=message):
                model(images, tgts[:1] * (len(images) if isinstance(images, list) else 1))


def test_deeplab_loss_refuses_a_mask_of_another_shape_or_with_labels_out_of_range():
    """DeepLab's loss takes a mask (N, H, W) of logits (N, C+1, H, W) with labels 0..C or 255
    (ignored); anything else is a ValueError naming mask, what it must be and what it is."""
    model = tiny("deeplab", placement="none")  # C = 3: logits have 4 channels
    logits = torch.randn(2, 4, SIZE, 48)
    for mask in (torch.zeros(2, 32, 48, dtype=torch.long), torch.zeros(2, 1, SIZE, 48, dtype=torch.long)):
        with pytest.raises(ValueError, match=rf"mask must be \(2, 64, 48\) \(logits \(2, 4, 64, 48\) without "
                                             rf"the class axis\), got shape {re.escape(str(tuple(mask.shape)))}"):
            model.loss(logits, mask)
    for bad in (7, 4, -1, 254):
        mask = torch.zeros(2, SIZE, 48, dtype=torch.long)
        mask[1, 5, 6] = bad
        with pytest.raises(ValueError, match=rf"mask labels must be in 0..3 or 255 \(ignored\), got {bad}"):
            model.loss(logits, mask)
    mask = torch.randint(0, 4, (2, SIZE, 48))
    mask[:, :4] = 255
    assert torch.isfinite(model.loss(logits, mask))


@pytest.mark.parametrize("task", ["faster_rcnn", "rfcn"])
def test_quantized_plain_roi_pooling_is_the_released_codes_baseline(task):
    """plain_roi_pool "quantized" pools as the released code's plain detectors: max RoI pooling
    (Faster R-CNN) and PS RoI pooling (R-FCN) over integer-pixel bins, torchvision's roi_pool and
    ps_roi_pool; "bilinear" (default) is the deformable op without offsets, which differs. The paper
    tier's plain detectors use it; the cpu tier's keep the default."""
    import torchvision

    from dcnbench.models import build_model
    from dcnbench.runner.experiment import expand_cells, load_experiment

    cfg = {"task": task, "num_classes": 3, "backbone": "scaled", "blocks": [1, 1, 1, 3], "width": 8, "placement": "none"}
    quantized = build_model({**cfg, "plain_roi_pool": "quantized"}).eval()
    bilinear = build_model(cfg).eval()
    bilinear.load_state_dict(quantized.state_dict())
    feature = torch.randn(1, quantized.backbone.out_channels, 6, 7)
    rois = [torch.tensor([[3.0, 5.0, 70.0, 60.0], [10.0, 1.0, 40.5, 33.3]])]
    scale, k = quantized.spatial_scale, quantized.pool_size
    with torch.no_grad():
        got = quantized.roi_head(feature, rois)
        if task == "faster_rcnn":
            pooled = torchvision.ops.roi_pool(feature, rois, k, scale).flatten(1)
            x = torch.relu(quantized.fc7(torch.relu(quantized.fc6(pooled))))
            want = quantized.cls_score(x), quantized.bbox_pred(x)
        else:
            want = tuple(torchvision.ops.ps_roi_pool(maps(feature), rois, k, scale).mean(dim=(2, 3))
                         for maps in (quantized.cls_maps, quantized.box_maps))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert not torch.allclose(bilinear.roi_head(feature, rois)[0], got[0])
    tier_task = {"faster_rcnn": "faster", "rfcn": "rfcn"}[task]
    for tier, expected, thresh in (("paper", "quantized", 0.001), ("cpu", None, None)):
        cells = expand_cells(load_experiment(1), tier, [tier_task], variants=["none"])
        assert cells and all(c.config["model"].get("plain_roi_pool") == expected for c in cells)
        assert all(c.config["model"].get("score_thresh") == thresh for c in cells)  # the release's test threshold


def test_proposal_network_trains_on_conv4_and_proposes_with_the_train_or_test_top_n():
    """The RPN stage of the fixed-proposal ablations: RPN losses in training, per-image (P, 4) boxes
    inside the image in evaluation (at most the train or test post-NMS top-n), and res5 never runs."""
    model = tiny("proposals", placement="none")
    model.backbone.layer4.register_forward_hook(lambda *_: pytest.fail("res5 ran"))
    losses = model(torch.randn(2, 3, SIZE, SIZE), targets())
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.rpn.cls_logits.weight.grad.abs().sum() > 0 and model.backbone.layer3[0].conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        test = model([torch.randn(3, SIZE, SIZE + 16), torch.randn(3, SIZE - 8, SIZE)])
        train = model(torch.randn(1, 3, SIZE, SIZE), for_training=True)
    assert len(test) == 2 and all(p.shape[1] == 4 and 0 < len(p) <= 32 for p in test)
    assert (test[1][:, 3] <= SIZE - 8).all() and (test[0][:, 2] <= SIZE + 16).all()
    assert 32 < len(train[0]) <= 64
