"""The attention stem's kernels (``kernels/attention_stem.cu``) against the op's tensor-operation
backend (``reference``, itself tested against the module's readable reference in
``test_attention_stem_op.py``): forward and the gradients of all seven inputs, float64 and
float32, on every compiled CPU variant (each instruction-set level, the CUDA build's scalar
lanes), grid-stride launches, image sides that are and are not multiples of the block, batch 1
and 2; geometries beyond the kernels' limits; the CUDA source compiled by NVRTC."""

import pytest
import torch

import san_det  # noqa: F401  (compat before detectron2)
from san_det.layers.attention_stem import SpatiallyAwareAttentionStem
from san_det.layers.kernel_runtime import KernelSource
from san_det.layers.ops.kernels import STEM_LIMITS
from tests.helpers.kernel_variants import CPU_VARIANTS, compile_or_skip, variant_id
from tests.helpers.launch import launch_config, torch_threads
from tests.helpers.skips import needs_cuda, needs_cxx, needs_nvrtc

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}
# (batch, height, width, stem arguments): the papers' stem geometry (b = 4, 8 channels per head,
# the kernels' compile-time sizes) and others (runtime sizes); sides 1 past, 1 short of and at
# block multiples, an image smaller than one block, rows wider than one tile of blocks.
CASES = [
    (2, 8, 12, dict(out_channels=16, num_heads=2)),
    (1, 9, 70, dict(out_channels=16, num_heads=2)),
    (2, 7, 5, dict(out_channels=16, num_heads=2, num_value_mixtures=1)),
    (2, 3, 2, dict(out_channels=8, num_heads=2)),
    (2, 7, 11, dict(out_channels=16, num_heads=4, block_size=3)),
    (1, 5, 6, dict(out_channels=4, num_heads=1, block_size=2)),
]


def _case_id(case):
    n, h, w, kwargs = case
    return (
        f"{n}x{h}x{w}-C{kwargs['out_channels']}h{kwargs['num_heads']}b{kwargs.get('block_size', 4)}"
    )


def _op_inputs(case, dtype, seed=0):
    n, h, w, kwargs = case
    torch.manual_seed(seed)
    stem = SpatiallyAwareAttentionStem(3, norm_layer=None, **{"num_value_mixtures": 3, **kwargs})
    stem = stem.to(dtype)
    probs = stem.mixture_weights().detach().view(-1, stem.num_value_mixtures)
    weights = [stem.query.weight, stem.key.weight, stem.value.weight]
    tensors = [torch.randn(n, 3, h, w, dtype=torch.float64).to(dtype)]
    tensors += [w.detach()[:, :, 0, 0] for w in weights]
    tensors += [stem.rel_row.detach(), stem.rel_col.detach(), probs]
    return tensors, (stem.num_heads, stem.block_size)


def _run(backend, tensors, geometry, input_grad=True):
    """Output and the gradients of the seven inputs (``x``'s only with ``input_grad``)."""
    leaves = [t.clone().requires_grad_(i > 0 or input_grad) for i, t in enumerate(tensors)]
    out = torch.ops.san_det.attention_stem(*leaves, *geometry, backend)
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    wanted = leaves if input_grad else leaves[1:]
    return [out.detach(), *torch.autograd.grad(out, wanted, grad)]


def _assert_match(got, want, dtype):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **TOLERANCES[dtype], msg=f"output/gradient {i}")
        assert w.abs().max() > 0, i  # every output and gradient is exercised


@pytest.fixture
def cpu_variant(request, monkeypatch):
    with compile_or_skip(monkeypatch, request.param, "attention_stem.cu"):
        yield request.param


@needs_cxx
@pytest.mark.parametrize("cpu_variant", CPU_VARIANTS, ids=variant_id, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cpu_kernels_match_the_tensor_ops(case, dtype, cpu_variant):
    tensors, geometry = _op_inputs(case, dtype)
    _assert_match(_run("cpu", tensors, geometry), _run("reference", tensors, geometry), dtype)


@needs_cxx
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "no_input_grad"])
@pytest.mark.parametrize(
    "launch", [dict(grid=1, block=1), dict(grid=2, block=3), dict(cpu_pixels_per_thread=1)]
)
def test_grid_stride_launches_and_parts_of_the_weight_gradients(launch, input_grad):
    """Few threads going round their loops (the backward's threads then each sum several tiles
    into their part of the weight gradients), and the CUDA build's one block per thread."""
    tensors, geometry = _op_inputs(CASES[1], torch.float64)
    want = _run("reference", tensors, geometry, input_grad)
    with launch_config(**launch):
        got = _run("cpu", tensors, geometry, input_grad)
    _assert_match(got, want, torch.float64)


