"""Checkpoints record the input format and normalisation their weights expect; loading them into
a model configured otherwise is an error (one line) unless MODEL.WEIGHTS_ALLOW_INPUT_MISMATCH."""

import pytest
import torch
from detectron2.modeling import build_model

import san_det  # noqa: F401
from san_det.classification.checkpoint import ClassifierCheckpointer
from san_det.detection import DetectorCheckpointer
from san_det.modeling.input_info import (
    INPUT_INFO_KEY,
    InputMismatchError,
    describe_input_mismatch,
    input_info_from_cfg,
)
from tests.helpers.scripts import assert_one_line_error, cli_in_process, load_script
from tests.helpers.tiny_detection import train_tiny_retinanet


def test_the_trainers_checkpointer_loads_classifiers():
    # an import cycle once made engine/trainer.py fall back to SafeCheckpointer silently
    assert issubclass(DetectorCheckpointer, ClassifierCheckpointer)


def test_describe_input_mismatch():
    info = {"input_format": "RGB", "pixel_mean": [1.0, 2.0, 3.0], "pixel_std": [4.0, 5.0, 6.0]}
    assert describe_input_mismatch(info, dict(info)) is None
    assert describe_input_mismatch(None, info) is None
    assert describe_input_mismatch({}, info) is None
    assert describe_input_mismatch(info, dict(info, pixel_mean=[1.0, 2.0, 3.0004])) is None
    other = dict(info, input_format="BGR", pixel_std=[1.0, 1.0, 1.0])
    assert describe_input_mismatch(info, other) == (
        "INPUT.FORMAT RGB (this model: BGR); MODEL.PIXEL_STD [4.0, 5.0, 6.0] "
        "(this model: [1.0, 1.0, 1.0])"
    )
    assert describe_input_mismatch({"pixel_mean": [0, 0, 0]}, {"input_format": "BGR"}) is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("input_info")
    cfg = train_tiny_retinanet(str(root), "input_info_train", max_iter=1)
    (root / "tiny.yaml").write_text(cfg.dump())
    return root, cfg


def test_trainer_checkpoints_record_the_input(trained):
    root, cfg = trained
    saved = torch.load(root / "out" / "model_final.pth", map_location="cpu", weights_only=False)
    assert saved[INPUT_INFO_KEY] == input_info_from_cfg(cfg)
    assert saved[INPUT_INFO_KEY]["input_format"] == "BGR"


def test_loading_into_another_normalisation_is_refused(trained, caplog):
    root, cfg = trained
    other = cfg.clone()
    other.MODEL.PIXEL_STD = [57.0, 57.0, 57.0]
    path = str(root / "out" / "model_final.pth")
    with pytest.raises(InputMismatchError, match=r"MODEL\.PIXEL_STD \[1\.0, 1\.0, 1\.0\] \(this"):
        DetectorCheckpointer(build_model(other)).load(path, checkpointables=[])
    DetectorCheckpointer(build_model(cfg)).load(path, checkpointables=[])  # same config: fine
    DetectorCheckpointer(build_model(other), allow_input_mismatch=True).load(
        path, checkpointables=[]
    )
    assert "Loading them anyway" in caplog.text


def test_eval_only_with_another_normalisation_is_one_line(trained, tmp_path, capsys):
    root, _ = trained
    proc = cli_in_process(
        load_script("train_net.py"), capsys,
        "--config-file", str(root / "tiny.yaml"), "--eval-only",
        "MODEL.WEIGHTS", str(root / "out" / "model_final.pth"), "INPUT.FORMAT", "RGB",
        "OUTPUT_DIR", str(tmp_path / "eval"),
    )  # fmt: skip
    assert_one_line_error(proc, "INPUT.FORMAT BGR (this model: RGB)", "model_final.pth")
    assert not (tmp_path / "eval").exists()
