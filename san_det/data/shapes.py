"""A synthetic "shapes" detection dataset in COCO format, generated on this machine.

Circles, squares and triangles of varied size, rotation, colour and count are painted
(anti-aliased by 4x4 supersampling) onto random crops of the real photographs that ship inside
scikit-image (``skimage/data/*.png|jpg``; never the pooch-downloaded ones). Crops are flipped,
rotated by multiples of 90 degrees, colour-permuted or tinted and brightness/contrast-jittered,
so a detector has to learn the shapes, not a background. Generation needs no network and takes
a few seconds for the default 1000 + 200 images of 128x128 pixels.

Output, per split, under ``<root>/<split>/``:

- ``annotations.json``: COCO instances (``bbox`` ``[x, y, w, h]`` in absolute pixels, where pixel
  ``i`` spans ``[i, i + 1)``; ``area`` is the shape's exact area; ``segmentation`` a polygon;
  ``iscrowd`` 0; category ids 1..3 in :data:`SHAPE_CLASSES` order);
- ``images/000000.jpg`` ...: JPEG, Pillow, fixed quality, 4:4:4 chroma;
- ``manifest.json``: generator version, every parameter, the seed and the background files; a
  split whose manifest differs from what is asked is regenerated, never reused.

The same parameters and seed give byte-identical JSON and JPEG files (with the same Pillow/libjpeg).
Each image draws from its own random stream ``numpy.random.default_rng([seed, index])``.

Generation is atomic: it writes into ``<root>/.<split>.tmp-*`` and renames that directory to
``<root>/<split>`` only when complete (the manifest is written last), under an exclusive
``fcntl`` lock on ``<root>/.<split>.lock``, so concurrent processes wait for one another and an
interrupted run leaves only a temporary directory, which the next run deletes.

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

import contextlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

try:
    import fcntl
except ImportError:  # not POSIX: only the rename protocol protects concurrent writers
    fcntl = None

__all__ = [
    "GENERATOR_VERSION",
    "SHAPE_CLASSES",
    "SHAPE_COLORS",
    "BACKGROUND_FILES",
    "DEFAULT_SPLITS",
    "default_shapes_root",
    "generate_shapes_dataset",
    "register_shapes_datasets",
    "ensure_shapes_dataset",
    "is_shapes_dataset",
    "render_shapes_image",
]

logger = logging.getLogger(__name__)

# Bump whenever the pixels or the JSON a given seed produces change: existing caches regenerate.
GENERATOR_VERSION = 1

SHAPE_CLASSES = ("circle", "square", "triangle")
# Colours for detectron2's Visualizer (RGB), one per class.
SHAPE_COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200))

# Photographs and textures bundled in scikit-image's wheel (no download). Excluded: synthetic
# ones (chessboard, color, logo, phantom, horse) and the 102x102 microaneurysms.
BACKGROUND_FILES = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)

# Registered splits: name suffix -> generation arguments (image_size and root come from
# register_shapes_datasets, whose ``seed`` is added to these). Splits use different seeds.
DEFAULT_SPLITS = {
    "train": dict(num_images=1000, seed=0, negative_fraction=0.03),
    "val": dict(num_images=200, seed=1, negative_fraction=0.0),
}

_SUPERSAMPLING = 4  # anti-aliasing: coverage from 4x4 samples per pixel
_CIRCLE_POLYGON_POINTS = 32  # vertices of the circle's segmentation polygon
_PLACEMENT_TRIES = 30  # random positions tried per object before giving up on it
_COLOR_TRIES = 12  # random colours tried per object; the most distinct from its background wins
_MIN_COLOR_DISTANCE = 90.0  # RGB distance to the background's mean that ends the colour search
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

_backgrounds_cache: Optional[List[Tuple[Image.Image, bool]]] = None
_backgrounds_lock = threading.Lock()
_thread_locks: Dict[str, threading.Lock] = {}  # lock file path -> lock, for threads
_thread_locks_guard = threading.Lock()
# name -> generate_shapes_dataset kwargs, for datasets registered by register_shapes_datasets
_registered: Dict[str, dict] = {}


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
@dataclass
class ShapeInstance:
    """One painted shape, in image pixel coordinates (pixel ``i`` spans ``[i, i + 1)``).

    Attributes:
        category: index into :data:`SHAPE_CLASSES`.
        polygon: (K, 2) float64 array of (x, y) vertices; for a circle, points on its boundary.
        bbox: (x0, y0, x1, y1) tight box of the exact shape.
        area: exact area of the shape in pixels (before any occlusion).
        alpha: (y1i - y0i, x1i - x0i) float32 coverage in [0, 1] over the integer box ``window``.
        window: (x0i, y0i, x1i, y1i) integer pixel box that ``alpha`` covers.
    """

    category: int
    polygon: np.ndarray
    bbox: Tuple[float, float, float, float]
    area: float
    alpha: np.ndarray
    window: Tuple[int, int, int, int]


def _background_dir() -> str:
    import skimage.data

    return os.path.dirname(os.path.abspath(skimage.data.__file__))


def _load_backgrounds() -> List[Tuple[Image.Image, bool]]:
    """(RGB photograph, whether it is grayscale) pairs, loaded once per process."""
    global _backgrounds_cache
    with _backgrounds_lock:
        if _backgrounds_cache is None:
            directory = _background_dir()
            images = []
            for name in BACKGROUND_FILES:
                path = os.path.join(directory, name)
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"background image {path!r} is missing: the shapes dataset needs the "
                        "photographs bundled in scikit-image's wheel (reinstall scikit-image)"
                    )
                with Image.open(path) as image:
                    images.append((image.convert("RGB"), image.mode in ("L", "I", "I;16")))
            _backgrounds_cache = images
        return _backgrounds_cache


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random crop of a random photograph, jittered: (height, width, 3) float32 in [0, 255]."""
    backgrounds = _load_backgrounds()
    index = int(rng.integers(len(backgrounds)))
    photo, is_gray = backgrounds[index]
    rotate = int(rng.integers(4))
    out_h, out_w = (width, height) if rotate % 2 else (height, width)  # size before rot90
    # Crop with the output's aspect ratio, from 3/4 of the output size (mild upsampling) up to
    # the whole photograph.
    max_scale = min(photo.width / out_w, photo.height / out_h)
    min_scale = min(0.75, max_scale)
    scale = float(np.exp(rng.uniform(np.log(min_scale), np.log(max_scale))))
    crop_w, crop_h = out_w * scale, out_h * scale
    left = float(rng.uniform(0.0, photo.width - crop_w))
    top = float(rng.uniform(0.0, photo.height - crop_h))
    box = (left, top, left + crop_w, top + crop_h)
    crop = photo.resize((out_w, out_h), Image.BILINEAR, box=box)
    pixels = np.asarray(crop, dtype=np.float32)
    pixels = np.rot90(pixels, rotate)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    if is_gray:
        pixels = pixels * rng.uniform(0.7, 1.0, size=3).astype(np.float32)  # random tint
    else:
        pixels = pixels[..., rng.permutation(3)]
    contrast = rng.uniform(0.6, 1.2)
    brightness = rng.uniform(-40.0, 40.0)
    mean = pixels.mean()
    pixels = (pixels - mean) * contrast + mean + brightness
    return np.clip(pixels, 0.0, 255.0).astype(np.float32)


