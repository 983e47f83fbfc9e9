"""Run by ``san_det_compat.pth`` at interpreter start: san_det's patches for detectron2 apply
whichever of detectron2 and san_det a script imports first.

Costs nothing until detectron2 is imported: then it loads ``san_det/compat.py`` alone, as
``san_det.compat`` (san_det's package imports detectron2 itself), and hands the import over to
:func:`san_det.compat.install_import_hook`'s finder.
"""

import sys


def _load_compat():
    import importlib.util
    import os

    if "san_det.compat" in sys.modules:
        return sys.modules["san_det.compat"]
    package = importlib.util.find_spec("san_det")
    if package is None or not package.submodule_search_locations:
        return None
    path = os.path.join(list(package.submodule_search_locations)[0], "compat.py")
    spec = importlib.util.spec_from_file_location("san_det.compat", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["san_det.compat"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["san_det.compat"]
        raise
    return module


class _OnDetectron2Import:
    """Meta-path finder that waits for ``import detectron2``, then installs compat's hook."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "detectron2":
            return None
        sys.meta_path.remove(cls)
        loading = sys.modules.get("san_det.compat")
        if loading is not None and not hasattr(loading, "install_import_hook"):
            return None  # `import san_det` is loading compat, whose apply() installs the hook
        try:
            compat = _load_compat()
            hook = compat.install_import_hook() if compat is not None else None
        except Exception as e:  # never break `import detectron2`; `import san_det` still patches
            print(
                f"san_det_compat.pth: detectron2 import hook not installed: {e!r}", file=sys.stderr
            )
            return None
        return hook.find_spec(fullname, path, target) if hook is not None else None


if "detectron2" not in sys.modules and _OnDetectron2Import not in sys.meta_path:
    sys.meta_path.insert(0, _OnDetectron2Import)
