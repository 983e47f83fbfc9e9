"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

iopath, fvcore, detectron2 and torch write files in place (``PathManager.open(path, "wb")``), so a
process killed half-way leaves a truncated file under the final name. Here everything is written
under a hidden temporary name next to the target, ``.<name>.tmp-<pid>[-<hex>]``, and renamed over
the target (``os.replace``) only when complete; a failure removes the temporary again. The pid in
the name lets a later run delete what a killed process left (:func:`remove_orphaned_temporaries`).

- :func:`atomic_write`: one file, flushed and ``fsync``-ed before the rename (then its folder),
  so a crash of the machine does not leave an empty file either.
- :func:`atomic_directory`: a folder staged next to the target, then swapped in (the old folder
  is moved aside first and deleted after), or merged into it (``merge=True``).
"""

import contextlib
import glob
import os
import re
import shutil
import uuid
from typing import IO, Callable, Iterator, Optional

__all__ = [
    "atomic_directory",
    "atomic_write",
    "fsync_directory",
    "os_error_in",
    "pid_alive",
    "remove_orphaned_temporaries",
    "remove_temporaries",
    "temporary_name",
]

TEMPORARY_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?:tmp|stale)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")


def temporary_name(path: str, kind: str = "tmp", unique: bool = False) -> str:
    """``<dir>/.<name>.<kind>-<pid>``, with ``-<8 hex digits>`` when ``unique`` (for threads)."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}" if unique else str(os.getpid())
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{kind}-{tag}")


def fsync_directory(path: str) -> None:
    """Flush a folder's entries (a rename in it) to disk, where the platform allows it."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", *, encoding: Optional[str] = None) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it replaces ``path``.

    The temporary is ``.<name>.tmp-<pid>`` (one writer per process and path). On any exception,
    ``KeyboardInterrupt`` included, it is removed and ``path`` keeps its old content.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_write needs a writing mode ('w' or 'wb'), got {mode!r}")
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_directory(os.path.dirname(path))


def os_error_in(error: BaseException) -> Optional[OSError]:
    """The OSError that caused ``error`` (torch's zip writer turns it into a RuntimeError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def remove_temporaries(path: str) -> None:
    """Delete every temporary of ``path`` (``.<name>.tmp-*``, ``.<name>.stale-*``), dead or not:
    call it only where no other writer can be running (e.g. under an exclusive lock)."""
    folder, name = os.path.split(path)
    for kind in ("tmp", "stale"):
        for leftover in glob.glob(
            os.path.join(glob.escape(folder), f".{glob.escape(name)}.{kind}-*")
        ):
            _remove(leftover)


def remove_orphaned_temporaries(folder: str, on_remove: Optional[Callable[[str], None]] = None):
    """Delete the temporary files and folders in ``folder`` whose writing process has died.

    ``on_remove(path)`` is called before each deletion (e.g. to log it).
    """
    for path in glob.glob(os.path.join(glob.escape(folder), ".*.*-*")):
        match = TEMPORARY_PATTERN.match(os.path.basename(path))
        if not match or pid_alive(int(match.group("pid"))):
            continue
        if on_remove is not None:
            on_remove(path)
        _remove(path)


def _swap_in(staging: str, path: str, complete: Optional[Callable[[str], bool]], replace: bool):
    """Rename ``staging`` to ``path``, moving an existing ``path`` aside first."""
    if complete is not None and not replace and os.path.isdir(path) and complete(path):
        shutil.rmtree(staging, ignore_errors=True)  # a concurrent writer finished first
        return
    stale = temporary_name(path, "stale", unique=True)
    if os.path.lexists(path):
        os.replace(path, stale)
    try:
        os.replace(staging, path)
    except OSError:
        # A concurrent writer renamed its copy in between: keep it if it is complete.
        if complete is None or not complete(path):
            raise
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(stale, ignore_errors=True)
    fsync_directory(os.path.dirname(path))


def _merge_into(staging: str, path: str) -> None:
    """Move every entry of ``staging`` into ``path`` (files replace files, folders merge)."""
    for entry in sorted(os.listdir(staging)):
        source, target = os.path.join(staging, entry), os.path.join(path, entry)
        if os.path.isdir(target) and os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            os.replace(source, target)
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(
    path: str,
    *,
    merge: bool = False,
    complete: Optional[Callable[[str], bool]] = None,
    replace_complete: bool = False,
) -> Iterator[str]:
    """Yield an empty staging folder; on a clean exit its content becomes ``path``.

    Args:
        path: the folder to write; its parent must exist.
        merge: stage inside ``path`` (created if missing) and move the staged entries into it,
            keeping what else ``path`` holds; on failure a ``path`` created here is removed.
            Otherwise stage next to ``path`` (``.<name>.tmp-<pid>-<hex>``) and swap the whole
            folder in: an existing ``path`` is renamed aside and deleted once the new one is in.
        complete: ``complete(folder)`` tells whether ``folder`` holds a finished copy; a finished
            copy that a concurrent writer put at ``path`` first is kept and ours discarded.
        replace_complete: replace a finished copy found at ``path`` (regeneration on request);
            a rename lost to a concurrent writer still keeps the winner's finished copy.

    On any exception (``KeyboardInterrupt`` included) the staging folder is deleted and ``path``
    is left as it was.
    """
    created = merge and not os.path.exists(path)
    inside = os.path.join(path, os.path.basename(path))  # stage in ``path`` itself when merging
    staging = temporary_name(inside if merge else path, unique=True)
    os.makedirs(staging)
    try:
        yield staging
        if merge:
            _merge_into(staging, path)
        else:
            _swap_in(staging, path, complete, replace_complete)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
