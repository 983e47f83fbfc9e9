#!/usr/bin/env python
"""Turn a san_det classifier checkpoint into a detection initialisation (backbone keys only).

Detection configs load classifier checkpoints directly when the trainer uses
``san_det.classification.ClassifierCheckpointer``; this tool writes a file that any detectron2
checkpointer loads, with the keys checked against the detector now::

    python tools/convert_classifier_to_detection.py \\
        --config-file configs/COCO-Detection/retinanet_sasa50.yaml \\
        --input output/imagenet_sasa50/model_final.pth --output sasa50_retinanet_init.pth

Every backbone weight of the detector must come from the checkpoint with the right shape; the
first mismatch is reported by key. FPN and head weights stay as initialised.
"""

import argparse
import os
import sys

import san_det  # noqa: F401  (patches detectron2 0.6 where needed)
import torch
from detectron2.modeling import build_model

from san_det.classification.checkpoint import CLASSIFIER_INFO_KEY, CheckpointMismatchError
from san_det.engine import UserInputError, setup_cfg
from san_det.engine.checkpoint import CheckpointError
from san_det.engine.trainer import TrainerCheckpointer
from san_det.engine.validate import build_model_on_meta
from san_det.modeling.input_info import INPUT_INFO_KEY, recorded_input_info


def _check_output(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserInputError(f"--output {path} is a folder: name the file to write")
    if not os.path.isdir(folder):
        raise UserInputError(f"--output {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserInputError(f"--output {path}: the folder {folder} is not writable")


def convert(args):
    """Read, check and convert; returns ``(state, report, checkpoint)``.

    Raises:
        UserInputError: bad arguments or config, an unreadable checkpoint.
        CheckpointMismatchError: not a classifier checkpoint, or not one for this detector.
    """
    if not os.path.isfile(args.input):
        raise UserInputError(f"input not found: {args.input}")
    _check_output(args.output)
    cfg = setup_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"], check_output=False)
    build_model_on_meta(cfg)  # a config the constructors refuse: one line naming the key
    model = build_model(cfg)
    checkpointer = TrainerCheckpointer(  # the output records the input info, checked on use
        model, require_classifier=True, trusted=cfg.MODEL.WEIGHTS_TRUSTED, allow_input_mismatch=True
    )
    try:
        checkpoint = checkpointer.load(args.input, checkpointables=[])  # all but "model"
    except CheckpointError as e:
        if isinstance(e.__cause__, CheckpointMismatchError):
            raise e.__cause__ from None
        raise
    return checkpointer.classifier_state, checkpointer.classifier_report, checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=os.path.basename(__file__), description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config-file", required=True, help="the detection config")
    parser.add_argument("--input", required=True, help="classifier checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="detection initialisation (.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    try:
        state, report, checkpoint = convert(args)
    except UserInputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except CheckpointMismatchError as e:
        print(f"{parser.prog}: error: {args.input}: {e}", file=sys.stderr)
        return 1
    out = {"model": state, "__author__": "san_det classifier"}
    if CLASSIFIER_INFO_KEY in checkpoint:
        out["classifier_info"] = checkpoint[CLASSIFIER_INFO_KEY]
    info = recorded_input_info(checkpoint)
    if info is not None:  # checked against the detector whenever the file is loaded
        out[INPUT_INFO_KEY] = {k: info[k] for k in ("input_format", "pixel_mean", "pixel_std")}
    try:
        torch.save(out, args.output)
    except (OSError, RuntimeError) as e:  # disk full: torch's zip writer raises RuntimeError
        print(f"{parser.prog}: error: cannot write {args.output}: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {len(state)} backbone tensors to {args.output}; "
        f"{len(report['not_in_checkpoint'])} FPN/head tensors stay as initialised"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
