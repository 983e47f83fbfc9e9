"""KernelSource: parsing, the g++ + ctypes CPU path (grid-stride emulation, cache, errors),
NVRTC compilation without a GPU (with CuPy's options; registers per kernel), the CUDA path's
device, stream and argument handling against a stand-in for CuPy, the CuPy path where a GPU is
present; backend selection."""

import concurrent.futures
import contextlib
import importlib.machinery
import os
import platform
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np

import pytest
import torch

import san_det  # noqa: F401  (patches before anything imports detectron2)
from san_det.layers import backend as backend_mod
from san_det.layers import cpu_toolchain, kernel_runtime
from san_det.layers.backend import forced_backend, select_backend, use_backend
from san_det.layers.kernel_runtime import (
    CPU_ISAS,
    DEFAULT_THREADS,
    KernelCompileError,
    KernelSource,
    _parse_kernels,
    cpu_compiler_available,
    cpu_isa,
    supported_cpu_isas,
)
from tests.helpers.launch import torch_threads
from tests.helpers.nvrtc import kernel_resources, nvrtc_compile
from tests.helpers.skips import needs_cuda, needs_cxx, needs_nvrtc


# A grid-stride kernel using every supported argument kind. `visits` counts how often each index
# is handled: exactly once whatever the grid, if the emulated grid-stride loop is right.
TOY = r"""
__global__ void axpby(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int* visits,
                      int64_t n, float a, double b) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)blockDim.x * gridDim.x) {
        y[i] = FROM_ACC((acc_t)a * TO_ACC(x[i]) + (acc_t)b * TO_ACC(y[i]));
        visits[i] += 1;
    }
}

__global__ void fill_block_ids(int* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        out[i] = blockIdx.x * 1000 + threadIdx.x;
}
"""


