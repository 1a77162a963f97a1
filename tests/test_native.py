"""Native C++ CPU backend: equal to the reference, deterministic, big batches, fallback, torch.compile.

The operator semantics themselves are tested on every backend in test_deform_conv.py and
test_roi_pool.py; this file checks what is specific to the native kernels.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dcnbench.ops import (DeformConv2d, DeformPSRoIPool, DeformRoIPool, deform_conv2d, deform_ps_roi_pool, deform_roi_pool,
                          use_backend)
from dcnbench.ops.dispatch import backend_status

ok, why = backend_status("native")
pytestmark = pytest.mark.skipif(not ok, reason=f"native backend unavailable: {why}")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}

# (name, N, C, H, W, O, groups, offset_groups, (kh, kw), stride, padding, dilation, masked, bias)
CONV_CASES = [
    ("plain", 2, 3, 7, 8, 4, 1, 1, (3, 3), 1, 1, 1, False, True),
    ("no_bias", 1, 3, 6, 6, 2, 1, 1, (3, 3), 1, 1, 1, False, False),
    ("masked", 2, 4, 6, 7, 3, 1, 1, (3, 3), 1, 1, 1, True, True),
    ("groups2", 2, 4, 6, 6, 4, 2, 1, (3, 3), 1, 1, 1, False, True),
    ("offset_groups2_masked", 2, 4, 6, 5, 2, 1, 2, (3, 3), 1, 1, 1, True, False),
    ("groups2_offset_groups4", 1, 8, 5, 6, 4, 2, 4, (3, 3), 1, 1, 1, True, True),
    ("groups4_offset_groups2", 1, 8, 5, 6, 4, 4, 2, (3, 3), 1, 1, 1, False, True),
    ("stride2", 2, 3, 9, 8, 2, 1, 1, (3, 3), 2, 1, 1, False, True),
    ("dilation2", 1, 3, 9, 9, 2, 1, 1, (3, 3), 1, 2, 2, True, True),
    ("nonsquare", 2, 3, 7, 9, 3, 1, 1, (2, 3), (1, 2), (1, 0), (2, 1), True, True),
    ("kernel1", 1, 5, 4, 4, 3, 1, 1, (1, 1), 1, 0, 1, False, True),
]


def conv_inputs(n, c, h, w, o, groups, og, kernel, stride, padding, dilation, masked, bias, dtype, offset_scale=2.5,
                integer_offsets=False):
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, pair(stride), pair(padding), pair(dilation)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x = torch.randn(n, c, h, w, dtype=dtype)
    offset = torch.randn(n, 2 * og * kh * kw, ho, wo, dtype=dtype) * offset_scale
    if integer_offsets:
        offset = offset.round()
    weight = torch.randn(o, c // groups, kh, kw, dtype=dtype)
    b = torch.randn(o, dtype=dtype) if bias else None
    mask = torch.rand(n, og * kh * kw, ho, wo, dtype=dtype) if masked else None
    return [x, offset, weight, b, mask], dict(stride=stride, padding=padding, dilation=dilation)


def run_conv(backend, tensors, kwargs, seed=1):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    x, offset, weight, b, mask = leaves
    with use_backend(backend):
        out = deform_conv2d(x, offset, weight, b, mask=mask, **kwargs)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


def assert_all_close(a, b, dtype):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        scale = max(1.0, v.abs().max().item()) if v.numel() else 1.0
        torch.testing.assert_close(u, v, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale,
                                   msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_native_equals_reference(case, dtype):
    tensors, kwargs = conv_inputs(*case[1:], dtype=dtype)
    assert_all_close(run_conv("native", tensors, kwargs), run_conv("reference", tensors, kwargs), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_conv_integer_offsets_and_zero_offsets(dtype):
    # Integer sampling points (a fresh layer's zero offsets, and integer shifts that reach the
    # map's border at y = -1 / x = -1 exactly): the one-sided offset gradient must match.
    tensors, kwargs = conv_inputs(2, 3, 6, 7, 2, 1, 1, (3, 3), 1, 1, 1, True, True, dtype, integer_offsets=True)
    native, ref = run_conv("native", tensors, kwargs), run_conv("reference", tensors, kwargs)
    assert_all_close(native, ref, dtype)
    assert native[2].abs().sum() > 0  # offset gradient is not trivially zero
    tensors[1] = torch.zeros_like(tensors[1])
    assert_all_close(run_conv("native", tensors, kwargs), run_conv("reference", tensors, kwargs), dtype)


def test_conv_offsets_leaving_the_map():
    # Large offsets: most sampling points fall off the map (value and gradients zero there).
    tensors, kwargs = conv_inputs(2, 3, 5, 5, 2, 1, 1, (3, 3), 1, 1, 1, True, True, torch.float64, offset_scale=8.0)
    native = run_conv("native", tensors, kwargs)
    assert_all_close(native, run_conv("reference", tensors, kwargs), torch.float64)
    assert (native[2] == 0).any()


@pytest.mark.parametrize("tile_min", [7, 30])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_many_tiles(monkeypatch, batch, threads, tile_min):
    # A tiny tile budget forces many tiles per sample (of tile_min pixels), the last one partial.
    # Batch 3 at 2 threads splits the samples over the threads; batch 1 splits each sample's tiles
    # (99 pixels >= 2 threads x 2 tiles of 7) or, with tiles of 30, runs its forward tiles in order
    # with the sampling and GEMMs multithreaded.
    monkeypatch.setenv("DCNBENCH_NATIVE_TILE_BYTES", "64")
    monkeypatch.setenv("DCNBENCH_NATIVE_TILE_MIN", str(tile_min))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors, kwargs = conv_inputs(batch, 4, 9, 11, 4, 2, 2, (3, 3), 1, 1, 1, True, True, torch.float64)
        native = run_conv("native", tensors, kwargs)
        assert_all_close(native, run_conv("reference", tensors, kwargs), torch.float64)
        for u, v in zip(native, run_conv("native", tensors, kwargs)):
            assert torch.equal(u, v)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads,dtype,channels,size,groups", [(1, torch.float32, 3, 320, 1),
                                                                 (2, torch.float64, 64, 30, 64)],
                         ids=["1thread_320px", "2threads_64_offset_groups"])
def test_conv_sampling_points_over_the_kept_scratch_size(threads, dtype, channels, size, groups):
    """A sample run as one tile whose sampling points take more than the 64 MB a scratch slot keeps
    (102,400 pixels x 9 taps x 76 bytes; 900 pixels x 576 taps x 136 bytes) runs and equals
    F.conv2d at zero offsets: that buffer used to be freed before the sampling wrote it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(1, channels, size, size, dtype=dtype)
        weight = torch.randn(4, channels, 3, 3, dtype=dtype)
        offset = torch.zeros(1, 2 * groups * 9, size, size, dtype=dtype)
        with use_backend("native"), torch.no_grad():
            got = deform_conv2d(x, offset, weight, padding=1)
        torch.testing.assert_close(got, torch.nn.functional.conv2d(x, weight, padding=1), **TOL[dtype])
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("batch,threads,tile_min", [(1, 1, 16), (1, 2, 8), (3, 2, 256)],
                         ids=["in_order_tiles", "split", "batch_parallel"])
