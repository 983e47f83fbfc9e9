"""Classifier checkpoints -> detection models: every backbone weight, or a clear error.

An :class:`~san_det.classification.classifier.ImageClassifier` holds its backbone under
``backbone.`` and its linear layer under ``classifier.``. A detector holds the same backbone under
``backbone.bottom_up.`` when it has an FPN (detectron2's ``FPN.bottom_up``) and under ``backbone.``
otherwise. :func:`classifier_to_detection_state_dict` remaps the keys, drops the classifier, and
checks the result against the detector: every backbone tensor must be provided with the right
shape, so only FPN and head weights remain missing. A checkpoint from another architecture fails
with an error naming the first key (or shape) that does not match.

:func:`map_classifier_checkpoint` is that mapping as one of the checkpoint rules
(:mod:`san_det.engine.checkpoint_rules`): :class:`ClassifierCheckpointer` (a
:class:`~san_det.engine.checkpoint.SafeCheckpointer`) applies it whenever a classifier checkpoint is
loaded into a model that is not a classifier, so a pretrained classifier given as
``MODEL.WEIGHTS`` to a detection config just works. Classifier checkpoints are recognised by the
``"san_det_classifier"`` entry that :class:`ClassifierInfo` adds to every checkpoint the
classification trainer writes (input format and normalisation, checked against the detector's),
or by holding only ``backbone.*`` and ``classifier.*`` keys. A normalisation that differs from
the detector's is a warning here and an error in the trainers' checkpointer
(``DetectorCheckpointer``; :mod:`san_det.modeling.input_info`). Every failure is a
:class:`~san_det.errors.CheckpointError` naming the key.
"""

import logging
from collections import OrderedDict
from typing import Dict, List, Mapping, Tuple

import torch

from ..engine.checkpoint import SafeCheckpointer
from ..engine.checkpoint_rules import LoadRequest, read_checkpoint
from ..engine.ddp import unwrap_model
from ..errors import CheckpointError
from ..modeling.input_info import (
    InputInfo,
    check_checkpoint_input,
    input_info_from_cfg,
    recorded_input_info,
    register_input_info_key,
)
from .classifier import ImageClassifier

__all__ = [
    "CLASSIFIER_INFO_KEY",
    "ClassifierInfo",
    "ClassifierCheckpointer",
    "classifier_info_from_cfg",
    "classifier_to_detection_state_dict",
    "detection_backbone_prefix",
    "is_classifier_checkpoint",
    "load_classifier_into_detector",
    "map_classifier_checkpoint",
]

logger = logging.getLogger(__name__)

CLASSIFIER_INFO_KEY = "san_det_classifier"


def classifier_info_from_cfg(cfg) -> Dict:
    """What a detector needs to know about a classifier checkpoint: input format, normalisation."""
    return {
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "backbone": cfg.MODEL.BACKBONE.NAME,
        "num_classes": cfg.CLASSIFICATION.NUM_CLASSES,
        "in_feature": cfg.CLASSIFICATION.IN_FEATURE,
        **input_info_from_cfg(cfg),
    }


class ClassifierInfo(InputInfo):
    """A checkpointable that writes :func:`classifier_info_from_cfg` into every checkpoint."""


# the classifier's entry holds the input format and normalisation too: checked on every load
register_input_info_key(CLASSIFIER_INFO_KEY)


def is_classifier_checkpoint(checkpoint: Mapping) -> bool:
    """Whether ``checkpoint`` (a loaded checkpoint with a ``"model"`` entry) is a classifier's."""
    if CLASSIFIER_INFO_KEY in checkpoint:
        return True
    keys = list(checkpoint.get("model", {}).keys())
    return (
        "classifier.weight" in keys
        and any(k.startswith("backbone.") for k in keys)
        and all(k.startswith(("backbone.", "classifier.")) for k in keys)
    )


def detection_backbone_prefix(target_keys) -> str:
    """Where a detector keeps its bottom-up backbone: ``backbone.bottom_up.`` or ``backbone.``."""
    keys = list(target_keys)
    if any(k.startswith("backbone.bottom_up.") for k in keys):
        return "backbone.bottom_up."
    if any(k.startswith("backbone.") for k in keys):
        return "backbone."
    raise CheckpointError(
        "the target model has no 'backbone.' submodule to load classifier weights into"
    )


def _shape(t) -> Tuple[int, ...]:
    return tuple(t.shape) if hasattr(t, "shape") else ()


