"""SASA's attention stem with spatially-aware values (Ramachandran et al. 2019, appendix A.1).

The full-attention SASA ResNets replace the 7x7/2 conv + 3x3/2 max-pool stem by self-attention
inside every ``block_size x block_size`` block of the image (dense within a block, so plain
matrix products are the fast path), a normalisation and a ``block_size`` max pool (stride 4 in
all, like the conv stem). A pixel sees nothing but its own block at this layer; values are
"spatially aware": the value projection of pixel ``(a, b)`` is a softmax mixture of ``M`` value
matrices whose weights depend on the absolute position of ``(a, b)`` inside its pool window::

    v_ab = (sum_m p(a, b, m) W_V^m) x_ab,   p(a, b, m) = softmax_m((emb_row(a) + emb_col(b)) . nu_m)

The logits are SASA's ``q_ij . (k_ab + r_{a-i, b-j})`` with relative row/column embeddings laid
out as in :class:`~san_det.layers.local_attention.LocalSelfAttention2d` (inside each head the
first half of the channels carries the row-offset embedding, the second half the column-offset
embedding), no ``1/sqrt(d)`` scaling.

Project decisions where the paper is silent: ``M = 4`` value matrices, embedding width
``out_channels`` for ``emb_row``/``emb_col``/``nu``, no ReLU between the normalisation and the
max pool (the paper names only BN and the pool). Images whose sides are not multiples of
``block_size`` are zero-padded; padded pixels are masked out of every softmax and cropped before
the pool (``ceil_mode``), so the output is ``ceil(H / block_size) x ceil(W / block_size)``.
"""

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.san_det.attention_stem)
from .checks import check_head_width, check_ints
from .norm_pool import can_fuse_for, norm_max_pool, pool_window, pooled_norm, scale_sign
from .ops.attention_stem import pool_runs_kernels

__all__ = ["SpatiallyAwareAttentionStem"]


