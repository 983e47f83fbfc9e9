"""SASA ResNets (Ramachandran et al., "Stand-Alone Self-Attention in Vision Models", 2019).

ResNet-26/38/50 ([1, 2, 4, 1], [2, 3, 5, 2], [3, 4, 6, 3] bottlenecks per stage) whose
bottleneck 3x3 conv is local self-attention (k = 7, 8 heads; where ResNet strides, attention at
stride 1 and a 2x2 average pool), with either ResNet's conv stem ("conv-stem + attention") or the
spatially-aware attention stem ("full attention"). Stages can be switched back to convolution
one by one (the paper's Table 3). Built from detectron2's ResNet pieces: :class:`ResNet`
(``res2``..``res5``, ``output_shape``, ``freeze``), ``BasicStem``, ``BottleneckBlock``.

Registered builder: ``build_sasa_backbone`` (keys under ``MODEL.SASA``, see
:mod:`san_det.modeling.config`).
"""

from typing import List, Tuple

from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet
from torch import nn

from san_det.layers.attention_stem import SpatiallyAwareAttentionStem
from san_det.layers.checks import check_odd_int

from .architecture import architecture_keys
from .attention_conv import AttentionConv2d, check_attention_width
from .norms import check_norm

__all__ = [
    "SASA_BLOCKS_PER_STAGE",
    "SASA_STEMS",
    "SASA_STAGE_TYPES",
    "AttentionBottleneckBlock",
    "AttentionStem",
    "SASAResNet",
    "build_sasa_resnet",
    "build_sasa_backbone",
]

SASA_BLOCKS_PER_STAGE = {26: [1, 2, 4, 1], 38: [2, 3, 5, 2], 50: [3, 4, 6, 3]}
SASA_STEMS = ("conv", "attention")
SASA_STAGE_TYPES = ("attention", "conv")
_FEATURES = ("stem", "res2", "res3", "res4", "res5")


def _conv1x1(in_channels: int, out_channels: int, norm, stride: int = 1) -> Conv2d:
    """A bias-free 1x1 conv followed by the norm ``norm`` (BottleneckBlock's conv1, conv3 and
    shortcut)."""
    return Conv2d(
        in_channels,
        out_channels,
        kernel_size=1,
        stride=stride,
        bias=False,
        norm=get_norm(norm, out_channels),
    )


class AttentionBottleneckBlock(CNNBlockBase):
    """ResNet bottleneck (1x1 conv, attention, 1x1 conv) with SASA attention as its 3x3 conv.

    Same structure, names and forward as detectron2's :class:`BottleneckBlock` (``conv1``,
    ``conv2``, ``conv3``, ``shortcut``), except that ``conv2`` is an
    :class:`~san_det.modeling.attention_conv.AttentionConv2d` (attention + norm). With
    ``stride > 1`` the attention runs at full resolution and a ``stride x stride`` average pool
    follows; the projection shortcut is the usual strided 1x1 conv.

    Shape: ``(N, in_channels, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    forward = BottleneckBlock.forward

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        stride: int = 1,
        norm="BN",
        kernel_size: int = 7,
        num_heads: int = 8,
    ):
        super().__init__(in_channels, out_channels, stride)
        if in_channels != out_channels:
            self.shortcut = _conv1x1(in_channels, out_channels, norm, stride)
        else:
            self.shortcut = None
        self.conv1 = _conv1x1(in_channels, bottleneck_channels, norm)
        self.conv2 = AttentionConv2d(
            bottleneck_channels,
            bottleneck_channels,
            kernel_size=kernel_size,
            num_heads=num_heads,
            stride=stride,
            norm=get_norm(norm, bottleneck_channels),
        )
        self.conv3 = _conv1x1(bottleneck_channels, out_channels, norm)
        for layer in (self.conv1, self.conv3, self.shortcut):
            if layer is not None:
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")


class AttentionStem(CNNBlockBase):
    """SASA's full-attention stem as a detectron2 stem (``stride`` = ``block_size``).

    Wraps :class:`~san_det.layers.attention_stem.SpatiallyAwareAttentionStem` (attention inside
    ``block_size x block_size`` blocks with spatially-aware values, norm, max pool); ``attention``
    are its keyword arguments ``block_size``, ``num_heads`` and ``num_value_mixtures``, and
    ``norm`` names its norm (:func:`detectron2.layers.get_norm`).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, *, norm="BN", **attention):
        stem = SpatiallyAwareAttentionStem(
            in_channels, out_channels, norm_layer=lambda c: get_norm(norm, c), **attention
        )
        super().__init__(in_channels, out_channels, stem.block_size)
        self.attention = stem

    def forward(self, x):
        return self.attention(x)


class SASAResNet(ResNet):
    """detectron2's :class:`ResNet` with ``size_divisibility`` 32 (the stride of ``res5``)."""

    @property
    def size_divisibility(self) -> int:
        return 32


def _check_choice(value, choices, key: str) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


