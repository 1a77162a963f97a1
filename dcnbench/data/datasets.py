"""Loaders for the paper's datasets in their standard on-disk layouts, and for the synthetic set.

Every dataset is a ``torch.utils.data.Dataset`` whose items are ``(image, target)``:

* ``image``: float tensor (3, H, W) in [0, 1] (or whatever the ``transforms`` make of it);
* ``target``: dict with ``"image_id"`` (int), ``"name"`` (file stem), ``"orig_size"`` (H, W) of the
  file and ``"size"`` (H, W) of ``image`` (they differ after resizing), and
  - segmentation: ``"mask"`` (H, W) long, class indices with 255 = ignore, and ``"orig_mask"``, the
    label file's mask before any transform (the evaluation protocol scores at its resolution);
  - detection: ``"boxes"`` (K, 4) float xyxy in pixels (pixel i spans [i, i+1)), ``"labels"``
    (K,) long in 1..C, ``"areas"`` (K,) float (mask area when known, else box area),
    ``"iscrowd"`` and ``"difficult"`` (K,) bool.

Expected layouts under ``root`` (``--data-root``):

================  ==========================================================================
VOCSegmentation   ``VOCdevkit/VOC2012/`` (or ``VOC2012/``, or root itself) with ``JPEGImages/``,
                  ``SegmentationClass/``, ``ImageSets/Segmentation/{train,val,trainval}.txt``;
                  split ``train_aug`` (SBD-augmented, 10,582 images) reads
                  ``ImageSets/Segmentation/train_aug.txt`` + ``SegmentationClassAug/``, or builds
                  the list from SBD (``SBD/dataset/`` or ``benchmark_RELEASE/dataset/`` with
                  ``train.txt``, ``val.txt``, ``cls/*.mat``) minus the VOC 2012 val images
VOCDetection      ``VOCdevkit/VOC2007/``, ``VOCdevkit/VOC2012/`` with ``JPEGImages/``,
                  ``Annotations/*.xml``, ``ImageSets/Main/{trainval,test}.txt``; image sets
                  ``"2007-trainval"``, ``"2012-trainval"``, ``"2007-test"``, or a bare split
                  (``"train"``) for a year-less VOC-style folder (the synthetic ``--layout voc``)
Cityscapes        ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
                  ``gtFine/{split}/{city}/*_gtFine_labelIds.png`` (mapped to the 19 train ids)
CocoDetection     ``annotations/instances_{split}.json`` and images in ``{split}/``,
                  ``images/{split}/`` or ``images/`` (real COCO: ``train2017``, ``val2017``)
================  ==========================================================================

The synthetic writer (:func:`dcnbench.data.write_synthetic`) produces the VOC segmentation, VOC
detection and COCO layouts, so the same classes read synthetic and real data; classes.txt in a
VOC-style folder names the classes (else the 20 VOC classes are assumed).

Every dataset's ``num_classes`` is the models' ``num_classes``: C, the classes besides label 0,
so ``build_model({"num_classes": ds.num_classes, ...})`` builds heads of C+1 outputs. Segmentation
labels are 0..C (0 = background; Cityscapes has no background, its 19 train ids 0..18 make C = 18),
detection labels 1..C.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .synthetic import SynthConfig, generate_sample

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN_ID",
    "VOC_CLASSES",
    "VOC_DET_TEST",
    "VOC_DET_TRAIN",
    "CityscapesSegmentation",
    "CocoDetection",
    "DatasetNotFoundError",
    "SyntheticDataset",
    "VOCDetection",
    "VOCSegmentation",
    "build_dataset",
    "build_train_aug_list",
    "read_image",
    "read_label",
]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
VOC_DET_TRAIN = ("2007-trainval", "2012-trainval")
VOC_DET_TEST = ("2007-test",)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)  # fmt: skip
# Cityscapes label id -> train id for the 19 evaluated classes; every other id is ignored (255).
CITYSCAPES_LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

Transforms = Callable[[Tensor, dict], tuple[Tensor, dict]] | None


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing or incomplete; the message says what is expected where."""