def test_conv_forward_with_packed_weight(monkeypatch, batch, threads, tile_min, groups):
    """float32 weights of 1 MB or more per group (192 x 192*9 here), used by several GEMMs per
    thread (tiles or samples), go through MKL's packed GEMM, packed once per call: the forward still
    equals the reference, and a second call with a changed weight uses the new weight."""
    if not __import__("dcnbench.ops.native", fromlist=["_ext"])._ext().packed_gemm():
        pytest.skip("torch's BLAS does not export MKL's packed GEMM")
    monkeypatch.setenv("DCNBENCH_NATIVE_TILE_BYTES", "64")
    monkeypatch.setenv("DCNBENCH_NATIVE_TILE_MIN", str(tile_min))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors, kwargs = conv_inputs(batch, 192 * groups, 9, 11, 192 * groups, groups, 1, (3, 3), 1, 2, 2, False,
                                      True, torch.float32)
        for _ in range(2):
            with torch.no_grad():
                with use_backend("native"):
                    got = deform_conv2d(*tensors[:4], **kwargs)
                with use_backend("reference"):
                    want = deform_conv2d(*tensors[:4], **kwargs)
            assert_all_close([got], [want], torch.float32)
            tensors[2].mul_(-0.5)
    finally:
        torch.set_num_threads(previous)


def test_conv_batch_100():
    tensors, kwargs = conv_inputs(100, 4, 9, 11, 3, 1, 1, (3, 3), 1, 1, 1, True, True, torch.float32)
    assert_all_close(run_conv("native", tensors, kwargs), run_conv("reference", tensors, kwargs), torch.float32)


@pytest.mark.parametrize("batch,threads", [(1, 1), (3, 2)], ids=["in_order", "batch_parallel"])
def test_conv_gradients_are_written_whole(batch, threads):
    """The kernels write every input, offset and mask gradient element (their buffers are not
    zeroed first): with freed NaN-filled blocks of those sizes for the allocator to hand out, the
    gradients still equal the reference's."""
    tensors, kwargs = conv_inputs(batch, 6, 9, 8, 4, 1, 2, (3, 3), 1, 1, 2, True, False, torch.float64)
    want = run_conv("reference", tensors, kwargs)
    dirty = [torch.full_like(t, float("nan")) for t in tensors if t is not None for _ in range(3)]
    del dirty
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run_conv("native", tensors, kwargs)
    finally:
        torch.set_num_threads(previous)
    assert_all_close(got, want, torch.float64)


