"""Generating one split on disk, once, even with concurrent processes.

Generation is atomic: it writes into ``<root>/.<split>.tmp-*`` and renames that directory to
``<root>/<split>`` only when complete (the manifest is written last), under an exclusive
``fcntl`` lock on ``<root>/.<split>.lock``, so concurrent processes wait for one another and an
interrupted run leaves only a temporary directory, which the next run deletes.
"""

import contextlib
import logging
import os
import threading
import time
from typing import Dict, Iterator, Optional, Tuple, Union

from ...utils.atomic import atomic_directory, remove_temporaries
from .options import check_params
from .writer import expected_manifest, is_complete, write_split

try:
    import fcntl
except ImportError:  # not POSIX: only the rename protocol protects concurrent writers
    fcntl = None

__all__ = ["generate_shapes_dataset"]

logger = logging.getLogger(__name__)

_thread_locks: Dict[str, threading.Lock] = {}  # lock file path -> lock, for threads
_thread_locks_guard = threading.Lock()


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


def _generate_locked(split_dir: str, params: dict, expected: dict, force: bool) -> None:
    """Write the split into a staging folder and swap it in (call while holding the lock)."""
    if fcntl is not None:  # only a process-wide lock proves temporary directories dead
        remove_temporaries(split_dir)
    logger.info(
        "Generating the shapes dataset split %r (%d images, %dx%d, seed %d) in %s",
        params["split"],
        params["num_images"],
        params["image_size"][1],
        params["image_size"][0],
        params["seed"],
        split_dir,
    )
    start = time.perf_counter()

    def complete(folder: str) -> bool:
        return is_complete(folder, expected)

    with atomic_directory(split_dir, complete=complete, replace_complete=force) as staging:
        write_split(staging, params, expected)
    logger.info("Generated shapes split %r in %.1f s", params["split"], time.perf_counter() - start)


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
    params = check_params(
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
    expected = expected_manifest(params)
    if not force and is_complete(split_dir, expected):
        return json_file
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as error:
        raise _unwritable(root, error) from error
    with _exclusive(root, split):
        if force or not is_complete(split_dir, expected):  # another process may have finished
            _generate_locked(split_dir, params, expected, force)
    return json_file