def _shape_polygon(
    rng: np.random.Generator, category: int, cx: float, cy: float, radius: float
) -> np.ndarray:
    """(K, 2) vertices of a shape of circumradius ``radius`` centred at (cx, cy)."""
    name = SHAPE_CLASSES[category]
    if name == "circle":
        angles = np.arange(_CIRCLE_POLYGON_POINTS) * (2 * math.pi / _CIRCLE_POLYGON_POINTS)
        radii = np.full(angles.shape, radius)
    elif name == "square":
        angles = rng.uniform(0.0, math.pi / 2) + np.arange(4) * (math.pi / 2)
        radii = np.full(4, radius)
    elif name == "triangle":
        # Near-equilateral: each vertex's angle jittered by up to 12 degrees, radius by up to 15%.
        jitter = rng.uniform(-math.radians(12), math.radians(12), size=3)
        angles = rng.uniform(0.0, 2 * math.pi / 3) + np.arange(3) * (2 * math.pi / 3) + jitter
        radii = radius * rng.uniform(0.85, 1.0, size=3)
    else:  # pragma: no cover - SHAPE_CLASSES and this function change together
        raise AssertionError(name)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _coverage(
    category: int, polygon: np.ndarray, circle: Tuple[float, float, float], window: Sequence[int]
) -> np.ndarray:
    """Fraction of each pixel of ``window`` (x0, y0, x1, y1) the exact shape covers: (h, w)."""
    x0, y0, x1, y1 = window
    s = _SUPERSAMPLING
    offsets = (np.arange(s) + 0.5) / s
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(1, -1)
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1, 1)
    if SHAPE_CLASSES[category] == "circle":
        cx, cy, radius = circle
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius * radius
    else:
        orientation = math.copysign(1.0, _polygon_area(polygon))
        inside = np.ones((ys.shape[0], xs.shape[1]), dtype=bool)
        for (ax, ay), (bx, by) in zip(polygon, np.roll(polygon, -1, axis=0)):
            cross = (bx - ax) * (ys - ay) - (by - ay) * (xs - ax)
            inside &= cross * orientation >= 0
    h, w = y1 - y0, x1 - x0
    return inside.reshape(h, s, w, s).mean(axis=(1, 3), dtype=np.float32)


