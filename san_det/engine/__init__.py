"""Training engine: config setup with clear errors, trainers, CPU/GPU launch, safe checkpoints."""

from .checkpoint import CheckpointError, NonFiniteError, SafeCheckpointer
from .config import add_engine_config
from .dataset_checks import check_detection_classes
from .ddp import CPUSyncBatchNorm, wrap_ddp
from .errors import UserInputError
from .launch import launch
from .loader import DeterministicBatchStream, ResumableTrainLoader
from .setup import setup_cfg, validate_datasets
from .trainer import DetectionTrainer, RobustTrainer, build_resumable_train_loader

__all__ = [
    "CPUSyncBatchNorm",
    "CheckpointError",
    "DetectionTrainer",
    "DeterministicBatchStream",
    "NonFiniteError",
    "ResumableTrainLoader",
    "RobustTrainer",
    "SafeCheckpointer",
    "UserInputError",
    "add_engine_config",
    "build_resumable_train_loader",
    "check_detection_classes",
    "launch",
    "setup_cfg",
    "validate_datasets",
    "wrap_ddp",
]
