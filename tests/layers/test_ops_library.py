"""The registered ops (torch.ops.san_det.*): schemas, torch.library.opcheck for every op, dtype
and backend, the reference backward against autograd, autocast, and the backend choice as the
backward pass sees it."""

import functools
import threading

import pytest
import torch

import san_det  # noqa: F401  (patches before anything imports detectron2)
from san_det.layers import backend as backend_mod
from san_det.layers.backend import use_backend
from san_det.layers.kernel_runtime import cpu_compiler_available
from san_det.layers.ops import OPS, local_attention, output_size, subtraction
from san_det.layers.ops import kernels as ops_kernels
from san_det.layers.ops import reference
from san_det.layers.ops.checks import window_geometry
from tests.helpers.skips import needs_cxx

BACKENDS = ["reference", pytest.param("cpu", marks=needs_cxx)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

SCHEMAS = {
    "local_attention": "(Tensor q, Tensor k, Tensor v, Tensor? rel, SymInt num_heads, "
    "SymInt kernel_size, SymInt dilation, str backend=\"auto\") -> (Tensor, Tensor)",
    "subtraction": "(Tensor x, SymInt kernel_size, SymInt stride, SymInt padding, "
    "SymInt dilation, str pad_mode, str backend=\"auto\") -> Tensor",
    "subtraction2": "(Tensor x1, Tensor x2, SymInt kernel_size, SymInt stride, SymInt padding, "
    "SymInt dilation, str pad_mode, str backend=\"auto\") -> Tensor",
    "aggregation": "(Tensor x, Tensor w, SymInt kernel_size, SymInt stride, SymInt padding, "
    "SymInt dilation, str pad_mode, str backend=\"auto\") -> Tensor",
    "local_attention_backward": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? rel, "
    "Tensor attn, SymInt num_heads, SymInt kernel_size, SymInt dilation, str backend=\"auto\") "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "subtraction_backward": "(Tensor grad_out, SymInt height, SymInt width, SymInt kernel_size, "
    "SymInt stride, SymInt padding, SymInt dilation, str pad_mode, SymInt centre_sign, "
    "SymInt tap_sign, str backend=\"auto\") -> Tensor",
    "aggregation_input_backward": "(Tensor grad_out, Tensor w, SymInt height, SymInt width, "
    "SymInt kernel_size, SymInt stride, SymInt padding, SymInt dilation, str pad_mode, "
    'str backend="auto") -> Tensor',
    "aggregation_weight_backward": "(Tensor grad_out, Tensor x, SymInt weight_channels, "
    "SymInt kernel_size, SymInt stride, SymInt padding, SymInt dilation, str pad_mode, "
    'str backend="auto") -> Tensor',
    "attention_stem": "(Tensor x, Tensor query_weight, Tensor key_weight, Tensor value_weight, "
    "Tensor rel_row, Tensor rel_col, Tensor mixture_probs, SymInt num_heads, SymInt block_size, "
    'str backend="auto") -> Tensor',
    "attention_stem_backward": "(Tensor grad_out, Tensor x, Tensor query_weight, "
    "Tensor key_weight, Tensor value_weight, Tensor rel_row, Tensor rel_col, "
    "Tensor mixture_probs, SymInt num_heads, SymInt block_size, bool input_grad, "
    'str backend="auto") -> Tensor[]',
    "attention_stem_pool": "(Tensor x, Tensor query_weight, Tensor key_weight, "
    "Tensor value_weight, Tensor rel_row, Tensor rel_col, Tensor mixture_probs, "
    'Tensor pool_sign, SymInt num_heads, SymInt block_size, str backend="auto") '
    "-> (Tensor, Tensor, Tensor)",
    "attention_stem_pool_backward": "(Tensor grad_pooled, Tensor grad_sums, Tensor position, "
    "Tensor x, Tensor query_weight, Tensor key_weight, Tensor value_weight, Tensor rel_row, "
    "Tensor rel_col, Tensor mixture_probs, Tensor pool_sign, SymInt num_heads, "
    'SymInt block_size, bool input_grad, str backend="auto") -> Tensor[]',
}


def test_registered_ops_and_schemas():
    assert set(OPS) == set(SCHEMAS)
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.san_det, name).default._schema) == f"san_det::{name}{schema}"


def _randn(*shape, dtype, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(shape))
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return t.requires_grad_(grad)


