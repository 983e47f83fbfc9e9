"""The attention ops on a GPU: what CPU emulation of the kernels cannot show.

Every test compares with the float64 PyTorch reference, forward and every gradient, for the SASA
op (``local_attention``) and the SAN ops (``subtraction``, ``subtraction2``, ``aggregation``) in
both pad modes:

- bitwise repeats under ``torch.use_deterministic_algorithms(True)``, reflect and zero padding;
- half and bfloat16 storage, and AMP autocast;
- tiny launch grids and the capped grid (every grid-stride loop wraps);
- ``torch.library.opcheck`` on CUDA tensors;
- ``torch.compile`` (inductor, and ``mode="reduce-overhead"``: CUDA graphs);
- an op on ``cuda:1`` while ``cuda:0`` is current (needs two GPUs);
- SASA's ``grad_rel`` on cuBLAS: float32 precision with TF32 enabled, peak memory.

Tests parametrized by device also run on the CPU (the compiled CPU kernels), so their code runs
on every machine; the ``cuda`` ones are marked ``cuda`` (skipped, with the reason, without a GPU).
"""

import functools

import pytest
import torch

import san_det  # noqa: F401  (patches before anything imports detectron2)
from san_det.layers import launcher
from san_det.layers.backend import use_backend
from san_det.layers.kernel_runtime import cpu_compiler_available
from san_det.layers.ops import aggregation, local_attention, output_size, subtraction, subtraction2
from tests.helpers.launch import launch_config
from tests.helpers.skips import needs_cuda

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not cpu_compiler_available(), reason="no C++")),
    pytest.param("cuda", marks=needs_cuda),
]
PAD_MODES = ["reflect", "zeros"]
# SASA: (N, C, H, W), heads, kernel_size, dilation; SAN: (N, C, H, W), Cw and the window
# (kernel_size, stride, padding, dilation): odd sizes, every border, padding beyond the window's
# half (reflect allows padding < H, W).
SASA_SHAPE, SASA_WINDOW = (2, 8, 7, 9), (2, 5, 1)
SAN_SHAPE, SAN_CW, SAN_WINDOW = (2, 8, 7, 9), 4, (5, 2, 4, 1)


