"""Figures 5 and 6: image coordinates of units, sampling points and RoI bins; unusable checkpoints."""

import json

import numpy as np
import torch
from click.testing import CliRunner

from dcnbench.cli import main
from dcnbench.models.build import build_model
from dcnbench.ops import use_backend
from dcnbench.report.figures import (
    DeformLevel,
    capture_deform_levels,
    pick_units,
    plot_figure6,
    roi_bins,
    sampling_locations,
    unit_at,
    unit_in_image,
)
from dcnbench.runner.ablate import ablation_cells


def test_figure5_unit_sits_at_the_centre_of_its_receptive_field():
    """Unit i of a stride-8 res5 map is centred on image pixel 8*i: the middle of the pixels its
    gradient reaches. Figure 5 draws the unit there, and (fresh layers: zero offsets, a symmetric
    3-layer grid) centres its 729 points there, not at the pixel-centre-aligned 8*i + 3.5."""
    torch.manual_seed(0)
    model = build_model({"task": "deeplab", "num_classes": 3, "backbone": "scaled", "blocks": [1, 1, 3, 3],
                         "width": 8, "output_stride": 8, "dilation": 2, "placement": "res5a-c"}).eval()
    image = torch.rand(1, 3, 256, 256, requires_grad=True)
    with use_backend("reference"):
        conv5 = model.backbone(image)[-1]
        (grad,) = torch.autograd.grad(conv5[0, :, 16, 16].pow(2).sum() + conv5[0, :, 16, 16].sum(), image)
        levels = capture_deform_levels(model.backbone, image.detach())[-3:]
    reached = grad[0].abs().sum(0).nonzero()
    assert reached.min() > 0 and reached.max() < 255  # the receptive field lies inside the image
    centre = ((reached.min(0).values + reached.max(0).values) / 2).tolist()
    assert centre == [128.0, 128.0]
    top = levels[-1]
    assert top.out_size == (32, 32)
    assert unit_in_image(top, (16, 16), (256, 256)).tolist() == centre
    assert unit_at(top, (128.0, 128.0), (256, 256)) == (16, 16)
    np.testing.assert_allclose(sampling_locations(levels, (16, 16), (256, 256)).mean(0), centre, atol=1e-9)


def test_figure5_stride_is_exact_when_the_map_size_is_rounded_up():
    """A stride-16 map of a 100 px image has 7 cells; cell 3 is still image pixel 48 (16 * 3)."""
    level = DeformLevel(np.zeros((18, 7, 7)), (3, 3), (1, 1), (2, 2), (2, 2), (7, 7), (7, 7))
    assert unit_in_image(level, (3, 3), (100, 100)).tolist() == [48.0, 48.0]
    points = sampling_locations([level], (3, 3), (100, 100))
    assert sorted(set(points[:, 0].tolist())) == [16.0, 48.0, 80.0]  # 16 * (3 - 2, 3, 3 + 2)


def _ring_sample(with_instance_map: bool) -> dict:
    yy, xx = np.mgrid[:64, :64]
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    ring = (r2 <= 20**2) & (r2 >= 12**2)  # box centre (32, 32) lies in the hole
    dot = (np.abs(yy - 5) <= 1) & (np.abs(xx - 58) <= 1)  # 9 px, between the 8 px grid's pixels
    mask = np.where(ring, 2, np.where(dot, 1, 0)).astype(np.uint8)
    sample = {"mask": mask, "labels": np.array([2, 1]), "areas": np.array([ring.sum(), dot.sum()]),
              "boxes": np.array([[12, 12, 53, 53], [57, 4, 60, 7]], dtype=np.float32)}
    if with_instance_map:
        sample["instance_map"] = np.where(ring, 1, np.where(dot, 2, 0))
    return sample


