"""san_det: self-attention backbones (SASA, SAN) for Detectron2.

Importing the package first patches detectron2 0.6 for today's stack where needed
(:mod:`san_det.compat`), then registers san_det's backbones, heads, datasets and config keys.
"""

from . import compat

compat.apply()
