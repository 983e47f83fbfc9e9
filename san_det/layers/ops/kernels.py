"""The ``cpu`` and ``cuda`` backends: the kernels of ``kernels/*.cu``, forward and backward.

Same signatures and results as :mod:`.reference`. Inputs must be contiguous and of a dtype the
backend computes in (see :func:`~san_det.layers.backend.compute_dtype`); the registered ops
(:mod:`.library`) take care of both.
"""

from typing import Optional, Tuple

import torch

from ..launcher import KernelLauncher
from .checks import Geometry

__all__ = [
    "aggregation_forward",
    "aggregation_input_backward",
    "aggregation_weight_backward",
    "local_attention_backward",
    "local_attention_forward",
    "subtraction2_forward",
    "subtraction_backward",
]

_LOCAL_ATTENTION = KernelLauncher("local_attention.cu")
_SAN_OPS = KernelLauncher("san_ops.cu")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- SASA local attention
def _row_threads(run, kernel: str, rows: int, width: int) -> int:
    """Threads of a row kernel: one per ``tile.pixels`` pixels of each of ``rows`` rows."""
    return rows * -(-width // run.tile(kernel).pixels)


def local_attention_forward(
    backend: str, q, k, v, rel: Optional[torch.Tensor], num_heads: int, kernel_size: int,
    dilation: int,
) -> Tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(out, attn)``; ``attn`` (N, heads, k*k, H, W) is in the accumulation type (float32 for
    float16/bfloat16/float32, float64 for float64)."""
    n, c, h, w = q.shape
    run = _LOCAL_ATTENTION.bind(backend, q.dtype, q.device)
    attn = q.new_empty(n, num_heads, kernel_size * kernel_size, h, w, dtype=_acc_dtype(q.dtype))
    out = torch.empty_like(q)
    shape = (n, c, h, w, num_heads, kernel_size, dilation)
    # The kernels always read rel: zeros stand for "no relative embedding".
    rel = rel if rel is not None else q.new_zeros(c, kernel_size, kernel_size)
    name = "sasa_attention_forward"
    run(name, _row_threads(run, name, n * num_heads * h, w), q, k, rel, attn, *shape)
    name = "sasa_output_forward"
    rows = n * num_heads * _channel_groups(run, name, c // num_heads) * h
    run(name, _row_threads(run, name, rows, w), attn, v, out, *shape)
    return out, attn


def _channel_groups(run, kernel: str, head_dim: int) -> int:
    """Threads per (pixel tile, head) of a kernel that works on groups of a head's channels."""
    return -(-head_dim // run.tile(kernel).channels)


def local_attention_backward(
    backend: str, grad_out, q, k, v, rel, attn, num_heads: int, kernel_size: int, dilation: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_q, grad_k, grad_v, dlogit)``, as :func:`.reference.local_attention_backward`."""
    n, c, h, w = q.shape
    run = _LOCAL_ATTENTION.bind(backend, q.dtype, q.device)
    shape = (n, c, h, w, num_heads, kernel_size, dilation)
    rel = rel if rel is not None else q.new_zeros(c, kernel_size, kernel_size)
    dlogit = torch.empty_like(attn)
    name = "sasa_logit_backward"
    run(name, _row_threads(run, name, n * num_heads * h, w), grad_out, v, attn, dlogit, *shape)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    name = "sasa_qkv_backward"
    rows = n * num_heads * _channel_groups(run, name, c // num_heads) * h
    run(
        name, _row_threads(run, name, rows, w),
        q, k, rel, grad_out, attn, dlogit, grad_q, grad_k, grad_v, *shape,
    )  # fmt: skip
    return grad_q, grad_k, grad_v, dlogit


# ----------------------------------------------------------------------------------- SAN ops
def _window_args(g: Geometry) -> Tuple[int, ...]:
    return (
        g.height,
        g.width,
        g.out_height,
        g.out_width,
        g.kernel_size,
        g.stride,
        g.padding,
        g.dilation,
        int(g.reflect),
    )


def _run_san(backend: str, kernel: str, out, outputs_per_thread: int, inputs, scalars):
    """Run a kernel of san_ops.cu that writes ``out``: its arguments are ``*inputs, out, total,
    *scalars``, one thread per ``outputs_per_thread`` outputs (``total`` threads)."""
    total = out.numel() // outputs_per_thread
    _SAN_OPS.bind(backend, out.dtype, out.device)(kernel, total, *inputs, out, total, *scalars)
    return out


def subtraction2_forward(backend: str, x1, x2, g: Geometry) -> torch.Tensor:
    """``x1[centre] - x2[tap]`` (N, C, k*k, Ho*Wo); one thread per (n, c, position)."""
    out = x1.new_empty(x1.shape[0], x1.shape[1], g.taps, g.positions)
    return _run_san(backend, "san_subtraction2_forward", out, g.taps, (x1, x2), _window_args(g))


def subtraction_backward(backend: str, grad_out, g: Geometry, centre_sign: int, tap_sign: int):
    """As :func:`.reference.subtraction_backward`."""
    grad_in = grad_out.new_empty(grad_out.shape[0], grad_out.shape[1], g.height, g.width)
    scalars = (*_window_args(g), centre_sign, tap_sign)
    return _run_san(backend, "san_subtraction_backward", grad_in, 1, (grad_out,), scalars)


def aggregation_forward(backend: str, x, w, g: Geometry) -> torch.Tensor:
    """``sum_t w[n, c % Cw, t, p] * x[n, c, tap_t(p)]`` (N, C, Ho, Wo)."""
    n, c = x.shape[:2]
    out = x.new_empty(n, c, g.out_height, g.out_width)
    scalars = (c, w.shape[1], *_window_args(g))
    return _run_san(backend, "san_aggregation_forward", out, 1, (x, w), scalars)


def aggregation_input_backward(backend: str, grad_out, w, g: Geometry) -> torch.Tensor:
    """As :func:`.reference.aggregation_input_backward`."""
    n, c = grad_out.shape[:2]
    grad_x = grad_out.new_empty(n, c, g.height, g.width)
    scalars = (c, w.shape[1], *_window_args(g))
    return _run_san(backend, "san_aggregation_input_backward", grad_x, 1, (grad_out, w), scalars)


def aggregation_weight_backward(backend: str, grad_out, x, cw: int, g: Geometry) -> torch.Tensor:
    """As :func:`.reference.aggregation_weight_backward`; one thread per (n, cw, position)."""
    n, c = x.shape[:2]
    grad_w = x.new_empty(n, cw, g.taps, g.positions)
    scalars = (c, cw, *_window_args(g))
    return _run_san(
        backend, "san_aggregation_weight_backward", grad_w, g.taps, (grad_out, x), scalars
    )
