"""Which implementation runs an attention op: ``reference``, ``cpu`` or ``cuda``.

By default the choice follows the tensors' device: CUDA tensors use the CuPy kernels, CPU tensors
use the compiled CPU kernels (or the reference when no C++ compiler is available). A backend can be
forced for tests and benchmarks, globally with the environment variable ``SAN_DET_BACKEND`` or
locally with the context manager::

    with use_backend("reference"):
        y = local_attention(q, k, v, rel, num_heads=8, kernel_size=7)

Forcing a backend that cannot run on the tensors' device raises instead of silently falling back.
"""

import contextlib
import os
import threading
from typing import Iterator, Optional

import torch

__all__ = ["BACKENDS", "use_backend", "forced_backend", "select_backend"]

BACKENDS = ("reference", "cpu", "cuda")
_state = threading.local()


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


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


def select_backend(tensor: torch.Tensor) -> str:
    """The backend to use for an op whose inputs live where ``tensor`` lives."""
    from .kernel_runtime import cpu_compiler_available

    name = forced_backend()
    on_cuda = tensor.is_cuda
    if name is None:
        if on_cuda:
            return "cuda"
        return "cpu" if cpu_compiler_available() else "reference"
    if name == "cuda" and not on_cuda:
        raise RuntimeError("backend 'cuda' was forced but the inputs are not CUDA tensors")
    if name == "cpu" and on_cuda:
        raise RuntimeError("backend 'cpu' was forced but the inputs are CUDA tensors")
    return name
