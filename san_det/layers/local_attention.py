"""SASA's local self-attention layer (Ramachandran et al., NeurIPS 2019, arXiv 1906.05909).

:class:`LocalSelfAttention2d` replaces a spatial convolution in a SASA ResNet; the operator it
runs is :func:`~san_det.layers.ops.local_attention`.
"""

import math

import torch
from torch import nn

from .checks import check_head_width, check_ints, check_odd_int
from .ops import local_attention

__all__ = ["LocalSelfAttention2d"]


class LocalSelfAttention2d(nn.Module):
    """SASA's stand-alone local self-attention layer, a drop-in for a ``k x k`` convolution.

    ``q = W_q x``, ``k = W_k x``, ``v = W_v x`` are 1x1 convolutions without bias
    (``in_channels -> out_channels``; :meth:`project`); the logits add learned relative
    embeddings to the keys: inside every head the first half of the head's channels carries a
    row-offset embedding (depends on the window row ``a`` only) and the second half a
    column-offset embedding (window column ``b`` only). ``stride > 1`` runs attention at stride 1
    followed by an ``s x s`` average pool with stride ``s`` (``ceil_mode``, so the output is
    ``ceil(H / s) x ceil(W / s)``, the size of the strided ``3x3`` convolution with padding 1 that
    the layer replaces).

    Initialisation (as in common SASA reimplementations): Kaiming normal (``fan_out``, ReLU) for
    the projections; embeddings ``N(0, 1 / head_dim)``, so that at initialisation ``q . r`` has
    the same order of magnitude per head as a single channel product. Call
    :meth:`reset_parameters` to re-initialise.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C``; divisible by ``num_heads`` with an even head width.
        kernel_size: odd attention window size.
        num_heads: number of attention heads.
        stride: output stride (average pooling after attention).
        dilation: spacing between window taps.

    Shape:
        input ``(N, C_in, H, W)`` -> output ``(N, C, ceil(H / stride), ceil(W / stride))``.

    Attributes read by FLOP counters: ``in_channels``, ``out_channels``, ``kernel_size``,
    ``num_heads``, ``stride``, ``dilation``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 7,
        num_heads: int = 8,
        stride: int = 1,
        dilation: int = 1,
    ):
        super().__init__()
        check_ints(in_channels=in_channels, out_channels=out_channels, num_heads=num_heads)
        check_ints(stride=stride, dilation=dilation)
        check_odd_int("kernel_size", kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads, self.head_dim = num_heads, check_head_width(out_channels, num_heads)
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.value = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        # Row embedding of head h, channel e < head_dim/2 is rel_row[h * head_dim/2 + e, a].
        self.rel_row = nn.Parameter(torch.empty(out_channels // 2, kernel_size))
        self.rel_col = nn.Parameter(torch.empty(out_channels // 2, kernel_size))
        # Without padding, count_include_pad=False divides the overhanging last window by its
        # in-image size exactly like the default; it also keeps torch.compile's gradients right
        # (inductor divides that window by s * s in the default's backward, pytorch#198119).
        self.pool = (
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
            if stride > 1
            else nn.Identity()
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.query, self.key, self.value):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        std = 1.0 / math.sqrt(self.head_dim)
        nn.init.normal_(self.rel_row, 0.0, std)
        nn.init.normal_(self.rel_col, 0.0, std)

    def relative_embedding(self) -> torch.Tensor:
        """The ``(out_channels, k, k)`` tensor ``rel`` passed to :func:`local_attention`."""
        heads, half, ks = self.num_heads, self.head_dim // 2, self.kernel_size
        row = self.rel_row.view(heads, half, ks, 1).expand(heads, half, ks, ks)
        col = self.rel_col.view(heads, half, 1, ks).expand(heads, half, ks, ks)
        return torch.cat([row, col], dim=1).reshape(self.out_channels, ks, ks)

    def project(self, x: torch.Tensor):
        """``(q, k, v)``, each ``(N, out_channels, H, W)`` and contiguous (as the op needs them),
        from ``x`` ``(N, in_channels, H, W)`` by three 1x1 convolutions.

        Not one convolution by the three weights concatenated at run time (commit 2ca7f51):
        autograd kept each call's concatenated copy of the weights for the backward
        (52 MB of the 701 MB peak of a batch-2 256x256 ``retinanet_sasa50_attention_fpn_head``
        training step, whose FPN and head call each layer once per pyramid level), and its
        output chunks had to be copied to be contiguous. Three convolutions keep only ``x`` and
        the parameters, and were faster on the CPU (``benchmarks/bench_retinanet.py``: that
        step 2.7% and its inference 10% in an interleaved A/B)."""
        return self.query(x), self.key(x), self.value(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        q, k, v = self.project(x)
        rel = self.relative_embedding().to(q.dtype)
        out = local_attention(
            q,
            k,
            v,
            rel,
            num_heads=self.num_heads,
            kernel_size=self.kernel_size,
            dilation=self.dilation,
        )
        return self.pool(out)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"num_heads={self.num_heads}, stride={self.stride}, dilation={self.dilation}"
        )
