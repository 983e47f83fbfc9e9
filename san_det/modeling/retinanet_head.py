"""RetinaNet heads chosen by config: detectron2's conv head or SASA's attention head.

detectron2 0.6's ``RetinaNet`` builds ``RetinaNetHead`` directly. san_det adds
:data:`RETINANET_HEAD_REGISTRY` (holding detectron2's ``RetinaNetHead`` and
:class:`AttentionRetinaNetHead`) and the meta-architecture ``SanDetRetinaNet``, detectron2's
``RetinaNet`` with its head built from ``MODEL.RETINANET.HEAD_NAME``; everything else (anchors,
losses, inference) is detectron2's.
"""

import functools
import math
from typing import Callable, List, Optional, Tuple

from detectron2.config import configurable
from detectron2.layers import CycleBatchNormList, ShapeSpec, get_norm
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from san_det.layers.checks import check_odd_int

from .architecture import RETINANET_ARCHITECTURE_KEYS, architecture_keys
from .attention_conv import AttentionConv2d, check_attention_width
from .fpn import AttentionFPN

__all__ = [
    "RETINANET_HEAD_REGISTRY",
    "AttentionRetinaNetHead",
    "build_retinanet_head",
    "per_level_norm",
    "SanDetRetinaNet",
]

RETINANET_HEAD_REGISTRY = Registry("RETINANET_HEAD")
RETINANET_HEAD_REGISTRY.__doc__ = """
RetinaNet heads, called as ``head(cfg, input_shapes)`` with ``input_shapes`` the list of
``ShapeSpec`` of ``MODEL.RETINANET.IN_FEATURES``; picked by ``MODEL.RETINANET.HEAD_NAME``.
"""
RETINANET_HEAD_REGISTRY.register(RetinaNetHead)


