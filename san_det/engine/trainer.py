"""Trainers: detectron2's ``DefaultTrainer`` made crash-safe, reproducible and CPU-parallel.

:class:`RobustTrainer` keeps ``DefaultTrainer``'s loop, hooks, writers and evaluation; what it
changes (DDP on CPU processes, checkpoints, seeds, NaN guard, signals, resume) is described for
users in docs/TRAINING.md. Task trainers subclass it: :class:`san_det.detection.DetectionTrainer`,
:class:`san_det.classification.ClassificationTrainer`.
"""

import contextlib
import logging
import weakref

import torch
from detectron2.engine import DefaultTrainer
from detectron2.engine import hooks as d2_hooks
from detectron2.modeling.meta_arch import DenseDetector
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import JSONWriter
from detectron2.utils.logger import setup_logger

from ..modeling.input_info import INPUT_INFO_KEY, InputInfo, input_info_from_cfg
from .checkpoint import (
    CheckpointWriteError,
    NonFiniteError,
    SafeCheckpointer,
    checkpointer_options,
)
from .ddp import unwrap_model, wrap_ddp
from .errors import UserInputError
from .eval_interrupt import (
    PENDING_EVALUATION,
    EvaluationInterrupted,
    InterruptibleEvalHook,
    evaluation_interrupted,
)
from .graceful_stop import StopOnSignalHook
from .loader import DeterministicBatchStream, ResumableTrainLoader, mix_seed
from .metrics_json import FiniteJSONWriter
from .results_files import ResultsWriteError
from .resume_drift import RUN_SHAPE_KEY, resume_drift_warnings, run_shape
from .step_guard import GuardedAMPTrainer, GuardedSimpleTrainer
from .validate import validate_config

__all__ = [
    "GuardedAMPTrainer",
    "GuardedSimpleTrainer",
    "RobustTrainer",
    "build_resumable_train_loader",
    "resolve_seed",
]

logger = logging.getLogger(__name__)

_STEP_STREAM = 3


def resolve_seed(cfg):
    """``cfg`` with ``SEED >= 0``: a negative SEED becomes a random seed shared by all processes
    (all processes must call this). Returns ``cfg`` itself when nothing changes, else a copy."""
    if cfg.SEED >= 0:
        return cfg
    seed = int(comm.shared_random_seed()) % (2**31)
    logger.info(f"SEED is {cfg.SEED}: using the random seed {seed} (stored in checkpoints)")
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.SEED = seed
    if frozen:
        cfg.freeze()
    return cfg


def build_resumable_train_loader(cfg, dataset, mapper) -> ResumableTrainLoader:
    """:class:`ResumableTrainLoader` over ``dataset`` (list of dicts) with ``cfg``'s batch size,
    seed, workers and aspect-ratio grouping. ``cfg.SEED`` must be >= 0 (:func:`resolve_seed`)."""
    world = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total < 1 or total % world:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}) must be a positive multiple of the number of "
            f"processes ({world})"
        )
    if cfg.SEED < 0:
        raise ValueError("build_resumable_train_loader needs cfg.SEED >= 0 (see resolve_seed)")
    stream = DeterministicBatchStream(
        dataset,
        mapper,
        total // world,
        seed=cfg.SEED,
        shuffle=True,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
    )
    return ResumableTrainLoader(stream, cfg.DATALOADER.NUM_WORKERS)


#: Errors that train_net.py reports in one line, so their tracebacks are noise.
REPORTED_ERRORS = (UserInputError, NonFiniteError, CheckpointWriteError, ResultsWriteError)


class _ReportedErrorsWithoutTraceback(logging.Filter):
    """detectron2's training loop logs every exception with its traceback ("Exception during
    training:"); for :data:`REPORTED_ERRORS` the log gets their one-line message instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, REPORTED_ERRORS):
            record.msg, record.args = f"{record.getMessage()} {error}", ()
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def _reported_errors_without_traceback():
    """Within the context, detectron2's training loop logs :data:`REPORTED_ERRORS` in one line."""
    train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
    log_filter = _ReportedErrorsWithoutTraceback()
    train_loop_logger.addFilter(log_filter)
    try:
        yield
    finally:
        train_loop_logger.removeFilter(log_filter)


class _SeedState:
    """Checkpointable holding the trainer's seed, so a resumed run continues the same stream."""

    def __init__(self, trainer):
        self._trainer = trainer

    def state_dict(self):
        return {"seed": int(self._trainer.seed)}

    def load_state_dict(self, state):
        seed = int(state["seed"])
        if seed != self._trainer.seed:
            logger.warning(
                f"Resuming with the checkpoint's seed {seed} (the config says {self._trainer.seed})"
            )
        self._trainer.seed = seed