@pytest.mark.parametrize("batch,threads", [(1, 1), (1, 2), (3, 2)], ids=["in_order", "split", "batch_parallel"])
def test_conv_scratch_reuse_carries_nothing_over(monkeypatch, batch, threads):
    """Each thread keeps its column and channels-last buffers between calls: a call right after a
    larger one whose input was all NaN (so the kept channels-last input and column buffers, and in
    the split backward the input- and weight-gradient partials, hold NaN) still equals the reference."""
    monkeypatch.setenv("DCNBENCH_NATIVE_TILE_MIN", "8")  # split: 99 pixels >= 2 threads x 2 tiles of 8
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        poison, kwargs = conv_inputs(batch, 6, 13, 14, 4, 1, 2, (3, 3), 1, 1, 1, True, True, torch.float64)
        poison[0] = torch.full_like(poison[0], float("nan"))
        assert run_conv("native", poison, kwargs)[0].isnan().any()
        tensors, kwargs = conv_inputs(batch, 4, 9, 11, 4, 1, 2, (3, 3), 1, 1, 1, True, True, torch.float64)
        got = run_conv("native", tensors, kwargs)
    finally:
        torch.set_num_threads(previous)
    assert_all_close(got, run_conv("reference", tensors, kwargs), torch.float64)


def test_conv_scratch_kept_under_inference_mode_serves_training():
    # Buffers first made under torch.inference_mode() are written again by a later training call.
    tensors, kwargs = conv_inputs(1, 4, 9, 11, 4, 1, 1, (3, 3), 1, 1, 1, True, True, torch.float64)
    with torch.inference_mode(), use_backend("native"):
        deform_conv2d(tensors[0], tensors[1], tensors[2], tensors[3], mask=tensors[4], **kwargs)
    assert_all_close(run_conv("native", tensors, kwargs), run_conv("reference", tensors, kwargs), torch.float64)


def test_conv_gradients_bitwise_deterministic():
    tensors, kwargs = conv_inputs(4, 32, 20, 20, 16, 1, 1, (3, 3), 1, 2, 2, True, True, torch.float32)
    first = run_conv("native", tensors, kwargs)
    for _ in range(2):
        again = run_conv("native", tensors, kwargs)
        for u, v in zip(first, again):
            assert torch.equal(u, v)


def test_conv_gradcheck_native():
    tensors, kwargs = conv_inputs(1, 2, 4, 5, 2, 1, 1, (2, 2), 1, 1, 1, True, True, torch.float64, offset_scale=0.7)
    leaves = [t.requires_grad_() for t in tensors]

    def fn(x, offset, weight, b, mask):
        return deform_conv2d(x, offset, weight, b, mask=mask, **kwargs)

    with use_backend("native"):
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


# (name, N, C_in, H, W, K, output_size, spatial_scale, sampling, gamma, position_sensitive, offset (n, P))
ROI_CASES = [
    ("ps_class_specific", 2, 2 * 9 * 3, 10, 12, 6, 3, 0.25, 2, 0.3, True, (3, 3)),
    ("ps_agnostic_parts2", 2, 4 * 9, 9, 8, 5, 3, 0.5, 3, 0.1, True, (1, 2)),
    ("ps_plain", 1, 2 * 4, 8, 8, 4, 2, 0.5, 2, 0.1, True, None),
    ("deform_roi_pool", 2, 5, 11, 9, 7, (3, 4), 0.25, 4, 0.1, False, (1, 3)),
    ("roi_pool_classes", 1, 6, 8, 10, 3, 2, 0.5, 2, 0.2, False, (3, 2)),
    ("roi_pool_plain", 2, 3, 7, 7, 4, 3, 1.0, 1, 0.1, False, None),
    ("no_rois", 1, 2 * 9, 6, 6, 0, 3, 0.5, 2, 0.1, True, (2, 3)),
    ("ps_sampling4", 2, 3 * 9, 12, 14, 6, 3, 0.5, 4, 0.2, True, (3, 3)),  # both windows in one loop
    ("ps_sampling5", 2, 3 * 4, 9, 10, 5, 2, 0.5, 5, 0.2, True, (3, 2)),
    ("ps_sampling9", 1, 2 * 4, 9, 10, 4, 2, 0.5, 9, 0.2, True, (1, 2)),
    # Bin footprints beyond the 8-column window (up to ~23 px), beyond the 24 px profiles (one bin
    # per roi), and a map narrower than the window.
    ("ps_wide_bins", 1, 2 * 4, 40, 64, 8, 2, 1.0, 3, 0.1, True, (1, 2)),
    ("ps_one_bin", 1, 2, 40, 64, 6, 1, 1.0, 4, 0.1, True, (1, 1)),
    ("ps_narrow_map", 1, 2 * 4, 6, 5, 4, 2, 0.5, 2, 0.1, True, (1, 2)),
]


