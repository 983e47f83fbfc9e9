"""Rendering of the shapes dataset: shapes painted, anti-aliased, on jittered real photographs.

Circles, squares and triangles of varied size, rotation, colour and count are painted
(anti-aliased by 4x4 supersampling) onto random crops of the real photographs that ship inside
scikit-image (``skimage/data/*.png|jpg``; never the pooch-downloaded ones). Crops are flipped,
rotated by multiples of 90 degrees, colour-permuted or tinted and brightness/contrast-jittered,
so a detector has to learn the shapes, not a background.
"""

import math
import os
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = [
    "BACKGROUND_FILES",
    "SHAPE_CLASSES",
    "SHAPE_COLORS",
    "ShapeInstance",
    "render_shapes_image",
]

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

_SUPERSAMPLING = 4  # anti-aliasing: coverage from 4x4 samples per pixel
_CIRCLE_POLYGON_POINTS = 32  # vertices of the circle's segmentation polygon
_PLACEMENT_TRIES = 30  # random positions tried per object before giving up on it
_COLOR_TRIES = 12  # random colours tried per object; the most distinct from its background wins
_MIN_COLOR_DISTANCE = 90.0  # RGB distance to the background's mean that ends the colour search


_backgrounds_cache: Optional[List[Tuple[Image.Image, bool]]] = None
_backgrounds_lock = threading.Lock()


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
        placed = _place_shape(rng, category, radius, image_size, shapes, max_overlap)
        if placed is not None:
            shapes.append(_paint_shape(rng, pixels, category, radius, *placed))
    noise_sigma = rng.uniform(0.0, 6.0)
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(noise_sigma)
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return image, shapes


def _place_shape(
    rng: np.random.Generator,
    category: int,
    radius: float,
    image_size: Tuple[int, int],
    placed: Sequence[ShapeInstance],
    max_overlap: float,
) -> Optional[Tuple[float, float, np.ndarray, Tuple[float, ...], float]]:
    """A random position overlapping the ``placed`` shapes little enough, tried a few times.

    Returns:
        ``(cx, cy, polygon, bbox, area)``, or None when no try fits.
    """
    height, width = image_size
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
        if _overlap_ok(bbox, [s.bbox for s in placed], max_overlap):
            return cx, cy, polygon, tuple(float(v) for v in bbox), area
    return None


def _paint_shape(
    rng: np.random.Generator,
    pixels: np.ndarray,
    category: int,
    radius: float,
    cx: float,
    cy: float,
    polygon: np.ndarray,
    bbox: Tuple[float, ...],
    area: float,
) -> ShapeInstance:
    """Blend the shape into ``pixels`` (H, W, 3) float32 in place, in a colour that stands out."""
    height, width = pixels.shape[:2]
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
    return ShapeInstance(category, polygon, bbox, area, alpha, window)
