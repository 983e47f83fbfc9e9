"""Prediction images: a detector's boxes drawn (detectron2 ``Visualizer``) on images.

:func:`write_prediction_images` writes, for the first ``num_images`` images of a dataset, a PNG
with the ground truth on the left and the predictions (score >= threshold) on the right, plus
``predictions.png``: the predictions of the first four images side by side (a small overview
for documentation). :class:`PredictionImagesHook` calls it once training has finished, after the
final evaluation when registered after detectron2's ``EvalHook``; ``train_net.py --eval-only``
calls it after evaluating::

    class Trainer(DefaultTrainer):
        def build_hooks(self):
            return super().build_hooks() + [PredictionImagesHook(self.cfg)]

The model sees exactly what evaluation feeds it (:class:`FilePredictor`: the test-time
:class:`~san_det.data.mapper.RobustDatasetMapper`, which reads 16-bit, RGBA, CMYK, palette and
grayscale files as RGB and resizes to ``INPUT.MIN_SIZE_TEST``), and the boxes are drawn on the
same reading of the file. Small images are drawn at up to twice their size (readable labels),
large ones shrunk so that the longer side is at most ``TEST.PREDICTION_IMAGE_MAX_SIZE``.

Config keys (:func:`~san_det.engine.config.add_engine_config`): ``TEST.PREDICTION_IMAGES`` (how
many; 0 = none), ``TEST.PREDICTION_SCORE_THRESHOLD``, ``TEST.PREDICTION_IMAGE_MAX_SIZE``; images
go to ``OUTPUT_DIR/predictions/<dataset>/``.
"""

import logging
import os
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.structures import Instances
from detectron2.utils import comm
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from ..data.mapper import RobustDatasetMapper, read_image_robust
from ..engine.ddp import unwrap_model
from ..engine.interrupt import interruptible
from ..errors import UserInputError
from ..utils.atomic import atomic_write

__all__ = [
    "FilePredictor",
    "PredictionImagesHook",
    "check_prediction_images_config",
    "draw_predictions",
    "drawing_scale",
    "write_configured_prediction_images",
    "write_prediction_images",
]

logger = logging.getLogger(__name__)

DEFAULT_NUM_IMAGES = 8
DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_MAX_SIZE = 1024
MAX_SCALE = 2.0  # small images are enlarged up to this factor so that labels stay readable
OVERVIEW_IMAGES = 4


class FilePredictor:
    """A detector run on image files as evaluation runs it, in eval mode, without gradients.

    Args:
        cfg: the model's config (``INPUT.FORMAT``, ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``).
        model: a detectron2 detector (DDP-wrapped or not). The caller sets its mode.

    Calling it with a dataset record (``{"file_name": ..., ...}``) or a path returns the
    predicted ``Instances`` on the CPU, in the coordinates of the original image.

    Raises:
        CorruptImageError: the file cannot be read (names the file).
    """

    def __init__(self, cfg, model: torch.nn.Module):
        self.mapper = RobustDatasetMapper(cfg, is_train=False)
        self.model = unwrap_model(model)

    def __call__(self, record: Union[str, Dict]) -> Instances:
        if isinstance(record, str):
            record = {"file_name": record}
        inputs = self.mapper(record)
        with torch.no_grad():
            output = self.model([inputs])[0]
        return output["instances"].to("cpu")


def drawing_scale(height: int, width: int, max_size: int = DEFAULT_MAX_SIZE) -> float:
    """Scale at which an image is drawn: up to :data:`MAX_SCALE`, longer side <= ``max_size``."""
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    return min(MAX_SCALE, max_size / max(height, width, 1))


def draw_predictions(
    rgb: np.ndarray, instances: Instances, metadata, max_size: int = DEFAULT_MAX_SIZE
) -> np.ndarray:
    """``(H', W', 3)`` uint8 drawing of ``instances`` (boxes, class names, scores) on ``rgb``."""
    scale = drawing_scale(rgb.shape[0], rgb.shape[1], max_size)
    return Visualizer(rgb, metadata, scale=scale).draw_instance_predictions(instances).get_image()


def _draw_ground_truth(rgb: np.ndarray, record: Dict, metadata, max_size: int) -> np.ndarray:
    boxes_only = dict(record)  # masks would hide the colours the detector saw
    boxes_only["annotations"] = [
        {k: v for k, v in a.items() if k != "segmentation"} for a in record.get("annotations", [])
    ]
    scale = drawing_scale(rgb.shape[0], rgb.shape[1], max_size)
    return Visualizer(rgb, metadata, scale=scale).draw_dataset_dict(boxes_only).get_image()


def _cfg_value(cfg, key: str, default):
    return cfg.TEST.get(key, default) if cfg is not None else default