def roi_inputs(n, c_in, h, w, k, output_size, scale, dtype, offset_spec):
    img_h, img_w = h / scale, w / scale
    x1 = torch.rand(k) * img_w * 1.1 - 0.1 * img_w
    y1 = torch.rand(k) * img_h * 1.1 - 0.1 * img_h
    rois = torch.stack([torch.randint(0, n, (k,)).float(), x1, y1, x1 + torch.rand(k) * img_w * 0.7,
                        y1 + torch.rand(k) * img_h * 0.7], dim=1).to(dtype)
    x = torch.randn(n, c_in, h, w, dtype=dtype)
    offset = None
    if offset_spec is not None:
        n_cls, parts = offset_spec
        offset = torch.randn(k, 2 * n_cls, parts, parts, dtype=dtype) * 2
    return x, rois, offset


def run_roi(backend, x, rois, offset, args, position_sensitive):
    x = x.detach().clone().requires_grad_()
    off = offset.detach().clone().requires_grad_() if offset is not None else None
    fn = deform_ps_roi_pool if position_sensitive else deform_roi_pool
    with use_backend(backend):
        out = fn(x, rois, off, *args)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    out.backward(grad)
    return [out.detach(), x.grad] + ([off.grad] if off is not None else [])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", ROI_CASES, ids=[c[0] for c in ROI_CASES])
def test_roi_native_equals_reference(case, dtype):
    name, n, c_in, h, w, k, output_size, scale, sampling, gamma, ps, offset_spec = case
    x, rois, offset = roi_inputs(n, c_in, h, w, k, output_size, scale, dtype, offset_spec)
    args = (output_size, scale, sampling, gamma)
    native = run_roi("native", x, rois, offset, args, ps)
    ref = run_roi("reference", x, rois, offset, args, ps)
    if k == 0:
        # No rois: empty output, zero input gradient; an empty offset's gradient may be None.
        assert native[0].shape == ref[0].shape and native[0].shape[0] == 0
        assert torch.count_nonzero(native[1]) == 0
        native, ref = native[:2], ref[:2]
    assert_all_close(native, ref, dtype)


def test_ps_roi_input_gradient_is_zero_on_images_without_rois():
    """The PS kernel zeroes the input gradient itself: images no roi points at must come out zero."""
    x, rois, offset = roi_inputs(3, 2 * 9, 12, 12, 10, 3, 0.5, torch.float32, (2, 3))
    rois[:, 0] = 1
    dirty = [torch.full_like(x, float("nan")) for _ in range(4)]
    del dirty  # freed blocks of the gradient's size, full of NaN, for the allocator to hand out again
    grad_x = run_roi("native", x, rois, offset, (3, 0.5, 2, 0.1), True)[1]
    assert torch.count_nonzero(grad_x[0]) == 0 and torch.count_nonzero(grad_x[2]) == 0
    assert torch.count_nonzero(grad_x[1]) > 0


def test_ps_roi_offset_gradient_is_written_whole():
    """The PS kernel writes every offset-gradient entry itself (its buffer is not zeroed first):
    with freed NaN-filled blocks of that size for the allocator to hand out, it still equals the
    reference's."""
    x, rois, offset = roi_inputs(2, 2 * 9, 12, 12, 10, 3, 0.5, torch.float64, (2, 3))
    args = (3, 0.5, 2, 0.1)
    want = run_roi("reference", x, rois, offset, args, True)[2]
    dirty = [torch.full_like(offset, float("nan")) for _ in range(4)]
    del dirty
    got = run_roi("native", x, rois, offset, args, True)[2]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_roi_gradients_bitwise_deterministic():
    x, rois, offset = roi_inputs(2, 4 * 9, 16, 20, 40, 3, 0.25, torch.float32, (4, 3))
    args = (3, 0.25, 4, 0.1)
    first = run_roi("native", x, rois, offset, args, True)
    again = run_roi("native", x, rois, offset, args, True)
    for u, v in zip(first, again):
        assert torch.equal(u, v)


