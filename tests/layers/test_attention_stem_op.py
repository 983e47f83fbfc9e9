"""The registered op ``san_det::attention_stem`` against the stem's readable tensor-op reference
(:meth:`SpatiallyAwareAttentionStem.attention_reference`): forward and every gradient in float64
and float32, block multiples and not, batch 1 and 2, with and without the norm; opcheck,
torch.compile, torch.export; checkpoints written before the op."""

from pathlib import Path

import pytest
import torch

import san_det  # noqa: F401  (compat before detectron2)
from san_det.layers.attention_stem import SpatiallyAwareAttentionStem
from san_det.layers.ops import attention_stem as stem_op
from tests.helpers.skips import needs_cuda

FIXTURE = Path(__file__).parent / "fixtures" / "attention_stem_8c53a60.pt"
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}


def _stem(dtype, norm=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"out_channels": 8, "num_heads": 2, "num_value_mixtures": 3, **kwargs}
    norm_layer = torch.nn.BatchNorm2d if norm else None
    stem = SpatiallyAwareAttentionStem(3, norm_layer=norm_layer, **kwargs).to(dtype)
    with torch.no_grad():  # non-trivial norm affine, so that its gradients are checked too
        for p in stem.norm.parameters():
            p.add_(torch.randn_like(p))
    return stem


def _grads(stem, forward, x, grad_seed=1):
    """Output and the gradients of the input and of every parameter, by name."""
    x = x.detach().requires_grad_(True)
    out = forward(x)
    gen = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    names, params = zip(*stem.named_parameters())
    got = torch.autograd.grad(out, (x, *params), grad)
    return out, dict(zip(("input",) + names, got))


SIZES = [(1, 8, 8), (2, 8, 12), (2, 5, 7), (1, 18, 13), (2, 3, 2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no_norm"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_every_gradient_match_the_reference(size, norm, dtype):
    stem = _stem(dtype, norm).train()
    n, h, w = size
    x = torch.randn(n, 3, h, w, dtype=torch.float64).to(dtype)
    out, got = _grads(stem, stem, x)
    ref_out, want = _grads(stem, stem.forward_reference, x)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref_out, **tol)
    expected = {"input", "query.weight", "key.weight", "value.weight", "rel_row", "rel_col"}
    expected |= {"emb_row", "emb_col", "mixture"}
    expected |= {"norm.weight", "norm.bias"} if norm else set()
    assert set(got) == expected
    for name in got:
        torch.testing.assert_close(got[name], want[name], **tol, msg=name)
        assert want[name].abs().max() > 0, name  # every gradient is exercised


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_attention_alone_matches_the_reference_with_other_shapes(dtype):
    """Other block sizes, head counts and mixtures, before norm and pool (odd sizes)."""
    for kwargs, (h, w) in [
        (dict(block_size=3, num_heads=4, out_channels=16, num_value_mixtures=2), (7, 5)),
        (dict(block_size=2, num_heads=1, out_channels=4, num_value_mixtures=1), (5, 6)),
    ]:
        stem = _stem(dtype, norm=False, **kwargs)
        x = torch.randn(2, 3, h, w, dtype=torch.float64).to(dtype)
        out, got = _grads(stem, stem.attention, x)
        ref_out, want = _grads(stem, stem.attention_reference, x)
        torch.testing.assert_close(out, ref_out, **TOLERANCES[dtype])
        for name in got:
            torch.testing.assert_close(got[name], want[name], **TOLERANCES[dtype], msg=name)


def test_several_chunks(monkeypatch):
    """Images larger than one chunk (chunks of one block row, padded last row and column)."""
    monkeypatch.setattr(stem_op, "CHUNK_BLOCKS", 1)
    stem = _stem(torch.float64, norm=False)
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    out, got = _grads(stem, stem.attention, x)
    ref_out, want = _grads(stem, stem.attention_reference, x)
    torch.testing.assert_close(out, ref_out, **TOLERANCES[torch.float64])
    for name in got:
        torch.testing.assert_close(got[name], want[name], **TOLERANCES[torch.float64], msg=name)


def test_padded_pixels_are_masked_not_zero_keys():
    """Pixels beyond the image leave the softmax: zero-padding the image by hand (zero keys that
    take part) changes the border outputs."""
    stem = _stem(torch.float64, norm=False)
    small = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        got = stem.attention(small)
        torch.testing.assert_close(got, stem.attention_reference(small), rtol=1e-12, atol=1e-12)
        zero_keys = stem.attention(torch.nn.functional.pad(small, (0, 1, 0, 2)))[:, :, :6, :7]
    assert (got - zero_keys)[:, :, 4:].abs().max() > 1e-3
    torch.testing.assert_close(got[:, :, :4, :4], zero_keys[:, :, :4, :4])


def _op_args(dtype, requires_grad=True):
    stem = _stem(dtype, norm=False)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64).to(dtype)
    probs = stem.mixture_weights().detach().view(-1, stem.num_value_mixtures)
    weights = [stem.query.weight, stem.key.weight, stem.value.weight]
    tensors = [x] + [w.detach()[:, :, 0, 0] for w in weights]
    tensors += [stem.rel_row.detach(), stem.rel_col.detach(), probs]
    tensors = [t.clone().requires_grad_(requires_grad) for t in tensors]
    return (*tensors, stem.num_heads, stem.block_size)


