"""The fused norm + max pool (``san_det.layers.norm_pool``) against the unfused ``pool(norm(y))``:
forward values, the gradients of ``y``, weight and bias, the running statistics after the step,
float64 and float32, sizes that are and are not block multiples, batch 1 and 2, blocks 2 and 4,
negative and zero weights, training and eval BatchNorm2d, FrozenBatchNorm2d; gradcheck; what
the backward keeps and allocates; the fallbacks; the whole attention stem before and after."""

import copy

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import san_det  # noqa: F401  (compat before detectron2)
from san_det.layers.attention_stem import SpatiallyAwareAttentionStem
from san_det.layers.norm_pool import can_fuse_norm_max_pool, norm_max_pool

TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}
C = 6
WEIGHT = [1.5, -2.0, 0.0, 0.5, -0.25, 3.0]  # positive, negative and zero scales

# name -> (module kind, nn.BatchNorm2d keyword arguments, training)
NORMS = {
    "train": ("bn", {}, True),
    "train_no_running_stats": ("bn", dict(track_running_stats=False), True),
    "train_momentum_none": ("bn", dict(momentum=None), True),
    "train_no_affine": ("bn", dict(affine=False), True),
    "eval": ("bn", {}, False),
    "eval_no_running_stats": ("bn", dict(track_running_stats=False), False),
    "eval_no_affine": ("bn", dict(affine=False), False),
    "frozen": ("frozen", {}, True),
    "sync_eval": ("sync", {}, False),
}


def _norm(name, dtype, seed=0):
    kind, kwargs, training = NORMS[name]
    gen = torch.Generator().manual_seed(seed)
    types = {"frozen": FrozenBatchNorm2d, "sync": nn.SyncBatchNorm, "bn": nn.BatchNorm2d}
    norm = types[kind](C, **kwargs)
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight.copy_(torch.tensor(WEIGHT))
            norm.bias.copy_(torch.randn(C, generator=gen))
        if norm.running_mean is not None:
            norm.running_mean.copy_(torch.randn(C, generator=gen))
            norm.running_var.copy_(torch.rand(C, generator=gen) + 0.5)
        if getattr(norm, "num_batches_tracked", None) is not None:
            norm.num_batches_tracked.fill_(3)
    return norm.to(dtype).train(training)


def _pool(block, ceil_mode=True):
    return nn.MaxPool2d(block, block, ceil_mode=ceil_mode)


def _input(size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(size, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _step(norm, pool, y, fused, grad_seed=1):
    """On a copy of ``norm``: output, gradients of ``y`` and of the norm's parameters, and the
    norm's buffers afterwards."""
    norm = copy.deepcopy(norm)
    y = y.detach().requires_grad_(True)  # keeps the layout
    out = norm_max_pool(y, norm, pool) if fused else pool(norm(y))
    gen = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    names, params = zip(*([("y", y)] + list(norm.named_parameters())))
    grads = dict(zip(names, torch.autograd.grad(out, params, grad)))
    return out, grads, {k: b.clone() for k, b in norm.named_buffers()}


def _assert_same(got, want, dtype):
    (out, grads, buffers), (ref_out, ref_grads, ref_buffers) = got, want
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref_out, **tol)
    assert grads.keys() == ref_grads.keys() and buffers.keys() == ref_buffers.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)
    for name in ref_buffers:
        torch.testing.assert_close(buffers[name], ref_buffers[name], **tol, msg=name)


