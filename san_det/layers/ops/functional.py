"""The attention ops as Python functions: check the arguments, call ``torch.ops.san_det.*``.

SASA local self-attention (Ramachandran et al., NeurIPS 2019, arXiv 1906.05909): for a pixel
``(i, j)``, head ``h`` (channels ``[h*C/heads, (h+1)*C/heads)``) and neighbour ``(a, b)`` of a
``k x k`` window with ``r = k // 2`` at ``(i', j') = (i + (a - r) * dilation, j + (b - r) *
dilation)``::

    logit[n, h, i, j, a, b] = sum_{c in h} q[n, c, i, j] * (k[n, c, i', j'] + rel[c, a, b])
    out[n, c, i, j] = sum_{a, b} softmax_{a, b}(logit[n, h, i, j]) * v[n, c, i', j']

Neighbours outside the image are excluded from the softmax (masked), not read as zero keys. There
is no ``1/sqrt(d)`` scaling, as in the paper.

SAN's local operators (Zhao et al., CVPR 2020; the official code github hszhao/SAN, ``lib/sa``,
same shapes and semantics), in two padding modes:

- ``pad_mode="zeros"``: a neighbour outside the image reads as 0.
- ``pad_mode="reflect"``: a neighbour outside the image reads the mirrored pixel, without repeating
  the edge (like ``nn.ReflectionPad2d``); valid only while ``padding < H`` and ``padding < W``.

For an input of spatial size ``H x W``, a ``k x k`` window (``k`` odd), ``stride``, ``padding`` and
``dilation``, the output has ``L = Ho * Wo`` positions with
``Ho = (H + 2 * padding - (dilation * (k - 1) + 1)) // stride + 1`` (and ``Wo`` alike). Output
position ``(i, j)`` has the window taps ``t = a * k + b`` at padded coordinates
``(i * stride - padding + a * dilation, j * stride - padding + b * dilation)``; its centre is
the tap ``a = b = k // 2``. With the usual ``padding = dilation * (k // 2)`` the centre is the
input pixel ``(i * stride, j * stride)``; with a larger padding the centre itself may fall in the
padding and is then read like any other neighbour (the official kernels read out of bounds there).

- :func:`subtraction` ``(N, C, H, W) -> (N, C, k*k, L)``: ``x[centre] - x[tap]``.
- :func:`subtraction2` ``(N, C, H, W) x 2 -> (N, C, k*k, L)``: ``x1[centre] - x2[tap]``.
- :func:`aggregation` ``(N, C, H, W), (N, Cw, k*k, L) -> (N, C, Ho, Wo)``:
  ``out[n, c, p] = sum_t w[n, c % Cw, t, p] * x[n, c, tap_t(p)]``; ``C`` must be a multiple of
  ``Cw``.

Every entry point takes ``backend=None``: ``"reference"``, ``"cpu"`` or ``"cuda"``, or ``None``
for the one :func:`san_det.layers.backend.select_backend` picks (forced with ``use_backend`` or
``SAN_DET_BACKEND``, else by the device). It is resolved here, once per call, and passed to the
registered op as its last argument; the op's backward runs on the same backend (NATTEN's
functional layout). While ``torch.jit`` traces or ``torch.compile`` compiles, ``None`` is passed
as ``"auto"``: the compiled graph picks the backend each time it runs.

Backward passes use no atomics: the kernels are gathers, the mirrored border strips of reflect
mode are folded back with slice additions (:mod:`.reflect`), and SASA's ``grad_rel`` is a gather
kernel (on CUDA: cuBLAS products over chunks of rows, :mod:`.rel_gradient`, except under
``torch.use_deterministic_algorithms``). So every backward runs in deterministic mode and gives
the same bits run after run there.
"""

from typing import Optional

import torch

from ..backend import select_backend
from . import library  # noqa: F401  (registers torch.ops.san_det.*)
from .checks import (
    check_aggregation_inputs,
    check_local_attention_inputs,
    check_subtraction2_inputs,
    window_geometry,
)
from .reference import neighbourhood as _neighbourhood
from .registry import AUTO, resolve_backend

