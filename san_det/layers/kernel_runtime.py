"""One kernel source, two ways to run it: CuPy on a GPU, g++ on the CPU.

Kernel files live in ``san_det/layers/kernels/*.cu``. They are written in the restricted style the
CPU path can emulate: every ``__global__`` function is a grid-stride loop over its outputs, with no
``__shared__`` memory, ``__syncthreads`` or warp intrinsics, and element types spelled
``scalar_t`` (storage) and ``acc_t`` (arithmetic), converted with ``TO_ACC(x)`` / ``FROM_ACC(x)``.

- :meth:`KernelSource.cuda` compiles with ``cupy.RawModule`` for the tensor's own device (module,
  kernels and launches all inside ``with cupy.cuda.Device(index)``), with :func:`cuda_options` (the
  include directory of ``cuda_fp16.h``/``cuda_bf16.h`` passed explicitly), and launches on torch's
  current stream of that device. CuPy 14.2 keeps the compiled module in its disk cache
  (``~/.cupy/kernel_cache``, keyed by source, options, architecture and NVRTC version, together with
  the kernels' mangled names), so a new process does not recompile; an older CuPy, which does not,
  is reported once with a warning.
- :meth:`KernelSource.cpu` compiles the same text as C++ (``g++`` with :data:`CPU_BASE_FLAGS` and
  the caller's flags, e.g. tile macros) into a shared library cached by the hash of source,
  compiler and flags under ``$SAN_DET_CACHE`` (default ``~/.cache/san_det``) and calls it through
  ctypes; each launch runs every (block, thread) pair of the grid, so a tiny grid exercises the
  grid-stride loops, with denormal numbers flushed to zero on every thread while it runs
  (``san_flush_denormals`` in ``cpu_prelude.h``; the caller's mode is restored on return). The library is built for one instruction-set level of :data:`CPU_ISAS`
  (:func:`cpu_isa`: ``avx512``, ``avx2`` or the ``portable`` baseline), the best the host runs
  unless ``SAN_DET_CPU_ISA`` names another; :meth:`KernelSource.build_cpu` also builds levels
  the host cannot run (compile-only checks).

Both launch through one marshalling path (:class:`_Kernel`): the argument count, every tensor on
the kernel's device (a CPU tensor given to a CUDA kernel is an error here, not an illegal address
later), each scalar converted to the parameter's C type.

A kernel file may ``#include "name.h"`` a header of the kernels directory: its text is inlined
once, so the CUDA source, the CPU source and the cache keys all cover it.

Kernel arguments may be pointers (``T*``), integers (``int``, ``int64_t``) or ``float``/``double``
(not ``acc_t``: its width depends on the dtype); the types are read from the ``__global__``
declarations. From Python pass tensors (their ``data_ptr()`` is used) or numbers.
"""

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy
import torch

from .cpu_toolchain import (
    CPU_BASE_FLAGS,
    CPU_ISAS,
    ISA_FLAGS,
    cpu_compiler,
    cpu_compiler_available,
    cpu_isa,
    supported_cpu_isas,
)

__all__ = [
    "CPU_BASE_FLAGS",
    "CPU_ISAS",
    "CUDA_OPTIONS",
    "DTYPE_NAMES",
    "DEFAULT_THREADS",
    "KernelCompileError",
    "KernelSource",
    "cpu_compiler",
    "cpu_compiler_available",
    "cpu_isa",
    "cuda_include_dir",
    "cuda_options",
    "supported_cpu_isas",
]

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
DEFAULT_THREADS = 256  # threads per block on the GPU

# The C name of each storage dtype, as the kernel sources and the cache keys spell it.
DTYPE_NAMES = {
    torch.float64: "double",
    torch.float32: "float",
    torch.float16: "half",
    torch.bfloat16: "bfloat16",
}

