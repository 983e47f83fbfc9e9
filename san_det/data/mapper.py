"""A ``DatasetMapper`` that survives real-world inputs, and the box checks behind it.

:class:`RobustDatasetMapper` is detectron2's ``DatasetMapper`` with:

- Unreadable images (missing, truncated, not an image): :class:`CorruptImageError` naming the file,
  or, with ``DATALOADER.SKIP_CORRUPT_IMAGES`` (training only), a warning naming the file and
  ``None`` (the training loader then takes the next readable image).
- Any PIL mode: grayscale (``L``, ``LA``, 16-bit ``I;16``), palette, ``RGBA``, ``CMYK`` are
  converted to ``INPUT.FORMAT`` (alpha is dropped; 16-bit values are scaled to 8 bits).
- Boxes: non-finite or non-positive width/height -> dropped; partly outside the image -> clipped;
  fully outside -> dropped; counted (:func:`sanitize_dataset_dicts` logs the counts for a whole
  dataset once, the mapper re-checks each image against its real size).
"""

import copy
import logging
import math
from collections import Counter
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import log_every_n_seconds
from PIL import Image, ImageOps

from ..errors import CorruptImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "RobustDatasetMapper",
    "read_image_robust",
    "sanitize_annotations",
    "sanitize_dataset_dicts",
]

logger = logging.getLogger(__name__)

# File name endings of the images that tools collect from folders (any PIL format is read).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_HIGH_BIT_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit grayscale -> 8-bit ``L`` (full range scaled, not clipped)."""
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
    if image.mode == "F":
        top = 1.0 if array.max() <= 1.0 else top
    return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def read_image_robust(file_name: str, format: Optional[str] = None) -> np.ndarray:
    """``detectron2.data.detection_utils.read_image`` that decodes the whole file up front and
    accepts every PIL mode (see the module docstring).

    Returns:
        ``(H, W, C)`` uint8 array in ``format`` (``(H, W, 1)`` for ``"L"``).

    Raises:
        CorruptImageError: the file is missing, truncated or not an image (names the file).
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)
            if image.mode in _HIGH_BIT_DEPTH_MODES:
                image = _to_8bit(image)
            elif image.mode not in ("RGB", "L") and format in ("BGR", "RGB", "YUV-BT.601", None):
                image = image.convert("RGB")  # RGBA / LA / P / CMYK / 1: explicit, not implicit
            return utils.convert_PIL_to_numpy(image, format)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptImageError(f"cannot read image {file_name}: {reason}") from e


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.as_tensor`` of a C-contiguous copy when needed. numpy calls an array with a side
    of 1 contiguous even when that side was flipped (a negative stride, which torch refuses):
    a 1-pixel-wide image after ``RandomFlip``."""
    array = np.ascontiguousarray(array)
    if any(stride < 0 for stride in array.strides):
        array = array.copy()
    return torch.as_tensor(array)


def sanitize_annotations(annotations: List[Dict], height: int, width: int, counts: Counter):
    """Boxes clipped to the ``width`` x ``height`` image; degenerate ones dropped.

    Args:
        annotations: detectron2 annotation dicts (``bbox``, ``bbox_mode``, ...); not modified.
        counts: incremented under ``"dropped_degenerate"`` (non-positive width/height),
            ``"dropped_non_finite"``, ``"dropped_outside"`` (no area inside the image),
            ``"clipped"``.

    Returns:
        The kept annotations (copies where a box changed), boxes of changed ones in XYXY_ABS.
    """
    kept = []
    for ann in annotations:
        bbox = ann.get("bbox")
        if bbox is None:
            kept.append(ann)
            continue
        if len(bbox) != 4 or not all(math.isfinite(float(v)) for v in bbox):
            counts["dropped_non_finite"] += 1
            continue
        x0, y0, x1, y1 = BoxMode.convert(list(map(float, bbox)), ann["bbox_mode"], BoxMode.XYXY_ABS)
        if x1 <= x0 or y1 <= y0:
            counts["dropped_degenerate"] += 1
            continue
        cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        if cx1 <= cx0 or cy1 <= cy0:
            counts["dropped_outside"] += 1
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            counts["clipped"] += 1
            ann = dict(ann, bbox=[cx0, cy0, cx1, cy1], bbox_mode=BoxMode.XYXY_ABS)
        kept.append(ann)
    return kept


