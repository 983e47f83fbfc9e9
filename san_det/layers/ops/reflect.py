"""The gradient of reflection padding, folded back with slice additions (no atomics).

``F.pad(x, (p,) * 4, mode="reflect")`` copies the ``p`` rows (columns) next to each border,
without the edge itself, into the padding: padded row ``-1 - t`` holds row ``1 + t`` and padded
row ``H + t`` holds row ``H - 2 - t``. Its gradient adds every padded entry back onto the pixel
it copies. aten's ``reflection_pad2d_backward`` does that with ``atomicAdd`` on CUDA (a
run-to-run varying sum order, and an error under ``torch.use_deterministic_algorithms(True)``);
here each mirrored strip is flipped and added with one slice addition after the other, so the sum
order is the same on every device and run.
"""

import torch

__all__ = ["reflection_pad_backward"]


def _add_mirrored(out: torch.Tensor, before: torch.Tensor, after: torch.Tensor, dim: int):
    """Add the strips padded ``before`` index 0 and ``after`` the last index of ``dim`` back onto
    the entries they mirror (in place; ``out`` is returned)."""
    pad, size = before.shape[dim], out.shape[dim]
    out.narrow(dim, 1, pad).add_(before.flip(dim))
    out.narrow(dim, size - 1 - pad, pad).add_(after.flip(dim))
    return out


def _fold_columns(band: torch.Tensor, pad: int) -> torch.Tensor:
    """``(..., rows, W + 2 * pad) -> (..., rows, W)``: the column padding folded back (new)."""
    width = band.shape[-1] - 2 * pad
    inner = band.narrow(-1, pad, width).clone(memory_format=torch.contiguous_format)
    return _add_mirrored(inner, band.narrow(-1, 0, pad), band.narrow(-1, pad + width, pad), -1)


def reflection_pad_backward(grad: torch.Tensor, padding: int) -> torch.Tensor:
    """The gradient of ``x`` from that of ``F.pad(x, (padding,) * 4, mode="reflect")``.

    Args:
        grad: ``(N, C, H + 2 * padding, W + 2 * padding)``, with ``padding < H`` and
            ``padding < W`` (as reflection padding needs); not modified.

    Returns:
        A new contiguous ``(N, C, H, W)`` tensor of ``grad``'s dtype; the extra memory is the
        two ``padding``-row border bands.
    """
    if padding == 0:
        return grad.clone(memory_format=torch.contiguous_format)
    height = grad.shape[-2] - 2 * padding
    bands = [(padding, height), (0, padding), (padding + height, padding)]  # centre, top, bottom
    inner, top, bottom = (_fold_columns(grad.narrow(-2, s, n), padding) for s, n in bands)
    return _add_mirrored(inner, top, bottom, -2)
