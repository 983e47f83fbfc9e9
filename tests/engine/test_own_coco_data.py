"""Own COCO data as the README shows it: tools/make_coco_example.py, then train_net.py with
configs/Demo/own_coco_example.yaml (datasets named in the config only): two processes with the
final evaluation, --eval-only from the written config.yaml, --resume; class-count mismatches."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.paths import REPO_ROOT
from tests.helpers.scripts import child_env, error_lines

pytestmark = pytest.mark.slow

CONFIG = str(REPO_ROOT / "configs/Demo/own_coco_example.yaml")
FAST = [
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATALOADER.NUM_WORKERS", "0", "TEST.PREDICTION_IMAGES", "2",
    # an untrained model scores below the default 0.05: keep every detection for the COCO API
    "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
]  # fmt: skip


def _run(cwd, *args, timeout=600):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env=child_env(),
    )  # fmt: skip


def _train_net(cwd, *args):
    return _run(cwd, str(REPO_ROOT / "train_net.py"), "--config-file", CONFIG, *args)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding datasets/shapes_coco, where the config's relative paths lead."""
    cwd = tmp_path_factory.mktemp("own_coco")
    proc = _run(
        cwd, str(REPO_ROOT / "tools/make_coco_example.py"), "--output", "datasets/shapes_coco",
        "--num-train", "8", "--num-val", "4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "instances_train.json" in proc.stdout
    again = _run(
        cwd, str(REPO_ROOT / "tools/make_coco_example.py"), "--output", "datasets/shapes_coco"
    )
    assert again.returncode == 2 and "not an empty folder" in again.stderr
    return cwd


@pytest.mark.parametrize("num_classes", ["3", "80"])
def test_num_classes_mismatch_is_one_line_before_anything_is_written(workdir, num_classes):
    proc = _train_net(workdir, "MODEL.RETINANET.NUM_CLASSES", num_classes, "OUTPUT_DIR", "bad")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"NUM_CLASSES is {num_classes} but dataset 'shapes_coco_" in lines[0]
    assert "has 4 categories" in lines[0]
    assert not (workdir / "bad").exists()


def test_train_two_processes_then_eval_only_then_resume(workdir):
    out = workdir / "out"
    proc = _train_net(
        workdir, "--num-processes", "2", "--dist-url", "auto", "SOLVER.MAX_ITER", "2", *FAST,
        "OUTPUT_DIR", "out",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log
    # class names from the json reach the logs and the evaluator (the unused star included)
    assert "Distribution of instances among all 4 categories" in log
    assert "AP-star" not in log and "| star " in log and "triangle" in log
    results = json.loads(
        (out / "inference/shapes_coco_val/coco_instances_results.json").read_text()
    )
    assert results and {r["category_id"] for r in results} <= {2, 5, 7, 9}  # the json's own ids
    # detection by detection: the model's class c (instances_predictions.pth) is the json's
    # c-th id in id order; an untrained model at threshold 0 predicts every class
    saved = torch.load(out / "inference/shapes_coco_val/instances_predictions.pth")
    classes = [d["category_id"] for p in saved for d in p["instances"]]
    assert set(classes) == {0, 1, 2, 3}
    assert [r["category_id"] for r in results] == [[2, 5, 7, 9][c] for c in classes]
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    final = [m for m in metrics if "bbox/AP" in m][-1]
    assert final["bbox/AP-star"] is None and final["bbox/APl"] is None  # valid JSON, no NaN
    assert sorted(os.listdir(out / "predictions/shapes_coco_val")) == [
        "000000.png", "000001.png", "predictions.png",
    ]  # fmt: skip

    # --eval-only from the config.yaml the run wrote (it holds DATASETS.COCO_INSTANCES)
    for p in (out / "predictions/shapes_coco_val").iterdir():
        p.unlink()
    proc = _run(
        workdir, str(REPO_ROOT / "train_net.py"), "--config-file", "out/config.yaml", "--eval-only",
        "MODEL.WEIGHTS", "out/model_final.pth", "TEST.PREDICTION_IMAGES", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Per-category bbox AP" in proc.stdout and "square" in proc.stdout
    assert sorted(os.listdir(out / "predictions/shapes_coco_val")) == [
        "000000.png", "predictions.png",
    ]  # fmt: skip

    # --resume continues at iteration 2 up to the new MAX_ITER
    proc = _train_net(workdir, "--resume", "SOLVER.MAX_ITER", "3", *FAST, "OUTPUT_DIR", "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting training from iteration 2" in proc.stdout + proc.stderr
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