@RETINANET_HEAD_REGISTRY.register()
class AttentionRetinaNetHead(nn.Module):
    """SASA's attentional RetinaNet head (appendix A.3).

    Like detectron2's :class:`RetinaNetHead` (two subnets, shared across levels, same output
    format), but each subnet's 3x3 convs are local self-attention layers
    (:class:`~san_det.modeling.attention_conv.AttentionConv2d`, k = 7, 8 heads, then norm and
    ReLU) and the predictions come from a final pointwise (1x1) conv that mixes the heads'
    outputs. Value projections are initialised from ``N(0, value_init_std)``, the prediction
    convs from ``N(0, 0.01)`` with the prior-probability bias on the class logits.

    Returns from ``forward(features)``:
        logits: list over levels of ``(N, A * K, H_l, W_l)``; bbox_reg: list of
        ``(N, A * 4, H_l, W_l)``.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_anchors: int,
        conv_dims: List[int],
        norm="",
        prior_prob: float = 0.01,
        kernel_size: int = 7,
        num_heads: int = 8,
        value_init_std: float = 0.01,
    ):
        """
        Args:
            input_shape: shapes of the input levels (their channels must be equal).
            num_classes, num_anchors: as for ``RetinaNetHead``.
            conv_dims: width of each attention layer of a subnet.
            norm: normalisation after each attention layer; "BN"/"SyncBN" keep per-level
                statistics (``CycleBatchNormList``) as detectron2's head does.
            prior_prob: prior probability for the class-logit bias.
            kernel_size, num_heads: of the attention layers.
            value_init_std: std of the normal initialisation of the value projections.
        """
        super().__init__()
        self._num_features = len(input_shape)
        make_norm = per_level_norm(norm, self._num_features)
        subnets = {"cls_subnet": [], "bbox_subnet": []}
        for layers in subnets.values():
            for in_channels, out_channels in zip(
                [input_shape[0].channels] + list(conv_dims), conv_dims
            ):
                layers.append(
                    AttentionConv2d(
                        in_channels,
                        out_channels,
                        kernel_size,
                        num_heads,
                        norm=make_norm(out_channels),
                        activation=nn.ReLU(),
                    )
                )
        self.cls_subnet = nn.Sequential(*subnets["cls_subnet"])
        self.bbox_subnet = nn.Sequential(*subnets["bbox_subnet"])
        self.cls_score = nn.Conv2d(conv_dims[-1], num_anchors * num_classes, kernel_size=1)
        self.bbox_pred = nn.Conv2d(conv_dims[-1], num_anchors * 4, kernel_size=1)

        for layer in list(self.cls_subnet) + list(self.bbox_subnet):
            nn.init.normal_(layer.attention.value.weight, mean=0.0, std=value_init_std)
        for conv in (self.cls_score, self.bbox_pred):
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.constant_(conv.bias, 0.0)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        r = cfg.MODEL.RETINANET
        num_anchors = build_anchor_generator(cfg, input_shape).num_cell_anchors
        if len(set(num_anchors)) != 1:
            raise ValueError("the RetinaNet head needs the same number of anchors on every level")
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                f"the RetinaNet head is shared across levels: all input levels need the same "
                f"channels, got {sorted(channels)}"
            )
        width = input_shape[0].channels
        check_odd_int("MODEL.RETINANET.ATTENTION_KERNEL_SIZE", r.ATTENTION_KERNEL_SIZE)
        check_attention_width(
            width, r.ATTENTION_NUM_HEADS, "MODEL.RETINANET.ATTENTION_NUM_HEADS", "RetinaNet head"
        )
        return {
            "input_shape": input_shape,
            "num_classes": r.NUM_CLASSES,
            "num_anchors": num_anchors[0],
            "conv_dims": [width] * r.NUM_CONVS,
            "norm": r.NORM,
            "prior_prob": r.PRIOR_PROB,
            "kernel_size": r.ATTENTION_KERNEL_SIZE,
            "num_heads": r.ATTENTION_NUM_HEADS,
            "value_init_std": r.ATTENTION_VALUE_INIT_STD,
        }

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        if len(features) != self._num_features:
            raise ValueError(f"expected {self._num_features} feature levels, got {len(features)}")
        logits, bbox_reg = [], []
        for feature in features:
            logits.append(self.cls_score(self.cls_subnet(feature)))
            bbox_reg.append(self.bbox_pred(self.bbox_subnet(feature)))
        return logits, bbox_reg


def per_level_norm(norm, num_levels: int) -> Callable[[int], Optional[nn.Module]]:
    """``channels -> norm module`` for a head shared across ``num_levels`` feature levels.

    "BN" and "SyncBN" become detectron2's :class:`CycleBatchNormList` (statistics per level, one
    shared affine), the choice detectron2's ``RetinaNetHead`` makes inline in its constructor;
    any other name goes to ``get_norm`` ("" gives ``None``: no norm).
    """
    if norm in ("BN", "SyncBN"):
        bn_class = nn.BatchNorm2d if norm == "BN" else nn.SyncBatchNorm
        return lambda channels: CycleBatchNormList(
            length=num_levels, bn_class=bn_class, num_features=channels
        )
    return functools.partial(get_norm, norm)


def build_retinanet_head(cfg, input_shape: List[ShapeSpec]) -> nn.Module:
    """Build the head named by ``MODEL.RETINANET.HEAD_NAME`` (error lists the valid names)."""
    return _head_class(cfg)(cfg, input_shape)


def _head_class(cfg):
    name = cfg.MODEL.RETINANET.HEAD_NAME
    valid = sorted(name for name, _ in RETINANET_HEAD_REGISTRY)
    if name not in valid:
        raise ValueError(f"MODEL.RETINANET.HEAD_NAME must be one of {valid}, got {name!r}")
    return RETINANET_HEAD_REGISTRY.get(name)


@META_ARCH_REGISTRY.register()
@architecture_keys(*RETINANET_ARCHITECTURE_KEYS)
class SanDetRetinaNet(RetinaNet):
    """detectron2's ``RetinaNet`` with the head picked by ``MODEL.RETINANET.HEAD_NAME``.

    Identical to ``RetinaNet`` with ``HEAD_NAME "RetinaNetHead"``. :meth:`from_config` takes
    ``RetinaNet.from_config``'s arguments and changes only the head: detectron2's
    ``from_config`` builds ``RetinaNetHead`` unconditionally, so another head replaces it there.
    It also refuses a config with ``MODEL.FPN.ATTENTION`` on a backbone builder that ignores it.
    """

    @classmethod
    def from_config(cls, cfg):
        head_class = _head_class(cfg)  # a bad name fails before the backbone is built
        ret = super().from_config(cfg)
        _check_fpn_attention(cfg, ret["backbone"])
        if head_class is not RetinaNetHead:
            shapes = ret["backbone"].output_shape()
            ret["head"] = head_class(cfg, [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES])
        return ret


def _check_fpn_attention(cfg, backbone: nn.Module) -> None:
    if cfg.MODEL.FPN.ATTENTION and not isinstance(backbone, AttentionFPN):
        raise ValueError(
            f"MODEL.FPN.ATTENTION is set but MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME!r} "
            f"builds no attentional FPN: use one of san_det's FPN builders (e.g. "
            f"build_retinanet_sasa_fpn_backbone)"
        )
