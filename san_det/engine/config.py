"""``add_engine_config(cfg)``: config keys of san_det's training engine (loader, checkpoints).

detectron2's own keys keep their meaning; the ones the engine relies on:

- ``SEED``: seeds every random number generator of a run. With ``SEED >= 0`` a run on the CPU is
  reproducible: the same losses and weights on every rerun, with any ``DATALOADER.NUM_WORKERS``,
  and a run resumed from a checkpoint ends with the same weights as an uninterrupted one. With
  ``SEED < 0`` (detectron2's default) a random seed is drawn, shared by all processes, logged and
  stored in every checkpoint, so ``--resume`` still continues the same data stream.
- ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``: detectron2 drops images without annotations by default.
  RetinaNet learns from such images as negatives (every anchor is background): set it to False in
  RetinaNet configs to keep them.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_engine_config"]


def add_engine_config(cfg: CN) -> CN:
    """Add the engine's keys with their defaults to ``cfg`` (in place; also returned)."""
    # An unreadable or truncated training image: False = stop with an error naming the file;
    # True = log a warning naming it and train on the next readable image instead.
    cfg.DATALOADER.SKIP_CORRUPT_IMAGES = False
    # MODEL.WEIGHTS with a tensor whose shape differs from the model's (e.g. a classifier for
    # another number of classes): False = error naming the file and the key; True = keep the
    # model's initial value for such tensors and log each one (detectron2's behaviour).
    cfg.MODEL.WEIGHTS_ALLOW_SHAPE_MISMATCH = False
    # MODEL.WEIGHTS recording another input format / normalisation than INPUT.FORMAT,
    # MODEL.PIXEL_MEAN, MODEL.PIXEL_STD (converted SAN backbones, classifiers, san_det's own
    # checkpoints record theirs): False = error naming both; True = load with a warning.
    cfg.MODEL.WEIGHTS_ALLOW_INPUT_MISMATCH = False
    # A .pth checkpoint (MODEL.WEIGHTS, or resumed) holding Python objects besides tensors, which
    # torch.load refuses by default: False = error saying so; True = unpickle it
    # (torch.load(weights_only=False): can run code, only for files from a trusted source).
    cfg.MODEL.WEIGHTS_TRUSTED = False
    # Detection: after training and after --eval-only, draw ground truth | predictions for this
    # many images of DATASETS.TEST[0] into OUTPUT_DIR/predictions/ (0 = none).
    cfg.TEST.PREDICTION_IMAGES = 8
    # Prediction images: predictions with a lower score are not drawn.
    cfg.TEST.PREDICTION_SCORE_THRESHOLD = 0.3
    # Prediction images: longer side of each drawn image at most this many pixels (small images
    # are drawn at up to twice their size, for readable labels).
    cfg.TEST.PREDICTION_IMAGE_MAX_SIZE = 1024
    return cfg
