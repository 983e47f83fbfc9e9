"""A COCO dataset checked before a run writes anything: its json and the size of every image.

:func:`check_coco_dataset` reads the json (:func:`~san_det.data.coco_format.check_coco_content`),
then opens every image far enough to know its size (PIL reads the header; the EXIF orientation
swaps width and height as detectron2's ``read_image`` does) and whether it is complete (JPEG: an
end-of-image marker in its last KiB, PNG: its ``IEND`` chunk; other formats are decoded), and
compares the size with the json's ``width`` / ``height``. Problems are one line
(:class:`~san_det.errors.DatasetError`) naming the dataset, the file, the first problem and how
many more of which kind. Unreadable images of a training set are a counted warning instead when
``DATALOADER.SKIP_CORRUPT_IMAGES`` skips them; a training set left without any image is an error.

The findings of a json are cached under ``$SAN_DET_CACHE/dataset_checks`` (default
``~/.cache/san_det``), keyed by the json's path, size and modification time and the image folder's
path and modification time; the findings are independent of the config (its options are applied
to them afterwards). An image file named in a cached problem is looked at again when its size or
modification time changed. An image rewritten in place (same folder entry) whose json did not
change is not re-read: delete the cache folder to check again.
"""

import hashlib
import json
import logging
import os
from collections import Counter
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError
from ..utils.atomic import atomic_write
from .coco_format import ImageEntry, Problem, check_coco_content

