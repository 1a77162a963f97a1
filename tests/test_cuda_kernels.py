"""The CUDA backend (kernels/*.cu through cupy) without and with a GPU.

Without a GPU:
- every ``kernels/*.cu`` compiles with nvcc for sm_80 and sm_90, each template instantiation the
  backend asks NVRTC for included; the exact NVRTC translation unit compiles with NVRTC itself
  (cupy's nvrtc binding needs no device);
- the kernels, compiled as host C++ with one emulated thread (blockIdx = threadIdx = 0,
  gridDim = blockDim = 1, atomicAdd = +=), run under the backend's own host code (chunking, GEMMs,
  deterministic sort/gather, offset reductions) on CPU tensors against the reference, in float64
  and float32, both gradient paths;
- ``status()`` says why the backend is unavailable, and the ops still run on the CPU.
With a GPU (``-m cuda``): the ops on CUDA against the CPU reference, fp16/bf16 against fp32,
bitwise reproducibility in deterministic mode, autocast.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# torch refuses cuBLAS in deterministic mode without this; it must precede cuBLAS initialization.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch

from dcnbench.ops import DeformConv2d, cuda, deform_conv2d, deform_ps_roi_pool, deform_roi_pool, reference, use_backend
from dcnbench.ops.dispatch import backend_status

KERNEL_DIR = cuda.KERNEL_DIR
CU_FILES = sorted(KERNEL_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
CXX = shutil.which("g++") or shutil.which("c++")
HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def kernels_defined_in(path: Path) -> list[str]:
    return re.findall(r"__global__\s+void\s+(\w+)\s*\(", path.read_text())


# ----------------------------------------------------------------------------------------------
# Compile checks (no GPU needed).

def test_every_kernel_is_declared_once():
    defined = [name for path in CU_FILES for name in kernels_defined_in(path)]
    assert sorted(defined) == sorted(cuda.KERNELS), "kernels/*.cu and cuda.KERNELS disagree"
    assert {p.name for p in CU_FILES} == set(cuda.KERNEL_FILES)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("cu_file", [p.name for p in CU_FILES])
def test_nvcc_compiles(cu_file, arch, tmp_path):
    """Every template instantiation of the file's kernels compiles, warnings as errors."""
    names = kernels_defined_in(KERNEL_DIR / cu_file)
    assert names
    lines = [f'#include "{cu_file}"', "void* dcn_instantiations[] = {"]
    lines += [f"  (void*)&{name}<{ctype}>," for name in names for ctype in cuda.CTYPES.values()]
    lines += ["};"]
    unit = tmp_path / "instantiate.cu"
    unit.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [NVCC, f"-arch={arch}", "--std=c++17", f"-I{KERNEL_DIR}", "-Werror", "all-warnings",
         "-c", str(unit), "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _nvrtc_ptx(arch: str) -> str:
    """PTX of the backend's NVRTC translation unit, compiled with its options as cupy.RawModule
    compiles it; checks that every template instantiation it asks for is there."""
    pytest.importorskip("cupy", reason="cupy not installed")
    from cupy.cuda import nvrtc
    try:
        options = cuda.nvrtc_options()
    except Exception as error:  # cupy present but cannot locate the toolkit headers
        pytest.skip(f"CUDA headers not found: {error}")
    if not any(opt != f"-I{KERNEL_DIR}" and opt.startswith("-I") for opt in options):
        pytest.skip("cupy found no CUDA include directory (cuda_fp16.h)")
    program = nvrtc.createProgram(cuda.nvrtc_source(), "dcnbench_kernels.cu", [], [])
    try:
        for name in cuda.name_expressions():
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, [*options, f"-arch={arch}", "-ftz=true"])  # as cupy adds
        except nvrtc.NVRTCError as error:
            pytest.fail(f"{error}\n{nvrtc.getProgramLog(program)}")
        for name in cuda.name_expressions():
            assert nvrtc.getLoweredName(program, name).startswith("_Z")
        return nvrtc.getPTX(program).decode(errors="replace")
    finally:
        nvrtc.destroyProgram(program)


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles(arch):
    """The translation unit and options the backend gives cupy.RawModule compile with NVRTC."""
    assert ".entry" in _nvrtc_ptx(arch)


def test_nvrtc_rounds_every_operation_like_the_cpu():
    """No floating multiply-add contraction in the kernels' PTX: each product and sum is rounded
    on its own, as in the CPU kernels (-ffp-contract=off) and the reference, so RoI sample
    positions such as j * bin_w + start_x are bitwise the CPU's (NVRTC's default --fmad=true put
    some an ulp across x <= W - 0.5, see test_gpu_roi_pool_float32_ties_match_cpu)."""
    ptx = _nvrtc_ptx("compute_90")
    fused = re.findall(r"\b(?:fma|mad)\.\S*f(?:32|64)\b", ptx)
    assert not fused, f"{len(fused)} fused multiply-adds, e.g. {fused[:3]}"


