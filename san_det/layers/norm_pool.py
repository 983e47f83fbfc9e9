"""A per-channel affine norm followed by a non-overlapping max pool, fused: ``pool(norm(y))``
without the full-resolution normalised tensor.

BatchNorm (batch or running statistics) and detectron2's ``FrozenBatchNorm2d`` are per-channel
affine maps ``y -> y * scale_c + shift_c``. Such a map commutes with a max pool where
``scale_c >= 0``; where ``scale_c < 0`` the max of its image is at the *min* of ``y``. So
:func:`norm_max_pool` pools ``y`` itself (its max, the max of ``-y`` where the scale is negative,
the window's first pixel where it is zero, as the unfused pool of a constant picks) and applies
the affine map at pooled resolution. What the backward keeps is ``y`` (batch statistics only;
BatchNorm keeps it too) and the argmax as its offset from the window's first pixel (int16 for
4 x 4 windows, pooled resolution), not the normalised tensor nor max pool's copy of it nor its
int64 indices. The backward allocates one full-resolution tensor, the gradient of ``y``
(closed form below), and builds the int64 scatter indices in chunks of channels.

Used where it is exact (:func:`can_fuse_norm_max_pool`): a norm of type exactly
``nn.BatchNorm2d`` (training or eval, any ``track_running_stats``/``affine``/``momentum``, also
``None``), ``nn.SyncBatchNorm`` with running statistics (eval) or ``FrozenBatchNorm2d``, and an
``nn.MaxPool2d`` with ``stride == kernel_size``, no padding and no dilation, on float32/float64
tensors of the norm's dtype. With running statistics the norm module itself runs on the pooled
tensor (it is elementwise then), so the values are bitwise the unfused ones. Anything else
(GroupNorm, SyncBatchNorm with batch statistics, subclasses, ``nn.Identity``, other pools,
other dtypes, modules with hooks, tracing with ``torch.jit.trace`` or compiling with
``torch.compile``/``torch.export``, which see the plain modules) runs the modules unfused,
unchanged.

:func:`pooled_norm` is the same norm for a producer that pools by :func:`scale_sign` and sums
each channel itself (the attention stem's op ``san_det::attention_stem_pool``): it normalises
from float64 channel sums, and so takes ``nn.SyncBatchNorm`` with batch statistics too (the sums
added up over the processes, as SyncBatchNorm synchronises its statistics).

With batch statistics the results equal the unfused ones up to float rounding, and the running
statistics are updated as ``nn.BatchNorm2d`` updates them (``torch.batch_norm_update_stats``,
BatchNorm's own statistics kernel). Ties: where several pixels of a window hold the same
normalised value (equal ``y``, or distinct ``y`` that round to one normalised value) the two
paths may route the gradient to different ones of those pixels; the forward values agree up to
rounding. Where some scale is negative or zero the forward makes one temporary full-resolution
copy, ``y * sign`` (none while every scale is positive, e.g. BatchNorm's initial weights).

Training-mode backward (``n = N * H * W`` values per channel, ``G`` the pooled output gradient
scattered to the argmax pixels, ``yhat = (y - mean) * invstd``)::

    grad_y = invstd * w * (G - mean(G) - yhat * mean(G * yhat))
    mean(G) = sum(g) / n,  mean(G * yhat) = sum(g * yhat[argmax]) / n      (pooled resolution)
    grad_w = sum(g * yhat[argmax]),  grad_b = sum(g)

so ``grad_y = A_c + B_c * (y - mean_c)`` plus ``invstd * w * g`` added at the argmax pixels.
"""

import sys
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "can_fuse_for",
    "can_fuse_norm_max_pool",
    "norm_max_pool",
    "pool_window",
    "pooled_norm",
    "scale_sign",
]

_DTYPES = (torch.float32, torch.float64)


def _frozen_batch_norm_type() -> Optional[type]:
    """detectron2's ``FrozenBatchNorm2d`` if detectron2 is loaded (a module of that type exists
    only then); ``san_det.layers`` does not need detectron2 otherwise."""
    module = sys.modules.get("detectron2.layers.batch_norm")
    return getattr(module, "FrozenBatchNorm2d", None)


def _pair(value) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _has_hooks(*modules: nn.Module) -> bool:
    """Whether calling the modules would run hooks (theirs or global ones): the fused path does
    not call them, so it is not taken then."""
    # torch keeps hooks in dicts it does not document: read defensively (a torch without one of
    # these names has no such hooks to miss).
    kinds = ("forward_hooks", "forward_pre_hooks", "backward_hooks", "backward_pre_hooks")
    global_hooks = (getattr(nn.modules.module, f"_global_{kind}", None) for kind in kinds)
    return any(global_hooks) or any(getattr(m, f"_{kind}", None) for m in modules for kind in kinds)


