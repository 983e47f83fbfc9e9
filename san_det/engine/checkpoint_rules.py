"""Which checkpoint a run loads, and the rules a checkpoint must pass: plain functions.

- :func:`choose_checkpoint` is the one decision of which file a run loads (training, ``--resume``,
  ``--eval-only``, the pre-flight check of ``train_net.py``, ``tools/predict.py``).
- :func:`read_checkpoint` reads a file (:class:`~san_det.errors.CheckpointError` naming it when it
  is unreadable, or holds Python objects that only ``MODEL.WEIGHTS_TRUSTED`` may unpickle).
- The checks are functions over ``(checkpoint, model, request)`` (:class:`LoadRequest`: the path,
  strict or fine-tuning, and the config's :class:`LoadRules`). Before the tensors are loaded:
  :func:`check_model_entry`, :func:`check_input_normalisation` (and, for detectors, the
  classifier-to-detector key mapping of :mod:`san_det.classification.checkpoint`), each returning
  the checkpoint to load, as timm's ``checkpoint_filter_fn``; after: :func:`check_fit` (recorded
  architecture, missing / unexpected / reshaped tensors). :class:`~.checkpoint.SafeCheckpointer`
  applies them in its ``load``, the one place (docs/CHECKPOINTS.md).
- :func:`first_non_finite`: the rule of saving (no NaN/inf checkpoint is written).
"""

import logging
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, Mapping, Optional

import torch
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import _filter_reused_missing_keys
from torch import nn

from ..errors import CheckpointError, UserInputError
from ..modeling.architecture import architecture_differences
from ..modeling.input_info import check_checkpoint_input, recorded_input_info

