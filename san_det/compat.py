"""Run detectron2 0.6 as published on PyPI (``pb1-detectron2``) on today's Python stack.

That package's Python sources equal upstream detectron2 v0.6, but its sdist has no C++ sources (no
``detectron2._C``), and v0.6 predates current Python, torch, Pillow, numpy and setuptools. This
module patches exactly those gaps, and nothing where a full upstream detectron2 (with ``_C``) is
installed, except ``pkg_resources`` and ``torch.jit.script``'s warning (upstream main has both
too). It is also the one place where san_det assigns into detectron2's modules.

When ``detectron2`` is imported (before its submodules load):

- ``detectron2._C``: a stand-in. What detection with RetinaNet needs imports and runs; the ops that
  need the extension (deformable conv, rotated boxes), and the ``torch.ops`` op
  ``detectron2::nms_rotated``, raise :class:`ExtensionUnavailableError` naming the op when used.
  ``collect_env_info`` (called by ``default_setup``) gets the version queries it asks for.
- Pillow >= 10 removed ``Image.LINEAR`` / ``CUBIC`` / ``ANTIALIAS`` (v0.6 uses ``Image.LINEAR`` as
  a default argument at import time), numpy >= 1.24 ``np.int``, ``np.float``, ``np.bool``,
  ``np.str``, ``np.object`` (v0.6's data loader, masks, evaluators): aliased to what they were.
- torch's warning that ``torch.jit.script`` (detectron2 uses it at import) is deprecated: silenced.
- setuptools >= 81 removed ``pkg_resources`` (imported by ``detectron2.model_zoo``, also upstream
  main's): a minimal stand-in providing ``resource_filename``, whichever detectron2 is installed.

When the module concerned is imported:

- ``detectron2.export.api`` imports ``caffe2``, which PyTorch no longer ships (breaking
  ``detectron2.export``, ``detectron2.utils.analysis`` and the TorchScript helpers): without caffe2
  a stand-in whose Caffe2 exporters raise :class:`Caffe2UnavailableError`.
- ``detectron2.data.common.MapDataset`` retries a skipped sample with ``random.sample(<set>, k=1)``,
  a TypeError since Python 3.11: it samples from the set as a list (as upstream now does).
- ``detectron2.engine.hooks.LRScheduler`` saves and restores only schedulers derived from
  ``torch.optim.lr_scheduler._LRScheduler``, which torch's own no longer are: it accepts any
  ``torch.optim.lr_scheduler.LRScheduler``.
- ``detectron2.evaluation``'s fast COCO evaluator (``COCOeval_opt``) needs ``_C``:
  faster-coco-eval's ``COCOeval_faster`` for boxes and masks (same numbers, C++), pycocotools'
  ``COCOeval`` for keypoints and where faster-coco-eval is missing (:func:`coco_eval_backend`).
- ``detectron2.model_zoo.get_config`` / ``get_config_file``: v0.6 from PyPI packages no model-zoo
  configs; they say so (:class:`ModelZooConfigsUnavailableError`), not "not available in Model Zoo".

How, whichever of detectron2 and san_det is imported first: :func:`install_import_hook` puts a
finder on ``sys.meta_path`` that runs each patch right after its module executes;
``san_det_compat.pth`` calls it at interpreter start (through ``_san_det_compat_hook``, which
loads this file alone, hence only standard-library imports at module level), and ``import
san_det`` calls :func:`apply`, which installs it too and patches modules already imported.
"""

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import random
import sys
import types
import warnings

__all__ = [
    "DETECTRON2_INSTALLED",
    "HAS_DETECTRON2_EXTENSION",
    "Caffe2UnavailableError",
    "ExtensionUnavailableError",
    "ModelZooConfigsUnavailableError",
    "apply",
    "coco_eval_backend",
    "install_import_hook",
    "is_applied",
    "set_local_process_group",
]

logger = logging.getLogger(__name__)

_PILLOW_ALIASES = {"LINEAR": "BILINEAR", "CUBIC": "BICUBIC", "ANTIALIAS": "LANCZOS"}
_NUMPY_ALIASES = {"int": int, "float": float, "bool": bool, "str": str, "object": object}
_INSTALL_HINT = "install upstream detectron2 from its git repository to use them (see the README)"


