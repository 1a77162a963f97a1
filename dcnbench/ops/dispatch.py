"""Backend choice per call, and the kernel backends' registration as ``torch.library`` custom ops.

Three backends compute the same operators:

- ``reference``: pure PyTorch (``dcnbench.ops.reference``); any device, autograd of its own.
- ``native``: C++ CPU kernels, built on first use (``dcnbench.ops.native``).
- ``cuda``: CUDA kernels through cupy (``dcnbench.ops.cuda``).

The kernel backends run inside the custom ops ``dcnbench::deform_conv2d`` and
``dcnbench::deform_roi_pool`` (and their ``_backward`` twins), which carry fake implementations and
autograd formulas, so ``torch.compile(fullgraph=True)`` traces through them. An op picks its kernels
from its tensors' device when it runs (native on the CPU, cuda on CUDA), so a graph exported or
traced on one device runs on the other; it checks its arguments (shapes, and the boxes' values) when
it runs, as the public ops do, since nothing else checks a direct call or an exported program's.

A call uses the first available of native (CPU) or cuda (CUDA), else the reference. Force one with
``use_backend("reference")`` (a context manager) or the environment variable ``DCNBENCH_BACKEND``;
``backend_for(tensor)`` tells which one a call on that tensor would use.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from . import cuda, native
from ._validate import check_deform_conv2d, check_grad_output, check_roi_pool, check_roi_values, rois_to_tensor

BACKENDS = ("reference", "native", "cuda")
_KERNEL_MODULES: dict[str, ModuleType] = {"native": native, "cuda": cuda}
_local = threading.local()
_warned: set[str] = set()


def _kernel_module(name: str) -> ModuleType:
    return _KERNEL_MODULES[name]


_DEVICE_BACKENDS = {"cpu": "native", "cuda": "cuda"}


def _kernel_backend(device: torch.device) -> str:
    """The kernel backend of ``device``'s type: the custom ops run it (``use_backend`` and the
    reference are chosen before a call reaches them)."""
    name = _DEVICE_BACKENDS.get(device.type)
    if name is None:
        raise ValueError(f"dcnbench's kernels run on CPU and CUDA tensors, got a tensor on {device}; "
                         "the pure-PyTorch reference runs anywhere: use_backend('reference')")
    return name


def _kernels_on(device: torch.device) -> ModuleType:
    return _kernel_module(_kernel_backend(device))


def backend_status(name: str) -> tuple[bool, str]:
    """(available, one-line reason) for backend ``name``; may build the native extension."""
    if name == "reference":
        return True, "pure PyTorch, any device"
    if name not in _KERNEL_MODULES:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return _kernel_module(name).status()


def available_backends() -> dict[str, str]:
    """Every backend with its status line, e.g. ``{"native": "available: built ...", ...}``."""
    result = {}
    for name in BACKENDS:
        ok, why = backend_status(name)
        result[name] = ("available: " if ok else "unavailable: ") + why
    return result


def _forced() -> str | None:
    name = getattr(_local, "forced", None) or os.environ.get("DCNBENCH_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"DCNBENCH_BACKEND / use_backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force backend ``name`` (or automatic choice with None) for calls in this thread.

    ``torch.compile`` fixes the backend when it compiles a graph: an already compiled function keeps
    it under a later ``use_backend`` (``torch.compiler.reset()`` recompiles). Inside a ``torch.func``
    transform the reference runs whatever is forced."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = previous


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def backend_for(tensor: Tensor) -> str:
    """The backend a call on ``tensor`` runs on now: the reference inside a ``torch.func``
    transform (vmap, grad, jacrev: they need PyTorch's own ops), else the device's choice."""
    if not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None:
        return "reference"
    return _backend_for_device(tensor.device.type)


@torch.compiler.assume_constant_result
def _backend_for_device(device_type: str) -> str:
    """The choice is made once per compiled graph (a constant to torch.compile, not traced)."""
    device_backend = _DEVICE_BACKENDS.get(device_type)
    forced = _forced()
    if forced is not None:
        if forced != "reference" and forced != device_backend:
            raise ValueError(f"backend {forced!r} cannot run tensors on device type {device_type!r}")
        if forced != "reference":
            ok, why = backend_status(forced)
            if not ok:
                raise RuntimeError(f"backend {forced!r} was forced but is unavailable: {why}")
        return forced
    if device_backend is None:
        return "reference"
    ok, why = backend_status(device_backend)
    if ok:
        return device_backend
    _warn_once(device_backend, f"dcnbench: {device_backend} backend unavailable ({why}); using the pure-PyTorch reference")
    return "reference"


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype the ops compute in under ``torch.autocast`` on this device, or None without autocast.

    CUDA follows autocast's dtype (float16 / bfloat16, float32 accumulation in the kernels); the CPU
    kernels compute in float32.
    """
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if device_type == "cuda" else torch.float32


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def float32_on_cpu(input: Tensor) -> bool:
    """Whether a call on ``input`` computes in float32 and returns ``input``'s dtype: float16 and
    bfloat16 on the CPU, which the CPU kernels do not implement."""
    return input.dtype in _HALF_DTYPES and input.device.type == "cpu"


def autocast_cast(dtype: torch.dtype | None, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast the non-float64 floating tensors to ``dtype`` (no-op when None), as autocast does for conv."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


# ----------------------------------------------------------------------------------------------
# Custom ops over the kernel backends.

def _conv_out_size(input: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    kh, kw = weight.shape[2:]
    ho = (input.shape[2] + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (input.shape[3] + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    return ho, wo


@torch.library.custom_op("dcnbench::deform_conv2d", mutates_args=())
def deform_conv2d_op(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int],
) -> Tensor:
    return _deform_conv2d_forward_kernels(input, offset, weight, bias, mask, stride, padding, dilation)


def _dense_weight(weight: Tensor) -> Tensor:
    """``weight`` itself when dense in standard or channels-last order (the CPU kernels read a
    channels-last weight without a copy), else a standard contiguous copy."""
    if weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last):
        return weight
    return weight.contiguous()


def _optional_contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _conv_layouts(input, offset, weight, bias, mask) -> tuple:
    """The tensors in the layouts the kernels read (no copy of those already so)."""
    return (input.contiguous(), offset.contiguous(), _dense_weight(weight), _optional_contiguous(bias),
            _optional_contiguous(mask))


def _deform_conv2d_forward_kernels(input, offset, weight, bias, mask, stride, padding, dilation) -> Tensor:
    # The public op checked these already; the op itself (called directly, or from an exported
    # program, where nothing else checks) must not hand the kernels shapes they would read past, nor
    # layouts they do not read (an exported program gets whatever strides its caller's tensors have).
    check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    input, offset, weight, bias, mask = _conv_layouts(input, offset, weight, bias, mask)
    return _kernels_on(input.device).deform_conv2d_forward(input, offset, weight, bias, stride, padding, dilation, mask)


@deform_conv2d_op.register_fake
def _(input, offset, weight, bias, mask, stride, padding, dilation):
    ho, wo = _conv_out_size(input, weight, stride, padding, dilation)
    return input.new_empty((input.shape[0], weight.shape[0], ho, wo))


def _deform_conv2d_backward_kernels(grad_output, input, offset, weight, bias, mask, stride, padding, dilation):
    """Grads of (input, offset, weight, bias or None, mask or None)."""
    check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    check_grad_output(grad_output, (input.shape[0], weight.shape[0], *offset.shape[2:]), input)
    input, offset, weight, bias, mask = _conv_layouts(input, offset, weight, bias, mask)
    return _kernels_on(input.device).deform_conv2d_backward(grad_output.contiguous(), input, offset, weight, bias,
                                                            stride, padding, dilation, mask)


@torch.library.custom_op("dcnbench::deform_conv2d_backward", mutates_args=())
def deform_conv2d_backward_op(
    grad_output: Tensor, input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns grads of (input, offset, weight, bias, mask); an absent bias/mask gets an empty tensor."""
    gi, go, gw, gb, gm = _deform_conv2d_backward_kernels(grad_output, input, offset, weight, bias, mask, stride,
                                                         padding, dilation)
    # Distinct empty tensors: custom-op outputs must not alias each other.
    return gi, go, gw, input.new_empty((0,)) if gb is None else gb, input.new_empty((0,)) if gm is None else gm


@deform_conv2d_backward_op.register_fake
def _(grad_output, input, offset, weight, bias, mask, stride, padding, dilation):
    # Every backend returns contiguous gradients, whatever the layouts of the tensors it was given.
    return (input.new_empty(input.shape), offset.new_empty(offset.shape), weight.new_empty(weight.shape),
            input.new_empty((0,)) if bias is None else bias.new_empty(bias.shape),
            input.new_empty((0,)) if mask is None else mask.new_empty(mask.shape))


def _deform_conv2d_setup(ctx, inputs, output):
    input, offset, weight, bias, mask, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, weight, bias, mask)
    ctx.args = (stride, padding, dilation)


def _deform_conv2d_backward_with(backward_kernels):
    def backward(ctx, grad_output):
        input, offset, weight, bias, mask = ctx.saved_tensors
        gi, go, gw, gb, gm = backward_kernels(grad_output, input, offset, weight, bias, mask, *ctx.args)
        return gi, go, gw, gb if bias is not None else None, gm if mask is not None else None, None, None, None
    return backward


deform_conv2d_op.register_autograd(_deform_conv2d_backward_with(deform_conv2d_backward_op),
                                   setup_context=_deform_conv2d_setup)


def _check_roi_pool_call(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                         position_sensitive) -> int:
    """The checks of the public op, values of the boxes included; returns the output channels."""
    rois = rois_to_tensor(rois, input)
    out_c = check_roi_pool(input, rois, offset, tuple(output_size), spatial_scale, sampling_ratio, gamma,
                           position_sensitive)
    check_roi_values(input, rois)
    return out_c


@torch.library.custom_op("dcnbench::deform_roi_pool", mutates_args=())
def deform_roi_pool_op(
    input: Tensor, rois: Tensor, offset: Tensor | None, output_size: list[int], spatial_scale: float,
    sampling_ratio: int, gamma: float, position_sensitive: bool,
) -> Tensor:
    return _roi_pool_forward_kernels(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                                     position_sensitive)


def _roi_pool_forward_kernels(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                              position_sensitive) -> Tensor:
    # The boxes' values are checked here, where they are known, in eager calls, under torch.compile
    # and in exported programs alike (the kernels index the map by them); shapes as in the backward.
    _check_roi_pool_call(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, position_sensitive)
    return _kernels_on(input.device).roi_pool_forward(
        input.contiguous(), rois.contiguous(), _optional_contiguous(offset), output_size, spatial_scale, sampling_ratio, gamma, position_sensitive
    )


@deform_roi_pool_op.register_fake
def _(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, position_sensitive):
    c = input.shape[1] // (output_size[0] * output_size[1]) if position_sensitive else input.shape[1]
    return input.new_empty((rois.shape[0], c, output_size[0], output_size[1]))


def _roi_pool_backward_kernels(grad_output, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                               position_sensitive):
    """Grads of (input, offset or None)."""
    out_c = _check_roi_pool_call(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                                 position_sensitive)
    check_grad_output(grad_output, (rois.shape[0], out_c, *output_size), input)
    return _kernels_on(input.device).roi_pool_backward(
        grad_output.contiguous(), input.contiguous(), rois.contiguous(), _optional_contiguous(offset), output_size,
        spatial_scale, sampling_ratio, gamma, position_sensitive
    )


@torch.library.custom_op("dcnbench::deform_roi_pool_backward", mutates_args=())
def deform_roi_pool_backward_op(
    grad_output: Tensor, input: Tensor, rois: Tensor, offset: Tensor | None, output_size: list[int],
    spatial_scale: float, sampling_ratio: int, gamma: float, position_sensitive: bool,
) -> tuple[Tensor, Tensor]:
    """Returns grads of (input, offset); without offset the second is an empty tensor."""
    gi, go = _roi_pool_backward_kernels(grad_output, input, rois, offset, output_size, spatial_scale, sampling_ratio,
                                        gamma, position_sensitive)
    return gi, input.new_empty((0,)) if go is None else go


@deform_roi_pool_backward_op.register_fake
def _(grad_output, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, position_sensitive):
    return input.new_empty(input.shape), input.new_empty((0,)) if offset is None else offset.new_empty(offset.shape)


def _roi_pool_setup(ctx, inputs, output):
    input, rois, offset, *args = inputs
    ctx.save_for_backward(input, rois, offset)
    ctx.args = args


def _roi_pool_backward_with(backward_kernels):
    def backward(ctx, grad_output):
        input, rois, offset = ctx.saved_tensors
        gi, go = backward_kernels(grad_output, input, rois, offset, *ctx.args)
        return gi, None, go if offset is not None else None, None, None, None, None, None
    return backward


deform_roi_pool_op.register_autograd(_roi_pool_backward_with(deform_roi_pool_backward_op), setup_context=_roi_pool_setup)


# ----------------------------------------------------------------------------------------------
# Eager calls: the same kernels and autograd formulas under a plain autograd.Function. The custom
# ops' Python dispatch (schema defaults, aliasing checks, their autograd wrapper) cost ~0.3 ms of
# host time per forward+backward of a small layer (measured in one process on an H200's host, a
# 16x32x24x24 layer: forward 189 vs 138 us, backward 541 vs 307 us through the custom ops vs calling
# the kernels), so they serve only while torch.compile traces.

class _NoDoubleBackward(torch.autograd.Function):
    """Passes an op's gradients through, tied to the op's inputs; differentiating them raises."""

    @staticmethod
    def forward(ctx, call: str, grads: tuple, *inputs: Tensor | None) -> tuple:
        ctx.call = call
        return grads

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"double backward of {ctx.call} is not supported; "
                           "use dcnbench.ops.use_backend('reference') for higher-order gradients")


def _eager_function(name: str, op_name, forward_kernels, setup_context, backward) -> type[torch.autograd.Function]:
    """An autograd.Function over the kernels; ``op_name(ctx)`` names the public op in errors."""
    def forward(ctx, *inputs):
        setup_context(ctx, inputs, None)
        return forward_kernels(*inputs)

    def first_order_backward(ctx, grad_output):
        """The kernels' gradients; under ``create_graph``, tied to the inputs through ``_NoDoubleBackward``
        so that differentiating them raises instead of silently giving zero."""
        with torch.no_grad():
            grads = backward(ctx, grad_output)
        if not torch.is_grad_enabled():
            return grads
        call = f"dcnbench.ops.{op_name(ctx)} on the {_kernel_backend(ctx.saved_tensors[0].device)} backend"
        return _NoDoubleBackward.apply(call, grads, grad_output, *ctx.saved_tensors)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(first_order_backward),
    })


_DeformConv2dEager = _eager_function(
    "_DeformConv2dEager", lambda ctx: "deform_conv2d", _deform_conv2d_forward_kernels, _deform_conv2d_setup,
    _deform_conv2d_backward_with(_deform_conv2d_backward_kernels))
_DeformRoiPoolEager = _eager_function(
    "_DeformRoiPoolEager", lambda ctx: "deform_ps_roi_pool" if ctx.args[4] else "deform_roi_pool",
    _roi_pool_forward_kernels, _roi_pool_setup, _roi_pool_backward_with(_roi_pool_backward_kernels))


def records_graph(*tensors: Tensor | None) -> bool:
    """Whether autograd would record a call on ``tensors``: without it (inference, ``no_grad``)
    the eager calls run the kernels directly, skipping ``autograd.Function``'s host work."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def through_custom_op() -> bool:
    """Whether calls must go through the registered custom ops (their fake kernels, autograd
    formulas and dispatcher entry) rather than call the kernels: under ``torch.compile``,
    ``torch.jit.trace`` or a dispatch mode (``FakeTensorMode``, ``make_fx``, logging modes)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0


def deform_conv2d_kernels(input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
                          stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    """Deformable convolution on the kernels of the tensors' device, with autograd (the kernels'
    functions make the tensors dense)."""
    args = (input, offset, weight, bias, mask, stride, padding, dilation)
    if through_custom_op():
        return deform_conv2d_op(*args)
    if not records_graph(input, offset, weight, bias, mask):
        return _deform_conv2d_forward_kernels(*args)
    return _DeformConv2dEager.apply(*args)


def deform_roi_pool_kernels(input: Tensor, rois: Tensor, offset: Tensor | None, output_size: list[int],
                            spatial_scale: float, sampling_ratio: int, gamma: float,
                            position_sensitive: bool) -> Tensor:
    """Deformable (PS) RoI pooling on the kernels of the tensors' device, with autograd (the kernels'
    functions make the tensors contiguous)."""
    args = (input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, position_sensitive)
    if through_custom_op():
        return deform_roi_pool_op(*args)
    if not records_graph(input, offset):
        return _roi_pool_forward_kernels(*args)
    return _DeformRoiPoolEager.apply(*args)