def test_fallback_without_native_warns_once():
    script = textwrap.dedent("""
        import warnings, torch
        from dcnbench.ops import deform_conv2d, backend_for
        from dcnbench.ops import reference
        x = torch.randn(1, 2, 5, 5); off = torch.randn(1, 18, 5, 5); w = torch.randn(3, 2, 3, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = deform_conv2d(x, off, w, padding=1)
            b = deform_conv2d(x, off, w, padding=1)
        msgs = [str(c.message) for c in caught if "dcnbench" in str(c.message)]
        assert len(msgs) == 1, msgs
        assert "\\n" not in msgs[0] and "reference" in msgs[0], msgs[0]
        assert backend_for(x) == "reference"
        assert torch.equal(a, reference.deform_conv2d(x, off, w, None, (1, 1), (1, 1), (1, 1), None))
        print("FALLBACK-OK")
    """)
    env = dict(os.environ, DCNBENCH_NO_NATIVE="1")
    env.pop("DCNBENCH_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "FALLBACK-OK" in done.stdout


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Conv2d(3, 18, 3, padding=1)
        self.mask = torch.nn.Conv2d(3, 9, 3, padding=1)
        self.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.bias = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = deform_conv2d(x, self.offset(x), self.weight, self.bias, padding=1, mask=torch.sigmoid(self.mask(x)))
        return torch.relu(y).mean()


def _compiled_matches_eager(model, x):
    torch._dynamo.reset()
    with use_backend("native"):
        eager = model(x)
        eager_grads = torch.autograd.grad(eager, list(model.parameters()))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        grads = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


class _TinyOp(_Tiny):
    """Calls the custom op directly (no Python dispatch in the traced code)."""

    def forward(self, x):
        y = torch.ops.dcnbench.deform_conv2d(x, self.offset(x), self.weight, self.bias, torch.sigmoid(self.mask(x)),
                                             [1, 1], [1, 1], [1, 1])
        return torch.relu(y).mean()


def test_torch_compile_fullgraph_custom_op():
    _compiled_matches_eager(_TinyOp(), torch.randn(2, 3, 8, 8))


def test_torch_compile_fullgraph_public_function():
    _compiled_matches_eager(_Tiny(), torch.randn(2, 3, 8, 8))


def test_opcheck_custom_ops():
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    off = torch.randn(1, 18, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    m = torch.rand(1, 9, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.dcnbench.deform_conv2d.default, (x, off, w, b, m, [1, 1], [1, 1], [1, 1]))
    torch.library.opcheck(torch.ops.dcnbench.deform_conv2d.default,
                          (x, off, w, None, None, [1, 1], [1, 1], [1, 1]))
    inp, rois, offset = roi_inputs(1, 2 * 4, 6, 7, 3, 2, 0.5, torch.float64, (2, 2))
    inp.requires_grad_()
    offset.requires_grad_()
    torch.library.opcheck(torch.ops.dcnbench.deform_roi_pool.default,
                          (inp, rois, offset, [2, 2], 0.5, 2, 0.1, True))
    torch.library.opcheck(torch.ops.dcnbench.deform_roi_pool.default,
                          (inp, rois, None, [2, 2], 0.5, 2, 0.1, False))


def _conv_and_roi_calls():
    """(name, fn, args): a deform_conv2d call and a deformable PS RoI pooling call."""
    x, rois, offset = roi_inputs(2, 2 * 4, 6, 7, 3, 2, 0.5, torch.float32, (2, 2))
    tensors, kwargs = conv_inputs(2, 3, 6, 7, 4, 1, 1, (3, 3), 1, 1, 1, True, True, torch.float32)
    conv = lambda i, o, w, b, m: deform_conv2d(i, o, w, b, mask=m, **kwargs)  # noqa: E731
    roi = lambda i, r, o: deform_ps_roi_pool(i, r, o, output_size=2, spatial_scale=0.5,  # noqa: E731
                                             sampling_ratio=2)
    return [("conv", conv, tensors), ("roi", roi, [x, rois, offset])]


def test_fake_tensors_and_make_fx_propagate_shapes(cpu_backend):
    """Under FakeTensorMode and make_fx (fake and symbolic) the ops give their output shapes: the
    kernels are reached through the custom ops' fake implementations and the RoI value checks,
    which need values, are skipped (the native kernels used to be called on data-less tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    for name, fn, args in _conv_and_roi_calls():
        want = fn(*args).shape
        with FakeTensorMode() as mode:
            assert fn(*[mode.from_tensor(t) for t in args]).shape == want, name
        for tracing_mode in ("fake", "symbolic"):
            graph = make_fx(fn, tracing_mode=tracing_mode)(*args)
            torch.testing.assert_close(graph(*args), fn(*args), msg=lambda m: f"{name} {tracing_mode}: {m}")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_replays_the_call(cpu_backend):
    """torch.jit.trace records the call (the native kernels as their custom op) and replays it."""
    for name, fn, args in _conv_and_roi_calls():
        traced = torch.jit.trace(fn, tuple(args), check_trace=False)
        torch.testing.assert_close(traced(*args), fn(*args), msg=lambda m: f"{name}: {m}")


class _ConvThenPool(torch.nn.Module):
    """A modulated deformable conv (three offset groups) feeding deformable PS RoI pooling."""

    def __init__(self):
        super().__init__()
        self.conv = DeformConv2d(3, 8, 3, padding=1, offset_groups=3, modulated=True)
        torch.nn.init.normal_(self.conv.offset_conv.weight, std=0.3)

    def forward(self, x, rois, offset):
        return deform_ps_roi_pool(self.conv(x), rois, offset, output_size=2, spatial_scale=0.5, sampling_ratio=2)


@pytest.mark.filterwarnings("ignore:No complete tensor found in the group:UserWarning")  # torch.export.save's own
def test_torch_export_runs_reloaded_and_at_other_shapes(tmp_path):
    """torch.export captures the ops as dcnbench's custom ops with no backend baked in (the kernels
    follow the tensors' device when the program runs); the saved and reloaded program gives the
    eager output, also at another batch and map size (dynamic shapes)."""
    model = _ConvThenPool().eval()
    x, rois = torch.randn(2, 3, 10, 12), torch.tensor([[0, 1.0, 1, 15, 12], [1, 4, 2, 20, 18]])
    offset = 0.1 * torch.randn(2, 2, 2, 2)
    dims = {"x": {0: torch.export.Dim("n", min=1), 2: torch.export.Dim("h", min=4), 3: torch.export.Dim("w", min=4)},
            "rois": None, "offset": None}
    with use_backend("native"), torch.no_grad():
        program = torch.export.export(model, (x, rois, offset), dynamic_shapes=dims)
        code = program.graph_module.code
        assert "dcnbench.deform_conv2d" in code and "dcnbench.deform_roi_pool" in code, code
        assert "native" not in code, code
        torch.export.save(program, tmp_path / "model.pt2")
        reloaded = torch.export.load(tmp_path / "model.pt2").module()
        for inputs in [(x, rois, offset), (torch.randn(3, 3, 9, 14), rois, offset)]:
            torch.testing.assert_close(reloaded(*inputs), model(*inputs))


def test_exported_program_and_direct_op_calls_take_any_strides():
    """An exported program is not tied to its example inputs' layout: the public ops' .contiguous()
    calls were no-ops on contiguous examples and left no trace in the graph, so the program handed
    channels-last or transposed tensors to the kernels, which refused them. The custom ops (called
    directly too) now give the kernels dense tensors; forward and gradients match eager."""
    model = _ConvThenPool()
    x, rois = torch.randn(2, 3, 10, 12), torch.tensor([[0, 1.0, 1, 15, 12], [1, 4, 2, 20, 18]])
    offset = 0.1 * torch.randn(2, 2, 2, 2)
    with use_backend("native"):
        program = torch.export.export(model, (x, rois, offset)).module()
        strided = [(x.to(memory_format=torch.channels_last), rois, offset),
                   (x.transpose(2, 3).contiguous().transpose(2, 3), rois.t().contiguous().t(),
                    offset.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2))]
        for inputs in strided:
            assert not all(t.is_contiguous() for t in inputs)
            leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_(i != 1)
                      for i, t in enumerate(inputs)]  # the map and the offsets; not the boxes
            got = program(*leaves)
            got.square().sum().backward()
            dense = [t.detach().contiguous().requires_grad_(i != 1) for i, t in enumerate(inputs)]
            want = model(*dense)
            want.square().sum().backward()
            torch.testing.assert_close(got, want)
            for i in (0, 2):
                torch.testing.assert_close(leaves[i].grad, dense[i].grad)
        x4, w = torch.randn(1, 4, 6, 6), torch.randn(5, 4, 3, 3)
        off = 0.5 * torch.randn(1, 18, 6, 6)
        want = deform_conv2d(x4, off, w, padding=1)
        got = torch.ops.dcnbench.deform_conv2d(x4.to(memory_format=torch.channels_last),
                                               off.to(memory_format=torch.channels_last),
                                               w.transpose(0, 1).contiguous().transpose(0, 1),
                                               None, None, [1, 1], [1, 1], [1, 1])
        torch.testing.assert_close(got, want)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_inference_graphs_run_at_other_map_sizes():
    """Without autograd, a wide layer's offset branch ran as _conv_by_taps, whose Python branch and
    slices are fixed by the traced input's shape: an export with a dynamic map size failed on its
    guard, and a graph traced at 24x24 failed at 13x17. Traces now record the offset conv."""
    layer = DeformConv2d(128, 8, 3, stride=2, padding=1).eval().requires_grad_(False)
    torch.nn.init.normal_(layer.offset_conv.weight, std=0.01)
    example, others = torch.randn(1, 128, 24, 24), [torch.randn(1, 128, 13, 17), torch.randn(2, 128, 31, 9)]
    size = torch.export.Dim("size", min=8, max=64)
    exported = torch.export.export(layer, (example,), dynamic_shapes={"input": {2: size, 3: size}}).module()
    with torch.no_grad():
        traced = torch.jit.trace(layer, example, check_trace=False)
        for x in others:
            torch.testing.assert_close(traced(x), layer(x))
        torch.testing.assert_close(exported(others[0][:, :, :13, :13]), layer(others[0][:, :, :13, :13]))


def test_exported_roi_pooling_refuses_bad_boxes_when_it_runs(tmp_path):
    """The boxes' values are checked inside the op, so an exported program (which skips the checks
    while it is traced) refuses a batch index off the input as eager does: it read past the map
    (garbage, or a segfault for index 1e6)."""
    model = _ConvThenPool().eval()
    x, rois, offset = torch.randn(1, 3, 10, 12), torch.tensor([[0, 1.0, 1, 15, 12]]), torch.zeros(1, 2, 2, 2)
    with use_backend("native"), torch.no_grad():
        program = torch.export.export(model, (x, rois, offset)).module()
        for index in (1.0, 1e6, -1e6, 0.5):
            with pytest.raises(ValueError, match=r"rois\[:, 0\] must hold integer batch indices in \[0, 0\]"):
                program(x, torch.tensor([[index, 1.0, 1, 15, 12]]), offset)
        with pytest.raises(ValueError, match="rois must hold finite box coordinates"):
            program(x, torch.tensor([[0, 1.0, float("nan"), 15, 12]]), offset)


def test_roi_pooling_compiles_with_fullgraph(cpu_backend):
    """torch.compile(fullgraph=True) of the public RoI pooling: the value checks of the boxes ran
    in the traced code and broke the graph on their data-dependent branch; they now run inside the
    kernels' op, which still refuses a bad batch index (the compiled reference skips them)."""
    torch._dynamo.reset()
    x, rois = torch.randn(1, 8, 8, 8), torch.tensor([[0.0, 1, 1, 6, 6]])
    offset = 0.1 * torch.randn(1, 2, 2, 2)
    pool = lambda i, r, o: deform_ps_roi_pool(i, r, o, output_size=2, spatial_scale=0.5, sampling_ratio=2)  # noqa: E731
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, rois, offset), pool(x, rois, offset))
    if cpu_backend == "native":
        with pytest.raises(ValueError, match=r"rois\[:, 0\] must hold integer batch indices"):
            compiled(x, torch.tensor([[1.0, 1, 1, 6, 6]]), offset)


