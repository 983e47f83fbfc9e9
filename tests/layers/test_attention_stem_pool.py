"""``san_det::attention_stem_pool`` (the stem's attention output reduced to what its norm and max
pool need) and the stem's forward that uses it.

- The op's ``reference`` backend against plain tensor operations on ``attention_stem``'s output
  (pool by sign, channel sums), forward and autograd;
- its kernels (every compiled CPU variant, grid-stride launches, two threads) against the
  reference backend: outputs, the saved positions exactly, the gradients of all seven inputs from
  those of ``pooled`` and ``sums``, with and without the term of the sum of squares;
- ties, image-scale inputs, opcheck, bad arguments, the NVRTC build is in
  ``test_attention_stem_kernels.py``;
- ``SpatiallyAwareAttentionStem.forward`` through the op against ``forward_reference`` for every
  norm it takes (training/eval BatchNorm, momentum ``None``, no affine, no running statistics,
  negative and zero weights, FrozenBatchNorm2d): outputs, every gradient, running statistics; what
  it keeps for the backward; the cases that do not take it.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

import san_det  # noqa: F401  (compat before detectron2)
from san_det.layers.attention_stem import SpatiallyAwareAttentionStem
from san_det.layers.backend import use_backend
from tests.helpers.kernel_variants import CPU_VARIANTS, variant_id
from tests.helpers.launch import launch_config, torch_threads
from tests.helpers.skips import needs_cuda, needs_cxx
from tests.layers.test_attention_stem_kernels import cpu_variant  # noqa: F401  (fixture)
from tests.layers.test_attention_stem_kernels import CASES, TOLERANCES, _case_id, _op_inputs

# The sums are float64 sums of the output (float32 in the float32 kernels' tiles).
SUMS_TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}


def _sign(channels: int, seed: int = 0) -> torch.Tensor:
    """-1, 0 and 1 among the channels (every one at least once for channels >= 3)."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(-1, 2, (channels,), generator=gen).double()
    sign[:3] = torch.tensor([1.0, -1.0, 0.0])[: min(3, channels)]
    return sign


def _run(backend, tensors, geometry, sign, input_grad=True, squares=True):
    """``(pooled, position, sums)`` and the gradients of the seven inputs from random gradients
    of ``pooled`` and ``sums`` (that of the sum of squares 0 unless ``squares``)."""
    leaves = [t.clone().requires_grad_(i > 0 or input_grad) for i, t in enumerate(tensors)]
    pooled, position, sums = torch.ops.san_det.attention_stem_pool(
        *leaves, sign.to(tensors[0].dtype), *geometry, backend
    )
    gen = torch.Generator().manual_seed(1)
    grad_pooled = torch.randn(pooled.shape, generator=gen, dtype=torch.float64).to(pooled.dtype)
    grad_sums = torch.randn(2, sums.shape[1], generator=gen, dtype=torch.float64)
    if not squares:
        grad_sums[1] = 0
    wanted = leaves if input_grad else leaves[1:]
    grads = torch.autograd.grad((pooled, sums), wanted, (grad_pooled, grad_sums))
    return [pooled.detach(), sums.detach(), *grads], position


def _assert_match(got, want, dtype):
    (got, got_position), (want, want_position) = got, want
    assert torch.equal(got_position, want_position)
    for i, (g, w) in enumerate(zip(got, want)):
        tol = TOLERANCES[dtype] if i != 1 else SUMS_TOLERANCES[dtype]  # sums: float64
        torch.testing.assert_close(g, w, **tol, msg=f"output/gradient {i}")
        assert w.abs().max() > 0, i


# ------------------------------------------------------------------------ reference backend
def _tensor_op_pool(y, sign, b):
    """Pool by sign with torch's max pool (ceil mode) and the window's first pixel."""
    sign = sign.to(y.dtype)[:, None, None]
    up = F.max_pool2d(y, b, b, ceil_mode=True)
    down = -F.max_pool2d(-y, b, b, ceil_mode=True)
    first = y[:, :, ::b, ::b]
    pooled = torch.where(sign > 0, up, torch.where(sign < 0, down, first))
    sums = torch.stack([y.sum((0, 2, 3)), (y * y).sum((0, 2, 3))]).double()
    return pooled, sums


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_backend_is_the_tensor_ops_on_the_output(case):
    tensors, geometry = _op_inputs(case, torch.float64)
    leaves = [t.clone().requires_grad_() for t in tensors]
    sign = _sign(tensors[1].shape[0])
    pooled, position, sums = torch.ops.san_det.attention_stem_pool(
        *leaves, sign, *geometry, "reference"
    )
    y = torch.ops.san_det.attention_stem(*leaves, *geometry, "reference")
    want_pooled, want_sums = _tensor_op_pool(y, sign, geometry[1])
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums, want_sums, rtol=1e-12, atol=1e-12)
    assert position.dtype == torch.uint8 and int(position.max()) < geometry[1] ** 2
    gen = torch.Generator().manual_seed(3)
    gp = torch.randn(pooled.shape, generator=gen, dtype=torch.float64)
    gs = torch.randn(sums.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((pooled * gp).sum() + (sums * gs).sum(), leaves)
    want = torch.autograd.grad((want_pooled * gp).sum() + (want_sums * gs).sum(), leaves)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"gradient {i}")