def _overlap_ok(box: Sequence[float], others: Sequence[Sequence[float]], limit: float) -> bool:
    """Whether ``box`` overlaps each of ``others`` by at most ``limit`` of the smaller's area."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    for other in others:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw <= 0 or ih <= 0:
            continue
        other_area = (other[2] - other[0]) * (other[3] - other[1])
        if iw * ih > limit * min(area, other_area):
            return False
    return True


def _pick_color(rng: np.random.Generator, local_mean: np.ndarray) -> np.ndarray:
    """A random colour, resampled a few times while too close to the background's ``local_mean``."""
    best, best_distance = None, -1.0
    for _ in range(_COLOR_TRIES):
        color = rng.uniform(0.0, 255.0, size=3)
        distance = float(np.linalg.norm(color - local_mean))
        if distance > best_distance:
            best, best_distance = color, distance
        if distance >= _MIN_COLOR_DISTANCE:
            break
    return best.astype(np.float32)


def render_shapes_image(
    rng: np.random.Generator,
    image_size: Tuple[int, int],
    num_objects: int,
    min_size: float,
    max_size: float,
    max_overlap: float,
) -> Tuple[np.ndarray, List[ShapeInstance]]:
    """Paint up to ``num_objects`` shapes on a random background.

    Args:
        rng: the image's random stream.
        image_size: (height, width) in pixels.
        num_objects: shapes to place (fewer when no free position is found).
        min_size, max_size: range of a shape's circumscribed-circle diameter, in pixels.
        max_overlap: largest allowed intersection of two boxes, as a fraction of the smaller box.

    Returns:
        image: (height, width, 3) uint8 RGB.
        shapes: the painted shapes, in painting order (later ones lie on top).
    """
    height, width = image_size
    pixels = _background(rng, height, width)
    shapes: List[ShapeInstance] = []
    for _ in range(num_objects):
        category = int(rng.integers(len(SHAPE_CLASSES)))
        radius = float(rng.uniform(min_size, max_size)) / 2
        for _ in range(_PLACEMENT_TRIES):
            cx = float(rng.uniform(radius, width - radius))
            cy = float(rng.uniform(radius, height - radius))
            polygon = _shape_polygon(rng, category, cx, cy, radius)
            if SHAPE_CLASSES[category] == "circle":
                bbox = (cx - radius, cy - radius, cx + radius, cy + radius)
                area = math.pi * radius * radius
            else:
                bbox = (*polygon.min(axis=0), *polygon.max(axis=0))
                area = abs(_polygon_area(polygon))
            if _overlap_ok(bbox, [s.bbox for s in shapes], max_overlap):
                break
        else:
            continue
        bbox = tuple(float(v) for v in bbox)
        window = (
            max(0, math.floor(bbox[0])),
            max(0, math.floor(bbox[1])),
            min(width, math.ceil(bbox[2])),
            min(height, math.ceil(bbox[3])),
        )
        alpha = _coverage(category, polygon, (cx, cy, radius), window)
        x0, y0, x1, y1 = window
        region = pixels[y0:y1, x0:x1]
        color = _pick_color(rng, region.reshape(-1, 3).mean(axis=0))
        # A gentle linear shading across the shape, so fills are not perfectly flat.
        angle = rng.uniform(0.0, 2 * math.pi)
        gain = rng.uniform(-30.0, 30.0)
        gx = (np.arange(x0, x1) + 0.5 - cx) / radius
        gy = (np.arange(y0, y1) + 0.5 - cy) / radius
        shade = gain * (math.cos(angle) * gx[None, :] + math.sin(angle) * gy[:, None])
        fill = np.clip(color[None, None, :] + shade[..., None], 0.0, 255.0)
        region[...] = region * (1.0 - alpha[..., None]) + fill * alpha[..., None]
        shapes.append(ShapeInstance(category, polygon, bbox, area, alpha, window))
    noise_sigma = rng.uniform(0.0, 6.0)
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(noise_sigma)
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return image, shapes


