"""torch.compile, torch.export and torch.jit.trace of san_det's attention layers and models.

The attention ops are registered PyTorch ops, so compilers and tracers keep them as single nodes
(``torch.ops.san_det.*``). Every compiled or exported program is checked against eager mode,
forward and every gradient, in float64. Inductor compiles each generated kernel with g++ (about
17 for one SASA layer, 40 with two SAMs: minutes on this CPU), so one small graph goes through
inductor and the modules (SASA layer, SASA bottleneck, pairwise and patchwise SAM) through
``aot_eager``: dynamo + AOTAutograd with the ops' fake and autograd registrations, without the
code generation.
"""

import pytest
import torch
from detectron2.export import TracingAdapter
from detectron2.modeling import build_backbone, build_model
from tests.helpers.modeling import ROOT
from torch import nn

from san_det.config import get_san_det_cfg
from san_det.layers import SAM, LocalSelfAttention2d, local_attention, use_backend
from san_det.layers.kernel_runtime import cpu_compiler_available
from san_det.modeling.sasa_resnet import AttentionBottleneckBlock

pytestmark = pytest.mark.slow

BACKENDS = ["reference"] + (["cpu"] if cpu_compiler_available() else [])


@pytest.fixture(autouse=True)
def _own_inductor_cache(tmp_path_factory, monkeypatch):
    """Inductor's on-disk graph cache does not see a change of an op's fake implementation (e.g.
    of an output layout): a cache shared with another san_det checkout would replay graphs
    compiled for its ops. Each test run compiles into a cache of its own."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor"))


def _random_norms(model: nn.Module) -> nn.Module:
    """Norm parameters away from their initial 1 / 0. At initialisation SAM's position channels
    (differences of pixel coordinates, often exactly 0) leave its first BatchNorm exactly 0, on
    the kink of the ReLU after it, where eager and compiled rounding pick different one-sided
    gradients."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
    return model


def _forward_backward(fn, model: nn.Module, x: torch.Tensor):
    """Output, input gradient and every parameter gradient of ``fn(x).square().sum()``."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.square().sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]


def _assert_same(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m: f"tensor {i}: {m}")


def test_inductor_fullgraph_matches_eager():
    """The ops inside inductor-generated code; also the stride-2 ceil-mode average pool, whose
    default (count_include_pad) backward inductor gets wrong (pytorch#198119)."""
    torch.manual_seed(0)
    model = LocalSelfAttention2d(8, 16, 3, 2, stride=2).double()
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True)
    want = _forward_backward(model, model, x)
    _assert_same(_forward_backward(compiled, model, x), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "module",
    [
        pytest.param(lambda: LocalSelfAttention2d(16, 16, 5, 4, stride=3, dilation=2), id="sasa"),
        pytest.param(lambda: SAM("pairwise", 16, 2, 8, 4, 3, 2, 2, pad_mode="zeros"), id="pair"),
        pytest.param(lambda: SAM("patchwise", 16, 2, 8, 4, 5, relation="star"), id="patch"),
        pytest.param(lambda: SAM("patchwise", 16, 2, 16, 4, 3), id="patch-official"),
        pytest.param(
            lambda: AttentionBottleneckBlock(
                16, 32, bottleneck_channels=8, stride=2, kernel_size=3, num_heads=2
            ),
            id="sasa-bottleneck",
        ),
    ],
)
def test_aot_eager_fullgraph_matches_eager(module, backend):
    torch.manual_seed(0)
    model = _random_norms(module()).double().train()
    x = torch.randn(2, 16, 7, 10, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with use_backend(backend):
        want = _forward_backward(model, model, x)
        got = _forward_backward(compiled, model, x)
    _assert_same(got, want)


def test_dynamic_shapes_compile_once():
    """One graph with symbolic sizes serves other image sizes (the fake implementations compute
    the output shapes)."""
    counts = {"compiles": 0}

    def backend(gm, example_inputs):
        counts["compiles"] += 1
        return gm

    def attention(q, k, v):
        return local_attention(q, k, v, None, num_heads=2, kernel_size=3)

    compiled = torch.compile(attention, fullgraph=True, dynamic=True, backend=backend)
    for h, w in [(5, 6), (7, 9), (4, 11)]:
        q, k, v = (torch.randn(1, 4, h, w, dtype=torch.float64) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), attention(q, k, v), rtol=0, atol=0)
    assert counts["compiles"] == 1


def _demo_cfg():
    cfg = get_san_det_cfg()
    cfg.merge_from_file(f"{ROOT}/configs/Demo/shapes_retinanet.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # an untrained model still detects something
    return cfg


def test_export_demo_backbone_matches_eager():
    torch.manual_seed(0)
    backbone = build_backbone(_demo_cfg()).eval()
    x = torch.randn(1, 3, 128, 96)
    program = torch.export.export(backbone, (x,))
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.san_det.local_attention.default) == 8  # one per SASA-26 block
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        want, got = backbone(x), program.module()(x)
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_jit_trace_demo_detector_with_tracing_adapter():
    """detectron2's TracingAdapter (flattened image in, boxes/scores/classes out) traces the
    detector, and the traced graph runs the attention ops on new images."""
    torch.manual_seed(0)
    model = build_model(_demo_cfg()).eval()
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 128, 128, generator=gen) * 255
    adapter = TracingAdapter(model, [{"image": image}])
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert kinds.count("san_det::local_attention") == 8
    other = torch.rand(3, 128, 128, generator=gen) * 255
    with torch.no_grad():
        want, got = adapter(other), traced(other)
    assert want[0].shape[0] > 0  # detections to compare
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