def test_ties_take_the_first_pixel_of_the_block():
    """An all-zero block: every pixel's output is 0, the position is the block's first pixel."""
    tensors, geometry = _op_inputs(CASES[0], torch.float64)
    tensors[0][:, :, 4:8, 4:8] = 0
    sign = _sign(tensors[1].shape[0])
    for backend in ["reference"] + (["cpu"] if _has_cxx() else []):
        pooled, position, _ = torch.ops.san_det.attention_stem_pool(
            *tensors, sign, *geometry, backend
        )
        assert (position[:, :, 1, 1] == 0).all() and (pooled[:, :, 1, 1] == 0).all()
        assert (position != 0).any()


def _has_cxx():
    from san_det.layers.kernel_runtime import cpu_compiler_available

    return cpu_compiler_available()


# ---------------------------------------------------------------------------------- kernels
@needs_cxx
@pytest.mark.parametrize("cpu_variant", CPU_VARIANTS, ids=variant_id, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cpu_kernels_match_the_reference_backend(case, dtype, cpu_variant):
    tensors, geometry = _op_inputs(case, dtype)
    sign = _sign(tensors[1].shape[0])
    want = _run("reference", tensors, geometry, sign)
    _assert_match(_run("cpu", tensors, geometry, sign), want, dtype)


@needs_cxx
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "no_input_grad"])
@pytest.mark.parametrize("squares", [True, False], ids=["squares", "no_squares"])
def test_gradient_without_the_sum_of_squares_term(input_grad, squares):
    """A zero gradient of the sum of squares (running statistics) skips recomputing the output;
    the gradients still match."""
    tensors, geometry = _op_inputs(CASES[4], torch.float64)
    sign = _sign(tensors[1].shape[0], seed=2)
    want = _run("reference", tensors, geometry, sign, input_grad, squares)
    _assert_match(_run("cpu", tensors, geometry, sign, input_grad, squares), want, torch.float64)


@needs_cxx
@pytest.mark.parametrize(
    "launch", [dict(grid=1, block=1), dict(grid=2, block=3), dict(cpu_pixels_per_thread=1)]
)
def test_grid_stride_launches_and_parts_of_the_sums(launch):
    tensors, geometry = _op_inputs(CASES[1], torch.float64)
    sign = _sign(tensors[1].shape[0])
    want = _run("reference", tensors, geometry, sign)
    with launch_config(**launch):
        got = _run("cpu", tensors, geometry, sign)
    _assert_match(got, want, torch.float64)


@needs_cxx
def test_kernels_run_with_several_threads():
    tensors, geometry = _op_inputs(CASES[0], torch.float64)
    sign = _sign(tensors[1].shape[0])
    want = _run("reference", tensors, geometry, sign)
    with torch_threads(2):
        got = _run("cpu", tensors, geometry, sign)
    _assert_match(got, want, torch.float64)


@needs_cxx
def test_image_scale_inputs_in_float32():
    """Pixels in 0..255: the float32 kernels' pooled values and sums stay close to float64."""
    tensors, geometry = _op_inputs(CASES[1], torch.float64)
    tensors[0] = tensors[0] * 120
    sign = _sign(tensors[1].shape[0])
    (want, _), (got, _) = (
        _run("reference", tensors, geometry, sign),
        _run("cpu", [t.float() for t in tensors], geometry, sign),
    )
    for i, (g, w) in enumerate(zip(got, want)):
        scale = w.abs().max()
        torch.testing.assert_close(g.double() / scale, w / scale, rtol=1e-3, atol=1e-3, msg=i)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cuda_kernels_match_the_reference_backend(case, dtype):
    tensors, geometry = _op_inputs(case, dtype)
    sign = _sign(tensors[1].shape[0]).cuda()
    want = _run("reference", [t.cuda() for t in tensors], geometry, sign)
    got = _run("cuda", [t.cuda() for t in tensors], geometry, sign)
    _assert_match(got, want, dtype)