def classifier_to_detection_state_dict(
    classifier_state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor]
) -> Tuple["OrderedDict[str, torch.Tensor]", Dict[str, List[str]]]:
    """Remap a classifier state dict onto a detector's backbone and check it fits exactly.

    Args:
        classifier_state: ``backbone.*`` and ``classifier.*`` tensors of an ImageClassifier.
        target_state: the detector's ``state_dict()`` (only keys and shapes are used).

    Returns:
        ``(state_dict, report)``: the detector-keyed backbone tensors, and a report with
        ``"dropped"`` (classifier keys not loaded) and ``"not_in_checkpoint"`` (the detector's
        keys outside the backbone, i.e. FPN and heads, which stay as initialised).

    Raises:
        CheckpointError: a backbone key of the checkpoint has no counterpart in the
            detector, a shape differs, or a detector backbone weight is not in the checkpoint;
            the message names the first such key.
    """
    prefix = detection_backbone_prefix(target_state.keys())
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    dropped = []
    unmatched = []
    for key, value in classifier_state.items():
        if not key.startswith("backbone."):
            dropped.append(key)
            continue
        new_key = prefix + key[len("backbone.") :]
        if new_key not in target_state:
            if key.endswith("num_batches_tracked"):  # BN counter; FrozenBN has none
                continue
            unmatched.append((key, new_key))
            continue
        if _shape(value) != _shape(target_state[new_key]):
            raise CheckpointError(
                f"checkpoint key {key!r} has shape {_shape(value)} but the model's {new_key!r} "
                f"has shape {_shape(target_state[new_key])}: the checkpoint is from another "
                "architecture or configuration (depth, width, kernel size, heads?)"
            )
        out[new_key] = value
    if unmatched:
        key, new_key = unmatched[0]
        raise CheckpointError(
            f"checkpoint key {key!r} has no counterpart {new_key!r} in the model "
            f"({len(unmatched)} unmatched backbone keys): the checkpoint is from another "
            "architecture or configuration"
        )
    missing = [
        k
        for k in target_state
        if k.startswith(prefix) and k not in out and not k.endswith("num_batches_tracked")
    ]
    if missing:
        raise CheckpointError(
            f"the model's backbone weight {missing[0]!r} is not in the checkpoint "
            f"({len(missing)} missing backbone keys): the checkpoint is from another architecture "
            "or configuration"
        )
    not_loaded = [k for k in target_state if not k.startswith(prefix)]
    return out, {"dropped": dropped, "not_in_checkpoint": not_loaded}


def map_classifier_checkpoint(
    checkpoint: Dict, model: torch.nn.Module, request: LoadRequest
) -> Dict:
    """Checkpoint rule: a classifier checkpoint loaded into a model that is not a classifier
    becomes the detector-keyed backbone tensors (:func:`classifier_to_detection_state_dict`);
    other checkpoints pass unchanged.

    Raises:
        CheckpointError: the classifier's backbone does not fit the model's (naming the key).
    """
    model = unwrap_model(model)
    if isinstance(model, ImageClassifier) or not is_classifier_checkpoint(checkpoint):
        return checkpoint
    try:
        state, report = classifier_to_detection_state_dict(checkpoint["model"], model.state_dict())
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {request.path} does not fit the model: {e}") from e
    request.log.info(
        f"Loading a classifier checkpoint into the detector's backbone: {len(state)} tensors; "
        f"classifier keys dropped: {report['dropped']}"
    )
    return {**checkpoint, "model": state, "matching_heuristics": False}


class ClassifierCheckpointer(SafeCheckpointer):
    """:class:`~san_det.engine.checkpoint.SafeCheckpointer` that also loads classifier
    checkpoints into detectors' backbones (:func:`map_classifier_checkpoint`); loading into an
    ``ImageClassifier`` (resuming, evaluating) is unchanged. Another recorded normalisation is a
    warning unless ``allow_input_mismatch=False`` (the trainers' ``DetectorCheckpointer``)."""

    checks = SafeCheckpointer.checks + (map_classifier_checkpoint,)
    allow_input_mismatch_default = True


def load_classifier_into_detector(model: torch.nn.Module, path: str) -> Dict[str, List[str]]:
    """Load the classifier checkpoint at ``path`` into ``model``'s backbone; returns the report
    of :func:`classifier_to_detection_state_dict`. Another recorded normalisation is a warning.

    Raises:
        CheckpointError: the file is unreadable or not a classifier checkpoint, or see
            :func:`classifier_to_detection_state_dict`; the message names ``path``.
    """
    checkpoint = read_checkpoint(path)
    model = unwrap_model(model)
    try:
        if not is_classifier_checkpoint(checkpoint):
            raise CheckpointError(
                "not a classifier checkpoint (neither san_det classifier info nor only "
                "backbone.* and classifier.* keys)"
            )
        state, report = classifier_to_detection_state_dict(checkpoint["model"], model.state_dict())
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    check_checkpoint_input(recorded_input_info(checkpoint), model, path, True, log=logger)
    model.load_state_dict(state, strict=False)
    return report