SIZES = [(1, C, 8, 8), (2, C, 9, 7), (2, C, 5, 13), (1, C, 3, 2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("block", [2, 4])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(NORMS))
def test_matches_unfused(name, size, block, dtype):
    norm, pool, y = _norm(name, dtype), _pool(block), _input(size, dtype)
    assert can_fuse_norm_max_pool(y, norm, pool)
    want = _step(norm, pool, y, fused=False)
    got = _step(norm, pool, y, fused=True)
    _assert_same(got, want, dtype)
    if norm.running_mean is not None and not NORMS[name][2] or name == "frozen":
        # running statistics: the norm itself on the pooled tensor, bitwise the unfused values
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    # every gradient is exercised, also the weight's at a zero weight (its window's first pixel)
    for key, grad in want[1].items():
        assert grad.abs().max() > 0, key
    if "weight" in want[1]:
        assert want[1]["weight"][WEIGHT.index(0.0)].abs() > 0
    if NORMS[name][2] and name != "frozen" and "no_running" not in name:
        assert not torch.equal(got[2]["running_mean"], norm.running_mean)  # updated


@pytest.mark.parametrize("name", ["train", "train_momentum_none"])
def test_running_statistics_over_several_steps(name):
    """momentum=None is the cumulative average over num_batches_tracked steps."""
    fused, unfused, pool = _norm(name, torch.float64), _norm(name, torch.float64), _pool(4)
    for seed in range(3):
        y = _input((2, C, 9, 11), torch.float64, seed=seed)
        torch.testing.assert_close(
            norm_max_pool(y, fused, pool), pool(unfused(y)), rtol=0, atol=1e-12
        )
    for key, buffer in unfused.named_buffers():
        torch.testing.assert_close(dict(fused.named_buffers())[key], buffer, rtol=1e-14, atol=0)
    assert int(fused.num_batches_tracked) == 6


@pytest.mark.parametrize("window", [(3, 2), (12, 12)], ids=["3x2", "12x12"])
@pytest.mark.parametrize("name", ["train", "eval"])
def test_other_windows(name, window):
    """A rectangular window, and one of more than 127 pixels (int16 window offsets)."""
    norm, pool = _norm(name, torch.float64), nn.MaxPool2d(window, window, ceil_mode=True)
    y = _input((2, C, 25, 14), torch.float64)
    assert can_fuse_norm_max_pool(y, norm, pool)
    _assert_same(_step(norm, pool, y, True), _step(norm, pool, y, False), torch.float64)


def test_floor_mode_pool_on_block_multiples():
    """``nn.MaxPool2d(b, b)`` (ceil_mode off) is fused where the sides are block multiples."""
    norm, pool, y = (
        _norm("train", torch.float64),
        _pool(4, ceil_mode=False),
        _input((2, C, 8, 12), torch.float64),
    )
    assert can_fuse_norm_max_pool(y, norm, pool)
    _assert_same(_step(norm, pool, y, True), _step(norm, pool, y, False), torch.float64)
    assert not can_fuse_norm_max_pool(_input((2, C, 9, 12), torch.float64), norm, pool)


@pytest.mark.parametrize("name", ["train", "eval"])
@pytest.mark.parametrize("layout", ["cropped_view", "channels_last"])
def test_non_contiguous_inputs(layout, name):
    """A cropped view (as a padded attention output cut back) and channels_last."""
    norm, pool = _norm(name, torch.float64), _pool(4)
    y = _input((2, C, 12, 12), torch.float64)
    y = y[:, :, :9, :7] if layout == "cropped_view" else y.to(memory_format=torch.channels_last)
    assert not y.is_contiguous() and can_fuse_norm_max_pool(y, norm, pool)
    _assert_same(_step(norm, pool, y, True), _step(norm, pool, y, False), torch.float64)


def test_without_gradients():
    norm, pool, y = _norm("train", torch.float32), _pool(4), _input((2, C, 9, 7), torch.float32)
    ref = copy.deepcopy(norm)
    with torch.no_grad():
        torch.testing.assert_close(norm_max_pool(y, norm, pool), pool(ref(y)))
    torch.testing.assert_close(norm.running_var, ref.running_var)


@pytest.mark.parametrize("name", ["train", "train_no_affine", "eval", "frozen"])
def test_gradcheck(name):
    """float64, nonzero weights (at a zero weight the scale's sign, so the argmax, jumps)."""
    norm, pool = _norm(name, torch.float64), _pool(2)
    if norm.weight is not None:
        with torch.no_grad():
            norm.weight[WEIGHT.index(0.0)] = 0.75
    y = _input((2, C, 5, 3), torch.float64).requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for _, p in norm.named_parameters()]
    names = [n for n, _ in norm.named_parameters()]

    def fused(y, *params):
        return _call_fused(norm, pool, y, dict(zip(names, params)))

    assert torch.autograd.gradcheck(fused, (y, *params))