def test_roi_pooling_compiles_with_dynamic_floats(cpu_backend):
    """torch.compile(fullgraph=True, dynamic=True) of the RoI modules, and a compiled call taking
    spatial_scale as an argument that changes (recompiled with a symbolic float): the settings'
    finite checks called math.isfinite on a symbolic float and broke the graph. While tracing they
    are left to the kernels' op, which still refuses a bad value (the compiled reference does not
    check it)."""
    x, rois = torch.randn(2, 8, 10, 12), torch.tensor([[0, 1.0, 1, 15, 12], [1, 4, 2, 18, 18]])
    pool, ps_pool = DeformRoIPool(8, 3, 0.5, 2), DeformPSRoIPool(8, 2, 2, 0.5, 2)
    with torch.no_grad():
        torch.nn.init.normal_(pool.offset_fc.weight, std=0.1)
        torch.nn.init.normal_(ps_pool.offset_conv.weight, std=0.1)
        for module, inputs in [(pool, (x, rois)), (ps_pool, (x, x, rois))]:
            torch._dynamo.reset()
            compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
            torch.testing.assert_close(compiled(*inputs), module(*inputs))
        torch._dynamo.reset()
        pool = lambda i, r, s: deform_roi_pool(i, r, None, 3, s, 2)  # noqa: E731
        compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
        for scale in (0.5, 0.25, 0.125):
            torch.testing.assert_close(compiled(x, rois, scale), pool(x, rois, scale))
        if cpu_backend == "native":
            with pytest.raises(ValueError, match="spatial_scale must be finite and > 0, got -0.5"):
                compiled(x, rois, -0.5)


