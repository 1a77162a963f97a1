"""Fixed RPN proposals for the detector ablations (paper section 4.1): one RPN stage per seed, cached,
its proposals carried through the transforms and pooled by every detector cell of that seed."""

import io

import pytest
import torch

from dcnbench.data.transforms import ResizeShorterSide, hflip
from dcnbench.models.build import build_model
from dcnbench.models.faster_rcnn import RoIDetector
from dcnbench.runner.ablate import ablation_cells
from dcnbench.runner.experiment import expand_cells, load_experiment
from dcnbench.runner.proposals import WithProposals, stage_config, stage_folder, unflipped
from dcnbench.runner.train import build_data, check_settings, run_cell


def fixed(cell_config: dict, **train) -> dict:
    return {**cell_config, "train": {**cell_config["train"], "fixed_proposals": True, **train}}


def test_proposals_are_resized_and_mirrored_like_the_boxes():
    boxes = torch.tensor([[1.0, 2.0, 11.0, 7.0], [0.0, 0.0, 40.0, 20.0]])
    target = {"boxes": boxes, "proposals": boxes.clone(), "size": torch.tensor([20, 40])}
    image, resized = ResizeShorterSide(30)(torch.rand(3, 20, 40), target)
    assert image.shape[-2:] == (30, 60) and torch.equal(resized["proposals"], resized["boxes"])
    assert torch.allclose(resized["proposals"][0], torch.tensor([1.5, 3.0, 16.5, 10.5]))
    _, flipped = hflip(image, resized)
    assert torch.equal(flipped["proposals"], flipped["boxes"])
    assert torch.allclose(flipped["proposals"][0], torch.tensor([60 - 16.5, 3.0, 60 - 1.5, 10.5]))


def test_a_flipped_training_image_gets_its_proposals_mirrored():
    config = ablation_cells(1, "smoke", ["faster"], variants=["none"])[0].config
    train_set, _, _ = build_data("faster", config["data"])
    proposals = [torch.tensor([[float(i), 1.0, 20.0, 30.0]]) for i in range(len(train_set))]
    with_proposals = WithProposals(train_set, proposals)
    plain = WithProposals(unflipped(train_set), proposals)
    width = train_set[0][0].shape[-1]
    seen = set()
    for index in range(len(train_set)):
        torch.manual_seed(index)
        image, target = with_proposals[index]
        _, straight = plain[index]
        assert torch.equal(straight["proposals"], proposals[index])
        flipped = not torch.equal(image, plain[index][0])
        expected = torch.tensor([[width - 20.0, 1.0, width - float(index), 30.0]]) if flipped else proposals[index]
        assert torch.equal(target["proposals"], expected), index
        seen.add(flipped)
    assert seen == {True, False}
    with pytest.raises(ValueError, match="got 3 proposal sets for a dataset of 32 images"):
        WithProposals(train_set, proposals[:3])


def test_every_detector_cell_of_a_seed_shares_one_rpn_stage(tmp_path):
    """Placement, dilation, RoI pooling and the detector (Faster R-CNN or R-FCN) leave the RPN stage
    as it is; the seed, the backbone and the RPN's settings make another; a moved weights file does not."""
    cells = [c for table in (1, 3) for c in expand_cells(load_experiment(table), "cpu", tasks=["faster", "rfcn"],
                                                         seeds=2)]
    folders = {(c.seed, stage_folder(c.config, tmp_path)) for c in cells}
    assert len({f for _, f in folders}) == 2 and len({s for s, _ in folders}) == 2
    config = cells[0].config
    stage = stage_config(config)
    assert stage["task"] == "proposals" and stage["model"]["placement"] == "none"
    assert config["train"]["fixed_proposals"] and stage["data"] == config["data"]
    assert stage["train"] == {k: v for k, v in config["train"].items() if k != "fixed_proposals"}
    wider = {**config, "model": {**config["model"], "width": 16}}
    anchors = {**config, "model": {**config["model"], "anchor_sizes": [8, 16]}}
    assert len({stage_folder(c, tmp_path) for c in (config, wider, anchors)}) == 3
    moved = [{**config, "model": {**config["model"], "weights": path, "weights_sha256": "ab" * 32}}
             for path in ("/a/w.pth", "/b/w.pth")]
    assert stage_folder(moved[0], tmp_path) == stage_folder(moved[1], tmp_path)


