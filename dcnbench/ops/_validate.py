"""Argument checks shared by every backend: each failure names the argument, expected and given."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor


def integer(value: object) -> int | None:
    """``value`` as a Python int when it is an integer (int, numpy integer, integer 0-d tensor), not a
    bool; else None."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and (value.dtype == torch.bool or value.dim() != 0)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(2, 3) -> (2, 3)`` (numpy integers too, as torchvision takes them); anything
    else raises naming ``name``."""
    single = integer(value)
    if single is not None:
        return single, single
    if isinstance(value, Sequence) and len(value) == 2:
        h, w = integer(value[0]), integer(value[1])
        if h is not None and w is not None:
            return h, w
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def require_tensor(t: object, name: str, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def require_like(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    """``t`` must share ``ref``'s dtype and device."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def check_geometry(stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> None:
    """stride >= 1, padding >= 0 and dilation >= 1 in both dimensions."""
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")


def output_size(input: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]) -> tuple[int, int]:
    """(Ho, Wo) of a convolution over the (N, C, H, W) ``input``; raises when that would be empty."""
    (h, w), (kh, kw) = input.shape[2:], kernel_size
    ho = (h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"input of spatial size {(h, w)} is too small for kernel {(kh, kw)}, dilation {dilation}, "
            f"padding {padding}: output would be {(ho, wo)}"
        )
    return ho, wo


def check_counts(**counts: object) -> None:
    """Each keyword argument is an integer >= 1 (a module's channel and group counts; numpy integers
    too, as for the sizes)."""
    for name, value in counts.items():
        if integer(value) is None:
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def check_deform_conv2d_module(in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                               stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                               groups: int, offset_groups: int) -> None:
    """Validate ``DeformConv2d``'s constructor arguments (sizes as (h, w) pairs)."""
    check_counts(in_channels=in_channels, out_channels=out_channels, groups=groups, offset_groups=offset_groups)
    if min(kernel_size) < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    check_geometry(stride, padding, dilation)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups ({groups}) must divide in_channels ({in_channels}) and out_channels ({out_channels})")
    if in_channels % offset_groups:
        raise ValueError(f"offset_groups ({offset_groups}) must divide in_channels ({in_channels})")


def fx_proxy(t: object) -> bool:
    """Whether ``t`` is a ``torch.fx`` Proxy: the modules skip their checks under FX symbolic
    tracing (``torch.fx.symbolic_trace``, torchvision's ``create_feature_extractor``); the ops
    check the real tensors when the traced graph runs."""
    return isinstance(t, torch.fx.Proxy)


def require_channels(t: object, name: str, channels: int, source: str) -> None:
    """``t``: a 4-D floating tensor of ``channels`` channels; ``source`` says where that number comes from."""
    require_tensor(t, name, 4)
    if t.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels ({source}), got shape {tuple(t.shape)}")


def check_module_input(input: Tensor, in_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                       padding: tuple[int, int], dilation: tuple[int, int]) -> None:
    """A conv module's input: a 4-D floating tensor with ``in_channels`` channels and a non-empty output."""
    require_channels(input, "input", in_channels, "in_channels")
    output_size(input, kernel_size, stride, padding, dilation)


def require_nonempty_map(input: Tensor) -> None:
    """A 4-D input whose feature map has height and width >= 1 (the kernels read its pixels)."""
    if 0 in input.shape[-2:]:
        raise ValueError(f"input must have a non-empty feature map (height and width >= 1), got shape {tuple(input.shape)}")


