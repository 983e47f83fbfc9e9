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
``(i * stride - padding + a * dilation, j * stride - padding + b * dilation)``; its centre is
the tap ``a = b = k // 2``. With the usual ``padding = dilation * (k // 2)`` the centre is the
input pixel ``(i * stride, j * stride)``; with a larger padding the centre itself may fall in the
padding and is then read like any other neighbour (the official kernels read out of bounds there).

- :func:`subtraction` ``(N, C, H, W) -> (N, C, k*k, L)``: ``x[centre] - x[tap]``.
- :func:`subtraction2` ``(N, C, H, W) x 2 -> (N, C, k*k, L)``: ``x1[centre] - x2[tap]``.
- :func:`aggregation` ``(N, C, H, W), (N, Cw, k*k, L) -> (N, C, Ho, Wo)``:
  ``out[n, c, p] = sum_t w[n, c % Cw, t, p] * x[n, c, tap_t(p)]``; ``C`` must be a multiple of
  ``Cw``.

Every op has three backends (see :mod:`san_det.layers.backend`): ``reference`` (``F.unfold`` on the
padded input, the oracle), ``cpu`` (the CUDA kernel source of ``kernels/san_ops.cu`` compiled with
g++) and ``cuda`` (the same source through CuPy). The kernel backends are ``autograd.Function`` s
whose backward passes are gather kernels without atomics, in reflect mode too (a pixel near the
border is read by its own tap and by its mirror images).
"""

import contextlib
import threading
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .backend import forced_backend, select_backend
from .kernel_runtime import DEFAULT_THREADS, KernelSource

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
    """Output length along one axis.

    ``(size + 2 * padding - (dilation * (kernel_size - 1) + 1)) // stride + 1``
    """
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
        raise ValueError(
            f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}"
        )


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
    return _SubtractionFunction.apply(x, g, backend)


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
    return _Subtraction2Function.apply(x1, x2, g, backend)


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
            f"w must have shape (N, Cw, k*k, Ho*Wo) = ({n}, Cw, {g.taps}, {g.positions}) "
            f"with C={c} a multiple of Cw, got {tuple(w.shape)}"
        )
    _check_same("w", w, "x", x)
    backend = _backend_for(x)
    if backend == "reference":
        return _reference_aggregation(x, w, g)
    return _AggregationFunction.apply(x, w, g, backend)


# ------------------------------------------------------------------------------------ backends
_SOURCE: Optional[KernelSource] = None
_MAX_CUDA_BLOCKS = 1 << 16
_cpu_launch = threading.local()


@contextlib.contextmanager
def _cpu_launch_config(grid: int, block: int) -> Iterator[None]:
    """Run the CPU kernels on a fixed ``grid x block`` launch (tests use tiny ones)."""
    previous = getattr(_cpu_launch, "config", None)
    _cpu_launch.config = (grid, block)
    try:
        yield
    finally:
        _cpu_launch.config = previous


def _backend_for(x: torch.Tensor) -> str:
    name = select_backend(x)
    if name == "cpu" and x.dtype not in (torch.float32, torch.float64):
        if forced_backend() == "cpu":
            raise ValueError(f"the cpu backend computes in float32 or float64, got {x.dtype}")
        name = "reference"
    return name


def _launch(
    backend: str, name: str, tensors: Sequence[torch.Tensor], total: int, scalars: Sequence[int]
) -> None:
    """Run kernel ``name`` of san_ops.cu: arguments are ``*tensors, total, *scalars``."""
    global _SOURCE
    if total == 0:
        return
    if _SOURCE is None:
        _SOURCE = KernelSource("san_ops.cu")
    like = tensors[0]
    if backend == "cpu":
        # One thread per block keeps each OpenMP thread on its own strided share of the outputs.
        grid, block = getattr(_cpu_launch, "config", None) or (max(1, torch.get_num_threads()), 1)
        getattr(_SOURCE.cpu(like.dtype), name)(grid, block, *tensors, total, *scalars)
    else:
        block = DEFAULT_THREADS
        grid = min((total + block - 1) // block, _MAX_CUDA_BLOCKS)
        with torch.cuda.device(like.device):
            kernel = getattr(_SOURCE.cuda(like.dtype, like.device), name)
            kernel(grid, block, *tensors, total, *scalars)


def _window_args(g: _Geometry) -> Tuple[int, ...]:
    return (
        g.height,
        g.width,
        g.out_height,
        g.out_width,
        g.kernel_size,
        g.stride,
        g.padding,
        g.dilation,
        int(g.reflect),
    )


def _subtraction_grad(grad_out, g, backend, shape, centre_sign: int, tap_sign: int):
    grad_in = grad_out.new_empty(shape)
    scalars = (*_window_args(g), centre_sign, tap_sign)
    _launch(backend, "san_subtraction_backward", (grad_out, grad_in), grad_in.numel(), scalars)
    return grad_in


class _SubtractionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g: _Geometry, backend: str):
        x = x.contiguous()
        out = x.new_empty(x.shape[0], x.shape[1], g.taps, g.positions)
        total = out.numel() // g.taps
        _launch(backend, "san_subtraction2_forward", (x, x, out), total, _window_args(g))
        ctx.g, ctx.backend, ctx.shape = g, backend, x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()
        return _subtraction_grad(grad_out, ctx.g, ctx.backend, ctx.shape, 1, 1), None, None


class _Subtraction2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, g: _Geometry, backend: str):
        x1, x2 = x1.contiguous(), x2.contiguous()
        out = x1.new_empty(x1.shape[0], x1.shape[1], g.taps, g.positions)
        total = out.numel() // g.taps
        _launch(backend, "san_subtraction2_forward", (x1, x2, out), total, _window_args(g))
        ctx.g, ctx.backend, ctx.shape = g, backend, x1.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()
        grad1 = grad2 = None
        if ctx.needs_input_grad[0]:
            grad1 = _subtraction_grad(grad_out, ctx.g, ctx.backend, ctx.shape, 1, 0)
        if ctx.needs_input_grad[1]:
            grad2 = _subtraction_grad(grad_out, ctx.g, ctx.backend, ctx.shape, 0, 1)
        return grad1, grad2, None, None


class _AggregationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, g: _Geometry, backend: str):
        x, w = x.contiguous(), w.contiguous()
        n, c = x.shape[:2]
        out = x.new_empty(n, c, g.out_height, g.out_width)
        scalars = (c, w.shape[1], *_window_args(g))
        _launch(backend, "san_aggregation_forward", (x, w, out), out.numel(), scalars)
        ctx.save_for_backward(x, w)
        ctx.g, ctx.backend = g, backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        scalars = (x.shape[1], w.shape[1], *_window_args(ctx.g))
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            tensors = (grad_out, w, grad_x)
            _launch(ctx.backend, "san_aggregation_input_backward", tensors, x.numel(), scalars)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(w)
            tensors = (grad_out, x, grad_w)
            total = w.numel() // ctx.g.taps
            _launch(ctx.backend, "san_aggregation_weight_backward", tensors, total, scalars)
        return grad_x, grad_w, None, None