@pytest.mark.parametrize("call,error", [
    (lambda x, w: torch.ops.dcnbench.deform_conv2d(x, torch.zeros(1, 18, 6, 6), w, None, None, [1, 1], [1, 1],
                                                   [1, 1]), r"offset must have shape \(4, 2\*offset_groups"),
    (lambda x, w: torch.ops.dcnbench.deform_conv2d(x, torch.zeros(4, 18, 60, 60), w, None, None, [1, 1], [1, 1],
                                                   [1, 1]), r"offset must have shape \(4, 2\*offset_groups"),
    (lambda x, w: torch.ops.dcnbench.deform_conv2d(x, torch.zeros(4, 18, 6, 6), w, None, torch.zeros(1, 9, 1, 1),
                                                   [1, 1], [1, 1], [1, 1]), r"mask must have shape \(4, 9, 6, 6\)"),
    (lambda x, w: torch.ops.dcnbench.deform_conv2d_backward(torch.zeros(4, 2, 5, 5), x, torch.zeros(4, 18, 6, 6), w,
                                                            None, None, [1, 1], [1, 1], [1, 1]),
     r"grad_output must have the output's shape \(4, 2, 6, 6\)"),
    (lambda x, w: torch.ops.dcnbench.deform_roi_pool(x, torch.tensor([[0.0, 1, 1, 4, 4]]), torch.zeros(2, 2, 2, 2),
                                                     [2, 2], 1.0, 2, 0.1, False), r"offset must have shape \(1, 2\*n"),
    (lambda x, w: torch.ops.dcnbench.deform_roi_pool_backward(torch.zeros(1, 2, 3, 3), x,
                                                              torch.tensor([[0.0, 1, 1, 4, 4]]), None, [2, 2], 1.0,
                                                              2, 0.1, False),
     r"grad_output must have the output's shape \(1, 2, 2, 2\)"),
])
def test_the_custom_ops_called_directly_check_their_arguments(call, error):
    """The kernels behind ``torch.ops.dcnbench.*`` trusted their callers' shapes: an offset of
    another batch or map size, or a mask of one pixel, was read past its end (garbage, NaN)."""
    x, w = torch.randn(4, 2, 6, 6), torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match=error):
        call(x, w)