def _describe(counts: Counter) -> str:
    kinds = ("dropped_degenerate", "dropped_non_finite", "dropped_outside")
    dropped = sum(counts[k] for k in kinds)
    return (
        f"{dropped} boxes dropped ({counts['dropped_degenerate']} with non-positive width or "
        f"height, {counts['dropped_outside']} outside the image, {counts['dropped_non_finite']} "
        f"with NaN/inf coordinates), {counts['clipped']} boxes clipped to the image"
    )


def sanitize_dataset_dicts(dataset_dicts: List[Dict], filter_empty: bool, name: str = "dataset"):
    """Apply :func:`sanitize_annotations` to every image that records its size, log the counts.

    Args:
        filter_empty: drop images left without (non-crowd) annotations by the check; otherwise
            they stay, as negatives.

    Returns:
        The new list of dicts (input dicts are not modified).
    """
    counts: Counter = Counter()
    out, emptied = [], 0
    for d in dataset_dicts:
        annotations = d.get("annotations")
        if annotations is None or "height" not in d or "width" not in d:
            out.append(d)
            continue
        kept = sanitize_annotations(annotations, d["height"], d["width"], counts)
        d = dict(d, annotations=kept)
        had_boxes = any(not a.get("iscrowd", 0) for a in annotations)
        if had_boxes and not any(not a.get("iscrowd", 0) for a in kept):
            emptied += 1
            if filter_empty:
                continue
        out.append(d)
    if sum(counts.values()):
        what = "removed" if filter_empty else "kept as negatives"
        logger.warning(f"{name}: {_describe(counts)}; {emptied} images left without boxes ({what})")
    return out


class RobustDatasetMapper(DatasetMapper):
    """``DatasetMapper`` with the input handling of the module docstring.

    Extra argument (also from ``cfg.DATALOADER.SKIP_CORRUPT_IMAGES``):
        skip_corrupt_images: training only: return None for an unreadable image (with a
            warning naming it) instead of raising :class:`CorruptImageError`.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, skip_corrupt_images: bool = False, **kwargs):
        super().__init__(is_train, **kwargs)
        self.skip_corrupt_images = bool(skip_corrupt_images) and self.is_train
        self.box_counts: Counter = Counter()

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["skip_corrupt_images"] = cfg.DATALOADER.get("SKIP_CORRUPT_IMAGES", False)
        return ret

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        """Returns the model input dict (``image``: ``(C, H, W)`` uint8 tensor, ``instances``),
        or None for a skipped unreadable image."""
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        try:
            image = read_image_robust(file_name, format=self.image_format)
        except CorruptImageError as e:
            if not self.skip_corrupt_images:
                raise
            logger.warning(f"Skipping an unreadable training image: {e}")
            return None
        utils.check_image_size(dataset_dict, image)

        if "annotations" in dataset_dict and self.is_train:
            before = sum(self.box_counts.values())
            dataset_dict["annotations"] = sanitize_annotations(
                dataset_dict["annotations"], image.shape[0], image.shape[1], self.box_counts
            )
            if sum(self.box_counts.values()) != before:
                log_every_n_seconds(
                    logging.WARNING,
                    f"RobustDatasetMapper (this process so far): {_describe(self.box_counts)}; "
                    f"latest: {file_name}",
                    n=60,
                    name=__name__,
                )

        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = read_image_robust(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        else:
            sem_seg_gt = None

        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = _to_tensor(image.transpose(2, 0, 1))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = _to_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
