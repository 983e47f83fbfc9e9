"""fvcore FLOP counting that sees san_det's attention operators.

fvcore counts FLOPs on a JIT trace of the model and only knows aten ops (conv, matmul, einsum,
...). san_det's attention ops are registered PyTorch ops (``torch.ops.san_det.*``, see
:mod:`san_det.layers.ops.library`), so every call is one node of the trace, named after its op,
whichever backend computes it; :class:`SanDetFlopCountAnalysis` adds handles for them:

============================  ==============================================================
trace node                    multiply-adds counted
============================  ==============================================================
``san_det::local_attention``  ``2 * N * C * H * W * k^2``: the logits ``q . (k + r)`` and the
                              weighted sum of the values, over the dense ``k x k`` window (as a
                              conv counts its zero padding)
``san_det::aggregation``      ``N * C * k^2 * L`` (``L`` output positions)
``san_det::subtraction``,     0 (subtractions, no multiplications; fvcore counts no adds)
``san_det::subtraction2``
``san_det::attention_stem``   the stem's attention as the paper writes it, on the image padded
                              to whole blocks (``P`` pixels, ``C`` channels, ``M`` value
                              matrices, ``b x b`` blocks): ``P * C_in * (2 + M) * C`` for the
                              q, k and M value projections, ``P * M * C`` for the value
                              mixture, ``3 * P * b^2 * C`` for ``q . k``, ``q . r`` and the
                              weighted values
============================  ==============================================================

The stem op computes the same function with fewer multiply-adds (it never forms q, k or the M
value projections, see :mod:`san_det.layers.ops.attention_stem`); its handle counts the
formulation, as the paper's tables (and the conv handles, which count zero padding) do, so the
count does not depend on how the op is computed and equals the count of the tensor-op stem it
replaced.

``by_operator()`` names them without the namespace (``local_attention``, ``aggregation``...).
Everything else (the 1x1 projections, SAN's attention MLP, the stem's mixture logits) is
ordinary aten ops that fvcore counts itself. Counts are multiply-adds ("FLOPs" in fvcore's and
SAN's tables; SASA's tables count a multiply-add as 2 FLOPs).

Not counted: softmax, the elementwise products of the non-official SAN relations
"hadamard"/"dot"/"star" (at most ``N * C/16 * k^2 * L`` each), normalisations' elementwise work
beyond fvcore's defaults.
"""

from typing import Any, List, Tuple

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

__all__ = [
    "ATTENTION_OP_HANDLES",
    "SanDetFlopCountAnalysis",
    "attention_stem_flop_jit",
    "local_attention_flop_jit",
    "san_aggregation_flop_jit",
]


def local_attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of one ``san_det::local_attention``: ``2 * N * C * H * W * k^2``.

    Inputs: ``q, k, v, rel, num_heads, kernel_size, dilation``.
    """
    n, c, h, w = get_shape(inputs[0])
    kernel_size = inputs[5].toIValue()
    return 2 * n * c * h * w * kernel_size * kernel_size


def san_aggregation_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of one ``san_det::aggregation(x, w, ...)``: ``N * C * k^2 * L``."""
    n, c = get_shape(inputs[0])[:2]
    _, _, taps, positions = get_shape(inputs[1])
    return n * c * taps * positions


def attention_stem_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of one ``san_det::attention_stem`` (see the table above).

    Inputs: ``x, query_weight, key_weight, value_weight, rel_row, rel_col, mixture_probs,
    num_heads, block_size``.
    """
    n, c_in, h, w = get_shape(inputs[0])
    c = get_shape(inputs[1])[0]
    m = get_shape(inputs[3])[0] // c
    b = inputs[8].toIValue()
    pixels = n * (-(-h // b) * b) * (-(-w // b) * b)
    return pixels * c_in * (2 + m) * c + pixels * m * c + 3 * pixels * b * b * c


def _zero_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    return 0


ATTENTION_OP_HANDLES = {
    "san_det::local_attention": local_attention_flop_jit,
    "san_det::aggregation": san_aggregation_flop_jit,
    "san_det::subtraction": _zero_flop_jit,
    "san_det::subtraction2": _zero_flop_jit,
    "san_det::attention_stem": attention_stem_flop_jit,
}


class SanDetFlopCountAnalysis(FlopCountAnalysis):
    """``fvcore.nn.FlopCountAnalysis`` that also counts san_det's attention ops.

    Same API (``total()``, ``by_module()``, ``by_operator()``, ``unsupported_ops()``...), with
    the handles of :data:`ATTENTION_OP_HANDLES`.

    Example::

        >>> flops = SanDetFlopCountAnalysis(model.eval(), (torch.randn(1, 3, 224, 224),))
        >>> flops.total() / 1e9  # G multiply-adds
    """

    def __init__(self, model: torch.nn.Module, inputs: Tuple[Any, ...]):
        super().__init__(model, inputs)
        self.set_op_handle(**ATTENTION_OP_HANDLES)