def check_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Tensor | None,
) -> tuple[int, int]:
    """Validate a deform_conv2d call; returns (weight groups, offset groups)."""
    require_tensor(input, "input", 4)
    require_tensor(offset, "offset", 4)
    require_tensor(weight, "weight", 4)
    require_like(offset, input, "offset", "input")
    require_like(weight, input, "weight", "input")
    if bias is not None:
        require_tensor(bias, "bias", 1)
        require_like(bias, input, "bias", "input")
    if mask is not None:
        require_tensor(mask, "mask", 4)
        require_like(mask, input, "mask", "input")
    check_geometry(stride, padding, dilation)

    n, c = input.shape[:2]
    out_c, c_per_group, kh, kw = weight.shape
    if kh < 1 or kw < 1 or c_per_group < 1:
        raise ValueError(
            f"weight must have non-empty input-channel and kernel dimensions, got shape {tuple(weight.shape)}"
        )
    if c % c_per_group != 0:
        raise ValueError(
            f"weight expects {c_per_group} input channels per group, which does not divide "
            f"input's {c} channels (input shape {tuple(input.shape)}, weight shape {tuple(weight.shape)})"
        )
    groups = c // c_per_group
    if out_c % groups != 0:
        raise ValueError(f"weight's {out_c} output channels are not divisible by the {groups} groups implied by input")
    if bias is not None and bias.shape[0] != out_c:
        raise ValueError(f"bias must have shape ({out_c},), got {tuple(bias.shape)}")

    ho, wo = output_size(input, (kh, kw), stride, padding, dilation)
    require_nonempty_map(input)  # with padding alone the output would be non-empty and sample nothing
    taps = kh * kw
    if offset.shape[0] != n or offset.shape[2:] != (ho, wo) or offset.shape[1] % (2 * taps) != 0 or offset.shape[1] == 0:
        raise ValueError(
            f"offset must have shape ({n}, 2*offset_groups*{kh}*{kw}, {ho}, {wo}) for input {tuple(input.shape)} "
            f"and weight {tuple(weight.shape)}, got {tuple(offset.shape)}"
        )
    offset_groups = offset.shape[1] // (2 * taps)
    if c % offset_groups != 0:
        raise ValueError(f"offset implies {offset_groups} offset groups, which does not divide input's {c} channels")
    if mask is not None and tuple(mask.shape) != (n, offset_groups * taps, ho, wo):
        raise ValueError(
            f"mask must have shape {(n, offset_groups * taps, ho, wo)} (offset_groups={offset_groups}), "
            f"got {tuple(mask.shape)}"
        )
    return groups, offset_groups


def _require_boxes(boxes: Tensor, input: Tensor, name: str) -> None:
    """Boxes may have any floating dtype (they are converted); they must share input's device."""
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {boxes.dtype}")
    if boxes.device != input.device:
        raise ValueError(f"{name} is on {boxes.device} but input is on {input.device}; they must match")


def rois_to_tensor(rois: Tensor | Sequence[Tensor], input: Tensor) -> Tensor:
    """Accept (K, 5) ``[batch_index, x1, y1, x2, y2]`` or a list of (Ki, 4) boxes, one per image of
    ``input``; return (K, 5)."""
    if isinstance(rois, Tensor):
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f"rois must have shape (K, 5) [batch_index, x1, y1, x2, y2], got {tuple(rois.shape)}")
        _require_boxes(rois, input, "rois")
        return rois
    if isinstance(rois, (list, tuple)):
        parts = []
        for i, boxes in enumerate(rois):
            if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
                shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
                raise ValueError(f"rois[{i}] must be a (Ki, 4) tensor of [x1, y1, x2, y2], got {shape}")
            _require_boxes(boxes, input, f"rois[{i}]")
            parts.append(torch.cat([boxes.new_full((boxes.shape[0], 1), float(i)), boxes], dim=1))
        if len(parts) != input.shape[0]:
            raise ValueError(
                f"rois as a list must hold one (Ki, 4) tensor per image: got {len(parts)} for input of batch "
                f"{input.shape[0]} (shape {tuple(input.shape)})"
            )
        if not parts:
            return input.new_zeros((0, 5))
        return torch.cat(parts, dim=0)
    raise TypeError(f"rois must be a (K, 5) tensor or a list of (Ki, 4) tensors, got {type(rois).__name__}")


def check_roi_values(input: Tensor, rois: Tensor) -> None:
    """ValueError unless every row of the (K, 5) ``rois`` has an integer batch index of ``input``
    and finite box coordinates: the kernels index the map by them, so this runs where the values
    are, inside the op (also under ``torch.compile`` and in an exported program) and before the
    reference; a no-op on tensors without values. One host sync on CUDA."""
    if rois.shape[0] == 0 or not has_values(rois):
        return
    idx = rois[:, 0]
    bad_index = (idx < 0) | (idx >= input.shape[0]) | (idx != idx.floor())
    bad_box = ~torch.isfinite(rois[:, 1:]).all(dim=1)
    if bool((bad_index | bad_box).any()):  # one host sync for both checks
        if bool(bad_index.any()):
            raise ValueError(
                f"rois[:, 0] must hold integer batch indices in [0, {input.shape[0] - 1}] for input of batch "
                f"{input.shape[0]}, got {idx[bad_index][0].item()}"
            )
        row = int(bad_box.nonzero()[0, 0])
        raise ValueError(f"rois must hold finite box coordinates, got {rois[row].tolist()} in row {row}")