def read_image(path: str | Path) -> Tensor:
    """An RGB image file as a float tensor (3, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def read_label(path: str | Path) -> np.ndarray:
    """A label PNG (indexed 'P' or greyscale 'L') as its raw (H, W) uint8 indices."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: label images must be indexed or greyscale, got mode {img.mode}")
        if img.mode in ("P", "L"):
            return np.asarray(img, dtype=np.uint8).copy()
        wide = np.asarray(img)
    if wide.size and (wide.min() < 0 or wide.max() > 255):  # 16/32-bit: no silent wrap-around
        raise ValueError(f"{path}: label values must be in 0..255, got {wide.min()}..{wide.max()} (mode {img.mode})")
    return wide.astype(np.uint8)


def _find_image(directory: Path, stem: str) -> Path:
    for ext in (".jpg", ".png", ".jpeg"):
        p = directory / f"{stem}{ext}"
        if p.is_file():
            return p
    raise DatasetNotFoundError(f"image {stem}(.jpg|.png) not found in {directory}")


def _read_list(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _find_voc_dir(root: Path, year: str | None, marker: str) -> Path | None:
    """``root/VOCdevkit/VOC<year>``, ``root/VOC<year>`` or ``root`` itself: the first holding ``marker``."""
    candidates = [root] if year is None else []
    if year is not None:
        candidates = [root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}", root]
    for c in candidates:
        if (c / marker).exists():
            return c
    return None


def _finish(image: Tensor, target: dict, transforms: Transforms) -> tuple[Tensor, dict]:
    target["orig_size"] = torch.tensor(image.shape[-2:])
    target["size"] = target["orig_size"].clone()  # transforms that resize update it
    if "mask" in target:  # the label file's mask, for evaluation at its resolution (transforms replace "mask")
        target["orig_mask"] = target["mask"]
    if transforms is not None:
        image, target = transforms(image, target)
    return image, target


# ---------------------------------------------------------------------------------------------
# PASCAL VOC segmentation (with SBD)
# ---------------------------------------------------------------------------------------------

_VOC_SEG_LAYOUT = (
    "PASCAL VOC 2012 segmentation: expected <root>/VOCdevkit/VOC2012/ (or <root>/VOC2012/, or <root> "
    "itself) holding JPEGImages/<id>.jpg|.png, SegmentationClass/<id>.png and "
    "ImageSets/Segmentation/<split>.txt; split 'train_aug' also needs ImageSets/Segmentation/train_aug.txt "
    "with SegmentationClassAug/<id>.png, or SBD at <root>/SBD/dataset/ or <root>/benchmark_RELEASE/dataset/ "
    "(train.txt, val.txt, cls/<id>.mat)."
)


def _find_sbd(root: Path) -> Path | None:
    for c in (root / "SBD" / "dataset", root / "benchmark_RELEASE" / "dataset", root / "SBD", root / "sbd"):
        if (c / "cls").is_dir() and (c / "train.txt").is_file():
            return c
    return None


def build_train_aug_list(voc_dir: str | Path, sbd_dir: str | Path) -> list[str]:
    """The SBD-augmented training list: (SBD train ∪ SBD val ∪ VOC12 train) minus VOC12 val, sorted."""
    voc_dir, sbd_dir = Path(voc_dir), Path(sbd_dir)
    seg = voc_dir / "ImageSets" / "Segmentation"
    ids = set(_read_list(sbd_dir / "train.txt")) | set(_read_list(seg / "train.txt"))
    if (sbd_dir / "val.txt").is_file():
        ids |= set(_read_list(sbd_dir / "val.txt"))
    return sorted(ids - set(_read_list(seg / "val.txt")))


def _read_sbd_mat(path: Path) -> np.ndarray:
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - scipy ships with the test environment
        raise ImportError("reading SBD .mat labels needs scipy (pip install scipy)") from exc
    return np.asarray(loadmat(str(path))["GTcls"][0, 0]["Segmentation"], dtype=np.uint8)


class VOCSegmentation(Dataset):
    """PASCAL VOC 2012 semantic segmentation (background + the 20 classes, or those of classes.txt; 255 = ignore).

    ``split``: ``"train"``, ``"val"``, ``"trainval"`` or ``"train_aug"`` (SBD-augmented, the
    paper's training set).  The synthetic ``--task seg`` output is read the same way (``root`` =
    that folder, splits ``train``/``val``; its classes.txt names the classes).
    """

    def __init__(self, root: str | Path, split: str = "train", transforms: Transforms = None, year: str = "2012"):
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        voc = _find_voc_dir(self.root, year, "ImageSets/Segmentation")
        if voc is None or not (voc / "JPEGImages").is_dir():
            raise DatasetNotFoundError(f"{self.root}: no dataset found. {_VOC_SEG_LAYOUT}")
        self.voc_dir = voc
        self.sbd_dir = _find_sbd(self.root) if split == "train_aug" else None
        list_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        if list_file.is_file():
            self.ids = _read_list(list_file)
        elif split == "train_aug" and self.sbd_dir is not None:
            self.ids = build_train_aug_list(voc, self.sbd_dir)
        else:
            raise DatasetNotFoundError(f"{list_file} is missing. {_VOC_SEG_LAYOUT}")
        label_dirs = ["SegmentationClassAug", "SegmentationClass"] if split == "train_aug" else ["SegmentationClass"]
        self._label_dirs = [voc / d for d in label_dirs if (voc / d).is_dir()]
        if not self._label_dirs and self.sbd_dir is None:
            raise DatasetNotFoundError(f"{voc}: no label folder ({' or '.join(label_dirs)}). {_VOC_SEG_LAYOUT}")
        self.class_names = ("background",) + self._class_names()

    def _class_names(self) -> tuple[str, ...]:
        names = self.voc_dir / "classes.txt"
        return tuple(_read_list(names)) if names.is_file() else VOC_CLASSES

    @property
    def num_classes(self) -> int:
        """C (20 for VOC): ``class_names`` less background."""
        return len(self.class_names) - 1

    def __len__(self) -> int:
        return len(self.ids)

    def _label(self, name: str) -> np.ndarray:
        """The label of image ``name``; ValueError naming its file when it holds a value that is
        neither a class index (0..C) nor 255 (ignore): the loss would fail on it, far from the file."""
        paths = [d / f"{name}.png" for d in self._label_dirs]
        if self.sbd_dir is not None:
            paths.append(self.sbd_dir / "cls" / f"{name}.mat")
        path = next((p for p in paths if p.is_file()), None)
        if path is None:
            raise DatasetNotFoundError(f"no label for {name} in {', '.join(map(str, self._label_dirs))} or SBD cls/")
        label = _read_sbd_mat(path) if path.suffix == ".mat" else read_label(path)
        bad = (label > self.num_classes) & (label != 255)
        if bad.any():
            raise ValueError(f"{path}: label value {int(label[bad][0])} is neither a class index in 0..{self.num_classes} "
                             "nor 255 (ignore)")
        return label

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        name = self.ids[index]
        image = read_image(_find_image(self.voc_dir / "JPEGImages", name))
        mask = torch.from_numpy(self._label(name).astype(np.int64))
        if mask.shape != image.shape[-2:]:
            raise ValueError(f"{name}: label {tuple(mask.shape)} and image {tuple(image.shape[-2:])} differ in size")
        return _finish(image, {"mask": mask, "image_id": index, "name": name}, self.transforms)


# ---------------------------------------------------------------------------------------------
# PASCAL VOC detection
# ---------------------------------------------------------------------------------------------

_VOC_DET_LAYOUT = (
    "PASCAL VOC detection: expected <root>/VOCdevkit/VOC<year>/ (or <root>/VOC<year>/) holding "
    "JPEGImages/<id>.jpg, Annotations/<id>.xml and ImageSets/Main/<split>.txt, for image sets such as "
    "2007-trainval, 2012-trainval, 2007-test; a bare split name reads a year-less VOC-style <root>."
)


class VOCDetection(Dataset):
    """PASCAL VOC detection over one or more image sets (default: 07+12 trainval, the paper's training set).

    Boxes come back 0-based xyxy (VOC's 1-based inclusive ``xmin`` becomes ``xmin - 1``).
    ``keep_difficult=False`` drops difficult objects (for training); evaluate with ``True`` so the
    evaluator can ignore them.
    """

    def __init__(
        self,
        root: str | Path,
        image_sets: Sequence[str] | str = VOC_DET_TRAIN,
        transforms: Transforms = None,
        keep_difficult: bool = False,
        classes: Sequence[str] | None = None,
    ):
        self.root = Path(root)
        self.transforms = transforms
        self.keep_difficult = keep_difficult
        if isinstance(image_sets, str):
            image_sets = (image_sets,)
        self.items: list[tuple[Path, str]] = []
        voc_dirs = []
        first_year: dict[Path, tuple[str | None, str]] = {}  # folder -> (year, image set) first read from it
        for image_set in image_sets:
            year, split = image_set.split("-", 1) if "-" in image_set else (None, image_set)
            voc = _find_voc_dir(self.root, year, "Annotations")
            list_file = None if voc is None else voc / "ImageSets" / "Main" / f"{split}.txt"
            if voc is None or not list_file.is_file():
                raise DatasetNotFoundError(f"{self.root}: image set {image_set!r} not found. {_VOC_DET_LAYOUT}")
            other_year, other = first_year.setdefault(voc, (year, image_set))
            if other_year != year:  # e.g. 07+12 with root = a VOC2007 folder
                raise DatasetNotFoundError(f"{self.root}: image sets {other!r} and {image_set!r} (different years) "
                                           f"would both be read from {voc}. {_VOC_DET_LAYOUT}")
            voc_dirs.append(voc)
            self.items += [(voc, name) for name in _read_list(list_file)]
        if classes is None:
            names = voc_dirs[0] / "classes.txt"
            classes = _read_list(names) if names.is_file() else VOC_CLASSES
        self.class_names = tuple(classes)
        self._label_of = {name: k for k, name in enumerate(self.class_names, start=1)}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.items)

    def parse_annotation(self, path: Path, image_hw: tuple[int, int] | None = None) -> dict:
        """The objects of one annotation XML; VOC's 1-based inclusive pixel boxes become
        ``[xmin - 1, ymin - 1, xmax, ymax]``, clipped to the image when ``image_hw`` is given.
        ValueError naming the file for an XML that does not parse, an object without a numeric
        ``<bndbox>``, an unknown class, an inverted box or one wholly outside the image."""
        try:
            tree = ET.parse(path).getroot()
        except ET.ParseError as exc:
            raise ValueError(f"{path}: not an annotation XML ({exc})") from exc
        boxes, labels, difficult = [], [], []
        for number, obj in enumerate(tree.iter("object"), 1):
            is_difficult = obj.findtext("difficult", "0").strip() == "1"
            if is_difficult and not self.keep_difficult:
                continue
            name = obj.findtext("name", "").strip()
            if name not in self._label_of:
                raise ValueError(f"{path}: unknown class {name!r}")
            where = f"{path}: object {number} ({name})"
            try:
                xmin, ymin, xmax, ymax = (float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError) as exc:
                raise ValueError(f"{where} needs a <bndbox> of numbers xmin, ymin, xmax, ymax ({exc})") from exc
            box = [xmin - 1.0, ymin - 1.0, xmax, ymax]
            if not (np.isfinite(box).all() and xmin <= xmax and ymin <= ymax):
                raise ValueError(f"{where}: box xmin, ymin, xmax, ymax = {xmin:g}, {ymin:g}, {xmax:g}, {ymax:g} "
                                 "must be finite with xmin <= xmax and ymin <= ymax")
            if image_hw is not None:
                h, w = image_hw
                box = [min(max(box[0], 0.0), w), min(max(box[1], 0.0), h), min(box[2], w), min(box[3], h)]
                if box[2] <= box[0] or box[3] <= box[1]:
                    raise ValueError(f"{where}: box xmin, ymin, xmax, ymax = {xmin:g}, {ymin:g}, {xmax:g}, {ymax:g} "
                                     f"lies outside the {w}x{h} image")
            boxes.append(box)
            labels.append(self._label_of[name])
            difficult.append(is_difficult)
        boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": boxes_t,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "areas": (boxes_t[:, 2] - boxes_t[:, 0]) * (boxes_t[:, 3] - boxes_t[:, 1]),
            "iscrowd": torch.zeros(len(labels), dtype=torch.bool),
            "difficult": torch.tensor(difficult, dtype=torch.bool),
        }

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        voc, name = self.items[index]
        image = read_image(_find_image(voc / "JPEGImages", name))
        target = self.parse_annotation(voc / "Annotations" / f"{name}.xml", tuple(image.shape[-2:]))
        target.update(image_id=index, name=name)
        return _finish(image, target, self.transforms)


