"""SASA's attention stem as one registered op: ``torch.ops.san_det.attention_stem``.

The stem (:class:`~san_det.layers.attention_stem.SpatiallyAwareAttentionStem`) attends inside
``b x b`` blocks of a ``C_in``-channel image (``C_in = 3``) with ``C = heads * d`` channels.
With so few input channels the projections never need to exist at full resolution:

- logits: ``q_p . k_j = x_p^T (Wq_h^T Wk_h) x_j`` and ``q_p . r_{j-p} = x_p^T (Wq_h^T r_h)``, so
  per head a ``C_in x C_in`` matrix ``A_h`` and ``C_in x (2b - 1)`` row/column matrices give the
  logits from the image directly; inside a block they are one product per block,
  ``Q (heads * b*b, C_in + 2b) @ K (C_in + 2b, b*b)``, where the query side holds ``A_h^T x_p``
  and the relative terms gathered per key row/column, the key side ``x_j`` and one-hot rows and
  columns of the key (the query side of a whole chunk is one product with a matrix that is
  block-diagonal over the block positions: 16 times the multiply-adds needed, but one large
  product instead of b*b products with three-wide inputs, which is faster on a CPU);
- values: the mixture weights ``p(a, b, m)`` depend only on the position in the block, so
  ``W_eff(j) = sum_m p(j, m) W_V^m`` gives ``b*b`` effective ``C x C_in`` value matrices and the
  ``M`` value projections are never formed.

Backends. ``reference``: plain tensor operations on any device, block-row by block-row in chunks
of about :data:`CHUNK_BLOCKS` blocks, so the ``(heads, b*b, b*b)`` logits exist for one chunk at a
time. ``cpu`` and ``cuda``: the kernels of ``kernels/attention_stem.cu`` (:mod:`.kernels`), which
hold a block's logits in registers and never form more than the output, for the geometries of
:data:`.kernels.STEM_LIMITS` (the papers' stem: ``b = 4``, three input channels, 8 channels per
head); ``auto`` takes the reference for others. Both backward passes recompute the logits from the
saved input (three channels) instead of keeping them. Padded keys (image sides that are not
multiples of ``b``) are masked, as in the module's reference. float64 computes in float64, other
dtypes in float32.

``torch.ops.san_det.attention_stem_pool`` (:func:`pool_impl`) is the same attention followed by
what the stem's BatchNorm and ``b x b`` max pool need of its output: per channel and block the
output where ``sign * output`` is largest, and the channel sums of the output and its square
(:mod:`san_det.layers.norm_pool` turns them into the normalised pooled output). The kernels
compute these while a block's output is in registers and never write the output; the backward
recomputes it where the gradient of the squares' sum needs it.
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .kernels import STEM_LIMITS, stem_fits_kernels
from .registry import AUTO, prepared, resolve_backend

__all__ = ["CHUNK_BLOCKS"]

#: blocks per chunk: the chunk's logits (``CHUNK_BLOCKS * heads * b^4`` values) stay in cache.
CHUNK_BLOCKS = 256


# ----------------------------------------------------------------------------------- geometry
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(x: Tensor, wq: Tensor, wv: Tensor, rel_row: Tensor, num_heads: int, b: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"attention_stem: x must be (N, C_in, H, W), got {tuple(x.shape)}")
    c, c_in = wq.shape[0], x.shape[1]
    if wq.shape != (c, c_in) or wv.dim() != 2 or wv.shape[1] != c_in or wv.shape[0] % c:
        raise ValueError(
            f"attention_stem: weights must be (C, {c_in}) and (M * C, {c_in}), got "
            f"{tuple(wq.shape)} and {tuple(wv.shape)}"
        )
    if c % num_heads or (c // num_heads) % 2 or rel_row.shape != (c // 2, 2 * b - 1):
        raise ValueError(
            f"attention_stem: {num_heads} heads of even width must divide C={c} and rel must be "
            f"(C / 2, 2b - 1) = ({c // 2}, {2 * b - 1}), got {tuple(rel_row.shape)}"
        )


def _indices(b: int, c_in: int, device) -> Tuple[Tensor, Tensor]:
    """Index ``(b*b, C_in + 2b)`` into one head's ``[A_h^T x | x^T R_row | x^T R_col]``
    columns, and the key-side one-hots ``(2b, b*b)``."""
    pos = torch.arange(b * b, device=device)
    row, col = pos // b, pos % b
    shift = torch.arange(b, device=device)
    own = torch.arange(c_in, device=device).expand(b * b, c_in)
    # Query p, key row r: relative row offset r - row(p), stored at column c_in + offset + b - 1.
    rows = c_in + shift[None, :] - row[:, None] + b - 1
    cols = c_in + 2 * b - 1 + shift[None, :] - col[:, None] + b - 1
    index = torch.cat([own, rows, cols], dim=1)
    one_hot = torch.cat([row[None, :] == shift[:, None], col[None, :] == shift[:, None]])
    return index, one_hot


def _derived(wq, wk, wv, rel_row, rel_col, probs, num_heads: int, b: int):
    """The small matrices the op works with.

    Returns ``ar (C_in, heads, C_in + 2(2b - 1))``: ``A_h`` then the row and column relative
    matrices of head ``h`` (``x_p^T ar[:, h]`` is the query side of the logits) and
    ``w_eff (b*b, C_in, C)``.
    """
    c, c_in = wq.shape
    d, m = c // num_heads, wv.shape[0] // c
    half = d // 2
    wq_h, wk_h = wq.view(num_heads, d, c_in), wk.view(num_heads, d, c_in)
    a = wq_h.transpose(1, 2) @ wk_h  # (heads, C_in, C_in)
    r_row = wq_h[:, :half].transpose(1, 2) @ rel_row.view(num_heads, half, 2 * b - 1)
    r_col = wq_h[:, half:].transpose(1, 2) @ rel_col.view(num_heads, half, 2 * b - 1)
    ar = torch.cat([a, r_row, r_col], dim=2).transpose(0, 1)
    w_eff = (probs @ wv.view(m, c * c_in)).view(b * b, c, c_in).transpose(1, 2)
    return ar.contiguous(), w_eff.contiguous()


def _derived_backward(grad_ar, grad_w_eff, wq, wk, wv, rel_row, rel_col, probs, num_heads, b):
    """Gradients of :func:`_derived`'s inputs from those of its outputs."""
    c, c_in = wq.shape
    d, m = c // num_heads, wv.shape[0] // c
    half, offsets = d // 2, 2 * b - 1
    wq_h, wk_h = wq.view(num_heads, d, c_in), wk.view(num_heads, d, c_in)
    g = grad_ar.transpose(0, 1)  # (heads, C_in, C_in + 2 offsets)
    g_a, g_row, g_col = g[..., :c_in], g[..., c_in : c_in + offsets], g[..., c_in + offsets :]
    rel_row_h = rel_row.view(num_heads, half, offsets)
    rel_col_h = rel_col.view(num_heads, half, offsets)
    grad_wq = wk_h @ g_a.transpose(1, 2)
    grad_wq[:, :half] += rel_row_h @ g_row.transpose(1, 2)
    grad_wq[:, half:] += rel_col_h @ g_col.transpose(1, 2)
    grad_wk = wq_h @ g_a
    grad_rel_row = (wq_h[:, :half] @ g_row).reshape(c // 2, offsets)
    grad_rel_col = (wq_h[:, half:] @ g_col).reshape(c // 2, offsets)
    g_w = grad_w_eff.transpose(1, 2).reshape(b * b, c * c_in)
    grad_wv = (probs.t() @ g_w).view(m * c, c_in)
    grad_probs = g_w @ wv.view(m, c * c_in).t()
    grad_wq, grad_wk = grad_wq.reshape(c, c_in), grad_wk.reshape(c, c_in)
    return grad_wq, grad_wk, grad_wv, grad_rel_row, grad_rel_col, grad_probs


class _Plan:
    """Padding, block grid, chunking and the derived matrices of one call."""

    def __init__(self, x, wq, wk, wv, rel_row, rel_col, probs, num_heads: int, b: int):
        self.n, self.c_in, self.h, self.w = x.shape
        self.b, self.heads, self.c = b, num_heads, wq.shape[0]
        self.hp, self.wp = -(-self.h // b) * b, -(-self.w // b) * b
        self.nh, self.nw = self.hp // b, self.wp // b
        self.rows_per_chunk = max(1, CHUNK_BLOCKS // self.nw)
        self.ar, self.w_eff = _derived(wq, wk, wv, rel_row, rel_col, probs, num_heads, b)
        self.index, one_hot = _indices(b, self.c_in, x.device)
        self.one_hot = one_hot.to(x.dtype)
        # Query side of the logits, (b*b * C_in, heads * b*b * (C_in + 2b)): block-diagonal over
        # the block positions p, so that one product of the chunk's (blocks, b*b * C_in) pixels
        # gives every query row in the (block, head, p) order of the logits product.
        qmat = self.ar[:, :, self.index]  # (C_in, heads, b*b, C_in + 2b)
        pp, c_in, k = b * b, self.c_in, self.index.shape[1]
        self.qmat = qmat.new_zeros(pp, c_in, num_heads, pp, k)
        torch.diagonal(self.qmat, dim1=0, dim2=3).copy_(qmat.transpose(2, 3))
        self.qmat = self.qmat.view(pp * c_in, -1)

    def chunks(self):
        for n in range(self.n):
            for r0 in range(0, self.nh, self.rows_per_chunk):
                yield n, r0, min(r0 + self.rows_per_chunk, self.nh)

    def pad(self, t: Tensor) -> Tensor:
        if (self.hp, self.wp) == (self.h, self.w):
            return t
        return F.pad(t, (0, self.wp - self.w, 0, self.hp - self.h))

    def crop(self, t: Tensor) -> Tensor:
        if (self.hp, self.wp) == (self.h, self.w):
            return t
        return t[:, :, : self.h, : self.w].contiguous()

    def key_padding(self, r0: int, r1: int, device) -> "Tensor | None":
        """``(blocks, b*b)`` True at padded pixels of block rows ``r0:r1``, None if none."""
        b = self.b
        if r1 * b <= self.h and self.wp == self.w:
            return None
        rows = torch.arange(r0 * b, r1 * b, device=device).view(r1 - r0, 1, b, 1) >= self.h
        cols = torch.arange(self.wp, device=device).view(1, self.nw, 1, b) >= self.w
        return (rows | cols).reshape((r1 - r0) * self.nw, b * b)

    def blocks(self, t: Tensor, r0: int, r1: int) -> Tensor:
        """Rows ``r0:r1`` of blocks of ``t (C_in, Hp, Wp)`` as ``(blocks, b*b, C_in)``."""
        b, c = self.b, t.shape[0]
        t = t[:, r0 * b : r1 * b].reshape(c, r1 - r0, b, self.nw, b)
        return t.permute(1, 3, 2, 4, 0).reshape((r1 - r0) * self.nw, b * b, c).contiguous()

    def to_image(self, t: Tensor, r0: int, r1: int) -> Tensor:
        """``(blocks, b*b, C_in)`` back to rows ``r0:r1`` of the image, ``(C_in, rows, Wp)``."""
        b, c = self.b, t.shape[2]
        t = t.reshape(r1 - r0, self.nw, b, b, c).permute(4, 0, 2, 1, 3)
        return t.reshape(c, (r1 - r0) * b, self.wp)

    def image_view(self, t: Tensor, r0: int, r1: int) -> Tensor:
        """Rows ``r0:r1`` of blocks of ``t (C, Hp, Wp)`` as a view
        ``(rows, W / b, heads, b, b, d)``."""
        b, c = self.b, t.shape[0]
        t = t[:, r0 * b : r1 * b].view(self.heads, c // self.heads, r1 - r0, b, self.nw, b)
        return t.permute(2, 4, 0, 3, 5, 1)

    def attention(self, xb: Tensor, padding):
        """Query/key sides of the logits, attention and values of one chunk.

        ``xb``: ``(blocks, b*b, C_in)``. Returns ``query (blocks, heads * b*b, C_in + 2b)``,
        ``key (blocks, C_in + 2b, b*b)``, ``attn (blocks * heads, b*b, b*b)`` and
        ``v (blocks * heads, b*b, d)``.
        """
        blocks, pp, _ = xb.shape
        heads = self.heads
        query = (xb.view(blocks, -1) @ self.qmat).view(blocks, heads * pp, -1)
        key = torch.cat([xb.transpose(1, 2), self.one_hot.expand(blocks, -1, -1)], dim=1)
        x_pos = xb.transpose(0, 1)
        logits = torch.bmm(query, key).view(blocks, heads, pp, pp)
        if padding is not None:
            logits.masked_fill_(padding[:, None, None, :], float("-inf"))
        attn = torch.softmax(logits, dim=-1).view(-1, pp, pp)
        # values v_j = W_eff(j) x_j, one small product per position j of the block
        v = torch.bmm(x_pos, self.w_eff).view(pp, blocks, heads, -1).permute(1, 2, 0, 3)
        return query, key, attn, v.reshape(blocks * heads, pp, -1)


def _as(dtype, *tensors):
    return [t.to(dtype) for t in tensors]


def _forward(x, wq, wk, wv, rel_row, rel_col, probs, num_heads: int, b: int) -> Tensor:
    x, wq, wk, wv, rel_row, rel_col, probs = _as(
        _compute_dtype(x.dtype), x, wq, wk, wv, rel_row, rel_col, probs
    )
    plan = _Plan(x, wq, wk, wv, rel_row, rel_col, probs, num_heads, b)
    xp = plan.pad(x)
    out = x.new_empty(plan.n, plan.c, plan.hp, plan.wp)
    for n, r0, r1 in plan.chunks():
        xb = plan.blocks(xp[n], r0, r1)
        _, _, attn, v = plan.attention(xb, plan.key_padding(r0, r1, x.device))
        target = plan.image_view(out[n], r0, r1)
        target.copy_(torch.bmm(attn, v).view(target.shape))
    return plan.crop(out)


def _backward(
    grad_out, x, wq, wk, wv, rel_row, rel_col, probs, num_heads: int, b: int, input_grad: bool
):
    """Gradients of the seven tensor inputs (that of ``x`` zeros unless ``input_grad``)."""
    x, wq, wk, wv, rel_row, rel_col, probs, grad_out = _as(
        _compute_dtype(x.dtype), x, wq, wk, wv, rel_row, rel_col, probs, grad_out
    )
    plan = _Plan(x, wq, wk, wv, rel_row, rel_col, probs, num_heads, b)
    c_in, heads = plan.c_in, plan.heads
    xp, gp = plan.pad(x), plan.pad(grad_out)
    grad_xp = torch.empty_like(xp) if input_grad else None
    grad_qmat, grad_w_eff = torch.zeros_like(plan.qmat), torch.zeros_like(plan.w_eff)
    for n, r0, r1 in plan.chunks():
        xb = plan.blocks(xp[n], r0, r1)
        query, key, attn, v = plan.attention(xb, plan.key_padding(r0, r1, x.device))
        blocks, pp, _ = xb.shape
        g = plan.image_view(gp[n], r0, r1).reshape(blocks * heads, pp, -1)
        # out = attn @ v
        grad_v = torch.bmm(attn.transpose(1, 2), g)
        grad_attn = torch.bmm(g, v.transpose(1, 2))
        grad_logits = torch._softmax_backward_data(grad_attn, attn, -1, attn.dtype)
        grad_logits = grad_logits.view(blocks, heads * pp, pp)
        # logits = query @ key: the key side's first C_in rows are x_j
        grad_query = torch.bmm(grad_logits, key.transpose(1, 2)).view(blocks, -1)
        # query = xb @ qmat; v = x_j @ w_eff[j]
        grad_qmat += xb.view(blocks, -1).t() @ grad_query
        grad_v = grad_v.view(blocks, heads, pp, -1).permute(2, 0, 1, 3).reshape(pp, blocks, -1)
        grad_w_eff += torch.bmm(xb.transpose(0, 1).transpose(1, 2), grad_v)
        if input_grad:
            grad_xb = torch.bmm(grad_logits.transpose(1, 2), query[:, :, :c_in])
            grad_xb += (grad_query @ plan.qmat.t()).view_as(grad_xb)
            grad_xb += torch.bmm(grad_v, plan.w_eff.transpose(1, 2)).transpose(0, 1)
            grad_xp[n, :, r0 * b : r1 * b] = plan.to_image(grad_xb, r0, r1)
    # qmat[(p, x), (h, p, k)] = ar[x, h, index[p, k]]: its block diagonal
    pp = b * b
    grad_qmat = grad_qmat.view(pp, c_in, heads, pp, -1).diagonal(dim1=0, dim2=3)
    grad_qmat = grad_qmat.permute(0, 1, 3, 2).reshape(c_in * heads, -1)
    grad_ar = torch.zeros_like(plan.ar).view(c_in * heads, -1)
    grad_ar.scatter_add_(1, plan.index.reshape(1, -1).expand(c_in * heads, -1), grad_qmat)
    grads = _derived_backward(
        grad_ar.view_as(plan.ar), grad_w_eff, wq, wk, wv, rel_row, rel_col, probs, num_heads, b
    )
    grad_x = plan.crop(grad_xp) if input_grad else torch.zeros_like(x)
    return [grad_x] + [g.contiguous() for g in grads]


# ------------------------------------------------------------------------------------ backends
def _backend(backend: str, x: Tensor, wq: Tensor, num_heads: int, b: int) -> str:
    """The backend a call runs on: the kernels (``cpu``, ``cuda``) where they take the geometry
    (:func:`.kernels.stem_fits_kernels`), else the tensor operations (``reference``), which take
    any; a kernel backend named for a geometry they do not take is an error."""
    resolved = resolve_backend(backend, x)
    if resolved == "reference" or stem_fits_kernels(x.shape[1], wq.shape[0], num_heads, b):
        return resolved
    if backend != AUTO:
        raise ValueError(
            f"attention_stem: the {resolved} kernels take block_size <= {STEM_LIMITS[0]}, "
            f"C_in <= {STEM_LIMITS[1]} and b*b * head width <= {STEM_LIMITS[2]}; use "
            "backend='reference' (tensor operations) for this stem"
        )
    return "reference"


def _kernel_inputs(backend, x, weights, num_heads: int, b: int):
    """The image as the kernels read it and the derived ``qk (heads, C_in, F)``, ``w_eff``."""
    (x,) = prepared(backend, x.dtype, x)
    weights = _as(_compute_dtype(x.dtype), *weights)
    ar, w_eff = _derived(*weights, num_heads, b)
    return x, weights, ar.transpose(0, 1).contiguous(), w_eff


# ------------------------------------------------------------------------------ the op table
# The implementation, fake implementation and autograd of ``san_det::attention_stem`` and of its
# backward op ``san_det::attention_stem_backward``; their entries in :data:`.library.OP_TABLE`
# register them. Backends: ``reference`` (the chunked tensor operations above, any device and
# geometry), ``cpu`` and ``cuda`` (kernels/attention_stem.cu).
def impl(
    x: Tensor,
    query_weight: Tensor,
    key_weight: Tensor,
    value_weight: Tensor,
    rel_row: Tensor,
    rel_col: Tensor,
    mixture_probs: Tensor,
    num_heads: int,
    block_size: int,
    backend: str = "auto",
) -> Tensor:
    """``torch.ops.san_det.attention_stem``: blockwise multi-head attention of SASA's stem, before
    its norm and pool.

    Args:
        x: ``(N, C_in, H, W)`` image (any ``H, W``: padded keys are masked).
        query_weight, key_weight: ``(C, C_in)``; value_weight: ``(M * C, C_in)`` (row
            ``m * C + c`` is row ``c`` of ``W_V^m``).
        rel_row, rel_col: ``(C / 2, 2b - 1)`` relative row / column embeddings.
        mixture_probs: ``(b*b, M)`` mixture weights ``p(a, b, m)`` of each block position.
        num_heads: heads (``C / num_heads`` even); block_size: ``b``.
        backend: ``reference``, ``cpu``, ``cuda`` or ``auto`` (see :func:`_backend`).

    Returns:
        ``(N, C, H, W)``.
    """
    _check(x, query_weight, value_weight, rel_row, num_heads, block_size)
    weights = (query_weight, key_weight, value_weight, rel_row, rel_col, mixture_probs)
    backend = _backend(backend, x, query_weight, num_heads, block_size)
    if backend == "reference":
        return _forward(x, *weights, num_heads, block_size).to(x.dtype)
    image, _, qk, w_eff = _kernel_inputs(backend, x, weights, num_heads, block_size)
    out = kernels.attention_stem_forward(backend, image, qk, w_eff, num_heads, block_size)
    return out.to(x.dtype)


def fake(x, query_weight, key_weight, value_weight, rel_row, rel_col, mixture_probs, num_heads,
         block_size, backend="auto"):  # fmt: skip
    _check(x, query_weight, value_weight, rel_row, num_heads, block_size)
    n, _, h, w = x.shape
    return x.new_empty(n, query_weight.shape[0], h, w)


def backward_impl(grad_out: Tensor, *args, backend: str = AUTO) -> List[Tensor]:
    """``torch.ops.san_det.attention_stem_backward`` (:data:`BACKWARD_SCHEMA`): the gradients of
    :func:`impl`'s seven tensor inputs (zeros for ``x`` unless ``input_grad``); ``args`` are
    :func:`impl`'s arguments but the backend, then ``input_grad`` and the backend."""
    *inputs, num_heads, block_size, input_grad = args[:10]
    backend = args[10] if len(args) > 10 else backend
    x, query_weight = inputs[:2]
    backend = _backend(backend, x, query_weight, num_heads, block_size)
    if backend == "reference":
        grads = _backward(grad_out, *inputs, num_heads, block_size, input_grad)
    else:
        image, weights, qk, w_eff = _kernel_inputs(backend, x, inputs[1:], num_heads, block_size)
        (grad_out,) = prepared(backend, x.dtype, grad_out)
        grad_qk, grad_w_eff, grad_x = kernels.attention_stem_backward(
            backend, grad_out, image, qk, w_eff, num_heads, block_size, input_grad
        )
        grad_ar = grad_qk.transpose(0, 1)
        grads = _derived_backward(grad_ar, grad_w_eff, *weights, num_heads, block_size)
        grads = [grad_x if input_grad else torch.zeros_like(x), *grads]
    return [g.to(t.dtype) for g, t in zip(grads, inputs)]


def backward_fake(grad_out, *inputs_and_geometry, backend=AUTO):
    return [t.new_empty(t.shape) for t in inputs_and_geometry[:7]]


# The schema of :func:`backward_impl`: ``grad_out``, :func:`impl`'s arguments but the backend,
# ``input_grad``, the backend.
_FORWARD_ARGUMENTS = torch.library.infer_schema(impl, mutates_args=()).split(" -> ")[0][1:-1]
_TENSORS_AND_GEOMETRY, _BACKEND = _FORWARD_ARGUMENTS.rsplit(", ", 1)
BACKWARD_SCHEMA = (
    f"(Tensor grad_out, {_TENSORS_AND_GEOMETRY}, bool input_grad, {_BACKEND}) -> Tensor[]"
)


def setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.geometry = inputs[7:9]
    ctx.backend = _backend(inputs[9], inputs[0], inputs[1], *ctx.geometry)


def grads(ctx, grad_out):
    # An image rarely needs its gradient: the backward pass then skips the input's terms.
    input_grad = ctx.needs_input_grad[0]
    grads = torch.ops.san_det.attention_stem_backward(
        grad_out, *ctx.saved_tensors, *ctx.geometry, input_grad, ctx.backend
    )
    return (grads[0] if input_grad else None, *grads[1:], None, None, None)


# ------------------------------------------------------------------- pooled: attention_stem_pool
# ``san_det::attention_stem_pool``: the stem's attention output reduced, inside the op, to what
# its norm and max pool need (:mod:`san_det.layers.norm_pool`): per channel and block the output
# at the largest ``sign * output``, and the channel sums of the output and of its square. The
# kernels never write the full-resolution output; their backward recomputes it where the
# gradient of the squares' sum needs it.
def _pool_blocks(t: Tensor, b: int, fill: float) -> Tensor:
    """``(N, C, H, W)`` -> ``(N, C, nH, nW, b*b)``, padded with ``fill`` to whole blocks."""
    n, c, h, w = t.shape
    t = F.pad(t, (0, (-w) % b, 0, (-h) % b), value=fill)
    nh, nw = t.shape[2] // b, t.shape[3] // b
    return t.view(n, c, nh, b, nw, b).permute(0, 1, 2, 4, 3, 5).reshape(n, c, nh, nw, b * b)


def _pool_reference(y: Tensor, sign: Tensor, b: int):
    """:func:`pool_impl`'s outputs from the attention output ``y`` by tensor operations."""
    signed = _pool_blocks(y * sign.to(y.dtype)[:, None, None], b, float("-inf"))
    position = signed.argmax(-1, keepdim=True)  # the first of equal values
    pooled = _pool_blocks(y, b, 0.0).gather(-1, position).squeeze(-1)
    y64 = y.double()
    sums = torch.stack([y64.sum((0, 2, 3)), (y64 * y64).sum((0, 2, 3))])
    return pooled, position.squeeze(-1).to(torch.uint8), sums


def _pool_gradient(grad_pooled, grad_sums, position, y: Tensor, b: int) -> Tensor:
    """The gradient of the attention output ``y (N, C, H, W)`` from those of :func:`pool_impl`'s
    ``pooled`` and ``sums``."""
    n, c, h, w = y.shape
    at = torch.zeros_like(_pool_blocks(y, b, 0.0))
    at.scatter_(-1, position.long().unsqueeze(-1), grad_pooled.to(y.dtype).unsqueeze(-1))
    nh, nw = at.shape[2:4]
    at = at.view(n, c, nh, nw, b, b).permute(0, 1, 2, 4, 3, 5).reshape(n, c, nh * b, nw * b)
    g = grad_sums.to(y.dtype)
    return at[:, :, :h, :w] + g[0][:, None, None] + 2 * g[1][:, None, None] * y


def pool_impl(
    x: Tensor,
    query_weight: Tensor,
    key_weight: Tensor,
    value_weight: Tensor,
    rel_row: Tensor,
    rel_col: Tensor,
    mixture_probs: Tensor,
    pool_sign: Tensor,
    num_heads: int,
    block_size: int,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.san_det.attention_stem_pool``: :func:`impl`'s output ``y`` reduced over each
    ``b x b`` block (the blocks of the attention, clipped to the image), without ``y``.

    Args:
        x ... block_size: as :func:`impl`; pool_sign: ``(C,)``, -1, 0 or 1 per channel (the sign of
            the norm's scale; not differentiable).
        backend: as :func:`impl`.

    Returns:
        ``pooled (N, C, nH, nW)``: ``y`` at the block's first pixel (in row-major order) where
        ``pool_sign * y`` is largest (the block's first pixel where the sign is 0);
        ``position`` (same shape, uint8): that pixel's ``row * b + col`` in the block, not
        differentiable; ``sums (2, C)`` float64: the sums of ``y`` and of ``y**2`` over the
        batch and the image.
    """
    _check_pool(x, query_weight, value_weight, rel_row, pool_sign, num_heads, block_size)
    weights = (query_weight, key_weight, value_weight, rel_row, rel_col, mixture_probs)
    backend = _backend(backend, x, query_weight, num_heads, block_size)
    if backend == "reference":
        y = _forward(x, *weights, num_heads, block_size)
        pooled, position, sums = _pool_reference(y, pool_sign, block_size)
    else:
        image, _, qk, w_eff = _kernel_inputs(backend, x, weights, num_heads, block_size)
        pooled, position, sums = kernels.attention_stem_pool_forward(
            backend, image, qk, w_eff, pool_sign, num_heads, block_size
        )
    return pooled.to(x.dtype), position, sums


def _check_pool(x, wq, wv, rel_row, pool_sign, num_heads: int, b: int) -> None:
    _check(x, wq, wv, rel_row, num_heads, b)
    if pool_sign.shape != (wq.shape[0],):
        raise ValueError(
            f"attention_stem_pool: pool_sign must be (C,) = ({wq.shape[0]},), got "
            f"{tuple(pool_sign.shape)}"
        )
    if b * b > 256:
        raise ValueError(f"attention_stem_pool: block_size must be <= 16, got {b}")


def pool_fake(x, query_weight, key_weight, value_weight, rel_row, rel_col, mixture_probs,
              pool_sign, num_heads, block_size, backend="auto"):  # fmt: skip
    _check_pool(x, query_weight, value_weight, rel_row, pool_sign, num_heads, block_size)
    n, _, h, w = x.shape
    c, b = query_weight.shape[0], block_size
    pooled = x.new_empty(n, c, -(-h // b), -(-w // b))
    position = torch.empty(pooled.shape, dtype=torch.uint8, device=x.device)
    return pooled, position, x.new_empty(2, c, dtype=torch.float64)


def pool_backward_impl(grad_pooled: Tensor, grad_sums: Tensor, position: Tensor, *args,
                       backend: str = AUTO) -> List[Tensor]:  # fmt: skip
    """``torch.ops.san_det.attention_stem_pool_backward`` (:data:`POOL_BACKWARD_SCHEMA`): the
    gradients of :func:`pool_impl`'s seven tensor inputs but ``pool_sign`` (zeros for ``x``
    unless ``input_grad``); ``args`` are :func:`pool_impl`'s arguments but the backend, then
    ``input_grad`` and the backend."""
    *inputs, _, num_heads, block_size, input_grad = args[:11]
    backend = args[11] if len(args) > 11 else backend
    x, query_weight = inputs[:2]
    backend = _backend(backend, x, query_weight, num_heads, block_size)
    if backend == "reference":
        y = _forward(x, *inputs[1:], num_heads, block_size)
        grad_y = _pool_gradient(grad_pooled, grad_sums, position, y, block_size)
        grads = _backward(grad_y, *inputs, num_heads, block_size, input_grad)
    else:
        image, weights, qk, w_eff = _kernel_inputs(backend, x, inputs[1:], num_heads, block_size)
        (grad_pooled,) = prepared(backend, x.dtype, grad_pooled)
        grad_qk, grad_w_eff, grad_x = kernels.attention_stem_pool_backward(
            backend, grad_pooled, grad_sums, position.contiguous(), image, qk, w_eff, num_heads,
            block_size, input_grad,
        )  # fmt: skip
        grad_ar = grad_qk.transpose(0, 1)
        grads = _derived_backward(grad_ar, grad_w_eff, *weights, num_heads, block_size)
        grads = [grad_x if input_grad else torch.zeros_like(x), *grads]
    return [g.to(t.dtype) for g, t in zip(grads, inputs)]


def pool_backward_fake(grad_pooled, grad_sums, position, *inputs_and_geometry, backend=AUTO):
    return [t.new_empty(t.shape) for t in inputs_and_geometry[:7]]


_POOL_ARGUMENTS = torch.library.infer_schema(pool_impl, mutates_args=()).split(" -> ")[0][1:-1]
_POOL_TENSORS_AND_GEOMETRY = _POOL_ARGUMENTS.rsplit(", ", 1)[0]
POOL_BACKWARD_SCHEMA = (
    f"(Tensor grad_pooled, Tensor grad_sums, Tensor position, {_POOL_TENSORS_AND_GEOMETRY}, "
    f"bool input_grad, {_BACKEND}) -> Tensor[]"
)


def pool_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8], output[1])
    ctx.geometry = inputs[8:10]
    ctx.backend = _backend(inputs[10], inputs[0], inputs[1], *ctx.geometry)


def pool_grads(ctx, grad_pooled, grad_position, grad_sums):
    *inputs, position = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    grads = torch.ops.san_det.attention_stem_pool_backward(
        grad_pooled, grad_sums, position, *inputs, *ctx.geometry, input_grad, ctx.backend
    )
    return (grads[0] if input_grad else None, *grads[1:], None, None, None, None)


def pool_runs_kernels(x: Tensor, query_weight: Tensor, num_heads: int, block_size: int) -> bool:
    """Whether ``attention_stem_pool`` on ``x`` under ``backend="auto"`` runs the kernels (the
    reference backend forms the full output, forward and backward: no gain over
    ``attention_stem`` then)."""
    try:
        return _backend(AUTO, x, query_weight, num_heads, block_size) != "reference"
    except (RuntimeError, ValueError):  # a forced backend that cannot run here
        return False
