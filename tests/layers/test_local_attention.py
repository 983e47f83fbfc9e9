"""SASA local attention: reference vs a naive loop, compiled kernels vs reference (forward and
every gradient), gradcheck, NVRTC compilation, the layer, bad input. CUDA tests run only where a
GPU is present."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from tests.helpers.kernel_variants import CPU_VARIANTS, compile_or_skip, variant_id

import san_det  # noqa: F401  (patches before anything imports detectron2)
from san_det.layers import cpu_toolchain
from san_det.layers.backend import use_backend
from san_det.layers.kernel_runtime import CPU_ISAS, KernelSource, cpu_compiler_available
from san_det.layers.launcher import CPU_REGISTER_BYTES, Tile, default_tile
from san_det.layers.local_attention import LocalSelfAttention2d
from san_det.layers.ops import kernels as op_kernels
from san_det.layers.ops import local_attention, local_attention_reference
from san_det.layers.ops.rel_gradient import rel_grad_per_image
from tests.helpers.launch import launch_config
from tests.helpers.nvrtc import compile_kernel_file, nvrtc_compile
from tests.helpers.skips import needs_cuda, needs_cxx, needs_nvrtc

# (N, C, H, W, heads, kernel_size, dilation): odd sizes, 1x1, H and W < kernel_size, dilation
# larger than the image, one head, one channel per head, W not a multiple of the CPU tile.
GEOMETRIES = [
    (2, 8, 7, 9, 2, 3, 1),
    (1, 6, 7, 9, 3, 5, 2),
    (2, 4, 1, 1, 2, 7, 1),
    (1, 8, 3, 2, 4, 7, 1),
    (2, 4, 5, 11, 1, 3, 3),
    (1, 4, 4, 6, 4, 3, 5),
    (1, 16, 9, 17, 2, 7, 1),
]


def _ids(g):
    return "N{}C{}H{}W{}h{}k{}d{}".format(*g)


def _inputs(geometry, dtype=torch.float64, device="cpu", seed=0, with_rel=True):
    n, c, h, w, heads, ks, dil = geometry
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, c, h, w, generator=gen, dtype=dtype) for _ in range(3))
    rel = torch.randn(c, ks, ks, generator=gen, dtype=dtype) if with_rel else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(q), to(k), to(v), to(rel)


def _run(backend, geometry, q, k, v, rel, seed=1):
    """Output and the gradients of q, k, v (and rel) under a random output gradient."""
    _, _, _, _, heads, ks, dil = geometry
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    if rel is not None:
        inputs.append(rel.detach().requires_grad_())
    with use_backend(backend):
        out = local_attention(
            *inputs[:3], inputs[3] if rel is not None else None,
            num_heads=heads, kernel_size=ks, dilation=dil,
        )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    return [out, *torch.autograd.grad(out, inputs, grad)]


def _assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for name, g, w in zip(["out", "grad_q", "grad_k", "grad_v", "grad_rel"], got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, msg=lambda m: f"{name}: {m}", **tol)


# ------------------------------------------------------------------------------------ reference
def _naive(geometry, q, k, v, rel):
    """Pixel-by-pixel definition: softmax over the in-image neighbours only."""
    n, c, h, w, heads, ks, dil = geometry
    d, r = c // heads, ks // 2
    out = torch.zeros_like(q)
    for b, hd, i, j in itertools.product(range(n), range(heads), range(h), range(w)):
        cs = slice(hd * d, (hd + 1) * d)
        logits, values = [], []
        for a, bb in itertools.product(range(ks), range(ks)):
            ii, jj = i + (a - r) * dil, j + (bb - r) * dil
            if 0 <= ii < h and 0 <= jj < w:
                key = k[b, cs, ii, jj] + (rel[cs, a, bb] if rel is not None else 0)
                logits.append((q[b, cs, i, j] * key).sum())
                values.append(v[b, cs, ii, jj])
        p = torch.softmax(torch.stack(logits), 0)
        out[b, cs, i, j] = (p[:, None] * torch.stack(values)).sum(0)
    return out


@pytest.mark.parametrize("with_rel", [True, False])
@pytest.mark.parametrize("geometry", GEOMETRIES[:6], ids=_ids)
def test_reference_matches_naive_loop(geometry, with_rel):
    q, k, v, rel = _inputs(geometry, with_rel=with_rel)
    _, _, _, _, heads, ks, dil = geometry
    got = local_attention_reference(q, k, v, rel, num_heads=heads, kernel_size=ks, dilation=dil)
    torch.testing.assert_close(got, _naive(geometry, q, k, v, rel), rtol=0, atol=1e-12)


def test_borders_are_masked_not_zero_keys():
    """At the border the result differs from zero-padded keys in the softmax; inside it does not."""
    geometry = (1, 4, 6, 6, 2, 3, 1)
    q, k, v, rel = _inputs(geometry)
    got = local_attention_reference(q, k, v, rel, num_heads=2, kernel_size=3)
    # Zero keys (and zero values) at out-of-image neighbours, included in the softmax.
    kc = F.unfold(k, 3, padding=1).view(1, 2, 2, 9, 36) + rel.view(1, 2, 2, 9, 1)
    logits = (q.view(1, 2, 2, 1, 36) * kc).sum(2)
    zero_keys = (
        (torch.softmax(logits, 2).unsqueeze(2) * F.unfold(v, 3, padding=1).view(1, 2, 2, 9, 36))
        .sum(3)
        .view(1, 4, 6, 6)
    )
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(got[inner], zero_keys[inner], rtol=0, atol=1e-12)
    assert (got - zero_keys)[:, :, 0].abs().min() > 1e-6


# ---------------------------------------------------------------------------- compiled kernels
# Every CPU build (kernel_variants.CPU_VARIANTS: each instruction-set level with its default tile,
# a SIMD register of pixels with masked border loads, and odd tiles on the portable level) against
# the reference, forward and every gradient, float64 and float32.
@pytest.fixture
def cpu_variant(request, monkeypatch):
    """Run the test on the variant's ISA level and tile (compile and skip where the host cannot
    execute that level)."""
    with compile_or_skip(monkeypatch, request.param, "local_attention.cu"):
        yield request.param


@needs_cxx
@pytest.mark.parametrize("cpu_variant", CPU_VARIANTS, ids=variant_id, indirect=True)
@pytest.mark.parametrize("with_rel", [True, False])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_ids)
def test_cpu_kernels_match_reference_float64(geometry, with_rel, cpu_variant):
    q, k, v, rel = _inputs(geometry, with_rel=with_rel)
    want = _run("reference", geometry, q, k, v, rel)
    got = _run("cpu", geometry, q, k, v, rel)
    _assert_all_close(got, want, rtol=1e-10, atol=1e-12)


def test_cuda_tile_is_the_kernel_default():
    """The tile the launcher sizes CUDA grids for is the one the .cu file compiles by default."""
    source = KernelSource("local_attention.cu").source
    defaults = tuple(
        int(source.split(f"#define {name} ")[1].split()[0]) for name in ("SAN_TJ", "SAN_CG")
    )
    kernels = KernelSource("local_attention.cu").kernels
    sasa = [default_tile("cuda", name, torch.float32) for name in kernels]
    assert sasa and all(tile[:2] == Tile(*defaults)[:2] for tile in sasa)


@needs_cxx
@pytest.mark.parametrize("cpu_variant", CPU_VARIANTS, ids=variant_id, indirect=True)
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[1], GEOMETRIES[6]], ids=_ids)
def test_cpu_kernels_match_reference_float32(geometry, cpu_variant):
    q, k, v, rel = _inputs(geometry, dtype=torch.float32)
    want = _run("reference", geometry, q.double(), k.double(), v.double(), rel.double())
    got = _run("cpu", geometry, q, k, v, rel)
    _assert_all_close([g.double() for g in got], want, rtol=1e-4, atol=2e-5)


@needs_cxx
@pytest.mark.parametrize(
    "cpu_variant", CPU_VARIANTS[: len(CPU_ISAS)], ids=variant_id, indirect=True
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernels_larger_image(dtype, cpu_variant):
    """An image several tiles wide and tall with 4 channels per head: inner tiles (all lanes of
    every tap inside), both borders and a partial last tile in one run."""
    _check_larger_image(16, dtype)


@needs_cxx
@pytest.mark.parametrize(
    "cpu_variant", CPU_VARIANTS[: len(CPU_ISAS)], ids=variant_id, indirect=True
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernels_larger_image_with_8_channels_per_head(dtype, cpu_variant):
    """The same with 8 channels per head: where a head is one channel group (AVX-512) the k/v
    gradient recomputes the logit gradients instead of reading them."""
    _check_larger_image(32, dtype)


# Several rows per thread (Tile.rows: SASA's forward and logit backward take the rows i, i + dil,
# ... of a tile and share the neighbour rows their windows have in common): image heights that
# are not multiples of the rows (the last group has fewer), dilations 1-3 (a group's rows are dil
# apart), images smaller than the window, one channel group per head (8 channels on AVX-512) and
# several, on every level, against the reference: forward and every gradient.
ROW_GEOMETRIES = [
    (1, 8, 11, 9, 2, 7, 1),
    (2, 6, 7, 5, 3, 5, 2),
    (1, 4, 3, 4, 2, 7, 1),
    (1, 4, 13, 6, 1, 3, 3),
    (1, 16, 5, 19, 2, 7, 1),
    (1, 24, 10, 17, 3, 7, 1),
]


@needs_cxx
@pytest.mark.parametrize("rows", [2, 3, 4])
@pytest.mark.parametrize("cpu_variant", CPU_VARIANTS, ids=variant_id, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernels_several_rows_per_thread(dtype, cpu_variant, rows):
    tile = (cpu_variant[1] or (None, None, None))[:3]  # the variant's tile, `rows` rows
    for geometry in ROW_GEOMETRIES:
        q, k, v, rel = _inputs(geometry, dtype=dtype)
        want = _run("reference", geometry, q.double(), k.double(), v.double(), rel.double())
        with launch_config(None, None, *tile, rows):
            got = _run("cpu", geometry, q, k, v, rel)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
        _assert_all_close([g.double() for g in got], want, **tol)


# The CUDA build's code path (scalar lanes, one row per thread) and an odd tile with three rows,
# on the geometries above and the shared ones.
ROW_VARIANTS = [("portable", (1, 4, 4, 1)), ("portable", (2, 3, 2, 3))]


@needs_cxx
@pytest.mark.parametrize("cpu_variant", ROW_VARIANTS, ids=variant_id, indirect=True)
@pytest.mark.parametrize("with_rel", [True, False])
@pytest.mark.parametrize("geometry", GEOMETRIES + ROW_GEOMETRIES, ids=_ids)
def test_cpu_kernels_row_tiles_match_reference_float64(geometry, with_rel, cpu_variant):
    q, k, v, rel = _inputs(geometry, with_rel=with_rel)
    want = _run("reference", geometry, q, k, v, rel)
    got = _run("cpu", geometry, q, k, v, rel)
    _assert_all_close(got, want, rtol=1e-10, atol=1e-12)


@needs_cxx
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_cpu_kernels_write_every_output_entry(rows, deterministic_mode):
    """Deterministic mode fills new tensors (the outputs, attn, dlogit) with NaN: with every row
    count, the kernels leave no entry that is read or returned unwritten."""
    geometry = (1, 8, 8, 9, 2, 5, 1)
    q, k, v, rel = _inputs(geometry)
    want = _run("reference", geometry, q, k, v, rel)
    with launch_config(cpu_rows_per_thread=rows):
        got = _run("cpu", geometry, q, k, v, rel)
    assert all(torch.isfinite(g).all() for g in got)
    _assert_all_close(got, want, rtol=1e-10, atol=1e-12)


def _check_larger_image(channels: int, dtype) -> None:
    geometry = (1, channels, 13, 37, 4, 7, 1)
    q, k, v, rel = _inputs(geometry, dtype=dtype)
    want = _run("reference", geometry, q.double(), k.double(), v.double(), rel.double())
    got = _run("cpu", geometry, q, k, v, rel)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    _assert_all_close([g.double() for g in got], want, **tol)


@needs_cxx
def test_rel_gradient_kernel_matches_the_cuda_formula():
    """The CPU kernel for grad_rel and the batched product the CUDA path uses agree."""
    n, c, h, w, heads, ks = 2, 12, 5, 9, 3, 5
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    dlogit = torch.randn(n, heads, h, ks * ks, w, generator=gen, dtype=torch.float64)
    run = op_kernels._LOCAL_ATTENTION.bind("cpu", torch.float64, q.device)
    got = torch.empty(n, c, ks * ks, dtype=torch.float64)
    groups = -(-(c // heads) // run.tile("sasa_rel_backward").channels)
    run("sasa_rel_backward", n * heads * groups * (ks * ks + 1) // 2, q, dlogit, got,
        n, c, h, w, heads, ks, 1)  # fmt: skip
    want = torch.einsum("nhdij,nhiaj->nhda", q.view(n, heads, c // heads, h, w), dlogit)
    torch.testing.assert_close(got, want.reshape(n, c, ks * ks), rtol=1e-12, atol=1e-12)
    for rows in (0, 2):  # the default chunks (one row each here) and chunks of 2 of the 5 rows
        bmm = rel_grad_per_image(q, dlogit, heads, rows_per_chunk=rows)
        torch.testing.assert_close(bmm, want.reshape(n, c, ks * ks), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@needs_cxx
def test_variants_the_host_cannot_run_are_compiled_then_skipped(monkeypatch, tmp_path):
    """On a host without AVX-512 (faked here, whatever this one has) the AVX-512 variant is built
    for every dtype and default tile, then reported as skipped, not silently passed."""
    monkeypatch.setenv("SAN_DET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_toolchain, "_host_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(pytest.skip.Exception, match="cannot run avx512"):
        compile_or_skip(monkeypatch, ("avx512", None), "local_attention.cu")
    # One library per dtype and distinct default tile of the file's kernels.
    kernels = KernelSource("local_attention.cu").kernels
    builds = {
        (dt, default_tile("avx512", k, dt))
        for k in kernels
        for dt in (torch.float32, torch.float64)
    }
    assert len(list((tmp_path / "cache").glob("local_attention_*.so"))) == len(builds)


def test_default_cpu_tiles_are_one_register():
    """The default CPU tile of every kernel and level is one SIMD register of pixels (so loads are
    masked single instructions on AVX2 / AVX-512); channels and taps are positive."""
    for isa in CPU_ISAS:
        kernels = [*KernelSource("local_attention.cu").kernels, *KernelSource("san_ops.cu").kernels]
        for name in kernels:
            for dtype in (torch.float32, torch.float64):
                tile = default_tile(isa, name, dtype)
                assert tile.pixels * dtype.itemsize == CPU_REGISTER_BYTES[isa]
                assert tile.channels >= 1 and tile.taps >= 1


@needs_cxx
@pytest.mark.parametrize(
    "grid, block, tile",
    [(1, 1, (1, 4, 4)), (2, 3, (1, 4, 4)), (3, 2, (2, 3, 2)), (1, 5, (8, 1, 4)), (2, 2, None)],
)
def test_cpu_kernels_on_tiny_grids(grid, block, tile):
    """Far fewer threads than work: every thread goes round its grid-stride loop many times."""
    geometry = (2, 12, 5, 7, 2, 5, 1)
    q, k, v, rel = _inputs(geometry)
    want = _run("reference", geometry, q, k, v, rel)
    with launch_config(grid, block, *(tile or ())):
        got = _run("cpu", geometry, q, k, v, rel)
    _assert_all_close(got, want, rtol=1e-10, atol=1e-12)


@needs_cxx
def test_cpu_kernels_large_logits_are_stable():
    """Logits of several hundred: the max-subtracted softmax neither overflows nor gives NaN."""
    geometry = (1, 8, 6, 7, 2, 5, 1)
    q, k, v, rel = _inputs(geometry, dtype=torch.float32)
    q, k = q * 12, k * 12
    want = _run("reference", geometry, q.double(), k.double(), v.double(), rel.double())
    got = _run("cpu", geometry, q, k, v, rel)
    assert all(torch.isfinite(g).all() for g in got)
    # Saturated softmaxes: compare the output tightly, gradients relative to their scale.
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-4, atol=1e-4)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-3 * w.abs().max().item())


@needs_cxx
def test_non_contiguous_inputs():
    geometry = (2, 8, 5, 6, 2, 3, 1)
    q, k, v, rel = _inputs(geometry)
    want = _run("reference", geometry, q, k, v, rel)
    # Same values, other memory layouts: channels-last, a transposed view, an expanded stride.
    nq = q.contiguous(memory_format=torch.channels_last)
    nk = k.transpose(2, 3).contiguous().transpose(2, 3)
    nv = torch.cat([v, v], dim=1)[:, ::2]
    nv[:] = v
    nrel = rel.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (nq.is_contiguous() or nk.is_contiguous() or nv.is_contiguous())
    for backend in ["reference"] + (["cpu"] if cpu_compiler_available() else []):
        _assert_all_close(_run(backend, geometry, nq, nk, nv, nrel), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("with_rel", [True, False])
def test_gradcheck(backend, with_rel):
    if backend == "cpu" and not cpu_compiler_available():
        pytest.skip("no C++ compiler")
    geometry = (1, 4, 4, 5, 2, 3, 2)
    q, k, v, rel = _inputs(geometry, with_rel=with_rel)
    inputs = [t.requires_grad_() for t in (q, k, v) + ((rel,) if with_rel else ())]

    def fn(*args):
        r = args[3] if with_rel else None
        with use_backend(backend):
            return local_attention(*args[:3], r, num_heads=2, kernel_size=3, dilation=2)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision_computes_in_float32(dtype):
    geometry = GEOMETRIES[0]
    q, k, v, rel = (t.to(dtype) for t in _inputs(geometry, dtype=torch.float32))
    want = _run("reference", geometry, q.float(), k.float(), v.float(), rel.float())
    got = _run("cpu", geometry, q, k, v, rel)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 8, 0, 5)])
def test_empty_inputs_give_empty_outputs(backend, shape):
    if backend == "cpu" and not cpu_compiler_available():
        pytest.skip("no C++ compiler")
    q, k, v = (torch.zeros(shape, requires_grad=True) for _ in range(3))
    rel = torch.zeros(8, 3, 3, requires_grad=True)
    with use_backend(backend):
        out = local_attention(q, k, v, rel, num_heads=2, kernel_size=3)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape and rel.grad.shape == rel.shape


# --------------------------------------------------------------------------------------- NVRTC
@pytest.mark.slow
@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_kernels_compile_with_nvrtc(dtype, arch):
    """The CUDA build (SAN_TJ = 1; shapes are run-time arguments) compiles for every dtype."""
    kernels = ("sasa_forward", "sasa_logit_q_backward", "sasa_kv_backward", "sasa_rel_backward")
    compile_kernel_file("local_attention.cu", kernels, [dtype], arch)


@pytest.mark.slow
@needs_nvrtc
@pytest.mark.parametrize("rows", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_kernels_with_several_rows_per_thread_compile_with_nvrtc(dtype, rows):
    """The CUDA build runs one row per thread (SAN_UR 1); the multi-row code it shares with the
    CPU builds compiles for the GPU too."""
    source = KernelSource("local_attention.cu")
    assert len(nvrtc_compile(source, dtype, "sm_90", (f"-DSAN_UR={rows}",))) > 1000


# ----------------------------------------------------------------------------------- the layer
def test_layer_shapes_parameters_and_embedding_layout():
    layer = LocalSelfAttention2d(16, 32, kernel_size=5, num_heads=4, stride=2)
    assert (layer.kernel_size, layer.num_heads, layer.head_dim) == (5, 4, 8)
    # Three 1x1 projections without bias and per-channel row/column embeddings of half width.
    assert sum(p.numel() for p in layer.parameters()) == 3 * 16 * 32 + 2 * 16 * 5
    assert all(m.bias is None for m in (layer.query, layer.key, layer.value))
    x = torch.randn(2, 16, 9, 11)
    assert layer(x).shape == (2, 32, 5, 6)  # ceil(9 / 2) x ceil(11 / 2), like a 3x3/2 conv
    rel = layer.relative_embedding()
    assert rel.shape == (32, 5, 5)
    for head in range(4):
        row, col = rel[head * 8 : head * 8 + 4], rel[head * 8 + 4 : head * 8 + 8]
        assert torch.equal(row, row[:, :, :1].expand_as(row))  # depends on the row a only
        assert torch.equal(col, col[:, :1, :].expand_as(col))  # depends on the column b only
        assert not torch.equal(row, row[:, :1, :].expand_as(row))


@pytest.mark.parametrize("stride", [2, 3])
def test_layer_pool_is_the_ceil_mode_average_pool(stride):
    """The pool (count_include_pad=False, which inductor differentiates correctly) averages the
    overhanging last window over its in-image pixels, bit for bit like the default pool."""
    layer = LocalSelfAttention2d(4, 8, kernel_size=3, num_heads=2, stride=stride)
    x = torch.randn(2, 8, 7, 11, requires_grad=True)
    default = F.avg_pool2d(x, stride, stride, ceil_mode=True)
    got = layer.pool(x)
    assert torch.equal(got, default)
    grad = torch.randn(got.shape)
    want_grad = torch.autograd.grad(default, x, grad)[0]
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], want_grad)


def test_layer_matches_functional_definition():
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(6, 8, kernel_size=3, num_heads=2, stride=1, dilation=2).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    q, k, v = (F.conv2d(x, m.weight) for m in (layer.query, layer.key, layer.value))
    want = _naive((2, 8, 5, 7, 2, 3, 2), q, k, v, layer.relative_embedding())
    with use_backend("reference"):
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12)


@needs_cxx
def test_layer_backends_agree_forward_and_backward():
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(8, 16, kernel_size=7, num_heads=4, stride=2).double()
    x = torch.randn(2, 8, 9, 10, dtype=torch.float64)
    results = {}
    for backend in ("reference", "cpu"):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        with use_backend(backend):
            out = layer(xi)
        out.square().sum().backward()
        results[backend] = [out, xi.grad] + [p.grad.clone() for p in layer.parameters()]
    _assert_all_close_list(results["cpu"], results["reference"])


def _assert_all_close_list(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-11)


def _stacked_projection_layer_output(layer, x):
    """The layer as it was with one projection (commit 2ca7f51): a 1x1 convolution by the three
    weights concatenated at run time, its output chunks made contiguous, then the op."""
    weight = torch.cat([layer.query.weight, layer.key.weight, layer.value.weight])
    q, k, v = (t.contiguous() for t in F.conv2d(x, weight).chunk(3, dim=1))
    out = local_attention(
        q, k, v, layer.relative_embedding(),
        num_heads=layer.num_heads, kernel_size=layer.kernel_size, dilation=layer.dilation,
    )  # fmt: skip
    return layer.pool(out)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_three_projections_match_the_stacked_projection(backend, dtype):
    """The layer's three q/k/v convolutions give the output and every gradient of the one
    convolution by the stacked weights it replaced (batch of 2, so the chunks of the stacked
    output are not contiguous; different output and input widths, stride 2)."""
    if backend == "cpu" and not cpu_compiler_available():
        pytest.skip("no C++ compiler")
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(6, 8, kernel_size=3, num_heads=2, stride=2).to(dtype)
    x = torch.randn(2, 6, 7, 9, dtype=dtype)
    grad = torch.randn(2, 8, 4, 5, dtype=dtype)
    results = []
    for run in (layer, lambda xi: _stacked_projection_layer_output(layer, xi)):
        xi = x.clone().requires_grad_()
        with use_backend(backend):
            out = run(xi)
        results.append([out, *torch.autograd.grad(out, [xi, *layer.parameters()], grad)])
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("stride", [1, 2])
def test_layer_keeps_for_the_backward_only_what_it_needs(stride):
    """What autograd saves in a training forward: the input, the parameters, q, k, v, the
    embedding tensor and the probabilities; no stacked copy of the projection weights, no
    stacked projection output, nothing twice (and the average pool's input for stride 2)."""
    layer = LocalSelfAttention2d(6, 8, kernel_size=3, num_heads=2, stride=stride)
    x = torch.randn(2, 6, 7, 9, requires_grad=True)
    saved = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with use_backend("reference"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    projections = [layer.query.weight, layer.key.weight, layer.value.weight]
    assert {w.untyped_storage().data_ptr() for w in projections} <= set(saved)
    feature = 2 * 8 * 7 * 9 * 4  # bytes of one of q, k, v and of the attention output
    probabilities = 2 * 2 * 7 * 9 * 9 * 4  # (N, heads, H, k*k, W) float32
    rel = 8 * 3 * 3 * 4
    expected = x.numel() * 4 + 3 * feature + probabilities + rel + (feature if stride > 1 else 0)
    assert sum(n for ptr, n in saved.items() if ptr not in params) == expected
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_checkpoint_of_three_projections_loads_bit_for_bit():
    """A state dict of three projections (keys query/key/value.weight, rel_row, rel_col) loads
    into the same parameters and gives the output of the three projections."""
    torch.manual_seed(0)
    ks, heads, c_in, c = 3, 2, 4, 8
    old = {
        "query.weight": torch.randn(c, c_in, 1, 1, dtype=torch.float64),
        "key.weight": torch.randn(c, c_in, 1, 1, dtype=torch.float64),
        "value.weight": torch.randn(c, c_in, 1, 1, dtype=torch.float64),
        "rel_row": torch.randn(c // 2, ks, dtype=torch.float64),
        "rel_col": torch.randn(c // 2, ks, dtype=torch.float64),
    }
    layer = LocalSelfAttention2d(c_in, c, kernel_size=ks, num_heads=heads).double()
    layer.load_state_dict(old)  # strict: exactly these keys
    assert set(layer.state_dict()) == set(old)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, old[name]), name
    x = torch.randn(2, c_in, 5, 6, dtype=torch.float64)
    with use_backend("reference"):
        got = layer(x)
        q, k, v = (F.conv2d(x, old[f"{n}.weight"]) for n in ("query", "key", "value"))
    want = _naive((2, c, 5, 6, heads, ks, 1), q, k, v, layer.relative_embedding())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_layer_every_parameter_gets_a_gradient_and_empty_batch():
    layer = LocalSelfAttention2d(4, 8, kernel_size=3, num_heads=2)
    layer(torch.randn(1, 4, 6, 6)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert layer(torch.randn(0, 4, 6, 6)).shape == (0, 8, 6, 6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kernel_size=4), "kernel_size"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(kernel_size=-3), "kernel_size"),
        (dict(num_heads=3), "num_heads"),
        (dict(num_heads=8, out_channels=24), "even"),  # head width 3
        (dict(stride=0), "stride"),
        (dict(dilation=0), "dilation"),
        (dict(in_channels=0), "in_channels"),
    ],
)
def test_layer_bad_arguments(kwargs, match):
    args = dict(in_channels=4, out_channels=16, kernel_size=3, num_heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LocalSelfAttention2d(**args)


def test_layer_bad_input_shape():
    layer = LocalSelfAttention2d(4, 8, kernel_size=3, num_heads=2)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 4, H, W\)"):
        layer(torch.randn(1, 5, 6, 6))


# ------------------------------------------------------------------------------------ bad input
def _bad_call(**overrides):
    args = dict(
        q=torch.zeros(1, 8, 5, 5),
        k=torch.zeros(1, 8, 5, 5),
        v=torch.zeros(1, 8, 5, 5),
        rel=torch.zeros(8, 3, 3),
        num_heads=2,
        kernel_size=3,
        dilation=1,
    )
    args.update(overrides)
    q, k, v, rel = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("rel")
    return local_attention(q, k, v, rel, **args)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(kernel_size=4), "kernel_size must be odd, got 4"),
        (dict(kernel_size=2.0), "kernel_size must be an odd positive int"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(kernel_size=-1), "kernel_size"),
        (dict(num_heads=3), r"num_heads \(3\) must divide the channel count C=8"),
        (dict(num_heads=0), "num_heads"),
        (dict(dilation=0), "dilation"),
        (dict(k=torch.zeros(1, 8, 5, 6)), r"k must have the shape of q \(1, 8, 5, 5\)"),
        (dict(v=torch.zeros(2, 8, 5, 5)), r"v must have the shape of q"),
        (dict(q=torch.zeros(8, 5, 5)), r"q must have shape \(N, C, H, W\)"),
        (dict(rel=torch.zeros(8, 5, 5)), r"rel must have shape \(C, k, k\) = \(8, 3, 3\)"),
        (dict(rel=torch.zeros(4, 3, 3)), r"rel must have shape"),
        (dict(k=torch.zeros(1, 8, 5, 5, dtype=torch.float64)), "k must have the dtype of q"),
        (dict(rel=torch.zeros(8, 3, 3, dtype=torch.float64)), "rel must have the dtype of q"),
        (dict(q=torch.zeros(1, 8, 5, 5, dtype=torch.int64)), "q must be a floating point"),
        (dict(k=torch.zeros(1, 8, 5, 5, device="meta")), "k must be on the device of q"),
    ],
)
def test_bad_input(overrides, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(**overrides)


def test_forced_backend_on_wrong_device_raises():
    with use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        _bad_call()


# ----------------------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_ids)
def test_cuda_kernels_match_reference(geometry, dtype):
    q, k, v, rel = _inputs(geometry, dtype=dtype, device="cuda")
    want = _run("reference", geometry, q, k, v, rel)
    got = _run("cuda", geometry, q, k, v, rel)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    for g in got:
        assert g.is_cuda and g.dtype == dtype
    _assert_all_close(got, want, **tol)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    """Storage in half, float32 arithmetic: compare with float32 on the same (rounded) inputs."""
    geometry = (2, 16, 9, 13, 2, 7, 1)
    inputs = [t.to(dtype) for t in _inputs(geometry, dtype=torch.float32, device="cuda")]
    want = _run("reference", geometry, *(t.float() for t in inputs))
    got = _run("cuda", geometry, *inputs)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    for name, g, w in zip(["out", "grad_q", "grad_k", "grad_v", "grad_rel"], got, want):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        scale = w.abs().max().item()
        torch.testing.assert_close(g.float(), w, rtol=tol, atol=tol * scale, msg=name)


@needs_cuda
def test_cuda_side_stream_non_contiguous_and_gradcheck():
    geometry = (2, 8, 6, 7, 2, 5, 1)
    q, k, v, rel = _inputs(geometry, device="cuda")
    want = _run("reference", geometry, q, k, v, rel)
    nq = q.contiguous(memory_format=torch.channels_last)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _run("cuda", geometry, nq, k, v, rel)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    _assert_all_close(got, want, rtol=1e-10, atol=1e-12)

    small = (1, 4, 4, 5, 2, 3, 2)
    inputs = [t.requires_grad_() for t in _inputs(small, device="cuda")]

    def fn(*args):
        with use_backend("cuda"):
            return local_attention(*args, num_heads=2, kernel_size=3, dilation=2)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


@needs_cuda
def test_cuda_layer_under_autocast():
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(16, 32, kernel_size=7, num_heads=4, stride=2).cuda()
    x = torch.randn(2, 16, 20, 18, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = layer(x)
    assert out.dtype == torch.float16 and out.shape == (2, 32, 10, 9)
    out.float().square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    layer.zero_grad()
    with use_backend("reference"):
        want = layer(x)  # float32, no autocast
    want.square().sum().backward()
    torch.testing.assert_close(out.float(), want, rtol=5e-2, atol=5e-2 * want.abs().max().item())
    for g, p in zip(grads, layer.parameters()):
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(g, p.grad, rtol=1e-1, atol=5e-2 * scale)
