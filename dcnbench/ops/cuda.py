"""CUDA backend: the kernels in ``kernels/*.cu``, compiled at run time by NVRTC through cupy.

The kernels run zero-copy on torch CUDA tensors (raw device pointers) on torch's current stream;
torch (cuBLAS) does the GEMMs, the reductions and, in deterministic mode, the sorting. cupy is
imported lazily, on the first ``status()`` or op call, never when ``dcnbench`` is imported.

Dtypes: float32, float64, float16 and bfloat16. Kernels read and write the storage dtype and
compute in float32 (float64 for float64); gradients that are accumulated go through float32
(float64) buffers and are cast at the end. Other floating arguments (mixed dtypes under autocast)
are cast to the input's dtype; RoI boxes are read in the accumulation dtype.

Deterministic mode (``torch.use_deterministic_algorithms(True)``): no float atomics anywhere.
Offset and mask gradients never use atomics (each element has one writer, or per-bin values
reduced by torch). The input gradients, which are scatters, become gathers over a sorted inverse
index: a kernel writes, for each bilinear sample, its four corners as (key = (image, group, pixel),
coefficient) entries; ``torch.sort(stable=True)`` groups them by key and ``torch.searchsorted``
finds each key's segment; one thread per input element then sums its segment in that fixed order.
Cost: memory for 4 entries per sample, each a key (8 bytes) and a coefficient (4, or 8 in float64),
held while they are sorted beside the sorted keys and the order (8 + 8 bytes each): 112 bytes a
sample in float32, 128 in float64, plus the sort's own scratch (deformable conv: B·G·kh·kw·Ho·Wo
samples per chunk of B images, which grows with the offset groups G, not the channels, and is not
bounded by the column budget; RoI pooling: K·n·ph·pw·S² samples per call for n offset classes);
one stable sort of those keys, and irregular reads in the gather (the time cost against the atomic
path is not measured yet: needs a GPU run). cuBLAS needs
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (or ``:16:8``) in the environment for torch to allow its GEMMs
in deterministic mode.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy
import torch
from torch import Tensor


def _kernel_dir() -> Path:
    """``kernels/`` of the source checkout (editable install), else one shipped inside the package."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "kernels", here.parents[1] / "kernels"):
        if (candidate / "dcn_math.h").is_file():
            return candidate
    return here.parents[2] / "kernels"


KERNEL_DIR = _kernel_dir()
KERNEL_FILES = ("deform_conv.cu", "deform_roi_pool.cu")
INSTALL_HINT = "pip install 'dcnbench[cuda]'"

# Kernel name -> argument kinds: p = pointer (tensor or None), i = long long, d = double.
_CONV_DIMS = "i" * 15  # batch, channels, height, width, offset_groups, kh, kw, stride, pad, dil (h, w), out_h, out_w
KERNELS: dict[str, str] = {
    "dcn_im2col": "pppp" + _CONV_DIMS,
    "dcn_col2im": "pppp" + _CONV_DIMS,
    "dcn_col2im_coord": "pppppp" + _CONV_DIMS,
    "dcn_col2im_entries": "pppp" + "i" * 14 + "i",
    "dcn_col2im_gather": "ppppp" + "i" * 9,
    "dcn_roi_pool_forward": "pppp" + "i" * 12 + "dd",
    "dcn_roi_pool_backward": "pppppp" + "i" * 12 + "dd",
    "dcn_roi_pool_entries": "pppp" + "i" * 10 + "dd" + "i",
    "dcn_roi_pool_gather": "ppppp" + "i" * 10,
}
CTYPES: dict[torch.dtype, str] = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "__half",
    torch.bfloat16: "__nv_bfloat16",
}
_BLOCK = 256
_MAX_BLOCKS = 1 << 20
_COLUMN_BUDGET = 1 << 26  # elements of the im2col buffer per chunk of images

Launch = Callable[[str, torch.dtype, int, Sequence[object]], None]
_CONVERTERS = {"p": numpy.uint64, "i": numpy.int64, "d": numpy.float64}  # kernel ABI; pointers as raw addresses


# ----------------------------------------------------------------------------------------------
# Compilation and launching.

def name_expressions() -> list[str]:
    """Every template instantiation the module provides, e.g. ``dcn_im2col<__half>``."""
    return [f"{name}<{ctype}>" for name in KERNELS for ctype in CTYPES.values()]