@needs_cxx
def test_kernels_run_with_several_threads():
    tensors, geometry = _op_inputs(CASES[0], torch.float64)
    want = _run("reference", tensors, geometry)
    with torch_threads(2):
        got = _run("cpu", tensors, geometry)
    _assert_match(got, want, torch.float64)


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_the_widest_head_the_kernels_take(dtype):
    """Block size 1 with b*b * head width at the limit (128 channels in one head): a thread's
    per-channel sums fill their arrays. One key per block: the logits have no gradient, so only
    the output and the gradients of the image, the value weights and the mixture are checked
    for being exercised."""
    case = (1, 3, 5, dict(out_channels=128, num_heads=1, block_size=1))
    tensors, geometry = _op_inputs(case, dtype)
    got, want = _run("cpu", tensors, geometry), _run("reference", tensors, geometry)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **TOLERANCES[dtype], msg=f"output/gradient {i}")
    assert all(want[i].abs().max() > 0 for i in (0, 1, 4, 7))


def test_geometries_beyond_the_kernels_take_the_tensor_ops_or_are_refused():
    max_b = STEM_LIMITS[0]
    case = (1, 11, 13, dict(out_channels=8, num_heads=2, block_size=max_b + 1))
    tensors, geometry = _op_inputs(case, torch.float64)
    auto = _run("auto", tensors, geometry)
    _assert_match(auto, _run("reference", tensors, geometry), torch.float64)
    with pytest.raises(ValueError, match=f"block_size <= {max_b}.*backend='reference'"):
        torch.ops.san_det.attention_stem(*tensors, *geometry, "cpu")


@pytest.mark.slow
@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_source_compiles_within_its_launch_bounds(dtype, arch):
    """NVRTC with CuPy's options: every kernel builds for every dtype, with registers for a block
    of DEFAULT_THREADS (their per-thread arrays live in local memory: spills are expected)."""
    from san_det.layers.kernel_runtime import DEFAULT_THREADS
    from tests.helpers.nvrtc import kernel_resources

    source = KernelSource("attention_stem.cu")
    usage = kernel_resources(source, dtype, arch)
    kernels = {"stem_forward", "stem_backward", "stem_pool_forward", "stem_pool_backward"}
    assert set(usage) == kernels == set(source.kernels)
    for name, (registers, _spilled) in usage.items():
        assert registers * DEFAULT_THREADS <= 65536, (name, registers)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cuda_kernels_match_the_tensor_ops(case, dtype):
    tensors, geometry = _op_inputs(case, dtype)
    tensors = [t.cuda() for t in tensors]
    got = [t.cpu() for t in _run("cuda", tensors, geometry)]
    want = [t.cpu() for t in _run("reference", tensors, geometry)]
    _assert_match(got, want, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_kernels_in_half_precision(dtype):
    """Half-precision storage, float32 arithmetic: close to the float32 result."""
    tensors, geometry = _op_inputs(CASES[0], torch.float32)
    want = _run("reference", [t.cuda() for t in tensors], geometry)
    got = _run("cuda", [t.cuda().to(dtype) for t in tensors], geometry)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g.float(), w, rtol=5e-2, atol=5e-2, msg=f"output/gradient {i}")


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_image_scale_inputs(dtype):
    """Pixels in detectron2's 0..255 scale (PIXEL_STD 1): logits hundreds apart, where the kernels
    give the keys far below the largest logit probability 0 (no denormal products); the results
    still match the tensor ops (float32 as closely as its rounding of such logits allows)."""
    tensors, geometry = _op_inputs(CASES[1], dtype)
    tensors[0] = tensors[0] * 120
    tol = TOLERANCES[dtype] if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    got, want = _run("cpu", tensors, geometry), _run("reference", tensors, geometry)
    for i, (g, w) in enumerate(zip(got, want)):
        scale = w.abs().max()
        torch.testing.assert_close(g / scale, w / scale, **tol, msg=f"output/gradient {i}")
