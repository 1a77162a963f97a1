"""Figures (matplotlib; PNG and PDF under ``results/figures/``).

- Figure 5 style: the 9^L sampling locations (729 for three stacked 3×3 layers) of a unit on the
  top deformable layer, traced down through the offsets each layer learned, on the input image,
  for units on background, on a small object and on a large object.
- Figure 6 style: deformable RoI pooling bins, offset from the regular RoI grid, on an object.
- One plot per ablation table: metric vs variant, ours with seed error bars, paper overlaid.

The geometry (:func:`sampling_locations`, :func:`roi_bins`) is plain numpy and model-agnostic;
capture works on any model built of :class:`dcnbench.ops.DeformConv2d` /
:class:`~dcnbench.ops.DeformRoIPool` / :class:`~dcnbench.ops.DeformPSRoIPool` modules, found by type
and hooked during one forward pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .paper import RESULTS_DIR

FIGURES_DIR = RESULTS_DIR / "figures"


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save(fig, out_dir: Path, stem: str) -> list[Path]:
    """``fig`` as ``<stem>.png`` and ``<stem>.pdf``; the same figure gives the same bytes (the PDF
    carries no creation date), so redrawing committed figures leaves the tree clean."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None})
    _mpl().close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# Figure 5: sampling locations of stacked deformable convolutions
# ---------------------------------------------------------------------------------------------


@dataclass
class DeformLevel:
    """One deformable layer of one image: its offsets and geometry.

    ``offset``: (2*kh*kw, Ho, Wo), channel 2k = dy and 2k+1 = dx of tap k = i*kw + j (offset
    group 0); ``in_size`` / ``out_size``: (H, W) of its input and output maps.
    """

    offset: np.ndarray
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    name: str = ""


