"""Datasets for san_det. Importing this package registers ``shapes_train`` and ``shapes_val``.

See :mod:`san_det.data.shapes`: a synthetic COCO-format detection set generated lazily on first
use, so demos and tests train and evaluate with detectron2's COCO loader and evaluator offline.
Your own COCO-format datasets are named in the config (``DATASETS.COCO_INSTANCES``, see
:mod:`san_det.data.coco_instances`). A dataset generated on demand registers its preparer here
(:mod:`san_det.data.preparers`), which the engine runs before training.

Classification data (ImageNet's folder layout, the embedded digits set, the transforms) lives in
:mod:`.image_folder`, :mod:`.embedded_digits` and :mod:`.classification_transforms`; importing
:mod:`san_det.classification` registers those datasets.
"""

from .coco_instances import (
    is_config_coco_dataset,
    load_config_coco_dataset,
    register_coco_instances_from_cfg,
)
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
    "is_config_coco_dataset",
    "is_shapes_dataset",
    "load_config_coco_dataset",
    "register_coco_instances_from_cfg",
    "register_shapes_datasets",
]

register_shapes_datasets()
