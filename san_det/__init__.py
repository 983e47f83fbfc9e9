"""san_det: self-attention backbones (SASA, SAN) for Detectron2.

Importing the package first patches detectron2 0.6 for today's stack where needed
(:mod:`san_det.compat`), then registers san_det's backbones, heads, datasets and config keys.
Without detectron2 installed only :mod:`san_det.layers` (plain PyTorch) is usable.
"""

from . import compat

compat.apply()

if compat.DETECTRON2_INSTALLED:
    # registration: datasets, backbones / heads / meta-architectures, classification
    from . import classification, data, modeling  # noqa: F401,E402
    from .config import add_san_det_config  # noqa: E402

    __all__ = ["add_san_det_config"]
