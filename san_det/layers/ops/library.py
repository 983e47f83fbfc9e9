"""The attention ops as PyTorch operators in the ``san_det`` namespace (``torch.ops.san_det.*``).

Each op is a ``torch.library.custom_op`` with a schema, CPU and CUDA implementations, a fake
(shape-only) implementation for ``torch.compile`` / ``torch.export``, an autograd formula whose
backward is itself a registered op, and an autocast rule; so compilers, exporters, tracers and
FLOP counters see one node per op call instead of Python code.

- ``local_attention(q, k, v, rel?, num_heads, kernel_size, dilation) -> (out, attn)``, backward
  ``local_attention_backward``;
- ``subtraction(x, kernel_size, stride, padding, dilation, pad_mode)`` and
  ``subtraction2(x1, x2, kernel_size, ...)``, backward ``subtraction_backward``;
- ``aggregation(x, w, kernel_size, ...)``, backward ``aggregation_input_backward`` and
  ``aggregation_weight_backward``.

``local_attention`` also returns the attention probabilities ``attn`` (N, heads, H, k*k, W: the
k*k taps of an image row together, as the kernels read them) in the accumulation dtype (float64
for float64, else float32), which its backward reads; they are not differentiable. The backward
returns the gradients of ``q``, ``k``, ``v`` and ``rel`` (zeros when there is no ``rel``).

Which code computes a call is decided when it runs (not when it is traced or compiled), by
:func:`~san_det.layers.backend.select_backend`: the readable PyTorch of :mod:`.reference` or the
kernels of :mod:`.kernels`. In eager mode a backend forced around a forward pass also computes
its backward, even where autograd runs the backward in another thread (CUDA); a compiled backward
sees the backend forced when it runs.

Autocast (CUDA and CPU): like convolutions, the ops run in the autocast dtype; float32 inputs are
cast to it (float64 inputs are left alone, as autocast does), and the kernels accumulate float16
and bfloat16 in float32.
"""

import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..backend import compute_dtype, forced_backend, select_backend, use_backend
from ..launcher import current_override, restored_override
from . import kernels, reference
from .checks import (
    accumulation_dtype,
    check_aggregation_inputs,
    check_local_attention_gradient,
    check_local_attention_inputs,
    check_san_gradient,
    check_subtraction2_inputs,
    sized_geometry,
    window_geometry,
)

__all__ = ["OPS"]

_DEVICES = ("cpu", "cuda")


# ----------------------------------------------------------------------------------- helpers
def _prepared(backend: str, storage: torch.dtype, *tensors):
    """The tensors contiguous, those of dtype ``storage`` in the dtype ``backend`` computes in."""
    target = compute_dtype(backend, storage)
    return [
        None if t is None else (t.to(target) if t.dtype == storage else t).contiguous()
        for t in tensors
    ]


def _dispatch_state():
    """What decides the backend and launch of an op, as a backward pass needs to see it."""
    return forced_backend(), current_override()


@contextlib.contextmanager
def _restored(state) -> Iterator[None]:
    backend, override = state
    with use_backend(backend), restored_override(override):
        yield


# ------------------------------------------------------------------------ SASA local attention
@torch.library.custom_op("san_det::local_attention", mutates_args=(), device_types=_DEVICES)
def _local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel: Optional[Tensor],
    num_heads: int,
    kernel_size: int,
    dilation: int,
) -> Tuple[Tensor, Tensor]:
    check_local_attention_inputs(q, k, v, rel, num_heads, kernel_size, dilation)
    backend = select_backend(q)
    if backend == "reference":
        out, attn = reference.local_attention_forward(
            q, k, v, rel, num_heads, kernel_size, dilation
        )
        return out, attn.to(accumulation_dtype(q.dtype))
    storage = q.dtype
    q, k, v, rel = _prepared(backend, storage, q, k, v, rel)
    out, attn = kernels.local_attention_forward(
        backend, q, k, v, rel, num_heads, kernel_size, dilation
    )
    return out.to(storage), attn


@_local_attention.register_fake
def _(q, k, v, rel, num_heads, kernel_size, dilation):
    check_local_attention_inputs(q, k, v, rel, num_heads, kernel_size, dilation)
    n, _, h, w = q.shape
    kk = kernel_size * kernel_size
    attn = q.new_empty(n, num_heads, h, kk, w, dtype=accumulation_dtype(q.dtype))
    return q.new_empty(q.shape), attn


