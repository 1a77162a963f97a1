"""Modules own their offset branches; fresh (zero-initialized) layers equal their plain versions."""

import inspect
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import dcnbench.ops
from dcnbench.ops import (
    DeformConv2d,
    DeformPSRoIPool,
    DeformRoIPool,
    backend_for,
    deform_conv2d,
    deform_ps_roi_pool,
    deform_roi_pool,
    offset_param_groups,
    use_backend,
)


def test_fresh_deform_conv_equals_conv2d(cpu_backend):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2).double()
    layer = DeformConv2d.from_conv(conv, offset_groups=2)
    x = torch.randn(2, 4, 11, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)
    assert layer.offset_conv.out_channels == 2 * 2 * 9
    assert (layer.offset_conv.kernel_size, layer.offset_conv.stride, layer.offset_conv.padding,
            layer.offset_conv.dilation) == ((3, 3), (2, 2), (2, 2), (2, 2))


@pytest.mark.parametrize("kernel,dilation,padding", [(3, 1, (1, 1)), (5, 1, (2, 2)), ((3, 5), (2, 1), (2, 2))])
def test_from_conv_turns_symmetric_same_padding_into_ints(cpu_backend, kernel, dilation, padding):
    conv = nn.Conv2d(4, 6, kernel, padding="same", dilation=dilation).double()
    layer = DeformConv2d.from_conv(conv)
    assert layer.padding == layer.offset_conv.padding == padding
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)
    assert DeformConv2d.from_conv(nn.Conv2d(4, 6, kernel, padding="valid")).padding == (0, 0)


@pytest.mark.parametrize("conv,pattern", [
    (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), r"conv must have padding_mode 'zeros'.*got 'reflect'"),
    (nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), r"conv must have padding_mode 'zeros'.*got 'circular'"),
    (nn.Conv2d(4, 6, (3, 4), padding="same"),
     r"conv's padding='same' with kernel_size \(3, 4\) and dilation \(1, 1\) pads \(2, 3\) pixels per dimension"),
])
def test_from_conv_refuses_padding_it_cannot_reproduce(conv, pattern):
    with pytest.raises(ValueError, match=pattern):
        DeformConv2d.from_conv(conv)


