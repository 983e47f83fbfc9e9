"""san_det: ``pip install -e .`` (or ``pip install .``) brings what san_det needs, except three things.

- torch and torchvision: install the build for your platform and CUDA first. They are not
  declared, so pip never replaces the torch you have (an unpinned ``torchvision`` alone would pull
  the newest one, with the torch it pins).
- detectron2: upstream from its git repository (``--no-build-isolation``, see the README), or
  detectron2 0.6 from PyPI as ``tools/setup_env.sh`` builds it; either brings its own needs.
- CuPy for the CUDA kernels: the extra matching torch's CUDA, ``.[cuda12]`` or ``.[cuda13]``.

The distribution also installs ``san_det_compat.pth`` (runs ``_san_det_compat_hook`` at interpreter
start), so the patches of ``san_det/compat.py`` apply even when a script imports detectron2 before
san_det; in a regular and in an editable install.
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH_NAME = "san_det_compat.pth"
PTH_LINE = "import _san_det_compat_hook\n"


class BuildPyWithPth(build_py):
    """``build_py`` that also puts ``san_det_compat.pth`` at the top of the wheel (site-packages)."""

    def run(self):
        super().run()
        if not getattr(
            self, "editable_mode", False
        ):  # an editable wheel gets it from EditableWheelWithPth
            with open(os.path.join(self.build_lib, PTH_NAME), "w") as f:
                f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return (
            outputs
            if getattr(self, "editable_mode", False)
            else outputs + [os.path.join(self.build_lib, PTH_NAME)]
        )


cmdclass = {"build_py": BuildPyWithPth}

try:  # setuptools >= 64 (PEP 660 editable installs)
    from setuptools.command.editable_wheel import editable_wheel

    class _StrategyWithPth:
        """Wraps setuptools' editable strategy (its .pth and finder) and adds our .pth."""

        def __init__(self, strategy):
            self._strategy = strategy

        def __enter__(self):
            self._strategy.__enter__()
            return self

        def __exit__(self, *exc):
            return self._strategy.__exit__(*exc)

        def __call__(self, wheel, files, mapping):
            self._strategy(wheel, files, mapping)
            wheel.writestr(PTH_NAME, PTH_LINE.encode())

    class EditableWheelWithPth(editable_wheel):
        """``editable_wheel`` whose wheel also holds ``san_det_compat.pth``."""

        def _select_strategy(self, *args, **kwargs):
            return _StrategyWithPth(super()._select_strategy(*args, **kwargs))

    if hasattr(editable_wheel, "_select_strategy"):
        cmdclass["editable_wheel"] = EditableWheelWithPth
except ImportError:  # pragma: no cover - old setuptools: `import san_det` before detectron2
    pass


setup(
    name="san_det",
    version="0.1.0",
    description="Self-attention backbones (SASA, SAN) for Detectron2",
    packages=find_packages(include=["san_det", "san_det.*"]),
    py_modules=["_san_det_compat_hook"],
    package_data={"san_det.layers": ["kernels/*.cu", "kernels/*.h"]},
    python_requires=">=3.9",
    install_requires=[
        "numpy",
        "Pillow",
        "PyYAML",
        "fvcore>=0.1.5,<0.1.6",  # the range detectron2 requires
        "iopath>=0.1.7,<0.1.10",
        "pycocotools>=2.0.2",  # COCO datasets; the evaluator's fallback
        "faster-coco-eval>=1.8",  # fast COCO evaluation without detectron2's _C (san_det.compat)
        "opencv-python-headless",  # detectron2's Visualizer (prediction images)
        "matplotlib",  # attention maps
        "scikit-image",  # backgrounds of the embedded shapes dataset
        "scikit-learn",  # the embedded digits classification set
    ],
    extras_require={
        "cuda12": ["cupy-cuda12x"],  # CUDA kernels, torch built for CUDA 12.x
        "cuda13": ["cupy-cuda13x"],  # CUDA kernels, torch built for CUDA 13.x
        "test": ["pytest"],
    },
    cmdclass=cmdclass,
)
