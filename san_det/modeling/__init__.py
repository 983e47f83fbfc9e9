"""san_det's Detectron2 components: backbones, attentional FPN and RetinaNet heads.

Importing this package registers the backbone builders in detectron2's ``BACKBONE_REGISTRY`` and
the meta-architecture ``SanDetRetinaNet`` in ``META_ARCH_REGISTRY``.
"""

from .config import add_backbone_config

__all__ = ["add_backbone_config"]
