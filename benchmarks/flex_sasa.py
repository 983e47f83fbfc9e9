"""SASA local attention written with PyTorch's FlexAttention, the GPU comparison of
``gpu_check.py``.

Pixels are the sequence (``H * W`` queries and keys per image and head). A 2-D window block mask
keeps, for query ``(i, j)``, the keys ``(i + (a - r) * dilation, j + (b - r) * dilation)`` inside
the image (as SASA, neighbours outside the image are left out of the softmax), and a score_mod
adds the relative-position term ``q . rel[a, b]`` from a precomputed table ``(N, heads, H*W, k*k)``
to ``q . k``; no ``1/sqrt(d)`` scaling, as in the paper. Compiled (``torch.compile``) on a GPU;
in eager mode on the CPU the forward runs (PyTorch's math path), which is what the tests check
against the reference.
"""

from typing import Optional

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

__all__ = ["flex_local_attention", "sasa_block_mask", "sasa_score_mod"]


def sasa_block_mask(height: int, width: int, kernel_size: int, dilation: int, device):
    """The window of every pixel as a FlexAttention block mask over ``H*W`` queries and keys."""
    reach = (kernel_size // 2) * dilation

    def in_window(b, h, q_idx, kv_idx):
        di = kv_idx // width - q_idx // width
        dj = kv_idx % width - q_idx % width
        near = (di.abs() <= reach) & (dj.abs() <= reach)
        return near & (di % dilation == 0) & (dj % dilation == 0)

    seq = height * width
    return create_block_mask(in_window, None, None, seq, seq, device=device)


def sasa_score_mod(q: torch.Tensor, rel: Optional[torch.Tensor], num_heads: int, width: int,
                   kernel_size: int, dilation: int):  # fmt: skip
    """``score + q . rel[tap]``: the table ``q . rel`` (N, heads, H*W, k*k) is computed once;
    ``None`` without ``rel``."""
    if rel is None:
        return None
    n, c, h, w = q.shape
    d, kk, r = c // num_heads, kernel_size * kernel_size, kernel_size // 2
    q_heads = q.reshape(n, num_heads, d, h * w)
    rel_heads = rel.reshape(num_heads, d, kk)
    table = torch.einsum("nhdp,hdt->nhpt", q_heads, rel_heads)

    def add_relative(score, b, head, q_idx, kv_idx):
        a = (kv_idx // width - q_idx // width) // dilation + r
        col = (kv_idx % width - q_idx % width) // dilation + r
        # Outside the window the mask drops the score: any tap in range will do there.
        tap = (a * kernel_size + col).clamp(0, kk - 1)
        return score + table[b, head, q_idx, tap]

    return add_relative


def flex_local_attention(q, k, v, rel=None, *, num_heads: int, kernel_size: int, dilation: int = 1,
                         attention=flex_attention, block_mask=None):  # fmt: skip
    """SASA's ``local_attention`` (same arguments and result, ``(N, C, H, W)``) through
    ``attention`` (``flex_attention`` or its compiled form); ``block_mask`` from
    :func:`sasa_block_mask` may be passed to reuse it."""
    n, c, h, w = q.shape
    d = c // num_heads

    def sequence(t):  # (N, C, H, W) -> (N, heads, H*W, d)
        return t.reshape(n, num_heads, d, h * w).transpose(2, 3)

    if block_mask is None:
        block_mask = sasa_block_mask(h, w, kernel_size, dilation, q.device)
    score_mod = sasa_score_mod(q, rel, num_heads, w, kernel_size, dilation)
    out = attention(sequence(q), sequence(k), sequence(v), score_mod=score_mod,
                    block_mask=block_mask, scale=1.0)  # fmt: skip
    return out.transpose(2, 3).reshape(n, c, h, w)
