"""Datasets for san_det. Importing this package registers ``shapes_train`` and ``shapes_val``.

See :mod:`san_det.data.shapes`: a synthetic COCO-format detection set generated lazily on first
use, so demos and tests train and evaluate with detectron2's COCO loader and evaluator offline.
"""

from .shapes import (
    SHAPE_CLASSES,
    default_shapes_root,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    is_shapes_dataset,
    register_shapes_datasets,
)

__all__ = [
    "SHAPE_CLASSES",
    "default_shapes_root",
    "ensure_shapes_dataset",
    "generate_shapes_dataset",
    "is_shapes_dataset",
    "register_shapes_datasets",
]

register_shapes_datasets()
