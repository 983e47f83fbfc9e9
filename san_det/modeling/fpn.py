"""FPN builders over the SASA and SAN backbones, and SASA's attentional FPN.

Every builder honours ``MODEL.FPN.ATTENTION``: when true, the FPN's 3x3 output convs become
local self-attention (``MODEL.FPN.ATTENTION_KERNEL_SIZE``, ``MODEL.FPN.ATTENTION_NUM_HEADS``) and
the RetinaNet variant's P6/P7 convs become attention layers at stride 1 followed by a 2x2 average
pool (SASA appendix A.3). The 1x1 lateral convs stay as they are.

Registered builders (``MODEL.BACKBONE.NAME``):

- ``build_sasa_fpn_backbone`` / ``build_san_fpn_backbone``: FPN with a max-pooled P6 (R-CNN).
- ``build_retinanet_sasa_fpn_backbone`` / ``build_retinanet_san_fpn_backbone``: FPN with P6/P7
  computed from ``res5`` (RetinaNet), as detectron2's ``build_retinanet_resnet_fpn_backbone``.
"""

import math
from typing import List

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from torch import nn

from san_det.layers.checks import check_odd_int

from .attention_conv import AttentionConv2d, check_attention_width
from .san_net import build_san_net
from .sasa_resnet import build_sasa_resnet

__all__ = [
    "AttentionFPN",
    "LastLevelP6P7Attention",
    "build_fpn_on",
    "build_sasa_fpn_backbone",
    "build_retinanet_sasa_fpn_backbone",
    "build_san_fpn_backbone",
    "build_retinanet_san_fpn_backbone",
]


