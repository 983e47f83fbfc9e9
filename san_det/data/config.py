"""``add_dataset_config(cfg)``: config keys that register datasets, so no Python is needed;
:func:`register_config_datasets` registers them (before any check reads a dataset)."""

from detectron2.config import CfgNode as CN

from .coco_instances import register_coco_instances_from_cfg
from .image_folder import register_imagenet

__all__ = ["add_dataset_config", "register_config_datasets"]


def register_config_datasets(cfg) -> None:
    """Register the datasets that keys of ``cfg`` name: ``DATASETS.COCO_INSTANCES`` and
    ``CLASSIFICATION.IMAGENET_ROOT`` (``imagenet_train`` / ``imagenet_val`` read from there).

    Raises:
        UserInputError: a malformed ``DATASETS.COCO_INSTANCES`` entry.
    """
    register_coco_instances_from_cfg(cfg)
    root = cfg.get("CLASSIFICATION", {}).get("IMAGENET_ROOT", "")
    if root:
        register_imagenet(root)


def add_dataset_config(cfg: CN) -> CN:
    """Add the dataset keys with their defaults to ``cfg`` (in place; also returned)."""
    # Your own COCO-format datasets, each [name, json_file, image_root], registered under `name`
    # (detectron2's register_coco_instances) before the config is checked, in every process; put
    # the names in DATASETS.TRAIN / DATASETS.TEST. Paths are relative to the current directory.
    # Class names come from the json's "categories" (sorted by id; ids need not be contiguous,
    # unused categories count): MODEL.RETINANET.NUM_CLASSES must equal their number. E.g.
    # [["my_train", "data/train.json", "data/train"], ["my_val", "data/val.json", "data/val"]].
    cfg.DATASETS.COCO_INSTANCES = []
    return cfg
