"""Normalisation choices of san_det's backbones, validated with errors naming the config key."""

import math

from detectron2.layers import get_norm
from torch import nn

__all__ = ["NORMS", "check_norm", "make_norm"]

# detectron2's get_norm names that make sense for a backbone trained here.
NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "naiveSyncBN")


def check_norm(norm, key: str) -> str:
    """Return ``norm`` if it is one of :data:`NORMS`, else raise ``ValueError`` naming ``key``."""
    if norm not in NORMS:
        raise ValueError(f"{key} must be one of {list(NORMS)}, got {norm!r}")
    return norm


def make_norm(norm: str, channels: int) -> nn.Module:
    """detectron2's ``get_norm``, except that "GN" uses ``gcd(32, channels)`` groups.

    SAN's attention MLPs have widths such as ``rel_planes + 2`` that 32 groups do not divide.
    """
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return get_norm(norm, channels)

