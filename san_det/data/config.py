"""``add_dataset_config(cfg)``: config keys that register datasets, so no Python is needed."""

from detectron2.config import CfgNode as CN

__all__ = ["add_dataset_config"]


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