# The element types and conversions of each dtype's build (the CPU's: float and double only).
_PLAIN_CONVERSIONS = "#define TO_ACC(x) ((acc_t)(x))\n#define FROM_ACC(x) ((scalar_t)(x))\n"
_TYPE_PRELUDE = {
    "double": "typedef double scalar_t;\ntypedef double acc_t;\n" + _PLAIN_CONVERSIONS,
    "float": "typedef float scalar_t;\ntypedef float acc_t;\n" + _PLAIN_CONVERSIONS,
    "half": "#include <cuda_fp16.h>\ntypedef __half scalar_t;\ntypedef float acc_t;\n"
    "#define TO_ACC(x) __half2float(x)\n#define FROM_ACC(x) __float2half(x)\n",
    "bfloat16": "#include <cuda_bf16.h>\ntypedef __nv_bfloat16 scalar_t;\ntypedef float acc_t;\n"
    "#define TO_ACC(x) __bfloat162float(x)\n#define FROM_ACC(x) __float2bfloat16(x)\n",
}
# SAN_BLOCK_THREADS: the block size the kernels are launched with, for their __launch_bounds__.
_CUDA_COMMON_PRELUDE = f"typedef long long int64_t;\n#define SAN_BLOCK_THREADS {DEFAULT_THREADS}\n"
# NVRTC options of the CUDA build besides the include directory (cuda_options).
CUDA_OPTIONS = ("--std=c++17",)

_KERNEL_SIGNATURE = re.compile(
    r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)", re.S
)
_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([\w.]+)"[ \t]*$', re.M)


class KernelCompileError(RuntimeError):
    """A kernel source failed to compile; the message holds the compiler's log."""


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


# Declared C type of a scalar kernel parameter -> its kind; any pointer is "ptr".
_SCALAR_KINDS = {"int": "int", "int64_t": "int64", "long long": "int64", "float": "float",
                 "double": "double"}  # fmt: skip


def _parse_kernels(source: str) -> Dict[str, List[Tuple[str, str, str]]]:
    """Map each ``__global__`` function to its parameters: (kind, name, declared type)."""
    kernels = {}
    for match in _KERNEL_SIGNATURE.finditer(source):
        params = []
        for raw in match.group(2).split(","):
            words = raw.replace("*", " * ").split()
            if not words:
                continue
            name, decl = words[-1], " ".join(words[:-1])
            base = " ".join(w for w in words[:-1] if w not in ("const", "__restrict__"))
            if "*" in words:
                kind = "ptr"
            elif base in ("acc_t", "scalar_t"):
                raise KernelCompileError(
                    f"pass scalar kernel arguments as float or double: {raw!r}"
                )
            elif base in _SCALAR_KINDS:
                kind = _SCALAR_KINDS[base]
            else:
                raise KernelCompileError(f"unsupported kernel parameter type in {raw!r}")
            params.append((kind, name, decl))
        kernels[match.group(1)] = params
    return kernels


def _cache_dir() -> Path:
    path = Path(os.environ.get("SAN_DET_CACHE", Path.home() / ".cache" / "san_det"))
    path.mkdir(parents=True, exist_ok=True)
    return path


# Parameter kind -> how a Python int or float (a pointer as an int) is passed: through ctypes to
# the CPU launchers, as a NumPy scalar of the parameter's width to CuPy.
_CPU_ARGUMENTS = {"ptr": ctypes.c_void_p, "int": ctypes.c_int, "int64": ctypes.c_int64,
                  "float": ctypes.c_float, "double": ctypes.c_double}  # fmt: skip
_CUDA_ARGUMENTS = {"ptr": int, "int": numpy.int32, "int64": numpy.int64, "float": numpy.float32,
                   "double": numpy.float64}  # fmt: skip


class _Kernel:
    """One compiled kernel: ``kernel(grid, block, *args)``. Every tensor argument must be on the
    kernel's device; numbers are converted to the parameter's C type."""

    def __init__(self, name: str, params, device: torch.device, convert: dict, launch):
        self.name, self.params, self.device = name, params, device
        self._cuda_index = device.index if device.type == "cuda" else None
        self._converters = [convert[kind] for kind, _, _ in params]
        self._launch = launch

    def __call__(self, grid: int, block: int, *args) -> None:
        if len(args) != len(self.params):
            raise TypeError(f"kernel takes {len(self.params)} arguments, got {len(args)}")
        index = self._cuda_index
        values = []
        for (kind, name, _), convert, arg in zip(self.params, self._converters, args):
            if isinstance(arg, torch.Tensor):
                if kind != "ptr":
                    raise TypeError(f"{self.name}: {name} is a number, got a tensor")
                # (Cheaper than comparing torch.device objects: launches are hot.)
                if not (arg.is_cpu if index is None else arg.is_cuda and arg.get_device() == index):
                    raise ValueError(
                        f"{self.name}: {name} is on {arg.device}, the kernel runs on {self.device}"
                    )
                arg = arg.data_ptr()
            values.append(convert(arg))
        self._launch(int(grid), int(block), values)


