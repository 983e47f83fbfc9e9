"""Training entry-point helpers: config setup with clear errors, the detection trainer, launch."""

from .errors import UserInputError
from .setup import setup_cfg, validate_datasets
from .trainer import DetectionTrainer

__all__ = ["UserInputError", "setup_cfg", "validate_datasets", "DetectionTrainer"]
