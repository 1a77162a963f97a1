"""deform_conv2d: torchvision's semantics exactly, on every CPU backend."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from dcnbench.ops import deform_conv2d

# (name, N, C, H, W, O, groups, offset_groups, (kh, kw), stride, padding, dilation, masked)
CASES = [
    ("basic", 1, 2, 6, 6, 3, 1, 1, (3, 3), 1, 1, 1, False),
    ("stride2_pad2", 2, 2, 7, 8, 2, 1, 1, (3, 3), 2, 2, 1, False),
    ("dilation2_pad0", 1, 2, 8, 7, 2, 1, 1, (3, 3), 1, 0, 2, True),
    ("nonsquare_kernel", 2, 3, 6, 7, 2, 1, 1, (2, 3), (1, 2), (1, 0), (2, 1), True),
    ("weight_groups2", 1, 4, 5, 5, 4, 2, 1, (3, 3), 1, 1, 1, False),
    ("offset_groups2_masked", 2, 4, 5, 6, 2, 1, 2, (3, 3), 1, 1, 1, True),
    ("both_groups2", 2, 4, 5, 5, 6, 2, 2, (3, 3), 1, 1, 2, True),
]


def make_inputs(n, c, h, w, o, groups, offset_groups, kernel, stride, padding, dilation, masked,
                dtype=torch.float64, offset_scale=2.0):
    kh, kw = kernel
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x = torch.randn(n, c, h, w, dtype=dtype)
    offset = torch.randn(n, 2 * offset_groups * kh * kw, ho, wo, dtype=dtype) * offset_scale
    weight = torch.randn(o, c // groups, kh, kw, dtype=dtype)
    bias = torch.randn(o, dtype=dtype)
    mask = torch.rand(n, offset_groups * kh * kw, ho, wo, dtype=dtype) if masked else None
    return x, offset, weight, bias, mask, dict(stride=stride, padding=padding, dilation=dilation)


def outputs_and_grads(fn, x, offset, weight, bias, mask, kwargs, grad_out=None):
    """Output and grads of (input, offset, weight, bias, mask) for a random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, offset, weight, bias, mask)]
    out = fn(leaves[0], leaves[1], leaves[2], leaves[3], mask=leaves[4], **kwargs)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out)
    return out.detach(), [None if t is None else t.grad for t in leaves], grad_out


def assert_relative(got, want, rtol):
    scale = want.abs().max().clamp(min=1.0)
    err = (got - want).abs().max()
    assert err <= rtol * scale, f"max abs error {err:.3g} exceeds {rtol} x {scale:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradcheck_float64_all_inputs(cpu_backend, case):
    """Analytic gradients of input, offset, weight, bias and mask match finite differences."""
    x, offset, weight, bias, mask, kw = make_inputs(*case[1:])
    # Keep sampling points away from integer coordinates, where bilinear is not differentiable.
    offset = offset.round() + 0.25 + 0.5 * torch.rand_like(offset)
    leaves = [t.requires_grad_() for t in (x, offset, weight, bias) + ((mask,) if mask is not None else ())]

    def fn(*args):
        m = args[4] if mask is not None else None
        return deform_conv2d(args[0], args[1], args[2], args[3], mask=m, **kw)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_torchvision_output_and_gradients(cpu_backend, case, dtype, rtol):
    """Output and every gradient equal torchvision.ops.deform_conv2d on random offsets."""
    inputs = make_inputs(*case[1:], dtype=dtype, offset_scale=3.0)
    ours, our_grads, grad_out = outputs_and_grads(deform_conv2d, *inputs)
    theirs, their_grads, _ = outputs_and_grads(torchvision.ops.deform_conv2d, *inputs, grad_out=grad_out)
    assert_relative(ours, theirs, rtol)
    for name, g, t in zip(("input", "offset", "weight", "bias", "mask"), our_grads, their_grads):
        assert (g is None) == (t is None), name
        if g is not None:
            assert_relative(g, t, rtol)