class ExtensionUnavailableError(AttributeError):
    """An op of detectron2's C++/CUDA extension was used, but the extension is not built."""


class Caffe2UnavailableError(ImportError):
    """detectron2's Caffe2 export was used, but caffe2 is not installed (PyTorch >= 1.10 has none)."""


class ModelZooConfigsUnavailableError(RuntimeError):
    """detectron2's model-zoo configs were asked for, but this detectron2 does not package them."""


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _detectron2_spec():
    """detectron2's spec, found without importing it (its ``__init__`` imports torch)."""
    module = sys.modules.get("detectron2")
    return module.__spec__ if module is not None else _find_spec("detectron2")


def _has_extension(spec) -> bool:
    paths = list(spec.submodule_search_locations or ()) if spec is not None else []
    return bool(paths and importlib.machinery.PathFinder.find_spec("detectron2._C", paths))


DETECTRON2_INSTALLED = _detectron2_spec() is not None
HAS_DETECTRON2_EXTENSION = _has_extension(_detectron2_spec())
_SHIM = DETECTRON2_INSTALLED and not HAS_DETECTRON2_EXTENSION
_patched = set()  # names of the modules patched in this process


# --------------------------------------------------------------- detectron2 package, on import
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
            "rotated boxes and detectron2's own fast COCO evaluator need it (COCO evaluation uses "
            f"{coco_eval_backend()} instead); {_INSTALL_HINT}."
        )


def _install_missing_extension(detectron2) -> None:
    if "detectron2._C" in sys.modules:  # someone else provided one
        return
    stub = _MissingExtension("detectron2._C", _MissingExtension.__doc__)
    stub.__file__ = None
    sys.modules["detectron2._C"] = stub
    detectron2._C = stub


_torch_op_library = None  # keeps the torch.library registration alive


def _register_missing_torch_ops() -> None:
    """``torch.ops.detectron2.nms_rotated`` (registered by ``_C``) raises the stand-in's error."""
    global _torch_op_library
    import torch

    if _torch_op_library is not None or hasattr(torch.ops.detectron2, "nms_rotated"):
        return
    library = torch.library.Library("detectron2", "DEF")
    library.define("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor")

    def nms_rotated(boxes, scores, iou_threshold):
        raise ExtensionUnavailableError(
            "torch.ops.detectron2.nms_rotated is unavailable: this detectron2 was installed without "
            f"its C++/CUDA extension, which registers it; rotated boxes need it; {_INSTALL_HINT}."
        )

    library.impl("nms_rotated", nms_rotated, "CompositeExplicitAutograd")
    _torch_op_library = library


def _restore_removed_aliases() -> None:
    import numpy as np
    from PIL import Image

    aliases = [(Image, old, getattr(Image, new)) for old, new in _PILLOW_ALIASES.items()]
    aliases += [(np, name, value) for name, value in _NUMPY_ALIASES.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns about np.str/np.object while probing
        for module, name, value in aliases:
            if not hasattr(module, name):
                setattr(module, name, value)


def _install_pkg_resources_standin() -> None:
    if "pkg_resources" in sys.modules or _find_spec("pkg_resources") is not None:
        return
    module = types.ModuleType("pkg_resources", "san_det stand-in: resource_filename only")

    def resource_filename(package: str, resource: str) -> str:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"cannot locate package {package!r}")
        return os.path.join(list(spec.submodule_search_locations)[0], resource)

    module.resource_filename = resource_filename
    sys.modules["pkg_resources"] = module


def _patch_detectron2(detectron2) -> None:
    _install_pkg_resources_standin()
    # detectron2 scripts a few functions at import; torch 2.14 warns on each one.
    warnings.filterwarnings("ignore", r"`torch.jit.script` is deprecated", FutureWarning)
    if not _SHIM:
        return
    _restore_removed_aliases()
    _install_missing_extension(detectron2)
    _register_missing_torch_ops()
    logger.debug("san_det.compat: patched detectron2 0.6 (no C++ extension) for this stack")