# ------------------------------------------------------------------------------ registration
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck(dtype):
    tensors, geometry = _op_inputs(CASES[0], dtype)
    leaves = [t.clone().requires_grad_() for t in tensors]
    sign = _sign(tensors[1].shape[0]).to(dtype)
    torch.library.opcheck(torch.ops.san_det.attention_stem_pool.default, (*leaves, sign, *geometry))
    with torch.no_grad():
        pooled, position, sums = torch.ops.san_det.attention_stem_pool(*tensors, sign, *geometry)
    for input_grad in (True, False):
        args = (torch.randn_like(pooled), torch.randn_like(sums), position, *tensors, sign)
        torch.library.opcheck(
            torch.ops.san_det.attention_stem_pool_backward.default,
            (*args, *geometry, input_grad),
        )


def test_gradcheck():
    tensors, geometry = _op_inputs(CASES[5], torch.float64)
    sign = _sign(tensors[1].shape[0])
    leaves = [t.clone().requires_grad_() for t in tensors]

    def pooled_and_sums(*t):
        pooled, _, sums = torch.ops.san_det.attention_stem_pool(*t, sign, *geometry)
        return pooled, sums

    assert torch.autograd.gradcheck(pooled_and_sums, leaves)


def test_bad_arguments():
    tensors, geometry = _op_inputs(CASES[0], torch.float64)
    with pytest.raises(ValueError, match=r"pool_sign must be \(C,\) = \(16,\)"):
        torch.ops.san_det.attention_stem_pool(*tensors, torch.ones(8), *geometry)
    with pytest.raises(ValueError, match=r"x must be \(N, C_in, H, W\)"):
        torch.ops.san_det.attention_stem_pool(tensors[0][0], *tensors[1:], _sign(16), *geometry)


# --------------------------------------------------------------------------- the stem module
def _norm(kind: str, channels: int, dtype) -> nn.Module:
    if kind == "frozen":
        norm = FrozenBatchNorm2d(channels)
    elif kind == "sync":  # one process: BatchNorm's statistics
        norm = nn.SyncBatchNorm(channels)
    else:
        options = {
            "no_affine": dict(affine=False),
            "no_running_stats": dict(track_running_stats=False),
            "momentum_none": dict(momentum=None),
        }
        norm = nn.BatchNorm2d(channels, **options.get(kind, {}))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.copy_(torch.randn(channels, generator=gen))
            norm.weight[:3] = torch.tensor([0.7, -1.3, 0.0])  # positive, negative, zero scales
            norm.bias.copy_(torch.randn(channels, generator=gen))
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.copy_(torch.randn(channels, generator=gen))
            norm.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
    return norm.to(dtype)


NORMS = ["train", "eval", "momentum_none", "no_affine", "no_running_stats", "frozen", "sync"]


def _stem(kind: str, dtype, **kwargs):
    torch.manual_seed(0)
    stem = SpatiallyAwareAttentionStem(3, **{"out_channels": 16, "num_heads": 2, **kwargs})
    stem.norm = _norm(kind, stem.out_channels, dtype)
    stem = stem.to(dtype)
    return stem.train(kind not in ("eval", "frozen"))


