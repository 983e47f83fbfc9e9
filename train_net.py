#!/usr/bin/env python
"""Train and evaluate san_det models with Detectron2: detection, and ImageNet classification for
configs whose ``MODEL.META_ARCHITECTURE`` is ``ImageClassifier``::

    python train_net.py --config-file configs/Demo/shapes_retinanet.yaml MODEL.DEVICE cpu

Flags, processes, resume, signals, exit statuses: docs/TRAINING.md (interruptions:
docs/INTERRUPTIONS.md); your own COCO data: docs/OWN_DATA.md; pretraining: docs/IMAGENET.md.
"""

import logging
import sys

import san_det  # noqa: F401  (patches detectron2 0.6 where needed; registers san_det components)
import torch
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.multiprocessing import ProcessExitedException

from san_det.classification import ClassificationTrainer, is_classification_config
from san_det.classification.loader import get_classification_dataset_dicts
from san_det.config import setup_cfg
from san_det.detection import DetectionTrainer, check_dataset_files, check_detection_classes
from san_det.detection.visualize import (
    check_prediction_images_config,
    write_configured_prediction_images,
)
from san_det.engine import (
    NonFiniteError,
    OutputDirLock,
    UserInputError,
    is_primary_launcher,
    launch,
    torchrun_environment,
    validate_datasets,
)
from san_det.engine.checkpoint import CheckpointWriteError, checkpointer_options
from san_det.engine.checkpoint_rules import choose_checkpoint
from san_det.engine.interrupt import Interrupted, interruptible
from san_det.engine.results_files import ResultsWriteError
from san_det.engine.validate import without_logging
from san_det.modeling.input_info import check_weights_input

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 1


def trainer_class(cfg):
    """The trainer for the task the config describes (detection or classification)."""
    return ClassificationTrainer if is_classification_config(cfg) else DetectionTrainer


def setup(args):
    # OUTPUT_DIR was checked once by check_input in the launching process.
    cfg = setup_cfg(args.config_file, args.opts, check_output=False)
    default_setup(cfg, args)
    # san_det's own messages (dataset generation, prediction images) to the console and log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="san_det")
    return cfg


def evaluate(cfg, trainer_cls, resume: bool):
    """``--eval-only``: the model must load every tensor from its checkpoint (strict)."""
    model = trainer_cls.build_model(cfg)
    checkpointer = trainer_cls.checkpointer_cls(
        model, save_dir=cfg.OUTPUT_DIR, **checkpointer_options(cfg)
    )
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume, purpose="eval")
    res = trainer_cls.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, res)
    if issubclass(trainer_cls, DetectionTrainer):
        write_configured_prediction_images(cfg, model)  # TEST.PREDICTION_IMAGES, main process
    return res


def main(args):
    cfg = setup(args)
    trainer_cls = trainer_class(cfg)
    if args.eval_only:
        with interruptible("the evaluation (--eval-only); no partial result file left"):
            return evaluate(cfg, trainer_cls, args.resume)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _one_line(error: Exception) -> str:
    """The error's message; for one re-raised from a data-loader worker (whose message holds
    the worker's traceback) the original message, the traceback's last line."""
    message = str(error).strip()
    if "Original Traceback" in message:
        last = message.splitlines()[-1]
        prefix = type(error).__name__ + ": "
        message = last.split(prefix, 1)[1] if prefix in last else last
    return " ".join(message.split("\n"))


def _fail(error: Exception, status: int):
    rank = f" (process {comm.get_rank()})" if comm.get_world_size() > 1 else ""
    print(f"train_net.py: error{rank}: {_one_line(error)}", file=sys.stderr, flush=True)
    sys.exit(status)


def run(args, output_lock=None):
    """:func:`main` with user errors and NaN/inf stops reported in one line (every process), and
    a stop by SIGTERM/SIGINT reported once.

    ``output_lock``: the launcher's :class:`OutputDirLock`, held by every worker while it runs.
    """
    try:
        return main(args)
    except UserInputError as e:
        _fail(e, EXIT_BAD_INPUT)
    except (NonFiniteError, CheckpointWriteError, ResultsWriteError) as e:
        _fail(e, EXIT_TRAINING_FAILED)
    except Interrupted as e:  # SIGTERM / SIGINT: training stopped after a step, or evaluation
        if comm.is_main_process():
            print(f"train_net.py: {e}", file=sys.stderr, flush=True)
        sys.exit(e.code)


