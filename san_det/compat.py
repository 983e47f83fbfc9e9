"""Run detectron2 0.6 as published on PyPI (``pb1-detectron2``) on today's Python stack.

That package's Python sources equal upstream detectron2 v0.6, but its sdist has no C++ sources, so
it installs without ``detectron2._C``, and v0.6 predates current Pillow, numpy and setuptools.
:func:`apply` patches exactly those gaps, before detectron2 is imported:

- ``detectron2._C``: a stand-in module. What detection with RetinaNet needs imports and runs; the
  ops that really need the extension (deformable conv, rotated boxes, the fast COCO evaluator)
  raise :class:`ExtensionUnavailableError` naming the op when used. ``collect_env_info`` (called by
  ``default_setup``) gets the version queries it asks for.
- Pillow >= 10 removed ``Image.LINEAR`` / ``Image.CUBIC`` / ``Image.ANTIALIAS`` (v0.6 uses
  ``Image.LINEAR`` as a default argument at import time): aliased to the current names.
- numpy >= 1.24 removed ``np.int``, ``np.float``, ``np.bool``, ``np.str``, ``np.object`` (used by
  v0.6's data loader, masks and evaluators): re-added as the builtins they always were.
- torch warns that ``torch.jit.script`` (used by v0.6 at import) is deprecated: that warning is
  silenced.
- setuptools >= 81 removed ``pkg_resources`` (imported by ``detectron2.model_zoo``): a minimal
  stand-in providing ``resource_filename``.

Where a full upstream detectron2 is installed (its compiled ``_C`` exists), :func:`apply` changes
nothing. ``san_det`` calls it on import, so ``import san_det`` before ``import detectron2``.
"""

import importlib.util
import logging
import os
import sys
import types
import warnings

__all__ = ["apply", "DETECTRON2_INSTALLED", "HAS_DETECTRON2_EXTENSION", "ExtensionUnavailableError", "is_applied"]

logger = logging.getLogger(__name__)

_NUMPY_ALIASES = {"int": int, "float": float, "bool": bool, "str": str, "object": object}
_applied = False


class ExtensionUnavailableError(AttributeError):
    """An op of detectron2's C++/CUDA extension was used, but the extension is not built."""


def _has_extension() -> bool:
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except (ImportError, ValueError):
        return False


def _detectron2_installed() -> bool:
    return importlib.util.find_spec("detectron2") is not None


DETECTRON2_INSTALLED = _detectron2_installed()
HAS_DETECTRON2_EXTENSION = DETECTRON2_INSTALLED and _has_extension()


class _MissingExtension(types.ModuleType):
    """Stand-in for ``detectron2._C``: version queries answer, every op raises a clear error."""

    _ANSWERS = {
        "get_compiler_version": lambda: "not built (detectron2 installed without its C++ extension)",
        "get_cuda_version": lambda: "not built",
        "has_cuda": lambda: False,
    }

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self._ANSWERS:
            return self._ANSWERS[name]
        raise ExtensionUnavailableError(
            f"detectron2._C.{name} is unavailable: this detectron2 was installed without its C++/CUDA "
            "extension (PyPI's pb1-detectron2 sdist ships no C++ sources). Deformable convolution, "
            "rotated boxes and the fast COCO evaluator need it; install upstream detectron2 from its "
            "git repository to use them (see the README)."
        )


def _install_missing_extension() -> None:
    import detectron2  # the package __init__ only sets up the environment

    stub = _MissingExtension("detectron2._C", __doc__)
    stub.__file__ = None
    sys.modules["detectron2._C"] = stub
    detectron2._C = stub


def _patch_pillow() -> None:
    from PIL import Image

    replacements = {"LINEAR": "BILINEAR", "CUBIC": "BICUBIC", "ANTIALIAS": "LANCZOS"}
    for old, new in replacements.items():
        if not hasattr(Image, old):
            setattr(Image, old, getattr(Image, new))


def _patch_numpy() -> None:
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns about np.str/np.object while probing
        for name, value in _NUMPY_ALIASES.items():
            try:
                getattr(np, name)
            except AttributeError:
                setattr(np, name, value)


def _patch_pkg_resources() -> None:
    try:
        import pkg_resources  # noqa: F401

        return
    except ImportError:
        pass
    module = types.ModuleType("pkg_resources", "san_det stand-in: resource_filename only")

    def resource_filename(package: str, resource: str) -> str:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"cannot locate package {package!r}")
        return os.path.join(list(spec.submodule_search_locations)[0], resource)

    module.resource_filename = resource_filename
    sys.modules["pkg_resources"] = module


def is_applied() -> bool:
    """Whether :func:`apply` patched anything in this process."""
    return _applied


def apply() -> bool:
    """Patch the gaps listed in the module docstring; returns whether anything was patched.

    Idempotent, and a no-op when detectron2 is missing or is a full build with its extension.
    """
    global _applied
    if _applied or not DETECTRON2_INSTALLED or HAS_DETECTRON2_EXTENSION:
        return _applied
    if "detectron2.layers" in sys.modules:
        raise RuntimeError(
            "detectron2 was imported before san_det: import san_det first so that "
            "san_det.compat can patch detectron2 0.6 for the missing C++ extension"
        )
    # detectron2 0.6 scripts a few functions at import; torch 2.14 warns on each one.
    warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
    _patch_pillow()
    _patch_numpy()
    _patch_pkg_resources()
    _install_missing_extension()
    _applied = True
    logger.debug("san_det.compat: patched detectron2 0.6 (no C++ extension) for this stack")
    return True