def _call_fused(norm, pool, y, tensors):
    """``norm_max_pool`` with the norm's parameters replaced by ``tensors`` (on a copy)."""
    norm = copy.deepcopy(norm)
    for name, tensor in tensors.items():
        delattr(norm, name)
        setattr(norm, name, tensor)
    return norm_max_pool(y, norm, pool)


class _Allocations(TorchDispatchMode):
    """The number of elements of every new storage an aten op returns (not views, not results
    written in place)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _storage(t) not in seen:
                seen.add(_storage(t))
                self.numels.append(t.untyped_storage().nbytes() // t.element_size())
        return out


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", ["train", "eval", "frozen"])
def test_backward_keeps_no_normalised_tensor_and_allocates_one(name):
    """Saved for backward at full resolution: ``y`` itself with batch statistics, nothing with
    running ones (the unfused path keeps the normalised tensor too); the backward returns
    ``y``'s gradient and allocates no other full-resolution tensor."""
    norm, pool = _norm(name, torch.float32), _pool(4)
    y = _input((2, C, 16, 12), torch.float32).requires_grad_(True)
    saved = {True: [], False: []}
    for fused in (True, False):

        def pack(t, fused=fused):
            if t.numel() >= y.numel():
                saved[fused].append(t.data_ptr() == y.data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = norm_max_pool(y, copy.deepcopy(norm), pool) if fused else pool(norm(y))
        if fused:
            fused_out = out
    assert saved[True] == ([True] if NORMS[name][2] and name != "frozen" else [])
    assert False in saved[False]  # the unfused path keeps a normalised full-resolution tensor
    with _Allocations() as allocations:
        torch.autograd.grad(fused_out, y, torch.ones_like(fused_out))
    assert sum(n >= y.numel() for n in allocations.numels) == 1, allocations.numels


class _SubclassBatchNorm(nn.BatchNorm2d):
    pass


@pytest.mark.parametrize(
    "norm",
    [
        nn.GroupNorm(2, C),
        nn.Identity(),
        _SubclassBatchNorm(C),
        nn.SyncBatchNorm(C),  # in training mode: synchronised batch statistics
        nn.BatchNorm2d(C + 1),
        nn.InstanceNorm2d(C, affine=True),
    ],
    ids=lambda m: type(m).__name__ + (str(m.num_features) if hasattr(m, "num_features") else ""),
)
def test_other_norms_run_unfused_with_identical_results(norm):
    norm, pool = norm.double().train(), _pool(4)
    y = _input((2, C, 9, 7), torch.float64)
    assert not can_fuse_norm_max_pool(y, norm, pool)
    if isinstance(norm, nn.SyncBatchNorm) or getattr(norm, "num_features", C) != C:
        return  # no process group / a wrong width: fallback, so the module's own error
    got, want = _step(norm, pool, y, True), _step(norm, pool, y, False)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=0, atol=0)


@pytest.mark.parametrize(
    "pool, y",
    [
        (nn.MaxPool2d(3, 2, ceil_mode=True), _input((1, C, 8, 8), torch.float64)),
        (nn.MaxPool2d(2, 2, padding=1, ceil_mode=True), _input((1, C, 8, 8), torch.float64)),
        (nn.MaxPool2d(2, 2, dilation=2), _input((1, C, 8, 8), torch.float64)),
        (nn.AvgPool2d(2, 2), _input((1, C, 8, 8), torch.float64)),
        (nn.MaxPool2d(2, 2), _input((1, C, 7, 8), torch.float64)),  # floor mode, odd side
        (_pool(2), _input((1, C, 8, 8), torch.float32)),  # norm is float64
        (_pool(2), _input((1, C, 1, 1), torch.float64)),  # one value per channel: BN's error
    ],
    ids=["overlap", "padding", "dilation", "avg", "floor_odd", "dtype", "one_value"],
)
def test_other_pools_and_inputs_run_unfused(pool, y):
    norm = _norm("train", torch.float64)
    assert not can_fuse_norm_max_pool(y, norm, pool)
    if y.dtype != torch.float64 or y.numel() == C:
        with pytest.raises((RuntimeError, ValueError)):
            norm_max_pool(y, norm, pool)
        return
    got, want = _step(norm, pool, y, True), _step(norm, pool, y, False)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


