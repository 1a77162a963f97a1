"""Pure-PyTorch reference of the three operators, written from the equations.

It is the truth the tests compare against and the fallback that runs on any device. Every function
here is differentiable by autograd; no argument checking (the public functions do that first).
Semantics: ``shared/notes/operator-semantics.md`` (torchvision's deform_conv2d; the released
deformable (PS) RoI pooling).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _gather_corner(flat: Tensor, y: Tensor, x: Tensor, height: int, width: int) -> Tensor:
    """flat (B, C, H*W), integer-valued y/x (B, L) -> (B, C, L); zero where the corner is off the map
    (selected, not multiplied: an off-map corner reads a clamped pixel, which may be NaN or inf)."""
    valid = (y >= 0) & (y < height) & (x >= 0) & (x < width)
    index = (y.clamp(0, height - 1) * width + x.clamp(0, width - 1)).long()
    values = flat.gather(2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))
    return torch.where(valid.unsqueeze(1), values, 0.0)


def bilinear_zero_padded(feature: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Eq. (3)-(4) with zero padding per corner.

    feature (B, C, H, W); y, x (B, L) fractional sampling rows/columns -> (B, C, L).
    The floor corner carries weight ``1 - frac``, so at integer coordinates the derivative is the
    one-sided difference towards the next row/column, as torchvision's kernels compute it. A point
    outside [-1, H) x [-1, W), NaN included, gives 0 and no gradient (as the kernels).
    """
    b, c, h, w = feature.shape
    flat = feature.reshape(b, c, h * w)
    # Points with no corner on the map (and NaN / inf ones) move to (-2, -2): every corner off the
    # map, so value and derivatives are exactly 0, and no NaN reaches the corner indices. Their
    # gradient is the incoming one times 0, as the kernels' (a NaN or inf mask makes it NaN).
    inside = (y >= -1) & (y < h) & (x >= -1) & (x < w)
    y = torch.where(inside, y, 0 * y.nan_to_num(0.0, 0.0, 0.0) - 2)
    x = torch.where(inside, x, 0 * x.nan_to_num(0.0, 0.0, 0.0) - 2)
    y0 = y.detach().floor()
    x0 = x.detach().floor()
    ly = (y - y0).unsqueeze(1)
    lx = (x - x0).unsqueeze(1)
    value = (
        (1 - ly) * (1 - lx) * _gather_corner(flat, y0, x0, h, w)
        + (1 - ly) * lx * _gather_corner(flat, y0, x0 + 1, h, w)
        + ly * (1 - lx) * _gather_corner(flat, y0 + 1, x0, h, w)
        + ly * lx * _gather_corner(flat, y0 + 1, x0 + 1, h, w)
    )
    # At y == -1 or x == -1 exactly the value is 0 without reading a corner (torchvision's rule:
    # a NaN or inf on row/column 0 must not reach it through a zero weight), while the offset
    # derivative still reads them (one-sided): keep the formula's gradient, not its value.
    on_edge = ((y == -1) | (x == -1)).unsqueeze(1)
    return torch.where(on_edge, _ZeroValueKeepGradient.apply(value), value)