def check_input(args):
    """Validate flags, config and datasets in the launching process, before any worker starts
    or anything is written.

    Returns:
        The config.
    """
    if args.num_processes is not None and args.num_processes < 1:
        raise UserInputError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_gpus < 1:
        raise UserInputError(f"--num-gpus must be >= 1, got {args.num_gpus}")
    _check_machines(args)
    cfg = setup_cfg(args.config_file, args.opts)
    on_gpu = cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available()
    n = args.num_processes or args.num_gpus
    if on_gpu and n > torch.cuda.device_count():
        raise UserInputError(
            f"{n} processes on MODEL.DEVICE {cfg.MODEL.DEVICE} but only "
            f"{torch.cuda.device_count()} GPU(s) are visible; add `MODEL.DEVICE cpu` for CPU "
            "processes"
        )
    if args.eval_only:  # trained weights to evaluate: MODEL.WEIGHTS or (--resume) the last
        choose_checkpoint(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR, resume=args.resume, purpose="eval")
    check_weights_input(cfg)  # MODEL.WEIGHTS recording another input normalisation
    trainer_cls = trainer_class(cfg)
    trainer_cls.check_config(
        cfg, world_size=_world_size(args), eval_only=args.eval_only, resume=args.resume
    )
    names = list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN))
    if trainer_cls is DetectionTrainer:
        check_prediction_images_config(cfg)
        validate_datasets(names)
        training = [] if args.eval_only else cfg.DATASETS.TRAIN
        check_dataset_files(cfg, cfg.DATASETS.TEST, training)
        check_detection_classes(cfg, names)  # also loads the config's own COCO jsons
    else:  # reads the folders, checks CLASSIFICATION.NUM_CLASSES against their classes
        with without_logging():  # the run reads them again, and logs it, once it has started
            get_classification_dataset_dicts(names, cfg.CLASSIFICATION.NUM_CLASSES)
    return cfg


def _world_size(args) -> int:
    """Processes of the whole job: torchrun's WORLD_SIZE, else processes x machines."""
    env = torchrun_environment()
    if env is not None:
        return env.world_size
    return (args.num_processes or args.num_gpus) * args.num_machines


def _check_machines(args):
    if torchrun_environment() is not None:
        return  # torchrun's environment says how many processes, where and how they meet
    if args.num_machines < 1:
        raise UserInputError(f"--num-machines must be >= 1, got {args.num_machines}")
    if not 0 <= args.machine_rank < args.num_machines:
        raise UserInputError(
            f"--machine-rank must be in [0, {args.num_machines - 1}], got {args.machine_rank}"
        )
    if args.num_machines > 1 and args.dist_url in (None, "auto"):
        raise UserInputError(
            f"--num-machines {args.num_machines} needs --dist-url tcp://<address of machine "
            "0>:<free port>, the same on every machine"
        )


def argument_parser():
    parser = default_argument_parser()
    # detectron2's default is a fixed port per user: a second run on the machine failed with
    # EADDRINUSE. "auto": a port the OS picks (one machine; several need tcp://<machine 0>:<port>).
    parser.set_defaults(dist_url="auto")
    parser.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="data-parallel processes per machine (overrides --num-gpus); on the CPU "
        "(MODEL.DEVICE cpu or no GPU) these are CPU processes using the gloo backend",
    )
    return parser


def cli(argv=None):
    args = argument_parser().parse_args(argv)
    # The checks may generate an embedded dataset: show its progress before the loggers of
    # detectron2's default_setup exist (this handler is removed again before training).
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("[%(asctime)s %(name)s]: %(message)s", "%m/%d %H:%M:%S"))
    san_det_logger = logging.getLogger("san_det")
    san_det_logger.addHandler(console)
    san_det_logger.setLevel(logging.INFO)
    try:
        cfg = check_input(args)
        # The job's first launcher locks OUTPUT_DIR (after the checks: bad input writes nothing).
        lock = OutputDirLock(cfg.OUTPUT_DIR if is_primary_launcher(args.machine_rank) else "")
        lock.acquire()
    except UserInputError as e:
        print(f"train_net.py: error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    finally:
        san_det_logger.removeHandler(console)
    print("Command Line Args:", args)
    on_gpu = cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available()
    try:
        return launch(
            run,
            args.num_processes or args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args, lock),
            device="cuda" if on_gpu else "cpu",
        )
    except ProcessExitedException as e:  # a worker already reported its error in one line
        code = e.exit_code or EXIT_TRAINING_FAILED
        sys.exit(code if code > 0 else 128 - code)  # killed by signal N: 128 + N, as a shell
    finally:
        lock.release()


if __name__ == "__main__":
    cli()