def test_positional_arguments_follow_torchvision():
    """torchvision.ops.DeformConv2d's eight positional parameters, in its order; dcnbench's are keyword-only."""
    ours = list(inspect.signature(DeformConv2d).parameters.values())
    theirs = list(inspect.signature(torchvision.ops.DeformConv2d).parameters.values())
    assert [p.name for p in ours[:8]] == [p.name for p in theirs] == [
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias"]
    assert all(p.kind == p.KEYWORD_ONLY for p in ours[8:])
    layer = DeformConv2d(4, 6, 3, 2, 1, 1, 2, False)
    assert (layer.stride, layer.padding, layer.groups, layer.bias) == ((2, 2), (1, 1), 2, None)
    assert layer(torch.randn(1, 4, 7, 7)).shape == (1, 6, 4, 4)
    with pytest.raises(TypeError):
        DeformConv2d(4, 6, 3, 1, 1, 1, 1, True, 2)


def test_weight_is_torchvision_s_contiguous_tensor():
    """The weight is contiguous like torchvision's (it was kept channels-last on the CPU, which broke
    parameters_to_vector, weight.view(out, -1), orthogonal_ init and safetensors), through .to(),
    dtype changes, from_conv and load_state_dict."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layers = [DeformConv2d(4, 6, 3), DeformConv2d.from_conv(conv).double(), DeformConv2d(4, 6, 3).to("meta")]
    layers[0].load_state_dict(torchvision.ops.DeformConv2d(4, 6, 3).state_dict(), strict=False)
    for layer in layers:
        assert layer.weight.is_contiguous()
    torch.nn.utils.parameters_to_vector(layers[0].parameters())
    nn.init.orthogonal_(layers[0].weight)
    assert layers[1].weight.view(6, -1).shape == (6, 36)


def test_channels_last_weight_gives_the_same_outputs_and_gradients(cpu_backend):
    """layer.to(memory_format=torch.channels_last) stores the weight in the CPU kernels' order (no
    copy per call), kept through load_state_dict; outputs and gradients equal the standard layout's."""
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    layers = [DeformConv2d.from_conv(conv) for _ in range(2)]
    layers[1].to(memory_format=torch.channels_last).load_state_dict(layers[0].state_dict())
    assert layers[1].weight.is_contiguous(memory_format=torch.channels_last) and not layers[1].weight.is_contiguous()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    results = []
    for layer in layers:
        nn.init.constant_(layer.offset_conv.bias, 0.3)
        out = layer(x)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), layer.weight.grad, layer.offset_conv.weight.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    ((3, 3), (1, 1), (2, 2), (2, 2)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((2, 3), (1, 2), (1, 0), (2, 1)),
    ((3, 3), (3, 2), (0, 4), (1, 3)), ((1, 1), (1, 1), (0, 0), (1, 1)), ((3, 3), (6, 1), (3, 1), (1, 1)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_by_taps_equals_conv2d(kernel, stride, padding, dilation, bias):
    """The offset branch's tap-sum form of a convolution equals F.conv2d, border and strides included
    (with stride 6 and padding 3 on the 4-row map, the last row of taps reads only padding)."""
    from dcnbench.ops.deform_conv import _conv_by_taps

    x = torch.randn(2, 5, 4, 9, dtype=torch.float64)
    weight = torch.randn(7, 5, *kernel, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64) if bias else None
    want = F.conv2d(x, weight, b, stride, padding, dilation)
    torch.testing.assert_close(_conv_by_taps(x, weight, b, stride, padding, dilation), want, rtol=1e-12, atol=1e-12)


def test_offset_branch_without_autograd_equals_conv(cpu_backend):
    """A layer wide enough for the tap-sum offset branch (CPU, no autograd) gives the offsets and the
    output it gives with autograd on, where the branch is the plain nn.Conv2d."""
    layer = DeformConv2d(128, 8, 3, padding=2, dilation=2).double()
    nn.init.normal_(layer.offset_conv.weight, std=0.05)
    x = torch.randn(1, 128, 20, 30, dtype=torch.float64)
    with torch.no_grad():
        offset, _ = layer.offsets(x)
        out = layer(x)
    torch.testing.assert_close(offset, layer.offset_conv(x), rtol=1e-10, atol=1e-10)
    assert offset.abs().max() > 0.5
    torch.testing.assert_close(out, layer(x).detach(), rtol=1e-10, atol=1e-10)


def test_fresh_modulated_layer_is_half_conv_plus_bias(cpu_backend):
    """Modulated (v2): mask = sigmoid(0) = 0.5 on every tap of a fresh layer."""
    layer = DeformConv2d(3, 5, (3, 2), padding=1, modulated=True).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    want = 0.5 * F.conv2d(x, layer.weight, None, padding=1) + layer.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    offset, mask = layer.offsets(x)
    assert offset.shape == (2, 12, 7, 8) and mask.shape == (2, 6, 7, 8)


def test_offset_branch_learns(cpu_backend):
    """Gradients reach the zero-initialized offset conv, so a fresh layer can start deforming."""
    layer = DeformConv2d(2, 2, 3, padding=1)
    layer(torch.randn(1, 2, 6, 6)).square().sum().backward()
    assert layer.offset_conv.weight.grad.abs().sum() > 0


def test_fresh_deform_roi_pool_equals_plain(cpu_backend):
    pool = DeformRoIPool(3, output_size=3, spatial_scale=0.5, sampling_ratio=2).double()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 12.0, 15.0], [1, 4.0, 0.0, 9.0, 9.0]], dtype=torch.float64)
    want = deform_roi_pool(x, rois, None, 3, 0.5, 2)
    torch.testing.assert_close(pool(x, rois), want, rtol=0, atol=0)
    assert pool.offset_fc.in_features == 3 * 9 and pool.offset_fc.out_features == 2 * 9


def test_fresh_deform_ps_roi_pool_equals_plain(cpu_backend):
    pool = DeformPSRoIPool(in_channels=5, out_channels=4, output_size=3, spatial_scale=0.5,
                           sampling_ratio=2, offset_groups=4).double()
    scores = torch.randn(2, 4 * 9, 10, 10, dtype=torch.float64)
    features = torch.randn(2, 5, 10, 10, dtype=torch.float64)
    rois = [torch.tensor([[1.0, 2.0, 12.0, 15.0]], dtype=torch.float64),
            torch.tensor([[4.0, 0.0, 9.0, 9.0]], dtype=torch.float64)]
    torch.testing.assert_close(pool(scores, features, rois), deform_ps_roi_pool(scores, rois, None, 3, 0.5, 2),
                               rtol=0, atol=0)
    assert pool.offset_conv.out_channels == 2 * 4 * 9


@pytest.mark.parametrize("features_shape", [(2, 5, 5, 10), (2, 5, 10, 12), (1, 5, 10, 10)])
def test_ps_roi_pool_module_refuses_features_of_another_map(features_shape):
    """The offsets are pooled from the features at score_maps' spatial_scale: features of another
    map size were pooled silently at the wrong geometry, another batch failed naming "input"."""
    pool = DeformPSRoIPool(in_channels=5, out_channels=4, output_size=3, spatial_scale=0.5, sampling_ratio=2)
    scores, rois = torch.randn(2, 4 * 9, 10, 10), torch.tensor([[0, 1.0, 2.0, 12.0, 15.0]])
    with pytest.raises(ValueError, match=r"features must have score_maps' batch and map size \(N, H, W\) = "
                                         r"\(2, 10, 10\), got \(" + ", ".join(map(str, (features_shape[0],
                                                                                      *features_shape[2:])))):
        pool(scores, torch.randn(features_shape), rois)


