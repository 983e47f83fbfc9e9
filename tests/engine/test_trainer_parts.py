"""``RobustTrainer`` builds its parts through methods a subclass overrides, without reassigning
anything in detectron2, and ends up with every attribute detectron2's ``DefaultTrainer`` sets (so
``DefaultTrainer``'s other methods, and the next detectron2's, find what they read); the NaN guard
stops on a non-finite gradient; the log filter exists only while a trainer trains; the running
state is found on detectron2's dense detectors only."""

import logging

import pytest
import torch
from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.keypoint_head import KRCNNConvDeconvUpsampleHead
from detectron2.utils.events import EventStorage
from torch import nn

import san_det  # noqa: F401
from san_det.detection import DetectionTrainer
from san_det.engine import NonFiniteError
from san_det.engine.trainer import _ModelRunningState, _ReportedErrorsWithoutTraceback
from tests.helpers.coco_files import register_coco_dataset, simple_images
from tests.helpers.tiny_detection import tiny_retinanet_cfg, tiny_test_net_cfg

PATCHED_BEFORE = ("create_ddp_model", "SimpleTrainer", "AMPTrainer", "DetectionCheckpointer")


def _cfg(tmp_path, name, retinanet=False, max_iter=2):
    register_coco_dataset(name, str(tmp_path / "data"), simple_images(4))
    make = tiny_retinanet_cfg if retinanet else tiny_test_net_cfg
    return make(str(tmp_path / f"out_{name}"), (name,), max_iter=max_iter)


class _BuiltByDetectron2(DetectionTrainer):
    """The same trainer, constructed by detectron2's own ``DefaultTrainer.__init__``."""

    def __init__(self, cfg):
        self.seed = cfg.SEED
        DefaultTrainer.__init__(self, cfg)


def test_trainer_has_every_attribute_default_trainer_sets(tmp_path):
    cfg = _cfg(tmp_path, "parts_attrs")
    ours, theirs = DetectionTrainer(cfg), _BuiltByDetectron2(cfg)
    missing = sorted(set(vars(theirs)) - set(vars(ours)))
    assert not missing, f"DefaultTrainer.__init__ sets {missing}, RobustTrainer does not"
    missing = sorted(set(vars(theirs._trainer)) - set(vars(ours._trainer)))
    assert not missing, f"detectron2's step trainer has {missing}, ours does not"
    assert (ours.start_iter, ours.max_iter, ours.iter) == (0, cfg.SOLVER.MAX_ITER, 0)
    assert ours.cfg == theirs.cfg and type(ours.scheduler) is type(theirs.scheduler)
    assert ours.scheduler.optimizer is ours.optimizer is ours._trainer.optimizer
    assert ours.model is ours._trainer.model and ours.checkpointer.model is ours.model
    assert [type(h) for h in ours._hooks] == [type(h) for h in theirs._hooks]
    assert all(h.trainer == ours for h in ours._hooks)  # weak proxies to this trainer


class _RecordingTrainer(DetectionTrainer):
    calls = []

    @classmethod
    def _detectron2_names(cls):
        return {name: getattr(d2_defaults, name) for name in PATCHED_BEFORE}

    @classmethod
    def build_ddp_model(cls, cfg, model):
        cls.calls.append(("ddp", cls._detectron2_names()))
        return nn.Sequential(model)  # stands for a wrapper

    @classmethod
    def build_step_trainer(cls, cfg, model, data_loader, optimizer):
        cls.calls.append(("step", cls._detectron2_names()))
        return SimpleTrainer(model, data_loader, optimizer)

    def build_checkpointer(self, cfg, model):
        self.calls.append(("checkpointer", self._detectron2_names()))
        self.checkpointer_model = model
        return super().build_checkpointer(cfg, model)


def test_parts_come_from_overridable_methods_and_detectron2_stays_as_it_is(tmp_path):
    originals = _RecordingTrainer._detectron2_names()
    _RecordingTrainer.calls = []
    trainer = _RecordingTrainer(_cfg(tmp_path, "parts_override"))
    assert [what for what, _ in trainer.calls] == ["ddp", "step", "checkpointer"]
    for what, names in trainer.calls:  # nothing of detectron2 swapped while they run
        assert all(names[n] is originals[n] for n in PATCHED_BEFORE), what
    assert type(trainer._trainer) is SimpleTrainer
    assert isinstance(trainer.model, nn.Sequential) and trainer.checkpointer_model is trainer.model
    assert _RecordingTrainer._detectron2_names() == originals


def _has_filter() -> bool:
    log = logging.getLogger("detectron2.engine.train_loop")
    return any(isinstance(f, _ReportedErrorsWithoutTraceback) for f in log.filters)


class _SeeFilter(HookBase):
    seen = []

    def before_step(self):
        self.seen.append(_has_filter())


def test_log_filter_exists_only_while_a_trainer_trains(tmp_path):
    assert not _has_filter()  # importing san_det adds none
    trainer = DetectionTrainer(_cfg(tmp_path, "parts_filter"))
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([_SeeFilter()])
    assert not _has_filter()
    trainer.train()
    assert _SeeFilter.seen == [True, True] and not _has_filter()


@pytest.mark.parametrize("clip", [False, True])
def test_non_finite_gradient_stops_before_the_optimizer_step(tmp_path, clip):
    cfg = _cfg(tmp_path, f"parts_grad{int(clip)}")
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = clip  # a subclass of the optimizer: its step nests
    trainer = DetectionTrainer(cfg)
    model = trainer.model
    model.fc.weight.register_hook(lambda grad: grad * float("nan"))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with EventStorage(0) as trainer.storage, pytest.raises(NonFiniteError) as info:
        trainer.iter = 0
        trainer.run_step()
    message = str(info.value)
    assert message.startswith("non-finite gradient at iteration 0 (losses here: loss_cls=1.")
    assert message.endswith("before the optimizer step; last good checkpoint: none written yet")
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), before[k], rtol=0, atol=0, msg=k)
    # The guard's hooks live for one step only.
    assert not model._forward_hooks and not trainer.optimizer._optimizer_step_pre_hooks


def test_running_state_is_that_of_dense_detectors_only(tmp_path):
    trainer = DetectionTrainer(_cfg(tmp_path, "parts_running", retinanet=True, max_iter=1))
    trainer.resume_or_load(resume=False)
    trainer.train()
    normalizer = trainer.model.loss_normalizer
    assert 1 <= normalizer < 100  # moved from its initial 100 towards the few foreground anchors
    assert trainer._running_state.state_dict() == {"": {"loss_normalizer": normalizer}}
    # detectron2's keypoint head has a loss_normalizer too: a constant, not running state.
    head = KRCNNConvDeconvUpsampleHead(
        ShapeSpec(channels=4), num_keypoints=3, conv_dims=[4], loss_normalizer=1.0
    )
    assert head.loss_normalizer == 1.0
    assert _ModelRunningState(nn.Sequential(head)).state_dict() == {}
