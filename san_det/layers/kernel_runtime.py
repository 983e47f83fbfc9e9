"""One kernel source, three ways to run it: CuPy on a GPU, g++ on the CPU, NVRTC for checking.

Kernel files live in ``san_det/layers/kernels/*.cu``. They are written in the restricted style the
CPU path can emulate: every ``__global__`` function is a grid-stride loop over its outputs, with no
``__shared__`` memory, ``__syncthreads`` or warp intrinsics, and element types spelled
``scalar_t`` (storage) and ``acc_t`` (arithmetic), converted with ``TO_ACC(x)`` / ``FROM_ACC(x)``.

- :meth:`KernelSource.cuda` compiles with ``cupy.RawModule`` and launches on torch's current stream.
- :meth:`KernelSource.cpu` compiles the same text as C++ (``g++`` with :data:`CPU_BASE_FLAGS` and
  the caller's flags, e.g. tile macros) into a shared library cached by the hash of source,
  compiler and flags under ``$SAN_DET_CACHE`` (default ``~/.cache/san_det``) and calls it through
  ctypes; each launch runs every (block, thread) pair of the grid, so a tiny grid exercises the
  grid-stride loops. The library is built for one instruction-set level of :data:`CPU_ISAS`
  (:func:`cpu_isa`: ``avx512``, ``avx2`` or the ``portable`` baseline), the best the host runs
  unless ``SAN_DET_CPU_ISA`` names another; :meth:`KernelSource.build_cpu` also builds levels
  the host cannot run (compile-only checks).
- :meth:`KernelSource.nvrtc_compile` compiles for a given ``sm_XX`` with ``cuda.bindings.nvrtc``,
  which needs no GPU, so CI checks that every kernel builds for every dtype.

A kernel file may ``#include "name.h"`` a header of the kernels directory: its text is inlined
once, so the CUDA source, the CPU source and the cache keys all cover it.

Kernel arguments may be pointers (``T*``), integers (``int``, ``int64_t``) or ``float``/``double``
(not ``acc_t``: its width depends on the dtype);
from Python pass tensors (their ``data_ptr()`` is used) or numbers.
"""

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "CPU_BASE_FLAGS",
    "CPU_ISAS",
    "DEFAULT_THREADS",
    "KernelCompileError",
    "KernelSource",
    "cpu_compiler",
    "cpu_compiler_available",
    "cpu_isa",
    "supported_cpu_isas",
]

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
DEFAULT_THREADS = 256  # threads per block on the GPU

_DTYPE_NAMES = {
    torch.float64: "double",
    torch.float32: "float",
    torch.float16: "half",
    torch.bfloat16: "bfloat16",
}

_CUDA_TYPE_PRELUDE = {
    "double": "typedef double scalar_t;\ntypedef double acc_t;\n"
    "#define TO_ACC(x) ((acc_t)(x))\n#define FROM_ACC(x) ((scalar_t)(x))\n",
    "float": "typedef float scalar_t;\ntypedef float acc_t;\n"
    "#define TO_ACC(x) ((acc_t)(x))\n#define FROM_ACC(x) ((scalar_t)(x))\n",
    "half": "#include <cuda_fp16.h>\ntypedef __half scalar_t;\ntypedef float acc_t;\n"
    "#define TO_ACC(x) __half2float(x)\n#define FROM_ACC(x) __float2half(x)\n",
    "bfloat16": "#include <cuda_bf16.h>\ntypedef __nv_bfloat16 scalar_t;\ntypedef float acc_t;\n"
    "#define TO_ACC(x) __bfloat162float(x)\n#define FROM_ACC(x) __float2bfloat16(x)\n",
}
_CUDA_COMMON_PRELUDE = "typedef long long int64_t;\n"

_KERNEL_SIGNATURE = re.compile(r"__global__\s+void\s+(\w+)\s*\(([^)]*)\)", re.S)
_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([\w.]+)"[ \t]*$', re.M)


class KernelCompileError(RuntimeError):
    """A kernel source failed to compile; the message holds the compiler's log."""


