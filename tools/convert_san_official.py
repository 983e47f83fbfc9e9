#!/usr/bin/env python
"""Convert a released hszhao/SAN ImageNet checkpoint for san_det.

Classifier (for --eval-only on ImageNet, fine-tuning, or as MODEL.WEIGHTS of a detection config,
which loads its backbone automatically)::

    python tools/convert_san_official.py --config-file configs/ImageNet/san10_pairwise.yaml \\
        --input san10_pairwise.pth --output san10_pairwise_d2.pth

Detection backbone only (keys ``backbone.bottom_up.*``, loadable by any detectron2 checkpointer)::

    python tools/convert_san_official.py --config-file configs/ImageNet/san10_pairwise.yaml \\
        --detection-config configs/COCO-Detection/retinanet_san10_pairwise.yaml \\
        --input san10_pairwise.pth --output retinanet_san10_pairwise_init.pth

Fails, naming the key, on any official key without a counterpart, missing key or shape mismatch.
The official models read RGB images normalised with ImageNet's mean/std: the configs under
configs/ImageNet/ and configs/COCO-Detection/retinanet_san*.yaml use the same INPUT.FORMAT /
MODEL.PIXEL_MEAN / PIXEL_STD. Both outputs record that input (the detection file under
``san_det_input``); san_det's trainers refuse to load a file into a model configured otherwise.
"""

import argparse
import pickle
import sys

import san_det  # noqa: F401  (patches detectron2 0.6 where needed)
import torch
from detectron2.modeling import build_model

from san_det.classification.checkpoint import CLASSIFIER_INFO_KEY
from san_det.classification.convert_cli import converter_parser, run_converter
from san_det.classification.convert_san import (
    OFFICIAL_SAN_INPUT,
    convert_official_san_to_classifier,
    convert_official_san_to_detection,
)
from san_det.config import get_san_det_cfg
from san_det.errors import UserInputError
from san_det.modeling.input_info import INPUT_INFO_KEY, describe_input_mismatch, input_info_from_cfg

PROG = "convert_san_official.py"


def _state_dict_of(config_file: str, opts) -> dict:
    cfg = get_san_det_cfg(config_file, opts)
    cfg.MODEL.DEVICE = "cpu"
    return cfg, build_model(cfg).state_dict()


def convert(args):
    """The converted checkpoint (classifier, or detection backbone with ``--detection-config``)
    and the summary line.

    Raises:
        UserInputError: the input is not a PyTorch checkpoint.
        CheckpointMismatchError: naming the first official key that does not fit.
    """
    try:
        checkpoint = torch.load(args.input, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(
            f"cannot read --input {args.input}: not a PyTorch checkpoint ({reason})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise UserInputError(
            f"--input {args.input} holds a {type(checkpoint).__name__}, not an official SAN "
            "checkpoint (a dict with a state_dict)"
        )
    cfg, classifier_state = _state_dict_of(args.config_file, args.opts)
    if args.detection_config:
        det_cfg, detection_state = _state_dict_of(args.detection_config, args.opts)
        state = convert_official_san_to_detection(checkpoint, classifier_state, detection_state)
        out = {"model": state, "__author__": "hszhao/SAN (converted by san_det)"}
        out[INPUT_INFO_KEY] = dict(OFFICIAL_SAN_INPUT)  # checked when the file is loaded
        differences = describe_input_mismatch(OFFICIAL_SAN_INPUT, input_info_from_cfg(det_cfg))
        if differences:
            print(
                f"{PROG}: warning: {args.detection_config} does not use the "
                f"official input: {differences}; loading {args.output} into it will fail",
                file=sys.stderr,
            )
    else:
        state = convert_official_san_to_classifier(checkpoint, classifier_state)
        info = dict(OFFICIAL_SAN_INPUT, meta_architecture="ImageClassifier")
        info.update(backbone=cfg.MODEL.BACKBONE.NAME, num_classes=len(state["classifier.bias"]))
        out = {"model": state, CLASSIFIER_INFO_KEY: info, "__author__": "hszhao/SAN"}
    return out, f"wrote {len(state)} tensors to {args.output}"


def argument_parser() -> argparse.ArgumentParser:
    parser = converter_parser(PROG, __doc__.split("\n")[0], "configs/ImageNet/san*.yaml")
    parser.add_argument("--detection-config", default="", help="write detection backbone keys")
    return parser


def main(argv=None) -> int:
    return run_converter(PROG, argument_parser().parse_args(argv), convert)


if __name__ == "__main__":
    sys.exit(main())
