"""Small COCO-format sets in a folder, with optional broken images and arbitrary boxes."""

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image


def _draw(size, boxes, classes, seed: int) -> np.ndarray:
    w, h = size
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    for (x, y, bw, bh), c in zip(boxes, classes):
        if not all(np.isfinite([x, y, bw, bh])) or bw <= 0 or bh <= 0:
            continue
        x0, y0 = int(max(x, 0)), int(max(y, 0))
        x1, y1 = int(min(x + bw, w)), int(min(y + bh, h))
        img[y0:y1, x0:x1, c % 3] = 220
    return img


def write_coco_dataset(folder: str, images: Sequence[Dict], categories=("a", "b", "c")) -> str:
    """Write images and a COCO json into ``folder``; returns the json path.

    Each entry of ``images``: ``name`` (file name), ``size`` ``(w, h)`` (default 64x64),
    ``boxes`` (list of XYWH, any values), ``classes`` (0-based, default 0), ``mode`` (PIL mode to
    save in, default ``RGB``), ``broken`` (None, ``"truncated"``, ``"garbage"`` or ``"missing"``),
    ``record_size`` (False: omit width/height from the json).
    """
    os.makedirs(folder, exist_ok=True)
    coco_images, annotations = [], []
    for i, spec in enumerate(images):
        name = spec["name"]
        w, h = spec.get("size", (64, 64))
        boxes = spec.get("boxes", [])
        classes = spec.get("classes", [0] * len(boxes))
        path = os.path.join(folder, name)
        pil = Image.fromarray(_draw((w, h), boxes, classes, seed=i))
        mode = spec.get("mode", "RGB")
        if mode == "I;16":
            pil = Image.fromarray(np.asarray(pil.convert("L")).astype(np.uint16) * 257)
            assert pil.mode == "I;16", pil.mode
        elif mode != "RGB":
            pil = pil.convert(mode)
        broken = spec.get("broken")
        if broken != "missing":
            pil.save(path)
        if broken == "truncated":
            data = open(path, "rb").read()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
        elif broken == "garbage":
            with open(path, "wb") as f:
                f.write(b"this is not an image\n" * 10)
        entry = {"id": i + 1, "file_name": name}
        if spec.get("record_size", True):
            entry.update(width=w, height=h)
        coco_images.append(entry)
        for box, c in zip(boxes, classes):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "bbox": [float(v) for v in box],
                    "category_id": int(c) + 1,
                    "iscrowd": 0,
                    "area": float(abs(box[2] * box[3])) if np.isfinite(box[2] * box[3]) else 0.0,
                }
            )
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(categories)]
    json_path = os.path.join(folder, "annotations.json")
    with open(json_path, "w") as f:
        json.dump({"images": coco_images, "annotations": annotations, "categories": cats}, f)
    return json_path


def register_coco_dataset(name: str, folder: str, images: Optional[Sequence[Dict]] = None) -> str:
    """(Re-)register ``name`` as the COCO set in ``folder`` (written first if ``images``)."""
    json_path = os.path.join(folder, "annotations.json")
    if images is not None:
        json_path = write_coco_dataset(folder, images)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_path, folder)
    return name


def simple_images(n: int, seed: int = 0) -> List[Dict]:
    """``n`` 64x64 RGB images with one or two boxes each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = 1 + i % 2
        boxes = [
            [float(v) for v in (*rng.integers(0, 32, 2), *rng.integers(12, 30, 2))]
            for _ in range(k)
        ]
        classes = [(i + j) % 3 for j in range(k)]
        out.append({"name": f"img{i}.png", "boxes": boxes, "classes": classes})
    return out
