"""SASA local self-attention (Ramachandran et al., NeurIPS 2019, arXiv 1906.05909).

:func:`local_attention` is the operator; :class:`LocalSelfAttention2d` the layer that replaces a
spatial convolution in a SASA ResNet. For a pixel ``(i, j)``, head ``h`` (channels
``[h*C/heads, (h+1)*C/heads)``) and neighbour ``(a, b)`` of a ``k x k`` window with ``r = k // 2``
at ``(i', j') = (i + (a - r) * dilation, j + (b - r) * dilation)``::

    logit[n, h, i, j, a, b] = sum_{c in h} q[n, c, i, j] * (k[n, c, i', j'] + rel[c, a, b])
    out[n, c, i, j] = sum_{a, b} softmax_{a, b}(logit[n, h, i, j]) * v[n, c, i', j']

Neighbours outside the image are excluded from the softmax (masked), not read as zero keys. There
is no ``1/sqrt(d)`` scaling, as in the paper.

Backends (see :mod:`san_det.layers.backend`): ``reference`` (plain unfold, the oracle), ``cpu``
(``kernels/local_attention.cu`` compiled with g++) and ``cuda`` (the same source through CuPy).
"""

import contextlib
import functools
import math
import threading
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .backend import select_backend
from .kernel_runtime import DEFAULT_THREADS, KernelSource

__all__ = ["local_attention", "local_attention_reference", "LocalSelfAttention2d"]


