"""Deformable (PS) RoI pooling against a brute-force loop written from the semantics note."""

import math

import pytest
import torch

from dcnbench.ops import deform_ps_roi_pool, deform_roi_pool


def c_round(v: float) -> float:
    """C's round(): halves away from zero, as the released kernel rounds RoI corners."""
    return math.copysign(math.floor(abs(v) + 0.5), v)


def brute_force(input, rois, offset, k, scale, samples, gamma, position_sensitive):
    """One scalar at a time, straight from shared/notes/operator-semantics.md (differentiable)."""
    n, c_in, h, w = input.shape
    c_out = c_in // (k * k) if position_sensitive else c_in
    out = []
    for r in range(rois.shape[0]):
        b, x1, y1, x2, y2 = rois[r].tolist()
        start_x = c_round(x1) * scale - 0.5
        start_y = c_round(y1) * scale - 0.5
        roi_w = max((c_round(x2) + 1) * scale - 0.5 - start_x, 0.1)
        roi_h = max((c_round(y2) + 1) * scale - 0.5 - start_y, 0.1)
        bin_w, bin_h = roi_w / k, roi_h / k
        for c in range(c_out):
            for i in range(k):
                for j in range(k):
                    dx = dy = 0.0
                    if offset is not None:
                        n_cls, parts = offset.shape[1] // 2, offset.shape[2]
                        cls = c // (c_out // n_cls)
                        pi, pj = math.floor(i / k * parts), math.floor(j / k * parts)
                        dx = gamma * offset[r, 2 * cls, pi, pj] * roi_w
                        dy = gamma * offset[r, 2 * cls + 1, pi, pj] * roi_h
                    channel = (c * k + i) * k + j if position_sensitive else c
                    plane = input[int(b), channel]
                    total, count = 0.0, 0
                    for v in range(samples):
                        for u in range(samples):
                            x = j * bin_w + start_x + dx + u * bin_w / samples
                            y = i * bin_h + start_y + dy + v * bin_h / samples
                            x = torch.as_tensor(x, dtype=input.dtype)
                            y = torch.as_tensor(y, dtype=input.dtype)
                            if x.item() < -0.5 or x.item() > w - 0.5 or y.item() < -0.5 or y.item() > h - 0.5:
                                continue
                            x, y = x.clamp(0, w - 1), y.clamp(0, h - 1)
                            xf, yf = math.floor(x.item()), math.floor(y.item())
                            xc, yc = math.ceil(x.item()), math.ceil(y.item())
                            lx, ly = x - xf, y - yf
                            total = total + ((1 - ly) * (1 - lx) * plane[yf, xf] + (1 - ly) * lx * plane[yf, xc]
                                             + ly * (1 - lx) * plane[yc, xf] + ly * lx * plane[yc, xc])
                            count += 1
                    out.append(total / count if count else torch.zeros((), dtype=input.dtype))
    if not out:
        return input.new_zeros((0, c_out, k, k))
    return torch.stack([torch.as_tensor(v, dtype=input.dtype) for v in out]).reshape(-1, c_out, k, k)


def make_case(position_sensitive, n_cls=2, k=3, c_out=4, n=2, h=9, w=11, scale=0.5, dtype=torch.float64):
    c_in = c_out * k * k if position_sensitive else c_out
    input = torch.randn(n, c_in, h, w, dtype=dtype)
    rois = torch.tensor([
        [0, 2.0, 3.0, 14.0, 12.0],      # inside
        [1, -6.0, -4.0, 8.0, 6.0],      # partly outside (top-left)
        [1, 15.0, 10.0, 30.0, 25.0],    # partly outside (bottom-right)
        [0, 40.0, 40.0, 60.0, 60.0],    # wholly outside
        [1, 5.3, 7.7, 5.6, 7.9],        # degenerate: roi_w clamped to 0.1 region
        [0, 2.5, -1.5, 9.5, 6.5],       # corners at halves: C round() goes away from zero
    ], dtype=dtype)
    offset = torch.randn(rois.shape[0], 2 * n_cls, k, k, dtype=dtype) * 1.5
    return input, rois, offset, dict(output_size=k, spatial_scale=scale, sampling_ratio=2, gamma=0.1)


