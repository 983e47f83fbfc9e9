"""Bad configs fail at build time with errors that list the valid values or name the key."""

import pytest
import torch
from detectron2.modeling import build_backbone, build_model
from tests.helpers.modeling import base_cfg, config_path, tiny_san_cfg, tiny_sasa_cfg


def _sasa(**overrides):
    cfg = tiny_sasa_cfg(**overrides)
    cfg.MODEL.BACKBONE.NAME = "build_sasa_backbone"
    return cfg


def _san(**overrides):
    cfg = tiny_san_cfg(**overrides)
    cfg.MODEL.BACKBONE.NAME = "build_san_backbone"
    return cfg


SASA_CASES = [
    (dict(DEPTH=34), r"MODEL.SASA.DEPTH must be one of \[26, 38, 50\], got 34"),
    (dict(STEM="patchify"), r"MODEL.SASA.STEM must be one of \['conv', 'attention'\]"),
    (dict(STAGE_TYPES=["attention"] * 3), r"MODEL.SASA.STAGE_TYPES must list 4 block types"),
    (dict(STAGE_TYPES=["attention"] * 5), r"MODEL.SASA.STAGE_TYPES must list 4 block types"),
    (
        dict(STAGE_TYPES=["conv", "mlp", "conv", "conv"]),
        r"MODEL.SASA.STAGE_TYPES entries must be one of \['attention', 'conv'\], got 'mlp'",
    ),
    (dict(NUM_HEADS=3), r"MODEL.SASA.NUM_HEADS=3 must divide .* res2 bottleneck has 16 channels"),
    (dict(NUM_HEADS=16), r"MODEL.SASA.NUM_HEADS=16 leaves an odd head width 1 in the res2"),
    (dict(STEM="attention", STEM_NUM_HEADS=3), r"MODEL.SASA.STEM_NUM_HEADS=3 must divide"),
    (dict(KERNEL_SIZE=4), r"MODEL.SASA.KERNEL_SIZE must be odd"),
    (dict(NORM="LN"), r"MODEL.SASA.NORM must be one of \['BN', 'SyncBN', 'FrozenBN', 'GN'"),
    (dict(OUT_FEATURES=["res6"]), r"MODEL.SASA.OUT_FEATURES must be a non-empty list of"),
]


@pytest.mark.parametrize("overrides, match", SASA_CASES, ids=[m[:30] for _, m in SASA_CASES])
def test_bad_sasa_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(_sasa(**overrides))


def test_conv_stages_do_not_check_heads():
    """Heads matter only where there is attention: an all-conv ResNet ignores NUM_HEADS."""
    build_backbone(_sasa(STAGE_TYPES=["conv"] * 4, NUM_HEADS=3))


SAN_CASES = [
    (dict(DEPTH=26), r"MODEL.SAN.DEPTH must be one of \[10, 15, 19\], got 26"),
    (dict(SA_TYPE="pointwise"), r"MODEL.SAN.SA_TYPE must be one of \['pairwise', 'patchwise'\]"),
    (
        dict(RELATION="star"),
        r"MODEL.SAN.RELATION for pairwise SAN must be one of \['subtraction', 'summation', "
        r"'concatenation', 'hadamard', 'dot'\]",
    ),
    (
        dict(SA_TYPE="patchwise", RELATION="subtraction"),
        r"MODEL.SAN.RELATION for patchwise SAN must be one of "
        r"\['concatenation', 'star', 'clique'\]",
    ),
    (dict(PAD_MODE="circular"), r"MODEL.SAN.PAD_MODE must be one of \['zeros', 'reflect'\]"),
    (dict(KERNELS=[3, 7, 7, 7]), r"MODEL.SAN.KERNELS must list 5 footprints"),
    (dict(KERNELS=[3, 7, 6, 7, 7]), r"MODEL.SAN.KERNELS entries must be odd positive ints"),
    (dict(BASE_WIDTH=24), r"MODEL.SAN.BASE_WIDTH must be a positive multiple of 16"),
    (dict(SHARE_PLANES=3), r"MODEL.SAN.SHARE_PLANES=3 must divide"),
    (dict(NORM="IN"), r"MODEL.SAN.NORM must be one of"),
    (dict(OUT_FEATURES=["res1"]), r"MODEL.SAN.OUT_FEATURES must be a non-empty list of"),
]


@pytest.mark.parametrize("overrides, match", SAN_CASES, ids=[m[:30] for _, m in SAN_CASES])
def test_bad_san_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(_san(**overrides))


def test_san_reflection_needs_large_enough_inputs():
    model = build_backbone(_san())
    with pytest.raises(ValueError, match=r"MODEL.SAN.PAD_MODE 'reflect'.*stage 4 .* is 2x2"):
        model(torch.randn(1, 3, 64, 64))
    build_backbone(_san(PAD_MODE="zeros"))(torch.randn(1, 3, 64, 64))  # zeros: fine


def _fpn(**fpn):
    cfg = _sasa()
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_sasa_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.ATTENTION = True
    for key, value in fpn.items():
        setattr(cfg.MODEL.FPN, key, value)
    return cfg


FPN_CASES = [
    (dict(ATTENTION_NUM_HEADS=3), r"MODEL.FPN.ATTENTION_NUM_HEADS=3 must divide .* FPN"),
    (dict(ATTENTION_KERNEL_SIZE=0), r"MODEL.FPN.ATTENTION_KERNEL_SIZE must be an odd positive"),
    (dict(TOP_BLOCK_IN_FEATURE="c5"), r"MODEL.FPN.TOP_BLOCK_IN_FEATURE must be one of"),
    (dict(IN_FEATURES=[]), r"MODEL.FPN.IN_FEATURES is empty"),
    (dict(IN_FEATURES=["res3", "res4", "res6"]), r"MODEL.FPN.IN_FEATURES .* asks for \['res6'\]"),
]


@pytest.mark.parametrize("overrides, match", FPN_CASES, ids=[m[:30] for _, m in FPN_CASES])
def test_bad_fpn_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(_fpn(**overrides))


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("ATTENTION_NUM_HEADS", 5, r"MODEL.RETINANET.ATTENTION_NUM_HEADS=5 must divide .* head"),
        ("ATTENTION_KERNEL_SIZE", 6, r"MODEL.RETINANET.ATTENTION_KERNEL_SIZE must be odd"),
    ],
)
def test_bad_head_config(key, value, match):
    cfg = base_cfg()
    cfg.merge_from_file(config_path("retinanet_sasa26"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RETINANET.HEAD_NAME = "AttentionRetinaNetHead"
    setattr(cfg.MODEL.RETINANET, key, value)
    with pytest.raises(ValueError, match=match):
        build_model(cfg)
