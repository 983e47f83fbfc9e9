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

from san_det.classification.checkpoint import (
    CLASSIFIER_INFO_KEY,
    CheckpointMismatchError,
    ClassifierCheckpointer,
)
from san_det.classification.config import get_classification_cfg
from san_det.modeling.input_info import INPUT_INFO_KEY, recorded_input_info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="the detection config")
    parser.add_argument("--input", required=True, help="classifier checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="detection initialisation (.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        print(f"{parser.prog}: error: input not found: {args.input}", file=sys.stderr)
        return 2
    cfg = get_classification_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    checkpointer = ClassifierCheckpointer(model, require_classifier=True)
    try:
        checkpoint = checkpointer.load(args.input, checkpointables=[])  # all but "model"
    except CheckpointMismatchError as e:
        print(f"{parser.prog}: error: {args.input}: {e}", file=sys.stderr)
        return 1
    state, report = checkpointer.classifier_state, checkpointer.classifier_report
    out = {"model": state, "__author__": "san_det classifier"}
    if CLASSIFIER_INFO_KEY in checkpoint:
        out["classifier_info"] = checkpoint[CLASSIFIER_INFO_KEY]
    info = recorded_input_info(checkpoint)
    if info is not None:  # checked against the detector whenever the file is loaded
        out[INPUT_INFO_KEY] = {k: info[k] for k in ("input_format", "pixel_mean", "pixel_std")}
    torch.save(out, args.output)
    print(
        f"wrote {len(state)} backbone tensors to {args.output}; "
        f"{len(report['not_in_checkpoint'])} FPN/head tensors stay as initialised"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