OPS = [(deform_roi_pool, False), (deform_ps_roi_pool, True)]
IDS = ["deform_roi_pool", "deform_ps_roi_pool"]


def grads(fn, input, rois, offset, kw, grad_out=None):
    x = input.detach().clone().requires_grad_()
    o = None if offset is None else offset.detach().clone().requires_grad_()
    out = fn(x, rois, o, **kw)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    return out.detach(), x.grad, None if o is None else o.grad, grad_out


@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "no_offset"])
@pytest.mark.parametrize("op,ps", OPS, ids=IDS)
def test_matches_brute_force_loop(cpu_backend, op, ps, with_offset):
    """Output, input gradient and offset gradient equal the per-element loop."""
    input, rois, offset, kw = make_case(ps)
    offset = offset if with_offset else None
    out, gi, go, grad_out = grads(op, input, rois, offset, kw)

    def loop(x, rois, o, output_size, spatial_scale, sampling_ratio, gamma):
        return brute_force(x, rois, o, output_size, spatial_scale, sampling_ratio, gamma, ps)

    want, wgi, wgo, _ = grads(loop, input, rois, offset, kw, grad_out)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gi, wgi, rtol=1e-10, atol=1e-12)
    if with_offset:
        torch.testing.assert_close(go, wgo, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op,ps", OPS, ids=IDS)
def test_gradcheck_float64(cpu_backend, op, ps):
    """Input and offset gradients match finite differences (RoIs inside, partly and wholly outside)."""
    input, rois, offset, kw = make_case(ps, c_out=2, n=2, h=7, w=8)
    input.requires_grad_()
    offset.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, o: op(x, rois, o, **kw), (input, offset), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["input", "offset"])
