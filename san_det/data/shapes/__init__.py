"""A synthetic "shapes" detection dataset in COCO format, generated on this machine.

Circles, squares and triangles are painted onto random crops of the photographs that ship inside
scikit-image (:mod:`.render`). Generation needs no network and takes a few seconds for the default
1000 + 200 images of 128x128 pixels.

Output, per split, under ``<root>/<split>/`` (:mod:`.writer`):

- ``annotations.json``: COCO instances (``bbox`` ``[x, y, w, h]`` in absolute pixels, where pixel
  ``i`` spans ``[i, i + 1)``; ``area`` is the shape's exact area; ``segmentation`` a polygon;
  ``iscrowd`` 0; category ids 1..3 in :data:`SHAPE_CLASSES` order);
- ``images/000000.jpg`` ...: JPEG, Pillow, fixed quality, 4:4:4 chroma;
- ``manifest.json``: generator version, every parameter, the seed and the background files; a
  split whose manifest differs from what is asked is regenerated, never reused.

The same parameters and seed give byte-identical JSON and JPEG files (with the same Pillow/libjpeg).
Generation is atomic and runs once even with concurrent processes (:mod:`.generate`).

Modules: :mod:`.render` (pixels), :mod:`.options` (arguments), :mod:`.writer` (files of a split),
:mod:`.generate` (locking, staging), :mod:`.catalog` (detectron2 registration).

Datasets ``shapes_train`` (1000 images, 3% without objects) and ``shapes_val`` (200 images) are
registered in detectron2's catalogs on ``import san_det.data`` and generated lazily, the first time
``DatasetCatalog.get(name)`` or :func:`ensure_shapes_dataset` is called. detectron2's
``COCOEvaluator`` opens ``MetadataCatalog.get(name).json_file`` when constructed, so call
:func:`ensure_shapes_dataset` (or ``DatasetCatalog.get``) before building it::

    import san_det  # registers shapes_train / shapes_val
    from san_det.data import ensure_shapes_dataset
    from detectron2.evaluation import COCOEvaluator

    ensure_shapes_dataset("shapes_val")
    evaluator = COCOEvaluator("shapes_val", use_fast_impl=False)

The cache root is ``$SAN_DET_DATASETS/shapes``, else ``$DETECTRON2_DATASETS/shapes``, else
``~/.cache/san_det/datasets/shapes``; ``register_shapes_datasets(root=...)`` overrides it.
"""

from .catalog import (
    ensure_shapes_dataset,
    is_shapes_dataset,
    prepare_shapes_dataset,
    register_shapes_datasets,
)
from .generate import generate_shapes_dataset
from .options import DEFAULT_SPLITS, default_shapes_root
from .render import BACKGROUND_FILES, SHAPE_CLASSES, SHAPE_COLORS, render_shapes_image
from .writer import GENERATOR_VERSION

__all__ = [
    "GENERATOR_VERSION",
    "SHAPE_CLASSES",
    "SHAPE_COLORS",
    "BACKGROUND_FILES",
    "DEFAULT_SPLITS",
    "default_shapes_root",
    "generate_shapes_dataset",
    "prepare_shapes_dataset",
    "register_shapes_datasets",
    "ensure_shapes_dataset",
    "is_shapes_dataset",
    "render_shapes_image",
]
