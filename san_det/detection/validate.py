"""Detection's part of the config check (:func:`san_det.engine.validate.validate_config`): the
detection keys and the probe that runs the smallest images of the config through the meta model.
"""

import torch
from torch import nn

from ..engine.validate import run_probe
from ..errors import UserInputError

__all__ = ["check_detection_input_sizes", "check_detection_keys", "padded_size", "probe_detector"]


def padded_size(size: int, divisibility: int) -> int:
    """``size`` rounded up to a multiple of ``divisibility`` (as ``ImageList.from_tensors``)."""
    return -(-size // divisibility) * divisibility if divisibility > 1 else size


def _resized_square(short_edge: int, max_size: int) -> int:
    """Side of a square image after ``ResizeShortestEdge(short_edge, max_size)``."""
    return min(short_edge, max_size)


def check_detection_input_sizes(cfg) -> None:
    """``INPUT.MIN_SIZE_*`` / ``MAX_SIZE_*`` values that ``ResizeShortestEdge`` cannot use."""
    i = cfg.INPUT
    train = (
        list(i.MIN_SIZE_TRAIN)
        if isinstance(i.MIN_SIZE_TRAIN, (list, tuple))
        else [i.MIN_SIZE_TRAIN]
    )
    if not train or any(not isinstance(s, int) or s < 0 for s in train):
        raise UserInputError(
            f"INPUT.MIN_SIZE_TRAIN must list sizes >= 0 (0 = no resize), got {i.MIN_SIZE_TRAIN}"
        )
    if i.MIN_SIZE_TRAIN_SAMPLING == "range" and (len(train) != 2 or train[0] > train[1]):
        raise UserInputError(
            "INPUT.MIN_SIZE_TRAIN_SAMPLING 'range' needs INPUT.MIN_SIZE_TRAIN (low, high), got "
            f"{i.MIN_SIZE_TRAIN}"
        )
    if i.MIN_SIZE_TEST < 0:
        raise UserInputError(
            f"INPUT.MIN_SIZE_TEST must be >= 0 (0 = no resize), got {i.MIN_SIZE_TEST}"
        )
    for key in ("MAX_SIZE_TRAIN", "MAX_SIZE_TEST"):
        if i[key] < 1:
            raise UserInputError(f"INPUT.{key} must be >= 1, got {i[key]}")


def check_detection_keys(cfg, **_) -> None:
    """Detection keys that build a model but cannot train or predict."""
    if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE and cfg.MODEL.RETINANET.NUM_CLASSES < 1:
        raise UserInputError(
            f"MODEL.RETINANET.NUM_CLASSES must be >= 1, got {cfg.MODEL.RETINANET.NUM_CLASSES}"
        )


def probe_detector(model: nn.Module, cfg, *, world_size: int, eval_only: bool) -> None:
    """Run the smallest square image of the config through a (meta) dense detector: backbone and
    head, in training mode with the per-process batch and in inference mode with one image.

    Sizes: ``ResizeShortestEdge`` of a square image to the smallest ``INPUT.MIN_SIZE_TRAIN``
    (``MIN_SIZE_TEST``), capped by ``MAX_SIZE_*``, padded to the backbone's size divisibility.
    A size of 0 (no resize) depends on the images and is not probed; nor are crops. Models
    without ``preprocess_image`` / ``backbone`` (not dense detectors) are not probed.
    """
    if not all(hasattr(model, a) for a in ("preprocess_image", "backbone")):
        return
    check_detection_input_sizes(cfg)
    i = cfg.INPUT
    runs = []
    if not eval_only:
        short = (
            min(i.MIN_SIZE_TRAIN)
            if isinstance(i.MIN_SIZE_TRAIN, (list, tuple))
            else i.MIN_SIZE_TRAIN
        )
        if short > 0:
            keys = "INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN"
            size = _resized_square(short, i.MAX_SIZE_TRAIN)
            runs.append((True, cfg.SOLVER.IMS_PER_BATCH // world_size, size, keys))
    if i.MIN_SIZE_TEST > 0:
        keys = "INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST"
        runs.append((False, 1, _resized_square(i.MIN_SIZE_TEST, i.MAX_SIZE_TEST), keys))

    def forward(images):
        batch = model.preprocess_image([{"image": x} for x in images])
        features = model.backbone(batch.tensor)
        head_in = getattr(model, "head_in_features", None)
        if head_in is not None and hasattr(model, "head"):
            model.head([features[f] for f in head_in])

    for training, batch, size, keys in runs:
        divisibility = getattr(model.backbone, "size_divisibility", 0)
        padded = padded_size(size, divisibility)
        what = (
            f"{'training' if training else 'inference'} on {size}x{size} images (the smallest "
            f"{keys} give; {padded}x{padded} after padding, {batch} per process)"
        )
        run_probe(
            model,
            training,
            lambda: forward([torch.empty(3, size, size, device="meta") for _ in range(batch)]),
            what,
        )