@pytest.mark.parametrize("which", ["input", "offset", "weight", "bias", "mask"])
def test_one_argument_requiring_grad_records_the_graph(cpu_backend, which):
    """Calls that autograd would not record run the kernels directly; a call where any single
    argument requires grad still records, and gives that argument torchvision's gradient."""
    *arrays, kw = make_inputs(*CASES[-1][1:])  # weight and offset groups, dilation, mask
    tensors = dict(zip(("input", "offset", "weight", "bias", "mask"), arrays))
    with torch.no_grad():
        inference = deform_conv2d(**tensors, **kw)
    assert inference.grad_fn is None
    leaf = tensors[which].requires_grad_()
    ours = deform_conv2d(**tensors, **kw)
    assert ours.grad_fn is not None
    assert torch.equal(ours.detach(), inference)
    grad_out = torch.randn_like(ours)
    (ours_grad,) = torch.autograd.grad(ours, leaf, grad_out)
    theirs = torchvision.ops.deform_conv2d(**tensors, **kw)
    (theirs_grad,) = torch.autograd.grad(theirs, leaf, grad_out)
    assert_relative(ours_grad, theirs_grad, 1e-10)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_integer_offsets_match_torchvision_gradients(cpu_backend, case):
    """Integer offsets (a fresh layer's case): the offset gradient is the one-sided difference
    from the floor corner, exactly as torchvision computes it."""
    x, offset, weight, bias, mask, kw = make_inputs(*case[1:])
    offset = offset.round()
    ours, our_grads, grad_out = outputs_and_grads(deform_conv2d, x, offset, weight, bias, mask, kw)
    theirs, their_grads, _ = outputs_and_grads(torchvision.ops.deform_conv2d, x, offset, weight, bias, mask, kw,
                                               grad_out=grad_out)
    assert_relative(ours, theirs, 1e-10)
    for g, t in zip(our_grads, their_grads):
        if g is not None:
            assert_relative(g, t, 1e-10)


def test_integer_offset_gradient_is_forward_difference(cpu_backend):
    """At integer coordinates d out / d offset equals (f(o + h) - f(o)) / h for small h > 0."""
    x, offset, weight, bias, _, kw = make_inputs(1, 2, 5, 5, 2, 1, 1, (3, 3), 1, 1, 1, False)
    offset = offset.round().clamp(-2, 2)
    offset.requires_grad_()
    grad_out = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    (deform_conv2d(x, offset, weight, bias, **kw) * grad_out).sum().backward()
    h = 1e-7
    for index in [(0, 0, 2, 2), (0, 1, 0, 4), (0, 9, 3, 1), (0, 16, 4, 4)]:
        shifted = offset.detach().clone()
        shifted[index] += h
        diff = ((deform_conv2d(x, shifted, weight, bias, **kw) - deform_conv2d(x, offset.detach(), weight, bias, **kw))
                * grad_out).sum() / h
        assert abs(diff - offset.grad[index]) < 1e-5, index


def test_sampling_at_minus_one_keeps_offset_gradient(cpu_backend):
    """A sample at exactly y = -1 reads 0 but its offset gradient is not zeroed (torchvision's rule)."""
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    offset[0, 0, 0, :] = -1.0  # row 0 samples at y = -1
    ours, our_grads, grad_out = outputs_and_grads(deform_conv2d, x, offset, weight, None, None, {})
    theirs, their_grads, _ = outputs_and_grads(torchvision.ops.deform_conv2d, x, offset, weight, None, None, {},
                                               grad_out=grad_out)
    assert torch.equal(ours[0, 0, 0], torch.zeros(4, dtype=torch.float64))
    assert our_grads[1][0, 0, 0].abs().min() > 0
    assert_relative(our_grads[1], their_grads[1], 1e-12)


def test_offsets_leaving_the_map(cpu_backend):
    """Samples far outside the map contribute zero and zero gradient; partial ones match torchvision."""
    inputs = make_inputs(2, 2, 5, 5, 2, 1, 1, (3, 3), 1, 1, 1, True, offset_scale=6.0)
    ours, our_grads, grad_out = outputs_and_grads(deform_conv2d, *inputs)
    theirs, their_grads, _ = outputs_and_grads(torchvision.ops.deform_conv2d, *inputs, grad_out=grad_out)
    assert_relative(ours, theirs, 1e-10)
    for g, t in zip(our_grads, their_grads):
        assert_relative(g, t, 1e-10)
    x, offset, weight, bias, mask, kw = inputs
    far = torch.full_like(offset, 100.0)
    out = deform_conv2d(x, far, weight, None, mask=mask, **kw)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_zero_offsets_equal_conv2d(cpu_backend, case):
    """Zero offsets (and mask 1) give F.conv2d."""
    x, offset, weight, bias, mask, kw = make_inputs(*case[1:])
    groups = x.shape[1] // weight.shape[1]
    want = F.conv2d(x, weight, bias, groups=groups, **kw)
    offset = torch.zeros_like(offset)
    mask = None if mask is None else torch.ones_like(mask)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, mask=mask, **kw), want, rtol=1e-12, atol=1e-12)


