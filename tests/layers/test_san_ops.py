"""SAN ops: reference vs a naive loop, compiled kernels vs reference (forward and every gradient),
gradcheck, NVRTC compilation, bad input. CUDA tests run only where a GPU is present."""

import functools
import itertools

import pytest
import torch
from tests.helpers.kernel_variants import CPU_VARIANTS, compile_or_skip, variant_id

import san_det  # noqa: F401  (patches before anything imports detectron2)
from san_det.layers.backend import use_backend
from san_det.layers.ops import (
    aggregation,
)
from san_det.layers.ops import kernels as ops_kernels
from san_det.layers.ops import neighbourhood, output_size, subtraction, subtraction2
from tests.helpers.launch import launch_config
from tests.helpers.nvrtc import compile_kernel_file
from tests.helpers.skips import needs_cuda, needs_cxx, needs_nvrtc


# (H, W, kernel_size, stride, padding, dilation, pad_mode): odd sizes, 1x1, H < k, stride,
# dilation, padding larger than the window's half (centre in the padding), both pad modes.
GEOMETRIES = [
    (7, 9, 3, 1, 1, 1, "reflect"),
    (7, 9, 3, 1, 1, 1, "zeros"),
    (7, 9, 7, 1, 3, 1, "reflect"),
    (5, 7, 3, 2, 2, 2, "reflect"),
    (6, 5, 3, 3, 2, 1, "reflect"),
    (9, 8, 3, 1, 6, 3, "reflect"),
    (4, 6, 5, 2, 3, 1, "zeros"),
    (7, 9, 3, 2, 3, 3, "zeros"),
    (1, 1, 3, 1, 1, 1, "zeros"),
    (1, 1, 1, 1, 0, 1, "reflect"),
    (2, 3, 5, 1, 2, 1, "zeros"),
    (3, 3, 3, 1, 4, 1, "zeros"),
]


def _ids(geometry):
    return "H{}W{}k{}s{}p{}d{}-{}".format(*geometry)


def _inputs(geometry, dtype=torch.float64, n=2, c=4, cw=2, device="cpu", seed=0):
    h, w, k, s, p, d, _ = geometry
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, c, h, w, generator=gen, dtype=dtype).to(device)
    x2 = torch.randn(n, c, h, w, generator=gen, dtype=dtype).to(device)
    positions = output_size(h, k, s, p, d) * output_size(w, k, s, p, d)
    wt = torch.randn(n, cw, k * k, positions, generator=gen, dtype=dtype).to(device)
    return x1, x2, wt


def _run_all(backend, geometry, x1, x2, wt, seed=1):
    """Outputs of the three ops and the gradients of every input under random output grads."""
    _, _, k, s, p, d, mode = geometry
    args = (k, s, p, d, mode)
    x1, x2, wt = (t.detach().requires_grad_() for t in (x1, x2, wt))
    with use_backend(backend):
        outs = [subtraction(x1, *args), subtraction2(x1, x2, *args), aggregation(x2, wt, *args)]
    gen = torch.Generator().manual_seed(seed)
    # Drawn in float64/float32 and cast, so half-precision runs see the same gradients.
    draw = torch.float64 if x1.dtype == torch.float64 else torch.float32
    grads = [torch.randn(o.shape, generator=gen, dtype=draw).to(o.device, o.dtype) for o in outs]
    results = list(outs)
    for out, grad, inputs in zip(outs, grads, [(x1,), (x1, x2), (x2, wt)]):
        results += torch.autograd.grad(out, inputs, grad)
    return results