# ----------------------------------------------------------------------------------------------
# Status without a GPU.

@pytest.mark.skipif(HAS_CUDA, reason="checks the message given without a GPU")
def test_status_without_gpu():
    ok, reason = cuda.status()
    assert not ok
    assert "CUDA" in reason and "torch.cuda.is_available()" in reason
    ok2, reason2 = backend_status("cuda")
    assert (ok2, reason2) == (ok, reason)


def test_missing_cupy_names_the_extra(monkeypatch):
    import importlib.util
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    cuda._status.cache_clear()
    try:
        ok, reason = cuda.status()
    finally:
        cuda._status.cache_clear()
    assert not ok
    assert "pip install 'dcnbench[cuda]'" in reason


def test_cupy_not_imported_by_dcnbench():
    code = "import sys, dcnbench, dcnbench.ops, dcnbench.ops.cuda; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cpu_ops_work_regardless():
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3)
    off = torch.randn(1, 18, 3, 3)
    out = deform_conv2d(x, off, w)
    torch.testing.assert_close(out, reference.deform_conv2d(x, off, w, None, (1, 1), (0, 0), (1, 1), None))


# ----------------------------------------------------------------------------------------------
# The kernels on the CPU: host C++ build with one emulated thread.

EMULATION_PRELUDE = r"""
// Host emulation of the CUDA launch model for kernels/*.cu: one thread, grid-stride loops run
// every index. Only what the kernels use.
#include <cstdint>
#define __global__
#define __restrict__
struct DcnEmuDim3 { unsigned x, y, z; };
static const DcnEmuDim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
template <typename T> inline T atomicAdd(T* address, T value) { T old = *address; *address = old + value; return old; }
struct DcnAnyPtr {
  void* p;
  template <typename U> operator U*() const { return static_cast<U*>(p); }
};
"""
_CTYPE_OF_KIND = {"p": ctypes.c_void_p, "i": ctypes.c_longlong, "d": ctypes.c_double}
_HOST_TYPES = {torch.float32: "float", torch.float64: "double"}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """A launcher running the kernels as host code (float32/float64 only)."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    lines = [EMULATION_PRELUDE] + [f'#include "{name}"' for name in cuda.KERNEL_FILES]
    for name, kinds in cuda.KERNELS.items():
        params = ", ".join(f"{'void*' if k == 'p' else 'long long' if k == 'i' else 'double'} a{i}"
                           for i, k in enumerate(kinds))
        args = ", ".join(f"DcnAnyPtr{{a{i}}}" if k == "p" else f"a{i}" for i, k in enumerate(kinds))
        for ctype in _HOST_TYPES.values():
            lines.append(f'extern "C" void emu_{name}_{ctype}({params}) {{ {name}<{ctype}>({args}); }}')
    build = tmp_path_factory.mktemp("emu")
    source, library = build / "emu.cpp", build / "libdcnemu.so"
    source.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unused-function",
         f"-I{KERNEL_DIR}", str(source), "-o", str(library)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lib = ctypes.CDLL(str(library))
    calls = []

    def launch(name, dtype, total, args):
        packed = cuda.pack_args(name, args)
        for a in args:
            if isinstance(a, torch.Tensor):
                assert a.device.type == "cpu"
        calls.append((name, dtype, total))
        if total <= 0:
            return
        fn = getattr(lib, f"emu_{name}_{_HOST_TYPES[dtype]}")
        fn.restype = None
        fn.argtypes = [_CTYPE_OF_KIND[k] for k, _ in packed]
        fn(*[v for _, v in packed])

    launch.calls = calls
    return launch


def _conv_case(dtype, mask=True, groups=1, offset_groups=2, n=3, integer_offsets=False, bias=True):
    c, o = 4, 6
    x = torch.randn(n, c, 7, 8, dtype=dtype)
    w = torch.randn(o, c // groups, 3, 2, dtype=dtype)
    stride, padding, dilation = (2, 1), (1, 2), (1, 2)
    ho = (7 + 2 - 3) // 2 + 1
    wo = (8 + 4 - 3) // 1 + 1
    taps = 6
    if integer_offsets:  # integer coordinates, incl. -1 and the far edge: one-sided derivatives
        off = torch.randint(-3, 4, (n, 2 * offset_groups * taps, ho, wo)).to(dtype)
    else:
        off = 2.5 * torch.randn(n, 2 * offset_groups * taps, ho, wo, dtype=dtype)
    m = torch.rand(n, offset_groups * taps, ho, wo, dtype=dtype) if mask else None
    b = torch.randn(o, dtype=dtype) if bias else None
    return x, off, w, b, stride, padding, dilation, m


def _reference_conv_grads(x, off, w, b, stride, padding, dilation, m, grad):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, off, w, b, m)]
    out = reference.deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], stride, padding, dilation, leaves[4])
    inputs = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, inputs, grad))
    return out.detach(), [next(grads) if t is not None else None for t in leaves]


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [
    dict(), dict(mask=False, bias=False), dict(groups=2, offset_groups=1), dict(integer_offsets=True),
], ids=["v2", "v1", "groups", "integer-offsets"])
def test_emulated_deform_conv2d(emulated, dtype, case, deterministic, monkeypatch):
    x, off, w, b, stride, padding, dilation, m = _conv_case(dtype, **case)
    monkeypatch.setattr(cuda, "_COLUMN_BUDGET", 2 * x.shape[1] * 6 * off.shape[2] * off.shape[3])  # 2 images a chunk
    grad = torch.randn(x.shape[0], w.shape[0], off.shape[2], off.shape[3], dtype=dtype)
    expected, expected_grads = _reference_conv_grads(x, off, w, b, stride, padding, dilation, m, grad)
    out = cuda._deform_conv2d_forward(emulated, x, off, w, b, stride, padding, dilation, m)
    torch.testing.assert_close(out, expected, **_tol(dtype))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    emulated.calls.clear()
    try:
        grads = cuda._deform_conv2d_backward(emulated, grad, x, off, w, b, stride, padding, dilation, m)
    finally:
        torch.use_deterministic_algorithms(previous)
    used = {name for name, _, _ in emulated.calls}
    assert ("dcn_col2im_gather" in used) == deterministic and ("dcn_col2im" in used) != deterministic
    for name, got, want in zip(("input", "offset", "weight", "bias", "mask"), grads, expected_grads):
        if want is None:
            assert got is None, name
        else:
            assert got.dtype == dtype, name
            torch.testing.assert_close(got, want, **_tol(dtype), msg=lambda s: f"grad {name}: {s}")


def test_emulated_deform_conv2d_without_output_channels(emulated):
    """A weight of 0 output channels (as torchvision allows; reachable through the custom op) gives
    the empty output and zero gradients, as the other backends do: the weight gradient's run length
    divided by the channels per group (ZeroDivisionError)."""
    x, off, w, b, stride, padding, dilation, m = _conv_case(torch.float64, mask=False, bias=False)
    w = w[:0]
    out = cuda._deform_conv2d_forward(emulated, x, off, w, b, stride, padding, dilation, m)
    assert out.shape == (x.shape[0], 0, *off.shape[2:])
    grads = cuda._deform_conv2d_backward(emulated, torch.ones_like(out), x, off, w, b, stride, padding, dilation, m)
    for got, like in zip(grads[:3], (x, off, w)):
        assert got.shape == like.shape and not got.any()


def _roi_case(dtype, position_sensitive, with_offset, classes=2, parts=3):
    k_bins = 3
    c_out = 4
    c_in = c_out * k_bins * k_bins if position_sensitive else c_out
    x = torch.randn(2, c_in, 9, 11, dtype=dtype)
    boxes = torch.tensor([[0, 3.2, 4.1, 30.7, 25.3],  # spills over the right/bottom edge at scale 0.5
                          [1, -6.3, -2.6, 9.4, 12.2],  # starts off the map
                          [1, 7.1, 5.3, 7.2, 5.4],  # tiny
                          [0, 1.1, 1.3, 19.6, 15.8]], dtype=dtype)
    offset = 3 * torch.randn(boxes.shape[0], 2 * classes, parts, parts, dtype=dtype) if with_offset else None
    return x, boxes, offset, (k_bins, k_bins), 0.5, 2, 0.3


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("position_sensitive", [False, True], ids=["plain", "ps"])
@pytest.mark.parametrize("offset_case", ["none", "same-parts", "fewer-parts", "more-parts"])
def test_emulated_roi_pool(emulated, dtype, position_sensitive, offset_case, deterministic):
    parts = {"none": 3, "same-parts": 3, "fewer-parts": 2, "more-parts": 4}[offset_case]
    x, rois, offset, size, scale, s, gamma = _roi_case(dtype, position_sensitive, offset_case != "none", parts=parts)
    leaves = [x.clone().requires_grad_(), None if offset is None else offset.clone().requires_grad_()]
    expected = reference.roi_pool(leaves[0], rois, leaves[1], size, scale, s, gamma, position_sensitive)
    grad = torch.randn_like(expected)
    wanted = torch.autograd.grad(expected, [t for t in leaves if t is not None], grad)
    out = cuda._roi_pool_forward(emulated, x, rois, offset, size, scale, s, gamma, position_sensitive)
    torch.testing.assert_close(out, expected.detach(), **_tol(dtype))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        gi, go = cuda._roi_pool_backward(emulated, grad, x, rois, offset, size, scale, s, gamma, position_sensitive)
    finally:
        torch.use_deterministic_algorithms(previous)
    torch.testing.assert_close(gi, wanted[0], **_tol(dtype))
    if offset is None:
        assert go is None
    else:
        torch.testing.assert_close(go, wanted[1], **_tol(dtype))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("position_sensitive", [False, True], ids=["plain", "ps"])
def test_emulated_non_finite_offsets_sample_nothing(emulated, position_sensitive, deterministic):
    """NaN / inf offsets: the kernels skip those RoI samples and give those conv taps 0 with zero
    gradients, exactly as the reference does (dcn::roi_corners counted a NaN sample as pixel 0)."""
    dtype = torch.float64
    x, rois, offset, size, scale, s, gamma = _roi_case(dtype, position_sensitive, True)
    offset[0, 0:2, 1, 2] = float("nan")  # x and y: the old rule clamped such a sample to pixel (0, 0)
    offset[3, 2:4, 0, 0] = float("inf")
    leaves = [x.clone().requires_grad_(), offset.clone().requires_grad_()]
    expected = reference.roi_pool(leaves[0], rois, leaves[1], size, scale, s, gamma, position_sensitive)
    grad = torch.randn_like(expected)
    wanted = torch.autograd.grad(expected, leaves, grad)
    x_c, off, w, b, stride, padding, dilation, m = _conv_case(dtype)
    off[1, 5, 2, 3] = float("nan")
    off[0, 14, 0, 1] = -float("inf")
    conv_grad = torch.randn(x_c.shape[0], w.shape[0], off.shape[2], off.shape[3], dtype=dtype)
    conv_expected, conv_wanted = _reference_conv_grads(x_c, off, w, b, stride, padding, dilation, m, conv_grad)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = cuda._roi_pool_forward(emulated, x, rois, offset, size, scale, s, gamma, position_sensitive)
        gi, go = cuda._roi_pool_backward(emulated, grad, x, rois, offset, size, scale, s, gamma, position_sensitive)
        conv_out = cuda._deform_conv2d_forward(emulated, x_c, off, w, b, stride, padding, dilation, m)
        conv_grads = cuda._deform_conv2d_backward(emulated, conv_grad, x_c, off, w, b, stride, padding, dilation, m)
    finally:
        torch.use_deterministic_algorithms(previous)
    for got, want in [(out, expected.detach()), (gi, wanted[0]), (go, wanted[1]), (conv_out, conv_expected),
                      *zip(conv_grads, conv_wanted)]:
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("integer_offsets", [False, True], ids=["fractional", "integer"])
def test_emulated_non_finite_features_reach_the_same_outputs_as_torchvision(emulated, integer_offsets,
                                                                             deterministic):
    """A NaN or inf pixel reaches exactly the outputs and gradients torchvision's op lets it reach
    (corners off the map read nothing; the value at y == -1 or x == -1 exactly reads nothing)."""
    import torchvision

    dtype = torch.float64
    x, off, w, b, stride, padding, dilation, m = _conv_case(dtype, integer_offsets=integer_offsets)
    x[0, 1, 0, 0] = float("nan")
    x[1, 2, 6, 7] = float("inf")
    x[2, 0, 3, 0] = float("nan")
    grad = torch.randn(x.shape[0], w.shape[0], off.shape[2], off.shape[3], dtype=dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, off, w, b, m)]
    want = torchvision.ops.deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], stride, padding, dilation,
                                         mask=leaves[4])
    wanted = torch.autograd.grad(want, leaves, grad)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = cuda._deform_conv2d_forward(emulated, x, off, w, b, stride, padding, dilation, m)
        grads = cuda._deform_conv2d_backward(emulated, grad, x, off, w, b, stride, padding, dilation, m)
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, g, t in zip(("output", "input", "offset", "weight", "bias", "mask"), (got, *grads),
                          (want.detach(), *wanted)):
        assert torch.equal(g.isnan(), t.isnan()), f"{name}: NaN at other places than torchvision's"
        assert torch.equal(g.isinf(), t.isinf()), f"{name}: inf at other places than torchvision's"
        finite = t.isfinite()
        torch.testing.assert_close(g[finite], t[finite], **_tol(dtype), msg=lambda s: f"{name}: {s}")


def test_emulated_mixed_dtypes_follow_the_input(emulated):
    """Arguments in another dtype (as autocast may hand them over) are cast to the input's."""
    x, off, w, b, stride, padding, dilation, m = _conv_case(torch.float64)
    out = cuda._deform_conv2d_forward(emulated, x, off.float(), w.float(), b.float(), stride, padding, dilation,
                                      m.float())
    want = reference.deform_conv2d(x, off.float().double(), w.float().double(), b.float().double(), stride, padding,
                                   dilation, m.float().double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    grads = cuda._deform_conv2d_backward(emulated, torch.ones_like(out).float(), x, off.float(), w.float(), b.float(),
                                         stride, padding, dilation, m.float())
    assert all(g.dtype == torch.float64 for g in grads)
    xr, rois, offset, size, scale, s, gamma = _roi_case(torch.float32, True, True)
    out = cuda._roi_pool_forward(emulated, xr, rois.double(), offset.double(), size, scale, s, gamma, True)
    torch.testing.assert_close(out, reference.roi_pool(xr, rois, offset, size, scale, s, gamma, True), **_tol(torch.float32))


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of the largest storage any op's output holds (a broadcast view's
    is its source's)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("groups", [1, 2])
def test_emulated_temporaries_are_bounded_by_the_columns(emulated, groups):
    """A wide layer on a small map (7x7, 64 images, 256 -> 256 channels): no op of the forward or
    backward makes a tensor larger than the chunk's column buffer (the GEMMs used to broadcast the
    weight to one copy per image, and the weight gradient to one product per image: 4x the columns)."""
    n, c, o = 64, 256, 256
    x, w = torch.randn(n, c, 7, 7), torch.randn(o, c // groups, 3, 3)
    off, geometry = 0.5 * torch.randn(n, 18, 7, 7), ((1, 1), (1, 1), (1, 1))
    columns = n * c * 9 * 49
    with _LargestTensor() as forward:
        out = cuda._deform_conv2d_forward(emulated, x, off, w, None, *geometry, None)
    grad = torch.randn_like(out)
    with _LargestTensor() as backward:
        grad_weight = cuda._deform_conv2d_backward(emulated, grad, x, off, w, None, *geometry, None)[2]
    assert forward.largest <= columns and backward.largest <= columns, (forward.largest, backward.largest, columns)
    want = _reference_conv_grads(x, off, w, None, *geometry, None, grad)
    torch.testing.assert_close(out, want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_weight, want[1][2], rtol=1e-3, atol=1e-3)


def test_emulated_empty_batch(emulated):
    """An empty batch gives an empty output of the layer's shape."""
    x, off, w, b, stride, padding, dilation, m = _conv_case(torch.float32, n=0)
    out = cuda._deform_conv2d_forward(emulated, x, off, w, b, stride, padding, dilation, m)
    assert out.shape == (0, w.shape[0], off.shape[2], off.shape[3])


def test_emulated_empty_rois(emulated):
    x = torch.randn(1, 3, 5, 5)
    rois = torch.zeros(0, 5)
    out = cuda._roi_pool_forward(emulated, x, rois, None, (2, 2), 1.0, 2, 0.1, False)
    assert out.shape == (0, 3, 2, 2)
    torch.use_deterministic_algorithms(True)
    try:
        gi, go = cuda._roi_pool_backward(emulated, out, x, rois, None, (2, 2), 1.0, 2, 0.1, False)
    finally:
        torch.use_deterministic_algorithms(False)
    assert go is None and torch.equal(gi, torch.zeros_like(x))


def test_pack_args_rejects_wrong_arity_and_types():
    with pytest.raises(TypeError, match="takes"):
        cuda.pack_args("dcn_im2col", [None])
    args = [None] * 4 + [1] * 15
    args[5] = 2.0
    with pytest.raises(TypeError, match="must be an int"):
        cuda.pack_args("dcn_im2col", args)
    args[5] = 1
    args[0] = torch.zeros(2, 3).t()
    with pytest.raises(ValueError, match="contiguous"):
        cuda.pack_args("dcn_im2col", args)


# ----------------------------------------------------------------------------------------------
# On the GPU.

def _require_cuda_backend():
    ok, why = cuda.status()
    if not ok:
        pytest.skip(f"cuda backend unavailable: {why}")


@pytest.mark.cuda
@needs_gpu
def test_gpu_status():
    ok, why = cuda.status()
    if not ok:
        pytest.skip(why)
    assert torch.cuda.get_device_name() in why


def _run_conv(device, dtype, args, grad, backend):
    x, off, w, b, stride, padding, dilation, m = [
        t.detach().to(device=device, dtype=dtype).requires_grad_() if isinstance(t, torch.Tensor) else t for t in args
    ]
    with use_backend(backend):
        out = deform_conv2d(x, off, w, b, stride, padding, dilation, m)
    leaves = [t for t in (x, off, w, b, m) if t is not None]
    return out, torch.autograd.grad(out, leaves, grad.to(device=device, dtype=dtype))


def _run_roi(device, dtype, args, grad, backend, ps):
    x, rois, offset, size, scale, s, gamma = args
    x = x.detach().to(device=device, dtype=dtype).requires_grad_()
    rois = rois.to(device=device, dtype=dtype)
    offset = None if offset is None else offset.detach().to(device=device, dtype=dtype).requires_grad_()
    fn = deform_ps_roi_pool if ps else deform_roi_pool
    with use_backend(backend):
        out = fn(x, rois, offset, size, scale, s, gamma)
    leaves = [t for t in (x, offset) if t is not None]
    return out, torch.autograd.grad(out, leaves, grad.to(device=device, dtype=dtype))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("integer_offsets", [False, True])
def test_gpu_deform_conv2d_matches_cpu_reference(dtype, integer_offsets, deterministic):
    _require_cuda_backend()
    args = _conv_case(torch.float64, integer_offsets=integer_offsets, n=5)
    grad = torch.randn(5, 6, args[1].shape[2], args[1].shape[3], dtype=torch.float64)
    want_out, want_grads = _run_conv("cpu", dtype, args, grad, "reference")
    torch.use_deterministic_algorithms(deterministic)
    try:
        out, grads = _run_conv("cuda", dtype, args, grad, "cuda")
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(out.cpu(), want_out, **_tol(dtype))
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.cpu(), want, **_tol(dtype))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ps", [False, True], ids=["plain", "ps"])
@pytest.mark.parametrize("with_offset", [False, True])
def test_gpu_roi_pool_matches_cpu_reference(dtype, ps, with_offset, deterministic):
    _require_cuda_backend()
    args = _roi_case(torch.float64, ps, with_offset)
    x = args[0]
    c_out = x.shape[1] // 9 if ps else x.shape[1]
    grad = torch.randn(args[1].shape[0], c_out, 3, 3, dtype=torch.float64)
    want_out, want_grads = _run_roi("cpu", dtype, args, grad, "reference", ps)
    torch.use_deterministic_algorithms(deterministic)
    try:
        out, grads = _run_roi("cuda", dtype, args, grad, "cuda", ps)
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(out.cpu(), want_out, **_tol(dtype))
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.cpu(), want, **_tol(dtype))