@pytest.mark.parametrize("where", ["norm_forward", "pool_forward_pre", "global_forward"])
def test_modules_with_hooks_run_unfused(where):
    """Hooks on the norm or the pool (or global ones) still run."""
    norm, pool, y = _norm("train", torch.float64), _pool(4), _input((2, C, 9, 7), torch.float64)
    calls = []
    if where == "norm_forward":
        handle = norm.register_forward_hook(lambda *args: calls.append(where))
    elif where == "pool_forward_pre":
        handle = pool.register_forward_pre_hook(lambda *args: calls.append(where))
    else:
        handle = nn.modules.module.register_module_forward_hook(lambda *a: calls.append(where))
    try:
        assert not can_fuse_norm_max_pool(y, norm, pool)
        norm_max_pool(y, norm, pool)
        assert calls and calls[0] == where
    finally:
        handle.remove()
    assert can_fuse_norm_max_pool(y, norm, pool)


def _stem(dtype, seed=0):
    torch.manual_seed(seed)
    stem = SpatiallyAwareAttentionStem(3, 8, num_heads=2, num_value_mixtures=3).to(dtype)
    with torch.no_grad():  # negative, zero and positive scales; random running statistics
        stem.norm.weight.copy_(torch.tensor([1.0, -0.5, 0.0, 2.0, -1.5, 0.25, 1.0, -3.0]))
        stem.norm.bias.normal_()
        stem.norm.running_mean.normal_()
        stem.norm.running_var.uniform_(0.5, 2.0)
    return stem


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("size", [(2, 16, 12), (1, 18, 13)], ids=lambda s: "x".join(map(str, s)))
def test_whole_stem_matches_the_unfused_stem(size, training, dtype):
    stem = _stem(dtype).train(training)
    unfused = copy.deepcopy(stem)
    n, h, w = size
    x = _input((n, 3, h, w), dtype)
    results = []
    for module, forward in (
        (stem, stem),
        (unfused, lambda t: unfused.pool(unfused.norm(unfused.attention(t)))),
    ):
        x_ = x.detach().clone().requires_grad_(True)
        out = forward(x_)
        gen = torch.Generator().manual_seed(1)
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
        names, params = zip(*module.named_parameters())
        grads = torch.autograd.grad(out, (x_, *params), grad)
        results.append((out, dict(zip(("x",) + names, grads)), dict(module.named_buffers())))
    (out, grads, buffers), (ref_out, ref_grads, ref_buffers) = results
    tol = TOLERANCES[dtype] if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref_out, **tol)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)
        assert ref_grads[name].abs().max() > 0, name
    for name in ref_buffers:
        torch.testing.assert_close(buffers[name], ref_buffers[name], **tol, msg=name)


def test_stem_state_dict_keys_and_attributes_unchanged():
    stem = _stem(torch.float32)
    assert isinstance(stem.norm, nn.BatchNorm2d) and isinstance(stem.pool, nn.MaxPool2d)
    assert sorted(k for k in stem.state_dict() if k.startswith(("norm", "pool"))) == [
        "norm.bias",
        "norm.num_batches_tracked",
        "norm.running_mean",
        "norm.running_var",
        "norm.weight",
    ]


def test_stem_with_frozen_and_group_norm():
    for norm_layer in (FrozenBatchNorm2d, lambda c: nn.GroupNorm(2, c), None):
        torch.manual_seed(0)
        stem = SpatiallyAwareAttentionStem(3, 8, num_heads=2, norm_layer=norm_layer).double()
        x = _input((2, 3, 10, 9), torch.float64)
        with torch.no_grad():
            want = stem.pool(stem.norm(stem.attention(x)))
            torch.testing.assert_close(stem(x), want, rtol=1e-12, atol=1e-12)
