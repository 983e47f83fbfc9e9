"""The shapes datasets in detectron2's catalogs, generated on first use.

Datasets ``shapes_train`` (1000 images, 3% without objects) and ``shapes_val`` (200 images) are
registered on ``import san_det.data``, which also registers :func:`prepare_shapes_dataset` as
their preparer (:mod:`san_det.data.preparers`).
"""

import os
from typing import Dict, List, Optional, Tuple, Union

from ...errors import UserInputError
from ..preparers import register_dataset_preparer
from .generate import generate_shapes_dataset
from .options import DEFAULT_SPLITS, check_params, default_shapes_root, positive_int
from .render import SHAPE_CLASSES, SHAPE_COLORS

__all__ = [
    "ensure_shapes_dataset",
    "is_shapes_dataset",
    "prepare_shapes_dataset",
    "register_shapes_datasets",
]

# name -> generate_shapes_dataset kwargs, for datasets registered by register_shapes_datasets
_registered: Dict[str, dict] = {}


def is_shapes_dataset(name: str) -> bool:
    """Whether ``name`` was registered by :func:`register_shapes_datasets`."""
    return name in _registered


def ensure_shapes_dataset(name: str) -> str:
    """Generate the registered shapes dataset ``name`` if needed; returns its ``json_file``.

    Call it before constructing detectron2's ``COCOEvaluator`` (which opens the JSON at once).
    """
    if name not in _registered:
        raise KeyError(
            f"{name!r} is not a registered shapes dataset; registered: {sorted(_registered)}"
        )
    return generate_shapes_dataset(**_registered[name])


def _load_registered(name: str) -> List[dict]:
    from detectron2.data.datasets import load_coco_json

    json_file = ensure_shapes_dataset(name)
    return load_coco_json(json_file, os.path.join(os.path.dirname(json_file), "images"), name)


def register_shapes_datasets(
    root: Optional[str] = None,
    *,
    image_size: Union[int, Tuple[int, int]] = 128,
    num_train: Optional[int] = None,
    num_val: Optional[int] = None,
    seed: int = 0,
    prefix: str = "shapes",
    **generation_kwargs,
) -> List[str]:
    """Register ``<prefix>_train`` and ``<prefix>_val`` in detectron2's catalogs (lazily).

    Nothing is generated here: ``DatasetCatalog.get(name)`` or :func:`ensure_shapes_dataset`
    does that on first use. Registering a name again replaces the earlier registration.

    Args:
        root: cache directory; default :func:`default_shapes_root`, resolved now.
        image_size: ``int`` or ``(height, width)`` for both splits.
        num_train, num_val: image counts (default 1000 and 200, see :data:`DEFAULT_SPLITS`).
        seed: added to each split's own seed (train 0, val 1), so splits never share a seed.
        prefix: dataset name prefix.
        **generation_kwargs: more :func:`generate_shapes_dataset` keywords for both splits
            (e.g. ``max_objects``).

    Returns:
        The registered dataset names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = os.path.abspath(os.path.expanduser(root if root is not None else default_shapes_root()))
    counts = {"train": num_train, "val": num_val}
    names = []
    for split, defaults in DEFAULT_SPLITS.items():
        kwargs = dict(defaults, root=root, split=split, image_size=image_size)
        kwargs["seed"] = positive_int("seed", seed, minimum=0) + defaults["seed"]
        if counts[split] is not None:
            kwargs["num_images"] = counts[split]
        kwargs.update(generation_kwargs)
        # Fail at registration, not at first use.
        check_params(**{k: v for k, v in kwargs.items() if k != "root"})
        name = f"{prefix}_{split}"
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)
        _registered[name] = kwargs
        DatasetCatalog.register(name, lambda name=name: _load_registered(name))
        split_dir = os.path.join(root, split)
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPE_CLASSES),
            thing_colors=[list(c) for c in SHAPE_COLORS],
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPE_CLASSES))},
            json_file=os.path.join(split_dir, "annotations.json"),
            image_root=os.path.join(split_dir, "images"),
            evaluator_type="coco",
        )
        names.append(name)
    return names


def prepare_shapes_dataset(name: str) -> bool:
    """Generate ``name`` if it is a registered shapes dataset; returns whether it is one.

    Raises:
        UserInputError: it cannot be generated (e.g. an unwritable cache root; names the path).
    """
    if not is_shapes_dataset(name):
        return False
    try:
        ensure_shapes_dataset(name)
    except OSError as e:
        raise UserInputError(f"dataset {name!r} could not be generated: {e}") from None
    return True


register_dataset_preparer(prepare_shapes_dataset)
