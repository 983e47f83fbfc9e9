"""Pretrained classifier -> detection backbone: every backbone weight, identical outputs, errors."""

import logging
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from san_det.classification.checkpoint import (
    CLASSIFIER_INFO_KEY,
    ClassifierCheckpointer,
    ClassifierInfo,
    classifier_info_from_cfg,
    classifier_to_detection_state_dict,
    detection_backbone_prefix,
    is_classifier_checkpoint,
    load_classifier_into_detector,
)
from san_det.config import get_san_det_cfg
from san_det.errors import CheckpointError
from tests.helpers.classification import tiny_san_cfg, tiny_sasa_cfg
from tests.helpers.paths import config_path
from tests.helpers.scripts import load_script

COCO = config_path("COCO-Detection")


def _detection_cfg(name, cls_cfg, family):
    cfg = get_san_det_cfg(os.path.join(COCO, name))
    cfg.MODEL.DEVICE = "cpu"
    # The detector's backbone is the classifier's, at the same tiny size.
    getattr(cfg.MODEL, family).merge_from_other_cfg(getattr(cls_cfg.MODEL, family))
    getattr(cfg.MODEL, family).OUT_FEATURES = ["res3", "res4", "res5"]
    getattr(cfg.MODEL, family).NORM = "SyncBN"  # as the detection configs; same keys as BN
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    return cfg


