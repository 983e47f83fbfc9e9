"""Crash-safe checkpoints and loading that fails loudly on a checkpoint that does not fit.

:class:`SafeCheckpointer` is detectron2's ``DetectionCheckpointer`` with:

- Atomic writes: a checkpoint is written to a hidden temporary file in the output folder, flushed
  to disk, then renamed over its final name (``os.replace``); ``last_checkpoint`` is rewritten the
  same way, and only after the checkpoint is complete. A process killed at any moment (SIGKILL
  included) leaves ``last_checkpoint`` naming a complete checkpoint (or no ``last_checkpoint``).
- No non-finite checkpoints: a model holding NaN/inf values is never written (the last good
  checkpoint stays what ``last_checkpoint`` names); :class:`NonFiniteError` names the tensor.
- Clear load errors (:class:`CheckpointError`, naming the file): an unreadable or truncated file;
  when resuming (or when ``strict``), any tensor of the model missing from the checkpoint, any
  checkpoint tensor the model lacks, any shape mismatch, naming the first such key. Loading
  ``MODEL.WEIGHTS`` (fine-tuning) allows missing and unexpected keys, reported in one summary, but
  not a checkpoint with no tensor in common with the model, nor shape mismatches unless
  ``allow_shape_mismatch``.
- Input checks: a checkpoint that records the input format / normalisation its weights expect
  (:mod:`san_det.modeling.input_info`) must match the model's, unless ``allow_input_mismatch``.
"""

import glob
import logging
import os
import re
from typing import Any, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _filter_reused_missing_keys

from ..modeling.input_info import InputMismatchError, check_checkpoint_input, recorded_input_info
from .errors import UserInputError

__all__ = ["CheckpointError", "NonFiniteError", "SafeCheckpointer", "first_non_finite"]

logger = logging.getLogger(__name__)

_TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


class CheckpointError(UserInputError):
    """A checkpoint cannot be read, or does not fit the model; the message names the file."""


class NonFiniteError(FloatingPointError):
    """Training produced NaN/inf (loss, gradients or weights); the message names the iteration."""


def first_non_finite(state: Dict[str, Any]) -> Optional[str]:
    """The first key of ``state`` whose floating-point tensor holds a NaN or inf, or None."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                return key
    return None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and strict, clear loading (module docstring).

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        allow_shape_mismatch: when loading weights for fine-tuning (not resuming), skip tensors
            whose shape differs from the model's (logged) instead of raising.
        allow_input_mismatch: load a checkpoint that records another input format or
            normalisation than the model's (:mod:`san_det.modeling.input_info`) with a warning
            instead of raising :class:`~san_det.modeling.input_info.InputMismatchError`.
    """

    def __init__(
        self,
        model,
        save_dir="",
        *,
        allow_shape_mismatch: bool = False,
        allow_input_mismatch: bool = False,
        **kwargs,
    ):
        super().__init__(model, save_dir, **kwargs)
        self.allow_shape_mismatch = allow_shape_mismatch
        self.allow_input_mismatch = allow_input_mismatch
        self._strict = False
        self._loading = ""
        if self.save_to_disk and self._is_local(save_dir):
            self._remove_stale_temporaries()

    @staticmethod
    def _is_local(path: str) -> bool:
        return bool(path) and "://" not in path

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files of saves whose process died (killed while writing)."""
        for path in glob.glob(os.path.join(glob.escape(self.save_dir), ".*.tmp-*")):
            match = _TMP_PATTERN.match(os.path.basename(path))
            if match and not _pid_alive(int(match.group("pid"))):
                logger.info(f"Removing {path}: an unfinished checkpoint of a process that died")
                try:
                    os.remove(path)
                except OSError:
                    pass

    # ----------------------------------------------------------------------------------- saving
    def _write_atomic(self, path: str, write) -> None:
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        _fsync_dir(os.path.dirname(path) or ".")

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

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            checkpoint = super()._load_file(filename)
        except Exception as e:  # torch.load / pickle: many exception types for a corrupt file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"cannot read checkpoint {filename} (truncated or corrupt file?): "
                f"{type(e).__name__}: {reason}"
            ) from e
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
            raise CheckpointError(f"{filename} is not a model checkpoint (no 'model' state dict)")
        return checkpoint

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
        if self._strict and problems:
            key, what = problems[0]
            raise CheckpointError(
                f"checkpoint {path} does not match the model (another architecture or config?): "
                f"first mismatched key {key!r}: {what}; {counts}"
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

