"""SIGTERM / SIGINT during an evaluation (periodic, final, ``--eval-only``) stop train_net.py
within seconds with one line and status 143 / 130, leave no partial result file and no staging
folder, and ``--resume`` runs the interrupted evaluation; results files are written whole or not
at all (a file size limit while ``--eval-only`` writes them: one line, status 1).

Every run is ``train_net.py`` in a child process on a generated COCO dataset, paused inside the
evaluator's first ``process`` call (:mod:`tests.helpers.held_runs`) when the signal is sent.
"""

import json
import resource
import signal
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from san_det.data.coco_example import write_coco_example
from san_det.engine.output_lock import LOCK_FILE_NAME
from tests.helpers.held_runs import HeldRun
from tests.helpers.tiny_detection import tiny_retinanet_cfg

pytestmark = pytest.mark.slow

EVALUATOR = "san_det.detection.coco_evaluation:COCOEvaluatorNoDetectionsIsZero.process"
STOP_WITHIN_S = 60  # from the signal to the exit (a few seconds; generous for loaded machines)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A config training the tiny RetinaNet 4 iterations on a generated COCO set, evaluating it
    on 32 images; random weights for ``--eval-only``."""
    root = tmp_path_factory.mktemp("eval_interrupt")
    example = write_coco_example(str(root / "data"), num_train=4, num_val=32, image_size=64)
    cfg = tiny_retinanet_cfg("unused", ("ex_train",), max_iter=4)
    cfg.DATASETS.COCO_INSTANCES = [["ex_train", *example["train"]], ["ex_val", *example["val"]]]
    cfg.DATASETS.TEST = ("ex_val",)
    cfg.MODEL.RETINANET.NUM_CLASSES = 4
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # many detections: large results files
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.TEST.PREDICTION_IMAGES = 0
    (root / "train.yaml").write_text(cfg.dump())
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, root / "random.pth")
    return root


def _train(inputs, out, *args, **kwargs):
    return HeldRun(
        inputs / "logs", "train_net.py", "--config-file", str(inputs / "train.yaml"), *args,
        "OUTPUT_DIR", str(out), **kwargs,
    )  # fmt: skip


def _lines(run, prefix="train_net.py:"):
    return [line for line in run.output().splitlines() if line.startswith(prefix)]


def _leftovers(folder):
    """Hidden files and folders (temporaries, staging) under ``folder``, but the lock file."""
    return [p for p in Path(folder).rglob(".*") if p.name != LOCK_FILE_NAME]


def _results(out):
    return sorted(p.name for p in (Path(out) / "inference").rglob("*") if p.is_file())


def _evaluations(out):
    """The ``bbox/AP`` entries of metrics.json (one per evaluation)."""
    lines = (Path(out) / "metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines if "bbox/AP" in line]


def test_sigterm_during_a_periodic_evaluation(inputs, tmp_path):
    out = tmp_path / "out"
    run = _train(inputs, out, "TEST.EVAL_PERIOD", "2", hold_at=EVALUATOR)
    run.wait_held()
    run.signal_group(signal.SIGTERM)
    assert run.wait(STOP_WITHIN_S) == 143, run.output()[-3000:]
    lines = _lines(run)
    assert len(lines) == 1, run.output()[-3000:]
    assert lines[0].startswith(
        "train_net.py: stopped by SIGTERM during the evaluation after iteration 1; checkpoint "
    ), lines
    assert "--resume runs that evaluation" in lines[0]
    assert "Traceback" not in run.output()
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert _results(out) == [] and _leftovers(out) == []
    saved = torch.load(out / "model_0000001.pth", weights_only=False)
    assert saved["iteration"] == 1 and saved["trainer"]["interrupted_evaluation_iter"] == 1

    resumed = _train(inputs, out, "--resume", "TEST.EVAL_PERIOD", "2")
    assert resumed.wait() == 0, resumed.output()[-3000:]
    log = (out / "log.txt").read_text()
    assert "Running the evaluation of iteration 1, interrupted by a signal" in log
    assert "Starting training from iteration 2" in log
    assert len(_evaluations(out)) == 2  # the interrupted one, then the final one
    assert _results(out) == ["coco_instances_results.json", "instances_predictions.pth"]
    assert _leftovers(out) == []


def test_sigint_twice_during_the_final_evaluation(inputs, tmp_path):
    out = tmp_path / "out"
    run = _train(inputs, out, hold_at=EVALUATOR)
    run.wait_held()
    run.signal_group(signal.SIGINT)
    run.signal_group(signal.SIGINT)
    assert run.wait(STOP_WITHIN_S) == 130, run.output()[-3000:]
    lines = _lines(run)
    assert len(lines) == 1, run.output()[-3000:]
    assert lines[0].startswith("train_net.py: stopped by SIGINT during the final evaluation; ")
    assert "model_final.pth is complete, --resume runs the evaluation" in lines[0]
    assert "Traceback" not in run.output()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert _results(out) == [] and _leftovers(out) == []

    resumed = _train(inputs, out, "--resume")
    assert resumed.wait() == 0, resumed.output()[-3000:]
    assert len(_evaluations(out)) == 1
    assert _results(out) == ["coco_instances_results.json", "instances_predictions.pth"]


def test_a_signal_in_the_last_step_skips_the_final_evaluation(inputs, tmp_path):
    out = tmp_path / "out"
    run = _train(inputs, out, hold_at="san_det.engine.trainer:RobustTrainer.run_step", hold_call=4)
    run.wait_held()
    run.signal_group(signal.SIGTERM)  # recorded: the step ends, the final checkpoint is written
    run.release()
    assert run.wait(STOP_WITHIN_S) == 143, run.output()[-3000:]
    lines = _lines(run)
    assert len(lines) == 1, run.output()[-3000:]
    assert lines[0].startswith("train_net.py: stopped by SIGTERM before the final evaluation; ")
    assert "model_final.pth is complete, --resume runs the evaluation" in lines[0]
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert _results(out) == [] and _leftovers(out) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_eval_only(inputs, tmp_path, signum):
    out = tmp_path / "out"
    run = _train(
        inputs, out, "--eval-only", "MODEL.WEIGHTS", str(inputs / "random.pth"), hold_at=EVALUATOR
    )
    run.wait_held()
    run.signal_group(signum)
    assert run.wait(STOP_WITHIN_S) == 128 + signum, run.output()[-3000:]
    name = signal.Signals(signum).name
    assert _lines(run) == [
        f"train_net.py: stopped by {name} during the evaluation (--eval-only); no partial "
        "result file left"
    ], run.output()[-3000:]
    assert "Traceback" not in run.output()
    assert _results(out) == [] and _leftovers(out) == []


def _file_size_limit(limit: int):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def test_a_file_size_limit_while_eval_only_writes_its_results(inputs, tmp_path):
    """``ulimit -f``: instances_predictions.pth (32 images x 100 detections) cannot be written,
    log.txt can."""
    out = tmp_path / "out"
    args = ("--eval-only", "MODEL.WEIGHTS", str(inputs / "random.pth"))
    run = _train(inputs, out, *args, preexec_fn=_file_size_limit(150_000))
    assert run.wait() == 1, run.output()[-3000:]
    errors = _lines(run, "train_net.py: error:")
    assert len(errors) == 1, run.output()[-3000:]
    assert f"cannot write the results in {out / 'inference' / 'ex_val'}" in errors[0]
    assert "File too large (EFBIG); no partial file was left" in errors[0]
    assert "Traceback" not in run.output()
    assert _results(out) == [] and _leftovers(out) == []


def test_ctrl_c_during_a_periodic_evaluation_of_two_processes(inputs, tmp_path):
    """Ctrl-C reaches the launcher and both workers (held in their evaluators); the launcher
    forwards it once more: one line, status 130, the checkpoint of the main process."""
    out = tmp_path / "out"
    run = _train(inputs, out, "--num-processes", "2", "TEST.EVAL_PERIOD", "2", hold_at=EVALUATOR)
    run.wait_held(processes=2)
    run.signal_group(signal.SIGINT)
    assert run.wait(STOP_WITHIN_S) == 130, run.output()[-3000:]
    lines = _lines(run)
    assert len(lines) == 1, run.output()[-3000:]
    assert lines[0].startswith("train_net.py: stopped by SIGINT during the evaluation after "
                               "iteration 1; checkpoint ")  # fmt: skip
    assert "Traceback" not in run.output()
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert _results(out) == [] and _leftovers(out) == []
