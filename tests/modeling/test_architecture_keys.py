"""Architecture keys registered with the component: every shipped config records what it recorded
before the registry existed, and a backbone family registered outside san_det is checked too.

``architecture_keys.json`` holds, per config, the ``(key, value)`` pairs of
``architecture_config(cfg)`` in order, computed on main before the registry (commit c49a3e8, where
sections were chosen by substrings of the backbone name).
"""

import glob
import json
import os

import pytest
import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_model
from torch import nn

import san_det.classification  # noqa: F401  (registers ImageClassifier)
from san_det.config import get_san_det_cfg, setup_cfg
from san_det.engine.checkpoint import (
    ARCHITECTURE_KEY,
    CheckpointError,
    SafeCheckpointer,
    checkpointer_options,
)
from san_det.errors import UserInputError
from san_det.modeling.architecture import architecture_config, architecture_keys
from tests.helpers.modeling import ROOT

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture_keys.json")) as f:
    RECORDED_ON_MAIN = json.load(f)
CONFIGS = sorted(
    os.path.relpath(path, ROOT).replace(os.sep, "/")
    for path in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
)


def test_main_records_every_shipped_config():
    assert sorted(RECORDED_ON_MAIN) == CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_recorded_keys_are_those_of_main(config):
    cfg = setup_cfg(os.path.join(ROOT, config), ["MODEL.DEVICE", "cpu"], check_output=False)
    got = [[k, v] for k, v in architecture_config(cfg).items()]
    assert got == RECORDED_ON_MAIN[config]


# ---------------------------------------------------------------- a family san_det does not know
class ToyBackbone(Backbone):
    """``conv3x3(3 -> MODEL.TOY.CHANNELS, dilation MODEL.TOY.DILATION)``: input ``(N, 3, H, W)``
    -> ``{"toy": (N, CHANNELS, H, W)}``; the dilation changes no tensor's shape."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=dilation, dilation=dilation)
        self.channels = channels

    def forward(self, x):
        return {"toy": self.conv(x)}

    def output_shape(self):
        return {"toy": ShapeSpec(channels=self.channels, stride=1)}


@BACKBONE_REGISTRY.register()
@architecture_keys("MODEL.TOY")
def build_toy_test_backbone(cfg, input_shape):
    return ToyBackbone(cfg.MODEL.TOY.CHANNELS, cfg.MODEL.TOY.DILATION)


@BACKBONE_REGISTRY.register()
def build_unlisted_toy_test_backbone(cfg, input_shape):  # registers no architecture keys
    return ToyBackbone(cfg.MODEL.TOY.CHANNELS, cfg.MODEL.TOY.DILATION)


def _toy_cfg(dilation=1, backbone="build_toy_test_backbone"):
    cfg = get_san_det_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "ImageClassifier"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.TOY = CfgNode({"CHANNELS": 4, "DILATION": dilation})
    cfg.CLASSIFICATION.IN_FEATURE = "toy"
    cfg.CLASSIFICATION.NUM_CLASSES = 2
    return cfg


def test_a_registered_toy_family_records_its_subtree():
    arch = architecture_config(_toy_cfg())
    assert arch == {
        "MODEL.META_ARCHITECTURE": "ImageClassifier",
        "MODEL.BACKBONE.NAME": "build_toy_test_backbone",
        "MODEL.TOY.CHANNELS": 4,
        "MODEL.TOY.DILATION": 1,
    }


def test_toy_checkpoints_are_checked(tmp_path):
    cfg = _toy_cfg()
    torch.manual_seed(0)
    SafeCheckpointer(build_model(cfg), str(tmp_path), **checkpointer_options(cfg)).save("toy")
    path = str(tmp_path / "toy.pth")
    assert torch.load(path)[ARCHITECTURE_KEY]["MODEL.TOY.DILATION"] == 1
    other = _toy_cfg(dilation=2)  # same tensors, another network
    with pytest.raises(CheckpointError, match="MODEL.TOY.DILATION 1 there, 2 here"):
        SafeCheckpointer(build_model(other), **checkpointer_options(other)).load(
            path, checkpointables=[], strict=True
        )
    same = build_model(_toy_cfg())
    SafeCheckpointer(same, **checkpointer_options(cfg)).load(path, checkpointables=[], strict=True)
    torch.testing.assert_close(
        same.backbone.conv.weight, torch.load(path)["model"]["backbone.conv.weight"]
    )


def test_an_unregistered_backbone_is_a_clear_error():
    with pytest.raises(UserInputError) as info:
        architecture_config(_toy_cfg(backbone="build_unlisted_toy_test_backbone"))
    message = str(info.value)
    assert message.startswith(
        "MODEL.BACKBONE.NAME 'build_unlisted_toy_test_backbone' registered no architecture keys"
    )
    assert "register_architecture_keys('build_unlisted_toy_test_backbone', [" in message
