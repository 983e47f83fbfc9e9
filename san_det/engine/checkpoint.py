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
- Clear load errors (:class:`~san_det.errors.CheckpointError`, the one error of loading, naming
  the file): an unreadable or truncated file;
  when resuming (or when ``strict``), any tensor of the model missing from the checkpoint, any
  checkpoint tensor the model lacks, any shape mismatch, naming the first such key. Loading
  ``MODEL.WEIGHTS`` (fine-tuning) allows missing and unexpected keys, reported in one summary, but
  not a checkpoint with no tensor in common with the model, nor shape mismatches unless
  ``allow_shape_mismatch``.
- Input checks: a checkpoint that records the input format / normalisation its weights expect
  (:mod:`san_det.modeling.input_info`) must match the model's, unless ``allow_input_mismatch``.

Which file a run loads is decided by :func:`~.checkpoint_rules.choose_checkpoint` alone
(:meth:`SafeCheckpointer.resume_or_load`); the rules are the functions of
:mod:`.checkpoint_rules`, applied in :meth:`SafeCheckpointer.load` only: the checkpointer keeps no
state of one load for the next (docs/CHECKPOINTS.md).
"""

import errno
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..errors import CheckpointError
from ..modeling.architecture import architecture_config
from ..utils.atomic import atomic_write, os_error_in, remove_orphaned_temporaries
from .checkpoint_rules import (
    ARCHITECTURE_KEY,
    Check,
    CheckpointChoice,
    LoadRequest,
    LoadRules,
    check_fit,
    check_input_normalisation,
    check_model_entry,
    choose_checkpoint,
    first_line,
    first_non_finite,
    is_local,
    read_checkpoint,
)

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


class NonFiniteError(FloatingPointError):
    """Training produced NaN/inf (loss, gradients or weights); the message names the iteration."""


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and strict, clear loading (module docstring).

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        allow_shape_mismatch: when loading weights for fine-tuning (not resuming), skip tensors
            whose shape differs from the model's (logged) instead of raising.
        allow_input_mismatch: load a checkpoint that records another input format or
            normalisation than the model's (:mod:`san_det.modeling.input_info`) with a warning
            instead of raising :class:`~san_det.modeling.input_info.InputMismatchError`
            (None: the class's :attr:`allow_input_mismatch_default`).
        architecture: the model's architecture-defining config keys
            (:func:`~san_det.modeling.architecture.architecture_config`): written into every
            checkpoint and compared with the one a loaded checkpoint records. None: neither.
        trusted: load ``.pth`` files with ``torch.load(weights_only=False)``, which unpickles any
            Python object (can run code: only for files from a trusted source).
        memory_map: memory-map ``.pth`` files instead of reading them (for checks that load a
            checkpoint into a model on the meta device: tensors are never read).

    Attributes:
        checks: the rules applied, in order, to a checkpoint before its tensors are loaded
            (``check(checkpoint, model, request) -> checkpoint``, :mod:`.checkpoint_rules`); a
            subclass extends the tuple (the classifier-to-detector key mapping).
    """

    checks: Tuple[Check, ...] = (check_model_entry, check_input_normalisation)
    allow_input_mismatch_default = False

    def __init__(
        self,
        model,
        save_dir="",
        *,
        allow_shape_mismatch: bool = False,
        allow_input_mismatch: Optional[bool] = None,
        architecture: Optional[Dict[str, Any]] = None,
        trusted: bool = False,
        memory_map: bool = False,
        **kwargs,
    ):
        super().__init__(model, save_dir, **kwargs)
        if allow_input_mismatch is None:
            allow_input_mismatch = self.allow_input_mismatch_default
        self.rules = LoadRules(
            architecture=dict(architecture) if architecture is not None else None,
            allow_shape_mismatch=bool(allow_shape_mismatch),
            allow_input_mismatch=bool(allow_input_mismatch),
        )
        self.trusted = bool(trusted)
        self.memory_map = memory_map
        if self.save_to_disk and is_local(save_dir):
            self._remove_stale_temporaries()

    @property
    def architecture(self) -> Optional[Dict[str, Any]]:
        return self.rules.architecture

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
                f"cannot write {path}: {cause.strerror or first_line(cause)} ({code}); it was "
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
        if not is_local(self.save_dir):
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
        if not is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        self._write_atomic(path, lambda f: f.write(last_filename_basename.encode()))

    # ---------------------------------------------------------------------------------- loading
    def resume_or_load(
        self, path: str, *, resume: bool = True, purpose: str = "train"
    ) -> Dict[str, Any]:
        """Load what :func:`~.checkpoint_rules.choose_checkpoint` chooses for ``path``
        (``MODEL.WEIGHTS``), this checkpointer's folder, ``resume`` and ``purpose`` (``"train"``,
        ``"eval"``, ``"predict"``): resuming strictly from ``last_checkpoint``, else ``path``
        (fine-tuning when training)."""
        choice = choose_checkpoint(path, self.save_dir, resume=resume, purpose=purpose)
        return self.load_chosen(choice)

    def load_chosen(self, choice: CheckpointChoice) -> Dict[str, Any]:
        """Load ``choice`` (:func:`~.checkpoint_rules.choose_checkpoint`): with the other
        checkpointables when it resumes, else the model only."""
        checkpointables = None if choice.resume else []
        return self.load(choice.path, checkpointables, strict=choice.strict)

    def load(
        self, path: str, checkpointables: Optional[List[str]] = None, *, strict: bool = None
    ) -> Dict[str, Any]:
        """Read ``path``, apply :attr:`checks`, load the tensors, apply
        :func:`~.checkpoint_rules.check_fit`, then the other ``checkpointables`` (all if None).

        Args:
            strict: every model tensor must be in the checkpoint with the same shape and vice
                versa; default: True when also loading the other checkpointables (resuming).

        Returns:
            The checkpoint's other entries (as ``Checkpointer.load``).

        Raises:
            CheckpointError: naming ``path`` (the model may hold some of its tensors then).
        """
        if not path:
            return super().load(path, checkpointables)  # "Initializing model from scratch"
        if is_local(path) and not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file not found: {path}")
        self.logger.info(f"[Checkpointer] Loading from {path} ...")
        local = path if os.path.isfile(path) else self.path_manager.get_local_path(path)
        request = LoadRequest(
            path,
            strict=(checkpointables is None) if strict is None else strict,
            rules=self.rules,
            log=self.logger,
        )
        checkpoint = self._load_file(local)
        for check in self.checks:
            checkpoint = check(checkpoint, self.model, request)
        heuristics = checkpoint.get("matching_heuristics", False)  # keys renamed in loading
        given = None if heuristics else list(checkpoint["model"])
        try:
            incompatible = self._load_model(checkpoint)
        except CheckpointError:
            raise
        except (ValueError, KeyError) as e:  # raised by detectron2's converters of other formats
            raise CheckpointError(f"checkpoint {path} does not fit the model: {e}") from e
        check_fit(checkpoint, incompatible, self.model, request, given)
        self._log_incompatible_keys(incompatible)
        for key in self.checkpointables if checkpointables is None else checkpointables:
            if key in checkpoint:
                self.logger.info(f"Loading {key} from {path} ...")
                self.checkpointables[key].load_state_dict(checkpoint.pop(key))
        return checkpoint

    def _load_file(self, filename: str) -> Dict[str, Any]:
        """:func:`~.checkpoint_rules.read_checkpoint` (detectron2's reader for ``.pkl`` and
        ``.pyth``)."""
        return read_checkpoint(
            filename,
            trusted=self.trusted,
            memory_map=self.memory_map,
            read_other=super()._load_file,
        )
