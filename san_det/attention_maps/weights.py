"""The attention weights of one layer at one pixel (:class:`AttentionMap`), and SASA's weights
taken from the layer's own op."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

import san_det.layers.ops  # noqa: F401  (registers torch.ops.san_det.local_attention)

__all__ = ["AttentionMap", "check_pixels", "local_attention_weights", "window_inside"]


@dataclass
class AttentionMap:
    """The attention weights of one layer at one pixel.

    Attributes:
        layer: the layer's module name.
        kind: "sasa", "san_pairwise" or "san_patchwise".
        pixel: ``(i, j)`` on the layer's attention grid (its output grid before any pooling).
        centre: ``(row, col)`` of the window centre on the layer's input grid (equal to ``pixel``
            unless the layer has a stride, as SAN modules may).
        weights: ``(G, k, k)`` float tensor; ``G`` heads (SASA) or channel groups (SAN).
        inside: ``(k, k)`` bool tensor, True where the tap lies inside the image.
        dilation: spacing between taps, in input-grid pixels.
        group_name: "head" or "channel group".
    """

    layer: str
    kind: str
    pixel: Tuple[int, int]
    centre: Tuple[int, int]
    weights: torch.Tensor
    inside: torch.Tensor
    dilation: int
    group_name: str

    @property
    def kernel_size(self) -> int:
        return self.weights.shape[-1]


def window_inside(height, width, centre, kernel_size, dilation, device) -> torch.Tensor:
    """``(k, k)`` bool: which taps of the window around ``centre`` lie inside ``height x width``."""
    r = kernel_size // 2
    offsets = (torch.arange(kernel_size, device=device) - r) * dilation
    rows, cols = centre[0] + offsets, centre[1] + offsets
    row_ok = (rows >= 0) & (rows < height)
    col_ok = (cols >= 0) & (cols < width)
    return row_ok[:, None] & col_ok[None, :]


def check_pixels(pixels, height: int, width: int, what: str) -> List[Tuple[int, int]]:
    """``pixels`` as ``(row, col)`` int pairs, or ``ValueError`` for one outside ``what``."""
    checked = []
    for p in pixels:
        if len(p) != 2:
            raise ValueError(f"pixels must be (row, col) pairs, got {p!r}")
        i, j = int(p[0]), int(p[1])
        if not (0 <= i < height and 0 <= j < width):
            raise ValueError(f"pixel {(i, j)} lies outside the {height}x{width} {what}")
        checked.append((i, j))
    return checked


def local_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    rel: Optional[torch.Tensor],
    pixels: Sequence[Tuple[int, int]],
    *,
    num_heads: int,
    kernel_size: int,
    dilation: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SASA attention weights (:func:`~san_det.layers.ops.local_attention`) at pixels.

    The probabilities are the second output of the registered op
    ``torch.ops.san_det.local_attention`` on the backend the layer's forward would use, so they
    are the weights the layer applies to its values.

    Args:
        q, k: queries and keys ``(N, C, H, W)``; heads are contiguous groups of ``C / num_heads``.
        rel: relative embeddings ``(C, k, k)`` added to the keys, or ``None``.
        pixels: ``(i, j)`` positions inside ``H x W``.

    Returns:
        ``weights (N, P, num_heads, k, k)`` in ``q``'s dtype: the softmax over in-image
        neighbours of ``q . (k + rel)`` (0 outside the image), and ``inside (P, k, k)`` (bool).
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"q and k must have the same shape (N, C, H, W), got {tuple(q.shape)} and "
            f"{tuple(k.shape)}"
        )
    n, c, h, w = q.shape
    if c % num_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must divide the channel count C={c}")
    pixels = check_pixels(pixels, h, w, "attention grid")
    # The values only shape the op's first output, which is not used: the keys stand in for them.
    _, attn = torch.ops.san_det.local_attention(q, k, k, rel, num_heads, kernel_size, dilation)
    rows = torch.tensor([i for i, _ in pixels], device=q.device, dtype=torch.long)
    cols = torch.tensor([j for _, j in pixels], device=q.device, dtype=torch.long)
    # attn is (N, heads, H, k*k, W); the two index tensors put the pixel axis P first
    weights = attn[:, :, rows, :, cols].permute(1, 0, 2, 3)  # (N, P, heads, k*k)
    weights = weights.reshape(n, len(pixels), num_heads, kernel_size, kernel_size).to(q.dtype)
    inside = [window_inside(h, w, p, kernel_size, dilation, q.device) for p in pixels]
    return weights, torch.stack(inside)
