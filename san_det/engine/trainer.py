"""The detection trainer: detectron2's ``DefaultTrainer`` with COCO evaluation that works everywhere."""

import os

from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator

from .. import compat

__all__ = ["DetectionTrainer", "build_coco_evaluator"]


def build_coco_evaluator(cfg, dataset_name: str, output_folder: str = None) -> COCOEvaluator:
    """COCO box evaluation; uses pycocotools when detectron2's fast C++ evaluator is not built."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    return COCOEvaluator(
        dataset_name,
        tasks=("bbox",),
        output_dir=output_folder,
        use_fast_impl=compat.HAS_DETECTRON2_EXTENSION,
    )


class DetectionTrainer(DefaultTrainer):
    """``DefaultTrainer`` evaluating with :func:`build_coco_evaluator`."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_coco_evaluator(cfg, dataset_name, output_folder)
