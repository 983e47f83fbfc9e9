"""san_det's attention operators, one concept per module (NATTEN's layout):

- :mod:`.functional`: the entry points users call (:func:`local_attention`, :func:`subtraction`,
  :func:`subtraction2`, :func:`aggregation`): check the arguments once, resolve the backend once,
  call the registered op;
- :mod:`.library`: the ops of ``torch.ops.san_det.*``, one entry each in its ``OP_TABLE``:
  CPU/CUDA implementations (their annotations are the schemas), fake implementations, autograd,
  autocast; :mod:`.registry` registers an entry with ``torch.library``;
- :mod:`.reference` and :mod:`.kernels`: the backends, readable PyTorch and the ``.cu`` kernels;
- :mod:`.checks`: the argument checks and the SAN window geometry.
"""

from .checks import PAD_MODES, output_size
from .functional import aggregation, local_attention, neighbourhood, subtraction, subtraction2
from .library import OPS
from .reference import local_attention_reference

__all__ = [
    "OPS",
    "PAD_MODES",
    "aggregation",
    "local_attention",
    "local_attention_reference",
    "neighbourhood",
    "output_size",
    "subtraction",
    "subtraction2",
]
