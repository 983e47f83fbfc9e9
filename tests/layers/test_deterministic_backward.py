"""Backward passes without atomics and with bounded memory, as far as the CPU can show it.

- The reflect-pad gradient fold (``ops/reflect.py``) against aten's ``reflection_pad2d_backward``
  (exactly, on integer-valued gradients: the sum order cannot matter) and against a one-hot
  definition of the mirror, for every border and every padding up to ``size - 1``.
- No backward function of the kernel or reference backend calls an aten op that is
  nondeterministic on CUDA (or raises there under ``torch.use_deterministic_algorithms``).
- SASA's ``grad_rel`` as chunked products (``ops/rel_gradient.py``, the CUDA path outside
  deterministic mode): the values, the size of every allocation it makes (no copy of the whole
  ``dlogit`` nor of ``q``) and full float32 precision whatever TF32 / autocast say.

The same checks on a GPU (bitwise repeats, peak memory, TF32) are in ``test_cuda_ops.py``.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import san_det  # noqa: F401  (patches before anything imports detectron2)
from san_det.layers.kernel_runtime import cpu_compiler_available
from san_det.layers.ops import kernels, reference
from san_det.layers.ops.checks import sized_geometry
from san_det.layers.ops.reflect import reflection_pad_backward
from san_det.layers.ops.rel_gradient import full_precision_matmul, rel_grad_per_image


class _AtenRecorder(TorchDispatchMode):
    """Records every aten op run inside: its name, the bytes of each new storage it returns, and
    at each matrix product the operand dtypes (after autocast) and the matmul precision flags."""

    _PRODUCTS = ("bmm", "baddbmm", "baddbmm_", "mm", "addmm", "addmm_", "matmul")

    def __init__(self):
        super().__init__()
        self.ops, self.allocations, self.products = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops.append(name)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name in self._PRODUCTS:
            self.products.append({
                "dtypes": {t.dtype for t in tensors},
                "cuda": torch.backends.cuda.matmul.fp32_precision,
                "mkldnn": torch.backends.mkldnn.matmul.fp32_precision,
            })  # fmt: skip
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocations.append((name, t.untyped_storage().nbytes()))
        return out


def _integers(*shape, seed=0, dtype=torch.float64):
    """Integer-valued entries: every sum is exact, whatever its order."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 64, shape, generator=gen).to(dtype)


# ------------------------------------------------------------------------- reflect-pad gradient
SIZES = [2, 3, 4, 5, 8]
# (H, W, padding) for every padding a reflection pad allows (padding < H and padding < W).
PAD_CASES = [(h, w, p) for h, w in itertools.product(SIZES, [2, 3, 7]) for p in range(min(h, w))]


@pytest.mark.parametrize("h, w, padding", PAD_CASES, ids=lambda v: str(v))
def test_reflect_fold_equals_aten(h, w, padding):
    grad = _integers(2, 3, h + 2 * padding, w + 2 * padding)
    before = grad.clone()
    want = torch.ops.aten.reflection_pad2d_backward(grad, grad.new_empty(2, 3, h, w), [padding] * 4)
    got = reflection_pad_backward(grad, padding)
    assert got.shape == (2, 3, h, w) and got.is_contiguous() and got.dtype == grad.dtype
    assert torch.equal(got, want)
    assert torch.equal(grad, before)  # the argument is not modified


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reflect_fold_random_values_and_non_contiguous(dtype):
    h, w, p = 7, 9, 6
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(3, 4, w + 2 * p, h + 2 * p, generator=gen, dtype=dtype).transpose(2, 3)
    want = torch.ops.aten.reflection_pad2d_backward(grad, grad.new_empty(3, 4, h, w), [p] * 4)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reflection_pad_backward(grad, p), want, **tol)


def _mirror(index: int, size: int) -> int:
    """The input index a padded index (relative to the input) copies, by the definition."""
    if index < 0:
        return -index
    return 2 * (size - 1) - index if index >= size else index