# ----------------------------------------------------------------- detectron2 submodules
class _SampleFromSets(random.Random):
    """``random.Random`` whose ``sample`` also takes a set, as it did before Python 3.11."""

    def sample(self, population, k, **kwargs):
        if isinstance(population, (set, frozenset)):
            population = list(population)  # what upstream detectron2 passes since v0.6
        return super().sample(population, k, **kwargs)


def _patch_data_common(common) -> None:
    init = common.MapDataset.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        rng = _SampleFromSets()
        rng.setstate(self._rng.getstate())
        self._rng = rng

    common.MapDataset.__init__ = __init__


def _patch_engine_hooks(hooks) -> None:
    import torch

    scheduler_base = torch.optim.lr_scheduler.LRScheduler  # torch's schedulers and v0.6's
    hook = hooks.LRScheduler

    def state_dict(self):
        if isinstance(self.scheduler, scheduler_base):
            return self.scheduler.state_dict()
        return {}

    def load_state_dict(self, state_dict):
        if isinstance(self.scheduler, scheduler_base):
            logging.getLogger(hooks.__name__).info("Loading scheduler from state_dict ...")
            self.scheduler.load_state_dict(state_dict)

    hook.state_dict = functools.wraps(hook.state_dict)(state_dict)
    hook.load_state_dict = functools.wraps(hook.load_state_dict)(load_state_dict)


@functools.lru_cache(maxsize=None)
def _fast_coco_eval_class():
    """detectron2's ``COCOeval_opt`` without ``_C``: faster-coco-eval's, else pycocotools'."""
    from pycocotools.cocoeval import COCOeval

    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return COCOeval

    class FasterCOCOeval(COCOeval_faster):
        """faster-coco-eval's ``COCOeval_faster`` (C++ ``evaluate``/``accumulate``, the numbers of
        pycocotools) printing its summary as pycocotools does, for boxes and masks.

        Keypoints get pycocotools' ``COCOeval``: faster-coco-eval chooses their categories from its
        own ``COCO`` class (``cat_img_map``), which detectron2's pycocotools ``COCO`` lacks.
        """

        def __new__(cls, cocoGt=None, cocoDt=None, iouType="segm", **kwargs):
            if iouType not in ("bbox", "segm"):
                return COCOeval(cocoGt, cocoDt, iouType)
            return super().__new__(cls)

        def __init__(self, cocoGt=None, cocoDt=None, iouType="segm", **kwargs):
            kwargs.setdefault("print_function", print)
            super().__init__(cocoGt, cocoDt, iouType, **kwargs)

    return FasterCOCOeval


def coco_eval_backend() -> str:
    """What detectron2's ``COCOEvaluator(use_fast_impl=True)`` runs on: ``"detectron2._C"``,
    ``"faster-coco-eval"`` or (neither available) ``"pycocotools"``."""
    if HAS_DETECTRON2_EXTENSION:
        return "detectron2._C"
    official = _fast_coco_eval_class().__module__.startswith("pycocotools")
    return "pycocotools" if official else "faster-coco-eval"


def _patch_coco_eval_opt(module) -> None:  # fast_eval_api and coco_evaluation (imports it)
    module.COCOeval_opt = _fast_coco_eval_class()


def _patch_model_zoo(model_zoo) -> None:
    configs = os.path.join(os.path.dirname(model_zoo.__file__), "configs")
    if os.path.isdir(configs):
        return

    @functools.wraps(model_zoo.get_config_file)
    def get_config_file(config_path):
        raise ModelZooConfigsUnavailableError(
            f"detectron2's model-zoo config {config_path!r} is unavailable: this detectron2 "
            f"(PyPI's pb1-detectron2) packages no model-zoo configs ({configs} does not exist). "
            f"Use san_det's configs/, or {_INSTALL_HINT}."
        )

    model_zoo.get_config_file = get_config_file  # get_config and get use it too


def _caffe2_export_standin(module) -> None:
    """Fills the stand-in ``detectron2.export.api``: its names raise Caffe2UnavailableError."""

    def unavailable(name):
        def fail(*args, **kwargs):
            raise Caffe2UnavailableError(
                f"detectron2.export.{name} needs caffe2, which is not installed (PyTorch no longer "
                "ships it). TracingAdapter, scripting_with_instances and torch.onnx/torch.export "
                "work without it."
            )

        fail.__name__ = fail.__qualname__ = name
        return fail

    module.__all__ = "add_export_config export_caffe2_model Caffe2Model export_onnx_model".split()
    module.__all__.append("Caffe2Tracer")
    for name in module.__all__:
        setattr(module, name, unavailable(name))