# ------------------------------------------------------------------------------------ reference
def _naive(geometry, x1, x2, wt):
    """Loop-by-loop definition of subtraction2 and aggregation, independent of F.unfold."""
    h, w, k, s, p, d, mode = geometry
    n, c = x1.shape[:2]
    ho, wo = output_size(h, k, s, p, d), output_size(w, k, s, p, d)

    def read(x, b, ch, i, j):
        if not (0 <= i < h and 0 <= j < w):
            if mode == "zeros":
                return 0.0
            i = -i if i < 0 else (2 * (h - 1) - i if i >= h else i)
            j = -j if j < 0 else (2 * (w - 1) - j if j >= w else j)
        return x[b, ch, i, j].item()

    sub = torch.zeros(n, c, k * k, ho * wo, dtype=torch.float64)
    agg = torch.zeros(n, c, ho, wo, dtype=torch.float64)
    for b, ch, i, j in itertools.product(range(n), range(c), range(ho), range(wo)):
        ci, cj = i * s - p + (k // 2) * d, j * s - p + (k // 2) * d
        for a, bb in itertools.product(range(k), range(k)):
            ti, tj = i * s - p + a * d, j * s - p + bb * d
            sub[b, ch, a * k + bb, i * wo + j] = read(x1, b, ch, ci, cj) - read(x2, b, ch, ti, tj)
            weight = wt[b, ch % wt.shape[1], a * k + bb, i * wo + j].item()
            agg[b, ch, i, j] += weight * read(x2, b, ch, ti, tj)
    return sub, agg


@pytest.mark.parametrize("geometry", GEOMETRIES[::2] + [GEOMETRIES[5]], ids=_ids)
def test_reference_matches_naive_loops(geometry):
    x1, x2, wt = _inputs(geometry, n=1, c=4)
    sub, agg = _naive(geometry, x1, x2, wt)
    args = geometry[2:]
    with use_backend("reference"):
        torch.testing.assert_close(subtraction2(x1, x2, *args), sub, rtol=0, atol=1e-12)
        torch.testing.assert_close(subtraction(x1, *args), _naive(geometry, x1, x1, wt)[0])
        torch.testing.assert_close(aggregation(x2, wt, *args), agg, rtol=0, atol=1e-12)


def test_reflect_mode_mirrors_without_repeating_the_edge():
    x = torch.arange(5.0, dtype=torch.float64).view(1, 1, 1, 5).expand(1, 1, 3, 5)
    nb = neighbourhood(x, 3, padding=2, dilation=2, pad_mode="reflect")
    # Row 0, column 0: taps at columns -2, 0, 2 read 2, 0, 2 (mirror of -2 is 2, not 1).
    assert nb[0, 0, 3:6, 0].tolist() == [2.0, 0.0, 2.0]


# ------------------------------------------------------------------------------------ cpu kernels
# Images several row tiles wide: inner tiles, both borders and a partial last tile; stride 2 reads
# lane by lane.
WIDE_GEOMETRIES = [
    (13, 37, 7, 1, 3, 1, "reflect"),
    (11, 40, 3, 1, 1, 1, "zeros"),
    (9, 33, 5, 1, 4, 2, "reflect"),
    (8, 35, 5, 1, 2, 1, "zeros"),
    (10, 38, 3, 2, 1, 1, "reflect"),
]


@pytest.fixture
def cpu_variant(request, monkeypatch):
    """Run the test on the variant's ISA level and tile (kernel_variants.CPU_VARIANTS; compile
    and skip where the host cannot execute that level)."""
    with compile_or_skip(monkeypatch, request.param, "san_ops.cu"):
        yield request.param


@needs_cxx
@pytest.mark.parametrize("cpu_variant", CPU_VARIANTS, ids=variant_id, indirect=True)
@pytest.mark.parametrize("geometry", GEOMETRIES + WIDE_GEOMETRIES, ids=_ids)
def test_cpu_kernels_match_reference_float64(geometry, cpu_variant):
    # 12 channels sharing 4 weight channels: 3 per weight channel, a partial channel group.
    x1, x2, wt = _inputs(geometry, c=12, cw=4)
    expected = _run_all("reference", geometry, x1, x2, wt)
    got = _run_all("cpu", geometry, x1, x2, wt)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


@needs_cxx
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_ids)
def test_cpu_kernels_on_a_tiny_grid(geometry):
    x1, x2, wt = _inputs(geometry)
    expected = _run_all("reference", geometry, x1, x2, wt)
    with launch_config(3, 2):  # 6 threads of a tiny grid: every grid-stride loop wraps
        got = _run_all("cpu", geometry, x1, x2, wt)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


@needs_cxx
@pytest.mark.parametrize("cpu_variant", CPU_VARIANTS, ids=variant_id, indirect=True)
@pytest.mark.parametrize("geometry", GEOMETRIES[:6] + WIDE_GEOMETRIES[:3], ids=_ids)
def test_cpu_kernels_match_reference_float32(geometry, cpu_variant):
    x1, x2, wt = _inputs(geometry, dtype=torch.float32, c=16, cw=2)
    expected = _run_all("reference", geometry, x1, x2, wt)
    got = _run_all("cpu", geometry, x1, x2, wt)
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=1e-5, atol=2e-5)


