"""``--resume`` with another SOLVER.IMS_PER_BATCH, process count or SOLVER.BASE_LR than the
checkpoint's run: one warning each, naming the old and new value and what the run continues with
(train_net.py in child processes on a generated COCO dataset)."""

import json

import pytest

from san_det.data.coco_example import write_coco_example
from tests.helpers.held_runs import HeldRun
from tests.helpers.tiny_detection import tiny_retinanet_cfg

pytestmark = pytest.mark.slow


def _warnings(log: str):
    return [line.split("]: ", 1)[1] for line in log.splitlines() if "]: Resuming with " in line]


def test_resume_with_another_batch_processes_and_rate(tmp_path):
    example = write_coco_example(str(tmp_path / "data"), num_train=8, num_val=1, image_size=64)
    cfg = tiny_retinanet_cfg("unused", ("drift_train",), max_iter=2)
    cfg.DATASETS.COCO_INSTANCES = [["drift_train", *example["train"]]]
    cfg.MODEL.RETINANET.NUM_CLASSES = 4
    (tmp_path / "train.yaml").write_text(cfg.dump())
    out = tmp_path / "out"
    common = ("--config-file", str(tmp_path / "train.yaml"))
    first = HeldRun(tmp_path / "logs", "train_net.py", *common, "OUTPUT_DIR", str(out))
    assert first.wait() == 0, first.output()[-3000:]

    same = HeldRun(tmp_path / "logs", "train_net.py", *common, "--resume",
                   "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out))  # fmt: skip
    assert same.wait() == 0, same.output()[-3000:]
    assert _warnings(same.output()) == []  # nothing changed, nothing said

    resumed = HeldRun(
        tmp_path / "logs", "train_net.py", *common, "--resume", "--num-processes", "2",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.02", "SOLVER.MAX_ITER", "5",
        "OUTPUT_DIR", str(out),
    )  # fmt: skip
    assert resumed.wait() == 0, resumed.output()[-3000:]
    assert _warnings(resumed.output()) == [
        "Resuming with SOLVER.IMS_PER_BATCH 4 (the checkpoint's run used 2): training continues "
        "at iteration 3 of 5 on the same iteration schedule (MAX_ITER, SOLVER.STEPS), reading the "
        "data stream from image position 12 (= 3 x 4) where the previous run had reached 6: "
        "images are skipped or seen twice, and the result differs from an uninterrupted run",
        "Resuming with 2 process(es) (the checkpoint's run used 1): training continues at "
        "iteration 3 of 5 with the same total batch SOLVER.IMS_PER_BATCH 4 and data stream, 2 "
        "images per process (was 2): batch statistics differ, the result is close to but not "
        "bit-identical with an uninterrupted run",
        "Resuming with SOLVER.BASE_LR 0.02 (the checkpoint's run used 0.01): training continues "
        "at iteration 3 of 5; the optimizer and scheduler state of the checkpoint keep base rate "
        "0.01; to train on with another rate, start a new run from the checkpoint (MODEL.WEIGHTS "
        "<checkpoint>, without --resume)",
    ]
    # what the warning says the run does: it trains on at the checkpoint's rate
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    rates = {m["iteration"]: m["lr"] for m in metrics if "lr" in m}
    assert max(rates) == 4 and rates[4] == pytest.approx(0.01)  # the last resumed iteration
