"""Check a whole config before anything runs or is written; every error names the key.

:func:`validate_config` (``train_net.py``'s ``check_input`` calls it through the trainer's
``check_config``) refuses, with a :class:`~san_det.engine.errors.UserInputError`:

- solver values a run cannot use: ``SOLVER.IMS_PER_BATCH`` that is not a positive multiple of the
  number of processes, ``SOLVER.MAX_ITER < 0``, ``SOLVER.CHECKPOINT_PERIOD < 1`` (training only);
- anything the model's constructors refuse: the model is built on the meta device (no memory, no
  initialisation cost: 0.1-0.8 s for the COCO configs on one core), so every check of san_det's
  and detectron2's builders runs (SASA/SAN/FPN/head keys, registry names);
- input sizes the network cannot take: the smallest image the config produces is run through the
  meta model by the trainer's *probe* (e.g. :func:`san_det.detection.validate.probe_detector`),
  which catches e.g. SAN's reflection padding on too small inputs or a batch norm that sees one
  value per channel;
- the checkpoint the run will load (``--resume``'s last checkpoint, ``MODEL.WEIGHTS``): loaded
  into the meta model as the run will load it (:func:`check_checkpoint`; tensors memory-mapped,
  not read), so an unreadable, untrusted, mismatched or other-architecture checkpoint is refused
  before the output folder exists.

Checks a higher layer owns (detection, classification) come in through ``check_config`` overrides of the
trainers and their own probes.
"""

import contextlib
import logging
import math
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..layers import use_backend
from .checkpoint import checkpointer_options
from .checkpoint_rules import choose_checkpoint
from .errors import UserInputError

__all__ = [
    "build_model_on_meta",
    "check_checkpoint",
    "check_solver",
    "run_probe",
    "validate_config",
    "without_logging",
]

logger = logging.getLogger(__name__)

#: Errors of model constructors and of shape checks in forward: the config is at fault.
CONFIG_ERRORS = (ValueError, AssertionError, KeyError, TypeError, IndexError)

Probe = Callable[..., None]


