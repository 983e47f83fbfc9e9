"""Crash-safe checkpoints and loading that fails loudly on a checkpoint that does not fit.

:class:`SafeCheckpointer` is detectron2's ``DetectionCheckpointer`` with:

- Atomic writes: a checkpoint is written to a hidden temporary file in the output folder, flushed
  to disk, then renamed over its final name (``os.replace``); ``last_checkpoint`` is rewritten the
  same way, and only after the checkpoint is complete. A process killed at any moment (SIGKILL
  included) leaves ``last_checkpoint`` naming a complete checkpoint (or no ``last_checkpoint``).
- No non-finite checkpoints: a model holding NaN/inf values is never written (the last good
  checkpoint stays what ``last_checkpoint`` names); :class:`NonFiniteError` names the tensor.
- The architecture: every checkpoint records the config keys that define its model
  (:func:`~san_det.modeling.architecture.architecture_config`); resuming or evaluating (strict)
  a checkpoint whose recorded architecture differs from the model's config is an error naming
  the key (``MODEL.SASA.NUM_HEADS`` 4 vs 8 loads without a shape mismatch and computes something
  else); for fine-tuning, differing backbone keys are a warning.
- Trusted files only on request: a checkpoint holding Python objects besides tensors, which
  torch's default ``torch.load(weights_only=True)`` refuses, is an error saying so, unless
  ``trusted`` (``MODEL.WEIGHTS_TRUSTED``) allows unpickling it.
- Write errors (disk full, quota, file size limit): :class:`CheckpointWriteError`, one line with
  the path and the cause; the temporary file is removed and ``last_checkpoint`` still names the
  previous complete checkpoint.
- Clear load errors (:class:`CheckpointError`, naming the file): an unreadable or truncated file;
  when resuming (or when ``strict``), any tensor of the model missing from the checkpoint, any
  checkpoint tensor the model lacks, any shape mismatch, naming the first such key. Loading
  ``MODEL.WEIGHTS`` (fine-tuning) allows missing and unexpected keys, reported in one summary, but
  not a checkpoint with no tensor in common with the model, nor shape mismatches unless
  ``allow_shape_mismatch``.
- Input checks: a checkpoint that records the input format / normalisation its weights expect
  (:mod:`san_det.modeling.input_info`) must match the model's, unless ``allow_input_mismatch``.
"""

import errno
import logging
import os
import pickle
import re
from typing import Any, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import _filter_reused_missing_keys

from ..modeling.architecture import architecture_config, architecture_differences
from ..modeling.input_info import InputMismatchError, check_checkpoint_input, recorded_input_info
from ..utils.atomic import atomic_write, os_error_in, remove_orphaned_temporaries
from .errors import UserInputError

__all__ = [
    "ARCHITECTURE_KEY",
    "CheckpointError",
    "CheckpointWriteError",
    "NonFiniteError",
    "SafeCheckpointer",
    "checkpointer_options",
    "first_non_finite",
]

logger = logging.getLogger(__name__)

#: The checkpoint entry holding the model's architecture-defining config keys.
ARCHITECTURE_KEY = "architecture"

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_WEIGHTS_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")