def test_figure5_object_units_lie_on_the_object_and_on_the_unit_grid():
    """Units 'on an object' are on it: a ring's box centre is its hole, so the unit is the ring pixel
    on the stride grid nearest that centre; an object no grid pixel falls on is not picked."""
    for with_instance_map in (False, True):
        sample = _ring_sample(with_instance_map)
        units = pick_units(sample, (8, 8))
        for tag in ("small object", "large object"):
            y, x = (int(v) for v in units[tag])
            assert sample["mask"][y, x] == 2 and y % 8 == 0 and x % 8 == 0, (tag, units[tag])
        y, x = (int(v) for v in units["background"])
        assert sample["mask"][y, x] == 0 and y % 8 == 0 and x % 8 == 0


def test_figure6_rectangles_are_drawn_on_the_pixels_they_bound():
    """A box (x1, y1, x2, y2) covers pixels x1..x2-1; imshow centres pixel p on p, so the RoI and its
    bins are drawn from x1 - 0.5."""
    regular, moved = roi_bins((2, 4, 11, 13), np.zeros((2, 3, 3)))
    fig = plot_figure6([{"image": np.zeros((16, 16, 3)), "roi": (2, 4, 11, 13), "regular": regular,
                         "moved": moved}])
    roi_patch, first_bin = fig.axes[0].patches[0], fig.axes[0].patches[1]
    assert roi_patch.get_xy() == (1.5, 3.5) and (roi_patch.get_width(), roi_patch.get_height()) == (9, 9)
    assert first_bin.get_xy() == (1.5, 3.5) and first_bin.get_width() == 3


def _checkpoint(tmp_path, state) -> str:
    (cell,) = ablation_cells(1, "smoke", ["deeplab"], variants=["none"])
    (tmp_path / "ck.json").write_text(json.dumps(cell.config))
    path = tmp_path / "ck.pt"
    if isinstance(state, bytes):
        path.write_bytes(state)
    else:
        torch.save(state, path)
    return str(path)


def test_figures_cli_names_the_option_of_an_unusable_checkpoint(tmp_path):
    """Unreadable weights, weights of another model, a model without deformable layers: a usage
    error naming --checkpoint / --roi-checkpoint, no traceback."""
    results = tmp_path / "results"
    results.mkdir()
    base = ["figures", "--tier", "smoke", "--table", "1", "--results-dir", str(results), "--out", str(tmp_path / "fig")]
    (cell,) = ablation_cells(1, "smoke", ["deeplab"], variants=["none"])
    model = build_model({**cell.config["model"], "task": "deeplab", "num_classes": cell.config["data"]["classes"]})
    cases = [
        (b"not a checkpoint", "--checkpoint", "not a weights-only PyTorch checkpoint"),
        ({"conv.weight": torch.zeros(1)}, "--checkpoint", "the weights do not fit the model of ck.json"),
        (model.state_dict(), "--checkpoint", "the model has no DeformConv2d layer"),
        (model.state_dict(), "--roi-checkpoint", "the model has no deformable RoI pooling"),
    ]
    for state, option, message in cases:
        result = CliRunner().invoke(main, base + [option, _checkpoint(tmp_path, state)])
        assert result.exit_code == 2, result.output
        assert f"Invalid value for {option}" in result.output and message in result.output, result.output


def test_grid_stride_of_maps_of_few_cells():
    """ceil(n / p) cells: a 33 px image gives 3 cells at stride 16 and 20 px 2 cells (the ratio of sizes,
    11 and 10, rounded to a power of two, said 8); identical grids have stride 1."""
    from dcnbench.report.figures import _grid_stride

    assert _grid_stride((3, 2), (33, 20)).tolist() == [16.0, 16.0]
    assert _grid_stride((33, 20), (3, 2)).tolist() == [1 / 16, 1 / 16]
    assert _grid_stride((7, 8), (100, 128)).tolist() == [16.0, 16.0]
    assert _grid_stride((38, 50), (38, 50)).tolist() == [1.0, 1.0]