@torch.library.custom_op(
    "san_det::local_attention_backward", mutates_args=(), device_types=_DEVICES
)
def _local_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel: Optional[Tensor],
    attn: Tensor,
    num_heads: int,
    kernel_size: int,
    dilation: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    check_local_attention_inputs(q, k, v, rel, num_heads, kernel_size, dilation)
    check_local_attention_gradient(grad_out, q, attn, num_heads, kernel_size)
    backend = select_backend(q)
    if backend == "reference":
        return reference.local_attention_backward(
            grad_out, q, k, v, rel, attn, num_heads, kernel_size, dilation
        )
    storage = q.dtype
    grad_out, q, k, v, rel = _prepared(backend, storage, grad_out, q, k, v, rel)
    grads = kernels.local_attention_backward(
        backend, grad_out, q, k, v, rel, attn.contiguous(), num_heads, kernel_size, dilation
    )
    return tuple(g.to(storage) for g in grads)


@_local_attention_backward.register_fake
def _(grad_out, q, k, v, rel, attn, num_heads, kernel_size, dilation):
    check_local_attention_inputs(q, k, v, rel, num_heads, kernel_size, dilation)
    check_local_attention_gradient(grad_out, q, attn, num_heads, kernel_size)
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty(q.shape[1], kernel_size, kernel_size),
    )


def _setup_local_attention(ctx, inputs, output):
    q, k, v, rel, num_heads, kernel_size, dilation = inputs
    attn = output[1]
    ctx.mark_non_differentiable(attn)
    # attn never receives a gradient: without this autograd would fill one of its size with zeros.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, rel, attn)
    ctx.window = (num_heads, kernel_size, dilation)
    ctx.state = _dispatch_state()


def _local_attention_grads(ctx, grad_out, _grad_attn):
    q, k, v, rel, attn = ctx.saved_tensors
    num_heads, kernel_size, dilation = ctx.window
    if grad_out is None:  # the output is not used by what is differentiated
        return None, None, None, None, None, None, None
    with _restored(ctx.state):
        grad_q, grad_k, grad_v, grad_rel = _local_attention_backward(
            grad_out, q, k, v, rel, attn, num_heads, kernel_size, dilation
        )
    if rel is None or not ctx.needs_input_grad[3]:
        grad_rel = None
    return grad_q, grad_k, grad_v, grad_rel, None, None, None


_local_attention.register_autograd(_local_attention_grads, setup_context=_setup_local_attention)


# ----------------------------------------------------------------------------------- SAN ops
def _subtraction2_impl(x1: Tensor, x2: Tensor, g) -> Tensor:
    backend = select_backend(x1)
    if backend == "reference":
        return reference.subtraction2_reference(x1, x2, g)
    storage = x1.dtype
    x1, x2 = _prepared(backend, storage, x1, x2)
    return kernels.subtraction2_forward(backend, x1, x2, g).to(storage)


def _taps_like(x: Tensor, g) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1], g.taps, g.positions)


@torch.library.custom_op("san_det::subtraction", mutates_args=(), device_types=_DEVICES)
def _subtraction(
    x: Tensor, kernel_size: int, stride: int, padding: int, dilation: int, pad_mode: str
) -> Tensor:
    g = window_geometry(x, "x", kernel_size, stride, padding, dilation, pad_mode)
    return _subtraction2_impl(x, x, g)


@_subtraction.register_fake
def _(x, kernel_size, stride, padding, dilation, pad_mode):
    return _taps_like(x, window_geometry(x, "x", kernel_size, stride, padding, dilation, pad_mode))


@torch.library.custom_op("san_det::subtraction2", mutates_args=(), device_types=_DEVICES)
def _subtraction2(
    x1: Tensor,
    x2: Tensor,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    pad_mode: str,
) -> Tensor:
    g = check_subtraction2_inputs(x1, x2, kernel_size, stride, padding, dilation, pad_mode)
    return _subtraction2_impl(x1, x2, g)


@_subtraction2.register_fake
def _(x1, x2, kernel_size, stride, padding, dilation, pad_mode):
    window = (kernel_size, stride, padding, dilation, pad_mode)
    return _taps_like(x1, check_subtraction2_inputs(x1, x2, *window))


