"""The ImageNet recipe as config: SGD (momentum, Nesterov), weight decay groups, LR scaling, epochs.

- :func:`resolve_classification_schedule`: ``BASE_LR`` is the LR of ``REFERENCE_BATCH_SIZE``
  images per step (256), so the LR used is ``BASE_LR * IMS_PER_BATCH / 256``; epoch-based lengths
  (``CLASSIFICATION.SOLVER.EPOCHS`` and friends) become iteration counts for the training set's
  size. The schedule itself is detectron2's ``WarmupCosineLR`` (linear warm-up, then cosine to 0).
- :func:`build_classification_optimizer`: ``torch.optim.SGD`` with detectron2's gradient clipping
  option, and no weight decay on norms and embeddings when
  ``CLASSIFICATION.SOLVER.NO_DECAY_NORM_AND_EMBEDDING`` is set.
"""

import fnmatch
import logging
import math
from typing import Any, Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups

__all__ = [
    "NORM_TYPES",
    "build_classification_optimizer",
    "check_schedule_keys",
    "classification_param_groups",
    "resolve_classification_schedule",
]

logger = logging.getLogger(__name__)

NORM_TYPES = (
    torch.nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
    FrozenBatchNorm2d,
)


def classification_param_groups(
    model: torch.nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    no_decay_norm_and_embedding: bool,
    embedding_patterns=(),
) -> List[Dict[str, Any]]:
    """Parameter groups: weight decay 0 on norms and embeddings when asked, else
    ``weight_decay_norm`` on norms and ``weight_decay`` on everything else.

    Embeddings are parameters whose own name matches one of ``embedding_patterns`` (fnmatch).
    """
    params, seen = [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or p in seen:
                continue
            seen.add(p)
            is_norm = isinstance(module, NORM_TYPES)
            is_embedding = any(fnmatch.fnmatchcase(name, pat) for pat in embedding_patterns)
            if no_decay_norm_and_embedding and (is_norm or is_embedding):
                wd = 0.0
            elif is_norm:
                wd = weight_decay_norm
            else:
                wd = weight_decay
            params.append({"params": [p], "lr": base_lr, "weight_decay": wd})
    return reduce_param_groups(params)


def build_classification_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with ``SOLVER.MOMENTUM``, ``NESTEROV``, ``WEIGHT_DECAY`` (see the module docstring)."""
    s, c = cfg.SOLVER, cfg.CLASSIFICATION.SOLVER
    groups = classification_param_groups(
        model,
        base_lr=s.BASE_LR,
        weight_decay=s.WEIGHT_DECAY,
        weight_decay_norm=s.WEIGHT_DECAY_NORM,
        no_decay_norm_and_embedding=c.NO_DECAY_NORM_AND_EMBEDDING,
        embedding_patterns=tuple(c.EMBEDDING_PATTERNS),
    )
    return maybe_add_gradient_clipping(cfg, torch.optim.SGD)(
        groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV, weight_decay=s.WEIGHT_DECAY
    )


def _epochs_to_iters(epochs: float, iters_per_epoch: float) -> int:
    return max(1, int(math.ceil(epochs * iters_per_epoch)))


# Iteration keys that epoch keys set, with the epoch key that sets each (when it is > 0).
_SET_BY_EPOCHS = (
    ("SOLVER.MAX_ITER", "EPOCHS"),
    ("SOLVER.WARMUP_ITERS", "EPOCHS"),  # 0 without WARMUP_EPOCHS
    ("SOLVER.CHECKPOINT_PERIOD", "CHECKPOINT_PERIOD_EPOCHS"),
    ("TEST.EVAL_PERIOD", "EVAL_PERIOD_EPOCHS"),
)


def _get(cfg: CfgNode, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def check_schedule_keys(cfg: CfgNode) -> None:
    """The schedule keys before they are resolved (no dataset needed).

    With ``CLASSIFICATION.SOLVER.EPOCHS > 0`` the epoch keys set ``SOLVER.MAX_ITER``,
    ``WARMUP_ITERS``, ``CHECKPOINT_PERIOD`` and ``TEST.EVAL_PERIOD``: one of those changed from
    detectron2's default as well would be silently overridden, so it is refused.

    Raises:
        ValueError: naming both keys.
    """
    from detectron2.config import get_cfg

    c = cfg.CLASSIFICATION.SOLVER
    batch = cfg.SOLVER.IMS_PER_BATCH
    if batch <= 0:
        raise ValueError(f"SOLVER.IMS_PER_BATCH must be > 0, got {batch}")
    if c.REFERENCE_BATCH_SIZE < 0:
        raise ValueError(
            f"CLASSIFICATION.SOLVER.REFERENCE_BATCH_SIZE must be >= 0, got {c.REFERENCE_BATCH_SIZE}"
        )
    for key in ("EPOCHS", "WARMUP_EPOCHS", "CHECKPOINT_PERIOD_EPOCHS", "EVAL_PERIOD_EPOCHS"):
        if c[key] < 0:
            raise ValueError(f"CLASSIFICATION.SOLVER.{key} must be >= 0, got {c[key]}")
    if c.EPOCHS <= 0:
        if c.WARMUP_EPOCHS or c.CHECKPOINT_PERIOD_EPOCHS or c.EVAL_PERIOD_EPOCHS:
            raise ValueError(
                "CLASSIFICATION.SOLVER.WARMUP_EPOCHS / CHECKPOINT_PERIOD_EPOCHS / "
                "EVAL_PERIOD_EPOCHS need CLASSIFICATION.SOLVER.EPOCHS > 0"
            )
        return
    defaults = get_cfg()
    for key, epoch_key in _SET_BY_EPOCHS:
        value, default = _get(cfg, key), _get(defaults, key)
        if c[epoch_key] > 0 and value != default:
            raise ValueError(
                f"CLASSIFICATION.SOLVER.{epoch_key} {c[epoch_key]} sets {key}, which is also "
                f"set (to {value}): drop {key}, or set CLASSIFICATION.SOLVER.{epoch_key} 0 to "
                f"use it"
            )


def resolve_classification_schedule(cfg: CfgNode, num_train_images: int = 0) -> CfgNode:
    """A copy of ``cfg`` with the LR scaled by batch size and epoch keys turned into iterations.

    Idempotent: a resolved config is returned unchanged. ``num_train_images`` is needed only when
    ``CLASSIFICATION.SOLVER.EPOCHS > 0``.

    Raises:
        ValueError: bad batch size or epoch settings, naming the config key.
    """
    if cfg.CLASSIFICATION.SOLVER.get("_RESOLVED", False):
        return cfg
    check_schedule_keys(cfg)
    c = cfg.CLASSIFICATION.SOLVER
    batch = cfg.SOLVER.IMS_PER_BATCH
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    if c.REFERENCE_BATCH_SIZE > 0:
        cfg.SOLVER.BASE_LR = cfg.SOLVER.BASE_LR * batch / c.REFERENCE_BATCH_SIZE
    if c.EPOCHS > 0:
        if num_train_images <= 0:
            raise ValueError("CLASSIFICATION.SOLVER.EPOCHS > 0 needs the training set's size")
        per_epoch = num_train_images / batch
        cfg.SOLVER.MAX_ITER = _epochs_to_iters(c.EPOCHS, per_epoch)
        cfg.SOLVER.WARMUP_ITERS = (
            int(round(c.WARMUP_EPOCHS * per_epoch)) if c.WARMUP_EPOCHS > 0 else 0
        )
        if c.CHECKPOINT_PERIOD_EPOCHS > 0:
            cfg.SOLVER.CHECKPOINT_PERIOD = _epochs_to_iters(c.CHECKPOINT_PERIOD_EPOCHS, per_epoch)
        if c.EVAL_PERIOD_EPOCHS > 0:
            cfg.TEST.EVAL_PERIOD = _epochs_to_iters(c.EVAL_PERIOD_EPOCHS, per_epoch)
    if cfg.SOLVER.WARMUP_ITERS > cfg.SOLVER.MAX_ITER:
        raise ValueError(
            f"warm-up ({cfg.SOLVER.WARMUP_ITERS} iterations) is longer than training "
            f"(SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER})"
        )
    cfg.CLASSIFICATION.SOLVER._RESOLVED = True
    epochs = (
        f" (CLASSIFICATION.SOLVER.EPOCHS {c.EPOCHS} of {num_train_images} images)"
        if c.EPOCHS > 0
        else ""
    )
    logger.info(
        f"Classification schedule: LR {cfg.SOLVER.BASE_LR:g} for batch {batch}, "
        f"SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER} iterations{epochs} "
        f"({cfg.SOLVER.WARMUP_ITERS} warm-up), "
        f"{cfg.SOLVER.LR_SCHEDULER_NAME}"
    )
    if frozen:
        cfg.freeze()
    return cfg
