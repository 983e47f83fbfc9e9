"""Marks for tests that need a C++ compiler, a CUDA device or NVRTC.

``needs_cuda`` is the ``cuda`` marker of pytest.ini: ``tests/conftest.py`` skips the tests it marks
where ``torch.cuda.is_available()`` is false, and ``pytest -m cuda`` selects them on a GPU machine.
"""

import pytest

from san_det.layers.kernel_runtime import cpu_compiler_available


def nvrtc_available() -> bool:
    """Whether ``cuda.bindings.nvrtc`` (CUDA's runtime compiler, no GPU needed) imports."""
    try:
        from cuda.bindings import nvrtc  # noqa: F401
    except ImportError:
        return False
    return True


needs_cxx = pytest.mark.skipif(not cpu_compiler_available(), reason="no C++ compiler")
needs_cuda = pytest.mark.cuda
needs_nvrtc = pytest.mark.skipif(not nvrtc_available(), reason="cuda.bindings.nvrtc not installed")
