"""Training engine, for any task: config setup with clear errors, the robust trainer base,
CPU/GPU launch, safe checkpoints, output-folder locking and clean stops on SIGTERM/SIGINT."""

from .checkpoint import CheckpointError, NonFiniteError, SafeCheckpointer
from .config import add_engine_config
from .ddp import CPUSyncBatchNorm, unwrap_model, wrap_ddp
from .errors import UserInputError
from .graceful_stop import StopOnSignalHook, TrainingStopped
from .launch import is_primary_launcher, launch, torchrun_environment
from .loader import DeterministicBatchStream, ResumableTrainLoader
from .output_lock import OutputDirInUseError, OutputDirLock
from .checkpoint_rules import choose_checkpoint
from .setup import validate_datasets
from .trainer import RobustTrainer, build_resumable_train_loader
from .validate import validate_config

__all__ = [
    "CPUSyncBatchNorm",
    "CheckpointError",
    "DeterministicBatchStream",
    "NonFiniteError",
    "OutputDirInUseError",
    "OutputDirLock",
    "ResumableTrainLoader",
    "RobustTrainer",
    "SafeCheckpointer",
    "StopOnSignalHook",
    "TrainingStopped",
    "UserInputError",
    "add_engine_config",
    "build_resumable_train_loader",
    "choose_checkpoint",
    "is_primary_launcher",
    "launch",
    "torchrun_environment",
    "unwrap_model",
    "validate_config",
    "validate_datasets",
    "wrap_ddp",
]