class CheckpointError(UserInputError):
    """A checkpoint cannot be read, or does not fit the model; the message names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, ...); the message names the file.

    ``errno`` and ``filename`` are those of the write that failed; ``str()`` is the message.
    """

    def __init__(self, message: str, error_number: Optional[int], filename: str):
        super().__init__(error_number, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


def checkpointer_options(cfg) -> Dict[str, Any]:
    """:class:`SafeCheckpointer` keyword arguments from ``cfg``: ``allow_shape_mismatch``
    (``MODEL.WEIGHTS_ALLOW_SHAPE_MISMATCH``), ``allow_input_mismatch``
    (``MODEL.WEIGHTS_ALLOW_INPUT_MISMATCH``), ``trusted`` (``MODEL.WEIGHTS_TRUSTED``) and the
    ``architecture`` to record and compare."""
    return {
        "allow_shape_mismatch": cfg.MODEL.get("WEIGHTS_ALLOW_SHAPE_MISMATCH", False),
        "allow_input_mismatch": cfg.MODEL.get("WEIGHTS_ALLOW_INPUT_MISMATCH", False),
        "trusted": cfg.MODEL.get("WEIGHTS_TRUSTED", False),
        "architecture": architecture_config(cfg),
    }


def _first_line(error: BaseException) -> str:
    text = _ANSI_ESCAPE.sub("", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _with_model_key(loaded: Any) -> Dict[str, Any]:
    """As ``DetectionCheckpointer._load_file``: a bare state dict becomes ``{"model": ...}``."""
    return loaded if isinstance(loaded, dict) and "model" in loaded else {"model": loaded}


class NonFiniteError(FloatingPointError):
    """Training produced NaN/inf (loss, gradients or weights); the message names the iteration."""


def first_non_finite(state: Dict[str, Any]) -> Optional[str]:
    """The first key of ``state`` whose floating-point tensor holds a NaN or inf, or None."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                return key
    return None


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and strict, clear loading (module docstring).

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        allow_shape_mismatch: when loading weights for fine-tuning (not resuming), skip tensors
            whose shape differs from the model's (logged) instead of raising.
        allow_input_mismatch: load a checkpoint that records another input format or
            normalisation than the model's (:mod:`san_det.modeling.input_info`) with a warning
            instead of raising :class:`~san_det.modeling.input_info.InputMismatchError`.
        architecture: the model's architecture-defining config keys
            (:func:`~san_det.modeling.architecture.architecture_config`): written into every
            checkpoint and compared with the one a loaded checkpoint records. None: neither.
        trusted: load ``.pth`` files with ``torch.load(weights_only=False)``, which unpickles any
            Python object (can run code: only for files from a trusted source).
        memory_map: memory-map ``.pth`` files instead of reading them (for checks that load a
            checkpoint into a model on the meta device: tensors are never read).
    """

    def __init__(
        self,
        model,
        save_dir="",
        *,
        allow_shape_mismatch: bool = False,
        allow_input_mismatch: bool = False,
        architecture: Optional[Dict[str, Any]] = None,
        trusted: bool = False,
        memory_map: bool = False,
        **kwargs,
    ):
        super().__init__(model, save_dir, **kwargs)
        self.memory_map = memory_map
        self.allow_shape_mismatch = allow_shape_mismatch
        self.allow_input_mismatch = allow_input_mismatch
        self.architecture = dict(architecture) if architecture is not None else None
        self.trusted = bool(trusted)
        self._strict = False
        self._loading = ""
        self._architecture_note = ""
        if self.save_to_disk and self._is_local(save_dir):
            self._remove_stale_temporaries()

    @staticmethod
    def _is_local(path: str) -> bool:
        return bool(path) and "://" not in path

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files of saves whose process died (killed while writing)."""

        def log(path: str) -> None:
            logger.info(f"Removing {path}: an unfinished checkpoint of a process that died")

        remove_orphaned_temporaries(self.save_dir, on_remove=log)

    # ----------------------------------------------------------------------------------- saving
    def _write_atomic(self, path: str, write) -> None:
        try:
            with atomic_write(path) as f:
                write(f)
        except Exception as e:
            cause = os_error_in(e)
            if cause is None:
                raise
            last = self.get_checkpoint_file() if self.has_checkpoint() else "none"
            code = errno.errorcode.get(cause.errno, cause.errno)
            raise CheckpointWriteError(
                f"cannot write {path}: {cause.strerror or _first_line(cause)} ({code}); it was "
                f"not written, the last complete checkpoint is {last}",
                cause.errno,
                path,
            ) from e

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically, then point ``last_checkpoint`` at it.

        Raises:
            NonFiniteError: the model holds NaN/inf values; nothing is written.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        bad = first_non_finite(data["model"])
        if bad is not None:
            last = self.get_checkpoint_file() if self.has_checkpoint() else "none"
            iteration = kwargs.get("iteration", "?")
            raise NonFiniteError(
                f"model tensor {bad!r} holds NaN/inf at iteration {iteration}: checkpoint "
                f"{name}.pth not written; the last good checkpoint is {last}"
            )
        if self.architecture is not None:
            kwargs = {ARCHITECTURE_KEY: dict(self.architecture), **kwargs}
        if not self._is_local(self.save_dir):
            return super().save(name, **kwargs)
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must be a plain file name")
        self.logger.info("Saving checkpoint to {}".format(save_file))
        os.makedirs(self.save_dir, exist_ok=True)
        self._write_atomic(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        self._write_atomic(path, lambda f: f.write(last_filename_basename.encode()))

    # ---------------------------------------------------------------------------------- loading
    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """Resume (strictly) from ``last_checkpoint`` if ``resume`` and it exists, else load the
        model weights of ``path`` for fine-tuning (see the class docstring)."""
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if not os.path.isfile(last) and self._is_local(last):
                raise CheckpointError(
                    f"{os.path.join(self.save_dir, 'last_checkpoint')} names {last}, which does "
                    "not exist; delete last_checkpoint to start over or restore the file"
                )
            return self.load(last, strict=True)
        return self.load(path, checkpointables=[])

    def load(
        self, path: str, checkpointables: Optional[List[str]] = None, *, strict: bool = None
    ) -> Dict[str, Any]:
        """``DetectionCheckpointer.load`` with :class:`CheckpointError` naming ``path``.

        Args:
            strict: every model tensor must be in the checkpoint with the same shape and vice
                versa; default: True when also loading the other checkpointables (resuming).
        """
        if not path:
            return super().load(path, checkpointables)
        if self._is_local(path) and not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file not found: {path}")
        self._strict = (checkpointables is None) if strict is None else strict
        self._loading = path
        try:
            return super().load(path, checkpointables)
        except (CheckpointError, InputMismatchError):
            raise
        except (ValueError, KeyError) as e:  # raised by a model-loading converter
            raise CheckpointError(f"checkpoint {path} does not fit the model: {e}") from e
        finally:
            self._strict = False
            self._loading = ""
            self._architecture_note = ""

    def _read_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith((".pkl", ".pyth")):
            return super()._load_file(filename)
        if self.memory_map and self._is_local(filename):
            try:
                loaded = torch.load(
                    filename, map_location="cpu", mmap=True, weights_only=not self.trusted
                )
            except Exception:  # a legacy (non-zip) file cannot be mapped: read it as below
                pass
            else:
                return _with_model_key(loaded)
        if self.trusted:
            with PathManager.open(filename, "rb") as f:
                return _with_model_key(
                    torch.load(f, map_location=torch.device("cpu"), weights_only=False)
                )
        return super()._load_file(filename)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            checkpoint = self._read_file(filename)
        except pickle.UnpicklingError as e:
            found = _UNSUPPORTED_GLOBAL.search(str(e))
            if found is None:  # e.g. "Unsupported operand": not a pickle torch can read
                found_error = _WEIGHTS_UNPICKLER_ERROR.search(_ANSI_ESCAPE.sub("", str(e)))
                reason = found_error.group(1) if found_error else _first_line(e)
                raise CheckpointError(
                    f"cannot read checkpoint {filename} (truncated or corrupt file?): "
                    f"{type(e).__name__}: {reason}"
                ) from e
            raise CheckpointError(
                f"checkpoint {filename} is a valid pickle but holds Python objects besides "
                f"tensors ({found.group(1)}), which torch.load refuses by default (weights_only) "
                "because unpickling them can run code: if you trust the file, set "
                "MODEL.WEIGHTS_TRUSTED True to load it"
            ) from e
        except Exception as e:  # torch.load / pickle: many exception types for a corrupt file
            raise CheckpointError(
                f"cannot read checkpoint {filename} (truncated or corrupt file?): "
                f"{type(e).__name__}: {_first_line(e)}"
            ) from e
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
            raise CheckpointError(f"{filename} is not a model checkpoint (no 'model' state dict)")
        self._check_architecture(filename, checkpoint.get(ARCHITECTURE_KEY))
        return checkpoint

    def _check_architecture(self, filename: str, recorded: Any) -> None:
        """Compare the architecture recorded in a checkpoint with the model's (class docstring):
        a warning when fine-tuning; when strict, :meth:`_load_model` raises."""
        self._architecture_note = ""
        if self.architecture is None or not isinstance(recorded, dict):
            return
        differences = architecture_differences(
            recorded, self.architecture, fine_tune=not self._strict
        )
        listed = "; ".join(f"{k} {old!r} there, {new!r} here" for k, old, new in differences)
        if listed and not self._strict:
            self.logger.warning(
                f"{filename} was trained with other backbone settings ({listed}): its weights "
                "initialise a differently configured network"
            )
        self._architecture_note = listed

    def _load_model(self, checkpoint: Any):
        path = self._loading or "<checkpoint>"
        info = recorded_input_info(checkpoint)
        check_checkpoint_input(info, self.model, path, self.allow_input_mismatch)
        passed = []  # the keys that reach load_state_dict (after renaming, shape checks)
        load_state_dict = self.model.load_state_dict

        def recording(state_dict, *args, **kwargs):
            passed.extend(state_dict.keys())
            return load_state_dict(state_dict, *args, **kwargs)

        self.model.load_state_dict = recording
        try:
            incompatible = super()._load_model(checkpoint)
        finally:
            del self.model.load_state_dict
        model_keys = list(self.model.state_dict().keys())
        shapes = {k: (ckpt, ours) for k, ckpt, ours in incompatible.incorrect_shapes}
        missing = set(_filter_reused_missing_keys(self.model, incompatible.missing_keys))
        unexpected = list(incompatible.unexpected_keys)
        problems = []
        for key in model_keys:
            if key in shapes:
                ckpt, ours = shapes[key]
                problems.append((key, f"shape {ckpt} in the checkpoint, {ours} in the model"))
            elif key in missing and (self._strict or not shapes):
                problems.append((key, "in the model but not in the checkpoint"))
        problems += [(key, "in the checkpoint but not in the model") for key in unexpected]
        counts = (
            f"{len(shapes)} with another shape, {len(missing)} missing from the checkpoint, "
            f"{len(unexpected)} not in the model"
        )
        loaded = len(set(model_keys) & set(passed))
        note = self._architecture_note if self._strict else ""
        if self._strict and problems:
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
        if shapes and not self.allow_shape_mismatch:
            key, (ckpt, ours) = next(iter(shapes.items()))
            raise CheckpointError(
                f"checkpoint {path}: first mismatched key {key!r} has shape {ckpt} in the "
                f"checkpoint but {ours} in the model ({len(shapes)} such tensors); set "
                "MODEL.WEIGHTS_ALLOW_SHAPE_MISMATCH True to keep those tensors' initial values"
            )
        if missing or unexpected or shapes:
            self.logger.warning(
                f"Loaded {loaded} of {len(model_keys)} model tensors from {path}: {counts}"
                + (f"; first missing {sorted(missing)[0]!r}" if missing else "")
                + (f"; first unexpected {unexpected[0]!r}" if unexpected else "")
            )
        return incompatible
