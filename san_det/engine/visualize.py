"""Prediction images: a detector's boxes drawn (detectron2 ``Visualizer``) on a few test images.

:func:`write_prediction_images` writes, for the first ``num_images`` images of a dataset, a PNG
with the ground truth on the left and the predictions (score >= threshold) on the right, plus
``predictions.png``: the predictions of the first four images side by side (a small overview
for documentation). :class:`PredictionImagesHook` calls it once training has finished, after the
final evaluation when registered after detectron2's ``EvalHook``::

    class Trainer(DefaultTrainer):
        def build_hooks(self):
            return super().build_hooks() + [PredictionImagesHook(self.cfg)]

The number of images is ``cfg.TEST.PREDICTION_IMAGES`` when the config has that key (else 8;
0 turns the hook off); images go to ``OUTPUT_DIR/predictions/<dataset>/``.
"""

import logging
import os
from typing import List, Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_image_to_rgb, read_image
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.visualizer import Visualizer
from PIL import Image

__all__ = ["PredictionImagesHook", "write_prediction_images"]

logger = logging.getLogger(__name__)

DEFAULT_NUM_IMAGES = 8
OVERVIEW_IMAGES = 4


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def write_prediction_images(
    cfg,
    model: torch.nn.Module,
    dataset_name: Optional[str] = None,
    output_dir: Optional[str] = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    score_threshold: float = 0.3,
    scale: float = 2.0,
) -> List[str]:
    """Draw ground truth and predictions for the first ``num_images`` images of a dataset.

    Args:
        cfg: the model's config (``INPUT.FORMAT``, ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``).
        model: a detectron2 detector (DDP-wrapped or not); it is run in eval mode and its
            training mode is restored afterwards.
        dataset_name: a registered dataset; default ``cfg.DATASETS.TEST[0]``.
        output_dir: default ``cfg.OUTPUT_DIR/predictions/<dataset_name>``.
        num_images: how many images (the first ones of the dataset).
        score_threshold: predictions below this score are not drawn.
        scale: drawing scale (small images need > 1 for readable labels).

    Returns:
        The written paths: one ``<image name>.png`` per image (ground truth | predictions), then
        ``predictions.png`` (predictions of the first four images in a row).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
    if dataset_name is None:
        if not cfg.DATASETS.TEST:
            raise ValueError("cfg.DATASETS.TEST is empty: pass dataset_name")
        dataset_name = cfg.DATASETS.TEST[0]
    if output_dir is None:
        output_dir = os.path.join(cfg.OUTPUT_DIR, "predictions", dataset_name)
    os.makedirs(output_dir, exist_ok=True)
    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    metadata = MetadataCatalog.get(dataset_name)
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)

    net = _unwrap(model)
    was_training = net.training
    net.eval()
    paths, overview = [], []
    try:
        for record in dicts:
            image = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
            height, width = image.shape[:2]
            resized = resize.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
            with torch.no_grad():
                output = net([{"image": tensor.float(), "height": height, "width": width}])[0]
            instances = output["instances"].to("cpu")
            instances = instances[instances.scores >= score_threshold]
            rgb = convert_image_to_rgb(image, cfg.INPUT.FORMAT)
            boxes_only = dict(record)  # masks would hide the colours the detector saw
            boxes_only["annotations"] = [
                {k: v for k, v in a.items() if k != "segmentation"}
                for a in record.get("annotations", [])
            ]
            truth = Visualizer(rgb, metadata, scale=scale).draw_dataset_dict(boxes_only)
            truth = truth.get_image()
            pred = Visualizer(rgb, metadata, scale=scale)
            pred = pred.draw_instance_predictions(instances).get_image()
            gap = np.full((truth.shape[0], 4, 3), 255, dtype=np.uint8)
            name = os.path.splitext(os.path.basename(record["file_name"]))[0]
            path = os.path.join(output_dir, f"{name}.png")
            Image.fromarray(np.concatenate([truth, gap, pred], axis=1)).save(path)
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
        Image.fromarray(np.concatenate(padded, axis=1)[:, :-4]).save(path, optimize=True)
        paths.append(path)
    return paths


class PredictionImagesHook(HookBase):
    """After training (main process only, and only if training reached its last iteration):
    :func:`write_prediction_images` on ``cfg.DATASETS.TEST[0]``.

    Register it after ``EvalHook`` so that it runs after the final evaluation.

    Args:
        cfg: the trainer's config.
        num_images: default ``cfg.TEST.PREDICTION_IMAGES`` if present, else 8; 0 disables.
        score_threshold: predictions below it are not drawn.
    """

    def __init__(self, cfg, num_images: Optional[int] = None, score_threshold: float = 0.3):
        self._cfg = cfg
        if num_images is None:
            num_images = cfg.TEST.get("PREDICTION_IMAGES", DEFAULT_NUM_IMAGES)
        if num_images < 0:
            raise ValueError(f"TEST.PREDICTION_IMAGES must be >= 0, got {num_images}")
        self._num_images = num_images
        self._score_threshold = score_threshold

    def after_train(self):
        if self._num_images == 0 or not self._cfg.DATASETS.TEST or not comm.is_main_process():
            return
        if self.trainer.iter < self.trainer.max_iter:
            return  # training did not finish (the loop sets iter = max_iter on success)
        paths = write_prediction_images(
            self._cfg,
            self.trainer.model,
            num_images=self._num_images,
            score_threshold=self._score_threshold,
        )
        logger.info(
            f"Wrote {len(paths)} prediction images (ground truth | predictions with score >= "
            f"{self._score_threshold}) to {os.path.dirname(paths[-1])}"
        )
