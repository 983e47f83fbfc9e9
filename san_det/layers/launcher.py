"""How san_det's kernels are launched: tiles, grid sizes and the test override, in one place.

A kernel of ``kernels/*.cu`` is a grid-stride loop over ``threads`` work items (see
:mod:`.kernel_runtime`). :class:`KernelLauncher` compiles a kernel file on demand per backend,
dtype, device and tile and sizes the grid:

- ``cuda``: blocks of :data:`~.kernel_runtime.DEFAULT_THREADS`, at most :data:`MAX_CUDA_BLOCKS`
  blocks (the threads then go round their loops);
- ``cpu``: the tiled kernels in blocks of :data:`CPU_BLOCK` emulated threads (OpenMP hands whole
  blocks to its threads); the untiled ones (one small output per work item, SAN's) with one
  emulated thread per OpenMP thread, each going round its grid-stride loop, since every emulated
  thread costs a call and its thread-local indices (7-15% of SAN's kernel time at 16 a block).

Tiles: kernels that work on image rows take the compile-time macros ``SAN_TJ`` (pixels of a row
per thread) and ``SAN_CG`` (channels of a head per thread). :data:`TILES` says which tile each
kernel is compiled and launched with on each backend; on the CPU every distinct tile is its own
build of the file (cached like any other flags), so kernels of one file may use different tiles.
The CUDA build uses the ``.cu`` defaults, which is what CI compiles with NVRTC.
"""

import contextlib
import threading
from typing import Dict, Iterator, NamedTuple, Optional

import torch

from .kernel_runtime import DEFAULT_THREADS, KernelSource

__all__ = ["CPU_BLOCK", "MAX_CUDA_BLOCKS", "TILES", "KernelLauncher", "Tile", "launch_config"]

CPU_BLOCK = 16  # emulated threads per block: one OpenMP task runs a block's threads in order
MAX_CUDA_BLOCKS = 1 << 16


class Tile(NamedTuple):
    """Work per thread of the row kernels: ``pixels`` of an image row, ``channels`` of a head."""

    pixels: int = 1
    channels: int = 1

    def flags(self):
        return (f"-DSAN_TJ={self.pixels}", f"-DSAN_CG={self.channels}")


_SASA_KERNELS = (
    "sasa_attention_forward",
    "sasa_output_forward",
    "sasa_logit_backward",
    "sasa_qkv_backward",
)
# backend -> kernel -> tile; kernels not listed take no tile macros.
TILES: Dict[str, Dict[str, Tile]] = {
    "cuda": {name: Tile(1, 4) for name in _SASA_KERNELS},
    "cpu": {name: Tile(8, 1) for name in _SASA_KERNELS},
}


class _Override(NamedTuple):
    grid: Optional[int] = None
    block: Optional[int] = None
    tile: Optional[Tile] = None


_override = threading.local()


@contextlib.contextmanager
def launch_config(
    grid: Optional[int] = None,
    block: Optional[int] = None,
    cpu_pixels_per_thread: Optional[int] = None,
    cpu_channels_per_thread: Optional[int] = None,
) -> Iterator[None]:
    """Override how the kernels are launched inside this block (for tests).

    Args:
        grid, block: launch every kernel with this grid and block size; a grid much smaller than
            the work makes each thread go round its grid-stride loop.
        cpu_pixels_per_thread, cpu_channels_per_thread: the ``SAN_TJ`` / ``SAN_CG`` tile every
            tiled CPU kernel is compiled with (``1, 4`` runs the CUDA build's code path on the
            CPU); a value left ``None`` keeps that kernel's own.
    """
    tile = None
    if cpu_pixels_per_thread is not None or cpu_channels_per_thread is not None:
        tile = (cpu_pixels_per_thread, cpu_channels_per_thread)
    previous = current_override()
    _override.value = _Override(grid, block, tile)
    try:
        yield
    finally:
        _override.value = previous


def current_override() -> _Override:
    """The launch override in force in this thread (all ``None`` without one)."""
    return getattr(_override, "value", _Override())


@contextlib.contextmanager
def restored_override(saved: _Override) -> Iterator[None]:
    """Reinstate an override captured with :func:`current_override` (e.g. for a backward pass
    that autograd runs in another thread)."""
    previous = current_override()
    _override.value = saved
    try:
        yield
    finally:
        _override.value = previous


class KernelLauncher:
    """The kernels of one ``.cu`` file, launched on a backend ("cpu" or "cuda")."""

    def __init__(self, filename: str):
        self.filename = filename
        self._source: Optional[KernelSource] = None
        self._lock = threading.Lock()

    @property
    def source(self) -> KernelSource:
        with self._lock:
            if self._source is None:
                self._source = KernelSource(self.filename)
            return self._source

    def bind(self, backend: str, dtype: torch.dtype, device: torch.device) -> "BoundLauncher":
        """Launch this file's kernels for storage ``dtype`` on ``device``."""
        if backend not in TILES:
            raise ValueError(f"kernels run on 'cpu' or 'cuda', not {backend!r}")
        return BoundLauncher(self, backend, dtype, device, current_override())


class BoundLauncher:
    """A :class:`KernelLauncher` for one (backend, dtype, device): ``run(kernel, threads, *args)``."""

    def __init__(self, launcher, backend, dtype, device, override: _Override):
        self._launcher = launcher
        self.backend, self.dtype, self.device = backend, dtype, device
        self._override = override

    def tile(self, kernel: str) -> Tile:
        """The tile ``kernel`` is compiled with (``Tile(1, 1)`` for an untiled kernel)."""
        tile = TILES[self.backend].get(kernel)
        if tile is None:
            return Tile()
        if self.backend == "cpu" and self._override.tile is not None:
            pixels, channels = self._override.tile
            tile = Tile(pixels or tile.pixels, channels or tile.channels)
        return tile

    def _module(self, kernel: str):
        source = self._launcher.source
        if self.backend == "cuda":
            return source.cuda(self.dtype, self.device)
        flags = self.tile(kernel).flags() if kernel in TILES["cpu"] else ()
        return source.cpu(self.dtype, flags)

    def __call__(self, kernel: str, threads: int, *args) -> None:
        """Run ``kernel`` with at least ``threads`` work items in its grid-stride loop."""
        if threads == 0:
            return
        override = self._override
        if override.grid is not None or override.block is not None:
            block = override.block or 1
            grid = override.grid or -(-threads // block)
        elif self.backend == "cuda":
            block = DEFAULT_THREADS
            grid = min(-(-threads // block), MAX_CUDA_BLOCKS)
        elif kernel in TILES["cpu"]:
            block = CPU_BLOCK
            grid = -(-threads // block)
        else:
            block, grid = 1, min(max(1, torch.get_num_threads()), threads)
        getattr(self._module(kernel), kernel)(grid, block, *args)
