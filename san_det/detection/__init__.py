"""Detection on san_det's engine: the trainer, its checkpointer, COCO evaluation, prediction
images and ``tools/predict.py``'s prediction over image files."""

from .dataset_checks import check_dataset_files, check_detection_classes
from .trainer import DetectionTrainer, DetectorCheckpointer, build_coco_evaluator

__all__ = [
    "DetectionTrainer",
    "DetectorCheckpointer",
    "build_coco_evaluator",
    "check_dataset_files",
    "check_detection_classes",
]