__all__ = [
    "ARCHITECTURE_KEY",
    "CheckpointChoice",
    "LoadRequest",
    "LoadRules",
    "check_fit",
    "check_input_normalisation",
    "check_model_entry",
    "choose_checkpoint",
    "first_non_finite",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

#: The checkpoint entry holding the model's architecture-defining config keys.
ARCHITECTURE_KEY = "architecture"

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_WEIGHTS_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")

PURPOSES = ("train", "eval", "predict")


# ------------------------------------------------------------------------------ which file
@dataclass(frozen=True)
class CheckpointChoice:
    """The file a run loads and how.

    Attributes:
        path: the checkpoint; "" loads nothing (training from scratch).
        resume: the run continues ``OUTPUT_DIR``'s last checkpoint with the trainer's state
            (optimizer, iteration, data stream); else only the model is loaded.
        strict: every tensor must match (resuming, evaluating, predicting); else fine-tuning.
    """

    path: str
    resume: bool
    strict: bool


def is_local(path: str) -> bool:
    return bool(path) and "://" not in path


def choose_checkpoint(
    weights: str, output_dir: str, *, resume: bool, purpose: str = "train"
) -> CheckpointChoice:
    """The one decision of which checkpoint a run loads.

    With ``resume`` and an ``output_dir/last_checkpoint``: the checkpoint it names, strictly (with
    the trainer's state when ``purpose`` is ``"train"``). Otherwise ``weights``
    (``MODEL.WEIGHTS``): fine-tuning when training, strictly for ``"eval"`` (``--eval-only``) and
    ``"predict"`` (``tools/predict.py``, which never resumes).

    Raises:
        CheckpointError: ``last_checkpoint`` names a file that does not exist.
        UserInputError: evaluating or predicting without any trained weights.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    last = os.path.join(output_dir, "last_checkpoint") if output_dir else ""
    if resume and purpose != "predict" and last and PathManager.exists(last):
        with PathManager.open(last, "r") as f:
            path = os.path.join(output_dir, f.read().strip())
        if is_local(path) and not os.path.isfile(path):
            raise CheckpointError(
                f"{last} names {path}, which does not exist; delete last_checkpoint to start over "
                "or restore the file"
            )
        return CheckpointChoice(path, resume=purpose == "train", strict=True)
    if not weights and purpose == "eval":
        where = f"; {last} does not exist" if resume else ""
        raise UserInputError(
            "--eval-only needs trained weights: pass MODEL.WEIGHTS path/to/model_final.pth, or "
            f"--resume to evaluate the last checkpoint in OUTPUT_DIR{where}"
        )
    if not weights and purpose == "predict":
        raise UserInputError(
            "MODEL.WEIGHTS is empty: give the trained model, e.g. MODEL.WEIGHTS "
            "output/model_final.pth"
        )
    return CheckpointChoice(weights, resume=False, strict=purpose != "train")


# ------------------------------------------------------------------------------- reading
def first_line(error: BaseException) -> str:
    text = _ANSI_ESCAPE.sub("", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _with_model_key(loaded: Any) -> Dict[str, Any]:
    """As ``DetectionCheckpointer._load_file``: a bare state dict becomes ``{"model": ...}``."""
    return loaded if isinstance(loaded, dict) and "model" in loaded else {"model": loaded}


def _torch_load(path: str, trusted: bool, memory_map: bool) -> Dict[str, Any]:
    if memory_map and is_local(path):
        try:
            return _with_model_key(
                torch.load(path, map_location="cpu", mmap=True, weights_only=not trusted)
            )
        except Exception:  # a legacy (non-zip) file cannot be mapped: read it as below
            pass
    with PathManager.open(path, "rb") as f:
        return _with_model_key(torch.load(f, map_location="cpu", weights_only=not trusted))


def read_checkpoint(
    path: str,
    *,
    trusted: bool = False,
    memory_map: bool = False,
    read_other: Optional[Callable[[str], Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    """The checkpoint in the local file ``path`` as ``{"model": state dict, ...}``.

    Args:
        trusted: unpickle any Python object (``torch.load(weights_only=False)``; can run code).
        memory_map: map ``.pth`` files instead of reading them (for checks on the meta device).
        read_other: reader of detectron2's other formats (``.pkl``, ``.pyth``).

    Raises:
        CheckpointError: unreadable, truncated, not a checkpoint, or holding Python objects
            besides tensors while not ``trusted``; the message names the file.
    """
    try:
        if read_other is not None and path.endswith((".pkl", ".pyth")):
            checkpoint = read_other(path)
        else:
            checkpoint = _torch_load(path, trusted, memory_map)
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        if found is None:  # e.g. "Unsupported operand": not a pickle torch can read
            found_error = _WEIGHTS_UNPICKLER_ERROR.search(_ANSI_ESCAPE.sub("", str(e)))
            reason = found_error.group(1) if found_error else first_line(e)
            raise CheckpointError(
                f"cannot read checkpoint {path} (truncated or corrupt file?): "
                f"{type(e).__name__}: {reason}"
            ) from e
        raise CheckpointError(
            f"checkpoint {path} is a valid pickle but holds Python objects besides "
            f"tensors ({found.group(1)}), which torch.load refuses by default (weights_only) "
            "because unpickling them can run code: if you trust the file, set "
            "MODEL.WEIGHTS_TRUSTED True to load it"
        ) from e
    except Exception as e:  # torch.load / pickle: many exception types for a corrupt file
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated or corrupt file?): "
            f"{type(e).__name__}: {first_line(e)}"
        ) from e
    return checkpoint


# -------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class LoadRules:
    """What a checkpointer accepts (``checkpointer_options(cfg)``'s keys).

    Attributes:
        architecture: the model's :func:`~san_det.modeling.architecture.architecture_config`,
            compared with the one a checkpoint records (None: not compared).
        allow_shape_mismatch: fine-tuning keeps the model's initial value of a tensor whose
            shape differs (``MODEL.WEIGHTS_ALLOW_SHAPE_MISMATCH``) instead of refusing.
        allow_input_mismatch: another recorded input format / normalisation is a warning
            (``MODEL.WEIGHTS_ALLOW_INPUT_MISMATCH``) instead of an error.
    """

    architecture: Optional[Dict[str, Any]] = None
    allow_shape_mismatch: bool = False
    allow_input_mismatch: bool = False


@dataclass(frozen=True)
class LoadRequest:
    """One load: the file, strict (resume, evaluation) or fine-tuning, the rules, and the logger
    of its warnings (the checkpointer's)."""

    path: str
    strict: bool
    rules: LoadRules
    log: logging.Logger = logger


#: ``check(checkpoint, model, request) -> checkpoint to load`` (may remap keys; raises
#: :class:`~san_det.errors.CheckpointError`).
Check = Callable[[Dict[str, Any], nn.Module, LoadRequest], Dict[str, Any]]


def check_model_entry(checkpoint: Any, model: nn.Module, request: LoadRequest) -> Dict[str, Any]:
    """The file holds a ``"model"`` state dict."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{request.path} is not a model checkpoint (no 'model' state dict)")
    return checkpoint


def check_input_normalisation(
    checkpoint: Dict[str, Any], model: nn.Module, request: LoadRequest
) -> Dict[str, Any]:
    """The input format / normalisation the checkpoint records is the model's
    (:func:`~san_det.modeling.input_info.check_checkpoint_input`)."""
    info = recorded_input_info(checkpoint)
    check_checkpoint_input(info, model, request.path, request.rules.allow_input_mismatch)
    return checkpoint


def _architecture_note(recorded: Any, request: LoadRequest) -> str:
    """The recorded architecture keys that differ from the model's, listed; a warning when
    fine-tuning (then only backbone keys count)."""
    architecture = request.rules.architecture
    if architecture is None or not isinstance(recorded, dict):
        return ""
    differences = architecture_differences(recorded, architecture, fine_tune=not request.strict)
    listed = "; ".join(f"{k} {old!r} there, {new!r} here" for k, old, new in differences)
    if listed and not request.strict:
        request.log.warning(
            f"{request.path} was trained with other backbone settings ({listed}): its weights "
            "initialise a differently configured network"
        )
    return listed if request.strict else ""


def check_fit(
    checkpoint: Mapping,
    incompatible,
    model: nn.Module,
    request: LoadRequest,
    given: Optional[Collection[str]] = None,
) -> None:
    """After the tensors were loaded (``incompatible``: fvcore's ``_IncompatibleKeys``): strict,
    every tensor of the model is in the checkpoint with its shape and vice versa, and the recorded
    architecture is the model's; fine-tuning, at least one tensor in common and no shape
    mismatch unless allowed; missing and unexpected tensors are one warning.

    Args:
        given: the keys of the state dict that was loaded (torch does not report a missing
            ``num_batches_tracked``); None: every model key not reported missing was loaded.
    """
    path = request.path
    note = _architecture_note(checkpoint.get(ARCHITECTURE_KEY), request)
    model_keys = list(model.state_dict().keys())
    shapes = {k: (ckpt, ours) for k, ckpt, ours in incompatible.incorrect_shapes}
    missing = set(_filter_reused_missing_keys(model, incompatible.missing_keys))
    unexpected = list(incompatible.unexpected_keys)
    problems = []
    for key in model_keys:
        if key in shapes:
            ckpt, ours = shapes[key]
            problems.append((key, f"shape {ckpt} in the checkpoint, {ours} in the model"))
        elif key in missing and (request.strict or not shapes):
            problems.append((key, "in the model but not in the checkpoint"))
    problems += [(key, "in the checkpoint but not in the model") for key in unexpected]
    counts = (
        f"{len(shapes)} with another shape, {len(missing)} missing from the checkpoint, "
        f"{len(unexpected)} not in the model"
    )
    names = None if given is None else set(given) | {k[7:] for k in given if k[:7] == "module."}
    not_missing = set(model_keys) - set(incompatible.missing_keys)
    loaded = len(not_missing if names is None else not_missing & names)
    if request.strict and problems:
        key, what = problems[0]
        made_by = f"; its recorded config differs: {note}" if note else ""
        raise CheckpointError(
            f"checkpoint {path} does not match the model (another architecture or config?): "
            f"first mismatched key {key!r}: {what}; {counts}{made_by}"
        )
    if note:
        raise CheckpointError(
            f"checkpoint {path} was made by another architecture: {note}; its tensors fit, "
            "but compute something else in this model: load it with the config it was made "
            "with (config.yaml in its output folder)"
        )
    if loaded <= 0 and model_keys:
        key, what = problems[0] if problems else (model_keys[0], "not in the checkpoint")
        raise CheckpointError(
            f"checkpoint {path} has no tensor in common with the model (another "
            f"architecture?): first mismatched key {key!r}: {what}; {counts}"
        )
    if shapes and not request.rules.allow_shape_mismatch:
        key, (ckpt, ours) = next(iter(shapes.items()))
        raise CheckpointError(
            f"checkpoint {path}: first mismatched key {key!r} has shape {ckpt} in the "
            f"checkpoint but {ours} in the model ({len(shapes)} such tensors); set "
            "MODEL.WEIGHTS_ALLOW_SHAPE_MISMATCH True to keep those tensors' initial values"
        )
    if missing or unexpected or shapes:
        request.log.warning(
            f"Loaded {loaded} of {len(model_keys)} model tensors from {path}: {counts}"
            + (f"; first missing {sorted(missing)[0]!r}" if missing else "")
            + (f"; first unexpected {unexpected[0]!r}" if unexpected else "")
        )


def first_non_finite(state: Dict[str, Any]) -> Optional[str]:
    """The first key of ``state`` whose floating-point tensor holds a NaN or inf, or None."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                return key
    return None

