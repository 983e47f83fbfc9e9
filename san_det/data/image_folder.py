"""Classification datasets in ImageNet's folder layout, registered in detectron2's catalogs.

Layout: ``<split_dir>/<class>/<image>``, one folder per class (ImageNet: ``train/n01440764/
n01440764_10026.JPEG``; the validation set sorted into class folders the same way). Class indices
are the sorted class-folder names of the *training* folder, so the validation split of a dataset is
read with the training split's classes and must have exactly the same class folders.

Registered names (:func:`register_imagenet`, called on ``import san_det.classification``):
``imagenet_train`` and ``imagenet_val`` under ``$DETECTRON2_DATASETS/imagenet``
(``./datasets/imagenet`` when unset; re-register another root with :func:`register_imagenet` or
``CLASSIFICATION.IMAGENET_ROOT``). A dataset dict is
``{"file_name": path, "label": int, "image_id": int}``; the metadata has ``classes`` (folder
names), ``image_root`` and ``evaluator_type = "classification"``.

Problems are :class:`ClassificationDatasetError` naming the path: a missing or empty folder, a
split whose class folders differ from the training split's, a class folder without images, or an
unreadable image (:class:`CorruptImageError`, raised when the image is read).
"""

import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ..errors import CorruptImageError, DatasetError
from .mapper import IMAGE_EXTENSIONS

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassificationDatasetError",
    "CorruptImageError",
    "find_classes",
    "load_image_folder",
    "read_image_rgb",
    "register_image_folder",
    "register_imagenet",
    "default_imagenet_root",
]

logger = logging.getLogger(__name__)

# What PIL raises for unreadable files (UnidentifiedImageError and truncation are OSErrors).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# Classification code's name for DatasetError (CorruptImageError is one), kept for its users.
ClassificationDatasetError = DatasetError


def default_imagenet_root() -> str:
    """``$DETECTRON2_DATASETS/imagenet``, ``./datasets/imagenet`` when the variable is unset."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "imagenet")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_classes(split_dir: str) -> List[str]:
    """Sorted class-folder names of ``split_dir``; raises if it is missing or has none."""
    if not os.path.isdir(split_dir):
        raise ClassificationDatasetError(
            f"dataset folder not found: {split_dir} (expected the ImageNet folder layout "
            f"{os.path.join(split_dir, '<class>', '<image>')})"
        )
    with os.scandir(split_dir) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        loose = sum(1 for e in entries if e.is_file() and _is_image(e.name))
        if loose:
            raise ClassificationDatasetError(
                f"{split_dir} holds {loose} images but no class folders: sort them into one "
                "folder per class (for ImageNet's val, the standard valprep.sh does this)"
            )
        raise ClassificationDatasetError(f"dataset folder is empty: {split_dir} (no class folders)")
    return classes


def _check_same_classes(split_dir: str, classes: Sequence[str], class_dir: str) -> None:
    found = find_classes(split_dir)
    if list(found) == list(classes):
        return
    missing = sorted(set(classes) - set(found))
    extra = sorted(set(found) - set(classes))
    parts = []
    if missing:
        parts.append(f"{len(missing)} class folders missing (first: {missing[:3]})")
    if extra:
        parts.append(f"{len(extra)} class folders not in {class_dir} (first: {extra[:3]})")
    raise ClassificationDatasetError(
        f"class folders of {split_dir} differ from those of {class_dir}: " + "; ".join(parts)
    )


def load_image_folder(split_dir: str, class_dir: Optional[str] = None) -> List[dict]:
    """Dataset dicts of ``split_dir`` with class indices taken from ``class_dir``'s folders.

    Args:
        split_dir: ``<split_dir>/<class>/<image>``.
        class_dir: folder whose class folders define the classes (default ``split_dir``); its
            class folders and ``split_dir``'s must be the same.

    Returns:
        ``[{"file_name", "label", "image_id"}]`` sorted by class then file name.
    """
    class_dir = class_dir or split_dir
    classes = find_classes(class_dir)
    if os.path.abspath(class_dir) != os.path.abspath(split_dir):
        _check_same_classes(split_dir, classes, class_dir)
    dicts = []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        with os.scandir(folder) as it:
            files = sorted(e.name for e in it if _is_image(e.name) and e.is_file())
        if not files:
            raise ClassificationDatasetError(
                f"class folder has no images ({', '.join(IMAGE_EXTENSIONS)}): {folder}"
            )
        for f in files:
            dicts.append({"file_name": os.path.join(folder, f), "label": label})
    for i, d in enumerate(dicts):
        d["image_id"] = i
    logger.info(f"Loaded {len(dicts)} images of {len(classes)} classes from {split_dir}")
    return dicts


def read_image_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully as an RGB PIL image; :class:`CorruptImageError` names the file."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise CorruptImageError(f"image file not found: {path}") from None
    except _DECODE_ERRORS as e:
        raise CorruptImageError(f"cannot read image {path}: {e}") from None


def register_image_folder(
    name: str,
    split_dir: str,
    class_dir: Optional[str] = None,
    prepare: Optional[Callable[[], None]] = None,
    hint: str = "",
    **metadata,
) -> None:
    """Register ``name`` (replacing an earlier registration) reading ``split_dir`` lazily.

    The folders are read when the dataset is first used (``DatasetCatalog.get(name)``), which also
    sets ``MetadataCatalog.get(name).classes``; ``prepare()``, if given, runs first (e.g. to write
    an embedded dataset to disk). ``hint`` is appended to the errors about the folders.
    """
    class_dir = class_dir or split_dir

    def load():
        if prepare is not None:
            prepare()
        try:
            dicts = load_image_folder(split_dir, class_dir)
        except ClassificationDatasetError as e:
            if not hint:
                raise
            raise type(e)(f"dataset {name!r}: {e}. {hint}") from None
        meta = MetadataCatalog.get(name)
        classes = find_classes(class_dir)
        if meta.get("classes") != classes:
            MetadataCatalog.remove(name)
            meta = MetadataCatalog.get(name)
            meta.set(**_metadata(split_dir, class_dir, metadata), classes=classes)
        return dicts

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(**_metadata(split_dir, class_dir, metadata))


def _metadata(split_dir: str, class_dir: str, extra: dict) -> dict:
    return dict(image_root=split_dir, class_dir=class_dir, evaluator_type="classification", **extra)


def register_imagenet(root: Optional[str] = None, prefix: str = "imagenet") -> Tuple[str, str]:
    """Register ``<prefix>_train`` (``root/train``) and ``<prefix>_val`` (``root/val``, read with
    the training classes). ``root`` defaults to :func:`default_imagenet_root`. Returns the names.
    """
    root = root or default_imagenet_root()
    train, val = f"{prefix}_train", f"{prefix}_val"
    hint = (
        "ImageNet is read from $DETECTRON2_DATASETS/imagenet/{train,val} (DETECTRON2_DATASETS="
        f"{os.environ.get('DETECTRON2_DATASETS', '<unset>')}) or CLASSIFICATION.IMAGENET_ROOT"
    )
    train_dir = os.path.join(root, "train")
    register_image_folder(train, train_dir, hint=hint)
    register_image_folder(val, os.path.join(root, "val"), class_dir=train_dir, hint=hint)
    return train, val
