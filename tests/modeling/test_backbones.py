"""Every registered san_det backbone builds, runs forward/backward and describes itself."""

import math

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
from tests.helpers.modeling import GradientAudit, base_cfg, tiny_san_cfg, tiny_sasa_cfg
from torch import nn

from san_det.modeling import AttentionFPN, SANBackbone, SASAResNet

OUR_BUILDERS = (
    "build_sasa_backbone",
    "build_sasa_fpn_backbone",
    "build_retinanet_sasa_fpn_backbone",
    "build_san_backbone",
    "build_san_fpn_backbone",
    "build_retinanet_san_fpn_backbone",
)


def test_builders_are_registered():
    registered = {name for name, _ in BACKBONE_REGISTRY}
    assert set(OUR_BUILDERS) <= registered


def _sasa_variants():
    yield "conv_stem", {}
    yield "attention_stem", dict(STEM="attention")
    yield "table3_mixed", dict(STAGE_TYPES=["conv", "attention", "conv", "attention"])
    yield "kernel3_heads2", dict(KERNEL_SIZE=3, NUM_HEADS=2)
    yield "gn", dict(NORM="GN", STEM_OUT_CHANNELS=32, RES2_OUT_CHANNELS=64, WIDTH_PER_GROUP=32)
    yield "syncbn", dict(NORM="SyncBN")
    yield "zero_init", dict(ZERO_INIT_RESIDUAL=True)


def _san_variants():
    yield "pairwise", {}
    yield "patchwise", dict(SA_TYPE="patchwise")
    for relation in ("summation", "concatenation", "hadamard", "dot"):
        yield f"pairwise_{relation}", dict(RELATION=relation)
    for relation in ("star", "clique"):
        yield f"patchwise_{relation}", dict(SA_TYPE="patchwise", RELATION=relation)
    yield "zeros_padding", dict(PAD_MODE="zeros")
    yield "gn", dict(NORM="GN")


CASES = []
for builder in OUR_BUILDERS:
    family = "sasa" if "sasa" in builder else "san"
    variants = _sasa_variants() if family == "sasa" else _san_variants()
    for vname, overrides in variants:
        # Every variant once on the plain backbone; the FPN builders with the defaults and with
        # the attentional FPN.
        if builder in ("build_sasa_backbone", "build_san_backbone"):
            CASES.append((builder, vname, overrides, False))
        elif vname in ("conv_stem", "pairwise"):
            CASES.append((builder, vname, overrides, False))
            CASES.append((builder, vname, overrides, True))


def _build(builder, overrides, fpn_attention):
    family = "sasa" if "sasa" in builder else "san"
    cfg = tiny_sasa_cfg(**overrides) if family == "sasa" else tiny_san_cfg(**overrides)
    cfg.MODEL.BACKBONE.NAME = builder
    if "fpn" in builder:
        features = ["res2", "res3", "res4", "res5"] if "retinanet" not in builder else None
        cfg.MODEL.FPN.IN_FEATURES = features or ["res3", "res4", "res5"]
        cfg.MODEL.FPN.ATTENTION = fpn_attention
        cfg.MODEL.FPN.ATTENTION_NUM_HEADS = 4
    # SAN's reflection padding needs res5 > 3x3; P7's attention needs P6 > 1x1 to get gradients
    # for its queries, keys and embeddings (one key gives a softmax of 1).
    small = (family == "sasa" or cfg.MODEL.SAN.PAD_MODE == "zeros") and "retinanet" not in builder
    size = 64 if small else 128
    return build_backbone(cfg), size


@pytest.mark.parametrize(
    "builder, variant, overrides, fpn_attention",
    CASES,
    ids=[f"{b}-{v}{'-attnfpn' if a else ''}" for b, v, _, a in CASES],
)
def test_forward_backward_shapes(builder, variant, overrides, fpn_attention):
    model, size = _build(builder, overrides, fpn_attention)
    model.train()
    assert model.size_divisibility == 32
    x = torch.randn(2, 3, size, size)
    audit = GradientAudit(model)
    outputs = model(x)
    shapes = model.output_shape()
    assert list(outputs) == list(shapes)
    loss = 0
    for name, out in outputs.items():
        spec = shapes[name]
        side = math.ceil(size / spec.stride)
        assert tuple(out.shape) == (2, spec.channels, side, side), name
        assert torch.isfinite(out).all(), name
        loss = loss + out.square().mean()
    loss.backward()
    # Zero-initialised residual norms stop the gradient of their branch at initialisation.
    audit.check(nonzero=variant != "zero_init")
    if fpn_attention:
        assert isinstance(model, AttentionFPN)


def _full_cfg(family, **overrides):
    cfg = base_cfg()
    node = cfg.MODEL.SASA if family == "sasa" else cfg.MODEL.SAN
    node.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    for key, value in overrides.items():
        setattr(node, key, value)
    return cfg


