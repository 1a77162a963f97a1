"""Loaders on tiny fixture datasets written on the fly in each real format, and the transforms."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcnbench.data import (
    VOC_CLASSES,
    CityscapesSegmentation,
    CocoDetection,
    DatasetNotFoundError,
    SynthConfig,
    SyntheticDataset,
    VOCDetection,
    VOCSegmentation,
    build_dataset,
    build_train_aug_list,
    collate_detection,
    collate_segmentation,
    paper_transforms,
    write_synthetic,
)
from dcnbench.data.synthetic import voc_palette
from dcnbench.data.transforms import Compose, RandomHorizontalFlip, ResizeShorterSide, hflip


def _rgb(path: Path, h: int, w: int, seed: int, fmt: str = "PNG") -> np.ndarray:
    array = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return array


def _label_png(path: Path, label: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8), mode="L")
    if palette:
        img = img.convert("P")
        img.putpalette(voc_palette())
    img.save(path)


# ---------------------------------------------------------------------------------------------
# PASCAL VOC segmentation + SBD
# ---------------------------------------------------------------------------------------------


def _voc_seg_fixture(root: Path) -> dict[str, np.ndarray]:
    from scipy.io import savemat

    voc = root / "VOCdevkit" / "VOC2012"
    labels = {}
    for k, name in enumerate(["2007_000001", "2007_000002", "2008_000003", "2008_000004"]):
        _rgb(voc / "JPEGImages" / f"{name}.jpg", 10, 12, k, "JPEG")
        lab = np.zeros((10, 12), np.uint8)
        lab[2:6, 3:9] = k + 1
        lab[1, :] = 255
        labels[name] = lab
    _label_png(voc / "SegmentationClass" / "2007_000001.png", labels["2007_000001"], palette=True)
    _label_png(voc / "SegmentationClass" / "2007_000002.png", labels["2007_000002"], palette=True)
    _label_png(voc / "SegmentationClassAug" / "2008_000003.png", labels["2008_000003"], palette=False)
    seg = voc / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (seg / "train.txt").write_text("2007_000001\n")
    (seg / "val.txt").write_text("2007_000002\n")
    sbd = root / "SBD" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "train.txt").write_text("2008_000003\n2007_000002\n")  # 2007_000002 is VOC val: excluded
    (sbd / "val.txt").write_text("2008_000004\n")
    savemat(str(sbd / "cls" / "2008_000004.mat"), {"GTcls": {"Segmentation": labels["2008_000004"]}})
    return labels


def test_voc_segmentation_splits_and_sbd(tmp_path):
    labels = _voc_seg_fixture(tmp_path)
    train = VOCSegmentation(tmp_path, "train")
    img, tgt = train[0]
    assert img.shape == (3, 10, 12) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert tgt["mask"].dtype == torch.long
    np.testing.assert_array_equal(tgt["mask"].numpy(), labels["2007_000001"])  # palette indices, 255 kept
    assert len(VOCSegmentation(tmp_path, "val")) == 1
    assert train.num_classes == 20 and len(train.class_names) == 21  # background + the 20 VOC classes

    aug = VOCSegmentation(tmp_path, "train_aug")
    assert aug.ids == ["2007_000001", "2008_000003", "2008_000004"]
    for k, name in enumerate(aug.ids):
        _, tgt = aug[k]
        assert tgt["name"] == name
        np.testing.assert_array_equal(tgt["mask"].numpy(), labels[name])  # VOC png, Aug png, SBD .mat
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    assert build_train_aug_list(voc, tmp_path / "SBD" / "dataset") == aug.ids
    # An explicit train_aug.txt wins over building the list.
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2008_000003\n")
    assert VOCSegmentation(tmp_path, "train_aug").ids == ["2008_000003"]


def test_num_classes_is_the_models_c_for_every_loader(tmp_path):
    """classes.txt is read; num_classes counts the classes besides label 0 (the models' C)."""
    from dcnbench.models import build_model

    cfg = SynthConfig(size=32, num_classes=3, min_size=6, max_size=16)
    for task, layout in (("seg", None), ("det", "voc"), ("det", "coco")):
        write_synthetic(tmp_path / f"{task}-{layout}", task, 4, config=cfg, seed=1, val_fraction=0.5, layout=layout)
    datasets = [VOCSegmentation(tmp_path / "seg-None", "train"), VOCDetection(tmp_path / "det-voc", "train"),
                CocoDetection(tmp_path / "det-coco", "train"), SyntheticDataset(4, cfg)]
    assert [ds.num_classes for ds in datasets] == [3, 3, 3, 3]
    model = build_model({"task": "deeplab", "backbone": "scaled", "blocks": [1, 1, 1, 1], "width": 4,
                         "placement": "none", "num_classes": datasets[0].num_classes})
    assert model.score.out_channels == len(datasets[0].class_names) == 4


def test_missing_datasets_say_what_is_expected(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="VOCdevkit/VOC2012.*SegmentationClass"):
        VOCSegmentation(tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match="Annotations"):
        VOCDetection(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="gtFine_labelIds"):
        CityscapesSegmentation(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="instances_"):
        CocoDetection(tmp_path, "val2017")
    _voc_seg_fixture(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="trainval.txt is missing"):
        VOCSegmentation(tmp_path, "trainval")


# ---------------------------------------------------------------------------------------------
# PASCAL VOC detection
# ---------------------------------------------------------------------------------------------


def _xml(objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    body = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    return f"<annotation><size><width>20</width><height>16</height></size>{body}</annotation>"


def _voc_det_fixture(root: Path) -> None:
    for year, sets in (("2007", {"trainval": ["000001"], "test": ["000002"]}), ("2012", {"trainval": ["2012_000001", "2012_000002"]})):
        voc = root / "VOCdevkit" / f"VOC{year}"
        (voc / "Annotations").mkdir(parents=True)
        (voc / "ImageSets" / "Main").mkdir(parents=True)
        for split, names in sets.items():
            (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(n + "\n" for n in names))
            for k, name in enumerate(names):
                _rgb(voc / "JPEGImages" / f"{name}.jpg", 16, 20, k, "JPEG")
                objs = [("dog", (1, 2, 10, 12), 0), ("person", (5, 5, 20, 16), 1), ("tvmonitor", (3, 4, 6, 8), 0)]
                (voc / "Annotations" / f"{name}.xml").write_text(_xml(objs))


def test_voc_detection_07_12(tmp_path):
    _voc_det_fixture(tmp_path)
    train = VOCDetection(tmp_path)  # 07+12 trainval
    assert len(train) == 3 and train.num_classes == 20
    img, tgt = train[0]
    assert img.shape == (3, 16, 20)
    # 1-based inclusive VOC corners -> 0-based xyxy; difficult dropped for training.
    torch.testing.assert_close(tgt["boxes"], torch.tensor([[0.0, 1.0, 10.0, 12.0], [2.0, 3.0, 6.0, 8.0]]))
    assert tgt["labels"].tolist() == [VOC_CLASSES.index("dog") + 1, 20]
    test = VOCDetection(tmp_path, "2007-test", keep_difficult=True)
    _, tgt = test[0]
    assert len(test) == 1 and tgt["difficult"].tolist() == [False, True, False]
    torch.testing.assert_close(tgt["areas"], torch.tensor([110.0, 192.0, 20.0]))  # (xmax - xmin + 1) * (ymax - ymin + 1)
    ds = build_dataset("voc_det", tmp_path, "07test", train=False, normalize=False)
    img, tgt = ds[0]
    assert min(img.shape[-2:]) == 600 and tgt["difficult"].sum() == 1
    torch.testing.assert_close(tgt["boxes"][0], torch.tensor([0.0, 1.0, 10.0, 12.0]) * 600 / 16)


@pytest.mark.parametrize("annotation,error", [
    ("<annotation><object><name>dog</name></object></annotation>", r"object 1 \(dog\) needs a <bndbox> of numbers"),
    (_xml([("dog", (1, 2, "", 12), 0)]), r"object 1 \(dog\) needs a <bndbox> of numbers"),
    (_xml([("dog", (1, 2, "a", 12), 0)]), r"object 1 \(dog\) needs a <bndbox> of numbers"),
    (_xml([("dog", (1, 2, 10, 12), 0), ("cat", (10, 8, 3, 2), 0)]),
     r"object 2 \(cat\): box xmin, ymin, xmax, ymax = 10, 8, 3, 2 must be finite with xmin <= xmax"),
    (_xml([("dog", (30, 2, 40, 12), 0)]), r"object 1 \(dog\): box .* lies outside the 20x16 image"),
    ("", r"not an annotation XML"),
])
def test_a_malformed_voc_annotation_is_refused_naming_its_file(tmp_path, annotation, error):
    """Before: AttributeError/TypeError/ParseError naming no file, and an inverted box came back
    with a positive area (two negative sides) that no detection could match."""
    _voc_det_fixture(tmp_path)
    xml = tmp_path / "VOCdevkit" / "VOC2007" / "Annotations" / "000002.xml"
    xml.write_text(annotation)
    with pytest.raises(ValueError, match=f"{xml}: {error}"):
        VOCDetection(tmp_path, "2007-test")[0]


def test_a_voc_box_reaching_past_the_image_is_clipped_to_it(tmp_path):
    _voc_det_fixture(tmp_path)
    xml = tmp_path / "VOCdevkit" / "VOC2007" / "Annotations" / "000002.xml"
    xml.write_text(_xml([("dog", (0, -3, 50, 12), 0)]))  # the image is 20 wide and 16 high
    _, target = VOCDetection(tmp_path, "2007-test")[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.0, 20.0, 12.0]]))
    assert target["areas"].tolist() == [240.0]