# ----------------------------------------------------------------------------------------------
# Files: arguments, manifest, atomic generation
# ----------------------------------------------------------------------------------------------
def default_shapes_root() -> str:
    """``$SAN_DET_DATASETS/shapes``, else ``$DETECTRON2_DATASETS/shapes``, else
    ``~/.cache/san_det/datasets/shapes``."""
    for variable in ("SAN_DET_DATASETS", "DETECTRON2_DATASETS"):
        value = os.environ.get(variable)
        if value:
            return os.path.join(os.path.expanduser(value), "shapes")
    return os.path.join(os.path.expanduser("~"), ".cache", "san_det", "datasets", "shapes")


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


_OPTION_DEFAULTS = dict(
    min_size=None,
    max_size=None,
    min_objects=1,
    max_objects=6,
    negative_fraction=0.0,
    max_overlap=0.3,
    jpeg_quality=90,
)


def _check_params(split: str, num_images, image_size, seed, **options) -> dict:
    """Validated generation parameters, as stored in the manifest."""
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS))
    if unknown:
        raise TypeError(
            f"unknown shapes dataset option(s) {unknown}; known: {list(_OPTION_DEFAULTS)}"
        )
    options = dict(_OPTION_DEFAULTS, **options)
    min_size, max_size = options["min_size"], options["max_size"]
    min_objects, max_objects = options["min_objects"], options["max_objects"]
    negative_fraction, max_overlap = options["negative_fraction"], options["max_overlap"]
    jpeg_quality = options["jpeg_quality"]
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
        raise ValueError(
            f"split must be a non-empty name of letters, digits, '_' or '-', got {split!r}"
        )
    num_images = _positive_int("num_images", num_images)
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    height = _positive_int("image_size (height)", image_size[0])
    width = _positive_int("image_size (width)", image_size[1])
    seed = _positive_int("seed", seed, minimum=0)
    shorter = min(height, width)
    if min_size is None:
        min_size = max(8, round(0.12 * shorter))
    if max_size is None:
        max_size = max(min_size, round(0.45 * shorter))
    min_size = _positive_int("min_size", min_size)
    max_size = _positive_int("max_size", max_size)
    if max_size < min_size:
        raise ValueError(f"max_size must be >= min_size ({min_size}), got {max_size}")
    if max_size > shorter:
        raise ValueError(
            f"max_size must be <= the image's shorter side ({shorter}), got {max_size}"
        )
    min_objects = _positive_int("min_objects", min_objects)
    max_objects = _positive_int("max_objects", max_objects)
    if max_objects < min_objects:
        raise ValueError(f"max_objects must be >= min_objects ({min_objects}), got {max_objects}")
    if not 0.0 <= float(negative_fraction) <= 1.0:
        raise ValueError(f"negative_fraction must lie in [0, 1], got {negative_fraction!r}")
    if not 0.0 <= float(max_overlap) <= 1.0:
        raise ValueError(f"max_overlap must lie in [0, 1], got {max_overlap!r}")
    jpeg_quality = _positive_int("jpeg_quality", jpeg_quality)
    if jpeg_quality > 100:
        raise ValueError(f"jpeg_quality must lie in [1, 100], got {jpeg_quality}")
    return dict(
        split=split,
        num_images=num_images,
        image_size=[height, width],
        seed=seed,
        min_size=min_size,
        max_size=max_size,
        min_objects=min_objects,
        max_objects=max_objects,
        negative_fraction=float(negative_fraction),
        max_overlap=float(max_overlap),
        jpeg_quality=jpeg_quality,
    )