class SpatiallyAwareAttentionStem(nn.Module):
    """Blockwise multi-head self-attention with spatially-aware values, norm and max pool.

    Args:
        in_channels: input channels ``C_in`` (3 for images).
        out_channels: output channels ``C``; divisible by ``num_heads`` with an even head width.
        block_size: side ``b`` of the attention blocks and of the max pool (the stem's stride).
        num_heads: attention heads (contiguous groups of ``C / num_heads`` channels).
        num_value_mixtures: number ``M`` of value matrices mixed per position.
        norm_layer: callable ``channels -> nn.Module`` for the normalisation after attention
            (``None`` for none).

    Shape:
        input ``(N, C_in, H, W)`` -> output ``(N, C, ceil(H / b), ceil(W / b))``.

    Example::

        >>> stem = SpatiallyAwareAttentionStem(3, 64, block_size=4, num_heads=8)
        >>> stem(torch.randn(2, 3, 32, 48)).shape
        torch.Size([2, 64, 8, 12])
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 64,
        block_size: int = 4,
        num_heads: int = 8,
        num_value_mixtures: int = 4,
        norm_layer: Optional[Callable[[int], nn.Module]] = nn.BatchNorm2d,
    ):
        super().__init__()
        check_ints(in_channels=in_channels, out_channels=out_channels, block_size=block_size)
        check_ints(num_heads=num_heads, num_value_mixtures=num_value_mixtures)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.block_size = self.stride = block_size
        self.num_heads, self.head_dim = num_heads, check_head_width(out_channels, num_heads)
        self.num_value_mixtures = num_value_mixtures

        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        # The M value matrices stacked: output channel m * C + c is row c of W_V^m.
        self.value = nn.Conv2d(in_channels, num_value_mixtures * out_channels, 1, bias=False)
        # Relative offsets inside a block run from -(b - 1) to b - 1.
        self.rel_row = nn.Parameter(torch.empty(out_channels // 2, 2 * block_size - 1))
        self.rel_col = nn.Parameter(torch.empty(out_channels // 2, 2 * block_size - 1))
        # Absolute position inside the pool window -> mixture logits over the M value matrices.
        self.emb_row = nn.Parameter(torch.empty(block_size, out_channels))
        self.emb_col = nn.Parameter(torch.empty(block_size, out_channels))
        self.mixture = nn.Parameter(torch.empty(num_value_mixtures, out_channels))
        self.norm = norm_layer(out_channels) if norm_layer is not None else nn.Identity()
        self.pool = nn.MaxPool2d(block_size, block_size, ceil_mode=True)
        # offsets[p, q] = position of key q minus position of query p, shifted to >= 0.
        idx = torch.arange(block_size)
        rows = idx.repeat_interleave(block_size)
        cols = idx.repeat(block_size)
        self.register_buffer(
            "_row_offsets", rows[None, :] - rows[:, None] + block_size - 1, persistent=False
        )
        self.register_buffer(
            "_col_offsets", cols[None, :] - cols[:, None] + block_size - 1, persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.query, self.key, self.value):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.rel_row, 0.0, 1.0 / math.sqrt(self.head_dim))
        nn.init.normal_(self.rel_col, 0.0, 1.0 / math.sqrt(self.head_dim))
        nn.init.normal_(self.emb_row, 0.0, 1.0)
        nn.init.normal_(self.emb_col, 0.0, 1.0)
        # Mixture logits of order 1 at initialisation (emb_row + emb_col has variance 2).
        nn.init.normal_(self.mixture, 0.0, 1.0 / math.sqrt(self.out_channels))

    def mixture_weights(self) -> torch.Tensor:
        """``p(a, b, m)``: ``(b, b, M)``, a softmax over ``m`` for every window position."""
        pos = self.emb_row[:, None, :] + self.emb_col[None, :, :]  # (b, b, C)
        return torch.softmax(pos @ self.mixture.t(), dim=-1)

    def relative_embedding(self) -> torch.Tensor:
        """``r`` for every (query, key) pair of a block: ``(heads, head_dim, b*b, b*b)``."""
        heads, half = self.num_heads, self.head_dim // 2
        row = self.rel_row.view(heads, half, -1)[:, :, self._row_offsets]
        col = self.rel_col.view(heads, half, -1)[:, :, self._col_offsets]
        return torch.cat([row, col], dim=1)

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        """``(N, C, Hp, Wp)`` -> ``(N * nH * nW, heads, b*b, head_dim)``."""
        n, _, hp, wp = t.shape
        b = self.block_size
        t = t.reshape(n, self.num_heads, self.head_dim, hp // b, b, wp // b, b)
        t = t.permute(0, 3, 5, 1, 4, 6, 2)
        return t.reshape(-1, self.num_heads, b * b, self.head_dim)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output before norm and pool, ``(N, C, H, W)``, by the registered op
        ``torch.ops.san_det.attention_stem`` (:mod:`san_det.layers.ops.attention_stem`)."""
        self._check_input(x)
        return torch.ops.san_det.attention_stem(
            *self._op_inputs(x), self.num_heads, self.block_size
        )

    def _op_inputs(self, x: torch.Tensor):
        """The stem ops' tensor inputs: the image and the parameters as the ops take them."""
        return (
            x,
            self.query.weight[:, :, 0, 0],
            self.key.weight[:, :, 0, 0],
            self.value.weight[:, :, 0, 0],
            self.rel_row,
            self.rel_col,
            self.mixture_weights().to(x.dtype).view(-1, self.num_value_mixtures),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``pool(norm(attention(x)))``. Where the attention runs on the kernels and the norm
        and pool can be fused (:func:`~san_det.layers.norm_pool.can_fuse_for`, SyncBatchNorm
        included; the pool's windows are the attention's blocks), by the op
        ``san_det::attention_stem_pool``, which never forms the full-resolution attention output;
        else the norm and the pool fused by :func:`~san_det.layers.norm_pool.norm_max_pool` where
        it can, else the modules."""
        if self._pools_in_attention(x):
            return self._pooled_attention(x)
        return norm_max_pool(self.attention(x), self.norm, self.pool)

    def _pools_in_attention(self, x: torch.Tensor) -> bool:
        self._check_input(x)
        b = self.block_size
        shape = torch.Size((x.shape[0], self.out_channels, *x.shape[2:]))
        return (
            pool_window(self.pool) == (b, b)
            and can_fuse_for(shape, x.dtype, x.device, self.norm, self.pool, from_sums=True)
            and pool_runs_kernels(x, self.query.weight[:, :, 0, 0], self.num_heads, b)
        )

    def _pooled_attention(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _, sums = torch.ops.san_det.attention_stem_pool(
            *self._op_inputs(x), scale_sign(self.norm, x), self.num_heads,
            self.block_size,
        )  # fmt: skip
        return pooled_norm(pooled, sums, x.shape[0] * x.shape[2] * x.shape[3], self.norm)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` by :meth:`attention_reference` (plain tensor operations) and the
        unfused ``self.pool(self.norm(...))``."""
        return self.pool(self.norm(self.attention_reference(x)))

    def attention_reference(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`attention` as readable tensor operations: the projections, the value
        mixture at full resolution and the blockwise products (the reference the op is tested
        against; slow and memory-hungry)."""
        self._check_input(x)
        n, _, h, w = x.shape
        b, c, m = self.block_size, self.out_channels, self.num_value_mixtures
        pad_h, pad_w = (-h) % b, (-w) % b
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w

        q, k = self.query(x), self.key(x)
        # Spatially-aware values: mix the M projections with position-dependent weights.
        # Plain matmuls (not einsum) so that fvcore counts them exactly.
        mix = self.mixture_weights().to(x.dtype).repeat(hp // b, wp // b, 1)  # (Hp, Wp, M)
        values = self.value(x).view(n, m, c, hp * wp).permute(0, 3, 2, 1)  # (N, Hp*Wp, C, M)
        v = (values @ mix.view(hp * wp, m, 1)).view(n, hp, wp, c).permute(0, 3, 1, 2)

        qb, kb, vb = self._blocks(q), self._blocks(k), self._blocks(v)
        logits = qb @ kb.transpose(-1, -2)  # (B, heads, b*b, b*b)
        rel = self.relative_embedding().to(x.dtype)
        # q . r: per query position p, (heads, 1, d) @ (heads, d, b*b)
        logits = logits + (qb.unsqueeze(3) @ rel.permute(0, 2, 1, 3)).squeeze(3)
        if pad_h or pad_w:
            inside = torch.zeros(hp, wp, dtype=torch.bool, device=x.device)
            inside[:h, :w] = True
            inside = inside.view(hp // b, b, wp // b, b).permute(0, 2, 1, 3).reshape(-1, b * b)
            # Padded keys leave every softmax (each block holds at least one image pixel).
            logits = logits.view(n, inside.shape[0], self.num_heads, b * b, b * b)
            logits = logits.masked_fill(~inside[None, :, None, None, :], float("-inf"))
            logits = logits.flatten(0, 1)
        out = torch.softmax(logits, dim=-1) @ vb  # (B, heads, b*b, head_dim)

        out = out.view(n, hp // b, wp // b, self.num_heads, b, b, self.head_dim)
        out = out.permute(0, 3, 6, 1, 4, 2, 5).reshape(n, c, hp, wp)
        if pad_h or pad_w:
            out = out[:, :, :h, :w]
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, block_size={self.block_size}, "
            f"num_heads={self.num_heads}, num_value_mixtures={self.num_value_mixtures}"
        )
