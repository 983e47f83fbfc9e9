"""san_det: self-attention backbones (SASA, SAN) for Detectron2.

Importing the package first patches detectron2 0.6 for today's stack where needed
(:mod:`san_det.compat`), then registers san_det's backbones, heads, datasets and config keys.
Without detectron2 installed only :mod:`san_det.layers` (plain PyTorch) is usable.
"""

from . import compat

compat.apply()

if compat.DETECTRON2_INSTALLED:
    from . import data  # noqa: F401,E402  (registers shapes_train / shapes_val)
