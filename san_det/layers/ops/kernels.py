"""The ``cpu`` and ``cuda`` backends: the kernels of ``kernels/*.cu``, forward and backward.

Same signatures and results as :mod:`.reference`. Inputs must be contiguous and of a dtype the
backend computes in (see :func:`~san_det.layers.backend.compute_dtype`); the registered ops
(:mod:`.library`) take care of both.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..launcher import KernelLauncher
from .checks import Geometry
from .reflect import reflection_pad_backward
from .rel_gradient import rel_grad_per_image

__all__ = [
    "STEM_LIMITS",
    "aggregation_forward",
    "aggregation_input_backward",
    "aggregation_weight_backward",
    "attention_stem_backward",
    "attention_stem_forward",
    "attention_stem_pool_backward",
    "attention_stem_pool_forward",
    "local_attention_backward",
    "local_attention_forward",
    "stem_fits_kernels",
    "subtraction2_forward",
    "subtraction_backward",
]

_LOCAL_ATTENTION = KernelLauncher("local_attention.cu")
_SAN_OPS = KernelLauncher("san_ops.cu")
_ATTENTION_STEM = KernelLauncher("attention_stem.cu")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- SASA local attention
# The kernels (kernels/local_attention.cu) read rel transposed to (heads, k*k, head_dim) and keep
# attn / dlogit as (N, heads, H, k*k, W).
def _row_threads(run, kernel: str, rows: int, width: int) -> int:
    """Threads of a row kernel: one per ``tile.pixels`` pixels of each of ``rows`` rows."""
    return rows * -(-width // run.tile(kernel).pixels)


def _row_groups(run, kernel: str, height: int, dilation: int) -> int:
    """Row groups per (image, head) of a kernel that takes ``tile.rows`` rows ``dilation`` apart
    per thread (``sasa_row_groups`` in the kernel source)."""
    rows = run.tile(kernel).rows
    return height if rows == 1 else dilation * -(-height // (rows * dilation))


def _channel_groups(run, kernel: str, head_dim: int) -> int:
    """Threads per (pixel tile, head) of a kernel that works on groups of a head's channels."""
    return -(-head_dim // run.tile(kernel).channels)


def _rel_by_tap(q, rel: Optional[torch.Tensor], num_heads: int, kernel_size: int):
    """``rel`` (C, k, k) as the kernels read it, (heads, k*k, C / heads); zeros without one."""
    c, kk = q.shape[1], kernel_size * kernel_size
    if rel is None:
        return q.new_zeros(num_heads, kk, c // num_heads)
    return rel.reshape(num_heads, c // num_heads, kk).transpose(1, 2).contiguous()


def local_attention_forward(
    backend: str, q, k, v, rel: Optional[torch.Tensor], num_heads: int, kernel_size: int,
    dilation: int,
) -> Tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(out, attn)``; ``attn`` (N, heads, H, k*k, W) is in the accumulation type (float32 for
    float16/bfloat16/float32, float64 for float64). One fused kernel: logits, softmax and the
    weighted sum of the values."""
    n, c, h, w = q.shape
    run = _LOCAL_ATTENTION.bind(backend, q.dtype, q.device)
    attn = q.new_empty(n, num_heads, h, kernel_size * kernel_size, w, dtype=_acc_dtype(q.dtype))
    out = torch.empty_like(q)
    shape = (n, c, h, w, num_heads, kernel_size, dilation)
    rel_t = _rel_by_tap(q, rel, num_heads, kernel_size)
    name = "sasa_forward"
    rows = n * num_heads * _row_groups(run, name, h, dilation)
    run(name, _row_threads(run, name, rows, w), q, k, v, rel_t, attn, out, *shape)
    return out, attn


def local_attention_backward(
    backend: str, grad_out, q, k, v, rel, attn, num_heads: int, kernel_size: int, dilation: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_q, grad_k, grad_v, grad_rel)``, as :func:`.reference.local_attention_backward`.

    ``grad_rel[c, a, b] = sum_{n, i, j} dlogit[n, h(c), i, ab, j] * q[n, c, i, j]``, summed in
    float32 (float64 for float64) without atomics: on the CPU, and on the GPU under
    ``torch.use_deterministic_algorithms(True)`` (cuBLAS would need ``CUBLAS_WORKSPACE_CONFIG``
    there), a kernel per (image, channel group, group of taps); otherwise on the GPU cuBLAS
    products over chunks of rows (:func:`.rel_gradient.rel_grad_per_image`).
    """
    n, c, h, w = q.shape
    kk = kernel_size * kernel_size
    run = _LOCAL_ATTENTION.bind(backend, q.dtype, q.device)
    shape = (n, c, h, w, num_heads, kernel_size, dilation)
    rel_t = _rel_by_tap(q, rel, num_heads, kernel_size)
    # dlogit (like attn) and psum = sum_ab p gv per pixel (N, heads, H, W; dlogit = p (gv - psum))
    # in one allocation: a second, small one between the large ones made glibc return and fault
    # in the 10 MB of dlogit again on every call (2-3 ms at N2 C64 56x56).
    scratch = attn.new_empty(attn.numel() + n * num_heads * h * w)
    dlogit = scratch[: attn.numel()].view(attn.shape)
    psum = scratch[attn.numel() :].view(n, num_heads, h, w)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    name = "sasa_logit_q_backward"
    rows = n * num_heads * _row_groups(run, name, h, dilation)
    run(
        name, _row_threads(run, name, rows, w),
        grad_out, k, v, rel_t, attn, dlogit, psum, grad_q, *shape,
    )  # fmt: skip
    name = "sasa_kv_backward"
    rows = n * num_heads * _channel_groups(run, name, c // num_heads) * h
    run(
        name, _row_threads(run, name, rows, w),
        q, v, grad_out, attn, dlogit, psum, grad_k, grad_v, *shape,
    )  # fmt: skip
    if rel is None:
        grad_rel = q.new_zeros(c, kernel_size, kernel_size)
    else:
        if backend == "cuda" and not torch.are_deterministic_algorithms_enabled():
            per_image = rel_grad_per_image(q, dlogit, num_heads)
        else:
            per_image = attn.new_empty(n, c, kk)
            name = "sasa_rel_backward"
            chunks = -(-kk // run.tile(name).taps)  # one thread per tile.taps taps
            threads = n * num_heads * _channel_groups(run, name, c // num_heads) * chunks
            run(name, threads, q, dlogit, per_image, *shape)
        grad_rel = per_image.sum(dim=0).reshape(c, kernel_size, kernel_size).to(q.dtype)
    return grad_q, grad_k, grad_v, grad_rel


# ----------------------------------------------------------------------------------- SAN ops
# The kernels (kernels/san_ops.cu) work on rows of output (or input) pixels and know only zero
# padding: with reflection they read a reflection-padded copy of the input (as nn.ReflectionPad2d
# does) and see padding 0.
def _window_args(g: Geometry) -> Tuple[int, ...]:
    """The kernels' geometry arguments; with reflection they see the padded input, padding 0."""
    pad = 0 if g.reflect else g.padding
    height, width = g.height + 2 * (g.padding - pad), g.width + 2 * (g.padding - pad)
    return (height, width, g.out_height, g.out_width, g.kernel_size, g.stride, pad, g.dilation)


def _kernel_input(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """What the kernels read for ``x``: itself, or its reflection-padded copy."""
    if g.reflect and g.padding > 0:
        return F.pad(x, (g.padding,) * 4, mode="reflect")
    return x


def _input_grad(grad: torch.Tensor, g: Geometry) -> torch.Tensor:
    """The gradient of the input from that of :func:`_kernel_input`'s result (the mirrored border
    strips folded back onto the pixels they copy, without atomics)."""
    if g.reflect and g.padding > 0:
        return reflection_pad_backward(grad, g.padding)
    return grad


def subtraction2_forward(backend: str, x1, x2, g: Geometry) -> torch.Tensor:
    """``x1[centre] - x2[tap]`` (N, C, k*k, Ho*Wo); one thread per row tile of output pixels."""
    out = x1.new_empty(x1.shape[0], x1.shape[1], g.taps, g.positions)
    run = _SAN_OPS.bind(backend, out.dtype, out.device)
    rows = x1.shape[0] * x1.shape[1] * g.out_height
    same = x2 is x1
    x1 = _kernel_input(x1, g)
    x2 = x1 if same else _kernel_input(x2, g)
    name = "san_subtraction2_forward"
    run(name, _row_threads(run, name, rows, g.out_width), x1, x2, out, rows, *_window_args(g))
    return out


def subtraction_backward(backend: str, grad_out, g: Geometry, centre_sign: int, tap_sign: int):
    """As :func:`.reference.subtraction_backward`; one thread per row tile of input pixels."""
    n, c = grad_out.shape[:2]
    height, width = _window_args(g)[:2]
    grad_in = grad_out.new_empty(n, c, height, width)
    run = _SAN_OPS.bind(backend, grad_out.dtype, grad_out.device)
    rows = n * c * height
    name = "san_subtraction_backward"
    run(
        name, _row_threads(run, name, rows, width),
        grad_out, grad_in, rows, *_window_args(g), centre_sign, tap_sign,
    )  # fmt: skip
    return _input_grad(grad_in, g)


def aggregation_forward(backend: str, x, w, g: Geometry) -> torch.Tensor:
    """``sum_t w[n, c % Cw, t, p] * x[n, c, tap_t(p)]`` (N, C, Ho, Wo); one thread per row tile
    of output pixels and ``tile.channels`` channels sharing a weight channel."""
    n, c = x.shape[:2]
    cw = w.shape[1]
    out = x.new_empty(n, c, g.out_height, g.out_width)
    run = _SAN_OPS.bind(backend, x.dtype, x.device)
    name = "san_aggregation_forward"
    rows = n * cw * _channel_groups(run, name, c // cw) * g.out_height
    run(
        name, _row_threads(run, name, rows, g.out_width),
        _kernel_input(x, g), w, out, n * c * g.out_height, c, cw, *_window_args(g),
    )  # fmt: skip
    return out


def aggregation_input_backward(backend: str, grad_out, w, g: Geometry) -> torch.Tensor:
    """As :func:`.reference.aggregation_input_backward`."""
    n, c = grad_out.shape[:2]
    cw = w.shape[1]
    height, width = _window_args(g)[:2]
    grad_x = grad_out.new_empty(n, c, height, width)
    run = _SAN_OPS.bind(backend, grad_out.dtype, grad_out.device)
    name = "san_aggregation_input_backward"
    rows = n * cw * _channel_groups(run, name, c // cw) * height
    run(
        name, _row_threads(run, name, rows, width),
        grad_out, w, grad_x, n * c * height, c, cw, *_window_args(g),
    )  # fmt: skip
    return _input_grad(grad_x, g)


def aggregation_weight_backward(backend: str, grad_out, x, cw: int, g: Geometry) -> torch.Tensor:
    """As :func:`.reference.aggregation_weight_backward`; one thread per row tile of output
    pixels of one weight channel."""
    n, c = x.shape[:2]
    grad_w = x.new_empty(n, cw, g.taps, g.positions)
    run = _SAN_OPS.bind(backend, x.dtype, x.device)
    rows = n * cw * g.out_height
    name = "san_aggregation_weight_backward"
    run(
        name, _row_threads(run, name, rows, g.out_width),
        grad_out, _kernel_input(x, g), grad_w, rows, c, cw, *_window_args(g),
    )  # fmt: skip
    return grad_w


# ------------------------------------------------------------------------------- attention stem
# The kernels (kernels/attention_stem.cu) take the stem's derived matrices (see
# :mod:`.attention_stem`): ``qk (heads, C_in, F)`` and ``w_eff (b*b, C_in, C)`` in the
# accumulation dtype. A thread holds a tile's blocks in arrays of fixed size, hence the limits.
#: ``(block size, input channels, b*b * head width)`` the kernels take at most.
STEM_LIMITS = (4, 4, 256)
# The backward's threads each add into their own part of the weight gradients: at most this many
# parts (CPU: per OpenMP block of emulated threads; CUDA: enough threads to fill a GPU).
_STEM_PARTS = {"cpu": 16, "cuda": 8192}  # CPU: times the threads
# The pooled forward's parts are (2, C) channel sums only: on the GPU one part per tile up to
# this many (8192 threads would fill 32 blocks of 256, a quarter of an H100's SMs).
_STEM_SUM_PARTS = {"cpu": 16, "cuda": 65536}


def stem_fits_kernels(c_in: int, channels: int, num_heads: int, block_size: int) -> bool:
    """Whether the stem kernels take this geometry (:data:`STEM_LIMITS`)."""
    max_b, max_c_in, max_values = STEM_LIMITS
    head_dim = channels // num_heads
    return block_size <= max_b and c_in <= max_c_in and block_size**2 * head_dim <= max_values


def _stem_tiles(run, kernel: str, x: torch.Tensor, block_size: int) -> int:
    n, _, h, w = x.shape
    blocks_h, blocks_w = -(-h // block_size), -(-w // block_size)
    return n * blocks_h * -(-blocks_w // run.tile(kernel).pixels)


def attention_stem_forward(backend: str, x, qk, w_eff, num_heads: int, block_size: int):
    """The stem's attention output ``(N, C, H, W)`` from the image ``x (N, C_in, H, W)``."""
    n, c_in, h, w = x.shape
    c = w_eff.shape[2]
    out = x.new_empty(n, c, h, w)
    run = _ATTENTION_STEM.bind(backend, x.dtype, x.device)
    name = "stem_forward"
    tiles = _stem_tiles(run, name, x, block_size)
    run(name, tiles, x, qk, w_eff, out, n, c_in, h, w, c, num_heads, block_size)
    return out


def _stem_items(
    run, kernel: str, backend: str, x: torch.Tensor, block_size: int, limits=_STEM_PARTS
):
    """``(tiles per item, items)``: kernels whose threads add into their own part of a sum take
    items of tiles, at most ``limits[backend]`` of them."""
    tiles = _stem_tiles(run, kernel, x, block_size)
    max_parts = limits[backend] * (torch.get_num_threads() if backend == "cpu" else 1)
    per_part = -(-tiles // max_parts)
    return per_part, -(-tiles // per_part)


def attention_stem_backward(
    backend: str, grad_out, x, qk, w_eff, num_heads: int, block_size: int, input_grad: bool
):
    """``(grad_qk, grad_w_eff, grad_x)`` (``grad_x`` None unless ``input_grad``)."""
    return _stem_backward(
        backend, "stem_backward", (grad_out,), x, qk, w_eff, num_heads, block_size, input_grad
    )


def attention_stem_pool_forward(backend: str, x, qk, w_eff, sign, num_heads: int, block_size: int):
    """The stem's attention output max-pooled over its blocks by ``sign (C,)`` and its channel
    sums, without the output: ``(pooled (N, C, nH, nW), position uint8 (N, C, nH, nW),
    sums float64 (2, C))`` (see :func:`.attention_stem.pool_impl`)."""
    n, c_in, h, w = x.shape
    c = w_eff.shape[2]
    blocks_h, blocks_w = -(-h // block_size), -(-w // block_size)
    pooled = x.new_empty(n, c, blocks_h, blocks_w)
    position = torch.empty(pooled.shape, dtype=torch.uint8, device=x.device)
    run = _ATTENTION_STEM.bind(backend, x.dtype, x.device)
    name = "stem_pool_forward"
    per_part, parts = _stem_items(run, name, backend, x, block_size, _STEM_SUM_PARTS)
    part_sums = torch.zeros(parts, 2, c, dtype=torch.float64, device=x.device)
    sign = sign.to(qk.dtype).contiguous()
    run(
        name, parts,
        x, qk, w_eff, sign, pooled, position, part_sums,
        n, c_in, h, w, c, num_heads, block_size, per_part,
    )  # fmt: skip
    return pooled, position, part_sums.sum(0)


def attention_stem_pool_backward(
    backend: str, grad_pooled, grad_sums, position, x, qk, w_eff, num_heads: int,
    block_size: int, input_grad: bool,
):  # fmt: skip
    """:func:`attention_stem_backward` for :func:`attention_stem_pool_forward`'s outputs, from
    the gradients of ``pooled`` and ``sums``."""
    need_y = bool(grad_sums[1].any())  # the output's own term
    inputs = (grad_pooled, position, grad_sums.to(qk.dtype).contiguous(), int(need_y))
    return _stem_backward(
        backend, "stem_pool_backward", inputs, x, qk, w_eff, num_heads, block_size, input_grad
    )


def _stem_backward(backend, name, gradient, x, qk, w_eff, num_heads, block_size, input_grad):
    """Run backward kernel ``name`` with the output's ``gradient`` arguments."""
    n, c_in, h, w = x.shape
    c = w_eff.shape[2]
    run = _ATTENTION_STEM.bind(backend, x.dtype, x.device)
    lanes = run.tile(name).pixels
    per_part, parts = _stem_items(run, name, backend, x, block_size)
    part_qk = qk.new_zeros(parts, *qk.shape, lanes)
    part_w = w_eff.new_zeros(parts, *w_eff.shape, lanes)
    grad_x = torch.empty_like(x) if input_grad else x.new_empty(0)
    run(
        name, parts,
        x, *gradient, qk, w_eff, part_qk, part_w, grad_x,
        n, c_in, h, w, c, num_heads, block_size, per_part, int(input_grad),
    )  # fmt: skip
    grad_qk, grad_w = part_qk.sum(dim=(0, -1)), part_w.sum(dim=(0, -1))
    return grad_qk, grad_w, (grad_x if input_grad else None)
