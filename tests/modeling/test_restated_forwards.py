"""Every backbone, FPN (with its top block) and RetinaNet head equals its forward restated in
plain torch (``tests/helpers/restated.py``), in float64 with random norm statistics: a dropped
residual add, a missing ReLU or a wrong level changes the values, not only the shapes."""

import os

import pytest
import torch
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from tests.helpers.modeling import base_cfg, config_path, tiny_san_cfg, tiny_sasa_cfg
from tests.helpers.paths import config_path as repo_config
from tests.helpers.restated import (
    assert_close_f64,
    assert_retinanet_runs_the_restated_network,
    randomize_norms,
    restated_attention_head,
    restated_fpn,
    restated_resnet,
    restated_san,
)

from san_det.modeling import (
    AttentionFPN,
    AttentionRetinaNetHead,
    LastLevelP6P7Attention,
    SANBackbone,
)


def _shipped(folder):
    """The leaf configs of ``configs/<folder>`` (``Base-*`` only hold shared keys)."""
    names = os.listdir(repo_config(folder))
    return sorted(os.path.splitext(n)[0] for n in names if not n.startswith("Base-"))


SHIPPED = _shipped("COCO-Detection")


def _eval64(model):
    return randomize_norms(model.double().eval())


def _check_features(model, restated, x):
    with torch.no_grad():
        actual, expected = model(x), restated(model, x)
    assert list(actual) == list(expected)
    for name in expected:
        assert_close_f64(actual[name], expected[name], name)


SASA_CASES = [
    *[(f"sasa{d}_{stem}_stem", dict(DEPTH=d, STEM=stem)) for d in (26, 38, 50)
      for stem in ("conv", "attention")],
    ("table3_mixed", dict(STAGE_TYPES=["conv", "attention", "conv", "attention"])),
    ("kernel3_heads2", dict(KERNEL_SIZE=3, NUM_HEADS=2)),
    ("gn", dict(NORM="GN", STEM_OUT_CHANNELS=32, RES2_OUT_CHANNELS=64, WIDTH_PER_GROUP=32)),
    ("stride_in_1x1", dict(STAGE_TYPES=["conv"] * 4, STRIDE_IN_1X1=False)),
]  # fmt: skip


