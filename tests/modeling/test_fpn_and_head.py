"""Attentional FPN and RetinaNet head: same interfaces as detectron2's, attention inside."""

import inspect
import math

import pytest
import torch
from detectron2.layers import CycleBatchNormList, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model
from detectron2.modeling.backbone.fpn import FPN
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from tests.helpers.modeling import base_cfg, config_path, tiny_sasa_cfg
from torch import nn

import san_det.modeling
from san_det.layers.local_attention import LocalSelfAttention2d
from san_det.modeling import (
    FPN_BACKBONES,
    AttentionConv2d,
    AttentionFPN,
    AttentionRetinaNetHead,
    LastLevelP6P7Attention,
    SanDetRetinaNet,
    build_retinanet_head,
)


def _fpn_cfg(attention, top="res5"):
    cfg = tiny_sasa_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_sasa_fpn_backbone"
    cfg.MODEL.FPN.ATTENTION = attention
    cfg.MODEL.FPN.ATTENTION_NUM_HEADS = 4
    cfg.MODEL.FPN.TOP_BLOCK_IN_FEATURE = top
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    return cfg


@pytest.mark.parametrize("top", ["res5", "p5"])
def test_attention_fpn_has_fpn_interface(top):
    conv_fpn = build_backbone(_fpn_cfg(False, top))
    att_fpn = build_backbone(_fpn_cfg(True, top))
    assert type(conv_fpn) is FPN and isinstance(att_fpn, AttentionFPN)
    assert att_fpn.output_shape() == conv_fpn.output_shape()
    assert list(att_fpn.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    # Output convs and P6/P7 are attention; the lateral 1x1 convs are not.
    for stage in (3, 4, 5):
        assert isinstance(getattr(att_fpn, f"fpn_output{stage}"), AttentionConv2d)
        assert isinstance(getattr(att_fpn, f"fpn_lateral{stage}"), nn.Conv2d)
    assert att_fpn.output_convs == [att_fpn.fpn_output5, att_fpn.fpn_output4, att_fpn.fpn_output3]
    assert isinstance(att_fpn.top_block, LastLevelP6P7Attention)
    assert att_fpn.top_block.in_feature == top
    p6 = att_fpn.top_block.p6.attention
    assert p6.stride == 2 and p6.in_channels == (256 if top == "res5" else 32)  # tiny res5: 32 * 8
    # No 3x3 conv is left outside the bottom-up network.
    for name, module in att_fpn.named_modules():
        if isinstance(module, nn.Conv2d) and not name.startswith("bottom_up"):
            assert module.kernel_size == (1, 1), name


def test_attention_fpn_odd_sizes():
    """Strided attention pools with ceil_mode: P6/P7 match detectron2's strided 3x3 convs."""
    conv_fpn = build_backbone(_fpn_cfg(False)).eval()
    att_fpn = build_backbone(_fpn_cfg(True)).eval()
    x = torch.randn(1, 3, 160, 96)  # res5 5x3 -> p6 3x2 -> p7 2x1
    with torch.no_grad():
        a, b = conv_fpn(x), att_fpn(x)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert b["p6"].shape[-2:] == (3, 2) and b["p7"].shape[-2:] == (2, 1)


def _head_cfg(norm=""):
    cfg = base_cfg()
    cfg.merge_from_file(config_path("Base-RetinaNet"))  # 9 anchors per position
    cfg.MODEL.RETINANET.NUM_CLASSES = 5
    cfg.MODEL.RETINANET.NORM = norm
    cfg.MODEL.RETINANET.HEAD_NAME = "AttentionRetinaNetHead"
    return cfg


SHAPES = [ShapeSpec(channels=256, stride=s) for s in (8, 16, 32, 64, 128)]


def test_attention_head_output_format_equals_retinanet_head():
    cfg = _head_cfg()
    conv_head, att_head = RetinaNetHead(cfg, SHAPES), build_retinanet_head(cfg, SHAPES)
    assert isinstance(att_head, AttentionRetinaNetHead)
    sizes = [(math.ceil(64 / s.stride), math.ceil(48 / s.stride)) for s in SHAPES]
    features = [torch.randn(2, 256, h, w) for h, w in sizes]
    conv_out, att_out = conv_head(features), att_head(features)
    assert len(att_out) == 2
    for a, b in zip(conv_out, att_out):
        assert [t.shape for t in a] == [t.shape for t in b]
    assert att_out[0][0].shape == (2, 9 * 5, 8, 6) and att_out[1][0].shape == (2, 9 * 4, 8, 6)


def test_attention_head_structure_and_init():
    head = build_retinanet_head(_head_cfg(), SHAPES)
    assert len(head.cls_subnet) == 4 and len(head.bbox_subnet) == 4
    for layer in list(head.cls_subnet) + list(head.bbox_subnet):
        att = layer.attention
        assert isinstance(att, LocalSelfAttention2d)
        config = (att.in_channels, att.out_channels, att.kernel_size, att.num_heads)
        assert config == (256, 256, 7, 8)
        assert isinstance(layer.activation, nn.ReLU)
        # Value projections from N(0, 0.01): 65536 samples, std within 2%.
        assert abs(att.value.weight.std().item() - 0.01) < 2e-4
        assert abs(att.value.weight.mean().item()) < 2e-4
    # Final pointwise convs mix the heads; prior-probability bias on the class logits.
    assert head.cls_score.kernel_size == (1, 1) and head.bbox_pred.kernel_size == (1, 1)
    prior = torch.sigmoid(head.cls_score.bias)
    torch.testing.assert_close(prior, torch.full_like(prior, 0.01))
    assert torch.all(head.bbox_pred.bias == 0)
    # No 3x3 conv anywhere in the head.
    assert all(m.kernel_size == (1, 1) for m in head.modules() if isinstance(m, nn.Conv2d))


def test_attention_head_shares_weights_across_levels_with_per_level_bn():
    head = build_retinanet_head(_head_cfg("BN"), SHAPES)
    assert isinstance(head.cls_subnet[0].norm, CycleBatchNormList)
    assert len(head.cls_subnet[0].norm) == len(SHAPES)
    ids = {id(p) for p in head.parameters()}
    assert len(ids) == len(list(head.parameters()))  # one set of weights, applied to every level
    features = [torch.randn(2, 256, 4, 4) for _ in SHAPES]
    head.train()
    logits, deltas = head(features)
    (sum(t.square().mean() for t in logits) + sum(t.square().mean() for t in deltas)).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_san_det_retinanet_default_head_is_detectron2s():
    cfg = base_cfg()
    cfg.merge_from_file(config_path("retinanet_R_50_FPN_1x"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "SanDetRetinaNet"
    ours = build_model(cfg)
    assert isinstance(ours, SanDetRetinaNet) and type(ours.head) is RetinaNetHead
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    theirs = build_model(cfg)
    assert type(theirs) is RetinaNet
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


def test_head_name_and_fpn_attention_are_checked():
    cfg = base_cfg()
    cfg.merge_from_file(config_path("retinanet_R_50_FPN_1x"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "SanDetRetinaNet"
    cfg.MODEL.RETINANET.HEAD_NAME = "DeformableHead"
    valid = r"\['AttentionRetinaNetHead', 'RetinaNetHead'\]"
    with pytest.raises(ValueError, match=r"HEAD_NAME must be one of " + valid):
        build_model(cfg)
    cfg.MODEL.RETINANET.HEAD_NAME = "RetinaNetHead"
    cfg.MODEL.FPN.ATTENTION = True  # detectron2's resnet FPN builder ignores the key
    with pytest.raises(ValueError, match="MODEL.FPN.ATTENTION is set but MODEL.BACKBONE.NAME"):
        build_model(cfg)


def _comparable_vars(fpn: FPN) -> dict:
    """``vars(fpn)`` with each child module (alone or in a list) replaced by its name."""
    names = {id(module): name for name, module in fpn.named_children()}

    def comparable(value):
        if isinstance(value, nn.Module):
            return names[id(value)]
        if isinstance(value, (list, tuple)) and any(isinstance(v, nn.Module) for v in value):
            return [names[id(v)] for v in value]
        return value

    state = {name: comparable(value) for name, value in vars(fpn).items()}
    state["_modules"] = list(fpn._modules)  # the children's names, in order
    return state


@pytest.mark.parametrize("top", ["res5", "p5"])
def test_attention_fpn_has_every_attribute_of_the_installed_fpn(top):
    """AttentionFPN against a real FPN built by the installed detectron2: the same attributes with
    the same values (children compared by name, in order), and every property FPN defines (e.g.
    size_divisibility, and padding_constraints where detectron2 has it) gives the same value."""
    conv_fpn = build_backbone(_fpn_cfg(False, top))
    att_fpn = build_backbone(_fpn_cfg(True, top))
    assert type(conv_fpn) is FPN
    ours, theirs = _comparable_vars(att_fpn), _comparable_vars(conv_fpn)
    assert sorted(set(theirs) ^ set(ours)) == []  # attributes only one of them has
    for name in theirs:
        assert ours[name] == theirs[name], name
    properties = [name for name, _ in inspect.getmembers(FPN, lambda a: isinstance(a, property))]
    assert "size_divisibility" in properties
    for name in properties:
        assert getattr(att_fpn, name) == getattr(conv_fpn, name), name
    assert att_fpn.size_divisibility == 32
    assert att_fpn.lateral_convs == [
        att_fpn.fpn_lateral5,
        att_fpn.fpn_lateral4,
        att_fpn.fpn_lateral3,
    ]


def test_attention_fpn_keeps_fpns_arguments_and_norms():
    """Keywords AttentionFPN does not know go to FPN.__init__; each attention layer takes the norm
    FPN built for the conv it replaces."""
    cfg = _fpn_cfg(True)
    cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.FPN.FUSE_TYPE = "avg"
    fpn = build_backbone(cfg)
    assert fpn._fuse_type == "avg"
    for stage in (3, 4, 5):
        output = getattr(fpn, f"fpn_output{stage}")
        assert isinstance(output.norm, nn.GroupNorm) and output.norm.num_channels == 32
        assert isinstance(getattr(fpn, f"fpn_lateral{stage}").norm, nn.GroupNorm)
    with pytest.raises(TypeError, match="no_such_argument"):
        AttentionFPN(fpn.bottom_up, ["res3", "res4", "res5"], 32, no_such_argument=1)
    with pytest.raises(ValueError, match="fuse_type must be 'avg' or 'sum'"):
        AttentionFPN(fpn.bottom_up, ["res3", "res4", "res5"], 32, fuse_type="max")


def _retinanet_cfg(head_name):
    cfg = _fpn_cfg(False)
    cfg.merge_from_file(config_path("Base-RetinaNet"))
    cfg.MODEL.META_ARCHITECTURE = "SanDetRetinaNet"
    cfg.MODEL.RETINANET.HEAD_NAME = head_name
    cfg.MODEL.RETINANET.ATTENTION_NUM_HEADS = 4
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    return cfg


@pytest.mark.parametrize("head_name", ["RetinaNetHead", "AttentionRetinaNetHead"])
def test_san_det_retinanet_changes_only_the_head(head_name):
    """SanDetRetinaNet.from_config gives RetinaNet.from_config's arguments, value for value (the
    same seed builds the same backbone), with the head of MODEL.RETINANET.HEAD_NAME."""
    cfg = _retinanet_cfg(head_name)
    torch.manual_seed(0)
    theirs = RetinaNet.from_config(cfg)
    torch.manual_seed(0)
    ours = SanDetRetinaNet.from_config(cfg)
    assert set(ours) == set(theirs)
    assert type(ours["head"]).__name__ == head_name
    if head_name == "RetinaNetHead":
        _assert_same_weights(ours["head"], theirs["head"])
    _assert_same_weights(ours["backbone"], theirs["backbone"])
    modules = ("backbone", "head", "anchor_generator", "box2box_transform", "anchor_matcher")
    for key in set(theirs) - set(modules):
        assert ours[key] == theirs[key], key
    assert ours["box2box_transform"].weights == theirs["box2box_transform"].weights
    a, b = ours["anchor_matcher"], theirs["anchor_matcher"]
    assert (a.thresholds, a.labels, a.allow_low_quality_matches) == (
        b.thresholds,
        b.labels,
        b.allow_low_quality_matches,
    )
    a, b = ours["anchor_generator"], theirs["anchor_generator"]
    assert type(a) is type(b) and a.strides == b.strides and a.offset == b.offset
    for x, y in zip(a.cell_anchors, b.cell_anchors):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_fpn_backbone_table_is_registered():
    for name in FPN_BACKBONES:
        registered = BACKBONE_REGISTRY.get(name)
        assert registered is getattr(san_det.modeling, name)
        assert registered.__name__ == name and registered.__doc__


def test_bad_head_name_fails_before_the_backbone_is_built(monkeypatch):
    def refuse(cls, cfg):
        raise AssertionError("RetinaNet.from_config was called: the backbone would be built")

    monkeypatch.setattr(RetinaNet, "from_config", classmethod(refuse))
    cfg = _fpn_cfg(False)
    cfg.MODEL.META_ARCHITECTURE = "SanDetRetinaNet"
    cfg.MODEL.RETINANET.HEAD_NAME = "DeformableHead"
    with pytest.raises(ValueError, match="HEAD_NAME must be one of"):
        build_model(cfg)
