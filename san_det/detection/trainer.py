"""Detection training: :class:`DetectionTrainer`, san_det's engine
(:class:`~san_det.engine.trainer.RobustTrainer`) with detection data (robust mapper, resumable
loader), COCO evaluation and prediction images, and :class:`DetectorCheckpointer`, which also loads
classifier checkpoints (ImageNet pretraining) into detectors' backbones.
"""

import logging
import os

from detectron2.data import build_detection_test_loader
from detectron2.data import build_detection_train_loader as d2_build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator

from .. import compat
from ..classification.checkpoint import ClassifierCheckpointer
from ..data.mapper import RobustDatasetMapper, sanitize_dataset_dicts
from ..engine.stop_signals import shield_loader_workers
from ..engine.trainer import RobustTrainer, build_resumable_train_loader
from .coco_evaluation import COCOEvaluatorNoDetectionsIsZero
from .validate import check_detection_keys, probe_detector
from .visualize import PredictionImagesHook

__all__ = ["DetectionTrainer", "DetectorCheckpointer", "build_coco_evaluator"]

logger = logging.getLogger(__name__)


class DetectorCheckpointer(ClassifierCheckpointer):
    """The detection trainer's checkpointer: a
    :class:`~san_det.engine.checkpoint.SafeCheckpointer` that also loads classifier checkpoints
    into detectors' backbones; another recorded input normalisation is an error unless
    ``MODEL.WEIGHTS_ALLOW_INPUT_MISMATCH``."""

    allow_input_mismatch_default = False


def build_coco_evaluator(cfg, dataset_name: str, output_folder: str = None) -> COCOEvaluator:
    """COCO box evaluation on detectron2's C++ evaluator, else faster-coco-eval's (same numbers),
    else pycocotools (:func:`san_det.compat.coco_eval_backend`); a model without any detection
    scores AP 0, with a warning (not NaN)."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    backend = compat.coco_eval_backend()
    logger.info(f"COCO evaluation of {dataset_name} with {backend}")
    threshold = cfg.MODEL.RETINANET.SCORE_THRESH_TEST
    return COCOEvaluatorNoDetectionsIsZero(
        dataset_name,
        tasks=("bbox",),
        output_dir=output_folder,
        use_fast_impl=backend != "pycocotools",
        no_detections_hint=(
            f"no score above the test threshold, MODEL.RETINANET.SCORE_THRESH_TEST {threshold}: "
            "an untrained or diverged model?"
        ),
    )


class DetectionTrainer(RobustTrainer):
    """:class:`RobustTrainer` for detection: :class:`~san_det.data.mapper.RobustDatasetMapper`,
    the resumable training stream, COCO evaluation (:func:`build_coco_evaluator`)."""

    config_probe = staticmethod(probe_detector)
    config_checks = (check_detection_keys,)
    checkpointer_cls = DetectorCheckpointer

    @classmethod
    def build_train_loader(cls, cfg):
        filter_empty = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=filter_empty,
            min_keypoints=(
                cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
            ),
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        dicts = sanitize_dataset_dicts(dicts, filter_empty, name=",".join(cfg.DATASETS.TRAIN))
        mapper = RobustDatasetMapper(cfg, True)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logger.warning(
                f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN}: using detectron2's "
                "loader; a resumed run does not continue its data stream exactly"
            )
            return d2_build_detection_train_loader(cfg, mapper=mapper, dataset=dicts)
        return build_resumable_train_loader(cfg, dicts, mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = RobustDatasetMapper(cfg, False)
        return shield_loader_workers(build_detection_test_loader(cfg, dataset_name, mapper=mapper))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_coco_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        # after EvalHook: the images are drawn once the final evaluation has run
        return super().build_hooks() + [PredictionImagesHook(self.cfg)]
