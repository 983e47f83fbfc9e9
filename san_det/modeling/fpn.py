"""FPN builders over the SASA and SAN backbones, and SASA's attentional FPN.

Every builder honours ``MODEL.FPN.ATTENTION``: when true, the FPN's 3x3 output convs become
local self-attention (``MODEL.FPN.ATTENTION_KERNEL_SIZE``, ``MODEL.FPN.ATTENTION_NUM_HEADS``) and
the RetinaNet variant's P6/P7 convs become attention layers at stride 1 followed by a 2x2 average
pool (SASA appendix A.3). The 1x1 lateral convs stay as they are.

Registered builders (``MODEL.BACKBONE.NAME``), one per entry of :data:`FPN_BACKBONES`, all the
same function over a different bottom-up backbone and top block:

- ``build_sasa_fpn_backbone`` / ``build_san_fpn_backbone``: FPN with a max-pooled P6 (R-CNN).
- ``build_retinanet_sasa_fpn_backbone`` / ``build_retinanet_san_fpn_backbone``: FPN with P6/P7
  computed from ``res5`` (RetinaNet), as detectron2's ``build_retinanet_resnet_fpn_backbone``.
"""

from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from torch import nn

from san_det.layers.checks import check_odd_int

from .architecture import architecture_keys_of, register_architecture_keys
from .attention_conv import AttentionConv2d, check_attention_width
from .san_net import build_san_net
from .sasa_resnet import build_sasa_resnet