@pytest.mark.parametrize("op,ps", OPS, ids=IDS)
def test_one_argument_requiring_grad_records_the_graph(cpu_backend, op, ps, which):
    """Calls that autograd would not record run the kernels directly; a call where the input or
    the offset alone requires grad still records, and its gradient matches the brute-force loop's."""
    input, rois, offset, kw = make_case(ps)
    with torch.no_grad():
        inference = op(input, rois, offset, **kw)
    assert inference.grad_fn is None
    leaf = {"input": input, "offset": offset}[which].requires_grad_()
    ours = op(input, rois, offset, **kw)
    assert ours.grad_fn is not None
    assert torch.equal(ours.detach(), inference)
    grad_out = torch.randn_like(ours)
    (ours_grad,) = torch.autograd.grad(ours, leaf, grad_out)
    (loop_grad,) = torch.autograd.grad(brute_force(input, rois, offset, kw["output_size"], kw["spatial_scale"],
                                                   kw["sampling_ratio"], kw["gamma"], ps), leaf, grad_out)
    torch.testing.assert_close(ours_grad, loop_grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op,ps", OPS, ids=IDS)
def test_zero_offsets_equal_no_offsets(cpu_backend, op, ps):
    input, rois, offset, kw = make_case(ps)
    torch.testing.assert_close(op(input, rois, torch.zeros_like(offset), **kw), op(input, rois, None, **kw),
                               rtol=0, atol=0)


@pytest.mark.parametrize("op,ps", OPS, ids=IDS)
def test_list_of_boxes_equals_batch_index_format(cpu_backend, op, ps):
    input, rois, offset, kw = make_case(ps)
    order = torch.argsort(rois[:, 0], stable=True)
    rois, offset = rois[order], offset[order]
    boxes = [rois[rois[:, 0] == b, 1:] for b in range(input.shape[0])]
    torch.testing.assert_close(op(input, boxes, offset, **kw), op(input, rois, offset, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("op,ps", OPS, ids=IDS)
def test_zero_rois_give_empty_result(cpu_backend, op, ps):
    input, _, _, kw = make_case(ps)
    rois = torch.zeros(0, 5, dtype=input.dtype)
    offset = torch.zeros(0, 4, 3, 3, dtype=input.dtype, requires_grad=True)
    input.requires_grad_()
    out = op(input, rois, offset, **kw)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert torch.equal(input.grad, torch.zeros_like(input))
    assert offset.grad is not None and offset.grad.shape == (0, 4, 3, 3)


def test_position_sensitive_channel_layout(cpu_backend):
    """Output channel c at bin (i, j) reads input channel (c*k + i)*k + j and nothing else."""
    k, c_out = 3, 2
    input = torch.zeros(1, c_out * k * k, 6, 6, dtype=torch.float64)
    for ch in range(c_out * k * k):
        input[0, ch] = ch
    rois = torch.tensor([[0, 0.0, 0.0, 5.0, 5.0]], dtype=torch.float64)
    out = deform_ps_roi_pool(input, rois, None, output_size=k, sampling_ratio=2)
    expected = torch.arange(c_out * k * k, dtype=torch.float64).reshape(1, c_out, k, k)
    torch.testing.assert_close(out, expected)


def test_class_specific_offsets_move_only_their_channels(cpu_backend):
    """With n offset classes, shifting class 1's offsets changes only output channels of class 1."""
    input, rois, offset, kw = make_case(True, n_cls=2, c_out=4)
    base = deform_ps_roi_pool(input, rois, offset, **kw)
    moved = offset.clone()
    moved[:, 2:4] += 0.7
    out = deform_ps_roi_pool(input, rois, moved, **kw)
    torch.testing.assert_close(out[:, :2], base[:, :2], rtol=0, atol=0)
    assert not torch.allclose(out[:, 2:], base[:, 2:])


@pytest.mark.parametrize("op,ps", OPS, ids=IDS)
def test_double_backward_raises_on_kernels_and_works_on_reference(cpu_backend, op, ps):
    """A gradient penalty through the kernels fails loudly; the reference differentiates twice."""
    input, rois, offset, kw = make_case(ps)
    x, o = input.requires_grad_(), offset.requires_grad_()
    gx, = torch.autograd.grad(op(x, rois, o, **kw).square().sum(), x, create_graph=True)
    assert gx.requires_grad
    if cpu_backend == "reference":
        gx.square().sum().backward()
        assert o.grad.abs().sum() > 0
    else:
        message = (rf"double backward of dcnbench.ops.{op.__name__} on the native backend is not supported; "
                   r"use dcnbench.ops.use_backend\('reference'\)")
        with pytest.raises(RuntimeError, match=message):
            gx.square().sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op,ps", OPS, ids=IDS)
def test_half_precision_computes_in_float32_on_cpu(cpu_backend, op, ps, dtype):
    """float16/bfloat16 input, offsets and boxes give the float32 result and gradients, rounded to the dtype."""
    input, rois, offset, kw = make_case(ps, dtype=dtype)
    got, got_gx, got_go, grad_out = grads(op, input, rois, offset, kw)
    want, want_gx, want_go, _ = grads(op, input.float(), rois.float(), offset.float(), kw, grad_out.float())
    assert got.dtype == got_gx.dtype == got_go.dtype == dtype
    for g, w in ((got, want), (got_gx, want_gx), (got_go, want_go)):
        assert torch.equal(g, w.to(dtype))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("op,ps", OPS, ids=IDS)
def test_non_finite_offsets_skip_their_samples(cpu_backend, op, ps, value):
    """A NaN or infinite offset puts its bins' samples outside [-0.5, W-0.5]: they are skipped (as
    samples moved far off the map are), in the output and in both gradients, on every backend."""
    input, rois, offset, kw = make_case(ps)
    bad, far = offset.clone(), offset.clone()
    bad[0, 0:2, 1, 2] = value  # x and y of offset class 0, part (1, 2), roi 0
    bad[2, 3, 0, 0] = value    # y of offset class 1, part (0, 0), roi 2
    far[0, 0:2, 1, 2] = 1e6
    far[2, 3, 0, 0] = 1e6
    got, got_gi, got_go, grad_out = grads(op, input, rois, bad, kw)
    want, want_gi, want_go, _ = grads(op, input, rois, far, kw, grad_out)
    assert torch.equal(got, want) and torch.equal(got_gi, want_gi) and torch.equal(got_go, want_go)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_offset_gradient_of_a_sample_an_ulp_inside_the_map_edge(dtype):
    """A sample at 0 < x < ulp(1)/2 (e.g. -0.2 + 0.2 rounding to 3e-17, or with zero offsets at
    these boxes) has its +1 derivative at ceil(x) = 1: the native PS kernel derived the corners from
    1 - x, which rounds to 1, and gave 3.875 for -0.375 (float64) and gradients off by 0.01. The
    native kernels against the reference's autograd (the reference against itself proved nothing)."""
    from dcnbench.ops import use_backend
    from dcnbench.ops.dispatch import backend_status

    ok, why = backend_status("native")
    if not ok:
        pytest.skip(f"native backend unavailable: {why}")

    if dtype == torch.float64:  # bin (0, 1)'s second x sample lands at 3.5e-17
        input = torch.arange(54, dtype=dtype).reshape(1, 9, 3, 2)
        rois, offset = torch.tensor([[0.0, 4.0, 2.0, 4.0, 2.0]], dtype=dtype), torch.full((1, 2, 1, 1), 5.0, dtype=dtype)
        kw = dict(output_size=3, spatial_scale=0.25, sampling_ratio=2, gamma=-0.5)
    else:  # zero offsets, samples of the first bin row an ulp below row 0 rounded up to it
        input = torch.rand(1, 9, 9, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
        rois, offset = torch.tensor([[0.0, 11.5, 0.5, 11.5, 3.5]], dtype=dtype), torch.zeros(1, 2, 3, 3, dtype=dtype)
        kw = dict(output_size=3, spatial_scale=0.3, sampling_ratio=4, gamma=0.1)
    with use_backend("native"):
        got = grads(deform_ps_roi_pool, input, rois, offset, kw, grad_out=torch.ones(1, 1, 3, 3, dtype=dtype))
    with use_backend("reference"):
        want = grads(deform_ps_roi_pool, input, rois, offset, kw, grad_out=torch.ones(1, 1, 3, 3, dtype=dtype))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, **tol)


def test_meta_tensors_give_shapes():
    """Shapes propagate on the meta device (no data; the value checks of the boxes are skipped):
    both poolings, with and without offsets, rois as a tensor or per-image lists, and the modules."""
    from dcnbench.ops import DeformPSRoIPool, DeformRoIPool

    x, rois = torch.empty(2, 18, 8, 8, device="meta"), torch.empty(5, 5, device="meta")
    offset = torch.empty(5, 2, 3, 3, device="meta")
    for op, channels in ((deform_roi_pool, 18), (deform_ps_roi_pool, 2)):
        for o in (None, offset):
            out = op(x, rois, o, 3, 1.0, 2)
            assert out.shape == (5, channels, 3, 3) and out.device.type == "meta"
    boxes = [torch.empty(2, 4, device="meta"), torch.empty(3, 4, device="meta")]
    assert deform_roi_pool(x, boxes, None, 3, 1.0, 2).shape == (5, 18, 3, 3)
    assert DeformRoIPool(18, 3).to("meta")(x, rois).shape == (5, 18, 3, 3)
    ps = DeformPSRoIPool(4, 2, 3).to("meta")
    assert ps(x, torch.empty(2, 4, 8, 8, device="meta"), rois).shape == (5, 2, 3, 3)