def test_fixed_proposals_are_for_the_two_stage_detectors_only():
    cells = {c.task: c.config for c in ablation_cells(1, "smoke", ["deeplab", "rpn", "faster"], variants=["none"])}
    check_settings(fixed(cells["faster"]))
    for task in ("deeplab", "rpn"):
        with pytest.raises(ValueError, match=f"fixed_proposals is for the two-stage detectors.*not '{task}'"):
            check_settings(fixed(cells[task]))
    with pytest.raises(ValueError, match="train.fixed_proposals must be true or false, got 'yes'"):
        check_settings(fixed(cells["faster"], fixed_proposals="yes"))
    with pytest.raises(ValueError, match="needs a folder for the RPN stage"):
        run_cell(fixed(cells["faster"]), io.StringIO())


def test_detectors_train_and_test_on_the_cached_proposals_and_leave_their_own_rpn_untrained(tmp_path, monkeypatch):
    """The RPN stage trains once for both detectors; each detector call gets the cached proposals
    (mirrored where the image is), its own RPN keeps its initial weights, and a detector trained
    after the stage was cached equals one trained right after the stage."""
    cells = ablation_cells(1, "smoke", ["faster", "rfcn"], variants=["res5a-c"])
    calls = []
    original = RoIDetector.forward_raw

    def recording(self, images, targets=None, proposals=None):
        calls.append((self.training, proposals))
        return original(self, images, targets, proposals)

    monkeypatch.setattr(RoIDetector, "forward_raw", recording)
    logs = []
    for cell, name in ((cells[0], "first"), (cells[1], "rfcn"), (cells[0], "again")):
        log = io.StringIO()
        run_cell(fixed(cell.config), log, tmp_path / f"{name}.pt", tmp_path / "proposals")
        logs.append(log.getvalue())
    assert "training the RPN stage" in logs[0] and all("trained before" in log for log in logs[1:])
    (folder,) = (tmp_path / "proposals").iterdir()
    cached = torch.load(folder / "proposals.pt", weights_only=True)
    config = cells[0].config
    train_set, val_set, num_classes = build_data("faster", config["data"])
    assert len(cached["train"]) == len(train_set) and len(cached["val"]) == len(val_set)
    assert all(p.dtype == torch.float32 and p.shape[1] == 4 and len(p) for p in cached["val"])
    assert calls and all(proposals is not None for _, proposals in calls)
    evaluated = [p for training, proposals in calls[: len(calls) // 3] if not training for p in proposals]
    assert len(evaluated) == len(val_set) and all(torch.equal(a, b) for a, b in zip(evaluated, cached["val"]))
    torch.manual_seed(config["seed"])
    initial = build_model({**config["model"], "task": "faster_rcnn", "num_classes": num_classes}).state_dict()
    trained = torch.load(tmp_path / "first.pt", weights_only=True)
    rpn_keys = [k for k in trained if k.startswith("rpn.")]
    assert rpn_keys and all(torch.equal(trained[k], initial[k]) for k in rpn_keys)
    assert not torch.equal(trained["cls_score.weight"], initial["cls_score.weight"])
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert all(torch.equal(trained[k], again[k]) for k in trained)


def test_a_cache_of_another_dataset_size_is_refused(tmp_path):
    config = fixed(ablation_cells(1, "smoke", ["faster"], variants=["none"])[0].config)
    folder = stage_folder(config, tmp_path)
    folder.mkdir(parents=True)
    torch.save({"train": [torch.zeros(1, 4)] * 3, "val": [torch.zeros(1, 4)] * 16}, folder / "proposals.pt")
    with pytest.raises(ValueError, match="holds 3 train proposal sets for a train set of 32 images: delete the folder"):
        run_cell(config, io.StringIO(), None, tmp_path)