def check_grad_output(grad_output: Tensor, shape: tuple[int, ...], input: Tensor) -> None:
    """A backward's ``grad_output`` must have its forward's output ``shape``, dtype and device."""
    require_tensor(grad_output, "grad_output", len(shape))
    require_like(grad_output, input, "grad_output", "input")
    if tuple(grad_output.shape) != tuple(shape):
        raise ValueError(f"grad_output must have the output's shape {tuple(shape)}, got {tuple(grad_output.shape)}")


def check_pool_settings(output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int,
                        gamma: float) -> None:
    """RoI pooling's settings: bins >= 1 per side, an int sampling_ratio >= 1, a finite
    spatial_scale > 0 and a finite gamma. The floats' values are checked inside the op, where they
    are known, while ``torch.compile`` or ``torch.export`` trace (they may be symbolic there)."""
    if min(output_size) < 1:
        raise ValueError(f"output_size must be positive, got {output_size}")
    check_counts(sampling_ratio=sampling_ratio)
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return
    if not (_real(spatial_scale, "spatial_scale") > 0 and math.isfinite(spatial_scale)):
        raise ValueError(f"spatial_scale must be finite and > 0, got {spatial_scale}")
    if not math.isfinite(_real(gamma, "gamma")):
        raise ValueError(f"gamma must be finite, got {gamma}")


def _real(value: object, name: str) -> float:
    """``value`` as a float: a real number or a one-element tensor (not a bool or a string)."""
    if not isinstance(value, (bool, str, complex)):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{name} must be a real number, got {value!r}")


def has_values(tensor: Tensor) -> bool:
    """Whether ``tensor``'s values can be read (for value checks): not on the meta device, not a
    fake tensor (``FakeTensorMode``, ``make_fx``), and not while ``torch.compile`` or
    ``torch.export`` trace (their tensors are symbolic: a check would break the graph). The kernels'
    checks run inside the ops, so compiled and exported programs still make them when they run."""
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return False
    if tensor.device.type == "meta":
        return False
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None and not _is_fake(tensor)


def _is_fake(tensor: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def check_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    position_sensitive: bool,
) -> int:
    """Validate a deformable (PS) RoI pooling call; returns the number of output channels."""
    require_tensor(input, "input", 4)
    require_nonempty_map(input)
    check_pool_settings(output_size, spatial_scale, sampling_ratio, gamma)
    ph, pw = output_size
    c = input.shape[1]
    if position_sensitive:
        if c % (ph * pw) != 0:
            raise ValueError(
                f"input channels ({c}) must be divisible by output_size[0]*output_size[1] = {ph * pw} "
                f"for position-sensitive pooling (input shape {tuple(input.shape)})"
            )
        out_c = c // (ph * pw)
    else:
        out_c = c
    k = rois.shape[0]
    if offset is not None:
        require_tensor(offset, "offset", 4)
        require_like(offset, input, "offset", "input")
        if offset.shape[0] != k or offset.shape[1] % 2 != 0 or offset.shape[1] == 0:
            raise ValueError(
                f"offset must have shape ({k}, 2*n, P, P) for {k} rois (n offset classes), got {tuple(offset.shape)}"
            )
        if offset.shape[2] < 1 or offset.shape[3] < 1:
            raise ValueError(f"offset must have a non-empty part grid, got shape {tuple(offset.shape)}")
        n_cls = offset.shape[1] // 2
        if out_c % n_cls != 0:
            raise ValueError(
                f"offset has {n_cls} offset classes, which must divide the {out_c} output channels "
                f"(offset shape {tuple(offset.shape)}, input shape {tuple(input.shape)})"
            )
    return out_c