class _ModelRunningState:
    """Checkpointable with the Python-number running state of a model that ``state_dict`` misses:
    the EMA loss normalizer (``loss_normalizer``) of detectron2's dense detectors
    (``DenseDetector``: RetinaNet, FCOS). Without it a resumed RetinaNet restarts the EMA at its
    initial value and trains differently.

    In multi-process runs each process has its own EMA (of its own images' foreground anchors).
    :meth:`gather` (every process, after every step) collects all of them, so that the checkpoint,
    which only the main process writes, holds every rank's values and each rank resumes with its
    own (with another number of processes, every rank takes rank 0's).
    """

    ATTRIBUTES = ("loss_normalizer",)
    PER_RANK = "<per rank>"  # not a module name

    def __init__(self, model):
        self._model = unwrap_model(model)
        self._all_ranks = None
        self._needs_gather = comm.get_world_size() > 1 and any(True for _ in self._modules())

    def _modules(self):
        for name, module in self._model.named_modules():
            if isinstance(module, DenseDetector):
                yield name, module

    def _local_state(self):
        state = {}
        for name, module in self._modules():
            values = {a: float(getattr(module, a)) for a in self.ATTRIBUTES if hasattr(module, a)}
            if values:
                state[name] = values
        return state

    def gather(self):
        """Collect every process's values for the next checkpoint (all processes must call it)."""
        if self._needs_gather:
            self._all_ranks = comm.all_gather(self._local_state())

    def state_dict(self):
        state = self._local_state()
        if self._all_ranks is not None:
            state[self.PER_RANK] = self._all_ranks
        return state

    def load_state_dict(self, state):
        state = dict(state)
        per_rank = state.pop(self.PER_RANK, None)
        if per_rank is not None and len(per_rank) == comm.get_world_size():
            state = per_rank[comm.get_rank()]
        modules = dict(self._modules())
        for name, values in state.items():
            if name in modules:
                for attr, value in values.items():
                    setattr(modules[name], attr, value)


