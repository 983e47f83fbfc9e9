"""SAN's local operators: subtraction, subtraction2 and aggregation (Zhao et al., CVPR 2020).

These are the three operators of the official SAN code (github hszhao/SAN, ``lib/sa``), with the
same shapes and semantics, in two padding modes:

- ``pad_mode="zeros"``: a neighbour outside the image reads as 0.
- ``pad_mode="reflect"``: a neighbour outside the image reads the mirrored pixel, without repeating
  the edge (like ``nn.ReflectionPad2d``); valid only while ``padding < H`` and ``padding < W``.

For an input of spatial size ``H x W``, a ``k x k`` window (``k`` odd), ``stride``, ``padding`` and
``dilation``, the output has ``L = Ho * Wo`` positions with
``Ho = (H + 2 * padding - (dilation * (k - 1) + 1)) // stride + 1`` (and ``Wo`` alike). Output
position ``(i, j)`` has the window taps ``t = a * k + b`` at padded coordinates
``(i * stride - padding + a * dilation, j * stride - padding + b * dilation)``; its centre is the tap
``a = b = k // 2``. With the usual ``padding = dilation * (k // 2)`` the centre is the input pixel
``(i * stride, j * stride)``; with a larger padding the centre itself may fall in the padding and is
then read like any other neighbour (the official kernels read out of bounds there).

- :func:`subtraction` ``(N, C, H, W) -> (N, C, k*k, L)``: ``x[centre] - x[tap]``.
- :func:`subtraction2` ``(N, C, H, W) x 2 -> (N, C, k*k, L)``: ``x1[centre] - x2[tap]``.
- :func:`aggregation` ``(N, C, H, W), (N, Cw, k*k, L) -> (N, C, Ho, Wo)``:
  ``out[n, c, p] = sum_t w[n, c % Cw, t, p] * x[n, c, tap_t(p)]``; ``C`` must be a multiple of ``Cw``.

Every op has three backends (see :mod:`san_det.layers.backend`): ``reference`` (``F.unfold`` on the
padded input, the oracle), ``cpu`` (the CUDA kernel source of ``kernels/san_ops.cu`` compiled with
g++) and ``cuda`` (the same source through CuPy). The kernel backends are ``autograd.Function`` s
whose backward passes are gather kernels without atomics, in reflect mode too (a pixel near the
border is read by its own tap and by its mirror images).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "PAD_MODES",
    "subtraction",
    "subtraction2",
    "aggregation",
    "neighbourhood",
    "output_size",
]

PAD_MODES = ("zeros", "reflect")


class _Geometry(NamedTuple):
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


def output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1):
    """Output length along one axis: ``(size + 2 * padding - (dilation * (k - 1) + 1)) // stride + 1``."""
    return (size + 2 * padding - (dilation * (kernel_size - 1) + 1)) // stride + 1


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _geometry(
    x: torch.Tensor, name: str, kernel_size, stride, padding, dilation, pad_mode
) -> _Geometry:
    if not torch.is_tensor(x) or x.dim() != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a 4-D tensor (N, C, H, W), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    _check_int("kernel_size", kernel_size, 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    _check_int("stride", stride, 1)
    _check_int("padding", padding, 0)
    _check_int("dilation", dilation, 1)
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    height, width = x.shape[2], x.shape[3]
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
    return _Geometry(kernel_size, stride, padding, dilation, reflect, height, width, out_h, out_w)


def _check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


# ------------------------------------------------------------------------------------ reference
def neighbourhood(
    x: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    pad_mode: str = "zeros",
) -> torch.Tensor:
    """Every window tap of every output position: ``(N, C, H, W) -> (N, C, k*k, Ho*Wo)``.

    Plain ``F.unfold`` of the (zero- or reflection-) padded input; it uses ``k*k`` times the memory
    of ``x``. The reference backend and the non-official SAM relations are built on it.
    """
    g = _geometry(x, "x", kernel_size, stride, padding, dilation, pad_mode)
    return _neighbourhood(x, g)


def _neighbourhood(x: torch.Tensor, g: _Geometry) -> torch.Tensor:
    n, c = x.shape[:2]
    padding = g.padding
    if g.reflect and padding > 0:
        x = F.pad(x, (padding, padding, padding, padding), mode="reflect")
        padding = 0
    if n == 0 or c == 0:
        return x.new_zeros(n, c, g.taps, g.positions) + x.sum() * 0
    cols = F.unfold(x, g.kernel_size, dilation=g.dilation, padding=padding, stride=g.stride)
    return cols.view(n, c, g.taps, g.positions)


def _reference_subtraction2(x1: torch.Tensor, x2: torch.Tensor, g: _Geometry) -> torch.Tensor:
    centre = g.taps // 2
    return _neighbourhood(x1, g)[:, :, centre : centre + 1] - _neighbourhood(x2, g)


def _reference_aggregation(x: torch.Tensor, w: torch.Tensor, g: _Geometry) -> torch.Tensor:
    n, c = x.shape[:2]
    cw = w.shape[1]
    cols = _neighbourhood(x, g).view(n, c // cw, cw, g.taps, g.positions)
    out = (cols * w.unsqueeze(1)).sum(dim=3)
    return out.reshape(n, c, g.out_height, g.out_width)


# ------------------------------------------------------------------------------------ public ops
def subtraction(
    x: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    pad_mode: str = "zeros",
) -> torch.Tensor:
    """``out[n, c, t, p] = x[n, c, centre(p)] - x[n, c, tap_t(p)]``.

    Args:
        x: (N, C, H, W) floating tensor.
        kernel_size, stride, padding, dilation: window geometry (``kernel_size`` odd).
        pad_mode: "zeros" or "reflect" (see the module docstring).

    Returns:
        (N, C, kernel_size**2, Ho * Wo).
    """
    g = _geometry(x, "x", kernel_size, stride, padding, dilation, pad_mode)
    backend = _backend_for(x)
    if backend == "reference":
        return _reference_subtraction2(x, x, g)
    return _kernel_subtraction(x, g, backend)


def subtraction2(
    x1: torch.Tensor,
    x2: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    pad_mode: str = "zeros",
) -> torch.Tensor:
    """``out[n, c, t, p] = x1[n, c, centre(p)] - x2[n, c, tap_t(p)]``.

    Args:
        x1: (N, C, H, W), read at the window centre.
        x2: (N, C, H, W), same shape, dtype and device as ``x1``, read at every tap.

    Returns:
        (N, C, kernel_size**2, Ho * Wo).
    """
    g = _geometry(x1, "x1", kernel_size, stride, padding, dilation, pad_mode)
    if not torch.is_tensor(x2) or tuple(x2.shape) != tuple(x1.shape):
        shape = tuple(x2.shape) if torch.is_tensor(x2) else type(x2).__name__
        raise ValueError(f"x2 must have the shape of x1 {tuple(x1.shape)}, got {shape}")
    _check_same("x2", x2, "x1", x1)
    backend = _backend_for(x1)
    if backend == "reference":
        return _reference_subtraction2(x1, x2, g)
    return _kernel_subtraction2(x1, x2, g, backend)


def aggregation(
    x: torch.Tensor,
    w: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    pad_mode: str = "zeros",
) -> torch.Tensor:
    """``out[n, c, p] = sum_t w[n, c % Cw, t, p] * x[n, c, tap_t(p)]``.

    Args:
        x: (N, C, H, W) values.
        w: (N, Cw, kernel_size**2, Ho * Wo) weights; ``C`` must be a multiple of ``Cw``, so channel
            ``c`` uses weight channel ``c % Cw`` (SAN's weight sharing).

    Returns:
        (N, C, Ho, Wo).
    """
    g = _geometry(x, "x", kernel_size, stride, padding, dilation, pad_mode)
    n, c = x.shape[:2]
    if not torch.is_tensor(w) or w.dim() != 4:
        shape = tuple(w.shape) if torch.is_tensor(w) else type(w).__name__
        raise ValueError(f"w must be a 4-D tensor (N, Cw, k*k, Ho*Wo), got {shape}")
    cw = w.shape[1]
    expected = (n, cw, g.taps, g.positions)
    if cw < 1 or c % cw != 0 or tuple(w.shape) != expected:
        raise ValueError(
            f"w must have shape (N, Cw, k*k, Ho*Wo) = ({n}, Cw, {g.taps}, {g.positions}) with C={c} "
            f"a multiple of Cw, got {tuple(w.shape)}"
        )
    _check_same("w", w, "x", x)
    backend = _backend_for(x)
    if backend == "reference":
        return _reference_aggregation(x, w, g)
    return _kernel_aggregation(x, w, g, backend)


# ------------------------------------------------------------------------------------ backends
def _backend_for(x: torch.Tensor) -> str:
    from .backend import forced_backend, select_backend

    name = select_backend(x)
    if name == "cpu" and x.dtype not in (torch.float32, torch.float64):
        if forced_backend() == "cpu":
            raise ValueError(f"the cpu backend computes in float32 or float64, got {x.dtype}")
        name = "reference"
    if name != "reference":
        # The kernel backends are added in the next step; until then automatic choice falls back.
        if forced_backend() is not None:
            raise NotImplementedError(f"SAN ops: backend {name!r} is not implemented yet")
        name = "reference"
    return name


def _kernel_subtraction(x, g, backend):  # pragma: no cover - placeholder until kernels land
    raise NotImplementedError


def _kernel_subtraction2(x1, x2, g, backend):  # pragma: no cover
    raise NotImplementedError


def _kernel_aggregation(x, w, g, backend):  # pragma: no cover
    raise NotImplementedError

