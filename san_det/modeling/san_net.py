"""SAN backbones (Zhao, Jia, Koltun, "Exploring Self-attention for Image Recognition", CVPR 2020).

Exactly the official network (github hszhao/SAN, ``model/san.py``), with its module names so that
released checkpoints load 1:1:

- ``conv_in`` (1x1, 3 -> 64, no bias), ``bn_in``, ReLU, at full resolution;
- five stages ``i = 0..4``: 2x2 max pool -> ``conv{i}`` (1x1, no bias, width change) ->
  ``layer{i}`` (pre-activation SAM blocks) -> ``bn{i}`` -> ReLU, with widths 64, 256, 512, 1024,
  2048 at strides 2, 4, 8, 16, 32, footprints ``[3, 7, 7, 7, 7]``;
- a block of width ``C`` (``layer{i}.{j}``): ``bn1`` - ReLU - ``sam`` (phi/psi ``C/16``, beta
  ``C/4``, ``share_planes`` 8) - ``bn2`` - ReLU - ``conv`` (1x1 with bias, ``C/4 -> C``), plus the
  identity.

For detection the stages ``layer1``..``layer4`` are exposed as ``res2``..``res5`` (strides 4..32);
``layer0`` (stride 2) belongs to the stem. Classifiers add global average pooling and a linear
layer (the official ``fc``) on ``res5`` (see ``san_det.classification``).

Registered builder: ``build_san_backbone`` (keys under ``MODEL.SAN``, see
:mod:`san_det.modeling.config`).
"""

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from san_det.layers.checks import check_int
from san_det.layers.san_attention import PAIRWISE_RELATIONS, PATCHWISE_RELATIONS, SAM
from san_det.layers.ops import PAD_MODES

from .architecture import architecture_keys
from .norms import check_norm, make_norm

__all__ = [
    "SAN_BLOCKS_PER_STAGE",
    "SAN_SA_TYPES",
    "SANBottleneck",
    "SANBackbone",
    "build_san_net",
    "build_san_backbone",
]

SAN_BLOCKS_PER_STAGE = {10: [2, 1, 2, 4, 1], 15: [3, 2, 3, 5, 2], 19: [3, 3, 4, 6, 3]}
SAN_SA_TYPES = ("pairwise", "patchwise")
_RELATIONS = {"pairwise": PAIRWISE_RELATIONS, "patchwise": PATCHWISE_RELATIONS}
_FEATURES = ("res2", "res3", "res4", "res5")


class SANBottleneck(nn.Module):
    """The official pre-activation SAN block: ``x + conv(relu(bn2(sam(relu(bn1(x))))))``.

    Args:
        sa_type: "pairwise" or "patchwise".
        planes: block width ``C`` (input and output channels).
        kernel_size: SAM footprint.
        share_planes: output channels per attention-weight channel (official 8).
        relation: SAM relation (``None``: the official one).
        pad_mode: "reflect" (official) or "zeros".
        norm: normalisation name (see :mod:`san_det.modeling.norms`).

    Shape: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(
        self,
        sa_type: str,
        planes: int,
        kernel_size: int = 7,
        share_planes: int = 8,
        relation=None,
        pad_mode: str = "reflect",
        norm: str = "BN",
    ):
        super().__init__()
        rel_planes, mid_planes = planes // 16, planes // 4
        self.bn1 = make_norm(norm, planes)
        self.sam = SAM(
            sa_type,
            planes,
            rel_planes,
            mid_planes,
            share_planes,
            kernel_size,
            relation=relation,
            pad_mode=pad_mode,
            norm_layer=functools.partial(make_norm, norm),
        )
        self.bn2 = make_norm(norm, mid_planes)
        self.conv = nn.Conv2d(mid_planes, planes, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.sam(out)))
        return self.conv(out) + x


class SANBackbone(Backbone):
    """The official SAN network as a detectron2 backbone (outputs among ``res2``..``res5``).

    Args:
        sa_type: "pairwise" or "patchwise".
        layers: blocks in each of the five stages.
        kernels: SAM footprint of each stage.
        relation: SAM relation (``None``: official).
        pad_mode: "reflect" or "zeros".
        share_planes: output channels per attention-weight channel.
        base_width: width of stage 0 (official 64; stages 1..4 have 4, 8, 16, 32 times it).
        norm: normalisation of every norm layer, SAM's included.
        in_channels: input channels.
        out_features: names among ``res2``..``res5``; stages after the last one are not built.
        freeze_at: 0 trains everything; 1 freezes the stem (``conv_in``, ``bn_in``, ``conv0``,
            ``bn0``, ``layer0``); ``k >= 2`` also freezes the stages of ``res2``..``res{k}``
            (``conv{i}``, ``bn{i}``, ``layer{i}`` for ``i < k``). Frozen norms become
            ``FrozenBatchNorm2d``.
    """

    def __init__(
        self,
        sa_type: str,
        layers: Sequence[int],
        kernels: Sequence[int],
        *,
        relation=None,
        pad_mode: str = "reflect",
        share_planes: int = 8,
        base_width: int = 64,
        norm: str = "BN",
        in_channels: int = 3,
        out_features: Sequence[str] = ("res5",),
        freeze_at: int = 0,
    ):
        super().__init__()
        self.kernels = list(kernels)
        self.pad_mode = pad_mode
        self._out_features = list(out_features)
        num_stages = 1 + max(_FEATURES.index(f) + 1 for f in self._out_features)
        c = base_width
        self.conv_in = nn.Conv2d(in_channels, c, kernel_size=1, bias=False)
        self.bn_in = make_norm(norm, c)
        self._out_feature_channels: Dict[str, int] = {}
        self._out_feature_strides: Dict[str, int] = {}
        in_width = c
        for i in range(num_stages):
            width = base_width * (1 if i == 0 else 2 ** (i + 1))
            setattr(self, f"conv{i}", nn.Conv2d(in_width, width, kernel_size=1, bias=False))
            setattr(self, f"bn{i}", make_norm(norm, width))
            blocks = [
                SANBottleneck(sa_type, width, kernels[i], share_planes, relation, pad_mode, norm)
                for _ in range(layers[i])
            ]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            if i > 0:
                self._out_feature_channels[f"res{i + 1}"] = width
                self._out_feature_strides[f"res{i + 1}"] = 2 ** (i + 1)
            in_width = width
        self.num_stages = num_stages
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.freeze(freeze_at)

    @property
    def size_divisibility(self) -> int:
        return 32

    def _check_size(self, h: int, w: int) -> None:
        if self.pad_mode != "reflect":
            return
        for i in range(self.num_stages):
            h, w = h // 2, w // 2
            pad = self.kernels[i] // 2
            if min(h, w) <= pad:
                raise ValueError(
                    f"SAN with reflection padding (MODEL.SAN.PAD_MODE 'reflect') needs every stage "
                    f"larger than kernel_size // 2 = {pad}: stage {i} (stride {2 ** (i + 1)}) is "
                    f"{h}x{w}; use larger inputs (>= {32 * (max(self.kernels) // 2 + 1)} px for "
                    f"res5) or MODEL.SAN.PAD_MODE 'zeros'"
                )

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(N, C_in, H, W)`` -> ``{name: (N, channels, H / stride, W / stride)}``."""
        if x.dim() != 4:
            raise ValueError(f"SAN takes an input of shape (N, C, H, W), got {tuple(x.shape)}")
        self._check_size(x.shape[2], x.shape[3])
        outputs = {}
        x = self.relu(self.bn_in(self.conv_in(x)))
        for i in range(self.num_stages):
            conv, layer, bn = (getattr(self, f"{name}{i}") for name in ("conv", "layer", "bn"))
            x = self.relu(bn(layer(conv(self.pool(x)))))
            name = f"res{i + 1}"
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    def _stage_module_names(self, stage: int) -> List[str]:
        names = [f"conv{stage}", f"bn{stage}", f"layer{stage}"]
        return (["conv_in", "bn_in"] + names) if stage == 0 else names

    def freeze(self, freeze_at: int = 0) -> "SANBackbone":
        """Freeze the stem (``freeze_at >= 1``) and the stages of ``res2``..``res{freeze_at}``."""
        for stage in range(min(freeze_at, self.num_stages)):
            for name in self._stage_module_names(stage):
                module = getattr(self, name)
                for p in module.parameters():
                    p.requires_grad = False
                setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(module))
        return self


