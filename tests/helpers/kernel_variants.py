"""The compiled CPU variants the kernel tests cover: every instruction-set level of
``kernel_runtime.CPU_ISAS`` with its default tile, and odd tiles on the portable level.

A level this host cannot execute (e.g. AVX-512 on a CPU without it) is still compiled by
:func:`compile_or_skip`, which then skips with the reason, so the same tests pass on Intel and AMD
hosts with and without AVX-512 and report what they could not run.
"""

import platform

import pytest
import torch

from san_det.layers.kernel_runtime import CPU_ISAS, KernelSource, supported_cpu_isas
from san_det.layers.launcher import default_tile

from .launch import launch_config

__all__ = ["CPU_VARIANTS", "compile_or_skip", "variant_id"]

# (isa, tile override or None). Odd tiles: (1, 4, 4) has the CUDA build's scalar lanes (with the
# level's rows per thread, which only SASA's kernels read); (2, 3, 2) and (4, 1, 3) have row
# widths, head widths and window heights that are not multiples of the tile. A fourth entry
# overrides the rows per thread (see tests/layers/test_local_attention.py).
CPU_VARIANTS = [(isa, None) for isa in CPU_ISAS] + [
    ("portable", (1, 4, 4)),
    ("portable", (2, 3, 2)),
    ("portable", (4, 1, 3)),
]


def variant_id(variant) -> str:
    isa, tile = variant
    if tile is None:
        return isa
    return "{}-TJ{}CG{}UT{}".format(isa, *tile) + ("UR{}".format(tile[3]) if len(tile) > 3 else "")


def compile_or_skip(monkeypatch, variant, filename: str, dtypes=(torch.float32, torch.float64)):
    """Force ``variant`` (``SAN_DET_CPU_ISA`` and a :func:`launch_config` tile) for the rest of
    the test and return the context manager of its tile; where the host cannot execute the
    level, compile ``filename`` for it in ``dtypes`` (with its default tiles) and skip."""
    isa, tile = variant
    if isa != "portable" and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"{isa} is an x86 level; this host is {platform.machine()}")
    if isa not in supported_cpu_isas():
        source = KernelSource(filename)
        for dtype in dtypes:
            for flags in {default_tile(isa, name, dtype).flags() for name in source.kernels}:
                assert source.build_cpu(dtype, flags, isa).exists()
        pytest.skip(f"compiled {filename} for {isa}, but this CPU cannot run {isa} code")
    monkeypatch.setenv("SAN_DET_CPU_ISA", isa)
    return launch_config(*(None, None, *tile) if tile else ())