def bilinear(field: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """field (C, H, W) at fractional (y, x) (N,), clamped to the border -> (N, C)."""
    _, h, w = field.shape
    y = np.clip(y, 0, h - 1)
    x = np.clip(x, 0, w - 1)
    y0 = np.floor(y).astype(int)
    x0 = np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (y - y0)[:, None], (x - x0)[:, None]
    f = lambda yy, xx: field[:, yy, xx].T  # noqa: E731
    return (f(y0, x0) * (1 - wy) * (1 - wx) + f(y0, x1) * (1 - wy) * wx
            + f(y1, x0) * wy * (1 - wx) + f(y1, x1) * wy * wx)


def _grid_stride(src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """(y, x) pixels of grid ``dst`` per cell of grid ``src``, two maps of one network (e.g. the image
    and a stride-16 feature map: 1/16 one way, 16 the other). Strides are powers of two, and a
    stride-``p`` map of ``n`` pixels has ceil(n / p) cells (ResNet's strided layers pad by (k - 1) / 2):
    the stride is the smallest power of two that gives the smaller grid's size (a 100 px image at
    stride 16: 7 cells; 33 px: 3 cells), else the nearest power of two to the ratio of sizes."""
    def stride(small: int, large: int) -> float:
        for k in range(int(math.log2(max(large, 1))) + 2):
            if math.ceil(large / 2**k) == small:
                return 2.0**k
        return 2.0 ** round(math.log2(large / small))

    return np.array([stride(s, d) if d >= s else 1 / stride(d, s) for s, d in zip(src, dst)])


def _rescale(points: np.ndarray, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """Points (y, x) of grid ``src`` on grid ``dst``: cell ``i`` of a stride-``s`` map is centred on
    input pixel ``s * i`` (its receptive field's centre, as in Table 2's dilation categories), so the
    change of grid is a scaling by the strides' ratio, with no shift."""
    return points * _grid_stride(src, dst)


def sampling_locations(levels: list[DeformLevel], unit: tuple[float, float],
                       image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The sampling locations, on the input image, of a unit of the top layer.

    ``levels`` bottom to top (each layer's output feeds, possibly through 1×1 convs, the next);
    ``unit`` (y, x) on the top layer's output grid. The top unit samples kh*kw points of its input
    (regular grid plus its offsets, in that layer's input pixels); each such point is a
    (fractional) unit of the layer below, whose offsets are bilinearly interpolated there, and so
    on: prod(kh*kw) points in all, returned (N, 2) as (y, x) in image pixels (pixel ``p`` centred
    at ``p``; feature cell ``i`` of a stride-``s`` map at image pixel ``s * i``), or in the bottom
    layer's input grid without ``image_size``.
    """
    points = np.array([unit], dtype=np.float64)
    for idx in range(len(levels) - 1, -1, -1):
        lv = levels[idx]
        kh, kw = lv.kernel
        off = bilinear(np.asarray(lv.offset, dtype=np.float64), points[:, 0], points[:, 1])  # (N, 2K)
        ii, jj = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
        ii, jj = ii.ravel(), jj.ravel()
        ys = (points[:, None, 0] * lv.stride[0] - lv.padding[0] + ii[None] * lv.dilation[0] + off[:, 0::2])
        xs = (points[:, None, 1] * lv.stride[1] - lv.padding[1] + jj[None] * lv.dilation[1] + off[:, 1::2])
        points = np.stack([ys.ravel(), xs.ravel()], axis=1)
        if idx > 0:
            points = _rescale(points, lv.in_size, levels[idx - 1].out_size)
    if image_size is not None:
        points = _rescale(points, levels[0].in_size, image_size)
    return points


def unit_in_image(level: DeformLevel, unit: tuple[float, float], image_size: tuple[int, int]) -> np.ndarray:
    """Where a unit of ``level``'s output grid sits on the image: (y, x) = stride * unit."""
    return _rescale(np.array([unit], dtype=np.float64), level.out_size, image_size)[0]


def unit_at(level: DeformLevel, point: tuple[float, float], image_size: tuple[int, int]) -> tuple[int, int]:
    """The unit of ``level``'s output grid nearest an image point (y, x)."""
    y, x = _rescale(np.array([point], dtype=np.float64), image_size, level.out_size)[0]
    return (int(np.clip(round(y), 0, level.out_size[0] - 1)), int(np.clip(round(x), 0, level.out_size[1] - 1)))


def capture_deform_levels(model, images, forward=None) -> list[DeformLevel]:
    """Run one forward pass and return every DeformConv2d it called, in call order (image 0)."""
    import torch

    from dcnbench.ops import DeformConv2d

    calls: list[DeformLevel] = []
    handles = []

    def hook(module, args, output, name):
        with torch.no_grad():
            offset, _ = module.offsets(args[0])
        calls.append(DeformLevel(
            offset[0, : 2 * module.kernel_size[0] * module.kernel_size[1]].detach().cpu().numpy(),
            tuple(module.kernel_size), tuple(module.stride), tuple(module.padding), tuple(module.dilation),
            tuple(args[0].shape[-2:]), tuple(output.shape[-2:]), name))

    for name, module in model.named_modules():
        if isinstance(module, DeformConv2d):
            handles.append(module.register_forward_hook(lambda m, a, o, _n=name: hook(m, a, o, _n)))
    if not handles:
        raise ValueError("the model has no DeformConv2d layer: nothing to draw for Figure 5")
    _forward_then_unhook(model, images, forward, handles)
    return calls


def _forward_then_unhook(model, images, forward, handles) -> None:
    """One eval-mode, no-grad forward (``forward`` or the model itself), then remove the hooks."""
    import torch

    try:
        model.eval()
        with torch.no_grad():
            (forward or model)(images)
    finally:
        for h in handles:
            h.remove()


def _distance_to(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.full(len(points), np.inf)
    obj = np.stack([ys, xs], 1)[:: max(1, len(ys) // 2000)]
    return np.sqrt(((points[:, None, :] - obj[None]) ** 2).sum(-1)).min(1)


def _object_pixels(sample: dict, k: int) -> np.ndarray:
    """(P, 2) pixels (y, x) of object ``k``: its instance, or its class's pixels inside its box when the
    sample has no ``instance_map`` (the runner's cached sets drop it)."""
    if "instance_map" in sample:
        return np.argwhere(np.asarray(sample["instance_map"]) == k + 1)
    x1, y1, x2, y2 = (int(round(float(v))) for v in np.asarray(sample["boxes"]).reshape(-1, 4)[k])
    inside = np.argwhere(np.asarray(sample["mask"])[y1:y2, x1:x2] == int(np.asarray(sample["labels"])[k]))
    return inside + [y1, x1]


def _objects_under_units(sample: dict, stride: tuple[int, int]) -> list[tuple[float, tuple[float, float]]]:
    """(area, (y, x)) of every object of a sample that a unit of a stride-``stride`` map sits on (a
    pixel ``stride * i`` of the object): the area and that pixel nearest its box centre (the centre
    itself may lie off the object: in a ring's hole, on an occluder, between grid pixels)."""
    sy, sx = (max(1, int(v)) for v in stride)
    found = []
    for k, (box, area) in enumerate(zip(np.asarray(sample["boxes"], float).reshape(-1, 4), sample["areas"])):
        pixels = _object_pixels(sample, k)
        pixels = pixels[(pixels[:, 0] % sy == 0) & (pixels[:, 1] % sx == 0)]
        if len(pixels):
            x1, y1, x2, y2 = box
            centre = np.array([(y1 + y2 - 1) / 2, (x1 + x2 - 1) / 2])  # pixel p spans [p, p + 1) in a box
            found.append((float(area), tuple(float(v) for v in pixels[np.argmin(((pixels - centre) ** 2).sum(1))])))
    return found


def pick_units(sample: dict, stride: tuple[int, int] = (1, 1)) -> dict[str, tuple[float, float]]:
    """Image points (y, x) for the three Figure 5 units of a synthetic sample, among the pixels
    ``stride * i`` the units of a stride-``stride`` map sit on: the background pixel farthest from
    every object (in the central half of the image when it has background there), and a pixel of
    the smallest and of the largest object that a unit sits on (see :func:`_objects_under_units`)."""
    mask = np.asarray(sample["mask"])
    h, w = mask.shape
    sy, sx = (max(1, int(v)) for v in stride)
    out = {}
    grid = np.stack(np.meshgrid(np.arange(0, h, sy), np.arange(0, w, sx), indexing="ij"), -1).reshape(-1, 2)
    grid = grid[mask[grid[:, 0], grid[:, 1]] == 0]
    inner = grid[(np.abs(grid[:, 0] - h / 2) <= h / 4) & (np.abs(grid[:, 1] - w / 2) <= w / 4)]
    grid = inner if len(inner) else grid  # prefer the centre: a corner unit samples mostly padding
    if len(grid):
        out["background"] = tuple(float(v) for v in grid[np.argmax(_distance_to(mask > 0, grid))])
    objects = _objects_under_units(sample, (sy, sx))
    if objects:
        out["small object"], out["large object"] = min(objects)[1], max(objects)[1]
    return out


def plot_figure5(panels: list[dict], title: str = "") -> object:
    """panels: dicts with image (H, W, 3), points (N, 2) (y, x), unit (y, x), label."""
    plt = _mpl()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), squeeze=False)
    for ax, p in zip(axes[0], panels):
        ax.imshow(p["image"])
        pts = p["points"]
        ax.scatter(pts[:, 1], pts[:, 0], s=4, c="red", alpha=0.6, linewidths=0)
        ax.scatter([p["unit"][1]], [p["unit"][0]], s=60, c="lime", edgecolors="black", linewidths=0.8)
        h, w = p["image"].shape[:2]
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_title(f"{p['label']} ({len(pts)} points)", fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# Figure 6: deformable RoI pooling bins
# ---------------------------------------------------------------------------------------------


def roi_bins(roi: tuple[float, float, float, float], offset: np.ndarray | None, gamma: float = 0.1
             ) -> tuple[np.ndarray, np.ndarray]:
    """Regular and offset bins of an RoI (x1, y1, x2, y2) in image pixels.

    ``offset`` (2, kh, kw): normalized (x, y) per bin, as the operator takes them; bin (i, j) moves
    by ``gamma * offset * (roi_w, roi_h)`` (paper Eq. 6). Returns two (kh, kw, 4) arrays of
    (x, y, w, h) rectangles: the regular grid and the offset bins.
    """
    x1, y1, x2, y2 = roi
    off = np.zeros((2, 1, 1)) if offset is None else np.asarray(offset, dtype=np.float64)
    kh, kw = off.shape[1:]
    rw, rh = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
    bw, bh = rw / kw, rh / kh
    jj, ii = np.meshgrid(np.arange(kw), np.arange(kh))
    regular = np.stack([x1 + jj * bw, y1 + ii * bh, np.full_like(jj, bw, float), np.full_like(ii, bh, float)], -1)
    moved = regular.copy()
    moved[..., 0] += gamma * off[0] * rw
    moved[..., 1] += gamma * off[1] * rh
    return regular, moved


def capture_roi_offsets(model, images, boxes: np.ndarray, labels: np.ndarray | None = None, forward=None):
    """Offsets the model's deformable RoI pooling gives to the RoIs ``boxes`` (K, 4) of image 0.

    Hooks the first DeformRoIPool / DeformPSRoIPool during a forward pass to get its input maps,
    then runs its offset branch on ``boxes``. For position-sensitive pooling with class-specific
    offsets, each box uses the offsets of its label (group 0 when unknown). Returns
    (offsets (K, 2, kh, kw), gamma, module name).
    """
    import torch

    from dcnbench.ops import DeformPSRoIPool, DeformRoIPool, deform_ps_roi_pool, deform_roi_pool

    captured = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (DeformRoIPool, DeformPSRoIPool)):
            def hook(mod, args, _name=name):
                captured.setdefault("call", (_name, mod, [a.detach() if torch.is_tensor(a) else a for a in args]))
            handles.append(module.register_forward_pre_hook(hook))
    if not handles:
        raise ValueError("the model has no deformable RoI pooling: nothing to draw for Figure 6")
    _forward_then_unhook(model, images, forward, handles)
    if "call" not in captured:
        raise RuntimeError("the forward pass never reached the deformable RoI pooling (no proposals?)")
    name, mod, args = captured["call"]
    rois = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    rois = torch.cat([torch.zeros(len(rois), 1), rois], 1)
    with torch.no_grad():
        if isinstance(mod, DeformRoIPool):
            feats = args[0][:1]
            pooled = deform_roi_pool(feats, rois, None, mod.output_size, mod.spatial_scale, mod.sampling_ratio, mod.gamma)
            offset = mod.offset_fc(pooled.flatten(1)).reshape(len(rois), 2, *mod.output_size)
        else:
            feats = args[1][:1]
            full = deform_ps_roi_pool(mod.offset_conv(feats), rois, None, mod.output_size, mod.spatial_scale,
                                      mod.sampling_ratio, mod.gamma)  # (K, 2n, kh, kw)
            groups = full.shape[1] // 2
            pick = [0] * len(rois) if labels is None or groups == 1 else [int(min(max(l, 0), groups - 1)) for l in labels]
            offset = torch.stack([full[k, 2 * g: 2 * g + 2] for k, g in enumerate(pick)])
    return offset.cpu().numpy(), float(mod.gamma), name


def plot_figure6(rois: list[dict], title: str = "") -> object:
    """rois: dicts with image (H, W, 3), roi (x1, y1, x2, y2), regular and moved bins from
    :func:`roi_bins` and a label: the RoI in yellow, its regular grid dotted, the offset bins red.
    Box coordinates have pixel p spanning [p, p + 1); ``imshow`` centres pixel p on p, so every
    rectangle is drawn half a pixel up and left of its coordinates."""
    plt = _mpl()
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, len(rois), figsize=(4 * len(rois), 4.2), squeeze=False)
    for ax, r in zip(axes[0], rois):
        ax.imshow(r["image"])
        x1, y1, x2, y2 = r["roi"]
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec="yellow", lw=2))
        for x, y, w, h in r["regular"].reshape(-1, 4):
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, ec="yellow", lw=0.5, ls=":"))
        for x, y, w, h in r["moved"].reshape(-1, 4):
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, ec="red", lw=1.0))
        ax.set_title(r.get("label", ""), fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# From a trained checkpoint
# ---------------------------------------------------------------------------------------------


def load_checkpoint(path: Path):
    """(model, config, validation set) of a runner checkpoint ``<cell>.pt`` with ``<cell>.json``.

    Raises FileNotFoundError when the config beside it is missing, ValueError naming the file when
    either cannot be read (weights through ``torch.load(weights_only=True)``) or the weights do not
    fit the model the config describes."""
    from dcnbench.models.backbone import load_weights_file
    from dcnbench.models.build import build_model
    from dcnbench.runner.train import MODEL_TASK, build_data, model_settings

    path = Path(path)
    cfg_path = path.with_suffix(".json")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: the checkpoint's config is missing")
    try:
        config = json.loads(cfg_path.read_text())
        task, data, model_task = config["task"], config["data"], MODEL_TASK[config["task"]]
        model_cfg = model_settings(config)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{cfg_path}: not a runner checkpoint config ({type(err).__name__}: {err})") from err
    _, val_set, num_classes = build_data(task, data)
    model = build_model({**model_cfg, "task": model_task, "num_classes": num_classes})
    state = load_weights_file(path)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: the weights do not fit the model of {cfg_path.name} "
                         f"({str(err)[:300]})") from err
    model.eval()
    return model, config, val_set