@contextlib.contextmanager
def without_logging() -> Iterator[None]:
    """The check builds and loads the model the run builds and loads again: the constructors' and
    checkpointer's log lines would come twice (and before the run's loggers exist)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _message(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(text).split()) or type(error).__name__


def check_solver(cfg, world_size: int) -> None:
    """Training keys of ``SOLVER`` that no run can use."""
    s = cfg.SOLVER
    batch = s.IMS_PER_BATCH
    if batch < 1 or batch % world_size:
        hint = f" (e.g. {world_size * max(1, math.ceil(max(batch, 1) / world_size))})"
        raise UserInputError(
            f"SOLVER.IMS_PER_BATCH must be a positive multiple of the number of processes "
            f"({world_size}), got {batch}{hint if world_size > 1 else ''}"
        )
    if s.MAX_ITER < 0:
        raise UserInputError(f"SOLVER.MAX_ITER must be >= 0, got {s.MAX_ITER}")
    if s.CHECKPOINT_PERIOD < 1:
        raise UserInputError(
            f"SOLVER.CHECKPOINT_PERIOD must be >= 1 (iterations), got {s.CHECKPOINT_PERIOD}"
        )
    # what torch's optimizers refuse (ValueError in every worker, after OUTPUT_DIR is written)
    for key in ("BASE_LR", "MOMENTUM", "WEIGHT_DECAY", "WEIGHT_DECAY_NORM", "WEIGHT_DECAY_BIAS"):
        value = s.get(key)
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise UserInputError(f"SOLVER.{key} must be a number >= 0, got {value}")


def build_model_on_meta(cfg) -> nn.Module:
    """``cfg``'s meta-architecture built on the meta device (shapes only, no memory).

    Raises:
        UserInputError: a constructor refused the config (its message names the key).
    """
    name = cfg.MODEL.META_ARCHITECTURE
    try:
        arch = META_ARCH_REGISTRY.get(name)
    except KeyError:
        known = ", ".join(sorted(k for k, _ in META_ARCH_REGISTRY))
        raise UserInputError(
            f"MODEL.META_ARCHITECTURE {name!r} is not registered; registered: {known}"
        ) from None
    try:
        with torch.device("meta"), without_logging():
            return arch(cfg)
    except CONFIG_ERRORS as e:
        raise UserInputError(f"invalid model config: {_message(e)}") from None


def run_probe(model: nn.Module, training: bool, forward: Callable[[], None], what: str) -> None:
    """Run ``forward()`` on the meta ``model`` (in training or inference mode).

    Raises:
        UserInputError: the network refused the input; the message says which (``what``).
    """
    model.train(training)
    try:
        # san_det's compiled kernels cannot run on meta tensors; the reference ops can.
        with torch.no_grad(), use_backend("reference"):
            forward()
    except NotImplementedError as e:  # an op without a meta kernel: the input cannot be probed
        logger.debug(f"input check skipped ({what}): {e}")
    except RuntimeError as e:
        if "meta" in str(e).lower():
            logger.debug(f"input check skipped ({what}): {e}")
            return
        raise UserInputError(f"the network cannot take {what}: {_message(e)}") from None
    except CONFIG_ERRORS as e:
        raise UserInputError(f"the network cannot take {what}: {_message(e)}") from None


def check_checkpoint(model: nn.Module, cfg, checkpointer_cls, *, resume: bool, eval_only: bool):
    """Load the checkpoint a run will load into ``model`` (built on the meta device) the way the
    run loads it: the file :func:`~.checkpoint_rules.choose_checkpoint` chooses, loaded by
    ``checkpointer_cls``. Remote files are not checked here.

    Raises:
        UserInputError: what loading would raise (unreadable or untrusted file, another
            architecture or input normalisation, missing or mismatched tensors), naming the file.
    """
    checker = checkpointer_cls(
        model, cfg.OUTPUT_DIR, save_to_disk=False, memory_map=True, **checkpointer_options(cfg)
    )
    for name, key in (("pixel_mean", "PIXEL_MEAN"), ("pixel_std", "PIXEL_STD")):
        buffer = getattr(model, name, None)
        if isinstance(buffer, torch.Tensor) and buffer.is_meta:  # the input check reads them
            values = torch.tensor(cfg.MODEL[key], dtype=torch.float32).view(-1, 1, 1)
            model.register_buffer(name, values, persistent=False)
    purpose = "eval" if eval_only else "train"
    choice = choose_checkpoint(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR, resume=resume, purpose=purpose)
    path = choice.path
    if not path or "://" in path:
        return
    try:
        with warnings.catch_warnings(), without_logging():
            warnings.simplefilter("ignore")  # "copying ... to a meta parameter is a no-op"
            checker.load_chosen(choice)
    except UserInputError:  # CheckpointError, InputMismatchError
        raise
    except Exception as e:  # e.g. a loader that reads tensor values: not checkable on meta
        logger.debug(f"checkpoint check skipped for {path}: {type(e).__name__}: {e}")


def validate_config(
    cfg,
    *,
    world_size: int = 1,
    eval_only: bool = False,
    probe: Optional[Probe] = None,
    checks: Sequence[Callable] = (),
    checkpointer_cls=None,
    resume: bool = False,
) -> None:
    """Refuse a config that cannot run (see the module docstring).

    Args:
        world_size: processes of the run, all machines together.
        eval_only: only evaluation will run (no solver checks, no training-size probe).
        probe: ``probe(model, cfg, world_size=, eval_only=)`` runs the smallest inputs through
            the meta model (``None``: none).
        checks: more ``check(cfg, world_size=, eval_only=)`` (a higher layer's own keys).
        checkpointer_cls: the run's checkpointer class (a :class:`SafeCheckpointer`): the
            checkpoint it will load is checked (:func:`check_checkpoint`). None: not checked.
        resume: the run resumes from ``OUTPUT_DIR``'s last checkpoint (``--resume``).

    Raises:
        UserInputError: naming the key.
    """
    if world_size < 1:
        raise UserInputError(f"the number of processes must be >= 1, got {world_size}")
    if not eval_only:
        check_solver(cfg, world_size)
    for check in checks:
        check(cfg, world_size=world_size, eval_only=eval_only)
    model = build_model_on_meta(cfg)
    if probe is not None:
        probe(model, cfg, world_size=world_size, eval_only=eval_only)
    if checkpointer_cls is not None:
        check_checkpoint(model, cfg, checkpointer_cls, resume=resume, eval_only=eval_only)