def _randomise_norm_statistics(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def _save_classifier(cfg, tmp_path):
    torch.manual_seed(0)
    classifier = build_model(cfg)
    _randomise_norm_statistics(classifier)  # buffers must be transferred too
    checkpointer = ClassifierCheckpointer(classifier, str(tmp_path))
    info = ClassifierInfo(classifier_info_from_cfg(cfg))
    checkpointer.add_checkpointable(CLASSIFIER_INFO_KEY, info)
    checkpointer.save("classifier")
    return classifier.eval(), str(tmp_path / "classifier.pth")


class _RecordingCheckpointer(ClassifierCheckpointer):
    """Keeps the checkpoint as read and what loading it left incompatible."""

    def _load_model(self, checkpoint):
        self.seen = dict(checkpoint)
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


@pytest.mark.parametrize(
    "cls_cfg, detection_config, family",
    [
        (tiny_sasa_cfg, "retinanet_sasa26.yaml", "SASA"),
        (
            lambda: tiny_sasa_cfg(**{"MODEL.SASA.STEM": "attention"}),
            "retinanet_sasa26.yaml",
            "SASA",
        ),
        (tiny_san_cfg, "retinanet_san10_pairwise.yaml", "SAN"),
    ],
    ids=["sasa26", "sasa26_attention_stem", "san10_pairwise"],
)
def test_classifier_weights_flow_into_retinanet(cls_cfg, detection_config, family, tmp_path):
    cls_cfg = cls_cfg()
    classifier, path = _save_classifier(cls_cfg, tmp_path)
    det_cfg = _detection_cfg(detection_config, cls_cfg, family)
    if family == "SASA":
        det_cfg.MODEL.SASA.STEM = cls_cfg.MODEL.SASA.STEM
    detector = build_model(det_cfg).eval()

    checkpointer = _RecordingCheckpointer(detector)
    checkpointer.load(path, checkpointables=[])  # the public API (upstream's _load_file needs it)
    assert is_classifier_checkpoint(checkpointer.seen)
    incompatible = checkpointer.incompatible
    assert not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    missing = incompatible.missing_keys
    assert not [k for k in missing if k.startswith("backbone.bottom_up.")], missing
    # Only the FPN and the head stay as initialised.
    assert any(k.startswith("backbone.fpn_") for k in missing)
    assert any(k.startswith("head.") for k in missing)
    assert all(k.startswith(("backbone.fpn_", "backbone.top_block.", "head.")) for k in missing)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = classifier.backbone(x)["res5"]
        theirs = detector.backbone.bottom_up(x)["res5"]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_classifier_checkpoint_via_resume_or_load(tmp_path, caplog):
    """The path DefaultTrainer takes for MODEL.WEIGHTS (resume=False)."""
    cls_cfg = tiny_sasa_cfg()
    classifier, path = _save_classifier(cls_cfg, tmp_path)
    detector = build_model(_detection_cfg("retinanet_sasa26.yaml", cls_cfg, "SASA")).eval()
    with caplog.at_level(logging.WARNING, logger="san_det.classification.checkpoint"):
        ClassifierCheckpointer(detector, str(tmp_path / "out")).resume_or_load(path, resume=False)
    for k, v in classifier.backbone.state_dict().items():
        torch.testing.assert_close(detector.backbone.bottom_up.state_dict()[k], v, rtol=0, atol=0)
    # The detection config's default normalisation differs from the classifier's: a warning.
    assert "MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]" in caplog.text


def test_load_classifier_into_detector_function(tmp_path):
    cls_cfg = tiny_san_cfg()
    classifier, path = _save_classifier(cls_cfg, tmp_path)
    detector = build_model(_detection_cfg("retinanet_san10_pairwise.yaml", cls_cfg, "SAN"))
    report = load_classifier_into_detector(detector, path)
    assert report["dropped"] == ["classifier.weight", "classifier.bias"]
    assert report["not_in_checkpoint"] and all(
        not k.startswith("backbone.bottom_up.") for k in report["not_in_checkpoint"]
    )
    torch.testing.assert_close(
        detector.backbone.bottom_up.layer4[0].sam.conv1.weight,
        classifier.backbone.layer4[0].sam.conv1.weight,
    )


def test_checkpoint_from_another_architecture_names_the_key(tmp_path):
    san_cfg = tiny_san_cfg()
    _, path = _save_classifier(san_cfg, tmp_path)
    detector = build_model(_detection_cfg("retinanet_sasa26.yaml", tiny_sasa_cfg(), "SASA"))
    with pytest.raises(CheckpointError, match=r"'backbone\.conv_in\.weight'.*another"):
        ClassifierCheckpointer(detector).resume_or_load(path, resume=False)


def test_checkpoint_of_another_depth_or_width_names_the_key(tmp_path):
    _, path = _save_classifier(tiny_sasa_cfg(), tmp_path)
    deeper = tiny_sasa_cfg(**{"MODEL.SASA.DEPTH": 38})
    detector = build_model(_detection_cfg("retinanet_sasa38.yaml", deeper, "SASA"))
    with pytest.raises(CheckpointError, match=r"backbone\.bottom_up\.res2\.1\..*not in"):
        load_classifier_into_detector(detector, path)
    wider = tiny_sasa_cfg(**{"MODEL.SASA.WIDTH_PER_GROUP": 8})
    detector = build_model(_detection_cfg("retinanet_sasa26.yaml", wider, "SASA"))
    with pytest.raises(CheckpointError, match=r"shape \(.*\) but the model's"):
        load_classifier_into_detector(detector, path)


def test_remap_rules_on_key_lists():
    fpn_target = {"backbone.bottom_up.a.weight": torch.zeros(2), "backbone.fpn_out.weight": 0}
    plain_target = {"backbone.a.weight": torch.zeros(2), "head.w": 0}
    assert detection_backbone_prefix(fpn_target) == "backbone.bottom_up."
    assert detection_backbone_prefix(plain_target) == "backbone."
    with pytest.raises(CheckpointError, match="no 'backbone.'"):
        detection_backbone_prefix({"head.w": 0})
    src = {
        "backbone.a.weight": torch.ones(2),
        "backbone.bn.num_batches_tracked": torch.tensor(3),  # FrozenBN targets have none
        "classifier.weight": torch.ones(3, 2),
    }
    out, report = classifier_to_detection_state_dict(src, plain_target)
    assert list(out) == ["backbone.a.weight"] and report["dropped"] == ["classifier.weight"]
    assert report["not_in_checkpoint"] == ["head.w"]
    assert not is_classifier_checkpoint({"model": {"backbone.a": 0, "head.w": 0}})


def test_convert_classifier_to_detection_tool(tmp_path, capsys):
    tool = load_script("tools/convert_classifier_to_detection.py")
    cls_cfg = tiny_sasa_cfg()
    classifier, path = _save_classifier(cls_cfg, tmp_path)
    det_cfg = _detection_cfg("retinanet_sasa26.yaml", cls_cfg, "SASA")
    s = det_cfg.MODEL.SASA
    opts = [
        "MODEL.SASA.STEM_OUT_CHANNELS", str(s.STEM_OUT_CHANNELS),
        "MODEL.SASA.WIDTH_PER_GROUP", str(s.WIDTH_PER_GROUP),
        "MODEL.SASA.RES2_OUT_CHANNELS", str(s.RES2_OUT_CHANNELS),
        "MODEL.SASA.KERNEL_SIZE", str(s.KERNEL_SIZE),
        "MODEL.SASA.NUM_HEADS", str(s.NUM_HEADS),
    ]  # fmt: skip
    config = os.path.join(COCO, "retinanet_sasa26.yaml")
    out = str(tmp_path / "init.pth")
    assert tool.main(["--config-file", config, "--input", path, "--output", out] + opts) == 0
    # the classifier's input is recorded where san_det's checkpointers look for it
    from san_det.modeling.input_info import INPUT_INFO_KEY

    assert torch.load(out, map_location="cpu", weights_only=True)[INPUT_INFO_KEY] == {
        "input_format": "RGB",
        "pixel_mean": [123.675, 116.28, 103.53],
        "pixel_std": [58.395, 57.12, 57.375],
    }
    detector = build_model(_detection_cfg("retinanet_sasa26.yaml", cls_cfg, "SASA"))
    DetectionCheckpointer(detector).load(out)  # a plain detectron2 checkpointer
    for k, v in classifier.backbone.state_dict().items():
        torch.testing.assert_close(detector.backbone.bottom_up.state_dict()[k], v, rtol=0, atol=0)
    # Full-width detection config: the shapes differ, the tool names the key: bad input, 2.
    assert tool.main(["--config-file", config, "--input", path, "--output", out]) == 2
    assert "has shape" in capsys.readouterr().err


def test_trainers_checkpointer_refuses_a_classifier_of_other_normalisation(tmp_path, caplog):
    """Through the trainers' checkpointer (train_net), the warning above is an error unless
    MODEL.WEIGHTS_ALLOW_INPUT_MISMATCH; with the classifier's normalisation it loads silently."""
    from san_det.detection import DetectorCheckpointer
    from san_det.modeling.input_info import InputMismatchError

    cls_cfg = tiny_sasa_cfg()
    classifier, path = _save_classifier(cls_cfg, tmp_path)
    det_cfg = _detection_cfg("retinanet_sasa26.yaml", cls_cfg, "SASA")
    with pytest.raises(InputMismatchError, match=r"MODEL\.PIXEL_MEAN \[123\.675, 116\.28"):
        DetectorCheckpointer(build_model(det_cfg)).resume_or_load(path, resume=False)
    with caplog.at_level(logging.WARNING):
        DetectorCheckpointer(build_model(det_cfg), allow_input_mismatch=True).resume_or_load(
            path, resume=False
        )
    assert "Loading them anyway" in caplog.text
    det_cfg.INPUT.FORMAT = cls_cfg.INPUT.FORMAT
    det_cfg.MODEL.PIXEL_MEAN = cls_cfg.MODEL.PIXEL_MEAN
    det_cfg.MODEL.PIXEL_STD = cls_cfg.MODEL.PIXEL_STD
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        detector = build_model(det_cfg)
        DetectorCheckpointer(detector).resume_or_load(path, resume=False)
    assert "expect other inputs" not in caplog.text
    for k, v in classifier.backbone.state_dict().items():
        torch.testing.assert_close(detector.backbone.bottom_up.state_dict()[k], v, rtol=0, atol=0)
