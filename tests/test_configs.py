"""Every shipped config loads (no unknown keys, no python eval tags) and builds its model on CPU."""

from pathlib import Path

import pytest
import torch

import san_det  # noqa: F401
from detectron2.modeling import build_model

from san_det.config import setup_cfg

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert "configs/COCO-Detection/Base-RetinaNet.yaml" in CONFIGS
    assert "configs/COCO-Detection/retinanet_R_50_FPN_1x.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_config_has_no_eval_tags(path):
    assert "!!python" not in (ROOT / path).read_text()


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds_model_on_cpu(path, tmp_path):
    cfg = setup_cfg(str(ROOT / path), ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path)])
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


FAMILY_LEAVES = [p for p in CONFIGS if "/retinanet_sa" in p or p.startswith("configs/ImageNet/sa")]


@pytest.mark.parametrize("path", FAMILY_LEAVES)
def test_family_leaf_states_only_what_differs(path):
    """SASA / SAN leaves sit on their family's base and set at most the depth, the SA type or
    stem, where attention is, and the output folder (TridentNet's leaves are about 6 lines)."""
    text = (ROOT / path).read_text()
    settings = [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    assert settings[0].startswith("_BASE_:"), path
    assert len(settings) <= 12, (path, settings)
    shared = ("META_ARCHITECTURE", "WEIGHTS", "NAME", "NORM", "OUT_FEATURES", "FREEZE_AT")
    for key in shared:  # these belong to the family's base
        assert not any(line.split(":")[0].strip() == key for line in settings), (path, key)
