"""How an op of the table in :mod:`.library` becomes ``torch.ops.san_det.<name>``.

An :class:`OpSpec` is everything about one op: its implementation (whose annotations are the
schema, unless the spec writes the schema out), its fake (shape-only) implementation, its autograd
formula if it has one, whether autocast casts its inputs, and the devices it runs on.
:func:`register_op` turns a spec into a ``torch.library.custom_op`` with all of that; adding an op
is adding one spec to :data:`.library.OP_TABLE` (the kernels it
launches need no list: a kernel file's kernels are found in its source).

The backend (``reference``, ``cpu`` or ``cuda``) is an argument of every op that has backends, the
last one, ``backend: str = "auto"``; an op whose ``reference`` backend is plain tensor operations
(the attention stem) may run on any device (``device_types=None``). The entry points of :mod:`.functional` resolve it
once (:func:`~san_det.layers.backend.select_backend`: forced, from the environment, or from the
device) and pass the name down; a forward op hands the name it ran with to its backward op as an
argument, so a backward computed in another thread (CUDA autograd) uses its forward's backend
without any thread-local state. ``"auto"`` (a direct ``torch.ops.san_det.*`` call, or a call being
traced or compiled) is resolved where the op runs, each time it runs.
"""

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch

from ..backend import BACKENDS, can_run, compute_dtype, select_backend
from ..checks import check_choice

__all__ = ["AUTO", "DEVICE_TYPES", "OpSpec", "prepared", "register_op", "resolve_backend"]

AUTO = "auto"
DEVICE_TYPES = ("cpu", "cuda")
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_AUTOCAST_LIBRARY = torch.library.Library("san_det", "IMPL")


class OpSpec(NamedTuple):
    """One op of the ``san_det`` namespace.

    Attributes:
        name: the op's name, ``torch.ops.san_det.<name>``.
        impl: the implementation; its annotated parameters are the schema and, for an op with
            backends, its last parameter is ``backend: str = "auto"`` (resolve it with
            :func:`resolve_backend`).
        fake: the shape-only implementation (same parameters).
        backward: ``(ctx, *grads) -> grads`` of ``register_autograd``, or ``None``.
        setup_context: ``(ctx, inputs, output)``, with ``backward``.
        autocast: run in the autocast dtype under ``torch.autocast`` (forward ops, like
            convolutions; float64 inputs stay float64).
        device_types: the devices ``impl`` runs on; ``None`` for any device (an op of plain
            tensor operations).
        schema: the schema written out (``"(Tensor x, ...) -> Tensor"``), for an ``impl`` that
            takes some of its arguments as ``*args``; ``None``: from ``impl``'s annotations.
    """

    name: str
    impl: Callable
    fake: Callable
    backward: Optional[Callable] = None
    setup_context: Optional[Callable] = None
    autocast: bool = False
    device_types: Optional[Tuple[str, ...]] = DEVICE_TYPES
    schema: Optional[str] = None


def register_op(spec: OpSpec):
    """Register ``spec`` as ``torch.ops.san_det.<name>``; returns the custom op."""
    op = torch.library.custom_op(
        f"san_det::{spec.name}",
        spec.impl,
        mutates_args=(),
        device_types=spec.device_types,
        schema=spec.schema,
    )
    op.register_fake(spec.fake)
    if spec.backward is not None:
        op.register_autograd(spec.backward, setup_context=spec.setup_context)
    if spec.autocast:
        for device_type in DEVICE_TYPES:
            _register_autocast(spec.name, op, device_type)
    return op


def _register_autocast(name: str, op, device_type: str) -> None:
    """Run ``op`` in the active autocast dtype of ``device_type`` (float64 stays float64)."""

    def cast(value):
        if torch.is_tensor(value) and value.is_floating_point() and value.dtype != torch.float64:
            return value.to(torch.get_autocast_dtype(device_type))
        return value

    def autocast_kernel(*args):
        with torch.autocast(device_type, enabled=False):
            return op(*(cast(a) for a in args))

    _AUTOCAST_LIBRARY.impl(name, autocast_kernel, _AUTOCAST_KEYS[device_type])


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The backend an op with inputs like ``tensor`` runs on: ``backend``, or for ``"auto"``
    :func:`~san_det.layers.backend.select_backend`'s choice.

    Raises:
        ValueError: an unknown name.
        RuntimeError: the named backend cannot run on ``tensor``'s device.
    """
    if backend == AUTO:
        return select_backend(tensor)
    check_choice("backend", backend, BACKENDS)
    if backend != "reference":
        can_run(backend, tensor.device, raise_error=True)
    return backend


def prepared(backend: str, storage: torch.dtype, *tensors) -> List[Optional[torch.Tensor]]:
    """The tensors contiguous, those of dtype ``storage`` in the dtype ``backend`` computes in."""
    target = compute_dtype(backend, storage)
    return [
        None if t is None else (t.to(target) if t.dtype == storage else t).contiguous()
        for t in tensors
    ]
