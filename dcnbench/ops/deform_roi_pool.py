"""Deformable RoI pooling and deformable position-sensitive RoI pooling (paper section 2.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import reference
from ._validate import (check_counts, check_pool_settings, check_roi_pool, check_roi_values, fx_proxy, pair,
                        require_channels, require_tensor, rois_to_tensor)
from .dispatch import autocast_cast, autocast_dtype, backend_for, deform_roi_pool_kernels, float32_on_cpu

Rois = Tensor | Sequence[Tensor]


def _roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, position_sensitive) -> Tensor:
    if offset is not None and not isinstance(offset, Tensor):
        raise TypeError(f"offset (the third argument) must be a Tensor or None, got {offset!r}; torchvision's "
                        "roi_align and ps_roi_align take output_size third, these ops take it fourth")
    output_size = pair(output_size, "output_size")
    require_tensor(input, "input", 4)  # before the rois, which are read against it
    input, offset = autocast_cast(autocast_dtype(input.device.type), input, offset)
    rois = rois_to_tensor(rois, input)
    # Boxes keep at least float32 precision (a 600 px coordinate in bfloat16 is off by pixels).
    rois = rois.to(input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32)
    check_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, position_sensitive)
    if float32_on_cpu(input):
        input32, offset = autocast_cast(torch.float32, input, offset)
        return _roi_pool(input32, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                         position_sensitive).to(input.dtype)
    spatial_scale, gamma, sampling_ratio = float(spatial_scale), float(gamma), int(sampling_ratio)
    if backend_for(input) == "reference":
        check_roi_values(input, rois)  # the kernels check them inside the op (dispatch.py)
        return reference.roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, position_sensitive)
    return deform_roi_pool_kernels(input, rois, offset, list(output_size), spatial_scale, sampling_ratio, gamma,
                                   position_sensitive)


@torch.fx.wrap  # one call node under FX symbolic tracing, as torchvision's ops
def deform_roi_pool(
    input: Tensor,
    rois: Rois,
    offset: Tensor | None = None,
    output_size: int | tuple[int, int] = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 4,
    gamma: float = 0.1,
) -> Tensor:
    """Deformable RoI pooling, Eq. (6): average of S×S bilinear samples per bin, bins shifted by
    ``gamma * offset * (roi_w, roi_h)``.

    Args:
        input: (N, C, H, W) feature map.
        rois: (K, 5) ``[batch_index, x1, y1, x2, y2]`` in image coordinates, or a list of per-image
            (Ki, 4) boxes; finite (NaN or inf boxes raise ValueError).
        offset: (K, 2*n, P, P) normalized offsets, channel 2c = x and 2c+1 = y of offset class c
            (output channel c' uses class c' // (C / n)); None for plain pooling. Samples that a NaN
            or infinite offset moves are skipped, as samples off the map are.
        output_size: k or (kh, kw) bins.
        spatial_scale: feature-map pixels per image pixel (1/16 at stride 16).
        sampling_ratio: S, samples per bin side.
        gamma: offset scale (0.1 in the paper).

    Returns:
        (K, C, kh, kw), in the input's dtype; float16 and bfloat16 compute in float32 on the CPU.
    """
    return _roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, False)


@torch.fx.wrap  # one call node under FX symbolic tracing, as torchvision's ops
def deform_ps_roi_pool(
    input: Tensor,
    rois: Rois,
    offset: Tensor | None = None,
    output_size: int | tuple[int, int] = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 4,
    gamma: float = 0.1,
) -> Tensor:
    """Deformable position-sensitive RoI pooling: output channel c at bin (i, j) pools input
    channel (c*kh + i)*kw + j. input (N, C*kh*kw, H, W) -> (K, C, kh, kw); other arguments as
    :func:`deform_roi_pool`.
    """
    return _roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, True)


class DeformRoIPool(nn.Module):
    """Deformable RoI pooling with its offset branch, as in the paper's Faster R-CNN head.

    Plain pooling of the RoI, one fc (zero-initialized) to 2*k*k normalized offsets, then deformable
    pooling. The paper trains the fc at 0.01 times the base learning rate (``offset_lr_mult``).
    forward(input (N, C, H, W), rois) -> (K, C, k, k).
    """

    offset_lr_mult = 0.01

    def __init__(self, in_channels: int, output_size: int | tuple[int, int] = 7, spatial_scale: float = 1.0,
                 sampling_ratio: int = 4, gamma: float = 0.1) -> None:
        super().__init__()
        self.in_channels, self.output_size = in_channels, pair(output_size, "output_size")
        check_counts(in_channels=in_channels)
        check_pool_settings(self.output_size, spatial_scale, sampling_ratio, gamma)
        self.spatial_scale, self.sampling_ratio, self.gamma = spatial_scale, sampling_ratio, gamma
        kh, kw = self.output_size
        self.offset_fc = nn.Linear(in_channels * kh * kw, 2 * kh * kw)
        nn.init.zeros_(self.offset_fc.weight)
        nn.init.zeros_(self.offset_fc.bias)

    def forward(self, input: Tensor, rois: Rois) -> Tensor:
        if not fx_proxy(input):
            require_channels(input, "input", self.in_channels, "in_channels")
        args = (self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma)
        pooled = deform_roi_pool(input, rois, None, *args)
        offset = self.offset_fc(pooled.flatten(1)).reshape(pooled.shape[0], 2, *self.output_size)
        return deform_roi_pool(input, rois, offset, *args)

    def offset_parameters(self) -> list[nn.Parameter]:
        return list(self.offset_fc.parameters())

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, {_pool_repr(self)}"


class DeformPSRoIPool(nn.Module):
    """Deformable position-sensitive RoI pooling with its offset branch, as in the paper's R-FCN.

    A 1×1 conv (zero-initialized) on the features beneath the score maps gives 2*n*k*k offset maps,
    which are position-sensitively pooled per RoI without offsets into (K, 2n, k, k) normalized
    offsets for n offset classes (class-specific: n = C+1 for scores, 1 for boxes).
    forward(score_maps (N, out_channels*k*k, H, W), features (N, in_channels, H, W), rois)
    -> (K, out_channels, k, k).
    """

    offset_lr_mult = 1.0

    def __init__(self, in_channels: int, out_channels: int, output_size: int | tuple[int, int] = 7,
                 spatial_scale: float = 1.0, sampling_ratio: int = 4, gamma: float = 0.1,
                 offset_groups: int = 1) -> None:
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        check_counts(in_channels=in_channels, out_channels=out_channels, offset_groups=offset_groups)
        check_pool_settings(self.output_size, spatial_scale, sampling_ratio, gamma)
        if out_channels % offset_groups:
            raise ValueError(f"offset_groups ({offset_groups}) must divide out_channels ({out_channels})")
        self.in_channels, self.out_channels, self.offset_groups = in_channels, out_channels, offset_groups
        self.spatial_scale, self.sampling_ratio, self.gamma = spatial_scale, sampling_ratio, gamma
        kh, kw = self.output_size
        self.offset_conv = nn.Conv2d(in_channels, 2 * offset_groups * kh * kw, kernel_size=1)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def forward(self, score_maps: Tensor, features: Tensor, rois: Rois) -> Tensor:
        if not fx_proxy(score_maps):
            self._check_maps(score_maps, features)
        args = (self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma)
        offset = deform_ps_roi_pool(self.offset_conv(features), rois, None, *args)
        return deform_ps_roi_pool(score_maps, rois, offset, *args)

    def _check_maps(self, score_maps: Tensor, features: Tensor) -> None:
        require_channels(score_maps, "score_maps", self.out_channels * self.output_size[0] * self.output_size[1],
                         "out_channels*kh*kw")
        require_channels(features, "features", self.in_channels, "in_channels")
        if features.shape[0] != score_maps.shape[0] or features.shape[2:] != score_maps.shape[2:]:
            raise ValueError(f"features must have score_maps' batch and map size (N, H, W) = "
                             f"{(score_maps.shape[0], *score_maps.shape[2:])}, got "
                             f"{(features.shape[0], *features.shape[2:])}: their offsets are pooled at "
                             f"score_maps' spatial_scale")

    def offset_parameters(self) -> list[nn.Parameter]:
        return list(self.offset_conv.parameters())

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, {_pool_repr(self)}, "
                f"offset_groups={self.offset_groups}")


def _pool_repr(module: DeformRoIPool | DeformPSRoIPool) -> str:
    return (f"output_size={module.output_size}, spatial_scale={module.spatial_scale}, "
            f"sampling_ratio={module.sampling_ratio}, gamma={module.gamma}")


def offset_param_groups(model: nn.Module, lr: float, **group_options) -> list[dict]:
    """Optimizer parameter groups: the base group at ``lr``, and each deformable module's offset
    branch at ``lr * module.offset_lr_mult`` (paper: 1 for convs, 0.01 for the RoI-pooling fc).

    Deformable modules are those with ``offset_parameters()`` and ``offset_lr_mult``; extra keyword
    options (e.g. weight_decay) go into every group. Fixed parameters (``requires_grad`` False)
    are left out.
    """
    by_mult: dict[float, list[nn.Parameter]] = {}
    offset_ids: set[int] = set()
    for module in model.modules():
        if hasattr(module, "offset_parameters") and hasattr(module, "offset_lr_mult"):
            params = [p for p in module.offset_parameters() if id(p) not in offset_ids]
            offset_ids.update(id(p) for p in params)
            by_mult.setdefault(float(module.offset_lr_mult), []).extend(p for p in params if p.requires_grad)
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in offset_ids]
    groups = [{"params": base, "lr": lr, **group_options}]
    groups += [{"params": ps, "lr": lr * mult, **group_options} for mult, ps in sorted(by_mult.items()) if ps]
    return groups