def test_batch_100(cpu_backend):
    """Batch 100 runs and equals torchvision (peers have failed above 32/64)."""
    x, offset, weight, bias, mask, kw = make_inputs(100, 3, 6, 6, 4, 1, 1, (3, 3), 1, 1, 1, True,
                                                    dtype=torch.float32)
    out = deform_conv2d(x, offset, weight, bias, mask=mask, **kw)
    assert_relative(out, torchvision.ops.deform_conv2d(x, offset, weight, bias, mask=mask, **kw), 1e-4)


def test_empty_batch(cpu_backend):
    x, offset, weight, bias, mask, kw = make_inputs(0, 2, 5, 5, 3, 1, 1, (3, 3), 1, 1, 1, True)
    assert deform_conv2d(x, offset, weight, bias, mask=mask, **kw).shape == (0, 3, 5, 5)


def test_meta_tensors_give_shapes():
    """Shapes propagate on the meta device (no data)."""
    x = torch.empty(2, 4, 9, 11, device="meta")
    weight = torch.empty(6, 2, 3, 3, device="meta")
    offset = torch.empty(2, 2 * 2 * 9, 5, 6, device="meta")
    mask = torch.empty(2, 2 * 9, 5, 6, device="meta")
    out = deform_conv2d(x, offset, weight, None, stride=2, padding=1, mask=mask)
    assert out.shape == (2, 6, 5, 6) and out.device.type == "meta"


def test_double_backward_raises_on_kernels_and_works_on_reference(cpu_backend):
    """A gradient penalty through the kernels fails loudly (as torchvision's); the reference differentiates twice."""
    x, offset, weight, bias, mask, kw = make_inputs(1, 2, 5, 5, 3, 1, 1, (3, 3), 1, 1, 1, True)
    offset = offset.round() + 0.25 + 0.5 * torch.rand_like(offset)  # away from integer (non-smooth) points
    leaves = [t.requires_grad_() for t in (x, offset, weight, bias, mask)]

    def fn(*args):
        return deform_conv2d(args[0], args[1], args[2], args[3], mask=args[4], **kw)

    gx, goff = torch.autograd.grad(fn(*leaves).square().sum(), leaves[:2], create_graph=True)
    assert gx.requires_grad and goff.requires_grad
    if cpu_backend == "reference":
        assert torch.autograd.gradgradcheck(fn, leaves, eps=1e-6, atol=1e-5)
    else:
        message = (r"double backward of dcnbench.ops.deform_conv2d on the native backend is not supported; "
                   r"use dcnbench.ops.use_backend\('reference'\)")
        with pytest.raises(RuntimeError, match=message):
            (gx.square().sum() + goff.sum()).backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32_on_cpu(cpu_backend, dtype):
    """float16/bfloat16 give the float32 result and gradients, rounded to the input's dtype."""
    *tensors, kw = make_inputs(2, 4, 6, 5, 6, 2, 2, (3, 3), 1, 1, 1, True, dtype=dtype)
    got, got_grads, grad_out = outputs_and_grads(deform_conv2d, *tensors, kw)
    want, want_grads, _ = outputs_and_grads(deform_conv2d, *[t.float() for t in tensors], kw, grad_out=grad_out.float())
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == dtype and torch.equal(g, w.to(dtype))


