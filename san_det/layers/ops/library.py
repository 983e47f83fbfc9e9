"""The attention ops as PyTorch operators in the ``san_det`` namespace (``torch.ops.san_det.*``).

Each op is a ``torch.library.custom_op`` with a schema, CPU and CUDA implementations (any device
for the attention stem's tensor operations), a fake (shape-only) implementation for
``torch.compile`` / ``torch.export``, an autograd formula whose backward is itself a registered
op, and an autocast rule (not the stem's); so compilers, exporters, tracers and FLOP counters see
one node per op call instead of Python code. :data:`OP_TABLE` lists them, one
:class:`~.registry.OpSpec` each, and :func:`~.registry.register_op` registers them:

- ``local_attention(q, k, v, rel?, num_heads, kernel_size, dilation) -> (out, attn)``, backward
  ``local_attention_backward``;
- ``subtraction(x, kernel_size, stride, padding, dilation, pad_mode)`` and
  ``subtraction2(x1, x2, kernel_size, ...)``, backward ``subtraction_backward``;
- ``aggregation(x, w, kernel_size, ...)``, backward ``aggregation_input_backward`` and
  ``aggregation_weight_backward``;
- ``attention_stem(x, query_weight, key_weight, value_weight, rel_row, rel_col, mixture_probs,
  num_heads, block_size)``, backward ``attention_stem_backward`` (:mod:`.attention_stem`; its
  ``reference`` backend, tensor operations, runs on any device);
- ``attention_stem_pool(x, ..., mixture_probs, pool_sign, num_heads, block_size) -> (pooled,
  position, sums)``, backward ``attention_stem_pool_backward``: the stem's output reduced to what
  its norm and max pool need, without the output itself (:mod:`.attention_stem`).

Every op ends in ``backend: str = "auto"`` (see :mod:`.registry`: the entry points of
:mod:`.functional` pass the resolved name, a forward passes its own to its backward).

``local_attention`` also returns the attention probabilities ``attn`` (N, heads, H, k*k, W: the
k*k taps of an image row together, as the kernels read them) in the accumulation dtype (float64
for float64, else float32), which its backward reads; they are not differentiable. The backward
returns the gradients of ``q``, ``k``, ``v`` and ``rel`` (zeros when there is no ``rel``).

Autocast (CUDA and CPU): like convolutions, the forward ops run in the autocast dtype; float32
inputs are cast to it (float64 inputs are left alone, as autocast does), and the kernels
accumulate float16 and bfloat16 in float32.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import attention_stem as stem
from . import kernels, reference
from .checks import (
    accumulation_dtype,
    check_aggregation_gradient,
    check_aggregation_inputs,
    check_local_attention_gradient,
    check_local_attention_inputs,
    check_san_gradient,
    check_subtraction2_inputs,
    check_weight_gradient,
    sized_geometry,
    window_geometry,
)
from .registry import AUTO, OpSpec, prepared, register_op, resolve_backend

__all__ = ["OPS", "OP_TABLE"]


# ------------------------------------------------------------------------ SASA local attention
def _local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel: Optional[Tensor],
    num_heads: int,
    kernel_size: int,
    dilation: int,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    check_local_attention_inputs(q, k, v, rel, num_heads, kernel_size, dilation)
    backend = resolve_backend(backend, q)
    if backend == "reference":
        out, attn = reference.local_attention_forward(
            q, k, v, rel, num_heads, kernel_size, dilation
        )
        return out, attn.to(accumulation_dtype(q.dtype))
    storage = q.dtype
    q, k, v, rel = prepared(backend, storage, q, k, v, rel)
    out, attn = kernels.local_attention_forward(
        backend, q, k, v, rel, num_heads, kernel_size, dilation
    )
    return out.to(storage), attn


def _local_attention_fake(q, k, v, rel, num_heads, kernel_size, dilation, backend="auto"):
    check_local_attention_inputs(q, k, v, rel, num_heads, kernel_size, dilation)
    n, _, h, w = q.shape
    kk = kernel_size * kernel_size
    attn = q.new_empty(n, num_heads, h, kk, w, dtype=accumulation_dtype(q.dtype))
    return q.new_empty(q.shape), attn


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
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    check_local_attention_inputs(q, k, v, rel, num_heads, kernel_size, dilation)
    check_local_attention_gradient(grad_out, q, attn, num_heads, kernel_size)
    backend = resolve_backend(backend, q)
    if backend == "reference":
        return reference.local_attention_backward(
            grad_out, q, k, v, rel, attn, num_heads, kernel_size, dilation
        )
    storage = q.dtype
    grad_out, q, k, v, rel = prepared(backend, storage, grad_out, q, k, v, rel)
    grads = kernels.local_attention_backward(
        backend, grad_out, q, k, v, rel, attn.contiguous(), num_heads, kernel_size, dilation
    )
    return tuple(g.to(storage) for g in grads)


def _local_attention_backward_fake(grad_out, q, k, v, rel, attn, num_heads, kernel_size,
                                   dilation, backend="auto"):  # fmt: skip
    check_local_attention_inputs(q, k, v, rel, num_heads, kernel_size, dilation)
    check_local_attention_gradient(grad_out, q, attn, num_heads, kernel_size)
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty(q.shape[1], kernel_size, kernel_size),
    )


def _setup_local_attention(ctx, inputs, output):
    q, k, v, rel, num_heads, kernel_size, dilation, backend = inputs
    attn = output[1]
    ctx.mark_non_differentiable(attn)
    # attn never receives a gradient: without this autograd would fill one of its size with zeros.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, rel, attn)
    ctx.window = (num_heads, kernel_size, dilation)
    ctx.backend = backend


def _local_attention_grads(ctx, grad_out, _grad_attn):
    q, k, v, rel, attn = ctx.saved_tensors
    if grad_out is None:  # the output is not used by what is differentiated
        return (None,) * 8
    grad_q, grad_k, grad_v, grad_rel = torch.ops.san_det.local_attention_backward(
        grad_out, q, k, v, rel, attn, *ctx.window, ctx.backend
    )
    if rel is None or not ctx.needs_input_grad[3]:
        grad_rel = None
    return grad_q, grad_k, grad_v, grad_rel, None, None, None, None


# ----------------------------------------------------------------------------------- SAN ops
# The SAN ops' schemas are written out (their implementations take the window as ``*args``): each
# has its tensors and sizes, the window (kernel_size, stride, padding, dilation, pad_mode), and
# the backend last.
_WINDOW = "SymInt kernel_size, SymInt stride, SymInt padding, SymInt dilation, str pad_mode"
_NOT_DIFFERENTIABLE = (None,) * 6


def _san_schema(*arguments: str) -> str:
    return "(" + ", ".join(arguments) + ', str backend="auto") -> Tensor'


def _split(args, count: int, backend: str):
    """``args`` (the ``count`` arguments after an op's tensors and sizes, then the backend unless it
    is left to its default or given by keyword) as ``(*those, backend)``."""
    return (*args[:count], args[count] if len(args) > count else backend)


def _dispatch(backend: str, like: Tensor, reference_op, kernel_op, tensors, *args) -> Tensor:
    """``reference_op(*tensors, *args)`` or, on a kernel backend, ``kernel_op(backend, *tensors,
    *args)`` on the prepared tensors, returned in ``like``'s dtype."""
    backend = resolve_backend(backend, like)
    if backend == "reference":
        return reference_op(*tensors, *args)
    storage = like.dtype
    return kernel_op(backend, *prepared(backend, storage, *tensors), *args).to(storage)


