"""Tiny detection models and their configs for the tests (fast on one CPU core).

- :func:`tiny_retinanet_cfg`: detectron2's RetinaNet with a ResNet-50 layout of width 4 at 64x64
  (about 0.05 s per training iteration of 2 images here).
- :class:`TinyTestNet`: a meta-architecture with one conv, a norm (``MODEL.RESNETS.NORM``: ``""``,
  ``"GN"``, ``"BN"``, ``"SyncBN"``) and a linear classifier of each image's first box class; its
  loss is a mean over the batch, so data-parallel runs must equal one process with the whole batch.
  Importing this module registers it.
- :func:`train_tiny_retinanet`: that RetinaNet trained a few iterations on
  :func:`~.coco_files.simple_images`.
"""

import os
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from san_det.config import get_san_det_cfg
from san_det.detection import DetectionTrainer
from san_det.modeling.architecture import architecture_keys

from .coco_files import register_coco_dataset, simple_images
from .paths import config_path

BASE_RETINANET = config_path("COCO-Detection", "Base-RetinaNet.yaml")


def _common(cfg: CfgNode, output_dir: str, train: Sequence[str], max_iter: int) -> CfgNode:
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = ()
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**6
    cfg.TEST.EVAL_PERIOD = 0
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    cfg.SEED = 0
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def tiny_retinanet_cfg(output_dir: str, train: Sequence[str] = (), max_iter: int = 4) -> CfgNode:
    """A RetinaNet small enough for tests: ResNet-50 layout, width 4, BN, 1 head conv, 64 px."""
    cfg = get_san_det_cfg()
    cfg.merge_from_file(BASE_RETINANET)
    cfg.MODEL.WEIGHTS = ""
    sizes = dict(DEPTH=50, STEM_OUT_CHANNELS=8, RES2_OUT_CHANNELS=16, WIDTH_PER_GROUP=4)
    cfg.MODEL.RESNETS.update(sizes, NORM="BN")
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
    return _common(cfg, output_dir, train, max_iter)


def tiny_test_net_cfg(
    output_dir: str, train: Sequence[str] = (), max_iter: int = 4, norm: str = "GN"
) -> CfgNode:
    """Config of :class:`TinyTestNet` (``norm`` in ``"", "GN", "BN", "SyncBN"``)."""
    cfg = get_san_det_cfg()
    cfg.MODEL.META_ARCHITECTURE = "TinyTestNet"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.SOLVER.MOMENTUM = 0.9
    return _common(cfg, output_dir, train, max_iter)


@META_ARCH_REGISTRY.register()
@architecture_keys("MODEL.RETINANET.NUM_CLASSES")
class TinyTestNet(nn.Module):
    """conv3x3(3->8) -> norm -> ReLU -> global mean -> linear: classifies the first box's class.

    Input: detectron2 dicts with ``image`` ``(3, H, W)`` (all of one size) and ``instances``.
    Training output: ``{"loss_cls": mean cross-entropy over the batch}`` (images without boxes
    are class 0); inference output: ``[{"logits": (num_classes,)}]``.
    """

    def __init__(self, cfg):
        super().__init__()
        norm = cfg.MODEL.RESNETS.NORM
        num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=not norm)
        self.norm = {
            "": nn.Identity(),
            "GN": nn.GroupNorm(2, 8),
            "BN": nn.BatchNorm2d(8),
            "SyncBN": nn.SyncBatchNorm(8),
        }[norm]
        self.fc = nn.Linear(8, num_classes)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        x = torch.stack(
            [
                (d["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
                for d in batched_inputs
            ]
        )
        logits = self.fc(F.relu(self.norm(self.conv(x))).mean(dim=(2, 3)))
        if not self.training:
            return [{"logits": row} for row in logits]
        first = [
            int(d["instances"].gt_classes[0]) if len(d["instances"]) else 0 for d in batched_inputs
        ]
        target = torch.tensor(first, device=self.device)
        return {"loss_cls": F.cross_entropy(logits, target)}


def train_tiny_retinanet(root: str, dataset: str, max_iter: int = 2) -> CfgNode:
    """Register ``dataset`` (4 :func:`simple_images` in ``root/data``), train
    :func:`tiny_retinanet_cfg` on it for ``max_iter`` iterations into ``root/out``; returns the
    config."""
    register_coco_dataset(dataset, os.path.join(root, "data"), simple_images(4))
    cfg = tiny_retinanet_cfg(os.path.join(root, "out"), (dataset,), max_iter=max_iter)
    trainer = DetectionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg
