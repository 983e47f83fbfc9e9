"""The gradient of SASA's relative embeddings as matrix products, in little extra memory.

``per_image[n, c, t] = sum_{i, j} dlogit[n, h(c), i, t, j] * q[n, c, i, j]`` contracts over the
pixels, which ``q`` (N, C, H, W) holds in one run per channel but ``dlogit`` (N, heads, H, k*k, W,
the kernels' layout) interleaves with the taps. One product per image and head would need all of
``dlogit`` reordered to (taps, pixels): a second ``attn``. Instead the rows go in
:data:`ROW_CHUNKS` chunks: ``q``'s rows of a chunk are a view (cast to the accumulation dtype
chunk by chunk for half precision), the chunk of ``dlogit`` is reordered into one reused buffer,
and each chunk's product is added onto the result. Extra memory: ``ceil(H / ROW_CHUNKS)`` rows of
``dlogit`` (``attn / ROW_CHUNKS`` where ROW_CHUNKS divides H, under twice that from ROW_CHUNKS
rows up, one row on smaller images) plus as many rows of ``q`` in the accumulation dtype.

The products run in the accumulation dtype at its full precision whatever the caller set: they
are in-place (``baddbmm_``), which autocast does not cast, and TF32 (or oneDNN's bf16) for float32
products is switched off around them. That switch is a process-wide flag of PyTorch (there is no
per-thread one), set for the duration of the call and restored.
"""

import contextlib
from typing import Iterator

import torch

__all__ = ["ROW_CHUNKS", "full_precision_matmul", "rel_grad_per_image"]

ROW_CHUNKS = 16


def _matmul_precision_flags(device_type: str):
    """The object whose ``fp32_precision`` governs float32 products on ``device_type``."""
    return torch.backends.cuda.matmul if device_type == "cuda" else torch.backends.mkldnn.matmul


@contextlib.contextmanager
def full_precision_matmul(device_type: str) -> Iterator[None]:
    """float32 matrix products on ``device_type`` in float32 arithmetic, not TF32 or bf16
    (PyTorch's ``fp32_precision = "ieee"``; set through the same API that reads it, so that no
    mix of PyTorch's legacy and new TF32 settings is made)."""
    flags = _matmul_precision_flags(device_type)
    previous = flags.fp32_precision
    flags.fp32_precision = "ieee"
    try:
        yield
    finally:
        flags.fp32_precision = previous


def rel_grad_per_image(
    q: torch.Tensor, dlogit: torch.Tensor, num_heads: int, rows_per_chunk: int = 0
) -> torch.Tensor:
    """``(N, C, k*k)`` in ``dlogit``'s dtype: the per-image gradient of ``rel`` (see the module
    docstring), as one batched product per chunk of rows.

    Args:
        q: ``(N, C, H, W)``, contiguous, any floating dtype.
        dlogit: ``(N, heads, H, k*k, W)``, contiguous, float32 or float64 (the accumulation dtype).
        rows_per_chunk: rows per product; 0 for ``ceil(H / ROW_CHUNKS)``.
    """
    n, c, h, w = q.shape
    kk, acc = dlogit.shape[3], dlogit.dtype
    batch, d = n * num_heads, c // num_heads
    rows = max(1, rows_per_chunk or -(-h // ROW_CHUNKS))
    q_planes = q.view(batch, d, h * w)
    dl_rows = dlogit.view(batch, h, kk, w)
    result = dlogit.new_zeros(batch, d, kk)
    buffer = dlogit.new_empty(batch * kk * min(rows, h) * w)
    with full_precision_matmul(q.device.type):
        for start in range(0, h, rows):
            size = min(rows, h - start)
            chunk = buffer[: batch * kk * size * w].view(batch, kk, size, w)
            chunk.copy_(dl_rows[:, start : start + size].transpose(1, 2))
            q_chunk = q_planes[:, :, start * w : (start + size) * w].to(acc)
            result.baddbmm_(q_chunk, chunk.view(batch, kk, size * w).transpose(1, 2))
    return result.view(n, c, kk)