# How every kernel is compiled for the CPU: these flags, then the ISA level's, then the caller's
# (tile macros), all part of the cache key. -ffp-contract=fast lets g++ fuse a * b + c into one
# FMA (-std=c++17 alone forbids it).
CPU_BASE_FLAGS = ("-O3", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c++17")

# Instruction-set levels of the CPU build, lowest first, with the g++ flags that select them and
# the /proc/cpuinfo flags the host needs for each. The levels are explicit feature sets (not
# -march=native), so a cached library is valid on every host of its level (Intel or AMD).
CPU_ISAS = ("portable", "avx2", "avx512")
_AVX512 = ("avx512f", "avx512vl", "avx512bw", "avx512dq")
ISA_FLAGS = {
    "portable": (),
    "avx2": ("-mavx2", "-mfma"),
    "avx512": ("-mavx2", "-mfma", *(f"-m{f}" for f in _AVX512), "-mprefer-vector-width=512"),
}
_ISA_CPU_FLAGS = {"portable": (), "avx2": ("avx2", "fma"), "avx512": ("avx2", "fma", *_AVX512)}

_OPENMP_PROBE = r"""
#include <omp.h>
int main() {
    int threads = 0;
    #pragma omp parallel reduction(+ : threads)
    threads += 1;
    return threads == omp_get_max_threads() ? 0 : 1;
}
"""


def cpu_compiler() -> str:
    """The C++ compiler command of the CPU path: ``$CXX``, else ``g++``."""
    return os.environ.get("CXX", "g++")


@functools.lru_cache(maxsize=None)
def cpu_compiler_available() -> bool:
    """Whether :func:`cpu_compiler` builds and runs an OpenMP program (checked once a process)."""
    cxx = cpu_compiler()
    if shutil.which(cxx) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.cpp", Path(tmp) / "probe"
        src.write_text(_OPENMP_PROBE)
        try:
            build = subprocess.run(
                [cxx, "-fopenmp", str(src), "-o", str(exe)], capture_output=True, timeout=120
            )
            return build.returncode == 0 and subprocess.run([str(exe)], timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


@functools.lru_cache(maxsize=None)
def _host_cpu_flags() -> frozenset:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supported_cpu_isas() -> Tuple[str, ...]:
    """The instruction-set levels of :data:`CPU_ISAS` this host can run, lowest first."""
    flags = _host_cpu_flags()
    return tuple(isa for isa in CPU_ISAS if set(_ISA_CPU_FLAGS[isa]) <= flags)


def cpu_isa() -> str:
    """The instruction-set level the CPU kernels are built for: ``SAN_DET_CPU_ISA`` if set, else
    the best level of :func:`supported_cpu_isas`.

    Raises:
        ValueError: ``SAN_DET_CPU_ISA`` names an unknown level or one this host cannot run.
    """
    supported = supported_cpu_isas()
    name = os.environ.get("SAN_DET_CPU_ISA", "").strip()
    if not name:
        return supported[-1]
    if name not in CPU_ISAS:
        raise ValueError(f"SAN_DET_CPU_ISA must be one of {CPU_ISAS}, got {name!r}")
    if name not in supported:
        raise ValueError(
            f"SAN_DET_CPU_ISA={name}: this CPU lacks "
            f"{sorted(set(_ISA_CPU_FLAGS[name]) - _host_cpu_flags())} (supported: {supported})"
        )
    return name


def _inline_includes(text: str, seen: Optional[set] = None) -> str:
    """Replace ``#include "x.h"`` lines naming files of the kernels directory by their text."""
    seen = set() if seen is None else seen

    def expand(match):
        name = match.group(1)
        path = KERNEL_DIR / name
        if not path.is_file():
            return match.group(0)
        if name in seen:
            return f"// {name} already included"
        seen.add(name)
        return f"// ---- {name}\n{_inline_includes(path.read_text(), seen)}\n// ---- end {name}"

    return _LOCAL_INCLUDE.sub(expand, text)


def _parse_kernels(source: str) -> Dict[str, List[Tuple[str, str]]]:
    """Map each ``__global__`` function to its parameter list of (ctype kind, name)."""
    kernels = {}
    for match in _KERNEL_SIGNATURE.finditer(source):
        params = []
        for raw in match.group(2).split(","):
            raw = " ".join(raw.split())
            if not raw:
                continue
            name = re.findall(r"\w+", raw)[-1]
            decl = raw[: raw.rfind(name)]
            if "*" in decl:
                kind = "ptr"
            elif "acc_t" in decl or "scalar_t" in decl:
                raise KernelCompileError(
                    f"pass scalar kernel arguments as float or double: {raw!r}"
                )
            elif "double" in decl:
                kind = "double"
            elif "float" in decl:
                kind = "float"
            elif "int64_t" in decl or "long" in decl:
                kind = "int64"
            elif "int" in decl:
                kind = "int"
            else:
                raise KernelCompileError(f"unsupported kernel parameter type in {raw!r}")
            params.append((kind, name, decl.strip()))
        kernels[match.group(1)] = params
    return kernels


def _cache_dir() -> Path:
    path = Path(os.environ.get("SAN_DET_CACHE", Path.home() / ".cache" / "san_det"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class _CpuKernel:
    def __init__(self, fn, params):
        self._fn = fn
        self._params = params

    def __call__(self, grid: int, block: int, *args):
        if len(args) != len(self._params):
            raise TypeError(f"kernel takes {len(self._params)} arguments, got {len(args)}")
        converted = [ctypes.c_int(grid), ctypes.c_int(block)]
        for (kind, name, _), arg in zip(self._params, args):
            if kind == "ptr":
                converted.append(ctypes.c_void_p(arg.data_ptr() if torch.is_tensor(arg) else arg))
            elif kind == "int":
                converted.append(ctypes.c_int(int(arg)))
            elif kind == "int64":
                converted.append(ctypes.c_int64(int(arg)))
            elif kind == "float":
                converted.append(ctypes.c_float(float(arg)))
            else:
                converted.append(ctypes.c_double(float(arg)))
        self._fn(*converted)


class _CpuModule:
    """Kernels of one source compiled for the CPU; attributes are callables ``(grid, block, *args)``."""

    def __init__(self, library_path: Path, kernels: Dict[str, list]):
        self._lib = ctypes.CDLL(str(library_path))
        for name, params in kernels.items():
            fn = getattr(self._lib, f"san_launch_{name}")
            fn.restype = None
            setattr(self, name, _CpuKernel(fn, params))


class _CudaKernel:
    def __init__(self, fn, params, device_index: int):
        self._fn = fn
        self._params = params
        self._device_index = device_index

    def __call__(self, grid: int, block: int, *args):
        import cupy

        if len(args) != len(self._params):
            raise TypeError(f"kernel takes {len(self._params)} arguments, got {len(args)}")
        converted = []
        for (kind, name, decl), arg in zip(self._params, args):
            if kind == "ptr":
                converted.append(arg.data_ptr() if torch.is_tensor(arg) else arg)
            elif kind == "int":
                converted.append(cupy.int32(arg))
            elif kind == "int64":
                converted.append(cupy.int64(arg))
            elif kind == "float":
                converted.append(cupy.float32(arg))
            else:
                converted.append(cupy.float64(arg))
        # The module was compiled for this device: launch there, on torch's current stream of
        # that device (not of whichever device happens to be current).
        with cupy.cuda.Device(self._device_index):
            with _cupy_stream(torch.cuda.current_stream(self._device_index)):
                self._fn((int(grid),), (int(block),), tuple(converted))


_STREAMS: Dict[Tuple[int, int], object] = {}


def _cupy_stream(stream: "torch.cuda.Stream"):
    """A CuPy view of a torch stream, made once per (device, stream handle): launches are hot."""
    import cupy

    key = (stream.device_index, stream.cuda_stream)
    wrapped = _STREAMS.get(key)
    if wrapped is None:
        if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
            wrapped = cupy.cuda.Stream.from_external(stream)
        else:  # older CuPy or torch: the (deprecated in CuPy 14) pointer wrapper
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                wrapped = cupy.cuda.ExternalStream(stream.cuda_stream, stream.device_index)
        _STREAMS[key] = wrapped
    return wrapped


class KernelSource:
    """A ``.cu`` file from ``san_det/layers/kernels`` compiled on demand per dtype and device."""

    _lock = threading.Lock()

    def __init__(self, filename: str):
        self.path = KERNEL_DIR / filename
        self.source = _inline_includes(self.path.read_text())
        self.kernels = _parse_kernels(self.source)
        if not self.kernels:
            raise KernelCompileError(f"{self.path} defines no __global__ function")
        self._cpu: Dict[str, _CpuModule] = {}
        self._cuda: Dict[Tuple[str, int], object] = {}
        self._cuda_namespaces: Dict[Tuple[str, int], "_CudaNamespace"] = {}

    # ---------------------------------------------------------------- CUDA
    def cuda_source(self, dtype_name: str) -> str:
        """The full CUDA translation unit for one storage dtype."""
        return _CUDA_COMMON_PRELUDE + _CUDA_TYPE_PRELUDE[dtype_name] + self.source

    def cuda(self, dtype: torch.dtype, device: torch.device):
        """Compiled kernels for ``dtype`` on a CUDA ``device`` (compiled once per process)."""
        import cupy

        dtype_name = _DTYPE_NAMES[dtype]
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (dtype_name, index)
        namespace = self._cuda_namespaces.get(key)
        if namespace is not None:
            return namespace
        with self._lock:
            if key not in self._cuda:
                with cupy.cuda.Device(index):
                    module = cupy.RawModule(
                        code=self.cuda_source(dtype_name),
                        options=("--std=c++17",),
                        backend="nvrtc",
                        # Kernels are not extern "C": look their mangled names up by expression.
                        name_expressions=tuple(self.kernels),
                    )
                    module.compile()
                    self._cuda[key] = module
            module = self._cuda[key]
            namespace = self._cuda_namespaces[key] = _CudaNamespace(module, self.kernels, index)
        return namespace

    def nvrtc_compile(self, dtype: torch.dtype, arch: str = "sm_90") -> bytes:
        """Compile for ``arch`` with NVRTC (no GPU needed) and return the cubin.

        Raises:
            KernelCompileError: with NVRTC's log when compilation fails.
        """
        from cuda.bindings import nvrtc

        source = self.cuda_source(_DTYPE_NAMES[dtype]).encode()
        err, prog = nvrtc.nvrtcCreateProgram(source, self.path.name.encode(), 0, [], [])
        _check_nvrtc(err, "nvrtcCreateProgram")
        options = [f"-arch={arch}".encode(), b"--std=c++17"]
        include = _cuda_include_dir()
        if include:
            options.append(f"-I{include}".encode())
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            nvrtc.nvrtcDestroyProgram(prog)
            raise KernelCompileError(
                f"NVRTC failed on {self.path.name} ({dtype}, {arch}):\n{log.decode(errors='replace')}"
            )
        _, size = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        nvrtc.nvrtcDestroyProgram(prog)
        return cubin

    # ---------------------------------------------------------------- CPU
    def cpu_source(self, dtype_name: str) -> str:
        """The C++ translation unit for one dtype: prelude, kernels and one launcher per kernel."""
        if dtype_name not in ("float", "double"):
            raise ValueError("the CPU path computes in float32 or float64 only")
        parts = [
            '#include "cpu_prelude.h"',
            f"typedef {dtype_name} scalar_t;",
            f"typedef {dtype_name} acc_t;",
            f"#define SAN_ACC_BYTES {8 if dtype_name == 'double' else 4}",
            "#define TO_ACC(x) ((acc_t)(x))",
            "#define FROM_ACC(x) ((scalar_t)(x))",
            self.source,
        ]
        for name, params in self.kernels.items():
            decls = ", ".join(f"{decl} {pname}" for _, pname, decl in params)
            names = ", ".join(pname for _, pname, _ in params)
            sep = ", " if decls else ""
            parts.append(
                f'extern "C" void san_launch_{name}(int grid_, int block_{sep}{decls}) {{\n'
                "  #pragma omp parallel for schedule(static)\n"
                # Loop variables end in '_' so they cannot shadow a kernel parameter.
                "  for (int block_idx_ = 0; block_idx_ < grid_; ++block_idx_) {\n"
                "    gridDim = {(unsigned)grid_, 1, 1}; blockDim = {(unsigned)block_, 1, 1};\n"
                "    blockIdx = {(unsigned)block_idx_, 0, 0};\n"
                "    for (int thread_idx_ = 0; thread_idx_ < block_; ++thread_idx_) {\n"
                "      threadIdx = {(unsigned)thread_idx_, 0, 0};\n"
                f"      {name}({names});\n"
                "    }\n  }\n}\n"
            )
        return "\n".join(parts)

    def cpu(
        self, dtype: torch.dtype, extra_flags: Sequence[str] = (), isa: Optional[str] = None
    ) -> _CpuModule:
        """Kernels compiled for the CPU (cached on disk by source hash and flags).

        Args:
            dtype: float32 or float64.
            extra_flags: more g++ flags (``-D`` tile sizes).
            isa: instruction-set level of :data:`CPU_ISAS`; default :func:`cpu_isa`.

        Raises:
            ValueError: this host cannot run ``isa`` code.
        """
        isa = isa or cpu_isa()
        if isa not in supported_cpu_isas():
            raise ValueError(
                f"this CPU cannot run {isa!r} code (supported: {supported_cpu_isas()})"
            )
        key = _DTYPE_NAMES[dtype] + "|" + isa + "|" + " ".join(extra_flags)
        with self._lock:
            if key not in self._cpu:
                self._cpu[key] = _CpuModule(self.build_cpu(dtype, extra_flags, isa), self.kernels)
            return self._cpu[key]

    def build_cpu(self, dtype: torch.dtype, extra_flags: Sequence[str], isa: str) -> Path:
        """Build (or find in the cache) the shared library for ``isa`` without loading it, so
        levels the host cannot run can still be compile-checked."""
        if isa not in CPU_ISAS:
            raise ValueError(f"isa must be one of {CPU_ISAS}, got {isa!r}")
        return self._build_cpu(_DTYPE_NAMES[dtype], (*ISA_FLAGS[isa], *extra_flags))

    def _build_cpu(self, dtype_name: str, extra_flags: Tuple[str, ...]) -> Path:
        if not cpu_compiler_available():
            raise KernelCompileError("no C++ compiler found for the compiled CPU path")
        source = self.cpu_source(dtype_name)
        prelude = (KERNEL_DIR / "cpu_prelude.h").read_text()
        flags = [*CPU_BASE_FLAGS, *extra_flags]
        cxx = cpu_compiler()
        digest = hashlib.sha256("\0".join([source, prelude, cxx, *flags]).encode()).hexdigest()
        digest = digest[:20]
        target = _cache_dir() / f"{self.path.stem}_{dtype_name}_{digest}.so"
        if target.exists():
            return target
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / f"{self.path.stem}.cpp"
            src.write_text(source)
            out = Path(tmp) / target.name
            cmd = [cxx, *flags, f"-I{KERNEL_DIR}", str(src), "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelCompileError(
                    f"g++ failed on {self.path.name} ({dtype_name}):\n{proc.stderr}"
                )
            # Atomic publish: concurrent processes never load a half-written library.
            tmp_target = target.with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(out, tmp_target)
            os.replace(tmp_target, target)
        return target


class _CudaNamespace:
    def __init__(self, module, kernels, device_index: int):
        for name, params in kernels.items():
            setattr(self, name, _CudaKernel(module.get_function(name), params, device_index))


def _check_nvrtc(err, what: str) -> None:
    from cuda.bindings import nvrtc

    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelCompileError(f"{what} failed: {err}")


@functools.lru_cache(maxsize=None)
def _cuda_include_dir() -> Optional[str]:
    """A directory holding cuda_fp16.h for NVRTC, if one can be found."""
    candidates = []
    try:
        import nvidia.cuda_runtime  # type: ignore

        candidates += [Path(p) / "include" for p in nvidia.cuda_runtime.__path__]
    except ImportError:
        pass
    try:
        import nvidia  # type: ignore

        for base in nvidia.__path__:
            candidates += list(Path(base).glob("*/include")) + [Path(base) / "cu13" / "include"]
    except ImportError:
        pass
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for cand in candidates:
        if (cand / "cuda_fp16.h").exists():
            return str(cand)
    return None
