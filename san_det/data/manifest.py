"""Manifests of the datasets san_det writes on first use: what was asked, stored with the files.

A generated dataset folder holds ``manifest.json``: the generator's name and version and every
parameter that shapes its bytes, plus counts. It is written last, so a folder is taken as
complete only when its manifest exists and matches what is asked now
(:func:`manifest_matches`); anything else is regenerated, never reused.
"""

import json
import os
from typing import Optional

__all__ = ["MANIFEST_FILE", "manifest_matches", "read_manifest", "write_manifest"]

MANIFEST_FILE = "manifest.json"


def read_manifest(folder: str) -> Optional[dict]:
    """The manifest of ``folder``, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(folder, MANIFEST_FILE), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def manifest_matches(folder: str, expected: dict) -> bool:
    """Whether ``folder``'s manifest has every key of ``expected`` with the same value."""
    found = read_manifest(folder)
    return found is not None and {key: found.get(key) for key in expected} == expected


def write_manifest(folder: str, manifest: dict) -> None:
    """Write ``manifest`` into ``folder``; call it after every other file of the dataset."""
    with open(os.path.join(folder, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
