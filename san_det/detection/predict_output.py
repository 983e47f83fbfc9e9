"""The output folder of ``tools/predict.py``: locked while a run writes it, replaced whole by a
rerun, never mixed with files it did not write.

- One run at a time: :func:`open_prediction_folder` takes the exclusive lock that training takes
  on ``OUTPUT_DIR`` (:class:`~san_det.engine.output_lock.OutputDirLock`); a second run into the
  folder is refused in one line before it writes anything.
- A rerun replaces the previous result: the folder's manifest (:data:`MANIFEST`, hidden) lists
  every file a prediction wrote; a new run removes those (old drawings its own ``images.json``
  would not list included) and moves its own in. A folder holding any other file (a folder of
  photos, a training run) is refused: nothing the user made is deleted.
- Staged: files are written into a hidden staging folder inside the output folder and moved into
  place when every image is done (:func:`commit_prediction`); a failure or a signal removes it,
  and the staging folders of killed runs (their process is gone) are removed by the next run.
"""

import json
import logging
import os
from typing import Iterable, List, Set

from ..engine.output_lock import OutputDirLock
from ..errors import UserInputError
from ..utils.atomic import atomic_write, remove_orphaned_temporaries

__all__ = ["MANIFEST", "commit_prediction", "open_prediction_folder", "previous_prediction"]

logger = logging.getLogger(__name__)

#: Hidden file listing the files of the prediction in the folder (paths relative to it).
MANIFEST = ".san_det_prediction.json"


def _visible_files(folder: str) -> List[str]:
    """Paths (relative to ``folder``) of its files, hidden files and folders left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    return found


def _read_manifest(folder: str) -> Set[str]:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            return set(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _write_manifest(folder: str, files: Iterable[str]) -> None:
    with atomic_write(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"files": sorted(files)}, f)


def previous_prediction(folder: str) -> List[str]:
    """The files of the prediction ``folder`` holds (empty for a new or empty folder).

    Raises:
        UserInputError: ``folder`` holds files that no prediction wrote (they are kept).
    """
    if not os.path.isdir(folder):
        return []
    listed = _read_manifest(folder)
    present = _visible_files(folder)
    foreign = [p for p in present if p not in listed]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserInputError(
            f"--output {folder} holds files that tools/predict.py did not write ({foreign[0]}"
            f"{more}): pass a new or empty folder (the folder of an earlier prediction is "
            "replaced)"
        )
    return present


def open_prediction_folder(folder: str) -> OutputDirLock:
    """Lock ``folder`` (created if needed) for a prediction and remove the staging folders of
    killed runs. Returns the held lock (release it when done).

    Raises:
        OutputDirInUseError: another prediction (or training run) holds the folder.
        UserInputError: the folder holds files that are not a previous prediction's.
    """
    previous_prediction(folder)  # before anything is created or locked
    lock = OutputDirLock(folder, option="--output").acquire()
    try:
        previous_prediction(folder)  # again, under the lock
        remove_orphaned_temporaries(
            folder, on_remove=lambda p: logger.info(f"Removing {p}, left by a killed run")
        )
    except BaseException:
        lock.release()
        raise
    return lock


def commit_prediction(staging: str, folder: str) -> None:
    """Replace the prediction in ``folder`` (under :func:`open_prediction_folder`'s lock) with the
    files in ``staging``, which is emptied.

    The manifest lists the old and the new files while they are swapped, so that a run killed
    half-way leaves a folder the next run replaces.
    """
    old = set(previous_prediction(folder))
    new = set(_visible_files(staging))
    _write_manifest(folder, old | new)
    if old:
        logger.warning(f"Replacing the previous prediction in {folder} ({len(old)} files)")
    for rel in sorted(old - new):
        os.remove(os.path.join(folder, rel))
    for rel in sorted(new):
        target = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(staging, rel), target)
    for rel in sorted(old - new, key=len, reverse=True):  # folders the old drawings were in
        parent = os.path.dirname(os.path.join(folder, rel))
        while parent != os.path.abspath(folder) and parent != folder:
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)
    _write_manifest(folder, new)