class _Kernels:
    """The kernels of one compiled source, as attributes ``name(grid, block, *args)``;
    ``launcher(name)`` gives each its ``launch(grid, block, converted values)``."""

    def __init__(self, kernels: Dict[str, list], device: torch.device, convert: dict, launcher):
        for name, params in kernels.items():
            setattr(self, name, _Kernel(name, params, device, convert, launcher(name)))


def _cpu_kernels(library_path: Path, kernels: Dict[str, list]) -> _Kernels:
    lib = ctypes.CDLL(str(library_path))

    def launcher(name):
        fn = getattr(lib, f"san_launch_{name}")
        fn.restype = None
        return lambda grid, block, values: fn(ctypes.c_int(grid), ctypes.c_int(block), *values)

    return _Kernels(kernels, torch.device("cpu"), _CPU_ARGUMENTS, launcher)


def _cuda_kernels(module, kernels: Dict[str, list], index: int) -> _Kernels:
    """Look the kernels up in ``module`` (call inside ``cupy.cuda.Device(index)``)."""
    import cupy

    def launcher(name):
        fn = module.get_function(name)

        def launch(grid, block, values):
            # On the kernel's device and torch's current stream of that device, whichever device
            # is current.
            with cupy.cuda.Device(index), _cupy_stream(torch.cuda.current_stream(index)):
                fn((grid,), (block,), tuple(values))

        return launch

    return _Kernels(kernels, torch.device("cuda", index), _CUDA_ARGUMENTS, launcher)


@functools.lru_cache(maxsize=None)
def _warn_without_disk_cache(cupy) -> None:
    """A CuPy whose disk cache stores the mangled names of name-expression modules (our kernels
    have C++ names; CuPy 14.2 does) finds them in a new process; CuPy <= 13 recompiles them in
    every process."""
    if not hasattr(getattr(cupy.cuda, "compiler", None), "_decode_cache_payload"):
        warnings.warn(
            f"san_det: CuPy {getattr(cupy, '__version__', '?')} does not cache the attention "
            "kernels on disk; every process compiles them again (CuPy 14.2 does)"
        )


_STREAMS: Dict[Tuple[int, int], object] = {}
_STREAMS_LOCK = threading.Lock()


def _cupy_stream(stream: "torch.cuda.Stream"):
    """A CuPy view of a torch stream, made once per (device, stream handle): launches are hot.
    Locked: the forward and autograd's thread may ask for the same stream at once, and a
    duplicate CuPy wrapper dropped later must not touch torch's stream."""
    import cupy

    key = (stream.device_index, stream.cuda_stream)
    with _STREAMS_LOCK:
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
        self._cpu: Dict[str, _Kernels] = {}
        self._cuda: Dict[Tuple[str, int], _Kernels] = {}

    # ---------------------------------------------------------------- CUDA
    def cuda_source(self, dtype_name: str) -> str:
        """The full CUDA translation unit for one storage dtype."""
        return _CUDA_COMMON_PRELUDE + _TYPE_PRELUDE[dtype_name] + self.source

    def cuda(self, dtype: torch.dtype, device: torch.device) -> _Kernels:
        """Compiled kernels for ``dtype`` on a CUDA ``device`` (compiled once per process and
        device, found in CuPy's disk cache by later processes)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (DTYPE_NAMES[dtype], index)
        with self._lock:
            if key not in self._cuda:
                self._cuda[key] = self._build_cuda(key[0], index)
            return self._cuda[key]

    def _build_cuda(self, dtype_name: str, index: int) -> _Kernels:
        import cupy

        _warn_without_disk_cache(cupy)

        # Everything on device `index`: CuPy compiles for the current device's architecture and
        # loads the module into the current device's context.
        with cupy.cuda.Device(index):
            module = cupy.RawModule(
                code=self.cuda_source(dtype_name),
                options=cuda_options(),
                backend="nvrtc",
                # Kernels are not extern "C": look their mangled names up by expression.
                name_expressions=tuple(self.kernels),
            )
            module.compile()
            return _cuda_kernels(module, self.kernels, index)

    # ---------------------------------------------------------------- CPU
    def cpu_source(self, dtype_name: str) -> str:
        """The C++ translation unit for one dtype: prelude, kernels and one launcher per kernel."""
        if dtype_name not in ("float", "double"):
            raise ValueError("the CPU path computes in float32 or float64 only")
        parts = [
            '#include "cpu_prelude.h"',
            _TYPE_PRELUDE[dtype_name],
            f"#define SAN_ACC_BYTES {8 if dtype_name == 'double' else 4}",
            self.source,
        ]
        for name, params in self.kernels.items():
            decls = ", ".join(f"{decl} {pname}" for _, pname, decl in params)
            names = ", ".join(pname for _, pname, _ in params)
            sep = ", " if decls else ""
            parts.append(
                f'extern "C" void san_launch_{name}(int grid_, int block_{sep}{decls}) {{\n'
                "  #pragma omp parallel\n  {\n"
                "  const san_flush_denormals flush_;\n"
                "  #pragma omp for schedule(static)\n"
                # Loop variables end in '_' so they cannot shadow a kernel parameter.
                "  for (int block_idx_ = 0; block_idx_ < grid_; ++block_idx_) {\n"
                "    gridDim = {(unsigned)grid_, 1, 1}; blockDim = {(unsigned)block_, 1, 1};\n"
                "    blockIdx = {(unsigned)block_idx_, 0, 0};\n"
                "    for (int thread_idx_ = 0; thread_idx_ < block_; ++thread_idx_) {\n"
                "      threadIdx = {(unsigned)thread_idx_, 0, 0};\n"
                f"      {name}({names});\n"
                "    }\n  }\n  }\n}\n"
            )
        return "\n".join(parts)

    def cpu(
        self, dtype: torch.dtype, extra_flags: Sequence[str] = (), isa: Optional[str] = None
    ) -> _Kernels:
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
        key = DTYPE_NAMES[dtype] + "|" + isa + "|" + " ".join(extra_flags)
        with self._lock:
            if key not in self._cpu:
                self._cpu[key] = _cpu_kernels(self.build_cpu(dtype, extra_flags, isa), self.kernels)
            return self._cpu[key]

    def build_cpu(self, dtype: torch.dtype, extra_flags: Sequence[str], isa: str) -> Path:
        """Build (or find in the cache) the shared library for ``isa`` without loading it, so
        levels the host cannot run can still be compile-checked."""
        if isa not in CPU_ISAS:
            raise ValueError(f"isa must be one of {CPU_ISAS}, got {isa!r}")
        return self._build_cpu(DTYPE_NAMES[dtype], (*ISA_FLAGS[isa], *extra_flags))

    def _build_cpu(self, dtype_name: str, extra_flags: Tuple[str, ...]) -> Path:
        if not cpu_compiler_available():
            raise KernelCompileError("no C++ compiler found for the compiled CPU path")
        source = self.cpu_source(dtype_name)
        prelude = (KERNEL_DIR / "cpu_prelude.h").read_text()
        flags = [*CPU_BASE_FLAGS, *extra_flags]
        cxx = cpu_compiler()
        digest = hashlib.sha256("\0".join([source, prelude, cxx, *flags]).encode()).hexdigest()[:20]
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


@functools.lru_cache(maxsize=None)
def cuda_include_dir() -> Optional[str]:
    """A directory holding ``cuda_fp16.h`` and ``cuda_bf16.h`` for NVRTC (the CUDA runtime
    headers of the ``nvidia-cuda-runtime`` wheel, ``$CUDA_HOME``, ``$CUDA_PATH`` or
    ``/usr/local/cuda``), if one can be found."""
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
        if (cand / "cuda_fp16.h").exists() and (cand / "cuda_bf16.h").exists():
            return str(cand)
    return None


def cuda_options() -> Tuple[str, ...]:
    """The NVRTC options of the CUDA build: :data:`CUDA_OPTIONS` and ``-I`` the directory of
    :func:`cuda_include_dir` (not left to CuPy's search, which misses the headers with CuPy <= 13
    or an NVRTC newer than the runtime headers)."""
    include = cuda_include_dir()
    return CUDA_OPTIONS + ((f"-I{include}",) if include else ())