def test_a_segmentation_label_outside_the_classes_is_refused_naming_its_file(tmp_path):
    """A label value neither 0..C nor 255 passed the loader and failed in the loss (IndexError;
    a device-side assert on CUDA), naming no file."""
    labels = _voc_seg_fixture(tmp_path)
    bad = labels["2007_000002"].copy()
    bad[5, 5] = 42
    path = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000002.png"
    _label_png(path, bad, palette=False)
    with pytest.raises(ValueError, match=f"{path}: label value 42 is neither a class index in 0..20 nor 255"):
        VOCSegmentation(tmp_path, "val")[0]


# ---------------------------------------------------------------------------------------------
# Cityscapes
# ---------------------------------------------------------------------------------------------


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    for split, city in (("train", "aachen"), ("val", "lindau")):
        stem = f"{city}_000000_000019"
        _rgb(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 4, 8, 0)
        ids = np.array([[7, 8, 11, 12, 13, 17, 19, 20], [21, 22, 23, 24, 25, 26, 27, 28],
                        [31, 32, 33, 0, 1, 6, 9, 10], [14, 15, 16, 18, 29, 30, 34, 255]], np.uint8)
        _label_png(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids, palette=False)
        (tmp_path / "gtFine" / split / city / f"{stem}_gtFine_color.png").write_bytes(b"")  # ignored
    ds = CityscapesSegmentation(tmp_path, "val")
    assert len(ds) == 1 and ds.num_classes == 18 and len(ds.class_names) == 19  # labels 0..C, no background
    _, tgt = ds[0]
    expected = list(range(19)) + [255] * 13
    assert tgt["mask"].flatten().tolist() == expected
    assert tgt["name"] == "lindau_000000_000019"


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------