# ---------------------------------------------------------------------------------------------
# Cityscapes
# ---------------------------------------------------------------------------------------------

_CITYSCAPES_LAYOUT = (
    "Cityscapes: expected <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
    "<root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png (leftImg8bit_trainvaltest.zip "
    "and gtFine_trainvaltest.zip unpacked into <root>)."
)


class CityscapesSegmentation(Dataset):
    """Cityscapes fine annotations, 19 train classes (0..18) + ignore 255 (train 2,975 / val 500).

    ``num_classes`` is 18: no background, the 19 classes fill all C+1 score maps.
    """

    num_classes = 18
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str | Path, split: str = "train", transforms: Transforms = None):
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        image_dir = self.root / "leftImg8bit" / split
        label_dir = self.root / "gtFine" / split
        if not image_dir.is_dir() or not label_dir.is_dir():
            raise DatasetNotFoundError(f"{self.root}: split {split!r} not found. {_CITYSCAPES_LAYOUT}")
        self.items = []
        for img in sorted(image_dir.glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            label = label_dir / img.parent.name / f"{stem}_gtFine_labelIds.png"
            if not label.is_file():
                raise DatasetNotFoundError(f"{label} is missing. {_CITYSCAPES_LAYOUT}")
            self.items.append((img, label, stem))
        if not self.items:
            raise DatasetNotFoundError(f"{image_dir} holds no images. {_CITYSCAPES_LAYOUT}")
        self.lut = np.full(256, 255, dtype=np.uint8)
        for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
            self.lut[label_id] = train_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        img, label, stem = self.items[index]
        image = read_image(img)
        mask = torch.from_numpy(self.lut[read_label(label)].astype(np.int64))
        return _finish(image, {"mask": mask, "image_id": index, "name": stem}, self.transforms)


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------

_COCO_LAYOUT = (
    "COCO: expected <root>/annotations/instances_<split>.json and the images in <root>/<split>/, "
    "<root>/images/<split>/ or <root>/images/ (e.g. split train2017 / val2017)."
)


class CocoDetection(Dataset):
    """COCO-format detection through pycocotools (real COCO and the synthetic ``--task det`` output).

    Category ids map to contiguous labels 1..C in sorted id order (``label_to_category_id`` maps
    back, for results files); the image id is COCO's.  ``include_crowd=False`` drops crowd boxes and
    boxes of no area (for training); evaluate with ``True``, which keeps both as COCOeval does: it
    ignores detections on crowd regions and counts a box of no area as ground truth no detection
    matches. An annotation without a bbox or of a category the file does not list is a ValueError
    naming the file and the annotation.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train2017",
        transforms: Transforms = None,
        ann_file: str | Path | None = None,
        image_dir: str | Path | None = None,
        include_crowd: bool = False,
    ):
        from pycocotools.coco import COCO

        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.include_crowd = include_crowd
        ann = Path(ann_file) if ann_file is not None else self.root / "annotations" / f"instances_{split}.json"
        if image_dir is None:
            for c in (self.root / split, self.root / "images" / split, self.root / "images"):
                if c.is_dir():
                    image_dir = c
                    break
        if not ann.is_file() or image_dir is None or not Path(image_dir).is_dir():
            raise DatasetNotFoundError(f"{self.root}: split {split!r} not found. {_COCO_LAYOUT}")
        self.image_dir = Path(image_dir)
        self.ann_file = ann
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann))
        self.ids = sorted(self.coco.getImgIds())
        cat_ids = sorted(self.coco.getCatIds())
        self.label_to_category_id = {k: c for k, c in enumerate(cat_ids, start=1)}
        self.category_id_to_label = {c: k for k, c in self.label_to_category_id.items()}
        self.class_names = tuple(self.coco.cats[c]["name"] for c in cat_ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = read_image(self.image_dir / info["file_name"])
        boxes, labels, areas, crowd = [], [], [], []
        for a in self.coco.imgToAnns.get(image_id, []):
            where = f"{self.ann_file}: annotation {a.get('id')!r} of image {image_id}"
            if a.get("category_id") not in self.category_id_to_label:
                raise ValueError(f"{where}: category_id {a.get('category_id')!r} is none of the file's categories")
            label = self.category_id_to_label[a["category_id"]]
            try:
                x, y, w, h = (float(v) for v in a["bbox"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{where}: bbox must be [x, y, width, height], got {a.get('bbox')!r}") from exc
            if not self.include_crowd and (w <= 0 or h <= 0 or a.get("iscrowd", 0)):
                continue
            boxes.append([x, y, x + max(w, 0.0), y + max(h, 0.0)])
            labels.append(label)
            areas.append(float(a.get("area", w * h)))
            crowd.append(bool(a.get("iscrowd", 0)))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "areas": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.tensor(crowd, dtype=torch.bool),
            "difficult": torch.zeros(len(labels), dtype=torch.bool),
            "image_id": int(image_id),
            "name": Path(info["file_name"]).stem,
        }
        return _finish(image, target, self.transforms)


# ---------------------------------------------------------------------------------------------
# Synthetic, in memory
# ---------------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """The synthetic set generated on the fly: items ``start .. start + num - 1`` of ``seed``.

    Targets hold both the segmentation ``"mask"`` (0 background, 1..C) and the detection
    ``"boxes"``/``"labels"``/``"areas"`` (mask areas); the image id is the sample index, so an
    in-memory set and the one written by ``dcnbench data synth`` with the same seed agree.
    """

    def __init__(
        self,
        num: int,
        config: SynthConfig | None = None,
        seed: int = 0,
        transforms: Transforms = None,
        start: int = 0,
        cache: bool = False,
    ):
        self.num = int(num)
        self.config = config or SynthConfig()
        self.seed = seed
        self.transforms = transforms
        self.start = start
        self._cache: dict[int, dict] | None = {} if cache else None
        self.class_names = ("background",) + self.config.class_names

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def __len__(self) -> int:
        return self.num

    def sample(self, index: int) -> dict:
        """The raw numpy sample (see :func:`dcnbench.data.generate_sample`; without ``instance_map`` when cached).
        Negative indices count from the end."""
        if not -self.num <= index < self.num:
            raise IndexError(f"index {index} out of range for {self.num} samples")
        index %= self.num
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        s = generate_sample(self.start + index, self.config, self.seed)
        if self._cache is not None:  # the instance map is not needed for targets: keep the cache small
            s = {k: v for k, v in s.items() if k != "instance_map"}
            self._cache[index] = s
        return s

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        s = self.sample(index)
        image = torch.from_numpy(s["image"]).permute(2, 0, 1).float().div_(255.0)
        k = len(s["labels"])
        target = {
            "mask": torch.from_numpy(s["mask"].astype(np.int64)),
            "boxes": torch.from_numpy(s["boxes"]).clone(),
            "labels": torch.from_numpy(s["labels"]).clone(),
            "areas": torch.from_numpy(s["areas"]).float(),
            "iscrowd": torch.zeros(k, dtype=torch.bool),
            "difficult": torch.zeros(k, dtype=torch.bool),
            "image_id": s["image_id"],
            "name": f"{s['image_id']:06d}",
        }
        return _finish(image, target, self.transforms)


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------

_PAPER_KIND = {"voc_seg": "voc_seg", "cityscapes": "cityscapes", "voc_det": "detection", "coco": "detection"}


def build_dataset(
    name: str,
    root: str | Path,
    split: str,
    train: bool,
    normalize: bool = True,
    shorter_side: int | None = None,
    max_side: int | None = None,
) -> Dataset:
    """A dataset with the paper's transforms (:func:`dcnbench.data.transforms.paper_transforms`).

    ``name``: ``voc_seg`` (split e.g. ``train_aug``/``val``), ``voc_det`` (split ``07+12`` or
    ``07test`` or image sets joined by ``+`` such as ``2007-trainval+2012-trainval``),
    ``cityscapes``, ``coco`` (``train2017``/``val2017``), ``synth_seg`` (a ``--task seg`` folder),
    ``synth_det`` (a ``--task det`` COCO folder).  Synthetic data keeps its native size unless
    ``shorter_side`` says otherwise; ``max_side`` caps the longer side.  Evaluation sets (``train=False``) keep VOC's difficult and COCO's
    crowd objects, flagged, for the evaluator to ignore; training sets drop them.
    """
    from .transforms import paper_transforms

    if name in ("synth_seg", "synth_det"):
        kind, side = ("voc_seg" if name == "synth_seg" else "detection"), (shorter_side or 0)
    elif name in _PAPER_KIND:
        kind, side = _PAPER_KIND[name], shorter_side
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted([*_PAPER_KIND, 'synth_seg', 'synth_det'])}")
    tf = paper_transforms(kind, train=train, normalize=normalize, shorter_side=side, max_side=max_side)
    if name in ("voc_seg", "synth_seg"):
        return VOCSegmentation(root, split, tf)
    if name == "cityscapes":
        return CityscapesSegmentation(root, split, tf)
    if name == "voc_det":
        sets = {"07+12": VOC_DET_TRAIN, "07test": VOC_DET_TEST}.get(split, tuple(split.split("+")))
        return VOCDetection(root, sets, tf, keep_difficult=not train)
    return CocoDetection(root, split, tf, include_crowd=not train)  # evaluation ignores crowd regions
