"""Shared helpers of the modeling tests: small configs, detection inputs, gradient checks."""

import os

import torch

import san_det  # noqa: F401  (compat before detectron2)
import san_det.modeling  # noqa: F401  (registers the builders)
from san_det.config import get_san_det_cfg


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_path(name):
    """Absolute path of ``configs/COCO-Detection/<name>.yaml``."""
    return os.path.join(ROOT, "configs", "COCO-Detection", f"{name}.yaml")


def base_cfg():
    """san_det's default config on the CPU, everything trainable."""
    cfg = get_san_det_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return cfg


def tiny_sasa_cfg(**sasa):
    """A narrow SASA-26 (widths 16..128, 4 heads of even width) for quick forward/backward."""
    cfg = base_cfg()
    s = cfg.MODEL.SASA
    s.DEPTH = 26
    s.STEM_OUT_CHANNELS = 16
    s.STEM_NUM_HEADS = 4
    s.RES2_OUT_CHANNELS = 32
    s.WIDTH_PER_GROUP = 16
    s.NUM_HEADS = 4
    s.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    for key, value in sasa.items():
        setattr(s, key, value)
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    return cfg


def tiny_san_cfg(**san):
    """A narrow SAN10 (base width 32) for quick forward/backward."""
    cfg = base_cfg()
    s = cfg.MODEL.SAN
    s.DEPTH = 10
    s.BASE_WIDTH = 32
    s.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    for key, value in san.items():
        setattr(s, key, value)
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    return cfg


def detection_inputs(size, num_images=2, num_classes=80):
    """``num_images`` images of ``size x size``: the first with two boxes, the others with none."""
    from detectron2.structures import Boxes, Instances

    generator = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(num_images):
        inst = Instances((size, size))
        if i == 0:
            boxes = torch.tensor(
                [[4.0, 6.0, 0.6 * size, 0.8 * size], [0.5 * size, 2.0, size - 1, 20.0]]
            )
            inst.gt_boxes = Boxes(boxes)
            inst.gt_classes = torch.tensor([0, num_classes - 1])
        else:
            inst.gt_boxes = Boxes(torch.zeros(0, 4))
            inst.gt_classes = torch.zeros(0, dtype=torch.long)
        image = torch.rand(3, size, size, generator=generator) * 255
        inputs.append({"image": image, "instances": inst, "height": size, "width": size})
    return inputs


def assert_trainable_grads(model, nonzero=True):
    """Every parameter that requires grad got a finite (and, if ``nonzero``, non-zero) gradient."""
    missing, bad = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            missing.append(name)
        elif not torch.isfinite(p.grad).all() or (nonzero and p.grad.abs().sum() == 0):
            bad.append(name)
    assert not missing, f"no gradient for {missing[:10]} ({len(missing)} in all)"
    assert not bad, f"zero or non-finite gradient for {bad[:10]} ({len(bad)} in all)"