def _taps_like(x: Tensor, g) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1], g.taps, g.positions)


def _subtraction(x: Tensor, *args, backend=AUTO) -> Tensor:
    *window, backend = _split(args, 5, backend)
    return _subtraction2_impl(x, x, window_geometry(x, "x", *window), backend)


def _subtraction_fake(x, *args, backend=AUTO):
    return _taps_like(x, window_geometry(x, "x", *args[:5]))


def _subtraction2(x1: Tensor, x2: Tensor, *args, backend=AUTO) -> Tensor:
    *window, backend = _split(args, 5, backend)
    return _subtraction2_impl(x1, x2, check_subtraction2_inputs(x1, x2, *window), backend)


def _subtraction2_impl(x1: Tensor, x2: Tensor, g, backend: str) -> Tensor:
    reference_op, kernel_op = reference.subtraction2_reference, kernels.subtraction2_forward
    return _dispatch(backend, x1, reference_op, kernel_op, (x1, x2), g)


def _subtraction2_fake(x1, x2, *args, backend=AUTO):
    return _taps_like(x1, check_subtraction2_inputs(x1, x2, *args[:5]))


def _subtraction_backward_geometry(grad_out: Tensor, height: int, width: int, *window):
    g = sized_geometry(height, width, "the input", *window)
    check_san_gradient(grad_out, "grad_out", None, g.taps, g.positions)
    return g