__all__ = [
    "FPN_BACKBONES",
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

    Same arguments as ``FPN`` (any further keyword, e.g. upstream's ``square_pad``, goes to it)
    plus ``kernel_size`` and ``num_heads`` of the attention layers; same outputs, names
    (``fpn_output{stage}`` holds an :class:`~san_det.modeling.attention_conv.AttentionConv2d`
    with the ``norm`` FPN built for that conv), ``output_shape()`` and ``forward``
    (``FPN.forward``).

    ``FPN.__init__`` builds everything, so this FPN has every attribute the installed
    detectron2's has; ``FPN.__init__`` offers no way to choose the output layer, so its output
    convs are then swapped for attention layers, in place (same names, same order).
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
        **fpn_kwargs,
    ):
        if not in_features:
            raise ValueError("AttentionFPN needs at least one input feature")
        if fuse_type not in ("avg", "sum"):
            raise ValueError(f"fuse_type must be 'avg' or 'sum', got {fuse_type!r}")
        super().__init__(
            bottom_up, in_features, out_channels, norm, top_block, fuse_type, **fpn_kwargs
        )
        swapped = {}
        for name, conv in list(self.named_children()):
            if any(conv is output for output in self.output_convs):
                attention = AttentionConv2d(
                    out_channels, out_channels, kernel_size, num_heads, norm=conv.norm
                )
                setattr(self, name, attention)  # same name, same place among the children
                swapped[id(conv)] = attention
        self.output_convs = [swapped[id(conv)] for conv in self.output_convs]


def build_fpn_on(bottom_up: Backbone, cfg, top_block: str) -> FPN:
    """Wrap ``bottom_up`` in an FPN configured by ``cfg.MODEL.FPN``.

    Args:
        bottom_up: a backbone producing ``cfg.MODEL.FPN.IN_FEATURES``.
        cfg: the config (``MODEL.FPN.*``; ``MODEL.FPN.ATTENTION`` picks :class:`AttentionFPN`).
        top_block: "maxpool" (P6 by max pooling P5) or "p6p7" (RetinaNet's P6/P7 from ``res5``).
    """
    _check_attention_fpn_config(cfg)
    return _fpn_on(bottom_up, cfg, top_block)


def _fpn_on(bottom_up: Backbone, cfg, top_block: str) -> FPN:
    """:func:`build_fpn_on` after :func:`_check_attention_fpn_config`."""
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
    common = dict(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=f.OUT_CHANNELS,
        norm=f.NORM,
        top_block=_top_block(cfg, available, top_block),
        fuse_type=f.FUSE_TYPE,
    )
    if not f.ATTENTION:
        return FPN(**common)
    return AttentionFPN(
        **common, kernel_size=f.ATTENTION_KERNEL_SIZE, num_heads=f.ATTENTION_NUM_HEADS
    )


def _top_block(cfg, available: Dict[str, ShapeSpec], top_block: str) -> nn.Module:
    """The FPN's extra levels: detectron2's P6 max pool or RetinaNet's P6/P7 (conv or attention)."""
    f = cfg.MODEL.FPN
    if top_block == "maxpool":
        return LastLevelMaxPool()
    if top_block != "p6p7":
        raise ValueError(f"top_block must be 'maxpool' or 'p6p7', got {top_block!r}")
    in_feature = f.TOP_BLOCK_IN_FEATURE
    if in_feature == "res5":
        if "res5" not in available:
            raise ValueError(
                "MODEL.FPN.TOP_BLOCK_IN_FEATURE 'res5' needs res5 among the backbone's "
                "OUT_FEATURES"
            )
        in_channels = available["res5"].channels
    elif in_feature == "p5":
        if available[f.IN_FEATURES[-1]].stride != 32:
            raise ValueError(
                "MODEL.FPN.TOP_BLOCK_IN_FEATURE 'p5' needs the last MODEL.FPN.IN_FEATURES "
                "entry at stride 32"
            )
        in_channels = f.OUT_CHANNELS
    else:
        raise ValueError(
            f"MODEL.FPN.TOP_BLOCK_IN_FEATURE must be one of ['res5', 'p5'], got {in_feature!r}"
        )
    if f.ATTENTION:
        return LastLevelP6P7Attention(
            in_channels, f.OUT_CHANNELS, f.ATTENTION_KERNEL_SIZE, f.ATTENTION_NUM_HEADS, in_feature
        )
    return LastLevelP6P7(in_channels, f.OUT_CHANNELS, in_feature)


def _check_attention_fpn_config(cfg) -> None:
    """Validate the attention keys before anything is built (errors name the key)."""
    f = cfg.MODEL.FPN
    if f.ATTENTION:
        check_odd_int("MODEL.FPN.ATTENTION_KERNEL_SIZE", f.ATTENTION_KERNEL_SIZE)
        check_attention_width(
            f.OUT_CHANNELS, f.ATTENTION_NUM_HEADS, "MODEL.FPN.ATTENTION_NUM_HEADS",
            "FPN (OUT_CHANNELS)",
        )  # fmt: skip


# MODEL.BACKBONE.NAME -> (bottom-up builder, top block, description): one registered FPN
# builder per entry, all made by _register_fpn_backbone.
FPN_BACKBONES: Dict[str, Tuple[Callable[..., Backbone], str, str]] = {
    "build_sasa_fpn_backbone": (
        build_sasa_resnet,
        "maxpool",
        "SASA ResNet + FPN with a max-pooled P6 (outputs p2..p6 for in_features res2..res5).",
    ),
    "build_retinanet_sasa_fpn_backbone": (
        build_sasa_resnet,
        "p6p7",
        "SASA ResNet + FPN with RetinaNet's P6/P7 from ``res5`` (outputs p3..p7).",
    ),
    "build_san_fpn_backbone": (build_san_net, "maxpool", "SAN + FPN with a max-pooled P6."),
    "build_retinanet_san_fpn_backbone": (
        build_san_net,
        "p6p7",
        "SAN + FPN with RetinaNet's P6/P7 from ``res5``.",
    ),
}


def _register_fpn_backbone(name: str) -> Callable[[Any, ShapeSpec], FPN]:
    """Register in ``BACKBONE_REGISTRY`` the FPN builder :data:`FPN_BACKBONES` describes as
    ``name``: it checks the ``MODEL.FPN`` attention keys, builds the bottom-up backbone and wraps
    it with :func:`build_fpn_on`'s FPN."""
    build_bottom_up, top_block, description = FPN_BACKBONES[name]

    def build(cfg, input_shape: ShapeSpec) -> FPN:
        _check_attention_fpn_config(cfg)  # before the (slow) bottom-up build
        return _fpn_on(build_bottom_up(cfg, input_shape), cfg, top_block)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = description
    BACKBONE_REGISTRY.register(build)
    register_architecture_keys(name, [*architecture_keys_of(build_bottom_up), "MODEL.FPN"])
    return build


build_sasa_fpn_backbone = _register_fpn_backbone("build_sasa_fpn_backbone")
build_retinanet_sasa_fpn_backbone = _register_fpn_backbone("build_retinanet_sasa_fpn_backbone")
build_san_fpn_backbone = _register_fpn_backbone("build_san_fpn_backbone")
build_retinanet_san_fpn_backbone = _register_fpn_backbone("build_retinanet_san_fpn_backbone")