@pytest.mark.parametrize("h, w, padding", [(3, 5, 2), (4, 4, 3), (2, 7, 1)])
def test_reflect_fold_sends_each_padded_entry_to_its_mirror(h, w, padding):
    """One-hot gradients, independent of aten: each padded entry lands on the pixel it copies."""
    for i, j in itertools.product(range(h + 2 * padding), range(w + 2 * padding)):
        grad = torch.zeros(1, 1, h + 2 * padding, w + 2 * padding, dtype=torch.float64)
        grad[0, 0, i, j] = 1
        want = torch.zeros(1, 1, h, w, dtype=torch.float64)
        want[0, 0, _mirror(i - padding, h), _mirror(j - padding, w)] = 1
        assert torch.equal(reflection_pad_backward(grad, padding), want), (i, j)


def test_reflect_fold_is_the_gradient_of_reflection_padding():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 13, 14, dtype=torch.float64)
    (want,) = torch.autograd.grad(F.pad(x, (4,) * 4, mode="reflect"), x, grad)
    torch.testing.assert_close(reflection_pad_backward(grad, 4), want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------- no nondeterministic op in a backward
# aten ops that use atomics on CUDA or raise there under torch.use_deterministic_algorithms(True)
# (cuBLAS products do without CUBLAS_WORKSPACE_CONFIG).
_NONDETERMINISTIC = {
    "reflection_pad2d_backward", "replication_pad2d_backward", "index_add", "index_add_",
    "scatter_add", "scatter_add_", "scatter_reduce", "index_put", "index_put_", "put_",
    "bmm", "baddbmm", "baddbmm_", "mm", "addmm", "addmm_", "matmul",
}  # fmt: skip
BACKWARD_BACKENDS = ["reference"] + (["cpu"] if cpu_compiler_available() else [])


def _backward_calls(backend: str, window):
    """Run every backward function of ``backend`` (SAN ops in ``window``, SASA with ``rel``)."""
    h, w, n, c, cw = 6, 7, 2, 4, 2
    g = sized_geometry(h, w, "x", *window)
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    taps, x, wt = r(n, c, g.taps, g.positions), r(n, c, h, w), r(n, cw, g.taps, g.positions)
    out_grad = r(n, c, g.out_height, g.out_width)
    q, k, v, grad_out, rel = r(n, c, h, w), r(n, c, h, w), r(n, c, h, w), r(n, c, h, w), r(c, 3, 3)
    _, attn = reference.local_attention_forward(q, k, v, rel, 2, 3, 1)
    if backend == "reference":
        return [
            lambda: reference.subtraction_backward(taps, g, 1, 1),
            lambda: reference.aggregation_input_backward(out_grad, wt, g),
            lambda: reference.aggregation_weight_backward(out_grad, x, cw, g),
            lambda: reference.local_attention_backward(grad_out, q, k, v, rel, attn, 2, 3, 1),
        ]
    return [
        lambda: kernels.subtraction_backward(backend, taps, g, 1, 1),
        lambda: kernels.aggregation_input_backward(backend, out_grad, wt, g),
        lambda: kernels.aggregation_weight_backward(backend, out_grad, x, cw, g),
        lambda: kernels.local_attention_backward(backend, grad_out, q, k, v, rel, attn, 2, 3, 1),
    ]


@pytest.mark.parametrize("window", [(3, 1, 2, 1, "reflect"), (5, 2, 4, 1, "reflect"),
                                    (3, 1, 1, 2, "zeros")], ids=str)  # fmt: skip
@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
def test_backward_functions_use_no_nondeterministic_op(backend, window, deterministic_mode):
    for call in _backward_calls(backend, window):
        recorder = _AtenRecorder()
        with recorder:
            first = call()
        assert recorder.ops, "nothing recorded: the check would be empty"
        assert not _NONDETERMINISTIC & set(recorder.ops), recorder.ops
        second = call()
        for a, b in zip(tree_leaves(first), tree_leaves(second)):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- grad_rel
def _rel_case(n=2, c=16, h=35, w=9, heads=2, ks=5, q_dtype=torch.float64, acc=torch.float64):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    dlogit = torch.randn(n, heads, h, ks * ks, w, generator=gen, dtype=torch.float64)
    q, dlogit = q.to(q_dtype), dlogit.to(acc)
    want = torch.einsum(
        "nhdij,nhiaj->nhda", q.double().view(n, heads, c // heads, h, w), dlogit.double()
    ).reshape(n, c, ks * ks)
    return q, dlogit, heads, want


@pytest.mark.parametrize("rows", [0, 1, 4, 34, 35, 100])
def test_rel_gradient_chunks_match_the_definition(rows):
    """Default chunks (3 rows of 35), one row, a partial last chunk, one chunk, more than H."""
    q, dlogit, heads, want = _rel_case()
    got = rel_grad_per_image(q, dlogit, heads, rows_per_chunk=rows)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rel_gradient_accumulates_half_precision_in_float32(q_dtype):
    q, dlogit, heads, want = _rel_case(h=13, q_dtype=q_dtype, acc=torch.float32)
    got = rel_grad_per_image(q, dlogit, heads)
    assert got.dtype == torch.float32
    # Exact float32 products of the (rounded) inputs: float32 rounding only.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16])
def test_rel_gradient_allocates_a_small_fraction_of_attn(q_dtype):
    """No allocation of the whole dlogit's size (a reordered copy) nor of q in float32 (a cast):
    the largest is a chunk, here 3 of 35 rows."""
    q, dlogit, heads, want = _rel_case(q_dtype=q_dtype, acc=torch.float32)
    recorder = _AtenRecorder()
    with recorder:
        got = rel_grad_per_image(q, dlogit, heads)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert recorder.allocations
    assert max(size for _, size in recorder.allocations) <= dlogit.nbytes / 8, recorder.allocations
    casts = [size for name, size in recorder.allocations if name == "_to_copy"]
    assert max(casts, default=0) <= q.numel() * 4 / 8, recorder.allocations


def test_rel_gradient_products_ignore_tf32_bf16_and_autocast():
    """TF32 / oneDNN bf16 products and autocast set by the caller: the products still run on
    float32 operands (autocast would cast them to bfloat16) with the precision flag at "ieee",
    and the flags are restored after."""
    q, dlogit, heads, want = _rel_case(h=11, q_dtype=torch.float32, acc=torch.float32)
    cuda_flags, mkldnn_flags = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = cuda_flags.fp32_precision, mkldnn_flags.fp32_precision
    recorder = _AtenRecorder()
    try:
        cuda_flags.fp32_precision, mkldnn_flags.fp32_precision = "tf32", "bf16"
        with torch.autocast("cpu", dtype=torch.bfloat16), recorder:
            got = rel_grad_per_image(q, dlogit, heads)
        assert (cuda_flags.fp32_precision, mkldnn_flags.fp32_precision) == ("tf32", "bf16")
        with full_precision_matmul("cuda"):
            assert cuda_flags.fp32_precision == "ieee"
        with pytest.raises(KeyError), full_precision_matmul("cpu"):
            raise KeyError
        assert mkldnn_flags.fp32_precision == "bf16"
    finally:
        cuda_flags.fp32_precision, mkldnn_flags.fp32_precision = saved
    assert recorder.products
    for product in recorder.products:
        assert product == dict(dtypes={torch.float32}, cuda="tf32", mkldnn="ieee")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)  # bf16 would be ~1e-2


def test_rel_gradient_empty_inputs():
    for shape in [(0, 4, 5, 6), (2, 4, 0, 6), (2, 4, 5, 0)]:
        n, c, h, w = shape
        q = torch.zeros(shape)
        got = rel_grad_per_image(q, torch.zeros(n, 2, h, 9, w), 2)
        assert got.shape == (n, c, 9) and not got.any()

