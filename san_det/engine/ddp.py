"""Data-parallel wrapping that works for CPU processes (gloo) as well as GPUs.

detectron2 0.6 wraps the model with ``DistributedDataParallel(model, device_ids=[local_rank])``,
which torch rejects for a CPU model, and torch's ``nn.SyncBatchNorm`` only runs on GPUs.
:func:`wrap_ddp` passes ``device_ids`` only for GPU models and, for CPU models, swaps every
``nn.SyncBatchNorm`` for :class:`CPUSyncBatchNorm` (same parameters and buffers, statistics
all-reduced over the process group), so ``MODEL.*.NORM: SyncBN`` configs train on CPU processes.
"""

import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["wrap_ddp", "CPUSyncBatchNorm", "convert_sync_batchnorm_for_cpu"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group; the gradient of each input is the sum of all ranks' output
    gradients (each rank's output depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the union of every process's batch, for any device gloo supports.

    Same results as ``nn.BatchNorm{1,2,3}d`` on the concatenated batch of all processes (mean and
    biased variance for normalising; unbiased variance in ``running_var``), with gradients
    flowing through the statistics to every process's input. Processes may hold different
    batch sizes. Input: ``(N, C, *)``; output: same shape.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(
                f"CPUSyncBatchNorm expects input of shape (N, C, *), got {input.dim()}D"
            )

    def _momentum_factor(self) -> float:
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _need_sync(self) -> bool:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return False
        group = self.process_group or dist.group.WORLD
        return dist.get_world_size(group) > 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self._need_sync():
            use_batch_stats = self.training or self.running_mean is None
            factor = 0.0
            if self.training and self.track_running_stats:
                self.num_batches_tracked.add_(1)
                factor = self._momentum_factor()
            return F.batch_norm(
                input,
                self.running_mean if not self.training or self.track_running_stats else None,
                self.running_var if not self.training or self.track_running_stats else None,
                self.weight,
                self.bias,
                use_batch_stats,
                factor,
                self.eps,
            )
        group = self.process_group or dist.group.WORLD
        channels = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        # Two passes (mean, then centred squares) match single-process BN's numerics.
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() / max(channels, 1)])])
        total = _all_reduce_sum(local, group)
        count = total[-1].detach()
        if count <= 1:
            raise ValueError(
                f"CPUSyncBatchNorm needs more than one value per channel over all processes, got "
                f"{int(count)} (input shape {tuple(input.shape)} on this process)"
            )
        mean = total[:channels] / count
        shape = [1, channels] + [1] * (input.dim() - 2)
        centred = x - mean.reshape(shape)
        var = _all_reduce_sum((centred * centred).sum(dims), group) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self._momentum_factor()
                unbiased = var.detach() * (count / (count - 1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm_for_cpu(module: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` in ``module`` by a :class:`CPUSyncBatchNorm` that keeps
    the very same parameter and buffer tensors (an optimizer built before stays valid).

    Returns the converted module (a new object only when ``module`` itself is a SyncBatchNorm).
    """
    if isinstance(module, nn.SyncBatchNorm):
        new = CPUSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            module.process_group,
        )
        for name, param in module.named_parameters(recurse=False):
            setattr(new, name, param)
        for name, buf in module.named_buffers(recurse=False):
            setattr(new, name, buf)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm_for_cpu(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def wrap_ddp(model: nn.Module, **kwargs) -> nn.Module:
    """``DistributedDataParallel(model, **kwargs)`` when there is more than one process, else
    ``model``; works for CPU models (gloo) as well as GPU models (NCCL).

    GPU models get ``device_ids=[local_rank]`` unless given. On CPU, ``nn.SyncBatchNorm`` layers are
    converted in place (:func:`convert_sync_batchnorm_for_cpu`) first. Call it after building the
    optimizer, as detectron2's trainers do: parameters are not copied.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return model
    on_cpu = _model_device(model).type == "cpu"
    if on_cpu:
        model = convert_sync_batchnorm_for_cpu(model)
    if comm.get_world_size() == 1:
        return model
    if on_cpu:
        if kwargs.get("device_ids"):
            raise ValueError(f"wrap_ddp: device_ids={kwargs['device_ids']} given for a CPU model")
        kwargs["device_ids"] = None
    elif "device_ids" not in kwargs:
        kwargs["device_ids"] = [comm.get_local_rank()]
    with warnings.catch_warnings():
        # torch >= 2.12 deprecates broadcast_buffers (detectron2 passes False); same meaning.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(model, **kwargs)


def _model_device(model: nn.Module) -> torch.device:
    tensor: Optional[torch.Tensor] = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