def _batch(config: dict, item):
    """A one-image batch in the form the runner feeds the model."""
    image, _ = item
    return image[None] if config["task"] == "deeplab" else [image]


def _raw(val_set, index: int) -> dict:
    if not hasattr(val_set, "sample"):
        raise ValueError("figures need the synthetic validation set (raw images with masks and boxes)")
    return val_set.sample(index)


def figure5_from_checkpoint(path: Path, out_dir: Path | None = None, images: int = 24, layers: int = 3,
                            stem: str = "figure5") -> list[Path]:
    """Figure 5 for a trained model: its top ``layers`` deformable layers, units picked on the first
    ``images`` validation images: on the smallest and on the largest object a unit of the top layer
    sits on, and on the background of the image with the most of it. Written as ``<stem>.png/.pdf``."""
    model, config, val_set = load_checkpoint(path)
    n = min(images, len(val_set))
    samples = [_raw(val_set, i) for i in range(n)]
    top = capture_deform_levels(model, _batch(config, val_set[0]))[-1]
    stride = tuple(_grid_stride(top.out_size, np.asarray(samples[0]["image"]).shape[:2]).astype(int))
    best = {"background": (int(np.argmin([np.mean(np.asarray(s["mask"]) > 0) for s in samples])), 0.0)}
    for i, s in enumerate(samples):
        for area, _ in _objects_under_units(s, stride):
            if "small object" not in best or area < best["small object"][1]:
                best["small object"] = (i, area)
            if "large object" not in best or area > best["large object"][1]:
                best["large object"] = (i, area)
    panels = []
    used = []
    for label in ("background", "small object", "large object"):
        if label not in best:
            continue
        i = best[label][0]
        levels = capture_deform_levels(model, _batch(config, val_set[i]))
        levels = levels[-layers:]
        image = np.asarray(samples[i]["image"])
        size = image.shape[:2]
        point = pick_units(samples[i], stride).get(label)
        if point is None:
            continue
        unit = unit_at(levels[-1], point, size)
        pts = sampling_locations(levels, unit, size)
        panels.append({"image": image, "points": pts, "unit": unit_in_image(levels[-1], unit, size),
                       "label": f"{label} (val image {i})"})
        used = [lv.name for lv in levels]
    fig = plot_figure5(panels, f"{Path(path).stem}: sampling locations through {', '.join(used)}")
    return save(fig, out_dir or FIGURES_DIR, stem)


