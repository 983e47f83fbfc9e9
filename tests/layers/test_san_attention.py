"""SAM: every relation builds and trains, the official layout and parameter count, the forward
against an independent unfold statement of the official code, reference vs compiled backends."""

import pytest
import torch
import torch.nn.functional as F

import san_det  # noqa: F401  (patches before anything imports detectron2)
from san_det.layers.backend import use_backend
from san_det.layers.kernel_runtime import cpu_compiler_available
from san_det.layers.san_attention import PAIRWISE_RELATIONS, PATCHWISE_RELATIONS, SAM

ALL = [(0, r) for r in PAIRWISE_RELATIONS] + [(1, r) for r in PATCHWISE_RELATIONS]


def _ids(case):
    return ("pairwise-" if case[0] == 0 else "patchwise-") + case[1]


def _official_param_count(sa_type, in_planes, rel_planes, out_planes, share_planes, k):
    """Parameters of the official ``model/san.py`` SAM, written out by hand."""
    cw = out_planes // share_planes
    convs = 2 * (in_planes * rel_planes + rel_planes) + in_planes * out_planes + out_planes
    if sa_type == 0:
        gamma = 2 * (rel_planes + 2) + (rel_planes + 2) * rel_planes + 2 * rel_planes
        gamma += rel_planes * cw + cw
        return convs + gamma + 2 * 2 + 2  # conv_p
    in_ch = rel_planes * (k * k + 1)
    gamma = 2 * in_ch + in_ch * cw + 2 * cw + cw * k * k * cw + k * k * cw
    return convs + gamma