@torch.library.custom_op("san_det::subtraction_backward", mutates_args=(), device_types=_DEVICES)
def _subtraction_backward(
    grad_out: Tensor,
    height: int,
    width: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    pad_mode: str,
    centre_sign: int,
    tap_sign: int,
) -> Tensor:
    """Gradient of ``centre_sign * x[centre] - tap_sign * x[tap]`` for an input ``height x
    width``; ``subtraction`` has signs (1, 1), ``subtraction2`` (1, 0) for x1 and (0, 1) for x2."""
    window = (kernel_size, stride, padding, dilation, pad_mode)
    g = sized_geometry(height, width, "the input", *window)
    check_san_gradient(grad_out, "grad_out", None, g.taps, g.positions)
    backend = select_backend(grad_out)
    if backend == "reference":
        return reference.subtraction_backward(grad_out, g, centre_sign, tap_sign)
    storage = grad_out.dtype
    (grad_out,) = _prepared(backend, storage, grad_out)
    return kernels.subtraction_backward(backend, grad_out, g, centre_sign, tap_sign).to(storage)


@_subtraction_backward.register_fake
def _(grad_out, height, width, kernel_size, stride, padding, dilation, pad_mode, *signs):
    g = sized_geometry(height, width, "the input", kernel_size, stride, padding, dilation, pad_mode)
    check_san_gradient(grad_out, "grad_out", None, g.taps, g.positions)
    return grad_out.new_empty(grad_out.shape[0], grad_out.shape[1], height, width)


def _window_setup(tensors: int, save: bool):
    """``setup_context`` of a SAN op whose first ``tensors`` inputs are tensors and the rest its
    window ``(kernel_size, stride, padding, dilation, pad_mode)``."""

    def setup(ctx, inputs, output):
        ctx.size = (inputs[0].shape[2], inputs[0].shape[3])
        ctx.window = tuple(inputs[tensors:])
        ctx.state = _dispatch_state()
        if save:
            ctx.save_for_backward(*inputs[:tensors])

    return setup


def _subtraction_grad(ctx, grad_out, centre_sign: int, tap_sign: int) -> Tensor:
    with _restored(ctx.state):
        return _subtraction_backward(grad_out, *ctx.size, *ctx.window, centre_sign, tap_sign)


def _subtraction_grads(ctx, grad_out):
    return (_subtraction_grad(ctx, grad_out, 1, 1),) + (None,) * 5


def _subtraction2_grads(ctx, grad_out):
    grad1 = _subtraction_grad(ctx, grad_out, 1, 0) if ctx.needs_input_grad[0] else None
    grad2 = _subtraction_grad(ctx, grad_out, 0, 1) if ctx.needs_input_grad[1] else None
    return (grad1, grad2) + (None,) * 5


_subtraction.register_autograd(_subtraction_grads, setup_context=_window_setup(1, save=False))
_subtraction2.register_autograd(_subtraction2_grads, setup_context=_window_setup(2, save=False))


@torch.library.custom_op("san_det::aggregation", mutates_args=(), device_types=_DEVICES)
def _aggregation(
    x: Tensor,
    w: Tensor,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    pad_mode: str,
) -> Tensor:
    g = check_aggregation_inputs(x, w, kernel_size, stride, padding, dilation, pad_mode)
    backend = select_backend(x)
    if backend == "reference":
        return reference.aggregation_reference(x, w, g)
    storage = x.dtype
    x, w = _prepared(backend, storage, x, w)
    return kernels.aggregation_forward(backend, x, w, g).to(storage)


@_aggregation.register_fake
def _(x, w, kernel_size, stride, padding, dilation, pad_mode):
    g = check_aggregation_inputs(x, w, kernel_size, stride, padding, dilation, pad_mode)
    return x.new_empty(x.shape[0], x.shape[1], g.out_height, g.out_width)


@torch.library.custom_op(
    "san_det::aggregation_input_backward", mutates_args=(), device_types=_DEVICES
)
def _aggregation_input_backward(
    grad_out: Tensor,
    w: Tensor,
    height: int,
    width: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    pad_mode: str,
) -> Tensor:
    """Gradient of ``aggregation`` with respect to ``x`` (N, C, height, width)."""
    g = sized_geometry(height, width, "x", kernel_size, stride, padding, dilation, pad_mode)
    _check_aggregation_gradient(grad_out, w, g)
    backend = select_backend(grad_out)
    if backend == "reference":
        return reference.aggregation_input_backward(grad_out, w, g)
    storage = grad_out.dtype
    grad_out, w = _prepared(backend, storage, grad_out, w)
    return kernels.aggregation_input_backward(backend, grad_out, w, g).to(storage)


