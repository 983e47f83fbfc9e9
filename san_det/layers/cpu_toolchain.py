"""The C++ toolchain of the compiled CPU kernels: the compiler, its base flags and the
instruction-set levels they are built for.

The levels (:data:`CPU_ISAS`) are explicit feature sets, not ``-march=native``, so a cached
library is valid on every host of its level (Intel or AMD); :func:`cpu_isa` picks the best level
this host runs unless ``SAN_DET_CPU_ISA`` names another.
"""

import functools
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Tuple

__all__ = [
    "CPU_BASE_FLAGS",
    "CPU_ISAS",
    "ISA_FLAGS",
    "cpu_compiler",
    "cpu_compiler_available",
    "cpu_isa",
    "supported_cpu_isas",
]

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
