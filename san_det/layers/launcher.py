"""How san_det's kernels are launched: tiles, grid sizes and the test override, in one place.

A kernel of ``kernels/*.cu`` is a grid-stride loop over ``threads`` work items (see
:mod:`.kernel_runtime`). :class:`KernelLauncher` compiles a kernel file on demand per backend,
dtype, device and tile and sizes the grid:

- ``cuda``: blocks of :data:`~.kernel_runtime.DEFAULT_THREADS`, at most :data:`MAX_CUDA_BLOCKS`
  blocks (the threads then go round their loops);
- ``cpu``: blocks of :data:`CPU_BLOCK` emulated threads (OpenMP hands whole blocks to its
  threads); every kernel works on a tile (a SIMD register of pixels), so one emulated thread does
  enough work to pay for its call.

Tiles: the kernels take the compile-time macros ``SAN_TJ`` (pixels of a row per thread, held in
the lanes of one ``san_vec``, see ``kernels/san_lanes.h``), ``SAN_CG`` (channels per thread),
``SAN_UT`` (taps summed at once) and ``SAN_UR`` (image rows per thread, SASA's forward and logit
backward). :data:`TILES` says which tile every kernel is compiled and
launched with on the GPU and on each CPU instruction-set level (:func:`~.kernel_runtime.cpu_isa`),
and :data:`KERNEL_TILES` the kernels that differ from it (a new kernel needs no entry); a CPU
tile's ``pixels`` is :data:`REGISTER`, one SIMD register of the level and dtype, so loads at the
borders are single masked instructions. On the CPU every distinct (level, tile) is its own build
of the file (cached like any other flags), so kernels of one file may use different tiles. The
CUDA build uses the ``.cu`` defaults, which is what CI compiles with NVRTC.

Tests change the launch (grid, block, CPU tile) through :func:`set_launch_override`, a process-wide
setting read when a kernel is bound (``tests/helpers/launch.py`` wraps it in a context manager).
"""

import threading
from itertools import zip_longest
from typing import Dict, NamedTuple, Optional

import torch

from .kernel_runtime import CPU_ISAS, DEFAULT_THREADS, KernelSource, cpu_isa

__all__ = [
    "CPU_BLOCK",
    "CPU_REGISTER_BYTES",
    "KERNEL_TILES",
    "MAX_CUDA_BLOCKS",
    "REGISTER",
    "TILES",
    "KernelLauncher",
    "LaunchOverride",
    "Tile",
    "default_tile",
    "set_launch_override",
]

CPU_BLOCK = 16  # emulated threads per block: one OpenMP task runs a block's threads in order
MAX_CUDA_BLOCKS = 1 << 16


REGISTER = 0  # Tile.pixels of a CPU tile: one SIMD register of pixels
CPU_REGISTER_BYTES = {"portable": 16, "avx2": 32, "avx512": 64}


class Tile(NamedTuple):
    """Work per thread: ``pixels`` of an image row, ``channels`` of a head (SASA) or sharing a
    weight channel (SAN aggregation), ``taps`` of a window column summed at once (SASA), ``rows``
    of the same columns, ``dilation`` apart, whose windows share neighbour rows (SASA's forward
    and logit backward; other kernels ignore it)."""

    pixels: int = 1
    channels: int = 1
    taps: int = 1
    rows: int = 1

    def flags(self):
        return (
            f"-DSAN_TJ={self.pixels}", f"-DSAN_CG={self.channels}", f"-DSAN_UT={self.taps}",
            f"-DSAN_UR={self.rows}",
        )  # fmt: skip


