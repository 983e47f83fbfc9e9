"""The files of one split: JPEG images, the COCO ``annotations.json`` and the manifest.

The same parameters and seed give byte-identical JSON and JPEG files (with the same Pillow/libjpeg).
Each image draws from its own random stream ``numpy.random.default_rng([seed, index])``.
"""

import json
import logging
import os
import time
from typing import List, Tuple

import numpy as np
from PIL import Image

from ..manifest import manifest_matches, read_manifest, write_manifest
from .render import BACKGROUND_FILES, SHAPE_CLASSES, ShapeInstance, render_shapes_image

__all__ = ["GENERATOR_VERSION", "expected_manifest", "is_complete", "write_split"]

logger = logging.getLogger(__name__)

# Bump whenever the pixels or the JSON a given seed produces change: existing caches regenerate.
GENERATOR_VERSION = 1


def expected_manifest(params: dict) -> dict:
    """What the manifest of a split generated with ``params`` (see ``check_params``) holds."""
    import skimage

    return {
        "generator": "san_det.data.shapes",
        "version": GENERATOR_VERSION,
        "params": params,
        "classes": list(SHAPE_CLASSES),
        "backgrounds": {"scikit-image": skimage.__version__, "files": list(BACKGROUND_FILES)},
    }


def is_complete(split_dir: str, expected: dict) -> bool:
    """Whether ``split_dir`` holds a finished generation with exactly the ``expected`` manifest."""
    if not manifest_matches(split_dir, expected):
        return False
    images = os.path.join(split_dir, "images")
    return (
        os.path.isfile(os.path.join(split_dir, "annotations.json"))
        and os.path.isdir(images)
        and len(os.listdir(images)) == read_manifest(split_dir).get("num_images")
    )


def _annotations(shapes: List[ShapeInstance], image_id: int, first_id: int) -> List[dict]:
    """COCO annotations of one image's shapes, numbered from ``first_id``."""
    annotations = []
    for shape in shapes:
        x0, y0, x1, y1 = (round(v, 2) for v in shape.bbox)  # corners first: x + w == x1
        annotations.append(
            {
                "id": first_id + len(annotations),
                "image_id": image_id,
                "category_id": shape.category + 1,
                "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                "area": round(shape.area, 2),
                "segmentation": [[round(float(v), 2) for v in shape.polygon.reshape(-1)]],
                "iscrowd": 0,
            }
        )
    return annotations


def _render_image(params: dict, index: int, negative: bool) -> Tuple[np.ndarray, list]:
    rng = np.random.default_rng([params["seed"], index])
    count = 0 if negative else int(rng.integers(params["min_objects"], params["max_objects"] + 1))
    return render_shapes_image(
        rng,
        tuple(params["image_size"]),
        count,
        params["min_size"],
        params["max_size"],
        params["max_overlap"],
    )


def _write_images(image_dir: str, params: dict) -> Tuple[List[dict], List[dict]]:
    """Render and save every image; returns the COCO ``images`` and ``annotations``."""
    height, width = params["image_size"]
    num_images = params["num_images"]
    num_negatives = round(params["negative_fraction"] * num_images)
    split_rng = np.random.default_rng([params["seed"], num_images, 1 << 32])
    negatives = set(split_rng.choice(num_images, size=num_negatives, replace=False).tolist())
    images, annotations = [], []
    start = time.perf_counter()
    report_every = max(1, num_images // 4)
    for index in range(num_images):
        pixels, shapes = _render_image(params, index, index in negatives)
        file_name = f"{index:06d}.jpg"
        Image.fromarray(pixels).save(
            os.path.join(image_dir, file_name),
            format="JPEG",
            quality=params["jpeg_quality"],
            subsampling=0,
            optimize=False,
        )
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        annotations += _annotations(shapes, image_id, len(annotations) + 1)
        if num_images >= 200 and (index + 1) % report_every == 0:
            elapsed = time.perf_counter() - start
            logger.info(
                "shapes %r: %d/%d images (%.1f s)", params["split"], index + 1, num_images, elapsed
            )
    return images, annotations


def _coco(params: dict, images: List[dict], annotations: List[dict]) -> dict:
    return {
        "info": {
            "description": "san_det synthetic shapes on scikit-image photographs",
            "version": str(GENERATOR_VERSION),
            "split": params["split"],
            "seed": params["seed"],
        },
        "licenses": [],
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPE_CLASSES)
        ],
        "images": images,
        "annotations": annotations,
    }


def write_split(directory: str, params: dict, manifest: dict) -> None:
    """Render every image of a split into ``directory`` (which exists and is empty)."""
    image_dir = os.path.join(directory, "images")
    os.makedirs(image_dir)
    images, annotations = _write_images(image_dir, params)
    with open(os.path.join(directory, "annotations.json"), "w", encoding="utf-8") as f:
        json.dump(_coco(params, images, annotations), f, separators=(",", ":"))
    manifest = dict(manifest, num_images=params["num_images"], num_annotations=len(annotations))
    # Written last: a directory without a matching manifest is never taken as complete.
    write_manifest(directory, manifest)