def _op_cases(dtype):
    """(op name, args) for every op: odd sizes, dilation, stride, both pad modes."""
    r = functools.partial(_randn, dtype=dtype)
    q, k, v = (r(2, 8, 5, 7, grad=True, seed=s) for s in range(3))
    rel = r(8, 3, 3, grad=True)
    with torch.no_grad():
        _, attn = torch.ops.san_det.local_attention(q, k, v, rel, 2, 3, 2)
    detached = [t.detach() for t in (q, k, v, rel)]
    x1, x2 = r(2, 4, 5, 7, grad=True, seed=4), r(2, 4, 5, 7, grad=True, seed=5)
    ho, wo = output_size(5, 3, 2, 2, 2), output_size(7, 3, 2, 2, 2)
    w = r(2, 2, 9, ho * wo, grad=True)
    reflect = (3, 2, 2, 2, "reflect")  # kernel_size, stride, padding, dilation, pad_mode
    zeros = (3, 1, 1, 1, "zeros")
    return [
        ("local_attention", (q, k, v, rel, 2, 3, 2)),
        ("local_attention", (q, k, v, None, 4, 5, 1)),
        ("local_attention_backward", (r(2, 8, 5, 7), *detached, attn, 2, 3, 2)),
        ("subtraction", (x1, *reflect)),
        ("subtraction2", (x1, x2, *zeros)),
        ("subtraction_backward", (r(2, 4, 9, ho * wo), 5, 7, *reflect, 1, 1)),
        ("subtraction_backward", (r(2, 4, 9, 35), 5, 7, *zeros, 0, 1)),
        ("aggregation", (x1, w, *reflect)),
        ("aggregation_input_backward", (r(2, 4, ho, wo), w.detach(), 5, 7, *reflect)),
        ("aggregation_weight_backward", (r(2, 4, ho, wo), x1.detach(), 2, *reflect)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype, backend):
    """Schema, autograd registration, fake implementation and AOT dispatch (dynamic shapes,
    forward and backward against eager) of every op."""
    with use_backend(backend):
        for name, args in _op_cases(dtype):
            torch.library.opcheck(getattr(torch.ops.san_det, name).default, args)


# ---------------------------------------------------------------- reference backward vs autograd
@pytest.mark.parametrize("with_rel", [True, False])
@pytest.mark.parametrize("geometry", [(2, 8, 5, 7, 2, 3, 2), (1, 6, 4, 3, 3, 5, 1)])
def test_reference_backward_is_autograd_of_the_reference(geometry, with_rel):
    """The reference backend's backward formulas equal autograd through the readable forward."""
    n, c, h, w, heads, ks, dil = geometry
    q, k, v = (_randn(n, c, h, w, dtype=torch.float64, grad=True, seed=s) for s in range(3))
    rel = _randn(c, ks, ks, dtype=torch.float64, grad=True) if with_rel else None
    inputs = [q, k, v] + ([rel] if with_rel else [])
    grad = _randn(n, c, h, w, dtype=torch.float64, seed=7)
    out = reference.local_attention_reference(
        q, k, v, rel, num_heads=heads, kernel_size=ks, dilation=dil
    )
    want = torch.autograd.grad(out, inputs, grad)
    with use_backend("reference"):
        out = local_attention(q, k, v, rel, num_heads=heads, kernel_size=ks, dilation=dil)
        got = torch.autograd.grad(out, inputs, grad)
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "window", [(3, 2, 2, 2, "reflect"), (3, 1, 1, 1, "zeros"), (5, 1, 4, 1, "reflect")]
)
def test_san_reference_backward_is_autograd_of_the_reference(window):
    x1, x2 = (_randn(2, 4, 5, 7, dtype=torch.float64, grad=True, seed=s) for s in range(2))
    g = window_geometry(x1, "x1", *window)
    wt = _randn(2, 2, g.taps, g.positions, dtype=torch.float64, grad=True)
    sub_grad = _randn(2, 4, g.taps, g.positions, dtype=torch.float64, seed=3)
    agg_grad = _randn(2, 4, g.out_height, g.out_width, dtype=torch.float64, seed=4)
    cases = [
        (lambda a, b: reference.subtraction2_reference(a, b, g), (x1, x2), sub_grad),
        (lambda a: reference.subtraction2_reference(a, a, g), (x1,), sub_grad),
        (lambda a, b: reference.aggregation_reference(a, b, g), (x2, wt), agg_grad),
    ]
    ops = [
        lambda a, b: torch.ops.san_det.subtraction2(a, b, *window),
        lambda a: torch.ops.san_det.subtraction(a, *window),
        lambda a, b: torch.ops.san_det.aggregation(a, b, *window),
    ]
    for (fn, inputs, grad), op in zip(cases, ops):
        want = torch.autograd.grad(fn(*inputs), inputs, grad)
        with use_backend("reference"):
            got = torch.autograd.grad(op(*inputs), inputs, grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_autocast_runs_the_ops_in_the_autocast_dtype(backend):
    q, k, v = (_randn(1, 8, 5, 6, dtype=torch.float32, seed=s) for s in range(3))
    rel = _randn(8, 3, 3, dtype=torch.float32)
    with use_backend(backend):
        want = local_attention(*(t.bfloat16() for t in (q, k, v, rel)), num_heads=2, kernel_size=3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = local_attention(q, k, v, rel, num_heads=2, kernel_size=3)
            out, attn = torch.ops.san_det.local_attention(q, k, v, rel, 2, 3, 1)
            x64 = q.double()
            agg = torch.ops.san_det.aggregation(x64, _randn(1, 4, 9, 30, dtype=torch.float64), 3,
                                                1, 1, 1, "zeros")  # fmt: skip
    assert got.dtype == out.dtype == torch.bfloat16 and attn.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert agg.dtype == torch.float64  # autocast leaves float64 alone


# ------------------------------------------------------------------- the backend of the backward
def _spy(monkeypatch, names):
    calls = []
    for name in names:
        original = getattr(ops_kernels, name)

        def record(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops_kernels, name, record)
    return calls


@needs_cxx
def test_backward_uses_the_backend_of_its_forward(monkeypatch):
    calls = _spy(monkeypatch, ["local_attention_forward", "local_attention_backward"])
    q, k, v = (_randn(1, 4, 5, 6, dtype=torch.float64, grad=True, seed=s) for s in range(3))
    with use_backend("reference"):
        out = local_attention(q, k, v, num_heads=2, kernel_size=3)
    out.sum().backward()  # outside the block: still the reference
    assert calls == []
    with use_backend("cpu"):
        out = local_attention(q, k, v, num_heads=2, kernel_size=3)
    with use_backend("reference"):
        out.sum().backward()
    assert calls == ["local_attention_forward", "local_attention_backward"]


@needs_cxx
def test_backward_in_another_thread_runs_on_the_forward_backend(monkeypatch):
    """The backend reaches the backward as an argument, not as thread-local state: a backward
    computed in a thread where nothing is forced (as CUDA autograd does) keeps its forward's."""
    calls = _spy(monkeypatch, ["local_attention_backward", "subtraction_backward"])
    q, k, v = (_randn(1, 4, 5, 6, dtype=torch.float64, grad=True, seed=s) for s in range(3))
    grads = {}
    for backend in ("reference", "cpu"):
        with use_backend(backend):
            out = local_attention(q, k, v, num_heads=2, kernel_size=3)
            taps = subtraction(q, 3, 1, 1, 1, "reflect")
        loss = out.sum() + taps.square().sum()
        worker = threading.Thread(
            target=lambda: grads.__setitem__(backend, torch.autograd.grad(loss, (q, k, v)))
        )
        worker.start()
        worker.join()
        expected = [] if backend == "reference" else ["local_attention_backward",
                                                      "subtraction_backward"]  # fmt: skip
        assert sorted(calls) == expected, backend
    for a, b in zip(grads["cpu"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_entry_points_take_a_backend_argument():
    q = _randn(1, 4, 5, 6, dtype=torch.float64)
    with use_backend("cpu" if cpu_compiler_available() else None):
        out = local_attention(q, q, q, num_heads=2, kernel_size=3, backend="reference")
    want = reference.local_attention_reference(q, q, q, num_heads=2, kernel_size=3)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        local_attention(q, q, q, num_heads=2, kernel_size=3, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        subtraction(q, 3, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        torch.ops.san_det.subtraction(q, 3, 1, 0, 1, "zeros", "gpu")


def test_automatic_choice_falls_back_to_the_reference_with_a_warning(monkeypatch):
    monkeypatch.delenv("SAN_DET_BACKEND", raising=False)
    monkeypatch.setattr(backend_mod, "cpu_compiler_available", lambda: False)
    backend_mod._warn_fallback.cache_clear()
    x = torch.zeros(1)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler with OpenMP"):
        assert backend_mod.select_backend(x) == "reference"
    with use_backend("cpu"), pytest.raises(RuntimeError, match="cannot run: no C\\+\\+ compiler"):
        backend_mod.select_backend(x)
    backend_mod._warn_fallback.cache_clear()


# ------------------------------------------------------------------------- direct op calls check
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: torch.ops.san_det.subtraction(x, 3, 1, 5, 1, "reflect"), "padding < H"),
        (lambda x: torch.ops.san_det.subtraction(x, 4, 1, 1, 1, "zeros"), "kernel_size"),
        (lambda x: torch.ops.san_det.aggregation(x, x, 3, 1, 1, 1, "zeros"), "w must have shape"),
        (lambda x: torch.ops.san_det.local_attention(x, x, x, None, 3, 3, 1), "num_heads"),
        (
            lambda x: torch.ops.san_det.local_attention_backward(
                x, x, x, x, None, torch.zeros(1, 2, 9, 5, 4), 2, 3, 1
            ),
            "attn must be",
        ),
        (
            lambda x: torch.ops.san_det.subtraction_backward(x, 5, 5, 3, 1, 1, 1, "zeros", 1, 1),
            "grad_out must end in",
        ),
        (
            lambda x: torch.ops.san_det.local_attention_backward(
                x, x, x, x, None, torch.zeros(1, 2, 5, 9, 5, device="meta"), 2, 3, 1
            ),
            "attn must be on the device of q",
        ),
        (
            lambda x: torch.ops.san_det.aggregation_input_backward(
                x, torch.zeros(1, 2, 9, 25, device="meta"), 5, 5, 3, 1, 1, 1, "zeros"
            ),
            "w must be on the device of grad_out",
        ),
        (
            lambda x: torch.ops.san_det.aggregation(
                x, torch.zeros(1, 2, 9, 25, device="meta"), 3, 1, 1, 1, "zeros"
            ),
            "w must be on the device of x",
        ),
    ],
)
def test_direct_op_calls_check_their_arguments(call, match):
    """The kernels index memory by these arguments: a direct op call is checked too."""
    with pytest.raises(ValueError, match=match):
        call(torch.zeros(1, 4, 5, 5))
