"""Argument validators shared by san_det's layers and models.

Every check raises ``ValueError`` naming the argument (or the config key) it was given, and
returns the checked value, so constructors read ``self.stride = check_int("stride", stride)``.
``bool`` is rejected where an ``int`` is expected (``True`` is an ``int`` to Python).
"""

import numbers

import torch

__all__ = [
    "check_choice",
    "check_head_width",
    "check_int",
    "check_ints",
    "check_odd_int",
    "check_same_device_and_dtype",
    "check_tensor",
]


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integer ``>= minimum``.

    The message says "a positive int" for ``minimum == 1`` and "an int >= minimum" otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_ints(**values) -> None:
    """:func:`check_int` (``minimum`` 1) of every keyword argument, in order."""
    for name, value in values.items():
        check_int(name, value)


def check_head_width(out_channels: int, num_heads: int) -> int:
    """The head width ``out_channels / num_heads`` of an attention layer, which must be a whole
    and even number (a head's channels are a row and a column embedding half)."""
    if out_channels % num_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must divide out_channels ({out_channels})")
    head_dim = out_channels // num_heads
    if head_dim % 2 != 0:
        raise ValueError(
            "out_channels / num_heads must be even (row and column embedding halves), got "
            f"out_channels={out_channels}, num_heads={num_heads} (head width {head_dim})"
        )
    return head_dim


def check_odd_int(name: str, value) -> int:
    """``value`` as an ``int`` if it is an odd positive integer (a window size)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an odd positive int, got {value!r}")
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd, got {value}")
    return int(value)


def check_choice(name: str, value, choices):
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_tensor(name: str, value, dim: int, layout: str) -> torch.Tensor:
    """``value`` if it is a floating-point tensor with ``dim`` dimensions.

    Args:
        layout: the expected shape in words for the message, e.g. ``"(N, C, H, W)"``.
    """
    if not torch.is_tensor(value) or value.dim() != dim:
        got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"{name} must have shape {layout} (a {dim}-D tensor), got {got}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got dtype {value.dtype}")
    return value


def check_same_device_and_dtype(name: str, value: torch.Tensor, ref_name: str, ref) -> None:
    """``value`` must have the dtype and the device of ``ref``."""
    if value.dtype != ref.dtype:
        raise ValueError(
            f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {value.dtype}"
        )
    if value.device != ref.device:
        raise ValueError(
            f"{name} must be on the device of {ref_name} ({ref.device}), got {value.device}"
        )
