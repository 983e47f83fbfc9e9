"""Every detection config builds its full-size model on the CPU, trains a step and predicts."""

import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tests.helpers.modeling import ROOT, GradientAudit, base_cfg, detection_inputs

CONFIGS = sorted(
    glob.glob(os.path.join(ROOT, "configs", "COCO-Detection", "*.yaml"))
    + glob.glob(os.path.join(ROOT, "configs", "Demo", "*.yaml"))
)
OURS = [
    "retinanet_sasa26",
    "retinanet_sasa38",
    "retinanet_sasa50",
    "retinanet_sasa50_full_attention",
    "retinanet_sasa50_attention_fpn_head",
] + [f"retinanet_san{d}_{t}" for d in (10, 15, 19) for t in ("pairwise", "patchwise")]


def _name(path):
    return os.path.splitext(os.path.basename(path))[0]


def test_all_issue_configs_exist():
    names = {_name(p) for p in CONFIGS}
    assert set(OURS) <= names, sorted(set(OURS) - names)


def load(path):
    cfg = base_cfg()
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[_name(p) for p in CONFIGS])
def test_config_trains_a_step_and_predicts(path):
    cfg = load(path)
    model = build_model(cfg)
    # SAN's reflection padding needs res5 of 4x4 or more, and P7's attention a P6 larger than
    # 1x1 for gradients to reach its queries, keys and embeddings; the others run on 64x64.
    big = cfg.MODEL.BACKBONE.NAME.endswith("san_fpn_backbone") or cfg.MODEL.FPN.ATTENTION
    size = 128 if big else 64
    inputs = detection_inputs(size, num_classes=cfg.MODEL.RETINANET.NUM_CLASSES)  # 2nd: no boxes
    model.train()
    audit = GradientAudit(model)
    with EventStorage(0):
        losses = model(inputs)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    # Zero-initialised residual norms stop their branch's gradient at initialisation.
    zero_init = "sasa" in cfg.MODEL.BACKBONE.NAME and cfg.MODEL.SASA.ZERO_INIT_RESIDUAL
    audit.check(nonzero=not zero_init)

    model.eval()
    with torch.no_grad():
        results = model([{"image": x["image"], "height": size, "width": size} for x in inputs])
    assert len(results) == 2
    for r in results:
        inst = r["instances"]
        assert inst.image_size == (size, size)
        assert {"pred_boxes", "scores", "pred_classes"} <= set(inst.get_fields())
        assert torch.isfinite(inst.pred_boxes.tensor).all()


@pytest.mark.parametrize("name", ["retinanet_sasa50", "retinanet_san10_pairwise"])
def test_config_trains_from_scratch(name):
    cfg = load(os.path.join(ROOT, "configs", "COCO-Detection", f"{name}.yaml"))
    assert cfg.MODEL.WEIGHTS == ""
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.MODEL.META_ARCHITECTURE == "SanDetRetinaNet"
    norm = cfg.MODEL.SASA.NORM if "sasa" in name else cfg.MODEL.SAN.NORM
    assert norm == "SyncBN"
