"""Arguments of the shapes generator: defaults, the cache root and the checks.

:func:`check_params` turns the arguments into the validated parameters that the manifest stores,
so a check fails before anything is written and equal parameters always compare equal.
"""

import os
import re
from typing import Tuple

import numpy as np

__all__ = ["DEFAULT_SPLITS", "check_params", "default_shapes_root", "positive_int"]

# Registered splits: name suffix -> generation arguments (image_size and root come from
# register_shapes_datasets, whose ``seed`` is added to these). Splits use different seeds.
DEFAULT_SPLITS = {
    "train": dict(num_images=1000, seed=0, negative_fraction=0.03),
    "val": dict(num_images=200, seed=1, negative_fraction=0.0),
}

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

_OPTION_DEFAULTS = dict(
    min_size=None,
    max_size=None,
    min_objects=1,
    max_objects=6,
    negative_fraction=0.0,
    max_overlap=0.3,
    jpeg_quality=90,
)


def default_shapes_root() -> str:
    """``$SAN_DET_DATASETS/shapes``, else ``$DETECTRON2_DATASETS/shapes``, else
    ``~/.cache/san_det/datasets/shapes``."""
    for variable in ("SAN_DET_DATASETS", "DETECTRON2_DATASETS"):
        value = os.environ.get(variable)
        if value:
            return os.path.join(os.path.expanduser(value), "shapes")
    return os.path.join(os.path.expanduser("~"), ".cache", "san_det", "datasets", "shapes")


def positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an ``int`` >= ``minimum``; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_image_size(image_size) -> Tuple[int, int]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    return (
        positive_int("image_size (height)", image_size[0]),
        positive_int("image_size (width)", image_size[1]),
    )


def _check_shape_sizes(min_size, max_size, shorter: int) -> Tuple[int, int]:
    """The range of shape diameters, by default 12% to 45% of the image's shorter side."""
    if min_size is None:
        min_size = max(8, round(0.12 * shorter))
    if max_size is None:
        max_size = max(min_size, round(0.45 * shorter))
    min_size = positive_int("min_size", min_size)
    max_size = positive_int("max_size", max_size)
    if max_size < min_size:
        raise ValueError(f"max_size must be >= min_size ({min_size}), got {max_size}")
    if max_size > shorter:
        raise ValueError(
            f"max_size must be <= the image's shorter side ({shorter}), got {max_size}"
        )
    return min_size, max_size


def _check_fraction(name: str, value) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


def check_params(split: str, num_images, image_size, seed, **options) -> dict:
    """Validated generation parameters, as stored in the manifest."""
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS))
    if unknown:
        raise TypeError(
            f"unknown shapes dataset option(s) {unknown}; known: {list(_OPTION_DEFAULTS)}"
        )
    options = dict(_OPTION_DEFAULTS, **options)
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
        raise ValueError(
            f"split must be a non-empty name of letters, digits, '_' or '-', got {split!r}"
        )
    num_images = positive_int("num_images", num_images)
    height, width = _check_image_size(image_size)
    seed = positive_int("seed", seed, minimum=0)
    options["min_size"], options["max_size"] = _check_shape_sizes(
        options["min_size"], options["max_size"], min(height, width)
    )
    for name in ("min_objects", "max_objects"):
        options[name] = positive_int(name, options[name])
    if options["max_objects"] < options["min_objects"]:
        raise ValueError(
            f"max_objects must be >= min_objects ({options['min_objects']}), "
            f"got {options['max_objects']}"
        )
    for name in ("negative_fraction", "max_overlap"):
        options[name] = _check_fraction(name, options[name])
    options["jpeg_quality"] = positive_int("jpeg_quality", options["jpeg_quality"])
    if options["jpeg_quality"] > 100:
        raise ValueError(f"jpeg_quality must lie in [1, 100], got {options['jpeg_quality']}")
    return dict(split=split, num_images=num_images, image_size=[height, width], seed=seed, **options)