def _check_inputs(q, k, v, rel, num_heads, kernel_size, dilation):
    """Validate :func:`local_attention`'s arguments; raise ``ValueError`` naming the culprit."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a tensor of shape (N, C, H, W), got {type(t)}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}"
            )
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
    if kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    channels = q.shape[1]
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if channels % num_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must divide the channel count C={channels} of q"
        )
    if rel is not None:
        expected = (channels, kernel_size, kernel_size)
        if not torch.is_tensor(rel) or tuple(rel.shape) != expected:
            shape = tuple(rel.shape) if torch.is_tensor(rel) else type(rel)
            raise ValueError(f"rel must have shape (C, k, k) = {expected}, got {shape}")
        if rel.dtype != q.dtype:
            raise ValueError(f"rel must have the dtype of q ({q.dtype}), got {rel.dtype}")
        if rel.device != q.device:
            raise ValueError(f"rel must be on the device of q ({q.device}), got {rel.device}")


def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel: Optional[torch.Tensor] = None,
    *,
    num_heads: int,
    kernel_size: int,
    dilation: int = 1,
) -> torch.Tensor:
    """Readable ``F.unfold`` implementation of :func:`local_attention` (the test oracle).

    Memory grows with ``kernel_size**2 * C``: use it for checking, not for training. Arguments are
    not validated here; :func:`local_attention` does that.
    """
    n, c, h, w = q.shape
    d = c // num_heads
    kk = kernel_size * kernel_size
    pad = (kernel_size // 2) * dilation
    def unfold(x):  # (N, C, H, W) -> (N, heads, d, k*k, H*W); out-of-image entries are 0
        cols = F.unfold(x, kernel_size, dilation=dilation, padding=pad)
        return cols.view(n, num_heads, d, kk, h * w)

    keys = unfold(k)
    if rel is not None:
        keys = keys + rel.reshape(1, num_heads, d, kk, 1)
    logits = (q.reshape(n, num_heads, d, 1, h * w) * keys).sum(dim=2)  # (N, heads, k*k, H*W)
    ones = torch.ones(1, 1, h, w, dtype=q.dtype, device=q.device)
    inside = F.unfold(ones, kernel_size, dilation=dilation, padding=pad).view(1, 1, kk, h * w) > 0
    logits = logits.masked_fill(~inside, float("-inf"))
    attn = torch.softmax(logits, dim=2)  # the centre is always inside: no all-masked row
    out = (attn.unsqueeze(2) * unfold(v)).sum(dim=3)  # (N, heads, d, H*W)
    return out.reshape(n, c, h, w)


@functools.lru_cache(maxsize=None)
def _kernel_source() -> KernelSource:
    return KernelSource("local_attention.cu")


# Work per emulated / GPU thread (see kernels/local_attention.cu): SAN_TJ pixels of a row and
# SAN_CG channels of a head. The CUDA build uses the .cu file's defaults.
_CUDA_TILE = (1, 4)
_CPU_TILE = (8, 1)
_CPU_BLOCK = 16  # emulated threads per block: one OpenMP task runs a block's threads in order
_MAX_CUDA_BLOCKS = 1 << 20
_launch_override = threading.local()


@contextlib.contextmanager
def launch_config(
    grid: Optional[int] = None,
    block: Optional[int] = None,
    cpu_pixels_per_thread: Optional[int] = None,
    cpu_channels_per_thread: Optional[int] = None,
) -> Iterator[None]:
    """Override how the kernels are launched inside this block (for tests).

    Args:
        grid, block: launch every kernel with this grid and block size; a grid much smaller than
            the work makes each thread go round its grid-stride loop.
        cpu_pixels_per_thread, cpu_channels_per_thread: the ``SAN_TJ`` / ``SAN_CG`` tile the CPU
            kernels are compiled with (``1, 4`` runs the CUDA build's code path on the CPU).
    """
    previous = getattr(_launch_override, "value", (None, None, None, None))
    _launch_override.value = (grid, block, cpu_pixels_per_thread, cpu_channels_per_thread)
    try:
        yield
    finally:
        _launch_override.value = previous


class _Launcher:
    """The compiled kernels of one (backend, dtype, device) and how to size their grids."""

    def __init__(self, backend: str, dtype: torch.dtype, device: torch.device):
        grid, block, tj, cg = getattr(_launch_override, "value", (None, None, None, None))
        self.backend = backend
        self.grid, self.block = grid, block
        if backend == "cuda":
            self.tile = _CUDA_TILE
            self.module = _kernel_source().cuda(dtype, device)
        else:
            self.tile = (int(tj or _CPU_TILE[0]), int(cg or _CPU_TILE[1]))
            flags = (f"-DSAN_TJ={self.tile[0]}", f"-DSAN_CG={self.tile[1]}")
            self.module = _kernel_source().cpu(dtype, flags)

    def channel_groups(self, head_dim: int) -> int:
        """Threads per (pixel tile, head) of the kernels that work on channel groups."""
        return -(-head_dim // self.tile[1])

    def __call__(self, name: str, rows: int, width: int, *args) -> None:
        """Run kernel ``name`` over ``rows`` image rows of ``width`` pixels."""
        tj = self.tile[0]
        total = rows * ((width + tj - 1) // tj)
        if total == 0:
            return
        if self.grid is not None or self.block is not None:
            block = self.block or 1
            grid = self.grid or (total + block - 1) // block
        elif self.backend == "cuda":
            block = DEFAULT_THREADS
            grid = min((total + block - 1) // block, _MAX_CUDA_BLOCKS)
        else:
            block = _CPU_BLOCK
            grid = (total + block - 1) // block
        getattr(self.module, name)(grid, block, *args)


class _LocalAttentionFunction(torch.autograd.Function):
    """Kernel-backed local attention; saves the attention probabilities for backward.

    The saved buffer is ``(N, heads, k*k, H, W)`` in the accumulation type (float32 for
    float16/bfloat16/float32, float64 for float64): ``k*k * heads / C`` times the input size.
    """

    @staticmethod
    def forward(ctx, q, k, v, rel, num_heads, kernel_size, dilation, backend):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        rel = rel.contiguous() if rel is not None else None
        n, c, h, w = q.shape
        kk = kernel_size * kernel_size
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        launch = _Launcher(backend, q.dtype, q.device)
        attn = torch.empty(n, num_heads, kk, h, w, dtype=acc_dtype, device=q.device)
        out = torch.empty_like(q)
        shape = (n, c, h, w, num_heads, kernel_size, dilation)
        # The kernels always read rel: zeros stand for "no relative embedding".
        rel_arg = rel if rel is not None else q.new_zeros(c, kernel_size, kernel_size)
        launch("sasa_attention_forward", n * num_heads * h, w, q, k, rel_arg, attn, *shape)
        groups = launch.channel_groups(c // num_heads)
        launch("sasa_output_forward", n * num_heads * groups * h, w, attn, v, out, *shape)
        ctx.save_for_backward(q, k, v, rel_arg, attn)
        ctx.has_rel = rel is not None
        ctx.config = (num_heads, kernel_size, dilation, launch)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, rel, attn = ctx.saved_tensors
        num_heads, kernel_size, dilation, launch = ctx.config
        grad_out = grad_out.contiguous()
        n, c, h, w = q.shape
        kk = kernel_size * kernel_size
        shape = (n, c, h, w, num_heads, kernel_size, dilation)
        dlogit = torch.empty_like(attn)
        launch("sasa_logit_backward", n * num_heads * h, w, grad_out, v, attn, dlogit, *shape)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        groups = launch.channel_groups(c // num_heads)
        launch(
            "sasa_qkv_backward", n * num_heads * groups * h, w,
            q, k, rel, grad_out, attn, dlogit, grad_q, grad_k, grad_v, *shape,
        )  # fmt: skip
        grad_rel = None
        if ctx.has_rel and ctx.needs_input_grad[3]:
            # grad_rel[c, a, b] = sum_{n, i, j} dlogit[n, h(c), a, b, i, j] * q[n, c, i, j]: a plain
            # contraction, left to BLAS / cuBLAS (deterministic, no atomics).
            d = c // num_heads
            q_heads = q.view(n * num_heads, d, h * w).to(attn.dtype)
            dl_heads = dlogit.view(n * num_heads, kk, h * w).transpose(1, 2)
            grad_rel = torch.bmm(q_heads, dl_heads).view(n, num_heads, d, kk).sum(dim=0)
            grad_rel = grad_rel.reshape(c, kernel_size, kernel_size).to(rel.dtype)
        return grad_q, grad_k, grad_v, grad_rel, None, None, None, None


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel: Optional[torch.Tensor] = None,
    *,
    num_heads: int,
    kernel_size: int,
    dilation: int = 1,
) -> torch.Tensor:
    """Multi-head local self-attention with relative position logits (SASA).

    Args:
        q, k, v: queries, keys and values, ``(N, C, H, W)``, same dtype and device; heads are
            contiguous groups of ``C / num_heads`` channels. Non-contiguous tensors are accepted.
        rel: relative position embeddings ``(C, kernel_size, kernel_size)`` added to the keys
            inside the logits (``q . (k + rel)``), or ``None`` for none.
        num_heads: number of heads; must divide ``C``.
        kernel_size: odd window size ``k``.
        dilation: spacing between window taps.

    Returns:
        ``(N, C, H, W)``: per head, the softmax over in-image neighbours of the logits, applied to
        the values. The backend follows the device unless forced (see
        :func:`san_det.layers.backend.use_backend`).
    """
    _check_inputs(q, k, v, rel, num_heads, kernel_size, dilation)
    if q.numel() == 0:
        # Empty batch or image: an empty output still connected to the inputs for autograd.
        out = (q + k + v) * 0
        return out if rel is None else out + rel.sum() * 0
    backend = select_backend(q)
    if backend == "reference":
        return local_attention_reference(
            q, k, v, rel, num_heads=num_heads, kernel_size=kernel_size, dilation=dilation
        )
    if backend == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        # The CPU kernels compute in float32 or float64 only: compute in float32, cast back.
        rel32 = rel.float() if rel is not None else None
        out = _LocalAttentionFunction.apply(
            q.float(), k.float(), v.float(), rel32, num_heads, kernel_size, dilation, backend
        )
        return out.to(q.dtype)
    return _LocalAttentionFunction.apply(q, k, v, rel, num_heads, kernel_size, dilation, backend)


class LocalSelfAttention2d(nn.Module):
    """SASA's stand-alone local self-attention layer, a drop-in for a ``k x k`` convolution.

    ``q = W_q x``, ``k = W_k x``, ``v = W_v x`` are 1x1 convolutions without bias
    (``in_channels -> out_channels``); the logits add learned relative embeddings to the keys:
    inside every head the first half of the head's channels carries a row-offset embedding
    (depends on the window row ``a`` only) and the second half a column-offset embedding (window
    column ``b`` only). ``stride > 1`` runs attention at stride 1 followed by an ``s x s`` average
    pool with stride ``s`` (``ceil_mode``, so the output is ``ceil(H / s) x ceil(W / s)``, the size
    of the strided ``3x3`` convolution with padding 1 that the layer replaces).

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
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("num_heads", num_heads),
            ("stride", stride),
            ("dilation", dilation),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size}")
        if out_channels % num_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must divide out_channels ({out_channels})"
            )
        head_dim = out_channels // num_heads
        if head_dim % 2 != 0:
            raise ValueError(
                f"out_channels / num_heads must be even (row and column embedding halves), "
                f"got out_channels={out_channels}, num_heads={num_heads} (head width {head_dim})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.num_heads = num_heads
        self.stride = stride
        self.dilation = dilation
        self.head_dim = head_dim

        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.value = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        # Row embedding of head h, channel e < head_dim/2 is rel_row[h * head_dim/2 + e, a].
        self.rel_row = nn.Parameter(torch.empty(out_channels // 2, kernel_size))
        self.rel_col = nn.Parameter(torch.empty(out_channels // 2, kernel_size))
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        q, k, v = self.query(x), self.key(x), self.value(x)
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
