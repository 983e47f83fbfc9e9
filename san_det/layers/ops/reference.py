"""Readable PyTorch statements of every op, forward and backward: the ``reference`` backend.

They are the test oracle, so they favour plain ``F.unfold`` / ``F.fold`` over speed; memory grows
with ``kernel_size**2`` times the input. Arguments are not checked here (see :mod:`.checks`).

The backward functions take the same saved tensors as the kernels' (:mod:`.kernels`) and return
the same gradients, so that both backends sit behind one registered backward op; the tests check
them against autograd through the forward functions.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .checks import Geometry
from .reflect import reflection_pad_backward

__all__ = [
    "aggregation_input_backward",
    "aggregation_reference",
    "aggregation_weight_backward",
    "local_attention_backward",
    "local_attention_forward",
    "local_attention_reference",
    "neighbourhood",
    "subtraction2_reference",
    "subtraction_backward",
]


# --------------------------------------------------------------------------- SASA local attention
def _unfold_heads(x, num_heads, kernel_size, dilation):
    """(N, C, H, W) -> (N, heads, C / heads, k*k, H*W); out-of-image entries are 0."""
    n, c, h, w = x.shape
    pad = (kernel_size // 2) * dilation
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=pad)
    return cols.view(n, num_heads, c // num_heads, kernel_size * kernel_size, h * w)


def _fold_heads(cols, shape, kernel_size, dilation):
    """Adjoint of :func:`_unfold_heads`: sum every window entry back onto its pixel."""
    n, c, h, w = shape
    pad = (kernel_size // 2) * dilation
    cols = cols.reshape(n, c * kernel_size * kernel_size, h * w)
    return F.fold(cols, (h, w), kernel_size, dilation=dilation, padding=pad)


def local_attention_forward(
    q, k, v, rel: Optional[torch.Tensor], num_heads: int, kernel_size: int, dilation: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out (N, C, H, W), attn (N, heads, H, k*k, W))``: the output and the probabilities (the
    k*k taps of an image row together, the layout the kernels read)."""
    n, c, h, w = q.shape
    kk = kernel_size * kernel_size
    if q.numel() == 0:
        return q.new_zeros(q.shape), q.new_zeros(n, num_heads, h, kk, w)
    d = c // num_heads
    keys = _unfold_heads(k, num_heads, kernel_size, dilation)
    if rel is not None:
        keys = keys + rel.reshape(1, num_heads, d, kk, 1)
    logits = (q.reshape(n, num_heads, d, 1, h * w) * keys).sum(dim=2)  # (N, heads, k*k, H*W)
    ones = q.new_ones(1, 1, h, w)
    pad = (kernel_size // 2) * dilation
    inside = F.unfold(ones, kernel_size, dilation=dilation, padding=pad).view(1, 1, kk, h * w) > 0
    logits = logits.masked_fill(~inside, float("-inf"))
    attn = torch.softmax(logits, dim=2)  # the centre is always inside: no all-masked row
    out = (attn.unsqueeze(2) * _unfold_heads(v, num_heads, kernel_size, dilation)).sum(dim=3)
    return out.reshape(n, c, h, w), attn.view(n, num_heads, kk, h, w).transpose(2, 3).contiguous()


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
    """Readable ``F.unfold`` implementation of :func:`~san_det.layers.ops.local_attention`.

    Memory grows with ``kernel_size**2 * C``: use it for checking, not for training. Arguments are
    not validated here; :func:`~san_det.layers.ops.local_attention` does that.
    """
    return local_attention_forward(q, k, v, rel, num_heads, kernel_size, dilation)[0]


def local_attention_backward(
    grad_out, q, k, v, rel, attn, num_heads: int, kernel_size: int, dilation: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_q, grad_k, grad_v, grad_rel)`` from the probabilities ``attn`` of the forward.

    ``grad_rel`` (C, k, k) is zero without ``rel``. Masked neighbours have ``attn == 0``, hence no
    gradient.
    """
    n, c, h, w = q.shape
    d, kk = c // num_heads, kernel_size * kernel_size
    if q.numel() == 0:
        zeros = q.new_zeros(c, kernel_size, kernel_size)
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), zeros
    p = attn.to(q.dtype).transpose(2, 3).reshape(n, num_heads, 1, kk, h * w)
    g = grad_out.reshape(n, num_heads, d, 1, h * w)
    q_heads = q.reshape(n, num_heads, d, 1, h * w)
    keys = _unfold_heads(k, num_heads, kernel_size, dilation)
    if rel is not None:
        keys = keys + rel.reshape(1, num_heads, d, kk, 1)
    values = _unfold_heads(v, num_heads, kernel_size, dilation)
    # softmax backward: dlogit = p * (dp - sum_taps p * dp), dp = g . values
    dp = (g * values).sum(dim=2, keepdim=True)
    dlogit = p * (dp - (p * dp).sum(dim=3, keepdim=True))
    grad_q = (dlogit * keys).sum(dim=3).reshape(n, c, h, w)
    grad_k = _fold_heads(dlogit * q_heads, q.shape, kernel_size, dilation)
    grad_v = _fold_heads(p * g, q.shape, kernel_size, dilation)
    if rel is None:
        grad_rel = q.new_zeros(c, kernel_size, kernel_size)
    else:  # grad_rel[c, a, b] = sum_{n, i, j} dlogit[n, h(c), a, b, i, j] * q[n, c, i, j]
        grad_rel = (dlogit * q_heads).sum(dim=(0, 4)).reshape(c, kernel_size, kernel_size)
    return grad_q, grad_k, grad_v, grad_rel


# ----------------------------------------------------------------------------------- SAN ops
def neighbourhood(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Every window tap of every output position: ``(N, C, H, W) -> (N, C, k*k, Ho*Wo)``.

    Plain ``F.unfold`` of the (zero- or reflection-) padded input.
    """
    n, c = x.shape[:2]
    padding = g.padding
    if g.reflect and padding > 0:
        x = F.pad(x, (padding, padding, padding, padding), mode="reflect")
        padding = 0
    if n == 0 or c == 0:
        return x.new_zeros(n, c, g.taps, g.positions) + x.sum() * 0
    cols = F.unfold(x, g.kernel_size, dilation=g.dilation, padding=padding, stride=g.stride)
    return cols.view(n, c, g.taps, g.positions)


def _neighbourhood_adjoint(cols: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Adjoint of :func:`neighbourhood`: ``(N, C, k*k, L) -> (N, C, H, W)``, each entry summed
    onto the input pixel it reads (through the mirror, for reflection padding)."""
    n, c = cols.shape[:2]
    if n == 0 or c == 0:
        return cols.new_zeros(n, c, g.height, g.width)
    cols = cols.reshape(n, c * g.taps, g.positions)
    window = dict(kernel_size=g.kernel_size, dilation=g.dilation, stride=g.stride)
    if g.reflect and g.padding > 0:
        p = g.padding
        padded = F.fold(cols, (g.height + 2 * p, g.width + 2 * p), padding=0, **window)
        return reflection_pad_backward(padded, p)
    return F.fold(cols, (g.height, g.width), padding=g.padding, **window)


def subtraction2_reference(x1: torch.Tensor, x2: torch.Tensor, g: Geometry) -> torch.Tensor:
    """``x1[centre] - x2[tap]``: (N, C, k*k, Ho*Wo)."""
    centre = g.taps // 2
    return neighbourhood(x1, g)[:, :, centre : centre + 1] - neighbourhood(x2, g)


def subtraction_backward(
    grad_out: torch.Tensor, g: Geometry, centre_sign: int, tap_sign: int
) -> torch.Tensor:
    """Gradient of ``centre_sign * x[centre] - tap_sign * x[tap]`` for one input (N, C, H, W)."""
    cols = -tap_sign * grad_out
    centre = g.taps // 2
    cols[:, :, centre] += centre_sign * grad_out.sum(dim=2)
    return _neighbourhood_adjoint(cols, g)


def aggregation_reference(x: torch.Tensor, w: torch.Tensor, g: Geometry) -> torch.Tensor:
    """``sum_t w[n, c % Cw, t, p] * x[n, c, tap_t(p)]``: (N, C, Ho, Wo)."""
    n, c = x.shape[:2]
    cw = w.shape[1]
    cols = neighbourhood(x, g).view(n, c // cw, cw, g.taps, g.positions)
    out = (cols * w.unsqueeze(1)).sum(dim=3)
    return out.reshape(n, c, g.out_height, g.out_width)


def aggregation_input_backward(grad_out: torch.Tensor, w: torch.Tensor, g: Geometry):
    """Gradient of :func:`aggregation_reference` with respect to ``x``."""
    n, c = grad_out.shape[:2]
    cw = w.shape[1]
    go = grad_out.reshape(n, c // cw, cw, 1, g.positions)
    cols = (w.unsqueeze(1) * go).reshape(n, c, g.taps, g.positions)
    return _neighbourhood_adjoint(cols, g)


def aggregation_weight_backward(grad_out: torch.Tensor, x: torch.Tensor, cw: int, g: Geometry):
    """Gradient of :func:`aggregation_reference` with respect to ``w`` (N, Cw, k*k, Ho*Wo)."""
    n, c = x.shape[:2]
    cols = neighbourhood(x, g).view(n, c // cw, cw, g.taps, g.positions)
    go = grad_out.reshape(n, c // cw, cw, 1, g.positions)
    return (cols * go).sum(dim=1)