def _draw(shape, seed: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Seeded normal values drawn in float64 on the CPU, then rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def _cases(device, dtype, pad_mode="reflect", sasa_shape=SASA_SHAPE, san_shape=SAN_SHAPE):
    """``(name, op, inputs)`` of every forward op: inputs rounded to ``dtype`` on ``device``."""
    heads, ks, dil = SASA_WINDOW
    q, k, v = (_draw(sasa_shape, s, dtype, device) for s in range(3))
    rel = _draw((sasa_shape[1], ks, ks), 3, dtype, device)
    sasa = functools.partial(local_attention, num_heads=heads, kernel_size=ks, dilation=dil)
    window = (*SAN_WINDOW, pad_mode)
    h, w = san_shape[2:]
    positions = output_size(h, *SAN_WINDOW) * output_size(w, *SAN_WINDOW)
    x1, x2 = _draw(san_shape, 4, dtype, device), _draw(san_shape, 5, dtype, device)
    wt = _draw((san_shape[0], SAN_CW, SAN_WINDOW[0] ** 2, positions), 6, dtype, device)
    return [
        ("local_attention", sasa, (q, k, v, rel)),
        ("subtraction", lambda x: subtraction(x, *window), (x1,)),
        ("subtraction2", lambda a, b: subtraction2(a, b, *window), (x1, x2)),
        ("aggregation", lambda x, w_: aggregation(x, w_, *window), (x2, wt)),
    ]


def _run(backend, op, inputs, grad=None, autocast=None):
    """``[out, *input gradients]`` of ``op`` on ``backend``; ``grad`` (default: drawn and rounded
    to the output's dtype) is the output gradient; ``autocast``: a dtype to autocast to."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    device_type = inputs[0].device.type
    context = torch.autocast(device_type, dtype=autocast, enabled=autocast is not None)
    with use_backend(backend), context:
        out = op(*inputs)
    if grad is None:
        grad = _draw(out.shape, 9, out.dtype, out.device)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad)], grad


def _reference(op, inputs, grad):
    """The float64 reference on the CPU of the same (rounded) inputs and output gradient."""
    inputs = [t.detach().cpu().double() for t in inputs]
    return _run("reference", op, inputs, grad.detach().cpu().double())[0]


def _assert_close_to(got, want, name, relative: float):
    """Each tensor within ``relative`` of the reference's largest magnitude (and rtol alike)."""
    labels = ["out"] + [f"grad{i}" for i in range(len(got) - 1)]
    for label, g, w in zip(labels, got, want):
        tol = dict(rtol=relative, atol=relative * max(w.abs().max().item(), 1e-30))
        message = lambda m: f"{name} {label}: {m}"  # noqa: E731
        torch.testing.assert_close(g.detach().cpu().double(), w, msg=message, **tol)


def _kernel_backend(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


# -------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_repeat_in_deterministic_mode(device, backend, pad_mode, deterministic_mode):
    """Forward and backward run under deterministic mode (aten's reflection-pad backward and
    cuBLAS without CUBLAS_WORKSPACE_CONFIG would raise on CUDA) and repeat bit for bit."""
    backend = _kernel_backend(device) if backend == "kernels" else backend
    for name, op, inputs in _cases(device, torch.float32, pad_mode):
        first, grad = _run(backend, op, inputs)
        second, _ = _run(backend, op, inputs, grad)
        for a, b in zip(first, second):
            assert a.device.type == device and torch.equal(a, b), name
        _assert_close_to(first, _reference(op, inputs, grad), name, relative=1e-5)


@pytest.mark.skipif(not cpu_compiler_available(), reason="no C++ compiler")
@pytest.mark.parametrize("pad_mode", PAD_MODES)
def test_cuda_tile_on_the_cpu_writes_every_output_entry(pad_mode, deterministic_mode):
    """Deterministic mode fills new tensors with NaN: the CUDA build's code path (one pixel per
    thread, the .cu defaults, emulated on the CPU) leaves no entry of any output unwritten."""
    with launch_config(
        cpu_pixels_per_thread=1, cpu_channels_per_thread=4, cpu_taps_at_once=4,
        cpu_rows_per_thread=1,
    ):  # fmt: skip
        for name, op, inputs in _cases("cpu", torch.float32, pad_mode):
            got, grad = _run("cpu", op, inputs)
            assert all(torch.isfinite(g).all() for g in got), name
            _assert_close_to(got, _reference(op, inputs, grad), name, relative=1e-5)


# ------------------------------------------------------------------------ half precision, AMP
# Storage in half precision, float32 arithmetic: a few roundings of the result to the dtype.
HALF_TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_against_the_float64_reference(device, dtype, pad_mode):
    for name, op, inputs in _cases(device, dtype, pad_mode):
        got, grad = _run(_kernel_backend(device), op, inputs)
        assert all(g.dtype == dtype and g.device.type == device for g in got), name
        _assert_close_to(got, _reference(op, inputs, grad), name, HALF_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_against_the_float64_reference(device, dtype):
    """float32 inputs under autocast: the ops run in ``dtype`` (the registered autocast rule), the
    gradients come back in float32; against the reference on the inputs rounded to ``dtype``."""
    for name, op, inputs in _cases(device, torch.float32):
        got, grad = _run(_kernel_backend(device), op, inputs, autocast=dtype)
        assert got[0].dtype == dtype and all(g.dtype == torch.float32 for g in got[1:]), name
        rounded = [t.to(dtype) for t in inputs]
        _assert_close_to(got, _reference(op, rounded, grad), name, HALF_TOLERANCE[dtype])


# ------------------------------------------------------------------------------- launch grids
@needs_cuda
@pytest.mark.parametrize("grid, block", [(1, 1), (3, 32), (7, 96)])
def test_cuda_tiny_launch_grids(grid, block):
    """Far fewer threads than work items: every CUDA kernel's grid-stride loop wraps."""
    for pad_mode in PAD_MODES:
        for name, op, inputs in _cases("cuda", torch.float64, pad_mode):
            with launch_config(grid, block):
                got, grad = _run("cuda", op, inputs)
            _assert_close_to(got, _reference(op, inputs, grad), name, relative=1e-12)


@needs_cuda
def test_cuda_capped_grid(monkeypatch):
    """The grid capped at one block of the default size (MAX_CUDA_BLOCKS in real runs) while the
    work items of most kernels (here 1564 SASA rows tiles, 2464 SAN output pixels) are several
    times more."""
    monkeypatch.setattr(launcher, "MAX_CUDA_BLOCKS", 1)
    shape = (2, 8, 17, 23)
    for name, op, inputs in _cases("cuda", torch.float64, sasa_shape=shape, san_shape=shape):
        got, grad = _run("cuda", op, inputs)
        _assert_close_to(got, _reference(op, inputs, grad), name, relative=1e-12)


# ------------------------------------------------------------------------------------ opcheck
def _op_cases(device, dtype):
    """(op, args) of every registered op, forward and backward, on ``device``."""
    cases = _cases(device, dtype)
    q, k, v, rel = (t.detach().requires_grad_() for t in cases[0][2])
    heads, ks, dil = SASA_WINDOW
    with torch.no_grad():
        _, attn = torch.ops.san_det.local_attention(q, k, v, rel, heads, ks, dil)
    x1, x2 = (t.detach().requires_grad_() for t in cases[2][2])
    wt = cases[3][2][1].detach().requires_grad_()
    ho, wo = (output_size(s, *SAN_WINDOW) for s in SAN_SHAPE[2:])
    n, c, h, w = SAN_SHAPE
    grad_taps = _draw((n, c, SAN_WINDOW[0] ** 2, ho * wo), 7, dtype, device)
    grad_out = _draw((n, c, ho, wo), 8, dtype, device)
    ops = torch.ops.san_det
    result = [
        (ops.local_attention, (q, k, v, rel, heads, ks, dil)),
        (ops.local_attention, (q, k, v, None, 4, 3, 2)),
        (ops.local_attention_backward,
         (_draw(q.shape, 9, dtype, device), q.detach(), k.detach(), v.detach(), rel.detach(),
          attn, heads, ks, dil)),
    ]  # fmt: skip
    for pad_mode in PAD_MODES:
        window = (*SAN_WINDOW, pad_mode)
        result += [
            (ops.subtraction, (x1, *window)),
            (ops.subtraction2, (x1, x2, *window)),
            (ops.subtraction_backward, (grad_taps, h, w, *window, 1, 1)),
            (ops.aggregation, (x2, wt, *window)),
            (ops.aggregation_input_backward, (grad_out, wt.detach(), h, w, *window)),
            (ops.aggregation_weight_backward, (grad_out, x2.detach(), SAN_CW, *window)),
        ]
    return result


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_opcheck(dtype):
    """Schema, autograd registration, fake implementation and AOT dispatch on CUDA tensors."""
    with use_backend("cuda"):
        for op, args in _op_cases("cuda", dtype):
            torch.library.opcheck(op.default, args)


# ------------------------------------------------------------------------------ torch.compile
@pytest.fixture
def own_inductor_cache(tmp_path, monkeypatch):
    """A cache of this test's own (a shared one would replay graphs of another checkout's ops)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def _all_ops(q, k, v, rel, x1, x2, wt):
    """Every op in one graph, with elementwise work around them for inductor to fuse."""
    heads, ks, dil = SASA_WINDOW
    sasa = local_attention(q * 0.5, k, v, rel, num_heads=heads, kernel_size=ks, dilation=dil)
    reflect, zeros = (*SAN_WINDOW, "reflect"), (*SAN_WINDOW, "zeros")
    taps = subtraction(x1.relu(), *reflect) + subtraction2(x1, x2, *zeros)
    return sasa.tanh(), taps.sigmoid(), aggregation(x2 + 1, wt * taps[:, :SAN_CW], *reflect)


@pytest.mark.slow
@needs_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_torch_compile(mode, own_inductor_cache):
    """Inductor and CUDA graphs (reduce-overhead: warm-up, record, then replays) against eager,
    forward and every gradient, three steps; the kernels launch on the capturing stream."""
    cases = _cases("cuda", torch.float64)
    inputs = [*cases[0][2], *cases[2][2], cases[3][2][1]]  # q, k, v, rel, x1, x2, wt
    compiled = torch.compile(_all_ops, mode=mode, fullgraph=True)
    want_inputs = [t.detach().requires_grad_() for t in inputs]
    with use_backend("cuda"):
        want_outs = _all_ops(*want_inputs)
    grads = [_draw(o.shape, 10 + i, o.dtype, "cuda") for i, o in enumerate(want_outs)]
    want = [o.detach() for o in want_outs]
    want += torch.autograd.grad(want_outs, want_inputs, grads)
    with use_backend("cuda"):
        for step in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            got_inputs = [t.detach().requires_grad_() for t in inputs]
            outs = compiled(*got_inputs)
            got = [o.detach().clone() for o in outs]
            got += [g.clone() for g in torch.autograd.grad(outs, got_inputs, grads)]
            for i, (g, w) in enumerate(zip(got, want)):
                message = lambda m: f"step {step} tensor {i}: {m}"  # noqa: E731
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=message)


# ------------------------------------------------------------------------------ other devices
@needs_cuda
def test_cuda_op_on_the_second_gpu_while_the_first_is_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with torch.cuda.device(0):
        allocated_on_first = torch.cuda.memory_allocated(0)
        for pad_mode in PAD_MODES:
            for name, op, inputs in _cases("cuda:1", torch.float32, pad_mode):
                got, grad = _run("cuda", op, inputs)
                assert all(g.device == torch.device("cuda:1") for g in got), name
                _assert_close_to(got, _reference(op, inputs, grad), name, relative=1e-5)
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
        assert torch.cuda.memory_allocated(0) == allocated_on_first


# --------------------------------------------------------------------- grad_rel through cuBLAS
def _sasa_backward_inputs(shape, heads, ks, dtype=torch.float32):
    n, c, h, w = shape
    q, k, v = (_draw(shape, s, dtype, "cuda") for s in range(3))
    rel = _draw((c, ks, ks), 3, dtype, "cuda")
    with torch.no_grad():
        _, attn = torch.ops.san_det.local_attention(q, k, v, rel, heads, ks, 1)
    return _draw(shape, 4, dtype, "cuda"), q, k, v, rel, attn


@needs_cuda
def test_cuda_rel_gradient_is_float32_with_tf32_and_autocast_on():
    """TF32 products (about 3 decimal digits) set by the user and a backward run inside autocast:
    grad_rel still matches the float64 reference to float32 precision, on the cuBLAS path and
    on the deterministic kernel (which must agree with it)."""
    heads, ks = 4, 7
    args = _sasa_backward_inputs((2, 32, 24, 40), heads, ks)
    attn = args[5]
    with use_backend("reference"):
        want = torch.ops.san_det.local_attention_backward(
            *(t.double() for t in args[:5]), attn.double(), heads, ks, 1
        )[3]
    flags = torch.backends.cuda.matmul
    saved = flags.fp32_precision
    try:
        flags.fp32_precision = "tf32"
        with use_backend("cuda"), torch.autocast("cuda", dtype=torch.float16):
            cublas = torch.ops.san_det.local_attention_backward(*args, heads, ks, 1)[3]
        assert flags.fp32_precision == "tf32"
    finally:
        flags.fp32_precision = saved
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with use_backend("cuda"):
            kernel = torch.ops.san_det.local_attention_backward(*args, heads, ks, 1)[3]
    finally:
        torch.use_deterministic_algorithms(previous)
    scale = want.abs().max().item()
    for got in (cublas, kernel):
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max().item() < 2e-6 * scale


@needs_cuda
def test_cuda_rel_gradient_peak_memory():
    """The SASA backward allocates its outputs, dlogit (the size of attn) and a chunk of rows:
    no second attn (a reordered copy of dlogit), no float32 copy of half-precision q."""
    heads, ks = 8, 7
    for dtype in (torch.float32, torch.float16):
        args = _sasa_backward_inputs((2, 64, 64, 80), heads, ks, dtype)
        q, attn = args[1], args[5]
        with use_backend("cuda"):  # warm-up: kernels compiled, cuBLAS workspace allocated
            torch.ops.san_det.local_attention_backward(*args, heads, ks, 1)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with use_backend("cuda"):
            grads = torch.ops.san_det.local_attention_backward(*args, heads, ks, 1)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        # Besides the gradients and dlogit: a chunk of 4 of the 64 rows of dlogit (attn / 16)
        # and, for float16, of q in float32 (q / 8); the whole q in float32 would be attn / 6.
        beyond = extra - sum(g.nbytes for g in grads) - attn.nbytes
        assert beyond <= attn.nbytes / 8, (dtype, beyond, attn.nbytes, q.nbytes)
