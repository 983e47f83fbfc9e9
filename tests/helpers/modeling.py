"""Shared helpers of the modeling tests: small configs, detection inputs, gradient checks."""

import os

import torch

import san_det  # noqa: F401  (compat before detectron2)
import san_det.modeling  # noqa: F401  (registers the builders)
from san_det.config import get_san_det_cfg
from san_det.layers import SAM

from .paths import REPO_ROOT


ROOT = str(REPO_ROOT)


def config_path(name):
    """Absolute path of ``configs/COCO-Detection/<name>.yaml``."""
    return os.path.join(ROOT, "configs", "COCO-Detection", f"{name}.yaml")


def base_cfg():
    """san_det's default config on the CPU, everything trainable."""
    cfg = get_san_det_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return cfg


def _narrow_cfg(section: str, sizes: dict, overrides: dict):
    """base_cfg() with ``sizes``, all four stages as outputs and ``overrides`` (keyword arguments of
    the caller) set in ``cfg.MODEL.<section>``, and 32 FPN channels."""
    cfg = base_cfg()
    outputs = {"OUT_FEATURES": ["res2", "res3", "res4", "res5"]}
    for key, value in {**sizes, **outputs, **overrides}.items():
        setattr(cfg.MODEL[section], key, value)
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    return cfg


def tiny_sasa_cfg(**sasa):
    """A narrow SASA-26 (widths 16..128, 4 heads of even width) for quick forward/backward."""
    sizes = dict(DEPTH=26, STEM_OUT_CHANNELS=16, STEM_NUM_HEADS=4, RES2_OUT_CHANNELS=32)
    return _narrow_cfg("SASA", {**sizes, "WIDTH_PER_GROUP": 16, "NUM_HEADS": 4}, sasa)


def tiny_san_cfg(**san):
    """A narrow SAN10 (base width 32) for quick forward/backward."""
    return _narrow_cfg("SAN", {"DEPTH": 10, "BASE_WIDTH": 32}, san)


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


# Relative to the gradient mass reaching the conv's output, float32 rounding leaves about 1e-7 on
# a bias that cancels exactly; a bias that does not cancel gets 1e-2 or more.
CANCELLED_GRAD_RTOL = 1e-4


class GradientAudit:
    """Checks every trainable gradient after a backward pass, knowing which ones are exactly 0.

    With reflection padding every tap of a pairwise SAM reads a real pixel, so the bias of its
    position conv ``conv_p`` cancels in ``p_i - p_j``: its exact gradient is 0 and float rounding
    leaves noise whose sign and size depend on the CPU. Those biases are checked to be near zero
    (relative to the gradient reaching ``conv_p``'s output, recorded by hooks); every other
    parameter must get a finite and, if ``nonzero``, non-zero gradient.

    Create it before the forward pass, call :meth:`check` after ``backward()``.
    """

    def __init__(self, model):
        self.model = model
        self.output_grad_mass = {}  # "<sam>.conv_p.bias" -> sum |dL/d conv_p(out)|
        for name, module in model.named_modules():
            if isinstance(module, SAM) and module.sa_type == 0 and module.pad_mode == "reflect":
                module.conv_p.register_forward_hook(self._recorder(f"{name}.conv_p.bias"))

    def _recorder(self, key):
        def hook(_module, _inputs, output):
            if output.requires_grad:
                output.register_hook(lambda g: self._add(key, g))

        return hook

    def _add(self, key, grad):
        self.output_grad_mass[key] = self.output_grad_mass.get(key, 0.0) + grad.abs().sum().item()

    def check(self, nonzero=True):
        missing, bad, not_cancelled = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                missing.append(name)
            elif not torch.isfinite(p.grad).all():
                bad.append(name)
            elif name in self.output_grad_mass:
                if p.grad.abs().max() > CANCELLED_GRAD_RTOL * self.output_grad_mass[name]:
                    not_cancelled.append(name)
            elif nonzero and p.grad.abs().sum() == 0:
                bad.append(name)
        assert not missing, f"no gradient for {missing[:10]} ({len(missing)} in all)"
        assert not bad, f"zero or non-finite gradient for {bad[:10]} ({len(bad)} in all)"
        assert not not_cancelled, f"gradient should cancel to ~0 for {not_cancelled[:10]}"