def nvrtc_source() -> str:
    """The translation unit given to NVRTC: the kernel files, headers resolved through ``-I``.

    It begins with a hash of every file in ``kernels/`` so that cupy's on-disk cache (keyed on the
    source text) recompiles when a header changes.
    """
    digest = hashlib.sha256()
    for path in sorted(KERNEL_DIR.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    parts = [f"// dcnbench kernels {digest.hexdigest()[:16]}\n"]
    for name in KERNEL_FILES:
        parts.append(f'#line 1 "{name}"\n' + (KERNEL_DIR / name).read_text())
    return "\n".join(parts)


def nvrtc_options(cuda_include: str | None = None) -> tuple[str, ...]:
    """NVRTC options (without ``-arch`` and ``-ftz=true``, which cupy adds: flushing float32
    denormals is the only intended difference from the CPU arithmetic).

    ``--fmad=false``: no multiply-add contraction, so every operation rounds as on the CPU (whose
    kernels build with ``-ffp-contract=off``, and the reference is plain torch ops). With NVRTC's
    default contraction a RoI sample such as ``j * bin_w + start_x`` can land an ulp off the CPU's,
    on the other side of a validity border (x <= W - 0.5) or of an integer (one-sided offset
    gradient), and the backward's valid-sample count could differ from its own sample loop's.
    """
    options = ["--std=c++17", "--fmad=false", f"-I{KERNEL_DIR}"]
    if cuda_include is None:
        cuda_include = _cuda_include_dir()
    if cuda_include:
        options.append(f"-I{cuda_include}")
    return tuple(options)


def _cuda_include_dir() -> str | None:
    """CUDA's headers (cuda_fp16.h, cuda_bf16.h): the toolkit cupy uses (e.g. the nvidia-* wheels),
    else $CUDA_HOME, $CUDA_PATH or /usr/local/cuda; None if none has them."""
    import os

    import cupy

    for root in (cupy.cuda.get_cuda_path(), os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return str(Path(root) / "include")
    return None


@functools.cache
def _module(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=nvrtc_source(), options=nvrtc_options(), name_expressions=name_expressions())
        module.compile()
    return module


def pack_args(name: str, args: Sequence[object]) -> list[tuple[str, int | float]]:
    """Check ``args`` against the kernel's signature; return (kind, value) pairs with tensors as
    their data pointers (None as a null pointer)."""
    kinds = KERNELS[name]
    if len(args) != len(kinds):
        raise TypeError(f"{name} takes {len(kinds)} arguments, got {len(args)}")
    packed = []
    for position, (kind, value) in enumerate(zip(kinds, args)):
        if kind == "p":
            if value is None:
                packed.append(("p", 0))
            elif isinstance(value, Tensor):
                if not value.is_contiguous():
                    raise ValueError(f"{name}: argument {position} must be contiguous")
                packed.append(("p", value.data_ptr()))
            else:
                raise TypeError(f"{name}: argument {position} must be a tensor or None, got {type(value).__name__}")
        elif kind == "i":
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: argument {position} must be an int, got {value!r}")
            packed.append(("i", value))
        else:
            packed.append(("d", float(value)))
    return packed


@functools.cache
def _function(name: str, ctype: str, device_index: int):
    """The loaded ``cupy.cuda.function.Function`` of ``name<ctype>`` (called with an explicit stream)."""
    return _module(device_index).get_function(f"{name}<{ctype}>").kernel


@functools.cache
def _cupy_stream(device_index: int, handle: int):
    """cupy's view of the CUDA stream with raw ``handle``: it holds the handle alone, so a view
    cached for a stream that was freed serves whichever stream later gets the same handle."""
    import cupy

    return cupy.cuda.ExternalStream(handle, device_index)


def _cupy_launch(name: str, dtype: torch.dtype, total: int, args: Sequence[object]) -> None:
    """Run kernel ``name<dtype>`` with at least min(total, 2^28) threads on torch's current stream.

    Host cost matters (small layers are launch-bound): functions and stream views are cached, the
    stream's raw handle is read without building a ``torch.cuda.Stream`` and passed to the launch
    rather than entered as a context."""
    import cupy

    packed = pack_args(name, args)
    if total <= 0:
        return
    device = next(a for a in args if isinstance(a, Tensor)).device
    index = device.index if device.index is not None else torch.cuda.current_device()
    values = tuple(_CONVERTERS[kind](value) for kind, value in packed)
    blocks = min((total + _BLOCK - 1) // _BLOCK, _MAX_BLOCKS)
    stream = _cupy_stream(index, torch._C._cuda_getCurrentRawStream(index))
    on_device = contextlib.nullcontext() if cupy.cuda.runtime.getDevice() == index else cupy.cuda.Device(index)
    with on_device:
        _function(name, CTYPES[dtype], index)((blocks,), (_BLOCK,), values, stream=stream)


@functools.cache
def _status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        reason = "no CUDA device (torch.cuda.is_available() is False)"
        if importlib.util.find_spec("cupy") is None:
            reason += f"; the CUDA kernels also need cupy: {INSTALL_HINT}"
        return False, reason
    try:
        import cupy
    except ImportError as error:
        return False, f"the CUDA kernels need cupy, which is not importable ({error}): {INSTALL_HINT}"
    if _cuda_include_dir() is None:
        return False, ("the CUDA kernels need the CUDA headers (cuda_fp16.h), found neither where cupy looks nor "
                       "in $CUDA_HOME, $CUDA_PATH or /usr/local/cuda: install the CUDA toolkit or set CUDA_HOME")
    try:
        _module(torch.cuda.current_device())
    except Exception as error:  # compile or driver error: report it, fall back to the reference
        first = str(error).strip().splitlines()
        return False, f"the CUDA kernels failed to compile with cupy {cupy.__version__}: {first[0] if first else error!r}"
    name = torch.cuda.get_device_name()
    return True, f"cupy {cupy.__version__}, kernels compiled by NVRTC for {name}"


def status() -> tuple[bool, str]:
    """(available, reason): needs a CUDA device, cupy, and kernels that compile (cached)."""
    return _status()


def set_float32_mode(tf32: bool) -> str:
    """Make cuDNN's convolutions and cuBLAS's float32 GEMMs use the same precision, so that a
    timing of a deformable op (GEMMs through torch.matmul) against F.conv2d (cuDNN) compares like
    with like: torch's defaults allow TF32 in cuDNN but not in torch.matmul. Returns the mode's
    name for results tables: ``"tf32"`` or ``"fp32"``."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return "tf32" if tf32 else "fp32"


# ----------------------------------------------------------------------------------------------
# Helpers.

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in CTYPES:
        raise TypeError(f"the CUDA kernels support {sorted(str(d) for d in CTYPES)}, got {dtype}")


def _like(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def _chunks(n: int, per_item: int) -> list[tuple[int, int]]:
    step = max(1, min(n, _COLUMN_BUDGET // max(per_item, 1)))
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _segments(keys: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """(order, starts): entries sorted stably by key, and where each key's run starts (length
    num_segments + 1). Keys equal to num_segments (the sentinel) sort past every segment."""
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.arange(num_segments + 1, device=keys.device, dtype=keys.dtype)
    starts = torch.searchsorted(sorted_keys, bounds)
    return order.contiguous(), starts.contiguous()


# ----------------------------------------------------------------------------------------------
# Deformable convolution.

def _conv_geometry(input: Tensor, offset: Tensor, weight: Tensor, stride, padding, dilation) -> dict:
    n, c, h, w = input.shape
    out_c, c_per_group, kh, kw = weight.shape
    taps = kh * kw
    return dict(
        n=n, c=c, h=h, w=w, out_c=out_c, c_per_group=c_per_group, groups=c // c_per_group, kh=kh, kw=kw,
        taps=taps, offset_groups=offset.shape[1] // (2 * taps), ho=offset.shape[2], wo=offset.shape[3],
        stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
    )


def _conv_dims(g: dict, batch: int) -> list[int]:
    return [batch, g["c"], g["h"], g["w"], g["offset_groups"], g["kh"], g["kw"], *g["stride"], *g["padding"],
            *g["dilation"], g["ho"], g["wo"]]


def _im2col(launch: Launch, g: dict, input: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
    """(B, groups, C/groups * taps, L) columns of a chunk of images."""
    batch, length = input.shape[0], g["ho"] * g["wo"]
    columns = input.new_empty((batch, g["groups"], g["c_per_group"] * g["taps"], length))
    launch("dcn_im2col", input.dtype, batch * g["c"] * length, [input, offset, mask, columns, *_conv_dims(g, batch)])
    return columns


def _deform_conv2d_forward(launch: Launch, input, offset, weight, bias, stride, padding, dilation, mask) -> Tensor:
    dtype = input.dtype
    _check_dtype(dtype)
    input = input.contiguous()
    offset, weight, bias, mask = (_like(t, dtype) for t in (offset, weight, bias, mask))
    g = _conv_geometry(input, offset, weight, stride, padding, dilation)
    length = g["ho"] * g["wo"]
    out = input.new_empty((g["n"], g["out_c"], g["ho"], g["wo"]))
    w_mat = weight.reshape(g["groups"], g["out_c"] // g["groups"], g["c_per_group"] * g["taps"])
    for b0, b1 in _chunks(g["n"], g["c"] * g["taps"] * length):
        columns = _im2col(launch, g, input[b0:b1], offset[b0:b1], None if mask is None else mask[b0:b1])
        # One GEMM call per chunk of images and weight group: a group's (O/groups, K) weight
        # broadcasts over the images without a copy (a torch.bmm per image and a 1x1 cuDNN
        # convolution were tried: results/bench/cuda_notes.md).
        chunk_out = out[b0:b1].view(b1 - b0, g["groups"], g["out_c"] // g["groups"], length)
        for group in range(g["groups"]):
            torch.matmul(w_mat[group:group + 1], columns[:, group], out=chunk_out[:, group])
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return out


def _add_weight_grad(grad_weight: Tensor, grad_out: Tensor, columns: Tensor) -> None:
    """grad_weight (groups, O/groups, K) += the sum over images of grad_out (B, groups, O/groups, L)
    times columns (B, groups, K, L) transposed: per weight group, the images' products in runs
    whose (images, O/groups, K) temporary is no larger than a group's columns (one image at least),
    so a small map with a wide layer does not need a copy of the weight per image."""
    batch, groups, out_per_group, length = grad_out.shape
    step = max(1, batch * length // max(1, out_per_group))  # no output channels: nothing to add
    for group in range(groups):
        for start in range(0, batch, step):
            products = torch.matmul(grad_out[start:start + step, group],
                                    columns[start:start + step, group].transpose(-1, -2))
            grad_weight[group] += products.sum(0, dtype=grad_weight.dtype)


def _col2im_deterministic(launch: Launch, g: dict, grad_columns: Tensor, offset: Tensor, mask: Tensor | None,
                          grad_input: Tensor) -> None:
    batch = offset.shape[0]
    samples = batch * g["offset_groups"] * g["taps"] * g["ho"] * g["wo"]
    num_segments = batch * g["offset_groups"] * g["h"] * g["w"]
    keys = torch.empty(4 * samples, dtype=torch.int64, device=offset.device)
    coefs = torch.empty(4 * samples, dtype=grad_input.dtype, device=offset.device)
    dims = _conv_dims(g, batch)
    launch("dcn_col2im_entries", offset.dtype, samples,
           [offset, mask, keys, coefs, dims[0], *dims[2:], num_segments])
    order, starts = _segments(keys, num_segments)
    launch("dcn_col2im_gather", offset.dtype, batch * g["c"] * g["h"] * g["w"],
           [grad_columns, order, starts, coefs, grad_input, *dims[:7], g["ho"], g["wo"]])


def _deform_conv2d_backward(launch: Launch, grad_out, input, offset, weight, bias, stride, padding, dilation, mask):
    dtype = input.dtype
    _check_dtype(dtype)
    acc = _acc_dtype(dtype)
    deterministic = torch.are_deterministic_algorithms_enabled()
    input = input.contiguous()
    grad_out, offset, weight, bias, mask = (_like(t, dtype) for t in (grad_out, offset, weight, bias, mask))
    g = _conv_geometry(input, offset, weight, stride, padding, dilation)
    groups, length = g["groups"], g["ho"] * g["wo"]

    grad_input = torch.zeros(input.shape, dtype=acc, device=input.device)
    grad_offset = torch.empty(offset.shape, dtype=acc, device=input.device)
    grad_mask = None if mask is None else torch.empty(mask.shape, dtype=acc, device=input.device)
    grad_weight = torch.zeros((groups, g["out_c"] // groups, g["c_per_group"] * g["taps"]), dtype=acc,
                              device=input.device)
    w_t = weight.reshape(groups, g["out_c"] // groups, g["c_per_group"] * g["taps"]).transpose(1, 2)
    for b0, b1 in _chunks(g["n"], g["c"] * g["taps"] * length):
        batch = b1 - b0
        x, off = input[b0:b1], offset[b0:b1]
        m = None if mask is None else mask[b0:b1]
        go = grad_out[b0:b1].reshape(batch, groups, g["out_c"] // groups, length)
        grad_columns = input.new_empty((batch, groups, g["c_per_group"] * g["taps"], length))
        for group in range(groups):
            torch.matmul(w_t[group:group + 1], go[:, group], out=grad_columns[:, group])
        dims = _conv_dims(g, batch)
        if deterministic:
            _col2im_deterministic(launch, g, grad_columns, off, m, grad_input[b0:b1])
        else:
            launch("dcn_col2im", dtype, batch * g["c"] * g["taps"] * length,
                   [grad_columns, off, m, grad_input[b0:b1], *dims])
        launch("dcn_col2im_coord", dtype, batch * g["offset_groups"] * g["taps"] * length,
               [grad_columns, x, off, m, grad_offset[b0:b1], None if m is None else grad_mask[b0:b1], *dims])
        columns = _im2col(launch, g, x, off, m)
        _add_weight_grad(grad_weight, go, columns)
    grad_bias = None if bias is None else grad_out.sum((0, 2, 3), dtype=acc).to(dtype)
    return (grad_input.to(dtype), grad_offset.to(dtype), grad_weight.reshape(weight.shape).to(dtype), grad_bias,
            None if grad_mask is None else grad_mask.to(dtype))


def _no_autocast(device: torch.device):
    """The kernels run in the input's dtype: the GEMMs inside must not be autocast."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def deform_conv2d_forward(input, offset, weight, bias, stride, padding, dilation, mask) -> Tensor:
    with _no_autocast(input.device):
        return _deform_conv2d_forward(_cupy_launch, input, offset, weight, bias, stride, padding, dilation, mask)


def deform_conv2d_backward(grad_out, input, offset, weight, bias, stride, padding, dilation, mask):
    """(grad_input, grad_offset, grad_weight, grad_bias or None, grad_mask or None)."""
    with _no_autocast(input.device):
        return _deform_conv2d_backward(_cupy_launch, grad_out, input, offset, weight, bias, stride, padding, dilation, mask)


# ----------------------------------------------------------------------------------------------
# Deformable (position-sensitive) RoI pooling.

def _roi_geometry(input: Tensor, rois: Tensor, offset: Tensor | None, output_size, sampling_ratio,
                  position_sensitive) -> dict:
    n, c_in, h, w = input.shape
    ph, pw = output_size
    c_out = c_in // (ph * pw) if position_sensitive else c_in
    if offset is None:
        classes, parts_h, parts_w = 1, 1, 1
    else:
        classes, parts_h, parts_w = offset.shape[1] // 2, offset.shape[2], offset.shape[3]
    return dict(n=n, c_in=c_in, h=h, w=w, k=rois.shape[0], c_out=c_out, ph=ph, pw=pw, s=int(sampling_ratio),
                classes=classes, parts_h=parts_h, parts_w=parts_w, ps=int(bool(position_sensitive)))


def _roi_prepare(input, rois, offset):
    dtype = input.dtype
    _check_dtype(dtype)
    return input.contiguous(), rois.to(_acc_dtype(dtype)).contiguous(), _like(offset, dtype)


def _roi_pool_forward(launch: Launch, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                      position_sensitive) -> Tensor:
    input, rois, offset = _roi_prepare(input, rois, offset)
    g = _roi_geometry(input, rois, offset, output_size, sampling_ratio, position_sensitive)
    out = input.new_empty((g["k"], g["c_out"], g["ph"], g["pw"]))
    launch("dcn_roi_pool_forward", input.dtype, out.numel(),
           [input, rois, offset, out, g["k"], g["c_in"], g["h"], g["w"], g["c_out"], g["ph"], g["pw"], g["s"],
            g["classes"], g["parts_h"], g["parts_w"], g["ps"], float(spatial_scale), float(gamma)])
    return out


def _bins_to_parts(t: Tensor, dim: int, bins: int, parts: int) -> Tensor:
    """Sum the bins of axis ``dim`` into parts: bin i belongs to part floor(i * parts / bins), so each
    part owns a contiguous run of bins (possibly none). Plain reductions: deterministic."""
    if parts == bins:
        return t
    owner = [i * parts // bins for i in range(bins)]
    pieces = []
    for p in range(parts):
        members = [i for i in range(bins) if owner[i] == p]
        if members:
            pieces.append(t.narrow(dim, members[0], len(members)).sum(dim, keepdim=True))
        else:
            shape = list(t.shape)
            shape[dim] = 1
            pieces.append(t.new_zeros(shape))
    return torch.cat(pieces, dim)


def _roi_pool_backward(launch: Launch, grad_out, input, rois, offset, output_size, spatial_scale, sampling_ratio,
                       gamma, position_sensitive):
    input, rois, offset = _roi_prepare(input, rois, offset)
    dtype, acc = input.dtype, _acc_dtype(input.dtype)
    grad_out = grad_out.to(dtype).contiguous()
    deterministic = torch.are_deterministic_algorithms_enabled()
    g = _roi_geometry(input, rois, offset, output_size, sampling_ratio, position_sensitive)
    device = input.device
    common = [g["k"], g["c_in"], g["h"], g["w"], g["c_out"], g["ph"], g["pw"], g["s"], g["classes"], g["parts_h"],
              g["parts_w"], g["ps"], float(spatial_scale), float(gamma)]
    grad_input = torch.zeros(input.shape, dtype=acc, device=device)
    grad_shift = None if offset is None else torch.empty((*grad_out.shape, 2), dtype=acc, device=device)
    if offset is not None or not deterministic:
        launch("dcn_roi_pool_backward", dtype, grad_out.numel(),
               [grad_out, input, rois, offset, None if deterministic else grad_input, grad_shift, *common])
    if deterministic:
        positions = g["k"] * g["classes"] * g["ph"] * g["pw"]
        entries = positions * g["s"] * g["s"] * 4
        bins = g["ph"] * g["pw"] if g["ps"] else 1
        num_segments = g["n"] * g["classes"] * bins * g["h"] * g["w"]
        keys = torch.empty(entries, dtype=torch.int64, device=device)
        coefs = torch.empty(entries, dtype=acc, device=device)
        launch("dcn_roi_pool_entries", dtype, positions,
               [rois, offset, keys, coefs, g["k"], g["h"], g["w"], g["ph"], g["pw"], g["s"], g["classes"],
                g["parts_h"], g["parts_w"], g["ps"], float(spatial_scale), float(gamma), num_segments])
        order, starts = _segments(keys, num_segments)
        launch("dcn_roi_pool_gather", dtype, input.numel(),
               [grad_out, order, starts, coefs, grad_input, g["n"], g["c_in"], g["h"], g["w"], g["c_out"], g["ph"],
                g["pw"], g["s"], g["classes"], g["ps"]])
    grad_offset = None
    if offset is not None:
        k, classes, ph, pw = g["k"], g["classes"], g["ph"], g["pw"]
        per_class = grad_shift.reshape(k, classes, g["c_out"] // classes, ph, pw, 2).sum(2)
        per_class = per_class.permute(0, 1, 4, 2, 3)  # (K, classes, 2 [x, y], ph, pw)
        per_part = _bins_to_parts(_bins_to_parts(per_class, 3, ph, g["parts_h"]), 4, pw, g["parts_w"])
        grad_offset = per_part.reshape(offset.shape).to(dtype)
    return grad_input.to(dtype), grad_offset


def roi_pool_forward(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                     position_sensitive) -> Tensor:
    with _no_autocast(input.device):
        return _roi_pool_forward(_cupy_launch, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                             position_sensitive)


def roi_pool_backward(grad_out, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                      position_sensitive):
    """(grad_input, grad_offset or None)."""
    with _no_autocast(input.device):
        return _roi_pool_backward(_cupy_launch, grad_out, input, rois, offset, output_size, spatial_scale,
                              sampling_ratio, gamma, position_sensitive)
