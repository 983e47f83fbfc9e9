"""The config keys that define what a model's weights compute, to record in its checkpoints.

Many keys change a network without changing any tensor's shape: ``MODEL.SASA.NUM_HEADS`` 8 or 4
give the same q/k/v projections, ``KERNEL_SIZE`` changes only the (shared-size) relative
embeddings in some layouts, ``MODEL.SAN.RELATION`` or ``PAD_MODE`` change no tensor at all.
A checkpoint loaded into such a network loads "cleanly" and computes something else. The
checkpointers record :func:`architecture_config` in every checkpoint and compare it with the
model's config on load (:func:`architecture_differences`).

What is recorded: ``MODEL.META_ARCHITECTURE``, ``MODEL.BACKBONE.NAME`` and the config keys that
the meta-architecture and the backbone registered (:func:`register_architecture_keys`, or the
:func:`architecture_keys` decorator next to ``@BACKBONE_REGISTRY.register()``): a config subtree
(``"MODEL.SASA"``: its leaf keys) or one key (``"MODEL.RETINANET.NUM_CLASSES"``). san_det's
backbones register ``MODEL.SASA`` / ``MODEL.SAN`` (and ``MODEL.FPN`` for the FPN variants),
detectron2's ResNets ``MODEL.RESNETS``, RetinaNets their architecture keys and
``MODEL.ANCHOR_GENERATOR``. A backbone or meta-architecture that registered nothing is an error
(:class:`~san_det.errors.UserInputError`, naming the call to add): its checkpoints would
otherwise be silently unchecked; one whose weights depend on no key registers ``[]``.

Keys that only matter while training or only initialise weights (losses, matcher thresholds,
``FREEZE_AT``, ``ZERO_INIT_RESIDUAL``, prior probability, inference thresholds) are not recorded,
nor is the input format and normalisation, which :mod:`san_det.modeling.input_info` records and
checks.
"""

from typing import Any, Callable, Dict, List, Sequence, Tuple, TypeVar

from ..errors import UserInputError

__all__ = [
    "BACKBONE_SECTIONS",
    "architecture_config",
    "architecture_differences",
    "architecture_keys",
    "architecture_keys_of",
    "register_architecture_keys",
]

T = TypeVar("T")

#: Backbone config subtrees; their keys also matter when a checkpoint of another model kind is
#: loaded for fine-tuning (a classifier's backbone into a detector).
BACKBONE_SECTIONS = ("MODEL.SASA.", "MODEL.SAN.", "MODEL.RESNETS.")

_NOT_ARCHITECTURE = {
    "MODEL.SASA.ZERO_INIT_RESIDUAL",
    "MODEL.RESNETS.DEFORM_MODULATED",  # only with deformable convs, which are built separately
}
# Differences in these do not matter when fine-tuning from a checkpoint of another model.
_FINE_TUNE_IGNORED = ("OUT_FEATURES",)

# component name (MODEL.BACKBONE.NAME, MODEL.META_ARCHITECTURE) -> config subtrees / keys
_REGISTERED: Dict[str, List[str]] = {}


def register_architecture_keys(name: str, keys: Sequence[str]) -> None:
    """Record ``keys`` in the checkpoints of models built with component ``name``.

    Args:
        name: a ``MODEL.BACKBONE.NAME`` or ``MODEL.META_ARCHITECTURE`` value, as registered in
            detectron2's registry.
        keys: config subtrees (``"MODEL.SASA"``: every leaf key under it) or single keys
            (``"MODEL.RETINANET.NUM_CLASSES"``) whose values change what the weights compute;
            ``[]`` for a component that reads none. Registering a name again adds keys (a new
            head registers its keys with the meta-architecture that builds it).
    """
    entry = _REGISTERED.setdefault(name, [])
    for key in keys:
        key = key.strip(".")
        if key not in entry:
            entry.append(key)