class LastLevelP6P7Attention(nn.Module):
    """RetinaNet's P6/P7 with attention: ``p6 = att_s2(c5)``, ``p7 = att_s2(relu(p6))``.

    Each layer is :class:`~san_det.layers.local_attention.LocalSelfAttention2d` at stride 1
    followed by a 2x2 average pool (``ceil_mode``), so P6 is ``ceil(H5 / 2) x ceil(W5 / 2)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 7,
        num_heads: int = 8,
        in_feature: str = "res5",
    ):
        super().__init__()
        self.num_levels = 2
        self.in_feature = in_feature
        self.p6 = AttentionConv2d(in_channels, out_channels, kernel_size, num_heads, stride=2)
        self.p7 = AttentionConv2d(out_channels, out_channels, kernel_size, num_heads, stride=2)

    def forward(self, c5: torch.Tensor) -> List[torch.Tensor]:
        p6 = self.p6(c5)
        p7 = self.p7(F.relu(p6))
        return [p6, p7]


class AttentionFPN(FPN):
    """detectron2's :class:`FPN` whose 3x3 output convs are local self-attention layers.

    Same arguments as ``FPN`` plus ``kernel_size`` and ``num_heads`` of the attention layers;
    same outputs, names (``fpn_output{stage}`` now holds an
    :class:`~san_det.modeling.attention_conv.AttentionConv2d` with its ``norm``) and
    ``output_shape()``.
    """

    def __init__(
        self,
        bottom_up: Backbone,
        in_features: List[str],
        out_channels: int,
        norm: str = "",
        top_block=None,
        fuse_type: str = "sum",
        *,
        kernel_size: int = 7,
        num_heads: int = 8,
    ):
        super().__init__(bottom_up, in_features, out_channels, norm, top_block, fuse_type)
        strides = [bottom_up.output_shape()[f].stride for f in in_features]
        output_convs = []
        for stride in strides:
            layer = AttentionConv2d(
                out_channels,
                out_channels,
                kernel_size,
                num_heads,
                norm=get_norm(norm, out_channels),
            )
            self.add_module(f"fpn_output{int(math.log2(stride))}", layer)
            output_convs.append(layer)
        self.output_convs = output_convs[::-1]  # top-down order, as FPN.forward expects


def build_fpn_on(bottom_up: Backbone, cfg, top_block: str) -> FPN:
    """Wrap ``bottom_up`` in an FPN configured by ``cfg.MODEL.FPN``.

    Args:
        bottom_up: a backbone producing ``cfg.MODEL.FPN.IN_FEATURES``.
        cfg: the config (``MODEL.FPN.*``; ``MODEL.FPN.ATTENTION`` picks :class:`AttentionFPN`).
        top_block: "maxpool" (P6 by max pooling P5) or "p6p7" (RetinaNet's P6/P7 from ``res5``).
    """
    _check_attention_fpn_config(cfg)
    f = cfg.MODEL.FPN
    in_features = list(f.IN_FEATURES)
    available = bottom_up.output_shape()
    if not in_features:
        raise ValueError("MODEL.FPN.IN_FEATURES is empty: list the backbone features to use")
    missing = [name for name in in_features if name not in available]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {in_features} asks for {missing}, which the bottom-up backbone "
            f"does not output (it outputs {list(available)}: add them to its OUT_FEATURES)"
        )
    out_channels = f.OUT_CHANNELS
    if top_block == "maxpool":
        block = LastLevelMaxPool()
    elif top_block == "p6p7":
        in_feature = f.TOP_BLOCK_IN_FEATURE
        if in_feature == "res5":
            if "res5" not in available:
                raise ValueError(
                    "MODEL.FPN.TOP_BLOCK_IN_FEATURE 'res5' needs res5 among the backbone's "
                    "OUT_FEATURES"
                )
            in_p6p7 = available["res5"].channels
        elif in_feature == "p5":
            if available[in_features[-1]].stride != 32:
                raise ValueError(
                    "MODEL.FPN.TOP_BLOCK_IN_FEATURE 'p5' needs the last MODEL.FPN.IN_FEATURES "
                    "entry at stride 32"
                )
            in_p6p7 = out_channels
        else:
            raise ValueError(
                f"MODEL.FPN.TOP_BLOCK_IN_FEATURE must be one of ['res5', 'p5'], got {in_feature!r}"
            )
        if f.ATTENTION:
            block = LastLevelP6P7Attention(
                in_p6p7, out_channels, f.ATTENTION_KERNEL_SIZE, f.ATTENTION_NUM_HEADS, in_feature
            )
        else:
            block = LastLevelP6P7(in_p6p7, out_channels, in_feature)
    else:
        raise ValueError(f"top_block must be 'maxpool' or 'p6p7', got {top_block!r}")
    common = dict(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=f.NORM,
        top_block=block,
        fuse_type=f.FUSE_TYPE,
    )
    if not f.ATTENTION:
        return FPN(**common)
    return AttentionFPN(
        **common, kernel_size=f.ATTENTION_KERNEL_SIZE, num_heads=f.ATTENTION_NUM_HEADS
    )


def _check_attention_fpn_config(cfg) -> None:
    """Validate the attention keys before anything is built (errors name the key)."""
    f = cfg.MODEL.FPN
    if f.ATTENTION:
        check_odd_int("MODEL.FPN.ATTENTION_KERNEL_SIZE", f.ATTENTION_KERNEL_SIZE)
        check_attention_width(
            f.OUT_CHANNELS, f.ATTENTION_NUM_HEADS, "MODEL.FPN.ATTENTION_NUM_HEADS",
            "FPN (OUT_CHANNELS)",
        )  # fmt: skip


@BACKBONE_REGISTRY.register()
def build_sasa_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """SASA ResNet + FPN with a max-pooled P6 (outputs p2..p6 for in_features res2..res5)."""
    _check_attention_fpn_config(cfg)
    return build_fpn_on(build_sasa_resnet(cfg, input_shape), cfg, "maxpool")


@BACKBONE_REGISTRY.register()
def build_retinanet_sasa_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """SASA ResNet + FPN with RetinaNet's P6/P7 from ``res5`` (outputs p3..p7)."""
    _check_attention_fpn_config(cfg)
    return build_fpn_on(build_sasa_resnet(cfg, input_shape), cfg, "p6p7")


@BACKBONE_REGISTRY.register()
def build_san_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """SAN + FPN with a max-pooled P6."""
    _check_attention_fpn_config(cfg)
    return build_fpn_on(build_san_net(cfg, input_shape), cfg, "maxpool")


@BACKBONE_REGISTRY.register()
def build_retinanet_san_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """SAN + FPN with RetinaNet's P6/P7 from ``res5``."""
    _check_attention_fpn_config(cfg)
    return build_fpn_on(build_san_net(cfg, input_shape), cfg, "p6p7")