@pytest.mark.cuda
@needs_gpu
def test_gpu_inference_calls_equal_recorded_calls():
    """Without autograd the ops launch the kernels directly: the same outputs as a recorded call."""
    _require_cuda_backend()
    conv_args = _conv_case(torch.float32, n=2)
    roi_args = _roi_case(torch.float32, True, True)
    conv_grad = torch.randn(2, 6, conv_args[1].shape[2], conv_args[1].shape[3])
    roi_grad = torch.randn(roi_args[1].shape[0], roi_args[0].shape[1] // 9, 3, 3)
    recorded = [_run_conv("cuda", torch.float32, conv_args, conv_grad, "cuda")[0],
                _run_roi("cuda", torch.float32, roi_args, roi_grad, "cuda", True)[0]]
    to_gpu = [t.cuda() if isinstance(t, torch.Tensor) else t for t in conv_args]
    x, rois, offset, *rest = roi_args
    with torch.inference_mode(), use_backend("cuda"):
        inference = [deform_conv2d(*to_gpu), deform_ps_roi_pool(x.cuda(), rois.cuda(), offset.cuda(), *rest)]
    for got, want in zip(inference, recorded):
        assert got.grad_fn is None and want.grad_fn is not None
        assert torch.equal(got, want.detach())


@pytest.mark.cuda
@needs_gpu
def test_gpu_runs_a_program_exported_on_the_cpu():
    """A program exported on the CPU runs on the GPU: its custom ops take the kernels of the
    tensors' device (no backend is recorded in the graph)."""
    _require_cuda_backend()
    layer = DeformConv2d(4, 6, 3, padding=1, offset_groups=2, modulated=True).eval()
    torch.nn.init.normal_(layer.offset_conv.weight, std=0.3)
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        program = torch.export.export(layer, (x,))
        want = layer(x)
        got = program.module().to("cuda")(x.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@needs_gpu
def test_gpu_layer_keeps_its_weight_in_standard_order():
    """On the GPU the layer's weight is stored in the CUDA kernels' order (no copy per call), and
    the layer computes what it computes on the CPU."""
    _require_cuda_backend()
    layer = DeformConv2d(4, 6, 3, padding=2, dilation=2).double()
    torch.nn.init.normal_(layer.offset_conv.weight, std=0.3)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    want = layer(x)
    layer.cuda()
    assert layer.weight.is_contiguous()
    torch.testing.assert_close(layer(x.cuda()).cpu(), want, rtol=1e-10, atol=1e-10)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)).item()


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_close_to_fp32(dtype):
    """fp16/bf16 kernels (storage in the low dtype, arithmetic in float32) stay within 1e-2 relative
    error of the float32 kernels on the same inputs. The inputs are rounded to the low dtype first:
    rounding an offset can move a sample across a pixel edge, which changes the offset gradient by a
    step that says nothing about the kernels (bf16 rounding alone gave 10% on the offsets)."""
    _require_cuda_backend()

    def rounded(args):
        return [t.to(dtype).float() if isinstance(t, torch.Tensor) else t for t in args]

    def errors(got, want):
        return [_rel_err(g, w) for g, w in zip(got, want)]

    args = rounded(_conv_case(torch.float32, n=4))
    grad = torch.randn(4, 6, args[1].shape[2], args[1].shape[3]).to(dtype).float()
    out32, grads32 = _run_conv("cuda", torch.float32, args, grad, "cuda")
    out, grads = _run_conv("cuda", dtype, args, grad, "cuda")
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    conv_errors = errors([out, *grads], [out32, *grads32])  # out, input, offset, weight, bias, mask
    assert max(conv_errors) < 1e-2, conv_errors
    for ps in (False, True):
        roi_args = rounded(_roi_case(torch.float32, ps, True))
        c_out = roi_args[0].shape[1] // 9 if ps else roi_args[0].shape[1]
        rgrad = torch.randn(roi_args[1].shape[0], c_out, 3, 3).to(dtype).float()
        out32, grads32 = _run_roi("cuda", torch.float32, roi_args, rgrad, "cuda", ps)
        out, grads = _run_roi("cuda", dtype, roi_args, rgrad, "cuda", ps)
        roi_errors = errors([out, *grads], [out32, *grads32])  # out, input, offset
        assert max(roi_errors) < 1e-2, (ps, roi_errors)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_deterministic_mode_is_bitwise_reproducible(dtype):
    _require_cuda_backend()
    torch.manual_seed(1)
    # Many samples landing on the same pixels: atomics would reorder additions between runs.
    x = torch.randn(4, 16, 24, 24, dtype=dtype, device="cuda", requires_grad=True)
    w = torch.randn(32, 16, 3, 3, dtype=dtype, device="cuda", requires_grad=True)
    off = (0.3 * torch.randn(4, 18, 24, 24, device="cuda")).to(dtype).requires_grad_()
    m = torch.rand(4, 9, 24, 24, device="cuda").to(dtype).requires_grad_()
    rois = torch.tensor([[0, 2, 2, 40, 40], [1, 0, 0, 47, 47], [0, 3, 3, 41, 41]] * 20, dtype=dtype, device="cuda")
    feats = torch.randn(2, 4 * 49, 24, 24, dtype=dtype, device="cuda", requires_grad=True)
    roff = (0.1 * torch.randn(rois.shape[0], 2, 7, 7, device="cuda")).to(dtype).requires_grad_()

    grad_conv = torch.randn(4, 32, 24, 24, device="cuda").to(dtype)
    grad_pool = torch.randn(rois.shape[0], 4, 7, 7, device="cuda").to(dtype)

    def run():
        out = deform_conv2d(x, off, w, None, 1, 1, 1, m)
        pooled = deform_ps_roi_pool(feats, rois, roff, 7, 0.5, 4, 0.1)
        return torch.autograd.grad([out, pooled], [x, off, w, m, feats, roff], [grad_conv, grad_pool])

    torch.use_deterministic_algorithms(True)
    try:
        with use_backend("cuda"):
            first = run()
            for _ in range(3):
                again = run()
                for a, b in zip(first, again):
                    assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