@pytest.fixture
def toy_source(tmp_path, monkeypatch):
    monkeypatch.setenv("SAN_DET_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "toy.cu"
    path.write_text(TOY)
    return KernelSource(str(path))  # an absolute path replaces the kernels directory


def _fake_compiler(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@needs_cxx
def test_cpu_compiler_check_builds_and_runs_an_openmp_program(tmp_path, monkeypatch):
    """Not just 'is there a g++': a compiler that fails, or builds without OpenMP, is refused."""
    cases = {
        "missing": str(tmp_path / "no-such-compiler"),
        "failing": _fake_compiler(tmp_path / "failing", "exit 1\n"),
        # g++ with -fopenmp dropped: the probe's omp_get_max_threads does not link
        "no_openmp": _fake_compiler(
            tmp_path / "no_openmp",
            'for a in "$@"; do shift; [ "$a" = -fopenmp ] || set -- "$@" "$a"; done\n'
            'exec g++ "$@"\n',
        ),
    }
    try:
        for name, cxx in cases.items():
            monkeypatch.setenv("CXX", cxx)
            cpu_compiler_available.cache_clear()
            assert not cpu_compiler_available(), name
        monkeypatch.setenv("CXX", "g++")
        cpu_compiler_available.cache_clear()
        assert cpu_compiler_available()
    finally:
        monkeypatch.undo()
        cpu_compiler_available.cache_clear()


def test_parse_kernel_signatures():
    kernels = _parse_kernels(TOY)
    assert list(kernels) == ["axpby", "fill_block_ids"]
    assert [(kind, name) for kind, name, _ in kernels["axpby"]] == [
        ("ptr", "x"),
        ("ptr", "y"),
        ("ptr", "visits"),
        ("int64", "n"),
        ("float", "a"),
        ("double", "b"),
    ]
    with pytest.raises(KernelCompileError, match="float or double"):
        _parse_kernels("__global__ void f(acc_t alpha) {}")
    with pytest.raises(KernelCompileError, match="unsupported"):
        _parse_kernels("__global__ void f(char c) {}")


def test_source_without_kernels_is_an_error(tmp_path):
    path = tmp_path / "empty.cu"
    path.write_text("__device__ int helper() { return 0; }\n")
    with pytest.raises(KernelCompileError, match="no __global__"):
        KernelSource(str(path))


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grid, block", [(1, 1), (2, 3), (7, 64), (200, 256)])
def test_cpu_grid_stride_emulation(toy_source, dtype, grid, block):
    n = 1000
    x = torch.randn(n, dtype=dtype)
    y = torch.randn(n, dtype=dtype)
    want = 2.5 * x + 0.5 * y
    visits = torch.zeros(n, dtype=torch.int32)
    toy_source.cpu(dtype).axpby(grid, block, x, y, visits, n, 2.5, 0.5)
    torch.testing.assert_close(y, want)
    assert torch.equal(visits, torch.ones_like(visits))


@needs_cxx
def test_cpu_block_and_thread_indices(toy_source):
    out = torch.full((12,), -1, dtype=torch.int32)
    toy_source.cpu(torch.float32).fill_block_ids(2, 4, out, 12)
    # 8 threads: index i is handled by thread i % 8, i.e. block (i % 8) // 4, thread i % 4.
    want = [((i % 8) // 4) * 1000 + i % 4 for i in range(12)]
    assert out.tolist() == want


# Where san_flush_denormals sets the flush mode (cpu_prelude.h); elsewhere denormals stay IEEE.
FLUSHES_DENORMALS = platform.machine().lower() in ("x86_64", "amd64", "i686", "aarch64", "arm64")


@needs_cxx
@pytest.mark.skipif(not FLUSHES_DENORMALS, reason="no flush-to-zero mode on this architecture")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("caller_flushes", [False, True])
def test_cpu_kernels_flush_denormals_and_restore_the_callers_mode(
    toy_source, dtype, threads, caller_flushes
):
    tiny = torch.finfo(dtype).tiny  # the smallest normal number
    n = 64
    normal = torch.full((n,), tiny * 4, dtype=dtype)
    denormal = torch.full((n,), tiny / 4, dtype=dtype)
    assert (denormal > 0).all() and (denormal * 4 == tiny).all()  # IEEE here, before the launch
    kernels = toy_source.cpu(dtype)
    torch.set_flush_denormal(caller_flushes)
    try:
        with torch_threads(threads):
            visits = torch.zeros(n, dtype=torch.int32)
            # A denormal result (tiny * 4 / 16) is flushed to 0 ...
            flushed = torch.zeros(n, dtype=dtype)
            kernels.axpby(4, 4, normal, flushed, visits, n, 1.0 / 16, 0.0)
            assert (flushed == 0).all()
            # ... a denormal operand reads as 0 (y = 1 * denormal + 1 * y) ...
            read = torch.full((n,), tiny, dtype=dtype)
            kernels.axpby(4, 4, denormal, read, visits, n, 1.0, 1.0)
            assert (read == tiny).all()
            # ... and normal numbers are untouched.
            kept = torch.zeros(n, dtype=dtype)
            kernels.axpby(4, 4, normal, kept, visits, n, 1.0, 0.0)
            assert torch.equal(kept, normal)
            # Every thread keeps its own mode: torch's ops after the launch see IEEE denormals on
            # all threads (a tensor large enough for torch to split it over them), unless the
            # caller had asked for flushing on its own thread (a tensor torch does not split).
            # Compared as bits: with DAZ on, a float comparison would read the denormal as 0 too.
            bits = torch.int32 if dtype == torch.float32 else torch.int64
            if caller_flushes:
                assert (torch.full((n,), tiny, dtype=dtype) / 4).view(bits).eq(0).all()
            else:
                after = torch.full((1 << 17,), tiny, dtype=dtype) / 4
                assert after.view(bits).eq(denormal.view(bits)[0]).all()
    finally:
        torch.set_flush_denormal(False)


@needs_cxx
def test_cpu_cache_and_flags(toy_source, tmp_path):
    toy_source.cpu(torch.float32)
    cache = tmp_path / "cache"
    built = sorted(p.name for p in cache.glob("*.so"))
    assert len(built) == 1 and built[0].startswith("toy_float_")
    mtime = (cache / built[0]).stat().st_mtime_ns
    # A fresh KernelSource of the same text reuses the library; other flags build another one.
    again = KernelSource(toy_source.path.as_posix())
    again.cpu(torch.float32)
    assert (cache / built[0]).stat().st_mtime_ns == mtime
    again.cpu(torch.float32, ("-DSOMETHING=1",))
    assert len(list(cache.glob("*.so"))) == 2
    assert not list(cache.glob("*.tmp"))


@needs_cxx
def test_cpu_wrong_argument_count(toy_source):
    with pytest.raises(TypeError, match="takes 6 arguments, got 2"):
        toy_source.cpu(torch.float32).axpby(1, 1, torch.zeros(1), torch.zeros(1))


@needs_cxx
def test_cpu_compile_error_carries_the_log(tmp_path, monkeypatch):
    monkeypatch.setenv("SAN_DET_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "broken.cu"
    path.write_text("__global__ void f(float* x) { x[0] = undefined_name; }\n")
    with pytest.raises(KernelCompileError, match="undefined_name"):
        KernelSource(str(path)).cpu(torch.float32)


def test_cpu_source_rejects_half(toy_source):
    with pytest.raises(ValueError, match="float32 or float64"):
        toy_source.cpu_source("half")


# ------------------------------------------------------------------------ ISA levels and lanes
def test_isa_levels(monkeypatch):
    monkeypatch.delenv("SAN_DET_CPU_ISA", raising=False)
    supported = supported_cpu_isas()
    assert supported[0] == "portable" and set(supported) <= set(CPU_ISAS)
    assert cpu_isa() == supported[-1]
    monkeypatch.setenv("SAN_DET_CPU_ISA", "portable")
    assert cpu_isa() == "portable"
    monkeypatch.setenv("SAN_DET_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="must be one of"):
        cpu_isa()
    # A host with AVX2 but without AVX-512 (whatever this one has).
    monkeypatch.setattr(cpu_toolchain, "_host_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert supported_cpu_isas() == ("portable", "avx2")
    monkeypatch.setenv("SAN_DET_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="lacks .*avx512f"):
        cpu_isa()
    monkeypatch.delenv("SAN_DET_CPU_ISA")
    assert cpu_isa() == "avx2"


@needs_cxx
def test_cpu_builds_per_isa_level_are_cached_apart(toy_source, monkeypatch):
    for isa in supported_cpu_isas():
        toy_source.cpu(torch.float32, isa=isa)
    cache = toy_source.path.parent / "cache"
    assert len(list(cache.glob("toy_float_*.so"))) == len(supported_cpu_isas())
    monkeypatch.setattr(cpu_toolchain, "_host_cpu_flags", lambda: frozenset())
    with pytest.raises(ValueError, match="cannot run 'avx2'"):
        toy_source.cpu(torch.float32, isa="avx2")
    # A level the host cannot run still builds (compile-only checks), each level its own library.
    for isa in CPU_ISAS:
        assert toy_source.build_cpu(torch.float32, (), isa).exists()
    assert len(list(cache.glob("toy_float_*.so"))) == len(CPU_ISAS)
    with pytest.raises(ValueError, match="isa must be one of"):
        toy_source.build_cpu(torch.float32, (), "sse9")


def test_backend_cpu_capability_is_the_kernels_level(monkeypatch):
    """One answer to "which vector ISA": backend.cpu_capability is the level the kernels build for."""
    monkeypatch.setenv("SAN_DET_CPU_ISA", "portable")
    assert backend_mod.cpu_capability() == "portable"
    monkeypatch.delenv("SAN_DET_CPU_ISA")
    assert backend_mod.cpu_capability() == supported_cpu_isas()[-1]


# A grid-stride kernel over lane vectors of san_lanes.h: y = exp(x), the last tile partial.
LANE_EXP = r"""
#ifndef SAN_TJ
#define SAN_TJ 1
#endif
#include "san_lanes.h"
__global__ void lane_exp(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int n) {
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * SAN_TJ; i < n;
         i += (int64_t)blockDim.x * gridDim.x * SAN_TJ) {
        const san_mask m = san_lanes(0, n - (int)i);
        san_vstore(y + i, san_vexp(san_vload(x + i, m)), m);
    }
}
"""


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lanes", [1, 2, 4, 8, 16])
def test_lane_exp_is_accurate(tmp_path, monkeypatch, isa, dtype, lanes):
    """The vector exp of the CPU lanes (a polynomial, not libm) is within a few ulp of exp over
    the range the softmax uses; below the smallest normal number it returns a tiny positive."""
    monkeypatch.setenv("SAN_DET_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "lane_exp.cu"
    path.write_text(LANE_EXP)
    source, flags = KernelSource(str(path)), (f"-DSAN_TJ={lanes}",)
    if isa not in supported_cpu_isas():
        if isa != "portable" and platform.machine().lower() not in ("x86_64", "amd64"):
            pytest.skip(f"{isa} is an x86 level; this host is {platform.machine()}")
        assert source.build_cpu(dtype, flags, isa).exists()
        pytest.skip(f"compiled for {isa}, but this CPU cannot run {isa} code")
    kernels = source.cpu(dtype, flags, isa=isa)
    lowest = -87.0 if dtype == torch.float32 else -708.0
    x = torch.cat([
        torch.linspace(lowest, 0.0, 9973, dtype=torch.float64),
        torch.tensor([0.0, -0.0, 1e-8, -1e-8, 0.5, 1.0, 10.0, 80.0]).double(),
    ]).to(dtype)  # fmt: skip
    x = x[: x.numel() - 3]  # not a multiple of any tile width
    y = torch.full_like(x, float("nan"))
    kernels.lane_exp(3, 5, x, y, x.numel())
    want = torch.exp(x.double())
    ulp = torch.finfo(dtype).eps
    rel = ((y.double() - want) / want).abs().max().item()
    assert rel < (4 if lanes > 1 else 1) * ulp, rel
    tiny = torch.tensor([lowest - 50, lowest - 1e4], dtype=dtype)
    out = torch.full_like(tiny, float("nan"))
    kernels.lane_exp(1, 1, tiny, out, 2)
    assert ((out >= 0) & (out <= 2 * torch.finfo(dtype).tiny)).all(), out



@needs_nvrtc
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_nvrtc_compiles_without_gpu(toy_source, dtype):
    assert len(nvrtc_compile(toy_source, dtype, "sm_80")) > 100


@needs_nvrtc
def test_nvrtc_compile_error_carries_the_log(tmp_path):
    path = tmp_path / "broken.cu"
    path.write_text("__global__ void f(float* x) { x[0] = undefined_name; }\n")
    with pytest.raises(KernelCompileError, match="undefined_name"):
        nvrtc_compile(KernelSource(str(path)), torch.float32, "sm_90")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_launch_on_side_stream(toy_source, dtype):
    n = 5000
    x = torch.randn(n, device="cuda").to(dtype)
    y = torch.randn(n, device="cuda").to(dtype)
    want = (2.5 * x.float() + 0.5 * y.float()).to(dtype)
    visits = torch.zeros(n, dtype=torch.int32, device="cuda")
    kernels = toy_source.cuda(dtype, x.device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.axpby(3, 32, x, y, visits, n, 2.5, 0.5)  # tiny grid: grid-stride loops
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, want, rtol=1e-2, atol=1e-2)
    assert torch.equal(visits, torch.ones_like(visits))


# ------------------------------------------------------------------------------------- backend
def test_backend_selection(monkeypatch):
    monkeypatch.delenv("SAN_DET_BACKEND", raising=False)
    cpu = torch.zeros(1)
    assert forced_backend() is None
    assert select_backend(cpu) == ("cpu" if cpu_compiler_available() else "reference")
    with use_backend("reference"):
        assert select_backend(cpu) == "reference"
        with use_backend(None):
            assert forced_backend() is None
        assert forced_backend() == "reference"
    assert forced_backend() is None
    monkeypatch.setenv("SAN_DET_BACKEND", "reference")
    assert select_backend(cpu) == "reference"
    with use_backend("cpu"):  # the context manager wins over the environment
        assert select_backend(cpu) == "cpu"
    with use_backend("cuda"), pytest.raises(RuntimeError, match="not CUDA tensors"):
        select_backend(cpu)
    monkeypatch.setenv("SAN_DET_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        forced_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("gpu"):
            pass
    assert backend_mod.BACKENDS == ("reference", "cpu", "cuda")
    assert os.environ["SAN_DET_BACKEND"] == "bogus"  # monkeypatch restores it afterwards


# ------------------------------------------------------------------------ marshalling and CUDA
def test_kernel_arguments_on_another_device_are_refused(toy_source):
    """A tensor not on the kernel's device is an error naming it, before anything is launched."""
    if not cpu_compiler_available():
        pytest.skip("no C++ compiler")
    kernels = toy_source.cpu(torch.float32)
    y = torch.zeros(4)
    with pytest.raises(ValueError, match="axpby: x is on meta, the kernel runs on cpu"):
        kernels.axpby(1, 1, torch.zeros(4, device="meta"), y, torch.zeros(4, dtype=torch.int32),
                      4, 1.0, 1.0)  # fmt: skip
    with pytest.raises(TypeError, match="n is a number"):
        kernels.axpby(1, 1, y, y, y, y, 1.0, 1.0)


class _FakeCupy:
    """Just enough of CuPy to follow the CUDA path without a GPU: which device is current when
    a module is compiled, a kernel looked up and launched, and what is passed."""

    def __init__(self):
        self.current = 0
        self.events = []
        self.streams_made = 0
        fake = self

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                self.previous, fake.current = fake.current, self.index

            def __exit__(self, *exc):
                fake.current = self.previous

        class RawModule:
            def __init__(self, code, options, backend, name_expressions):
                fake.events.append(("module", fake.current, options, name_expressions))

            def compile(self):
                fake.events.append(("compile", fake.current))

            def get_function(self, name):
                fake.events.append(("get_function", fake.current, name))
                return lambda grid, block, args: fake.events.append(
                    ("launch", fake.current, name, grid, block, args)
                )

        class Stream:
            @staticmethod
            def from_external(stream):
                time.sleep(0.01)  # widen the window a racing cache would fall into
                fake.streams_made += 1
                return contextlib.nullcontext()

        runtime = types.SimpleNamespace(getDeviceCount=lambda: 2)
        self.module = types.ModuleType("cupy")
        self.module.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
        compiler = types.SimpleNamespace(_decode_cache_payload=None)  # caches name expressions
        self.cuda = types.ModuleType("cupy.cuda")
        self.cuda.__dict__.update(Device=Device, Stream=Stream, ExternalStream=None,
                                  runtime=runtime, compiler=compiler,
                                  nvrtc=types.SimpleNamespace(getVersion=lambda: (13, 0)))  # fmt: skip
        self.module.cuda = self.cuda
        self.module.RawModule = RawModule


class _FakeTorchStream:
    def __init__(self, device_index, handle=1234):
        self.device_index, self.cuda_stream = device_index, handle

    def __cuda_stream__(self):
        return (0, self.cuda_stream)


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    monkeypatch.setitem(sys.modules, "cupy.cuda", fake.cuda)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: _FakeTorchStream(index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(kernel_runtime, "_STREAMS", {})
    return fake


def test_cuda_kernels_are_compiled_looked_up_and_launched_on_their_device(toy_source, fake_cupy):
    """cuda:1 while device 0 is current: compile, lookup and launch all happen on device 1, with
    the header directory passed explicitly and every kernel looked up by name."""
    kernels = toy_source.cuda(torch.float32, torch.device("cuda", 1))
    assert toy_source.cuda(torch.float32, torch.device("cuda", 1)) is kernels  # compiled once
    module, compile_, *lookups = fake_cupy.events
    assert module[:2] == ("module", 1) and compile_ == ("compile", 1)
    assert module[3] == ("axpby", "fill_block_ids")
    include = [o[2:] for o in module[2] if o.startswith("-I")]
    assert len(include) == 1
    assert all((Path(include[0]) / header).exists() for header in ("cuda_fp16.h", "cuda_bf16.h"))
    assert sorted(lookups) == [("get_function", 1, "axpby"), ("get_function", 1, "fill_block_ids")]
    assert fake_cupy.current == 0
    fake_cupy.events.clear()
    kernels.axpby(3, 32, 1000, 2000, 3000, 5, 2.5, 0.5)  # raw pointers are accepted as ints
    ((_, device, name, grid, block, args),) = fake_cupy.events
    assert (device, name, grid, block) == (1, "axpby", (3,), (32,))
    assert [type(a) for a in args] == [int, int, int, np.int64, np.float32, np.float64]
    with pytest.raises(ValueError, match="x is on cpu, the kernel runs on cuda:1"):
        kernels.axpby(3, 32, torch.zeros(5), 2000, 3000, 5, 2.5, 0.5)
    assert len(fake_cupy.events) == 1  # nothing launched


def test_stream_cache_makes_one_wrapper_per_stream_under_threads(fake_cupy):
    """The forward and autograd's thread ask for the same stream at once: one CuPy wrapper."""
    stream = _FakeTorchStream(0, handle=99)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        wrapped = list(pool.map(lambda _: kernel_runtime._cupy_stream(stream), range(16)))
    assert fake_cupy.streams_made == 1 and all(w is wrapped[0] for w in wrapped)


def test_cupy_that_cannot_initialise_is_reported_once_with_the_reference_fallback(fake_cupy):
    def broken():
        raise RuntimeError("cudaErrorInsufficientDriver")

    backend_mod.cupy_problem.cache_clear()
    backend_mod._warn_fallback.cache_clear()
    try:
        cuda = torch.device("cuda", 0)
        assert backend_mod.cupy_problem() is None and backend_mod.can_run("cuda", cuda)
        backend_mod.cupy_problem.cache_clear()
        fake_cupy.cuda.runtime.getDeviceCount = broken
        assert not backend_mod.can_run("cuda", cuda)
        with pytest.raises(RuntimeError, match="CuPy cannot initialise .*InsufficientDriver"):
            backend_mod.can_run("cuda", cuda, raise_error=True)
        with pytest.warns(UserWarning, match="cannot initialise.*slow PyTorch reference"):
            backend_mod._warn_fallback("cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            backend_mod._warn_fallback("cuda")  # once per process
    finally:
        backend_mod.cupy_problem.cache_clear()
        backend_mod._warn_fallback.cache_clear()


# ------------------------------------------------------------------- registers and occupancy
@pytest.mark.slow
@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("filename", ["local_attention.cu", "san_ops.cu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_no_kernel_is_held_to_one_block_per_sm(filename, dtype, arch):
    """ptxas's register count (NVRTC with CuPy's options): every kernel fits two blocks of
    DEFAULT_THREADS in an SM's 64K registers, without spilling."""
    usage = kernel_resources(KernelSource(filename), dtype, arch)
    assert set(usage) == set(KernelSource(filename).kernels)
    for name, (registers, spilled) in usage.items():
        assert registers * DEFAULT_THREADS * 2 <= 65536, (name, registers)
        assert spilled == 0, (name, spilled)
