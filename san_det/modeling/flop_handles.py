"""fvcore FLOP counting that sees san_det's attention operators.

fvcore counts FLOPs on a JIT trace of the model and only knows aten ops (conv, matmul, einsum,
...). san_det's local attention and SAN aggregation run as custom ops (kernel-backed autograd
Functions, or an unfold reference whose elementwise products fvcore skips), so plain
``FlopCountAnalysis`` would silently count none of the attention. :class:`SanDetFlopCountAnalysis`
fixes that: while it traces, the operators are routed through small trace markers (autograd
Functions taking tensors and ints only, that call the real op with the tracer paused), so each op
call appears in the trace as one ``prim::PythonOp`` node, and the handles below count it:

==========================  ================================================================
trace node                  multiply-adds counted
==========================  ================================================================
``LocalAttentionOp``        ``2 * N * C * H * W * k^2``: the logits ``q . (k + r)`` and the
                            weighted sum of the values, over the dense ``k x k`` window (as a
                            conv counts its zero padding)
``SANAggregationOp``        ``N * C * k^2 * L`` (``L`` output positions)
``SANSubtractionOp``        0 (subtractions, no multiplications; fvcore counts no adds)
==========================  ================================================================

Everything else (the 1x1 projections, SAN's attention MLP, the attention stem's matmuls) is
ordinary aten ops that fvcore counts itself. Counts are multiply-adds ("FLOPs" in
fvcore's and SAN's tables; SASA's tables count a multiply-add as 2 FLOPs). The result does not
depend on the backend (reference, cpu, cuda) that computes the ops.

Not counted: softmax, the elementwise products of the non-official SAN relations
"hadamard"/"dot"/"star" (at most ``N * C/16 * k^2 * L`` each), normalisations' elementwise work
beyond fvcore's defaults.
"""

import contextlib
import importlib
from typing import Any, Iterator, List, Tuple

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

# The modules, not the same-named functions that san_det.layers re-exports.
_local_attention_module = importlib.import_module("san_det.layers.local_attention")
_san_attention_module = importlib.import_module("san_det.layers.san_attention")

__all__ = [
    "ATTENTION_OP_HANDLES",
    "countable_attention_ops",
    "SanDetFlopCountAnalysis",
    "local_attention_flop_jit",
    "san_aggregation_flop_jit",
]


@contextlib.contextmanager
def _tracer_paused() -> Iterator[None]:
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


class _AnalysisOnly(torch.autograd.Function):
    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("san_det's FLOP trace markers are for analysis only, not for training")


class LocalAttentionOp(_AnalysisOnly):
    """Trace marker for ``local_attention(q, k, v, rel, num_heads, kernel_size, dilation)``."""

    @staticmethod
    def forward(ctx, q, k, v, rel, num_heads: int, kernel_size: int, dilation: int):
        with _tracer_paused():
            return _ORIGINALS["local_attention"](
                q, k, v, rel, num_heads=num_heads, kernel_size=kernel_size, dilation=dilation
            )


class SANAggregationOp(_AnalysisOnly):
    """Trace marker for SAN's ``aggregation(x, w, ...)``."""

    @staticmethod
    def forward(ctx, x, w, kernel_size, stride, padding, dilation, pad_mode):
        with _tracer_paused():
            return _ORIGINALS["aggregation"](
                x, w, kernel_size, stride, padding, dilation, pad_mode
            )


class SANSubtractionOp(_AnalysisOnly):
    """Trace marker for SAN's ``subtraction(x, ...)`` and ``subtraction2(x1, x2, ...)``."""

    @staticmethod
    def forward(ctx, x1, x2, kernel_size, stride, padding, dilation, pad_mode):
        with _tracer_paused():
            if x2 is None:
                return _ORIGINALS["subtraction"](
                    x1, kernel_size, stride, padding, dilation, pad_mode
                )
            return _ORIGINALS["subtraction2"](
                x1, x2, kernel_size, stride, padding, dilation, pad_mode
            )