def test_weight_without_output_channels_gives_empty_output(cpu_backend):
    """As torchvision: (N, 0, Ho, Wo) and zero (or empty) gradients."""
    inputs = make_inputs(2, 4, 5, 6, 0, 1, 1, (3, 3), 1, 1, 1, True)
    ours, our_grads, grad_out = outputs_and_grads(deform_conv2d, *inputs)
    theirs, their_grads, _ = outputs_and_grads(torchvision.ops.deform_conv2d, *inputs, grad_out=grad_out)
    assert ours.shape == theirs.shape == (2, 0, 5, 6)
    for g, t in zip(our_grads, their_grads):
        assert torch.equal(g, t)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_offsets_sample_nothing(cpu_backend, value):
    """A NaN or infinite offset puts its sampling point off the map (semantics note: 0 unless
    -1 < y < H and -1 < x < W): it reads 0 and gets zero gradients, as a point far outside does,
    and every other output and gradient is finite and unchanged."""
    *tensors, kw = make_inputs(2, 4, 5, 6, 3, 1, 2, (3, 3), 1, 1, 1, True)
    x, offset, weight, bias, mask = tensors
    bad, far = offset.clone(), offset.clone()
    bad[1, 3, 2, 4] = value   # dx of tap 1, group 0, output (2, 4) of sample 1
    bad[0, 20, 0, 1] = value  # dy of tap 1, group 1
    far[1, 3, 2, 4] = 1e6
    far[0, 20, 0, 1] = -1e6
    got, got_grads, grad_out = outputs_and_grads(deform_conv2d, x, bad, weight, bias, mask, kw)
    want, want_grads, _ = outputs_and_grads(deform_conv2d, x, far, weight, bias, mask, kw, grad_out=grad_out)
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("integer_offsets", [False, True], ids=["fractional", "integer"])
def test_non_finite_features_reach_the_same_outputs_as_torchvision(cpu_backend, value, integer_offsets):
    """A NaN or infinite pixel reaches exactly the outputs and gradients that torchvision's op lets
    it reach: those of sampling points with that pixel as an on-map corner (weight 0 included). A
    corner off the map reads nothing, so a non-finite pixel on the border (where off-map corners
    used to read pixel 0 at weight 0) does not spread to other outputs."""
    *tensors, kw = make_inputs(2, 4, 5, 6, 3, 1, 2, (3, 3), 1, 1, 1, True, offset_scale=1.5)
    x, offset, weight, bias, mask = tensors
    if integer_offsets:
        offset = offset.round()
    x[0, 1, 0, 0] = value
    x[1, 2, 4, 5] = value
    x[1, 0, 2, 3] = value
    _assert_non_finite_as_in_torchvision(x, offset, weight, bias, mask, kw)


def _assert_non_finite_as_in_torchvision(x, offset, weight, bias, mask, kw):
    """Output and every gradient: NaN and inf where torchvision's are, the finite values equal."""
    ours, our_grads, grad_out = outputs_and_grads(deform_conv2d, x, offset, weight, bias, mask, kw)
    theirs, their_grads, _ = outputs_and_grads(torchvision.ops.deform_conv2d, x, offset, weight, bias, mask, kw,
                                               grad_out=grad_out)
    assert ours.isnan().any()
    for name, g, t in zip(("output", "input", "offset", "weight", "bias", "mask"), [ours] + our_grads,
                          [theirs] + their_grads):
        assert torch.equal(g.isnan(), t.isnan()), f"{name}: NaN at other places than torchvision's"
        assert torch.equal(g.isinf(), t.isinf()), f"{name}: inf at other places than torchvision's"
        finite = g.isfinite()
        assert_relative(g[finite], t[finite], 1e-10)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_mask_reaches_its_output_as_in_torchvision(cpu_backend, value):
    """A NaN or inf mask value multiplies its sample's value, 0 where the point is off the map, so
    the output and the gradients are NaN or inf exactly where torchvision's are (the native kernel
    skipped such samples: a finite output, then a zero offset gradient)."""
    *tensors, kw = make_inputs(2, 4, 5, 6, 3, 1, 2, (3, 3), 1, 1, 1, True, offset_scale=1.5)
    x, offset, weight, bias, mask = tensors
    offset[0, 0, 1, 2] = 1e6  # tap 0 of output (1, 2) far off the map...
    mask[0, 0, 1, 2] = value  # ...with a non-finite mask
    mask[1, 13, 3, 3] = value  # and one on the map
    _assert_non_finite_as_in_torchvision(x, offset, weight, bias, mask, kw)
