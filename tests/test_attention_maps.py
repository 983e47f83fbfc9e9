"""Attention-map capture (san_det.attention_maps) against the operators' reference outputs, and
tools/visualize_attention.py end to end on a tiny demo-config model."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import san_det  # noqa: F401
from san_det.attention_maps import (
    LABEL_HEIGHT,
    AttentionCapture,
    attention_layers,
    local_attention_weights,
    render_attention_png,
    resolve_attention_layer,
)
from san_det.layers import SAM, LocalSelfAttention2d, local_attention_reference
from san_det.layers.backend import use_backend
from san_det.layers.ops import neighbourhood

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/Demo/shapes_retinanet.yaml"


def _all_pixels(h, w):
    return [(i, j) for i in range(h) for j in range(w)]


@pytest.mark.parametrize("kernel_size,dilation", [(3, 1), (5, 2)])
def test_local_attention_weights_match_reference(kernel_size, dilation):
    """Weights recomputed at every pixel (borders and corners included) reproduce the reference
    operator's output, are 0 outside the image and sum to 1 over in-image neighbours."""
    torch.manual_seed(0)
    n, heads, h, w = 2, 2, 5, 6
    d = kernel_size * kernel_size + 1  # d >= k*k: the outputs determine the weights uniquely
    c = heads * d
    q, k, v = (torch.randn(n, c, h, w, dtype=torch.float64) for _ in range(3))
    rel = torch.randn(c, kernel_size, kernel_size, dtype=torch.float64)
    pixels = _all_pixels(h, w)
    weights, inside = local_attention_weights(
        q, k, rel, pixels, num_heads=heads, kernel_size=kernel_size, dilation=dilation
    )
    assert weights.shape == (n, len(pixels), heads, kernel_size, kernel_size)
    ref = local_attention_reference(
        q, k, v, rel, num_heads=heads, kernel_size=kernel_size, dilation=dilation
    )
    pad = (kernel_size // 2) * dilation
    span = 2 * pad + 1
    v_pad = torch.nn.functional.pad(v, (pad,) * 4)
    for t, (i, j) in enumerate(pixels):
        wt = weights[:, t]
        assert torch.all(wt[:, :, ~inside[t]] == 0)
        torch.testing.assert_close(
            wt.sum(dim=(-1, -2)), torch.ones(n, heads, dtype=torch.float64), rtol=0, atol=1e-12
        )
        window = v_pad[:, :, i : i + span : dilation, j : j + span : dilation]
        window = window.reshape(n, heads, d, kernel_size, kernel_size)
        out = (wt.unsqueeze(2) * window).sum(dim=(-1, -2)).reshape(n, c)
        torch.testing.assert_close(out, ref[:, :, i, j], rtol=0, atol=1e-12)
        # Direct comparison: solve the reference's outputs for the in-image weights.
        vin = window[..., inside[t]]  # (N, heads, d, taps inside)
        solved = torch.linalg.lstsq(vin, ref[:, :, i, j].reshape(n, heads, d, 1)).solution
        torch.testing.assert_close(wt[..., inside[t]], solved[..., 0], rtol=0, atol=1e-9)


def test_local_attention_weights_are_softmax_of_q_dot_k_plus_r():
    """One pixel by hand: softmax over the in-image taps of q . (k + r) per head."""
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    rel = torch.randn(4, 3, 3)
    weights, inside = local_attention_weights(q, k, rel, [(0, 2)], num_heads=2, kernel_size=3)
    # pixel (0, 2): taps (a, b) inside are rows a in {1, 2}, columns b in {0, 1}
    expected_inside = torch.tensor([[0, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(inside[0], expected_inside)
    for head in range(2):
        ch = slice(2 * head, 2 * head + 2)
        logits = {}
        for a in (1, 2):
            for b in (0, 1):
                key = k[0, ch, a - 1, 2 + b - 1] + rel[ch, a, b]
                logits[a, b] = float((q[0, ch, 0, 2] * key).sum())
        z = sum(np.exp(list(logits.values())))
        for (a, b), logit in logits.items():
            assert weights[0, 0, head, a, b].item() == pytest.approx(np.exp(logit) / z, rel=1e-5)


def test_local_attention_weights_bad_input():
    q = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="outside the 3x3"):
        local_attention_weights(q, q, None, [(3, 0)], num_heads=2, kernel_size=3)
    with pytest.raises(ValueError, match="num_heads"):
        local_attention_weights(q, q, None, [(0, 0)], num_heads=3, kernel_size=3)
    with pytest.raises(ValueError, match="same shape"):
        local_attention_weights(q, q[:, :2], None, [(0, 0)], num_heads=2, kernel_size=3)


@pytest.mark.parametrize("stride", [1, 2])
def test_capture_sasa_layer_reproduces_its_output(stride):
    """Hooked weights of a LocalSelfAttention2d layer (float64), applied to its own values,
    give the layer's output (before its average pool)."""
    torch.manual_seed(2)
    layer = LocalSelfAttention2d(6, 8, kernel_size=5, num_heads=2, stride=stride).double()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1).double(), layer)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    pre_pool = {}
    layer.pool.register_forward_hook(lambda m, i, o: pre_pool.setdefault("x", i[0]))
    with AttentionCapture(model, "1") as capture:
        model(x)
    assert capture.grid_size == (7, 6)
    pixels = _all_pixels(7, 6)
    feats = model[0](x)
    v = torch.nn.functional.pad(layer.value(feats), (2,) * 4)
    for b in range(2):
        maps = capture.maps(pixels, batch_index=b)
        for amap in maps:
            i, j = amap.pixel
            assert amap.weights.shape == (2, 5, 5)
            window = v[b, :, i : i + 5, j : j + 5].reshape(2, 4, 5, 5)
            out = (amap.weights.unsqueeze(1) * window).sum(dim=(-1, -2)).reshape(8)
            torch.testing.assert_close(out, pre_pool["x"][b, :, i, j], rtol=0, atol=1e-10)
    # the hook is removed on exit
    model(x)
    assert len(capture.calls) == 1


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
def test_capture_san_module_reproduces_its_output(sa_type, pad_mode):
    """Captured SAM weights, aggregated over the neighbourhood of beta(x), give SAM's output;
    pairwise weights are a softmax over the k*k taps."""
    torch.manual_seed(3)
    sam = SAM(sa_type, 8, 2, 8, 4, kernel_size=3, pad_mode=pad_mode).double().eval()
    model = torch.nn.Sequential(sam)
    x = torch.randn(1, 8, 5, 4, dtype=torch.float64)
    with AttentionCapture(model, "0") as capture:
        out = model(x)
    maps = capture.maps(_all_pixels(5, 4))
    beta = neighbourhood(sam.conv3(x), 3, 1, 1, 1, pad_mode)  # (1, 8, 9, L)
    for amap in maps:
        i, j = amap.pixel
        assert amap.weights.shape == (2, 3, 3)
        w = amap.weights.reshape(2, 9)
        if sa_type == "pairwise":
            torch.testing.assert_close(w.sum(-1), torch.ones(2, dtype=torch.float64))
            assert amap.kind == "san_pairwise" and bool((w > 0).all())
        groups = torch.arange(8) % 2
        agg = (w[groups] * beta[0, :, :, i * 4 + j]).sum(-1)
        torch.testing.assert_close(agg, out[0, :, i, j], rtol=0, atol=1e-10)


def test_resolve_layer_names():
    model = torch.nn.Sequential(
        torch.nn.Sequential(LocalSelfAttention2d(4, 4, 3, 2), torch.nn.ReLU()),
        torch.nn.Sequential(LocalSelfAttention2d(4, 4, 3, 2), LocalSelfAttention2d(4, 4, 3, 2)),
    )
    assert list(attention_layers(model)) == ["0.0", "1.0", "1.1"]
    assert resolve_attention_layer(model, "0")[0] == "0.0"  # a wrapper of one layer
    with pytest.raises(ValueError, match="holds 2 attention layers"):
        resolve_attention_layer(model, "1")
    with pytest.raises(ValueError, match="not a module"):
        resolve_attention_layer(model, "2.0")
    with pytest.raises(ValueError, match="holds no SASA or SAN"):
        resolve_attention_layer(model, "0.1")
    with AttentionCapture(model, "1.1") as capture:
        pass
    with pytest.raises(RuntimeError, match="was not called"):
        capture.maps([(0, 0)])


def test_render_size_and_content(tmp_path):
    torch.manual_seed(4)
    layer = LocalSelfAttention2d(3, 8, kernel_size=3, num_heads=4)
    x = torch.randn(1, 3, 8, 8)
    with AttentionCapture(layer, "") as capture:
        layer(x)
    maps = capture.maps([(0, 0), (4, 5)])
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    path = tmp_path / "maps.png"
    size = render_attention_png(image, maps, str(path), pixel_size=4.0, panel_size=64)
    assert size == ((1 + 4) * 64, 2 * (64 + LABEL_HEIGHT))
    with Image.open(path) as png:
        assert png.size == size
        pixels = np.asarray(png.convert("RGB"))
    # every head panel is coloured by the overlay (not just the grey image)
    for head in range(4):
        panel = pixels[LABEL_HEIGHT : 64 + LABEL_HEIGHT, (1 + head) * 64 : (2 + head) * 64]
        assert (np.abs(panel.astype(int) - 200).sum(-1) > 30).mean() > 0.1
    size = render_attention_png(image, maps[:1], str(path), pixel_size=4.0, panel_size=64,
                                max_groups=2)  # fmt: skip
    assert size == (3 * 64, 64 + LABEL_HEIGHT)


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "visualize_attention", ROOT / "tools/visualize_attention.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_end_to_end_on_demo_model(tmp_path, capsys):
    """The demo config's model (random init, saved as a checkpoint): --list-layers, then a PNG
    of the expected size for two pixels of a res3 layer; bad pixels and layers give errors."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from san_det.config import setup_cfg

    tool = _load_tool()
    cfg = setup_cfg(str(DEMO), ["OUTPUT_DIR", str(tmp_path)])
    torch.manual_seed(5)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_random")
    weights = str(tmp_path / "model_random.pth")
    image = np.random.default_rng(0).integers(0, 255, (100, 140, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.jpg")
    common = ["--config-file", str(DEMO)]
    opts = ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path)]

    assert tool.main(common + ["--list-layers"] + opts) == 0
    listed = capsys.readouterr().out
    assert "backbone.bottom_up.res3.0.conv2.attention" in listed
    assert "4 heads" in listed

    out = tmp_path / "attn.png"
    args = common + ["--input", str(tmp_path / "img.jpg"), "--layer",
                     "backbone.bottom_up.res3.0.conv2", "--pixels", "10,20", "99,139",
                     "--panel-size", "96", "--output", str(out)] + opts  # fmt: skip
    assert tool.main(args) == 0
    with Image.open(out) as png:
        assert png.size == ((1 + cfg.MODEL.SASA.NUM_HEADS) * 96, 2 * (96 + LABEL_HEIGHT))

    bad_pixel = [a if a != "99,139" else "100,5" for a in args]
    with pytest.raises(SystemExit) as e:
        tool.main(bad_pixel)
    assert e.value.code == 2
    assert "--pixels" in capsys.readouterr().err
    bad_layer = [a if a != "backbone.bottom_up.res3.0.conv2" else "backbone.nope" for a in args]
    with pytest.raises(SystemExit):
        tool.main(bad_layer)
    assert "not a module" in capsys.readouterr().err
    folder = [a if a != str(out) else str(tmp_path) for a in args]  # --output <a folder>
    with pytest.raises(SystemExit) as e:
        tool.main(folder)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip() == (
        f"visualize_attention.py: error: --output {tmp_path} is a folder: name the PNG file to "
        "write in it"
    )


@pytest.mark.slow
def test_tool_command_line_help():
    """The script runs as a command (imports, argument parser)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools/visualize_attention.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--list-layers" in result.stdout and "--pixels" in result.stdout


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_tool_on_a_san_model(tmp_path, capsys, sa_type):
    """A narrow SAN10 RetinaNet (random init): SAM modules are listed with their channel
    groups and drawn one panel per group (capped by --max-groups)."""
    tool = _load_tool()
    config = str(ROOT / f"configs/COCO-Detection/retinanet_san10_{sa_type}.yaml")
    opts = ["MODEL.DEVICE", "cpu", "MODEL.SAN.BASE_WIDTH", "32", "MODEL.SAN.NORM", "BN",
            "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.RETINANET.NUM_CONVS", "1",
            "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
            "OUTPUT_DIR", str(tmp_path)]  # fmt: skip
    assert tool.main(["--config-file", config, "--list-layers"] + opts) == 0
    listed = capsys.readouterr().out
    # layer1 (stride 4) has width 128: SAM output 32 channels, 32 / 8 = 4 channel groups
    assert f"backbone.bottom_up.layer1.0.sam  SAN {sa_type} SAM" in listed
    assert "k=7, 4 channel groups" in listed
    Image.fromarray(np.full((128, 160, 3), 90, dtype=np.uint8)).save(tmp_path / "img.png")
    out = tmp_path / "san.png"
    args = ["--config-file", config, "--input", str(tmp_path / "img.png"), "--layer",
            "backbone.bottom_up.layer1.0", "--pixels", "0,0", "64,80", "--panel-size", "64",
            "--max-groups", "3", "--output", str(out)] + opts  # fmt: skip
    assert tool.main(args) == 0
    printed = capsys.readouterr().out
    assert "per channel group" in printed and "image px per grid pixel" in printed
    with Image.open(out) as png:
        assert png.size == ((1 + 3) * 64, 2 * (64 + LABEL_HEIGHT))


class _RecordAttentionOp(TorchDispatchMode):
    """Records the probabilities every ``san_det::local_attention`` call returns."""

    def __init__(self):
        super().__init__()
        self.probabilities = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.san_det.local_attention.default:
            self.probabilities.append(out[1])
        return out


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sasa_maps_are_the_probabilities_of_the_layers_forward(backend, dtype):
    """The captured weights are exactly (bit for bit) the probabilities the layer's own op
    computed during its forward, at every pixel, on the backend the layer ran on."""
    torch.manual_seed(6)
    layer = LocalSelfAttention2d(6, 8, kernel_size=5, num_heads=2, dilation=2).to(dtype)
    x = torch.randn(2, 6, 7, 6, dtype=dtype)
    with use_backend(backend):
        with AttentionCapture(layer, "") as capture, _RecordAttentionOp() as recorded:
            layer(x)
        assert len(recorded.probabilities) == 1
        attn = recorded.probabilities[0]  # (N, heads, H, k*k, W)
        for b in range(2):
            for amap in capture.maps(_all_pixels(7, 6), batch_index=b):
                i, j = amap.pixel
                expected = attn[b, :, i, :, j].reshape(2, 5, 5).to(dtype)
                assert torch.equal(amap.weights, expected), (b, i, j)
