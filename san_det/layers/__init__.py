"""Local self-attention layers: SASA and SAN operators, modules and the attention stem.

Each operator has a readable PyTorch reference, a compiled CPU path and CUDA kernels (CuPy) that
share one kernel source; :func:`use_backend` forces one of them (see :mod:`.backend`).
"""

from .attention_stem import SpatiallyAwareAttentionStem
from .backend import BACKENDS, select_backend, use_backend
from .local_attention import LocalSelfAttention2d, local_attention, local_attention_reference
from .san_attention import PAIRWISE_RELATIONS, PATCHWISE_RELATIONS, SAM
from .san_ops import PAD_MODES, aggregation, subtraction, subtraction2

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