def set_local_process_group(group) -> None:
    """Make ``group`` (this machine's ranks) the group of detectron2's ``comm.get_local_rank()``
    / ``get_local_size()``: v0.6 has no setter, and upstream main's ``create_local_process_group``
    assumes the same number of processes on every machine (torchrun need not)."""
    from detectron2.utils import comm

    if comm._LOCAL_PROCESS_GROUP is not None:
        raise RuntimeError("detectron2's local process group is already set in a fresh worker")
    comm._LOCAL_PROCESS_GROUP = group


# ------------------------------------------------------------------------- import hook
@functools.lru_cache(maxsize=None)
def _patches():
    """{module name: patch(module)} for this installation."""
    if not _SHIM:
        return {"detectron2": _patch_detectron2}  # pkg_resources only
    return {
        "detectron2": _patch_detectron2,
        "detectron2.data.common": _patch_data_common,
        "detectron2.engine.hooks": _patch_engine_hooks,
        "detectron2.evaluation.fast_eval_api": _patch_coco_eval_opt,
        "detectron2.evaluation.coco_evaluation": _patch_coco_eval_opt,
        "detectron2.model_zoo.model_zoo": _patch_model_zoo,
    }


@functools.lru_cache(maxsize=None)
def _standins():
    """{module name: fill(module)}: modules replaced instead of executed."""
    if _SHIM and _find_spec("caffe2") is None:
        return {"detectron2.export.api": _caffe2_export_standin}
    return {}


def _run_patch(name: str, patch, module) -> None:
    if name not in _patched:
        _patched.add(name)
        patch(module)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the patch; the module keeps the real loader."""

    def __init__(self, loader, name: str, patch):
        self._loader, self._name, self._patch = loader, name, patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _run_patch(self._name, self._patch, module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _StandInLoader(importlib.abc.Loader):  # the default create_module: a plain module
    def __init__(self, fill):
        self._fill = fill

    def exec_module(self, module):
        module.__doc__ = "san_det.compat stand-in: " + (self._fill.__doc__ or "")
        self._fill(module)


class _Detectron2ImportHook(importlib.abc.MetaPathFinder):
    """Finds the modules that :func:`_patches` / :func:`_standins` name and patches them."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("detectron2"):
            return None
        fill = _standins().get(fullname)
        if fill is not None:
            return importlib.util.spec_from_loader(fullname, _StandInLoader(fill))
        patch = _patches().get(fullname)
        if patch is None or fullname in _patched:
            return None
        others = (f for f in sys.meta_path if f is not self and hasattr(f, "find_spec"))
        spec = next(filter(None, (f.find_spec(fullname, path, target) for f in others)), None)
        if spec is None:
            return None
        if spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, fullname, patch)
        return spec


def install_import_hook():
    """Patch each detectron2 module this installation needs right after it is imported; returns
    the hook (a ``sys.meta_path`` finder), or None when detectron2 is not installed."""
    if not DETECTRON2_INSTALLED:
        return None
    hook = next((f for f in sys.meta_path if isinstance(f, _Detectron2ImportHook)), None)
    if hook is None:
        hook = _Detectron2ImportHook()
        sys.meta_path.insert(0, hook)
    return hook


def is_applied() -> bool:
    """Whether detectron2 0.6 was patched for the missing extension in this process."""
    return "detectron2" in _patched and _SHIM


def apply() -> bool:
    """Install the import hook, import detectron2 (so it is patched) and patch the modules that
    were imported before the hook; returns :func:`is_applied`.

    Idempotent; changes nothing (but ``pkg_resources``) under a full upstream detectron2, and
    nothing at all when detectron2 is missing.
    """
    if not DETECTRON2_INSTALLED:
        return False
    install_import_hook()
    import detectron2  # noqa: F401  (patched by the hook unless it was imported before)

    for name, patch in _patches().items():
        if name in sys.modules:
            _run_patch(name, patch, sys.modules[name])
    return is_applied()
