"""The recipe: LR scaling, epochs, weight decay groups, warm-up + cosine, Nesterov, EMA."""

import math

import pytest
import torch
from detectron2.solver import build_lr_scheduler
from torch import nn

from san_det.config import get_san_det_cfg
from san_det.classification.ema import ModelEMA
from san_det.classification.solver import (
    build_classification_optimizer,
    resolve_classification_schedule,
)
from san_det.layers import LocalSelfAttention2d
from tests.helpers.classification import DEMO_CONFIG
from tests.helpers.paths import config_path


def _cfg(**kv):
    """The demo config with iteration-based lengths, overridden by ``kv``."""
    cfg = get_san_det_cfg(DEMO_CONFIG)
    c = cfg.CLASSIFICATION.SOLVER
    c.EPOCHS = c.WARMUP_EPOCHS = c.EVAL_PERIOD_EPOCHS = c.CHECKPOINT_PERIOD_EPOCHS = 0
    cfg.merge_from_list([x for item in kv.items() for x in item])
    return cfg


def test_lr_scaling_and_epochs():
    cfg = _cfg(**{"SOLVER.IMS_PER_BATCH": 64, "SOLVER.BASE_LR": 0.1})
    cfg.CLASSIFICATION.SOLVER.EPOCHS = 3
    cfg.CLASSIFICATION.SOLVER.WARMUP_EPOCHS = 1
    cfg.CLASSIFICATION.SOLVER.EVAL_PERIOD_EPOCHS = 2
    cfg.CLASSIFICATION.SOLVER.CHECKPOINT_PERIOD_EPOCHS = 1
    out = resolve_classification_schedule(cfg, num_train_images=1000)
    assert out.SOLVER.BASE_LR == pytest.approx(0.1 * 64 / 256)
    assert out.SOLVER.MAX_ITER == math.ceil(3 * 1000 / 64) == 47
    assert out.SOLVER.WARMUP_ITERS == round(1000 / 64) == 16
    assert out.TEST.EVAL_PERIOD == math.ceil(2 * 1000 / 64)
    assert out.SOLVER.CHECKPOINT_PERIOD == math.ceil(1000 / 64)
    assert cfg.SOLVER.BASE_LR == 0.1  # the input is not modified
    again = resolve_classification_schedule(out, num_train_images=1000)
    assert again.SOLVER.BASE_LR == out.SOLVER.BASE_LR  # idempotent
    # The SASA recipe on ImageNet: 130 epochs at 4096, 10 of warm-up, LR 1.6.
    sasa = get_san_det_cfg(config_path("ImageNet", "sasa50.yaml"))
    sasa = resolve_classification_schedule(sasa, num_train_images=1281167)
    assert sasa.SOLVER.BASE_LR == pytest.approx(1.6)
    assert sasa.SOLVER.MAX_ITER == math.ceil(130 * 1281167 / 4096)
    assert sasa.SOLVER.WARMUP_ITERS == round(10 * 1281167 / 4096)
    assert sasa.SOLVER.NESTEROV and sasa.CLASSIFICATION.EMA.ENABLED


def test_schedule_errors_name_the_key():
    cfg = _cfg()
    cfg.CLASSIFICATION.SOLVER.WARMUP_EPOCHS = 1
    with pytest.raises(ValueError, match="need CLASSIFICATION.SOLVER.EPOCHS"):
        resolve_classification_schedule(cfg, 100)
    cfg = _cfg(**{"SOLVER.IMS_PER_BATCH": 0})
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH"):
        resolve_classification_schedule(cfg, 100)
    cfg = _cfg()
    cfg.CLASSIFICATION.SOLVER.EPOCHS = -1
    with pytest.raises(ValueError, match="CLASSIFICATION.SOLVER.EPOCHS must be >= 0"):
        resolve_classification_schedule(cfg, 100)
    cfg = _cfg(**{"SOLVER.MAX_ITER": 10, "SOLVER.WARMUP_ITERS": 20})
    with pytest.raises(ValueError, match="warm-up"):
        resolve_classification_schedule(cfg, 100)


def test_warmup_then_cosine_and_no_warmup():
    model = nn.Linear(2, 2)
    cfg = _cfg(**{"SOLVER.MAX_ITER": 100, "SOLVER.WARMUP_ITERS": 10, "SOLVER.BASE_LR": 1.0})
    cfg.SOLVER.WARMUP_FACTOR = 0.0
    cfg.CLASSIFICATION.SOLVER.REFERENCE_BATCH_SIZE = 0
    opt = build_classification_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    # detectron2's WarmupCosineLR: cosine over the whole run, the warm-up ramps linearly to it.
    def cosine(i):
        return 0.5 * (1 + math.cos(math.pi * i / 100))

    assert lrs[0] == pytest.approx(0.0) and lrs[5] == pytest.approx(0.5 * cosine(10))
    for i in (10, 55, 99):
        assert lrs[i] == pytest.approx(cosine(i), rel=1e-6)
    assert max(lrs) == pytest.approx(lrs[10])
    cfg.SOLVER.WARMUP_ITERS = 0  # SAN: no warm-up
    opt = build_classification_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.attn = LocalSelfAttention2d(8, 8, kernel_size=3, num_heads=2)
        self.gn = nn.GroupNorm(2, 8)


@pytest.mark.parametrize("no_decay", [False, True])
def test_weight_decay_groups(no_decay):
    cfg = _cfg(**{"SOLVER.WEIGHT_DECAY": 1e-4, "SOLVER.WEIGHT_DECAY_NORM": 3e-5})
    cfg.SOLVER.NESTEROV = True
    cfg.CLASSIFICATION.SOLVER.NO_DECAY_NORM_AND_EMBEDDING = no_decay
    net = _Net()
    opt = build_classification_optimizer(cfg, net)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)
    assert len(decay) == len(list(net.parameters()))
    for name, p in net.named_parameters():
        is_norm = name.startswith(("bn.", "gn."))
        is_embedding = name.split(".")[-1] in ("rel_row", "rel_col")
        if no_decay and (is_norm or is_embedding):
            expected = 0.0
        elif is_norm:
            expected = 3e-5
        else:
            expected = 1e-4
        assert decay[id(p)] == expected, name
    assert any(n.endswith("rel_row") for n, _ in net.named_parameters())


def test_ema_update_ramp_and_state():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = ModelEMA(model, decay=0.9, ramp=True)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(5)
    d = ema.current_decay()
    assert d == pytest.approx(1.0 / 10.0)  # ramp: min(0.9, (1 + 0) / (10 + 0))
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, d * w0 + (1 - d) * (w0 + 1.0))
    assert int(ema.module[1].num_batches_tracked) == 5
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == 0.9
    torch.testing.assert_close(ema.module[0].weight, w0 + 1.0, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in ema.module.parameters())
    other = ModelEMA(model, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 201
    with pytest.raises(ValueError, match="DECAY"):
        ModelEMA(model, decay=1.0)
