"""Finding the SASA and SAN attention layers of a model by name, and describing them."""

from typing import Dict, Tuple

from torch import nn

from san_det.layers.local_attention import LocalSelfAttention2d
from san_det.layers.san_attention import SAM

__all__ = [
    "ATTENTION_TYPES",
    "attention_layers",
    "describe_attention_layer",
    "resolve_attention_layer",
]

ATTENTION_TYPES = (LocalSelfAttention2d, SAM)


def attention_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` of every SASA and SAN attention layer of ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ATTENTION_TYPES)}


def describe_attention_layer(module: nn.Module) -> str:
    """A one-line description of an attention layer (kind, channels, window, heads, stride)."""
    if isinstance(module, LocalSelfAttention2d):
        text = (
            f"SASA local attention {module.in_channels}->{module.out_channels}, "
            f"k={module.kernel_size}, {module.num_heads} heads"
        )
        if module.stride > 1:
            text += f", then {module.stride}x{module.stride} average pool"
    elif isinstance(module, SAM):
        kind = "pairwise" if module.sa_type == 0 else "patchwise"
        text = (
            f"SAN {kind} SAM ({module.relation}), {module.out_planes} channels, "
            f"k={module.kernel_size}, {module.weight_planes} channel groups"
        )
        if module.stride > 1:
            text += f", stride {module.stride}"
    else:
        raise ValueError(f"not an attention layer: {type(module).__name__}")
    if module.dilation > 1:
        text += f", dilation {module.dilation}"
    return text


def resolve_attention_layer(model: nn.Module, name: str) -> Tuple[str, nn.Module]:
    """The attention layer called ``name`` in ``model`` (or the only one inside module ``name``).

    Returns:
        ``(full_name, module)``.

    Raises:
        ValueError: naming ``name`` and listing attention layers, when ``name`` is not a module,
            holds no attention layer, or holds several.
    """
    layers = attention_layers(model)
    modules = dict(model.named_modules())
    if name not in modules:
        examples = ", ".join(list(layers)[:4]) or "none: the model has no attention layer"
        raise ValueError(
            f"layer {name!r} is not a module of the model; attention layers include {examples} "
            f"(list them all with --list-layers)"
        )
    if name in layers:
        return name, layers[name]
    prefix = f"{name}." if name else ""
    inner = [n for n in layers if n.startswith(prefix)]
    if len(inner) == 1:
        return inner[0], layers[inner[0]]
    if not inner:
        raise ValueError(
            f"layer {name!r} ({type(modules[name]).__name__}) holds no SASA or SAN attention "
            f"layer (list them with --list-layers)"
        )
    shown = ", ".join(inner[:4]) + (", ..." if len(inner) > 4 else "")
    raise ValueError(f"layer {name!r} holds {len(inner)} attention layers ({shown}): pick one")
