"""Which implementation computes an attention op: ``reference``, ``cpu`` or ``cuda``.

The one place that knows what each backend can run (the capability predicates below) and picks
one. By default the choice follows the tensors' device: CUDA tensors use the CuPy kernels, CPU
tensors the compiled CPU kernels; where those cannot run (no C++ compiler with OpenMP; CuPy
missing or failing to initialise, found when the first CUDA tensor meets an op) the readable
PyTorch reference computes instead, with one warning per process. A backend can be forced for
tests and benchmarks, globally with the environment variable ``SAN_DET_BACKEND`` or locally with
the context manager::

    with use_backend("reference"):
        y = local_attention(q, k, v, rel, num_heads=8, kernel_size=7)

Forcing a backend that cannot run on the tensors raises instead of silently falling back.

Dtypes: the CUDA kernels take float64, float32, float16 and bfloat16 storage (half precision
accumulates in float32); the CPU kernels compute in float32 or float64 and take float16/bfloat16
inputs by computing in float32 and rounding the results back (:func:`compute_dtype`).
"""

import contextlib
import functools
import importlib.util
import os
import threading
import warnings
from typing import Iterator, Optional

import torch

from .checks import check_choice
from .kernel_runtime import cpu_compiler_available, cpu_isa

__all__ = [
    "BACKENDS",
    "can_run",
    "compute_dtype",
    "cpu_capability",
    "cupy_problem",
    "forced_backend",
    "select_backend",
    "use_backend",
]

BACKENDS = ("reference", "cpu", "cuda")
# Storage dtypes each kernel backend computes in natively.
_KERNEL_DTYPES = {
    "cpu": (torch.float64, torch.float32),
    "cuda": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
}
_state = threading.local()


def _check(name: str) -> str:
    return check_choice("backend", name, BACKENDS)


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force ``name`` for ops called in this block (``None`` restores automatic choice)."""
    previous = getattr(_state, "backend", None)
    _state.backend = _check(name) if name is not None else None
    try:
        yield
    finally:
        _state.backend = previous


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend` or ``SAN_DET_BACKEND``, else ``None``."""
    name = getattr(_state, "backend", None)
    if name is None:
        env = os.environ.get("SAN_DET_BACKEND", "").strip()
        name = _check(env) if env else None
    return name


# ------------------------------------------------------------------------ capability predicates
@functools.lru_cache(maxsize=None)
def cupy_problem() -> Optional[str]:
    """Why CuPy cannot compile and launch kernels in this process (not installed, its CUDA runtime
    fails to initialise, or its NVRTC does not load), or ``None`` if it can. Checked once, when
    the first CUDA tensor meets an op (before anything is compiled or launched)."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    try:
        import cupy
        from cupy.cuda import nvrtc

        cupy.cuda.runtime.getDeviceCount()
        nvrtc.getVersion()
    except Exception as error:  # noqa: BLE001  (ImportError, CUDARuntimeError, driver mismatch)
        return f"CuPy cannot initialise ({type(error).__name__}: {error})"
    return None


def cpu_capability() -> str:
    """The vector instruction-set level the CPU kernels are built for: ``"avx512"``, ``"avx2"`` or
    ``"portable"`` (the best of this CPU unless ``SAN_DET_CPU_ISA`` names another; see
    :func:`~.kernel_runtime.cpu_isa`, which also holds each level's compiler flags)."""
    return cpu_isa()


def can_run(backend: str, device: torch.device, raise_error: bool = False) -> bool:
    """Whether ``backend`` can compute on tensors of ``device``.

    Args:
        raise_error: raise ``RuntimeError`` saying why instead of returning ``False``.
    """
    why = None
    if backend == "cpu":
        if device.type != "cpu":
            why = f"the inputs are {device.type.upper()} tensors"
        elif not cpu_compiler_available():
            why = "no C++ compiler with OpenMP was found ($CXX or g++)"
    elif backend == "cuda":
        if device.type != "cuda":
            why = "the inputs are not CUDA tensors"
        else:
            why = cupy_problem()
    if why is not None and raise_error:
        raise RuntimeError(f"backend {backend!r} cannot run: {why}")
    return why is None


def compute_dtype(backend: str, dtype: torch.dtype) -> torch.dtype:
    """The storage dtype ``backend`` computes an op with ``dtype`` inputs in."""
    if backend == "reference" or dtype in _KERNEL_DTYPES[backend]:
        return dtype
    return torch.float32


def select_backend(tensor: torch.Tensor) -> str:
    """The backend for an op whose inputs live where ``tensor`` lives (forced or automatic)."""
    name = forced_backend()
    if name is not None:
        if name != "reference":
            can_run(name, tensor.device, raise_error=True)
        return name
    name = "cuda" if tensor.is_cuda else "cpu"
    if tensor.device.type not in ("cpu", "cuda") or not can_run(name, tensor.device):
        if tensor.device.type in ("cpu", "cuda"):
            _warn_fallback(name)
        return "reference"
    return name


@functools.lru_cache(maxsize=None)
def _warn_fallback(name: str) -> None:
    try:
        can_run(name, torch.device(name), raise_error=True)
    except RuntimeError as why:
        warnings.warn(f"san_det: {why}; the attention ops use the slow PyTorch reference")