def _subtraction_backward(grad_out: Tensor, height: int, width: int, *args, backend=AUTO):
    """Gradient of ``centre_sign * x[centre] - tap_sign * x[tap]`` for an input ``height x
    width``; ``subtraction`` has signs (1, 1), ``subtraction2`` (1, 0) for x1 and (0, 1) for x2.
    ``args``: the window, ``centre_sign``, ``tap_sign``, the backend."""
    *window, centre_sign, tap_sign, backend = _split(args, 7, backend)
    g = _subtraction_backward_geometry(grad_out, height, width, *window)
    reference_op, kernel_op = reference.subtraction_backward, kernels.subtraction_backward
    return _dispatch(
        backend, grad_out, reference_op, kernel_op, (grad_out,), g, centre_sign, tap_sign
    )


def _subtraction_backward_fake(grad_out, height, width, *args, backend=AUTO):
    _subtraction_backward_geometry(grad_out, height, width, *args[:5])
    return grad_out.new_empty(grad_out.shape[0], grad_out.shape[1], height, width)


def _window_setup(tensors: int, save: bool):
    """``setup_context`` of a SAN op whose first ``tensors`` inputs are tensors, then its window
    ``(kernel_size, stride, padding, dilation, pad_mode)`` and its backend."""

    def setup(ctx, inputs, output):
        ctx.size = (inputs[0].shape[2], inputs[0].shape[3])
        ctx.window = tuple(inputs[tensors:-1])
        ctx.backend = inputs[-1]
        if save:
            ctx.save_for_backward(*inputs[:tensors])

    return setup


def _subtraction_grad(ctx, grad_out, centre_sign: int, tap_sign: int) -> Tensor:
    return torch.ops.san_det.subtraction_backward(
        grad_out, *ctx.size, *ctx.window, centre_sign, tap_sign, ctx.backend
    )


def _subtraction_grads(ctx, grad_out):
    return (_subtraction_grad(ctx, grad_out, 1, 1),) + _NOT_DIFFERENTIABLE


def _subtraction2_grads(ctx, grad_out):
    grad1 = _subtraction_grad(ctx, grad_out, 1, 0) if ctx.needs_input_grad[0] else None
    grad2 = _subtraction_grad(ctx, grad_out, 0, 1) if ctx.needs_input_grad[1] else None
    return (grad1, grad2) + _NOT_DIFFERENTIABLE


def _aggregation(x: Tensor, w: Tensor, *args, backend=AUTO) -> Tensor:
    *window, backend = _split(args, 5, backend)
    g = check_aggregation_inputs(x, w, *window)
    reference_op, kernel_op = reference.aggregation_reference, kernels.aggregation_forward
    return _dispatch(backend, x, reference_op, kernel_op, (x, w), g)


def _aggregation_fake(x, w, *args, backend=AUTO):
    g = check_aggregation_inputs(x, w, *args[:5])
    return x.new_empty(x.shape[0], x.shape[1], g.out_height, g.out_width)


def _aggregation_input_geometry(grad_out: Tensor, w: Tensor, height: int, width: int, *window):
    g = sized_geometry(height, width, "x", *window)
    check_aggregation_gradient(grad_out, w, g)
    return g


def _aggregation_input_backward(grad_out: Tensor, w: Tensor, height: int, width: int, *args,
                                backend=AUTO):  # fmt: skip
    """Gradient of ``aggregation`` with respect to ``x`` (N, C, height, width)."""
    *window, backend = _split(args, 5, backend)
    g = _aggregation_input_geometry(grad_out, w, height, width, *window)
    reference_op = reference.aggregation_input_backward
    kernel_op = kernels.aggregation_input_backward
    return _dispatch(backend, grad_out, reference_op, kernel_op, (grad_out, w), g)