def pool_window(pool: nn.Module) -> Optional[Tuple[int, int]]:
    """``(kh, kw)`` of an ``nn.MaxPool2d`` with non-overlapping windows, else ``None``."""
    if type(pool) is not nn.MaxPool2d or pool.return_indices:
        return None
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    if kernel != stride or _pair(pool.padding) != (0, 0) or _pair(pool.dilation) != (1, 1):
        return None
    return kernel


def can_fuse_norm_max_pool(x: torch.Tensor, norm: nn.Module, pool: nn.Module) -> bool:
    """Whether :func:`norm_max_pool` computes ``pool(norm(x))`` fused (see the module's doc)."""
    return x.dim() == 4 and can_fuse_for(x.shape, x.dtype, x.device, norm, pool)


def can_fuse_for(
    shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    norm: nn.Module,
    pool: nn.Module,
    from_sums: bool = False,
) -> bool:
    """:func:`can_fuse_norm_max_pool` for an input of this ``(N, C, H, W)`` shape, dtype and
    device (the input need not exist). ``from_sums``: for :func:`pooled_norm`, which normalises
    from channel sums; those SyncBatchNorm's synchronisation can add up across processes, so
    ``nn.SyncBatchNorm`` with batch statistics is taken too."""
    window = pool_window(pool)
    if window is None or dtype not in _DTYPES or shape.numel() == 0:
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or _has_hooks(norm, pool):
        return False
    if not pool.ceil_mode and (shape[2] % window[0] or shape[3] % window[1]):
        return False  # floor mode drops the last rows/columns; not covered
    if type(norm) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        if norm.num_features != shape[1]:
            return False
        tensors = [norm.weight, norm.bias, norm.running_mean, norm.running_var]
        if _uses_batch_statistics(norm) and (
            (type(norm) is nn.SyncBatchNorm and not from_sums) or shape.numel() // shape[1] < 2
        ):
            return False  # SyncBatchNorm's synchronised statistics; BatchNorm's error
    elif type(norm) is _frozen_batch_norm_type():
        tensors = [norm.weight, norm.bias, norm.running_mean, norm.running_var]
    else:
        return False
    if any(t is not None and t.shape != (shape[1],) for t in tensors):
        return False
    return all(t is None or (t.dtype == dtype and t.device == device) for t in tensors)


def scale_sign(norm: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """``(C,)`` in ``like``'s dtype and device: the sign of the per-channel scale of a norm
    :func:`can_fuse_for` takes, the weight's (1 without one): the inverse standard deviation it
    multiplies is positive."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        return torch.ones(norm.num_features, dtype=like.dtype, device=like.device)
    return weight.detach().sign().to(like.dtype)


def pooled_norm(
    pooled: torch.Tensor, sums: torch.Tensor, count: int, norm: nn.Module
) -> torch.Tensor:
    """``pool(norm(y))`` from what is left of ``y`` after pooling (for a norm and pool that
    :func:`can_fuse_for` takes).

    Args:
        pooled: ``(N, C, Ho, Wo)``, ``y`` where ``scale_sign(norm) * y`` is largest in each
            window (the window's first pixel where the sign is 0).
        sums: ``(2, C)`` float64, the sums of ``y`` and of ``y**2`` over its ``count`` values
            per channel (batch statistics only; autograd differentiates through them).
        count: ``N * H * W``.
        norm: its running statistics are updated as its own forward would. A training
            ``nn.SyncBatchNorm`` in a process group of several processes adds ``sums`` and
            ``count`` up across them first, as it synchronises its statistics (the gradients of
            the sums are added up the same way in the backward).
    """
    batch_norms = (nn.BatchNorm2d, nn.SyncBatchNorm)
    if not (type(norm) in batch_norms and _uses_batch_statistics(norm)):
        return norm(pooled)  # elementwise with running statistics: as unfused, bitwise
    group = _synchronised_group(norm)
    if group is not None:
        sums, count = _all_reduced(sums, count, group)
    mean = sums[0] / count
    var = (sums[1] / count - mean * mean).clamp_min(0)  # float64 sums: no cancellation to fear
    factor = _update_factor(norm)
    if norm.training and norm.track_running_stats:
        with torch.no_grad():  # as BatchNorm: the unbiased variance goes to running_var
            norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
            unbiased = var * (count / (count - 1))
            norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), factor)
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -mean * scale if norm.bias is None else norm.bias - mean * scale
    c = (slice(None), None, None)
    return pooled * scale.to(pooled.dtype)[c] + shift.to(pooled.dtype)[c]


def norm_max_pool(x: torch.Tensor, norm: nn.Module, pool: nn.Module) -> torch.Tensor:
    """``pool(norm(x))``, fused where :func:`can_fuse_norm_max_pool` says it is exact.

    Args:
        x: ``(N, C, H, W)``.
        norm: the norm module (its running statistics are updated as its own forward would).
        pool: an ``nn.MaxPool2d`` (or anything else: then unfused).

    Returns:
        ``(N, C, Ho, Wo)``, ``Ho = ceil(H / kh)`` with ``ceil_mode`` (``H / kh`` otherwise).
    """
    if not can_fuse_norm_max_pool(x, norm, pool):
        return pool(norm(x))
    window = pool_window(pool)
    if type(norm) is nn.BatchNorm2d and _uses_batch_statistics(norm):
        mean, invstd = _batch_statistics(x, norm)
        return _BatchNormMaxPool.apply(x, norm.weight, norm.bias, mean, invstd, window)
    # Running statistics: the norm is elementwise, so it runs as itself on the pooled tensor
    # (the same arithmetic as unfused, bitwise; autograd gives the weight/bias gradients).
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var + norm.eps)
        scale = scale if norm.weight is None else scale * norm.weight
    return norm(_SignedMaxPool.apply(x, scale, window))


def _uses_batch_statistics(norm: nn.BatchNorm2d) -> bool:
    return norm.training or (norm.running_mean is None and norm.running_var is None)


def _synchronised_group(norm: nn.Module):
    """The process group over which ``nn.SyncBatchNorm.forward`` would synchronise its statistics
    (training, in an initialised group of more than one process), else None."""
    if type(norm) is not nn.SyncBatchNorm or not norm.training:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    group = norm.process_group or torch.distributed.group.WORLD
    return group if torch.distributed.get_world_size(group) > 1 else None


def _all_reduced(sums: torch.Tensor, count: int, group) -> Tuple[torch.Tensor, int]:
    """``sums`` (differentiably) and ``count`` added up over the processes of ``group``, in one
    collective."""
    counts = sums.new_full((1, sums.shape[1]), float(count))
    total = _SumOverProcesses.apply(torch.cat([sums, counts]), group)
    return total[:2], int(total[2, 0])


class _SumOverProcesses(torch.autograd.Function):
    """``t`` added up over the processes of a group; its gradient is added up the same way (each
    process's loss depends on every process's ``t``)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        torch.distributed.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return _SumOverProcesses.apply(grad, ctx.group), None


def _update_factor(norm: nn.BatchNorm2d) -> float:
    """The weight of this batch's statistics in the running ones (``nn.BatchNorm2d``'s
    ``exponential_average_factor``); counts the batch in ``num_batches_tracked`` as it does."""
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else factor
    return factor


def _batch_statistics(x: torch.Tensor, norm: nn.BatchNorm2d) -> Tuple[torch.Tensor, ...]:
    """Per-channel batch ``mean`` and ``invstd`` (biased variance), ``(C,)`` each; updates the
    running statistics and ``num_batches_tracked`` exactly as ``nn.BatchNorm2d.forward``."""
    factor = _update_factor(norm)
    update = norm.training and norm.track_running_stats
    running = (norm.running_mean, norm.running_var) if update else (None, None)
    with torch.no_grad():
        # BatchNorm's statistics kernel: mean, biased var; running_var gets the unbiased one.
        mean, var = torch.batch_norm_update_stats(x.detach(), *running, factor)
        return mean, torch.rsqrt(var + norm.eps)


def _pool_by_sign(
    x: torch.Tensor, scale: torch.Tensor, window: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per channel ``c``: the window max of ``x`` where ``scale_c > 0``, the min where
    ``scale_c < 0``, the window's first pixel where ``scale_c == 0``; ``(values, index)``, both
    ``(N, C, Ho, Wo)``, ``index`` into the ``H * W`` plane as ``F.max_pool2d``'s (ceil-mode
    windows)."""
    sign = scale.sign()
    if bool((sign > 0).all()):
        return F.max_pool2d(x, window, window, ceil_mode=True, return_indices=True)
    # The only full-resolution temporary; max pool finds the first of a window of zeros first.
    signed = x * sign[:, None, None]
    pooled, index = F.max_pool2d(signed, window, window, ceil_mode=True, return_indices=True)
    del signed
    first = x[:, :, :: window[0], :: window[1]]
    sign = sign[:, None, None]
    values = torch.where(sign < 0, -pooled, torch.where(sign == 0, first, pooled))
    return values, index


def _window_starts(shape: torch.Size, window: Tuple[int, int], device) -> torch.Tensor:
    """Flat index ``row * W + col`` of each window's first pixel: int64 ``(Ho, Wo)`` for an
    input of ``shape`` ``(N, C, H, W)``."""
    (kh, kw), (h, w) = window, shape[2:]
    rows = torch.arange(0, h, kh, device=device)[:, None] * w
    return rows + torch.arange(0, w, kw, device=device)[None, :]


def _window_offsets(index: torch.Tensor, shape: torch.Size, window: Tuple[int, int]):
    """``F.max_pool2d``'s flat index ``row * W + col`` -> its offset from the window's first
    pixel, in the smallest integer dtype that holds ``(kh - 1) * W + kw - 1`` (int16 for 4 x 4
    windows up to W = 10922): what the backward keeps of the argmax."""
    (kh, kw), width = window, shape[3]
    largest = (kh - 1) * width + kw - 1
    dtype = next(t for t in (torch.int8, torch.int16, torch.int32) if largest <= torch.iinfo(t).max)
    return (index - _window_starts(shape, window, index.device)).to(dtype)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(N, C, H, W)`` at the flat plane indices ``index`` ``(N, C, Ho, Wo)``."""
    if x.stride(2) == x.shape[3] * x.stride(3):  # the H x W planes are views (also NHWC)
        return x.flatten(2).gather(2, index.flatten(2)).view(index.shape)
    n, c, _, w = x.shape
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return x[batch, channel, torch.div(index, w, rounding_mode="floor"), index % w]


def _scatter_add(
    grad_x: torch.Tensor,
    offsets: torch.Tensor,
    window: Tuple[int, int],
    grad: torch.Tensor,
    factor: Optional[torch.Tensor] = None,
) -> None:
    """``grad_x[n, c, argmax pixel of (i, j)] += grad[n, c, i, j] * factor[c]`` in place
    (``grad_x`` contiguous, the windows do not overlap). In chunks of images and channels of
    about a 16th of ``grad`` each, so that the int64 indices and the scaled gradient exist for
    one chunk at a time (this runs while ``x`` and ``grad_x`` are both alive: the peak)."""
    n, c, h, w = grad_x.shape
    starts = _window_starts(grad_x.shape, window, grad_x.device)
    group = min(c, max(1, grad.numel() // 16 // starts.numel()))
    for b in range(n):
        for c0 in range(0, c, group):
            chunk = slice(c0, c0 + group)
            planes = grad_x[b, chunk].view(-1, h * w)
            index = offsets[b, chunk].long().add_(starts).view(len(planes), -1)
            src = grad[b, chunk] if factor is None else grad[b, chunk] * factor[chunk, None, None]
            planes.scatter_add_(1, index, src.reshape(len(planes), -1))


class _SignedMaxPool(torch.autograd.Function):
    """:func:`_pool_by_sign`'s values ``(x (N, C, H, W), scale (C,), window)`` -> ``(N, C, Ho,
    Wo)``, differentiable in ``x``: the gradient is the pooled one placed at the argmax pixels
    (``x`` is not saved, only the index)."""

    @staticmethod
    def forward(ctx, x, scale, window):
        values, index = _pool_by_sign(x, scale, window)
        ctx.save_for_backward(_window_offsets(index, x.shape, window))
        ctx.x_shape, ctx.window = x.shape, window
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        grad_x = grad.new_zeros(ctx.x_shape)
        _scatter_add(grad_x, offsets, ctx.window, grad)
        return grad_x, None, None


class _BatchNormMaxPool(torch.autograd.Function):
    """Training-mode BatchNorm then max pool: ``(x, weight, bias, mean, invstd, window)`` ->
    ``(N, C, Ho, Wo)``; ``mean``/``invstd`` are the batch statistics of ``x`` (constants to
    autograd: the closed-form backward differentiates through them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, window):
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        values, index = _pool_by_sign(x, scale, window)
        ctx.save_for_backward(x, _window_offsets(index, x.shape, window), weight, mean, invstd)
        ctx.window = window
        return values * scale[:, None, None] + shift[:, None, None]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, offsets, weight, mean, invstd = ctx.saved_tensors
        c = (slice(None), None, None)  # (C,) -> (C, 1, 1)
        sum_g = grad.sum((0, 2, 3))
        index = offsets.long().add_(_window_starts(x.shape, ctx.window, x.device))
        yhat = (_gather(x, index) - mean[c]) * invstd[c]  # at the argmax pixels
        del index
        sum_g_yhat = (grad * yhat).sum((0, 2, 3))
        del yhat
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            n = x.numel() // x.shape[1]
            k = invstd if weight is None else invstd * weight  # d out / d yhat * invstd
            # The per-pixel terms: -k * mean(G) - k * invstd * mean(G * yhat) * (x - mean).
            grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous
            torch.sub(x, mean[c], out=grad_x).mul_((-k * invstd * sum_g_yhat / n)[c])
            grad_x.add_((-k * sum_g / n)[c])
            _scatter_add(grad_x, offsets, ctx.window, grad, k)
        if ctx.needs_input_grad[1]:
            grad_weight = sum_g_yhat
        if ctx.needs_input_grad[2]:
            grad_bias = sum_g
        return grad_x, grad_weight, grad_bias, None, None, None
