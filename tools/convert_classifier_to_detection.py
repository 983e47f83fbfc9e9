#!/usr/bin/env python
"""Turn a san_det classifier checkpoint into a detection initialisation (backbone keys only).

Detection configs load classifier checkpoints directly (the detection trainer's checkpointer
maps their keys); this tool writes a file that any detectron2
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

from san_det.classification import is_classification_config
from san_det.classification.checkpoint import (
    CLASSIFIER_INFO_KEY,
    classifier_to_detection_state_dict,
    is_classifier_checkpoint,
)
from san_det.classification.convert_cli import converter_parser, run_converter
from san_det.config import setup_cfg
from san_det.engine.checkpoint_rules import read_checkpoint
from san_det.engine.validate import build_model_on_meta
from san_det.errors import CheckpointError, UserInputError
from san_det.modeling.input_info import INPUT_INFO_KEY, recorded_input_info


def convert(args):
    """Read, check and convert; returns ``(checkpoint to write, summary line)``.

    Raises:
        UserInputError: bad config (a classification config too); a CheckpointError: an
            unreadable file, not a classifier checkpoint, or not one for this detector.
    """
    cfg = setup_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"], check_output=False)
    if is_classification_config(cfg):
        raise UserInputError(
            f"--config-file {args.config_file} is a classification config (MODEL."
            f"META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE}): give the detection config whose "
            "backbone the classifier initialises (configs/COCO-Detection/retinanet_sasa50.yaml)"
        )
    model = build_model_on_meta(cfg)  # keys and shapes only; a bad config: one line
    checkpoint = read_checkpoint(args.input, trusted=cfg.MODEL.WEIGHTS_TRUSTED)
    if not is_classifier_checkpoint(checkpoint):
        raise CheckpointError(
            "not a classifier checkpoint (neither san_det classifier info nor only "
            "backbone.* and classifier.* keys)"
        )
    state, report = classifier_to_detection_state_dict(checkpoint["model"], model.state_dict())
    out = {"model": state, "__author__": "san_det classifier"}
    if CLASSIFIER_INFO_KEY in checkpoint:
        out["classifier_info"] = checkpoint[CLASSIFIER_INFO_KEY]
    info = recorded_input_info(checkpoint)
    if info is not None:  # checked against the detector whenever the file is loaded
        out[INPUT_INFO_KEY] = {k: info[k] for k in ("input_format", "pixel_mean", "pixel_std")}
    summary = (
        f"wrote {len(state)} backbone tensors to {args.output}; "
        f"{len(report['not_in_checkpoint'])} FPN/head tensors stay as initialised"
    )
    return out, summary


def argument_parser() -> argparse.ArgumentParser:
    prog = os.path.basename(__file__)
    return converter_parser(prog, __doc__.split("\n")[0], "the detection config")


def main(argv=None) -> int:
    prog = os.path.basename(__file__)
    return run_converter(prog, argument_parser().parse_args(argv), convert)


if __name__ == "__main__":
    sys.exit(main())