_ORIGINALS = {
    "local_attention": _local_attention_module.local_attention,
    "aggregation": _san_attention_module.aggregation,
    "subtraction": _san_attention_module.subtraction,
    "subtraction2": _san_attention_module.subtraction2,
}


def _marked_local_attention(q, k, v, rel=None, *, num_heads, kernel_size, dilation=1):
    return LocalAttentionOp.apply(q, k, v, rel, num_heads, kernel_size, dilation)


def _marked_aggregation(x, w, kernel_size, stride=1, padding=0, dilation=1, pad_mode="zeros"):
    return SANAggregationOp.apply(x, w, kernel_size, stride, padding, dilation, pad_mode)


def _marked_subtraction(x, kernel_size, stride=1, padding=0, dilation=1, pad_mode="zeros"):
    return SANSubtractionOp.apply(x, None, kernel_size, stride, padding, dilation, pad_mode)


def _marked_subtraction2(x1, x2, kernel_size, stride=1, padding=0, dilation=1, pad_mode="zeros"):
    return SANSubtractionOp.apply(x1, x2, kernel_size, stride, padding, dilation, pad_mode)


@contextlib.contextmanager
def countable_attention_ops() -> Iterator[None]:
    """Route the attention ops through the trace markers (for FLOP analysis only; not reentrant
    across threads). Inside, ``LocalSelfAttention2d`` and ``SAM`` run as usual but cannot be
    backpropagated through."""
    patches = [
        (_local_attention_module, "local_attention", _marked_local_attention),
        (_san_attention_module, "aggregation", _marked_aggregation),
        (_san_attention_module, "subtraction", _marked_subtraction),
        (_san_attention_module, "subtraction2", _marked_subtraction2),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, replacement in patches:
            setattr(module, name, replacement)
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def _python_op_scalars(value) -> List[Any]:
    """Scalar arguments of the ``prim::PythonOp`` that consumes ``value``."""
    for use in value.uses():
        if use.user.kind() == "prim::PythonOp":
            return list(use.user.scalar_args())
    raise RuntimeError("san_det FLOP handle: no PythonOp consumer found for its input")


def local_attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of one :class:`LocalAttentionOp`: ``2 * N * C * H * W * k^2``."""
    n, c, h, w = get_shape(inputs[0])
    rel_shape = get_shape(inputs[3]) if len(inputs) > 3 else None
    if rel_shape:  # (C, k, k)
        kernel_size = rel_shape[-1]
    else:  # rel is None: kernel_size is the second int argument (num_heads, kernel_size, ...)
        ints = [a for a in _python_op_scalars(inputs[0]) if isinstance(a, int)]
        kernel_size = ints[1]
    return 2 * n * c * h * w * kernel_size * kernel_size


def san_aggregation_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of one :class:`SANAggregationOp`: ``N * C * k^2 * L``."""
    n, c = get_shape(inputs[0])[:2]
    _, _, taps, positions = get_shape(inputs[1])
    return n * c * taps * positions


def _zero_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    return 0


ATTENTION_OP_HANDLES = {
    "prim::PythonOp.LocalAttentionOp": local_attention_flop_jit,
    "prim::PythonOp.SANAggregationOp": san_aggregation_flop_jit,
    "prim::PythonOp.SANSubtractionOp": _zero_flop_jit,
}


class SanDetFlopCountAnalysis(FlopCountAnalysis):
    """``fvcore.nn.FlopCountAnalysis`` that also counts san_det's attention ops.

    Same API (``total()``, ``by_module()``, ``by_operator()``, ``unsupported_ops()``...). The
    model is traced inside :func:`countable_attention_ops` with the handles of
    :data:`ATTENTION_OP_HANDLES`.

    Example::

        >>> flops = SanDetFlopCountAnalysis(model.eval(), (torch.randn(1, 3, 224, 224),))
        >>> flops.total() / 1e9  # G multiply-adds
    """

    def __init__(self, model: torch.nn.Module, inputs: Tuple[Any, ...]):
        super().__init__(model, inputs)
        self.set_op_handle(**ATTENTION_OP_HANDLES)

    def _analyze(self):
        with countable_attention_ops(), torch.no_grad():
            return super()._analyze()