@architecture_keys("MODEL.SAN")
def build_san_net(cfg, input_shape: ShapeSpec) -> SANBackbone:
    """Build the SAN described by ``cfg.MODEL.SAN`` (validated, errors name the config key)."""
    s = cfg.MODEL.SAN
    relation, kernels, norm = _check_san_config(s)
    return SANBackbone(
        s.SA_TYPE,
        SAN_BLOCKS_PER_STAGE[s.DEPTH],
        kernels,
        relation=relation,
        pad_mode=s.PAD_MODE,
        share_planes=s.SHARE_PLANES,
        base_width=s.BASE_WIDTH,
        norm=norm,
        in_channels=input_shape.channels,
        out_features=list(s.OUT_FEATURES),
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )


def _check_san_config(s) -> Tuple[Optional[str], List[int], str]:
    """``(relation or None, kernels, norm)`` of ``MODEL.SAN`` (``s``), or ``ValueError`` naming
    the bad key."""
    if s.DEPTH not in SAN_BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.SAN.DEPTH must be one of {list(SAN_BLOCKS_PER_STAGE)}, got {s.DEPTH!r}"
        )
    if s.SA_TYPE not in SAN_SA_TYPES:
        raise ValueError(
            f"MODEL.SAN.SA_TYPE must be one of {list(SAN_SA_TYPES)}, got {s.SA_TYPE!r}"
        )
    relations = _RELATIONS[s.SA_TYPE]
    relation = s.RELATION or None
    if relation is not None and relation not in relations:
        raise ValueError(
            f"MODEL.SAN.RELATION for {s.SA_TYPE} SAN must be one of {list(relations)} (or '' for "
            f"the official {relations[0]!r}), got {s.RELATION!r}"
        )
    if s.PAD_MODE not in PAD_MODES:
        raise ValueError(f"MODEL.SAN.PAD_MODE must be one of {list(PAD_MODES)}, got {s.PAD_MODE!r}")
    kernels = list(s.KERNELS)
    if len(kernels) != 5:
        raise ValueError(
            f"MODEL.SAN.KERNELS must list 5 footprints (strides 2, 4, 8, 16, 32), got "
            f"{len(kernels)}: {kernels}"
        )
    for k in kernels:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"MODEL.SAN.KERNELS entries must be odd positive ints, got {kernels}")
    norm = check_norm(s.NORM, "MODEL.SAN.NORM")
    base, share = s.BASE_WIDTH, s.SHARE_PLANES
    if isinstance(base, bool) or not isinstance(base, int) or base < 16 or base % 16 != 0:
        raise ValueError(f"MODEL.SAN.BASE_WIDTH must be a positive multiple of 16, got {base!r}")
    check_int("MODEL.SAN.SHARE_PLANES", share)
    if (base // 4) % share != 0:
        raise ValueError(
            f"MODEL.SAN.SHARE_PLANES={share} must divide the SAM width MODEL.SAN.BASE_WIDTH / 4 = "
            f"{base // 4} of the first stage"
        )
    out_features = list(s.OUT_FEATURES)
    if not out_features or any(f not in _FEATURES for f in out_features):
        raise ValueError(
            f"MODEL.SAN.OUT_FEATURES must be a non-empty list of {list(_FEATURES)}, got "
            f"{out_features}"
        )
    return relation, kernels, norm


@BACKBONE_REGISTRY.register()
@architecture_keys("MODEL.SAN")
def build_san_backbone(cfg, input_shape: ShapeSpec) -> SANBackbone:
    """SAN backbone from ``cfg.MODEL.SAN`` (outputs ``MODEL.SAN.OUT_FEATURES``)."""
    return build_san_net(cfg, input_shape)
