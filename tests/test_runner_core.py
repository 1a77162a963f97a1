"""Experiment expansion and the results CSV: cells, config hashes, atomic rows, resume keys."""

import csv

import pytest
from click.testing import CliRunner

from dcnbench.cli import main
from dcnbench.runner.experiment import TASKS, expand_cells, load_experiment
from dcnbench.runner.results import KEY_COLUMNS, PROVENANCE_COLUMNS, append_row, finished_keys, read_rows


def test_table_definitions_expand_to_the_papers_cells():
    """Table 1: 5 placements x 4 tasks; Table 3: 5 rows x 4 tasks + 2 RoI-pooling rows x 2 detectors."""
    t1 = expand_cells(load_experiment(1), "smoke", seeds=1)
    assert len(t1) == 20 and {c.task for c in t1} == set(TASKS)
    assert [c.variant for c in t1 if c.task == "deeplab"] == ["none", "res5c", "res5b-c", "res5a-c", "res5+res4b20-22"]
    t3 = expand_cells(load_experiment(3), "smoke", seeds=1)
    assert len(t3) == 5 * 4 + 2 * 2
    assert not [c for c in t3 if c.task in ("deeplab", "rpn") and "roi-pool" in c.variant]
    t2 = expand_cells(load_experiment(2), "cpu")
    assert {c.task for c in t2} == {"rfcn"} and all(c.config["eval"]["effective_dilation"] for c in t2)


def test_merge_order_tier_then_task_then_variant():
    cells = expand_cells(load_experiment(3), "cpu", tasks=["faster"], seeds=2)
    by_variant = {c.variant: c for c in cells if c.seed == 0}
    assert by_variant["atrous-6"].config["model"]["dilation"] == 6
    assert by_variant["deform-roi-pool"].config["model"]["deformable_roi_pool"] is True
    tier = load_experiment(3)["tiers"]["cpu"]
    assert by_variant["atrous-6"].config["train"] == {**tier["train"], **tier["task"]["faster"]["train"]}
    assert by_variant["atrous-6"].config["train"]["fixed_proposals"] is True  # the task's override
    assert [c.seed for c in cells if c.variant == "atrous-2"] == [0, 1]


def test_config_hash_ignores_seed_but_not_settings():
    a, b = expand_cells(load_experiment(1), "smoke", tasks=["deeplab"], seeds=2)[:2]
    assert a.variant == b.variant and a.seed != b.seed and a.config_hash == b.config_hash
    other = expand_cells(load_experiment(1), "smoke", tasks=["deeplab"], seeds=1)[1]
    assert other.config_hash != a.config_hash


def test_unknown_names_are_rejected_clearly():
    with pytest.raises(ValueError, match="has no tier 'huge'"):
        expand_cells(load_experiment(1), "huge")
    with pytest.raises(ValueError, match=r"table 2 has no task\(s\) \['deeplab'\]"):
        expand_cells(load_experiment(2), "cpu", tasks=["deeplab"])
    with pytest.raises(FileNotFoundError, match="no experiment definition for table 9"):
        load_experiment(9)


def row(task, variant, seed, **metrics):
    return {"table": 1, "tier": "smoke", "task": task, "variant": variant, "seed": seed, **metrics,
            "wall_s": 1.0, "device": "cpu", "threads": 1, "backend": "reference", "config_hash": "abc",
            "git_commit": "x", "date": "d", "machine": "m", "torch": "t"}


def test_rows_accumulate_with_union_of_metric_columns(tmp_path):
    path = tmp_path / "out" / "table1_smoke.csv"
    append_row(path, row("deeplab", "none", 0, miou=50.0))
    append_row(path, row("rpn", "none", 0, map50=30.0, map70=10.0))
    with path.open() as f:
        header = next(csv.reader(f))
    assert header == KEY_COLUMNS + ["miou", "map50", "map70"] + PROVENANCE_COLUMNS
    rows = read_rows(path)
    assert [r["task"] for r in rows] == ["deeplab", "rpn"]
    assert rows[0]["map50"] == "" and rows[1]["map50"] == "30"
    assert finished_keys(rows) == {("deeplab", "none", 0, "abc"), ("rpn", "none", 0, "abc")}
    assert not list(path.parent.glob("*.tmp"))


def test_variant_filter_keeps_only_named_variants_and_names_a_bad_one():
    spec = load_experiment(3)
    cells = expand_cells(spec, "smoke", ["faster"], variants=["atrous-2", "deform-roi-pool"])
    assert [c.variant for c in cells] == ["atrous-2", "deform-roi-pool"]
    with pytest.raises(ValueError, match="no variant.*'atrous-3'"):
        expand_cells(spec, "smoke", variants=["atrous-3"])


def test_tasks_and_variants_that_share_no_cell_are_rejected():
    spec = load_experiment(3)
    with pytest.raises(ValueError, match=r"variant 'deform-roi-pool' is not defined for task\(s\) deeplab "
                                         r"\(table 3 defines it for faster, rfcn\)"):
        expand_cells(spec, "smoke", ["deeplab"], variants=["deform-roi-pool"])
    cells = expand_cells(spec, "smoke", ["deeplab", "rfcn"], seeds=1, variants=["deform-roi-pool"])
    assert [(c.task, c.variant) for c in cells] == [("rfcn", "deform-roi-pool")]


@pytest.mark.parametrize("args,error", [
    (["--table", "3", "--task", "rfcn", "--variant", "foo"], "Invalid value for '--variant': table 3 has no variant(s) ['foo']"),
    (["--table", "2", "--task", "deeplab"], "Invalid value for '--task': table 2 has no task(s) ['deeplab']"),
    (["--table", "3", "--task", "deeplab", "--variant", "deform-roi-pool"],
     "Invalid value for '--task' / '--variant': variant 'deform-roi-pool' is not defined for task(s) deeplab"),
    (["--table", "1", "--task", "deeplab", "--variant", "none", "--weights", "missing.pth"],
     "Invalid value for '--weights': File 'missing.pth' does not exist"),
    (["--table", "1", "--task", "deeplab", "--variant", "none", "--data-root", "missing"],
     "Invalid value for '--data-root': Directory 'missing' does not exist"),
])
def test_ablate_bad_choices_are_usage_errors_before_any_run(tmp_path, monkeypatch, args, error):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["ablate", "--tier", "smoke", "--out", "out", *args])
    assert result.exit_code == 2 and error in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_dilation_stats_of_a_mixed_size_batch_equal_those_of_its_images_one_by_one():
    """A batch of real images of different sizes (VOC) runs one group per size: it failed after
    training ("needs batches of one image size"), and a padded batch would count padding as
    background. Object areas are in the annotated image's pixels: a resized image's object keeps
    the bucket it has at its file's size."""
    import pandas
    import torch

    from dcnbench.models import build_model
    from dcnbench.runner.dilation import dilation_stats

    model = build_model({"task": "rfcn", "num_classes": 3, "backbone": "scaled", "blocks": [1, 1, 1, 3], "width": 8,
                         "placement": "res5a-c"})
    for module in model.modules():
        if hasattr(module, "offset_conv"):
            torch.nn.init.normal_(module.offset_conv.weight, std=0.5)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 96), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[2.0, 2.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[8.0, 4.0, 60.0, 50.0], [0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[20.0, 20.0, 30.0, 30.0]]), "labels": torch.tensor([2])}]
    mixed = dilation_stats(model, [(images, targets)])
    one_by_one = dilation_stats(model, [([image], [target]) for image, target in zip(images, targets)])
    for buckets in ("terciles", "paper"):  # equal up to the order of the sums (a group per size first)
        pandas.testing.assert_frame_equal(mixed.summary(buckets), one_by_one.summary(buckets), rtol=1e-12)
    # An image shown at half its file's size: its 38 x 38 px box is 76 x 76 px (5776 px^2) in the file.
    halved = [{**targets[0], "size": torch.tensor([64, 64]), "orig_size": torch.tensor([128, 128])}]
    scaled = dilation_stats(model, [([images[0]], halved)]).summary("paper").set_index(["layer", "category"])
    counts = {category: int(scaled.xs(category, level="category")["count"].sum()) for category in ("small", "medium")}
    assert counts["small"] > 0 and counts["medium"] == 0
    halved[0]["orig_size"] = torch.tensor([256, 256])  # 152 x 152 px in the file: medium
    scaled = dilation_stats(model, [([images[0]], halved)]).summary("paper").set_index(["layer", "category"])
    assert int(scaled.xs("medium", level="category")["count"].sum()) > 0


def test_real_data_sources_take_the_class_count_from_the_dataset(tmp_path):
    """A VOC-layout folder with its own classes.txt trains a head of its classes, not VOC's 21."""
    from dcnbench.data import SynthConfig, write_synthetic
    from dcnbench.runner.train import build_data

    write_synthetic(tmp_path, "seg", 4, SynthConfig(size=32, num_classes=3, min_size=4, max_size=16), seed=0,
                    val_fraction=0.5)
    sets = tmp_path / "ImageSets" / "Segmentation"
    (sets / "train.txt").rename(sets / "train_aug.txt")  # the runner's VOC training split
    train, val, num_classes = build_data("deeplab", {"source": "voc_seg", "root": str(tmp_path), "shorter_side": 32})
    assert num_classes == 3 == train.num_classes and len(train) == 2 and len(val) == 2
