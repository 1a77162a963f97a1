"""Deformable convolution (paper section 2.1): functional op and module."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import reference
from ._validate import check_deform_conv2d, check_deform_conv2d_module, check_module_input, fx_proxy, pair
from .dispatch import (autocast_cast, autocast_dtype, backend_for, deform_conv2d_kernels, float32_on_cpu,
                       records_graph, through_custom_op)


@torch.fx.wrap  # one call node under FX symbolic tracing, as torchvision's ops
def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution; a drop-in for ``torchvision.ops.deform_conv2d``.

    Args:
        input: (N, C, H, W). A NaN or inf pixel reaches only the outputs whose sampling points have
            it as a corner, as torchvision's: corners off the map read nothing.
        offset: (N, 2*G*kh*kw, Ho, Wo); for offset group g and tap k = i*kw + j, channel
            2k of the group's block is the row offset dy and 2k+1 the column offset dx, in pixels.
            A point outside [-1, H) x [-1, W) (no corner on the map), or a NaN one, reads 0 with
            zero gradient.
        weight: (O, C/groups, kh, kw); the weight groups follow from C / weight.shape[1].
        bias: (O,) or None.
        stride, padding, dilation: int or (h, w).
        mask: (N, G*kh*kw, Ho, Wo) modulation (v2), or None (v1).

    Returns:
        (N, O, Ho, Wo), in the input's dtype; float16 and bfloat16 compute in float32 on the CPU. Under
        ``torch.autocast`` the floating inputs are cast to autocast's dtype on CUDA and to float32 on
        the CPU (float64 stays float64).
    """
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if isinstance(input, torch.Tensor):
        input, offset, weight, bias, mask = autocast_cast(autocast_dtype(input.device.type), input, offset, weight,
                                                          bias, mask)
    check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    if float32_on_cpu(input):
        input32, offset, weight, bias, mask = autocast_cast(torch.float32, input, offset, weight, bias, mask)
        return deform_conv2d(input32, offset, weight, bias, stride, padding, dilation, mask).to(input.dtype)
    # No output channels (as torchvision allows): the reference gives the empty output and zero gradients.
    if weight.shape[0] == 0 or backend_for(input) == "reference":
        return reference.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    return deform_conv2d_kernels(input, offset, weight, bias, mask, list(stride), list(padding), list(dilation))


