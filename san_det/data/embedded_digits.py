"""A small real classification set that ships with an installed package: scikit-learn's digits.

scikit-learn bundles the UCI handwritten digits (1797 images of 8x8 pixels, 17 grey levels, 10
classes) inside the package, so nothing is downloaded. :func:`ensure_embedded_digits` writes them
once, upscaled (bicubic) to ``image_size`` and saved as JPEG files in ImageNet's folder layout::

    <root>/embedded_digits_<image_size>px_v<version>/{train,val}/<digit>/<index>.JPEG

with a stratified, seeded split (``val_fraction`` of every class in ``val``). The folder is
written into a temporary directory next to the target and renamed into place when complete, so an
interrupted or concurrent run never leaves a half-written folder that a later run would use.
``root`` defaults to ``$SAN_DET_DATASETS``, else ``$DETECTRON2_DATASETS``, else
``~/.cache/san_det/datasets``.

Registered as ``embedded_digits_train`` / ``embedded_digits_val`` (written on first use); the
same loader, trainer and evaluator as ImageNet then run on the CPU in minutes.
"""

import contextlib
import logging
import os
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from ..utils.atomic import atomic_directory
from .image_folder import ClassificationDatasetError, register_image_folder
from .manifest import manifest_matches, write_manifest

__all__ = [
    "EMBEDDED_VERSION",
    "embedded_datasets_root",
    "ensure_embedded_digits",
    "register_embedded_digits",
]

logger = logging.getLogger(__name__)

EMBEDDED_VERSION = 1


def embedded_datasets_root() -> str:
    """``$SAN_DET_DATASETS``, else ``$DETECTRON2_DATASETS``, else ``~/.cache/san_det/datasets``."""
    for var in ("SAN_DET_DATASETS", "DETECTRON2_DATASETS"):
        if os.environ.get(var):
            return os.environ[var]
    return os.path.join(os.path.expanduser("~"), ".cache", "san_det", "datasets")


def _manifest(image_size: int, val_fraction: float, seed: int) -> dict:
    return {
        "source": "sklearn.datasets.load_digits",
        "version": EMBEDDED_VERSION,
        "image_size": image_size,
        "val_fraction": val_fraction,
        "seed": seed,
    }


def _split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation images: ``round(val_fraction * n)`` of each class."""
    rng = np.random.RandomState(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        is_val[idx[: int(round(val_fraction * len(idx)))]] = True
    return is_val


def _write(folder: str, image_size: int, val_fraction: float, seed: int) -> Tuple[int, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    labels = digits.target.astype(np.int64)
    is_val = _split(labels, val_fraction, seed)
    for split in ("train", "val"):
        for c in range(10):
            os.makedirs(os.path.join(folder, split, str(c)))
    for i, (img, label, val) in enumerate(zip(images, labels, is_val)):
        path = os.path.join(folder, "val" if val else "train", str(label), f"{i:04d}.JPEG")
        pil = Image.fromarray(img, mode="L").resize((image_size, image_size), Image.BICUBIC)
        pil.save(path, format="JPEG", quality=95)
    manifest = dict(
        _manifest(image_size, val_fraction, seed),
        num_train=int((~is_val).sum()),
        num_val=int(is_val.sum()),
    )
    write_manifest(folder, manifest)  # written last: marks completion
    return manifest["num_train"], manifest["num_val"]


def ensure_embedded_digits(
    root: Optional[str] = None, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> str:
    """Write the digits set if it is not there yet; returns its folder (holding train/ and val/).

    Raises:
        ValueError: ``image_size`` < 8 or ``val_fraction`` outside (0, 1).
        ClassificationDatasetError: the folder cannot be written (names the path).
    """
    if int(image_size) < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = root or embedded_datasets_root()
    folder = os.path.join(root, f"embedded_digits_{int(image_size)}px_v{EMBEDDED_VERSION}")
    wanted = _manifest(int(image_size), float(val_fraction), int(seed))

    def is_complete(path: str) -> bool:
        return manifest_matches(path, wanted)

    if is_complete(folder):
        return folder
    with contextlib.ExitStack() as stack:
        try:
            os.makedirs(root, exist_ok=True)
            staging = stack.enter_context(atomic_directory(folder, complete=is_complete))
        except OSError as e:
            raise ClassificationDatasetError(
                f"cannot write the embedded digits dataset under {root}: {e.strerror or e}; "
                "set SAN_DET_DATASETS to a writable folder"
            ) from None
        num_train, num_val = _write(staging, int(image_size), float(val_fraction), int(seed))
    logger.info(f"Wrote embedded digits ({num_train} train, {num_val} val) to {folder}")
    return folder


def register_embedded_digits(
    root: Optional[str] = None, image_size: int = 32, prefix: str = "embedded_digits"
) -> Tuple[str, str]:
    """Register ``<prefix>_train`` and ``<prefix>_val``, written on first use. Returns the names."""
    base = root or embedded_datasets_root()
    folder = os.path.join(base, f"embedded_digits_{int(image_size)}px_v{EMBEDDED_VERSION}")

    def prepare() -> None:
        ensure_embedded_digits(base, image_size)

    train, val = f"{prefix}_train", f"{prefix}_val"
    train_dir = os.path.join(folder, "train")
    register_image_folder(train, train_dir, prepare=prepare)
    register_image_folder(val, os.path.join(folder, "val"), class_dir=train_dir, prepare=prepare)
    return train, val
