"""Own COCO datasets from the config (DATASETS.COCO_INSTANCES) and the class-count checks."""

import json
from pathlib import Path

import pytest

import san_det  # noqa: F401
from detectron2.data import DatasetCatalog, MetadataCatalog

from san_det.data.coco_example import EXAMPLE_CATEGORIES, write_coco_example
from san_det.data.coco_instances import (
    is_config_coco_dataset,
    parse_coco_instances,
    register_coco_instances_from_cfg,
)
from san_det.config import setup_cfg
from san_det.detection import check_detection_classes
from san_det.engine import UserInputError

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs/Demo/shapes_retinanet.yaml")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_coco_example(str(tmp_path_factory.mktemp("coco") / "ex"), num_train=6, num_val=3)


def _cfg(tmp_path, example, *opts, names=("ex_train", "ex_val")):
    entries = [[names[0], *example["train"]], [names[1], *example["val"]]]
    return setup_cfg(
        DEMO,
        ["DATASETS.COCO_INSTANCES", repr(entries), "DATASETS.TRAIN", f"('{names[0]}',)",
         "DATASETS.TEST", f"('{names[1]}',)", "OUTPUT_DIR", str(tmp_path / "out"), *opts],
    )  # fmt: skip


def test_example_has_non_contiguous_ids_and_an_unused_category(example):
    json_file, image_root = example["train"]
    coco = json.loads(Path(json_file).read_text())
    assert [c["id"] for c in coco["categories"]] == [2, 5, 7, 9]
    used = {a["category_id"] for a in coco["annotations"]}
    assert used <= {2, 5, 9} and 7 not in used and len(used) >= 2
    assert all((Path(image_root) / im["file_name"]).is_file() for im in coco["images"])
    assert len(coco["images"]) == 6
    assert [c["name"] for c in EXAMPLE_CATEGORIES] == ["circle", "square", "star", "triangle"]


def test_example_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_coco_example(str(tmp_path / "x"), 1, 1)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_config_registers_and_detectron2_maps_the_ids(tmp_path, example):
    cfg = _cfg(tmp_path, example, "MODEL.RETINANET.NUM_CLASSES", "4")
    assert is_config_coco_dataset("ex_train") and is_config_coco_dataset("ex_val")
    classes = check_detection_classes(cfg, ["ex_train", "ex_val"])
    assert classes == {n: ["circle", "square", "star", "triangle"] for n in ("ex_train", "ex_val")}
    meta = MetadataCatalog.get("ex_train")
    assert meta.thing_dataset_id_to_contiguous_id == {2: 0, 5: 1, 7: 2, 9: 3}
    assert meta.json_file == example["train"][0] and meta.evaluator_type == "coco"
    dicts = DatasetCatalog.get("ex_train")
    labels = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert labels <= {0, 1, 3} and len(labels) >= 2  # star (2) is never a label


def test_registration_is_idempotent_and_entries_can_be_replaced(tmp_path, example):
    cfg = _cfg(tmp_path, example, "MODEL.RETINANET.NUM_CLASSES", "4")
    assert register_coco_instances_from_cfg(cfg) == ["ex_train", "ex_val"]  # again: no error
    _cfg(tmp_path, example, names=("ex_val", "ex_train"))  # other files under each name
    assert MetadataCatalog.get("ex_train").json_file == example["val"][0]


@pytest.mark.parametrize(
    "entries, fragment",
    [
        ([["a", "b"]], "three non-empty strings"),
        ([["a", "", "c"]], "three non-empty strings"),
        ([["a", "b.json", "c"], ["a", "d.json", "e"]], "appears twice"),
        ("not a list of lists", "three non-empty strings"),
    ],
)
def test_malformed_entries(entries, fragment):
    with pytest.raises(UserInputError, match=fragment):
        parse_coco_instances(entries)


def test_a_built_in_name_is_refused(tmp_path, example):
    with pytest.raises(UserInputError, match="'shapes_val' is already registered"):
        _cfg(tmp_path, example, names=("ex_train", "shapes_val"))


@pytest.mark.parametrize("num_classes", [3, 5, 80])
def test_num_classes_mismatch_names_both_numbers(tmp_path, example, num_classes):
    cfg = _cfg(tmp_path, example, "MODEL.RETINANET.NUM_CLASSES", str(num_classes))
    with pytest.raises(UserInputError) as info:
        check_detection_classes(cfg, ["ex_train", "ex_val"])
    message = str(info.value)
    assert f"MODEL.RETINANET.NUM_CLASSES is {num_classes}" in message
    assert "has 4 categories" in message and "set MODEL.RETINANET.NUM_CLASSES 4" in message
    assert "\n" not in message


def test_train_and_test_sets_with_other_categories(tmp_path, example):
    """Whatever NUM_CLASSES says, one message naming each dataset with its count (checking the
    count first sent the user back and forth between the two)."""
    cfg = setup_cfg(
        DEMO,
        ["DATASETS.COCO_INSTANCES", repr([["ex_train", *example["train"]]]),
         "DATASETS.TRAIN", "('ex_train',)", "DATASETS.TEST", "('shapes_val',)",
         "MODEL.RETINANET.NUM_CLASSES", "4", "OUTPUT_DIR", str(tmp_path / "o")],
    )  # fmt: skip
    expected = (
        "'ex_train' has 4 (circle, square, star, triangle); 'shapes_val' has 3 (circle, square, "
        "triangle)"
    )
    with pytest.raises(UserInputError, match="different categories") as info:
        check_detection_classes(cfg, ["ex_train", "shapes_val"])
    assert expected in str(info.value)
    cfg.defrost()
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    with pytest.raises(UserInputError, match="different categories") as info:
        check_detection_classes(cfg, ["ex_train", "shapes_val"])
    assert expected in str(info.value)


def test_same_count_other_names_is_refused(tmp_path, example):
    renamed = tmp_path / "renamed.json"
    coco = json.loads(Path(example["val"][0]).read_text())
    coco["categories"][2]["name"] = "hexagon"
    renamed.write_text(json.dumps(coco))
    cfg = setup_cfg(
        DEMO,
        ["DATASETS.COCO_INSTANCES",
         repr([["ex_train", *example["train"]], ["ex_other", str(renamed), example["val"][1]]]),
         "MODEL.RETINANET.NUM_CLASSES", "4", "OUTPUT_DIR", str(tmp_path / "o")],
    )  # fmt: skip
    with pytest.raises(UserInputError, match="different categories.*hexagon"):
        check_detection_classes(cfg, ["ex_train", "ex_other"])


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "is not a valid COCO instances file"),
        (json.dumps({"images": [], "annotations": []}), "is not a valid COCO instances file"),
    ],
)
def test_a_broken_json_is_one_line_naming_the_file(tmp_path, example, content, fragment):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    cfg = setup_cfg(
        DEMO,
        ["DATASETS.COCO_INSTANCES", repr([["ex_bad", str(bad), example["val"][1]]]),
         "OUTPUT_DIR", str(tmp_path / "o")],
    )  # fmt: skip
    with pytest.raises(UserInputError) as info:
        check_detection_classes(cfg, ["ex_bad"])
    assert fragment in str(info.value) and str(bad) in str(info.value)
    assert "\n" not in str(info.value)
