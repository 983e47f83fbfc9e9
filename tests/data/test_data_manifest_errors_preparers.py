"""The dataset manifests, the one CorruptImageError, and the preparers datasets register."""

import json
import os

import pytest

import san_det  # noqa: F401  (patches detectron2 before it is imported)
from san_det.data.manifest import MANIFEST_FILE, manifest_matches, read_manifest, write_manifest
from san_det.data.preparers import prepare_dataset
from san_det.data.shapes import catalog, register_shapes_datasets
from san_det.errors import CorruptImageError, DatasetError, UserInputError


def test_manifest_round_trip_and_matching(tmp_path):
    assert read_manifest(str(tmp_path)) is None
    assert not manifest_matches(str(tmp_path), {"version": 1})
    write_manifest(str(tmp_path), {"version": 1, "params": {"seed": 3}, "num_images": 6})
    text = (tmp_path / MANIFEST_FILE).read_text()
    assert text == json.dumps(
        {"num_images": 6, "params": {"seed": 3}, "version": 1}, indent=1, sort_keys=True
    )
    assert read_manifest(str(tmp_path)) == {"version": 1, "params": {"seed": 3}, "num_images": 6}
    assert manifest_matches(str(tmp_path), {"version": 1, "params": {"seed": 3}})  # counts extra
    assert not manifest_matches(str(tmp_path), {"version": 2, "params": {"seed": 3}})
    assert not manifest_matches(str(tmp_path), {"version": 1, "generator": "other"})


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_an_unreadable_manifest_is_no_manifest(tmp_path, content):
    (tmp_path / MANIFEST_FILE).write_text(content)
    assert read_manifest(str(tmp_path)) is None
    assert not manifest_matches(str(tmp_path), {})


def test_one_corrupt_image_error_for_detection_and_classification():
    from san_det.classification import loader
    from san_det.data import image_folder, mapper
    from san_det.data.image_folder import ClassificationDatasetError

    assert mapper.CorruptImageError is image_folder.CorruptImageError is CorruptImageError
    assert loader.CorruptImageError is CorruptImageError  # what the classification mapper catches
    # what each of the two classes was a kind of before they became one
    assert issubclass(CorruptImageError, ClassificationDatasetError)
    assert issubclass(CorruptImageError, UserInputError)
    assert issubclass(ClassificationDatasetError, UserInputError)
    assert ClassificationDatasetError is DatasetError


def test_corrupt_images_raise_it_in_both_readers(tmp_path):
    from san_det.data.image_folder import read_image_rgb
    from san_det.data.mapper import read_image_robust

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(CorruptImageError, match="bad.jpg"):
        read_image_robust(str(bad))
    with pytest.raises(CorruptImageError, match="bad.jpg"):
        read_image_rgb(str(bad))


def test_the_shapes_preparer_is_registered_by_the_data_package(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    names = register_shapes_datasets(
        str(tmp_path / "root"), image_size=32, num_train=2, num_val=1, prefix="test_preparer"
    )
    try:
        assert prepare_dataset("test_preparer_val") is True
        assert os.path.isfile(tmp_path / "root" / "val" / "annotations.json")
        assert not os.path.exists(tmp_path / "root" / "train")  # only the one asked for
        assert prepare_dataset("coco_2017_val") is False  # not generated on demand
        register_shapes_datasets(
            str(blocker / "root"), image_size=32, num_train=2, num_val=1, prefix="test_preparer"
        )
        with pytest.raises(UserInputError, match="test_preparer_train.*a_file"):
            prepare_dataset("test_preparer_train")
    finally:
        from detectron2.data import DatasetCatalog, MetadataCatalog

        for name in names:
            DatasetCatalog.pop(name, None)
            MetadataCatalog.pop(name, None)
            catalog._registered.pop(name, None)


def test_the_engine_does_not_reach_into_the_shapes_package():
    import ast

    import san_det.engine.setup as setup

    tree = ast.parse(open(setup.__file__).read())
    imported = [
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    ] + [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    ]
    assert not [m for m in imported if "shapes" in m], imported