@needs_cxx
def test_cpu_kernels_non_contiguous_inputs():
    geometry = (7, 9, 3, 2, 2, 2, "reflect")
    x1, x2, wt = _inputs(geometry, c=4, cw=2)
    # Same values, non-contiguous layouts (channels-last views and a transposed weight).
    nc = [
        x1.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        x2.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        wt.transpose(2, 3).contiguous().transpose(2, 3),
    ]
    assert not any(t.is_contiguous() for t in nc)
    expected = _run_all("reference", geometry, x1, x2, wt)
    got = _run_all("cpu", geometry, *nc)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def _recording(calls, name, fn):
    def record(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return record


@needs_cxx
def test_automatic_choice_uses_the_compiled_kernels_on_cpu(monkeypatch):
    calls = []
    for name in (
        "aggregation_forward",
        "aggregation_input_backward",
        "aggregation_weight_backward",
        "subtraction2_forward",
    ):
        monkeypatch.setattr(ops_kernels, name, _recording(calls, name, getattr(ops_kernels, name)))
    x1, x2, wt = _inputs(GEOMETRIES[0])
    x1.requires_grad_()
    wt.requires_grad_()
    aggregation(x1, wt, 3, 1, 1, 1, "reflect").sum().backward()
    assert calls == [
        "aggregation_forward",
        "aggregation_input_backward",
        "aggregation_weight_backward",
    ]
    calls.clear()
    with use_backend("reference"):
        aggregation(x1, wt, 3, 1, 1, 1, "reflect").sum().backward()
    assert calls == []
    # float16 on the CPU: the kernels compute in float32 (one dtype policy for every op, see
    # san_det.layers.backend) and round the result back to float16.
    half = x1.detach().half()
    y = subtraction(half, 3, 1, 1)
    assert calls == ["subtraction2_forward"] and y.dtype == torch.float16
    with use_backend("cpu"):
        assert torch.equal(subtraction(half, 3, 1, 1), y)
    with use_backend("reference"):
        assert torch.equal(subtraction(half.float(), 3, 1, 1).half(), y)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cxx)])
@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_gradcheck(backend, pad_mode):
    geometry = (4, 5, 3, 2, 2, 2, pad_mode)
    x1, x2, wt = (t.requires_grad_() for t in _inputs(geometry, n=1, c=4, cw=2))
    args = dict(kernel_size=3, stride=2, padding=2, dilation=2, pad_mode=pad_mode)
    with use_backend(backend):
        assert torch.autograd.gradcheck(functools.partial(subtraction, **args), (x1,))
        assert torch.autograd.gradcheck(functools.partial(subtraction2, **args), (x1, x2))
        assert torch.autograd.gradcheck(functools.partial(aggregation, **args), (x2, wt))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cxx)])