# CUDA or CPU level -> the tile of its kernels. AVX-512's 32 vector registers hold 8 channels'
# sums, AVX2's and SSE2's 16 hold 4. SASA's forward and logit backward take 3 rows per thread on
# AVX-512; with 16 registers 2 rows were slower than 1 (docs/SASA_CPU_PROFILE.md); 1 on the GPU
# (not measured there; 2 rows spill in the half-precision build).
TILES: Dict[str, Tile] = {
    "cuda": Tile(1, 4, 4, 1),
    "avx512": Tile(REGISTER, 8, 4, 3),
    "avx2": Tile(REGISTER, 4, 4, 1),
    "portable": Tile(REGISTER, 4, 4, 1),
}
# CUDA or CPU level -> kernel -> its tile, where it differs from TILES. sasa_rel_backward holds
# channels * taps sums: 4 x 6 of AVX-512's 32 registers (A/B against 8 x 2: 0.85 at N2 C64 56x56,
# 0.78 at N2 C256 28x28), 4 x 2 of the 16 of AVX2 and SSE2.
KERNEL_TILES: Dict[str, Dict[str, Tile]] = {target: {} for target in TILES}
KERNEL_TILES["avx512"]["sasa_rel_backward"] = Tile(REGISTER, 4, 6, 3)
KERNEL_TILES["avx2"]["sasa_rel_backward"] = Tile(REGISTER, 4, 2, 1)
KERNEL_TILES["portable"]["sasa_rel_backward"] = Tile(REGISTER, 4, 2, 1)
# sasa_forward on AVX-512: the 7 taps of a window column at once, 3 rows x 7 sums (A/B against 4
# taps: 0.91 / 0.97 at N2 C64 56x56 / N2 C256 28x28; the logit backward was not faster).
KERNEL_TILES["avx512"]["sasa_forward"] = Tile(REGISTER, 8, 7, 3)
assert set(CPU_ISAS) <= set(TILES)


def default_tile(target: str, kernel: str, dtype: torch.dtype) -> Tile:
    """The tile ``kernel`` is built with for ``target`` ("cuda" or a CPU level of
    :data:`~.kernel_runtime.CPU_ISAS`) and ``dtype``."""
    tile = KERNEL_TILES[target].get(kernel, TILES[target])
    if tile.pixels == REGISTER:
        itemsize = torch.empty((), dtype=dtype).element_size()
        tile = tile._replace(pixels=CPU_REGISTER_BYTES[target] // itemsize)
    return tile


class LaunchOverride(NamedTuple):
    """How :func:`set_launch_override` changes every launch (``None``: the kernel's own).

    Attributes:
        grid, block: launch every kernel with this grid and block size; a grid much smaller
            than the work makes each thread go round its grid-stride loop.
        tile: ``(pixels, channels, taps)`` or ``(pixels, channels, taps, rows)``, the ``SAN_TJ``
            (1 or a power of two up to 32), ``SAN_CG``, ``SAN_UT`` and ``SAN_UR`` every CPU
            kernel is compiled with (``(1, 4, 4, 1)`` runs the CUDA build's code path on the
            CPU); an entry ``None``, or one left out, keeps that kernel's own.
    """

    grid: Optional[int] = None
    block: Optional[int] = None
    tile: Optional[tuple] = None


_override = LaunchOverride()


def set_launch_override(override: LaunchOverride) -> LaunchOverride:
    """Launch every kernel bound from now on as ``override`` says, in every thread; returns the
    previous override (``LaunchOverride()`` launches normally). For tests."""
    global _override
    previous, _override = _override, override
    return previous


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
        if backend not in ("cpu", "cuda"):
            raise ValueError(f"kernels run on 'cpu' or 'cuda', not {backend!r}")
        return BoundLauncher(self, backend, dtype, device, _override)


class BoundLauncher:
    """A :class:`KernelLauncher` for one (backend, dtype, device): ``run(kernel, threads, *args)``."""

    def __init__(self, launcher, backend, dtype, device, override: LaunchOverride):
        self._launcher = launcher
        self.backend, self.dtype, self.device = backend, dtype, device
        self._override = override
        self.isa = cpu_isa() if backend == "cpu" else None

    def tile(self, kernel: str) -> Tile:
        """The tile ``kernel`` is compiled with."""
        tile = default_tile(self.isa or "cuda", kernel, self.dtype)
        if self.backend == "cpu" and self._override.tile is not None:
            tile = Tile(*(o or t for o, t in zip_longest(self._override.tile, tile)))
        return tile

    def _module(self, kernel: str):
        source = self._launcher.source
        if self.backend == "cuda":
            return source.cuda(self.dtype, self.device)
        return source.cpu(self.dtype, self.tile(kernel).flags(), self.isa)

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
        else:
            block = CPU_BLOCK
            grid = -(-threads // block)
        getattr(self._module(kernel), kernel)(grid, block, *args)
