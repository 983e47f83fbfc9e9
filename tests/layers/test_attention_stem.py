"""SpatiallyAwareAttentionStem against a per-pixel loop written from the paper's equations."""

import pytest
import torch

import san_det  # noqa: F401  (compat before detectron2)
from san_det.layers.attention_stem import SpatiallyAwareAttentionStem


def _naive_stem_attention(stem, x):
    """Attention output before norm/pool, one query pixel at a time (float64, slow, small)."""
    n, _, h, w = x.shape
    b, c, heads, d = stem.block_size, stem.out_channels, stem.num_heads, stem.head_dim
    wq = stem.query.weight[:, :, 0, 0]
    wk = stem.key.weight[:, :, 0, 0]
    wv = stem.value.weight[:, :, 0, 0].view(stem.num_value_mixtures, c, -1)
    out = torch.zeros(n, c, h, w, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            a0, b0 = i % b, j % b  # position inside the pool window
            keys = [
                (ki, kj)
                for ki in range(i - a0, min(i - a0 + b, h))
                for kj in range(j - b0, min(j - b0 + b, w))
            ]
            for bi in range(n):
                q = wq @ x[bi, :, i, j]
                logits = torch.zeros(heads, len(keys), dtype=x.dtype)
                values = torch.zeros(len(keys), c, dtype=x.dtype)
                for t, (ki, kj) in enumerate(keys):
                    k = wk @ x[bi, :, ki, kj]
                    pos = stem.emb_row[ki % b] + stem.emb_col[kj % b]
                    p = torch.softmax(stem.mixture @ pos, dim=0)  # (M,)
                    values[t] = (p[:, None, None] * wv).sum(0) @ x[bi, :, ki, kj]
                    dr, dc = ki - i + b - 1, kj - j + b - 1
                    for hd in range(heads):
                        half = d // 2
                        r = torch.cat(
                            [
                                stem.rel_row[hd * half : (hd + 1) * half, dr],
                                stem.rel_col[hd * half : (hd + 1) * half, dc],
                            ]
                        )
                        qh = q[hd * d : (hd + 1) * d]
                        kh = k[hd * d : (hd + 1) * d]
                        logits[hd, t] = qh @ (kh + r)
                attn = torch.softmax(logits, dim=1)
                for hd in range(heads):
                    head = slice(hd * d, (hd + 1) * d)
                    out[bi, head, i, j] = attn[hd] @ values[:, head]
    return out


@pytest.mark.parametrize("size", [(8, 8), (5, 7)])
def test_matches_naive_loop(size):
    torch.manual_seed(0)
    stem = SpatiallyAwareAttentionStem(3, 8, block_size=4, num_heads=2, num_value_mixtures=3)
    stem = stem.double()
    stem.norm = torch.nn.Identity()  # compare the attention itself; the pool is checked below
    stem.pool = torch.nn.Identity()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        expected = _naive_stem_attention(stem, x)
        got = stem(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_shape_pool_and_gradients():
    torch.manual_seed(0)
    stem = SpatiallyAwareAttentionStem(3, 16, block_size=4, num_heads=4)
    x = torch.randn(2, 3, 18, 13, requires_grad=True)
    y = stem(x)
    assert y.shape == (2, 16, 5, 4)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in stem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The output is the block max of the normalised attention output.
    stem.eval()
    with torch.no_grad():
        pre = stem.norm(_attention_only(stem, x))
        expected = torch.nn.functional.max_pool2d(pre, 4, 4, ceil_mode=True)
        torch.testing.assert_close(stem(x), expected)


def _attention_only(stem, x):
    pool, norm = stem.pool, stem.norm
    stem.pool, stem.norm = torch.nn.Identity(), torch.nn.Identity()
    try:
        return stem(x)
    finally:
        stem.pool, stem.norm = pool, norm


def test_values_depend_on_position_in_window():
    """A constant image gives position-dependent outputs only through the value mixture."""
    torch.manual_seed(0)
    stem = SpatiallyAwareAttentionStem(3, 8, block_size=4, num_heads=2).double()
    x = torch.ones(1, 3, 8, 8, dtype=torch.float64)
    out = _attention_only(stem, x)
    # Identical blocks give identical outputs...
    torch.testing.assert_close(out[..., :4, :4], out[..., 4:, 4:])
    # ...but pixels of a block differ (values are spatially aware).
    assert (out[0, :, 0, 0] - out[0, :, 1, 2]).abs().max() > 1e-6
    weights = stem.mixture_weights()
    assert weights.shape == (4, 4, stem.num_value_mixtures)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(out_channels=12, num_heads=8), "num_heads"),
        (dict(out_channels=24, num_heads=8), "even"),
        (dict(block_size=0), "block_size"),
        (dict(num_value_mixtures=0), "num_value_mixtures"),
        (dict(in_channels=2.0), "in_channels"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpatiallyAwareAttentionStem(**kwargs)


def test_bad_input_channels():
    stem = SpatiallyAwareAttentionStem(3, 16, num_heads=4)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        stem(torch.randn(1, 4, 8, 8))
