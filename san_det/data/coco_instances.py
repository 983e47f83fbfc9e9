"""COCO-format datasets named in the config (``DATASETS.COCO_INSTANCES``), registered by name.

Each entry ``[name, json_file, image_root]`` is registered with detectron2's
``register_coco_instances``, so ``load_coco_json`` reads it: category ids need not be contiguous
(they are mapped to ``0..K-1`` in id order), categories without annotations still count, and
``MetadataCatalog.get(name).thing_classes`` (set when the dataset is loaded) holds the category
names for the evaluator, the visualizer and the logs::

    DATASETS:
      COCO_INSTANCES: [["my_train", "data/annotations/train.json", "data/train"],
                       ["my_val", "data/annotations/val.json", "data/val"]]
      TRAIN: ("my_train",)
      TEST: ("my_val",)

:func:`register_coco_instances_from_cfg` runs wherever the config is built
(:func:`san_det.engine.setup_cfg`: the launching process and every worker), so multi-process
runs, ``--eval-only`` and ``--resume`` (whose ``config.yaml`` holds the entries) see the same
datasets. A name may be registered again with other files (the entry replaces the earlier one),
but not a name that something else registered (``coco_2017_train``, ``shapes_val``...).
"""

import logging
from typing import Dict, List, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..errors import UserInputError

__all__ = [
    "is_config_coco_dataset",
    "load_config_coco_dataset",
    "parse_coco_instances",
    "register_coco_instances_from_cfg",
]

logger = logging.getLogger(__name__)

_KEY = "DATASETS.COCO_INSTANCES"
_registered: Dict[str, Tuple[str, str]] = {}


def parse_coco_instances(entries: Sequence) -> List[Tuple[str, str, str]]:
    """``[[name, json_file, image_root], ...]`` -> list of string triples.

    Raises:
        UserInputError: an entry is not three non-empty strings, or a name appears twice.
    """
    out, seen = [], set()
    for entry in entries:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 3
            or not all(isinstance(x, str) and x for x in entry)
        ):
            raise UserInputError(
                f"{_KEY}: each entry must be [name, json_file, image_root] (three non-empty "
                f"strings), got {entry!r}"
            )
        if entry[0] in seen:
            raise UserInputError(f"{_KEY}: dataset name {entry[0]!r} appears twice")
        seen.add(entry[0])
        out.append(tuple(entry))
    return out


def is_config_coco_dataset(name: str) -> bool:
    """Whether ``name`` was registered from ``DATASETS.COCO_INSTANCES``."""
    return name in _registered


def register_coco_instances_from_cfg(cfg) -> List[str]:
    """Register every ``cfg.DATASETS.COCO_INSTANCES`` entry (nothing is read yet).

    Returns:
        The names of the entries.

    Raises:
        UserInputError: a malformed entry, or a name registered by something else.
    """
    names = []
    for name, json_file, image_root in parse_coco_instances(cfg.DATASETS.get("COCO_INSTANCES", [])):
        names.append(name)
        if _registered.get(name) == (json_file, image_root) and name in DatasetCatalog.list():
            continue
        if name in DatasetCatalog.list() and name not in _registered:
            raise UserInputError(
                f"{_KEY}: dataset name {name!r} is already registered (a built-in or embedded "
                "dataset): give your dataset another name"
            )
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_root)
        _registered[name] = (json_file, image_root)
    return names


def load_config_coco_dataset(name: str) -> List[dict]:
    """``DatasetCatalog.get(name)`` for a config COCO dataset; sets ``thing_classes``.

    Raises:
        UserInputError: the json cannot be read or is not COCO instances (names the file).
    """
    json_file, _ = _registered[name]
    try:
        return DatasetCatalog.get(name)
    except OSError as e:
        raise UserInputError(f"dataset {name!r}: cannot read {json_file}: {e.strerror or e}") from e
    except (ValueError, KeyError, TypeError, AssertionError, IndexError) as e:
        what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise UserInputError(
            f"dataset {name!r}: {json_file} is not a valid COCO instances file ({what})"
        ) from e