def test_empty_batch(backend):
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    w = torch.randn(0, 2, 9, 25, requires_grad=True)
    with use_backend(backend):
        assert subtraction(x, 3, 1, 1, 1, "reflect").shape == (0, 4, 9, 25)
        assert subtraction2(x, x, 3, 1, 1).shape == (0, 4, 9, 25)
        y = aggregation(x, w, 3, 1, 1, 1, "reflect")
    assert y.shape == (0, 4, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_value_error():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(1, 2, 9, 25)
    cases = [
        (lambda: subtraction(x, 2, 1, 1), "kernel_size"),
        (lambda: subtraction(x, 0), "kernel_size"),
        (lambda: subtraction(x, -3), "kernel_size"),
        (lambda: subtraction(x, 3, 0, 1), "stride"),
        (lambda: subtraction(x, 3, 1, -1), "padding"),
        (lambda: subtraction(x, 3, 1, 1, 0), "dilation"),
        (lambda: subtraction(x, 3, 1, 1, 1, "replicate"), "pad_mode"),
        (lambda: subtraction(x, 3, 1, 5, 1, "reflect"), "padding < H"),
        (lambda: subtraction(torch.randn(1, 4, 8, 3), 3, 1, 3, 1, "reflect"), "padding < H"),
        (lambda: subtraction(x[0], 3, 1, 1), "4-D"),
        (lambda: subtraction(x.long(), 3, 1, 1), "floating"),
        (lambda: subtraction(x, 7, 1, 0), "smaller than the dilated window"),
        (lambda: subtraction2(x, x[:, :2], 3, 1, 1), "x2 must have the shape"),
        (lambda: subtraction2(x, x.double(), 3, 1, 1), "dtype"),
        (lambda: subtraction2(x, x.to("meta"), 3, 1, 1), "device"),
        (lambda: aggregation(x, torch.randn(1, 3, 9, 25), 3, 1, 1), "multiple of Cw"),
        (lambda: aggregation(x, torch.randn(1, 2, 8, 25), 3, 1, 1), r"\(N, Cw, k\*k, Ho\*Wo\)"),
        (lambda: aggregation(x, torch.randn(1, 2, 9, 24), 3, 1, 1), "Ho\\*Wo"),
        (lambda: aggregation(x, torch.randn(2, 2, 9, 25), 3, 1, 1), "w must have shape"),
        (lambda: aggregation(x, torch.randn(1, 0, 9, 25), 3, 1, 1), "w must have shape"),
        (lambda: aggregation(x, w[0], 3, 1, 1), "4-D"),
        (lambda: aggregation(x, w.double(), 3, 1, 1), "dtype"),
        (lambda: aggregation(x, w.to("meta"), 3, 1, 1), "device"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()


# ------------------------------------------------------------------------------------ NVRTC
@pytest.mark.slow
@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_with_nvrtc(arch):
    # Shapes are runtime arguments, so one translation unit per dtype covers every shape.
    kernels = ["san_subtraction2_forward", "san_subtraction_backward", "san_aggregation_forward"]
    kernels += ["san_aggregation_input_backward", "san_aggregation_weight_backward"]
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    source, cubins = compile_kernel_file("san_ops.cu", kernels, dtypes, arch)
    for cubin in cubins:
        for name in source.kernels:
            assert name.encode() in cubin


# ------------------------------------------------------------------------------------ CUDA
@needs_cuda
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_kernels_match_reference(geometry, dtype):
    x1, x2, wt = _inputs(geometry, dtype=dtype, c=8, cw=4, device="cuda")
    expected = _run_all("reference", geometry, x1, x2, wt)
    got = _run_all("cuda", geometry, x1, x2, wt)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    for e, g in zip(expected, got):
        assert g.is_cuda and g.dtype == dtype
        torch.testing.assert_close(g, e, **tol)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernels_half_precision(dtype):
    geometry = (14, 13, 7, 1, 3, 1, "reflect")
    x1, x2, wt = _inputs(geometry, dtype=torch.float32, c=16, cw=2, device="cuda")
    expected = _run_all("reference", geometry, x1, x2, wt)
    got = _run_all("cuda", geometry, x1.to(dtype), x2.to(dtype), wt.to(dtype))
    tol = 2e-2 if dtype == torch.float16 else 1.5e-1
    for e, g in zip(expected, got):
        assert g.dtype == dtype
        scale = e.abs().max().clamp_min(1)
        assert (g.float() - e).abs().max() / scale < tol


@needs_cuda
def test_cuda_non_contiguous_side_stream_and_gradcheck():
    geometry = (7, 9, 3, 2, 2, 2, "reflect")
    x1, x2, wt = _inputs(geometry, c=4, cw=2, device="cuda")
    expected = _run_all("reference", geometry, x1, x2, wt)
    nc = [x1.transpose(2, 3).contiguous().transpose(2, 3), x2, wt.transpose(2, 3).contiguous()]
    nc[2] = nc[2].transpose(2, 3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _run_all("cuda", geometry, *nc)
    torch.cuda.current_stream().wait_stream(stream)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
    args = dict(kernel_size=3, stride=2, padding=2, dilation=2, pad_mode="reflect")
    x1, x2, wt = (t[:1].detach().requires_grad_() for t in (x1, x2, wt))
    with use_backend("cuda"):
        assert torch.autograd.gradcheck(functools.partial(subtraction, **args), (x1,))
        assert torch.autograd.gradcheck(functools.partial(subtraction2, **args), (x1, x2))
        assert torch.autograd.gradcheck(functools.partial(aggregation, **args), (x2, wt))
