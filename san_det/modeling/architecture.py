"""The config keys that define what a model's weights compute, to record in its checkpoints.

Many keys change a network without changing any tensor's shape: ``MODEL.SASA.NUM_HEADS`` 8 or 4
give the same q/k/v projections, ``KERNEL_SIZE`` changes only the (shared-size) relative
embeddings in some layouts, ``MODEL.SAN.RELATION`` or ``PAD_MODE`` change no tensor at all.
A checkpoint loaded into such a network loads "cleanly" and computes something else. The
checkpointers record :func:`architecture_config` in every checkpoint and compare it with the
model's config on load (:func:`architecture_differences`).

What is recorded: ``MODEL.META_ARCHITECTURE``, ``MODEL.BACKBONE.NAME`` and the subtrees the
model uses: ``MODEL.SASA``,
``MODEL.SAN``, ``MODEL.RESNETS`` (by backbone name), ``MODEL.FPN`` (FPN backbones), RetinaNet's
architecture keys and ``MODEL.ANCHOR_GENERATOR`` (RetinaNets). Keys that only matter while
training or only initialise weights (losses, matcher thresholds, ``FREEZE_AT``,
``ZERO_INIT_RESIDUAL``, prior probability, inference thresholds) are not recorded, nor is the
input format and normalisation, which :mod:`san_det.modeling.input_info` records and checks.
"""

from typing import Any, Dict, List, Tuple

__all__ = ["BACKBONE_SECTIONS", "architecture_config", "architecture_differences"]

#: Backbone config subtrees; their keys also matter when a checkpoint of another model kind is
#: loaded for fine-tuning (a classifier's backbone into a detector).
BACKBONE_SECTIONS = ("MODEL.SASA.", "MODEL.SAN.", "MODEL.RESNETS.")

_NOT_ARCHITECTURE = {
    "MODEL.SASA.ZERO_INIT_RESIDUAL",
    "MODEL.RESNETS.DEFORM_MODULATED",  # only with deformable convs, which are built separately
}
_RETINANET_KEYS = (
    "NUM_CLASSES",
    "IN_FEATURES",
    "NUM_CONVS",
    "NORM",
    "BBOX_REG_WEIGHTS",
    "HEAD_NAME",
    "ATTENTION_KERNEL_SIZE",
    "ATTENTION_NUM_HEADS",
)
# Differences in these do not matter when fine-tuning from a checkpoint of another model.
_FINE_TUNE_IGNORED = ("OUT_FEATURES",)


def _plain(value: Any) -> Any:
    """yacs values as plain, comparable Python values (tuples and lists alike)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _subtree(cfg, prefix: str) -> Dict[str, Any]:
    node = cfg
    for part in prefix.strip(".").split("."):
        if part not in node:
            return {}
        node = node[part]
    return {
        f"{prefix}{key}": _plain(value)
        for key, value in node.items()
        if not hasattr(value, "items") and f"{prefix}{key}" not in _NOT_ARCHITECTURE
    }


def architecture_config(cfg) -> Dict[str, Any]:
    """``{"MODEL.SASA.NUM_HEADS": 8, ...}``: the keys of ``cfg`` that define its model (see the
    module docstring); plain Python values, so a checkpoint stores it as is."""
    out = {
        "MODEL.META_ARCHITECTURE": cfg.MODEL.META_ARCHITECTURE,
        "MODEL.BACKBONE.NAME": cfg.MODEL.BACKBONE.NAME,
    }
    backbone = cfg.MODEL.BACKBONE.NAME.lower()
    if "sasa" in backbone:
        out.update(_subtree(cfg, "MODEL.SASA."))
    elif "san_" in backbone:
        out.update(_subtree(cfg, "MODEL.SAN."))
    elif "resnet" in backbone:
        out.update(_subtree(cfg, "MODEL.RESNETS."))
    if "fpn" in backbone:
        out.update(_subtree(cfg, "MODEL.FPN."))
    if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE:
        retinanet = cfg.MODEL.RETINANET
        out.update(
            {
                f"MODEL.RETINANET.{k}": _plain(retinanet[k])
                for k in _RETINANET_KEYS
                if k in retinanet
            }
        )
        out.update(_subtree(cfg, "MODEL.ANCHOR_GENERATOR."))
    return out


def architecture_differences(
    recorded: Dict[str, Any], current: Dict[str, Any], *, fine_tune: bool = False
) -> List[Tuple[str, Any, Any]]:
    """``(key, recorded value, current value)`` for every key recorded in both that differs.

    Args:
        fine_tune: the checkpoint initialises another model (e.g. a classifier's backbone for a
            detector): only backbone keys (:data:`BACKBONE_SECTIONS`) are compared, and not the
            backbone's ``OUT_FEATURES``.
    """
    out = []
    for key, value in current.items():
        if key not in recorded:
            continue
        if fine_tune and (
            not key.startswith(BACKBONE_SECTIONS) or key.rsplit(".", 1)[-1] in _FINE_TUNE_IGNORED
        ):
            continue
        if _plain(recorded[key]) != value:
            out.append((key, recorded[key], value))
    return out
