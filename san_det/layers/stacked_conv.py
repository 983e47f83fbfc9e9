"""A 1x1 convolution by weights stacked at run time that keeps no stacked copy for the backward.

:class:`~san_det.layers.local_attention.LocalSelfAttention2d` projects ``q``, ``k`` and ``v`` by
one convolution with its three weights concatenated. Through autograd,
``F.conv2d(x, torch.cat(weights))`` keeps the concatenation (a copy of the three weights) alive
until the backward, one per call: the attentional FPN and RetinaNet head call each layer once per
pyramid level: in a batch-2 256x256 training step of ``retinanet_sasa50_attention_fpn_head``
such copies made about 52 MB of its peak memory (``benchmarks/bench_retinanet.py``: 701 MB ->
649 MB). :func:`stacked_conv1x1` keeps ``x`` and the weights themselves and concatenates them
again in the backward (a copy of at most a few MB, freed at once).
"""

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["stacked_conv1x1"]


class _StackedConv1x1(torch.autograd.Function):
    """``F.conv2d(x, torch.cat(weights))``; the backward is the convolution's own
    (``aten.convolution_backward`` with autograd's arguments), so the gradients are those of the
    plain expression, bit for bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, *weights)
        return F.conv2d(x, torch.cat(weights))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *weights = ctx.saved_tensors
        need_x, *need_w = ctx.needs_input_grad
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, torch.cat(weights), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [need_x, any(need_w), False],
        )  # fmt: skip
        if grad_w is None:
            return (grad_x, *(None for _ in weights))
        grad_ws = grad_w.split([w.shape[0] for w in weights])
        return (grad_x, *(g if need else None for g, need in zip(grad_ws, need_w)))


def stacked_conv1x1(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``F.conv2d(x, torch.cat(weights))``: a 1x1 convolution without bias.

    Args:
        x: ``(N, C_in, H, W)``.
        weights: ``(C_i, C_in, 1, 1)`` each, same dtype and device as ``x``.

    Returns:
        ``(N, sum C_i, H, W)``, the output of the plain expression, whose gradients it also gives;
        for the backward it saves ``x`` and ``weights``, not their concatenation. While
        ``torch.jit`` traces or ``torch.compile`` compiles, it is the plain expression (tracers
        and FLOP counters see one convolution; compilers plan memory themselves).
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return F.conv2d(x, torch.cat(list(weights)))
    return _StackedConv1x1.apply(x, *weights)