def _conv_by_taps(input: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                  padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """``F.conv2d`` (one group) as one matmul of the (kh*kw*O, C) tap-major weight with the (C, H*W)
    input, then per tap (i, j) a sum of its (O, H, W) product map's window shifted by
    (i*dh - ph, j*dw - pw) and strided: each output pixel adds the products of the input pixels
    its taps read; taps that read the zero padding add nothing.

    For the offset branch's narrow convs (18 outputs from 512 channels) this is 1.4-2.2x faster than
    ``F.conv2d`` on the CPU (see ``_taps_conv_pays``). Input (N, C, H, W) -> (N, O, Ho, Wo).
    """
    (n, c, h, w), (o, _, kh, kw) = input.shape, weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    taps = weight.permute(2, 3, 0, 1).reshape(kh * kw * o, c)
    products = torch.matmul(taps, input.reshape(n, c, h * w)).view(n, kh * kw, o, h, w)
    out = input.new_zeros(n, o, ho, wo) if bias is None else bias.view(1, o, 1, 1).expand(n, o, ho, wo).clone()
    for i in range(kh):
        for j in range(kw):
            # Output row y reads input row y*sh + dy: the rows with 0 <= y*sh + dy < h (same for columns).
            dy, dx = i * dh - ph, j * dw - pw
            y0, y1 = max(0, -(dy // sh)), min(ho, (h - 1 - dy) // sh + 1)
            x0, x1 = max(0, -(dx // sw)), min(wo, (w - 1 - dx) // sw + 1)
            if y0 < y1 and x0 < x1:
                out[:, :, y0:y1, x0:x1] += products[:, i * kw + j, :, y0 * sh + dy:(y1 - 1) * sh + dy + 1:sh,
                                                    x0 * sw + dx:(x1 - 1) * sw + dx + 1:sw]
    return out


def _taps_conv_pays(input: Tensor, conv: nn.Conv2d) -> bool:
    """Whether the offset branch runs as ``_conv_by_taps``: on the CPU without autograd, with at
    least 128 input channels and 512 input pixels in the batch. Measured at 2 threads against ``F.conv2d``
    (18 outputs, 3x3, dilation 2): 512 channels 23x30 0.69x, 38x50 0.60x, 64x128 0.46x, 1024
    channels 23x30 0.64x, 128 channels 23x30 0.94x; slower on smaller inputs (64 channels 8 x 16x16
    1.22x, 512 channels 8x8 1.21x) and, with the backward, below 512 channels (1.2-1.7x)."""
    if input.device.type != "cpu" or input.dim() != 4 or conv.groups != 1:
        return False
    if records_graph(input, conv.weight, conv.bias) or through_custom_op():
        return False  # autograd; or a trace (compile, export, jit.trace), which its shape-bound slices would fix
    n, c = input.shape[:2]
    return c >= 128 and n * input.shape[2] * input.shape[3] >= 512


class DeformConv2d(nn.Module):
    """A deformable convolution that owns its offset branch (and mask branch when ``modulated``).

    The offset branch is a conv with the same kernel, stride, padding and dilation on the same input,
    producing 2*offset_groups*kh*kw channels (3*... with the mask), initialized to zero: a fresh layer
    computes exactly the plain convolution (v1), or the plain convolution scaled by sigmoid(0) = 0.5
    (v2, as in DCNv2).

    The positional arguments are ``torchvision.ops.DeformConv2d``'s, in its order; ``offset_groups``
    and ``modulated`` are keyword-only.

    Input (N, in_channels, H, W) -> (N, out_channels, Ho, Wo). The offset branch trains at the base
    learning rate (``offset_lr_mult`` = beta = 1, paper section 2.3). On the CPU without autograd,
    wide layers compute it as ``_conv_by_taps`` (same result up to float summation order, faster).

    ``weight`` is torchvision's: (out_channels, in_channels/groups, kh, kw), contiguous. The CPU
    kernels read it channels-last, (out, kh, kw, in/groups), their column order, and copy a standard
    one per call (9.4 MB for a 512-channel 3x3 layer, ~1 ms at 2 threads); PyTorch's
    ``layer.to(memory_format=torch.channels_last)`` stores it so (kept through ``load_state_dict``
    and ``copy_``), as for ``nn.Conv2d``.
    """

    offset_lr_mult = 1.0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        offset_groups: int = 1,
        modulated: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride, self.padding = pair(stride, "stride"), pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        check_deform_conv2d_module(in_channels, out_channels, self.kernel_size, self.stride, self.padding,
                                   self.dilation, groups, offset_groups)
        self.groups, self.offset_groups, self.modulated = groups, offset_groups, modulated
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.offset_conv = nn.Conv2d(
            in_channels, (3 if modulated else 2) * offset_groups * taps, self.kernel_size,
            stride=self.stride, padding=self.padding, dilation=self.dilation, bias=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight and bias as ``nn.Conv2d``; offset (and mask) branch zero."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def forward(self, input: Tensor) -> Tensor:
        offset, mask = self.offsets(input)
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def offsets(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        """The offset branch: (N, 2*G*kh*kw, Ho, Wo) offsets and the (N, G*kh*kw, Ho, Wo) mask or None.

        Checks ``input`` first (also for ``forward``), so a wrong one is named, not the branch's conv."""
        traced = fx_proxy(input)
        if not traced:
            check_module_input(input, self.in_channels, self.kernel_size, self.stride, self.padding, self.dilation)
        conv = self.offset_conv
        if not traced and _taps_conv_pays(input, conv):
            out = _conv_by_taps(input, conv.weight, conv.bias, self.stride, self.padding, self.dilation)
        else:
            out = conv(input)
        if not self.modulated:
            return out, None
        n_offset = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        return out[:, :n_offset], torch.sigmoid(out[:, n_offset:])

    def offset_parameters(self) -> list[nn.Parameter]:
        return list(self.offset_conv.parameters())

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"offset_groups={self.offset_groups}, modulated={self.modulated}"
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, offset_groups: int = 1, modulated: bool = False) -> "DeformConv2d":
        """A deformable twin of ``conv`` holding the same weight and bias (fresh: same output).

        ``conv`` must pad with zeros, and a string padding ("same", "valid") must come to the same
        padding on both sides of each dimension."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv must have padding_mode 'zeros' (deformable sampling pads with zeros), "
                             f"got {conv.padding_mode!r}")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, _int_padding(conv), conv.dilation,
            conv.groups, conv.bias is not None, offset_groups=offset_groups, modulated=modulated,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer


def _int_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """``conv``'s padding as (h, w) ints: "valid" is 0, "same" half the dilated kernel's extent
    (ValueError where that is odd, which "same" pads one pixel more on the bottom/right)."""
    if not isinstance(conv.padding, str):
        return conv.padding
    if conv.padding == "valid":
        return 0, 0
    extents = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(e % 2 for e in extents):
        raise ValueError(
            f"conv's padding='same' with kernel_size {conv.kernel_size} and dilation {conv.dilation} pads "
            f"{tuple(extents)} pixels per dimension, one more at the bottom/right; DeformConv2d pads both sides "
            f"equally (give conv an integer padding)"
        )
    return extents[0] // 2, extents[1] // 2