def figure6_from_checkpoint(path: Path, out_dir: Path | None = None, images: int = 24, panels: int = 3,
                            stem: str = "figure6") -> list[Path]:
    """Figure 6 for a trained model with deformable RoI pooling: the ground-truth box of the largest
    objects of the first validation images as RoIs. Written as ``<stem>.png/.pdf``."""
    model, config, val_set = load_checkpoint(path)
    n = min(images, len(val_set))
    candidates = []
    for i in range(n):
        s = _raw(val_set, i)
        if len(s["areas"]):
            k = int(np.argmax(s["areas"]))
            candidates.append((float(s["areas"][k]), i, k))
    candidates.sort(reverse=True)
    rois = []
    for _, i, k in candidates[:panels]:
        s = _raw(val_set, i)
        box = np.asarray(s["boxes"], float)[k]
        offsets, gamma, name = capture_roi_offsets(model, _batch(config, val_set[i]), box[None],
                                                   np.asarray(s["labels"])[k:k + 1])
        regular, moved = roi_bins(tuple(box), offsets[0], gamma)
        rois.append({"image": np.asarray(s["image"]), "roi": tuple(box), "regular": regular, "moved": moved,
                     "label": f"val image {i} ({name})"})
    if not rois:
        raise ValueError("no validation image with an object")
    fig = plot_figure6(rois, f"{Path(path).stem}: deformable RoI pooling bins (red) for the RoI (yellow)")
    return save(fig, out_dir or FIGURES_DIR, stem)