def _expected_manifest(params: dict) -> dict:
    import skimage

    return {
        "generator": "san_det.data.shapes",
        "version": GENERATOR_VERSION,
        "params": params,
        "classes": list(SHAPE_CLASSES),
        "backgrounds": {"scikit-image": skimage.__version__, "files": list(BACKGROUND_FILES)},
    }


def _is_complete(split_dir: str, expected: dict) -> bool:
    """Whether ``split_dir`` holds a finished generation with exactly the ``expected`` manifest."""
    try:
        with open(os.path.join(split_dir, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if {key: manifest.get(key) for key in expected} != expected:
        return False
    images = os.path.join(split_dir, "images")
    return (
        os.path.isfile(os.path.join(split_dir, "annotations.json"))
        and os.path.isdir(images)
        and len(os.listdir(images)) == manifest.get("num_images")
    )


def _unwritable(root: str, error: OSError) -> OSError:
    return OSError(
        error.errno,
        f"cannot write the shapes dataset under {root!r} ({error.strerror or error}); set "
        "SAN_DET_DATASETS (or pass root=) to a writable directory",
        root,
    )


@contextlib.contextmanager
def _exclusive(root: str, split: str) -> Iterator[None]:
    """Hold ``<root>/.<split>.lock``: a thread lock in this process, ``flock`` across processes."""
    path = os.path.join(root, f".{split}.lock")
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(path, threading.Lock())
    try:
        handle = open(path, "a+")
    except OSError as error:
        raise _unwritable(root, error) from error
    with thread_lock, handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_split(directory: str, params: dict, manifest: dict) -> None:
    """Render every image of a split into ``directory`` (which exists and is empty)."""
    height, width = params["image_size"]
    num_images = params["num_images"]
    image_dir = os.path.join(directory, "images")
    os.makedirs(image_dir)
    num_negatives = round(params["negative_fraction"] * num_images)
    split_rng = np.random.default_rng([params["seed"], num_images, 1 << 32])
    negatives = set(split_rng.choice(num_images, size=num_negatives, replace=False).tolist())
    images, annotations = [], []
    start = time.perf_counter()
    report_every = max(1, num_images // 4)
    for index in range(num_images):
        rng = np.random.default_rng([params["seed"], index])
        if index in negatives:
            count = 0
        else:
            count = int(rng.integers(params["min_objects"], params["max_objects"] + 1))
        pixels, shapes = render_shapes_image(
            rng,
            (height, width),
            count,
            params["min_size"],
            params["max_size"],
            params["max_overlap"],
        )
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
        for shape in shapes:
            x0, y0, x1, y1 = (round(v, 2) for v in shape.bbox)  # corners first: x + w == x1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": shape.category + 1,
                    "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round(shape.area, 2),
                    "segmentation": [[round(float(v), 2) for v in shape.polygon.reshape(-1)]],
                    "iscrowd": 0,
                }
            )
        if num_images >= 200 and (index + 1) % report_every == 0:
            logger.info(
                "shapes %r: %d/%d images (%.1f s)",
                params["split"],
                index + 1,
                num_images,
                time.perf_counter() - start,
            )
    coco = {
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
    with open(os.path.join(directory, "annotations.json"), "w", encoding="utf-8") as f:
        json.dump(coco, f, separators=(",", ":"))
    manifest = dict(manifest, num_images=num_images, num_annotations=len(annotations))
    # Written last: a directory without a matching manifest is never taken as complete.
    with open(os.path.join(directory, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def _remove_leftovers(root: str, split: str) -> None:
    """Delete temporary directories of interrupted generations (call while holding the lock)."""
    for name in os.listdir(root):
        if name.startswith((f".{split}.tmp-", f".{split}.stale-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _swap_in(temporary: str, split_dir: str, stale: str) -> None:
    """Rename the finished ``temporary`` to ``split_dir``, moving an existing one aside first."""
    if os.path.lexists(split_dir):  # stale, or forced
        os.replace(split_dir, stale)
    try:
        os.replace(temporary, split_dir)
    except OSError:
        # Without flock (not POSIX) a concurrent writer may have renamed its copy in first.
        with open(os.path.join(temporary, "manifest.json"), encoding="utf-8") as f:
            finished = json.load(f)
        if not _is_complete(split_dir, finished):
            raise
        shutil.rmtree(temporary, ignore_errors=True)
    shutil.rmtree(stale, ignore_errors=True)


def generate_shapes_dataset(
    root: str,
    split: str,
    num_images: int,
    image_size: Union[int, Tuple[int, int]],
    seed: int,
    *,
    min_size: Optional[int] = None,
    max_size: Optional[int] = None,
    min_objects: int = 1,
    max_objects: int = 6,
    negative_fraction: float = 0.0,
    max_overlap: float = 0.3,
    jpeg_quality: int = 90,
    force: bool = False,
) -> str:
    """Generate one split under ``<root>/<split>/`` unless an identical one is already there.

    Args:
        root: cache directory (created if missing).
        split: directory name of the split, e.g. ``"train"``.
        num_images: number of images.
        image_size: ``int`` for square images, or ``(height, width)``.
        seed: non-negative seed; image ``i`` uses ``numpy.random.default_rng([seed, i])``.
        min_size, max_size: range of a shape's circumscribed-circle diameter in pixels (default
            12% and 45% of the image's shorter side; 15..58 at 128x128). A square's box is 71-100%
            of it, a triangle's about 75-87%.
        min_objects, max_objects: shapes per image (fewer when overlap rules leave no room).
        negative_fraction: fraction of images (rounded) painted with no shape at all.
        max_overlap: largest intersection of two objects' boxes, as a fraction of the smaller box.
        jpeg_quality: Pillow JPEG quality (chroma is not subsampled).
        force: regenerate even when a matching split exists.

    Returns:
        Path of the split's COCO ``annotations.json``; its images lie in ``<root>/<split>/images``.

    Raises:
        ValueError: an argument is out of range (the message names it).
        OSError: ``root`` cannot be created or written (the message names the path).
    """
    params = _check_params(
        split,
        num_images,
        image_size,
        seed,
        min_size=min_size,
        max_size=max_size,
        min_objects=min_objects,
        max_objects=max_objects,
        negative_fraction=negative_fraction,
        max_overlap=max_overlap,
        jpeg_quality=jpeg_quality,
    )
    root = os.path.abspath(os.path.expanduser(root))
    split_dir = os.path.join(root, split)
    json_file = os.path.join(split_dir, "annotations.json")
    expected = _expected_manifest(params)
    if not force and _is_complete(split_dir, expected):
        return json_file
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as error:
        raise _unwritable(root, error) from error
    with _exclusive(root, split):
        if not force and _is_complete(split_dir, expected):  # another process finished it
            return json_file
        if fcntl is not None:  # only a process-wide lock proves temporary directories dead
            _remove_leftovers(root, split)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temporary = os.path.join(root, f".{split}.tmp-{tag}")
        logger.info(
            "Generating the shapes dataset split %r (%d images, %dx%d, seed %d) in %s",
            split,
            params["num_images"],
            params["image_size"][1],
            params["image_size"][0],
            params["seed"],
            split_dir,
        )
        start = time.perf_counter()
        try:
            os.makedirs(temporary)
            _write_split(temporary, params, expected)
            _swap_in(temporary, split_dir, os.path.join(root, f".{split}.stale-{tag}"))
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        logger.info("Generated shapes split %r in %.1f s", split, time.perf_counter() - start)
    return json_file


# ----------------------------------------------------------------------------------------------
# detectron2 registration
# ----------------------------------------------------------------------------------------------
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
        kwargs["seed"] = _positive_int("seed", seed, minimum=0) + defaults["seed"]
        if counts[split] is not None:
            kwargs["num_images"] = counts[split]
        kwargs.update(generation_kwargs)
        # Fail at registration, not at first use.
        _check_params(**{k: v for k, v in kwargs.items() if k != "root"})
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