def _check_aggregation_gradient(grad_out, w, g) -> None:
    check_san_gradient(grad_out, "grad_out", None, g.out_height, g.out_width)
    check_san_gradient(w, "w", None, g.taps, g.positions)
    n, c = grad_out.shape[:2]
    if w.shape[0] != n or w.shape[1] < 1 or c % w.shape[1] != 0 or w.dtype != grad_out.dtype:
        raise ValueError(
            f"w {tuple(w.shape)} ({w.dtype}) does not fit grad_out {tuple(grad_out.shape)} "
            f"({grad_out.dtype})"
        )


@_aggregation_input_backward.register_fake
def _(grad_out, w, height, width, kernel_size, stride, padding, dilation, pad_mode):
    g = sized_geometry(height, width, "x", kernel_size, stride, padding, dilation, pad_mode)
    _check_aggregation_gradient(grad_out, w, g)
    return grad_out.new_empty(grad_out.shape[0], grad_out.shape[1], height, width)


@torch.library.custom_op(
    "san_det::aggregation_weight_backward", mutates_args=(), device_types=_DEVICES
)
def _aggregation_weight_backward(
    grad_out: Tensor,
    x: Tensor,
    weight_channels: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    pad_mode: str,
) -> Tensor:
    """Gradient of ``aggregation`` with respect to ``w`` (N, weight_channels, k*k, Ho*Wo)."""
    g = _check_weight_gradient(grad_out, x, weight_channels, kernel_size, stride, padding,
                               dilation, pad_mode)  # fmt: skip
    backend = select_backend(x)
    if backend == "reference":
        return reference.aggregation_weight_backward(grad_out, x, weight_channels, g)
    storage = x.dtype
    grad_out, x = _prepared(backend, storage, grad_out, x)
    return kernels.aggregation_weight_backward(backend, grad_out, x, weight_channels, g).to(storage)


def _check_weight_gradient(grad_out, x, weight_channels, *window):
    g = window_geometry(x, "x", *window)
    check_san_gradient(grad_out, "grad_out", x, g.out_height, g.out_width)
    if weight_channels < 1 or x.shape[1] % weight_channels != 0:
        raise ValueError(
            f"weight_channels must divide the channels of x ({x.shape[1]}), got {weight_channels}"
        )
    return g


@_aggregation_weight_backward.register_fake
def _(grad_out, x, weight_channels, kernel_size, stride, padding, dilation, pad_mode):
    g = _check_weight_gradient(grad_out, x, weight_channels, kernel_size, stride, padding,
                               dilation, pad_mode)  # fmt: skip
    return x.new_empty(x.shape[0], weight_channels, g.taps, g.positions)


def _aggregation_grads(ctx, grad_out):
    x, w = ctx.saved_tensors
    grad_x = grad_w = None
    with _restored(ctx.state):
        if ctx.needs_input_grad[0]:
            grad_x = _aggregation_input_backward(grad_out, w, *ctx.size, *ctx.window)
        if ctx.needs_input_grad[1]:
            grad_w = _aggregation_weight_backward(grad_out, x, w.shape[1], *ctx.window)
    return (grad_x, grad_w) + (None,) * 5


_aggregation.register_autograd(_aggregation_grads, setup_context=_window_setup(2, save=True))


# ----------------------------------------------------------------------------------- autocast
_AUTOCAST_LIBRARY = torch.library.Library("san_det", "IMPL")
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _register_autocast(name: str, op, device_type: str) -> None:
    """Run ``op`` in the active autocast dtype of ``device_type`` (float64 stays float64)."""

    def cast(value):
        if torch.is_tensor(value) and value.is_floating_point() and value.dtype != torch.float64:
            return value.to(torch.get_autocast_dtype(device_type))
        return value

    def autocast_kernel(*args):
        with torch.autocast(device_type, enabled=False):
            return op(*(cast(a) for a in args))

    _AUTOCAST_LIBRARY.impl(name, autocast_kernel, _AUTOCAST_KEYS[device_type])


# Every op by its name in the namespace; the forward ops are the first four.
OPS = {
    "local_attention": _local_attention,
    "subtraction": _subtraction,
    "subtraction2": _subtraction2,
    "aggregation": _aggregation,
    "local_attention_backward": _local_attention_backward,
    "subtraction_backward": _subtraction_backward,
    "aggregation_input_backward": _aggregation_input_backward,
    "aggregation_weight_backward": _aggregation_weight_backward,
}
for _name in ("local_attention", "subtraction", "subtraction2", "aggregation"):
    for _device_type in _AUTOCAST_KEYS:
        _register_autocast(_name, OPS[_name], _device_type)