@pytest.mark.parametrize("overrides", [c[1] for c in SASA_CASES], ids=[c[0] for c in SASA_CASES])
def test_sasa_resnet_equals_restated_forward(overrides):
    cfg = tiny_sasa_cfg(**overrides)
    cfg.MODEL.SASA.OUT_FEATURES = ["stem", "res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.NAME = "build_sasa_backbone"
    model = _eval64(build_backbone(cfg))
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    _check_features(model, restated_resnet, x)


def test_detectron2_resnet_equals_restated_forward():
    """The R50 baseline's bottom-up network (detectron2's ``build_resnet_backbone``)."""
    cfg = base_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.WIDTH_PER_GROUP = 50, 8, 16, 4
    r.NORM, r.OUT_FEATURES = "BN", ["res2", "res3", "res4", "res5"]
    model = _eval64(build_backbone(cfg))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    _check_features(model, restated_resnet, x)


SAN_CASES = [
    *[(f"san{d}_{t}", dict(DEPTH=d, SA_TYPE=t)) for d in (10, 15, 19)
      for t in ("pairwise", "patchwise")],
    ("pairwise_dot_zeros", dict(RELATION="dot", PAD_MODE="zeros")),
    ("patchwise_star_gn", dict(SA_TYPE="patchwise", RELATION="star", NORM="GN")),
]  # fmt: skip


@pytest.mark.parametrize("overrides", [c[1] for c in SAN_CASES], ids=[c[0] for c in SAN_CASES])
def test_san_equals_restated_forward(overrides):
    cfg = tiny_san_cfg(**overrides)
    cfg.MODEL.SAN.BASE_WIDTH = 16
    cfg.MODEL.SAN.SHARE_PLANES = 4
    cfg.MODEL.BACKBONE.NAME = "build_san_backbone"
    model = _eval64(build_backbone(cfg))
    x = torch.randn(1, 3, 128, 128, dtype=torch.float64)
    _check_features(model, restated_san, x)


FPN_CASES = [
    (b, attention, top, fuse, "")
    for b in ("build_sasa_fpn_backbone", "build_retinanet_sasa_fpn_backbone",
              "build_san_fpn_backbone", "build_retinanet_san_fpn_backbone")
    for attention in (False, True)
    for top, fuse in ((("res5", "sum"), ("p5", "avg")) if "retinanet" in b else (("", "sum"),))
] + [("build_retinanet_sasa_fpn_backbone", attention, "res5", "sum", "GN")
     for attention in (False, True)]  # fmt: skip


@pytest.mark.parametrize(
    "builder, attention, top, fuse, norm",
    FPN_CASES,
    ids=[f"{b}-{'attn' if a else 'conv'}{'-' + t if t else ''}-{f}{'-' + n if n else ''}"
         for b, a, t, f, n in FPN_CASES],
)  # fmt: skip
def test_fpn_and_top_block_equal_restated_forward(builder, attention, top, fuse, norm):
    san = "san" in builder
    cfg = tiny_san_cfg(PAD_MODE="zeros", BASE_WIDTH=16, SHARE_PLANES=4) if san else tiny_sasa_cfg()
    cfg.MODEL.BACKBONE.NAME = builder
    retina = "retinanet" in builder
    cfg.MODEL.FPN.IN_FEATURES = [f"res{i}" for i in ((3, 4, 5) if retina else (2, 3, 4, 5))]
    cfg.MODEL.FPN.ATTENTION = attention
    cfg.MODEL.FPN.ATTENTION_NUM_HEADS = 4
    cfg.MODEL.FPN.FUSE_TYPE = fuse
    cfg.MODEL.FPN.NORM = norm
    if top:
        cfg.MODEL.FPN.TOP_BLOCK_IN_FEATURE = top
    fpn = _eval64(build_backbone(cfg))
    assert isinstance(fpn, AttentionFPN) == attention
    expected_top = (LastLevelP6P7Attention if attention else LastLevelP6P7) if retina else None
    assert type(fpn.top_block) is (expected_top or LastLevelMaxPool)
    for name, module in fpn.named_children():
        if name.startswith(("fpn_lateral", "fpn_output")):
            assert (module.norm is not None) == bool(norm), name
    x = torch.randn(2, 3, 128, 96, dtype=torch.float64)
    with torch.no_grad():
        expected = restated_fpn(fpn, x)
    assert list(expected) == [f"p{i}" for i in ((3, 4, 5, 6, 7) if retina else (2, 3, 4, 5, 6))]
    _check_features(fpn, lambda *_: expected, x)


@pytest.mark.parametrize("norm", ["", "BN", "GN"])
def test_attention_head_equals_restated_forward(norm):
    from detectron2.layers import ShapeSpec

    shapes = [ShapeSpec(channels=32, stride=s) for s in (8, 16, 32)]
    head = AttentionRetinaNetHead(
        input_shape=shapes, num_classes=3, num_anchors=2, conv_dims=[32, 32], norm=norm,
        kernel_size=5, num_heads=4, value_init_std=0.5,
    )  # fmt: skip
    for conv in (head.cls_score, head.bbox_pred):  # predictions of the size of the features
        torch.nn.init.normal_(conv.weight, std=0.5)
    head = _eval64(head)
    for layer in [*head.cls_subnet, *head.bbox_subnet]:
        assert (layer.norm is not None) == bool(norm)
    features = [torch.randn(2, 32, s, s + 1, dtype=torch.float64) for s in (12, 6, 3)]
    with torch.no_grad():
        logits, boxes = head(features)
        expected_logits, expected_boxes = restated_attention_head(head, features)
    for level in range(3):
        assert logits[level].shape == (2, 2 * 3, *features[level].shape[2:])
        assert_close_f64(logits[level], expected_logits[level], f"logits level {level}")
        assert_close_f64(boxes[level], expected_boxes[level], f"boxes level {level}")


@pytest.mark.parametrize("head_name", ["RetinaNetHead", "AttentionRetinaNetHead"])
def test_san_det_retinanet_runs_the_restated_network(head_name):
    """The whole detector: normalised images -> restated SASA ResNet -> restated attentional FPN
    -> the head's inputs, in MODEL.RETINANET.IN_FEATURES order -> the restated head's outputs."""
    cfg = tiny_sasa_cfg(STEM="attention")
    cfg.merge_from_file(config_path("Base-RetinaNet"))
    cfg.MODEL.META_ARCHITECTURE = "SanDetRetinaNet"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_sasa_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.FPN.ATTENTION = True
    cfg.MODEL.FPN.ATTENTION_NUM_HEADS = 4
    cfg.MODEL.RETINANET.HEAD_NAME = head_name
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    cfg.MODEL.RETINANET.NORM = "BN"
    cfg.MODEL.RETINANET.ATTENTION_NUM_HEADS = 4
    cfg.MODEL.RETINANET.ATTENTION_VALUE_INIT_STD = 0.5
    model = _eval64(build_model(cfg))
    for conv in (model.head.cls_score, model.head.bbox_pred):
        torch.nn.init.normal_(conv.weight, std=0.5)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    assert_retinanet_runs_the_restated_network(model, images.to(torch.uint8))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_detector_runs_the_restated_network(name):
    """Each shipped COCO config as it is (full widths, its own heads and FPN), one 64 px image
    (128 px for SAN's reflection padding)."""
    cfg = base_cfg()
    cfg.merge_from_file(config_path(name))
    cfg.MODEL.WEIGHTS = ""
    model = _eval64(build_model(cfg))
    size = 128 if cfg.MODEL.BACKBONE.NAME == "build_retinanet_san_fpn_backbone" else 64
    images = torch.randint(0, 256, (1, 3, size, size), generator=torch.Generator().manual_seed(1))
    assert_retinanet_runs_the_restated_network(model, images.to(torch.uint8))


CLASSIFIERS = _shipped("ImageNet")


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_shipped_classifier_equals_restated_forward(name):
    """Each shipped ImageNet config: restated backbone, global average pool, linear layer."""
    cfg = base_cfg()
    cfg.merge_from_file(repo_config("ImageNet", f"{name}.yaml"))
    cfg.MODEL.WEIGHTS = ""
    model = _eval64(build_model(cfg))
    torch.nn.init.normal_(model.classifier.weight, std=0.5)
    san = isinstance(model.backbone, SANBackbone)
    size = 128 if san else 64
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        logits = model.forward_head(model.forward_features(x))
        features = (restated_san if san else restated_resnet)(model.backbone, x)
        pooled = features[model.in_feature].mean(dim=(2, 3))
        expected = pooled @ model.classifier.weight.T + model.classifier.bias
    assert logits.shape == (1, cfg.CLASSIFICATION.NUM_CLASSES)
    assert_close_f64(logits, expected, "logits")
