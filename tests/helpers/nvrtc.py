"""Compile a kernel file for a GPU architecture without a GPU, as the runtime would.

The runtime (``KernelSource.cuda``) hands ``cupy.RawModule`` the source of
``KernelSource.cuda_source`` and ``kernel_runtime.cuda_options()``; CuPy then adds its own options
(``-ftz=true``, ``-arch=sm_XX`` of the device, ``--device-as-default-execution-space``) and
compiles with NVRTC. CuPy's compile functions ask the device for its architecture first, so
:func:`nvrtc_compile` assembles the same options itself and compiles with CuPy's NVRTC program
class, which needs no device. Without CuPy it compiles through ``cuda.bindings.nvrtc`` with the
same options.
"""

import io
import re
from typing import Dict, List, Sequence, Tuple

import torch

from san_det.layers.kernel_runtime import (
    DTYPE_NAMES,
    KernelCompileError,
    KernelSource,
    cuda_options,
)

__all__ = ["compile_kernel_file", "cupy_options", "kernel_resources", "nvrtc_compile"]


def cupy_options(arch: str) -> Tuple[str, ...]:
    """The NVRTC options the runtime's ``cupy.RawModule`` compiles with on an ``arch`` device:
    what CuPy 14 adds to the caller's options (cupy/cuda/compiler.py: ``_compile_with_cache_cuda``
    adds ``-ftz=true``, ``_compile_using_nvrtc_no_warning`` the architecture and
    ``--device-as-default-execution-space``)."""
    return cuda_options() + ("-ftz=true", f"-arch={arch}", "--device-as-default-execution-space")


def nvrtc_compile(
    source: KernelSource, dtype: torch.dtype, arch: str = "sm_90", extra_options=(), log=None
) -> bytes:
    """The cubin of ``source`` for ``dtype`` and ``arch`` (e.g. ``"sm_90"``), every kernel looked
    up by name as the runtime does; NVRTC's log is written to ``log`` (a text stream) if given.

    Raises:
        KernelCompileError: with NVRTC's log.
    """
    code = source.cuda_source(DTYPE_NAMES[dtype])
    options = cupy_options(arch) + tuple(extra_options)
    try:
        from cupy.cuda import compiler
    except ImportError:
        return _compile_with_cuda_bindings(code, source.path.name, options, log)
    program = compiler._NVRTCProgram(
        code, source.path.name, (), (), name_expressions=tuple(source.kernels), method="cubin"
    )
    try:
        cubin, mapping = program.compile(options, log)
    except compiler.CompileException as error:
        raise KernelCompileError(f"NVRTC failed on {source.path.name} ({dtype}, {arch}):\n{error}")
    assert set(mapping) == set(source.kernels), mapping
    return cubin


def compile_kernel_file(
    filename: str, kernels: Sequence[str], dtypes: Sequence[torch.dtype], arch: str
) -> Tuple[KernelSource, List[bytes]]:
    """The source of ``filename``, checked to define exactly ``kernels``, and its cubin for each
    of ``dtypes`` (checked to be more than 1000 bytes)."""
    source = KernelSource(filename)
    assert set(source.kernels) == set(kernels)
    cubins = [nvrtc_compile(source, dtype, arch) for dtype in dtypes]
    assert all(len(cubin) > 1000 for cubin in cubins)
    return source, cubins


def kernel_resources(source: KernelSource, dtype: torch.dtype, arch: str) -> Dict[str, Tuple]:
    """``{kernel: (registers per thread, spilled bytes)}`` as ptxas reports them."""
    log = io.StringIO()
    nvrtc_compile(source, dtype, arch, ("--ptxas-options=-v",), log)
    usage, kernel = {}, None
    for line in log.getvalue().splitlines():
        entry = re.search(r"Compiling entry function '_Z\d+(\w+?)P", line)
        if entry:
            kernel = next(k for k in source.kernels if entry.group(1).startswith(k))
            usage[kernel] = [None, 0]
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills and kernel:
            usage[kernel][1] = int(spills.group(1)) + int(spills.group(2))
        registers = re.search(r"Used (\d+) registers", line)
        if registers and kernel:
            usage[kernel][0] = int(registers.group(1))
    if not usage:
        raise KernelCompileError(f"no ptxas report for {source.path.name}:\n{log.getvalue()}")
    return {name: tuple(value) for name, value in usage.items()}


def _compile_with_cuda_bindings(code: str, name: str, options, log=None) -> bytes:
    """Without CuPy: the same compile through ``cuda.bindings.nvrtc``; NVRTC's log (ptxas's
    report with ``--ptxas-options=-v``) is written to ``log`` as CuPy's compiler does."""
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(code.encode(), name.encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    try:
        encoded = [o.encode() for o in options]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        program_log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, program_log)
        program_log = program_log.rstrip(b"\0 ").decode(errors="replace")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(f"NVRTC failed on {name}:\n{program_log}")
        if log is not None:
            log.write(program_log)
        _, size = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