def test_coco_detection(tmp_path):
    _rgb(tmp_path / "val2017" / "000000000139.jpg", 12, 14, 0, "JPEG")
    _rgb(tmp_path / "val2017" / "000000000285.jpg", 10, 10, 1, "JPEG")
    doc = {
        "images": [{"id": 139, "file_name": "000000000139.jpg", "width": 14, "height": 12},
                   {"id": 285, "file_name": "000000000285.jpg", "width": 10, "height": 10}],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}],
        "annotations": [
            {"id": 1, "image_id": 139, "category_id": 90, "bbox": [1, 2, 3, 4], "area": 9.5, "iscrowd": 0},
            {"id": 2, "image_id": 139, "category_id": 5, "bbox": [0, 0, 14, 12], "area": 100.0, "iscrowd": 1},
            {"id": 3, "image_id": 139, "category_id": 1, "bbox": [2.5, 1, 4, 0], "area": 0.0, "iscrowd": 0},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    ds = CocoDetection(tmp_path, "val2017")
    assert len(ds) == 2 and ds.class_names == ("person", "airplane", "toothbrush")
    assert ds.label_to_category_id == {1: 1, 2: 5, 3: 90}
    img, tgt = ds[0]
    assert img.shape == (3, 12, 14) and tgt["image_id"] == 139
    torch.testing.assert_close(tgt["boxes"], torch.tensor([[1.0, 2.0, 4.0, 6.0]]))  # crowd and empty box dropped
    assert tgt["labels"].tolist() == [3] and tgt["areas"].tolist() == [9.5]
    # Evaluation keeps the crowd box and the box of no area, as COCOeval does (it counts the latter
    # as ground truth no detection matches; dropping it inflated mAP against pycocotools).
    _, tgt = CocoDetection(tmp_path, "val2017", include_crowd=True)[0]
    assert tgt["iscrowd"].tolist() == [False, True, False] and tgt["areas"].tolist() == [9.5, 100.0, 0.0]
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    path = tmp_path / "annotations" / "instances_val2017.json"
    for annotation, error in (({"category_id": 1}, r"annotation 4 of image 285: bbox must be \[x, y, width, height\], got None"),
                              ({"category_id": 3, "bbox": [1, 1, 2, 2]}, "annotation 4 of image 285: category_id 3 is none")):
        path.write_text(json.dumps({**doc, "annotations": doc["annotations"] + [{"id": 4, "image_id": 285, **annotation}]}))
        with pytest.raises(ValueError, match=f"{path}: {error}"):
            CocoDetection(tmp_path, "val2017")[1]


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


def test_resize_and_flip_keep_image_mask_boxes_aligned():
    image = torch.zeros(3, 20, 40)
    image[:, 5:10, 8:20] = 1.0
    mask = torch.zeros(20, 40, dtype=torch.long)
    mask[5:10, 8:20] = 3
    mask[0, 0] = 255
    target = {"mask": mask, "boxes": torch.tensor([[8.0, 5.0, 20.0, 10.0]]), "areas": torch.tensor([60.0])}
    img2, t2 = ResizeShorterSide(40)(image, target)
    assert img2.shape == (3, 40, 80) and t2["mask"].shape == (40, 80)
    assert set(t2["mask"].unique().tolist()) == {0, 3, 255}  # nearest: no new labels
    torch.testing.assert_close(t2["boxes"], torch.tensor([[16.0, 10.0, 40.0, 20.0]]))
    assert t2["areas"].item() == 240.0
    ys, xs = torch.nonzero(t2["mask"] == 3, as_tuple=True)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (16, 10, 40, 20)

    img3, t3 = hflip(img2, t2)
    ys, xs = torch.nonzero(t3["mask"] == 3, as_tuple=True)
    torch.testing.assert_close(t3["boxes"], torch.tensor([[xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0]]))
    img4, t4 = hflip(img3, t3)
    torch.testing.assert_close(img4, img2)
    torch.testing.assert_close(t4["boxes"], t2["boxes"])

    always = RandomHorizontalFlip(1.0)(image, target)
    never = RandomHorizontalFlip(0.0)(image, target)
    torch.testing.assert_close(always[0], image.flip(-1))
    torch.testing.assert_close(never[0], image)


def test_paper_transforms_sizes_and_collation():
    image = torch.rand(3, 50, 80)
    target = {"mask": torch.zeros(50, 80, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    for kind, side in (("voc_seg", 360), ("cityscapes", 1024), ("detection", 600)):
        out, _ = paper_transforms(kind, train=True)(image, target)
        assert min(out.shape[-2:]) == side
    eval_tf = paper_transforms("voc_seg", train=False, normalize=False)
    assert not any(isinstance(t, RandomHorizontalFlip) for t in eval_tf.transforms)
    assert isinstance(paper_transforms("detection", train=False, shorter_side=0), Compose)
    batch = [(torch.ones(3, 4, 5), {"mask": torch.ones(4, 5, dtype=torch.long)}),
             (torch.ones(3, 6, 3), {"mask": torch.ones(6, 3, dtype=torch.long)})]
    images, masks = collate_segmentation(batch)
    assert images.shape == (2, 3, 6, 5) and masks[0, 5, 0] == 255 and masks[1, 0, 4] == 255 and masks[1, 5, 2] == 1
    imgs, tgts = collate_detection(batch)
    assert len(imgs) == 2 and tgts[1]["mask"].shape == (6, 3)


def test_an_unknown_dataset_name_lists_the_known_ones(tmp_path):
    """build_dataset("synthetic") said only "unknown dataset 'synthetic'"; the error lists the names
    it takes (synthetic data from a folder is synth_seg / synth_det)."""
    with pytest.raises(ValueError, match=r"unknown dataset 'synthetic'; known: \['cityscapes', 'coco', 'synth_det', "
                                         r"'synth_seg', 'voc_det', 'voc_seg'\]"):
        build_dataset("synthetic", tmp_path, "train", train=True)
