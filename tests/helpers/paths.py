"""The repository root (a ``Path``) and the config files under it."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def config_path(*parts: str) -> str:
    """Absolute path of ``configs/<parts...>`` (e.g. ``config_path("Demo", "x.yaml")``)."""
    return os.path.join(REPO_ROOT, "configs", *parts)
