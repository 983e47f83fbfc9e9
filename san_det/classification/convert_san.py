"""Official hszhao/SAN ImageNet checkpoints -> san_det classifiers and detection backbones.

The released files are ``torch.save({"epoch", "state_dict", ...})`` of the official ``SAN`` model
wrapped in ``DataParallel`` / ``DistributedDataParallel``, so keys read ``module.conv_in.weight``,
``module.layer3.2.sam.conv_w.5.bias``, ``module.fc.weight``. san_det's SAN backbone
(:class:`san_det.modeling.SANBackbone`) keeps the official module names (``conv_in``, ``bn_in``,
``conv0..conv4``, ``bn0..bn4``, ``layer0..layer4`` with blocks ``bn1``, ``sam.conv1/2/3``,
``sam.conv_w``, ``sam.conv_p``, ``bn2``, ``conv``), so the mapping is::

    module.<name>  ->  backbone.<name>        (classifier; detection: backbone.bottom_up.<name>)
    module.fc.*    ->  classifier.*           (dropped for detection)

Every key is checked against the target model: an official key with no counterpart, a model key
the checkpoint lacks, or a shape that differs raises :class:`~san_det.errors.CheckpointError`
naming it.
The official models read RGB images normalised with ImageNet's mean and std
(:data:`OFFICIAL_SAN_INPUT`); use the same ``INPUT.FORMAT`` / ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``.
"""

from collections import OrderedDict
from typing import Dict, Mapping

import torch

from ..errors import CheckpointError
from .checkpoint import classifier_to_detection_state_dict

__all__ = [
    "OFFICIAL_SAN_INPUT",
    "convert_official_san_to_classifier",
    "convert_official_san_to_detection",
    "official_san_key_to_classifier_key",
    "official_san_state_dict",
]

# tool/train.py of hszhao/SAN: transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
# on RGB tensors in [0, 1], i.e. in 0-255 units:
OFFICIAL_SAN_INPUT = {
    "input_format": "RGB",
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
}


def official_san_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint (``{"state_dict": ...}`` or a bare one)."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError("the official SAN checkpoint holds no state dict")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(
            f"entry {bad[0]!r} of the SAN checkpoint is not a tensor: not an official SAN "
            "state dict (expected {'state_dict': {'module.conv_in.weight': ...}})"
        )
    return dict(state)


def official_san_key_to_classifier_key(key: str) -> str:
    """``module.layer1.0.sam.conv1.weight`` -> ``backbone.layer1.0.sam.conv1.weight``."""
    if key.startswith("module."):
        key = key[len("module.") :]
    if key.startswith("fc."):
        return "classifier." + key[len("fc.") :]
    return "backbone." + key


def convert_official_san_to_classifier(
    checkpoint: Mapping, target_state: Mapping[str, torch.Tensor]
) -> "OrderedDict[str, torch.Tensor]":
    """Official checkpoint -> state dict of an ``ImageClassifier`` with a SAN backbone.

    Args:
        checkpoint: the loaded official file (or its ``state_dict``).
        target_state: ``state_dict()`` of the classifier built from the matching config
            (e.g. configs/ImageNet/san10_pairwise.yaml); keys and shapes are checked against it.

    Raises:
        CheckpointError: naming the first unmatched key or mismatched shape.
    """
    mapped: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for key, value in official_san_state_dict(checkpoint).items():
        ours = official_san_key_to_classifier_key(key)
        if ours in mapped:
            raise CheckpointError(f"keys {origin[ours]!r} and {key!r} both map to {ours!r}")
        mapped[ours], origin[ours] = value, key
    unmatched = [k for k in mapped if k not in target_state]
    if unmatched:
        raise CheckpointError(
            f"official key {origin[unmatched[0]]!r} has no counterpart {unmatched[0]!r} in the "
            f"model ({len(unmatched)} unmatched keys): wrong SAN depth / sa_type for this config, "
            "or not an official SAN checkpoint"
        )
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, ref in target_state.items():
        if key not in mapped:
            if key.endswith("num_batches_tracked"):  # absent from checkpoints of old PyTorch
                out[key] = torch.zeros_like(ref)
                continue
            missing = [k for k in target_state if k not in mapped]
            raise CheckpointError(
                f"the model's {key!r} is not in the official checkpoint ({len(missing)} missing "
                "keys): wrong SAN depth / sa_type for this config"
            )
        value = mapped[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"official key {origin[key]!r} has shape {tuple(value.shape)} but the model's "
                f"{key!r} has shape {tuple(ref.shape)}: wrong SAN depth / sa_type / kernels / "
                "NUM_CLASSES for this config"
            )
        out[key] = value
    return out


def convert_official_san_to_detection(
    checkpoint: Mapping,
    classifier_state: Mapping[str, torch.Tensor],
    detection_state: Mapping[str, torch.Tensor],
) -> "OrderedDict[str, torch.Tensor]":
    """Official checkpoint -> backbone tensors of a detector (``backbone.bottom_up.*`` with FPN).

    ``classifier_state`` is the matching classifier's state dict (checks every official key);
    ``detection_state`` the detector's (checks every backbone key, see
    :func:`~san_det.classification.checkpoint.classifier_to_detection_state_dict`).
    """
    state = convert_official_san_to_classifier(checkpoint, classifier_state)
    return classifier_to_detection_state_dict(state, detection_state)[0]
