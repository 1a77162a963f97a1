"""Effective dilation of deformable filters (the paper's Table 2).

For a deformable k x k filter the *effective dilation* at an output location is the mean distance
between adjacent sampling locations: tap (i, j) samples at ``(i * d + dy_ij, j * d + dx_ij)``
(``d`` the dilation, offsets in input-feature pixels), and the 2k(k-1) pairs of horizontal and
vertical neighbours (12 for 3 x 3) are averaged.  Zero offsets give exactly ``d``.

Each output location is then put in a category by the ground-truth object under the filter
centre: the smallest box covering the image pixel at the output cell's receptive-field centre
(pixel ``stride * i`` for cell ``i`` of a stride-``stride`` map),
categorised by its area into small / medium / large (``"terciles"`` of the objects' areas, or the
paper's thresholds 96² and 224² px for real data), or background where no box covers it.
Statistics are mean ± std over all such locations.

Offsets follow torchvision's ``deform_conv2d`` layout: (N, 2*G*kh*kw, H, W), (dy, dx) per tap,
taps row-major; ``dcnbench.ops.DeformConv2d.offsets(input)`` returns them, and
:func:`record_offsets` captures them from a model's deformable layers during a forward pass.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dcnbench.ops._validate import require_tensor

__all__ = [
    "CATEGORIES",
    "PAPER_AREA_THRESHOLDS",
    "DilationStats",
    "area_map_at",
    "categorize_areas",
    "dilation_by_object",
    "effective_dilation",
    "object_area_map",
    "record_offsets",
    "tercile_thresholds",
]

CATEGORIES = ("small", "medium", "large", "background")
PAPER_AREA_THRESHOLDS = (96.0**2, 224.0**2)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def effective_dilation(offset: Tensor, dilation: int | Sequence[int] = 1, kernel: int | Sequence[int] = (3, 3)) -> Tensor:
    """(N, H, W) mean distance between adjacent sampling locations (averaged over offset groups) of a
    floating-point ``offset`` (N, 2*G*kh*kw, H, W)."""
    require_tensor(offset, "offset", 4)
    kh, kw = _pair(kernel)
    dh, dw = _pair(dilation)
    if kh * kw < 2:
        raise ValueError("a 1x1 filter has no adjacent sampling locations")
    n, ch, h, w = offset.shape
    if ch % (2 * kh * kw):
        raise ValueError(f"offset has {ch} channels, not a multiple of 2*{kh}*{kw}")
    groups = ch // (2 * kh * kw)
    delta = offset.detach().float().reshape(n, groups, kh, kw, 2, h, w)
    grid_y = (torch.arange(kh, dtype=delta.dtype, device=delta.device) * dh).view(1, 1, kh, 1, 1, 1)
    grid_x = (torch.arange(kw, dtype=delta.dtype, device=delta.device) * dw).view(1, 1, 1, kw, 1, 1)
    y = delta[:, :, :, :, 0] + grid_y
    x = delta[:, :, :, :, 1] + grid_x
    dists = []
    if kw > 1:
        dists.append(torch.hypot(y[:, :, :, 1:] - y[:, :, :, :-1], x[:, :, :, 1:] - x[:, :, :, :-1]).flatten(1, 3))
    if kh > 1:
        dists.append(torch.hypot(y[:, :, 1:] - y[:, :, :-1], x[:, :, 1:] - x[:, :, :-1]).flatten(1, 3))
    return torch.cat(dists, dim=1).mean(dim=1)


def object_area_map(boxes: Tensor, image_size: tuple[int, int], areas: Tensor | None = None) -> Tensor:
    """(H, W) float: area of the smallest box whose interior holds the pixel centre, 0 on background.

    ``boxes`` (K, 4) xyxy in pixels; ``areas`` defaults to the box areas (the paper's criterion).
    """
    from .detection import boxes_array

    h, w = image_size
    boxes = torch.from_numpy(boxes_array(boxes, "boxes"))
    if areas is None:
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    areas = torch.as_tensor(areas, dtype=torch.float64).reshape(-1)
    out = torch.zeros(h, w, dtype=torch.float64)
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    for k in torch.argsort(areas, descending=True).tolist():  # smaller boxes painted last win
        x1, y1, x2, y2 = boxes[k].tolist()
        rows = (ys > y1) & (ys < y2)
        cols = (xs > x1) & (xs < x2)
        out[rows[:, None] & cols[None, :]] = areas[k]
    return out


def area_map_at(area_map: Tensor, size: tuple[int, int], *, stride: int) -> Tensor:
    """Sample an (..., H, W) area map at the filter centres of an (h, w) output grid of ``stride``
    image pixels per cell: cell (i, j) is centred on pixel (stride * i, stride * j) (the receptive
    field's centre in a network whose strided layers pad by (k - 1) / 2, as ResNet's), clamped to the
    image."""
    if stride < 1:
        raise ValueError(f"stride must be a positive number of pixels, got {stride}")
    h, w = size
    rows = (torch.arange(h) * stride).clamp(max=area_map.shape[-2] - 1)
    cols = (torch.arange(w) * stride).clamp(max=area_map.shape[-1] - 1)
    return area_map[..., rows[:, None], cols[None, :]]


def tercile_thresholds(object_areas: Sequence[float] | np.ndarray | Tensor) -> tuple[float, float]:
    """Area thresholds splitting the objects into three equal-count groups."""
    a = np.asarray(torch.as_tensor(object_areas, dtype=torch.float64).reshape(-1))
    if a.size == 0:
        raise ValueError("no objects to split into terciles")
    q1, q2 = np.quantile(a, [1.0 / 3.0, 2.0 / 3.0])
    return float(q1), float(q2)


def categorize_areas(area_map: Tensor, thresholds: tuple[float, float]) -> Tensor:
    """Long map: 0 small (area < t1), 1 medium (t1 <= area < t2), 2 large, 3 background (area 0)."""
    t1, t2 = thresholds
    cat = torch.full(area_map.shape, 3, dtype=torch.long)
    cat[(area_map > 0) & (area_map < t1)] = 0
    cat[(area_map >= t1) & (area_map < t2)] = 1
    cat[area_map >= t2] = 2
    return cat


def _resolve_thresholds(thresholds, object_areas) -> tuple[float, float]:
    if thresholds is None or thresholds == "terciles":
        return tercile_thresholds(object_areas)
    if thresholds == "paper":
        return PAPER_AREA_THRESHOLDS
    t1, t2 = thresholds
    return float(t1), float(t2)


def _stats(values: np.ndarray, cats: np.ndarray):
    import pandas as pd

    rows = []
    for k, name in enumerate(CATEGORIES):
        v = values[cats == k]
        rows.append({"category": name, "mean": float(v.mean()) if v.size else float("nan"),
                     "std": float(v.std()) if v.size else float("nan"), "count": int(v.size)})
    return pd.DataFrame(rows).set_index("category")


def dilation_by_object(
    eff: Tensor,
    area_map: Tensor,
    thresholds: str | tuple[float, float] = "terciles",
    object_areas: Sequence[float] | Tensor | None = None,
    *,
    stride: int,
):
    """pandas DataFrame indexed small/medium/large/background with mean, std, count of ``eff``.

    ``eff`` (N, h, w) from :func:`effective_dilation`; ``area_map`` (N, H, W) or (H, W) from
    :func:`object_area_map` (image resolution; sampled at the filter centres, see
    :func:`area_map_at`); ``stride`` image pixels per cell of ``eff``;
    ``thresholds``: ``"terciles"`` of ``object_areas`` (default: the distinct non-zero areas in
    ``area_map``), ``"paper"`` (96², 224²) or a pair.
    """
    amap = area_map_at(area_map, tuple(eff.shape[-2:]), stride=stride)
    amap = amap.expand(eff.shape) if amap.dim() == 2 else amap
    if object_areas is None and thresholds in (None, "terciles"):
        object_areas = torch.unique(area_map[area_map > 0])
    t = _resolve_thresholds(thresholds, object_areas)
    cats = categorize_areas(amap, t)
    return _stats(eff.detach().double().cpu().numpy().ravel(), cats.numpy().ravel())


class DilationStats:
    """Accumulate effective dilation per layer over a dataset, then summarise as in Table 2.

    >>> stats = DilationStats()
    >>> with record_offsets(model) as rec:
    ...     model(images)
    >>> for name, (offset, dilation, kernel) in rec.items():
    ...     stats.update(name, effective_dilation(offset, dilation, kernel), area_maps, object_areas, stride=16)
    >>> stats.table()      # rows = layers, columns small / medium / large / background: "mean ± std"
    """

    def __init__(self) -> None:
        self._eff: dict[str, list[np.ndarray]] = {}
        self._area: dict[str, list[np.ndarray]] = {}
        self._objects: dict[str, list[np.ndarray]] = {}

    def update(self, layer: str, eff: Tensor, area_maps: Tensor,
               object_areas: Sequence[float] | Tensor | None = None, *, stride: int) -> None:
        """``eff`` (N, h, w) at ``stride`` image pixels per cell; ``area_maps`` (N, H, W)
        image-resolution; ``object_areas``: the batch's objects."""
        amap = area_map_at(area_maps, tuple(eff.shape[-2:]), stride=stride)
        amap = amap.expand(eff.shape) if amap.dim() == 2 else amap
        self._eff.setdefault(layer, []).append(eff.detach().double().cpu().numpy().ravel())
        self._area.setdefault(layer, []).append(amap.double().cpu().numpy().ravel())
        if object_areas is None:
            object_areas = torch.unique(area_maps[area_maps > 0])
        self._objects.setdefault(layer, []).append(np.asarray(torch.as_tensor(object_areas, dtype=torch.float64)).ravel())

    @property
    def layers(self) -> list[str]:
        return list(self._eff)

    @classmethod
    def merged(cls, parts: Sequence["DilationStats"]) -> "DilationStats":
        """One accumulator holding all of ``parts``' samples (e.g. gathered from several processes)."""
        out = cls()
        for part in parts:
            for store, other in ((out._eff, part._eff), (out._area, part._area), (out._objects, part._objects)):
                for layer, arrays in other.items():
                    store.setdefault(layer, []).extend(arrays)
        return out

    def summary(self, thresholds: str | tuple[float, float] = "terciles"):
        """Long DataFrame: layer, category, mean, std, count (thresholds as in :func:`dilation_by_object`)."""
        import pandas as pd

        frames = []
        for layer in self._eff:
            t = _resolve_thresholds(thresholds, np.concatenate(self._objects[layer]))
            area = np.concatenate(self._area[layer])
            cats = categorize_areas(torch.from_numpy(area), t).numpy()
            df = _stats(np.concatenate(self._eff[layer]), cats).reset_index()
            df.insert(0, "layer", layer)
            df["thresholds"] = [t] * len(df)
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["layer", "category", "mean", "std", "count", "thresholds"])

    def table(self, thresholds: str | tuple[float, float] = "terciles", digits: int = 1):
        """Wide DataFrame like the paper's Table 2: one row per layer, "mean ± std" per category."""
        long = self.summary(thresholds)
        wide = {}
        for row in long.itertuples():
            wide.setdefault(row.layer, {})[row.category] = f"{row.mean:.{digits}f} ± {row.std:.{digits}f}"
        import pandas as pd

        return pd.DataFrame.from_dict(wide, orient="index", columns=list(CATEGORIES))


@contextlib.contextmanager
def record_offsets(model: nn.Module) -> Iterator[dict[str, tuple[Tensor, tuple[int, int], tuple[int, int]]]]:
    """Capture ``(offset, dilation, kernel_size)`` of every module with an ``offsets(input)`` method.

    Works with :class:`dcnbench.ops.DeformConv2d` (and anything with the same ``offsets``,
    ``dilation`` and ``kernel_size`` attributes); the dict fills during forward passes inside the
    ``with`` block (the last pass wins) and hooks are removed on exit.
    """
    records: dict[str, tuple[Tensor, tuple[int, int], tuple[int, int]]] = {}
    handles = []
    for name, module in model.named_modules():
        if callable(getattr(module, "offsets", None)) and hasattr(module, "dilation") and hasattr(module, "kernel_size"):
            def hook(mod, args, _name=name):
                with torch.no_grad():
                    offset, _ = mod.offsets(args[0])
                records[_name] = (offset.detach(), _pair(mod.dilation), _pair(mod.kernel_size))

            handles.append(module.register_forward_pre_hook(hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()
