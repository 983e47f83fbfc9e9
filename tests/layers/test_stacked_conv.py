"""stacked_conv1x1: the output and gradients of ``F.conv2d(x, torch.cat(weights))``, bit for bit,
without keeping the concatenated weights for the backward (nor does LocalSelfAttention2d)."""

import gc

import pytest
import torch
import torch.nn.functional as F

from san_det.layers import LocalSelfAttention2d, use_backend
from san_det.layers.stacked_conv import stacked_conv1x1


def _saved_storages(fn):
    """``fn()``'s result and the storages (data pointer -> shape) autograd saved while it ran."""
    saved = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _inputs(dtype, rows=(3, 5, 4), c_in=6):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, c_in, 7, 9, dtype=dtype, generator=gen)
    weights = [torch.randn(r, c_in, 1, 1, dtype=dtype, generator=gen) for r in rows]
    grad = torch.randn(2, sum(rows), 7, 9, dtype=dtype, generator=gen)
    return x, weights, grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, False, True),
                                   (True, False, False, False)])  # fmt: skip
def test_output_and_gradients_are_those_of_the_plain_expression(dtype, needs):
    """Weights of different heights (the gradient is split at the right rows), a batch of 2, some
    inputs without gradient; equal bit for bit (the same convolution and its own backward)."""
    x, weights, grad = _inputs(dtype)
    results = []
    for fn in (stacked_conv1x1, lambda x, ws: F.conv2d(x, torch.cat(ws))):
        leaves = [t.clone().requires_grad_(need) for t, need in zip([x, *weights], needs)]
        out = fn(leaves[0], leaves[1:])
        wanted = [t for t in leaves if t.requires_grad]
        results.append([out, *torch.autograd.grad(out, wanted, grad)])
    assert len(results[0]) == 1 + sum(needs)
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_saves_the_input_and_the_weights_not_their_concatenation():
    x, weights, _ = _inputs(torch.float32)
    x.requires_grad_()
    weights = [w.requires_grad_() for w in weights]
    out, saved = _saved_storages(lambda: stacked_conv1x1(x, weights))
    assert saved == {t.untyped_storage().data_ptr(): tuple(t.shape) for t in [x, *weights]}
    gc.collect()  # nor is a stacked copy kept alive another way while the output lives
    assert not [
        t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.shape == (12, 6, 1, 1)
    ]
    del out
    # while the plain expression keeps a stacked copy (what stacked_conv1x1 avoids)
    _, plain = _saved_storages(lambda: F.conv2d(x, torch.cat(weights)))
    assert (12, 6, 1, 1) in plain.values()


def test_traced_it_is_one_convolution_of_the_concatenation():
    x, weights, _ = _inputs(torch.float32)
    traced = torch.jit.trace(lambda x, *ws: stacked_conv1x1(x, ws), (x, *weights))
    kinds = {node.kind() for node in traced.graph.nodes()}
    assert "prim::PythonOp" not in kinds and "aten::cat" in kinds
    assert torch.equal(traced(x, *weights), F.conv2d(x, torch.cat(weights)))


@pytest.mark.parametrize("stride", [1, 2])
def test_attention_layer_keeps_no_stacked_projection_weight(stride):
    """What LocalSelfAttention2d saves for the backward: no (3C, C_in, 1, 1) copy of its weights,
    only the parameters themselves (gradients: test_single_projection_matches_three_projections
    in test_local_attention.py)."""
    layer = LocalSelfAttention2d(6, 8, kernel_size=3, num_heads=2, stride=stride)
    x = torch.randn(2, 6, 7, 9, requires_grad=True)
    with use_backend("reference"):
        out, saved = _saved_storages(lambda: layer(x))
    assert (24, 6, 1, 1) not in saved.values()
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    projections = [layer.query.weight, layer.key.weight, layer.value.weight]
    assert {w.untyped_storage().data_ptr() for w in projections} <= set(saved) & params
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