@pytest.mark.parametrize("family", ["sasa", "san"])
def test_output_shape_of_full_size_backbones(family):
    cfg = _full_cfg(family)
    cfg.MODEL.BACKBONE.NAME = f"build_{family}_backbone"
    model = build_backbone(cfg)
    assert isinstance(model, SASAResNet if family == "sasa" else SANBackbone)
    expected = {
        "res2": ShapeSpec(channels=256, stride=4),
        "res3": ShapeSpec(channels=512, stride=8),
        "res4": ShapeSpec(channels=1024, stride=16),
        "res5": ShapeSpec(channels=2048, stride=32),
    }
    assert model.output_shape() == expected


def test_san_keeps_official_module_names():
    model = build_backbone(_with_name(_full_cfg("san", DEPTH=10), "build_san_backbone"))
    names = set(model.state_dict())
    for expected in (
        "conv_in.weight",
        "bn_in.running_mean",
        "conv0.weight",
        "bn0.weight",
        "layer0.0.bn1.weight",
        "layer0.0.sam.conv1.weight",
        "layer0.0.sam.conv2.bias",
        "layer0.0.sam.conv3.weight",
        "layer0.0.sam.conv_w.0.weight",
        "layer0.0.sam.conv_w.5.bias",
        "layer0.0.sam.conv_p.weight",
        "layer0.0.bn2.weight",
        "layer0.0.conv.bias",
        "conv4.weight",
        "bn4.weight",
        "layer4.0.conv.weight",
    ):
        assert expected in names, expected
    assert "conv_in.bias" not in names and "conv1.bias" not in names  # official 1x1s: no bias


def _with_name(cfg, name):
    cfg.MODEL.BACKBONE.NAME = name
    return cfg


def test_out_features_truncate_unused_stages():
    cfg = _full_cfg("san", DEPTH=10, OUT_FEATURES=["res2", "res3"])
    cfg = _with_name(cfg, "build_san_backbone")
    model = build_backbone(cfg)
    assert hasattr(model, "layer2") and not hasattr(model, "layer3")
    cfg = _with_name(_full_cfg("sasa", DEPTH=26, OUT_FEATURES=["res3"]), "build_sasa_backbone")
    model = build_backbone(cfg)
    assert hasattr(model, "res3") and not hasattr(model, "res4")


def _frozen_groups(model, family):
    """Map each stage name (stem, res2..res5) to its parameters and modules."""
    if family == "sasa":
        groups = {"stem": model.stem}
        groups.update({f"res{i}": getattr(model, f"res{i}") for i in range(2, 6)})
        return groups
    stem = [model.conv_in, model.bn_in, model.conv0, model.bn0, model.layer0]
    groups = {"stem": nn.ModuleList(stem)}
    for i in range(1, 5):
        groups[f"res{i + 1}"] = nn.ModuleList(
            [getattr(model, f"conv{i}"), getattr(model, f"bn{i}"), getattr(model, f"layer{i}")]
        )
    return groups


@pytest.mark.parametrize("family, stem", [("sasa", "conv"), ("sasa", "attention"), ("san", None)])
@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at(family, stem, freeze_at):
    cfg = tiny_sasa_cfg() if family == "sasa" else tiny_san_cfg()
    if stem:
        cfg.MODEL.SASA.STEM = stem
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.BACKBONE.NAME = f"build_{family}_backbone"
    model = build_backbone(cfg)
    order = ["stem", "res2", "res3", "res4", "res5"]
    for index, (name, group) in enumerate(_frozen_groups(model, family).items()):
        frozen = index < freeze_at
        assert name == order[index]
        params = list(group.parameters())
        assert params, name
        assert all(p.requires_grad != frozen for p in params), name
        norms = [m for m in group.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert norms, name
        assert all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms), name
    if 0 < freeze_at < 5:  # the rest still trains
        size = 64 if family == "sasa" else 128
        audit = GradientAudit(model)
        out = model(torch.randn(1, 3, size, size))
        sum(o.square().mean() for o in out.values()).backward()
        audit.check()


@pytest.mark.parametrize("norm, kind", [("GN", nn.GroupNorm), ("FrozenBN", FrozenBatchNorm2d)])
def test_san_norm_reaches_the_attention_mlp(norm, kind):
    """MODEL.SAN.NORM is every norm of the network, SAM's conv_w included (its norm_layer)."""
    cfg = tiny_san_cfg(NORM=norm)
    cfg.MODEL.BACKBONE.NAME = "build_san_backbone"
    model = build_backbone(cfg)
    sams = [m for m in model.modules() if type(m).__name__ == "SAM"]
    assert sams
    for sam in sams:
        assert isinstance(sam.conv_w[0], kind) and isinstance(sam.conv_w[3], kind)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