@pytest.mark.parametrize("sa_type", [0, 1])
@pytest.mark.parametrize("planes, k", [(64, 3), (256, 7), (2048, 7)])
def test_official_layout_and_parameter_count(sa_type, planes, k):
    # The official blocks: SAM(sa_type, planes, planes // 16, planes // 4, 8, k).
    m = SAM(sa_type, planes, planes // 16, planes // 4, 8, k)
    count = sum(p.numel() for p in m.parameters())
    assert count == _official_param_count(sa_type, planes, planes // 16, planes // 4, 8, k)
    rel, cw = planes // 16, planes // 4 // 8
    shapes = {name: tuple(t.shape) for name, t in m.state_dict().items()}
    assert shapes["conv1.weight"] == (rel, planes, 1, 1) and shapes["conv1.bias"] == (rel,)
    assert shapes["conv2.weight"] == (rel, planes, 1, 1) and shapes["conv2.bias"] == (rel,)
    assert shapes["conv3.weight"] == (planes // 4, planes, 1, 1)
    gamma_in = rel + 2 if sa_type == 0 else rel * (k * k + 1)
    gamma_mid = rel if sa_type == 0 else cw
    gamma_out = cw if sa_type == 0 else k * k * cw
    assert shapes["conv_w.0.running_mean"] == (gamma_in,)
    assert shapes["conv_w.2.weight"] == (gamma_mid, gamma_in, 1, 1)
    assert "conv_w.2.bias" not in shapes
    assert shapes["conv_w.3.weight"] == (gamma_mid,)
    assert shapes["conv_w.5.weight"] == (gamma_out, gamma_mid, 1, 1)
    assert shapes["conv_w.5.bias"] == (gamma_out,)
    assert ("conv_p.weight" in shapes) == (sa_type == 0)
    if sa_type == 0:
        assert shapes["conv_p.weight"] == (2, 2, 1, 1)
    prefixes = {name.split(".")[0] for name in shapes}
    expected = {"conv1", "conv2", "conv3", "conv_w"} | ({"conv_p"} if sa_type == 0 else set())
    assert prefixes == expected


@pytest.mark.parametrize("case", ALL, ids=_ids)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_relation_trains(case, stride):
    sa_type, relation = case
    torch.manual_seed(0)
    m = SAM(sa_type, 16, 4, 16, 8, 3, stride, relation=relation)
    x = torch.randn(2, 16, 7, 9, requires_grad=True)
    y = m(x)
    assert y.shape == (2, 16, 4, 5) if stride == 2 else (2, 16, 7, 9)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "conv_p.bias":  # exactly 0 in reflect mode: see the test below
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("relation", PAIRWISE_RELATIONS)
@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
def test_position_bias_cancels_exactly_with_reflection_padding(relation, pad_mode):
    """With reflection padding every tap reads a real pixel, so conv_p's bias cancels in
    p_i - p_j: the output does not depend on it and its exact gradient is 0 (float rounding leaves
    ~1e-16 relative in float64). Zero padding keeps it at the borders: a real gradient."""
    torch.manual_seed(0)
    m = SAM(0, 16, 4, 16, 8, 3, relation=relation, pad_mode=pad_mode).double()
    x = torch.randn(2, 16, 7, 9, dtype=torch.float64)
    mass = []  # sum |dL / d conv_p(grid)|: the scale the bias gradient is a sum over

    def record(_module, _inputs, out):
        out.register_hook(lambda g: mass.append(g.abs().sum().item()))

    hook = m.conv_p.register_forward_hook(record)
    m(x).square().mean().backward()
    hook.remove()
    relative = m.conv_p.bias.grad.abs().max().item() / mass[0]
    m.eval()
    with torch.no_grad():
        before = m(x)
        m.conv_p.bias.add_(0.5)
        change = (m(x) - before).abs().max().item()
    if pad_mode == "reflect":
        assert relative < 1e-12 and change < 1e-12, (relative, change)
    else:
        assert relative > 1e-3 and change > 1e-6, (relative, change)


# ------------------------------------------------------------------------------------ oracle
def _position(h, w, like):
    loc_w = torch.linspace(-1.0, 1.0, w, dtype=like.dtype).unsqueeze(0).repeat(h, 1)
    loc_h = torch.linspace(-1.0, 1.0, h, dtype=like.dtype).unsqueeze(1).repeat(1, w)
    return torch.cat([loc_w.unsqueeze(0), loc_h.unsqueeze(0)], 0).unsqueeze(0)


def _oracle(m, x):
    """The official SAM forward restated with nn.Unfold, plus the paper's other relations."""
    k, s, d, pad = m.kernel_size, m.stride, m.dilation, m.padding
    mode = "reflect" if m.pad_mode == "reflect" else "constant"

    def taps(t):  # (N, C, H, W) -> (N, C, k*k, L)
        cols = F.unfold(F.pad(t, [pad] * 4, mode=mode), k, dilation=d, stride=s)
        return cols.view(t.shape[0], t.shape[1], k * k, -1)

    def centre(t):  # (N, C, H, W) -> (N, C, 1, L)
        return F.unfold(t, 1, stride=s).view(t.shape[0], t.shape[1], 1, -1)

    n, _, h, w = x.shape
    x1, x2, x3 = m.conv1(x), m.conv2(x), m.conv3(x)
    if m.sa_type == 0:
        c1, n2 = centre(x1), taps(x2)
        delta = {
            "subtraction": lambda: c1 - n2,
            "summation": lambda: c1 + n2,
            "concatenation": lambda: torch.cat([c1.expand_as(n2), n2], 1),
            "hadamard": lambda: c1 * n2,
            "dot": lambda: (c1 * n2).sum(1, keepdim=True),
        }[m.relation]()
        p = m.conv_p(_position(h, w, x))
        pos = (centre(p) - taps(p)).repeat(n, 1, 1, 1)
        weights = torch.softmax(m.conv_w(torch.cat([delta, pos], 1)), dim=-2)
    else:
        c1, n2 = centre(x1), taps(x2)
        length = n2.shape[-1]
        if m.relation == "concatenation":
            delta = torch.cat([c1, n2.reshape(n, -1, 1, length)], 1)
        elif m.relation == "star":
            delta = (c1 * n2).sum(1).view(n, -1, 1, length)
        else:
            n1 = taps(x1)
            delta = (n1.unsqueeze(3) * n2.unsqueeze(2)).sum(1).reshape(n, -1, 1, length)
        weights = m.conv_w(delta).view(n, -1, k * k, length)
    values = taps(x3)
    cw = weights.shape[1]
    out = (values.view(n, -1, cw, k * k, values.shape[-1]) * weights.unsqueeze(1)).sum(3)
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    return out.reshape(n, -1, ho, wo)


@pytest.mark.parametrize("case", ALL, ids=_ids)
@pytest.mark.parametrize("pad_mode, stride", [("reflect", 1), ("zeros", 2)])
def test_forward_matches_official_statement(case, pad_mode, stride):
    sa_type, relation = case
    torch.manual_seed(1)
    m = SAM(sa_type, 8, 4, 16, 4, 3, stride, relation=relation, pad_mode=pad_mode).double()
    x = torch.randn(2, 8, 6, 7, dtype=torch.float64)
    with use_backend("reference"):
        got = m(x)
    torch.testing.assert_close(got, _oracle(m, x), rtol=0, atol=1e-12)


def _outputs_and_gradients(m, x, backends):
    """Per backend: ``y = m(x)`` and the gradients of ``sum(y ** 2)`` for ``x`` and every
    parameter of ``m``."""
    results = []
    for backend in backends:
        xb = x.clone().requires_grad_()
        m.zero_grad()
        with use_backend(backend):
            y = m(xb)
            y.square().sum().backward()
        results.append([y.detach(), xb.grad, *[p.grad.clone() for p in m.parameters()]])
    return results


@pytest.mark.skipif(not cpu_compiler_available(), reason="no C++ compiler")
@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_reference_and_cpu_backends_agree(case):
    sa_type, relation = case
    torch.manual_seed(2)
    m = SAM(sa_type, 8, 4, 16, 4, 3, 1, 2, relation=relation).double()
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64)
    results = _outputs_and_gradients(m, x, ("reference", "cpu"))
    for ref, cpu in zip(*results):
        torch.testing.assert_close(cpu, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_cuda_backend_matches_reference_and_runs_under_autocast(case):
    sa_type, relation = case
    torch.manual_seed(3)
    m = SAM(sa_type, 16, 4, 16, 4, 7, relation=relation).double().cuda()
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64, device="cuda")
    results = _outputs_and_gradients(m, x, ("reference", "cuda"))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    m.float()
    xf = x.float().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(xf)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert torch.isfinite(xf.grad).all()


def test_eval_mode_and_empty_batch():
    m = SAM(0, 16, 4, 16, 8, 7).eval()
    assert m(torch.randn(0, 16, 9, 9)).shape == (0, 16, 9, 9)
    m = SAM(1, 16, 4, 16, 8, 3, stride=2).eval()
    assert m(torch.randn(0, 16, 9, 9)).shape == (0, 16, 5, 5)


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_norm_layer_replaces_both_batch_norms(sa_type):
    m = SAM(sa_type, 16, 4, 16, 8, 3, norm_layer=lambda c: torch.nn.GroupNorm(2, c))
    norms = [m.conv_w[0], m.conv_w[3]]
    assert all(isinstance(n, torch.nn.GroupNorm) for n in norms)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    assert [n.num_channels for n in norms] == [m.conv_w[2].in_channels, m.conv_w[2].out_channels]
    y = m(torch.randn(2, 16, 5, 6))
    assert y.shape == (2, 16, 5, 6) and torch.isfinite(y).all()
    # The default is the official BatchNorm.
    assert isinstance(SAM(sa_type, 16, 4, 16, 8, 3).conv_w[0], torch.nn.BatchNorm2d)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sa_type"):
        SAM(2, 16, 4, 16, 8)
    with pytest.raises(ValueError, match="relation"):
        SAM(0, 16, 4, 16, 8, relation="star")
    with pytest.raises(ValueError, match="relation"):
        SAM("patchwise", 16, 4, 16, 8, relation="subtraction")
    with pytest.raises(ValueError, match="kernel_size"):
        SAM(0, 16, 4, 16, 8, kernel_size=4)
    with pytest.raises(ValueError, match="out_planes"):
        SAM(0, 16, 4, 4, 8)  # no attention-weight channel left
    with pytest.raises(ValueError, match="out_planes"):
        SAM(1, 16, 4, 9, 4)  # 9 output channels cannot share 2 weight channels
    with pytest.raises(ValueError, match="pad_mode"):
        SAM(0, 16, 4, 16, 8, pad_mode="circular")
    with pytest.raises(ValueError, match="rel_planes"):
        SAM(0, 16, 0, 16, 8)
    # Reflection padding must stay smaller than the feature map (the official constraint).
    with pytest.raises(ValueError, match="padding < H"):
        SAM(0, 16, 4, 16, 8, kernel_size=7)(torch.randn(1, 16, 3, 8))
    y = SAM(0, 16, 4, 16, 8, 7, pad_mode="zeros")(torch.randn(1, 16, 3, 8))
    assert y.shape == (1, 16, 3, 8)
