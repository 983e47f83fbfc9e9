"""The NaN/inf guard sits in front of the optimizer step of both of detectron2's step trainers:
a run with ``SOLVER.AMP.ENABLED`` stops on a NaN loss exactly as a plain run does."""

import pytest
import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils.events import EventStorage

import san_det  # noqa: F401
from san_det.detection import DetectionTrainer
from san_det.engine import NonFiniteError
from tests.helpers.coco_files import register_coco_dataset, simple_images
from tests.helpers.tiny_detection import tiny_retinanet_cfg
from san_det.engine.trainer import GuardedAMPTrainer, GuardedSimpleTrainer


def _trainer(tmp_path, amp: bool) -> DetectionTrainer:
    register_coco_dataset("guard_train", str(tmp_path / "data"), simple_images(4))
    cfg = tiny_retinanet_cfg(str(tmp_path / f"out_amp{int(amp)}"), ("guard_train",), max_iter=2)
    cfg.SOLVER.AMP.ENABLED = amp
    with pytest.warns(UserWarning) if amp and not torch.cuda.is_available() else _nothing():
        return DetectionTrainer(cfg)  # without CUDA, AMP's grad scaler warns and stays disabled


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _nan_step(trainer: DetectionTrainer, monkeypatch) -> str:
    """Run one step with a NaN classifier weight; the error message, and the model untouched."""
    model = trainer.model
    with torch.no_grad():
        model.head.cls_score.weight.fill_(float("nan"))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    if isinstance(trainer._trainer, AMPTrainer) and not torch.cuda.is_available():
        # detectron2's AMPTrainer asserts CUDA; on the CPU its autocast and scaler are disabled.
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with EventStorage(0) as trainer.storage, pytest.raises(NonFiniteError) as info:
        trainer.iter = 0
        trainer.run_step()
    monkeypatch.undo()
    for k, v in model.named_parameters():  # the optimizer did not step
        torch.testing.assert_close(v.detach(), before[k], rtol=0, atol=0, equal_nan=True, msg=k)
    return str(info.value)


def test_amp_and_plain_runs_stop_alike_on_a_nan_loss(tmp_path, monkeypatch):
    plain = _trainer(tmp_path, amp=False)
    amp = _trainer(tmp_path, amp=True)
    assert type(plain._trainer) is GuardedSimpleTrainer
    assert type(amp._trainer) is GuardedAMPTrainer
    assert isinstance(amp._trainer, AMPTrainer) and isinstance(plain._trainer, SimpleTrainer)
    message = _nan_step(plain, monkeypatch)
    assert message.startswith("non-finite loss at iteration 0 (losses here: loss_cls=nan")
    assert message.endswith("before the optimizer step; last good checkpoint: none written yet")
    assert _nan_step(amp, monkeypatch) == message


def test_amp_guard_leaves_gradient_overflow_to_the_grad_scaler():
    assert GuardedSimpleTrainer.check_gradients and not GuardedAMPTrainer.check_gradients
