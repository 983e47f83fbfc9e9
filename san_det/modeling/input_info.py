"""The input a checkpoint's weights expect (channel order, normalisation), recorded and checked.

Pretrained weights only work on the inputs they were trained on: the official SAN models read
RGB images normalised with ImageNet's mean and std, detectron2's defaults are BGR with std 1. A
backbone loaded into a model that normalises otherwise runs without any error, on inputs it never
saw. So converted checkpoints (``tools/convert_san_official.py``,
``tools/convert_classifier_to_detection.py``) and every checkpoint san_det's trainers write record
:func:`input_info_from_cfg` under :data:`INPUT_INFO_KEY`, and
:class:`~san_det.engine.checkpoint.SafeCheckpointer` (the trainers' checkpointer) compares it with
the model's ``input_format`` / ``pixel_mean`` / ``pixel_std`` when it loads the file:
:class:`InputMismatchError`, one line naming both, unless ``MODEL.WEIGHTS_ALLOW_INPUT_MISMATCH``
(then a warning). Classifier checkpoints carry the same fields in their own entry
(``san_det_classifier``, registered with :func:`register_input_info_key`). ``train_net.py`` runs
:func:`check_weights_input` in the launching process, before anything is written.
"""

import logging
import os
from typing import Dict, List, Mapping, Optional

import torch

from ..errors import CheckpointError

__all__ = [
    "INPUT_INFO_KEY",
    "InputInfo",
    "InputMismatchError",
    "check_checkpoint_input",
    "check_weights_input",
    "describe_input_mismatch",
    "input_info_from_cfg",
    "recorded_input_info",
    "register_input_info_key",
]

logger = logging.getLogger(__name__)

INPUT_INFO_KEY = "san_det_input"
_INFO_KEYS: List[str] = [INPUT_INFO_KEY]
_FIELDS = ("input_format", "pixel_mean", "pixel_std")
_CONFIG_KEYS = {
    "input_format": "INPUT.FORMAT",
    "pixel_mean": "MODEL.PIXEL_MEAN",
    "pixel_std": "MODEL.PIXEL_STD",
}


class InputMismatchError(CheckpointError):
    """The checkpoint's weights expect other inputs than the model is configured for (a
    :class:`~san_det.errors.CheckpointError`)."""


def register_input_info_key(key: str) -> None:
    """Also read input info from checkpoint entry ``key`` (e.g. the classifier's own entry)."""
    if key not in _INFO_KEYS:
        _INFO_KEYS.append(key)


def recorded_input_info(checkpoint: Mapping) -> Optional[Mapping]:
    """The input info a loaded checkpoint records (first registered entry present), or None."""
    for key in _INFO_KEYS:
        info = checkpoint.get(key)
        if isinstance(info, Mapping) and any(f in info for f in _FIELDS):
            return info
    return None


class InputInfo:
    """A checkpointable writing ``info`` into every checkpoint (informative: loads nothing)."""

    def __init__(self, info: Mapping):
        self.info = dict(info)

    def state_dict(self) -> Dict:
        return dict(self.info)

    def load_state_dict(self, state: Mapping) -> None:
        pass


def input_info_from_cfg(cfg) -> Dict:
    """``{"input_format", "pixel_mean", "pixel_std"}`` of a config."""
    return {
        "input_format": cfg.INPUT.FORMAT,
        "pixel_mean": [float(x) for x in cfg.MODEL.PIXEL_MEAN],
        "pixel_std": [float(x) for x in cfg.MODEL.PIXEL_STD],
    }


def _model_info(model: torch.nn.Module) -> Dict:
    model = model.module if hasattr(model, "module") else model
    info = {}
    if isinstance(getattr(model, "input_format", None), str):
        info["input_format"] = model.input_format
    for name in ("pixel_mean", "pixel_std"):
        buf = getattr(model, name, None)
        if isinstance(buf, torch.Tensor):
            info[name] = [float(x) for x in buf.flatten().tolist()]
    return info


def _rounded(value):
    return [round(float(x), 3) for x in value] if isinstance(value, (list, tuple)) else value


def describe_input_mismatch(info: Optional[Mapping], ours) -> Optional[str]:
    """What differs between the recorded ``info`` and ``ours`` (a model, or an info dict such as
    :func:`input_info_from_cfg`'s), or None (also when nothing is recorded or the model does not
    say)."""
    if not info:
        return None
    if isinstance(ours, torch.nn.Module):
        ours = _model_info(ours)
    differences = [
        f"{_CONFIG_KEYS[f]} {_rounded(info[f])} (this model: {_rounded(ours[f])})"
        for f in _FIELDS
        if f in info and f in ours and _rounded(info[f]) != _rounded(ours[f])
    ]
    return "; ".join(differences) or None


def check_checkpoint_input(
    info: Optional[Mapping],
    ours,
    path: str,
    allow_mismatch: bool = False,
    log: Optional[logging.Logger] = None,
) -> None:
    """Compare the input ``info`` recorded in the checkpoint ``path`` with ``ours`` (a model or
    an info dict).

    Raises:
        InputMismatchError: they differ and not ``allow_mismatch`` (then: a warning on ``log``).
    """
    differences = describe_input_mismatch(info, ours)
    if differences is None:
        return
    message = (
        f"the weights in {path} expect other inputs than this model is configured for: they "
        f"were trained with {differences}; set those values in the config"
    )
    if not allow_mismatch:
        raise InputMismatchError(
            f"{message} (or MODEL.WEIGHTS_ALLOW_INPUT_MISMATCH True to load them anyway)"
        )
    (log or logger).warning(f"{message}. Loading them anyway (MODEL.WEIGHTS_ALLOW_INPUT_MISMATCH)")


def check_weights_input(cfg) -> None:
    """:func:`check_checkpoint_input` for ``cfg.MODEL.WEIGHTS`` against ``cfg``, before a model
    is built (for the launching process). Files that ``torch.load(weights_only=True)`` cannot
    read are left to the checkpointer, which reports them when it loads them.
    """
    path = cfg.MODEL.WEIGHTS
    if not path or "://" in path or not os.path.isfile(path):
        return
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickles of other formats, corrupt files: the checkpointer reports them
        return
    if isinstance(checkpoint, Mapping):
        allow = cfg.MODEL.get("WEIGHTS_ALLOW_INPUT_MISMATCH", False)
        check_checkpoint_input(
            recorded_input_info(checkpoint), input_info_from_cfg(cfg), path, allow
        )