class _ZeroValueKeepGradient(torch.autograd.Function):
    """Zeros in the forward pass; the incoming gradient passes through unchanged."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Tensor | None,
) -> Tensor:
    """Eq. (2): y(p0) = sum_n w(p_n) * m_n * x(p0 + p_n + dp_n).

    input (N, C, H, W), offset (N, 2*G*kh*kw, Ho, Wo) with (dy, dx) per tap, weight
    (O, C/groups, kh, kw), mask (N, G*kh*kw, Ho, Wo) or None -> (N, O, Ho, Wo).
    """
    n, c, h, w = input.shape
    out_c, c_per_group, kh, kw = weight.shape
    groups = c // c_per_group
    taps = kh * kw
    offset_groups = offset.shape[1] // (2 * taps)
    ho, wo = offset.shape[2:]
    device, dtype = input.device, input.dtype

    # Regular grid R (Eq. 1): tap (i, j) of output (ho, wo) reads row ho*s - p + i*d.
    rows = torch.arange(ho, device=device, dtype=dtype) * stride[0] - padding[0]
    cols = torch.arange(wo, device=device, dtype=dtype) * stride[1] - padding[1]
    tap_rows = torch.arange(kh, device=device, dtype=dtype) * dilation[0]
    tap_cols = torch.arange(kw, device=device, dtype=dtype) * dilation[1]
    grid_y = (tap_rows[:, None, None, None] + rows[None, None, :, None]).expand(kh, kw, ho, wo).reshape(taps, ho, wo)
    grid_x = (tap_cols[None, :, None, None] + cols[None, None, None, :]).expand(kh, kw, ho, wo).reshape(taps, ho, wo)

    delta = offset.reshape(n, offset_groups, taps, 2, ho, wo)
    y = (grid_y + delta[:, :, :, 0]).reshape(n * offset_groups, taps * ho * wo)
    x = (grid_x + delta[:, :, :, 1]).reshape(n * offset_groups, taps * ho * wo)
    feature = input.reshape(n * offset_groups, c // offset_groups, h, w)
    columns = bilinear_zero_padded(feature, y, x).reshape(n, offset_groups, c // offset_groups, taps, ho * wo)
    if mask is not None:
        columns = columns * mask.reshape(n, offset_groups, 1, taps, ho * wo)

    # Weighted sum (per weight group): out[n, g, o, l] = sum_{c,k} W[g, o, c, k] * columns[n, g, c, k, l].
    columns = columns.reshape(n, groups, c_per_group * taps, ho * wo)
    w_mat = weight.reshape(groups, out_c // groups, c_per_group * taps)
    out = torch.einsum("gok,ngkl->ngol", w_mat, columns).reshape(n, out_c, ho, wo)
    if bias is not None:
        out = out + bias.reshape(1, out_c, 1, 1)
    return out


def roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    position_sensitive: bool,
) -> Tensor:
    """Eq. (6), deformable (PS) RoI pooling with the released operator's sampling.

    input (N, C_in, H, W); rois (K, 5) [batch, x1, y1, x2, y2] in image coordinates; offset
    (K, 2*n, P, P) normalized (x, y) per offset class, or None -> (K, C_out, ph, pw) with
    C_out = C_in / (ph*pw) when position-sensitive, else C_in.
    """
    n, c_in, h, w = input.shape
    ph, pw = output_size
    s = sampling_ratio
    k = rois.shape[0]
    c_out = c_in // (ph * pw) if position_sensitive else c_in
    device, dtype = input.device, input.dtype
    rois = rois.detach()

    # C's round(): halves away from zero (torch.round would round them to even).
    corners = rois[:, 1:].sign() * (rois[:, 1:].abs() + 0.5).floor()
    start_x = corners[:, 0] * spatial_scale - 0.5
    start_y = corners[:, 1] * spatial_scale - 0.5
    roi_w = ((corners[:, 2] + 1) * spatial_scale - 0.5 - start_x).clamp(min=0.1)
    roi_h = ((corners[:, 3] + 1) * spatial_scale - 0.5 - start_y).clamp(min=0.1)
    bin_w, bin_h = roi_w / pw, roi_h / ph

    i = torch.arange(ph, device=device, dtype=dtype)
    j = torch.arange(pw, device=device, dtype=dtype)
    u = torch.arange(s, device=device, dtype=dtype)
    if offset is None:
        shift_x = input.new_zeros((k, 1, ph, pw))
        shift_y = input.new_zeros((k, 1, ph, pw))
        channel_class = torch.zeros(c_out, dtype=torch.long, device=device)
    else:
        n_cls, parts_h, parts_w = offset.shape[1] // 2, offset.shape[2], offset.shape[3]
        part_i = (torch.arange(ph, device=device) * parts_h) // ph
        part_j = (torch.arange(pw, device=device) * parts_w) // pw
        t = offset.reshape(k, n_cls, 2, parts_h, parts_w)[:, :, :, part_i][:, :, :, :, part_j]
        shift_x = gamma * t[:, :, 0] * roi_w[:, None, None, None]
        shift_y = gamma * t[:, :, 1] * roi_h[:, None, None, None]
        channel_class = torch.arange(c_out, device=device) // (c_out // n_cls)
    # Sample positions, (K, C_out, ph, pw, S): bin corner + shift + u * sub-bin (not centred).
    x = (j[None, None, None, :, None] * bin_w[:, None, None, None, None] + start_x[:, None, None, None, None]
         + shift_x[:, channel_class, :, :, None] + u * (bin_w / s)[:, None, None, None, None])
    y = (i[None, None, :, None, None] * bin_h[:, None, None, None, None] + start_y[:, None, None, None, None]
         + shift_y[:, channel_class, :, :, None] + u * (bin_h / s)[:, None, None, None, None])
    x = x.unsqueeze(-2).expand(k, c_out, ph, pw, s, s)  # (..., S_y, S_x)
    y = y.unsqueeze(-1).expand(k, c_out, ph, pw, s, s)
    # Invalid samples (NaN positions too, from NaN offsets) read pixel 0 instead, masked below.
    valid = (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
    x = torch.where(valid, x, 0.0).clamp(0, w - 1)
    y = torch.where(valid, y, 0.0).clamp(0, h - 1)

    # Input channel read by output channel c at bin (i, j).
    c_idx = torch.arange(c_out, device=device)[:, None, None]
    if position_sensitive:
        in_channel = (c_idx * ph + torch.arange(ph, device=device)[:, None]) * pw + torch.arange(pw, device=device)
    else:
        in_channel = c_idx.expand(c_out, ph, pw)
    plane = rois[:, 0].long()[:, None, None, None] * c_in + in_channel  # (K, C_out, ph, pw)
    plane = plane[..., None, None].expand(k, c_out, ph, pw, s, s)

    # Bilinear from the floor/ceil corners of the clamped point (the released kernel's form).
    flat = input.reshape(-1)
    x0, y0 = x.detach().floor(), y.detach().floor()
    x1, y1 = x.detach().ceil(), y.detach().ceil()
    lx, ly = x - x0, y - y0

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return flat[(plane * h + yy.long()) * w + xx.long()]

    value = ((1 - ly) * (1 - lx) * at(y0, x0) + (1 - ly) * lx * at(y0, x1)
             + ly * (1 - lx) * at(y1, x0) + ly * lx * at(y1, x1))
    value = torch.where(valid, value, 0.0)
    count = valid.sum(dim=(-1, -2)).to(dtype)
    total = value.sum(dim=(-1, -2))
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).to(dtype)