def architecture_keys(*keys: str) -> Callable[[T], T]:
    """Decorator form of :func:`register_architecture_keys` for a builder or class, under its
    ``__name__`` (the name detectron2's ``@REGISTRY.register()`` gives it)::

        @BACKBONE_REGISTRY.register()
        @architecture_keys("MODEL.FOO")
        def build_foo_backbone(cfg, input_shape): ...
    """

    def register(component: T) -> T:
        register_architecture_keys(component.__name__, keys)
        return component

    return register


def architecture_keys_of(component) -> Tuple[str, ...]:
    """The keys registered for ``component`` (a name, or a registered builder or class)."""
    name = component if isinstance(component, str) else component.__name__
    return tuple(_REGISTERED.get(name, ()))


# detectron2's components (their keys as san_det recorded them before the registry existed).
for _name in ("build_resnet_backbone",):
    register_architecture_keys(_name, ["MODEL.RESNETS"])
for _name in ("build_resnet_fpn_backbone", "build_retinanet_resnet_fpn_backbone"):
    register_architecture_keys(_name, ["MODEL.RESNETS", "MODEL.FPN"])
for _name in ("GeneralizedRCNN", "ProposalNetwork", "SemanticSegmentor", "PanopticFPN"):
    register_architecture_keys(_name, [])  # not san_det's models: their heads are not recorded
#: RetinaNet's keys that change its weights' meaning (the heads of ``SanDetRetinaNet`` included).
RETINANET_ARCHITECTURE_KEYS = [
    *(
        f"MODEL.RETINANET.{k}"
        for k in (
            "NUM_CLASSES",
            "IN_FEATURES",
            "NUM_CONVS",
            "NORM",
            "BBOX_REG_WEIGHTS",
            "HEAD_NAME",
            "ATTENTION_KERNEL_SIZE",
            "ATTENTION_NUM_HEADS",
        )
    ),
    "MODEL.ANCHOR_GENERATOR",
]
register_architecture_keys("RetinaNet", RETINANET_ARCHITECTURE_KEYS)


def _plain(value: Any) -> Any:
    """yacs values as plain, comparable Python values (tuples and lists alike)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _node(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "items") or part not in node:
            return None, False
        node = node[part]
    return node, True


def _recorded(cfg, key: str) -> Dict[str, Any]:
    """``key``'s value, or the leaf keys of the subtree ``key`` ({} if the config lacks it)."""
    node, found = _node(cfg, key)
    if not found:
        return {}
    if not hasattr(node, "items"):
        return {key: _plain(node)}
    return {
        f"{key}.{k}": _plain(v)
        for k, v in node.items()
        if not hasattr(v, "items") and f"{key}.{k}" not in _NOT_ARCHITECTURE
    }


def _registered_keys(option: str, name: str) -> List[str]:
    if name not in _REGISTERED:
        raise UserInputError(
            f"{option} {name!r} registered no architecture keys, so its checkpoints could not be "
            "checked: next to its registration call san_det.modeling.architecture."
            f"register_architecture_keys({name!r}, [<the config subtrees it reads, e.g. "
            "'MODEL.FOO'>]) (or [] if none), or decorate it with @architecture_keys(...)"
        )
    return _REGISTERED[name]


def architecture_config(cfg) -> Dict[str, Any]:
    """``{"MODEL.SASA.NUM_HEADS": 8, ...}``: the keys of ``cfg`` that define its model (see the
    module docstring); plain Python values, so a checkpoint stores it as is.

    Raises:
        UserInputError: the backbone or meta-architecture registered no keys.
    """
    out = {
        "MODEL.META_ARCHITECTURE": cfg.MODEL.META_ARCHITECTURE,
        "MODEL.BACKBONE.NAME": cfg.MODEL.BACKBONE.NAME,
    }
    keys = _registered_keys("MODEL.BACKBONE.NAME", cfg.MODEL.BACKBONE.NAME)
    keys = keys + _registered_keys("MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE)
    for key in keys:
        out.update(_recorded(cfg, key))
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