def _step(stem, forward, x, times=2):
    """Outputs and gradients (input and parameters) of ``times`` passes."""
    results = []
    for _ in range(times):
        leaf = x.clone().requires_grad_()
        out = forward(leaf)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        results.append([out.detach(), *torch.autograd.grad(out, [leaf, *stem.parameters()], grad)])
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", NORMS)
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cxx)])
@pytest.mark.parametrize("size", [(13, 18), (8, 8)], ids=["13x18", "8x8"])
def test_stem_forward_through_the_op_matches_the_reference(size, backend, kind, dtype, monkeypatch):
    """Two training steps (the second sees the running statistics the first updated), then the
    running statistics; the stem takes the op."""
    stem = _stem(kind, dtype)
    reference = copy.deepcopy(stem)
    x = torch.randn(2, 3, *size, dtype=torch.float64).to(dtype) * 3
    if backend == "reference":  # the op's reference backend (the stem takes it on kernels)
        monkeypatch.setattr("san_det.layers.attention_stem.pool_runs_kernels", lambda *args: True)
    with use_backend(backend):
        assert stem._pools_in_attention(x)
        got = _step(stem, stem.forward, x)
    want = _step(reference, reference.forward_reference, x)
    tol = TOLERANCES[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for step, (g_step, w_step) in enumerate(zip(got, want)):
        for i, (g, w) in enumerate(zip(g_step, w_step)):
            torch.testing.assert_close(g, w, **tol, msg=f"step {step}, output/gradient {i}")
    for (name, g), w in zip(stem.norm.named_buffers(), reference.norm.buffers()):
        torch.testing.assert_close(g, w, **tol, msg=name)


@needs_cxx
def test_the_op_path_keeps_nothing_at_full_resolution():
    stem = _stem("train", torch.float32, out_channels=64, num_heads=8)
    x = torch.randn(2, 3, 32, 40)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stem(x.requires_grad_())
    assert saved and max(saved) <= 2 * 64 * 32 * 40 // 16  # pooled resolution at most
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stem.forward_reference(x)
    assert max(saved) >= 2 * 64 * 32 * 40  # the check sees full-resolution tensors


@pytest.mark.parametrize(
    "change",
    ["group_norm", "overlapping_pool", "beyond_the_kernels", "reference_backend"],
)
def test_cases_that_do_not_take_the_op(change):
    stem = _stem("train", torch.float64)
    x = torch.randn(1, 3, 8, 12, dtype=torch.float64)
    if change == "group_norm":
        stem.norm = nn.GroupNorm(2, 16).double()
    elif change == "overlapping_pool":
        stem.pool = nn.MaxPool2d(4, 2, ceil_mode=True)
    if change == "beyond_the_kernels":
        stem = SpatiallyAwareAttentionStem(3, 16, block_size=5, num_heads=2).double()
    if change == "reference_backend":
        with use_backend("reference"):
            assert not stem._pools_in_attention(x)
    else:
        assert not stem._pools_in_attention(x)
    with torch.no_grad():
        torch.testing.assert_close(stem(x), stem.forward_reference(x))


def _synchronised_stem_step(rank: int, init_file: str, results: str) -> None:
    """One process of two (gloo): its half of the batch through a stem with SyncBatchNorm."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    try:
        stem = _stem("sync", torch.float64)
        x = _synchronised_input()[rank::2]
        assert stem._pools_in_attention(x)
        out, grad_x, *grads = _step(stem, stem.forward, x, times=1)[0]
        torch.save(
            {"out": out, "grad_x": grad_x, "grads": grads, "buffers": list(stem.norm.buffers())},
            f"{results}.{rank}",
        )
    finally:
        torch.distributed.destroy_process_group()


def _synchronised_input():
    return torch.randn(4, 3, 9, 13, generator=torch.Generator().manual_seed(6), dtype=torch.float64)


@pytest.mark.slow
@needs_cxx
def test_sync_batch_norm_over_two_processes_is_batch_norm_over_the_whole_batch(tmp_path):
    """SyncBatchNorm's statistics over two processes (the channel sums added up, and their
    gradients in the backward): the outputs, the image's gradient and the running statistics
    equal BatchNorm over the whole batch; each process's parameter gradients add up to its."""
    torch.multiprocessing.spawn(
        _synchronised_stem_step,
        args=(str(tmp_path / "init"), str(tmp_path / "results")),
        nprocs=2,
    )
    parts = [torch.load(tmp_path / f"results.{rank}", weights_only=True) for rank in (0, 1)]
    stem = _stem("train", torch.float64)
    x = _synchronised_input()
    order = torch.cat([torch.arange(0, 4, 2), torch.arange(1, 4, 2)])
    leaf = x[order].clone().requires_grad_()
    out = stem.forward_reference(leaf)
    grad = torch.cat(  # each process's, as _step draws it
        [
            torch.randn(p["out"].shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
            for p in parts
        ]
    )
    grad_x, *grads = torch.autograd.grad(out, [leaf, *stem.parameters()], grad)
    tol = TOLERANCES[torch.float64]
    torch.testing.assert_close(torch.cat([p["out"] for p in parts]), out.detach(), **tol)
    torch.testing.assert_close(torch.cat([p["grad_x"] for p in parts]), grad_x, **tol)
    for i, want in enumerate(grads):
        got = parts[0]["grads"][i] + parts[1]["grads"][i]
        torch.testing.assert_close(got, want, **tol, msg=f"parameter {i}")
    for rank in (0, 1):
        for got, want in zip(parts[rank]["buffers"], stem.norm.buffers()):
            torch.testing.assert_close(got, want, **tol)