@needs_gpu
def test_gpu_autocast():
    """Under autocast the conv producing the input/offsets runs in fp16; the op still runs."""
    _require_cuda_backend()
    from dcnbench.ops import DeformConv2d

    layer = DeformConv2d(8, 16, 3, padding=1, modulated=True).cuda()
    nn_init = torch.nn.init
    nn_init.normal_(layer.offset_conv.weight, std=0.01)
    x = torch.randn(2, 8, 16, 16, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.float16):
        with use_backend("cuda"):
            out = layer(x)
        loss = out.float().square().mean()
    loss.backward()
    with use_backend("reference"):
        want = layer(x)
    assert _rel_err(out.float(), want) < 1e-2
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.weight.grad is not None and layer.offset_conv.weight.grad is not None


@pytest.mark.cuda
@needs_gpu
def test_gpu_roi_pool_float32_ties_match_cpu():
    """float32 RoIs whose sample x lands exactly on W - 0.5 (a valid sample) in per-operation
    rounding, and an ulp past it (skipped) when j * bin_w + start_x and the sub-bin step are
    contracted into multiply-adds, in bins whose other samples read interior pixels: the mean
    then changes by 0.06-0.28 (seen with the kernels built as host code with -mfma
    -ffp-contract=fast). Compiled with --fmad=false the GPU agrees with the CPU reference."""
    _require_cuda_backend()
    g = torch.Generator().manual_seed(0)
    cases = [((2, 3, 12, 3), [[0, 4, 0, 27, 30], [1, 4, 2, 27, 33]], 0.3),  # x = 2.5 at j = 1, u = 3
             ((1, 3, 12, 6), [[0, 8, 0, 55, 30]], 0.3),  # x = 5.5
             ((1, 3, 12, 7), [[0, 1, 0, 18, 30]], 0.7)]  # x = 6.5
    for shape, boxes, scale in cases:
        x = torch.randn(*shape, generator=g)
        rois = torch.tensor(boxes, dtype=torch.float32)
        args = (x, rois, None, (7, 7), scale, 4, 0.1)
        grad = torch.randn(rois.shape[0], x.shape[1], 7, 7, generator=g)
        want_out, want_grads = _run_roi("cpu", torch.float32, args, grad, "reference", False)
        out, grads = _run_roi("cuda", torch.float32, args, grad, "cuda", False)
        torch.testing.assert_close(out.cpu(), want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[0].cpu(), want_grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_deform_conv2d_captures_in_a_cuda_graph(deterministic):
    """Forward and backward record into a CUDA graph and its replay on new inputs equals an eager
    call: every kernel goes to torch's current stream (a launch on another stream, or a host
    sync, fails the capture)."""
    _require_cuda_backend()
    x, off, w, b, stride, padding, dilation, m = [t.cuda() if isinstance(t, torch.Tensor) else t
                                                  for t in _conv_case(torch.float32, n=2)]
    leaves = [t.requires_grad_() for t in (x, off, w, b, m)]
    grad = torch.randn(2, w.shape[0], off.shape[2], off.shape[3], device="cuda")

    def step():
        with use_backend("cuda"):
            out = deform_conv2d(x, off, w, b, stride, padding, dilation, m)
        return (out, *torch.autograd.grad(out, leaves, grad))

    torch.use_deterministic_algorithms(deterministic)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (kernel compilation, allocator) off the capture
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        with torch.no_grad():
            for t in leaves:
                t.copy_(torch.randn_like(t))
            m.uniform_()
        graph.replay()
        eager = step()
    finally:
        torch.use_deterministic_algorithms(False)
    for got, want in zip(captured, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_gpu
def test_gpu_non_contiguous_and_empty_inputs():
    """Channels-last and transposed (non-contiguous) tensors give the reference's values; an empty
    batch and zero RoIs give empty outputs and zero gradients."""
    _require_cuda_backend()
    x, off, w, b, stride, padding, dilation, m = _conv_case(torch.float64, n=2)
    grad = torch.randn(2, w.shape[0], off.shape[2], off.shape[3], dtype=torch.float64)
    want_out, want_grads = _run_conv("cpu", torch.float64, (x, off, w, b, stride, padding, dilation, m), grad,
                                     "reference")
    xs = x.cuda().contiguous(memory_format=torch.channels_last).requires_grad_()
    offs = off.transpose(2, 3).contiguous().cuda().transpose(2, 3).requires_grad_()  # non-contiguous view
    ws = w.cuda().contiguous(memory_format=torch.channels_last).requires_grad_()
    with use_backend("cuda"):
        out = deform_conv2d(xs, offs, ws, b.cuda(), stride, padding, dilation, m.cuda())
    assert not offs.is_contiguous()
    got = torch.autograd.grad(out, [xs, offs, ws], grad.cuda().transpose(2, 3).contiguous().transpose(2, 3))
    torch.testing.assert_close(out.cpu(), want_out, **_tol(torch.float64))
    for g_, want in zip(got, want_grads[:3]):
        torch.testing.assert_close(g_.cpu(), want, **_tol(torch.float64))

    empty = [t[:0].cuda().requires_grad_() for t in (x, off)]
    wc = w.cuda().requires_grad_()
    with use_backend("cuda"):
        out = deform_conv2d(empty[0], empty[1], wc, None, stride, padding, dilation)
    assert out.shape == (0, w.shape[0], off.shape[2], off.shape[3])
    gi, go, gw = torch.autograd.grad(out, [*empty, wc], torch.ones_like(out))
    assert gi.shape == empty[0].shape and go.shape == empty[1].shape and torch.equal(gw, torch.zeros_like(wc))
    feats = torch.randn(1, 3 * 9, 5, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            with use_backend("cuda"):
                pooled = deform_ps_roi_pool(feats, torch.zeros(0, 5, dtype=torch.float64, device="cuda"),
                                            torch.zeros(0, 2, 3, 3, dtype=torch.float64, device="cuda"), 3)
            assert pooled.shape == (0, 3, 3, 3)
            (gf,) = torch.autograd.grad(pooled.sum(), [feats])
        finally:
            torch.use_deterministic_algorithms(False)
        assert torch.equal(gf, torch.zeros_like(feats))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_second_device_while_the_first_is_current():
    """Tensors on cuda:1 with cuda:0 current: the kernels compile for and run on cuda:1."""
    _require_cuda_backend()
    args = _conv_case(torch.float64, n=2)
    grad = torch.randn(2, 6, args[1].shape[2], args[1].shape[3], dtype=torch.float64)
    want_out, want_grads = _run_conv("cpu", torch.float64, args, grad, "reference")
    with torch.cuda.device(0):
        out, grads = _run_conv("cuda:1", torch.float64, args, grad, "cuda")
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), want_out, **_tol(torch.float64))
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.cpu(), want, **_tol(torch.float64))