def test_figure_files_are_named_after_the_tier_or_the_checkpoint_given(tmp_path):
    """Figure 5 of a smoke-tier checkpoint is figure5_smoke (the committed cpu tier's figure5_cpu is
    never replaced by a smoke run); a checkpoint given by path names its figure."""
    results, out = tmp_path / "results", tmp_path / "fig"
    (cell,) = ablation_cells(1, "smoke", ["deeplab"], variants=["res5a-c"])
    model = build_model({**cell.config["model"], "task": "deeplab", "num_classes": cell.config["data"]["classes"]})
    checkpoint = results / "checkpoints" / "table1_smoke" / "deeplab__res5a-c__seed0.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.with_suffix(".json").write_text(json.dumps(cell.config))
    torch.save(model.state_dict(), checkpoint)
    base = ["figures", "--tier", "smoke", "--table", "1", "--results-dir", str(results), "--out", str(out)]
    for extra, name in [([], "figure5_smoke"), (["--checkpoint", str(checkpoint)], "figure5_deeplab__res5a-c__seed0")]:
        result = CliRunner().invoke(main, base + extra)
        assert result.exit_code == 0, result.output
        assert (out / f"{name}.png").is_file() and (out / f"{name}.pdf").is_file(), sorted(out.iterdir())


def test_default_checkpoint_skips_one_trained_with_an_older_definition(tmp_path):
    """Before: figures drew Figure 5 from whatever checkpoint had the cell's name, also one trained
    with a config the experiment files no longer define (the tables beside it report only the
    current config's rows), with no word of it."""

    from dcnbench.report.figures import default_checkpoint
    from dcnbench.runner.experiment import expand_cells, load_experiment

    (cell,) = expand_cells(load_experiment(1), "smoke", ["deeplab"], 1, ["res5a-c"])
    folder = tmp_path / "table1_smoke"
    folder.mkdir()
    (folder / "deeplab__res5a-c__seed0.pt").write_bytes(b"weights")
    config = {**cell.config, "data": {**cell.config["data"], "root": "/data"}}  # what a run adds does not count
    (folder / "deeplab__res5a-c__seed0.json").write_text(json.dumps(config))
    assert default_checkpoint("figure5", "smoke", tmp_path) == (folder / "deeplab__res5a-c__seed0.pt", [])
    config["train"] = {**config["train"], "lr": 2 * config["train"]["lr"]}
    (folder / "deeplab__res5a-c__seed0.json").write_text(json.dumps(config))
    assert default_checkpoint("figure5", "smoke", tmp_path) == (None, [folder / "deeplab__res5a-c__seed0.pt"])


def test_default_checkpoint_of_figure6_finds_the_runners_file_of_a_variant_named_with_a_plus(tmp_path):
    """Before: Figure 6's candidates were the file names ("deform-conv_roi-pool"), which expand_cells
    refused as variant names: `dcnbench figures` failed once such a checkpoint was there."""
    from dcnbench.report.figures import default_checkpoint
    from dcnbench.runner.experiment import expand_cells, load_experiment

    (cell,) = expand_cells(load_experiment(3), "smoke", ["rfcn"], 1, ["deform-conv+roi-pool"])
    folder = tmp_path / "table3_smoke"
    folder.mkdir()
    (folder / "rfcn__deform-conv_roi-pool__seed0.pt").write_bytes(b"weights")
    (folder / "rfcn__deform-conv_roi-pool__seed0.json").write_text(json.dumps(cell.config))
    assert default_checkpoint("figure6", "smoke", tmp_path) == (folder / "rfcn__deform-conv_roi-pool__seed0.pt", [])


def test_saving_the_same_figure_twice_gives_the_same_bytes(tmp_path):
    """`dcnbench figures` redraws committed figures: the PDF's creation date changed every run and
    left the committed files modified in git."""
    import time

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcnbench.report.figures import save

    contents = []
    for run in range(2):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        paths = save(fig, tmp_path / str(run), "figure")
        contents.append([p.read_bytes() for p in paths])
        time.sleep(1.1)  # the PDF date has whole seconds
    assert contents[0] == contents[1]
