"""Datasets made on demand: each registers a preparer that writes it before it is first read.

The engine calls :func:`prepare_dataset` for every dataset of a config before training, so a
generated dataset is written (or fails with a clear error) before any output is.
"""

from typing import Callable, List

__all__ = ["prepare_dataset", "register_dataset_preparer"]

_DATASET_PREPARERS: List[Callable[[str], bool]] = []


def register_dataset_preparer(prepare: Callable[[str], bool]) -> None:
    """Add ``prepare(name) -> bool``: makes an on-demand dataset, True if ``name`` was its own."""
    if prepare not in _DATASET_PREPARERS:
        _DATASET_PREPARERS.append(prepare)


def prepare_dataset(name: str) -> bool:
    """Make ``name`` if it is generated on demand; returns whether it was."""
    return any(prepare(name) for prepare in _DATASET_PREPARERS)
