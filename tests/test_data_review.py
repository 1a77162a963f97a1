"""Loaders and metrics against the real on-disk formats: COCO evaluation through the loaders equals
pycocotools on the original annotation file; invalid inputs fail loudly instead of giving wrong numbers."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcnbench.data import DatasetNotFoundError, VOCDetection, build_dataset
from dcnbench.data.datasets import read_label
from dcnbench.evaluation import DetectionEvaluator


def _coco_fixture(root: Path, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """A COCO val split in the real format: float xywh boxes, non-contiguous category ids, crowd
    regions (RLE), an image without annotations, objects on both sides of the 32² "small" limit."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns, results = [], [], []
    for n, (h, w) in enumerate([(72, 96), (90, 60), (80, 80), (60, 90)]):
        image_id = 1000 + 37 * n
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": w, "height": h})
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val2017" / images[-1]["file_name"])
        if n == 3:
            continue  # no annotations
        for k in range(3):
            bw, bh = rng.uniform(15, 55, 2).clip(max=[w - 1, h - 1])
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            crowd = int(k == 2 and n == 0)
            polygon = [[x, y, x + bw, y, x, y + bh]]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.choice([3, 18, 90])),
                         "bbox": [x, y, bw, bh], "area": float(bw * bh * 0.8), "iscrowd": crowd,
                         "segmentation": {"size": [h, w], "counts": [0, 5]} if crowd else polygon})
            # A detection near each object (the top-scored one on the crowd region), and a stray one.
            jitter = rng.normal(0, 2.0, 4)
            results.append({"image_id": image_id, "category_id": anns[-1]["category_id"],
                            "bbox": [x + jitter[0], y + jitter[1], bw + jitter[2], bh + jitter[3]],
                            "score": 0.99 if crowd else float(rng.random())})
        results.append({"image_id": image_id, "category_id": 18, "bbox": [1.0, 2.0, 10.0, 9.0], "score": 0.95})
    categories = [{"id": c, "name": f"class{c}", "supercategory": "x"} for c in (90, 3, 18)]
    doc = {"images": images, "annotations": anns, "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    return anns, results


def test_coco_evaluation_through_loader_equals_cocoeval_on_the_original_file(tmp_path):
    """build_dataset("coco", train=False) resizes to 600 px yet keeps crowd regions and original-pixel
    areas, so DetectionEvaluator on its targets gives pycocotools' numbers on the original json."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anns, results = _coco_fixture(tmp_path, np.random.default_rng(0))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "annotations" / "instances_val2017.json"))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    areas = np.array([a["area"] for a in anns if not a["iscrowd"]])
    assert (areas < 32**2).any() and (areas > 32**2).any()  # both size classes are exercised

    ds = build_dataset("coco", tmp_path, "val2017", train=False, normalize=False)
    evaluator = DetectionEvaluator(ds.num_classes, area_ranges="coco")
    for index in range(len(ds)):
        image, target = ds[index]
        assert min(image.shape[-2:]) == 600 and target["size"].tolist() == list(image.shape[-2:])
        scale = image.shape[-1] / target["orig_size"][1].item()
        mine = [r for r in results if r["image_id"] == target["image_id"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)]).reshape(-1, 4)
        labels = torch.tensor([ds.category_id_to_label[r["category_id"]] for r in mine], dtype=torch.long)
        evaluator.update([{"boxes": boxes * scale, "scores": torch.tensor([r["score"] for r in mine]),
                           "labels": labels}], [target])
    out = evaluator.compute()
    ours = [out[k] for k in ("coco_mAP", "coco_mAP@0.5", "coco_mAP@0.75", "coco_mAP_small", "coco_mAP_medium")]
    np.testing.assert_allclose(ours, ev.stats[[0, 1, 2, 3, 4]], atol=1e-9)

    _, train_target = build_dataset("coco", tmp_path, "val2017", train=True)[0]
    assert not train_target["iscrowd"].any()  # training drops crowd boxes


def test_voc_07_plus_12_from_one_years_folder_is_refused(tmp_path):
    """A VOC2007 folder as root holds no 2012 data: 07+12 must not read 2007 twice."""
    voc = tmp_path / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n")
    assert len(VOCDetection(voc, "2007-trainval")) == 1
    with pytest.raises(DatasetNotFoundError, match="'2007-trainval' and '2012-trainval'"):
        VOCDetection(voc, ("2007-trainval", "2012-trainval"))
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    assert len(VOCDetection(voc, ("trainval", "test"))) == 2  # sets without a year: one folder is right


def test_wide_label_pngs_are_read_or_refused_never_wrapped(tmp_path):
    """16-bit label PNGs: values 0..255 read as they are; larger ones raise (uint8 would wrap 300 to 44)."""
    Image.fromarray(np.array([[0, 7, 255]], np.uint16)).save(tmp_path / "ok.png")
    assert read_label(tmp_path / "ok.png").tolist() == [[0, 7, 255]]
    Image.fromarray(np.array([[0, 7, 300]], np.uint16)).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="0..255, got 0..300"):
        read_label(tmp_path / "bad.png")


def test_detection_evaluator_rejects_inconsistent_entries_and_repeated_images():
    """Mismatched lengths name the field at update time; an image evaluated twice is an error; a
    rejected batch leaves the accumulated state unchanged."""
    gt = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1]), "image_id": 7}
    good = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    ev = DetectionEvaluator(2, coco=False)
    with pytest.raises(ValueError, match=r"predictions\[1\]: 2 boxes but scores has shape \(1,\)"):
        ev.update([good, {**good, "boxes": torch.zeros(2, 4)}], [gt, {**gt, "image_id": 8}])
    with pytest.raises(ValueError, match=r"targets\[0\]: 1 boxes but labels has shape \(2,\)"):
        ev.update([good], [{**gt, "labels": torch.tensor([1, 2])}])
    assert ev.gts == [] and ev.dets == []
    ev.update([good], [gt])
    with pytest.raises(ValueError, match=r"image_id'\] = 7 was already evaluated"):
        ev.update([good], [{**gt, "image_id": torch.tensor(7)}])
    assert len(ev.gts) == 1 and ev.compute()["mAP@0.5"] == 1.0


def test_detection_images_keep_the_longer_side_at_most_1000_px():
    """The cited detectors' scale: shorter side 600, longer side at most 1000 (a 1:2 image becomes
    500 x 1000, not 600 x 1200); the paper tier sets the cap explicitly, segmentation has none."""
    from dcnbench.data.transforms import paper_transforms
    from dcnbench.runner.experiment import expand_cells, load_experiment

    image, target = torch.zeros(3, 300, 600), {"boxes": torch.tensor([[0.0, 0.0, 600.0, 300.0]])}
    out, tgt = paper_transforms("detection", train=False, normalize=False)(image, target)
    assert out.shape[-2:] == (500, 1000) and tgt["boxes"].tolist() == [[0.0, 0.0, 1000.0, 500.0]]
    assert paper_transforms("detection", False, False, shorter_side=600)(image, {})[0].shape[-2:] == (600, 1200)
    assert paper_transforms("detection", False, False, 600, max_side=1000)(image, {})[0].shape[-2:] == (500, 1000)
    assert paper_transforms("voc_seg", False, False)(image, {})[0].shape[-2:] == (360, 720)
    cells = expand_cells(load_experiment(1), "paper", ["rfcn", "deeplab"])
    assert {c.task: c.config["data"].get("max_side") for c in cells} == {"rfcn": 1000, "deeplab": None}
