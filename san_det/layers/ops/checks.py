"""Argument checks of the attention ops, shared by their Python entry points and their
registered implementations (so that a direct ``torch.ops.san_det.*`` call is checked too).

Each raises ``ValueError`` naming the culprit; the SAN checks return the window
:class:`Geometry` the implementations need.
"""

from typing import NamedTuple

import torch

from ..checks import (
    check_choice,
    check_int,
    check_odd_int,
    check_same_device_and_dtype,
    check_tensor,
)

__all__ = [
    "PAD_MODES",
    "Geometry",
    "check_aggregation_gradient",
    "check_aggregation_inputs",
    "check_local_attention_gradient",
    "check_local_attention_inputs",
    "check_subtraction2_inputs",
    "check_san_gradient",
    "check_weight_gradient",
    "output_size",
    "sized_geometry",
    "window_geometry",
]

PAD_MODES = ("zeros", "reflect")


def check_local_attention_inputs(q, k, v, rel, num_heads, kernel_size, dilation) -> None:
    """The arguments of :func:`~san_det.layers.ops.local_attention`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4, "(N, C, H, W)")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}"
            )
        check_same_device_and_dtype(name, t, "q", q)
    check_odd_int("kernel_size", kernel_size)
    check_int("dilation", dilation)
    check_int("num_heads", num_heads)
    channels = q.shape[1]
    if channels % num_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must divide the channel count C={channels} of q")
    if rel is not None:
        expected = (channels, kernel_size, kernel_size)
        if not torch.is_tensor(rel) or tuple(rel.shape) != expected:
            shape = tuple(rel.shape) if torch.is_tensor(rel) else type(rel)
            raise ValueError(f"rel must have shape (C, k, k) = {expected}, got {shape}")
        check_same_device_and_dtype("rel", rel, "q", q)


def check_local_attention_gradient(grad_out, q, attn, num_heads, kernel_size) -> None:
    """The extra arguments of the registered backward of local attention."""
    check_tensor("grad_out", grad_out, 4, "(N, C, H, W)")
    if grad_out.shape != q.shape:
        raise ValueError(f"grad_out must have the shape of q {tuple(q.shape)}, got "
                         f"{tuple(grad_out.shape)}")  # fmt: skip
    check_same_device_and_dtype("grad_out", grad_out, "q", q)
    n, _, h, w = q.shape
    expected = (n, num_heads, h, kernel_size * kernel_size, w)
    check_tensor("attn", attn, 5, "(N, heads, H, k*k, W)")
    if tuple(attn.shape) != expected or attn.dtype != accumulation_dtype(q.dtype):
        raise ValueError(
            f"attn must be {accumulation_dtype(q.dtype)} of shape {expected}, got "
            f"{attn.dtype} of shape {tuple(attn.shape)}"
        )
    _check_same_device("attn", attn, "q", q)


def _check_same_device(name: str, value: torch.Tensor, ref_name: str, ref) -> None:
    """For tensors whose dtype is checked on its own (the kernels read their pointers)."""
    if value.device != ref.device:
        raise ValueError(
            f"{name} must be on the device of {ref_name} ({ref.device}), got {value.device}"
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate ``dtype`` inputs in (and keep the probabilities in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Geometry(NamedTuple):
    """The sliding window of a SAN op on an input of ``height x width``."""

    kernel_size: int
    stride: int
    padding: int
    dilation: int
    reflect: bool
    height: int
    width: int
    out_height: int
    out_width: int

    @property
    def taps(self) -> int:
        return self.kernel_size * self.kernel_size

    @property
    def positions(self) -> int:
        return self.out_height * self.out_width

    @property
    def pad_mode(self) -> str:
        return "reflect" if self.reflect else "zeros"


def output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1):
    """Output length along one axis.

    ``(size + 2 * padding - (dilation * (kernel_size - 1) + 1)) // stride + 1``
    """
    return (size + 2 * padding - (dilation * (kernel_size - 1) + 1)) // stride + 1


def window_geometry(
    x: torch.Tensor, name: str, kernel_size, stride, padding, dilation, pad_mode
) -> Geometry:
    """Check ``x`` (N, C, H, W) and the window arguments of a SAN op; return its geometry."""
    check_tensor(name, x, 4, "(N, C, H, W)")
    return sized_geometry(x.shape[2], x.shape[3], name, kernel_size, stride, padding, dilation,
                          pad_mode)  # fmt: skip


def sized_geometry(
    height: int, width: int, name: str, kernel_size, stride, padding, dilation, pad_mode
) -> Geometry:
    """Check the window arguments of a SAN op on ``name`` of ``height x width``; its geometry."""
    check_odd_int("kernel_size", kernel_size)
    check_int("stride", stride)
    check_int("padding", padding, minimum=0)
    check_int("dilation", dilation)
    check_choice("pad_mode", pad_mode, PAD_MODES)
    reflect = pad_mode == "reflect"
    if reflect and (padding >= height or padding >= width):
        raise ValueError(
            f"pad_mode='reflect' needs padding < H and padding < W, got padding={padding} for "
            f"{name} of spatial size {height}x{width}"
        )
    out_h = output_size(height, kernel_size, stride, padding, dilation)
    out_w = output_size(width, kernel_size, stride, padding, dilation)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"{name} of spatial size {height}x{width} is smaller than the dilated window "
            f"({dilation * (kernel_size - 1) + 1}) plus 2 * padding ({2 * padding}): "
            f"the output would be {out_h}x{out_w}"
        )
    return Geometry(kernel_size, stride, padding, dilation, reflect, height, width, out_h, out_w)


def check_subtraction2_inputs(x1, x2, *window) -> Geometry:
    """The arguments of :func:`~san_det.layers.ops.subtraction2`; returns the geometry."""
    g = window_geometry(x1, "x1", *window)
    if not torch.is_tensor(x2) or tuple(x2.shape) != tuple(x1.shape):
        shape = tuple(x2.shape) if torch.is_tensor(x2) else type(x2).__name__
        raise ValueError(f"x2 must have the shape of x1 {tuple(x1.shape)}, got {shape}")
    check_same_device_and_dtype("x2", x2, "x1", x1)
    return g


def check_aggregation_inputs(x, w, *window) -> Geometry:
    """The arguments of :func:`~san_det.layers.ops.aggregation`; returns the geometry."""
    g = window_geometry(x, "x", *window)
    n, c = x.shape[:2]
    if not torch.is_tensor(w) or w.dim() != 4:
        shape = tuple(w.shape) if torch.is_tensor(w) else type(w).__name__
        raise ValueError(f"w must be a 4-D tensor (N, Cw, k*k, Ho*Wo), got {shape}")
    cw = w.shape[1]
    expected = (n, cw, g.taps, g.positions)
    if cw < 1 or c % cw != 0 or tuple(w.shape) != expected:
        raise ValueError(
            f"w must have shape (N, Cw, k*k, Ho*Wo) = ({n}, Cw, {g.taps}, {g.positions}) "
            f"with C={c} a multiple of Cw, got {tuple(w.shape)}"
        )
    check_same_device_and_dtype("w", w, "x", x)
    return g


def check_san_gradient(grad_out, name: str, channels_first, *trailing) -> None:
    """``grad_out`` must be ``(N, C, *trailing)``, floating point; ``channels_first`` (if not
    ``None``) is the tensor whose (N, C) it must share."""
    check_tensor(name, grad_out, 2 + len(trailing), "(N, C, " + ", ".join(map(str, trailing)) + ")")
    if tuple(grad_out.shape[2:]) != tuple(trailing):
        raise ValueError(f"{name} must end in {tuple(trailing)}, got {tuple(grad_out.shape)}")
    if channels_first is not None:
        if tuple(grad_out.shape[:2]) != tuple(channels_first.shape[:2]):
            raise ValueError(f"{name} must share (N, C) with its input, got "
                             f"{tuple(grad_out.shape)}")  # fmt: skip
        check_same_device_and_dtype(name, grad_out, "the input", channels_first)


def check_aggregation_gradient(grad_out, w, g: Geometry) -> None:
    """The tensors of ``aggregation_input_backward``: ``grad_out`` (N, C, Ho, Wo) and ``w``
    (N, Cw, k*k, Ho*Wo) of its dtype and device, ``Cw`` dividing ``C``."""
    check_san_gradient(grad_out, "grad_out", None, g.out_height, g.out_width)
    check_san_gradient(w, "w", None, g.taps, g.positions)
    n, c = grad_out.shape[:2]
    if w.shape[0] != n or w.shape[1] < 1 or c % w.shape[1] != 0:
        raise ValueError(
            f"w {tuple(w.shape)} does not fit grad_out {tuple(grad_out.shape)}: (N, Cw) with "
            "Cw dividing C"
        )
    check_same_device_and_dtype("w", w, "grad_out", grad_out)


def check_weight_gradient(grad_out, x, weight_channels, *window) -> Geometry:
    """The arguments of ``aggregation_weight_backward``; returns the geometry."""
    g = window_geometry(x, "x", *window)
    check_san_gradient(grad_out, "grad_out", x, g.out_height, g.out_width)
    if weight_channels < 1 or x.shape[1] % weight_channels != 0:
        raise ValueError(
            f"weight_channels must divide the channels of x ({x.shape[1]}), got {weight_channels}"
        )
    return g