def test_roi_pool_modules_show_their_settings():
    """repr names the pooling settings, as torchvision's RoIAlign / PSRoIAlign do."""
    assert repr(DeformRoIPool(8, 7, 0.0625, 2)).startswith(
        "DeformRoIPool(\n  in_channels=8, output_size=(7, 7), spatial_scale=0.0625, sampling_ratio=2, gamma=0.1")
    assert "in_channels=5, out_channels=4, output_size=(3, 3), spatial_scale=0.5, sampling_ratio=4, gamma=0.1, " \
           "offset_groups=2" in repr(DeformPSRoIPool(5, 4, 3, 0.5, offset_groups=2))


def test_offset_param_groups_apply_paper_multipliers():
    """Base lr for the network, lr x 1 for conv offset branches, lr x 0.01 for the RoI offset fc."""
    model = nn.ModuleDict({
        "conv": DeformConv2d(2, 2, 3),
        "pool": DeformRoIPool(2, output_size=3),
        "head": nn.Linear(4, 4),
    })
    groups = offset_param_groups(model, lr=0.1, weight_decay=1e-4)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(lr_of) == len(list(model.parameters()))
    fc_ids = {id(p) for p in model["pool"].offset_fc.parameters()}
    for p in model.parameters():
        assert lr_of[id(p)] == pytest.approx(0.001 if id(p) in fc_ids else 0.1)
    assert all(g["weight_decay"] == 1e-4 for g in groups)


def test_use_backend_forces_reference():
    x = torch.randn(1, 2, 4, 4)
    with use_backend("reference"):
        assert backend_for(x) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("fortran"):
            pass


def test_environment_variable_forces_backend():
    code = "import torch; from dcnbench.ops import backend_for; print(backend_for(torch.zeros(1)))"
    env = {"DCNBENCH_BACKEND": "reference", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_torch_compile_fullgraph_matches_eager(cpu_backend):
    """A model using the deformable ops compiles with fullgraph=True; forward and grads equal eager."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), DeformConv2d(4, 4, 3, padding=1, modulated=True), nn.ReLU())
    with torch.no_grad():
        model[1].offset_conv.weight.normal_(0, 0.3)
    x = torch.randn(2, 3, 8, 8)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_autocast_on_cpu_runs_in_float32(cpu_backend):
    """Under CPU autocast (bfloat16 convs) the deformable ops compute in float32 and agree with eager."""
    torch.manual_seed(0)
    layer = DeformConv2d(4, 4, 3, padding=1)
    pool = DeformRoIPool(4, output_size=2, sampling_ratio=2)
    with torch.no_grad():
        layer.offset_conv.weight.normal_(0, 0.1)
    x = torch.randn(2, 4, 8, 8)
    rois = torch.tensor([[0, 0.0, 0.0, 6.0, 6.0], [1, 2.0, 1.0, 7.0, 5.0]], dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        pooled = pool(y, rois)
    assert y.dtype == torch.float32 and pooled.dtype == torch.float32
    torch.testing.assert_close(y, layer(x), rtol=0.05, atol=0.05)
    pooled.sum().backward()
    assert layer.offset_conv.weight.grad is not None


class _AllOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = DeformConv2d(4, 8, 3, padding=1, modulated=True)
        self.pool, self.ps_pool = DeformRoIPool(8, 2, 0.5, 2), DeformPSRoIPool(8, 2, 2, 0.5, 2)
        for weight in (self.conv.offset_conv.weight, self.pool.offset_fc.weight, self.ps_pool.offset_conv.weight):
            nn.init.normal_(weight, std=0.1)

    def forward(self, x, rois):
        y = self.conv(x)
        direct = dcnbench.ops.deform_conv2d(x, torch.cat([y, y, y[:, :2]], 1), self.conv.weight, padding=1)
        return self.pool(y, rois), self.ps_pool(y, y, rois), direct


def test_fx_symbolic_trace_records_the_ops(cpu_backend):
    """torch.fx.symbolic_trace (and torchvision's create_feature_extractor, built on it) records the
    modules' and dcnbench.ops' calls as nodes, as torchvision's ops: the modules' checks refused the
    Proxy ("input must be a torch.Tensor, got Proxy"). The traced graph computes the same."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from dcnbench.models import build_model

    model = _AllOps()
    x, rois = torch.randn(2, 4, 10, 12), torch.tensor([[0, 1.0, 1, 15, 12], [1, 4, 2, 18, 18]])
    graph = torch.fx.symbolic_trace(model)
    assert "deform_conv2d" in graph.code and "deform_roi_pool" in graph.code, graph.code
    for got, want in zip(graph(x, rois), model(x, rois)):
        torch.testing.assert_close(got, want)
    net = build_model({"task": "deeplab", "num_classes": 3, "backbone": "scaled", "blocks": [1, 1, 1, 3],
                       "width": 8}).eval()
    assert net.backbone.deformable_blocks
    features = create_feature_extractor(net.backbone, {"layer4": "res5"})
    image = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(features(image)["res5"], net.backbone.body(image)[1])