def _stage_types(cfg) -> List[str]:
    types = list(cfg.MODEL.SASA.STAGE_TYPES)
    if len(types) != 4:
        raise ValueError(
            "MODEL.SASA.STAGE_TYPES must list 4 block types (res2, res3, res4, res5), got "
            f"{len(types)}: {types}"
        )
    for t in types:
        if t not in SASA_STAGE_TYPES:
            raise ValueError(
                f"MODEL.SASA.STAGE_TYPES entries must be one of {list(SASA_STAGE_TYPES)}, got "
                f"{t!r} in {types}"
            )
    return types


@architecture_keys("MODEL.SASA")
def build_sasa_resnet(cfg, input_shape: ShapeSpec) -> SASAResNet:
    """Build the SASA ResNet described by ``cfg.MODEL.SASA`` (validated, errors name the key).

    Args:
        cfg: a config with :func:`~san_det.modeling.config.add_backbone_config` keys.
        input_shape: the input's ``ShapeSpec`` (its ``channels`` are used).

    Classifiers put global average pooling and a linear layer on ``res5`` (see
    ``san_det.classification``); this builder returns the feature extractor only.
    """
    s = cfg.MODEL.SASA
    stage_types, norm = _check_sasa_config(cfg)
    stem = _build_stem(s, input_shape.channels, norm)
    stages = _build_stages(s, stage_types, norm)
    return SASAResNet(
        stem,
        stages,
        out_features=list(s.OUT_FEATURES),
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )


def _check_sasa_config(cfg) -> Tuple[List[str], str]:
    """``(stage types, norm)`` of ``MODEL.SASA``, or ``ValueError`` naming the bad key (the
    head widths are checked where each layer is built)."""
    s = cfg.MODEL.SASA
    _check_choice(s.DEPTH, SASA_BLOCKS_PER_STAGE, "MODEL.SASA.DEPTH")
    _check_choice(s.STEM, SASA_STEMS, "MODEL.SASA.STEM")
    stage_types = _stage_types(cfg)
    norm = check_norm(s.NORM, "MODEL.SASA.NORM")
    check_odd_int("MODEL.SASA.KERNEL_SIZE", s.KERNEL_SIZE)
    out_features = list(s.OUT_FEATURES)
    if not out_features or any(f not in _FEATURES for f in out_features):
        raise ValueError(
            f"MODEL.SASA.OUT_FEATURES must be a non-empty list of {list(_FEATURES)}, got "
            f"{out_features}"
        )
    return stage_types, norm


def _build_stem(s, in_channels: int, norm: str) -> CNNBlockBase:
    """ResNet's conv stem or SASA's attention stem (``MODEL.SASA.STEM``)."""
    if s.STEM == "conv":
        return BasicStem(in_channels, s.STEM_OUT_CHANNELS, norm=norm)
    check_attention_width(
        s.STEM_OUT_CHANNELS, s.STEM_NUM_HEADS, "MODEL.SASA.STEM_NUM_HEADS", "attention stem"
    )
    return AttentionStem(
        in_channels,
        s.STEM_OUT_CHANNELS,
        block_size=s.STEM_BLOCK_SIZE,
        num_heads=s.STEM_NUM_HEADS,
        num_value_mixtures=s.STEM_NUM_VALUE_MIXTURES,
        norm=norm,
    )


def _build_stages(s, stage_types: List[str], norm: str) -> List[List[CNNBlockBase]]:
    """The blocks of res2..res5: widths double per stage, the first block of res3..res5 strides."""
    in_channels = s.STEM_OUT_CHANNELS
    out_channels = s.RES2_OUT_CHANNELS
    bottleneck_channels = s.WIDTH_PER_GROUP
    stages = []
    for idx, (num_blocks, kind) in enumerate(zip(SASA_BLOCKS_PER_STAGE[s.DEPTH], stage_types)):
        first_stride = 1 if idx == 0 else 2
        kwargs = dict(
            num_blocks=num_blocks,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels,
            out_channels=out_channels,
            bottleneck_channels=bottleneck_channels,
            norm=norm,
        )
        if kind == "attention":
            check_attention_width(
                bottleneck_channels, s.NUM_HEADS, "MODEL.SASA.NUM_HEADS", f"res{idx + 2} bottleneck"
            )
            kwargs.update(
                block_class=AttentionBottleneckBlock,
                kernel_size=s.KERNEL_SIZE,
                num_heads=s.NUM_HEADS,
            )
        else:
            kwargs.update(block_class=BottleneckBlock, stride_in_1x1=s.STRIDE_IN_1X1)
        blocks = ResNet.make_stage(**kwargs)
        if s.ZERO_INIT_RESIDUAL:
            for block in blocks:
                nn.init.zeros_(block.conv3.norm.weight)
        stages.append(blocks)
        in_channels, out_channels, bottleneck_channels = (
            out_channels,
            out_channels * 2,
            bottleneck_channels * 2,
        )
    return stages


@BACKBONE_REGISTRY.register()
@architecture_keys("MODEL.SASA")
def build_sasa_backbone(cfg, input_shape: ShapeSpec) -> SASAResNet:
    """SASA ResNet backbone from ``cfg.MODEL.SASA`` (outputs ``MODEL.SASA.OUT_FEATURES``)."""
    return build_sasa_resnet(cfg, input_shape)
