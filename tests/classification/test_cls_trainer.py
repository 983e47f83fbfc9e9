"""End to end on the embedded digits: training, evaluation, checkpoints, EMA, robustness."""

import math
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from san_det.classification import ClassificationTrainer
from san_det.classification.checkpoint import CLASSIFIER_INFO_KEY
from tests.helpers.classification import tiny_resnet_cfg

pytestmark = pytest.mark.slow


def _train(cfg):
    trainer = ClassificationTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def test_train_evaluate_checkpoint_round_trip(digits, tmp_path):
    train, val, _ = digits
    cfg = tiny_resnet_cfg(str(tmp_path / "run"), train, val)
    cfg.CLASSIFICATION.EMA.ENABLED = True
    cfg.CLASSIFICATION.EMA.DECAY = 0.9
    cfg.CLASSIFICATION.TEST.ROBUSTNESS_VARIANTS = ["rot90", "vflip"]
    cfg.freeze()
    trainer = _train(cfg)

    # The loss is finite and decreases over the run.
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == cfg.SOLVER.MAX_ITER
    assert all(math.isfinite(x) for x in losses)
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.7 * first, (first, last)
    # The LR was scaled by batch / 256.
    assert math.isclose(trainer.cfg.SOLVER.BASE_LR, 0.2 * 32 / 256)

    # Evaluation: top-1 / top-5 of the model and of its EMA, clean and robustness variants.
    results = trainer._last_eval_results
    clean = results[val]["classification"]
    assert clean["num_images"] == 359
    assert 0.0 <= clean["top1"] <= clean["top5"] <= 100.0
    assert clean["top1"] > 50.0, clean  # 10 classes: chance is 10%
    assert set(results) == {val, f"{val}@rot90", f"{val}@vflip"}
    latest = trainer.storage.latest()
    assert f"ema/{val}/classification/top1" in latest
    assert f"{val}@rot90/classification/top5" in latest

    # Checkpoint round trip: model_final.pth reloads into a fresh model with identical outputs.
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    saved = torch.load(final, map_location="cpu", weights_only=False)
    assert saved[CLASSIFIER_INFO_KEY]["input_format"] == "RGB"
    assert saved["iteration"] == cfg.SOLVER.MAX_ITER - 1
    model = ClassificationTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(final)
    model.eval()
    trained = trainer.model.eval()
    batch = [{"image": torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)} for _ in range(3)]
    with torch.no_grad():
        a = torch.stack([o["logits"] for o in trained(batch)])
        b = torch.stack([o["logits"] for o in model(batch)])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # --eval-only path: the reloaded model evaluates to the same numbers.
    again = ClassificationTrainer.test(cfg, model)
    assert again[val]["classification"] == results[val]["classification"]

    # The EMA weights are saved as a plain model checkpoint and differ from the final weights.
    ema = torch.load(
        os.path.join(cfg.OUTPUT_DIR, "model_final_ema.pth"), map_location="cpu", weights_only=False
    )
    assert set(ema["model"]) == set(saved["model"])
    assert not torch.equal(ema["model"]["classifier.weight"], saved["model"]["classifier.weight"])

    # Resuming continues from the last iteration (the trainer state, EMA included, is restored).
    cfg2 = cfg.clone()
    cfg2.defrost()
    cfg2.SOLVER.MAX_ITER = cfg.SOLVER.MAX_ITER + 2
    cfg2.freeze()
    resumed = ClassificationTrainer(cfg2)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == cfg.SOLVER.MAX_ITER
    assert resumed.ema.num_updates == cfg.SOLVER.MAX_ITER
