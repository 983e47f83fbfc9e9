"""Every shipped config loads (no unknown keys, no python eval tags) and builds its model on CPU."""

from pathlib import Path

import pytest
import torch

import san_det  # noqa: F401
from detectron2.modeling import build_model

from san_det.engine import setup_cfg

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
