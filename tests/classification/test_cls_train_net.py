"""train_net.py picks the classification trainer from the config: train, then --eval-only."""

import json
import os

import pytest

from tests.helpers.classification import DEMO_CONFIG
from tests.helpers.scripts import load_script


@pytest.mark.slow
def test_train_net_trains_and_evaluates_a_classifier(digits32, tmp_path):
    """The CPU demo config (its SASA model), for a few iterations on a temporary copy."""
    train, val, _ = digits32
    out = str(tmp_path / "run")
    opts = [
        "DATASETS.TRAIN", f"('{train}',)",
        "DATASETS.TEST", f"('{val}',)",
        "CLASSIFICATION.SOLVER.EPOCHS", "0",
        "CLASSIFICATION.SOLVER.WARMUP_EPOCHS", "0",
        "CLASSIFICATION.SOLVER.EVAL_PERIOD_EPOCHS", "0",
        "CLASSIFICATION.SOLVER.CHECKPOINT_PERIOD_EPOCHS", "0",
        "SOLVER.MAX_ITER", "4",
        "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.IMS_PER_BATCH", "16",
        "SEED", "0",
        "OUTPUT_DIR", out,
    ]  # fmt: skip
    train_net = load_script("train_net.py")
    train_net.cli(["--config-file", DEMO_CONFIG] + opts)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = [json.loads(line) for line in f]
    final = [m for m in metrics if "classification/top1" in m][-1]  # one test set: no prefix
    assert "total_loss" in metrics[0] and "lr" in metrics[0]

    weights = os.path.join(out, "model_final.pth")
    args = ["--config-file", DEMO_CONFIG, "--eval-only", "MODEL.WEIGHTS", weights]
    results = train_net.cli(args + opts)
    top = results["classification"]
    assert top["num_images"] == 359
    assert top["top1"] == pytest.approx(final["classification/top1"])
    assert top["top5"] == pytest.approx(final["classification/top5"])


def test_num_classes_against_the_folders_is_checked_before_anything_is_written(
    digits, tmp_path, capsys
):
    train, val, _ = digits
    out = tmp_path / "run"
    args = [
        "--config-file", DEMO_CONFIG, "DATASETS.TRAIN", f"('{train}',)",
        "DATASETS.TEST", f"('{val}',)", "CLASSIFICATION.NUM_CLASSES", "5", "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        load_script("train_net.py").cli(args)
    assert exit_info.value.code == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert errors == [
        f"train_net.py: error: dataset '{val}' has 10 classes but CLASSIFICATION.NUM_CLASSES is 5"
    ]
    assert not out.exists()
