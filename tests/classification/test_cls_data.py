"""ImageNet folder layout, the embedded digits set, the mapper and the loaders; bad input."""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from san_det.classification.loader import (
    ClassificationMapper,
    build_classification_test_loader,
    build_classification_train_loader,
)
from san_det.data.classification_transforms import ClassificationTransform
from san_det.data.embedded_digits import ensure_embedded_digits
from san_det.data.image_folder import (
    ClassificationDatasetError,
    CorruptImageError,
    load_image_folder,
    register_image_folder,
    register_imagenet,
)
from tests.helpers.classification import tiny_resnet_cfg


def _image_folder(root, classes, per_class=2, size=(20, 12)):
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            colour = (10 * i, 100, 200)
            Image.new("RGB", size, colour).save(os.path.join(root, c, f"{c}_{i}.JPEG"))


def test_embedded_digits_layout_and_reuse(tmp_path):
    folder = ensure_embedded_digits(str(tmp_path), image_size=12)
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["num_train"] + manifest["num_val"] == 1797  # all of sklearn's digits
    for split in ("train", "val"):
        assert sorted(os.listdir(os.path.join(folder, split))) == [str(d) for d in range(10)]
    val = load_image_folder(os.path.join(folder, "val"), os.path.join(folder, "train"))
    assert len(val) == manifest["num_val"]
    counts = np.bincount([d["label"] for d in val], minlength=10)
    assert all(abs(c - 36) <= 1 for c in counts)  # stratified 20 %
    image = Image.open(val[0]["file_name"])
    assert image.size == (12, 12)
    # Written once: a second call reuses the folder; no temporary folders are left behind.
    mtime = os.stat(os.path.join(folder, "manifest.json")).st_mtime_ns
    assert ensure_embedded_digits(str(tmp_path), image_size=12) == folder
    assert os.stat(os.path.join(folder, "manifest.json")).st_mtime_ns == mtime
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(folder)]


def test_embedded_digits_replaces_an_incomplete_folder(tmp_path):
    folder = ensure_embedded_digits(str(tmp_path), image_size=12)
    os.remove(os.path.join(folder, "manifest.json"))  # as if interrupted before completion
    os.remove(os.path.join(folder, "train", "3", sorted(os.listdir(folder + "/train/3"))[0]))
    again = ensure_embedded_digits(str(tmp_path), image_size=12)
    assert again == folder and os.path.isfile(os.path.join(folder, "manifest.json"))
    assert sum(len(files) for _, _, files in os.walk(folder)) == 1797 + 1
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(folder)]


def test_embedded_digits_bad_input(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        ensure_embedded_digits(str(tmp_path), image_size=4)
    with pytest.raises(ValueError, match="val_fraction"):
        ensure_embedded_digits(str(tmp_path), val_fraction=1.0)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ClassificationDatasetError, match="a_file"):
        ensure_embedded_digits(str(blocker / "sub"))


def test_registered_datasets(digits):
    train, val, _ = digits
    dicts = DatasetCatalog.get(val)
    assert len(dicts) == 359 and {"file_name", "label", "image_id"} <= set(dicts[0])
    meta = MetadataCatalog.get(val)
    assert meta.classes == [str(d) for d in range(10)]
    assert meta.evaluator_type == "classification"
    assert len(DatasetCatalog.get(train)) == 1797 - 359


def test_imagenet_registration_and_layout_errors(tmp_path):
    root = tmp_path / "imagenet"
    _image_folder(str(root / "train"), ["n01", "n02", "n03"])
    _image_folder(str(root / "val"), ["n01", "n02", "n03"], per_class=1)
    train, val = register_imagenet(str(root), prefix="test_inet")
    assert [d["label"] for d in DatasetCatalog.get(val)] == [0, 1, 2]
    assert len(DatasetCatalog.get(train)) == 6
    assert MetadataCatalog.get(train).classes == ["n01", "n02", "n03"]

    # Class folders that differ between train and val.
    os.rename(root / "val" / "n03", root / "val" / "n04")
    with pytest.raises(ClassificationDatasetError, match=r"differ.*missing.*n03.*not in.*n04"):
        DatasetCatalog.get(val)
    # A class folder without images.
    os.rename(root / "val" / "n04", root / "val" / "n03")
    for f in os.listdir(root / "val" / "n02"):
        os.remove(root / "val" / "n02" / f)
    with pytest.raises(ClassificationDatasetError, match=r"no images.*val/n02"):
        DatasetCatalog.get(val)
    # Missing, empty, and unsorted (flat) folders.
    register_imagenet(str(tmp_path / "nowhere"), prefix="test_missing")
    with pytest.raises(ClassificationDatasetError, match=r"not found: .*nowhere/train"):
        DatasetCatalog.get("test_missing_train")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ClassificationDatasetError, match=r"empty: .*empty"):
        load_image_folder(str(tmp_path / "empty"))
    Image.new("RGB", (4, 4)).save(tmp_path / "empty" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ClassificationDatasetError, match=r"no class folders.*valprep"):
        load_image_folder(str(tmp_path / "empty"))


def test_corrupt_image_is_named_or_skipped(tmp_path):
    _image_folder(str(tmp_path / "train"), ["a", "b"])
    bad = tmp_path / "train" / "b" / "b_1.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    dicts = load_image_folder(str(tmp_path / "train"))
    mapper = ClassificationMapper(ClassificationTransform(False, test_resize=8, test_crop_size=8))
    assert mapper(dicts[0])["image"].shape == (3, 8, 8)
    with pytest.raises(CorruptImageError, match="b_1.JPEG"):
        mapper(dicts[-1])
    skipping = ClassificationMapper(mapper.transform, skip_corrupt=True)
    assert skipping(dicts[-1]) is None
    with pytest.raises(CorruptImageError, match="not found: .*gone.JPEG"):
        mapper(dict(dicts[0], file_name=str(tmp_path / "gone.JPEG")))


def test_loaders_batch_and_cover_the_set(digits, tmp_path):
    train, val, _ = digits
    cfg = tiny_resnet_cfg(str(tmp_path), train, val)
    cfg.SOLVER.IMS_PER_BATCH = 8
    batch = next(iter(build_classification_train_loader(cfg)))
    assert len(batch) == 8
    assert all(x["image"].shape == (3, 16, 16) and x["image"].dtype == torch.uint8 for x in batch)
    cfg.CLASSIFICATION.TEST.IMS_PER_BATCH = 100
    loader = build_classification_test_loader(cfg, val)
    ids = [x["image_id"] for b in loader for x in b]
    assert sorted(ids) == list(range(359)) and len(loader) == 4
    cfg.CLASSIFICATION.NUM_CLASSES = 1000
    with pytest.raises(ClassificationDatasetError, match="10 classes but .*NUM_CLASSES is 1000"):
        build_classification_test_loader(cfg, val)
    cfg.DATASETS.TRAIN = ("no_such_set",)
    with pytest.raises(ClassificationDatasetError, match="'no_such_set' is not registered"):
        build_classification_train_loader(cfg)


def test_register_image_folder_prepare_runs_first(tmp_path):
    calls = []

    def prepare():
        calls.append(1)
        _image_folder(str(tmp_path / "made"), ["x", "y"], per_class=1)

    register_image_folder("test_prepared", str(tmp_path / "made"), prepare=prepare)
    assert not calls  # lazy
    assert len(DatasetCatalog.get("test_prepared")) == 2 and calls == [1]
