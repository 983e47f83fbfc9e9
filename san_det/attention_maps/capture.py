"""Forward hooks that record what one attention layer of a model sees, and its weights."""

from typing import List, Sequence, Tuple

import torch
from torch import nn

from san_det.layers.local_attention import LocalSelfAttention2d

from .layers import resolve_attention_layer
from .weights import AttentionMap, check_pixels, local_attention_weights, window_inside

__all__ = ["AttentionCapture"]


class AttentionCapture:
    """Context manager recording what one attention layer of a model sees during forwards.

    Args:
        model: the model (any ``nn.Module``).
        layer: the layer's name (see :func:`resolve_attention_layer`).

    Each forward call of the layer inside the ``with`` block is recorded (a layer shared across
    FPN levels, as RetinaNet's head layers are, is called once per level): SASA layers keep their
    input, SAN modules the output of ``conv_w``. :meth:`maps` turns one call into weights.
    """

    def __init__(self, model: nn.Module, layer: str):
        self.name, self.module = resolve_attention_layer(model, layer)
        self.calls: List[dict] = []
        self._handles = []

    def __enter__(self) -> "AttentionCapture":
        self.calls.clear()
        if isinstance(self.module, LocalSelfAttention2d):
            self._handles.append(self.module.register_forward_hook(self._record_sasa))
        else:
            self._handles.append(self.module.conv_w.register_forward_hook(self._record_san_w))
            self._handles.append(self.module.register_forward_hook(self._record_san))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record_sasa(self, module, inputs, output) -> None:
        x = inputs[0].detach()
        self.calls.append({"input": x, "grid": tuple(x.shape[-2:]), "input_grid": x.shape[-2:]})

    def _record_san_w(self, module, inputs, output) -> None:
        self.calls.append({"conv_w": output.detach()})

    def _record_san(self, module, inputs, output) -> None:
        call = self.calls[-1]
        call["grid"] = tuple(output.shape[-2:])
        call["input_grid"] = tuple(inputs[0].shape[-2:])

    @property
    def grid_size(self) -> Tuple[int, int]:
        """``(H, W)`` of the attention grid of the first recorded call."""
        if not self.calls:
            raise RuntimeError(f"layer {self.name!r} was not called inside the capture block")
        return self.calls[0]["grid"]

    def input_grid_size(self, call: int = 0) -> Tuple[int, int]:
        """``(H, W)`` of the layer's input in recorded call ``call``."""
        return tuple(self._call(call)["input_grid"])

    def _call(self, call: int) -> dict:
        if not self.calls:
            raise RuntimeError(f"layer {self.name!r} was not called inside the capture block")
        if not 0 <= call < len(self.calls):
            raise ValueError(
                f"call {call} out of range: layer {self.name!r} was called {len(self.calls)} "
                f"time(s) (0..{len(self.calls) - 1})"
            )
        return self.calls[call]

    @torch.no_grad()
    def maps(
        self, pixels: Sequence[Tuple[int, int]], call: int = 0, batch_index: int = 0
    ) -> List[AttentionMap]:
        """Attention maps at ``pixels`` (``(i, j)`` on the attention grid) of recorded call
        ``call`` and image ``batch_index`` of its batch; one :class:`AttentionMap` per pixel."""
        record = self._call(call)
        if isinstance(self.module, LocalSelfAttention2d):
            return self._sasa_maps(record, pixels, batch_index)
        return self._san_maps(record, pixels, batch_index)

    def _sasa_maps(self, record: dict, pixels, batch_index: int) -> List[AttentionMap]:
        """Weights of the layer's op on its recorded input (see :func:`local_attention_weights`)."""
        m = self.module
        x = record["input"]
        if not 0 <= batch_index < x.shape[0]:
            raise ValueError(f"batch_index {batch_index} outside the batch of {x.shape[0]}")
        x = x[batch_index : batch_index + 1]
        q, k = m.query(x), m.key(x)
        rel = m.relative_embedding().to(q.dtype)
        weights, inside = local_attention_weights(
            q, k, rel, pixels,
            num_heads=m.num_heads, kernel_size=m.kernel_size, dilation=m.dilation,
        )  # fmt: skip
        checked = check_pixels(pixels, *record["grid"], "attention grid")
        return [
            AttentionMap(self.name, "sasa", p, p, weights[0, t], inside[t], m.dilation, "head")
            for t, p in enumerate(checked)
        ]

    def _san_maps(self, record: dict, pixels, batch_index: int) -> List[AttentionMap]:
        """The recorded output of SAM's ``conv_w``, with SAM's softmax over the taps (pairwise)."""
        m = self.module
        w = record["conv_w"]
        if not 0 <= batch_index < w.shape[0]:
            raise ValueError(f"batch_index {batch_index} outside the batch of {w.shape[0]}")
        ho, wo = record["grid"]
        taps = m.kernel_size * m.kernel_size
        w = w[batch_index : batch_index + 1]
        if m.sa_type == 0:
            w = torch.softmax(w, dim=-2)
            kind = "san_pairwise"
        else:
            kind = "san_patchwise"
        w = w.reshape(m.weight_planes, taps, ho, wo)
        h_in, w_in = record["input_grid"]
        result = []
        for i, j in check_pixels(pixels, ho, wo, "attention grid"):
            centre = (i * m.stride, j * m.stride)
            inside = window_inside(h_in, w_in, centre, m.kernel_size, m.dilation, w.device)
            weights = w[:, :, i, j].reshape(m.weight_planes, m.kernel_size, m.kernel_size)
            result.append(
                AttentionMap(
                    self.name, kind, (i, j), centre, weights, inside, m.dilation, "channel group"
                )
            )
        return result