def write_prediction_images(
    cfg,
    model: torch.nn.Module,
    dataset_name: Optional[str] = None,
    output_dir: Optional[str] = None,
    num_images: Optional[int] = None,
    score_threshold: Optional[float] = None,
    max_size: Optional[int] = None,
) -> List[str]:
    """Draw ground truth and predictions for the first ``num_images`` images of a dataset.

    Args:
        cfg: the model's config (``INPUT.*``, ``TEST.PREDICTION_*``).
        model: a detectron2 detector (DDP-wrapped or not); it is run in eval mode and its
            training mode is restored afterwards.
        dataset_name: a registered dataset; default ``cfg.DATASETS.TEST[0]``.
        output_dir: default ``cfg.OUTPUT_DIR/predictions/<dataset_name>``.
        num_images: how many images (the first ones of the dataset); default
            ``cfg.TEST.PREDICTION_IMAGES``.
        score_threshold: predictions below this score are not drawn; default
            ``cfg.TEST.PREDICTION_SCORE_THRESHOLD``.
        max_size: longest side of each drawn half, pixels; default
            ``cfg.TEST.PREDICTION_IMAGE_MAX_SIZE``.

    Returns:
        The written paths: one ``<image name>.png`` per image (ground truth | predictions), then
        ``predictions.png`` (predictions of the first four images in a row).
    """
    if num_images is None:
        num_images = _cfg_value(cfg, "PREDICTION_IMAGES", DEFAULT_NUM_IMAGES)
    if score_threshold is None:
        score_threshold = _cfg_value(cfg, "PREDICTION_SCORE_THRESHOLD", DEFAULT_SCORE_THRESHOLD)
    if max_size is None:
        max_size = _cfg_value(cfg, "PREDICTION_IMAGE_MAX_SIZE", DEFAULT_MAX_SIZE)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
    drawing_scale(1, 1, max_size)  # checks max_size
    if dataset_name is None:
        if not cfg.DATASETS.TEST:
            raise ValueError("cfg.DATASETS.TEST is empty: pass dataset_name")
        dataset_name = cfg.DATASETS.TEST[0]
    if output_dir is None:
        output_dir = os.path.join(cfg.OUTPUT_DIR, "predictions", dataset_name)
    os.makedirs(output_dir, exist_ok=True)
    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    metadata = MetadataCatalog.get(dataset_name)
    predictor = FilePredictor(cfg, model)

    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    paths, overview = [], []
    try:
        for record in dicts:
            instances = predictor(record)
            instances = instances[instances.scores >= score_threshold]
            rgb = read_image_robust(record["file_name"], format="RGB")
            truth = _draw_ground_truth(rgb, record, metadata, max_size)
            pred = draw_predictions(rgb, instances, metadata, max_size)
            gap = np.full((truth.shape[0], 4, 3), 255, dtype=np.uint8)
            name = os.path.splitext(os.path.basename(record["file_name"]))[0]
            path = os.path.join(output_dir, f"{name}.png")
            with atomic_write(path) as f:  # whole or not at all (a signal, a full disk)
                Image.fromarray(np.concatenate([truth, gap, pred], axis=1)).save(f, format="PNG")
            paths.append(path)
            if len(overview) < OVERVIEW_IMAGES:
                overview.append(pred)
    finally:
        net.train(was_training)
    if overview:
        rows = max(img.shape[0] for img in overview)
        padded = [np.pad(img, ((0, rows - img.shape[0]), (0, 4), (0, 0)), constant_values=255)
                  for img in overview]  # fmt: skip
        path = os.path.join(output_dir, "predictions.png")
        with atomic_write(path) as f:
            Image.fromarray(np.concatenate(padded, axis=1)[:, :-4]).save(
                f, format="PNG", optimize=True
            )
        paths.append(path)
    return paths


def check_prediction_images_config(cfg) -> None:
    """Raise :class:`UserInputError` for ``TEST.PREDICTION_*`` values out of range."""
    checks = (
        ("PREDICTION_IMAGES", lambda v: v >= 0, ">= 0"),
        ("PREDICTION_SCORE_THRESHOLD", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
        ("PREDICTION_IMAGE_MAX_SIZE", lambda v: v >= 1, ">= 1"),
    )
    for key, ok, what in checks:
        if key in cfg.TEST and not ok(cfg.TEST[key]):
            raise UserInputError(f"TEST.{key} must be {what}, got {cfg.TEST[key]}")


def write_configured_prediction_images(cfg, model: torch.nn.Module) -> List[str]:
    """:func:`write_prediction_images` for ``cfg.DATASETS.TEST[0]`` as the config says, logged;
    nothing when ``TEST.PREDICTION_IMAGES`` is 0 or there is no test set. Main process only."""
    num_images = _cfg_value(cfg, "PREDICTION_IMAGES", DEFAULT_NUM_IMAGES)
    if num_images < 0:
        raise ValueError(f"TEST.PREDICTION_IMAGES must be >= 0, got {num_images}")
    if num_images == 0 or not cfg.DATASETS.TEST or not comm.is_main_process():
        return []
    paths = write_prediction_images(cfg, model)
    threshold = _cfg_value(cfg, "PREDICTION_SCORE_THRESHOLD", DEFAULT_SCORE_THRESHOLD)
    logger.info(
        f"Wrote {len(paths)} prediction images (ground truth | predictions with score >= "
        f"{threshold}) to {os.path.dirname(paths[-1])}"
    )
    return paths


class PredictionImagesHook(HookBase):
    """After training (main process only, and only if training reached its last iteration):
    :func:`write_configured_prediction_images`.

    Register it after ``EvalHook`` so that it runs after the final evaluation.

    Args:
        cfg: the trainer's config (``TEST.PREDICTION_*``; 0 images disables the hook).
    """

    def __init__(self, cfg):
        self._cfg = cfg
        num_images = _cfg_value(cfg, "PREDICTION_IMAGES", DEFAULT_NUM_IMAGES)
        if num_images < 0:
            raise ValueError(f"TEST.PREDICTION_IMAGES must be >= 0, got {num_images}")

    def after_train(self):
        if self.trainer.iter < self.trainer.max_iter:
            return  # training did not finish (the loop sets iter = max_iter on success)
        # after the loop's own signal handling: SIGTERM / SIGINT stop the drawing at once
        with interruptible("drawing the prediction images (training and evaluation are done)"):
            write_configured_prediction_images(self._cfg, self.trainer.model)
