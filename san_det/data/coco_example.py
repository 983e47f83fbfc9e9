"""A small COCO dataset laid out like a user's own export, drawn by the shapes renderer.

:func:`write_coco_example` writes::

    <root>/annotations/instances_train.json
    <root>/annotations/instances_val.json
    <root>/train/000000.jpg ...
    <root>/val/000000.jpg ...

with what real exports (CVAT, Label Studio, COCO itself) often have and a loader must handle:
category ids that are not ``1..K`` and a category without any annotation. The categories are
:data:`EXAMPLE_CATEGORIES`: circle (id 2), square (5), star (7, never annotated), triangle (9), so
detectron2 maps them to the classes ``circle, square, star, triangle`` (0..3) and the detector
needs ``MODEL.RETINANET.NUM_CLASSES 4``. ``tools/make_coco_example.py`` is the command line;
``configs/Demo/own_coco_example.yaml`` trains on it (README, "Train on your own COCO data").
"""

import json
import os
import shutil
from typing import Dict, Tuple

from ..utils.atomic import atomic_directory
from .shapes import DEFAULT_SPLITS, SHAPE_CLASSES, generate_shapes_dataset

__all__ = ["EXAMPLE_CATEGORIES", "write_coco_example"]

EXAMPLE_CATEGORIES = (
    {"id": 2, "name": "circle", "supercategory": "shape"},
    {"id": 5, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "star", "supercategory": "shape"},  # no image has a star
    {"id": 9, "name": "triangle", "supercategory": "shape"},
)
# shapes' category ids (1..3 in SHAPE_CLASSES order) -> the example's ids
_SHAPE_TO_EXAMPLE_ID = {
    i + 1: next(c["id"] for c in EXAMPLE_CATEGORIES if c["name"] == name)
    for i, name in enumerate(SHAPE_CLASSES)
}


def _write_split(staging: str, split: str, num_images: int, image_size: int, seed: int) -> None:
    shapes_json = generate_shapes_dataset(
        os.path.join(staging, ".shapes"),
        split,
        num_images,
        image_size,
        seed,
        negative_fraction=DEFAULT_SPLITS[split]["negative_fraction"],
    )
    os.replace(os.path.join(os.path.dirname(shapes_json), "images"), os.path.join(staging, split))
    with open(shapes_json, encoding="utf-8") as f:
        coco = json.load(f)
    coco["info"] = {"description": "san_det's own-COCO-data example (shapes)", "split": split}
    coco["categories"] = [dict(c) for c in EXAMPLE_CATEGORIES]
    for ann in coco["annotations"]:
        ann["category_id"] = _SHAPE_TO_EXAMPLE_ID[ann["category_id"]]
    with open(os.path.join(staging, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(coco, f)


def write_coco_example(
    root: str, num_train: int = 64, num_val: int = 16, image_size: int = 128, seed: int = 0
) -> Dict[str, Tuple[str, str]]:
    """Write the example under ``root`` (which must not exist or be empty).

    Written into a temporary folder next to ``root`` and renamed into place when complete.

    Returns:
        ``{"train": (json_file, image_root), "val": (json_file, image_root)}``.

    Raises:
        FileExistsError: ``root`` exists and is not empty.
        ValueError: a count or size out of range (from the shapes generator).
        OSError: ``root`` cannot be written.
    """
    root = os.path.abspath(root)
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise FileExistsError(f"{root} exists and is not an empty folder")
    counts = {"train": num_train, "val": num_val}
    with atomic_directory(root) as staging:
        os.makedirs(os.path.join(staging, "annotations"))
        for split, count in counts.items():
            _write_split(staging, split, count, image_size, seed + DEFAULT_SPLITS[split]["seed"])
        shutil.rmtree(os.path.join(staging, ".shapes"))
    return {
        split: (
            os.path.join(root, "annotations", f"instances_{split}.json"),
            os.path.join(root, split),
        )
        for split in counts
    }