__all__ = [
    "CocoFindings",
    "TrainingCounts",
    "check_coco_dataset",
    "check_training_counts",
    "find_coco_problems",
    "read_image_size",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
UNREADABLE = "unreadable image files"
_TAIL_BYTES = 1024
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # transposed or rotated by 90 degrees


class CocoFindings(NamedTuple):
    """What one json and its images hold, independent of the config."""

    problems: List[Problem]  #: always errors (json format, image sizes)
    unreadable: List[Problem]  #: image files that cannot be read (missing, empty, truncated...)
    unreadable_boxed: int  #: of those, images with a usable box
    num_images: int
    num_boxed_images: int  #: images with a box the training loader keeps
    num_boxes: int
    without_area: List[Problem]  #: errors for a dataset that is evaluated


def read_image_size(path: str) -> Tuple[int, int]:
    """``(width, height)`` of the image file at ``path`` as detectron2 reads it (after its EXIF
    orientation), without decoding JPEG and PNG files.

    Raises:
        OSError: the file is missing, empty, not an image or truncated (the message says which).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise OSError("empty file (0 bytes)")
        try:
            image = Image.open(f)
        except UnidentifiedImageError:
            raise OSError("not an image PIL can read") from None
        except (SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's plugins
            raise OSError(str(e) or type(e).__name__) from None
        width, height = image.size
        if image.format in ("JPEG", "MPO", "PNG"):
            f.seek(max(0, size - _TAIL_BYTES))
            marker = b"\xff\xd9" if image.format != "PNG" else b"IEND"
            if marker not in f.read():
                raise OSError(f"truncated {image.format} file ({size} bytes, no end marker)")
            # a PNG's eXIf chunk after the pixels would need a full decode: rare, not read
            orientation = None
            if image.format != "PNG" or "exif" in image.info:
                try:
                    orientation = image.getexif().get(_EXIF_ORIENTATION)
                except Exception:  # a broken EXIF block: detectron2 reads no orientation either
                    orientation = None
            if orientation in _SWAPPING_ORIENTATIONS:
                width, height = height, width
            return width, height
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise OSError(f"cannot decode the {image.format} file: {e}") from None
        return ImageOps.exif_transpose(image).size


def _check_image_files(entries: Sequence[ImageEntry], image_root: str):
    """``(size problems, unreadable problems)`` of the images of ``entries``."""
    sizes, unreadable = [], []
    for entry in entries:
        path = os.path.join(image_root, entry.file_name)
        where = f"image id {entry.image_id}"
        try:
            width, height = read_image_size(path)
        except FileNotFoundError:
            unreadable.append(Problem(UNREADABLE, f"{where}: file not found: {path}", path))
            continue
        except OSError as e:
            reason = e.strerror or str(e)
            unreadable.append(Problem(UNREADABLE, f"{where}: cannot read {path}: {reason}", path))
            continue
        if (width, height) != (entry.width, entry.height):
            sizes.append(
                Problem(
                    "size mismatches",
                    f"{where}: {path} is {width}x{height} (width x height, after its EXIF "
                    f"orientation) but the json says {entry.width}x{entry.height}",
                    path,
                )
            )
    return sizes, unreadable


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _file_state(path: str) -> Optional[List[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _cache_path(json_file: str, image_root: str) -> Tuple[str, dict]:
    st = os.stat(json_file)
    key = {
        "version": CACHE_VERSION,
        "json_file": os.path.abspath(json_file),
        "json_size": st.st_size,
        "json_mtime_ns": st.st_mtime_ns,
        "image_root": os.path.abspath(image_root),
        "image_root_mtime_ns": _mtime_ns(image_root),
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
    root = os.environ.get("SAN_DET_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "san_det"
    )
    return os.path.join(root, "dataset_checks", f"{digest}.json"), key


def _load_cached(path: str, key: dict) -> Optional[CocoFindings]:
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached["key"] != key:
            return None
        for file, state in cached["files"].items():  # image files named in a problem
            if _file_state(file) != state:
                return None
        f = cached["findings"]
        return CocoFindings(
            [Problem(*p) for p in f["problems"]],
            [Problem(*p) for p in f["unreadable"]],
            *(f[k] for k in ("unreadable_boxed", "num_images", "num_boxed_images", "num_boxes")),
            [Problem(*p) for p in f["without_area"]],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(path: str, key: dict, findings: CocoFindings) -> None:
    files = {p.path: _file_state(p.path) for p in findings.problems + findings.unreadable if p.path}
    content = {"key": key, "files": files, "findings": findings._asdict()}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(content, f)
    except OSError as e:  # a read-only home: checked again next time
        logger.debug(f"dataset check not cached ({path}: {e})")


def find_coco_problems(
    json_file: str, image_root: str, use_cache: bool = True, read_images: bool = True
) -> CocoFindings:
    """The findings of :func:`check_coco_dataset` for one json, from the cache when valid;
    ``read_images=False``: those of the json alone (not cached: cheap).

    Raises:
        DatasetError: the json cannot be read or is not JSON.
    """
    cache_path, key = _cache_path(json_file, image_root)
    if use_cache and read_images:
        cached = _load_cached(cache_path, key)
        if cached is not None:
            return cached
    try:
        with open(json_file, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise DatasetError(f"cannot read {json_file}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DatasetError(f"{json_file} is not valid JSON: {e}") from None
    content = check_coco_content(data)
    if not read_images:
        return CocoFindings(
            content.problems, [], 0, len(content.images), 0, content.num_boxes, []
        )
    sizes, unreadable = _check_image_files(content.images, image_root)
    lost_paths = {p.path for p in unreadable}
    lost = {
        e.image_id for e in content.images if os.path.join(image_root, e.file_name) in lost_paths
    }
    findings = CocoFindings(
        content.problems + sizes,
        unreadable,
        len(lost & content.boxed_image_ids),
        len(content.images),
        len(content.boxed_image_ids),
        content.num_boxes,
        content.without_area,
    )
    _store(cache_path, key, findings)
    return findings


def _summary(problems: Sequence[Problem]) -> str:
    """The first problem, and how many more of which kind."""
    first, rest = problems[0].text, Counter(p.kind for p in problems[1:])
    if not rest:
        return first
    kinds = ", ".join(f"{n} {kind}" for kind, n in rest.most_common())
    return f"{first}; and {len(problems) - 1} more ({kinds})"


class TrainingCounts(NamedTuple):
    """Images of a training set that the training loader will use."""

    images: int
    boxed_images: int
    boxes: int
    skipped: int  #: unreadable images that SKIP_CORRUPT_IMAGES skips
    usable: int  #: images left after FILTER_EMPTY_ANNOTATIONS and SKIP_CORRUPT_IMAGES


def check_coco_dataset(
    name: str,
    json_file: str,
    image_root: str,
    *,
    training: bool = False,
    evaluated: bool = True,
    skip_corrupt_images: bool = False,
    filter_empty: bool = True,
    use_cache: bool = True,
) -> TrainingCounts:
    """Check the COCO dataset ``name`` (see the module docstring).

    Args:
        training: the run trains on it.
        evaluated: the run evaluates it (COCO evaluation needs every annotation's ``area``).
        skip_corrupt_images: ``DATALOADER.SKIP_CORRUPT_IMAGES``: unreadable images of a training
            set are a warning (the loader skips them), not an error.
        filter_empty: ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``: images without a usable box are
            dropped from a training set.

    Returns:
        What the training loader will use of it (for a test set: every image counts).

    Raises:
        DatasetError: one line: ``dataset 'name': <json>: <first problem>; and N more (...)``.
    """
    found = find_coco_problems(json_file, image_root, use_cache)
    errors = list(found.problems) + (found.without_area if evaluated else [])
    tolerated = training and skip_corrupt_images
    if not tolerated:
        errors += found.unreadable
    if errors:
        raise DatasetError(f"dataset {name!r}: {json_file}: {_summary(errors)}")
    if found.unreadable:
        logger.warning(
            f"dataset {name!r}: {len(found.unreadable)} of {found.num_images} images cannot be "
            f"read and are skipped (DATALOADER.SKIP_CORRUPT_IMAGES True): "
            f"{_summary(found.unreadable)}"
        )
    unreadable = len(found.unreadable) if tolerated else 0
    if filter_empty and training:
        usable = found.num_boxed_images - found.unreadable_boxed
    else:
        usable = found.num_images - unreadable
    return TrainingCounts(
        found.num_images, found.num_boxed_images, found.num_boxes, unreadable, usable
    )


def check_training_counts(counts: Dict[str, TrainingCounts], filter_empty: bool) -> None:
    """A training set (the datasets of ``counts`` together) with no image left is an error; one
    without any box a warning (the model learns only background).

    Raises:
        DatasetError: no training image left, saying why.
    """
    total = TrainingCounts(*(sum(c[i] for c in counts.values()) for i in range(5)))
    what = ", ".join(repr(n) for n in counts)
    if total.usable == 0:
        reasons = []
        if filter_empty and total.boxed_images < total.images:
            reasons.append(
                f"{total.images - total.boxed_images} without a box of positive size inside the "
                "image are dropped (DATALOADER.FILTER_EMPTY_ANNOTATIONS True)"
            )
        if total.skipped:
            reasons.append(
                f"{total.skipped} unreadable ones are skipped (DATALOADER.SKIP_CORRUPT_IMAGES True)"
            )
        raise DatasetError(
            f"no training image left in {what}: of its {total.images} images, "
            f"{'; '.join(reasons) or 'none is listed'}"
        )
    if total.boxes == 0:
        logger.warning(
            f"training set {what} has no box of positive size inside its image ({total.images} "
            "images): the model learns only background"
        )
