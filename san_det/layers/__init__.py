"""Local self-attention layers: SASA and SAN operators, modules and the attention stem.

The operators (:mod:`.ops`) are PyTorch ops (``torch.ops.san_det.*``) with a readable PyTorch
reference, a compiled CPU path and CUDA kernels (CuPy) that share one kernel source;
:func:`use_backend` forces one of them (see :mod:`.backend`).
"""

from .attention_stem import SpatiallyAwareAttentionStem
from .backend import BACKENDS, select_backend, use_backend
from .local_attention import LocalSelfAttention2d
from .ops import (
    PAD_MODES,
    aggregation,
    local_attention,
    local_attention_reference,
    subtraction,
    subtraction2,
)
from .san_attention import PAIRWISE_RELATIONS, PATCHWISE_RELATIONS, SAM

__all__ = [
    "BACKENDS",
    "LocalSelfAttention2d",
    "PAD_MODES",
    "PAIRWISE_RELATIONS",
    "PATCHWISE_RELATIONS",
    "SAM",
    "SpatiallyAwareAttentionStem",
    "aggregation",
    "local_attention",
    "local_attention_reference",
    "select_backend",
    "subtraction",
    "subtraction2",
    "use_backend",
]