def test_torch_func_transforms_run_the_reference(cpu_backend):
    """torch.func.vmap and torch.func.grad work (inside a transform the reference runs, whatever
    the backend) and equal the batched call and autograd's gradient."""
    from dcnbench.ops import backend_for

    _, conv, (x, offset, weight, bias, mask) = _conv_and_roi_calls()[0]
    per_sample = torch.func.vmap(lambda i, o, m: conv(i[None], o[None], weight, bias, m[None])[0])(x, offset, mask)
    torch.testing.assert_close(per_sample, conv(x, offset, weight, bias, mask))
    seen = []
    grad_offset = torch.func.grad(lambda o: (seen.append(backend_for(o)), conv(x, o, weight, bias, mask).sum())[1])(
        offset)
    assert seen == ["reference"]
    leaf = offset.clone().requires_grad_()
    conv(x, leaf, weight, bias, mask).sum().backward()
    torch.testing.assert_close(grad_offset, leaf.grad)


@pytest.mark.parametrize("batch", [1, 4])
def test_forward_in_inference_mode_with_worker_threads(batch):
    """Workers write into the caller's output tensors; inference mode must reach them (it did not)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        module = DeformConv2d(64, 16, 3, padding=2, dilation=2).eval()  # batch 1: several tiles
        x = torch.randn(batch, 64, 48, 64)
        with use_backend("native"), torch.inference_mode():
            got = module(x)
        with use_backend("reference"), torch.no_grad():
            want = module(x)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_loading_does_not_print_torchs_no_cuda_runtime_notice(tmp_path):
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." when imported
    with a CUDA toolkit but no GPU; loading the CPU kernels hides that one line."""
    env = dict(os.environ, CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    env.pop("DCNBENCH_NO_NATIVE", None)
    notice = "No CUDA runtime is found"

    def stderr_of(code: str) -> str:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr

    if notice not in stderr_of("import torch.utils.cpp_extension"):
        pytest.skip("this torch build does not log the notice")
    stderr = stderr_of("from dcnbench.ops import native; assert native.status()[0], native.status()[1]")
    assert notice not in stderr, stderr


def test_build_sources_are_copied_once_so_checkouts_share_a_build(tmp_path):
    """The build compiles copies kept in the cache (the build file names sources by path, so two
    clones alternating rebuilt every time): an unchanged source is not rewritten (its mtime would
    make the build stale), a changed one is."""
    from dcnbench.ops.native import _copy_sources

    source = tmp_path / "kernel.cpp"
    source.write_text("int a;")
    (copy,) = _copy_sources(tmp_path / "cache" / "src", [source])
    assert copy.read_text() == "int a;" and copy.parent == tmp_path / "cache" / "src"
    os.utime(copy, ns=(1, 1))
    _copy_sources(tmp_path / "cache" / "src", [source])
    assert copy.stat().st_mtime_ns == 1
    source.write_text("int b;")
    _copy_sources(tmp_path / "cache" / "src", [source])
    assert copy.read_text() == "int b;" and sorted(p.name for p in copy.parent.iterdir()) == ["kernel.cpp"]
