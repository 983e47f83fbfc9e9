"""Tiny models, configs and COCO-format datasets for the engine's tests (fast on one CPU core).

- :func:`tiny_retinanet_cfg`: detectron2's RetinaNet with a ResNet-50 layout of width 4 at 64x64
  (about 0.05 s per training iteration of 2 images here).
- :class:`TinyTestNet`: a meta-architecture with one conv, a norm (``MODEL.RESNETS.NORM``: ``""``,
  ``"GN"``, ``"BN"``, ``"SyncBN"``) and a linear classifier of each image's first box class; its
  loss is a mean over the batch, so data-parallel runs must equal one process with the whole batch.
- :func:`train_tiny_retinanet`: that RetinaNet trained a few iterations on :func:`simple_images`.
- :func:`write_coco_dataset` / :func:`register_coco_dataset`: small COCO-format sets in a folder,
  with optional broken images (truncated JPEG, not an image, missing) and arbitrary boxes.
- :func:`process_alive` / :func:`wait_until`: for tests that start, signal and kill processes.
- :func:`load_script`: ``train_net.py`` or a tool as a module, to call its ``cli`` / ``main``;
  :func:`drop_closed_log_handlers`: after in-process runs whose loggers wrote to a captured
  (now closed) stream.
"""

import importlib.util
import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import META_ARCH_REGISTRY
from PIL import Image
from torch import nn

from ..config import get_san_det_cfg
from .trainer import DetectionTrainer

__all__ = [
    "TinyTestNet",
    "drop_closed_log_handlers",
    "load_script",
    "process_alive",
    "register_coco_dataset",
    "simple_images",
    "tiny_retinanet_cfg",
    "tiny_test_net_cfg",
    "train_tiny_retinanet",
    "wait_until",
    "write_coco_dataset",
]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_RETINANET = os.path.join(ROOT, "configs", "COCO-Detection", "Base-RetinaNet.yaml")


def load_script(relative_path: str):
    """The script at ``relative_path`` of the repository (``"train_net.py"``,
    ``"tools/analyze_model.py"``) loaded as a module, without running its ``__main__`` block."""
    path = os.path.join(ROOT, relative_path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drop_closed_log_handlers() -> None:
    """Remove logging handlers whose stream is closed. A ``train_net.cli`` run in a test attaches
    detectron2's console handlers to that test's captured ``sys.stdout``; every later log line
    through them prints a "--- Logging error ---" traceback."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in list(lg.handlers):
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                lg.removeHandler(handler)


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
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 8
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 4
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
    return _common(cfg, output_dir, train, max_iter)


def tiny_test_net_cfg(output_dir: str, train: Sequence[str] = (), max_iter: int = 4,
                      norm: str = "GN") -> CfgNode:
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
        x = torch.stack([(d["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
                         for d in batched_inputs])
        logits = self.fc(F.relu(self.norm(self.conv(x))).mean(dim=(2, 3)))
        if not self.training:
            return [{"logits": row} for row in logits]
        first = [int(d["instances"].gt_classes[0]) if len(d["instances"]) else 0
                 for d in batched_inputs]
        target = torch.tensor(first, device=self.device)
        return {"loss_cls": F.cross_entropy(logits, target)}


def _draw(size, boxes, classes, seed: int) -> np.ndarray:
    w, h = size
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    for (x, y, bw, bh), c in zip(boxes, classes):
        if not all(np.isfinite([x, y, bw, bh])) or bw <= 0 or bh <= 0:
            continue
        x0, y0 = int(max(x, 0)), int(max(y, 0))
        x1, y1 = int(min(x + bw, w)), int(min(y + bh, h))
        img[y0:y1, x0:x1, c % 3] = 220
    return img


def write_coco_dataset(folder: str, images: Sequence[Dict], categories=("a", "b", "c")) -> str:
    """Write images and a COCO json into ``folder``; returns the json path.

    Each entry of ``images``: ``name`` (file name), ``size`` ``(w, h)`` (default 64x64),
    ``boxes`` (list of XYWH, any values), ``classes`` (0-based, default 0), ``mode`` (PIL mode to
    save in, default ``RGB``), ``broken`` (None, ``"truncated"``, ``"garbage"`` or ``"missing"``),
    ``record_size`` (False: omit width/height from the json).
    """
    os.makedirs(folder, exist_ok=True)
    coco_images, annotations = [], []
    for i, spec in enumerate(images):
        name = spec["name"]
        w, h = spec.get("size", (64, 64))
        boxes = spec.get("boxes", [])
        classes = spec.get("classes", [0] * len(boxes))
        path = os.path.join(folder, name)
        pil = Image.fromarray(_draw((w, h), boxes, classes, seed=i))
        mode = spec.get("mode", "RGB")
        if mode == "I;16":
            pil = Image.fromarray(np.asarray(pil.convert("L")).astype(np.uint16) * 257)
            assert pil.mode == "I;16", pil.mode
        elif mode != "RGB":
            pil = pil.convert(mode)
        broken = spec.get("broken")
        if broken != "missing":
            pil.save(path)
        if broken == "truncated":
            data = open(path, "rb").read()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
        elif broken == "garbage":
            with open(path, "wb") as f:
                f.write(b"this is not an image\n" * 10)
        entry = {"id": i + 1, "file_name": name}
        if spec.get("record_size", True):
            entry.update(width=w, height=h)
        coco_images.append(entry)
        for box, c in zip(boxes, classes):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "bbox": [float(v) for v in box],
                    "category_id": int(c) + 1,
                    "iscrowd": 0,
                    "area": float(abs(box[2] * box[3])) if np.isfinite(box[2] * box[3]) else 0.0,
                }
            )
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(categories)]
    json_path = os.path.join(folder, "annotations.json")
    with open(json_path, "w") as f:
        json.dump({"images": coco_images, "annotations": annotations, "categories": cats}, f)
    return json_path


def register_coco_dataset(name: str, folder: str, images: Optional[Sequence[Dict]] = None) -> str:
    """(Re-)register ``name`` as the COCO set in ``folder`` (written first if ``images``)."""
    json_path = os.path.join(folder, "annotations.json")
    if images is not None:
        json_path = write_coco_dataset(folder, images)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_path, folder)
    return name


def simple_images(n: int, seed: int = 0) -> List[Dict]:
    """``n`` 64x64 RGB images with one or two boxes each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = 1 + i % 2
        boxes = [[float(v) for v in (*rng.integers(0, 32, 2), *rng.integers(12, 30, 2))]
                 for _ in range(k)]
        classes = [(i + j) % 3 for j in range(k)]
        out.append({"name": f"img{i}.png", "boxes": boxes, "classes": classes})
    return out


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


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie that nobody has reaped yet counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux)
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(predicate, timeout: float = 120.0, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds passed; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
