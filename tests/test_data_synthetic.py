"""The synthetic generator: determinism, annotation consistency, geometry, disk layouts, CLI, speed."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dcnbench.cli import main
from dcnbench.data import (
    CocoDetection,
    SynthConfig,
    SyntheticDataset,
    VOCDetection,
    VOCSegmentation,
    build_dataset,
    generate_sample,
    generate_samples,
    write_synthetic,
)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_sample_any_order():
    a = generate_sample(7, seed=3)
    b = generate_samples(10, seed=3)[7]
    for key in ("image", "mask", "instance_map", "boxes", "labels", "areas"):
        np.testing.assert_array_equal(a[key], b[key])
    c = generate_sample(7, seed=4)
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(generate_sample(8, seed=3)["image"], a["image"])


def test_negative_indices_count_from_the_end():
    ds = SyntheticDataset(5, SynthConfig(size=32, min_size=6, max_size=16), seed=1)
    last, first = ds[-1], ds[-5]
    assert last[1]["image_id"] == 4 and first[1]["image_id"] == 0
    torch.testing.assert_close(last[0], ds[4][0])
    for index in (5, -6):
        with pytest.raises(IndexError, match=f"index {index} out of range for 5 samples"):
            ds[index]


def test_annotations_agree_with_pixels():
    cfg = SynthConfig()
    for s in generate_samples(40, cfg, seed=1):
        assert s["image"].shape == (128, 128, 3) and s["image"].dtype == np.uint8
        assert s["mask"].shape == (128, 128) and s["mask"].dtype == np.uint8
        k = len(s["labels"])
        assert s["boxes"].shape == (k, 4) and s["areas"].shape == (k,)
        assert set(np.unique(s["mask"])) <= set(range(cfg.num_classes + 1))
        assert ((s["labels"] >= 1) & (s["labels"] <= cfg.num_classes)).all()
        for j in range(k):
            ys, xs = np.nonzero(s["instance_map"] == j + 1)
            assert s["areas"][j] == len(ys) >= cfg.min_pixels
            np.testing.assert_array_equal(s["boxes"][j], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert (s["mask"][ys, xs] == s["labels"][j]).all()
        assert ((s["mask"] > 0) == (s["instance_map"] > 0)).all()


def test_geometry_varies_widely_and_background_is_grey():
    samples = generate_samples(300, seed=0)
    boxes = np.concatenate([s["boxes"] for s in samples])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    longest = np.maximum(w, h)
    assert longest.max() / longest.min() >= 10  # >= 10x range of object size
    aspect = np.maximum(w, h) / np.minimum(w, h)
    assert np.quantile(aspect, 0.9) > 1.8  # elongated objects are common
    labels = np.concatenate([s["labels"] for s in samples])
    assert set(labels.tolist()) == set(range(1, 7))
    spread = [(s["image"].max(2).astype(int) - s["image"].min(2))[s["mask"] == 0].mean() for s in samples]
    obj = [(s["image"].max(2).astype(int) - s["image"].min(2))[s["mask"] > 0].mean() for s in samples if s["mask"].any()]
    assert np.mean(spread) < 15 < np.mean(obj)


def test_config_is_honoured_and_validated():
    cfg = SynthConfig(size=64, num_classes=3, min_size=6, max_size=20, objects_per_image=(2, 2))
    s = generate_sample(0, cfg, seed=0)
    assert s["image"].shape == (64, 64, 3) and s["labels"].max() <= 3
    assert max((s["boxes"][:, 2:] - s["boxes"][:, :2]).max(1)) <= 20 * 1.25 * 1.2 + 2
    with pytest.raises(ValueError):
        SynthConfig(num_classes=11)
    with pytest.raises(ValueError):
        SynthConfig(min_size=50, max_size=10)


@pytest.mark.parametrize("task,layout", [("seg", None), ("det", "coco"), ("det", "voc")])
def test_write_is_byte_identical_and_readable(tmp_path, task, layout):
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic(a, task, 12, seed=5, val_fraction=0.25, layout=layout)
    write_synthetic(b, task, 12, seed=5, val_fraction=0.25, layout=layout)
    da = _digest(a)
    assert da == _digest(b) and len(da) > 12
    write_synthetic(tmp_path / "c", task, 12, seed=6, val_fraction=0.25, layout=layout)
    assert da != _digest(tmp_path / "c")

    memory = SyntheticDataset(12, seed=5)
    if task == "seg":
        ds = VOCSegmentation(a, "val")
        assert len(ds) == 3 and len(VOCSegmentation(a, "train")) == 9
        img, tgt = ds[1]
        mimg, mtgt = memory[10]
        assert tgt["name"] == "000010"
        torch.testing.assert_close(img, mimg)
        torch.testing.assert_close(tgt["mask"], mtgt["mask"])
    elif layout == "coco":
        ds = CocoDetection(a, "val")
        assert len(ds) == 3
        img, tgt = ds[0]
        mimg, mtgt = memory[9]
        assert tgt["image_id"] == mtgt["image_id"] == 9
        torch.testing.assert_close(img, mimg)
        for key in ("boxes", "labels", "areas"):
            torch.testing.assert_close(tgt[key], mtgt[key].to(tgt[key].dtype))
        doc = json.loads((a / "annotations" / "instances_val.json").read_text())
        assert {c["name"] for c in doc["categories"]} == set(SynthConfig().class_names)
    else:
        ds = VOCDetection(a, "train")
        assert ds.class_names == SynthConfig().class_names
        _, tgt = ds[4]
        _, mtgt = memory[4]
        torch.testing.assert_close(tgt["boxes"], mtgt["boxes"])
        torch.testing.assert_close(tgt["labels"], mtgt["labels"])


def test_cli_synth_matches_library_and_writes_only_under_out(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["data", "synth", "--task", "det", "--num", "10", "--size", "64",
                                       "--seed", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]
    cfg = SynthConfig(size=64, min_size=4, max_size=48)
    write_synthetic(tmp_path / "lib", "det", 10, cfg, seed=2)
    assert _digest(out) == _digest(tmp_path / "lib")
    ds = build_dataset("synth_det", out, "train", train=False, normalize=False)
    assert ds[0][0].shape == (3, 64, 64)
    bad = CliRunner().invoke(main, ["data", "synth", "--task", "seg", "--layout", "coco", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--task seg writes the VOC segmentation layout only" in bad.output, bad.output


@pytest.mark.parametrize("args,error", [
    (["--min-size", "50", "--max-size", "10"], "Invalid value for '--min-size' / '--max-size': need 0 < min_size <= max_size"),
    (["--max-size", "500", "--size", "64"], "Invalid value for '--max-size': max_size=500 px exceeds the image size 64 px"),
    (["--num", "1"], "Invalid value for '--num' / '--val-fraction': a train and a val split need at least 2 images"),
])
def test_cli_synth_bad_settings_are_usage_errors(tmp_path, args, error):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(out), *args])
    assert result.exit_code == 2 and error in result.output, result.output
    assert not out.exists()


def test_val_fraction_one_is_all_val_and_zero_all_train(tmp_path):
    cfg = SynthConfig(size=32, min_size=4, max_size=24)
    summary = write_synthetic(tmp_path / "val", "seg", 3, cfg, val_fraction=1.0)
    assert (summary["train"], summary["val"]) == (0, 3)
    lists = tmp_path / "val" / "ImageSets" / "Segmentation"
    assert (lists / "train.txt").read_text() == "" and len((lists / "val.txt").read_text().split()) == 3
    assert (write_synthetic(tmp_path / "one", "seg", 1, cfg, val_fraction=0)["train"]) == 1
    with pytest.raises(ValueError, match="max_size=33 px exceeds the image size 32 px"):
        SynthConfig(size=32, max_size=33)


def test_rewrite_only_into_the_same_dataset(tmp_path):
    """A folder holding another dataset, or other files, is refused untouched; the same dataset is rewritten."""
    cfg = SynthConfig(size=32, min_size=4, max_size=24)
    out = tmp_path / "out"
    write_synthetic(out, "seg", 5, cfg, val_fraction=0.4)
    before = _digest(out)
    with pytest.raises(ValueError, match="is not empty: it holds a synthetic dataset with different num"):
        write_synthetic(out, "seg", 3, cfg, val_fraction=0.4)
    assert _digest(out) == before
    write_synthetic(out, "seg", 5, cfg, val_fraction=0.4)
    assert _digest(out) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = CliRunner().invoke(main, ["data", "synth", "--num", "3", "--size", "32", "--out", str(tmp_path / "mine")])
    assert result.exit_code == 2 and "Invalid value for '--out'" in result.output and "holds other files" in result.output
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_synth_interrupted_exits_130_saying_the_rerun_completes_it(tmp_path, monkeypatch):
    """Ctrl-C while writing: exit 130 with how to finish (the same command completes the dataset),
    not Click's "Aborted!" and 1."""
    import dcnbench.data.synthetic as synthetic

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_synthetic", interrupted)
    result = CliRunner().invoke(main, ["data", "synth", "--num", "3", "--size", "32", "--out", str(tmp_path / "d")])
    assert result.exit_code == 130
    assert "the same command completes the dataset" in result.output
