"""fvcore counts san_det's attention ops: exact formulas, any backend, no side effects."""

import pytest
import torch
from detectron2.modeling import build_backbone
from tests.helpers.modeling import tiny_sasa_cfg
from torch import nn

from san_det.layers import local_attention
from san_det.layers.attention_stem import SpatiallyAwareAttentionStem
from san_det.layers.backend import use_backend
from san_det.layers.kernel_runtime import cpu_compiler_available
from san_det.layers.local_attention import LocalSelfAttention2d
from san_det.layers.san_attention import SAM
from san_det.modeling.flop_handles import SanDetFlopCountAnalysis

# The fastest CPU backend when a compiler exists, and the reference everywhere.
BACKENDS = ["reference"] + (["cpu"] if cpu_compiler_available() else [])


def count(model, x):
    flops = SanDetFlopCountAnalysis(model.eval(), (x,))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    return flops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_local_self_attention(backend, stride):
    layer = LocalSelfAttention2d(12, 16, kernel_size=5, num_heads=4, stride=stride)
    x = torch.randn(2, 12, 9, 7)
    with use_backend(backend):
        flops = count(layer, x)
        ops = flops.by_operator()
    n, h, w = 2, 9, 7  # attention runs at full resolution, then the average pool
    assert ops["conv"] == 3 * n * 12 * 16 * h * w
    assert ops["local_attention"] == 2 * n * 16 * h * w * 5 * 5
    assert flops.total() == ops["conv"] + ops["local_attention"]


class _NoRelAttention(nn.Module):
    def forward(self, q):
        return local_attention(q, q, q, None, num_heads=2, kernel_size=3)


def test_local_attention_without_relative_embedding():
    flops = count(_NoRelAttention(), torch.randn(1, 8, 5, 6))
    assert flops.by_operator()["local_attention"] == 2 * 8 * 5 * 6 * 9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_sam_aggregation(backend, sa_type):
    sam = SAM(sa_type, 32, 2, 8, 8, kernel_size=3)
    x = torch.randn(2, 32, 6, 5)
    with use_backend(backend):
        ops = count(sam, x).by_operator()
    assert ops["aggregation"] == 2 * 8 * 9 * 6 * 5
    # phi, psi, beta (1x1 convs with bias) are counted by fvcore as usual, plus the MLP.
    assert ops["conv"] > 2 * (32 * 2 + 32 * 8 // 2) * 6 * 5


@pytest.mark.parametrize("size", [(16, 12), (15, 10)])
def test_attention_stem_is_counted_by_fvcore(size):
    """The op is counted as the tensor-op stem it replaced was (on the image padded to whole
    blocks): the q, k and M value projections, the value mixture, q . k, q . r, the weighted
    values; the mixture logits are an ordinary matmul outside the op."""
    stem = SpatiallyAwareAttentionStem(3, 16, block_size=4, num_heads=4, num_value_mixtures=3)
    n, (h, w) = 1, size
    ops = count(stem, torch.randn(n, 3, h, w)).by_operator()
    pixels = n * 16 * 12  # padded to multiples of 4
    projections = pixels * 3 * (16 + 16 + 3 * 16)  # q, k and the 3 value matrices
    assert ops["attention_stem"] == projections + pixels * 3 * 16 + 3 * pixels * 16 * 16
    assert ops["matmul"] == 4 * 4 * 16 * 3  # mixture logits (per window position)
    assert set(ops) == {"attention_stem", "matmul", "batch_norm"}


def test_whole_backbone_counts_every_attention_layer():
    model = build_backbone(_named(tiny_sasa_cfg(), "build_sasa_backbone")).eval()
    expected = []

    def hook(module, inputs, output):
        n, _, h, w = inputs[0].shape
        expected.append(2 * n * module.out_channels * h * w * module.kernel_size**2)

    layers = [m for m in model.modules() if isinstance(m, LocalSelfAttention2d)]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for handle in handles:
        handle.remove()
    ops = count(model, torch.randn(1, 3, 64, 64)).by_operator()
    assert len(expected) == 1 + 2 + 4 + 1  # one per block of SASA-26
    assert ops["local_attention"] == sum(expected)


def _named(cfg, name):
    cfg.MODEL.BACKBONE.NAME = name
    return cfg


def test_counting_traces_the_registered_ops_and_changes_nothing():
    """The ops are counted as the trace nodes they are (no patching): afterwards the layers
    compute the same outputs and train."""
    layer, sam = LocalSelfAttention2d(8, 8, 3, 2), SAM("pairwise", 16, 1, 8, 8, 3).eval()
    x, y = torch.randn(1, 8, 5, 5), torch.randn(1, 16, 5, 5)
    with torch.no_grad():
        expected = layer(x), sam(y)
    graph, _ = torch.jit._get_trace_graph(layer, (x,))
    assert "san_det::local_attention" in {node.kind() for node in graph.nodes()}
    assert count(layer, x).by_operator()["local_attention"] == 2 * 8 * 5 * 5 * 9
    ops = count(sam, y).by_operator()
    assert ops["aggregation"] == 8 * 9 * 5 * 5
    assert "subtraction2" not in ops and "subtraction" not in ops  # counted, as 0
    with torch.no_grad():
        got = layer(x), sam(y)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    layer(x).sum().backward()  # training works after an analysis
    assert layer.query.weight.grad is not None