__all__ = ["aggregation", "local_attention", "neighbourhood", "subtraction", "subtraction2"]

_ops = torch.ops.san_det


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _check(check, *args) -> None:
    """``check(*args)``, except while ``torch.jit`` traces: sizes are traced values then, and the
    traced graph calls the op, which checks the real inputs each time it runs."""
    if not torch.jit.is_tracing():
        check(*args)


def _backend(backend: Optional[str], tensor: torch.Tensor) -> str:
    """The backend name the op gets (see the module docstring)."""
    if _tracing():
        return AUTO if backend is None else backend
    return select_backend(tensor) if backend is None else resolve_backend(backend, tensor)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel: Optional[torch.Tensor] = None,
    *,
    num_heads: int,
    kernel_size: int,
    dilation: int = 1,
    backend: Optional[str] = None,
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
        backend: see the module docstring.

    Returns:
        ``(N, C, H, W)``: per head, the softmax over in-image neighbours of the logits, applied to
        the values (the op ``torch.ops.san_det.local_attention``, whose second output are the
        probabilities).
    """
    _check(check_local_attention_inputs, q, k, v, rel, num_heads, kernel_size, dilation)
    backend = _backend(backend, q)
    return _ops.local_attention(q, k, v, rel, num_heads, kernel_size, dilation, backend)[0]


def subtraction(
    x: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    pad_mode: str = "zeros",
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``out[n, c, t, p] = x[n, c, centre(p)] - x[n, c, tap_t(p)]``.

    Args:
        x: (N, C, H, W) floating tensor.
        kernel_size, stride, padding, dilation: window geometry (``kernel_size`` odd).
        pad_mode: "zeros" or "reflect" (see the module docstring).
        backend: see the module docstring.

    Returns:
        (N, C, kernel_size**2, Ho * Wo).
    """
    _check(window_geometry, x, "x", kernel_size, stride, padding, dilation, pad_mode)
    window = (kernel_size, stride, padding, dilation, pad_mode)
    return _ops.subtraction(x, *window, _backend(backend, x))


def subtraction2(
    x1: torch.Tensor,
    x2: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    pad_mode: str = "zeros",
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``out[n, c, t, p] = x1[n, c, centre(p)] - x2[n, c, tap_t(p)]``.

    Args:
        x1: (N, C, H, W), read at the window centre.
        x2: (N, C, H, W), same shape, dtype and device as ``x1``, read at every tap.

    Returns:
        (N, C, kernel_size**2, Ho * Wo).
    """
    _check(check_subtraction2_inputs, x1, x2, kernel_size, stride, padding, dilation, pad_mode)
    window = (kernel_size, stride, padding, dilation, pad_mode)
    return _ops.subtraction2(x1, x2, *window, _backend(backend, x1))


def aggregation(
    x: torch.Tensor,
    w: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    pad_mode: str = "zeros",
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``out[n, c, p] = sum_t w[n, c % Cw, t, p] * x[n, c, tap_t(p)]``.

    Args:
        x: (N, C, H, W) values.
        w: (N, Cw, kernel_size**2, Ho * Wo) weights; ``C`` must be a multiple of ``Cw``, so channel
            ``c`` uses weight channel ``c % Cw`` (SAN's weight sharing).

    Returns:
        (N, C, Ho, Wo).
    """
    _check(check_aggregation_inputs, x, w, kernel_size, stride, padding, dilation, pad_mode)
    window = (kernel_size, stride, padding, dilation, pad_mode)
    return _ops.aggregation(x, w, *window, _backend(backend, x))


def neighbourhood(
    x: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    pad_mode: str = "zeros",
) -> torch.Tensor:
    """Every window tap of every output position: ``(N, C, H, W) -> (N, C, k*k, Ho*Wo)``.

    Plain PyTorch (``F.unfold`` of the padded input, ``k*k`` times the memory of ``x``), not an
    op: SAM's non-official relations are built on it.
    """
    g = window_geometry(x, "x", kernel_size, stride, padding, dilation, pad_mode)
    return _neighbourhood(x, g)
