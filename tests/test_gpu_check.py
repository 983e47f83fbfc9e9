"""``make gpu-check`` (benchmarks/gpu_check.py) where no GPU is: it says so and fails; its code
runs on tiny CPU shapes; its FlexAttention formulation of SASA equals the reference."""

import json

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.flex_sasa import flex_local_attention, sasa_block_mask
from san_det.layers.ops import local_attention_reference

# (N, C, H, W, heads, kernel_size, dilation): odd sizes, windows larger than the image, dilation.
GEOMETRIES = [
    (2, 8, 7, 9, 2, 3, 1),
    (1, 6, 7, 9, 3, 5, 2),
    (1, 4, 4, 6, 4, 3, 5),
    (1, 4, 3, 2, 1, 7, 1),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)  # where results would go
    assert gpu_check.main([]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == gpu_check.NO_GPU and "\n" not in out.strip() and err == ""
    assert list(tmp_path.iterdir()) == []


def test_the_cpu_smoke_run_is_not_a_gpu_check(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu"])
    assert "--smoke and --out" in capsys.readouterr().err


def test_smoke_run_measures_every_case_and_checks_the_kernels(tmp_path):
    out = tmp_path / "smoke.json"
    assert gpu_check.main(["--device", "cpu", "--smoke", "--out", str(out), "--parts", "op",
                           "layer"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and "cuda_tests" not in report
    for mode in gpu_check.MODES:
        (op,) = report[f"op {mode}"].values()
        assert {"conv3x3", "sasa op (cpu)", "sasa op (reference)", "flex attention"} <= set(op)
        assert op["sasa op (cpu)"]["forward_backward_ms"] > 0
        (layer,) = report[f"layer {mode}"].values()
        assert layer["LocalSelfAttention2d"]["forward_backward_ms"] > 0
    differences = report["op float32"]["N1C16H9W11"]["max_abs_difference_kernels_vs_reference"]
    assert set(differences) == {"out", "grad_q", "grad_k", "grad_v", "grad_rel"}
    assert max(differences.values()) < 1e-4


@pytest.mark.parametrize("with_rel", [True, False])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "N{}C{}H{}W{}h{}k{}d{}".format(*g))
def test_flex_attention_formulation_equals_the_reference(geometry, with_rel):
    """The block mask (2-D window, dilation, image borders) and the score_mod (q . r from the
    table, tap indices) reproduce SASA's logits: FlexAttention's eager CPU forward equals the
    reference in float64."""
    n, c, h, w, heads, ks, dil = geometry
    g = torch.Generator().manual_seed(sum(geometry))
    q, k, v = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) for _ in range(3))
    rel = torch.randn(c, ks, ks, generator=g, dtype=torch.float64) * 2 if with_rel else None
    want = local_attention_reference(q, k, v, rel, num_heads=heads, kernel_size=ks, dilation=dil)
    got = flex_local_attention(q, k, v, rel, num_heads=heads, kernel_size=ks, dilation=dil)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_block_mask_keeps_exactly_the_window():
    """Query pixel (i, j) keeps the in-image pixels (i + (a - r) d, j + (b - r) d), nothing else."""
    h, w, ks, dil = 5, 7, 3, 2
    mask = sasa_block_mask(h, w, ks, dil, "cpu")
    q_idx, kv_idx = torch.meshgrid(torch.arange(h * w), torch.arange(h * w), indexing="ij")
    kept = mask.mask_mod(0, 0, q_idx, kv_idx)
    want = torch.zeros(h * w, h * w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            for a in range(ks):
                for b in range(ks):
                    y, x = i + (a - ks // 2) * dil, j + (b - ks // 2) * dil
                    if 0 <= y < h and 0 <= x < w:
                        want[i * w + j, y * w + x] = True
    assert torch.equal(kept, want)
