"""Launch overrides for the kernel tests: tiny grids, odd CPU tiles, OpenMP thread counts."""

import contextlib
from typing import Iterator, Optional

import torch

from san_det.layers.launcher import LaunchOverride, set_launch_override

__all__ = ["launch_config", "torch_threads"]


@contextlib.contextmanager
def launch_config(
    grid: Optional[int] = None,
    block: Optional[int] = None,
    cpu_pixels_per_thread: Optional[int] = None,
    cpu_channels_per_thread: Optional[int] = None,
    cpu_taps_at_once: Optional[int] = None,
    cpu_rows_per_thread: Optional[int] = None,
) -> Iterator[None]:
    """Launch the kernels bound inside this block with this grid, block and CPU tile (see
    :class:`~san_det.layers.launcher.LaunchOverride`), in every thread (a CUDA backward runs in
    autograd's thread)."""
    tile = (cpu_pixels_per_thread, cpu_channels_per_thread, cpu_taps_at_once, cpu_rows_per_thread)
    if all(t is None for t in tile):
        tile = None
    previous = set_launch_override(LaunchOverride(grid, block, tile))
    try:
        yield
    finally:
        set_launch_override(previous)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run this block with ``torch.set_num_threads(threads)`` (the CPU kernels' OpenMP threads
    too), restoring the previous count after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
