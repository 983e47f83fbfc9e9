"""san_det's Detectron2 components: backbones, attentional FPN and RetinaNet heads.

Importing this package registers in detectron2's ``BACKBONE_REGISTRY``: ``build_sasa_backbone``,
``build_sasa_fpn_backbone``, ``build_retinanet_sasa_fpn_backbone``, ``build_san_backbone``,
``build_san_fpn_backbone``, ``build_retinanet_san_fpn_backbone``; in ``META_ARCH_REGISTRY``:
``SanDetRetinaNet`` (RetinaNet whose head is picked by ``MODEL.RETINANET.HEAD_NAME`` from
:data:`RETINANET_HEAD_REGISTRY`: ``RetinaNetHead`` or ``AttentionRetinaNetHead``).
"""

from . import fpn
from .attention_conv import AttentionConv2d
from .config import add_backbone_config
from .fpn import (
    FPN_BACKBONES,
    AttentionFPN,
    LastLevelP6P7Attention,
    build_fpn_on,
    build_retinanet_san_fpn_backbone,
    build_retinanet_sasa_fpn_backbone,
    build_san_fpn_backbone,
    build_sasa_fpn_backbone,
)
from .retinanet_head import (
    RETINANET_HEAD_REGISTRY,
    AttentionRetinaNetHead,
    SanDetRetinaNet,
    build_retinanet_head,
)
from .san_net import SANBackbone, SANBottleneck, build_san_backbone, build_san_net
from .sasa_resnet import (
    AttentionBottleneckBlock,
    AttentionStem,
    SASAResNet,
    build_sasa_backbone,
    build_sasa_resnet,
)

__all__ = [
    "add_backbone_config",
    "AttentionConv2d",
    "AttentionBottleneckBlock",
    "AttentionStem",
    "SASAResNet",
    "build_sasa_resnet",
    "build_sasa_backbone",
    "SANBottleneck",
    "SANBackbone",
    "build_san_net",
    "build_san_backbone",
    *fpn.__all__,
    "RETINANET_HEAD_REGISTRY",
    "AttentionRetinaNetHead",
    "build_retinanet_head",
    "SanDetRetinaNet",
]
