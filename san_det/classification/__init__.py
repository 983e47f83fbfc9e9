"""ImageNet-style classification with san_det's backbones, on detectron2's engine.

Importing this package registers the ``ImageClassifier`` meta-architecture and the datasets
``imagenet_train`` / ``imagenet_val`` (``$DETECTRON2_DATASETS/imagenet``) and
``embedded_digits_train`` / ``embedded_digits_val`` (scikit-learn's digits, written on first use).
The datasets themselves live in :mod:`san_det.data` (:mod:`~san_det.data.image_folder`,
:mod:`~san_det.data.embedded_digits`, :mod:`~san_det.data.classification_transforms`).
"""

from ..data.embedded_digits import register_embedded_digits
from ..data.image_folder import register_imagenet
from .checkpoint import (
    ClassifierCheckpointer,
    classifier_to_detection_state_dict,
    load_classifier_into_detector,
)
from .classifier import ImageClassifier
from .config import add_classification_config, is_classification_config
from .evaluator import ClassificationEvaluator
from .trainer import ClassificationTrainer

__all__ = [
    "ClassificationEvaluator",
    "ClassificationTrainer",
    "ClassifierCheckpointer",
    "ImageClassifier",
    "add_classification_config",
    "classifier_to_detection_state_dict",
    "is_classification_config",
    "load_classifier_into_detector",
]

register_imagenet()
register_embedded_digits()