class RobustTrainer(DefaultTrainer):
    """``DefaultTrainer`` with the changes of the module docstring. Subclasses supply the data,
    model and evaluator as for ``DefaultTrainer``; ``build_train_loader`` may return a
    :class:`ResumableTrainLoader` (exact resume) or any iterable."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__'s steps, each part built by a method a subclass may override
        # (detectron2 names its classes there); it sets the same attributes.
        super(DefaultTrainer, self).__init__()  # TrainerBase
        cfg = resolve_seed(cfg)
        self.seed = cfg.SEED
        seed_all_rng(self.seed + comm.get_rank())  # as detectron2's default_setup
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()  # as DefaultTrainer: setup_logger was not called for detectron2
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = self.build_ddp_model(cfg, model)
        self._trainer = self.build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(cfg, model)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    #: ``probe(model, cfg, world_size=, eval_only=)``: runs the smallest inputs of a config
    #: through its model built on the meta device (:meth:`check_config`); None: no probe.
    config_probe = None
    #: More ``check(cfg, world_size=, eval_only=)`` of :meth:`check_config` (the task's keys).
    config_checks = ()
    #: The checkpointer of :meth:`build_checkpointer` and of :meth:`check_config`'s checkpoint check.
    checkpointer_cls = SafeCheckpointer

    @classmethod
    def check_config(
        cls, cfg, *, world_size: int = 1, eval_only: bool = False, resume: bool = False
    ) -> None:
        """Refuse a config this trainer cannot run, before anything is written: solver keys,
        the model's constructors, :attr:`config_probe`, :attr:`config_checks` and the checkpoint
        the run will load (:func:`~san_det.engine.validate.validate_config`).

        Raises:
            UserInputError: naming the key or file.
        """
        validate_config(
            cfg,
            world_size=world_size,
            eval_only=eval_only,
            probe=cls.config_probe,
            checks=cls.config_checks,
            checkpointer_cls=cls.checkpointer_cls,
            resume=resume,
        )

    @classmethod
    def build_ddp_model(cls, cfg, model):
        """The model wrapped for data parallelism (:func:`~san_det.engine.ddp.wrap_ddp`: CPU
        processes too); the model itself with one process. Called after the optimizer is built."""
        return wrap_ddp(model, broadcast_buffers=False)  # DefaultTrainer's arguments

    @classmethod
    def build_step_trainer(cls, cfg, model, data_loader, optimizer):
        """detectron2's step trainer with the NaN/inf guard (:mod:`~san_det.engine.step_guard`):
        :class:`GuardedAMPTrainer` with ``SOLVER.AMP.ENABLED``, else :class:`GuardedSimpleTrainer`.
        """
        step_trainer = GuardedAMPTrainer if cfg.SOLVER.AMP.ENABLED else GuardedSimpleTrainer
        return step_trainer(model, data_loader, optimizer)

    def build_checkpointer(self, cfg, model) -> SafeCheckpointer:
        """The checkpointer of the trainer's state (model, optimizer, scheduler, seed)."""
        self._running_state = _ModelRunningState(model)
        return self.checkpointer_cls(
            model,
            cfg.OUTPUT_DIR,
            **checkpointer_options(cfg),
            trainer=weakref.proxy(self),
            data_stream=_SeedState(weakref.proxy(self)),
            model_running_state=self._running_state,
            **{INPUT_INFO_KEY: InputInfo(input_info_from_cfg(cfg))},
        )

    def build_writers(self):
        """detectron2's writers, with ``metrics.json`` kept valid JSON (NaN/inf as null)."""
        writers = super().build_writers()
        for i, writer in enumerate(writers):
            if type(writer) is JSONWriter:
                writer.close()
                writers[i] = FiniteJSONWriter.in_output_dir(self.cfg.OUTPUT_DIR)
        return writers

    def build_hooks(self):
        # Last: it stops after the scheduler step and any checkpoint or evaluation of the step.
        return super().build_hooks() + [StopOnSignalHook()]

    def register_hooks(self, hooks):
        # Evaluations stop at once on SIGTERM / SIGINT and are re-run on resume (eval_interrupt)
        super().register_hooks(
            [
                InterruptibleEvalHook(h, self.cfg.TEST.EVAL_PERIOD)
                if isinstance(h, d2_hooks.EvalHook)
                else h
                for h in hooks
            ]
        )

    def state_dict(self):
        # detectron2 0.6's DefaultTrainer leaves the optimizer (momentum) out of checkpoints.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        ret[PENDING_EVALUATION] = getattr(self, PENDING_EVALUATION, None)
        ret[RUN_SHAPE_KEY] = run_shape(self.cfg, comm.get_world_size())
        return ret

    def load_state_dict(self, state_dict):
        # TrainerBase's: upstream DefaultTrainer's also loads "_trainer", requiring it.
        super(DefaultTrainer, self).load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state: the optimizer starts afresh")
        setattr(self, PENDING_EVALUATION, state_dict.get(PENDING_EVALUATION))
        self._resumed_run_shape = state_dict.get(RUN_SHAPE_KEY)

    def resume_or_load(self, resume=True):
        """detectron2's, and a warning for each value of :func:`~.resume_drift.run_shape` that
        differs from the resumed checkpoint's."""
        self._resumed_run_shape = None
        super().resume_or_load(resume=resume)
        base_lrs = getattr(self.scheduler, "base_lrs", None)
        resumed_lr = base_lrs[0] if base_lrs else self.optimizer.param_groups[0]["lr"]
        for line in resume_drift_warnings(
            self._resumed_run_shape,
            run_shape(self.cfg, comm.get_world_size()),
            self.start_iter,
            self.max_iter,
            resumed_lr,
        ):
            logger.warning(line)

    def train(self):
        loader = self.data_loader
        if isinstance(loader, ResumableTrainLoader):
            loader.seed = self.seed
            loader.set_start_iter(self.start_iter)
        try:
            with _reported_errors_without_traceback():
                results = super().train()
        except EvaluationInterrupted as e:
            raise evaluation_interrupted(self, e) from None
        if results is None and comm.is_main_process():
            # The evaluation after the last iteration (detectron2 returns it only when
            # TEST.EXPECTED_RESULTS is set).
            results = getattr(self, "_last_eval_results", None)
        return results

    def run_step(self):
        self._trainer.iter = self.iter
        # Each step's own randomness (dropout, sampling in heads) depends only on the seed and
        # the iteration, so a resumed run repeats it.
        seed_all_rng(mix_seed(self.seed, _STEP_STREAM, self.iter, comm.get_rank()))
        try:
            # TorchScript's profiling executor runs scripted functions (detectron2's focal loss,
            # box transforms) unfused on their first calls and fused afterwards, which rounds
            # differently: a resumed process would start on other numerics than the run it
            # continues. Unoptimised execution is the same on every call (and these are tiny ops).
            with torch.jit.optimized_execution(False):
                self._trainer.run_step()
            running_state = getattr(self, "_running_state", None)
            if running_state is not None:  # a subclass's own checkpointer may lack it
                running_state.gather()
        except NonFiniteError as e:
            has = self.checkpointer.has_checkpoint()
            last = self.checkpointer.get_checkpoint_file() if has else "none written yet"
            raise NonFiniteError(f"{e}; last good checkpoint: {last}") from None