def test_schema():
    schema = str(torch.ops.san_det.attention_stem.default._schema)
    assert schema == (
        "san_det::attention_stem(Tensor x, Tensor query_weight, Tensor key_weight, "
        "Tensor value_weight, Tensor rel_row, Tensor rel_col, Tensor mixture_probs, "
        'SymInt num_heads, SymInt block_size, str backend="auto") -> Tensor'
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck(dtype):
    """Schema, fake implementation, autograd registration and AOT dispatch (dynamic shapes)."""
    args = _op_args(dtype)
    torch.library.opcheck(torch.ops.san_det.attention_stem.default, args)
    grad_out = torch.randn(2, 8, 6, 7, dtype=dtype)
    detached = [a.detach() if torch.is_tensor(a) else a for a in args]
    for input_grad in (True, False):
        torch.library.opcheck(
            torch.ops.san_det.attention_stem_backward.default, (grad_out, *detached, input_grad)
        )


def test_parameter_gradients_without_the_input_gradient():
    """An image that needs no gradient (training): the parameters' gradients are unchanged."""
    stem = _stem(torch.float64, norm=False)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    for forward in (stem.attention, stem.attention_reference):
        out = forward(x)
        grads = torch.autograd.grad(out, list(stem.parameters()), torch.ones_like(out))
        if forward == stem.attention:
            got = grads
    for a, b in zip(got, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck_of_the_op():
    args = _op_args(torch.float64)
    assert torch.autograd.gradcheck(lambda *t: torch.ops.san_det.attention_stem(*t, 2, 4), args[:7])


@pytest.mark.slow
def test_compiled_and_exported_stem_match_eager():
    stem = _stem(torch.float32).eval()
    x = torch.randn(2, 3, 10, 9)
    with torch.no_grad():
        want = stem.forward_reference(x)
        compiled = torch.compile(stem, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), want, **TOLERANCES[torch.float32])
        exported = torch.export.export(stem, (x,))
    nodes = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.san_det.attention_stem.default in nodes
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), want, **TOLERANCES[torch.float32])


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    stem = _stem(torch.float32).train()
    x = torch.randn(2, 3, 8, 9)
    _, want = _grads(stem, stem.forward_reference, x)
    compiled = torch.compile(stem, backend="aot_eager", fullgraph=True)
    _, got = _grads(stem, compiled, x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOLERANCES[torch.float32], msg=name)


def test_checkpoint_written_before_the_op_loads_and_gives_the_same_outputs():
    """A double-precision stem saved by the tensor-op stem (main at 8c53a60, after one training
    step) and its outputs, in eval mode (the saved running statistics) and in training mode
    (batch statistics)."""
    saved = torch.load(FIXTURE, weights_only=True)
    stem = _stem(torch.float64, seed=5)
    stem.load_state_dict(saved["state_dict"])  # strict: same keys
    with torch.no_grad():
        torch.testing.assert_close(stem.eval()(saved["x"]), saved["eval_output"])
        torch.testing.assert_close(stem.train()(saved["x"]), saved["train_output"])


def test_bad_op_arguments():
    args = list(_op_args(torch.float64, requires_grad=False))
    with pytest.raises(ValueError, match=r"x must be \(N, C_in, H, W\)"):
        torch.ops.san_det.attention_stem(args[0][0], *args[1:])
    args[8] = 3  # block size: rel must be (C / 2, 2b - 1)
    with pytest.raises(ValueError, match="2b - 1"):
        torch.ops.san_det.attention_stem(*args)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cuda_matches_the_reference(dtype):
    """The op on a CUDA device (the same tensor operations) against the reference there."""
    stem = _stem(dtype).cuda().train()
    x = torch.randn(2, 3, 13, 10, dtype=dtype, device="cuda")
    out, got = _grads(stem, stem, x)
    ref_out, want = _grads(stem, stem.forward_reference, x)
    torch.testing.assert_close(out, ref_out, **TOLERANCES[dtype])
    for name in got:
        torch.testing.assert_close(got[name], want[name], **TOLERANCES[dtype], msg=name)