# ---------------------------------------------------------------------------------------------
# Ablation plots
# ---------------------------------------------------------------------------------------------


def plot_ablation(layout, tier: str):
    """One panel per paper column with results: ours (mean ± std over seeds) per row, paper
    values on a second axis (the scales differ). Table 2: one panel per layer, x = category."""
    plt = _mpl()
    if layout.table == 2:
        panels = [(row, [(c.replace(" mean", ""), row, c) for c in layout.columns if c.endswith(" mean")])
                  for row in layout.rows]
    else:
        panels = [(col, [(row, row, col) for row in layout.rows if (row, col) in layout.expected])
                  for col in layout.columns]
    panels = [(t, pts) for t, pts in panels if any((r, c) in layout.ours for _, r, c in pts)]
    if not panels:
        return None
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (title, pts) in zip(axes.ravel(), panels):
        x = np.arange(len(pts))
        means = [layout.ours[(r, c)].mean if (r, c) in layout.ours else np.nan for _, r, c in pts]
        stds = [layout.ours[(r, c)].std if (r, c) in layout.ours and layout.ours[(r, c)].n > 1 else 0 for _, r, c in pts]
        ax.errorbar(x, means, yerr=stds, fmt="o", color="tab:blue", capsize=3, label="ours (± std over seeds)")
        ax.set_ylabel("ours", color="tab:blue")
        ax.ticklabel_format(axis="y", useOffset=False)
        paper = [layout.paper.get(r, c) if layout.paper else None for _, r, c in pts]
        if any(p is not None for p in paper):
            twin = ax.twinx()
            twin.plot(x, [np.nan if p is None else p for p in paper], "s--", color="tab:orange", mfc="none",
                      label="paper")
            twin.set_ylabel("paper", color="tab:orange")
        ax.set_xticks(x)
        ax.set_xticklabels([lab for lab, _, _ in pts], rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        for xi, m in zip(x, means):
            if np.isnan(m):
                ax.annotate("missing", (xi, 0), xycoords=("data", "axes fraction"), ha="center", fontsize=6, color="red")
    handles = [plt.Line2D([], [], color="tab:blue", marker="o", ls="", label="ours (± std over seeds)"),
               plt.Line2D([], [], color="tab:orange", marker="s", mfc="none", ls="--", label="paper (right axis)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"Table {layout.table} ({tier} tier): {layout.title}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    return fig


def ablation_figure(table: int, tier: str, out_dir: Path | None = None, csv_path: Path | None = None) -> list[Path]:
    from .tables import build_layout

    layout = build_layout(table, tier, csv_path)
    fig = plot_ablation(layout, tier)
    if fig is None:
        return []
    return save(fig, out_dir or FIGURES_DIR, f"table{table}_{tier}")


def default_checkpoint(kind: str, tier: str, root: Path | None = None) -> tuple[Path | None, list[Path]]:
    """A checkpoint for Figure 5 (a model with 3 deformable res5 layers) or 6 (deformable RoI
    pooling): the first of the candidate cells (seed 0) whose saved config is the one the experiment
    files define now; and the candidates skipped for holding another (an older definition's model,
    which the tables, reading only rows of the current configs, no longer report)."""
    from dcnbench.runner.experiment import expand_cells, load_experiment

    root = root or RESULTS_DIR / "ablate" / "checkpoints"
    if kind == "figure5":
        candidates = [(2, "rfcn", "res5a-c"), (1, "rfcn", "res5a-c"), (1, "deeplab", "res5a-c"), (3, "rfcn", "deform-conv")]
    else:
        candidates = [(3, "rfcn", "deform-conv+roi-pool"), (3, "faster", "deform-conv+roi-pool"),
                      (3, "rfcn", "deform-roi-pool")]
    stale = []
    for table, task, variant in candidates:
        (cell,) = expand_cells(load_experiment(table), tier, [task], 1, [variant])
        path = root / f"table{table}_{tier}" / f"{cell.name}.pt"  # the runner's file name
        if not path.is_file():
            continue
        try:
            saved = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            saved = None
        if _definition(saved) == _definition(cell.config):
            return path, stale
        stale.append(path)
    return None, stale


def _definition(config: object) -> object:
    """A saved cell config as the experiment files define it (``train.definition``), None when it is
    not a cell config."""
    from dcnbench.runner.train import definition

    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("data", "model")):
        return None
    return definition(config)