def _aggregation_input_backward_fake(grad_out, w, height, width, *args, backend=AUTO):
    _aggregation_input_geometry(grad_out, w, height, width, *args[:5])
    return grad_out.new_empty(grad_out.shape[0], grad_out.shape[1], height, width)


def _aggregation_weight_backward(grad_out: Tensor, x: Tensor, weight_channels: int, *args,
                                 backend=AUTO):  # fmt: skip
    """Gradient of ``aggregation`` with respect to ``w`` (N, weight_channels, k*k, Ho*Wo)."""
    *window, backend = _split(args, 5, backend)
    g = check_weight_gradient(grad_out, x, weight_channels, *window)
    reference_op = reference.aggregation_weight_backward
    kernel_op = kernels.aggregation_weight_backward
    return _dispatch(backend, x, reference_op, kernel_op, (grad_out, x), weight_channels, g)


def _aggregation_weight_backward_fake(grad_out, x, weight_channels, *args, backend=AUTO):
    g = check_weight_gradient(grad_out, x, weight_channels, *args[:5])
    return x.new_empty(x.shape[0], weight_channels, g.taps, g.positions)


def _aggregation_grads(ctx, grad_out):
    x, w = ctx.saved_tensors
    ops = torch.ops.san_det
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = ops.aggregation_input_backward(grad_out, w, *ctx.size, *ctx.window, ctx.backend)
    if ctx.needs_input_grad[1]:
        grad_w = ops.aggregation_weight_backward(grad_out, x, w.shape[1], *ctx.window, ctx.backend)
    return (grad_x, grad_w) + _NOT_DIFFERENTIABLE


# -------------------------------------------------------------------------------------- table
# Every op of the namespace, backward ops before the forward ops whose autograd calls them.
OP_TABLE = (
    OpSpec("local_attention_backward", _local_attention_backward, _local_attention_backward_fake),
    OpSpec("subtraction_backward", _subtraction_backward, _subtraction_backward_fake,
           schema=_san_schema("Tensor grad_out, SymInt height, SymInt width", _WINDOW,
                              "SymInt centre_sign, SymInt tap_sign")),
    OpSpec("aggregation_input_backward", _aggregation_input_backward,
           _aggregation_input_backward_fake,
           schema=_san_schema("Tensor grad_out, Tensor w, SymInt height, SymInt width", _WINDOW)),
    OpSpec("aggregation_weight_backward", _aggregation_weight_backward,
           _aggregation_weight_backward_fake,
           schema=_san_schema("Tensor grad_out, Tensor x, SymInt weight_channels", _WINDOW)),
    OpSpec("local_attention", _local_attention, _local_attention_fake, _local_attention_grads,
           _setup_local_attention, autocast=True),
    OpSpec("subtraction", _subtraction, _subtraction_fake, _subtraction_grads,
           _window_setup(1, save=False), autocast=True, schema=_san_schema("Tensor x", _WINDOW)),
    OpSpec("subtraction2", _subtraction2, _subtraction2_fake, _subtraction2_grads,
           _window_setup(2, save=False), autocast=True,
           schema=_san_schema("Tensor x1, Tensor x2", _WINDOW)),
    OpSpec("aggregation", _aggregation, _aggregation_fake, _aggregation_grads,
           _window_setup(2, save=True), autocast=True,
           schema=_san_schema("Tensor x, Tensor w", _WINDOW)),
    # any device: the reference backend is plain tensor operations
    OpSpec("attention_stem_backward", stem.backward_impl, stem.backward_fake, device_types=None,
           schema=stem.BACKWARD_SCHEMA),
    OpSpec("attention_stem", stem.impl, stem.fake, stem.grads, stem.setup_context,
           device_types=None),
    OpSpec("attention_stem_pool_backward", stem.pool_backward_impl, stem.pool_backward_fake,
           device_types=None, schema=stem.POOL_BACKWARD_SCHEMA),
    OpSpec("attention_stem_pool", stem.pool_impl, stem.pool_fake, stem.pool_grads,
           stem.pool_setup_context, device_types=None),
)  # fmt: skip

# Every registered op by its name in the namespace.
OPS = {spec.name: register_op(spec) for spec in OP_TABLE}
