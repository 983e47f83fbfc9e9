"""Results files written whole or not at all: evaluation outputs, ``metrics.json``.

detectron2's ``COCOEvaluator`` writes ``instances_predictions.pth`` and
``coco_instances_results.json`` in place, and its ``JSONWriter`` appends to ``metrics.json``: a
full disk, a file size limit or a signal left a truncated file under the final name. Here:

- :func:`staged_results`: a staging folder inside the results folder whose files are moved into
  place (``os.replace``, one file at a time, each complete) when the block succeeds, and deleted
  when it fails; staging folders of processes that died are deleted first.
- :func:`append_whole_lines`: appends lines to an open file, or, if the write fails, cuts the
  file back to its previous length.

A failed write raises :class:`ResultsWriteError`: one line naming the file and the cause
(``train_net.py`` reports it with exit status 1).
"""

import contextlib
import errno
import logging
import os
from typing import IO, Iterator

from ..utils.atomic import atomic_directory, os_error_in, remove_orphaned_temporaries

__all__ = ["ResultsWriteError", "append_whole_lines", "staged_results"]

logger = logging.getLogger(__name__)


class ResultsWriteError(OSError):
    """A results file could not be written (disk full, quota, file size limit); ``str()`` is the
    one-line message naming the file and the cause."""

    def __init__(self, what: str, path: str, cause: OSError):
        code = errno.errorcode.get(cause.errno, cause.errno)
        self.message = (
            f"cannot write {what}: {cause.strerror or cause} ({code}); no partial file was left"
        )
        super().__init__(cause.errno, self.message, path)

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def staged_results(folder: str) -> Iterator[str]:
    """Yield a staging folder; on success its files replace those of the same name in ``folder``
    (created if needed), on failure it is deleted and ``folder`` keeps what it held.

    Raises:
        ResultsWriteError: a write failed with an OSError (also when torch wrapped it).
    """
    os.makedirs(folder, exist_ok=True)
    remove_orphaned_temporaries(
        folder, on_remove=lambda p: logger.info(f"Removing {p}: left by a process that died")
    )
    try:
        with atomic_directory(folder, merge=True) as staging:
            yield staging
    except Exception as e:
        cause = os_error_in(e)
        if cause is None:
            raise
        raise ResultsWriteError(f"the results in {folder}", folder, cause) from e


def append_whole_lines(file: IO, text: str) -> None:
    """Append ``text`` to ``file`` (opened for appending, nothing buffered) with one
    ``os.write`` loop; if a write fails the file is cut back to its previous length.

    Raises:
        ResultsWriteError: naming ``file.name``.
    """
    file.flush()
    fd = file.fileno()
    start = os.fstat(fd).st_size
    data = text.encode("utf-8")
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        name = getattr(file, "name", "?")
        raise ResultsWriteError(name, name, e) from None
