"""A local self-attention layer used where detection models have a 3x3 conv (+ norm + activation).

:class:`AttentionConv2d` is to :class:`~san_det.layers.local_attention.LocalSelfAttention2d` what
detectron2's ``Conv2d`` (with its ``norm`` and ``activation`` arguments) is to ``nn.Conv2d``: the
SASA bottleneck, the attentional FPN and the attentional RetinaNet head all use it.
"""

from typing import Callable, Optional

import torch
from torch import nn

from san_det.layers.checks import check_int
from san_det.layers.local_attention import LocalSelfAttention2d

__all__ = ["AttentionConv2d", "check_attention_width"]


def check_attention_width(channels: int, num_heads, key: str, where: str) -> None:
    """``ValueError`` naming ``key`` unless ``num_heads`` splits ``channels`` into even heads.

    Args:
        channels: width of the attention layer.
        num_heads: the configured number of heads.
        key: the config key holding ``num_heads`` (named in the error).
        where: which layer has that width (named in the error), e.g. "res3 bottleneck".
    """
    check_int(key, num_heads)
    if channels % num_heads != 0:
        raise ValueError(
            f"{key}={num_heads} must divide the width of every attention layer: the {where} "
            f"has {channels} channels"
        )
    if (channels // num_heads) % 2 != 0:
        raise ValueError(
            f"{key}={num_heads} leaves an odd head width {channels // num_heads} in the {where} "
            f"({channels} channels): heads need an even width (row and column embeddings)"
        )


class AttentionConv2d(nn.Module):
    """``LocalSelfAttention2d`` followed by an optional norm and activation.

    Args:
        in_channels, out_channels, ``*args``, ``**kwargs``: the arguments of
            :class:`~san_det.layers.local_attention.LocalSelfAttention2d` (``kernel_size``,
            ``num_heads``, ``stride``: ``stride > 1`` is attention at stride 1 followed by an
            ``s x s`` average pool), as detectron2's ``Conv2d`` takes those of ``nn.Conv2d``.
        norm: a normalisation module over ``out_channels`` or ``None``.
        activation: a callable applied last, or ``None``.

    Shape:
        ``(N, in_channels, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride))``.

    Submodules: ``attention`` (the SASA layer: ``attention.query/key/value`` are the 1x1
    projections) and ``norm``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *args,
        norm: Optional[nn.Module] = None,
        activation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        **kwargs,
    ):
        super().__init__()
        self.attention = LocalSelfAttention2d(in_channels, out_channels, *args, **kwargs)
        self.norm = norm
        self.activation = activation
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride = self.attention.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x
